//! Expert placement from measured load (issue 22's planner): which routed experts each expert
//! worker holds, with redundant replicas of the hottest, so that the busiest worker's share of
//! the routed tokens is as small as the workers' room allows — the objective of DeepSeek's EPLB.
//!
//! Pure logic over numbers, no engine and no I/O: the load (tokens routed to each expert, summed
//! over the MoE layers, since a worker holds the same experts in every layer it serves) and each
//! worker's room (how many experts it can hold) in, a [`Plan`] out. The gate splits a replicated
//! expert's tokens evenly over its replicas, which is what the planner assumes.
//!
//! The method (greedy, as EPLB's): every expert gets one copy; each spare slot goes, one at a
//! time, to the expert with the most load per copy; then the copies, heaviest first, go to the
//! worker with the least load so far that has room and does not hold that expert yet.

use std::collections::BTreeSet;

/// What the planner chose.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Per worker (in the order given), the experts it holds, ascending.
    pub holds: Vec<Vec<u32>>,
    /// Per expert, its number of copies.
    pub copies: Vec<u32>,
    /// Per worker, the tokens it would compute under this plan (its experts' load divided by
    /// their copies).
    pub worker_load: Vec<f64>,
}

impl Plan {
    /// The busiest worker's tokens.
    pub fn max_load(&self) -> f64 {
        self.worker_load.iter().copied().fold(0.0, f64::max)
    }
}

/// Why a plan cannot be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    NoWorkers,
    /// The workers hold fewer experts together than the model has.
    TooLittleRoom {
        experts: usize,
        room: usize,
    },
}

impl std::fmt::Display for PlanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PlanError::NoWorkers => write!(f, "no expert workers to place experts on"),
            PlanError::TooLittleRoom { experts, room } => write!(
                f,
                "the workers have room for {room} experts together, fewer than the model's {experts}"
            ),
        }
    }
}

/// Places `load.len()` experts (tokens routed to each) on workers with room for `room[w]`
/// experts each, using at most `max_copies` copies of any one expert (at most one per worker).
pub fn plan(load: &[u64], room: &[usize], max_copies: usize) -> Result<Plan, PlanError> {
    let (n, w) = (load.len(), room.len());
    if w == 0 {
        return Err(PlanError::NoWorkers);
    }
    let total_room: usize = room.iter().sum();
    if total_room < n {
        return Err(PlanError::TooLittleRoom {
            experts: n,
            room: total_room,
        });
    }
    let max_copies = max_copies.clamp(1, w);
    // Spare slots to the expert with the most load per copy (ties: the lower id).
    let mut copies = vec![1u32; n];
    let per_copy = |e: usize, c: &[u32]| load[e] as f64 / f64::from(c[e]);
    for _ in 0..total_room - n {
        let best = (0..n)
            .filter(|&e| (copies[e] as usize) < max_copies)
            .max_by(|&a, &b| {
                per_copy(a, &copies)
                    .total_cmp(&per_copy(b, &copies))
                    .then(b.cmp(&a))
            });
        match best {
            Some(e) if load[e] > 0 => copies[e] += 1,
            _ => break,
        }
    }
    // Heaviest copy first, each to the least-loaded worker with room that lacks the expert.
    let mut items: Vec<(f64, usize)> = (0..n)
        .flat_map(|e| (0..copies[e]).map(move |_| e))
        .map(|e| (per_copy(e, &copies), e))
        .collect();
    items.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut holds: Vec<BTreeSet<u32>> = vec![BTreeSet::new(); w];
    let mut worker_load = vec![0.0f64; w];
    for (l, e) in items {
        let target = (0..w)
            .filter(|&i| holds[i].len() < room[i] && !holds[i].contains(&(e as u32)))
            .min_by(|&a, &b| worker_load[a].total_cmp(&worker_load[b]).then(a.cmp(&b)));
        match target {
            Some(i) => {
                holds[i].insert(e as u32);
                worker_load[i] += l;
            }
            // Every worker with room already holds this expert: the copy is dropped.
            None => copies[e] -= 1,
        }
    }
    // Copies dropped above change the per-copy loads: recount.
    let mut worker_load = vec![0.0f64; w];
    for (i, h) in holds.iter().enumerate() {
        for &e in h {
            worker_load[i] += per_copy(e as usize, &copies);
        }
    }
    Ok(Plan {
        holds: holds.into_iter().map(|h| h.into_iter().collect()).collect(),
        copies,
        worker_load,
    })
}

/// The busiest worker's tokens under a placement `holds` (per worker, its experts), the load of an
/// expert held by several split evenly: for comparing today's placement with a plan.
pub fn max_load_of(load: &[u64], holds: &[Vec<u32>]) -> f64 {
    let mut copies = vec![0u32; load.len()];
    for h in holds {
        for &e in h {
            if let Some(c) = copies.get_mut(e as usize) {
                *c += 1;
            }
        }
    }
    holds
        .iter()
        .map(|h| {
            h.iter()
                .filter_map(|&e| {
                    let e = e as usize;
                    Some(load.get(e).copied()? as f64 / f64::from(copies[e].max(1)))
                })
                .sum::<f64>()
        })
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Zipf-like load: expert e gets about 1000 / (e + 1) tokens.
    fn zipf(n: usize) -> Vec<u64> {
        (0..n).map(|e| (1000.0 / (e as f64 + 1.0)) as u64).collect()
    }

    fn check_valid(p: &Plan, n: usize, room: &[usize]) {
        // Every expert held at least once; no worker over its room.
        let mut held = vec![0u32; n];
        for (h, &r) in p.holds.iter().zip(room) {
            assert!(h.len() <= r, "{h:?} over room {r}");
            for &e in h {
                held[e as usize] += 1;
            }
        }
        assert!(
            held.iter().all(|&c| c >= 1),
            "an expert is not held: {held:?}"
        );
        assert_eq!(held, p.copies, "copies match the holds");
    }

    #[test]
    fn uniform_load_without_spare_room_is_an_even_split() {
        let p = plan(&[10; 8], &[4, 4], 2).expect("plan");
        check_valid(&p, 8, &[4, 4]);
        assert_eq!(p.worker_load, vec![40.0, 40.0]);
        assert!(p.copies.iter().all(|&c| c == 1));
    }

    #[test]
    fn skewed_load_replicates_the_hottest_and_beats_contiguous_shards() {
        let load = zipf(16);
        let room = [10, 10];
        let p = plan(&load, &room, 2).expect("plan");
        check_valid(&p, 16, &room);
        // The 4 spare slots went to the 4 hottest experts.
        assert_eq!(&p.copies[..4], &[2, 2, 2, 2]);
        assert!(p.copies[4..].iter().all(|&c| c == 1));
        // Today's placement: experts 0-7 on one worker, 8-15 on the other.
        let today = vec![(0..8).collect::<Vec<u32>>(), (8..16).collect()];
        let before = max_load_of(&load, &today);
        let total: u64 = load.iter().sum();
        assert!(p.max_load() < before, "{} !< {before}", p.max_load());
        // Within 10% of a perfect split.
        assert!(p.max_load() <= total as f64 / 2.0 * 1.1, "{}", p.max_load());
        assert!((max_load_of(&load, &p.holds) - p.max_load()).abs() < 1e-9);
    }

    #[test]
    fn copies_are_bounded_and_never_twice_on_one_worker() {
        let mut load = vec![1u64; 6];
        load[0] = 1_000_000;
        let room = [3, 3, 3];
        let p = plan(&load, &room, 8).expect("plan");
        check_valid(&p, 6, &room);
        // At most one copy per worker: three workers, three copies.
        assert_eq!(p.copies[0], 3);
        for h in &p.holds {
            assert!(h.contains(&0));
        }
        let capped = plan(&load, &room, 2).expect("plan");
        assert_eq!(capped.copies[0], 2);
    }

    #[test]
    fn too_little_room_or_no_workers_is_an_error() {
        assert_eq!(
            plan(&[1; 10], &[4, 4], 2),
            Err(PlanError::TooLittleRoom {
                experts: 10,
                room: 8
            })
        );
        assert_eq!(plan(&[1; 2], &[], 1), Err(PlanError::NoWorkers));
        // Unused experts get no copies beyond their one.
        let p = plan(&[0, 0, 5], &[3, 3], 2).expect("plan");
        assert_eq!(p.copies, vec![1, 1, 2]);
    }
}
