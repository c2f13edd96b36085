//! Causal multi-head attention on the CPU in tiles (the flash-attention scheme), for prefill.
//!
//! MLA's prefill on the CPU ([`super::mla`]) calls it once per chunk of keys: the queries of a
//! sequence's new rows are cut into tiles of [`Q_TILE`] rows per head, each tile walks the keys in
//! blocks of [`K_BLOCK`] and keeps a running maximum, a running sum of exponentials and an f32
//! output accumulator per row (online softmax). The causal mask is applied by index: a key after
//! a query's position is never scored, and a block wholly after a tile is never visited. Nothing
//! of size queries × keys exists; the state is the size of the output. Tiles run in parallel
//! (rayon), each owning its rows' state, so a chunk's update is deterministic.
//!
//! Lifecycle: [`TiledAttention::new`] per sequence and layer, [`TiledAttention::update`] for each
//! chunk of keys in any order (softmax merging is order-free up to rounding),
//! [`TiledAttention::finish`] for the normalised output.

use rayon::prelude::*;

/// Query rows per tile: the unit of parallel work and of state.
pub const Q_TILE: usize = 32;
/// Keys scored at once by a tile: one block's keys and values stay in L1/L2 while the tile's
/// rows go over them.
pub const K_BLOCK: usize = 64;

/// A read-only `[rows, heads, dim]` view into a flat f32 buffer: element `(r, h, d)` is
/// `data[offset + r * row + h * head + d]`. Lets keys and values be read straight out of one
/// expanded `[rows, heads, nope + v]` buffer.
#[derive(Debug, Clone, Copy)]
pub struct HeadsView<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    /// Stride between rows.
    pub row: usize,
    /// Stride between heads.
    pub head: usize,
    /// Elements per head and row (contiguous).
    pub dim: usize,
}

impl<'a> HeadsView<'a> {
    /// A contiguous `[rows, heads, dim]` buffer.
    pub fn contiguous(data: &'a [f32], heads: usize, dim: usize) -> Self {
        HeadsView {
            data,
            offset: 0,
            row: heads * dim,
            head: dim,
            dim,
        }
    }

    fn at(&self, r: usize, h: usize) -> &'a [f32] {
        let s = self.offset + r * self.row + h * self.head;
        &self.data[s..s + self.dim]
    }
}

/// The online-softmax state of `Q_TILE` query rows of one head.
struct Tile {
    head: usize,
    /// First query row (relative to the sequence's new rows).
    q0: usize,
    rows: usize,
    /// `[rows]`: the largest scaled score seen per row (−∞ before any).
    max: Vec<f32>,
    /// `[rows]`: Σ exp(score − max) per row.
    sum: Vec<f32>,
    /// `[rows, dv]`: Σ exp(score − max) · v per row.
    acc: Vec<f32>,
}

/// Tiled causal attention of `n` query rows at positions `past..past + n` over keys at
/// positions `0..past + n`, for `heads` heads with value width `dv`.
pub struct TiledAttention {
    heads: usize,
    n: usize,
    dv: usize,
    past: usize,
    scale: f32,
    tiles: Vec<Tile>,
}

impl TiledAttention {
    pub fn new(heads: usize, n: usize, dv: usize, past: usize, scale: f32) -> Self {
        let tiles = (0..heads)
            .flat_map(|head| {
                (0..n).step_by(Q_TILE).map(move |q0| {
                    let rows = Q_TILE.min(n - q0);
                    Tile {
                        head,
                        q0,
                        rows,
                        max: vec![f32::NEG_INFINITY; rows],
                        sum: vec![0.0; rows],
                        acc: vec![0.0; rows * dv],
                    }
                })
            })
            .collect();
        TiledAttention {
            heads,
            n,
            dv,
            past,
            scale,
            tiles,
        }
    }

    /// Attends every query row (`q: [n, heads, dk]`) to the keys `k: [lc, heads, dk]` and
    /// values `v: [lc, heads, dv]` at positions `k0..k0 + lc`; keys after a row's position are
    /// skipped.
    pub fn update(&mut self, q: HeadsView, k: HeadsView, v: HeadsView, k0: usize, lc: usize) {
        debug_assert_eq!(q.dim, k.dim, "queries and keys differ in width");
        debug_assert_eq!(v.dim, self.dv, "value width");
        let (past, scale, dv) = (self.past, self.scale, self.dv);
        self.tiles.par_iter_mut().for_each(|t| {
            let last = past + t.q0 + t.rows - 1; // the tile's last query position
            let end = (k0 + lc).min(last + 1);
            let mut scores = [0f32; K_BLOCK];
            for b0 in (k0..end).step_by(K_BLOCK) {
                let b1 = (b0 + K_BLOCK).min(end);
                for i in 0..t.rows {
                    // Keys b0..j1 are at or before this row's position.
                    let j1 = b1.min(past + t.q0 + i + 1);
                    if j1 <= b0 {
                        continue;
                    }
                    let qi = q.at(t.q0 + i, t.head);
                    let s = &mut scores[..j1 - b0];
                    let mut block_max = f32::NEG_INFINITY;
                    for (j, sj) in s.iter_mut().enumerate() {
                        *sj = dot(qi, k.at(b0 + j - k0, t.head)) * scale;
                        block_max = block_max.max(*sj);
                    }
                    let m = t.max[i].max(block_max);
                    let acc = &mut t.acc[i * dv..(i + 1) * dv];
                    if t.max[i] != m {
                        // exp(−∞) = 0 clears the empty state on the first block.
                        let c = (t.max[i] - m).exp();
                        t.sum[i] *= c;
                        acc.iter_mut().for_each(|a| *a *= c);
                        t.max[i] = m;
                    }
                    for (j, sj) in s.iter().enumerate() {
                        let p = (sj - m).exp();
                        t.sum[i] += p;
                        axpy(acc, p, v.at(b0 + j - k0, t.head));
                    }
                }
            }
        });
    }

    /// `[n, heads · dv]`, row-major: each row's heads side by side.
    pub fn finish(self) -> Vec<f32> {
        let (heads, dv) = (self.heads, self.dv);
        let mut out = vec![0f32; self.n * heads * dv];
        for t in &self.tiles {
            for i in 0..t.rows {
                // Every row sees at least its own key, so the sum is positive.
                let inv = 1.0 / t.sum[i];
                let dst = ((t.q0 + i) * heads + t.head) * dv;
                for (o, a) in out[dst..dst + dv]
                    .iter_mut()
                    .zip(&t.acc[i * dv..(i + 1) * dv])
                {
                    *o = a * inv;
                }
            }
        }
        out
    }
}

/// `Σ a·b` with eight independent partial sums, so that the compiler vectorises it (a single
/// running f32 sum may not be reordered).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for ((s, x), y) in lanes.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

/// `y += a·x`.
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// The naive reference, in f64: every score of a row, a full softmax, the weighted sum.
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (heads, n, l, dk, dv): (usize, usize, usize, usize, usize),
        past: usize,
        scale: f64,
    ) -> Vec<f32> {
        let mut out = vec![0f32; n * heads * dv];
        for i in 0..n {
            for h in 0..heads {
                let qi = &q[(i * heads + h) * dk..][..dk];
                let scores: Vec<f64> = (0..=past + i)
                    .map(|j| {
                        let kj = &k[(j * heads + h) * dk..][..dk];
                        qi.iter()
                            .zip(kj)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..dv {
                    let o: f64 = e
                        .iter()
                        .enumerate()
                        .map(|(j, p)| p * v[(j * heads + h) * dv + d] as f64)
                        .sum();
                    out[(i * heads + h) * dv + d] = (o / z) as f32;
                }
            }
        }
        assert!(l >= past + n);
        out
    }

    fn random(rng: &mut ChaCha8Rng, len: usize, spread: f32) -> Vec<f32> {
        (0..len)
            .map(|_| rng.random_range(-spread..spread))
            .collect()
    }

    /// Tiled against the naive f64 reference on fresh random inputs: several lengths (one row,
    /// tile and block boundaries crossed and missed), earlier context (`past > 0`, as in chunked
    /// prefill), keys fed in one chunk or in uneven chunks. Tolerance 2e-5 absolute on outputs of
    /// magnitude ≤ 1: the kernel accumulates in f32 (relative rounding ~1e-7 per operation over at
    /// most a few hundred terms); scores up to ±20 make the softmax peaked, so the rescaling is
    /// exercised.
    #[test]
    fn tiled_matches_the_naive_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(15);
        let (heads, dk, dv) = (3, 24, 20);
        for &(n, past, chunk) in &[
            (1, 0, 1000),
            (1, 77, 1000),
            (5, 0, 1000),
            (33, 0, 1000),
            (64, 0, 7),
            (97, 0, 1000),
            (97, 0, 50),
            (40, 31, 1000),
            (40, 31, 64),
            (130, 200, 129),
        ] {
            let l = past + n;
            let q = random(&mut rng, n * heads * dk, 1.0);
            let k = random(&mut rng, l * heads * dk, 1.0);
            let v = random(&mut rng, l * heads * dv, 1.0);
            let scale = 0.9;
            let want = naive(&q, &k, &v, (heads, n, l, dk, dv), past, scale);
            let mut att = TiledAttention::new(heads, n, dv, past, scale as f32);
            for k0 in (0..l).step_by(chunk) {
                let lc = chunk.min(l - k0);
                att.update(
                    HeadsView::contiguous(&q, heads, dk),
                    HeadsView::contiguous(&k[k0 * heads * dk..(k0 + lc) * heads * dk], heads, dk),
                    HeadsView::contiguous(&v[k0 * heads * dv..(k0 + lc) * heads * dv], heads, dv),
                    k0,
                    lc,
                );
            }
            let got = att.finish();
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 2e-5,
                "n {n}, past {past}, chunk {chunk}: max-abs {worst:.2e} > 2e-5"
            );
        }
    }

    /// Values read through strides (keys and values interleaved in one buffer, as MLA's
    /// expanded `kv_b_proj` output lays them out) give what contiguous copies give.
    #[test]
    fn strided_views_read_the_same_elements() {
        let mut rng = ChaCha8Rng::seed_from_u64(16);
        let (heads, n, dk, dv) = (2, 9, 8, 4);
        let q = random(&mut rng, n * heads * dk, 1.0);
        let kv = random(&mut rng, n * heads * (dk + dv), 1.0);
        let split = |off: usize, dim: usize| -> Vec<f32> {
            (0..n * heads)
                .flat_map(|rh| kv[rh * (dk + dv) + off..][..dim].to_vec())
                .collect()
        };
        let (k, v) = (split(0, dk), split(dk, dv));
        let run = |kv_k: HeadsView, kv_v: HeadsView| {
            let mut att = TiledAttention::new(heads, n, dv, 0, 0.5);
            att.update(HeadsView::contiguous(&q, heads, dk), kv_k, kv_v, 0, n);
            att.finish()
        };
        let strided = |offset, dim| HeadsView {
            data: &kv,
            offset,
            row: heads * (dk + dv),
            head: dk + dv,
            dim,
        };
        assert_eq!(
            run(strided(0, dk), strided(dk, dv)),
            run(
                HeadsView::contiguous(&k, heads, dk),
                HeadsView::contiguous(&v, heads, dv)
            )
        );
    }
}
