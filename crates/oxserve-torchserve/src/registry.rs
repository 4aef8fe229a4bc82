//! The models registered through TorchServe's management API (or at start-up): each archive is
//! unpacked into the server's private work directory and served by the engine as a listed
//! model (one engine version per archive version), with the handler in front of it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use oxserve_core::{DataType, Error, Parameters, Result, Tensor, TensorData};
use oxserve_engine::{InferenceService, ListedModel};
use oxserve_frontend::{DecodedInput, DecodedRequest, ModelTarget, OutputRequest};
use oxserve_repository::pb as triton;
use oxserve_shm::SharedMemoryRegistry;
use parking_lot::Mutex;

use crate::handler::Handler;
use crate::mar::{self, ArchiveLimits};
use crate::worker::protocol::Reply;

/// How a model is registered (TorchServe's register parameters).
#[derive(Debug, Clone)]
pub struct Registration {
    /// The archive: a file name in the model store.
    pub url: String,
    pub model_name: Option<String>,
    pub initial_workers: u32,
    pub batch_size: u32,
    pub max_batch_delay_ms: u64,
    pub response_timeout_s: u64,
    pub loaded_at_startup: bool,
}

impl Default for Registration {
    fn default() -> Self {
        Registration {
            url: String::new(),
            model_name: None,
            initial_workers: 0,
            batch_size: 1,
            max_batch_delay_ms: 100,
            response_timeout_s: 120,
            loaded_at_startup: false,
        }
    }
}

/// One registered version of a model.
#[derive(Debug, Clone)]
pub struct VersionEntry {
    pub version: String,
    pub engine_version: u64,
    pub url: String,
    pub handler: Handler,
    pub batch_size: u32,
    pub max_batch_delay_ms: u64,
    pub response_timeout_s: u64,
    pub min_workers: u32,
    pub max_workers: u32,
    pub loaded_at_startup: bool,
    /// When its workers last started (TorchServe's worker `startTime`).
    pub started: String,
    /// The archive a URL registration placed in the model store (deleted at unregister).
    pub fetched: Option<PathBuf>,
}

#[derive(Debug, Clone, Default)]
pub struct ModelEntry {
    pub versions: BTreeMap<String, VersionEntry>,
    pub default: String,
}

/// TorchServe's state: the model store, the work directory and the registered models.
pub struct TorchServe {
    pub(crate) engine: InferenceService,
    pub(crate) shm: Arc<SharedMemoryRegistry>,
    model_store: Option<PathBuf>,
    work: tempfile::TempDir,
    limits: ArchiveLimits,
    models: Mutex<BTreeMap<String, ModelEntry>>,
    /// Registrations and model list changes go one at a time.
    changes: tokio::sync::Mutex<()>,
    next_archive: std::sync::atomic::AtomicU64,
    model_api: bool,
    /// The Python that installs an archive's requirements, when TorchServe's
    /// `install_py_dep_per_model` is on.
    install_dependencies: Mutex<Option<PathBuf>>,
    /// TorchServe's `allowed_urls` (default: every file and http(s) URL).
    allowed_urls: Mutex<crate::fetch::AllowedUrls>,
    /// The last engine version given to each model name.
    last_engine_version: Mutex<std::collections::HashMap<String, u64>>,
    /// The largest answer a Python worker may send for one request (TorchServe's
    /// `max_response_size`).
    max_response_bytes: std::sync::atomic::AtomicUsize,
}

impl TorchServe {
    /// `model_api`: whether models may be registered and unregistered through the API.
    pub fn new(engine: InferenceService, model_store: Option<PathBuf>, model_api: bool) -> Result<Arc<Self>> {
        let work = tempfile::Builder::new()
            .prefix("oxserve-torchserve-")
            .tempdir()
            .map_err(|e| Error::internal(format!("cannot create the work directory: {e}")))?;
        Ok(Arc::new(TorchServe {
            engine,
            shm: Arc::new(SharedMemoryRegistry::disabled()),
            model_store,
            work,
            limits: ArchiveLimits::default(),
            models: Mutex::new(BTreeMap::new()),
            changes: tokio::sync::Mutex::new(()),
            next_archive: std::sync::atomic::AtomicU64::new(1),
            model_api,
            install_dependencies: Mutex::new(None),
            last_engine_version: Mutex::new(std::collections::HashMap::new()),
            allowed_urls: Mutex::new(crate::fetch::AllowedUrls::default()),
            max_response_bytes: std::sync::atomic::AtomicUsize::new(6_553_500),
        }))
    }

    /// TorchServe's `max_response_size` for Python handlers' answers.
    pub fn set_max_response_bytes(&self, bytes: usize) {
        self.max_response_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Installs the `requirements.txt` of archives with Python handlers, with this Python's
    /// pip, before their workers start (TorchServe's `install_py_dep_per_model=true`).
    pub fn install_dependencies_with(&self, python: PathBuf) {
        *self.install_dependencies.lock() = Some(python);
    }

    /// `pip install -U -t <version dir>/dependencies -r requirements.txt`, as TorchServe
    /// installs per-model dependencies; the directory goes on the workers' `PYTHONPATH`.
    /// Without the option the file is ignored (as TorchServe does), with a log line.
    async fn install_requirements(&self, model: &str, version_dir: &Path, requirements: &Path) -> Result<()> {
        let Some(python) = self.install_dependencies.lock().clone() else {
            tracing::info!(
                model,
                "the archive has a requirements file; not installed \
                (install_py_dep_per_model is off)"
            );
            return Ok(());
        };
        let target = version_dir.join(crate::worker::DEPENDENCIES_DIR);
        tracing::info!(model, python = %python.display(), target = %target.display(),
            "installing the archive's requirements");
        let (dir, file) = (target.clone(), requirements.to_path_buf());
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new(&python)
                .args(["-m", "pip", "install", "--disable-pip-version-check", "-U", "-t"])
                .arg(&dir)
                .arg("-r")
                .arg(&file)
                .stdin(std::process::Stdio::null())
                .output()
        })
        .await
        .map_err(|e| Error::internal(format!("pip did not finish: {e}")))?
        .map_err(|e| Error::internal(format!("cannot run pip: {e}")))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
            return Err(Error::invalid(format!(
                "installing the archive's requirements failed ({}): {}",
                output.status,
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )));
        }
        Ok(())
    }

    pub fn model_api_enabled(&self) -> bool {
        self.model_api
    }

    pub fn models(&self) -> BTreeMap<String, ModelEntry> {
        self.models.lock().clone()
    }

    /// TorchServe's `allowed_urls`: the patterns registration URLs must match.
    pub fn set_allowed_urls(&self, patterns: &[String]) -> Result<()> {
        *self.allowed_urls.lock() = crate::fetch::AllowedUrls::new(patterns)?;
        Ok(())
    }

    /// The archive a URL names: an allowed `file://` or `http(s)://` URL (placed in the model
    /// store, `true`: to delete at unregister), else a plain file name in the model store.
    async fn archive_path(&self, url: &str) -> Result<(PathBuf, bool)> {
        let allowed = self.allowed_urls.lock().clone();
        if let Some(path) = crate::fetch::resolve(&allowed, url, self.model_store.as_deref()).await? {
            return Ok((path, true));
        }
        let Some(store) = &self.model_store else {
            return Err(Error::invalid("no model store is configured (--model-store)"));
        };
        let name = Path::new(url);
        if name.components().count() != 1
            || !matches!(name.components().next(), Some(std::path::Component::Normal(_)))
        {
            return Err(Error::invalid(format!(
                "Invalid model url: {url}: not a file name in the model store"
            )));
        }
        let path = store.join(name);
        if !path.is_file() {
            return Err(Error::not_found(format!("Model not found at: {url}")));
        }
        Ok((path, false))
    }

    /// Registers an archive; with workers, answers once it serves.
    pub async fn register(&self, registration: Registration) -> Result<(String, String)> {
        let _serial = self.changes.lock().await;
        let (path, fetched) = self.archive_path(&registration.url).await?;
        let fetched = fetched.then_some(path.clone());
        let registered = self.register_archive(registration, path, fetched.clone()).await;
        if registered.is_err()
            && let Some(file) = fetched
        {
            // A fetched archive stays in the store only while its model is registered.
            let _ = std::fs::remove_file(file);
        }
        registered
    }

    async fn register_archive(
        &self,
        registration: Registration,
        path: PathBuf,
        fetched: Option<PathBuf>,
    ) -> Result<(String, String)> {
        let n = self
            .next_archive
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let into = self.work.path().join("archives").join(n.to_string());
        let limits = self.limits;
        let archive = tokio::task::spawn_blocking(move || mar::unpack(&path, &into, limits))
            .await
            .map_err(|e| Error::internal(format!("unpacking failed: {e}")))??;
        let name = registration
            .model_name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| archive.manifest.model.model_name.clone());
        if !oxserve_repository::is_label_name(&name) {
            return Err(Error::invalid(format!("invalid model name '{name}'")));
        }
        let version = if archive.manifest.model.model_version.is_empty() {
            "1.0".to_string()
        } else {
            archive.manifest.model.model_version.clone()
        };
        let handler = Handler::from_manifest(&archive.manifest.model.handler, &archive.dir)?;
        let engine_version = {
            let models = self.models.lock();
            let entry = models.get(&name);
            if entry.is_some_and(|e| e.versions.contains_key(&version)) {
                return Err(Error::new(
                    oxserve_core::ErrorKind::Conflict,
                    format!("Model version {version} is already registered for model {name}"),
                ));
            }
            // The versions of a model share one engine configuration, so one kind of handler.
            if let Some(other) = entry.and_then(|e| e.versions.values().next())
                && other.handler.kind() != handler.kind()
            {
                return Err(Error::invalid(format!(
                    "model {name} version {} has a {} handler; version {version} must have one too",
                    other.version,
                    other.handler.kind()
                )));
            }
            // Never reused, even after the model was unregistered: a version directory of an
            // unregistered model may still be in use by workers that are stopping.
            let mut last = self.last_engine_version.lock();
            let next = last.get(&name).copied().unwrap_or(0).max(
                entry
                    .and_then(|e| e.versions.values().map(|v| v.engine_version).max())
                    .unwrap_or(0),
            ) + 1;
            last.insert(name.clone(), next);
            next
        };
        // The engine's view: <work>/models/<name>/<engine version>/model.pt.
        let version_dir = self
            .work
            .path()
            .join("models")
            .join(&name)
            .join(engine_version.to_string());
        std::fs::create_dir_all(&version_dir).map_err(|e| Error::internal(e.to_string()))?;
        if handler.is_python() {
            // The worker loads the whole unpacked archive (handler.py, extra files, weights).
            let requirements = &archive.manifest.model.requirements_file;
            let has_requirements = !requirements.is_empty() && archive.file(requirements).is_some();
            let place = version_dir.join(crate::worker::ARCHIVE_DIR);
            std::fs::rename(&archive.dir, &place)
                .map_err(|e| Error::internal(format!("cannot place the archive: {e}")))?;
            if has_requirements {
                // The workers find the installed packages in <version dir>/dependencies.
                self.install_requirements(&name, &version_dir, &place.join(requirements))
                    .await?;
            }
        } else {
            let serialized = archive.serialized_file()?;
            std::fs::hard_link(&serialized, version_dir.join("model.pt"))
                .or_else(|_| std::fs::copy(&serialized, version_dir.join("model.pt")).map(|_| ()))
                .map_err(|e| Error::internal(format!("cannot place the model file: {e}")))?;
        }
        let workers = registration.initial_workers;
        let entry = VersionEntry {
            version: version.clone(),
            engine_version,
            url: registration.url.clone(),
            handler,
            batch_size: registration.batch_size.max(1),
            max_batch_delay_ms: registration.max_batch_delay_ms,
            response_timeout_s: registration.response_timeout_s,
            min_workers: workers,
            max_workers: workers,
            loaded_at_startup: registration.loaded_at_startup,
            started: now(),
            fetched,
        };
        {
            let mut models = self.models.lock();
            let model = models.entry(name.clone()).or_default();
            if model.default.is_empty() {
                model.default = version.clone();
            }
            model.versions.insert(version.clone(), entry);
        }
        if let Err(e) = self.apply().await {
            // A version that cannot serve is not registered.
            self.forget(&name, &version);
            let _ = self.apply().await;
            return Err(e);
        }
        Ok((name, version))
    }

    fn forget(&self, name: &str, version: &str) {
        let mut models = self.models.lock();
        if let Some(model) = models.get_mut(name) {
            model.versions.remove(version);
            if model.versions.is_empty() {
                models.remove(name);
            } else if model.default == version {
                model.default = model.versions.keys().next().cloned().unwrap_or_default();
            }
        }
    }

    /// Scales a model's workers (every version of it: one instance group per model).
    pub async fn scale(&self, name: &str, version: Option<&str>, min: u32, max: u32) -> Result<()> {
        let _serial = self.changes.lock().await;
        {
            let mut models = self.models.lock();
            let model = models.get_mut(name).ok_or_else(|| model_not_found(name))?;
            let versions: Vec<String> = match version {
                Some(v) if !model.versions.contains_key(v) => return Err(version_not_found(name, v)),
                Some(v) => vec![v.to_string()],
                None => model.versions.keys().cloned().collect(),
            };
            for v in versions {
                if let Some(entry) = model.versions.get_mut(&v) {
                    entry.min_workers = min;
                    entry.max_workers = max.max(min);
                    entry.started = now();
                }
            }
        }
        self.apply().await
    }

    pub async fn unregister(&self, name: &str, version: Option<&str>) -> Result<String> {
        let _serial = self.changes.lock().await;
        let removed = {
            let mut models = self.models.lock();
            let model = models.get_mut(name).ok_or_else(|| model_not_found(name))?;
            let version = version.map_or_else(|| model.default.clone(), str::to_string);
            if !model.versions.contains_key(&version) {
                return Err(version_not_found(name, &version));
            }
            if model.versions.len() > 1 && model.default == version {
                return Err(Error::invalid(format!(
                    "Cannot remove default version {version} for model {name}"
                )));
            }
            let removed = model.versions.remove(&version);
            if model.versions.is_empty() {
                models.remove(name);
            }
            (
                version,
                removed.as_ref().map(|v| v.engine_version),
                removed.and_then(|v| v.fetched),
            )
        };
        self.apply().await?;
        if let Some(file) = removed.2 {
            // As TorchServe: an archive registered from a URL leaves the store with its model.
            let _ = std::fs::remove_file(file);
        }
        // The unpacked archive goes too (its version directory is never reused).
        if let Some(engine_version) = removed.1 {
            let dir = self
                .work
                .path()
                .join("models")
                .join(name)
                .join(engine_version.to_string());
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        }
        Ok(removed.0)
    }

    pub fn set_default(&self, name: &str, version: &str) -> Result<()> {
        let mut models = self.models.lock();
        let model = models.get_mut(name).ok_or_else(|| model_not_found(name))?;
        if !model.versions.contains_key(version) {
            return Err(version_not_found(name, version));
        }
        model.default = version.to_string();
        Ok(())
    }

    /// Gives the engine the registered versions that have workers.
    async fn apply(&self) -> Result<()> {
        let list = {
            let models = self.models.lock();
            models
                .iter()
                .filter_map(|(name, model)| self.listed(name, model))
                .collect::<Vec<_>>()
        };
        self.engine.set_model_list(list).await
    }

    fn listed(&self, name: &str, model: &ModelEntry) -> Option<ListedModel> {
        let serving: Vec<&VersionEntry> = model.versions.values().filter(|v| v.min_workers > 0).collect();
        let first = serving.first()?;
        let mut config = serving_config(name, &serving);
        if first.handler.is_python() {
            self.python_io(&mut config, &serving);
        } else {
            config.platform = "pytorch_libtorch".into();
            let batches = first.handler.batches();
            // A handler whose requests run alone gets an unbatched model: full shapes, the
            // request's batch of one included.
            let full = |dims: Vec<i64>| if batches { dims } else { [vec![1], dims].concat() };
            if !batches {
                config.max_batch_size = 0;
                config.scheduling_choice = None;
            }
            config.input = vec![triton::ModelInput {
                name: "INPUT__0".into(),
                data_type: triton::DataType::TypeFp32 as i32,
                dims: full(first.handler.input_shape()),
                ..Default::default()
            }];
            config.output = first
                .handler
                .outputs()
                .into_iter()
                .map(|o| triton::ModelOutput {
                    name: o.name.into(),
                    data_type: oxserve_repository::data_type_to_config(o.datatype),
                    // The detector's outputs have no batch dimension: its model answers one
                    // image's detections.
                    dims: o.dims,
                    ..Default::default()
                })
                .collect();
        }
        Some(ListedModel {
            name: name.to_string(),
            path: self.work.path().join("models").join(name),
            config,
        })
    }

    /// A model whose handler runs in TorchServe's Python workers: one BYTES request in, one
    /// BYTES answer out (crate::worker), one worker process per instance.
    fn python_io(&self, config: &mut triton::ModelConfig, serving: &[&VersionEntry]) {
        use crate::worker::{self, params};
        let bytes = triton::DataType::TypeString as i32;
        config.backend = worker::BACKEND_NAME.into();
        config.platform = worker::BACKEND_NAME.into();
        config.default_model_filename = worker::ARCHIVE_DIR.into();
        config.input = vec![triton::ModelInput {
            name: worker::REQUEST_INPUT.into(),
            data_type: bytes,
            dims: vec![1],
            ..Default::default()
        }];
        config.output = vec![triton::ModelOutput {
            name: worker::RESPONSE_OUTPUT.into(),
            data_type: bytes,
            dims: vec![1],
            ..Default::default()
        }];
        let parameter = |v: String| triton::ModelParameter { string_value: v };
        let timeout = serving.iter().map(|v| v.response_timeout_s).max().unwrap_or(120);
        config
            .parameters
            .insert(params::RESPONSE_TIMEOUT_S.into(), parameter(timeout.to_string()));
        let max_response = self.max_response_bytes.load(std::sync::atomic::Ordering::Relaxed);
        config.parameters.insert(
            params::MAX_RESPONSE_BYTES.into(),
            parameter(max_response.to_string()),
        );
    }

    /// Runs one prediction through a Python handler: the request's part of the worker's
    /// inference message in, the handler's answer out.
    pub async fn predict_python(
        &self,
        name: &str,
        version: Option<&str>,
        part: bytes::Bytes,
    ) -> Result<Reply> {
        let entry = self.version(name, version)?;
        if entry.min_workers == 0 {
            return Err(no_worker(name));
        }
        let target = ModelTarget::resolve(&self.engine, name, Some(entry.engine_version))?;
        let mut request = DecodedRequest::new(target, None, Parameters::new())?;
        request.inputs = vec![DecodedInput::body(
            crate::worker::REQUEST_INPUT.to_string(),
            DataType::Bytes,
            vec![1, 1],
            TensorData::Strings(vec![part]),
        )];
        request.outputs = vec![OutputRequest::named(crate::worker::RESPONSE_OUTPUT)];
        let response = oxserve_frontend::run(&self.engine, &self.shm, request)
            .await
            .map_err(|e| {
                // A lost worker's message is TorchServe's ("Worker died."), without the
                // engine's prefix.
                match e.message().strip_prefix("inference failed: ") {
                    Some(m) if e.kind() == oxserve_core::ErrorKind::Internal => Error::internal(m),
                    _ => e,
                }
            })?;
        let encoded = response
            .outputs
            .into_iter()
            .next()
            .and_then(|o| match o.tensor.data {
                TensorData::Strings(mut s) if !s.is_empty() => Some(s.swap_remove(0)),
                _ => None,
            })
            .ok_or_else(|| Error::internal("the worker returned no answer"))?;
        Reply::decode(&encoded).map_err(|e| Error::internal(format!("invalid worker answer: {e:?}")))
    }

    /// The version a prediction addresses (the default without one).
    pub fn version(&self, name: &str, version: Option<&str>) -> Result<VersionEntry> {
        let models = self.models.lock();
        let model = models.get(name).ok_or_else(|| model_not_found(name))?;
        let version = version.unwrap_or(&model.default);
        model
            .versions
            .get(version)
            .cloned()
            .ok_or_else(|| version_not_found(name, version))
    }

    /// Runs one prediction: the handler's input, the engine, the handler's answer.
    pub async fn predict(&self, name: &str, version: Option<&str>, body: bytes::Bytes) -> Result<String> {
        let entry = self.version(name, version)?;
        if entry.min_workers == 0 {
            return Err(no_worker(name));
        }
        let handler = entry.handler.clone();
        let input =
            oxserve_frontend::decode_off_worker(usize::MAX, move || handler.preprocess(&body)).await?;
        let target = ModelTarget::resolve(&self.engine, name, Some(entry.engine_version))?;
        let mut request = DecodedRequest::new(target, None, Parameters::new())?;
        let mut shape = vec![1];
        shape.extend_from_slice(&input.shape);
        request.inputs = vec![DecodedInput::body(input.name, input.datatype, shape, input.data)];
        request.outputs = entry
            .handler
            .outputs()
            .iter()
            .map(|o| OutputRequest::named(o.name))
            .collect();
        let response = oxserve_frontend::run(&self.engine, &self.shm, request).await?;
        let batched = entry.handler.batches();
        let outputs = response
            .outputs
            .into_iter()
            .map(|o| {
                if batched {
                    first_row(o.tensor)
                } else {
                    Ok(o.tensor)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        entry.handler.postprocess(&outputs)
    }
}

/// What every registered model's configuration has: its serving versions, one CPU instance
/// group of the most workers any of them has (TorchServe's workers), the first version's batch
/// size and, with batching, its delay as the dynamic batcher's queue delay.
fn serving_config(name: &str, serving: &[&VersionEntry]) -> triton::ModelConfig {
    let first = serving[0];
    let batch = first.batch_size.max(1);
    let workers = serving.iter().map(|v| v.min_workers).max().unwrap_or(1);
    let mut config = triton::ModelConfig {
        name: name.to_string(),
        max_batch_size: i32::try_from(batch).unwrap_or(i32::MAX),
        instance_group: vec![triton::ModelInstanceGroup {
            count: i32::try_from(workers).unwrap_or(1),
            kind: triton::model_instance_group::Kind::Cpu as i32,
            ..Default::default()
        }],
        version_policy: Some(triton::ModelVersionPolicy {
            policy_choice: Some(triton::model_version_policy::PolicyChoice::Specific(
                triton::model_version_policy::Specific {
                    versions: serving.iter().map(|v| v.engine_version as i64).collect(),
                },
            )),
        }),
        ..Default::default()
    };
    if batch > 1 {
        config.scheduling_choice = Some(triton::model_config::SchedulingChoice::DynamicBatching(
            triton::ModelDynamicBatching {
                max_queue_delay_microseconds: first.max_batch_delay_ms.saturating_mul(1000),
                ..Default::default()
            },
        ));
    }
    config
}

/// The first row of a batched output.
fn first_row(t: Tensor) -> Result<Tensor> {
    let shape = t.shape[1..].to_vec();
    let per_row = oxserve_core::element_count(&shape)?;
    let size = t.datatype.size().unwrap_or(1);
    let raw = t
        .raw()
        .ok_or_else(|| Error::internal("the model's output holds strings"))?
        .slice(0..(per_row * size).min(t.raw().map_or(0, |r| r.len())));
    Ok(Tensor::new(t.name, t.datatype, shape, TensorData::Raw(raw)))
}

fn no_worker(name: &str) -> Error {
    Error::unavailable(format!(
        "Model \"{name}\" has no worker to serve inference request. Please use scale workers API to add workers."
    ))
}

pub(crate) fn model_not_found(name: &str) -> Error {
    Error::not_found(format!("Model not found: {name}"))
}

pub(crate) fn version_not_found(name: &str, version: &str) -> Error {
    Error::not_found(format!(
        "Model version: {version} does not exist for model: {name}"
    ))
}

/// Now as TorchServe writes worker start times: `2026-12-06T18:11:58.922Z` (UTC).
fn now() -> String {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rest / 3600, rest % 3600 / 60, rest % 60);
    // The civil date of a day count since 1970-01-01 (Howard Hinnant's days_from_civil inverse).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{:03}Z",
        since.subsec_millis()
    )
}

/// One model's counters for TorchServe's `ts_*` families.
struct ModelCounts {
    name: String,
    requests: f64,
    latency_us: f64,
    queue_us: f64,
}

impl TorchServe {
    /// TorchServe's `ts_*` metric families for the registered models, from the engine's
    /// statistics (cumulative since each version loaded): requests, their total latency and
    /// their total time queued, in TorchServe's names, units and labels; then its host gauges.
    pub fn metrics_text(&self) -> String {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let names: Vec<String> = self.models.lock().keys().cloned().collect();
        let mut rows = Vec::new();
        for name in names {
            let Ok(stats) = self.engine.model_statistics(Some(&name), None) else {
                continue;
            };
            let (mut count, mut latency_ns, mut queue_ns) = (0u64, 0u64, 0u64);
            for s in &stats {
                let i = &s.inference_stats;
                count += i.success.count + i.fail.count;
                latency_ns += i.success.ns + i.fail.ns;
                queue_ns += i.queue.ns;
            }
            rows.push(ModelCounts {
                name,
                requests: count as f64,
                latency_us: latency_ns as f64 / 1000.0,
                queue_us: queue_ns as f64 / 1000.0,
            });
        }
        let label = |name: &str| {
            format!(
                "{{model_name={},model_version=\"default\",hostname={},}}",
                serde_json::Value::String(name.to_string()),
                serde_json::Value::String(hostname.clone())
            )
        };
        let mut out = String::new();
        type Family = (&'static str, &'static str, fn(&ModelCounts) -> f64);
        let families: [Family; 3] = [
            ("ts_inference_requests_total", "Count", |r| r.requests),
            ("ts_inference_latency_microseconds", "Microseconds", |r| {
                r.latency_us
            }),
            ("ts_queue_latency_microseconds", "Microseconds", |r| r.queue_us),
        ];
        for (family, unit, value) in families {
            out.push_str(&format!(
                "# HELP {family} Torchserve prometheus counter metric with unit: {unit}\n# TYPE {family} counter\n"
            ));
            for row in &rows {
                out.push_str(&format!("{family}{} {:?}\n", label(&row.name), value(row)));
            }
        }
        out.push_str(&crate::host::gauges_text(&hostname));
        out
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn start_times_look_like_torchserves() {
        let t = super::now();
        assert_eq!(t.len(), "2026-12-06T18:11:58.922Z".len(), "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && t.as_bytes()[10] == b'T',
            "{t}"
        );
    }
}
