//! The `tensorflow` backend: TensorFlow SavedModels on TensorFlow's own runtime, through its C
//! API.
//!
//! The library (`libtensorflow_cc.so.2`, next to `libtensorflow_framework.so.2`, as the PyPI
//! `tensorflow-cpu` wheel ships them) is opened at run time, not linked: oxserve builds and
//! runs without it, and a missing library is a load error for TensorFlow models only (see
//! [`library`] for where it is looked for).
//!
//! - A model version is a SavedModel directory. It is loaded once per version, with the tags
//!   of `parameters { key: "saved_model_tags" }` (default `serve`), and its signatures are read
//!   from the MetaGraphDef TensorFlow returns: never hard-coded tensor names.
//! - The default signature (`serving_default`, else the first by name) is the model's inputs
//!   and outputs; every other signature is an entry point a request can pick.
//! - All instances share the one session (TensorFlow runs a session from several threads at
//!   once), so N instances cost threads, not N copies of the weights.
//! - Threads: `intra_op_parallelism_threads` / `inter_op_parallelism_threads` model parameters,
//!   else the server's defaults ([`TfOptions`]), else TensorFlow's (one per core).

mod api;
mod handles;
pub mod library;
mod model;
pub mod savedmodel;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use oxserve_backend::support::{invalid_model, unsupported};
use oxserve_backend::{Backend, BackendError, BackendErrorKind, LoadSpec, LoadedModel, ModelSignature};

/// Engine settings from the server's configuration.
#[derive(Debug, Clone, Default)]
pub struct TfOptions {
    /// The library file (or the directory holding it); `None` = look for it (see [`library`]).
    pub library: Option<PathBuf>,
    /// Default intra-op / inter-op thread counts (0 = TensorFlow's choice); TF Serving's
    /// `--tensorflow_intra_op_parallelism` / `--tensorflow_inter_op_parallelism`.
    pub intra_op_threads: i32,
    pub inter_op_threads: i32,
}

/// The TensorFlow backend. The library is loaded on first use and kept for the process.
#[derive(Default)]
pub struct TfBackend {
    options: TfOptions,
    api: OnceLock<Result<Arc<api::Api>, String>>,
}

impl std::fmt::Debug for TfBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TfBackend")
            .field("options", &self.options)
            .field("loaded", &self.api.get().map(|r| r.is_ok()))
            .finish()
    }
}

/// The engine's name, as in config.pbtxt's `backend` field.
pub const NAME: &str = "tensorflow";

impl TfBackend {
    pub fn new(options: TfOptions) -> Self {
        TfBackend {
            options,
            api: OnceLock::new(),
        }
    }

    fn api(&self) -> Result<&Arc<api::Api>, BackendError> {
        let loaded = self.api.get_or_init(|| {
            let result = library::resolve(self.options.library.as_deref())
                .and_then(|(path, source)| {
                    api::Api::load(&path).map_err(|e| format!("{e} ({})", source.describe()))
                })
                .map(Arc::new);
            match &result {
                Ok(api) => tracing::info!(library = %api.library.display(), version = %api.version, "TensorFlow loaded"),
                Err(reason) => tracing::warn!(%reason, "TensorFlow is not available"),
            }
            result
        });
        loaded
            .as_ref()
            .map_err(|reason| BackendError::new(BackendErrorKind::Unsupported, reason.clone()))
    }

    /// The library in use, once loaded.
    pub fn library_path(&self) -> Option<&Path> {
        match self.api.get() {
            Some(Ok(api)) => Some(&api.library),
            _ => None,
        }
    }

    fn settings(&self, spec: &LoadSpec) -> Result<model::SessionSettings, BackendError> {
        let threads = |key: &str, default: i32| -> Result<i32, BackendError> {
            match spec.parameters.get(key) {
                None => Ok(default),
                Some(v) => v.trim().parse::<i32>().ok().filter(|n| *n >= 0).ok_or_else(|| {
                    invalid_model(format!(
                        "parameter '{key}' must be a non-negative integer, got '{v}'"
                    ))
                }),
            }
        };
        let tags = match spec.parameters.get("saved_model_tags") {
            Some(t) => t
                .split(',')
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect(),
            None => vec!["serve".to_string()],
        };
        Ok(model::SessionSettings {
            tags,
            intra_op_threads: threads("intra_op_parallelism_threads", self.options.intra_op_threads)?,
            inter_op_threads: threads("inter_op_parallelism_threads", self.options.inter_op_threads)?,
        })
    }
}

impl Backend for TfBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    /// The default signature, read from `saved_model.pb` (tag `serve`) without loading it.
    fn inspect(&self, model_path: &Path) -> Result<ModelSignature, BackendError> {
        let meta = savedmodel::read_meta_graph(model_path, &["serve".to_string()]).map_err(invalid_model)?;
        let (signatures, default) = savedmodel::signatures(&meta).map_err(invalid_model)?;
        let sig = signatures
            .into_iter()
            .find(|s| s.name == default)
            .ok_or_else(|| unsupported("no default signature"))?;
        Ok(ModelSignature {
            inputs: sig.inputs.into_iter().map(|(m, _)| m).collect(),
            outputs: sig.outputs.into_iter().map(|(m, _)| m).collect(),
        })
    }

    fn load(&self, spec: &LoadSpec) -> Result<Box<dyn LoadedModel>, BackendError> {
        let api = Arc::clone(self.api()?);
        let settings = self.settings(spec)?;
        Ok(Box::new(model::load(api, spec, &settings)?))
    }

    fn availability(&self) -> Result<String, BackendError> {
        self.api()
            .map(|api| format!("TensorFlow {} from {}", api.version, api.library.display()))
    }
}
