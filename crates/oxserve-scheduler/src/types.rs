//! The scheduler's public vocabulary: its configuration (Triton's `dynamic_batching` and queue
//! policies), the jobs it takes and what it reports back.

use std::collections::HashMap;
use std::time::Duration;

use oxserve_backend::BackendError;
use oxserve_core::Tensor;

/// What happens to a request whose queue timeout passes before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeoutAction {
    /// Answer DeadlineExceeded without running it.
    #[default]
    Reject,
    /// Run it after every request at the same or higher priority that has not timed out.
    Delay,
}

/// Triton's `ModelQueuePolicy`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueuePolicy {
    pub timeout_action: TimeoutAction,
    /// Queue timeout for requests that bring none; `None` = wait forever.
    pub default_timeout: Option<Duration>,
    /// A request's own `timeout` may shorten the default.
    pub allow_timeout_override: bool,
    /// Requests that may wait at this level; 0 = unbounded (the global cap still applies).
    pub max_queue_size: usize,
}

/// Triton's `dynamic_batching`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DynamicBatching {
    pub preferred_batch_sizes: Vec<usize>,
    /// How long the oldest request may wait for a fuller batch; zero = never wait when an
    /// instance is free.
    pub max_queue_delay: Duration,
    /// Answer requests in the order they were queued.
    pub preserve_ordering: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Instances, each on its own OS thread.
    pub instances: usize,
    /// Largest batch in rows; 0 = the model has no batch dimension (requests run alone).
    pub max_batch_size: usize,
    /// `None`: every request runs as its own batch.
    pub dynamic_batching: Option<DynamicBatching>,
    /// Priority levels 1 (highest) to `priority_levels`; 0 = one level.
    pub priority_levels: u32,
    /// Level for requests that ask for none (priority 0).
    pub default_priority_level: u32,
    pub default_queue_policy: QueuePolicy,
    /// Policies of particular levels; other levels use the default one.
    pub priority_queue_policy: HashMap<u32, QueuePolicy>,
    /// Safety cap on all waiting requests, whatever the policies say.
    pub max_queued_total: usize,
    /// Thread name prefix, for debuggers and `top -H`.
    pub thread_name: String,
    /// When an instance that failed is re-created, and when the version gives up.
    pub restart: RestartPolicy,
    /// Triton's `sequence_batching`: the model is stateful and runs under the sequence
    /// batcher instead of the dynamic one.
    pub sequence: Option<crate::SequenceConfig>,
}

/// What happens when an instance fails (its engine panics while running a batch, or while
/// being re-created): the requests of that batch fail, the instance is re-created from the
/// loaded model, and serving continues, until `max_failures` failures of the version's
/// instances fall within `window`. Then the version gives up: it answers every queued and new
/// request with [`ExecError::Unavailable`] and reports the reason through
/// [`crate::Scheduler::failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Failures within `window` that make the version unavailable (at least 1).
    pub max_failures: usize,
    pub window: Duration,
    /// Wait before the first re-creation; it doubles after each failure in the window, up to
    /// `max_backoff`, so an engine that keeps failing does not spin.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            max_failures: 3,
            window: Duration::from_secs(60),
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            instances: 1,
            max_batch_size: 0,
            dynamic_batching: None,
            priority_levels: 0,
            default_priority_level: 0,
            default_queue_policy: QueuePolicy::default(),
            priority_queue_policy: HashMap::new(),
            max_queued_total: 1024,
            thread_name: "model".into(),
            restart: RestartPolicy::default(),
            sequence: None,
        }
    }
}

/// One request for the scheduler: model-facing inputs (first dimension = rows when the model
/// batches) and the outputs it wants.
#[derive(Debug, Clone)]
pub struct Job {
    pub inputs: Vec<Tensor>,
    pub outputs: Vec<String>,
    /// 0 = the default level.
    pub priority: u32,
    /// The request's own queue timeout (honoured as the queue policy allows).
    pub timeout: Option<Duration>,
    /// The request's sequence (`sequence_id`, `sequence_start`, `sequence_end`); required by
    /// a model with `sequence_batching`, ignored by the others.
    pub sequence: Option<crate::SequenceFlags>,
}

/// Where the time of one request went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestTiming {
    pub queue: Duration,
    pub compute_input: Duration,
    pub compute_infer: Duration,
    pub compute_output: Duration,
    /// Rows of the batch it ran in.
    pub batch_size: usize,
}

/// One engine execution, reported to the [`ExecutionObserver`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchTiming {
    pub batch_size: usize,
    pub requests: usize,
    pub compute_input: Duration,
    pub compute_infer: Duration,
    pub compute_output: Duration,
}

/// Told about every execution (for statistics and metrics), on the instance's thread.
pub trait ExecutionObserver: Send + Sync {
    fn on_execution(&self, timing: &BatchTiming);
}

/// An observer that ignores everything.
#[derive(Debug, Default)]
pub struct NoObserver;

impl ExecutionObserver for NoObserver {
    fn on_execution(&self, _timing: &BatchTiming) {}
}

#[derive(Debug)]
pub struct Completed {
    pub outputs: Vec<Tensor>,
    pub timing: RequestTiming,
}

#[derive(Debug)]
pub enum ExecError {
    /// The queue is full; the caller should shed the request (429).
    Overloaded,
    /// The request's queue timeout passed before it could run.
    DeadlineExceeded,
    /// The request is malformed for the scheduler (e.g. a priority level that doesn't exist).
    Invalid(String),
    /// The scheduler is shutting down.
    Stopped,
    /// The engine failed on the batch this request ran in.
    Backend(BackendError),
    /// The instance running this request's batch failed (its engine panicked); the instance
    /// is being re-created. The text says what happened, for logs.
    InstanceFailed(String),
    /// The version gave up after repeated instance failures (see [`RestartPolicy`]); the text
    /// is the reason, as [`crate::Scheduler::failure`] reports it.
    Unavailable(String),
}
