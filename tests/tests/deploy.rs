//! deploy/: the Prometheus alert rules pass `promtool check rules` and their unit tests
//! (`promtool test rules`), the rules and the Grafana dashboard name only metrics that the
//! services export, and the Kubernetes manifests and Compose files pass `deploy/validate.py`
//! (rendered, validated against the Kubernetes, CRD and Compose schemas offline, and checked
//! against the binary's own flags).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use moemesh_tests::{moemesh_bin, workspace_root};

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

#[test]
fn kubernetes_manifests_and_compose_files_validate_offline() {
    let python = moemesh_tests::test_python();
    if !python.is_file() {
        // CI runs scripts/setup.sh --test first, so there a missing environment is a failure.
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is missing: scripts/setup.sh --test installs it",
            python.display()
        );
        eprintln!(
            "\n*** SKIPPED: {} is missing, so deploy/k8s and deploy/compose are NOT checked. \
             scripts/setup.sh --test installs it. ***\n",
            python.display()
        );
        return;
    }
    let out = Command::new(&python)
        .arg(workspace_root().join("deploy/validate.py"))
        .arg("--moemesh")
        .arg(moemesh_bin())
        .output()
        .expect("running deploy/validate.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "deploy/validate.py failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{stdout}");
    // Every kustomization was rendered and checked (a renderer is on this kind of machine), and
    // both Compose files; a silently skipped part would not print its line.
    let rendered = stdout
        .lines()
        .filter(|l| l.starts_with("ok   k8s/"))
        .count();
    if stdout.contains("NOT rendered") {
        eprintln!("*** kustomize/kubectl missing: only k8s/base's files were checked ***");
    } else {
        assert_eq!(rendered, 5, "expected base and four overlays:\n{stdout}");
        // The autoscaling overlay scales on serving signals: KEDA's objects replace the HPA.
        let autoscaling = stdout
            .lines()
            .find(|l| l.starts_with("ok   k8s/overlays/autoscaling:"))
            .unwrap_or_else(|| panic!("no autoscaling overlay:\n{stdout}"));
        assert!(autoscaling.contains("ScaledObject"), "{autoscaling}");
        assert!(
            !autoscaling.contains("HorizontalPodAutoscaler"),
            "{autoscaling}"
        );
    }
    assert!(stdout.contains("checked compose/compose.yaml"), "{stdout}");
    assert!(
        stdout.contains("checked compose/compose.gpu.yaml"),
        "{stdout}"
    );
}
