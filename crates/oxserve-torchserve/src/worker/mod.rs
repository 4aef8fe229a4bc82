//! Custom Python handlers, unchanged: each model instance is one TorchServe Python backend
//! worker process (TorchServe's own `ts` package), driven over its socket protocol. The engine
//! sees an ordinary model — one BYTES input `REQUEST` (a request's headers and inputs in the
//! worker's frame format) and one BYTES output `RESPONSE` (the handler's answer) — so the
//! dynamic batcher, instance counts (TorchServe's workers), statistics and metrics are the
//! engine's. A worker that dies or hangs fails only the requests it had, and is started again
//! before the instance's next batch.

pub mod process;
pub mod protocol;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, mpsc};
use std::time::Duration;

use bytes::Bytes;
use oxserve_backend::{
    Backend, BackendError, BackendErrorKind, Batch, LoadSpec, LoadedModel, ModelInstance, ModelSignature,
};
use oxserve_core::{DataType, Tensor, TensorData};
use parking_lot::Mutex;

use process::{Worker, WorkerCode, WorkerError, WorkerSpec};
use protocol::Reply;

/// The engine name in a model's configuration (`backend: "torchserve_python"`).
pub const BACKEND_NAME: &str = "torchserve_python";
pub const REQUEST_INPUT: &str = "REQUEST";
pub const RESPONSE_OUTPUT: &str = "RESPONSE";
/// The file name of the unpacked archive inside an engine version directory.
pub const ARCHIVE_DIR: &str = "archive";

/// The directory beside the archive where its requirements were installed, if they were.
pub const DEPENDENCIES_DIR: &str = "dependencies";

/// Model parameters the TorchServe layer sets for the backend.
pub mod params {
    pub const ENVELOPE: &str = "torchserve_envelope";
    pub const RESPONSE_TIMEOUT_S: &str = "torchserve_response_timeout_s";
    pub const STARTUP_TIMEOUT_S: &str = "torchserve_startup_timeout_s";
    pub const MAX_RESPONSE_BYTES: &str = "torchserve_max_response_bytes";
}

/// A worker as the management API describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    /// The instance index.
    pub index: usize,
    pub pid: u32,
    /// TorchServe's worker states: `READY`, or `UNLOADING` while a lost worker is replaced.
    pub status: &'static str,
}

/// (model, engine version, instance index, serial): the serial tells apart the instances of
/// two instance sets that overlap while the engine rescales a model (the new set starts before
/// the old one stops, with the same indices).
type WorkerKey = (String, u64, usize, u64);
static WORKERS: Mutex<BTreeMap<WorkerKey, WorkerStatus>> = Mutex::new(BTreeMap::new());
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);

fn set_status(key: &WorkerKey, status: WorkerStatus) {
    WORKERS.lock().insert(key.clone(), status);
}

fn update_status(key: &WorkerKey, status: &'static str) {
    if let Some(w) = WORKERS.lock().get_mut(key) {
        w.status = status;
    }
}

fn remove_status(key: &WorkerKey) {
    WORKERS.lock().remove(key);
}

/// The workers of one version of a model (its engine version), by instance index: the newest
/// instance of each index.
pub fn workers(model: &str, version: u64) -> Vec<WorkerStatus> {
    let mut newest: BTreeMap<usize, (u64, WorkerStatus)> = BTreeMap::new();
    for ((m, v, index, serial), w) in WORKERS.lock().iter() {
        if m == model && *v == version && newest.get(index).is_none_or(|(s, _)| s < serial) {
            newest.insert(*index, (*serial, w.clone()));
        }
    }
    newest.into_values().map(|(_, w)| w).collect()
}

/// The interpreter TorchServe's frontend would use without configuration: `python` on PATH,
/// else `python3` (Debian has no `python` unless a virtual environment is active).
pub fn default_python() -> PathBuf {
    let on_path = |name: &str| {
        std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
            .unwrap_or(false)
    };
    PathBuf::from(if on_path("python") || !on_path("python3") {
        "python"
    } else {
        "python3"
    })
}

/// Runs TorchServe handlers in Python workers started with `python`.
pub struct PythonBackend {
    python: PathBuf,
    code: OnceLock<Result<WorkerCode, String>>,
}

impl PythonBackend {
    pub fn new(python: PathBuf) -> Self {
        PythonBackend {
            python,
            code: OnceLock::new(),
        }
    }

    /// Where the worker code is (asked once).
    fn code(&self) -> Result<WorkerCode, String> {
        self.code.get_or_init(|| WorkerCode::locate(&self.python)).clone()
    }
}

impl Backend for PythonBackend {
    fn name(&self) -> &'static str {
        BACKEND_NAME
    }

    fn inspect(&self, _model_path: &Path) -> Result<ModelSignature, BackendError> {
        Ok(ModelSignature::default())
    }

    fn declares_signature(&self) -> bool {
        false
    }

    fn availability(&self) -> Result<String, BackendError> {
        self.code()
            .map(|c| format!("TorchServe workers on {}", c.python.display()))
            .map_err(|e| BackendError::new(BackendErrorKind::Unsupported, e))
    }

    fn load(&self, spec: &LoadSpec) -> Result<Box<dyn LoadedModel>, BackendError> {
        let code = self
            .code()
            .map_err(|e| BackendError::new(BackendErrorKind::Unsupported, e))?;
        let p = &spec.parameters;
        let seconds = |key: &str, default: u64| {
            Duration::from_secs(p.get(key).and_then(|v| v.parse().ok()).unwrap_or(default))
        };
        // Each version's handler is its own archive's (the versions share one configuration).
        let handler = manifest_handler(&spec.model_path)
            .map_err(|e| BackendError::new(BackendErrorKind::InvalidModel, e))?;
        let dependencies = spec
            .model_path
            .parent()
            .map(|v| v.join(DEPENDENCIES_DIR))
            .filter(|d| d.is_dir());
        let worker = WorkerSpec {
            model_name: spec.model_name.clone(),
            model_dir: spec.model_path.clone(),
            handler,
            envelope: p.get(params::ENVELOPE).cloned().unwrap_or_default(),
            batch_size: spec.max_batch_size.max(1),
            python_path: dependencies.into_iter().collect(),
            startup_timeout: seconds(params::STARTUP_TIMEOUT_S, 120),
            response_timeout: seconds(params::RESPONSE_TIMEOUT_S, 120),
            max_response_bytes: p
                .get(params::MAX_RESPONSE_BYTES)
                .and_then(|v| v.parse().ok())
                .unwrap_or(6_553_500),
        };
        Ok(Box::new(PythonModel {
            code,
            worker,
            version: spec.version,
        }))
    }
}

/// The `handler` of an unpacked archive's `MAR-INF/MANIFEST.json`.
fn manifest_handler(archive: &Path) -> Result<String, String> {
    let path = archive.join("MAR-INF").join("MANIFEST.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let manifest: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    match manifest
        .pointer("/model/handler")
        .and_then(serde_json::Value::as_str)
    {
        Some(h) if !h.is_empty() => Ok(h.to_string()),
        _ => Err("the archive's manifest names no handler".into()),
    }
}

struct PythonModel {
    code: WorkerCode,
    worker: WorkerSpec,
    version: u64,
}

impl LoadedModel for PythonModel {
    fn new_instance(&self, index: usize) -> Result<Box<dyn ModelInstance>, BackendError> {
        let worker = Worker::start(&self.code, &self.worker)
            .map_err(|e| BackendError::new(BackendErrorKind::InvalidModel, e.to_string()))?;
        tracing::info!(model = %self.worker.model_name, instance = index, pid = worker.pid(),
            "TorchServe worker ready");
        let key = (
            self.worker.model_name.clone(),
            self.version,
            index,
            NEXT_SERIAL.fetch_add(1, Ordering::Relaxed),
        );
        set_status(
            &key,
            WorkerStatus {
                index,
                pid: worker.pid(),
                status: "READY",
            },
        );
        Ok(Box::new(PythonInstance {
            code: self.code.clone(),
            spec: self.worker.clone(),
            worker: Some(worker),
            replacement: None,
            key,
        }))
    }
}

static NEXT_REQUEST: AtomicU64 = AtomicU64::new(1);

type Replacement = mpsc::Receiver<Result<Worker, WorkerError>>;

struct PythonInstance {
    code: WorkerCode,
    spec: WorkerSpec,
    /// `None` after the worker was lost, until its replacement is taken.
    worker: Option<Worker>,
    /// A worker being started in the background to replace a lost one.
    replacement: Option<Replacement>,
    key: WorkerKey,
}

impl PythonInstance {
    /// Starts a replacement at once (TorchServe restarts a dead worker too), so it is usually
    /// ready before the next batch comes.
    fn replace_in_background(&mut self) {
        update_status(&self.key, "UNLOADING");
        let (tx, rx) = mpsc::channel();
        let (code, spec, key) = (self.code.clone(), self.spec.clone(), self.key.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("ts-worker-restart-{}", key.2))
            .spawn(move || {
                let started = Worker::start(&code, &spec);
                match &started {
                    Ok(w) => {
                        tracing::info!(model = %spec.model_name, instance = key.2, pid = w.pid(),
                            "TorchServe worker restarted");
                        set_status(
                            &key,
                            WorkerStatus {
                                index: key.2,
                                pid: w.pid(),
                                status: "READY",
                            },
                        );
                    }
                    Err(e) => {
                        tracing::error!(model = %spec.model_name, instance = key.2, error = %e,
                            "TorchServe worker could not be restarted");
                    }
                }
                let _ = tx.send(started);
            });
        match spawned {
            Ok(_) => self.replacement = Some(rx),
            Err(e) => tracing::error!(%e, "cannot start the thread that restarts a worker"),
        }
    }

    /// The worker; a lost one's replacement is waited for (and started if it was not).
    fn worker(&mut self) -> Result<&mut Worker, BackendError> {
        if let Some(w) = &mut self.worker
            && !w.is_alive()
        {
            tracing::warn!(model = %self.spec.model_name, instance = self.key.2, pid = w.pid(),
                "TorchServe worker exited while idle; starting a new one");
            self.worker = None;
            self.replace_in_background();
        }
        if self.worker.is_none() {
            if self.replacement.is_none() {
                self.replace_in_background();
            }
            let started = self
                .replacement
                .take()
                .and_then(|rx| rx.recv().ok())
                .unwrap_or_else(|| Err(WorkerError::Start("the restart did not finish".into())));
            match started {
                Ok(w) => self.worker = Some(w),
                Err(e) => {
                    return Err(BackendError::new(
                        BackendErrorKind::Internal,
                        format!("cannot restart the worker: {e}"),
                    ));
                }
            }
        }
        self.worker
            .as_mut()
            .ok_or_else(|| BackendError::new(BackendErrorKind::Internal, "no worker"))
    }
}

impl Drop for PythonInstance {
    fn drop(&mut self) {
        remove_status(&self.key);
    }
}

impl ModelInstance for PythonInstance {
    fn execute(&mut self, batch: Batch) -> Result<Vec<Tensor>, BackendError> {
        let input = batch
            .inputs
            .iter()
            .find(|t| t.name == REQUEST_INPUT)
            .or_else(|| batch.inputs.first())
            .ok_or_else(|| BackendError::new(BackendErrorKind::InvalidInput, "no REQUEST input"))?;
        let TensorData::Strings(parts) = &input.data else {
            return Err(BackendError::new(
                BackendErrorKind::InvalidInput,
                "REQUEST must be BYTES",
            ));
        };
        let first = NEXT_REQUEST.fetch_add(parts.len() as u64, Ordering::Relaxed);
        let ids: Vec<String> = (0..parts.len())
            .map(|i| format!("{:08x}-{}", first + i as u64, self.key.2))
            .collect();
        let message =
            protocol::inference_message(ids.iter().map(String::as_str).zip(parts.iter().map(|p| &p[..])));
        let answers = match self.worker()?.infer(&message, parts.len()) {
            Ok(a) => a,
            Err(e) => {
                // The worker is gone or unusable: a new one starts now.
                self.worker = None;
                self.replace_in_background();
                return Err(BackendError::new(
                    BackendErrorKind::Internal,
                    match e {
                        WorkerError::Start(m) | WorkerError::Lost(m) => m,
                    },
                ));
            }
        };
        let replies = replies(&ids, answers);
        let shape = input.shape.clone();
        Ok(vec![Tensor::new(
            RESPONSE_OUTPUT,
            DataType::Bytes,
            shape,
            TensorData::Strings(replies.iter().map(Reply::encode).collect::<Vec<Bytes>>()),
        )])
    }
}

/// Each request's final answer, in request order, from the worker's messages.
fn replies(ids: &[String], answers: Vec<protocol::Message>) -> Vec<Reply> {
    let mut bodies: HashMap<&str, Vec<u8>> = HashMap::new();
    let mut finals: HashMap<&str, Reply> = HashMap::new();
    for answer in answers {
        if answer.code != 200 {
            for id in ids {
                finals.entry(id.as_str()).or_insert_with(|| Reply::Failed {
                    code: answer.code,
                    message: answer.message.clone(),
                });
            }
            continue;
        }
        for p in answer.predictions {
            let Some(id) = ids.iter().find(|id| **id == p.request_id) else {
                continue;
            };
            let body = bodies.entry(id.as_str()).or_default();
            body.extend_from_slice(&p.payload);
            if !p.continues() {
                let headers = p
                    .headers
                    .into_iter()
                    .filter(|(n, _)| n != "ts_stream_next")
                    .collect();
                finals.insert(
                    id.as_str(),
                    Reply::Response {
                        status: p.status,
                        reason: p.reason,
                        content_type: p.content_type,
                        headers,
                        body: std::mem::take(body),
                    },
                );
            }
        }
    }
    ids.iter()
        .map(|id| {
            finals.remove(id.as_str()).unwrap_or_else(|| Reply::Failed {
                code: 500,
                message: "the worker sent no answer for this request".into(),
            })
        })
        .collect()
}
