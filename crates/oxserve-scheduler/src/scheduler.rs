//! The threads: one per instance, each taking the next batch from the shared queue when it is
//! free, running it, and answering every request in it.
//!
//! Each thread also supervises its instance: a panic while a batch runs (in the engine or in
//! our own batching code) fails only that batch's requests, the instance is dropped and
//! re-created from the loaded model, and serving goes on; too many failures within the
//! [`RestartPolicy`](crate::RestartPolicy) window make the whole version give up, answering
//! every waiting request instead of leaving it queued.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU8, Ordering as AtomicOrdering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use oxserve_backend::support::{panic_message, truncate};
use oxserve_backend::{BackendError, BackendErrorKind, LoadedModel, ModelInstance};
use oxserve_core::Tensor;
use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

use crate::batch::{Executed, batch_span, run_concatenated, slice_rows};
use crate::health::{FailureWindow, Verdict};
use crate::instances::{
    Ready, Supervisor, discard, first_instance, pause_unless, recreate, row_shapes, start_threads,
};
use crate::queue::{self, BatchQueue, Decision, Entry, Swept};
use crate::types::{
    BatchTiming, Completed, ExecError, ExecutionObserver, Job, RequestTiming, SchedulerConfig, TimeoutAction,
};

type Outcome = Result<Completed, ExecError>;

struct Waiting {
    inputs: Vec<Tensor>,
    outputs: Vec<String>,
    reply: oneshot::Sender<Outcome>,
    seq: u64,
    claim: Arc<AtomicU8>,
    /// The caller's tracing span (the request's, with its id), entered on the instance thread
    /// while its batch runs so the engine's own log lines name the request.
    span: tracing::Span,
}

/// Who owns a queued request: still queued, taken by an instance, or given up by its caller
/// (timed out). Exactly one side wins, so a timed-out request never runs.
const QUEUED: u8 = 0;
const TAKEN: u8 = 1;
const ABANDONED: u8 = 2;

impl Waiting {
    fn gone(&self) -> bool {
        self.reply.is_closed() || self.claim.load(AtomicOrdering::Acquire) == ABANDONED
    }

    /// Claims the request for execution; false if its caller already gave up.
    fn take(&self) -> bool {
        self.claim
            .compare_exchange(QUEUED, TAKEN, AtomicOrdering::AcqRel, AtomicOrdering::Acquire)
            .is_ok()
            && !self.reply.is_closed()
    }
}

struct State {
    queue: BatchQueue<Waiting>,
    stopping: bool,
    /// The version gave up after repeated instance failures: nothing more is queued or run.
    failed: bool,
    next_seq: u64,
}

/// Answers in queue order when `preserve_ordering` is on: an answer waits here until every
/// earlier request has been answered.
#[derive(Default)]
struct Ordered {
    next: u64,
    ready: BTreeMap<u64, (oneshot::Sender<Outcome>, Outcome)>,
}

struct Shared {
    state: Mutex<State>,
    /// Work arrived (or the scheduler stops): wakes instances waiting for a batch.
    wake: Condvar,
    /// The scheduler stops or gives up: wakes instances waiting to be re-created. Separate from
    /// `wake` so that a request's `notify_one` always reaches an instance that can run it.
    halt: Condvar,
    config: SchedulerConfig,
    observer: Arc<dyn ExecutionObserver>,
    ordered: Option<Mutex<Ordered>>,
    failures: Mutex<FailureWindow>,
    /// Why the version gave up, once it has.
    failure: OnceLock<String>,
}

impl Shared {
    fn answer(&self, seq: u64, reply: oneshot::Sender<Outcome>, outcome: Outcome) {
        let Some(ordered) = &self.ordered else {
            let _ = reply.send(outcome);
            return;
        };
        let mut o = ordered.lock();
        o.ready.insert(seq, (reply, outcome));
        loop {
            let next = o.next;
            let Some((reply, outcome)) = o.ready.remove(&next) else {
                break;
            };
            let _ = reply.send(outcome);
            o.next += 1;
        }
    }

    /// Stops the version after repeated failures: every queued request is answered with the
    /// reason, new ones are refused, and the other instances finish their batch and end.
    fn give_up(&self, failures: usize, last: &str) {
        let window = self.config.restart.window.as_secs_f64();
        let mut first = false;
        let reason = self
            .failure
            .get_or_init(|| {
                first = true;
                format!(
                    "the model instances failed {failures} times within {window} s (the restart \
                     limit); last failure: {last}"
                )
            })
            .clone();
        if !first {
            // Another instance gave up first and answered the queue.
            return;
        }
        let left = {
            let mut st = self.state.lock();
            st.failed = true;
            st.queue.drain()
        };
        self.wake.notify_all();
        self.halt.notify_all();
        tracing::error!(
            scheduler = %self.config.thread_name, %reason, answered = left.len(),
            "model version is UNAVAILABLE: its instances keep failing"
        );
        for e in left {
            self.answer(
                e.item.seq,
                e.item.reply,
                Err(ExecError::Unavailable(reason.clone())),
            );
        }
    }
}

impl Supervisor for Shared {
    fn name(&self) -> &str {
        &self.config.thread_name
    }

    fn failures(&self) -> &Mutex<FailureWindow> {
        &self.failures
    }

    fn give_up(&self, failures: usize, last: &str) {
        Shared::give_up(self, failures, last);
    }

    /// Waits on `halt` (not `wake`, so that a request's `notify_one` always reaches an
    /// instance that can run it).
    fn pause(&self, wait: Duration) -> bool {
        pause_unless(&self.state, &self.halt, wait, |st| st.stopping || st.failed)
    }
}

/// The dynamic batcher of one model version (every model without `sequence_batching`).
pub(crate) struct BatchScheduler {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl BatchScheduler {
    /// Creates every instance on the thread that will own it and returns once all are ready,
    /// or with the first instance's error (threads already started are stopped).
    pub fn start(
        model: Arc<dyn LoadedModel>,
        config: SchedulerConfig,
        observer: Arc<dyn ExecutionObserver>,
    ) -> Result<Self, BackendError> {
        let levels = config.priority_levels.max(1) as usize;
        let ordered = config
            .dynamic_batching
            .as_ref()
            .is_some_and(|b| b.preserve_ordering)
            .then(|| Mutex::new(Ordered::default()));
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: BatchQueue::new(levels),
                stopping: false,
                failed: false,
                next_seq: 0,
            }),
            wake: Condvar::new(),
            halt: Condvar::new(),
            observer,
            ordered,
            failures: Mutex::new(FailureWindow::new(config.restart)),
            failure: OnceLock::new(),
            config,
        });
        let mut scheduler = BatchScheduler {
            shared: Arc::clone(&shared),
            threads: Vec::new(),
        };
        let count = shared.config.instances.max(1);
        start_threads(
            &mut scheduler.threads,
            count,
            &shared.config.thread_name,
            |index, ready| {
                let model = Arc::clone(&model);
                let shared = Arc::clone(&shared);
                move || instance_thread(&shared, model.as_ref(), index, ready)
            },
        )?;
        Ok(scheduler)
    }

    /// Queues a request and waits for its outputs.
    pub async fn submit(&self, job: Job) -> Result<Completed, ExecError> {
        let config = &self.shared.config;
        let level = if config.priority_levels == 0 {
            0
        } else {
            let p = if job.priority == 0 {
                config.default_priority_level.max(1)
            } else {
                job.priority
            };
            if p > config.priority_levels {
                return Err(ExecError::Invalid(format!(
                    "priority {p} is out of range: the model has priority levels 1 to {}",
                    config.priority_levels
                )));
            }
            (p - 1) as usize
        };
        let policy = config
            .priority_queue_policy
            .get(&(level as u32 + 1))
            .unwrap_or(&config.default_queue_policy);
        let batched = config.max_batch_size > 0;
        let rows = if batched {
            job.inputs
                .first()
                .and_then(|t| t.shape.first())
                .map_or(1, |&r| r.max(0) as usize)
        } else {
            1
        };
        let key = row_shapes(&job.inputs, batched);
        let now = Instant::now();
        let deadline = queue::deadline(
            now,
            policy.default_timeout,
            policy.allow_timeout_override,
            job.timeout,
        );
        let action = policy.timeout_action;
        let (reply, receiver) = oneshot::channel();
        let claim = Arc::new(AtomicU8::new(QUEUED));
        {
            let mut st = self.shared.state.lock();
            if st.failed {
                let reason = self.shared.failure.get().cloned().unwrap_or_default();
                return Err(ExecError::Unavailable(reason));
            }
            if st.stopping {
                return Err(ExecError::Stopped);
            }
            let level_full = policy.max_queue_size > 0 && st.queue.len_at(level) >= policy.max_queue_size;
            if level_full || st.queue.len() >= config.max_queued_total {
                return Err(ExecError::Overloaded);
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            st.queue.push(Entry {
                item: Waiting {
                    inputs: job.inputs,
                    outputs: job.outputs,
                    reply,
                    seq,
                    claim: Arc::clone(&claim),
                    span: tracing::Span::current(),
                },
                rows,
                key,
                enqueued: now,
                deadline,
                timeout_action: action,
                level,
            });
        }
        self.shared.wake.notify_one();
        let mut receiver = receiver;
        let answer = match (deadline, action) {
            // Answer a REJECT timeout on time even while every instance is busy, unless an
            // instance has already taken the request (queue timeouts end where execution starts).
            (Some(d), TimeoutAction::Reject) => {
                match tokio::time::timeout_at(tokio::time::Instant::from_std(d), &mut receiver).await {
                    Ok(r) => r,
                    Err(_) => {
                        let gave_up = claim
                            .compare_exchange(
                                QUEUED,
                                ABANDONED,
                                AtomicOrdering::AcqRel,
                                AtomicOrdering::Acquire,
                            )
                            .is_ok();
                        if gave_up {
                            return Err(ExecError::DeadlineExceeded);
                        }
                        receiver.await
                    }
                }
            }
            _ => receiver.await,
        };
        // Every request taken from the queue is answered, even when its batch panics; a reply
        // dropped unanswered can only mean an instance thread died where no guard reached.
        answer.unwrap_or_else(|_| {
            Err(ExecError::InstanceFailed(
                "the instance thread ended without answering".into(),
            ))
        })
    }

    /// Why the version stopped serving after repeated instance failures; `None` while it serves.
    pub fn failure(&self) -> Option<&str> {
        self.shared.failure.get().map(String::as_str)
    }

    /// Requests waiting for an instance.
    pub fn queued(&self) -> usize {
        self.shared.state.lock().queue.len()
    }
}

impl Drop for BatchScheduler {
    /// Stops taking requests, lets the instances finish what is queued, and joins them.
    fn drop(&mut self) {
        self.shared.state.lock().stopping = true;
        self.shared.wake.notify_all();
        self.shared.halt.notify_all();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a model instance thread panicked");
            }
        }
        // Instances that failed to start leave nobody to drain the queue.
        let left = self.shared.state.lock().queue.drain();
        for e in left {
            self.shared
                .answer(e.item.seq, e.item.reply, Err(ExecError::Stopped));
        }
    }
}

/// Creates the instance, reports to [`BatchScheduler::start`], then serves until the scheduler
/// stops, re-creating the instance after each failure until the restart policy gives up.
fn instance_thread(shared: &Shared, model: &dyn LoadedModel, index: usize, ready: Ready) {
    let Some(mut instance) = first_instance(model, index, ready) else {
        return;
    };
    loop {
        let (reason, verdict) = match catch_unwind(AssertUnwindSafe(|| serve(shared, instance.as_mut()))) {
            Ok(Served::Stopped) => {
                discard(instance, index);
                return;
            }
            Ok(Served::Failed { reason, verdict }) => (reason, verdict),
            // Our own queue code panicked: the batch it held (if any) was never taken.
            Err(payload) => {
                let reason = format!(
                    "instance #{index} panicked outside a batch: {}",
                    truncate(&panic_message(payload.as_ref()), 300)
                );
                let verdict = shared.instance_failed(&reason);
                (reason, verdict)
            }
        };
        discard(instance, index);
        match recreate(shared, model, index, reason, verdict) {
            Some(fresh) => instance = fresh,
            None => return,
        }
    }
}

enum Served {
    /// The scheduler stops or gave up: the thread ends.
    Stopped,
    /// The instance failed on a batch (whose requests are answered, after the failure was
    /// counted): re-create it unless the version gave up.
    Failed { reason: String, verdict: Verdict },
}

fn serve(shared: &Shared, instance: &mut dyn ModelInstance) -> Served {
    while let Some(batch) = next_batch(shared) {
        if let Some((reason, verdict)) = run_batch(shared, instance, batch) {
            return Served::Failed { reason, verdict };
        }
    }
    Served::Stopped
}

/// Waits for the next batch; `None` when the scheduler stops (after its queue is empty) or the
/// version gave up.
fn next_batch(shared: &Shared) -> Option<Vec<Entry<Waiting>>> {
    let batching = shared.config.dynamic_batching.as_ref();
    let mut st = shared.state.lock();
    loop {
        if st.failed {
            return None;
        }
        let now = Instant::now();
        for (e, why) in st.queue.sweep(now, Waiting::gone) {
            let outcome = match why {
                Swept::TimedOut => Err(ExecError::DeadlineExceeded),
                Swept::Gone => Err(ExecError::Stopped),
            };
            shared.answer(e.item.seq, e.item.reply, outcome);
        }
        match st.queue.next(now, shared.config.max_batch_size, batching) {
            Decision::Run(batch) => {
                if st.queue.len() > 0 {
                    // More work for another free instance.
                    shared.wake.notify_one();
                }
                return Some(batch);
            }
            Decision::WaitUntil(until) => {
                shared.wake.wait_until(&mut st, until);
            }
            Decision::Idle if st.stopping => return None,
            Decision::Idle => match st.queue.next_deadline() {
                Some(d) => {
                    shared.wake.wait_until(&mut st, d);
                }
                None => shared.wake.wait(&mut st),
            },
        }
    }
}

/// One request of a batch, without its reply channel (which stays outside the panic guard so
/// the request is answered whatever happens).
struct Work {
    rows: usize,
    enqueued: Instant,
    inputs: Vec<Tensor>,
    outputs: Vec<String>,
    span: tracing::Span,
}

/// Runs one batch and answers its requests. A panic fails exactly these requests and returns
/// its description and the counted failure's verdict, so the caller re-creates the instance.
fn run_batch(
    shared: &Shared,
    instance: &mut dyn ModelInstance,
    batch: Vec<Entry<Waiting>>,
) -> Option<(String, Verdict)> {
    let started = Instant::now();
    let mut replies = Vec::with_capacity(batch.len());
    let mut work = Vec::with_capacity(batch.len());
    for e in batch {
        // The client went away or timed out while it waited: don't spend the instance on it.
        if !e.item.take() {
            shared.answer(e.item.seq, e.item.reply, Err(ExecError::Stopped));
            continue;
        }
        replies.push((e.item.seq, e.item.reply));
        work.push(Work {
            rows: e.rows,
            enqueued: e.enqueued,
            inputs: e.item.inputs,
            outputs: e.item.outputs,
            span: e.item.span,
        });
    }
    if work.is_empty() {
        return None;
    }
    match catch_unwind(AssertUnwindSafe(|| execute(shared, instance, work, started))) {
        Ok(outcomes) => {
            for ((seq, reply), outcome) in replies.into_iter().zip(outcomes) {
                shared.answer(seq, reply, outcome);
            }
            None
        }
        Err(payload) => {
            let reason = format!(
                "the engine panicked while running a batch: {}",
                truncate(&panic_message(payload.as_ref()), 300)
            );
            let verdict = shared.instance_failed(&reason);
            for (seq, reply) in replies {
                shared.answer(seq, reply, Err(ExecError::InstanceFailed(reason.clone())));
            }
            Some((reason, verdict))
        }
    }
}

/// Concatenates, runs and splits one batch: one outcome per request, in order.
fn execute(
    shared: &Shared,
    instance: &mut dyn ModelInstance,
    live: Vec<Work>,
    started: Instant,
) -> Vec<Outcome> {
    // Lines written while this batch runs belong to its requests: one request's own span, or a
    // `batch` span under the first request's that records the others as causes.
    if live.is_empty() {
        return Vec::new();
    }
    let span = batch_span(live.iter().map(|e| &e.span));
    let _in_span = span.enter();
    let total_rows: usize = live.iter().map(|e| e.rows).sum();
    let mut wanted: Vec<String> = Vec::new();
    for e in &live {
        for name in &e.outputs {
            if !wanted.contains(name) {
                wanted.push(name.clone());
            }
        }
    }
    let mut meta = Vec::with_capacity(live.len());
    let mut inputs = Vec::with_capacity(live.len());
    for e in live {
        meta.push((e.rows, started.saturating_duration_since(e.enqueued), e.outputs));
        inputs.push(e.inputs);
    }
    let single = meta.len() == 1;
    let Executed {
        compute_input,
        compute_infer,
        produced,
    } = match run_concatenated(instance, inputs, &wanted, started) {
        Ok(r) => r,
        Err(e) => return meta.iter().map(|_| Err(ExecError::Backend(e.clone()))).collect(),
    };
    let t_out = Instant::now();
    let mut answers = Vec::with_capacity(meta.len());
    let mut start_row = 0usize;
    for (rows, queue, outputs) in meta {
        let mut own = Vec::with_capacity(outputs.len());
        let mut failure = None;
        for name in &outputs {
            let Some(index) = wanted.iter().position(|w| w == name) else {
                continue;
            };
            let Some(tensor) = produced.get(index) else {
                failure = Some(format!("the engine did not produce output '{name}'"));
                break;
            };
            if single {
                own.push(tensor.clone());
            } else {
                match slice_rows(tensor, total_rows, start_row, rows) {
                    Ok(t) => own.push(t),
                    Err(m) => {
                        failure = Some(m);
                        break;
                    }
                }
            }
        }
        start_row += rows;
        answers.push((queue, own, failure));
    }
    let compute_output = t_out.elapsed();
    shared.observer.on_execution(&BatchTiming {
        batch_size: total_rows,
        requests: answers.len(),
        compute_input,
        compute_infer,
        compute_output,
    });
    answers
        .into_iter()
        .map(|(queue, outputs, failure)| match failure {
            Some(m) => Err(ExecError::Backend(BackendError::new(
                BackendErrorKind::Internal,
                m,
            ))),
            None => Ok(Completed {
                outputs,
                timing: RequestTiming {
                    queue,
                    compute_input,
                    compute_infer,
                    compute_output,
                    batch_size: total_rows,
                },
            }),
        })
        .collect()
}
