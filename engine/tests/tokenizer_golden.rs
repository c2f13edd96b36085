//! The vendored DeepSeek-R1 tokenizer, its chat template and the incremental decoder against
//! golden outputs of Python `tokenizers` and transformers (`tests/fixtures/tokenizer_golden.json`).

use std::path::{Path, PathBuf};

use moemesh_engine::EngineError;
use moemesh_engine::text::{ChatMessage, IncrementalDecoder, TextTokenizer};
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn golden() -> Value {
    fixture("tokenizer_golden.json")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an id list")
        .iter()
        .map(|i| u32::try_from(i.as_u64().expect("an integer id")).expect("a u32 id"))
        .collect()
}

fn text(v: &Value) -> &str {
    v.as_str().expect("a string")
}

fn tok() -> TextTokenizer {
    TextTokenizer::embedded_deepseek_r1().expect("embedded tokenizer loads")
}

fn encode_cases(g: &Value) -> &Vec<Value> {
    let cases = g["encode"].as_array().expect("encode cases");
    assert!(cases.len() >= 10, "only {} encode cases", cases.len());
    cases
}

#[test]
fn encode_and_decode_match_golden() {
    let t = tok();
    let g = golden();
    for c in encode_cases(&g) {
        let s = text(&c["text"]);
        let plain = t.encode(s, false).expect("encode");
        assert_eq!(plain, ids(&c["ids"]), "encode({s:?}, false)");
        assert_eq!(
            t.encode(s, true).expect("encode"),
            ids(&c["ids_with_special"]),
            "encode({s:?}, true)"
        );
        assert_eq!(
            t.decode(&ids(&c["ids"]), false).expect("decode"),
            text(&c["decoded"]),
            "decode of {s:?}"
        );
        assert_eq!(
            t.decode(&plain, false).expect("decode"),
            s,
            "round trip of {s:?}"
        );
    }
}

/// The rendered text must equal transformers' output exactly. The ids are checked against the
/// Python `tokenizers` encoding of that text (`chat_template_ids.json`), because the golden
/// file's chat `ids` are wrong: transformers 5.17's `apply_chat_template(tokenize=True)` loads
/// this tokenizer as `LlamaTokenizerFast` and loses every space, newline and CJK character
/// (its ids decode to "Whatis2+2?" and drop "你好"). Wherever the golden ids do decode back to
/// the golden text (a regenerated, correct golden file), they are compared too.
#[test]
fn chat_template_matches_golden() {
    let t = tok();
    let g = golden();
    let chats = g["chat_template"].as_array().expect("chat cases");
    let reference = fixture("chat_template_ids.json");
    let reference = reference["chat_template"]
        .as_array()
        .expect("chat id cases");
    assert!(!chats.is_empty());
    assert_eq!(chats.len(), reference.len(), "one id reference per chat");
    let mut golden_ids_compared = 0;
    for (c, r) in chats.iter().zip(reference) {
        let messages: Vec<ChatMessage> =
            serde_json::from_value(c["messages"].clone()).expect("messages");
        let gen_prompt = c["add_generation_prompt"].as_bool().expect("a bool");
        let expected = text(&c["text"]);
        assert_eq!(
            t.apply_chat_template(&messages, gen_prompt)
                .expect("render"),
            expected
        );
        assert_eq!(text(&r["text"]), expected, "id reference for another text");

        let ours = t.encode_chat(&messages, gen_prompt).expect("encode_chat");
        assert_eq!(ours, ids(&r["ids"]), "encode_chat for {expected:?}");
        assert_eq!(t.decode(&ours, false).expect("decode"), expected);

        let golden_ids = ids(&c["ids"]);
        if t.decode(&golden_ids, false).expect("decode") == expected {
            assert_eq!(ours, golden_ids, "golden chat ids for {expected:?}");
            golden_ids_compared += 1;
        }
    }
    eprintln!(
        "{golden_ids_compared} of {} golden chat id lists round-trip and were compared",
        chats.len()
    );
}

/// Streaming one id at a time reproduces the full decode exactly, never emits a broken
/// character, and really does hold text back inside characters split across tokens.
#[test]
fn incremental_decoding_matches_full_decoding() {
    let t = tok();
    let g = golden();
    let mut held_back_in_emoji_text = false;
    for c in encode_cases(&g) {
        let ids = ids(&c["ids"]);
        let full = t.decode(&ids, false).expect("decode");
        let mut dec = IncrementalDecoder::new(t.clone(), false);
        let mut streamed = String::new();
        for &id in &ids {
            let piece = dec.push(id).expect("push");
            if !full.contains('\u{FFFD}') {
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "broken character {piece:?} streamed for {full:?}"
                );
            }
            if piece.is_empty() && full.contains('🚀') {
                held_back_in_emoji_text = true;
            }
            streamed.push_str(&piece);
        }
        streamed.push_str(&dec.finish().expect("finish"));
        assert_eq!(streamed, full);
        assert_eq!(dec.ids(), ids.as_slice());
    }
    assert!(
        held_back_in_emoji_text,
        "the emoji text splits characters across tokens, so some push must hold back"
    );
}

#[test]
fn unknown_role_is_invalid_input_naming_the_role() {
    let t = tok();
    let err = t
        .encode_chat(
            &[
                ChatMessage::new("user", "hi"),
                ChatMessage::new("narrator", "x"),
            ],
            true,
        )
        .expect_err("unknown role");
    assert!(matches!(err, EngineError::InvalidInput(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("chat.messages[1].role") && msg.contains("\"narrator\""),
        "{msg}"
    );

    let err = t.apply_chat_template(&[], true).expect_err("no messages");
    assert!(matches!(err, EngineError::InvalidInput(_)), "{err:?}");
    assert!(err.to_string().contains("chat.messages"), "{err}");
}

#[test]
fn a_directory_without_tokenizer_json_has_no_tokenizer() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "moemesh-tokenizer-golden-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let loaded = TextTokenizer::from_dir(&dir);
    std::fs::remove_dir_all(&dir).expect("remove temp dir");
    assert!(loaded.expect("no error").is_none());
}
