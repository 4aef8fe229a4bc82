//! The threads: one per instance, each taking the next batch from the shared queue when it is
//! free, running it, and answering every request in it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering as AtomicOrdering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use oxserve_backend::{BackendError, BackendErrorKind, Batch, LoadedModel, ModelInstance};
use oxserve_core::Tensor;
use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

use crate::batch::{concat_inputs, slice_rows};
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
    wake: Condvar,
    config: SchedulerConfig,
    observer: Arc<dyn ExecutionObserver>,
    ordered: Option<Mutex<Ordered>>,
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
}

/// The scheduler of one model version.
pub struct Scheduler {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Scheduler {
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
                next_seq: 0,
            }),
            wake: Condvar::new(),
            observer,
            ordered,
            config,
        });
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), BackendError>>();
        let mut scheduler = Scheduler {
            shared: Arc::clone(&shared),
            threads: Vec::new(),
        };
        for index in 0..shared.config.instances.max(1) {
            let model = Arc::clone(&model);
            let shared = Arc::clone(&shared);
            let ready_tx = ready_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{}#{index}", shared.config.thread_name))
                .spawn(move || match model.new_instance(index) {
                    Ok(instance) => {
                        let _ = ready_tx.send(Ok(()));
                        run_instance(&shared, instance);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                });
            match spawned {
                Ok(handle) => scheduler.threads.push(handle),
                Err(e) => {
                    return Err(BackendError::new(
                        BackendErrorKind::Internal,
                        format!("cannot start instance thread: {e}"),
                    ));
                }
            }
        }
        drop(ready_tx);
        for _ in 0..scheduler.threads.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(BackendError::new(
                        BackendErrorKind::Internal,
                        "an instance thread died at start",
                    ));
                }
            }
        }
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
        let key = job
            .inputs
            .iter()
            .map(|t| {
                if batched {
                    t.shape.get(1..).unwrap_or_default().to_vec()
                } else {
                    t.shape.clone()
                }
            })
            .collect();
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
        answer.unwrap_or(Err(ExecError::Stopped))
    }

    /// Requests waiting for an instance.
    pub fn queued(&self) -> usize {
        self.shared.state.lock().queue.len()
    }
}

impl Drop for Scheduler {
    /// Stops taking requests, lets the instances finish what is queued, and joins them.
    fn drop(&mut self) {
        self.shared.state.lock().stopping = true;
        self.shared.wake.notify_all();
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

fn run_instance(shared: &Shared, mut instance: Box<dyn ModelInstance>) {
    let batching = shared.config.dynamic_batching.as_ref();
    loop {
        let batch = {
            let mut st = shared.state.lock();
            loop {
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
                        break batch;
                    }
                    Decision::WaitUntil(until) => {
                        shared.wake.wait_until(&mut st, until);
                    }
                    Decision::Idle if st.stopping => return,
                    Decision::Idle => match st.queue.next_deadline() {
                        Some(d) => {
                            shared.wake.wait_until(&mut st, d);
                        }
                        None => shared.wake.wait(&mut st),
                    },
                }
            }
        };
        execute(shared, instance.as_mut(), batch);
    }
}

fn execute(shared: &Shared, instance: &mut dyn ModelInstance, batch: Vec<Entry<Waiting>>) {
    let started = Instant::now();
    let mut live = Vec::with_capacity(batch.len());
    for e in batch {
        // The client went away or timed out while it waited: don't spend the instance on it.
        if !e.item.take() {
            shared.answer(e.item.seq, e.item.reply, Err(ExecError::Stopped));
        } else {
            live.push(e);
        }
    }
    // Lines written while this batch runs belong to its requests: one request's own span, or a
    // `batch` span under the first request's that records the others as causes.
    let span = match live.as_slice() {
        [] => return,
        [one] => one.item.span.clone(),
        [first, rest @ ..] => {
            let span = tracing::error_span!(parent: &first.item.span, "batch", requests = live.len());
            for e in rest {
                span.follows_from(&e.item.span);
            }
            span
        }
    };
    let _in_span = span.enter();
    let total_rows: usize = live.iter().map(|e| e.rows).sum();
    let mut wanted: Vec<String> = Vec::new();
    for e in &live {
        for name in &e.item.outputs {
            if !wanted.contains(name) {
                wanted.push(name.clone());
            }
        }
    }
    let mut meta = Vec::with_capacity(live.len());
    let mut inputs = Vec::with_capacity(live.len());
    for e in live {
        meta.push((
            e.rows,
            started.saturating_duration_since(e.enqueued),
            e.item.outputs,
            e.item.reply,
            e.item.seq,
        ));
        inputs.push(e.item.inputs);
    }
    let single = meta.len() == 1;
    let result = concat_inputs(inputs)
        .map_err(|m| BackendError::new(BackendErrorKind::InvalidInput, m))
        .and_then(|inputs| {
            let t_input = started.elapsed();
            let t0 = Instant::now();
            let produced = instance.execute(Batch {
                inputs,
                outputs: wanted.clone(),
            })?;
            Ok((t_input, t0.elapsed(), produced))
        });
    let (compute_input, compute_infer, produced) = match result {
        Ok(r) => r,
        Err(e) => {
            for (_, _, _, reply, seq) in meta {
                shared.answer(seq, reply, Err(ExecError::Backend(e.clone())));
            }
            return;
        }
    };
    let t_out = Instant::now();
    let mut answers = Vec::with_capacity(meta.len());
    let mut start_row = 0usize;
    for (rows, queue, outputs, reply, seq) in meta {
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
        answers.push((seq, reply, queue, own, failure));
    }
    let compute_output = t_out.elapsed();
    shared.observer.on_execution(&BatchTiming {
        batch_size: total_rows,
        requests: answers.len(),
        compute_input,
        compute_infer,
        compute_output,
    });
    for (seq, reply, queue, outputs, failure) in answers {
        let outcome = match failure {
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
        };
        shared.answer(seq, reply, outcome);
    }
}
