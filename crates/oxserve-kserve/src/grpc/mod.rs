//! KServe v2 / Triton gRPC front-end: `inference.GRPCInferenceService` over tonic.
//!
//! Wire messages live in [`pb`] (generated from `proto/inference/grpc_service.proto`);
//! [`convert`] turns them into oxserve's domain types and back; [`status`] maps every
//! [`oxserve_core::ErrorKind`] to a gRPC code once; [`grpc_service`] wires the engine facade
//! to the generated server.

mod contents;
pub mod convert;
mod params;
mod service;
pub mod status;

pub use params::{WireParams, params_to_wire};
pub use service::{GrpcFrontend, GrpcOptions, GrpcServer, grpc_service, grpc_service_with_options};

/// Messages, server and client generated from `proto/inference/grpc_service.proto`. The
/// model configuration types come from [`oxserve_repository::pb`].
pub mod pb {
    // Generated code: its style (and the doc comments copied from the proto) is not ours to lint.
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("inference");

    pub use grpc_inference_service_client::GrpcInferenceServiceClient;
    pub use grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
}
