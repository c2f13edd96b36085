//! `moemesh verify` on the CPU: the command `scripts/gpu-check.sh` runs on a GPU, run here so its
//! criteria cannot rot unseen. Every fixture passes in f32 (within 1e-3 of HF transformers, all
//! greedy tokens) and in bf16: against HF transformers' own bf16 figures where the fixture has
//! them (`hf_bf16_reference.json`: flips, the mean KL of the other positions and top-1 agreement
//! within `divergence::judge`'s margins), else cosine ≥ 0.999 away from routing near-ties, and the
//! JSON shows which rule decided and that the near-tie rule did leave near-ties out without
//! leaving everything out.

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
    // Every fixture (3, and tiny-deepseek-v3-many-experts once its files are in) × 2 dtypes × 4
    // paths (prefill; paged; chunked: the prompts prefilled together in 16-token chunks through a
    // paged pool, each chunk reading earlier context from it; mixed: the same with the longest
    // prompt whole in the first step).
    let fixtures = std::fs::read_dir(fixtures)
        .expect("tests/fixtures")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("reference.safetensors").is_file())
        .count();
    assert!(fixtures >= 3, "{fixtures} fixtures");
    assert_eq!(checks.len(), 8 * fixtures, "{stdout}");
    for path in ["prefill", "paged", "chunked", "mixed"] {
        assert_eq!(
            checks.iter().filter(|c| c["path"] == path).count(),
            2 * fixtures,
            "{path}: {stdout}"
        );
    }
    for c in &checks {
        assert_eq!(c["passed"], true, "{c}");
        let positions = c["positions"].as_u64().expect("positions");
        let ties = c["routing_near_ties"].as_u64().expect("near-ties");
        assert!(positions > 0, "{c}");
        let figure = |k: &str| c[k].as_f64().unwrap_or_else(|| panic!("{k}: {c}"));
        match (c["dtype"].as_str(), c["rule"].as_str()) {
            (Some("f32"), Some("f32")) => {
                assert_eq!(ties, 0, "f32 excuses nothing: {c}");
                assert!(figure("max_abs") <= 1e-3, "{c}");
            }
            (Some("bf16"), Some("hf_bf16_kl")) => {
                if c["kl_rule"] == "flips" {
                    assert!(figure("rest_mean_kl") <= figure("max_mean_kl"), "{c}");
                    assert!(figure("flips") <= figure("max_flips"), "{c}");
                } else {
                    assert_eq!(c["kl_rule"], "all_positions", "{c}");
                    assert!(figure("mean_kl") <= figure("max_mean_kl"), "{c}");
                }
                assert!(figure("top1_agree") >= figure("min_top1_agree"), "{c}");
                assert_eq!(c["hf_bf16"]["positions"], c["positions"], "{c}");
            }
            (Some("bf16"), Some("near_ties")) => {
                assert!(ties * 10 <= positions * 4, "at most 40% near-ties: {c}");
                assert!(
                    figure("worst_position_cosine_away_from_near_ties") >= 0.999,
                    "{c}"
                );
            }
            _ => panic!("unexpected dtype and rule: {c}"),
        }
        assert!(figure("mean_kl").is_finite(), "{c}");
        // The chunked and mixed paths check logits only; the others also decode greedily.
        if c["path"] != "chunked" && c["path"] != "mixed" {
            assert!(c["greedy_compared"].as_u64().expect("compared") > 0, "{c}");
        }
    }
}
