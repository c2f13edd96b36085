//! `moemesh plan` as a user runs it: the real DeepSeek-R1 config (tests/fixtures/deepseek-r1),
//! read from its directory or its config.json, and a synthetic model; the last line of stdout
//! with `--json` is one object whose `fits` answers the question.

use std::process::Command;

const R1: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/deepseek-r1"
);

/// Runs `moemesh plan ARGS --json` and returns (the text, the last line's object).
fn plan(args: &[&str]) -> (String, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_moemesh"))
        .arg("plan")
        .args(args)
        .arg("--json")
        .output()
        .expect("run moemesh");
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("a last line");
    let v = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {last:?}"));
    (stdout, v)
}

#[test]
fn r1_fits_in_fp8_on_eight_141_gib_gpus_and_not_in_bf16() {
    let (text, fp8) = plan(&["--model", R1, "--gpus", "8", "--gpu-mem-gib", "141"]);
    assert_eq!(fp8["fits"], true, "{text}");
    // The checkpoint's own format is the default.
    assert_eq!(fp8["weights_dtype"], "fp8");
    assert_eq!(fp8["total_params"], 671_026_419_200u64);
    let gpus = fp8["per_gpu"].as_array().expect("per_gpu");
    assert_eq!(gpus.len(), 8);
    assert_eq!(gpus[0]["gate"], true);
    assert!(
        gpus[0]["experts"].is_null(),
        "the gate's GPU holds no experts"
    );
    // 58 layers × (gate_, up_proj [2048, 7168] + down_proj [7168, 2048]) in e4m3 with an f32
    // scale per 128 × 128 block, 37 experts, plus a 4 GiB workspace.
    let per_expert: u64 = 58 * (3 * 2048 * 7168 + 3 * 4 * 16 * 56);
    assert_eq!(gpus[1]["experts"], "0-36");
    assert_eq!(gpus[1]["total_bytes"], 37 * per_expert + (4 << 30));
    assert_eq!(gpus[7]["experts"], "220-255");
    let flags: Vec<&str> = fp8["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["experts"].as_str().expect("flag"))
        .collect();
    assert_eq!(flags.len(), 7);
    assert!(
        text.contains("moemesh expert --model") && text.contains("--experts 0-36"),
        "{text}"
    );

    let (text, bf16) = plan(&[
        "--model",
        &format!("{R1}/config.json"),
        "--gpus",
        "8",
        "--gpu-mem-gib",
        "141",
        "--weights-dtype",
        "bf16",
    ]);
    assert_eq!(bf16["fits"], false, "{text}");
    assert_eq!(bf16["weights_dtype"], "bf16");
    assert!(text.contains("fits: no"), "{text}");
}

#[test]
fn a_synthetic_model_plans_and_bad_flags_name_the_flag() {
    let (_, v) = plan(&[
        "--model",
        "synthetic:v2-lite",
        "--gpus",
        "1",
        "--gpu-mem-gib",
        "80",
    ]);
    assert_eq!(v["fits"], true);
    assert_eq!(v["weights_dtype"], "bf16");
    assert_eq!(v["workers"][0]["experts"], "0-63");

    let out = Command::new(env!("CARGO_BIN_EXE_moemesh"))
        .args(["plan", "--model", R1, "--gpus", "0", "--gpu-mem-gib", "80"])
        .output()
        .expect("run moemesh");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--gpus"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_moemesh"))
        .args(["plan", "--model", "/nonexistent/model", "--gpus", "8"])
        .args(["--gpu-mem-gib", "80"])
        .output()
        .expect("run moemesh");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model"), "{err}");
}
