//! The instance threads of the sequence batcher: choosing a batch among the instance's
//! sequences, assembling its rows (the requests' inputs, the control tensors and the implicit
//! state), running it, and handing each sequence its outputs and new state.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use bytes::Bytes;
use oxserve_backend::support::{panic_message, truncate};
use oxserve_backend::{BackendError, BackendErrorKind, LoadedModel, ModelInstance};
use oxserve_core::{DataType, Tensor, TensorData};

use super::slots::{Candidate, Taken};
use super::{ControlInput, ControlKind, CorrelationId, Outcome, SequenceStrategy, Shared};
use crate::batch::{Executed, batch_span, run_concatenated, slice_rows};
use crate::health::FailureWindow;
use crate::instances::{Ready, Supervisor, discard, first_instance, pause_unless, recreate};
use crate::types::{BatchTiming, Completed, ExecError, RequestTiming};

/// Which of the ready sequences run now, or how long to wait for more.
#[derive(Debug, PartialEq)]
pub(crate) enum Choice {
    /// Their slots, in batch order.
    Run(Vec<usize>),
    WaitUntil(Instant),
}

/// Triton's two strategies over the instance's ready sequences (given by slot). Only
/// requests whose input shapes agree with the oldest one's batch together.
pub(crate) fn choose(
    strategy: &SequenceStrategy,
    ready: &[Candidate],
    capacity: usize,
    seats: usize,
    now: Instant,
    hurry: bool,
) -> Choice {
    let Some(oldest) = ready.iter().min_by_key(|c| c.enqueued) else {
        return Choice::Run(Vec::new());
    };
    let mut fitting: Vec<&Candidate> = ready.iter().filter(|c| c.shapes == oldest.shapes).collect();
    match strategy {
        SequenceStrategy::Direct {
            max_queue_delay,
            minimum_slot_utilization,
        } => {
            let wanted = (*minimum_slot_utilization * seats as f32).ceil() as usize;
            let until = oldest.enqueued + *max_queue_delay;
            if !hurry && !max_queue_delay.is_zero() && fitting.len() < wanted.max(1) && now < until {
                return Choice::WaitUntil(until);
            }
            Choice::Run(fitting.iter().map(|c| c.slot).collect())
        }
        SequenceStrategy::Oldest {
            preferred_batch_sizes,
            max_queue_delay,
            ..
        } => {
            fitting.sort_by_key(|c| c.enqueued);
            fitting.truncate(capacity.max(1));
            let full = preferred_batch_sizes
                .iter()
                .copied()
                .filter(|&p| p <= capacity)
                .max()
                .unwrap_or(capacity);
            let until = oldest.enqueued + *max_queue_delay;
            let preferred = preferred_batch_sizes.contains(&fitting.len());
            if !hurry && fitting.len() < full.max(1) && !preferred && now < until {
                return Choice::WaitUntil(until);
            }
            Choice::Run(fitting.iter().map(|c| c.slot).collect())
        }
    }
}

/// Creates the instance, reports to `start`, then serves until the scheduler stops,
/// re-creating the instance after a failure until the restart policy gives up.
pub(super) fn instance_thread(shared: &Shared, model: &dyn LoadedModel, index: usize, ready: Ready) {
    let Some(mut instance) = first_instance(model, index, ready) else {
        return;
    };
    while let Some(batch) = next_batch(shared, index) {
        let Some(reason) = run_batch(shared, instance.as_mut(), batch) else {
            continue;
        };
        discard(instance, index);
        let verdict = shared.instance_failed(&reason);
        match recreate(shared, model, index, reason, verdict) {
            Some(fresh) => instance = fresh,
            None => return,
        }
    }
    discard(instance, index);
}

impl Supervisor for Shared {
    fn name(&self) -> &str {
        &self.config.thread_name
    }

    fn failures(&self) -> &parking_lot::Mutex<FailureWindow> {
        &self.failures
    }

    fn give_up(&self, failures: usize, last: &str) {
        Shared::give_up(self, failures, last);
    }

    fn pause(&self, wait: Duration) -> bool {
        pause_unless(&self.state, &self.wake, wait, |st| st.stopping || st.failed)
    }
}

/// Waits for the instance's next batch; `None` when the scheduler stops (and the instance has
/// nothing left to run) or gives up.
fn next_batch(shared: &Shared, index: usize) -> Option<Vec<Taken>> {
    let idle = shared.sequence.max_sequence_idle;
    let batched = shared.config.max_batch_size > 0;
    let seats = shared.sequence.slots_per_instance(shared.config.max_batch_size);
    let mut st = shared.state.lock();
    loop {
        if st.failed {
            return None;
        }
        let now = Instant::now();
        if st.expire_idle(now, idle) {
            // Slots went to sequences of the backlog, perhaps on other instances.
            shared.wake.notify_all();
        }
        let ready = st.candidates(index, batched);
        let expiry = st.next_expiry(idle);
        if ready.is_empty() {
            if st.stopping {
                return None;
            }
            match expiry {
                Some(t) => {
                    shared.wake.wait_until(&mut st, t);
                }
                None => shared.wake.wait(&mut st),
            }
            continue;
        }
        let capacity = shared.config.max_batch_size.max(1);
        match choose(
            &shared.sequence.strategy,
            &ready,
            capacity,
            seats,
            now,
            st.stopping,
        ) {
            Choice::Run(slots) => {
                return Some(slots.into_iter().filter_map(|s| st.take(index, s)).collect());
            }
            Choice::WaitUntil(until) => {
                let until = expiry.map_or(until, |e| e.min(until));
                shared.wake.wait_until(&mut st, until);
            }
        }
    }
}

/// Runs one batch and answers its requests; the failure's description when the engine
/// panicked (the instance must be re-created).
fn run_batch(shared: &Shared, instance: &mut dyn ModelInstance, batch: Vec<Taken>) -> Option<String> {
    if batch.is_empty() {
        return None;
    }
    let started = Instant::now();
    let direct = matches!(shared.sequence.strategy, SequenceStrategy::Direct { .. });
    let mut replies = Vec::with_capacity(batch.len());
    let mut rows = Vec::with_capacity(batch.len());
    for t in batch {
        replies.push(t.request.reply);
        rows.push(Row {
            id: t.id,
            slot: t.slot,
            end: t.request.end,
            start: t.request.start,
            enqueued: t.request.enqueued,
            inputs: t.request.inputs,
            outputs: t.request.outputs,
            state: t.state,
            span: t.request.span,
        });
    }
    let ran = catch_unwind(AssertUnwindSafe(|| {
        execute(shared, instance, &rows, direct, started)
    }));
    let now = Instant::now();
    let (outcomes, failure) = match ran {
        Ok(outcomes) => (outcomes, None),
        Err(payload) => {
            let reason = format!(
                "the engine panicked while running a batch: {}",
                truncate(&panic_message(payload.as_ref()), 300)
            );
            let failed = rows
                .iter()
                .map(|_| (Err(ExecError::InstanceFailed(reason.clone())), None))
                .collect();
            (failed, Some(reason))
        }
    };
    let mut released = false;
    {
        let mut st = shared.state.lock();
        for (row, (_, state)) in rows.iter().zip(&outcomes) {
            released |= st.finish(&row.id, row.end, state.clone(), now);
        }
    }
    // The sequences can run their next requests (and freed slots can go to the backlog).
    shared.wake.notify_all();
    if released {
        tracing::trace!("sequence slots released");
    }
    for (reply, (outcome, _)) in replies.into_iter().zip(outcomes) {
        let _ = reply.send(outcome);
    }
    failure
}

/// A request in the batch being assembled.
struct Row {
    id: CorrelationId,
    slot: usize,
    start: bool,
    end: bool,
    enqueued: Instant,
    inputs: Vec<Tensor>,
    outputs: Vec<String>,
    state: Option<Vec<Tensor>>,
    span: tracing::Span,
}

/// Assembles, runs and splits one batch: per request its outcome and, when it ran, the
/// sequence's new state rows.
fn execute(
    shared: &Shared,
    instance: &mut dyn ModelInstance,
    rows: &[Row],
    direct: bool,
    started: Instant,
) -> Vec<(Outcome, Option<Vec<Tensor>>)> {
    let span = batch_span(rows.iter().map(|r| &r.span));
    let _in_span = span.enter();
    let batched = shared.config.max_batch_size > 0;
    // Direct: each request sits in its slot's row, idle slots below the highest used one
    // hold a row with READY false. Oldest: the requests one after another.
    let positions: Vec<Option<usize>> = if direct {
        let top = rows.iter().map(|r| r.slot).max().unwrap_or(0);
        (0..=top)
            .map(|slot| rows.iter().position(|r| r.slot == slot))
            .collect()
    } else {
        (0..rows.len()).map(Some).collect()
    };
    let template = &rows[0].inputs;
    let mut inputs = Vec::with_capacity(positions.len());
    for position in &positions {
        let row = position.map(|i| &rows[i]);
        inputs.push(row_inputs(shared, row, template, batched));
    }
    let total_rows = positions.len();
    let mut wanted: Vec<String> = Vec::new();
    for r in rows {
        for name in &r.outputs {
            if !wanted.contains(name) {
                wanted.push(name.clone());
            }
        }
    }
    for s in &shared.sequence.states {
        if !wanted.contains(&s.output) {
            wanted.push(s.output.clone());
        }
    }
    let Executed {
        compute_input,
        compute_infer,
        produced,
    } = match run_concatenated(instance, inputs, &wanted, started) {
        Ok(r) => r,
        Err(e) => {
            return rows
                .iter()
                .map(|_| (Err(ExecError::Backend(e.clone())), None))
                .collect();
        }
    };
    let t_out = Instant::now();
    let take = |name: &str, at: usize| -> Result<Tensor, String> {
        let index = wanted.iter().position(|w| w == name).unwrap_or(usize::MAX);
        let tensor = produced
            .get(index)
            .ok_or_else(|| format!("the engine did not produce output '{name}'"))?;
        if !batched || total_rows == 1 {
            Ok(tensor.clone())
        } else {
            slice_rows(tensor, total_rows, at, 1)
        }
    };
    let mut answers = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let at = positions.iter().position(|p| *p == Some(i)).unwrap_or(0);
        let outputs: Result<Vec<Tensor>, String> = row.outputs.iter().map(|n| take(n, at)).collect();
        let state: Result<Vec<Tensor>, String> = shared
            .sequence
            .states
            .iter()
            .map(|s| {
                take(&s.output, at).map(|mut t| {
                    t.name = s.input.clone();
                    t
                })
            })
            .collect();
        answers.push(match (outputs, state) {
            (Ok(outputs), Ok(state)) => (
                Ok(Completed {
                    outputs,
                    timing: RequestTiming {
                        queue: started.saturating_duration_since(row.enqueued),
                        compute_input,
                        compute_infer,
                        compute_output: Duration::ZERO,
                        batch_size: total_rows,
                    },
                }),
                Some(state),
            ),
            (Err(m), _) | (_, Err(m)) => (
                Err(ExecError::Backend(BackendError::new(
                    BackendErrorKind::Internal,
                    m,
                ))),
                None,
            ),
        });
    }
    let compute_output = t_out.elapsed();
    for (outcome, _) in &mut answers {
        if let Ok(done) = outcome {
            done.timing.compute_output = compute_output;
        }
    }
    shared.observer.on_execution(&BatchTiming {
        batch_size: total_rows,
        requests: rows.len(),
        compute_input,
        compute_infer,
        compute_output,
    });
    answers
}

/// One row of the batch: the request's inputs (or, for an idle slot, zeros shaped like
/// `template`), then the controls, then the implicit state.
fn row_inputs(shared: &Shared, row: Option<&Row>, template: &[Tensor], batched: bool) -> Vec<Tensor> {
    let mut out: Vec<Tensor> = match row {
        Some(r) => r.inputs.clone(),
        None => template.iter().map(zeros_like).collect(),
    };
    let control_shape = if batched { vec![1, 1] } else { vec![1] };
    for control in &shared.sequence.controls {
        out.push(control_tensor(control, row, control_shape.clone()));
    }
    for (i, spec) in shared.sequence.states.iter().enumerate() {
        let kept = row.and_then(|r| r.state.as_ref()).and_then(|s| s.get(i)).cloned();
        out.push(kept.unwrap_or_else(|| {
            let mut initial = spec.initial.clone();
            if batched {
                initial.shape.insert(0, 1);
            }
            initial
        }));
    }
    out
}

fn zeros_like(t: &Tensor) -> Tensor {
    let data = match &t.data {
        TensorData::Raw(raw) => TensorData::Raw(Bytes::from(vec![0u8; raw.len()])),
        TensorData::Strings(items) => TensorData::Strings(vec![Bytes::new(); items.len()]),
    };
    Tensor::new(t.name.clone(), t.datatype, t.shape.clone(), data)
}

fn control_tensor(control: &ControlInput, row: Option<&Row>, shape: Vec<i64>) -> Tensor {
    let flag = |on: bool| control.false_true[usize::from(on)].clone();
    let data = match control.kind {
        ControlKind::Start => TensorData::Raw(flag(row.is_some_and(|r| r.start)).into()),
        ControlKind::End => TensorData::Raw(flag(row.is_some_and(|r| r.end)).into()),
        ControlKind::Ready => TensorData::Raw(flag(row.is_some()).into()),
        ControlKind::CorrelationId => correlation_data(control.datatype, row.map(|r| &r.id)),
    };
    Tensor::new(control.name.clone(), control.datatype, shape, data)
}

/// The CORRID tensor's contents in its configured type (an idle slot's is 0 or empty). The
/// request's id was checked against the type when it was queued.
fn correlation_data(datatype: DataType, id: Option<&CorrelationId>) -> TensorData {
    let number = match id {
        Some(CorrelationId::Number(n)) => *n,
        _ => 0,
    };
    match datatype {
        DataType::Bytes => TensorData::Strings(vec![match id {
            Some(id) => Bytes::from(id.to_string()),
            None => Bytes::new(),
        }]),
        DataType::I64 | DataType::U64 => TensorData::Raw(Bytes::copy_from_slice(&number.to_le_bytes())),
        _ => TensorData::Raw(Bytes::copy_from_slice(&(number as u32).to_le_bytes())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(slot: usize, at: Instant) -> Candidate {
        Candidate {
            slot,
            enqueued: at,
            shapes: vec![vec![1]],
        }
    }

    #[test]
    fn direct_runs_every_ready_slot_at_once_without_a_delay() {
        let now = Instant::now();
        let strategy = SequenceStrategy::Direct {
            max_queue_delay: Duration::ZERO,
            minimum_slot_utilization: 0.0,
        };
        let ready = [candidate(3, now), candidate(1, now)];
        assert_eq!(
            choose(&strategy, &ready, 4, 4, now, false),
            Choice::Run(vec![3, 1])
        );
    }

    #[test]
    fn direct_waits_for_the_slot_utilization_up_to_the_delay() {
        let now = Instant::now();
        let strategy = SequenceStrategy::Direct {
            max_queue_delay: Duration::from_millis(10),
            minimum_slot_utilization: 0.5,
        };
        let ready = [candidate(0, now)];
        assert_eq!(
            choose(&strategy, &ready, 4, 4, now, false),
            Choice::WaitUntil(now + Duration::from_millis(10))
        );
        let two = [candidate(0, now), candidate(2, now)];
        assert_eq!(choose(&strategy, &two, 4, 4, now, false), Choice::Run(vec![0, 2]));
        let later = now + Duration::from_millis(10);
        assert_eq!(
            choose(&strategy, &ready, 4, 4, later, false),
            Choice::Run(vec![0])
        );
    }

    #[test]
    fn oldest_batches_the_oldest_requests_up_to_a_preferred_size() {
        let now = Instant::now();
        let strategy = SequenceStrategy::Oldest {
            max_candidate_sequences: 8,
            preferred_batch_sizes: vec![2],
            max_queue_delay: Duration::from_millis(5),
        };
        let one = [candidate(5, now)];
        assert!(matches!(
            choose(&strategy, &one, 4, 8, now, false),
            Choice::WaitUntil(_)
        ));
        let three = [
            candidate(0, now + Duration::from_micros(3)),
            candidate(1, now + Duration::from_micros(1)),
            candidate(2, now + Duration::from_micros(2)),
        ];
        assert_eq!(
            choose(&strategy, &three, 2, 8, now, false),
            Choice::Run(vec![1, 2])
        );
    }

    #[test]
    fn requests_of_other_shapes_wait_for_their_own_batch() {
        let now = Instant::now();
        let strategy = SequenceStrategy::Direct {
            max_queue_delay: Duration::ZERO,
            minimum_slot_utilization: 0.0,
        };
        let mut odd = candidate(1, now + Duration::from_micros(1));
        odd.shapes = vec![vec![2]];
        let ready = [candidate(0, now), odd];
        assert_eq!(choose(&strategy, &ready, 4, 4, now, false), Choice::Run(vec![0]));
    }
}
