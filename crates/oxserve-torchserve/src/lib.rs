//! TorchServe compatibility: its inference API (`/ping`, `/predictions/...`), management API
//! (`/models...`), model archives (`.mar`) and default handlers, served natively over the
//! engine (no Java, no Python worker for the default handlers). See docs/torchserve.md.

pub mod api;
pub mod handler;
pub mod mar;
mod multipart;
pub mod openapi;
pub mod registry;

pub use api::{inference_router, management_router};
pub use registry::{Registration, TorchServe};
