//! The gate's measured expert load: tokens routed per (layer, expert), both since start (the
//! cumulative `Gate.Info.expert_load`) and over a sliding window of the last
//! `--load-window-secs` seconds (`Gate.Info.expert_load_window`, what `moemesh rebalance` plans
//! from), and its compact export as metrics.
//!
//! Written by the engine thread (the host path counts every dispatch, the device path flushes
//! its GPU counts every 64 steps), read by `Gate.Info`. The window is a ring of
//! [`BUCKETS`] buckets of a twelfth of the window each, keyed by their number since start: a
//! bucket is zeroed when a later period reuses its slot, so the window holds the last 11 to 12
//! twelfths of it, with no timer.
//!
//! Metrics are per layer, never per expert (DeepSeek-V3 has 58 × 256 (layer, expert) pairs):
//! `moemesh_gate_expert_tokens_total{layer}` (routed pairs), and over the window
//! `moemesh_gate_expert_load_imbalance{layer}` (the busiest expert's tokens over the mean: 1 is
//! even) and `moemesh_gate_expert_load_hottest{layer}` (the busiest expert's id), refreshed
//! after a step at most once per bucket (and when a layer first has load).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use moemesh_common::metrics::names;

/// Buckets in the window.
pub const BUCKETS: u64 = 12;

/// Per layer, tokens per expert.
pub type Counts = BTreeMap<u32, Vec<u64>>;

pub struct ExpertLoad {
    /// Routed experts per MoE layer (the length of every count vector).
    n_experts: usize,
    /// The window's length (`--load-window-secs`).
    window: Duration,
    /// Time 0 of the bucket numbers.
    start: Instant,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Since start.
    totals: Counts,
    /// Slot `n % BUCKETS` holds bucket `n`'s counts, or an older bucket's (then stale).
    ring: Vec<(u64, Counts)>,
    /// The bucket whose window the gauges show, and how many layers had counts then.
    published: Option<(u64, usize)>,
}

impl ExpertLoad {
    pub fn new(n_experts: usize, window: Duration) -> Self {
        ExpertLoad {
            n_experts,
            window: window.max(Duration::from_millis(BUCKETS)),
            start: Instant::now(),
            inner: Mutex::new(Inner {
                ring: (0..BUCKETS).map(|_| (u64::MAX, Counts::new())).collect(),
                ..Inner::default()
            }),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    fn bucket_at(&self, now: Instant) -> u64 {
        let bucket = self.window.as_nanos() / u128::from(BUCKETS);
        (now.saturating_duration_since(self.start).as_nanos() / bucket.max(1)) as u64
    }

    /// Adds one layer's routed tokens, `(expert, tokens)` pairs.
    pub fn add(&self, layer: u32, per_expert: impl IntoIterator<Item = (u32, u64)>) {
        self.add_at(Instant::now(), layer, per_expert);
    }

    fn add_at(&self, now: Instant, layer: u32, per_expert: impl IntoIterator<Item = (u32, u64)>) {
        let b = self.bucket_at(now);
        let n = self.n_experts;
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        let slot = &mut inner.ring[(b % BUCKETS) as usize];
        if slot.0 != b {
            slot.0 = b;
            slot.1.values_mut().for_each(|v| v.fill(0));
        }
        let total = inner.totals.entry(layer).or_insert_with(|| vec![0; n]);
        let windowed = slot.1.entry(layer).or_insert_with(|| vec![0; n]);
        let mut sum = 0;
        for (e, t) in per_expert {
            if let (Some(c), Some(w)) = (total.get_mut(e as usize), windowed.get_mut(e as usize)) {
                *c += t;
                *w += t;
                sum += t;
            }
        }
        metrics::counter!(names::EXPERT_TOKENS, "layer" => layer.to_string()).increment(sum);
    }

    /// Every layer's counts since start, in layer order.
    pub fn totals(&self) -> Counts {
        lock(&self.inner).totals.clone()
    }

    /// Every layer's counts over the window, in layer order (layers with none left out).
    pub fn windowed(&self) -> Counts {
        self.windowed_at(Instant::now())
    }

    fn windowed_at(&self, now: Instant) -> Counts {
        let b = self.bucket_at(now);
        sum_window(&lock(&self.inner).ring, b)
    }

    /// Refreshes the per-layer gauges from the window, at most once per bucket (and when a
    /// layer is counted for the first time, so that the gauges appear with the first load).
    pub fn publish(&self) {
        let b = self.bucket_at(Instant::now());
        let mut inner = lock(&self.inner);
        let now = Some((b, inner.totals.len()));
        if inner.published == now {
            return;
        }
        inner.published = now;
        let window = sum_window(&inner.ring, b);
        drop(inner);
        for (layer, counts) in window {
            let (imbalance, hottest) = imbalance(&counts);
            let label = layer.to_string();
            metrics::gauge!(names::EXPERT_LOAD_IMBALANCE, "layer" => label.clone()).set(imbalance);
            metrics::gauge!(names::EXPERT_LOAD_HOTTEST, "layer" => label).set(hottest as f64);
        }
    }
}

/// The buckets of the window that ends in bucket `b`, summed.
fn sum_window(ring: &[(u64, Counts)], b: u64) -> Counts {
    let mut out = Counts::new();
    for (n, layers) in ring {
        if *n > b || *n + BUCKETS <= b {
            continue;
        }
        for (&layer, counts) in layers {
            if counts.iter().all(|&c| c == 0) {
                continue;
            }
            let o = out.entry(layer).or_insert_with(|| vec![0; counts.len()]);
            o.iter_mut().zip(counts).for_each(|(o, c)| *o += c);
        }
    }
    out
}

/// The busiest expert's tokens over the mean (1: even; 0 with no tokens), and its id (the
/// lowest on a tie).
pub fn imbalance(counts: &[u64]) -> (f64, usize) {
    let total: u64 = counts.iter().sum();
    let (hottest, max) =
        counts.iter().enumerate().fold(
            (0, 0),
            |(i, m), (j, &c)| if c > m { (j, c) } else { (i, m) },
        );
    if total == 0 {
        return (0.0, 0);
    }
    (max as f64 * counts.len() as f64 / total as f64, hottest)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_keeps_the_last_buckets_and_the_totals_everything() {
        let load = ExpertLoad::new(4, Duration::from_secs(12));
        let t0 = load.start;
        let at = |s: u64| t0 + Duration::from_millis(s * 1000 + 500);
        load.add_at(at(0), 3, [(0, 5), (2, 1)]);
        load.add_at(at(5), 3, [(0, 1)]);
        load.add_at(at(5), 5, [(1, 7)]);
        // An expert id past the model's is ignored, not a panic.
        load.add_at(at(5), 5, [(9, 7)]);
        assert_eq!(
            load.windowed_at(at(11)),
            Counts::from([(3, vec![6, 0, 1, 0]), (5, vec![0, 7, 0, 0])])
        );
        // Bucket 0 leaves the window at 12 s, bucket 5 at 17 s.
        assert_eq!(
            load.windowed_at(at(12)),
            Counts::from([(3, vec![1, 0, 0, 0]), (5, vec![0, 7, 0, 0])])
        );
        assert!(load.windowed_at(at(17)).is_empty());
        // A slot reused by a later bucket starts from zero.
        load.add_at(at(12), 3, [(3, 2)]);
        assert_eq!(
            load.windowed_at(at(13)),
            Counts::from([(3, vec![1, 0, 0, 2]), (5, vec![0, 7, 0, 0])])
        );
        assert_eq!(
            load.totals(),
            Counts::from([(3, vec![6, 0, 1, 2]), (5, vec![0, 7, 0, 0])])
        );
    }

    #[test]
    fn imbalance_is_the_busiest_over_the_mean() {
        assert_eq!(imbalance(&[1, 1, 1, 1]), (1.0, 0));
        assert_eq!(imbalance(&[0, 6, 2, 0]), (3.0, 1));
        assert_eq!(imbalance(&[0, 0]), (0.0, 0));
    }
}
