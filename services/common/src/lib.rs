//! Shared by the frontend, gate and expert services: the registry (etcd or static), the wire
//! codec for tensors, the error type and its one mapping to gRPC statuses, and the serving
//! boilerplate (health, reflection, shutdown, the readiness line).

pub mod codec;
pub mod device;
pub mod error;
pub mod layers;
pub mod member_args;
pub mod metrics;
pub mod registry;
pub mod serve;

pub use error::{MeshError, MeshResult};
