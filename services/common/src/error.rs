//! The services' error type and its single conversion into a gRPC status. Messages name the
//! field, limit, expert or peer involved; details of internal failures are logged, not leaked.
//! An INVALID_ARGUMENT whose message starts with the field it is about (`sampling.n: …`,
//! `stopping.max_new_tokens must …`) also carries that field as a google.rpc `BadRequest` field
//! violation, so a client can tell which field without reading the text.

use moemesh_engine::{EngineError, ErrorKind};
use tonic_types::{ErrorDetails, StatusExt};

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The caller sent something wrong (INVALID_ARGUMENT).
    #[error("{0}")]
    Invalid(String),
    /// A needed peer or expert is not available now (UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
    /// The server is at capacity (RESOURCE_EXHAUSTED).
    #[error("{0}")]
    Overloaded(String),
    /// A sequence's state does not match what the caller assumed (FAILED_PRECONDITION).
    #[error("{0}")]
    Precondition(String),
    /// What the caller named does not exist here (NOT_FOUND): a model, a route.
    #[error("{0}")]
    NotFound(String),
    /// The caller's deadline passed (DEADLINE_EXCEEDED).
    #[error("{0}")]
    Deadline(String),
    /// The caller did not say who it is, or its credential is not known (UNAUTHENTICATED).
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known but may not do this (PERMISSION_DENIED).
    #[error("{0}")]
    PermissionDenied(String),
    #[error("registry: {0}")]
    Registry(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A peer answered with an error status.
    #[error("{peer}: {status}")]
    Peer { peer: String, status: tonic::Status },
    #[error("internal: {0}")]
    Internal(String),
}

pub type MeshResult<T> = Result<T, MeshError>;

/// The request field an invalid-argument message is about: its first word, when that is a
/// field path (`stopping.stop_token_ids[1]`, `prompt`) followed by `:`, or a dotted or
/// underscored path followed by a space (`stopping.max_new_tokens must …`).
pub fn field_of(message: &str) -> Option<&str> {
    let end = message.find([':', ' '])?;
    let head = &message[..end];
    let path = head.starts_with(|c: char| c.is_ascii_lowercase())
        && head
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._[]".contains(c));
    let named = message[end..].starts_with(':') || head.contains(['.', '_']);
    (path && named).then_some(head)
}

/// INVALID_ARGUMENT with `message`, and `field` (when known) as a `BadRequest` violation whose
/// description is the message.
fn invalid_argument(message: String, field: Option<&str>) -> tonic::Status {
    match field {
        Some(field) => {
            let details = ErrorDetails::with_bad_request_violation(field, message.as_str());
            tonic::Status::with_error_details(tonic::Code::InvalidArgument, message, details)
        }
        None => tonic::Status::invalid_argument(message),
    }
}

impl From<MeshError> for tonic::Status {
    fn from(e: MeshError) -> Self {
        use tonic::Status;
        match e {
            MeshError::Invalid(m) => {
                let field = field_of(&m).map(str::to_string);
                invalid_argument(m, field.as_deref())
            }
            MeshError::Unavailable(m) => Status::unavailable(m),
            MeshError::Overloaded(m) => Status::resource_exhausted(m),
            MeshError::Precondition(m) => Status::failed_precondition(m),
            MeshError::NotFound(m) => Status::not_found(m),
            MeshError::Deadline(m) => Status::deadline_exceeded(m),
            MeshError::Unauthenticated(m) => Status::unauthenticated(m),
            MeshError::PermissionDenied(m) => Status::permission_denied(m),
            MeshError::Registry(m) => Status::unavailable(format!("registry: {m}")),
            MeshError::Engine(EngineError::InvalidInput(m)) => {
                let field = field_of(&m).map(str::to_string);
                invalid_argument(EngineError::InvalidInput(m).to_string(), field.as_deref())
            }
            MeshError::Engine(e) => match e.kind() {
                ErrorKind::Invalid => Status::invalid_argument(e.to_string()),
                ErrorKind::Unavailable => Status::unavailable(e.to_string()),
                ErrorKind::Exhausted => Status::resource_exhausted(e.to_string()),
                ErrorKind::Precondition => Status::failed_precondition(e.to_string()),
                ErrorKind::Internal => {
                    tracing::error!(error = %e, "engine failure");
                    Status::internal("internal engine error")
                }
            },
            MeshError::Peer { peer, status } => match status.code() {
                tonic::Code::InvalidArgument
                | tonic::Code::Unavailable
                | tonic::Code::ResourceExhausted
                | tonic::Code::FailedPrecondition
                | tonic::Code::DeadlineExceeded => {
                    Status::new(status.code(), format!("{peer}: {}", status.message()))
                }
                _ => {
                    tracing::error!(%peer, %status, "peer failure");
                    Status::unavailable(format!("{peer} failed"))
                }
            },
            MeshError::Internal(m) => {
                tracing::error!(error = %m, "internal failure");
                Status::internal("internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    fn status(e: impl Into<MeshError>) -> Status {
        Status::from(e.into())
    }

    #[test]
    fn each_variant_has_its_code_and_keeps_its_message() {
        let cases = [
            (
                MeshError::Invalid("max_tokens 0".into()),
                Code::InvalidArgument,
            ),
            (
                MeshError::Unavailable("no live gate".into()),
                Code::Unavailable,
            ),
            (
                MeshError::Overloaded("queue full".into()),
                Code::ResourceExhausted,
            ),
            (
                MeshError::Precondition("unknown seq 7".into()),
                Code::FailedPrecondition,
            ),
            (
                MeshError::Deadline("deadline passed".into()),
                Code::DeadlineExceeded,
            ),
            (
                MeshError::NotFound("model \"x\" is not served here".into()),
                Code::NotFound,
            ),
            (
                MeshError::Unauthenticated("missing key".into()),
                Code::Unauthenticated,
            ),
            (
                MeshError::PermissionDenied("not this method".into()),
                Code::PermissionDenied,
            ),
        ];
        for (err, code) in cases {
            let message = err.to_string();
            let s = status(err);
            assert_eq!(s.code(), code, "{message}");
            assert_eq!(s.message(), message);
        }
        let s = status(MeshError::Registry("etcd is down".into()));
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unavailable, "registry: etcd is down")
        );
    }

    /// The field a client decodes from the status's details.
    fn violation(s: &Status) -> Option<String> {
        let b = s.get_details_bad_request()?;
        assert_eq!(b.field_violations.len(), 1);
        Some(b.field_violations[0].field.clone())
    }

    #[test]
    fn invalid_arguments_carry_the_field_as_a_bad_request_violation() {
        let cases = [
            (
                "sampling.n: 17 choices, the limit is 16",
                Some("sampling.n"),
            ),
            (
                "stopping.max_new_tokens must be between 1 and 4096, got 0",
                Some("stopping.max_new_tokens"),
            ),
            (
                "stopping.stop_token_ids[1]: token id 129280 is outside",
                Some("stopping.stop_token_ids[1]"),
            ),
            ("prompt: empty", Some("prompt")),
            ("the frontend needs gates: give --etcd", None),
            ("request body: not JSON", None),
            ("--step-token-budget (1) must be at least 2", None),
        ];
        for (message, field) in cases {
            let s = status(MeshError::Invalid(message.into()));
            assert_eq!((s.code(), s.message()), (Code::InvalidArgument, message));
            assert_eq!(violation(&s).as_deref(), field, "{message}");
        }
        let s = status(EngineError::InvalidInput(
            "tokens.ids[0]: token id 9 is outside".into(),
        ));
        assert_eq!(violation(&s).as_deref(), Some("tokens.ids[0]"));
        assert_eq!(
            s.message(),
            "invalid input: tokens.ids[0]: token id 9 is outside"
        );
        let description = s
            .get_details_bad_request()
            .expect("details")
            .field_violations[0]
            .description
            .clone();
        assert_eq!(description, s.message());
    }

    #[test]
    fn engine_errors_map_by_kind() {
        let s = status(EngineError::InvalidInput("token id 9 is outside".into()));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "invalid input: token id 9 is outside");
        let s = status(EngineError::KvExhausted("no free blocks".into()));
        assert_eq!(s.code(), Code::ResourceExhausted);
        let s = status(EngineError::ExpertsUnavailable(
            "layer 3: no live worker".into(),
        ));
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unavailable, "layer 3: no live worker")
        );
    }

    #[test]
    fn internal_faults_are_internal_and_say_nothing_more() {
        for e in [
            EngineError::KvCache("decode batch: KV blocks were not reserved".into()),
            EngineError::NotLoaded("this process did not load the embedding table".into()),
        ] {
            let s = status(e);
            assert_eq!(s.code(), Code::Internal);
            assert_eq!(s.message(), "internal engine error");
        }
        let s = status(MeshError::Internal("lock poisoned at step 9".into()));
        assert_eq!((s.code(), s.message()), (Code::Internal, "internal error"));
    }

    #[test]
    fn peer_statuses_pass_through_only_when_actionable() {
        let peer = |status| MeshError::Peer {
            peer: "gate g1".into(),
            status,
        };
        let s = status(peer(Status::resource_exhausted("kv full")));
        assert_eq!(
            (s.code(), s.message()),
            (Code::ResourceExhausted, "gate g1: kv full")
        );
        let s = status(peer(Status::internal("panic at step.rs:9")));
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unavailable, "gate g1 failed")
        );
    }
}
