//! The model table and the lifecycle path that fills it: scan the repositories, complete and
//! check each configuration, load each selected version and start its instances. A model that
//! fails is recorded with its reason; the others serve.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use oxserve_backend::{Backend, LoadSpec};
use oxserve_core::{DataType, Error, ModelMetadata, Result, TensorMeta};
use oxserve_repository::pb::ModelConfig;
use oxserve_repository::pb::model_instance_group::Kind;
use oxserve_repository::{self as repo, ModelDir};
use oxserve_scheduler::{InstancePool, PoolOptions};

use crate::autocomplete::{self, model_facing_shape};
use crate::model::{InputSpec, ModelIo, OutputSpec, ServedVersion};

#[derive(Debug, Clone)]
pub struct ManagerOptions {
    pub repositories: Vec<PathBuf>,
    /// Jobs that may wait per model version before requests are shed with 429.
    pub queue_capacity: usize,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        ManagerOptions {
            repositories: Vec::new(),
            queue_capacity: 1024,
        }
    }
}

pub(crate) enum VersionState {
    Ready(Arc<ServedVersion>),
    Unavailable(String),
}

#[derive(Default)]
pub(crate) struct ModelRecord {
    pub versions: BTreeMap<u64, VersionState>,
    /// Why the model as a whole could not load (bad config, no versions, ...).
    pub error: Option<String>,
}

impl ModelRecord {
    fn failed(reason: String) -> Self {
        ModelRecord {
            versions: BTreeMap::new(),
            error: Some(reason),
        }
    }
}

#[derive(Default)]
pub(crate) struct ModelTable {
    pub models: BTreeMap<String, ModelRecord>,
}

/// Owns the model table. Readers take a snapshot without locking.
pub struct ModelManager {
    table: ArcSwap<ModelTable>,
    backends: Vec<Arc<dyn Backend>>,
    options: ManagerOptions,
}

impl ModelManager {
    pub fn new(backends: Vec<Arc<dyn Backend>>, options: ManagerOptions) -> Self {
        ModelManager {
            table: ArcSwap::from_pointee(ModelTable::default()),
            backends,
            options,
        }
    }

    pub(crate) fn snapshot(&self) -> arc_swap::Guard<Arc<ModelTable>> {
        self.table.load()
    }

    /// Loads every model of every repository (blocking; run it off the async runtime).
    pub fn load_all(&self) {
        let mut table = ModelTable::default();
        for root in &self.options.repositories {
            let dirs = match repo::list_models(root) {
                Ok(dirs) => dirs,
                Err(e) => {
                    tracing::error!(repository = %root.display(), error = %e, "cannot read model repository");
                    continue;
                }
            };
            for dir in dirs {
                if table.models.contains_key(&dir.name) {
                    let reason = format!(
                        "model '{}' is in more than one repository (again in {})",
                        dir.name,
                        root.display()
                    );
                    tracing::error!(model = %dir.name, "{reason}");
                    table.models.insert(dir.name.clone(), ModelRecord::failed(reason));
                    continue;
                }
                let record = self.load_model(&dir);
                table.models.insert(dir.name.clone(), record);
            }
        }
        self.table.store(Arc::new(table));
    }

    fn load_model(&self, dir: &ModelDir) -> ModelRecord {
        let started = Instant::now();
        let config = match repo::read_model_config(dir) {
            Ok(cfg) => cfg,
            Err(e) => return self.model_failed(&dir.name, e.to_string()),
        };
        let backend = match self.select_backend(&config) {
            Ok(b) => b,
            Err(reason) => return self.model_failed(&dir.name, reason),
        };
        let available = match repo::list_versions(&dir.path) {
            Ok(v) => v,
            Err(e) => return self.model_failed(&dir.name, e.to_string()),
        };
        let selected = repo::select_versions(config.version_policy.as_ref(), &available);
        if selected.is_empty() {
            return self.model_failed(
                &dir.name,
                format!("no version directory matches the version policy (found {available:?})"),
            );
        }
        let mut record = ModelRecord::default();
        for version in selected {
            let state = match self.load_version(dir, version, &config, backend.as_ref()) {
                Ok(served) => {
                    tracing::info!(
                        model = %dir.name, version, backend = backend.name(),
                        reason = "ONNX model; tract is the built-in ONNX engine",
                        load_ms = started.elapsed().as_millis() as u64,
                        "model version ready"
                    );
                    VersionState::Ready(Arc::new(served))
                }
                Err(reason) => {
                    tracing::error!(model = %dir.name, version, %reason, "model version failed to load");
                    VersionState::Unavailable(reason)
                }
            };
            record.versions.insert(version, state);
        }
        record
    }

    fn model_failed(&self, name: &str, reason: String) -> ModelRecord {
        tracing::error!(model = %name, %reason, "model failed to load");
        ModelRecord::failed(reason)
    }

    /// ONNX models run on the built-in tract engine; other formats need engines that are not
    /// compiled in yet, which is a load error, not a silent fallback.
    fn select_backend(&self, cfg: &ModelConfig) -> Result<Arc<dyn Backend>, String> {
        let wanted = match (cfg.platform.as_str(), cfg.backend.as_str()) {
            ("" | "onnxruntime_onnx", "" | "onnxruntime" | "tract") => "tract",
            (platform, "") => return Err(format!("platform '{platform}' is not supported by this server")),
            (_, backend) => return Err(format!("backend '{backend}' is not available in this server")),
        };
        self.backends
            .iter()
            .find(|b| b.name() == wanted)
            .cloned()
            .ok_or_else(|| format!("backend '{wanted}' is not registered"))
    }

    fn load_version(
        &self,
        dir: &ModelDir,
        version: u64,
        base: &ModelConfig,
        backend: &dyn Backend,
    ) -> Result<ServedVersion, String> {
        let model_path = repo::model_file_path(&dir.path, version, base);
        let signature = backend.inspect(&model_path).map_err(|e| e.to_string())?;
        let mut config = base.clone();
        autocomplete::complete(&mut config, &signature)?;
        autocomplete::fill_defaults(&mut config);
        if let Some(g) = config.instance_group.iter().find(|g| g.kind == Kind::Gpu as i32) {
            return Err(format!(
                "instance group '{}' asks for KIND_GPU, but the {} engine runs on CPU only",
                g.name,
                backend.name()
            ));
        }
        if config.platform.is_empty() {
            config.platform = "onnxruntime_onnx".into();
        }
        config.backend = backend.name().into();
        repo::validate_config(&config).map_err(|e| e.to_string())?;
        autocomplete::check(&config, &signature)?;
        let io = model_io(&config, &dir.path)?;
        let batched = config.max_batch_size > 0;
        let spec = LoadSpec {
            model_name: dir.name.clone(),
            version,
            model_path,
            inputs: config
                .input
                .iter()
                .map(|i| {
                    tensor_meta(
                        &i.name,
                        i.data_type,
                        model_facing_shape(&i.dims, i.reshape.as_ref(), batched),
                    )
                })
                .collect::<Result<_, _>>()?,
            outputs: config
                .output
                .iter()
                .map(|o| {
                    tensor_meta(
                        &o.name,
                        o.data_type,
                        model_facing_shape(&o.dims, o.reshape.as_ref(), batched),
                    )
                })
                .collect::<Result<_, _>>()?,
            max_batch_size: config.max_batch_size as u32,
            instance_count: instance_count(&config),
            parameters: config
                .parameters
                .iter()
                .map(|(k, v)| (k.clone(), v.string_value.clone()))
                .collect(),
        };
        let loaded = backend.load(&spec).map_err(|e| e.to_string())?;
        let pool = InstancePool::start(
            Arc::from(loaded),
            &PoolOptions {
                instances: spec.instance_count,
                queue_capacity: self.options.queue_capacity,
                thread_name: format!("{}-v{version}", dir.name),
            },
        )
        .map_err(|e| e.to_string())?;
        let metadata = metadata(&dir.name, version, &config, &io);
        Ok(ServedVersion {
            model_name: dir.name.clone(),
            version,
            config: Arc::new(config),
            io,
            metadata,
            pool,
        })
    }
}

fn instance_count(cfg: &ModelConfig) -> usize {
    let total: i64 = cfg.instance_group.iter().map(|g| i64::from(g.count.max(1))).sum();
    usize::try_from(total).unwrap_or(1).max(1)
}

fn data_type(name: &str, code: i32) -> Result<DataType, String> {
    repo::data_type_of(code).ok_or_else(|| format!("tensor '{name}' has an invalid data_type"))
}

fn tensor_meta(name: &str, code: i32, shape: Vec<i64>) -> Result<TensorMeta, String> {
    Ok(TensorMeta {
        name: name.to_string(),
        datatype: data_type(name, code)?,
        shape,
    })
}

fn model_io(cfg: &ModelConfig, model_dir: &Path) -> Result<ModelIo, String> {
    let inputs = cfg
        .input
        .iter()
        .map(|i| {
            if i.optional {
                return Err(format!(
                    "input '{}': optional inputs are not supported by the tract engine",
                    i.name
                ));
            }
            Ok(InputSpec {
                name: i.name.clone(),
                datatype: data_type(&i.name, i.data_type)?,
                dims: i.dims.clone(),
                reshape: i.reshape.as_ref().map(|r| r.shape.clone()),
            })
        })
        .collect::<Result<_, String>>()?;
    let outputs = cfg
        .output
        .iter()
        .map(|o| {
            let labels = if o.label_filename.is_empty() {
                None
            } else {
                let labels = repo::read_labels(model_dir, &o.label_filename).map_err(|e| e.to_string())?;
                Some(Arc::new(labels))
            };
            Ok(OutputSpec {
                name: o.name.clone(),
                datatype: data_type(&o.name, o.data_type)?,
                dims: o.dims.clone(),
                reshape: o.reshape.as_ref().map(|r| r.shape.clone()),
                labels,
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(ModelIo {
        max_batch_size: usize::try_from(cfg.max_batch_size).unwrap_or(0),
        inputs,
        outputs,
    })
}

fn metadata(name: &str, version: u64, cfg: &ModelConfig, io: &ModelIo) -> ModelMetadata {
    let batched = io.max_batch_size > 0;
    let client_shape = |dims: &[i64]| -> Vec<i64> {
        if batched {
            std::iter::once(-1).chain(dims.iter().copied()).collect()
        } else {
            dims.to_vec()
        }
    };
    ModelMetadata {
        name: name.to_string(),
        versions: vec![version.to_string()],
        platform: cfg.platform.clone(),
        inputs: io
            .inputs
            .iter()
            .map(|i| TensorMeta {
                name: i.name.clone(),
                datatype: i.datatype,
                shape: client_shape(&i.dims),
            })
            .collect(),
        outputs: io
            .outputs
            .iter()
            .map(|o| TensorMeta {
                name: o.name.clone(),
                datatype: o.datatype,
                shape: client_shape(&o.dims),
            })
            .collect(),
    }
}

impl ModelTable {
    /// The version a request addresses: the given one, or the highest ready one.
    pub(crate) fn resolve(&self, name: &str, version: Option<u64>) -> Result<Arc<ServedVersion>> {
        let Some(record) = self.models.get(name) else {
            return Err(Error::not_found(format!("unknown model '{name}'")));
        };
        match version {
            Some(v) => match record.versions.get(&v) {
                Some(VersionState::Ready(served)) => Ok(Arc::clone(served)),
                Some(VersionState::Unavailable(reason)) => Err(Error::unavailable(format!(
                    "model '{name}' version {v} is not ready: {reason}"
                ))),
                None => Err(Error::not_found(format!("unknown version {v} of model '{name}'"))),
            },
            None => record
                .versions
                .values()
                .rev()
                .find_map(|s| match s {
                    VersionState::Ready(served) => Some(Arc::clone(served)),
                    VersionState::Unavailable(_) => None,
                })
                .ok_or_else(|| {
                    let reason = record.error.as_deref().unwrap_or("no version is ready");
                    Error::unavailable(format!("model '{name}' is not ready: {reason}"))
                }),
        }
    }
}
