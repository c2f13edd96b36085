//! A client and a server that disagree about TLS: the server's log names the likely cause, and
//! the client's error says to check TLS on both sides, instead of a bare FRAME_SIZE_ERROR or
//! CANCELLED. An expert worker stands in for any role (they share the listener code), and
//! `moemesh health` for the client subcommands (they share the connection code).

use moemesh_tests::mesh::start_role;
use moemesh_tests::moemesh;
use moemesh_tests::tls::TestCa;

/// Waits (bounded) until the process's log has `needle`; the log is written as it happens.
fn log_has(proc: &moemesh_tests::mesh::Proc, needle: &str) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if proc.log_text().contains(needle) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    false
}

#[test]
fn a_tls_mismatch_is_named_on_both_sides() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new(dir.path(), "mesh");
    let leaf = ca.leaf("worker", "worker", &["expert"]);
    let ca_path = ca.ca_path.display().to_string();

    // A plaintext client against a TLS port.
    let mut args = vec!["--experts".to_string(), "0-3".to_string()];
    args.extend(ca.flags(&leaf));
    let (tls_worker, addr) = start_role(dir.path(), "tls-worker", "expert", &args);
    let out = moemesh(&["health", "--addr", &addr]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    // Every call is answered UNAVAILABLE saying so, not FRAME_SIZE_ERROR.
    assert!(
        err.contains("requires TLS") && err.contains("--tls-ca"),
        "{err}"
    );
    assert!(!err.contains("FRAME_SIZE_ERROR"), "{err}");
    assert!(
        log_has(
            &tls_worker,
            "spoke plaintext (not a TLS handshake) to this TLS port"
        ),
        "{}",
        tls_worker.log_text()
    );

    // A TLS client against a plaintext port.
    let args = vec!["--experts".to_string(), "0-3".to_string()];
    let (plain_worker, addr) = start_role(dir.path(), "plain-worker", "expert", &args);
    let out = moemesh(&["health", "--addr", &addr, "--tls-ca", &ca_path]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("answered in plaintext") && err.contains("without --tls-ca"),
        "{err}"
    );
    assert!(
        log_has(
            &plain_worker,
            "started a TLS handshake on this plaintext port"
        ),
        "{}",
        plain_worker.log_text()
    );
}
