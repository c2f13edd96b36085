//! Client authentication on the public API: API keys from `--api-keys-file`, sent as
//! `authorization: Bearer <key>`, checked by [`AuthLayer`] before a call reaches a handler.
//!
//! The file is TOML, one `[[key]]` table per client:
//!
//! ```toml
//! [[key]]
//! id = "team-a"                 # names the client in the audit log and in limit messages
//! key = "a-long-random-secret"  # or key_sha256 = "<hex SHA-256 of the key>", to keep no secret on disk
//! requests_per_second = 5.0     # optional: a token bucket over every call of this key
//! burst = 10                    # optional: the bucket's size (default: requests/s rounded up)
//! max_streams = 2               # optional: Generate streams open at once (n choices count n)
//! methods = ["Generate", "Tokenize", "ModelInfo"]  # optional: what the key may call (default: all)
//!                                                  # ("Generate" also grants Complete and Abort)
//! ```
//!
//! A missing or unknown key is UNAUTHENTICATED, a method the key may not call is
//! PERMISSION_DENIED; neither message says more than that. Over a key's rate or stream limit is
//! RESOURCE_EXHAUSTED naming the limit. Presented keys are hashed and compared with every stored
//! digest in constant time. Health and reflection stay open (probes carry no key). The file is
//! re-read when it changes; keys whose secret and limits stay the same keep their bucket and open
//! streams.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use moemesh_common::layers::PermitBody;
use moemesh_common::{MeshError, MeshResult, reload};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use tower::{Layer, Service};

use crate::audit::AuditLog;

/// The public service's path prefix; calls under it need a key.
const PROTECTED: &str = "/moemesh.v1.Generation/";
/// The generating method, whose grant also covers `Complete` and `Abort`.
const GENERATE: &str = "Generate";
/// The methods that run a generation, which `max_streams` counts.
const GENERATING: [&str; 2] = ["Generate", "Complete"];
/// What `methods` may name.
const METHODS: [&str; 3] = ["Generate", "Tokenize", "ModelInfo"];
/// Shortest accepted `key`: shorter secrets can be guessed.
const MIN_KEY_BYTES: usize = 16;

/// The caller's key id, put in each authenticated request's extensions for the handlers.
#[derive(Clone, Debug)]
pub struct KeyId(pub Arc<str>);

/// More of the caller key's `max_streams` permits, put in the extensions of a generating call
/// whose key has that limit: a request for n choices holds n (the layer took the first).
#[derive(Clone)]
pub struct KeyStreams(pub moemesh_common::layers::MorePermits);

/// A call the keys let through: its key, the key's stream permit it holds while it runs, and
/// the handle for more of them.
pub struct Passed {
    pub key: KeyId,
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
    pub more: Option<KeyStreams>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    key: Vec<KeySpec>,
}

#[derive(Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
struct KeySpec {
    id: String,
    key: Option<String>,
    key_sha256: Option<String>,
    requests_per_second: Option<f64>,
    burst: Option<u32>,
    max_streams: Option<usize>,
    methods: Option<Vec<String>>,
}

/// One client's key and its limits.
struct ApiKey {
    spec: KeySpec,
    id: Arc<str>,
    digest: [u8; 32],
    /// Token bucket and its numbers for the message (requests/s, burst).
    rate: Option<(DefaultDirectRateLimiter, f64, u32)>,
    /// Open Generate streams; each holds a permit until its response body is dropped.
    streams: Option<(Arc<Semaphore>, usize)>,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn parse_hex_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl ApiKey {
    fn new(spec: KeySpec, path: &Path) -> MeshResult<Self> {
        let bad = |what: String| {
            MeshError::Invalid(format!(
                "--api-keys-file {}: key {:?}: {what}",
                path.display(),
                spec.id
            ))
        };
        if spec.id.trim().is_empty() {
            return Err(bad("id is empty".into()));
        }
        let digest = match (&spec.key, &spec.key_sha256) {
            (Some(k), None) if k.len() >= MIN_KEY_BYTES => sha256(k.as_bytes()),
            (Some(k), None) => {
                return Err(bad(format!(
                    "key has {} bytes, at least {MIN_KEY_BYTES} are required",
                    k.len()
                )));
            }
            (None, Some(h)) => parse_hex_digest(h)
                .ok_or_else(|| bad("key_sha256 is not 64 hexadecimal digits".into()))?,
            _ => return Err(bad("give exactly one of key and key_sha256".into())),
        };
        let rate = match spec.requests_per_second {
            None => None,
            Some(rps) if rps.is_finite() && rps > 0.0 && rps <= 1e6 => {
                let burst = spec.burst.unwrap_or(rps.ceil() as u32).max(1);
                let quota = Quota::with_period(Duration::from_secs_f64(1.0 / rps))
                    .ok_or_else(|| bad(format!("requests_per_second {rps} is out of range")))?
                    .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
                Some((RateLimiter::direct(quota), rps, burst))
            }
            Some(rps) => {
                return Err(bad(format!(
                    "requests_per_second {rps} must be above 0 and at most 1000000"
                )));
            }
        };
        if spec.burst.is_some() && rate.is_none() {
            return Err(bad("burst needs requests_per_second".into()));
        }
        let streams = match spec.max_streams {
            Some(0) => return Err(bad("max_streams must be at least 1".into())),
            Some(n) => Some((Arc::new(Semaphore::new(n)), n)),
            None => None,
        };
        if let Some(m) = spec
            .methods
            .iter()
            .flatten()
            .find(|m| !METHODS.contains(&m.as_str()))
        {
            return Err(bad(format!("methods: {m:?} is not one of {METHODS:?}")));
        }
        Ok(ApiKey {
            id: Arc::from(spec.id.as_str()),
            spec,
            digest,
            rate,
            streams,
        })
    }

    fn allows(&self, method: &str) -> bool {
        // Complete is Generate answered whole; Abort ends what Generate started.
        let grant = match method {
            "Complete" | "Abort" => GENERATE,
            m => m,
        };
        self.spec
            .methods
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == grant))
    }
}

/// The loaded keys, kept current by a watch on the file.
pub struct ApiKeys {
    path: PathBuf,
    keys: ArcSwap<Vec<Arc<ApiKey>>>,
}

impl ApiKeys {
    /// Reads `path` and starts watching it; errors name the file and the key.
    pub fn load(path: &Path) -> MeshResult<Arc<Self>> {
        let bytes = std::fs::read(path)
            .map_err(|e| MeshError::Invalid(format!("--api-keys-file {}: {e}", path.display())))?;
        let keys = parse(path, &bytes, &[])?;
        if keys.is_empty() {
            return Err(MeshError::Invalid(format!(
                "--api-keys-file {}: no [[key]] entries (every call would be refused)",
                path.display()
            )));
        }
        let this = Arc::new(ApiKeys {
            path: path.to_path_buf(),
            keys: ArcSwap::from_pointee(keys),
        });
        reload::spawn_watch(
            Arc::downgrade(&this),
            vec![path.to_path_buf()],
            vec![bytes],
            |this: &ApiKeys, new: &[Vec<u8>]| {
                let old = this.keys.load();
                match parse(&this.path, &new[0], &old) {
                    Ok(keys) => {
                        tracing::info!(keys = keys.len(), "API keys file changed: reloaded");
                        this.keys.store(Arc::new(keys));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "API keys file changed but does not load; keeping the previous keys")
                    }
                }
            },
        );
        Ok(this)
    }

    /// The key whose digest matches `presented`. Every stored digest is compared, in constant
    /// time, so the time taken does not depend on which key (if any) is close.
    fn find(&self, presented: &str) -> Option<Arc<ApiKey>> {
        let digest = sha256(presented.as_bytes());
        let mut found = None;
        for k in self.keys.load().iter() {
            if bool::from(k.digest.ct_eq(&digest)) {
                found = Some(k.clone());
            }
        }
        found
    }
}

/// Parses the keys file; entries equal to one in `old` keep its state.
fn parse(path: &Path, bytes: &[u8], old: &[Arc<ApiKey>]) -> MeshResult<Vec<Arc<ApiKey>>> {
    let text = std::str::from_utf8(bytes).map_err(|_| {
        MeshError::Invalid(format!("--api-keys-file {}: not UTF-8", path.display()))
    })?;
    let file: KeyFile = toml::from_str(text)
        .map_err(|e| MeshError::Invalid(format!("--api-keys-file {}: {e}", path.display())))?;
    let mut out: Vec<Arc<ApiKey>> = Vec::with_capacity(file.key.len());
    for spec in file.key {
        let key = match old.iter().find(|k| k.spec == spec) {
            Some(k) => k.clone(),
            None => Arc::new(ApiKey::new(spec, path)?),
        };
        if let Some(dup) = out
            .iter()
            .find(|k| k.id == key.id || k.digest == key.digest)
        {
            return Err(MeshError::Invalid(format!(
                "--api-keys-file {}: keys {:?} and {:?} share an id or a secret",
                path.display(),
                dup.id,
                key.id
            )));
        }
        out.push(key);
    }
    Ok(out)
}

/// The bearer token of an `authorization` header value.
fn bearer(value: &http::HeaderValue) -> Option<&str> {
    let (scheme, token) = value.to_str().ok()?.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Authenticates calls to the Generation service and applies each key's limits; passes the key
/// id on as a [`KeyId`] request extension. Refusals are written to the audit log, if any.
/// Without keys (no `--api-keys-file`) it lets every call through.
#[derive(Clone)]
pub struct AuthLayer {
    keys: Option<Arc<ApiKeys>>,
    audit: Option<AuditLog>,
}

impl AuthLayer {
    pub fn new(keys: Option<Arc<ApiKeys>>, audit: Option<AuditLog>) -> Self {
        AuthLayer { keys, audit }
    }

    /// The same check for a call that came over HTTP (the OpenAI API) to `method` of the
    /// Generation service: the same keys, grants, rates and stream caps. On a pass, the key (if
    /// keys are configured) with the stream permit to hold while the call runs.
    pub fn check_http(
        &self,
        method: &str,
        headers: &http::HeaderMap,
    ) -> Result<Option<Passed>, tonic::Status> {
        match self.judge(&format!("{PROTECTED}{method}"), headers) {
            Verdict::Pass(passed) => Ok(passed),
            Verdict::Refuse(status, key) => {
                if method == GENERATE {
                    crate::metered::count_request(status.code());
                }
                if let Some(audit) = &self.audit {
                    audit.refused(method, key.as_deref(), status.code());
                }
                Err(status)
            }
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

/// What happens to one call.
enum Verdict {
    Pass(Option<Passed>),
    Refuse(tonic::Status, Option<Arc<str>>),
}

impl AuthLayer {
    fn judge(&self, path: &str, headers: &http::HeaderMap) -> Verdict {
        let (Some(keys), Some(method)) = (&self.keys, path.strip_prefix(PROTECTED)) else {
            return Verdict::Pass(None);
        };
        let key = headers
            .get(http::header::AUTHORIZATION)
            .and_then(bearer)
            .and_then(|token| keys.find(token));
        let Some(key) = key else {
            return Verdict::Refuse(
                MeshError::Unauthenticated("missing or invalid API key".into()).into(),
                None,
            );
        };
        let refuse = |e: MeshError| Verdict::Refuse(e.into(), Some(key.id.clone()));
        if !key.allows(method) {
            return refuse(MeshError::PermissionDenied(
                "this API key may not call this method".into(),
            ));
        }
        if let Some((bucket, rps, burst)) = &key.rate
            && bucket.check().is_err()
        {
            return refuse(MeshError::Overloaded(format!(
                "API key {:?}: over its limit of {rps} requests/s (burst {burst}); retry later",
                key.id
            )));
        }
        let (permit, more) = match &key.streams {
            Some((open, limit)) if GENERATING.contains(&method) => {
                let message = format!(
                    "API key {:?}: {limit} Generate streams are open, its limit (max_streams; a request for n choices counts n); retry when one ends",
                    key.id
                );
                match open.clone().try_acquire_owned() {
                    Ok(p) => (
                        Some(p),
                        Some(KeyStreams(moemesh_common::layers::MorePermits::new(
                            open.clone(),
                            *limit,
                            message,
                        ))),
                    ),
                    Err(_) => return refuse(MeshError::Overloaded(message)),
                }
            }
            _ => (None, None),
        };
        Verdict::Pass(Some(Passed {
            key: KeyId(key.id.clone()),
            permit,
            more,
        }))
    }
}

use moemesh_common::layers::BoxFuture;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for Auth<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<PermitBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let permit = match self.layer.judge(req.uri().path(), req.headers()) {
            Verdict::Pass(None) => None,
            Verdict::Pass(Some(passed)) => {
                req.extensions_mut().insert(passed.key);
                if let Some(more) = passed.more {
                    req.extensions_mut().insert(more);
                }
                passed.permit
            }
            Verdict::Refuse(status, key) => {
                let method = req.uri().path().rsplit('/').next().unwrap_or_default();
                if method == GENERATE {
                    crate::metered::count_request(status.code());
                }
                if let Some(audit) = &self.layer.audit {
                    audit.refused(method, key.as_deref(), status.code());
                }
                return Box::pin(async move {
                    Ok(status
                        .into_http::<ResBody>()
                        .map(|b| PermitBody::new(b, None)))
                });
            }
        };
        // The readied service handles this call; a fresh clone takes its place (tower's rule
        // for services that are driven to readiness before `call`).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let resp = inner.call(req).await?;
            Ok(resp.map(|body| PermitBody::new(body, permit)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(toml: &str) -> MeshResult<Vec<Arc<ApiKey>>> {
        parse(Path::new("keys.toml"), toml.as_bytes(), &[])
    }

    fn layer(toml: &str) -> AuthLayer {
        let keys = keys(toml).expect("valid keys");
        AuthLayer::new(
            Some(Arc::new(ApiKeys {
                path: PathBuf::from("keys.toml"),
                keys: ArcSwap::from_pointee(keys),
            })),
            None,
        )
    }

    fn headers(auth: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, auth.parse().expect("ascii"));
        h
    }

    fn code(v: &Verdict) -> tonic::Code {
        match v {
            Verdict::Pass(_) => tonic::Code::Ok,
            Verdict::Refuse(s, _) => s.code(),
        }
    }

    #[test]
    fn bad_files_name_the_key_and_the_problem() {
        let err = |t: &str| keys(t).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err("[[key]]\nid = \"a\"\nkey = \"short\"").contains("at least 16"));
        assert!(err("[[key]]\nid = \"a\"").contains("exactly one of key and key_sha256"));
        assert!(err("[[key]]\nid = \"a\"\nkey_sha256 = \"xyz\"").contains("64 hexadecimal digits"));
        let twice = "[[key]]\nid = \"a\"\nkey = \"0123456789abcdef\"\n[[key]]\nid = \"a\"\nkey = \"0123456789abcdeg\"";
        assert!(err(twice).contains("share an id"));
        assert!(
            err("[[key]]\nid = \"a\"\nkey = \"0123456789abcdef\"\nmethods = [\"Step\"]")
                .contains("\"Step\" is not one of")
        );
        assert!(
            err("[[key]]\nid = \"a\"\nkey = \"0123456789abcdef\"\ncolour = 1").contains("colour")
        );
    }

    #[test]
    fn keys_methods_and_limits_decide_the_status() {
        let digest: String = sha256(b"hashed-key-0123456789")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let l = layer(&format!(
            "[[key]]\nid = \"a\"\nkey = \"key-a-0123456789\"\nrequests_per_second = 0.001\nburst = 2\n\
             [[key]]\nid = \"b\"\nkey_sha256 = \"{digest}\"\nmethods = [\"ModelInfo\"]\nmax_streams = 1\n\
             [[key]]\nid = \"c\"\nkey = \"key-c-0123456789\"\nmax_streams = 1"
        ));
        let generate = "/moemesh.v1.Generation/Generate";
        let none = http::HeaderMap::new();
        assert_eq!(
            code(&l.judge(generate, &none)),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(&l.judge(generate, &headers("Bearer key-a-0123456788"))),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(&l.judge(generate, &headers("Basic key-a-0123456789"))),
            tonic::Code::Unauthenticated
        );
        // Health and reflection need no key.
        assert_eq!(
            code(&l.judge("/grpc.health.v1.Health/Check", &none)),
            tonic::Code::Ok
        );
        // Key a: a bucket of 2 that refills once in 1000 s.
        let a = headers("bearer key-a-0123456789");
        assert_eq!(code(&l.judge(generate, &a)), tonic::Code::Ok);
        assert_eq!(
            code(&l.judge("/moemesh.v1.Generation/Tokenize", &a)),
            tonic::Code::Ok
        );
        match l.judge(generate, &a) {
            Verdict::Refuse(s, Some(id)) => {
                assert_eq!(s.code(), tonic::Code::ResourceExhausted);
                assert!(
                    s.message().contains("0.001 requests/s (burst 2)"),
                    "{}",
                    s.message()
                );
                assert_eq!(&*id, "a");
            }
            _ => panic!("the third call is over the limit"),
        }
        // Key b is stored as a digest and may call ModelInfo only.
        let b = headers("Bearer hashed-key-0123456789");
        assert_eq!(
            code(&l.judge("/moemesh.v1.Generation/ModelInfo", &b)),
            tonic::Code::Ok
        );
        assert_eq!(code(&l.judge(generate, &b)), tonic::Code::PermissionDenied);
        // Complete and Abort go with the Generate grant.
        for m in ["Complete", "Abort"] {
            let path = format!("/moemesh.v1.Generation/{m}");
            assert_eq!(code(&l.judge(&path, &b)), tonic::Code::PermissionDenied);
        }
        // Key c: one generation (Generate or Complete) at a time; the permit frees the slot.
        let c = headers("Bearer key-c-0123456789");
        let first = l.judge(generate, &c);
        assert_eq!(code(&first), tonic::Code::Ok);
        assert_eq!(code(&l.judge(generate, &c)), tonic::Code::ResourceExhausted);
        let complete = "/moemesh.v1.Generation/Complete";
        assert_eq!(code(&l.judge(complete, &c)), tonic::Code::ResourceExhausted);
        assert_eq!(
            code(&l.judge("/moemesh.v1.Generation/Abort", &c)),
            tonic::Code::Ok
        );
        assert_eq!(
            code(&l.judge("/moemesh.v1.Generation/Tokenize", &c)),
            tonic::Code::Ok
        );
        drop(first);
        assert_eq!(code(&l.judge(generate, &c)), tonic::Code::Ok);
    }
}
