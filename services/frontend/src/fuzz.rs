//! Fuzz harness for the frontend's request validator: a `GenerateRequest` off the wire (decoded
//! from arbitrary bytes, or built from them field by field) goes through the same validation,
//! tokenization, chat templating and stop-string setup as `Generate` does, with the embedded
//! model's tokenizer and small limits. Nothing may panic; a rejection must be INVALID_ARGUMENT;
//! what is accepted must be within every limit.
//!
//! `cargo fuzz` drives it (`fuzz/`, nightly); the test below runs it on seeded random inputs on
//! stable. Built for tests and with the `fuzzing` feature only.

use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use clap::Parser;
use moemesh_common::MeshError;
use moemesh_common::fuzz::Outcome;
use moemesh_engine::serving::SequenceDecoder;
use moemesh_engine::text::TextTokenizer;
use moemesh_engine::{ModelConfig, ModelFiles};
use moemesh_proto::v1::{self, generate_request::Input};
use prost::Message;

use crate::FrontendConfig;

/// The limits the harness validates against (small, so that the fuzzer reaches them).
const ARGS: [&str; 11] = [
    "frontend",
    "--gate-addrs",
    "127.0.0.1:1",
    "--max-prompt-bytes",
    "2048",
    "--max-stop-sequences",
    "4",
    "--max-stop-bytes",
    "16",
    "--max-new-tokens-limit",
    "64",
];

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    cfg: FrontendConfig,
}

struct Fixture {
    cfg: FrontendConfig,
    model: ModelConfig,
    tokenizer: Option<TextTokenizer>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let cfg = Args::try_parse_from(ARGS)
            .expect("the harness's flags parse")
            .cfg;
        let files = ModelFiles::open_or_embedded(None).expect("the embedded model opens");
        Fixture {
            cfg,
            model: files.config,
            tokenizer: files.tokenizer,
        }
    })
}

/// One `Generate` request, from arbitrary bytes.
pub fn generate_request(data: &[u8]) -> Outcome {
    let f = fixture();
    let mut u = Unstructured::new(data);
    let req = match u.arbitrary::<bool>() {
        Ok(true) => v1::GenerateRequest::decode(u.take_rest()).ok(),
        Ok(false) => request_from(&mut u).ok(),
        Err(_) => None,
    };
    let Some(req) = req else {
        return Outcome::Skipped;
    };
    let out = crate::request::to_engine_request(&req, &f.cfg, &f.model, f.tokenizer.as_ref(), 7);
    let out = match out {
        Ok((out, _rendered)) => out,
        Err(e) => return rejected(e),
    };
    let vocab = f.model.vocab_size;
    assert!(!out.prompt_ids.is_empty());
    assert!(out.prompt_ids.len() < f.model.max_position_embeddings);
    assert!(out.prompt_ids.iter().all(|&id| (id as usize) < vocab));
    assert!((1..=f.cfg.max_new_tokens_limit as usize).contains(&out.max_new_tokens));
    assert!(out.stop.len() <= f.cfg.max_stop_sequences);
    assert!(out.stop.iter().all(|s| s.len() <= f.cfg.max_stop_bytes));
    assert!(req.request_id.len() <= crate::request::MAX_REQUEST_ID_BYTES);
    assert!(out.sampling.validate(vocab).is_ok());
    assert!(out.stop_token_ids.iter().all(|&id| (id as usize) < vocab));
    assert!(out.min_new_tokens <= out.max_new_tokens);
    assert!(out.top_logprobs <= moemesh_engine::logprobs::MAX_TOP_LOGPROBS);
    if let Some(top) = out.prompt_logprobs {
        use moemesh_engine::logprobs::{MAX_PROMPT_LOGPROB_ENTRIES, MAX_TOP_LOGPROBS};
        assert!(top <= MAX_TOP_LOGPROBS);
        assert!((out.prompt_ids.len() - 1) * (top + 1) <= MAX_PROMPT_LOGPROB_ENTRIES);
    }
    assert!((1..=crate::request::MAX_CHOICES).contains(&crate::request::choices(&req)));
    let context = f.model.max_position_embeddings;
    match SequenceDecoder::new(&out, f.tokenizer.as_ref(), Vec::new().into(), context) {
        Ok(_) => Outcome::Accepted,
        Err(e) => rejected(MeshError::from(e)),
    }
}

fn rejected(e: MeshError) -> Outcome {
    let status = tonic::Status::from(e);
    assert_eq!(
        status.code(),
        tonic::Code::InvalidArgument,
        "{}",
        status.message()
    );
    assert!(!status.message().is_empty());
    Outcome::Rejected
}

/// A string: usually short, drawn from text the tokenizer and template find interesting.
fn text(u: &mut Unstructured) -> Result<String> {
    const PIECES: [&str; 10] = [
        "Hello",
        " world",
        "<｜User｜>",
        "<｜end▁of▁sentence｜>",
        "{{ messages }}",
        "{% if %}",
        "é",
        "🦀",
        "\u{0}",
        "\n",
    ];
    let mut s = String::new();
    for _ in 0..u.int_in_range(0..=4)? {
        if u.ratio(3, 4)? {
            s.push_str(u.choose(&PIECES)?);
        } else {
            s.push_str(&u.arbitrary::<String>()?);
        }
    }
    Ok(s)
}

/// A number from `usual` most of the time, anything otherwise (NaN and infinities included).
fn pick<'a, T: arbitrary::Arbitrary<'a> + Copy>(
    u: &mut Unstructured<'a>,
    usual: &[T],
) -> Result<T> {
    if u.ratio(7, 8)? {
        u.choose(usual).copied()
    } else {
        u.arbitrary()
    }
}

fn request_from(u: &mut Unstructured) -> Result<v1::GenerateRequest> {
    let vocab = fixture().model.vocab_size as u32;
    let input = match u.int_in_range(0..=9)? {
        0 => None,
        1..=3 => Some(Input::Prompt(text(u)?)),
        4..=5 => {
            let n = u.int_in_range(0..=4)?;
            let mut messages = Vec::with_capacity(n);
            for _ in 0..n {
                let role = if u.ratio(3, 4)? {
                    u.choose(&["user", "assistant", "system", "tool"])?
                        .to_string()
                } else {
                    text(u)?
                };
                messages.push(v1::ChatMessage {
                    role,
                    content: text(u)?,
                });
            }
            Some(Input::Chat(v1::ChatInput { messages }))
        }
        _ => {
            let n = u.int_in_range(0..=40)?;
            let mut ids: Vec<u32> = (0..n)
                .map(|_| u.int_in_range(0..=vocab - 1))
                .collect::<Result<_>>()?;
            if u.ratio(1, 8)? {
                ids.push(u.arbitrary()?);
            }
            Some(Input::Tokens(v1::TokenIds { ids }))
        }
    };
    let sampling = if u.arbitrary()? {
        Some(v1::SamplingParams {
            temperature: pick(u, &[0.0, 0.7, 1.0])?,
            top_p: if u.arbitrary()? {
                Some(pick(u, &[0.9, 1.0])?)
            } else {
                None
            },
            top_k: pick(u, &[0, 1, 50])?,
            seed: u.arbitrary()?,
            // Choices and alternatives now and then, over their limits too.
            n: if u.ratio(1, 8)? {
                pick(u, &[0, 2, 16, 17])?
            } else {
                0
            },
            top_logprobs: if u.ratio(1, 8)? {
                pick(u, &[1, 20, 21])?
            } else {
                0
            },
            prompt_logprobs: if u.ratio(1, 8)? {
                Some(pick(u, &[0, 20, 21])?)
            } else {
                None
            },
            // A constraint now and then: good, bad, and one that cannot compile.
            constraint: if u.ratio(1, 16)? {
                use v1::constraint::Kind;
                let kind = match u.int_in_range(0..=3)? {
                    0 => Kind::Regex("[0-9]{2}".into()),
                    1 => Kind::Regex("(".into()),
                    2 => Kind::JsonSchema(r#"{"type":"integer"}"#.into()),
                    _ => Kind::JsonObject(u.arbitrary()?),
                };
                Some(v1::Constraint { kind: Some(kind) })
            } else {
                None
            },
            ..Default::default()
        })
    } else {
        None
    };
    let stopping = if u.arbitrary()? {
        let n = u.int_in_range(0..=5)?;
        Some(v1::StoppingCriteria {
            max_new_tokens: match u.int_in_range(0..=5)? {
                0 => None,
                1 => Some(u.arbitrary()?),
                _ => Some(u.int_in_range(0..=70)?),
            },
            stop: (0..n)
                .map(|_| {
                    if u.ratio(3, 4)? {
                        Ok(u.choose(&["\n", "</s>", "stop", "é", ""])?.to_string())
                    } else {
                        text(u)
                    }
                })
                .collect::<Result<_>>()?,
            ignore_eos: u.arbitrary()?,
            // Mostly inside the vocabulary, sometimes far outside it.
            stop_token_ids: (0..if u.ratio(1, 2)? {
                0
            } else {
                u.int_in_range(1..=2)?
            })
                .map(|_| {
                    if u.ratio(9, 10)? {
                        u.int_in_range(0..=64)
                    } else {
                        u.arbitrary()
                    }
                })
                .collect::<Result<_>>()?,
            // Mostly none (a larger one than max_new_tokens is refused).
            min_new_tokens: if u.ratio(1, 4)? {
                u.int_in_range(1..=3)?
            } else {
                0
            },
        })
    } else {
        None
    };
    let request_id = match u.int_in_range(0..=15)? {
        0 => "r".repeat(u.int_in_range(250..=260)?),
        1 => text(u)?,
        _ => String::new(),
    };
    Ok(v1::GenerateRequest {
        input,
        sampling,
        stopping,
        request_id,
        cache_salt: if u.ratio(1, 16)? {
            "s".repeat(u.int_in_range(0..=300)?)
        } else {
            String::new()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_validator_survives_seeded_random_inputs() {
        let n = 3000;
        let outcome = moemesh_common::fuzz::run_seeded(generate_request, 0x5eed_0003, n);
        moemesh_common::fuzz::assert_both_paths(outcome, n, 100);
    }

    #[test]
    fn a_cache_salt_over_the_limit_is_refused_naming_the_field_and_the_limit() {
        let f = fixture();
        let req = |salt: String| v1::GenerateRequest {
            input: Some(Input::Tokens(v1::TokenIds { ids: vec![5, 17] })),
            stopping: Some(v1::StoppingCriteria {
                max_new_tokens: Some(8),
                ..Default::default()
            }),
            cache_salt: salt,
            ..Default::default()
        };
        let check = |salt| {
            crate::request::to_engine_request(&req(salt), &f.cfg, &f.model, None, 7).map(|_| ())
        };
        if let Err(e) = check("s".repeat(256)) {
            panic!("a 256-byte salt is refused: {e}");
        }
        let err = check("s".repeat(257)).expect_err("refused");
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "cache_salt: 257 bytes, the limit is 256");
    }

    #[test]
    fn the_cache_salt_separates_keys_and_salts_and_is_none_without_either() {
        use crate::request::cache_salt;
        assert_eq!(cache_salt(None, ""), None);
        let all = [
            cache_salt(Some("team-a"), ""),
            cache_salt(Some("team-b"), ""),
            cache_salt(None, "team-a"),
            cache_salt(Some("team-a"), "x"),
            cache_salt(Some("team-ax"), ""),
            cache_salt(None, "x"),
        ];
        for (i, a) in all.iter().enumerate() {
            assert!(a.is_some());
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(cache_salt(Some("k"), "s"), cache_salt(Some("k"), "s"));
    }

    #[test]
    fn the_harness_accepts_a_valid_request() {
        // The accepting path must be reachable, not only the rejections.
        let f = fixture();
        let req = v1::GenerateRequest {
            input: Some(Input::Prompt("Hello world".into())),
            stopping: Some(v1::StoppingCriteria {
                max_new_tokens: Some(8),
                stop: vec!["\n".into()],
                ignore_eos: false,
                ..Default::default()
            }),
            ..Default::default()
        };
        let out =
            crate::request::to_engine_request(&req, &f.cfg, &f.model, f.tokenizer.as_ref(), 7)
                .expect("valid");
        assert_eq!(out.0.max_new_tokens, 8);
        let mut bytes = vec![1u8];
        bytes.extend(req.encode_to_vec());
        assert_eq!(generate_request(&bytes), Outcome::Accepted);
    }
}
