//! Issue 19's Generate fields end to end: penalties, min_p, stop_token_ids and min_new_tokens
//! through a real mesh (etcd, frontend, gate, expert worker) give exactly what the in-process
//! engine's host sampler gives, and a bad value is INVALID_ARGUMENT naming the field and range.

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
