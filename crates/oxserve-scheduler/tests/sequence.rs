//! The sequence batcher with real threads and a test engine: an accumulator that adds its
//! input to the implicit state unless START is set, and answers the sum, the START/READY
//! controls, the correlation id and the row it ran in, recording every batch's rows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use oxserve_backend::{BackendError, Batch, LoadedModel, ModelInstance};
use oxserve_core::{DataType, Tensor};
use oxserve_scheduler::{
    ControlInput, ControlKind, CorrelationId, ExecError, Job, NoObserver, Scheduler, SchedulerConfig,
    SequenceConfig, SequenceFlags, SequenceStrategy, StateSpec,
};
use parking_lot::Mutex;

/// Every batch that ran: per row, (READY, correlation id).
type BatchLog = Arc<Mutex<Vec<Vec<(i32, u64)>>>>;

struct Accumulator {
    log: BatchLog,
}

struct AccumulatorInstance {
    log: BatchLog,
}

impl LoadedModel for Accumulator {
    fn new_instance(&self, _index: usize) -> Result<Box<dyn ModelInstance>, BackendError> {
        Ok(Box::new(AccumulatorInstance {
            log: Arc::clone(&self.log),
        }))
    }
}

fn i32s(t: &Tensor) -> Vec<i32> {
    t.raw()
        .unwrap()
        .chunks(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn i32_tensor(name: &str, values: &[i32]) -> Tensor {
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::from_raw(name, DataType::I32, vec![values.len() as i64, 1], raw)
}

impl ModelInstance for AccumulatorInstance {
    /// Inputs: INPUT, START, READY, CORRID (UINT64), STATE_IN; outputs by name.
    fn execute(&mut self, batch: Batch) -> Result<Vec<Tensor>, BackendError> {
        let [input, start, ready, corrid, state] = &batch.inputs[..] else {
            panic!("expected 5 inputs, got {}", batch.inputs.len());
        };
        let (input, start, ready, state) = (i32s(input), i32s(start), i32s(ready), i32s(state));
        let ids: Vec<u64> = corrid
            .raw()
            .unwrap()
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        self.log
            .lock()
            .push(ready.iter().copied().zip(ids.iter().copied()).collect());
        let sum: Vec<i32> = (0..input.len())
            .map(|i| input[i] + if start[i] == 1 { 0 } else { state[i] })
            .collect();
        let rows: Vec<i32> = (0..input.len() as i32).collect();
        Ok(batch
            .outputs
            .iter()
            .map(|name| match name.as_str() {
                "SUM" => i32_tensor("SUM", &sum),
                "STATE_OUT" => i32_tensor("STATE_OUT", &sum),
                "ROW" => i32_tensor("ROW", &rows),
                other => panic!("unknown output {other}"),
            })
            .collect())
    }
}

fn flag(kind: ControlKind, name: &str) -> ControlInput {
    ControlInput {
        name: name.into(),
        kind,
        datatype: DataType::I32,
        false_true: [0i32.to_le_bytes().to_vec(), 1i32.to_le_bytes().to_vec()],
    }
}

fn config(
    strategy: SequenceStrategy,
    instances: usize,
    max_batch_size: usize,
    idle: Duration,
) -> SchedulerConfig {
    SchedulerConfig {
        instances,
        max_batch_size,
        sequence: Some(SequenceConfig {
            model_name: "acc".into(),
            strategy,
            max_sequence_idle: idle,
            controls: vec![
                flag(ControlKind::Start, "START"),
                flag(ControlKind::Ready, "READY"),
                ControlInput {
                    name: "CORRID".into(),
                    kind: ControlKind::CorrelationId,
                    datatype: DataType::U64,
                    false_true: [Vec::new(), Vec::new()],
                },
            ],
            states: vec![StateSpec {
                input: "STATE_IN".into(),
                output: "STATE_OUT".into(),
                initial: Tensor::from_raw("STATE_IN", DataType::I32, vec![1], 0i32.to_le_bytes().to_vec()),
            }],
        }),
        ..SchedulerConfig::default()
    }
}

const DIRECT: SequenceStrategy = SequenceStrategy::Direct {
    max_queue_delay: Duration::ZERO,
    minimum_slot_utilization: 0.0,
};

fn start(config: SchedulerConfig) -> (Arc<Scheduler>, BatchLog) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let model = Arc::new(Accumulator {
        log: Arc::clone(&log),
    });
    (
        Arc::new(Scheduler::start(model, config, Arc::new(NoObserver)).unwrap()),
        log,
    )
}

fn job(id: u64, value: i32, start: bool, end: bool) -> Job {
    Job {
        inputs: vec![i32_tensor("INPUT", &[value])],
        outputs: vec!["SUM".into(), "ROW".into()],
        priority: 0,
        timeout: None,
        sequence: Some(SequenceFlags {
            id: CorrelationId::Number(id),
            start,
            end,
        }),
    }
}

/// (sum, batch row) of one request.
async fn send(s: &Scheduler, id: u64, value: i32, start: bool, end: bool) -> Result<(i32, i32), ExecError> {
    let done = s.submit(job(id, value, start, end)).await?;
    Ok((i32s(&done.outputs[0])[0], i32s(&done.outputs[1])[0]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sequence_accumulates_in_its_own_slot_while_others_run() {
    let (s, log) = start(config(DIRECT, 1, 4, Duration::from_secs(5)));
    // Three sequences interleaved: each keeps its slot (its batch row) and its own sum.
    let mut sums = [0i32; 3];
    let mut rows = [None::<i32>; 3];
    for step in 0..5 {
        let calls = (0..3u64).map(|k| {
            let s = Arc::clone(&s);
            tokio::spawn(
                async move { send(&s, 100 + k, (k as i32 + 1) * 10 + step, step == 0, step == 4).await },
            )
        });
        let answers: Vec<_> = futures_join(calls).await;
        for (k, answer) in answers.into_iter().enumerate() {
            let (sum, row) = answer.unwrap();
            sums[k] += (k as i32 + 1) * 10 + step;
            assert_eq!(sum, sums[k], "sequence {k} step {step}");
            assert_eq!(
                *rows[k].get_or_insert(row),
                row,
                "sequence {k} moved from its slot"
            );
        }
    }
    // Every batch row ran with READY = 1 and its sequence's id, or was an idle slot's padding.
    for batch in log.lock().iter() {
        for &(ready, id) in batch {
            assert!(
                (ready == 1 && (100..103).contains(&id)) || (ready == 0 && id == 0),
                "{batch:?}"
            );
        }
    }
}

/// Starts every task first (the iterator spawns them), then waits for each in order.
async fn futures_join<T: Send + 'static>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let handles: Vec<_> = handles.collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sequences_beyond_the_slots_wait_and_ended_ones_must_start_again() {
    // One instance, one slot (unbatched model): a second sequence waits for the first to end.
    let (s, _) = start(config(DIRECT, 1, 0, Duration::from_secs(5)));
    assert_eq!(send(&s, 1, 5, true, false).await.unwrap().0, 5);
    let waiting = {
        let s = Arc::clone(&s);
        tokio::spawn(async move { send(&s, 2, 7, true, true).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !waiting.is_finished(),
        "the second sequence ran without a free slot"
    );
    assert_eq!(send(&s, 1, 1, false, true).await.unwrap().0, 6);
    assert_eq!(waiting.await.unwrap().unwrap().0, 7);
    // After its END, the sequence's next request must START again.
    let refused = send(&s, 1, 1, false, false).await.unwrap_err();
    assert!(
        matches!(&refused, ExecError::Invalid(m) if m.contains("must specify the START flag")),
        "{refused:?}"
    );
    // A request naming no sequence is refused with Triton's words.
    let mut anonymous = job(0, 1, true, true);
    anonymous.sequence = None;
    let refused = s.submit(anonymous).await.unwrap_err();
    assert!(
        matches!(&refused, ExecError::Invalid(m) if m.contains("correlation ID")),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_sequence_loses_its_state() {
    let (s, _) = start(config(DIRECT, 1, 2, Duration::from_millis(100)));
    assert_eq!(send(&s, 9, 3, true, false).await.unwrap().0, 3);
    assert_eq!(send(&s, 9, 4, false, false).await.unwrap().0, 7);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        send(&s, 9, 1, false, false).await,
        Err(ExecError::Invalid(_))
    ));
    // START again: a fresh sum.
    assert_eq!(send(&s, 9, 2, true, true).await.unwrap().0, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oldest_batches_the_sequences_of_an_instance_without_padding() {
    let strategy = SequenceStrategy::Oldest {
        max_candidate_sequences: 4,
        preferred_batch_sizes: vec![4],
        max_queue_delay: Duration::from_millis(200),
    };
    let (s, log) = start(config(strategy, 1, 4, Duration::from_secs(5)));
    let calls = (0..4u64).map(|k| {
        let s = Arc::clone(&s);
        tokio::spawn(async move { send(&s, 200 + k, k as i32, true, true).await })
    });
    for (k, answer) in futures_join(calls).await.into_iter().enumerate() {
        assert_eq!(answer.unwrap().0, k as i32);
    }
    let log = log.lock();
    assert_eq!(
        log.len(),
        1,
        "the four sequences waited for one preferred batch: {log:?}"
    );
    assert!(
        log[0].iter().all(|&(ready, _)| ready == 1),
        "no padding rows: {log:?}"
    );
}
