//! deploy/: the Prometheus alert rules pass `promtool check rules` and their unit tests
//! (`promtool test rules`), and the rules and the Grafana dashboard name only metrics that the
//! services export.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use moemesh_tests::workspace_root;

/// The metric names the services define (`services/common/src/metrics.rs`, module `names`).
fn exported_names() -> BTreeSet<String> {
    let src = std::fs::read_to_string(workspace_root().join("services/common/src/metrics.rs"))
        .expect("metrics.rs");
    metric_names(&src)
}

/// Every `moemesh_…` identifier in `text`, without the `_bucket`/`_count`/`_sum` a histogram adds.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("moemesh_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(base.to_string());
        rest = &tail[end..];
    }
    out
}

fn promtool(dir: &Path, args: &[&str]) -> Option<std::process::Output> {
    match Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
    {
        Ok(o) => Some(o),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("running promtool: {e}"),
    }
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = workspace_root().join("deploy/prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts_test.yml"][..],
    ] {
        let Some(out) = promtool(&dir, args) else {
            eprintln!(
                "\n*** SKIPPED: promtool is not installed, so deploy/prometheus/ is NOT checked. \
                 scripts/setup.sh --test installs it (Debian's prometheus package). ***\n"
            );
            return;
        };
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn rules_and_dashboard_use_only_exported_metrics() {
    let exported = exported_names();
    assert!(exported.contains("moemesh_gate_step_duration_seconds"));
    for file in [
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/moemesh.json",
    ] {
        let text = std::fs::read_to_string(workspace_root().join(file)).expect(file);
        let unknown: Vec<String> = metric_names(&text)
            .into_iter()
            .filter(|n| !exported.contains(n))
            .collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics nobody exports: {unknown:?}"
        );
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("deploy/grafana/moemesh.json"))
            .expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    assert!(
        dashboard["panels"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    );
}
