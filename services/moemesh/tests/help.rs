//! The binary's self-description: every subcommand and flag a user reads about in the README is
//! in `--help`. (Also makes `cargo test --workspace` build the binary that `tests/` runs.)

use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_moemesh"))
        .args(args)
        .output()
        .expect("run moemesh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 help")
}

#[test]
fn generate_help_documents_every_flag_and_its_env_var() {
    let h = help(&["generate", "--help"]);
    for flag in [
        "--model",
        "--prompt",
        "--chat",
        "--system",
        "--prompt-ids",
        "--max-new-tokens",
        "--temperature",
        "--top-p",
        "--top-k",
        "--seed",
        "--stop",
        "--ignore-eos",
        "--dtype",
        "--json",
    ] {
        assert!(h.contains(flag), "generate --help lacks {flag}:\n{h}");
    }
    assert!(h.contains("MOEMESH_MODEL"), "env var documented:\n{h}");
}

#[test]
fn top_level_help_lists_generate() {
    assert!(help(&["--help"]).contains("generate"));
}

#[test]
fn role_help_documents_the_security_flags_and_their_env_vars() {
    for role in ["frontend", "gate", "expert"] {
        let h = help(&[role, "--help"]);
        for flag in [
            "--tls-cert",
            "--tls-key",
            "--tls-ca",
            "--tls-server-name",
            "--plaintext",
            "MOEMESH_TLS_CERT",
            "MOEMESH_PLAINTEXT",
        ] {
            assert!(h.contains(flag), "{role} --help lacks {flag}:\n{h}");
        }
    }
    let h = help(&["frontend", "--help"]);
    for flag in [
        "--api-keys-file",
        "MOEMESH_API_KEYS_FILE",
        "--audit-log",
        "MOEMESH_AUDIT_LOG",
        "--audit-log-text",
        "--public-plaintext",
    ] {
        assert!(h.contains(flag), "frontend --help lacks {flag}:\n{h}");
    }
    for cmd in ["generate", "bench"] {
        let h = help(&[cmd, "--help"]);
        for flag in ["--tls-ca", "--api-key", "MOEMESH_API_KEY"] {
            assert!(h.contains(flag), "{cmd} --help lacks {flag}:\n{h}");
        }
    }
    let h = help(&["up", "--help"]);
    for flag in ["--plaintext", "--public-plaintext", "--frontend-args"] {
        assert!(h.contains(flag), "up --help lacks {flag}:\n{h}");
    }
}

#[test]
fn role_help_documents_the_limits_and_tracing() {
    for role in ["frontend", "gate", "expert"] {
        let h = help(&[role, "--help"]);
        for flag in [
            "--max-message-mb",
            "--max-concurrent-streams",
            "--max-header-bytes",
            "--handshake-timeout",
            "--keepalive-interval",
            "--keepalive-timeout",
            "--request-timeout",
            "MOEMESH_MAX_MESSAGE_MB",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ] {
            assert!(h.contains(flag), "{role} --help lacks {flag}:\n{h}");
        }
    }
    let h = help(&["frontend", "--help"]);
    assert!(
        h.contains("--max-stop-bytes") && h.contains("--max-prompt-bytes"),
        "{h}"
    );
}

#[test]
fn plan_help_documents_its_flags() {
    let h = help(&["plan", "--help"]);
    for flag in [
        "--model",
        "--gpus",
        "--gpu-mem-gib",
        "--weights-dtype",
        "--kv-cache-gib",
        "--workspace-gib",
        "--gate-gpu-experts",
        "--json",
    ] {
        assert!(h.contains(flag), "plan --help lacks {flag}:\n{h}");
    }
    assert!(help(&["--help"]).contains("plan"));
}
