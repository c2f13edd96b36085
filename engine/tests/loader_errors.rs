//! Broken checkpoints give errors that say what is wrong and where, never a panic: each test
//! copies the tiny V3 fixture into a temp dir, breaks one thing, and checks the message.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use moemesh_engine::{InProcessEngine, ModelFiles};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-deepseek-v3")
}

fn copy_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture().join(f), dir.path().join(f)).expect("copy");
    }
    dir
}

/// Opens and loads the model, returning the error text.
fn load_error(dir: &Path) -> String {
    match ModelFiles::open(dir).and_then(|f| InProcessEngine::load(&f, &Device::Cpu, DType::F32)) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut std::collections::HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).expect("load");
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).expect("save");
}

#[test]
fn truncated_safetensors_names_the_file_and_tensor() {
    let dir = copy_fixture();
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).expect("meta").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    f.set_len(len / 2).expect("truncate");
    let msg = load_error(dir.path());
    assert!(
        msg.contains("model.safetensors") && msg.contains("truncated"),
        "{msg}"
    );
    assert!(msg.contains("tensor `"), "names a tensor: {msg}");
}

#[test]
fn garbage_instead_of_safetensors_is_reported() {
    let dir = copy_fixture();
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!",
    )
    .expect("write");
    let msg = load_error(dir.path());
    assert!(msg.contains("not a valid safetensors file"), "{msg}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_fixture();
    let name = "model.layers.1.self_attn.kv_b_proj.weight";
    rewrite_weights(dir.path(), |t| {
        t.remove(name);
    });
    let msg = load_error(dir.path());
    assert!(msg.contains(name) && msg.contains("missing"), "{msg}");
}

#[test]
fn wrong_shape_names_tensor_expected_and_actual() {
    let dir = copy_fixture();
    let name = "model.layers.2.mlp.experts.3.up_proj.weight";
    rewrite_weights(dir.path(), |t| {
        t.insert(
            name.into(),
            Tensor::zeros((160, 100), DType::BF16, &Device::Cpu).expect("zeros"),
        );
    });
    let msg = load_error(dir.path());
    assert!(msg.contains(name), "{msg}");
    assert!(
        msg.contains("[160, 100]") && msg.contains("[160, 128]"),
        "{msg}"
    );
}

#[test]
fn unsupported_config_values_name_key_and_value() {
    let cases: [(&str, serde_json::Value, &str); 4] = [
        ("topk_method", "random".into(), "\"random\""),
        ("hidden_act", "gelu".into(), "\"gelu\""),
        ("model_type", "mixtral".into(), "\"mixtral\""),
        (
            "rope_scaling",
            serde_json::json!({"type": "dynamic", "factor": 2.0}),
            "\"dynamic\"",
        ),
    ];
    for (key, value, shown) in cases {
        let dir = copy_fixture();
        let path = dir.path().join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
        cfg[key] = value;
        std::fs::write(&path, cfg.to_string()).expect("write");
        let msg = load_error(dir.path());
        assert!(msg.contains(key) && msg.contains(shown), "{key}: {msg}");
    }
}

#[test]
fn directory_without_weights_says_what_it_looked_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        fixture().join("config.json"),
        dir.path().join("config.json"),
    )
    .expect("copy");
    let msg = load_error(dir.path());
    assert!(msg.contains("model.safetensors"), "{msg}");
}

/// A sharded checkpoint (index + several files) loads to the same model as the single file.
#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        fixture().join("config.json"),
        dir.path().join("config.json"),
    )
    .expect("copy");
    let tensors = candle_core::safetensors::load(fixture().join("model.safetensors"), &Device::Cpu)
        .expect("load");
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let shard: std::collections::HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        candle_core::safetensors::save(&shard, dir.path().join(file)).expect("save shard");
        for n in part {
            map.insert((*n).clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .expect("index");

    let greedy = |d: &Path| {
        let files = ModelFiles::open(d).expect("open");
        let engine = InProcessEngine::load(&files, &Device::Cpu, DType::F32).expect("load");
        let req = moemesh_engine::GenerationRequest {
            prompt_ids: vec![1, 2, 3],
            sampling: Default::default(),
            max_new_tokens: 8,
            stop: Vec::new(),
            ignore_eos: true,
            ..Default::default()
        };
        engine
            .generate(&req, &mut |_| true)
            .expect("generate")
            .token_ids
    };
    assert_eq!(greedy(dir.path()), greedy(&fixture()));
}
