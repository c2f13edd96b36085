//! `moemesh generate` run as a process, the way the README tells users to run it.

use moemesh_tests::{fixture, json_lines, moemesh};

fn reference_greedy(model: &str, prompt: usize) -> (Vec<u64>, Vec<u64>) {
    let text =
        std::fs::read_to_string(fixture(model).join("reference.json")).expect("reference.json");
    let r: serde_json::Value = serde_json::from_str(&text).expect("json");
    let p = &r["prompts"][prompt];
    let ids = |k: &str| {
        p[k].as_array()
            .expect(k)
            .iter()
            .map(|v| v.as_u64().expect("id"))
            .collect()
    };
    (ids("input_ids"), ids("greedy_new_tokens"))
}

/// The CLI's greedy output equals transformers' greedy continuation (all reference margins are
/// ≥ 0.012 for these prompts, far above the engine's 1e-5 logit error, so every token compares).
#[test]
fn greedy_json_output_matches_reference_for_each_fixture() {
    for (model, prompt) in [
        ("tiny-deepseek-v3", 2),
        ("tiny-deepseek-v3-fp8", 1),
        ("tiny-deepseek-v2-lite", 1),
    ] {
        let (input, expected) = reference_greedy(model, prompt);
        let ids: Vec<String> = input.iter().map(u64::to_string).collect();
        let n = expected.len().to_string();
        let dir = fixture(model);
        let out = moemesh(&[
            "generate",
            "--model",
            dir.to_str().expect("utf-8 path"),
            "--prompt-ids",
            &ids.join(","),
            "--max-new-tokens",
            &n,
            "--ignore-eos",
            "--json",
        ]);
        let lines = json_lines(&out);
        let last = lines.last().expect("a final line");
        let got: Vec<u64> = last["token_ids"]
            .as_array()
            .expect("token_ids")
            .iter()
            .filter_map(|v| v.as_u64())
            .collect();
        assert_eq!(got, expected, "{model} prompt {prompt}");
        assert_eq!(last["finish_reason"], "length");
        assert_eq!(last["usage"]["prompt_tokens"], input.len());
        // One streamed line per token, in order, then the summary.
        let streamed: Vec<u64> = lines[..lines.len() - 1]
            .iter()
            .filter_map(|l| l["token_id"].as_u64())
            .collect();
        assert_eq!(streamed, expected);
    }
}

/// The embedded default model runs from a chat message with no files at all; its streamed text
/// is exactly the tokenizer's decoding of the generated ids, and a seed makes sampling repeat.
#[test]
fn embedded_default_chat_streams_text_that_decodes_from_its_ids() {
    let run = || {
        json_lines(&moemesh(&[
            "generate",
            "--chat",
            "Hello! 你好",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0.8",
            "--seed",
            "7",
            "--json",
        ]))
    };
    let lines = run();
    let last = lines.last().expect("final line").clone();
    let ids: Vec<u32> = last["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect();
    assert!(!ids.is_empty() && ids.len() <= 12, "{ids:?}");
    let tok = moemesh_engine::text::TextTokenizer::embedded_deepseek_r1().expect("tokenizer");
    let eos = tok.eos_token().and_then(|e| tok.token_to_id(e));
    let text_ids: Vec<u32> = ids.iter().copied().filter(|i| Some(*i) != eos).collect();
    let expected_text = tok.decode(&text_ids, true).expect("decode");
    let streamed: String = lines[..lines.len() - 1]
        .iter()
        .map(|l| l["text"].as_str().expect("text"))
        .collect();
    assert_eq!(streamed, expected_text);
    assert_eq!(last["text"], expected_text);
    assert_eq!(
        run().last().expect("final line")["token_ids"],
        last["token_ids"],
        "same seed, same tokens"
    );
    let prompt_tokens = last["usage"]["prompt_tokens"]
        .as_u64()
        .expect("prompt_tokens");
    let rendered = tok
        .encode_chat(
            &[moemesh_engine::text::ChatMessage::new(
                "user",
                "Hello! 你好",
            )],
            true,
        )
        .expect("chat ids");
    assert_eq!(prompt_tokens, rendered.len() as u64);
}

#[test]
fn text_input_without_a_tokenizer_fails_clearly() {
    let dir = fixture("tiny-deepseek-v3");
    let out = moemesh(&[
        "generate",
        "--model",
        dir.to_str().expect("utf-8"),
        "--prompt",
        "hello",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tokenizer.json") && err.contains("--prompt-ids"),
        "{err}"
    );
}

#[test]
fn bad_arguments_name_the_field_and_limit() {
    let dir = fixture("tiny-deepseek-v3");
    let model = dir.to_str().expect("utf-8");
    let cases: [(&[&str], &[&str]); 4] = [
        (
            &["--prompt-ids", "1,2", "--temperature", "-1"],
            &["temperature", ">= 0"],
        ),
        (&["--prompt-ids", "1,600"], &["tokens.ids[1]", "600", "512"]),
        (
            &["--prompt-ids", "1", "--top-p", "1.5"],
            &["top_p", "(0, 1]"],
        ),
        (
            &["--prompt-ids", "1", "--max-new-tokens", "0"],
            &["max_new_tokens", "4096"],
        ),
    ];
    for (args, needles) in cases {
        let mut all = vec!["generate", "--model", model];
        all.extend_from_slice(args);
        let out = moemesh(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        for n in needles {
            assert!(err.contains(n), "{args:?}: {err}");
        }
    }
}
