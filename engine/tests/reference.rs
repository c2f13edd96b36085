//! The engine against HF transformers' float32 outputs for tiny DeepSeek models
//! (`tests/fixtures/*/reference.safetensors`, see `tests/fixtures/README.md`).
//!
//! Every fixture directory found is checked, so a new reference model is covered by dropping it
//! in. Tolerances:
//! - logits: max-abs 1e-3 (the bound). Both sides run in f32 from the same
//!   bf16/FP8-dequantised weights; what differs is summation order (absorbed MLA in decode,
//!   tiled online-softmax MLA in CPU prefill, matmul blocking), worth ~1e-5 here.
//! - hidden states (transformers 5.17 reports the embeddings, then each decoder layer's output,
//!   except that the last entry is taken *after* the final norm: `logits = lm_head(hs[L])`
//!   exactly, checked against the fixture weights): max-abs 1e-3 relative to the layer's largest magnitude (the residual stream
//!   grows through the layers; an absolute bound would loosen the early layers' check).
//! - greedy tokens: equal at every step before the first reference step whose top-1/top-2 margin
//!   is below 1e-3, where a difference of 1e-3 in the logits could legitimately flip the argmax.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use moemesh_engine::divergence::{self, Divergence, HfFigures};
use moemesh_engine::model::StepSeq;
use moemesh_engine::{ExpertShard, InProcessEngine, ModelFiles};

const LOGIT_TOL: f32 = 1e-3;
const HIDDEN_REL_TOL: f32 = 1e-3;
const MARGIN_TOL: f64 = 1e-3;

fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn fixture_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_root())
        .expect("tests/fixtures exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("reference.safetensors").is_file())
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 3,
        "expected the three reference fixtures, found {dirs:?}"
    );
    dirs
}

struct Reference {
    tensors: HashMap<String, Tensor>,
    json: serde_json::Value,
}

impl Reference {
    fn load(dir: &Path) -> Self {
        let tensors =
            candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
                .expect("reference.safetensors");
        let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
        Reference {
            tensors,
            json: serde_json::from_str(&text).expect("reference.json parses"),
        }
    }

    fn tensor(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("reference has {name}"))
    }

    fn ids(&self, name: &str) -> Vec<u32> {
        self.tensor(name)
            .to_vec1::<i64>()
            .expect("int64 ids")
            .into_iter()
            .map(|i| u32::try_from(i).expect("id fits u32"))
            .collect()
    }

    fn num_prompts(&self) -> usize {
        self.json["prompts"].as_array().expect("prompts").len()
    }

    fn margins(&self, prompt: usize) -> Vec<f64> {
        self.json["prompts"][prompt]["greedy_top1_minus_top2_logit"]
            .as_array()
            .expect("margins")
            .iter()
            .map(|m| m.as_f64().expect("margin"))
            .collect()
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .expect("sub")
        .abs()
        .expect("abs")
        .flatten_all()
        .expect("flatten")
        .max(0)
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar")
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .expect("abs")
        .flatten_all()
        .expect("flat")
        .max(0)
        .expect("max")
        .to_scalar()
        .expect("scalar")
}

fn load(dir: &Path) -> InProcessEngine {
    let files = ModelFiles::open(dir).unwrap_or_else(|e| panic!("open {}: {e}", dir.display()));
    InProcessEngine::load(&files, &Device::Cpu, DType::F32).expect("load f32")
}

/// Full-sequence forward (no cache reuse): `(per-layer outputs incl. embeddings, logits)`.
fn full_forward(engine: &InProcessEngine, ids: &[u32]) -> (Vec<Tensor>, Tensor) {
    let model = &engine.model;
    let mut hidden = vec![model.embed(ids).expect("embed")];
    let out = model
        .forward_sequence(ids, &engine.experts as &ExpertShard, |_, h| {
            hidden.push(h.clone())
        })
        .expect("forward");
    let logits = model.logits(&out).expect("logits");
    (hidden, logits)
}

#[test]
fn full_sequence_logits_match_transformers() {
    for dir in fixture_dirs() {
        let r = Reference::load(&dir);
        let engine = load(&dir);
        let mut worst = 0f32;
        for p in 0..r.num_prompts() {
            let ids = r.ids(&format!("prompt{p}.input_ids"));
            let (_, logits) = full_forward(&engine, &ids);
            let d = max_abs_diff(&logits, r.tensor(&format!("prompt{p}.logits")));
            println!(
                "{}: prompt {p} ({} tokens): logits max-abs error {d:.3e}",
                dir.display(),
                ids.len()
            );
            assert!(
                d <= LOGIT_TOL,
                "{}: prompt {p}: max-abs {d} > {LOGIT_TOL}",
                dir.display()
            );
            worst = worst.max(d);
        }
        println!("{}: worst logits max-abs error {worst:.3e}", dir.display());
    }
}

#[test]
fn prompt1_hidden_states_match_transformers_layer_by_layer() {
    for dir in fixture_dirs() {
        let r = Reference::load(&dir);
        let engine = load(&dir);
        let ids = r.ids("prompt1.input_ids");
        let (hidden, _) = full_forward(&engine, &ids);
        let layers = engine.model.config().num_hidden_layers;
        assert_eq!(hidden.len(), layers + 1);
        for (i, h) in hidden.iter().enumerate() {
            let h = if i == layers {
                &engine.model.final_norm(h).expect("norm")
            } else {
                h
            };
            let reference = r.tensor(&format!("prompt1.hidden_states.{i}"));
            let d = max_abs_diff(h, reference);
            let scale = max_abs(reference).max(1.0);
            println!(
                "{}: hidden_states.{i}: max-abs {d:.3e} (scale {scale:.1})",
                dir.display()
            );
            assert!(
                d <= HIDDEN_REL_TOL * scale,
                "{}: layer {i}: {d} > {HIDDEN_REL_TOL}·{scale}",
                dir.display()
            );
        }
    }
}

#[test]
fn greedy_decode_through_the_kv_cache_matches_transformers() {
    for dir in fixture_dirs() {
        let r = Reference::load(&dir);
        let engine = load(&dir);
        for p in 0..r.num_prompts() {
            let ids = r.ids(&format!("prompt{p}.input_ids"));
            let expected = r.ids(&format!("prompt{p}.greedy_tokens"));
            let margins = r.margins(p);
            let comparable = margins
                .iter()
                .position(|m| *m < MARGIN_TOL)
                .unwrap_or(expected.len());
            let req = moemesh_engine::GenerationRequest {
                prompt_ids: ids.clone(),
                sampling: Default::default(),
                max_new_tokens: expected.len(),
                stop: Vec::new(),
                ignore_eos: true,
                ..Default::default()
            };
            let out = engine.generate(&req, &mut |_| true).expect("generate");
            assert_eq!(
                out.token_ids[..comparable],
                expected[..comparable],
                "{}: prompt {p}: greedy tokens differ (compared {comparable} steps)",
                dir.display()
            );
            println!(
                "{}: prompt {p}: {comparable}/{} greedy tokens equal",
                dir.display(),
                expected.len()
            );
        }
    }
}

/// Prompt logprobs (vLLM's `prompt_logprobs`) through the serving core, the prompt prefilled
/// in chunks: each prompt token's logprob is the log-softmax of transformers' logits at the
/// position before it (tolerance 2 × the logits'), its rank and alternatives agree with that
/// row, and the same request again (its blocks now in the prefix cache) computes them again,
/// to the same values.
#[test]
fn prompt_logprobs_are_the_log_softmax_of_transformers_logits() {
    use moemesh_engine::serving::LocalServer;
    const TOL: f32 = 2.0 * LOGIT_TOL;
    for dir in fixture_dirs() {
        let r = Reference::load(&dir);
        let engine = load(&dir);
        for p in 0..r.num_prompts() {
            let ids = r.ids(&format!("prompt{p}.input_ids"));
            let logits: Vec<Vec<f32>> = r
                .tensor(&format!("prompt{p}.logits"))
                .to_dtype(DType::F32)
                .expect("f32")
                .to_vec2()
                .expect("rows");
            let req = moemesh_engine::GenerationRequest {
                prompt_ids: ids.clone(),
                max_new_tokens: 2,
                ignore_eos: true,
                prompt_logprobs: Some(3),
                ..Default::default()
            };
            let mut server =
                LocalServer::new(&engine.model, &engine.experts, None, 1, ids.len() + 2)
                    .expect("server");
            // Chunks of 16 (a block) for the longer prompts.
            server.step_limits.token_budget = 20;
            let outs = server
                .run(vec![req.clone(), req], &mut |_, _| true)
                .expect("run");
            for out in &outs {
                assert_eq!(out.prompt_logprobs.len(), ids.len() - 1, "prompt {p}");
                for (i, lp) in out.prompt_logprobs.iter().enumerate() {
                    let row = &logits[i];
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let lse = max + row.iter().map(|&v| (v - max).exp()).sum::<f32>().ln();
                    let t = ids[i + 1];
                    let v = row[t as usize];
                    let what = format!("{}: prompt {p}: position {}", dir.display(), i + 1);
                    assert_eq!(lp.token, t, "{what}");
                    assert!(
                        (lp.logprob - (v - lse)).abs() <= TOL,
                        "{what}: {lp:?} vs {}",
                        v - lse
                    );
                    // The rank, up to ids within the tolerance of the token's logit.
                    let surely_above = row.iter().filter(|&&w| w > v + LOGIT_TOL).count();
                    let maybe_above = row.iter().filter(|&&w| w > v - LOGIT_TOL).count() - 1;
                    assert!(
                        (surely_above + 1..=maybe_above + 1).contains(&(lp.rank as usize)),
                        "{what}: rank {} not in {}..={}",
                        lp.rank,
                        surely_above + 1,
                        maybe_above + 1
                    );
                    assert_eq!(lp.top.len(), 3, "{what}");
                    for (k, &(id, l)) in lp.top.iter().enumerate() {
                        let want = row[id as usize] - lse;
                        assert!(
                            (l - want).abs() <= TOL,
                            "{what}: alternative {id}: {l} vs {want}"
                        );
                        // The k-th best of the reference row, up to near ties.
                        let mut sorted = row.clone();
                        sorted.sort_by(|a, b| b.total_cmp(a));
                        assert!(
                            (row[id as usize] - sorted[k]).abs() <= 2.0 * LOGIT_TOL,
                            "{what}: alternative {k} is {id} ({}), the reference's is {}",
                            row[id as usize],
                            sorted[k]
                        );
                    }
                }
            }
            assert_eq!(
                outs[0].prompt_logprobs, outs[1].prompt_logprobs,
                "prompt {p}: computed again, not from the cache"
            );
        }
    }
}

/// A prompt prefilled in three chunks (each chunk's queries attend to the cached earlier ones,
/// as chunked prefill does) gives the reference logits at the end of every chunk.
#[test]
fn chunked_prefill_matches_transformers() {
    for dir in fixture_dirs() {
        let r = Reference::load(&dir);
        let engine = load(&dir);
        let model = &engine.model;
        for p in 0..r.num_prompts() {
            let ids = r.ids(&format!("prompt{p}.input_ids"));
            if ids.len() < 4 {
                continue;
            }
            let reference = r.tensor(&format!("prompt{p}.logits"));
            let third = ids.len() / 3;
            let mut cache = model.new_cache();
            for (start, end) in [
                (0, third),
                (third, 2 * third + 1),
                (2 * third + 1, ids.len()),
            ] {
                let emb = model.embed(&ids[start..end]).expect("embed");
                let mut s = [StepSeq {
                    cache: &mut cache,
                    new_tokens: end - start,
                }];
                let logits = model
                    .step_last_logits(&emb, &mut s, &engine.experts)
                    .expect("chunk");
                let want = reference.narrow(0, end - 1, 1).expect("row");
                let d = max_abs_diff(&logits, &want);
                assert!(
                    d <= LOGIT_TOL,
                    "{}: prompt {p}: chunk {start}..{end}: max-abs {d} > {LOGIT_TOL}",
                    dir.display()
                );
            }
        }
    }
}

/// The last layer's feed-forward block over chosen rows only (`forward_hidden_rows`, what a
/// step that samples a prefill's last row runs) gives exactly those rows of the full output,
/// and leaves the caches as the full forward does: the next step's logits are equal too.
#[test]
fn last_layer_over_chosen_rows_equals_those_rows_of_the_full_forward() {
    for dir in fixture_dirs() {
        let r = Reference::load(&dir);
        let engine = load(&dir);
        let model = &engine.model;
        let ids = r.ids(&format!("prompt{}.input_ids", r.num_prompts() - 1));
        let n = ids.len();
        let emb = model.embed(&ids).expect("embed");
        let run = |rows: Option<&[u32]>| {
            let mut cache = model.new_cache();
            let idx = rows.map(|r| Tensor::new(r, &Device::Cpu).expect("rows"));
            let out = {
                let mut s = [StepSeq {
                    cache: &mut cache,
                    new_tokens: n,
                }];
                model
                    .forward_hidden_rows(&emb, &mut s, &engine.experts, idx.as_ref(), |_, _| {})
                    .expect("forward")
            };
            // One more token through the cache the step left.
            let next = model.embed(&ids[n - 1..]).expect("embed");
            let mut s = [StepSeq {
                cache: &mut cache,
                new_tokens: 1,
            }];
            let after = model
                .step_last_logits(&next, &mut s, &engine.experts)
                .expect("next step");
            (out, after)
        };
        let (full, full_after) = run(None);
        let chosen = [n as u32 - 1, 0];
        let (part, part_after) = run(Some(&chosen));
        let want = full
            .index_select(&Tensor::new(&chosen[..], &Device::Cpu).expect("rows"), 0)
            .expect("rows");
        assert_eq!(part.dims(), want.dims(), "{}", dir.display());
        // 1e-5: the feed-forward block over two rows may block its matmuls differently from
        // the one over every row; the math is the same.
        let d = max_abs_diff(&part, &want);
        assert!(d <= 1e-5, "{}: chosen rows differ by {d}", dir.display());
        assert_eq!(
            max_abs_diff(&part_after, &full_after),
            0.0,
            "{}",
            dir.display()
        );
    }
}

/// Decoding several sequences of different lengths in one batch gives the same logits and
/// tokens as decoding each alone (tolerance 1e-4: batching changes matmul blocking, not math).
#[test]
fn batched_decode_equals_one_at_a_time() {
    let dir = fixtures_root().join("tiny-deepseek-v3");
    let engine = load(&dir);
    let model = &engine.model;
    let prompts: Vec<Vec<u32>> = vec![vec![5, 17, 42], vec![100; 11], (2..40).collect(), vec![7]];
    let steps = 6;

    // One at a time.
    let mut alone: Vec<Vec<(u32, Vec<f32>)>> = Vec::new();
    for p in &prompts {
        let mut cache = model.new_cache();
        let mut input = p.clone();
        let mut seq = Vec::new();
        for _ in 0..steps {
            let emb = model.embed(&input).expect("embed");
            let mut s = [StepSeq {
                cache: &mut cache,
                new_tokens: input.len(),
            }];
            let logits = model
                .step_last_logits(&emb, &mut s, &engine.experts)
                .expect("step");
            let row: Vec<f32> = logits.squeeze(0).expect("row").to_vec1().expect("vec");
            let tok = moemesh_engine::sampling::argmax(&row) as u32;
            seq.push((tok, row));
            input = vec![tok];
        }
        alone.push(seq);
    }

    // Together: prefill all prompts in one step, then decode all in one step each.
    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut inputs = prompts.clone();
    // `step` indexes both the per-sequence histories and the step count; a range loop is clearest.
    #[allow(clippy::needless_range_loop)]
    for step in 0..steps {
        let flat: Vec<u32> = inputs.iter().flatten().copied().collect();
        let emb = model.embed(&flat).expect("embed");
        let mut seqs: Vec<StepSeq> = caches
            .iter_mut()
            .zip(&inputs)
            .map(|(c, i)| StepSeq {
                cache: c,
                new_tokens: i.len(),
            })
            .collect();
        let logits = model
            .step_last_logits(&emb, &mut seqs, &engine.experts)
            .expect("batched step");
        for (i, row) in logits
            .to_vec2::<f32>()
            .expect("rows")
            .into_iter()
            .enumerate()
        {
            let (tok, ref expected) = alone[i][step];
            let d = row
                .iter()
                .zip(expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                d < 1e-4,
                "seq {i} step {step}: batched logits differ by {d}"
            );
            assert_eq!(
                moemesh_engine::sampling::argmax(&row) as u32,
                tok,
                "seq {i} step {step}"
            );
            inputs[i] = vec![tok];
        }
    }
}

/// The same seed gives the same sampled tokens; another seed gives others.
#[test]
fn seeded_sampling_is_reproducible() {
    let engine = load(&fixtures_root().join("tiny-deepseek-v3"));
    let run = |seed| {
        let req = moemesh_engine::GenerationRequest {
            prompt_ids: vec![3, 14, 15, 92],
            sampling: moemesh_engine::SamplingParams {
                temperature: 1.0,
                top_k: 50,
                top_p: 0.95,
                seed: Some(seed),
                ..Default::default()
            },
            max_new_tokens: 24,
            stop: Vec::new(),
            ignore_eos: true,
            ..Default::default()
        };
        engine
            .generate(&req, &mut |_| true)
            .expect("generate")
            .token_ids
    };
    let a = run(1234);
    assert_eq!(a, run(1234));
    assert_ne!(a, run(4321));
}

/// The serving core in one process: more requests than `concurrency`, in a KV pool sized for
/// exactly `concurrency` of them, all finish (a finished sequence's blocks go to the next one
/// in the step that releases them), each with the tokens it gets alone.
#[test]
fn local_server_runs_more_requests_than_its_concurrency_in_a_pool_just_big_enough() {
    use moemesh_engine::serving::LocalServer;
    let engine = load(&fixtures_root().join("tiny-deepseek-v3"));
    let req = |i: u32, seed| moemesh_engine::GenerationRequest {
        // 21 prompt + 20 new tokens: 3 blocks of 16 each, and a pool of 4 a sequence
        // (`blocks_for`), so the next prompt (2 blocks) fits only once the last one's are free.
        prompt_ids: (0..21).map(|k| 3 + (i + 7 * k) % 90).collect(),
        sampling: moemesh_engine::SamplingParams {
            temperature: if i.is_multiple_of(2) { 0.0 } else { 0.9 },
            top_k: 0,
            top_p: 1.0,
            seed: Some(seed),
            ..Default::default()
        },
        max_new_tokens: 20,
        stop: Vec::new(),
        ignore_eos: true,
        ..Default::default()
    };
    let requests: Vec<_> = (0..5).map(|i| req(i, 100 + u64::from(i))).collect();
    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| engine.generate(r, &mut |_| true).expect("alone").token_ids)
        .collect();
    for concurrency in [1, 2] {
        let mut server = LocalServer::new(
            &engine.model,
            &engine.experts,
            engine.tokenizer.as_ref(),
            concurrency,
            21 + 20,
        )
        .expect("server");
        let mut seen = vec![0usize; requests.len()];
        let outs = server
            .run(requests.clone(), &mut |i, _| {
                seen[i] += 1;
                true
            })
            .expect("every request finishes");
        let got: Vec<Vec<u32>> = outs.into_iter().map(|o| o.token_ids).collect();
        assert_eq!(got, alone, "concurrency {concurrency}");
        assert_eq!(seen, vec![20; requests.len()]);
    }
}

/// Sequences whose KV lives in one shared paged pool (blocks interleaved between them) decode
/// exactly like sequences with their own buffers, and dropping them returns every block.
#[test]
fn paged_pool_caches_decode_like_owned_caches_and_free_their_blocks() {
    let engine = load(&fixtures_root().join("tiny-deepseek-v3"));
    let model = &engine.model;
    let cfg = model.config().clone();
    let pool = moemesh_engine::KvPool::new(&cfg, 64, DType::F32, &Device::Cpu).expect("pool");
    let prompts: Vec<Vec<u32>> = vec![vec![5, 17, 42], (2..40).collect(), vec![300; 20]];
    let steps = 20;
    let mut caches: Vec<_> = prompts
        .iter()
        .map(|_| moemesh_engine::SequenceCache::paged(&cfg, pool.clone()))
        .collect();
    let mut inputs = prompts.clone();
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    for _ in 0..steps {
        // One sequence per step, round robin, so their blocks interleave in the pool.
        for (i, cache) in caches.iter_mut().enumerate() {
            let emb = model.embed(&inputs[i]).expect("embed");
            let mut s = [StepSeq {
                cache,
                new_tokens: inputs[i].len(),
            }];
            let logits = model
                .step_last_logits(&emb, &mut s, &engine.experts)
                .expect("step");
            let row: Vec<f32> = logits.squeeze(0).expect("row").to_vec1().expect("vec");
            let tok = moemesh_engine::sampling::argmax(&row) as u32;
            got[i].push(tok);
            inputs[i] = vec![tok];
        }
    }
    for (p, g) in prompts.iter().zip(&got) {
        let req = moemesh_engine::GenerationRequest {
            prompt_ids: p.clone(),
            sampling: Default::default(),
            max_new_tokens: steps,
            stop: Vec::new(),
            ignore_eos: true,
            ..Default::default()
        };
        assert_eq!(
            &engine
                .generate(&req, &mut |_| true)
                .expect("owned")
                .token_ids,
            g
        );
    }
    assert!(pool.free_blocks() < 64);
    drop(caches);
    assert_eq!(pool.free_blocks(), 64, "every block returned");
}

/// A pool that is too small says so instead of panicking.
#[test]
fn an_exhausted_pool_is_a_clear_error() {
    let engine = load(&fixtures_root().join("tiny-deepseek-v3"));
    let cfg = engine.model.config().clone();
    let pool = moemesh_engine::KvPool::new(&cfg, 2, DType::F32, &Device::Cpu).expect("pool");
    let mut cache = moemesh_engine::SequenceCache::paged(&cfg, pool);
    let ids: Vec<u32> = (2..42).collect();
    let emb = engine.model.embed(&ids).expect("embed");
    let mut s = [StepSeq {
        cache: &mut cache,
        new_tokens: ids.len(),
    }];
    let err = engine
        .model
        .step_last_logits(&emb, &mut s, &engine.experts)
        .expect_err("40 tokens > 2 blocks");
    assert!(err.to_string().contains("KV pool exhausted"), "{err}");
}

/// The two-micro-batch forward gives the plain forward's logits for a mixed prefill/decode batch.
#[test]
fn overlapped_micro_batches_equal_the_single_batch_forward() {
    let engine = load(&fixtures_root().join("tiny-deepseek-v3"));
    let model = &engine.model;
    let prompts: Vec<Vec<u32>> = vec![
        vec![5, 17, 42],
        (2..40).collect(),
        vec![7],
        vec![300; 9],
        vec![11, 12],
    ];
    let run = |overlap: bool| -> Vec<Vec<f32>> {
        let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
        let mut inputs = prompts.clone();
        let mut rows = Vec::new();
        for _ in 0..3 {
            let flat: Vec<u32> = inputs.iter().flatten().copied().collect();
            let emb = model.embed(&flat).expect("embed");
            let lens: Vec<usize> = inputs.iter().map(Vec::len).collect();
            let mut seqs: Vec<StepSeq> = caches
                .iter_mut()
                .zip(&lens)
                .map(|(c, &n)| StepSeq {
                    cache: c,
                    new_tokens: n,
                })
                .collect();
            let out = if overlap {
                model
                    .forward_hidden_overlapped(&emb, &mut seqs, &engine.experts)
                    .expect("overlapped")
            } else {
                model
                    .forward_hidden(&emb, &mut seqs, &engine.experts, |_, _| {})
                    .expect("plain")
            };
            let mut end = 0;
            for (i, n) in lens.iter().enumerate() {
                end += n;
                let last = out.narrow(0, end - 1, 1).expect("row");
                let logits: Vec<f32> = model
                    .logits(&last)
                    .expect("logits")
                    .squeeze(0)
                    .expect("sq")
                    .to_vec1()
                    .expect("v");
                let tok = moemesh_engine::sampling::argmax(&logits) as u32;
                inputs[i] = vec![tok];
                rows.push(logits);
            }
        }
        rows
    };
    let (plain, overlapped) = (run(false), run(true));
    for (a, b) in plain.iter().zip(&overlapped) {
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-4, "micro-batching changed logits by {d}");
    }
}

/// The two ways an expert shard computes routed experts (expert by expert, and every expert as
/// one GEMM with zero weights for unassigned pairs) agree. Both are f32 sums of the same
/// products in a different order: 1e-5 of the output's scale is ample.
#[test]
fn dense_and_sparse_expert_forms_agree() {
    let engine = load(&fixtures_root().join("tiny-deepseek-v3"));
    let cfg = engine.model.config().clone();
    let layer = cfg.moe_layers()[0];
    let x = Tensor::randn(0f32, 1.0, (5, cfg.hidden_size), &Device::Cpu).expect("x");
    // Token 0 twice to the same expert (weights add), token 4 unassigned.
    let assignments = [
        (0, 3, 0.5),
        (0, 3, 0.25),
        (0, 7, 1.0),
        (1, 0, 0.3),
        (2, 15, 2.0),
        (3, 7, -1.0),
        (3, 8, 0.1),
    ];
    let sparse = engine
        .experts
        .forward_sparse(layer, &x, &assignments)
        .expect("sparse");
    let dense = engine
        .experts
        .forward_dense(layer, &x, &assignments)
        .expect("dense");
    let scale = max_abs(&sparse);
    let d = max_abs_diff(&sparse, &dense);
    assert!(
        scale > 0.0 && d <= 1e-5 * scale,
        "diff {d} at scale {scale}"
    );
    let last: Vec<f32> = dense.get(4).expect("row").to_vec1().expect("vec");
    assert!(last.iter().all(|&v| v == 0.0), "unassigned token is zero");
    assert!(
        engine
            .experts
            .forward_assigned(layer, &x, &[(9, 0, 1.0)])
            .is_err(),
        "row out of range"
    );
}

/// Decoding sequences of one pool are attended as one padded batch, also when the step mixes
/// them with prefills (whose rows sit between theirs): the tokens equal those of each sequence
/// generated alone with its own cache.
#[test]
fn batched_decode_attention_over_the_pool_matches_single_sequences() {
    for fixture in ["tiny-deepseek-v3", "tiny-deepseek-v2-lite"] {
        let engine = load(&fixtures_root().join(fixture));
        let model = &engine.model;
        let cfg = model.config().clone();
        let pool = moemesh_engine::KvPool::new(&cfg, 64, DType::F32, &Device::Cpu).expect("pool");
        let prompts: Vec<Vec<u32>> = vec![vec![5, 17, 42], (2..40).collect(), vec![300; 20]];
        let steps = 12;
        let mut caches: Vec<_> = prompts
            .iter()
            .map(|_| moemesh_engine::SequenceCache::paged(&cfg, pool.clone()))
            .collect();
        let mut inputs = prompts.clone();
        let mut got: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        // Step s runs sequences 0..=s (sequence s prefills while the earlier ones decode), then
        // every sequence decodes together.
        for s in 0..steps + prompts.len() {
            let active: Vec<usize> = (0..prompts.len().min(s + 1))
                .filter(|&i| got[i].len() < steps)
                .collect();
            if active.is_empty() {
                break;
            }
            let flat: Vec<u32> = active.iter().flat_map(|&i| inputs[i].clone()).collect();
            let emb = model.embed(&flat).expect("embed");
            let mut seqs: Vec<StepSeq> = caches
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| active.contains(i))
                .map(|(i, cache)| StepSeq {
                    cache,
                    new_tokens: inputs[i].len(),
                })
                .collect();
            let logits = model
                .step_last_logits(&emb, &mut seqs, &engine.experts)
                .expect("step")
                .to_vec2::<f32>()
                .expect("rows");
            for (row, &i) in logits.iter().zip(&active) {
                let tok = moemesh_engine::sampling::argmax(row) as u32;
                got[i].push(tok);
                inputs[i] = vec![tok];
            }
        }
        for (p, g) in prompts.iter().zip(&got) {
            let req = moemesh_engine::GenerationRequest {
                prompt_ids: p.clone(),
                sampling: Default::default(),
                max_new_tokens: steps,
                stop: Vec::new(),
                ignore_eos: true,
                ..Default::default()
            };
            let alone = engine.generate(&req, &mut |_| true).expect("owned");
            assert_eq!(&alone.token_ids, g, "{fixture}: prompt {p:?}");
        }
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut x, mut y) = (0f64, 0f64, 0f64);
    for (&p, &q) in a.iter().zip(b) {
        (d, x, y) = (
            d + p as f64 * q as f64,
            x + (p as f64).powi(2),
            y + (q as f64).powi(2),
        );
    }
    d / (x.sqrt() * y.sqrt())
}

/// bf16 compute against the f32 reference.
///
/// With HF transformers' own bf16 figures beside the fixture (`hf_bf16_reference.json`, made on
/// a GPU by `scripts/bench/hf_bf16_reference.py`): every prompt position's next-token KL
/// divergence and top-1 agreement, judged by `divergence::judge` (flips, positions at KL > 0.05,
/// ≤ 2 × HF's + 3; the other positions' mean KL ≤ max(2 × HF's, 5e-4); top-1 disagreements ≤ 2 ×
/// HF's + 3; docs/CORRECTNESS.md). This holds however many positions are routing near-ties, which
/// grow with the expert count.
///
/// Without them, the earlier rule: bf16 rounding of the activations moves the router logits by a
/// few thousandths to hundredths, and on these fixtures it flips the experts of tokens whose f32
/// decision margin (see `Router::decision_margin`, in logit units) is 0.0002–0.005. A position
/// whose margin is below `NEAR_TIE` (4× the largest margin seen to flip) may legitimately go to
/// other experts and is left out, like the greedy check's margin floor. At most
/// `MAX_NEAR_TIE_SHARE` of the positions may be left out (V2-Lite's top-6 of 16 softmax routing
/// has many close calls: 14 of 58), so the check cannot pass by excluding everything. Every other
/// position's logits must have cosine ≥ 0.999 with the reference (measured ≥ 0.9998 here).
/// Checked to catch: rounding the residual stream to bf16 (tiny-deepseek-v3 prompt 2 position 12,
/// margin 0.03, drops to 0.9984). Not caught: scoring the router on bf16 instead of f32
/// activations alone (a perturbation of the same size as the others).
#[test]
fn bf16_logits_are_as_close_to_transformers_as_hf_bf16_or_match_away_from_near_ties() {
    const NEAR_TIE: f32 = 0.02;
    const MAX_NEAR_TIE_SHARE: f64 = 0.4;
    const MIN_COSINE: f64 = 0.999;
    for dir in fixture_dirs() {
        let r = Reference::load(&dir);
        let hf = HfFigures::load(&dir).expect("hf_bf16_reference.json readable");
        let f32_engine = load(&dir);
        let files = ModelFiles::open(&dir).expect("open");
        let bf16 = InProcessEngine::load(&files, &Device::Cpu, DType::BF16).expect("load bf16");
        let (mut worst, mut excluded, mut total) = (1f64, 0usize, 0usize);
        let mut divergence = Divergence::default();
        // Positions away from near-ties whose cosine is below the old bound (a failure without
        // HF's figures; reported with them).
        let mut low = Vec::new();
        for p in 0..r.num_prompts() {
            let ids = r.ids(&format!("prompt{p}.input_ids"));
            let margins =
                moemesh_engine::near_ties::routing_margins(&f32_engine, &ids).expect("f32 margins");
            let (_, got) = full_forward(&bf16, &ids);
            let got: Vec<Vec<f32>> = got.to_vec2().expect("logits");
            let want: Vec<Vec<f32>> = r
                .tensor(&format!("prompt{p}.logits"))
                .to_dtype(DType::F32)
                .expect("f32")
                .to_vec2()
                .expect("reference logits");
            divergence.add_rows(&want, &got).expect("same shape");
            for (t, (g, w)) in got.iter().zip(&want).enumerate() {
                total += 1;
                let margin = margins.get(t).copied().unwrap_or(f32::INFINITY);
                let c = cosine(g, w);
                if margin < NEAR_TIE {
                    excluded += 1;
                    continue;
                }
                if c < MIN_COSINE {
                    low.push(format!(
                        "prompt {p} position {t}: cosine {c:.6} < {MIN_COSINE} (routing margin {margin:.4})"
                    ));
                }
                worst = worst.min(c);
            }
        }
        let s = divergence.summary();
        println!(
            "{}: bf16 mean KL {:.3e}, p99 {:.3e}, max {:.3e}, top-1 {}/{}; worst position cosine {worst:.6} away from {excluded} near-ties of {total}",
            dir.display(),
            s.mean_kl,
            s.p99_kl,
            s.max_kl,
            s.top1_agree,
            s.positions
        );
        if let Some(hf) = hf {
            let v = divergence::judge(&s, &hf.summary);
            let count = |f: Option<usize>| f.map_or("-".to_string(), |f| f.to_string());
            let flips: Vec<String> = divergence
                .flips()
                .iter()
                .map(|f| format!("prompt {} position {}: {:.3}", f.prompt, f.position, f.kl))
                .collect();
            println!(
                "{}: rest mean KL {:.3e}, {} flips {flips:?}; HF bf16: mean KL {:.3e}, rest {:.3e}, \
                 {} flips, top-1 {}/{}; {} rule: mean KL ≤ {:.3e}, flips ≤ {}, top-1 ≥ {}",
                dir.display(),
                s.rest_mean_kl.unwrap_or(f64::NAN),
                count(s.flips),
                hf.summary.mean_kl,
                hf.summary.rest_mean_kl.unwrap_or(f64::NAN),
                count(hf.summary.flips),
                hf.summary.top1_agree,
                hf.summary.positions,
                v.rule.name(),
                v.max_mean_kl,
                count(v.max_flips),
                v.min_top1_agree
            );
            assert!(v.passed, "{}: {:?}", dir.display(), v.reasons);
            continue;
        }
        println!(
            "{}: no {} yet: the near-tie rule",
            dir.display(),
            divergence::HF_BF16_FILE
        );
        assert!(low.is_empty(), "{}: {low:?}", dir.display());
        assert!(
            (excluded as f64) <= MAX_NEAR_TIE_SHARE * total as f64,
            "{}: {excluded} of {total} positions are routing near-ties",
            dir.display()
        );
    }
}

/// tiny-deepseek-v3-many-experts has the routing shape it was made for (DeepSeek-V3/R1's top-8
/// from 4 of 8 groups, over 32 experts), a prompt of 300 tokens, and so many routing near-ties
/// that the earlier bf16 rule (at most 40% of positions) cannot judge it: it comes with HF's
/// bf16 figures. Its f32 checks are the other tests' (every fixture found). Skipped, with the
/// reason printed, until its files are generated (`tests/fixtures/make_many_experts.sh`, then
/// `scripts/bench/hf_bf16_reference.py` on a GPU; tests/fixtures/README.md).
#[test]
fn many_expert_fixture_has_v3_routing_at_scale_and_hf_bf16_figures() {
    let dir = fixtures_root().join("tiny-deepseek-v3-many-experts");
    if !dir.join("reference.safetensors").is_file() {
        println!(
            "skipped: {} is not generated yet (tests/fixtures/make_many_experts.sh)",
            dir.display()
        );
        return;
    }
    let engine = load(&dir);
    let cfg = engine.model.config();
    assert_eq!(
        (
            cfg.n_routed_experts,
            cfg.num_experts_per_tok,
            cfg.n_group,
            cfg.topk_group
        ),
        (32, 8, 8, 4),
        "{cfg:?}"
    );
    let r = Reference::load(&dir);
    let longest = (0..r.num_prompts())
        .map(|p| r.ids(&format!("prompt{p}.input_ids")))
        .max_by_key(Vec::len)
        .expect("prompts");
    assert!(longest.len() >= 300, "{} tokens", longest.len());
    let margins = moemesh_engine::near_ties::routing_margins(&engine, &longest).expect("margins");
    let ties = margins.iter().filter(|&&m| m < 0.02).count();
    println!(
        "{}: {ties} of {} positions of the long prompt are routing near-ties",
        dir.display(),
        margins.len()
    );
    assert!(
        ties * 10 > margins.len() * 3,
        "{ties} of {} near-ties: not the shape this fixture is for",
        margins.len()
    );
    let hf = HfFigures::load(&dir).expect("readable");
    let hf = hf.unwrap_or_else(|| {
        panic!(
            "{} has no {}: run scripts/bench/hf_bf16_reference.py on a GPU",
            dir.display(),
            divergence::HF_BF16_FILE
        )
    });
    assert_eq!(hf.fixture, "tiny-deepseek-v3-many-experts");
}

/// Checks that the INT4 fixture at `dir` is what it says: `format` as ModelInfo reports it,
/// expert 3 of layer 1 stored as `<proj>.<packed>` (no plain weight), `plain` tensors stored
/// as they are, and a full load (dense part and experts) that reads every stored tensor and
/// counts INT4 bytes. Returns the opened files.
fn assert_int4_checkpoint(dir: &Path, format: &str, packed: &str, plain: &[&str]) -> ModelFiles {
    let files = ModelFiles::open(dir).expect("open");
    assert_eq!(files.weights_format(), format, "{}", dir.display());
    let names = files.source.names();
    let has = |n: &str| names.iter().any(|x| x == n);
    let e = "model.layers.1.mlp.experts.3";
    for p in ["gate_proj", "up_proj", "down_proj"] {
        assert!(
            has(&format!("{e}.{p}.{packed}")),
            "{}: {e}.{p} packed",
            dir.display()
        );
        assert!(
            !has(&format!("{e}.{p}.weight")),
            "{}: {e}.{p} not plain",
            dir.display()
        );
    }
    for name in plain {
        assert!(has(name), "{}: {name} stays unquantised", dir.display());
    }
    let cfg = &files.config;
    let loader = files.loader(&Device::Cpu, DType::F32);
    moemesh_engine::model::DeepSeekModel::load(cfg, &loader, moemesh_engine::model::Parts::ALL)
        .expect("dense part");
    ExpertShard::load(cfg, &loader, &moemesh_engine::ShardSpec::all(cfg)).expect("experts");
    assert_eq!(loader.unused(cfg.num_hidden_layers), Vec::<String>::new());
    assert!(loader.loaded_bytes().checkpoint.contains_key("int4"));
    files
}

/// Tensors no INT4 checkpoint here quantises.
const INT4_PLAIN: [&str; 4] = [
    "lm_head.weight",
    "model.embed_tokens.weight",
    "model.layers.1.mlp.gate.weight",
    "model.norm.weight",
];

/// tiny-deepseek-v3-int4 is a compressed-tensors INT4 checkpoint (tiny-deepseek-v3's weights
/// quantised by compressed-tensors' own quantiser, `tests/fixtures/make_int4.sh`): its f32
/// checks are the other tests' (every fixture found, against HF transformers on its dequantised
/// weights); this one checks that it is what it says, so that those checks go through the INT4
/// loader: every projection packed (two group sizes), the router, `lm_head`, embeddings and norms
/// plain, and nothing left unread by a full load. Skipped, with the reason printed, until its
/// files are generated.
#[test]
fn int4_fixture_is_a_compressed_tensors_checkpoint() {
    let dir = fixtures_root().join("tiny-deepseek-v3-int4");
    if !dir.join("reference.safetensors").is_file() {
        println!(
            "skipped: {} is not generated yet (tests/fixtures/make_int4.sh)",
            dir.display()
        );
        return;
    }
    assert_int4_checkpoint(
        &dir,
        "int4_compressed_tensors",
        "weight_packed",
        &INT4_PLAIN,
    );
    let e = "model.layers.1.mlp.experts.3";
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .expect("model.safetensors");
    // hidden 128 → groups of 128 (one scale a row); moe_intermediate 160 → groups of 32 (5).
    assert_eq!(
        tensors[&format!("{e}.up_proj.weight_scale")].dims(),
        &[160, 1]
    );
    assert_eq!(
        tensors[&format!("{e}.down_proj.weight_scale")].dims(),
        &[128, 5]
    );
}

/// tiny-deepseek-v3-gptq, -gptq-actorder and -awq are tiny-deepseek-v3's weights quantised and
/// packed by AutoGPTQ's and AutoAWQ's own code (`tests/fixtures/make_gptq_awq.sh`; the act-order
/// one by GPTQ's algorithm itself, whose `g_idx` groups permuted columns): their f32
/// checks are the other tests' (every fixture found, against HF transformers on the weights as
/// those libraries dequantise them), which go through the loader's dequantisation (the CPU path).
/// This one checks that they are what they say (the experts packed, `kv_a_proj_with_mqa`, whose
/// 80 rows neither library packs, the router, `lm_head`, embeddings and norms plain; nothing
/// unread) and that the GPU path's repacking of the library-packed words (`gptq_to_tensor`,
/// `awq_to_tensor`: the INT4 expert kernels' layout) dequantises to the same weights, bit for bit.
#[test]
fn gptq_and_awq_fixtures_are_library_packed_and_repack_to_the_gpu_layout_exactly() {
    use moemesh_engine::weights::int4::{awq_to_tensor, gptq_to_tensor};
    for (name, format, act_order) in [
        ("tiny-deepseek-v3-gptq", "int4_gptq", false),
        ("tiny-deepseek-v3-gptq-actorder", "int4_gptq", true),
        ("tiny-deepseek-v3-awq", "int4_awq", false),
    ] {
        let dir = fixtures_root().join(name);
        // kv_a_proj_with_mqa's 80 rows: neither library packs them.
        let mut plain = INT4_PLAIN.to_vec();
        plain.push("model.layers.1.self_attn.kv_a_proj_with_mqa.weight");
        let files = assert_int4_checkpoint(&dir, format, "qweight", &plain);
        let e = "model.layers.1.mlp.experts.3";
        let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
            .expect("model.safetensors");
        let words = |n: &str| -> Vec<u32> {
            let t = &tensors[n];
            assert_eq!(t.dtype(), DType::I32, "{n}");
            t.flatten_all()
                .and_then(|t| t.to_vec1::<i32>())
                .expect("words")
                .into_iter()
                .map(|w| w as u32)
                .collect()
        };
        let cfg = &files.config;
        let loader = files.loader(&Device::Cpu, DType::F32);
        let (h, inner) = (cfg.hidden_size, cfg.moe_intermediate_size);
        for (p, out, inp) in [
            ("gate_proj", inner, h),
            ("up_proj", inner, h),
            ("down_proj", h, inner),
        ] {
            let stem = format!("{e}.{p}");
            let scales: Vec<f32> = tensors[&format!("{stem}.scales")]
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1())
                .expect("scales");
            let (qweight, qzeros) = (
                words(&format!("{stem}.qweight")),
                words(&format!("{stem}.qzeros")),
            );
            if act_order {
                // GPTQ's own act order: the groups follow a permutation of the input columns
                // (the loader reads each row's group from g_idx; the GPU path dequantises such
                // layers at load, so there is no repacked layout to compare).
                let g_idx = words(&format!("{stem}.g_idx"));
                assert_eq!(g_idx.len(), inp);
                assert!(
                    g_idx.iter().enumerate().any(|(i, &g)| g as usize != i / 32),
                    "{name}: {stem} groups by position"
                );
                continue;
            }
            let repacked = if format == "int4_gptq" {
                gptq_to_tensor((inp, out, 32), &qweight, &qzeros, &scales, true)
            } else {
                awq_to_tensor((inp, out, 32), &qweight, &qzeros, &scales)
            }
            .expect("repack");
            let bits = |t: &Tensor| -> Vec<u32> {
                t.flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .expect("values")
                    .into_iter()
                    .map(f32::to_bits)
                    .collect()
            };
            let via_gpu_layout = repacked.dequantize(DType::F32).expect("dequantise");
            let loaded = loader
                .get(&format!("{stem}.weight"), &[out, inp])
                .expect("load");
            assert_eq!(bits(&via_gpu_layout), bits(&loaded), "{name}: {stem}");
        }
    }
}
