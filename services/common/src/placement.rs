//! Expert placement from measured load (issue 22's planner): which routed experts each expert
//! worker holds in each MoE layer, with redundant replicas of the hottest, so that a step waits
//! as little as the workers' room allows. Called by `moemesh rebalance` (and `moemesh up
//! --rebalance-every`); the gates' `Gate.Info` gives the load, the plan goes to the workers as
//! `Expert.SetExperts`.
//!
//! Pure logic over numbers, no engine and no I/O: the load (tokens routed to each expert of each
//! MoE layer) and each worker's room in each layer (how many of that layer's experts it can
//! hold; none in a layer it does not serve) in, a [`Plan`] out. The gate splits a replicated
//! (layer, expert)'s tokens evenly over its replicas, which is what the planner assumes.
//!
//! **The objective.** Every MoE layer of a step waits for its slowest worker before the next
//! layer can start, so a step's expert time is the sum, over the layers, of each layer's busiest
//! worker's tokens: `Σ_l max_w tokens(w, l)`. Placing per layer (as DeepSeek's EPLB does) is what
//! lets that sum fall: the same expert id is hot in one layer and cold in the next, so the load
//! summed over the layers per expert id can be even while every layer's own hot experts sit on
//! one worker. A worker's room in one layer does not limit it in another, so the layers are
//! independent and the sum is minimised by minimising each layer's busiest worker on its own.
//!
//! The method for one layer (greedy, as EPLB's): every expert gets one copy; each spare slot
//! goes, one at a time, to the expert with the most load per copy; then the copies, heaviest
//! first, go to the worker with the least load so far that has room and does not hold that
//! expert yet.

use std::collections::{BTreeMap, BTreeSet};

/// What one expert worker holds: per MoE layer it serves, its routed experts (ascending).
pub type Holdings = BTreeMap<u32, Vec<u32>>;

/// The holdings of a worker that holds `experts` in every one of `layers` (a worker started with
/// `--experts`).
pub fn uniform(layers: &[u32], experts: &[u32]) -> Holdings {
    layers.iter().map(|&l| (l, experts.to_vec())).collect()
}

/// The experts held in every layer of `h` (ascending; empty when `h` is).
pub fn common_experts(h: &Holdings) -> Vec<u32> {
    let mut lists = h.values();
    let Some(first) = lists.next() else {
        return Vec::new();
    };
    let mut common: BTreeSet<u32> = first.iter().copied().collect();
    for l in lists {
        let here: BTreeSet<u32> = l.iter().copied().collect();
        common.retain(|e| here.contains(e));
    }
    common.into_iter().collect()
}

/// Holdings from their compact form (a registry value, an `ExpertInfoResponse`): per layer of
/// `layers`, its own list where `own` has one, else `every` (the experts held in every layer; an
/// older peer lists only those).
pub fn holdings_from_compact<'a>(
    layers: &[u32],
    own: impl Fn(u32) -> Option<&'a Vec<u32>>,
    every: &'a Vec<u32>,
) -> Holdings {
    layers
        .iter()
        .map(|&l| (l, own(l).unwrap_or(every).clone()))
        .collect()
}

/// Whether every layer of `h` holds the same experts.
pub fn is_uniform(h: &Holdings) -> bool {
    let mut lists = h.values();
    lists.next().is_none_or(|first| lists.all(|l| l == first))
}

/// What the planner chose for one MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPlan {
    /// Per worker (in the order given), the layer's experts it holds, ascending; empty for a
    /// worker with no room in the layer.
    pub holds: Vec<Vec<u32>>,
    /// Per expert, its number of copies.
    pub copies: Vec<u32>,
    /// Per worker, the layer's tokens it would compute under this plan (its experts' load
    /// divided by their copies).
    pub worker_load: Vec<f64>,
}

impl LayerPlan {
    /// The layer's busiest worker's tokens.
    pub fn max_load(&self) -> f64 {
        self.worker_load.iter().copied().fold(0.0, f64::max)
    }
}

/// What the planner chose, layer by layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// By MoE layer.
    pub layers: BTreeMap<u32, LayerPlan>,
    /// Workers planned for.
    pub workers: usize,
}

impl Plan {
    /// Per worker, what it holds under the plan (layers where it holds nothing left out).
    pub fn holdings(&self) -> Vec<Holdings> {
        let mut out = vec![Holdings::new(); self.workers];
        for (&l, p) in &self.layers {
            for (w, h) in p.holds.iter().enumerate() {
                if !h.is_empty() {
                    out[w].insert(l, h.clone());
                }
            }
        }
        out
    }

    /// The step's expert time in tokens: the sum over the layers of each layer's busiest
    /// worker's tokens (the objective, see the module doc).
    pub fn step_load(&self) -> f64 {
        self.layers.values().map(LayerPlan::max_load).sum()
    }
}

/// Why a plan cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("no expert workers to place experts on")]
    NoWorkers,
    #[error("no MoE layer to place experts in")]
    NoLayers,
    /// The workers hold fewer of a layer's experts together than the model has.
    #[error(
        "layer {layer}: the workers have room for {room} of its experts together, fewer than the model's {experts}"
    )]
    TooLittleRoom {
        layer: u32,
        experts: usize,
        room: usize,
    },
}

/// Places the experts of every MoE layer of `load` (layer → tokens routed to each of its
/// experts, indexed by expert id) on the workers of `room` (per worker, layer → how many of
/// that layer's experts it can hold; a layer missing is no room there), using at most
/// `max_copies` copies of any one (layer, expert), at most one per worker. Minimises the sum over
/// the layers of each layer's busiest worker's tokens (see the module doc).
///
/// `today` (per worker, what it holds now, numbered as `load`; empty for no preference) only
/// decides which worker gets which of a layer's planned lists: among workers with the same room
/// there, each list goes where it overlaps most with what is held now ([`keep_in_place`]). The
/// lists, and so the cost, are the same; fewer experts are loaded and dropped.
pub fn plan(
    load: &BTreeMap<u32, Vec<u64>>,
    room: &[BTreeMap<u32, usize>],
    max_copies: usize,
    today: &[Holdings],
) -> Result<Plan, PlanError> {
    if room.is_empty() {
        return Err(PlanError::NoWorkers);
    }
    if load.is_empty() {
        return Err(PlanError::NoLayers);
    }
    let mut layers = BTreeMap::new();
    for (&l, tokens) in load {
        let layer_room: Vec<usize> = room
            .iter()
            .map(|r| r.get(&l).copied().unwrap_or(0))
            .collect();
        let mut p = plan_layer(tokens, &layer_room, max_copies).map_err(|(experts, room)| {
            PlanError::TooLittleRoom {
                layer: l,
                experts,
                room,
            }
        })?;
        if today.len() == room.len() {
            let now: Vec<&[u32]> = today
                .iter()
                .map(|h| h.get(&l).map(Vec::as_slice).unwrap_or(&[]))
                .collect();
            keep_in_place(&mut p, &layer_room, &now);
        }
        layers.insert(l, p);
    }
    Ok(Plan {
        layers,
        workers: room.len(),
    })
}

/// Hands a layer's planned lists to the workers so that each keeps as many of the experts it
/// holds now (`now`, per worker) as it can: lists move only between workers of equal room (so
/// every worker stays within its room), greedily by overlap, largest first, unless that keeps
/// fewer in place than the lists as planned. The plan's lists, copies and loads per list are
/// unchanged; only which worker takes which list.
fn keep_in_place(p: &mut LayerPlan, room: &[usize], now: &[&[u32]]) {
    let w = room.len();
    // (experts kept, worker, planned list), for workers and lists of equal room.
    let mut pairs: Vec<(usize, usize, usize)> = Vec::new();
    for (worker, held) in now.iter().enumerate() {
        for (list, planned) in p.holds.iter().enumerate() {
            if room[worker] == room[list] {
                let kept = planned.iter().filter(|e| held.contains(e)).count();
                pairs.push((kept, worker, list));
            }
        }
    }
    pairs.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut given: Vec<Option<usize>> = vec![None; w];
    let mut taken = vec![false; w];
    for (_, worker, list) in pairs {
        if given[worker].is_none() && !taken[list] {
            given[worker] = Some(list);
            taken[list] = true;
        }
    }
    // Each room value has as many workers as lists, so every worker got one; its own list
    // otherwise. The greedy matching is not always the best: where it keeps fewer experts in
    // place than the lists as planned, those stay.
    let mut order: Vec<usize> = (0..w).map(|i| given[i].unwrap_or(i)).collect();
    let kept = |order: &[usize]| -> usize {
        order
            .iter()
            .enumerate()
            .map(|(worker, &list)| {
                p.holds[list]
                    .iter()
                    .filter(|e| now[worker].contains(e))
                    .count()
            })
            .sum()
    };
    let as_planned: Vec<usize> = (0..w).collect();
    if kept(&order) < kept(&as_planned) {
        order = as_planned;
    }
    p.holds = order.iter().map(|&i| p.holds[i].clone()).collect();
    p.worker_load = order.iter().map(|&i| p.worker_load[i]).collect();
}

/// One layer's plan: `load.len()` experts on workers with room for `room[w]` of them each. An
/// error is (experts, room) when the room is too little.
fn plan_layer(
    load: &[u64],
    room: &[usize],
    max_copies: usize,
) -> Result<LayerPlan, (usize, usize)> {
    let n = load.len();
    let w = room.len();
    let total_room: usize = room.iter().sum();
    if total_room < n {
        return Err((n, total_room));
    }
    let with_room = room.iter().filter(|&&r| r > 0).count();
    let max_copies = max_copies.clamp(1, with_room.max(1));
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
    let holds: Vec<Vec<u32>> = holds.into_iter().map(|h| h.into_iter().collect()).collect();
    // Copies dropped above change the per-copy loads: recount.
    let worker_load = layer_loads(load, holds.iter().map(Vec::as_slice));
    Ok(LayerPlan {
        holds,
        copies,
        worker_load,
    })
}

/// Per worker, the tokens it computes of one layer whose load is `load` when the workers hold
/// `holds` of its experts, a replicated expert's load split evenly over its holders.
fn layer_loads<'a>(load: &[u64], holds: impl Iterator<Item = &'a [u32]> + Clone) -> Vec<f64> {
    let mut copies = vec![0u32; load.len()];
    for h in holds.clone() {
        for &e in h {
            if let Some(c) = copies.get_mut(e as usize) {
                *c += 1;
            }
        }
    }
    holds
        .map(|h| {
            h.iter()
                .filter_map(|&e| {
                    let e = e as usize;
                    Some(load.get(e).copied()? as f64 / f64::from(copies[e].max(1)))
                })
                .sum::<f64>()
        })
        .collect()
}

/// How a placement spreads a load: for comparing today's placement with a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Balance {
    /// Per layer, per worker: the layer's tokens the worker computes.
    pub per_layer: BTreeMap<u32, Vec<f64>>,
    /// Per worker: its tokens summed over the layers.
    pub per_worker: Vec<f64>,
    /// Tokens routed, all layers.
    pub routed: u64,
}

impl Balance {
    /// The step's expert time in tokens: the sum over the layers of each layer's busiest
    /// worker's tokens (the planner's objective).
    pub fn step_load(&self) -> f64 {
        self.per_layer
            .values()
            .map(|v| v.iter().copied().fold(0.0, f64::max))
            .sum()
    }

    /// [`step_load`](Self::step_load) as a share of the routed tokens, in percent: the busiest
    /// worker's share summed over the layers (`100 / workers` when every layer is even).
    pub fn step_share(&self) -> f64 {
        pct(self.step_load(), self.routed as f64)
    }

    /// The layer whose busiest worker takes the largest share of that layer's tokens, and that
    /// share in percent.
    pub fn worst_layer(&self) -> Option<(u32, f64)> {
        self.per_layer
            .iter()
            .map(|(&l, v)| {
                let total: f64 = v.iter().sum();
                (l, pct(v.iter().copied().fold(0.0, f64::max), total))
            })
            .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
    }

    /// The busiest worker's share of the routed tokens summed over the layers, in percent (what
    /// a per-id placement evens out; blind to how each layer is split).
    pub fn busiest_overall(&self) -> f64 {
        pct(
            self.per_worker.iter().copied().fold(0.0, f64::max),
            self.routed as f64,
        )
    }
}

fn pct(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        part / whole * 100.0
    } else {
        0.0
    }
}

/// How the placement `holds` (per worker, its holdings) spreads `load` (layer → tokens per
/// expert). A layer's tokens routed to experts nobody holds count in `routed` but on no worker.
pub fn balance(load: &BTreeMap<u32, Vec<u64>>, holds: &[Holdings]) -> Balance {
    let mut per_layer = BTreeMap::new();
    let mut per_worker = vec![0.0; holds.len()];
    let mut routed = 0u64;
    for (&l, tokens) in load {
        routed += tokens.iter().sum::<u64>();
        let lists = holds
            .iter()
            .map(|h| h.get(&l).map(Vec::as_slice).unwrap_or(&[]));
        let v = layer_loads(tokens, lists);
        for (w, t) in v.iter().enumerate() {
            per_worker[w] += t;
        }
        per_layer.insert(l, v);
    }
    Balance {
        per_layer,
        per_worker,
        routed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Zipf-like load: expert e gets about 1000 / (e + 1) tokens.
    fn zipf(n: usize) -> Vec<u64> {
        (0..n).map(|e| (1000.0 / (e as f64 + 1.0)) as u64).collect()
    }

    /// Every worker has room `r` in each of `layers`.
    fn rooms(workers: usize, layers: &[u32], r: usize) -> Vec<BTreeMap<u32, usize>> {
        vec![layers.iter().map(|&l| (l, r)).collect(); workers]
    }

    fn check_valid(p: &Plan, n: usize, room: &[BTreeMap<u32, usize>]) {
        for (&l, lp) in &p.layers {
            // Every expert held at least once; no worker over its room; copies match.
            let mut held = vec![0u32; n];
            for (h, r) in lp.holds.iter().zip(room) {
                let r = r.get(&l).copied().unwrap_or(0);
                assert!(h.len() <= r, "layer {l}: {h:?} over room {r}");
                for &e in h {
                    held[e as usize] += 1;
                }
            }
            assert!(
                held.iter().all(|&c| c >= 1),
                "layer {l}: an expert is not held: {held:?}"
            );
            assert_eq!(held, lp.copies, "layer {l}: copies match the holds");
        }
    }

    #[test]
    fn uniform_load_without_spare_room_is_an_even_split() {
        let load = BTreeMap::from([(1, vec![10; 8]), (2, vec![10; 8])]);
        let room = rooms(2, &[1, 2], 4);
        let p = plan(&load, &room, 2, &[]).expect("plan");
        check_valid(&p, 8, &room);
        for lp in p.layers.values() {
            assert_eq!(lp.worker_load, vec![40.0, 40.0]);
            assert!(lp.copies.iter().all(|&c| c == 1));
        }
        assert_eq!(p.step_load(), 80.0);
    }

    /// The case issue 22's GPU run met: each layer's hot experts differ, so the load summed per
    /// expert id is even and a placement by id (the same experts in every layer) cannot help,
    /// while a plan per layer evens every layer.
    #[test]
    fn per_layer_skew_that_sums_to_even_is_evened_layer_by_layer() {
        let n = 16;
        // Layer 1 is hot on experts 0-7, layer 2 on 8-15 (each a Zipf curve over its half).
        let z = zipf(8);
        let mut l1 = vec![1u64; n];
        let mut l2 = vec![1u64; n];
        l1[..8].copy_from_slice(&z);
        l2[8..].copy_from_slice(&z);
        let load = BTreeMap::from([(1, l1.clone()), (2, l2.clone())]);
        let summed: Vec<u64> = l1.iter().zip(&l2).map(|(a, b)| a + b).collect();
        // Today: experts 0-7 on one worker, 8-15 on the other, in both layers. Summed over the
        // layers that is an even split...
        let today = vec![
            uniform(&[1, 2], &(0..8).collect::<Vec<_>>()),
            uniform(&[1, 2], &(8..16).collect::<Vec<_>>()),
        ];
        let now = balance(&load, &today);
        assert!((now.busiest_overall() - 50.0).abs() < 1e-9, "{now:?}");
        // ... but each layer waits for one worker computing nearly all of its tokens.
        assert!(now.step_share() > 95.0, "{}", now.step_share());
        assert_eq!(now.worst_layer().map(|(l, _)| l), Some(1));
        // A plan by expert id (the same experts in every layer) sees only the summed load,
        // which is symmetric: it splits the ids evenly by that sum, and here that keeps every
        // layer's hot half on one worker.
        let by_id =
            plan(&BTreeMap::from([(0, summed)]), &rooms(2, &[0], 8), 1, &[]).expect("by id");
        let by_id_holds: Vec<Holdings> = by_id
            .holdings()
            .into_iter()
            .map(|h| uniform(&[1, 2], &h[&0]))
            .collect();
        let by_id = balance(&load, &by_id_holds);
        assert!((by_id.busiest_overall() - 50.0).abs() < 1.0, "{by_id:?}");
        assert!(by_id.step_share() > 90.0, "by id: {}", by_id.step_share());
        // The plan per layer, same room (no replicas): every layer within 10% of even.
        for (r, copies) in [(8, 1), (10, 2)] {
            let room = rooms(2, &[1, 2], r);
            let p = plan(&load, &room, copies, &[]).expect("plan");
            check_valid(&p, n, &room);
            for (l, lp) in &p.layers {
                let total: f64 = lp.worker_load.iter().sum();
                assert!(
                    lp.max_load() <= total / 2.0 * 1.1,
                    "room {r}, layer {l}: {lp:?}"
                );
            }
            let planned = balance(&load, &p.holdings());
            assert!((planned.step_load() - p.step_load()).abs() < 1e-9);
            assert!(
                planned.step_share() < 55.0,
                "room {r}: {}",
                planned.step_share()
            );
            if copies == 2 {
                // The hot experts of each layer are replicated in that layer only.
                assert_eq!(p.layers[&1].copies[0], 2);
                assert_eq!(p.layers[&1].copies[8], 1);
                assert_eq!(p.layers[&2].copies[8], 2);
                assert_eq!(p.layers[&2].copies[0], 1);
            }
        }
    }

    #[test]
    fn skewed_load_replicates_the_hottest_and_beats_contiguous_shards() {
        let load = BTreeMap::from([(3, zipf(16))]);
        let room = rooms(2, &[3], 10);
        let p = plan(&load, &room, 2, &[]).expect("plan");
        check_valid(&p, 16, &room);
        let lp = &p.layers[&3];
        // The 4 spare slots went to the 4 hottest experts.
        assert_eq!(&lp.copies[..4], &[2, 2, 2, 2]);
        assert!(lp.copies[4..].iter().all(|&c| c == 1));
        let today = vec![
            uniform(&[3], &(0..8).collect::<Vec<_>>()),
            uniform(&[3], &(8..16).collect::<Vec<_>>()),
        ];
        let before = balance(&load, &today).step_load();
        let total: u64 = load[&3].iter().sum();
        assert!(p.step_load() < before, "{} !< {before}", p.step_load());
        // Within 10% of a perfect split.
        assert!(
            p.step_load() <= total as f64 / 2.0 * 1.1,
            "{}",
            p.step_load()
        );
    }

    #[test]
    fn room_is_per_worker_and_layer_and_a_layer_not_served_gets_nothing() {
        // Worker 0 serves layers 1 and 2, worker 1 only layer 2, worker 2 only layer 1.
        let room = vec![
            BTreeMap::from([(1, 4), (2, 4)]),
            BTreeMap::from([(2, 4)]),
            BTreeMap::from([(1, 2)]),
        ];
        let load = BTreeMap::from([(1, vec![5; 6]), (2, vec![5; 6])]);
        let p = plan(&load, &room, 3, &[]).expect("plan");
        check_valid(&p, 6, &room);
        let h = p.holdings();
        assert!(!h[1].contains_key(&1) && !h[2].contains_key(&2), "{h:?}");
        assert_eq!(h[2][&1].len(), 2);
        assert_eq!(h[0][&1].len(), 4);
    }

    #[test]
    fn copies_are_bounded_and_never_twice_on_one_worker() {
        let mut hot = vec![1u64; 6];
        hot[0] = 1_000_000;
        let load = BTreeMap::from([(1, hot)]);
        let room = rooms(3, &[1], 3);
        let p = plan(&load, &room, 8, &[]).expect("plan");
        check_valid(&p, 6, &room);
        // At most one copy per worker: three workers, three copies.
        assert_eq!(p.layers[&1].copies[0], 3);
        for h in &p.layers[&1].holds {
            assert!(h.contains(&0));
        }
        let capped = plan(&load, &room, 2, &[]).expect("plan");
        assert_eq!(capped.layers[&1].copies[0], 2);
    }

    #[test]
    fn too_little_room_no_workers_or_no_layers_is_an_error() {
        let load = BTreeMap::from([(1, vec![1; 4]), (2, vec![1; 10])]);
        let err = plan(&load, &rooms(2, &[1, 2], 4), 2, &[]).expect_err("too little room");
        assert_eq!(
            err,
            PlanError::TooLittleRoom {
                layer: 2,
                experts: 10,
                room: 8
            }
        );
        assert!(err.to_string().contains("layer 2"), "{err}");
        // A layer no worker serves has no room at all.
        assert_eq!(
            plan(&load, &rooms(2, &[1], 8), 2, &[]),
            Err(PlanError::TooLittleRoom {
                layer: 2,
                experts: 10,
                room: 0
            })
        );
        assert_eq!(plan(&load, &[], 1, &[]), Err(PlanError::NoWorkers));
        assert_eq!(
            plan(&BTreeMap::new(), &rooms(2, &[1], 8), 1, &[]),
            Err(PlanError::NoLayers)
        );
        // Unused experts get no copies beyond their one.
        let p = plan(
            &BTreeMap::from([(1, vec![0, 0, 5])]),
            &rooms(2, &[1], 3),
            2,
            &[],
        )
        .expect("plan");
        assert_eq!(p.layers[&1].copies, vec![1, 1, 2]);
    }

    /// With today's holdings given, the same lists go to the workers that hold most of them
    /// already: same cost, fewer moves; a plan that is today's placement moves nothing.
    #[test]
    fn todays_holdings_decide_which_worker_takes_which_list() {
        let load = BTreeMap::from([(1, zipf(16)), (2, zipf(16).into_iter().rev().collect())]);
        let room = rooms(3, &[1, 2], 7);
        let fresh = plan(&load, &room, 2, &[]).expect("plan");
        // Today: the fresh plan's lists, handed round one worker on.
        let h = fresh.holdings();
        let today = vec![h[2].clone(), h[0].clone(), h[1].clone()];
        let kept = plan(&load, &room, 2, &today).expect("plan");
        assert_eq!(
            kept.holdings(),
            today,
            "the plan is today's placement: nothing moves"
        );
        assert!((kept.step_load() - fresh.step_load()).abs() < 1e-9);
        for (l, lp) in &kept.layers {
            let mut a = lp.worker_load.clone();
            let mut b = fresh.layers[l].worker_load.clone();
            a.sort_by(f64::total_cmp);
            b.sort_by(f64::total_cmp);
            assert_eq!(a, b, "layer {l}: the same loads, other workers");
        }
        // From contiguous shards, the moves are never more than without the preference.
        let contiguous: Vec<Holdings> = (0..3u32)
            .map(|w| uniform(&[1, 2], &(w * 6..(w * 6 + 6).min(16)).collect::<Vec<_>>()))
            .collect();
        let moves = |p: &Plan| -> usize {
            p.holdings()
                .iter()
                .zip(&contiguous)
                .map(|(to, from)| {
                    to.iter()
                        .map(|(l, list)| list.iter().filter(|e| !from[l].contains(e)).count())
                        .sum::<usize>()
                })
                .sum()
        };
        let near = plan(&load, &room, 2, &contiguous).expect("plan");
        check_valid(&near, 16, &room);
        assert!(
            moves(&near) <= moves(&fresh),
            "{} > {}",
            moves(&near),
            moves(&fresh)
        );
        assert!((near.step_load() - fresh.step_load()).abs() < 1e-9);
        // Workers of unequal room never trade lists.
        let uneven = vec![
            BTreeMap::from([(1, 10), (2, 10)]),
            BTreeMap::from([(1, 8), (2, 8)]),
        ];
        let swapped = vec![
            uniform(&[1, 2], &(8..16).collect::<Vec<_>>()),
            uniform(&[1, 2], &(0..8).collect::<Vec<_>>()),
        ];
        let p = plan(&load, &uneven, 2, &swapped).expect("plan");
        check_valid(&p, 16, &uneven);
    }

    #[test]
    fn holdings_helpers() {
        let h = BTreeMap::from([(1, vec![0, 1, 2]), (2, vec![1, 2, 3])]);
        assert_eq!(common_experts(&h), vec![1, 2]);
        assert!(!is_uniform(&h));
        let u = uniform(&[1, 2], &[4, 5]);
        assert!(is_uniform(&u));
        assert_eq!(common_experts(&u), vec![4, 5]);
        assert!(common_experts(&Holdings::new()).is_empty());
    }
}
