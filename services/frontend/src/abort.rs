//! The running requests by `request_id`, for `Generation.Abort`. The service registers each
//! Generate or Complete that carries a request_id when it starts ([`Running::register`]); the
//! returned [`Registered`] travels with the response stream and unregisters the request when the
//! stream ends or is dropped. `Abort` raises the request's flag, which every sequence of the
//! request (one per choice) carries to its gate's step loop; the loop retires a flagged
//! sequence before its next step, which frees its KV and ends its stream with CANCELLED.
//!
//! Requests are keyed by the caller's API key as well, so that with keys on one client cannot
//! end another's requests by guessing their ids.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Who may abort a request: its API key id (`None` with keys off) and its request_id.
type Owner = (Option<Arc<str>>, String);
/// Each owner's running requests: a registration number and the request's abort flag.
type ByOwner = HashMap<Owner, Vec<(u64, Arc<AtomicBool>)>>;

/// Every running request that has a request_id.
#[derive(Default)]
pub struct Running {
    /// Each owner's running requests.
    by_owner: Mutex<ByOwner>,
    /// The next registration number.
    next: AtomicU64,
}

/// A request's place in [`Running`]; dropping it unregisters the request.
pub struct Registered {
    running: Arc<Running>,
    owner: Owner,
    number: u64,
}

impl Running {
    /// Registers a request that starts now, and returns its abort flag (raised by [`Self::abort`])
    /// and its registration, to be dropped when the request ends. A request without a
    /// request_id cannot be aborted: it gets a flag that nothing raises, and no registration.
    pub fn register(
        self: &Arc<Self>,
        key: Option<Arc<str>>,
        request_id: &str,
    ) -> (Arc<AtomicBool>, Option<Registered>) {
        let flag = Arc::new(AtomicBool::new(false));
        if request_id.is_empty() {
            return (flag, None);
        }
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let owner = (key, request_id.to_string());
        self.lock()
            .entry(owner.clone())
            .or_default()
            .push((number, flag.clone()));
        let registered = Registered {
            running: self.clone(),
            owner,
            number,
        };
        (flag, Some(registered))
    }

    /// Raises the flag of every running request of `key` with `request_id`; how many there were.
    pub fn abort(&self, key: Option<Arc<str>>, request_id: &str) -> usize {
        let owner = (key, request_id.to_string());
        let map = self.lock();
        let Some(requests) = map.get(&owner) else {
            return 0;
        };
        for (_, flag) in requests {
            flag.store(true, Ordering::Relaxed);
        }
        requests.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ByOwner> {
        // The map stays consistent under a panic elsewhere: every change is one call.
        self.by_owner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut map = self.running.lock();
        if let Some(requests) = map.get_mut(&self.owner) {
            requests.retain(|(n, _)| *n != self.number);
            if requests.is_empty() {
                map.remove(&self.owner);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abort_raises_the_flags_of_the_owners_requests_until_they_end() {
        let running = Arc::new(Running::default());
        let key: Option<Arc<str>> = Some("team-a".into());
        let (a, reg_a) = running.register(key.clone(), "r1");
        let (b, reg_b) = running.register(key.clone(), "r1");
        let (other, _reg) = running.register(Some("team-b".into()), "r1");
        let (unnamed, none) = running.register(key.clone(), "");
        assert!(none.is_none(), "a request without an id is not registered");
        assert_eq!(running.abort(None, "r1"), 0, "another owner's id");
        assert_eq!(running.abort(key.clone(), "r2"), 0, "an unknown id");
        assert_eq!(running.abort(key.clone(), "r1"), 2);
        let raised = |f: &AtomicBool| f.load(Ordering::Relaxed);
        assert!(raised(&a) && raised(&b));
        assert!(!raised(&other) && !raised(&unnamed));
        drop((reg_a, reg_b));
        assert_eq!(running.abort(key, "r1"), 0, "ended requests are gone");
    }
}
