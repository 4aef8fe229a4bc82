//! The facade the protocol front-ends call. It knows nothing about HTTP or gRPC.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use std::time::{Duration, Instant};

use oxserve_backend::BackendErrorKind;
use oxserve_core::{Error, ErrorKind, InferRequest, InferResponse, ModelMetadata, Parameters, Result};
use oxserve_repository::pb::ModelConfig;
use oxserve_scheduler::{ExecError, Job};

use crate::lifecycle::LoadOverride;
use crate::manager::{ControlMode, ModelManager};
use crate::model::ServedVersion;
use crate::stats::{FailureReason, Metrics, ModelStatistics};
use crate::validate::{finish, prepare};

/// The KServe v2 extensions this server implements, as reported by server metadata.
const EXTENSIONS: &[&str] = &[
    "classification",
    "model_repository",
    "model_configuration",
    "binary_tensor_data",
    "parameters",
    "statistics",
    "schedule_policy",
    "system_shared_memory",
    "logging",
    "trace",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerMetadata {
    pub name: String,
    pub version: String,
    pub extensions: Vec<String>,
}

/// One row of the repository index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    pub version: Option<u64>,
    /// "READY" or "UNAVAILABLE" (Triton's names; LOADING/UNLOADING come with live reloads).
    pub state: String,
    pub reason: String,
}

struct Inner {
    manager: ModelManager,
    /// Set once the startup load pass has finished.
    loaded: AtomicBool,
    /// Set when shutdown starts: readiness drops so load balancers drain us.
    stopping: AtomicBool,
    /// Ready only when every model is ready (Triton's `--strict-readiness`, default true).
    strict_readiness: bool,
    /// Versions loading in the background (load requests, poll reloads) do not make the
    /// server unready (`--ready-while-loading`); per-model readiness stays exact.
    ready_while_loading: AtomicBool,
    /// Triton's trace extension (off unless the server was started with trace settings).
    trace: std::sync::OnceLock<Arc<crate::trace::TraceManager>>,
}

#[derive(Clone)]
pub struct InferenceService {
    inner: Arc<Inner>,
}

impl InferenceService {
    pub fn new(manager: ModelManager, strict_readiness: bool) -> Self {
        InferenceService {
            inner: Arc::new(Inner {
                manager,
                loaded: AtomicBool::new(false),
                stopping: AtomicBool::new(false),
                strict_readiness,
                ready_while_loading: AtomicBool::new(false),
                trace: std::sync::OnceLock::new(),
            }),
        }
    }

    /// Loads the repositories on a blocking thread; readiness turns on when it is done.
    pub async fn load_models(&self) {
        let this = self.clone();
        let done = tokio::task::spawn_blocking(move || this.inner.manager.load_all()).await;
        if done.is_err() {
            tracing::error!("model loading panicked");
        }
        self.inner.loaded.store(true, Ordering::Release);
    }

    /// Installs the server's tracing (once, at start); without it tracing is off.
    pub fn set_trace(&self, manager: Arc<crate::trace::TraceManager>) {
        let _ = self.inner.trace.set(manager);
    }

    /// The server's tracing: what samples requests and holds the trace settings.
    pub fn trace(&self) -> &Arc<crate::trace::TraceManager> {
        self.inner
            .trace
            .get_or_init(|| Arc::new(crate::trace::TraceManager::disabled()))
    }

    /// Marks the server as going away: not ready any more, live until it exits.
    pub fn begin_shutdown(&self) {
        self.inner.stopping.store(true, Ordering::Release);
    }

    pub fn is_live(&self) -> bool {
        true
    }

    /// See `--ready-while-loading` (docs/model-repository.md, "Readiness").
    pub fn set_ready_while_loading(&self, on: bool) {
        self.inner.ready_while_loading.store(on, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        if !self.inner.loaded.load(Ordering::Acquire) || self.inner.stopping.load(Ordering::Acquire) {
            return false;
        }
        if !self.inner.strict_readiness {
            return true;
        }
        let table = self.inner.manager.snapshot();
        // Models and versions taken out on purpose do not make the server unready, nor does a
        // reload that failed while the versions loaded before keep serving.
        let loading_ok = self.inner.ready_while_loading.load(Ordering::Acquire);
        table.models.values().filter(|m| !m.unloaded).all(|m| {
            m.error.is_none()
                && m.versions.values().all(|v| {
                    v.serving().is_some()
                        || matches!(
                            v,
                            crate::manager::VersionState::Unloading | crate::manager::VersionState::Unloaded
                        )
                        || (m.reload_error.is_some()
                            && matches!(v, crate::manager::VersionState::Unavailable(_)))
                        || (loading_ok && matches!(v, crate::manager::VersionState::Loading))
                })
        })
    }

    pub fn server_metadata(&self) -> ServerMetadata {
        ServerMetadata {
            name: "oxserve".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: EXTENSIONS.iter().map(|s| (*s).to_string()).collect(),
        }
    }

    pub fn model_ready(&self, name: &str, version: Option<u64>) -> bool {
        self.inner.manager.snapshot().resolve(name, version).is_ok()
    }

    /// Like [`Self::model_ready`], but tells an unknown model from one that is not ready.
    pub fn check_model_ready(&self, name: &str, version: Option<u64>) -> Result<()> {
        self.inner.manager.snapshot().resolve(name, version).map(|_| ())
    }

    pub fn model_metadata(&self, name: &str, version: Option<u64>) -> Result<ModelMetadata> {
        let table = self.inner.manager.snapshot();
        let served = table.resolve(name, version)?;
        let mut metadata = served.metadata.clone();
        if version.is_none() {
            // Without a version the metadata lists every ready version, as Triton does.
            if let Some(record) = table.models.get(name) {
                metadata.versions = record
                    .versions
                    .iter()
                    .filter(|(_, s)| s.serving().is_some())
                    .map(|(v, _)| v.to_string())
                    .collect();
            }
        }
        Ok(metadata)
    }

    pub fn model_config(&self, name: &str, version: Option<u64>) -> Result<Arc<ModelConfig>> {
        let served = self.inner.manager.snapshot().resolve(name, version)?;
        Ok(Arc::clone(&served.config))
    }

    /// Every model of the table with each version's state and reason, and (as Triton lists
    /// them) the models of the repositories that were never loaded, with no state.
    pub fn repository_index(&self, ready_only: bool) -> Vec<IndexEntry> {
        let table = self.inner.manager.snapshot();
        let mut entries = Vec::new();
        for (name, record) in &table.models {
            if let Some(reason) = &record.error {
                if !ready_only {
                    entries.push(IndexEntry {
                        name: name.clone(),
                        version: None,
                        state: "UNAVAILABLE".into(),
                        reason: reason.clone(),
                    });
                }
                continue;
            }
            for (version, state) in &record.versions {
                let index_state = state.index_state();
                if ready_only && index_state != "READY" {
                    continue;
                }
                let reason = match (index_state, &record.reload_error) {
                    ("READY", Some(reload_error)) => reload_error.clone(),
                    ("READY", None) => String::new(),
                    _ => state.unavailable_reason().unwrap_or_default().to_string(),
                };
                entries.push(IndexEntry {
                    name: name.clone(),
                    version: Some(*version),
                    state: index_state.into(),
                    reason,
                });
            }
        }
        if !ready_only {
            let (dirs, _) = self.inner.manager.scan_repositories();
            for name in dirs.keys().filter(|n| !table.models.contains_key(*n)) {
                entries.push(IndexEntry {
                    name: name.clone(),
                    version: None,
                    state: String::new(),
                    reason: String::new(),
                });
            }
            entries.sort_by(|a, b| a.name.cmp(&b.name).then(a.version.cmp(&b.version)));
        }
        entries
    }

    /// Loads or reloads a model (Triton's repository load request) on a blocking thread:
    /// the answer comes when the new versions serve, or with why they do not.
    pub async fn load_model(&self, name: &str, overrides: LoadOverride) -> Result<()> {
        let this = self.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || this.inner.manager.load_model(&name, overrides))
            .await
            .map_err(|e| Error::internal(format!("the model load task failed: {e}")))?
    }

    /// Unloads a model (Triton's repository unload request): it stops taking requests at
    /// once; its in-flight and queued requests finish before its memory is freed.
    pub async fn unload_model(&self, name: &str) -> Result<()> {
        let this = self.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || this.inner.manager.unload_model(&name))
            .await
            .map_err(|e| Error::internal(format!("the model unload task failed: {e}")))?
    }

    /// Replaces the models defined by the server's model list (TF Serving's config reload) on
    /// a blocking thread; answers when the new list serves, or with why some model does not.
    pub async fn set_model_list(&self, models: Vec<crate::ListedModel>) -> Result<()> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.inner.manager.set_model_list(models))
            .await
            .map_err(|e| Error::internal(format!("the model list task failed: {e}")))?
    }

    /// In poll mode, scans the repositories every `interval` on its own thread and applies
    /// what changed (see [`ModelManager::poll_repositories`]) until shutdown begins.
    pub fn start_polling(&self, interval: Duration) {
        if self.inner.manager.control_mode() != ControlMode::Poll {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("oxserve-poll".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(interval);
                    let Some(inner) = weak.upgrade() else { return };
                    if inner.stopping.load(Ordering::Acquire) {
                        return;
                    }
                    inner.manager.poll_repositories();
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the repository poll thread");
        }
    }

    /// The version a label points at (NOT_FOUND: unknown model or label).
    pub fn label_version(&self, name: &str, label: &str) -> Result<u64> {
        self.inner.manager.snapshot().label_version(name, label)
    }

    /// Points a label at a serving version (see [`ModelManager::set_version_label`]).
    pub fn set_version_label(&self, name: &str, label: &str, version: u64) -> Result<()> {
        self.inner.manager.set_version_label(name, label, version)
    }

    /// Rolls a label, or the default version, back (see [`ModelManager::rollback`]).
    pub fn rollback(&self, name: &str, label: Option<&str>) -> Result<u64> {
        self.inner.manager.rollback(name, label)
    }

    /// Replaces a model's traffic split and/or shadow (see [`ModelManager::set_traffic`]).
    pub fn set_traffic(
        &self,
        name: &str,
        split: Option<Option<crate::traffic::TrafficSplit>>,
        shadow: Option<Option<crate::traffic::ShadowTraffic>>,
    ) -> Result<()> {
        self.inner.manager.set_traffic(name, split, shadow)
    }

    /// A model's traffic split and shadow.
    pub fn traffic(
        &self,
        name: &str,
    ) -> Result<(
        Option<crate::traffic::TrafficSplit>,
        Option<crate::traffic::ShadowTraffic>,
    )> {
        self.inner.manager.traffic(name)
    }

    /// A model's labels and its default version.
    pub fn version_labels(
        &self,
        name: &str,
    ) -> Result<(std::collections::BTreeMap<String, u64>, Option<u64>)> {
        self.inner.manager.version_labels(name)
    }

    pub fn control_mode(&self) -> ControlMode {
        self.inner.manager.control_mode()
    }

    /// Waits until versions taken out of service have been unloaded (tests, figures).
    pub fn wait_unloaded(&self, timeout: Duration) -> bool {
        self.inner.manager.wait_retired(timeout)
    }

    /// Validates and runs one request: on the version it names, else the one the model's
    /// traffic split picks, else the default; a share of the requests that name no version
    /// are also mirrored to the model's shadow candidate (in the background, after this
    /// answer).
    pub async fn infer(&self, request: InferRequest) -> Result<InferResponse> {
        let (served, shadow) = self.inner.manager.snapshot().route(
            &request.model_name,
            request.model_version,
            request.routing_key.as_deref(),
        )?;
        // The mirrored copy is not traced: the trace ends with the primary's answer.
        let mirrored = shadow.map(|candidate| {
            let mut copy = request.clone();
            copy.trace = None;
            (candidate, copy)
        });
        let answer = run_on(&served, request).await;
        if let (Ok(primary_answer), Some((candidate, request))) = (&answer, mirrored) {
            crate::shadow::mirror(
                self.metrics(),
                served.version,
                candidate,
                request,
                primary_answer.clone(),
            );
        }
        answer
    }

    /// The version a request without a version goes to under the model's traffic split is
    /// sticky by this header, when it has one.
    pub fn sticky_header(&self, name: &str) -> Option<String> {
        let table = self.inner.manager.snapshot();
        table.models.get(name)?.split.as_ref()?.sticky_header.clone()
    }

    /// Statistics of one version, every ready version of one model, or every model.
    pub fn model_statistics(&self, name: Option<&str>, version: Option<u64>) -> Result<Vec<ModelStatistics>> {
        let table = self.inner.manager.snapshot();
        let of = |served: &ServedVersion| ModelStatistics {
            shadow: served.shadow.snapshot(),
            ..served.stats.snapshot()
        };
        let ready = |record: &crate::manager::ModelRecord| -> Vec<ModelStatistics> {
            record
                .versions
                .values()
                .filter_map(|s| s.serving().map(|served| of(served)))
                .collect()
        };
        match (name, version) {
            (None, _) => Ok(table.models.values().flat_map(ready).collect()),
            (Some(name), Some(v)) => Ok(vec![of(&*table.resolve(name, Some(v))?)]),
            (Some(name), None) => match table.models.get(name) {
                Some(record) => Ok(ready(record)),
                None => Err(Error::not_found(format!(
                    "Request for unknown model: '{name}' is not found"
                ))),
            },
        }
    }

    /// The Prometheus metrics of every model.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(self.inner.manager.metrics())
    }
}

/// Runs one request on one version, with its statistics (successes, failures, timings).
pub(crate) async fn run_on(served: &ServedVersion, request: InferRequest) -> Result<InferResponse> {
    let received = Instant::now();
    served.stats.request_started();
    let result = run(served, request, received).await;
    served.stats.request_finished();
    if let Err((e, reason)) = &result {
        served.stats.record_failure(*reason, received.elapsed());
        if e.kind() == ErrorKind::Internal {
            tracing::warn!(model = %served.model_name, version = served.version, error = %e, "inference failed");
        }
    }
    result.map_err(|(e, _)| e)
}

/// Reads Triton's schedule-policy parameters: `priority` (0 = the model's default level) and
/// `timeout` in microseconds.
fn schedule_parameters(parameters: &Parameters) -> Result<(u32, Option<Duration>)> {
    let priority = match parameters.get("priority") {
        None => 0,
        Some(v) => v
            .as_i64()
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| Error::invalid("parameter 'priority' must be a non-negative integer"))?,
    };
    let timeout = match parameters.get("timeout") {
        None => None,
        Some(v) => Some(Duration::from_micros(
            v.as_i64().and_then(|t| u64::try_from(t).ok()).ok_or_else(|| {
                Error::invalid("parameter 'timeout' must be a non-negative number of microseconds")
            })?,
        )),
    };
    Ok((priority, timeout))
}

async fn run(
    served: &ServedVersion,
    request: InferRequest,
    received: Instant,
) -> std::result::Result<InferResponse, (Error, FailureReason)> {
    let trace = request.trace.clone();
    if let Some(t) = &trace {
        t.set_request(served.version, request.id.as_deref());
        t.timestamp_at("REQUEST_START", received);
        for input in &request.inputs {
            t.tensor("TENSOR_QUEUE_INPUT", input);
        }
    }
    let result = run_traced(served, request, received, trace.as_deref()).await;
    if let Some(t) = &trace {
        t.timestamp("REQUEST_END");
    }
    result
}

async fn run_traced(
    served: &ServedVersion,
    request: InferRequest,
    received: Instant,
    trace: Option<&oxserve_core::Trace>,
) -> std::result::Result<InferResponse, (Error, FailureReason)> {
    let other = |e: Error| (e, FailureReason::Other);
    let (priority, timeout) = schedule_parameters(&request.parameters).map_err(other)?;
    let sequence = crate::sequence::sequence_flags(&request.parameters).map_err(other)?;
    let (io, scheduler) = served.entry(request.signature.as_deref()).map_err(other)?;
    let prepared = prepare(io, &served.model_name, request.inputs, request.outputs).map_err(other)?;
    let rows = prepared.rows;
    let job = Job {
        inputs: prepared.batch.inputs,
        outputs: prepared.batch.outputs,
        priority,
        timeout,
        sequence,
    };
    let enqueued = Instant::now();
    if let Some(t) = trace {
        t.timestamp_at("QUEUE_START", enqueued);
    }
    let completed = scheduler.submit(job).await.map_err(|e| exec_error(served, e))?;
    if let Some(t) = trace {
        // The scheduler measured each stage; placed after the enqueue instant they are the
        // instants the stages began and ended.
        let timing = &completed.timing;
        let compute_start = enqueued + timing.queue;
        let input_end = compute_start + timing.compute_input;
        let output_start = input_end + timing.compute_infer;
        t.timestamp_at("COMPUTE_START", compute_start);
        t.timestamp_at("COMPUTE_INPUT_END", input_end);
        t.timestamp_at("COMPUTE_OUTPUT_START", output_start);
        t.timestamp_at("COMPUTE_END", output_start + timing.compute_output);
    }
    let outputs = finish(io, &prepared.outputs, completed.outputs).map_err(other)?;
    if let Some(t) = trace.filter(|t| t.records_tensors()) {
        for output in &outputs {
            t.tensor("TENSOR_BACKEND_OUTPUT", output);
        }
    }
    served
        .stats
        .record_success(rows, received.elapsed(), &completed.timing);
    Ok(InferResponse {
        model_name: served.model_name.clone(),
        model_version: served.version,
        id: request.id,
        parameters: Default::default(),
        outputs,
    })
}

pub(crate) fn exec_error(served: &ServedVersion, e: ExecError) -> (Error, FailureReason) {
    let name = &served.model_name;
    match e {
        ExecError::Overloaded => (
            Error::new(
                ErrorKind::Overloaded,
                format!("model '{name}' has too many queued requests"),
            ),
            FailureReason::Rejected,
        ),
        ExecError::DeadlineExceeded => (
            Error::new(
                ErrorKind::DeadlineExceeded,
                format!("request for model '{name}' timed out in the queue"),
            ),
            FailureReason::Rejected,
        ),
        ExecError::Invalid(m) => (Error::invalid(m), FailureReason::Other),
        ExecError::Stopped => (
            Error::unavailable(format!("model '{name}' is unloading")),
            FailureReason::Canceled,
        ),
        ExecError::InstanceFailed(detail) => {
            tracing::error!(model = %name, version = served.version, %detail, "model instance failed");
            (
                Error::new(
                    ErrorKind::Internal,
                    format!(
                        "model '{name}' version {}: the model instance failed while running this \
                         request's batch and is being restarted",
                        served.version
                    ),
                ),
                FailureReason::Backend,
            )
        }
        ExecError::Unavailable(reason) => (
            Error::unavailable(format!(
                "model '{name}' version {} is not ready: {reason}",
                served.version
            )),
            FailureReason::Rejected,
        ),
        ExecError::Backend(e) => {
            let kind = match e.kind() {
                BackendErrorKind::InvalidInput => ErrorKind::InvalidArgument,
                BackendErrorKind::Unsupported => ErrorKind::Unsupported,
                BackendErrorKind::InvalidModel | BackendErrorKind::Internal => ErrorKind::Internal,
            };
            (
                Error::new(kind, format!("inference failed: {}", e.message())),
                FailureReason::Backend,
            )
        }
    }
}
