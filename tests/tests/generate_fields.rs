//! Issue 19's Generate fields end to end: penalties, min_p, stop_token_ids and min_new_tokens
//! through a real mesh (etcd, frontend, gate, expert worker) give exactly what the in-process
//! engine's host sampler gives, top_logprobs are the raw distribution's best as a full forward
//! pass in process computes it, and a bad value is INVALID_ARGUMENT naming the field and range.

use moemesh_proto::v1::generate_request::Input;
use moemesh_proto::v1::generation_client::GenerationClient;
use moemesh_proto::v1::{self, GenerateRequest};
use moemesh_tests::mesh::Mesh;
use moemesh_tests::{fixture, in_process_engine, reference_greedy};
use tonic::Code;

const MODEL: &str = "tiny-deepseek-v3";

async fn generate(url: &str, req: GenerateRequest) -> Result<(Vec<u32>, i32), tonic::Status> {
    let mut client = GenerationClient::connect(url.to_string())
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut stream = client.generate(req).await?.into_inner();
    let (mut ids, mut finish) = (Vec::new(), 0);
    while let Some(m) = stream.message().await? {
        ids.extend(m.token_ids);
        if m.finish_reason != 0 {
            finish = m.finish_reason;
        }
    }
    Ok((ids, finish))
}

/// One case as the wire and as the engine take it.
struct Case {
    sampling: v1::SamplingParams,
    stopping: v1::StoppingCriteria,
}

impl Case {
    fn wire(&self, prompt: &[u32]) -> GenerateRequest {
        GenerateRequest {
            input: Some(Input::Tokens(v1::TokenIds {
                ids: prompt.to_vec(),
            })),
            sampling: Some(self.sampling),
            stopping: Some(self.stopping.clone()),
            request_id: String::new(),
            cache_salt: String::new(),
        }
    }

    fn engine(&self, prompt: &[u32]) -> moemesh_engine::GenerationRequest {
        let s = &self.sampling;
        moemesh_engine::GenerationRequest {
            prompt_ids: prompt.to_vec(),
            sampling: moemesh_engine::SamplingParams {
                temperature: s.temperature,
                top_k: s.top_k as usize,
                top_p: s.top_p.unwrap_or(1.0),
                seed: s.seed,
                min_p: s.min_p.unwrap_or(0.0),
                repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
                presence_penalty: s.presence_penalty,
                frequency_penalty: s.frequency_penalty,
            },
            max_new_tokens: self.stopping.max_new_tokens.expect("set") as usize,
            stop: Vec::new(),
            ignore_eos: self.stopping.ignore_eos,
            stop_token_ids: self.stopping.stop_token_ids.clone(),
            min_new_tokens: self.stopping.min_new_tokens as usize,
            top_logprobs: 0,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn new_sampling_and_finish_fields_match_the_in_process_sampler() {
    let dir = fixture(MODEL);
    let mesh = Mesh::start(Some(&dir), &["0-15"]);
    let url = mesh.frontend_url();
    let engine = in_process_engine(MODEL);
    let (prompt, greedy) = reference_greedy(MODEL, 1);
    let n = greedy.len() as u32;
    let stopping = |stop_token_ids: Vec<u32>, min_new_tokens: u32| v1::StoppingCriteria {
        max_new_tokens: Some(n),
        ignore_eos: true,
        stop_token_ids,
        min_new_tokens,
        ..Default::default()
    };
    let penalised = v1::SamplingParams {
        repetition_penalty: Some(1.8),
        presence_penalty: 1.0,
        frequency_penalty: 0.5,
        ..Default::default()
    };
    // Greedy under penalties: the reference greedy text repeats tokens, so it must change.
    let case = Case {
        sampling: penalised,
        stopping: stopping(Vec::new(), 0),
    };
    let (ids, _) = generate(&url, case.wire(&prompt)).await.expect("penalised");
    let local = engine
        .generate(&case.engine(&prompt), &mut |_| true)
        .expect("in-process");
    assert_eq!(ids, local.token_ids, "penalised greedy, mesh vs in-process");
    assert_ne!(ids, greedy, "penalties changed nothing");

    // A stop id (the penalised text's 4th token) ends the sequence there with STOP, unless
    // min_new_tokens holds it off: then the pick avoids it for the first 4 tokens.
    let stop = ids[3];
    let first = ids.iter().position(|&t| t == stop).expect("present");
    let case = Case {
        sampling: penalised,
        stopping: stopping(vec![stop], 0),
    };
    let (got, finish) = generate(&url, case.wire(&prompt)).await.expect("stop id");
    assert_eq!(got, ids[..=first], "ends at the stop id");
    assert_eq!(finish, v1::FinishReason::Stop as i32);
    let case = Case {
        sampling: penalised,
        stopping: stopping(vec![stop], 4),
    };
    let (got, _) = generate(&url, case.wire(&prompt))
        .await
        .expect("min_new_tokens");
    assert!(got.len() > 4, "{got:?}");
    assert!(!got[..4].contains(&stop), "{got:?} picked {stop} early");
    let local = engine
        .generate(&case.engine(&prompt), &mut |_| true)
        .expect("in-process");
    assert_eq!(got, local.token_ids, "min_new_tokens, mesh vs in-process");

    // Seeded sampling with min_p and penalties: the same tokens as in process, every time.
    let case = Case {
        sampling: v1::SamplingParams {
            temperature: 0.9,
            seed: Some(5),
            min_p: Some(0.05),
            frequency_penalty: 1.0,
            repetition_penalty: Some(1.2),
            ..Default::default()
        },
        stopping: stopping(Vec::new(), 0),
    };
    let (a, _) = generate(&url, case.wire(&prompt)).await.expect("seeded");
    let (b, _) = generate(&url, case.wire(&prompt))
        .await
        .expect("seeded again");
    assert_eq!(a, b);
    let local = engine
        .generate(&case.engine(&prompt), &mut |_| true)
        .expect("in-process");
    assert_eq!(
        a, local.token_ids,
        "seeded min_p + penalties, mesh vs in-process"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_new_fields_are_invalid_argument_naming_field_and_range() {
    let mesh = Mesh::start(None, &["0-15"]);
    let url = mesh.frontend_url();
    let base = GenerateRequest {
        input: Some(Input::Tokens(v1::TokenIds { ids: vec![5, 6] })),
        sampling: Some(v1::SamplingParams::default()),
        stopping: Some(v1::StoppingCriteria {
            max_new_tokens: Some(4),
            ..Default::default()
        }),
        request_id: String::new(),
        cache_salt: String::new(),
    };
    type Edit = dyn Fn(&mut GenerateRequest);
    let cases: Vec<(&Edit, &[&str])> = vec![
        (
            &|r| r.sampling.as_mut().expect("s").min_p = Some(1.5),
            &["sampling.min_p", "[0, 1]"],
        ),
        (
            &|r| r.sampling.as_mut().expect("s").repetition_penalty = Some(0.0),
            &["sampling.repetition_penalty", "(0, 2]"],
        ),
        (
            &|r| r.sampling.as_mut().expect("s").presence_penalty = 2.5,
            &["sampling.presence_penalty", "[-2, 2]"],
        ),
        (
            &|r| r.sampling.as_mut().expect("s").frequency_penalty = -3.0,
            &["sampling.frequency_penalty", "[-2, 2]"],
        ),
        (
            &|r| r.stopping.as_mut().expect("s").stop_token_ids = vec![1, 129_280],
            &["stopping.stop_token_ids[1]", "129280"],
        ),
        (
            &|r| r.stopping.as_mut().expect("s").stop_token_ids = vec![1; 65],
            &["stopping.stop_token_ids", "at most 64"],
        ),
        (
            &|r| r.stopping.as_mut().expect("s").min_new_tokens = 5,
            &["stopping.min_new_tokens", "max_new_tokens (4)"],
        ),
        (
            &|r| r.sampling.as_mut().expect("s").top_logprobs = 21,
            &["sampling.top_logprobs", "at most 20"],
        ),
    ];
    for (edit, needles) in cases {
        let mut req = base.clone();
        edit(&mut req);
        let err = generate(&url, req).await.expect_err("must be rejected");
        assert_eq!(err.code(), Code::InvalidArgument, "{needles:?}: {err:?}");
        for n in needles {
            assert!(err.message().contains(n), "{needles:?}: {}", err.message());
        }
    }
    generate(&url, base)
        .await
        .expect("a good request after the bad ones");
}

/// The raw log-softmax of the next token after `ids`, from a full forward pass in process (f64).
fn raw_logprobs(engine: &moemesh_engine::InProcessEngine, ids: &[u32]) -> Vec<f64> {
    let model = &engine.model;
    let out = model
        .forward_sequence(ids, &engine.experts, |_, _| {})
        .expect("forward");
    let logits = model.logits(&out).expect("logits");
    let rows: Vec<Vec<f32>> = logits.to_vec2().expect("rows");
    let last = rows.last().expect("a row");
    let max = last.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = last.iter().map(|&v| f64::from(v - max).exp()).sum();
    last.iter()
        .map(|&v| f64::from(v - max) - sum.ln())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn top_logprobs_are_the_raw_distributions_best_at_each_position() {
    let dir = fixture(MODEL);
    let mesh = Mesh::start(Some(&dir), &["0-15"]);
    let engine = in_process_engine(MODEL);
    let (prompt, greedy) = reference_greedy(MODEL, 1);
    let mut client = GenerationClient::connect(mesh.frontend_url())
        .await
        .expect("connect");
    // Greedy and seeded sampling: each token comes with its 5 best alternatives.
    for sampling in [
        v1::SamplingParams {
            top_logprobs: 5,
            ..Default::default()
        },
        v1::SamplingParams {
            top_logprobs: 5,
            temperature: 1.0,
            seed: Some(3),
            ..Default::default()
        },
    ] {
        let req = GenerateRequest {
            input: Some(Input::Tokens(v1::TokenIds {
                ids: prompt.clone(),
            })),
            sampling: Some(sampling),
            stopping: Some(v1::StoppingCriteria {
                max_new_tokens: Some(6),
                ignore_eos: true,
                ..Default::default()
            }),
            request_id: String::new(),
            cache_salt: String::new(),
        };
        let mut stream = client.generate(req).await.expect("accepted").into_inner();
        let mut ids = prompt.clone();
        while let Some(m) = stream.message().await.expect("stream") {
            assert_eq!(m.top_logprobs.len(), m.token_ids.len(), "{m:?}");
            for ((&token, &logprob), top) in
                m.token_ids.iter().zip(&m.logprobs).zip(&m.top_logprobs)
            {
                let want = raw_logprobs(&engine, &ids);
                assert_eq!(top.token_ids.len(), 5);
                // Best first, each the raw log-softmax of its id, and nothing better left out
                // (bf16 activations on the wire: a small tolerance).
                let tol = 2e-2;
                for w in top.logprobs.windows(2) {
                    assert!(w[0] >= w[1], "{top:?}");
                }
                for (&id, &lp) in top.token_ids.iter().zip(&top.logprobs) {
                    let r = want[id as usize];
                    assert!((f64::from(lp) - r).abs() < tol, "id {id}: {lp} vs {r}");
                }
                let mut sorted = want.clone();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let worst = f64::from(top.logprobs[4]);
                assert!(
                    sorted[4] < worst + tol,
                    "the 5th best is {}, got {worst}",
                    sorted[4]
                );
                // The picked token's logprob is its entry when it is among them.
                if let Some(i) = top.token_ids.iter().position(|&t| t == token) {
                    assert_eq!(top.logprobs[i], logprob);
                }
                if sampling.temperature == 0.0 {
                    assert_eq!(top.token_ids[0], token, "greedy picks the best");
                }
                ids.push(token);
            }
        }
        assert_eq!(ids.len(), prompt.len() + 6);
        if sampling.temperature == 0.0 {
            assert_eq!(
                ids[prompt.len()..],
                greedy[..6],
                "alternatives change no pick"
            );
        }
    }
    drop(mesh);
}
