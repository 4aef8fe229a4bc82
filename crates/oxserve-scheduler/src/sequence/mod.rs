//! Triton's sequence batcher, for stateful models: every request names its sequence (a
//! correlation id), a sequence is given one slot of one instance for its whole life, its
//! requests run one at a time and in order, and each batch holds at most one request per
//! sequence. The batcher supplies the model's control tensors (START, END, READY, CORRID) and
//! its implicit state (the state output of one request is the state input of the sequence's
//! next), so the engines themselves stay stateless.
//!
//! Two strategies, as Triton's: `direct` (a request sits in the batch row of its slot; rows of
//! idle slots are filled with READY = false) and `oldest` (the sequences of an instance with a
//! request waiting, oldest first, batched together dynamically).

mod run;
mod slots;

use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use oxserve_backend::{BackendError, LoadedModel};
use oxserve_core::{DataType, Tensor};
use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

use crate::health::FailureWindow;
use crate::instances::start_threads;
use crate::types::{Completed, ExecError, ExecutionObserver, SchedulerConfig};
use slots::{Admission, Pending, Slots};

/// A sequence's correlation id: Triton's `sequence_id`, an unsigned number or a string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CorrelationId {
    Number(u64),
    Text(String),
}

impl std::fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CorrelationId::Number(n) => write!(f, "{n}"),
            CorrelationId::Text(s) => write!(f, "{s}"),
        }
    }
}

/// What a request says about its sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SequenceFlags {
    pub id: CorrelationId,
    /// The first request of the sequence (a START on a live sequence restarts it).
    pub start: bool,
    /// The last request: the sequence's slot is released after it runs.
    pub end: bool,
}

/// How requests of different sequences are put into batches.
#[derive(Debug, Clone, PartialEq)]
pub enum SequenceStrategy {
    /// Each sequence owns one batch row of its instance (`max_batch_size` slots per instance).
    Direct {
        /// How long a batch may wait for more slots to have a request.
        max_queue_delay: Duration,
        /// The share of an instance's slots that must have a request before a batch runs
        /// without waiting out `max_queue_delay`.
        minimum_slot_utilization: f32,
    },
    /// An instance holds up to `max_candidate_sequences` sequences and batches the oldest
    /// requests among them.
    Oldest {
        max_candidate_sequences: usize,
        preferred_batch_sizes: Vec<usize>,
        max_queue_delay: Duration,
    },
}

/// Which control tensor an input of the model is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlKind {
    Start,
    End,
    Ready,
    CorrelationId,
}

/// A control input the batcher fills for every row of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct ControlInput {
    pub name: String,
    pub kind: ControlKind,
    pub datatype: DataType,
    /// START / END / READY: the tensor's value for false and for true (one element each,
    /// little-endian bytes of `datatype`). Empty for CORRID.
    pub false_true: [Vec<u8>; 2],
}

/// One implicit state: the model's `output` of one request is its `input` in the sequence's
/// next request.
#[derive(Debug, Clone, PartialEq)]
pub struct StateSpec {
    pub input: String,
    pub output: String,
    /// The value at the start of a sequence: one row (shape without the batch dimension).
    pub initial: Tensor,
}

/// Triton's `sequence_batching`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceConfig {
    /// For error messages, in Triton's words.
    pub model_name: String,
    pub strategy: SequenceStrategy,
    /// A sequence with no request for this long loses its slot (and its state).
    pub max_sequence_idle: Duration,
    /// In the order the engine takes them, after the client's inputs.
    pub controls: Vec<ControlInput>,
    /// Their inputs follow the controls, in this order.
    pub states: Vec<StateSpec>,
}

/// The id's type as Triton names it when it does not fit the CORRID tensor's type: a string
/// id needs a BYTES control, a number any integer one (32-bit ones keep the low bits, as
/// Triton writes them).
fn id_type_mismatch(id: &CorrelationId, datatype: DataType) -> Option<&'static str> {
    match (id, datatype) {
        (CorrelationId::Text(_), DataType::Bytes) => None,
        (CorrelationId::Text(_), _) => Some("BYTES"),
        (CorrelationId::Number(_), DataType::U64 | DataType::I64 | DataType::U32 | DataType::I32) => None,
        (CorrelationId::Number(_), _) => Some("UINT64"),
    }
}

impl SequenceConfig {
    fn correlation_control(&self) -> Option<&ControlInput> {
        self.controls
            .iter()
            .find(|c| c.kind == ControlKind::CorrelationId)
    }

    /// Slots of one instance: sequences it can hold at once.
    fn slots_per_instance(&self, max_batch_size: usize) -> usize {
        match &self.strategy {
            SequenceStrategy::Direct { .. } => max_batch_size.max(1),
            SequenceStrategy::Oldest {
                max_candidate_sequences,
                ..
            } => (*max_candidate_sequences).max(1),
        }
    }
}

type Outcome = Result<Completed, ExecError>;

struct Shared {
    state: Mutex<Slots>,
    /// Anything changed: a request arrived, a slot was freed, the scheduler stops.
    wake: Condvar,
    config: SchedulerConfig,
    sequence: SequenceConfig,
    observer: Arc<dyn ExecutionObserver>,
    failures: Mutex<FailureWindow>,
    /// Why the version gave up, once it has.
    failure: OnceLock<String>,
}

/// The sequence batcher of one model version.
pub(crate) struct SequenceScheduler {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl SequenceScheduler {
    pub fn start(
        model: Arc<dyn LoadedModel>,
        config: SchedulerConfig,
        sequence: SequenceConfig,
        observer: Arc<dyn ExecutionObserver>,
    ) -> Result<Self, BackendError> {
        let instances = config.instances.max(1);
        let per_instance = sequence.slots_per_instance(config.max_batch_size);
        let shared = Arc::new(Shared {
            state: Mutex::new(Slots::new(instances, per_instance)),
            wake: Condvar::new(),
            failures: Mutex::new(FailureWindow::new(config.restart)),
            failure: OnceLock::new(),
            config,
            sequence,
            observer,
        });
        let mut scheduler = SequenceScheduler {
            shared: Arc::clone(&shared),
            threads: Vec::new(),
        };
        start_threads(
            &mut scheduler.threads,
            instances,
            &shared.config.thread_name,
            |index, ready| {
                let model = Arc::clone(&model);
                let shared = Arc::clone(&shared);
                move || run::instance_thread(&shared, model.as_ref(), index, ready)
            },
        )?;
        Ok(scheduler)
    }

    /// Queues a request of a sequence and waits for its outputs.
    pub async fn submit(
        &self,
        flags: Option<SequenceFlags>,
        inputs: Vec<Tensor>,
        outputs: Vec<String>,
    ) -> Result<Completed, ExecError> {
        let name = &self.shared.sequence.model_name;
        // Triton checks the id's type first; a request without one carries the number 0.
        let given_id = flags.as_ref().map_or(&CorrelationId::Number(0), |f| &f.id);
        if let Some(corrid) = self.shared.sequence.correlation_control()
            && let Some(given) = id_type_mismatch(given_id, corrid.datatype)
        {
            return Err(ExecError::Invalid(format!(
                "sequence batching control '{}' data-type is '{given}', but model '{name}' expects '{}'",
                corrid.name,
                corrid.datatype.wire_name()
            )));
        }
        let Some(flags) = flags else {
            return Err(ExecError::Invalid(format!(
                "inference request to model '{name}' must specify a non-zero or non-empty \
                 correlation ID"
            )));
        };
        if self.shared.config.max_batch_size > 0 {
            let rows = inputs.first().and_then(|t| t.shape.first()).copied().unwrap_or(1);
            if rows != 1 {
                return Err(ExecError::Invalid(format!(
                    "inference request to model '{name}' must specify batch-size 1 due to \
                     requirements of sequence batcher"
                )));
            }
        }
        let (reply, receiver) = oneshot::channel();
        let pending = Pending {
            inputs,
            outputs,
            start: flags.start,
            end: flags.end,
            reply,
            enqueued: Instant::now(),
            span: tracing::Span::current(),
        };
        {
            let mut st = self.shared.state.lock();
            if st.failed {
                let reason = self.shared.failure.get().cloned().unwrap_or_default();
                return Err(ExecError::Unavailable(reason));
            }
            if st.stopping {
                return Err(ExecError::Stopped);
            }
            if st.queued >= self.shared.config.max_queued_total {
                return Err(ExecError::Overloaded);
            }
            st.expire_idle(Instant::now(), self.shared.sequence.max_sequence_idle);
            match st.admit(flags.id.clone(), pending) {
                Admission::Queued => {}
                Admission::NotStarted => {
                    return Err(ExecError::Invalid(format!(
                        "inference request for sequence {} to model '{name}' must specify the \
                         START flag on the first request of the sequence",
                        flags.id
                    )));
                }
            }
        }
        self.shared.wake.notify_all();
        receiver.await.unwrap_or_else(|_| {
            Err(ExecError::InstanceFailed(
                "the instance thread ended without answering".into(),
            ))
        })
    }

    pub fn failure(&self) -> Option<&str> {
        self.shared.failure.get().map(String::as_str)
    }

    /// Requests waiting to run.
    pub fn queued(&self) -> usize {
        self.shared.state.lock().queued
    }
}

impl Drop for SequenceScheduler {
    /// Stops taking requests, lets the instances run what they can, and joins them; what is
    /// left (sequences still waiting for a slot) is answered as stopped.
    fn drop(&mut self) {
        self.shared.state.lock().stopping = true;
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a model instance thread panicked");
            }
        }
        let left = self.shared.state.lock().drain();
        for p in left {
            let _ = p.reply.send(Err(ExecError::Stopped));
        }
    }
}

impl Shared {
    /// Stops the version after repeated instance failures: every waiting request is answered
    /// with the reason and new ones are refused.
    fn give_up(&self, failures: usize, last: &str) {
        let window = self.config.restart.window.as_secs_f64();
        let reason = format!(
            "the model instances failed {failures} times within {window} s (the restart limit); \
             last failure: {last}"
        );
        if self.failure.set(reason.clone()).is_err() {
            // Another instance gave up first and answered the queue.
            return;
        }
        let left = {
            let mut st = self.state.lock();
            st.failed = true;
            st.drain()
        };
        self.wake.notify_all();
        tracing::error!(
            scheduler = %self.config.thread_name, %reason, answered = left.len(),
            "model version is UNAVAILABLE: its instances keep failing"
        );
        for p in left {
            let _ = p.reply.send(Err(ExecError::Unavailable(reason.clone())));
        }
    }
}
