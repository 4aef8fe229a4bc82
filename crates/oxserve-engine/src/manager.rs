//! The model table and the lifecycle path that fills it: scan the repositories, complete and
//! check each configuration, load each selected version and start its instances. A model that
//! fails is recorded with its reason; the others serve.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use oxserve_backend::support::{panic_message, truncate};
use oxserve_backend::{Accelerator, Backend, Device, LoadSpec, ModelSignature};
use oxserve_core::{DataType, Error, ModelMetadata, Result, TensorMeta};
use oxserve_repository::pb::model_config::SchedulingChoice;
use oxserve_repository::pb::model_instance_group::Kind;
use oxserve_repository::pb::{ModelConfig, ModelParameter};
use oxserve_repository::{self as repo, ModelDir};
use oxserve_scheduler::Scheduler;

use crate::autocomplete::{self, model_facing_shape};
use crate::model::{InputSpec, ModelIo, OutputSpec, ServedVersion};
use crate::scheduling::scheduler_config;
use crate::stats::{Metrics, ModelStats};

#[derive(Debug, Clone)]
pub struct ManagerOptions {
    pub repositories: Vec<PathBuf>,
    /// Jobs that may wait per model version before requests are shed with 429.
    pub queue_capacity: usize,
    /// Triton's `--model-control-mode`: what is loaded at start-up and what may change later.
    pub control_mode: ControlMode,
    /// `--load-model`: the models loaded at start-up in explicit mode (`*`: all of them).
    pub startup_models: Vec<String>,
    /// Models defined by a list instead of repository directories (TF Serving's
    /// `--model_name`/`--model_base_path` and `--model_config_file`): each directory holds
    /// the version directories, and its configuration comes from the list, not config.pbtxt.
    pub listed_models: Vec<ListedModel>,
}

/// A model defined by the server's own configuration: where its versions are and how to
/// serve them.
#[derive(Debug, Clone, PartialEq)]
pub struct ListedModel {
    pub name: String,
    pub path: PathBuf,
    pub config: ModelConfig,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        ManagerOptions {
            repositories: Vec::new(),
            queue_capacity: 1024,
            control_mode: ControlMode::None,
            startup_models: Vec::new(),
            listed_models: Vec::new(),
        }
    }
}

/// Triton's model control modes (docs/model-repository.md, "Model control").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlMode {
    /// Everything at start-up; the repository is not read again and the load and unload
    /// requests are refused.
    None,
    /// Everything at start-up, then the repositories are scanned again every poll interval
    /// and changes are applied; the load and unload requests are refused.
    Poll,
    /// Only `--load-model` models at start-up; afterwards models change only through the load
    /// and unload requests.
    Explicit,
}

impl ControlMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlMode::None => "none",
            ControlMode::Poll => "poll",
            ControlMode::Explicit => "explicit",
        }
    }
}

impl std::str::FromStr for ControlMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Ok(ControlMode::None),
            "poll" => Ok(ControlMode::Poll),
            "explicit" => Ok(ControlMode::Explicit),
            other => Err(format!(
                "unknown model control mode '{other}' (none, poll or explicit)"
            )),
        }
    }
}

/// The engine chosen for a model and why (logged, and shown in its configuration as the
/// [`BACKEND_REASON_PARAMETER`] parameter).
struct Selection {
    backend: Arc<dyn Backend>,
    reason: String,
}

const ONNXRUNTIME: &str = "onnxruntime";
const TRACT: &str = "tract";
const TENSORFLOW: &str = "tensorflow";
const PYTORCH: &str = "pytorch";
/// The engine that runs Triton's ensembles (`platform: "ensemble"`).
pub const ENSEMBLE: &str = "ensemble";

/// The reason a version that was unloaded on purpose (replaced, removed, unloaded) gives in
/// the index: not a failure.
pub const UNLOADED_REASON: &str = "unloaded";

/// The model configuration parameter that says why the model runs on its engine.
pub const BACKEND_REASON_PARAMETER: &str = "oxserve_backend_reason";

/// The model configuration parameter that says where `KIND_AUTO` instance groups went.
pub const PLACEMENT_REASON_PARAMETER: &str = "oxserve_instance_placement_reason";

#[derive(Clone)]
pub(crate) enum VersionState {
    /// Loaded; it serves unless its instances gave up (see [`VersionState::serving`]).
    Ready(Arc<ServedVersion>),
    /// Being loaded for the first time (a version being reloaded keeps serving as `Ready`).
    Loading,
    /// Taken out of service; its in-flight and queued requests are finishing.
    Unloading,
    /// Taken out of service on purpose (an unload, or no longer selected) and gone.
    Unloaded,
    Unavailable(String),
}

impl VersionState {
    /// The version while it serves: loaded, and its instances have not given up after
    /// repeated failures.
    pub(crate) fn serving(&self) -> Option<&Arc<ServedVersion>> {
        match self {
            VersionState::Ready(served) if served.scheduler.failure().is_none() => Some(served),
            _ => None,
        }
    }

    /// Why the version does not serve: its load failed, or its instances gave up.
    pub(crate) fn unavailable_reason(&self) -> Option<&str> {
        match self {
            VersionState::Ready(served) => served.scheduler.failure(),
            VersionState::Loading => Some("loading"),
            VersionState::Unloading => Some("unloading"),
            VersionState::Unloaded => Some(UNLOADED_REASON),
            VersionState::Unavailable(reason) => Some(reason),
        }
    }

    /// The repository index's state name (Triton's).
    pub(crate) fn index_state(&self) -> &'static str {
        match self {
            VersionState::Ready(_) if self.serving().is_some() => "READY",
            VersionState::Loading => "LOADING",
            VersionState::Unloading => "UNLOADING",
            _ => "UNAVAILABLE",
        }
    }
}

#[derive(Default, Clone)]
pub(crate) struct ModelRecord {
    pub versions: BTreeMap<u64, VersionState>,
    /// Why the model as a whole could not load (bad config, no versions, ...).
    pub error: Option<String>,
    /// Why the last reload failed while the versions loaded before kept serving.
    pub reload_error: Option<String>,
    /// Unloaded on request (or its directory removed in poll mode): it stays in the index,
    /// UNAVAILABLE, and does not count against strict readiness.
    pub unloaded: bool,
    /// The files of a load request that carried them (Triton's `file:` parameters): the
    /// directory lives as long as the versions loaded from it.
    pub _override_dir: Option<Arc<tempfile::TempDir>>,
    /// Version labels, each with the versions it pointed at before (the last is current), so
    /// a rollback can step back. Set from config.pbtxt at each load, changed at run time.
    pub labels: BTreeMap<String, Vec<u64>>,
    /// The version a request without a version or label gets, when rolled back from the
    /// latest (cleared by the next load).
    pub default_pin: Option<u64>,
    /// How requests that name no version are spread over versions (config.pbtxt's
    /// `traffic_split`, or set at run time).
    pub split: Option<crate::traffic::TrafficSplit>,
    /// The candidate that also sees a share of the requests (config.pbtxt's `shadow`).
    pub shadow: Option<crate::traffic::ShadowTraffic>,
}

impl ModelRecord {
    /// The version a label points at now.
    pub(crate) fn label(&self, label: &str) -> Option<u64> {
        self.labels.get(label).and_then(|history| history.last().copied())
    }

    /// The highest serving version, optionally below `below`.
    pub(crate) fn latest_serving(&self, below: Option<u64>) -> Option<u64> {
        self.versions
            .iter()
            .rev()
            .filter(|(v, _)| below.is_none_or(|b| **v < b))
            .find(|(_, s)| s.serving().is_some())
            .map(|(v, _)| *v)
    }
}

impl ModelRecord {
    pub(crate) fn failed(reason: String) -> Self {
        ModelRecord {
            error: Some(reason),
            ..ModelRecord::default()
        }
    }
}

#[derive(Default, Clone)]
pub(crate) struct ModelTable {
    pub models: BTreeMap<String, ModelRecord>,
}

/// Owns the model table. Readers take a snapshot without locking; the lifecycle path
/// (`lifecycle.rs`) changes it one model at a time and publishes each change atomically.
pub struct ModelManager {
    pub(crate) table: Arc<ArcSwap<ModelTable>>,
    backends: Vec<Arc<dyn Backend>>,
    pub(crate) options: ManagerOptions,
    metrics: Arc<Metrics>,
    /// Loads and unloads run one at a time (requests never wait on it).
    pub(crate) lifecycle: parking_lot::Mutex<crate::lifecycle::PollState>,
    /// Versions taken out of the table, dropped once their last request has finished.
    pub(crate) retiring: crate::lifecycle::Retirement,
    /// During the start-up load, changes collect here and are published together at the end,
    /// so the first table clients see has every start-up model in its final state.
    pub(crate) staging: parking_lot::Mutex<Option<ModelTable>>,
    /// The models of [`ManagerOptions::listed_models`], as last replaced by
    /// [`ModelManager::set_model_list`].
    pub(crate) listed: parking_lot::RwLock<BTreeMap<String, ListedModel>>,
}

impl ModelManager {
    pub fn new(backends: Vec<Arc<dyn Backend>>, options: ManagerOptions) -> Self {
        let table = Arc::new(ArcSwap::from_pointee(ModelTable::default()));
        ModelManager {
            retiring: crate::lifecycle::Retirement::start(Arc::clone(&table)),
            table,
            backends,
            metrics: Arc::new(Metrics::new()),
            lifecycle: parking_lot::Mutex::new(Default::default()),
            staging: parking_lot::Mutex::new(None),
            listed: parking_lot::RwLock::new(
                options
                    .listed_models
                    .iter()
                    .map(|m| (m.name.clone(), m.clone()))
                    .collect(),
            ),
            options,
        }
    }

    pub fn control_mode(&self) -> ControlMode {
        self.options.control_mode
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub(crate) fn snapshot(&self) -> arc_swap::Guard<Arc<ModelTable>> {
        self.table.load()
    }

    /// The start-up load (blocking; run it off the async runtime): every model of every
    /// repository, or in explicit mode only `--load-model` ones. Each model is loaded as a
    /// later load request would load it, so start-up and reloads share one path.
    pub fn load_all(&self) {
        let (dirs, duplicates) = self.scan_repositories();
        let mut table = ModelTable::default();
        for (name, reason) in duplicates {
            tracing::error!(model = %name, "{reason}");
            table.models.insert(name, ModelRecord::failed(reason));
        }
        *self.staging.lock() = Some(table);
        let explicit = self.options.control_mode == ControlMode::Explicit;
        let all = !explicit || self.options.startup_models.iter().any(|m| m == "*");
        for name in &self.options.startup_models {
            if explicit && name != "*" && !dirs.contains_key(name) {
                let reason =
                    format!("failed to load '{name}': no model directory '{name}' in the model repositories");
                tracing::error!(model = %name, "{reason}");
                self.publish(name, |_| ModelRecord::failed(reason.clone()));
            }
        }
        for (name, dir) in &dirs {
            if all || self.options.startup_models.contains(name) {
                self.remember_applied(name, crate::lifecycle::fingerprint_dir(&dir.path));
                // Start-up failures are in the index with their reasons; the rest serve.
                let _ = self.load_dir_inner(dir, None, None);
            }
        }
        if let Some(table) = self.staging.lock().take() {
            self.table.store(Arc::new(table));
        }
    }

    /// The model directories of every repository by name, and the names found in more than
    /// one repository (a load error for those models, with the reason).
    pub(crate) fn scan_repositories(&self) -> (BTreeMap<String, ModelDir>, Vec<(String, String)>) {
        let mut dirs = BTreeMap::new();
        let mut duplicates = Vec::new();
        for root in &self.options.repositories {
            let listed = match repo::list_models(root) {
                Ok(listed) => listed,
                Err(e) => {
                    tracing::error!(repository = %root.display(), error = %e, "cannot read model repository");
                    continue;
                }
            };
            for dir in listed {
                if dirs.contains_key(&dir.name) {
                    duplicates.push((
                        dir.name.clone(),
                        format!(
                            "model '{}' is in more than one repository (again in {})",
                            dir.name,
                            root.display()
                        ),
                    ));
                    continue;
                }
                dirs.insert(dir.name.clone(), dir);
            }
        }
        for listed in self.listed.read().values() {
            if dirs.contains_key(&listed.name) {
                duplicates.push((
                    listed.name.clone(),
                    format!(
                        "model '{}' is both in a model repository and in the model list",
                        listed.name
                    ),
                ));
                continue;
            }
            dirs.insert(
                listed.name.clone(),
                ModelDir {
                    name: listed.name.clone(),
                    path: listed.path.clone(),
                },
            );
        }
        for (name, _) in &duplicates {
            dirs.remove(name);
        }
        (dirs, duplicates)
    }

    /// Loads (or reloads) the versions of one model directory that its version policy selects,
    /// with `config` instead of its config.pbtxt when given (Triton's load override).
    ///
    /// Versions whose files and configuration are unchanged keep serving as they are; changed
    /// and new versions load while the old ones serve and are swapped in atomically; versions
    /// no longer selected are taken out of service and unloaded once their requests finish. A
    /// version that fails to load keeps its previous incarnation serving, with the reason in
    /// the index. Err: why the load failed (some version or the whole model).
    pub(crate) fn load_dir_inner(
        &self,
        dir: &ModelDir,
        config: Option<ModelConfig>,
        override_dir: Option<tempfile::TempDir>,
    ) -> Result<(), String> {
        let current = self.snapshot().models.get(&dir.name).cloned();
        // A panic in our own configuration code is a model failure, not a lost table.
        let built = catch_unwind(AssertUnwindSafe(|| {
            self.build_record(dir, config, current.as_ref())
        }))
        .unwrap_or_else(|payload| {
            crate::lifecycle::Built::failed(format!(
                "loading panicked: {}",
                truncate(&panic_message(payload.as_ref()), 300)
            ))
        });
        self.install(&dir.name, current.as_ref(), built, override_dir)
    }

    fn build_record(
        &self,
        dir: &ModelDir,
        config: Option<ModelConfig>,
        current: Option<&ModelRecord>,
    ) -> crate::lifecycle::Built {
        use crate::lifecycle::Built;
        let started = Instant::now();
        let listed = self.listed.read().get(&dir.name).map(|m| m.config.clone());
        let mut config = match config.or(listed) {
            Some(cfg) => cfg,
            None => match repo::read_model_config(dir) {
                Ok(cfg) => cfg,
                Err(e) => return Built::failed(e.to_string()),
            },
        };
        let available = match repo::list_versions(&dir.path) {
            Ok(v) => v,
            Err(e) => return Built::failed(e.to_string()),
        };
        // A configuration that names no framework: the files say (a SavedModel, else ONNX).
        if config.platform.is_empty()
            && config.backend.is_empty()
            && let Some(platform) = repo::detect_platform(&dir.path, &available)
        {
            config.platform = platform.to_string();
        }
        let selection = match self.select_backend(&config) {
            Ok(s) => s,
            // The versions that would have loaded fail with the reason (TF Serving reports
            // them so), or the model does when there are none.
            Err(reason) => {
                let selected = repo::select_versions(config.version_policy.as_ref(), &available);
                if selected.is_empty() {
                    return Built::failed(reason);
                }
                return Built {
                    versions: selected.into_iter().map(|v| (v, Err(reason.clone()))).collect(),
                    ..Built::default()
                };
            }
        };
        let backend = &selection.backend;
        let selected = repo::select_versions(config.version_policy.as_ref(), &available);
        if selected.is_empty() {
            return Built::failed(format!(
                "no version directory matches the version policy (found {available:?})"
            ));
        }
        // New versions show as LOADING while they load; reloaded ones keep serving.
        self.publish_loading(&dir.name, &selected);
        let config_key = oxserve_repository::config_to_json(&config);
        let mut built = Built {
            labels: config
                .version_labels
                .iter()
                .map(|(l, v)| (l.clone(), *v as u64))
                .collect(),
            split: config
                .traffic_split
                .as_ref()
                .map(crate::traffic::TrafficSplit::from_config),
            shadow: config
                .shadow
                .as_ref()
                .and_then(crate::traffic::ShadowTraffic::from_config),
            ..Built::default()
        };
        for version in selected {
            let keys = crate::lifecycle::VersionKeys::of(&config, &config_key, &dir.path, version);
            let serving = current
                .and_then(|r| r.versions.get(&version))
                .and_then(VersionState::serving);
            if let Some(served) = serving.filter(|s| s.keys.load == keys.load) {
                built.versions.insert(version, Ok(Arc::clone(served)));
                continue;
            }
            // Only the instance counts changed: new instances over the model already in
            // memory, nothing read or loaded again (the old instances drain and stop).
            let rescale = serving.filter(|s| s.keys.files == keys.files && s.keys.shape == keys.shape);
            if rescale.is_some() {
                tracing::info!(model = %dir.name, version, "instance count changed: applied in place, the model is not loaded again");
            }
            // An engine that panics while reading or loading the model (or creating an
            // instance) fails this version only.
            let loaded = catch_unwind(AssertUnwindSafe(|| {
                self.load_version(dir, version, &config, &selection, keys, rescale.map(|s| &**s))
            }))
            .unwrap_or_else(|payload| {
                Err(format!(
                    "the {} engine panicked while loading the model: {}",
                    backend.name(),
                    truncate(&panic_message(payload.as_ref()), 300)
                ))
            });
            match &loaded {
                Ok(_) => tracing::info!(
                    model = %dir.name, version, backend = backend.name(),
                    reason = %selection.reason,
                    load_ms = started.elapsed().as_millis() as u64,
                    "model version ready"
                ),
                Err(reason) => tracing::error!(
                    model = %dir.name, version, backend = backend.name(),
                    backend_reason = %selection.reason, %reason,
                    "model version failed to load"
                ),
            }
            built.versions.insert(version, loaded.map(Arc::new));
        }
        built
    }

    fn backend_named(&self, name: &str) -> Option<Arc<dyn Backend>> {
        self.backends.iter().find(|b| b.name() == name).cloned()
    }

    /// Picks the engine for a model, and says why.
    ///
    /// - `backend: "<name>"` in config.pbtxt names the engine (`onnxruntime`, `tract`, or any
    ///   other registered one), and so does Triton's `platform: "onnxruntime_onnx"` (ONNX
    ///   Runtime) when no backend is given. A named engine that cannot run here (no ONNX Runtime
    ///   library) is a load error with the reason, never a silent switch to another engine.
    /// - With neither, ONNX models run on ONNX Runtime when its library is available, else on
    ///   the built-in tract engine.
    /// - Other platforms need engines this server does not have: a load error.
    fn select_backend(&self, cfg: &ModelConfig) -> Result<Selection, String> {
        let named = match (cfg.platform.as_str(), cfg.backend.as_str()) {
            ("onnxruntime_onnx", "") => Some((
                ONNXRUNTIME,
                "config.pbtxt sets Triton's platform \"onnxruntime_onnx\"".to_string(),
            )),
            ("pytorch_libtorch", "") => Some((
                PYTORCH,
                "config.pbtxt sets Triton's platform \"pytorch_libtorch\"".to_string(),
            )),
            ("ensemble", "") => Some((
                ENSEMBLE,
                "config.pbtxt sets Triton's platform \"ensemble\"".to_string(),
            )),
            ("tensorflow_savedmodel", "") => Some((
                TENSORFLOW,
                "the model is a TensorFlow SavedModel (platform \"tensorflow_savedmodel\")".to_string(),
            )),
            ("", "") => None,
            (platform, "") => return Err(format!("platform '{platform}' is not supported by this server")),
            (_, name) => Some((name, format!("config.pbtxt sets backend \"{name}\""))),
        };
        if let Some((name, why)) = named {
            let backend = self.backend_named(name).ok_or_else(|| match name {
                PYTORCH => "backend 'pytorch' is not available in this server: it was built without the \
                                PyTorch engine (cargo feature `torch`, docs/backends.md)"
                    .to_string(),
                _ => format!("backend '{name}' is not available in this server"),
            })?;
            return match backend.availability() {
                Ok(_) => Ok(Selection { backend, reason: why }),
                Err(e) => Err(format!("{why}, but the {name} engine is not available: {e}")),
            };
        }
        let mut fallback = String::from("no ONNX Runtime engine in this server");
        if let Some(ort) = self.backend_named(ONNXRUNTIME) {
            match ort.availability() {
                Ok(info) => {
                    return Ok(Selection {
                        backend: ort,
                        reason: format!("no backend in config.pbtxt; ONNX Runtime is available ({info})"),
                    });
                }
                Err(e) => fallback = format!("ONNX Runtime is not available ({e})"),
            }
        }
        let tract = self
            .backend_named(TRACT)
            .ok_or_else(|| format!("no backend in config.pbtxt, {fallback}, and no tract engine"))?;
        Ok(Selection {
            backend: tract,
            reason: format!("no backend in config.pbtxt; {fallback}: using the built-in tract engine"),
        })
    }

    fn load_version(
        &self,
        dir: &ModelDir,
        version: u64,
        base: &ModelConfig,
        selection: &Selection,
        keys: crate::lifecycle::VersionKeys,
        rescale: Option<&ServedVersion>,
    ) -> Result<ServedVersion, String> {
        let backend = selection.backend.as_ref();
        let model_path = repo::model_file_path(&dir.path, version, base);
        let full_signature = backend.inspect(&model_path).map_err(|e| e.to_string())?;
        // The client's view: without the inputs and outputs the sequence batcher supplies.
        let signature = client_signature(base, &full_signature, backend.declares_signature())?;
        let mut config = base.clone();
        let declared = backend.declares_signature();
        if declared {
            autocomplete::complete(&mut config, &signature)?;
        } else if config.input.is_empty() || config.output.is_empty() {
            return Err(format!(
                "config.pbtxt must list the model's inputs and outputs: a {} model file does not declare them",
                backend.name()
            ));
        }
        autocomplete::fill_defaults(&mut config);
        let placement = place_auto_groups(&mut config, backend)?;
        for reason in &placement {
            tracing::info!(model = %dir.name, version, %reason, "instance group placed");
        }
        if let Some(g) = config.instance_group.iter().find(|g| g.kind == Kind::Gpu as i32)
            && !backend.supports_gpu()
        {
            return Err(format!(
                "instance group '{}' asks for KIND_GPU, but the {} engine runs on CPU only",
                g.name,
                backend.name()
            ));
        }
        if config.platform.is_empty() {
            config.platform = match backend.name() {
                TENSORFLOW => "tensorflow_savedmodel".into(),
                PYTORCH => "pytorch_libtorch".into(),
                _ => "onnxruntime_onnx".into(),
            };
        }
        config.backend = backend.name().into();
        repo::validate_config(&config).map_err(|e| e.to_string())?;
        if declared {
            autocomplete::check(&config, &signature)?;
        }
        let io = model_io(&config, &dir.path)?;
        let batched = config.max_batch_size > 0;
        let devices = instance_devices(&config);
        let sequence = crate::sequence::sequence_config(&config, &dir.path)?;
        let (sequence_inputs, sequence_outputs) = sequence
            .as_ref()
            .map(|s| crate::sequence::engine_io(s, batched))
            .unwrap_or_default();
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
                .chain(sequence_inputs.into_iter().map(Ok))
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
                .chain(sequence_outputs.into_iter().map(Ok))
                .collect::<Result<_, _>>()?,
            max_batch_size: config.max_batch_size as u32,
            instance_count: devices.len(),
            devices,
            graph_optimization_level: config
                .optimization
                .as_ref()
                .and_then(|o| o.graph.as_ref())
                .map_or(0, |g| g.level),
            parameters: engine_parameters(&config),
            gpu_accelerators: gpu_accelerators(&config)?,
        };
        check_engine_options(&spec, backend)?;
        let mut scheduling = scheduler_config(
            &config,
            spec.instance_count,
            self.options.queue_capacity,
            format!("{}-v{version}", dir.name),
        )?;
        scheduling.sequence = sequence;
        let started = std::time::Instant::now();
        // A rescale keeps the engine's model and the version's statistics.
        let (model, stats): (Arc<dyn oxserve_backend::LoadedModel>, _) = match rescale {
            Some(old) => (Arc::clone(&old.model), Arc::clone(&old.stats)),
            None => (
                Arc::from(backend.load(&spec).map_err(|e| e.to_string())?),
                Arc::new(ModelStats::new(&dir.name, version, Arc::clone(&self.metrics))),
            ),
        };
        let scheduler = Scheduler::start(Arc::clone(&model), scheduling, Arc::clone(&stats) as _)
            .map_err(|e| e.to_string())?;
        let entry_points = model.entry_points();
        let mut entries = BTreeMap::new();
        for entry in entry_points.iter().filter(|e| !e.is_default) {
            let entry_io = crate::entries::entry_io(entry, io.max_batch_size);
            let scheduling = scheduler_config(
                &crate::entries::entry_config(&config, &entry_io),
                spec.instance_count,
                self.options.queue_capacity,
                format!("{}-v{version}-{}", dir.name, entry.name),
            )?;
            let entry_model = crate::entries::EntryModel::shared(Arc::clone(&model), &entry.name);
            let scheduler = Scheduler::start(entry_model, scheduling, Arc::clone(&stats) as _)
                .map_err(|e| format!("signature '{}': {e}", entry.name))?;
            entries.insert(
                entry.name.clone(),
                crate::model::EntryView {
                    io: entry_io,
                    scheduler,
                },
            );
        }
        self.metrics.record_load(&dir.name, version, started.elapsed());
        let mut metadata = metadata(&dir.name, version, &config, &io);
        metadata.signatures = entry_points
            .iter()
            .map(crate::entries::signature_metadata)
            .collect();
        let default_entry = entry_points.iter().find(|e| e.is_default).map(|e| e.name.clone());
        // The model configuration endpoint shows the engine (`backend`) and why it was chosen.
        config.parameters.insert(
            BACKEND_REASON_PARAMETER.to_string(),
            ModelParameter {
                string_value: selection.reason.clone(),
            },
        );
        if !placement.is_empty() {
            config.parameters.insert(
                PLACEMENT_REASON_PARAMETER.to_string(),
                ModelParameter {
                    string_value: placement.join("; "),
                },
            );
        }
        let served = ServedVersion {
            model_name: dir.name.clone(),
            version,
            keys,
            model,
            config: Arc::new(config),
            io,
            metadata,
            scheduler,
            stats,
            shadow: Default::default(),
            default_entry,
            entries,
        };
        // Ready only once its warmup has run (a failed warmup is a failed load).
        crate::warmup::run(&served, &dir.path)?;
        Ok(served)
    }
}

/// Triton's `optimization { execution_accelerators { ... } }`: GPU accelerators go to the engine
/// (which applies them to its GPU instances); no engine here has a CPU accelerator (Triton's
/// OpenVINO), so naming one is a load error rather than a setting silently ignored.
fn gpu_accelerators(cfg: &ModelConfig) -> Result<Vec<Accelerator>, String> {
    let Some(accelerators) = cfg
        .optimization
        .as_ref()
        .and_then(|o| o.execution_accelerators.as_ref())
    else {
        return Ok(Vec::new());
    };
    if let Some(cpu) = accelerators.cpu_execution_accelerator.first() {
        return Err(format!(
            "optimization {{ execution_accelerators {{ cpu_execution_accelerator '{}' }} }}: no CPU \
             accelerator is available; remove it to run on the engine's own CPU kernels",
            cpu.name
        ));
    }
    Ok(accelerators
        .gpu_execution_accelerator
        .iter()
        .map(|a| Accelerator {
            name: a.name.clone(),
            parameters: a.parameters.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        })
        .collect())
}

/// Optimization settings only some engines act on: elsewhere they are load errors with the
/// reason, never settings silently ignored.
fn check_engine_options(spec: &LoadSpec, backend: &dyn Backend) -> Result<(), String> {
    if spec.graph_optimization_level != 0 && backend.name() != ONNXRUNTIME {
        return Err(format!(
            "optimization {{ graph {{ level: {} }} }}: the {} engine has no graph optimization \
             levels (ONNX Runtime has); remove it",
            spec.graph_optimization_level,
            backend.name()
        ));
    }
    if let Some(a) = spec.gpu_accelerators.first()
        && !backend.supports_gpu()
    {
        return Err(format!(
            "optimization {{ execution_accelerators {{ gpu_execution_accelerator '{}' }} }}: the \
             {} engine runs on CPU only; remove it",
            a.name,
            backend.name()
        ));
    }
    Ok(())
}

/// Triton's `KIND_AUTO`: a group goes to the GPU when the engine can place instances there and
/// its GPU runtime is present, else to the CPU. The group's kind is rewritten (as Triton shows
/// it in the model configuration); the returned lines say why, one per group.
fn place_auto_groups(cfg: &mut ModelConfig, backend: &dyn Backend) -> Result<Vec<String>, String> {
    let mut reasons = Vec::new();
    for group in &mut cfg.instance_group {
        if group.kind != Kind::Auto as i32 {
            continue;
        }
        let gpu = if backend.supports_gpu() {
            backend.gpu_runtime()
        } else {
            Err(format!("the {} engine runs on CPU only", backend.name()))
        };
        let reason = match gpu {
            Ok(runtime) => {
                group.kind = Kind::Gpu as i32;
                format!("instance_group '{}' KIND_AUTO runs on GPU: {runtime}", group.name)
            }
            // Triton too refuses a group that lists GPUs but ends up on the CPU.
            Err(why) if !group.gpus.is_empty() => {
                return Err(format!(
                    "instance_group '{}' KIND_AUTO lists gpus {:?}, but {why}",
                    group.name, group.gpus
                ));
            }
            Err(why) => {
                group.kind = Kind::Cpu as i32;
                format!("instance_group '{}' KIND_AUTO runs on CPU: {why}", group.name)
            }
        };
        reasons.push(reason);
    }
    Ok(reasons)
}

/// Where each instance runs: `count` instances per group, and for KIND_GPU `count` per listed
/// GPU (GPU 0 when the list is empty). Other kinds run on CPU.
fn instance_devices(cfg: &ModelConfig) -> Vec<Device> {
    let mut devices = Vec::new();
    for group in &cfg.instance_group {
        let count = usize::try_from(group.count.max(1)).unwrap_or(1);
        if group.kind == Kind::Gpu as i32 {
            let gpus: Vec<u32> = if group.gpus.is_empty() {
                vec![0]
            } else {
                group.gpus.iter().filter_map(|&g| u32::try_from(g).ok()).collect()
            };
            for gpu in gpus {
                devices.extend(std::iter::repeat_n(Device::Gpu(gpu), count));
            }
        } else {
            devices.extend(std::iter::repeat_n(Device::Cpu, count));
        }
    }
    if devices.is_empty() {
        devices.push(Device::Cpu);
    }
    devices
}

fn data_type(name: &str, code: i32) -> Result<DataType, String> {
    repo::data_type_of(code).ok_or_else(|| format!("tensor '{name}' has an invalid data_type"))
}

/// The model's signature as its clients see it: without the control and state tensors of
/// `sequence_batching`, which must be the model's own (when the engine declares them).
fn client_signature(
    cfg: &ModelConfig,
    sig: &ModelSignature,
    declared: bool,
) -> std::result::Result<ModelSignature, String> {
    let (inputs, outputs) = crate::sequence::provided_names(cfg);
    if declared {
        for (name, kind, list) in inputs
            .iter()
            .map(|n| (n, "input", &sig.inputs))
            .chain(outputs.iter().map(|n| (n, "output", &sig.outputs)))
        {
            if !list.iter().any(|t| &t.name == name) {
                return Err(format!(
                    "sequence_batching names {kind} '{name}', which is not an {kind} of the model"
                ));
            }
        }
    }
    Ok(ModelSignature {
        inputs: sig
            .inputs
            .iter()
            .filter(|t| !inputs.contains(&t.name))
            .cloned()
            .collect(),
        outputs: sig
            .outputs
            .iter()
            .filter(|t| !outputs.contains(&t.name))
            .cloned()
            .collect(),
    })
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
        signatures: Vec::new(),
    }
}

impl ModelTable {
    /// The version a label of a model points at (NOT_FOUND for an unknown model or label).
    pub(crate) fn label_version(&self, name: &str, label: &str) -> Result<u64> {
        let record = self
            .models
            .get(name)
            .ok_or_else(|| Error::not_found(format!("Request for unknown model: '{name}' is not found")))?;
        record
            .label(label)
            .ok_or_else(|| Error::not_found(format!("model '{name}' has no version label '{label}'")))
    }

    /// The version that answers a request and, when the request is mirrored, the shadow
    /// candidate: the named version, else the traffic split's choice (sticky by
    /// `routing_key`), else the default (a rolled-back pin or the highest ready version).
    pub(crate) fn route(
        &self,
        name: &str,
        version: Option<u64>,
        routing_key: Option<&str>,
    ) -> Result<(Arc<ServedVersion>, Option<Arc<ServedVersion>>)> {
        let record = self.models.get(name);
        let split = match (version, record) {
            (None, Some(record)) => record.split_choice(routing_key),
            _ => None,
        };
        let primary = match split {
            Some(served) => served,
            None => self.resolve(name, version)?,
        };
        // Requests that named their version asked for exactly that: they are not mirrored.
        let shadow = match (version, record) {
            (None, Some(record)) => record.shadow_choice(&primary),
            _ => None,
        };
        Ok((primary, shadow))
    }

    /// The version a request addresses: the given one, or the highest ready one.
    pub(crate) fn resolve(&self, name: &str, version: Option<u64>) -> Result<Arc<ServedVersion>> {
        let Some(record) = self.models.get(name) else {
            return Err(Error::not_found(format!(
                "Request for unknown model: '{name}' is not found"
            )));
        };
        match version {
            Some(v) => match record.versions.get(&v) {
                Some(state) => match (state.serving(), state.unavailable_reason()) {
                    (Some(served), _) => Ok(Arc::clone(served)),
                    (None, reason) => Err(Error::unavailable(format!(
                        "model '{name}' version {v} is not ready: {}",
                        reason.unwrap_or("not serving")
                    ))),
                },
                None => Err(Error::not_found(format!(
                    "Request for unknown model: '{name}' version {v} is not found"
                ))),
            },
            None => record
                .default_pin
                .and_then(|pin| record.versions.get(&pin))
                .and_then(VersionState::serving)
                .map(Arc::clone)
                .or_else(|| {
                    record
                        .versions
                        .values()
                        .rev()
                        .find_map(|s| s.serving().map(Arc::clone))
                })
                .ok_or_else(|| {
                    // Say why: the model's own error, else the newest version's reason.
                    let reason = record
                        .error
                        .as_deref()
                        .or_else(|| {
                            record
                                .versions
                                .values()
                                .rev()
                                .find_map(VersionState::unavailable_reason)
                        })
                        .unwrap_or("no version is ready");
                    Error::unavailable(format!("model '{name}' is not ready: {reason}"))
                }),
        }
    }
}

/// The configuration's `parameters` as the engine receives them; an ensemble's steps go along
/// as the `ensemble_steps` parameter (JSON), the one place the ensemble engine reads them.
fn engine_parameters(config: &ModelConfig) -> BTreeMap<String, String> {
    let mut parameters: BTreeMap<String, String> = config
        .parameters
        .iter()
        .map(|(k, v)| (k.clone(), v.string_value.clone()))
        .collect();
    if let Some(SchedulingChoice::EnsembleScheduling(e)) = &config.scheduling_choice {
        let steps: Vec<serde_json::Value> = e
            .step
            .iter()
            .map(|s| {
                serde_json::json!({
                    "model_name": s.model_name,
                    "model_version": s.model_version,
                    "input_map": s.input_map,
                    "output_map": s.output_map,
                })
            })
            .collect();
        parameters.insert(
            ENSEMBLE_STEPS_PARAMETER.into(),
            serde_json::Value::Array(steps).to_string(),
        );
    }
    parameters
}

/// The engine parameter that carries an ensemble's steps.
pub const ENSEMBLE_STEPS_PARAMETER: &str = "ensemble_steps";

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod selection_tests {
    use std::path::Path;

    use oxserve_backend::{BackendError, BackendErrorKind, LoadedModel, ModelSignature};
    use oxserve_repository::pb::ModelInstanceGroup;

    use super::*;

    /// An engine that loads nothing, available or not.
    struct Stub {
        name: &'static str,
        available: Result<String, String>,
    }

    impl Backend for Stub {
        fn name(&self) -> &'static str {
            self.name
        }
        fn inspect(&self, _: &Path) -> Result<ModelSignature, BackendError> {
            Err(BackendError::new(BackendErrorKind::Internal, "stub"))
        }
        fn load(&self, _: &LoadSpec) -> Result<Box<dyn LoadedModel>, BackendError> {
            Err(BackendError::new(BackendErrorKind::Internal, "stub"))
        }
        fn availability(&self) -> Result<String, BackendError> {
            self.available
                .clone()
                .map_err(|e| BackendError::new(BackendErrorKind::Unsupported, e))
        }
    }

    fn manager(ort: Option<Result<&str, &str>>) -> ModelManager {
        let mut backends: Vec<Arc<dyn Backend>> = vec![Arc::new(Stub {
            name: TRACT,
            available: Ok(String::new()),
        })];
        if let Some(available) = ort {
            backends.push(Arc::new(Stub {
                name: ONNXRUNTIME,
                available: available.map(str::to_string).map_err(str::to_string),
            }));
        }
        ModelManager::new(backends, ManagerOptions::default())
    }

    fn select(m: &ModelManager, platform: &str, backend: &str) -> Result<(&'static str, String), String> {
        let cfg = ModelConfig {
            name: "m".into(),
            platform: platform.into(),
            backend: backend.into(),
            ..Default::default()
        };
        m.select_backend(&cfg).map(|s| (s.backend.name(), s.reason))
    }

    #[test]
    fn default_is_onnxruntime_when_its_library_loads() {
        let m = manager(Some(Ok("ONNX Runtime 1.32.0 from /lib/libonnxruntime.so")));
        let (name, reason) = select(&m, "", "").unwrap();
        assert_eq!(name, ONNXRUNTIME);
        assert!(reason.contains("no backend in config.pbtxt"), "{reason}");
        assert!(reason.contains("ONNX Runtime 1.32.0"), "{reason}");
    }

    #[test]
    fn default_falls_back_to_tract_with_the_reason() {
        let m = manager(Some(Err("no ONNX Runtime library found")));
        let (name, reason) = select(&m, "", "").unwrap();
        assert_eq!(name, TRACT);
        assert!(reason.contains("no ONNX Runtime library found"), "{reason}");
        assert!(reason.contains("tract"), "{reason}");
        let (name, reason) = select(&manager(None), "", "").unwrap();
        assert_eq!(name, TRACT);
        assert!(reason.contains("no ONNX Runtime engine"), "{reason}");
    }

    #[test]
    fn a_named_engine_is_used_or_the_load_fails() {
        let available = manager(Some(Ok("ok")));
        let missing = manager(Some(Err("libonnxruntime.so does not exist")));
        assert_eq!(select(&available, "", "tract").unwrap().0, TRACT);
        assert_eq!(select(&available, "onnxruntime_onnx", "tract").unwrap().0, TRACT);
        assert_eq!(select(&available, "", "onnxruntime").unwrap().0, ONNXRUNTIME);
        let (name, reason) = select(&available, "onnxruntime_onnx", "").unwrap();
        assert_eq!(name, ONNXRUNTIME);
        assert!(reason.contains("onnxruntime_onnx"), "{reason}");
        // Never a silent switch to tract when ONNX Runtime was asked for.
        for (platform, backend) in [("", "onnxruntime"), ("onnxruntime_onnx", "")] {
            let err = select(&missing, platform, backend).unwrap_err();
            assert!(err.contains("does not exist"), "{err}");
            assert!(err.contains("not available"), "{err}");
        }
        assert_eq!(select(&missing, "", "tract").unwrap().0, TRACT);
        let err = select(&available, "", "tensorflow").unwrap_err();
        assert!(err.contains("backend 'tensorflow' is not available"), "{err}");
        let err = select(&available, "pytorch_libtorch", "").unwrap_err();
        assert!(err.contains("built without the PyTorch engine"), "{err}");
        let err = select(&available, "tensorrt_plan", "").unwrap_err();
        assert!(err.contains("platform 'tensorrt_plan'"), "{err}");
    }

    /// An engine that can place instances on GPUs, with or without its GPU runtime.
    struct GpuStub(Result<String, String>);

    impl Backend for GpuStub {
        fn name(&self) -> &'static str {
            ONNXRUNTIME
        }
        fn inspect(&self, _: &Path) -> Result<ModelSignature, BackendError> {
            Err(BackendError::new(BackendErrorKind::Internal, "stub"))
        }
        fn load(&self, _: &LoadSpec) -> Result<Box<dyn LoadedModel>, BackendError> {
            Err(BackendError::new(BackendErrorKind::Internal, "stub"))
        }
        fn supports_gpu(&self) -> bool {
            true
        }
        fn gpu_runtime(&self) -> Result<String, String> {
            self.0.clone()
        }
    }

    #[test]
    fn kind_auto_follows_the_engines_gpu_runtime_with_the_reason() {
        let auto = |gpus: &[i32]| ModelConfig {
            instance_group: vec![
                ModelInstanceGroup {
                    name: "a".into(),
                    kind: Kind::Auto as i32,
                    count: 1,
                    gpus: gpus.to_vec(),
                },
                ModelInstanceGroup {
                    name: "c".into(),
                    kind: Kind::Cpu as i32,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let cpu_only = Stub {
            name: TRACT,
            available: Ok(String::new()),
        };
        let mut cfg = auto(&[]);
        let reasons = place_auto_groups(&mut cfg, &cpu_only).unwrap();
        assert_eq!(cfg.instance_group[0].kind, Kind::Cpu as i32);
        assert_eq!(reasons.len(), 1, "only KIND_AUTO groups are placed: {reasons:?}");
        assert!(reasons[0].contains("KIND_AUTO runs on CPU"), "{reasons:?}");
        assert!(
            reasons[0].contains("tract engine runs on CPU only"),
            "{reasons:?}"
        );

        let mut cfg = auto(&[]);
        let reasons =
            place_auto_groups(&mut cfg, &GpuStub(Err("no CUDA execution provider".into()))).unwrap();
        assert_eq!(cfg.instance_group[0].kind, Kind::Cpu as i32);
        assert!(reasons[0].contains("no CUDA execution provider"), "{reasons:?}");

        let mut cfg = auto(&[1]);
        let reasons = place_auto_groups(&mut cfg, &GpuStub(Ok("CUDA in libonnxruntime.so".into()))).unwrap();
        assert_eq!(cfg.instance_group[0].kind, Kind::Gpu as i32);
        assert!(
            reasons[0].contains("KIND_AUTO runs on GPU: CUDA in"),
            "{reasons:?}"
        );
        assert_eq!(instance_devices(&cfg), vec![Device::Gpu(1), Device::Cpu]);

        let err = place_auto_groups(&mut auto(&[0]), &cpu_only).unwrap_err();
        assert!(
            err.contains("KIND_AUTO lists gpus [0], but the tract engine runs on CPU only"),
            "{err}"
        );
    }

    #[test]
    fn engine_specific_optimizations_are_rejected_elsewhere() {
        let spec = |level: i32, accelerators: Vec<Accelerator>| LoadSpec {
            model_name: "m".into(),
            version: 1,
            model_path: "m/1/model.onnx".into(),
            inputs: vec![],
            outputs: vec![],
            max_batch_size: 0,
            instance_count: 1,
            devices: vec![],
            graph_optimization_level: level,
            parameters: Default::default(),
            gpu_accelerators: accelerators,
        };
        let tract = Stub {
            name: TRACT,
            available: Ok(String::new()),
        };
        let cuda = || {
            vec![Accelerator {
                name: "cuda".into(),
                parameters: Default::default(),
            }]
        };
        assert!(check_engine_options(&spec(0, vec![]), &tract).is_ok());
        let err = check_engine_options(&spec(1, vec![]), &tract).unwrap_err();
        assert!(
            err.contains("the tract engine has no graph optimization levels"),
            "{err}"
        );
        let err = check_engine_options(&spec(0, cuda()), &tract).unwrap_err();
        assert!(err.contains("gpu_execution_accelerator 'cuda'"), "{err}");
        let ort = GpuStub(Ok(String::new()));
        assert!(check_engine_options(&spec(1, cuda()), &ort).is_ok());
    }

    #[test]
    fn instances_are_placed_per_group_and_gpu() {
        let group = |kind: Kind, count: i32, gpus: &[i32]| ModelInstanceGroup {
            kind: kind as i32,
            count,
            gpus: gpus.to_vec(),
            ..Default::default()
        };
        let cfg = ModelConfig {
            instance_group: vec![
                group(Kind::Cpu, 2, &[]),
                group(Kind::Gpu, 1, &[0, 1]),
                group(Kind::Gpu, 0, &[]),
            ],
            ..Default::default()
        };
        assert_eq!(
            instance_devices(&cfg),
            vec![
                Device::Cpu,
                Device::Cpu,
                Device::Gpu(0),
                Device::Gpu(1),
                Device::Gpu(0)
            ]
        );
        assert_eq!(instance_devices(&ModelConfig::default()), vec![Device::Cpu]);
    }
}
