//! The services' error type and its single conversion into a gRPC status. Messages name the
//! field, limit, expert or peer involved; details of internal failures are logged, not leaked.

use moemesh_engine::{EngineError, ErrorKind};

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
    /// The caller's deadline passed (DEADLINE_EXCEEDED).
    #[error("{0}")]
    Deadline(String),
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

impl From<MeshError> for tonic::Status {
    fn from(e: MeshError) -> Self {
        use tonic::Status;
        match e {
            MeshError::Invalid(m) => Status::invalid_argument(m),
            MeshError::Unavailable(m) => Status::unavailable(m),
            MeshError::Overloaded(m) => Status::resource_exhausted(m),
            MeshError::Precondition(m) => Status::failed_precondition(m),
            MeshError::Deadline(m) => Status::deadline_exceeded(m),
            MeshError::Registry(m) => Status::unavailable(format!("registry: {m}")),
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
