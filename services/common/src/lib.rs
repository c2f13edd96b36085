//! Shared by the frontend, gate and expert services: the registry (etcd or static), the wire
//! codec for tensors, the error type and its one mapping to gRPC statuses, and the serving
//! boilerplate (health, reflection, shutdown, the readiness line), and TLS on every hop.

pub mod codec;
pub mod device;
pub mod error;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod layers;
pub mod limits;
pub mod member_args;
pub mod memory_plan;
pub mod metrics;
pub mod placement;
pub mod registry;
pub mod reload;
pub mod serve;
pub mod skew;
pub mod telemetry;
pub mod tls;
pub mod transport;

pub use error::{MeshError, MeshResult};
