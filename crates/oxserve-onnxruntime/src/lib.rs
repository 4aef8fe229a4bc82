//! The `onnxruntime` backend: runs ONNX models with [ONNX Runtime](https://onnxruntime.ai)
//! through the [`ort`] bindings.
//!
//! The ONNX Runtime library is opened at run time, not linked (see [`library`] for where it
//! is looked for), so oxserve builds and runs without it: a missing or wrong library is an
//! error when a model that needs it loads, and the model is reported unavailable with that
//! reason while models on other engines keep serving.
//!
//! - `inspect` reads the inputs and outputs from a session's metadata (a quick session without
//!   graph optimizations).
//! - `load` builds the first instance's session (so a corrupt file, an operator ONNX Runtime
//!   lacks, or a configuration that disagrees with the model fails the load) and checks the
//!   configuration against the session's inputs and outputs.
//! - Each instance owns one session; thread counts, execution mode and graph optimization
//!   level come from the model configuration ([`options`]).
//! - `instance_group { kind: KIND_GPU }` uses the CUDA execution provider, which needs the
//!   `onnxruntime-gpu` library; with another library it is a load error.
//!
//! Every ONNX Runtime element type oxserve has a wire type for is served, BF16 and FP16
//! included. BYTES elements may hold any bytes except NUL on the way in.

mod convert;
mod cuda;
mod error;
mod instance;
pub mod library;
mod model;
pub mod options;
mod padding;
#[cfg(test)]
mod test_spec;
mod types;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use oxserve_backend::{Backend, BackendError, BackendErrorKind, LoadSpec, LoadedModel, ModelSignature};

use crate::library::Runtime;
pub use crate::library::{DYLIB_ENV, LibrarySource, resolve_library};

/// Where to find the ONNX Runtime library.
#[derive(Debug, Clone, Default)]
pub struct OrtOptions {
    /// An explicit library path (command line or configuration file). `None`: `ORT_DYLIB_PATH`,
    /// then auto-detection.
    pub library: Option<PathBuf>,
}

/// The ONNX Runtime backend. The library is loaded on first use and kept for the process.
#[derive(Default)]
pub struct OrtBackend {
    options: OrtOptions,
    runtime: OnceLock<Result<Arc<Runtime>, String>>,
}

impl std::fmt::Debug for OrtBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtBackend")
            .field("options", &self.options)
            .field("loaded", &self.runtime.get().map(|r| r.is_ok()))
            .finish()
    }
}

impl OrtBackend {
    pub fn new(options: OrtOptions) -> Self {
        OrtBackend {
            options,
            runtime: OnceLock::new(),
        }
    }

    /// The loaded runtime, loading it on first use. The outcome, success or failure, is kept:
    /// a library that failed to load is not retried.
    fn runtime(&self) -> Result<&Arc<Runtime>, BackendError> {
        let result = self.runtime.get_or_init(|| {
            let loaded = resolve_library(self.options.library.as_deref())
                .and_then(|(path, source)| library::load(&path, source));
            match &loaded {
                Ok(runtime) => tracing::info!(
                    library = %runtime.library.display(),
                    version = %runtime.version,
                    cuda = runtime.cuda,
                    "ONNX Runtime loaded"
                ),
                Err(reason) => tracing::warn!(%reason, "ONNX Runtime is not available"),
            }
            loaded
        });
        result
            .as_ref()
            .map_err(|reason| BackendError::new(BackendErrorKind::Unsupported, reason.clone()))
    }

    /// The library file in use, once loaded.
    pub fn library_path(&self) -> Option<&Path> {
        match self.runtime.get() {
            Some(Ok(runtime)) => Some(&runtime.library),
            _ => None,
        }
    }
}

impl Backend for OrtBackend {
    fn name(&self) -> &'static str {
        "onnxruntime"
    }

    fn inspect(&self, model_path: &Path) -> Result<ModelSignature, BackendError> {
        model::inspect(self.runtime()?, model_path)
    }

    fn load(&self, spec: &LoadSpec) -> Result<Box<dyn LoadedModel>, BackendError> {
        let runtime = Arc::clone(self.runtime()?);
        Ok(Box::new(model::load(runtime, spec)?))
    }

    fn availability(&self) -> Result<String, BackendError> {
        self.runtime().map(|r| r.describe())
    }

    fn supports_gpu(&self) -> bool {
        true
    }

    fn gpu_runtime(&self) -> Result<String, String> {
        let runtime = self.runtime().map_err(|e| e.to_string())?;
        if runtime.cuda {
            Ok(format!(
                "CUDA execution provider in {}",
                runtime.library.display()
            ))
        } else {
            Err(format!(
                "the ONNX Runtime library {} has no CUDA execution provider",
                runtime.library.display()
            ))
        }
    }
}
