//! `moemesh verify` on the CPU: the command `scripts/gpu-check.sh` runs on a GPU, run here so its
//! criteria cannot rot unseen. Every fixture passes in f32 (within 1e-3 of HF transformers, all
//! greedy tokens) and in bf16 (cosine ≥ 0.999 away from routing near-ties), and the JSON shows
//! that the bf16 check did leave near-ties out without leaving everything out.

use std::process::Command;

#[test]
fn verify_passes_every_fixture_on_the_cpu_in_f32_and_bf16() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
    let out = Command::new(env!("CARGO_BIN_EXE_moemesh"))
        .args([
            "verify",
            "--fixtures",
            fixtures,
            "--dtype",
            "f32,bf16",
            "--json",
        ])
        .output()
        .expect("run moemesh verify");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let checks: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    // 3 fixtures × 2 dtypes × 4 paths (prefill; paged; chunked: the prompts prefilled together
    // in 16-token chunks through a paged pool, each chunk reading earlier context from it;
    // mixed: the same with the longest prompt whole in the first step).
    assert_eq!(checks.len(), 24, "{stdout}");
    for path in ["prefill", "paged", "chunked", "mixed"] {
        assert_eq!(
            checks.iter().filter(|c| c["path"] == path).count(),
            6,
            "{path}: {stdout}"
        );
    }
    for c in &checks {
        assert_eq!(c["passed"], true, "{c}");
        let positions = c["positions"].as_u64().expect("positions");
        let ties = c["routing_near_ties"].as_u64().expect("near-ties");
        assert!(positions > 0, "{c}");
        if c["dtype"] == "f32" {
            assert_eq!(ties, 0, "f32 excuses nothing: {c}");
            assert!(c["max_abs"].as_f64().expect("max_abs") <= 1e-3, "{c}");
        } else {
            assert!(ties * 10 <= positions * 4, "at most 40% near-ties: {c}");
            let away = c["worst_position_cosine_away_from_near_ties"]
                .as_f64()
                .expect("worst away");
            assert!(away >= 0.999, "{c}");
        }
        // The chunked and mixed paths check logits only; the others also decode greedily.
        if c["path"] != "chunked" && c["path"] != "mixed" {
            assert!(c["greedy_compared"].as_u64().expect("compared") > 0, "{c}");
        }
    }
}
