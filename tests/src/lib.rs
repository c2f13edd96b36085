//! Helpers for the end-to-end tests in `tests/tests/`: build the `moemesh` binary once and run it
//! as a user would.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The `moemesh` binary under test.
///
/// `cargo test --workspace` builds it next to this test executable (the `moemesh` package has
/// integration tests of its own, so cargo builds its binary before running any test), with the
/// same dependency features as everything else in that build. Running this crate alone
/// (`cargo test -p moemesh-tests`) builds it through escargot instead, which may compile the
/// dependencies a second time with `moemesh`'s own feature set. `MOEMESH_BIN` overrides both.
pub fn moemesh_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("MOEMESH_BIN") {
            return PathBuf::from(p);
        }
        let beside = std::env::current_exe().ok().and_then(|exe| {
            Some(
                exe.parent()?
                    .parent()?
                    .join(format!("moemesh{}", std::env::consts::EXE_SUFFIX)),
            )
        });
        if let Some(p) = beside.filter(|p| p.is_file()) {
            return p;
        }
        let run = escargot::CargoBuild::new()
            .package("moemesh")
            .bin("moemesh")
            .current_release()
            .current_target()
            .manifest_path(workspace_root().join("Cargo.toml"))
            .run()
            .unwrap_or_else(|e| panic!("building the moemesh binary failed: {e}"));
        run.path().to_path_buf()
    })
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

pub fn fixture(name: &str) -> PathBuf {
    workspace_root().join("tests/fixtures").join(name)
}

/// Runs `moemesh ARGS…` to completion.
pub fn moemesh(args: &[&str]) -> Output {
    Command::new(moemesh_bin())
        .args(args)
        .env_remove("MOEMESH_MODEL")
        .output()
        .unwrap_or_else(|e| panic!("running moemesh {args:?}: {e}"))
}

/// The JSON lines of a successful `--json` run; panics with stderr if the run failed.
pub fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    assert!(
        out.status.success(),
        "moemesh failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

pub mod mesh;
pub mod otlp;
pub mod raw;
pub mod tls;

/// A greedy Generate of the token ids `ids` that makes exactly `max_new_tokens` (EOS ignored).
pub fn tokens_request(ids: &[u32], max_new_tokens: u32) -> moemesh_proto::v1::GenerateRequest {
    use moemesh_proto::v1;
    v1::GenerateRequest {
        input: Some(v1::generate_request::Input::Tokens(v1::TokenIds {
            ids: ids.to_vec(),
        })),
        sampling: None,
        stopping: Some(v1::StoppingCriteria {
            max_new_tokens: Some(max_new_tokens),
            stop: Vec::new(),
            ignore_eos: true,
            ..Default::default()
        }),
        request_id: String::new(),
        cache_salt: String::new(),
    }
}

/// [`tokens_request`] with `sampling` (None: greedy).
pub fn sampled_tokens_request(
    ids: &[u32],
    max_new_tokens: u32,
    sampling: Option<moemesh_proto::v1::SamplingParams>,
) -> moemesh_proto::v1::GenerateRequest {
    moemesh_proto::v1::GenerateRequest {
        sampling,
        ..tokens_request(ids, max_new_tokens)
    }
}

/// The reference prompt and greedy continuation of a fixture.
pub fn reference_greedy(model: &str, prompt: usize) -> (Vec<u32>, Vec<u32>) {
    let text =
        std::fs::read_to_string(fixture(model).join("reference.json")).expect("reference.json");
    let r: serde_json::Value = serde_json::from_str(&text).expect("json");
    let p = &r["prompts"][prompt];
    let ids = |k: &str| -> Vec<u32> {
        p[k].as_array()
            .expect(k)
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect()
    };
    (ids("input_ids"), ids("greedy_new_tokens"))
}

/// What the in-process engine generates for a request alone (EOS ignored): the reference the
/// mesh's batched, preempted or failed-over output must equal. `sampling` is
/// `(temperature, top_k, top_p, seed)`; `None` is greedy.
pub fn in_process_tokens(
    engine: &moemesh_engine::InProcessEngine,
    prompt: &[u32],
    sampling: Option<(f32, usize, f32, u64)>,
    max_new_tokens: usize,
) -> Vec<u32> {
    let sampling = match sampling {
        Some((temperature, top_k, top_p, seed)) => moemesh_engine::SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: Some(seed),
            ..Default::default()
        },
        None => moemesh_engine::SamplingParams::default(),
    };
    let req = moemesh_engine::GenerationRequest {
        prompt_ids: prompt.to_vec(),
        sampling,
        max_new_tokens,
        stop: Vec::new(),
        ignore_eos: true,
        ..Default::default()
    };
    engine
        .generate(&req, &mut |_| true)
        .expect("in-process generation")
        .token_ids
}

/// The whole model of a fixture, loaded in this process (f32, CPU).
pub fn in_process_engine(model: &str) -> moemesh_engine::InProcessEngine {
    let files = moemesh_engine::ModelFiles::open(&fixture(model)).expect("open fixture");
    moemesh_engine::InProcessEngine::load(
        &files,
        &moemesh_engine::Device::Cpu,
        moemesh_engine::DType::F32,
    )
    .expect("load fixture")
}

/// The Python of the virtual environment `scripts/setup.sh --test` makes: deploy/validate.py's
/// checkers and the `openai` client (`MOEMESH_DEPLOY_VENV` overrides where it is).
pub fn test_python() -> PathBuf {
    let venv = std::env::var_os("MOEMESH_DEPLOY_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache")
                });
            cache.join("moemesh-deploy-venv")
        });
    venv.join("bin/python")
}
