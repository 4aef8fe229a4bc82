//! KServe v2 / Open Inference Protocol front-end with Triton's extensions, over HTTP (axum)
//! and gRPC (tonic). Decodes the wire into oxserve's domain types, calls the engine facade and
//! encodes the answer; each error kind maps to a status once per protocol.

pub mod grpc;
pub mod http;
pub mod logging;
mod repository;
pub mod trace;
