//! The prefix cache over the real forward pass (the tiny DeepSeek-V3 fixture, f32 on the CPU):
//! a sequence whose prompt starts like an earlier one takes the earlier one's full KV blocks
//! and computes only the rest, and decodes exactly as it does with the cache off; a small pool
//! evicts the least recently used cached blocks; salts keep chains apart.

use std::path::Path;

use candle_core::{DType, Device};
use moemesh_engine::serving::{SlotSpec, StepRunner};
use moemesh_engine::{InProcessEngine, ModelFiles, SamplerStart};

fn load() -> InProcessEngine {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-deepseek-v3");
    let files = ModelFiles::open(&dir).expect("fixture");
    InProcessEngine::load(&files, &Device::Cpu, DType::F32).expect("load f32")
}

/// What one greedy generation gave: its tokens, their log-probabilities and the prompt tokens
/// taken from the cache.
#[derive(Debug)]
struct Run {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    cached: usize,
}

/// Prefills `prompt` in `chunks` (sizes adding up to its length), decodes `new` tokens greedily
/// and releases the sequence.
fn generate(
    runner: &mut StepRunner<u64>,
    engine: &InProcessEngine,
    key: u64,
    prompt: &[u32],
    chunks: &[usize],
    salt: Option<[u8; 32]>,
    new: usize,
) -> Run {
    assert_eq!(chunks.iter().sum::<usize>(), prompt.len());
    let slot = |start, tokens, sample| SlotSpec {
        key,
        start,
        tokens,
        sample,
        sampling: Some(SamplerStart::default()),
        cache_salt: salt,
        prompt_logprobs: None,
        allowed: None,
    };
    let mut run = Run {
        tokens: Vec::new(),
        logprobs: Vec::new(),
        cached: 0,
    };
    let mut at = 0;
    for (i, &n) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let out = runner
            .step_ids(&[slot(at, n, last)], &prompt[at..at + n], &engine.experts)
            .expect("prefill step");
        run.cached += runner
            .take_prefix_hits()
            .iter()
            .map(|&(_, t)| t)
            .sum::<usize>();
        at += n;
        if last {
            run.tokens.push(out[0].token);
            run.logprobs.push(out[0].logprob);
        }
    }
    while run.tokens.len() < new {
        let prev = *run.tokens.last().expect("a token");
        let out = runner
            .step_ids(&[slot(at, 1, true)], &[prev], &engine.experts)
            .expect("decode step");
        assert!(
            runner.take_prefix_hits().is_empty(),
            "a decode takes no block"
        );
        at += 1;
        run.tokens.push(out[0].token);
        run.logprobs.push(out[0].logprob);
    }
    runner.release(&key);
    run
}

fn runner(engine: &InProcessEngine, blocks: usize, on: bool) -> StepRunner<u64> {
    let mut r = StepRunner::with_blocks(engine.model.clone(), blocks).expect("runner");
    r.set_prefix_cache(on, "tiny-deepseek-v3");
    r
}

fn assert_same(cached: &Run, plain: &Run, what: &str) {
    assert_eq!(cached.tokens, plain.tokens, "{what}: greedy tokens");
    for (a, b) in cached.logprobs.iter().zip(&plain.logprobs) {
        assert!((a - b).abs() < 1e-4, "{what}: logprob {a} vs {b}");
    }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|k| 3 + (seed + 7 * k) % 90).collect()
}

#[test]
fn prompts_sharing_a_prefix_reuse_its_full_blocks_and_decode_as_without_the_cache() {
    let engine = load();
    let a = prompt(1, 40);
    // Shares 36 tokens with `a`, then differs in the middle of its third block.
    let mut b = a[..36].to_vec();
    b.extend(prompt(50, 9));
    let cases: Vec<(&str, Vec<u32>, Vec<usize>, usize)> = vec![
        ("a, first", a.clone(), vec![40], 0),
        // Two full blocks shared; the third differs mid-block and is computed.
        ("b, differs mid-block", b.clone(), vec![45], 32),
        // The same prompt again: its two full blocks, never the last row (that gives logits).
        ("a, again", a.clone(), vec![40], 32),
        // Exactly two blocks: only the first may come from the cache.
        ("a's first 32", a[..32].to_vec(), vec![32], 16),
    ];
    let mut on = runner(&engine, 64, true);
    let mut off = runner(&engine, 64, false);
    for (key, (what, p, chunks, hit)) in cases.iter().enumerate() {
        let c = generate(&mut on, &engine, key as u64, p, chunks, None, 6);
        let u = generate(&mut off, &engine, key as u64, p, chunks, None, 6);
        assert_eq!(c.cached, *hit, "{what}: cached tokens");
        assert_eq!(u.cached, 0, "{what}: the cache is off");
        assert_same(&c, &u, what);
    }
    let s = on.prefix_stats();
    assert_eq!(s.hit_blocks, 5);
    assert_eq!(off.prefix_stats().hit_blocks, 0);
    // Every sequence left: every block is available again (cached ones included).
    assert_eq!(on.kv().free_blocks, 64);
}

#[test]
fn chunked_prefills_take_cached_blocks_at_every_block_aligned_chunk() {
    let engine = load();
    let p = prompt(3, 70);
    let mut on = runner(&engine, 64, true);
    let mut off = runner(&engine, 64, false);
    // Unaligned chunks fill and register four blocks.
    let first = generate(&mut on, &engine, 1, &p, &[20, 20, 30], None, 4);
    assert_eq!(first.cached, 0);
    // Chunk 1 (0..32) takes one block and computes its last; chunk 2 starts on a block boundary
    // and takes two more (32..64), computing 64..70.
    let second = generate(&mut on, &engine, 2, &p, &[32, 38], None, 4);
    assert_eq!(second.cached, 48);
    let plain = generate(&mut off, &engine, 2, &p, &[32, 38], None, 4);
    assert_same(&first, &plain, "first");
    assert_same(&second, &plain, "second");
}

#[test]
fn a_small_pool_evicts_the_least_recently_used_cached_blocks_only_when_it_needs_room() {
    let engine = load();
    let a = prompt(1, 40);
    let other = prompt(9, 70);
    let mut on = runner(&engine, 6, true);
    let mut off = runner(&engine, 6, false);
    // `a` leaves two cached blocks (its third is partial, so freed).
    generate(&mut on, &engine, 1, &a, &[40], None, 2);
    assert_eq!(on.prefix_stats().cached_blocks, 2);
    assert_eq!(on.kv().free_blocks, 6);
    // 70 + 2 tokens need 5 blocks: 4 are free, so one cached block goes: `a`'s tail block (a
    // sequence's blocks are released tail first).
    generate(&mut on, &engine, 2, &other, &[70], None, 2);
    assert_eq!(on.prefix_stats().evictions, 1);
    // `a` again: only its first block is still cached.
    let again = generate(&mut on, &engine, 3, &a, &[40], None, 4);
    assert_eq!(again.cached, 16);
    let plain = generate(&mut off, &engine, 3, &a, &[40], None, 4);
    assert_same(&again, &plain, "a after eviction");
}

#[test]
fn salted_sequences_never_take_each_others_blocks() {
    let engine = load();
    let a = prompt(1, 40);
    let (x, y) = (Some([1u8; 32]), Some([2u8; 32]));
    let mut on = runner(&engine, 64, true);
    assert_eq!(generate(&mut on, &engine, 1, &a, &[40], x, 2).cached, 0);
    assert_eq!(generate(&mut on, &engine, 2, &a, &[40], y, 2).cached, 0);
    assert_eq!(generate(&mut on, &engine, 3, &a, &[40], None, 2).cached, 0);
    assert_eq!(generate(&mut on, &engine, 4, &a, &[40], x, 2).cached, 32);
    assert_eq!(generate(&mut on, &engine, 5, &a, &[40], y, 2).cached, 32);
    assert_eq!(generate(&mut on, &engine, 6, &a, &[40], None, 2).cached, 32);
}

/// A sequence that asks for prompt logprobs computes every prompt row (it takes no cached
/// block: a cached row has no logits, and vLLM recomputes such prompts too), gets the same
/// logprobs as when nothing was cached, and leaves its blocks cached for sequences that do not
/// ask.
#[test]
fn a_sequence_asking_for_prompt_logprobs_takes_nothing_from_the_cache() {
    use moemesh_engine::serving::PromptAsk;
    let engine = load();
    let p = prompt(4, 40);
    let mut on = runner(&engine, 64, true);
    let slot = |key, asks: bool| SlotSpec {
        key,
        start: 0,
        tokens: p.len(),
        sample: true,
        sampling: Some(SamplerStart::default()),
        cache_salt: None,
        prompt_logprobs: asks.then(|| PromptAsk {
            top: 2,
            targets: p[1..].to_vec(),
        }),
        allowed: None,
    };
    let mut run = |key, asks| {
        on.step_ids(&[slot(key, asks)], &p, &engine.experts)
            .expect("prefill");
        let hits: usize = on.take_prefix_hits().iter().map(|h| h.1).sum();
        let lps = on.take_prompt_logprobs();
        on.release(&key);
        (hits, lps)
    };
    let (hits, cold) = run(0, true);
    assert_eq!(hits, 0);
    assert_eq!(cold.len(), 1);
    assert_eq!(cold[0].0, 0);
    assert_eq!(cold[0].1.len(), p.len() - 1);
    // The blocks are cached: a sequence that does not ask takes its two full ones.
    let (hits, none) = run(1, false);
    assert_eq!(hits, 32);
    assert!(none.is_empty(), "{none:?}");
    // One that asks computes them all again, to the same logprobs.
    let (hits, warm) = run(2, true);
    assert_eq!(hits, 0);
    assert_eq!(warm[0].1, cold[0].1);
}

/// A host-memory tier keeps the blocks a small pool evicts: a prompt whose blocks went there
/// takes them back instead of computing them, and decodes exactly as the same prompt does
/// when its blocks never left the pool (the copies are exact), and as with the cache off.
#[test]
fn blocks_evicted_to_the_host_tier_come_back_exactly() {
    let engine = load();
    let a = prompt(1, 40);
    let other = prompt(9, 70);
    let mut tiered = runner(&engine, 6, true);
    tiered.set_host_tier(1 << 20);
    assert!(tiered.host_tier_blocks() >= 8, "1 MiB holds several blocks");
    let mut roomy = runner(&engine, 64, true);
    let mut off = runner(&engine, 6, false);
    generate(&mut tiered, &engine, 1, &a, &[40], None, 2);
    generate(&mut roomy, &engine, 1, &a, &[40], None, 2);
    // Needs 5 of 6 blocks: `a`'s tail block leaves the pool for the host tier.
    generate(&mut tiered, &engine, 2, &other, &[70], None, 2);
    let s = tiered.prefix_stats();
    assert_eq!((s.evictions, s.host.blocks), (1, 1));
    assert!(s.host.bytes_to_host > 0);
    // `a` again: its first block from the pool, its second back from the host tier.
    let again = generate(&mut tiered, &engine, 3, &a, &[40], None, 6);
    assert_eq!(again.cached, 32);
    let s = tiered.prefix_stats();
    assert_eq!(s.host.hit_blocks, 1);
    assert_eq!(
        s.host.bytes_to_device,
        s.host.bytes_to_host / s.host.blocks.max(1)
    );
    let pooled = generate(&mut roomy, &engine, 3, &a, &[40], None, 6);
    assert_eq!(pooled.cached, 32);
    assert_eq!(again.tokens, pooled.tokens, "tokens as from the pool");
    assert_eq!(
        again.logprobs, pooled.logprobs,
        "bit-identical log-probabilities"
    );
    let cold = generate(&mut off, &engine, 3, &a, &[40], None, 6);
    assert_same(&again, &cold, "a from the host tier vs the cache off");
}

/// A sequence the frontend preempted is prefilled again from its prompt and generated tokens:
/// the full blocks it had written come back from the host tier once the pool has evicted them.
#[test]
fn a_preempted_sequence_takes_its_blocks_back_from_the_host_tier() {
    let engine = load();
    let a = prompt(3, 30);
    let mut tiered = runner(&engine, 5, true);
    tiered.set_host_tier(1 << 20);
    let mut off = runner(&engine, 5, false);
    // 30 prompt tokens and 20 generated: three full blocks written, then released (preempted).
    let first = generate(&mut tiered, &engine, 1, &a, &[30], None, 20);
    let mut resumed: Vec<u32> = a.clone();
    resumed.extend(&first.tokens[..19]);
    // Another sequence takes the whole pool: every cached block goes to the host tier.
    generate(&mut tiered, &engine, 2, &prompt(8, 70), &[70], None, 2);
    assert_eq!(tiered.prefix_stats().host.blocks, 3);
    let again = generate(&mut tiered, &engine, 3, &resumed, &[49], None, 4);
    assert_eq!(again.cached, 48, "three blocks back from the host tier");
    let cold = generate(&mut off, &engine, 3, &resumed, &[49], None, 4);
    assert_same(&again, &cold, "resumed from the host tier");
    assert_eq!(
        again.tokens[0], first.tokens[19],
        "continues as before the preemption"
    );
}
