//! Issue 19's Generate fields end to end: penalties, min_p, stop_token_ids and min_new_tokens
//! through a real mesh (etcd, frontend, gate, expert worker) give exactly what the in-process
//! engine's host sampler gives, top_logprobs are the raw distribution's best as a full forward
//! pass in process computes it, prompt logprobs are the log-softmax of a full forward pass over
//! the prompt (chunked prefill, past a warm prefix cache), and a bad value is INVALID_ARGUMENT
//! naming the field and range.

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
            sampling: Some(self.sampling.clone()),
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
            prompt_logprobs: None,
            constraint: None,
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
        sampling: penalised.clone(),
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
        sampling: penalised.clone(),
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
        (
            &|r| r.sampling.as_mut().expect("s").prompt_logprobs = Some(21),
            &["sampling.prompt_logprobs", "at most 20"],
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
            sampling: Some(sampling.clone()),
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

/// The log-softmax of every position's next-token logits over `ids`, from a full forward pass
/// in process (f64): row `i` is the distribution of token `i + 1`.
fn all_logprobs(engine: &moemesh_engine::InProcessEngine, ids: &[u32]) -> Vec<Vec<f64>> {
    let model = &engine.model;
    let out = model
        .forward_sequence(ids, &engine.experts, |_, _| {})
        .expect("forward");
    let rows: Vec<Vec<f32>> = model.logits(&out).expect("logits").to_vec2().expect("rows");
    rows.iter()
        .map(|row| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
            row.iter().map(|&v| f64::from(v - max) - sum.ln()).collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn prompt_logprobs_are_a_full_forward_passs_log_softmax_chunked_and_past_the_cache() {
    let dir = fixture(MODEL);
    // Steps of 20 tokens: the 100-token prompt is prefilled in block-aligned chunks of 16.
    let mesh = Mesh::start_with(
        Some(&dir),
        &["0-15"],
        &["--step-token-budget", "20", "--max-running", "8"],
    );
    let engine = in_process_engine(MODEL);
    let (prompt, _) = reference_greedy(MODEL, 3);
    assert_eq!(prompt.len(), 100);
    let want = all_logprobs(&engine, &prompt);
    let mut client = GenerationClient::connect(mesh.frontend_url())
        .await
        .expect("connect");
    let req = |prompt_logprobs: Option<u32>, n: u32| GenerateRequest {
        input: Some(Input::Tokens(v1::TokenIds {
            ids: prompt.clone(),
        })),
        sampling: Some(v1::SamplingParams {
            prompt_logprobs,
            n,
            ..Default::default()
        }),
        stopping: Some(v1::StoppingCriteria {
            max_new_tokens: Some(2),
            ignore_eos: true,
            ..Default::default()
        }),
        request_id: String::new(),
        cache_salt: String::new(),
    };
    // The prompt's blocks go into the gate's prefix cache, and a request without prompt
    // logprobs takes them.
    let plain = client
        .complete(req(None, 1))
        .await
        .expect("plain")
        .into_inner();
    assert!(plain.choices[0].prompt_logprobs.is_empty());
    let again = client
        .complete(req(None, 1))
        .await
        .expect("again")
        .into_inner();
    let cached = again.usage.expect("usage").cached_prompt_tokens;
    // (Chunks of one block each keep their last row to compute, so few blocks are taken.)
    assert!(cached > 0, "the prompt's blocks are cached");

    // Two choices: choice 0's first message carries the prompt logprobs, computed from every
    // row (nothing from the cache); choice 1's messages carry none.
    let mut stream = client
        .generate(req(Some(3), 2))
        .await
        .expect("accepted")
        .into_inner();
    let mut got: Vec<Vec<v1::PromptLogprob>> = vec![Vec::new(), Vec::new()];
    let mut first = [true, true];
    let mut cached = [u32::MAX, u32::MAX];
    while let Some(m) = stream.message().await.expect("stream") {
        let i = m.index as usize;
        if !first[i] || i == 1 {
            assert!(m.prompt_logprobs.is_empty(), "choice {i}: {m:?}");
        }
        first[i] = false;
        got[i].extend(m.prompt_logprobs);
        if let Some(u) = m.usage {
            cached[i] = u.cached_prompt_tokens;
        }
    }
    assert_eq!(
        cached[0], 0,
        "a request for prompt logprobs computes its whole prompt"
    );
    let lps = &got[0];
    assert_eq!(lps.len(), prompt.len() - 1);
    // bf16 activations on the wire between frontend and gate: a small tolerance.
    let tol = 2e-2;
    for (i, lp) in lps.iter().enumerate() {
        let row = &want[i];
        let t = prompt[i + 1];
        assert_eq!(lp.token_id, t, "position {}", i + 1);
        let r = row[t as usize];
        assert!(
            (f64::from(lp.logprob) - r).abs() < tol,
            "position {}: {} vs {r}",
            i + 1,
            lp.logprob
        );
        let surely_above = row.iter().filter(|&&w| w > r + tol).count() as u32;
        let maybe_above = row.iter().filter(|&&w| w > r - tol).count() as u32 - 1;
        assert!(
            (surely_above + 1..=maybe_above + 1).contains(&lp.rank),
            "position {}: rank {} vs {}..={}",
            i + 1,
            lp.rank,
            surely_above + 1,
            maybe_above + 1
        );
        let top = lp.top.as_ref().expect("alternatives");
        assert_eq!(top.token_ids.len(), 3);
        let mut sorted = row.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        for (k, (&id, &l)) in top.token_ids.iter().zip(&top.logprobs).enumerate() {
            assert!((f64::from(l) - row[id as usize]).abs() < tol, "{id}: {l}");
            assert!(
                (row[id as usize] - sorted[k]).abs() < 2.0 * tol,
                "alternative {k}"
            );
        }
    }
    // Complete gathers the same, on choice 0.
    let whole = client
        .complete(req(Some(3), 1))
        .await
        .expect("complete")
        .into_inner();
    assert_eq!(whole.choices[0].prompt_logprobs.len(), prompt.len() - 1);
    for (a, b) in whole.choices[0].prompt_logprobs.iter().zip(lps) {
        assert_eq!(a.token_id, b.token_id);
        assert!((a.logprob - b.logprob).abs() < 1e-3, "{a:?} vs {b:?}");
    }
    drop(mesh);
}

/// A request whose output is constrained, as the wire takes it.
fn constrained(kind: v1::constraint::Kind, sampling: v1::SamplingParams) -> GenerateRequest {
    GenerateRequest {
        input: Some(Input::Prompt("Answer:".into())),
        sampling: Some(v1::SamplingParams {
            constraint: Some(v1::Constraint { kind: Some(kind) }),
            ..sampling
        }),
        stopping: Some(v1::StoppingCriteria {
            max_new_tokens: Some(48),
            ..Default::default()
        }),
        request_id: String::new(),
        cache_salt: String::new(),
    }
}

/// Generates to the end: the text and the finish reason.
async fn text_of(url: &str, req: GenerateRequest) -> Result<(String, i32), tonic::Status> {
    let mut client = GenerationClient::connect(url.to_string())
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut stream = client.generate(req).await?.into_inner();
    let (mut text, mut finish) = (String::new(), 0);
    while let Some(m) = stream.message().await? {
        text.push_str(&m.text);
        if m.finish_reason != 0 {
            finish = m.finish_reason;
        }
    }
    Ok((text, finish))
}

/// Constrained decoding through the mesh, on the embedded model (random weights and the R1
/// tokenizer, so nothing but the token mask keeps its output in shape): a regex-constrained and
/// a JSON-schema-constrained generation, greedy and sampled, end with EOS on text that matches
/// the regex / is an instance of the schema; a bad regex or schema is INVALID_ARGUMENT naming
/// the field, and so are the fields a constraint cannot be combined with.
#[tokio::test(flavor = "multi_thread")]
async fn constrained_output_matches_its_regex_or_schema() {
    use v1::constraint::Kind;
    let mesh = Mesh::start(None, &["0-15"]);
    let url = mesh.frontend_url();
    let greedy = v1::SamplingParams::default();
    let sampled = v1::SamplingParams {
        temperature: 1.0,
        seed: Some(11),
        ..Default::default()
    };
    for sampling in [greedy, sampled] {
        let (text, finish) = text_of(
            &url,
            constrained(Kind::Regex("[0-9]{3}-[0-9]{4}".into()), sampling.clone()),
        )
        .await
        .expect("regex");
        let b = text.as_bytes();
        assert!(
            b.len() == 8
                && b[3] == b'-'
                && b.iter()
                    .enumerate()
                    .all(|(i, c)| i == 3 || c.is_ascii_digit()),
            "{text:?} does not match [0-9]{{3}}-[0-9]{{4}}"
        );
        assert_eq!(finish, v1::FinishReason::Eos as i32, "{text:?}");

        let schema = r#"{"type":"object","properties":{"answer":{"enum":["yes","no"]},"score":{"type":"integer","minimum":0,"maximum":9}},"required":["answer","score"],"additionalProperties":false}"#;
        let (text, finish) = text_of(
            &url,
            constrained(Kind::JsonSchema(schema.into()), sampling.clone()),
        )
        .await
        .expect("schema");
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"));
        let o = v.as_object().expect("an object");
        assert_eq!(o.len(), 2, "{text}");
        assert!(matches!(o["answer"].as_str(), Some("yes" | "no")), "{text}");
        assert!(o["score"].as_u64().is_some_and(|s| s <= 9), "{text}");
        assert_eq!(finish, v1::FinishReason::Eos as i32, "{text:?}");
    }

    // Bad constraints, and what a constraint cannot be combined with.
    let cases: Vec<(GenerateRequest, &[&str])> = vec![
        (
            constrained(Kind::JsonSchema("{not json".into()), Default::default()),
            &["sampling.constraint.json_schema", "not valid JSON"],
        ),
        (
            constrained(
                Kind::JsonSchema(r#"{"type":"no-such-type"}"#.into()),
                Default::default(),
            ),
            &["sampling.constraint.json_schema"],
        ),
        (
            constrained(Kind::Regex("(unclosed".into()), Default::default()),
            &["sampling.constraint.regex"],
        ),
        (
            {
                let mut r = constrained(Kind::Regex("a".into()), Default::default());
                r.stopping.as_mut().expect("set").ignore_eos = true;
                r
            },
            &["stopping.ignore_eos", "sampling.constraint.regex"],
        ),
    ];
    for (req, needles) in cases {
        let err = text_of(&url, req).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{needles:?}: {err:?}");
        for n in needles {
            assert!(err.message().contains(n), "{needles:?}: {}", err.message());
        }
        let field = tonic_types::StatusExt::get_details_bad_request(&err)
            .and_then(|b| b.field_violations.into_iter().next())
            .map(|v| v.field);
        assert_eq!(field.as_deref(), Some(needles[0]), "{err:?}");
    }
    drop(mesh);
}
