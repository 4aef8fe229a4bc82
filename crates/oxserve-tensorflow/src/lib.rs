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
//!   else the server's defaults ([`TfOptions`]), else TensorFlow's (one per core). TensorFlow
//!   keeps one intra-op and one inter-op pool per process, made with the options of the first
//!   session loaded: later models share them whatever their own settings (TF Serving alike).
//! - Idle pool threads sleep rather than spin (`parameters { key: "allow_thread_spinning" }`
//!   turns TensorFlow's spinning back on), as the ONNX Runtime engine's do: a spinning pool
//!   burns the cores the protocol threads, other instances and other models need, and on the
//!   benchmark machine it cost 5–32 % more server CPU per request for no throughput
//!   (BENCHMARKS.md, "TensorFlow and TF Serving").

mod api;
mod handles;
pub mod library;
mod model;
pub mod savedmodel;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use oxserve_backend::support::{bool_parameter, invalid_model, unsupported};
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
            thread_spinning: spec
                .parameters
                .get("allow_thread_spinning")
                .map(|v| bool_parameter("allow_thread_spinning", v))
                .transpose()?
                .unwrap_or(false),
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn spec(parameters: &[(&str, &str)]) -> LoadSpec {
        LoadSpec {
            model_name: "m".into(),
            version: 1,
            model_path: PathBuf::from("/nonexistent"),
            inputs: Vec::new(),
            outputs: Vec::new(),
            max_batch_size: 0,
            instance_count: 1,
            devices: Vec::new(),
            graph_optimization_level: 0,
            parameters: parameters
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            gpu_accelerators: Vec::new(),
        }
    }

    #[test]
    fn thread_spinning_is_off_unless_a_parameter_turns_it_on() {
        let backend = TfBackend::new(TfOptions::default());
        assert!(!backend.settings(&spec(&[])).unwrap().thread_spinning);
        assert!(
            backend
                .settings(&spec(&[("allow_thread_spinning", "true")]))
                .unwrap()
                .thread_spinning
        );
        assert!(
            !backend
                .settings(&spec(&[("allow_thread_spinning", "0")]))
                .unwrap()
                .thread_spinning
        );
        let err = backend
            .settings(&spec(&[("allow_thread_spinning", "sometimes")]))
            .unwrap_err();
        assert!(err.to_string().contains("allow_thread_spinning"), "{err}");
    }
}
