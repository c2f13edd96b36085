//! Files that may change under a running process (TLS certificates and keys, the API keys file)
//! are polled: a task reads them every [`RELOAD_INTERVAL`] and hands their contents to a callback
//! whenever the bytes differ from the last read. Comparing contents rather than mtimes also catches
//! Kubernetes' secret updates (an atomic symlink swap that keeps old mtimes) and two writes within
//! one mtime tick; the files are small, so reading them once a second costs nothing.

use std::path::PathBuf;
use std::sync::Weak;
use std::time::Duration;

/// How often watched files are read.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Reads every file of `paths`, in order.
pub fn read_all(paths: &[PathBuf]) -> std::io::Result<Vec<Vec<u8>>> {
    paths.iter().map(std::fs::read).collect()
}

/// Spawns the polling task for `target`, which ends when the target is dropped. `seen` is what the
/// caller loaded at start. `apply` gets each new set of contents (a half-written file included: it
/// should keep what it has when they do not parse; the write's end is another change).
pub fn spawn_watch<T, F>(target: Weak<T>, paths: Vec<PathBuf>, mut seen: Vec<Vec<u8>>, apply: F)
where
    T: Send + Sync + 'static,
    F: Fn(&T, &[Vec<u8>]) + Send + 'static,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RELOAD_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if target.strong_count() == 0 {
                return;
            }
            let read = {
                let paths = paths.clone();
                tokio::task::spawn_blocking(move || read_all(&paths)).await
            };
            let now = match read {
                Ok(Ok(now)) => now,
                // A file briefly missing while it is replaced; the next tick sees the new one.
                Ok(Err(_)) | Err(_) => continue,
            };
            if now != seen {
                let Some(target) = target.upgrade() else {
                    return;
                };
                apply(&target, &now);
                seen = now;
            }
        }
    });
}
