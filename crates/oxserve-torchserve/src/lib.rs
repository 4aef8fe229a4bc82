//! TorchServe compatibility: its inference API (`/ping`, `/predictions/...`), management API
//! (`/models...`), model archives (`.mar`) and default handlers, served natively over the
//! engine (no Java, no Python worker for the native image_classifier handler); custom Python
//! handlers run in TorchServe's own Python workers ([`worker`]). See docs/torchserve.md.

pub mod api;
pub mod fetch;
pub mod grpc;
pub mod handler;
pub mod host;
pub mod mar;
mod multipart;
pub mod openapi;
pub mod registry;
pub mod worker;

pub use api::{inference_router, management_router};
pub use registry::{Registration, TorchServe};
