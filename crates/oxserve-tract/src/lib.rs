//! The `tract` backend: runs ONNX models with [tract](https://github.com/sonos/tract), a pure
//! Rust engine, so oxserve serves ONNX with nothing else installed.
//!
//! - `inspect` reads the declared inputs and outputs straight from the protobuf.
//! - `load` checks the model configuration against the file, pins every input's type and
//!   shape (one symbol for the batch dimension shared by all inputs), then analyses, optimises
//!   and plans the model, so unsupported operators and shape errors fail the load, not a
//!   request.
//! - Each instance keeps one tract state and runs single-threaded; the scheduler decides how
//!   many instances share the cores.
//!
//! What tract cannot run: BF16 tensors (tract has no bfloat16 type) and operators outside its
//! ONNX operator set; both are reported as `Unsupported` at load time. BYTES tensors are
//! exchanged as tract `String`s, so their elements must be UTF-8.

mod convert;
mod error;
mod instance;
mod model;
mod signature;

use std::path::Path;

use oxserve_backend::{Backend, BackendError, LoadSpec, LoadedModel, ModelSignature};

/// The tract ONNX backend. Stateless: every loaded model owns what it needs.
#[derive(Debug, Default, Clone, Copy)]
pub struct TractBackend;

impl TractBackend {
    pub fn new() -> Self {
        TractBackend
    }
}

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn inspect(&self, model_path: &Path) -> Result<ModelSignature, BackendError> {
        signature::inspect(model_path)
    }

    fn load(&self, spec: &LoadSpec) -> Result<Box<dyn LoadedModel>, BackendError> {
        Ok(Box::new(model::load(spec)?))
    }
}
