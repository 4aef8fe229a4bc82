//! Instance failure: an engine that panics while running a batch or while an instance is
//! created. Only the batch's requests fail, the instance is re-created, and repeated failures
//! make the version give up without leaving any request waiting.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use oxserve_backend::{BackendError, Batch, LoadedModel, ModelInstance};
use oxserve_core::{DataType, Tensor};
use oxserve_scheduler::{
    DynamicBatching, ExecError, Job, NoObserver, RestartPolicy, Scheduler, SchedulerConfig,
};

/// A request whose first value is this makes the engine panic.
const POISON: u32 = 666;

/// Echoes input 0 as "OUT" after `delay`; panics on [`POISON`] rows, and in `new_instance` for
/// the creations (1-based, counted over all instances) listed in `panic_creations`.
struct Faulty {
    delay: Duration,
    creations: Arc<AtomicUsize>,
    executions: Arc<AtomicUsize>,
    panic_creations: HashSet<usize>,
}

struct FaultyInstance {
    delay: Duration,
    executions: Arc<AtomicUsize>,
}

impl LoadedModel for Faulty {
    fn new_instance(&self, index: usize) -> Result<Box<dyn ModelInstance>, BackendError> {
        let n = self.creations.fetch_add(1, Ordering::SeqCst) + 1;
        if self.panic_creations.contains(&n) {
            panic!("instance {index} cannot be created (creation {n})");
        }
        Ok(Box::new(FaultyInstance {
            delay: self.delay,
            executions: Arc::clone(&self.executions),
        }))
    }
}

impl ModelInstance for FaultyInstance {
    fn execute(&mut self, batch: Batch) -> Result<Vec<Tensor>, BackendError> {
        std::thread::sleep(self.delay);
        self.executions.fetch_add(1, Ordering::SeqCst);
        let input = &batch.inputs[0];
        let raw = input.raw().unwrap();
        for row in raw.chunks(4) {
            if u32::from_le_bytes(row.try_into().unwrap()) == POISON {
                panic!("poisoned row");
            }
        }
        let mut out = input.clone();
        out.name = "OUT".into();
        Ok(vec![out])
    }
}

struct Setup {
    scheduler: Arc<Scheduler>,
    creations: Arc<AtomicUsize>,
    executions: Arc<AtomicUsize>,
}

fn start(delay_ms: u64, panic_creations: &[usize], config: SchedulerConfig) -> Result<Setup, BackendError> {
    let creations = Arc::new(AtomicUsize::new(0));
    let executions = Arc::new(AtomicUsize::new(0));
    let model = Arc::new(Faulty {
        delay: Duration::from_millis(delay_ms),
        creations: Arc::clone(&creations),
        executions: Arc::clone(&executions),
        panic_creations: panic_creations.iter().copied().collect(),
    });
    let scheduler = Arc::new(Scheduler::start(model, config, Arc::new(NoObserver))?);
    Ok(Setup {
        scheduler,
        creations,
        executions,
    })
}

fn job(value: u32) -> Job {
    Job {
        inputs: vec![Tensor::from_raw(
            "IN",
            DataType::U32,
            vec![1, 1],
            value.to_le_bytes().to_vec(),
        )],
        outputs: vec!["OUT".into()],
        priority: 0,
        timeout: None,
        sequence: None,
    }
}

fn value_of(done: &oxserve_scheduler::Completed) -> u32 {
    u32::from_le_bytes(done.outputs[0].raw().unwrap()[..4].try_into().unwrap())
}

/// Fast restarts and a known limit, so the tests need no long waits.
fn config(instances: usize, max_failures: usize) -> SchedulerConfig {
    SchedulerConfig {
        instances,
        max_batch_size: 8,
        restart: RestartPolicy {
            max_failures,
            window: Duration::from_secs(60),
            backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(5),
        },
        ..SchedulerConfig::default()
    }
}

/// Every await in these tests is bounded: a request left waiting is a failure, not a hang.
async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("a request was left waiting")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_fails_its_request_and_the_instance_is_recreated() {
    let s = start(0, &[], config(1, 3)).unwrap();
    let failed = bounded(s.scheduler.submit(job(POISON))).await;
    match failed {
        Err(ExecError::InstanceFailed(reason)) => assert!(reason.contains("poisoned row"), "{reason}"),
        other => panic!("expected InstanceFailed, got {other:?}"),
    }
    for v in 1..=5 {
        let done = bounded(s.scheduler.submit(job(v))).await.unwrap();
        assert_eq!(value_of(&done), v);
    }
    assert_eq!(
        s.creations.load(Ordering::SeqCst),
        2,
        "created at start, then once again"
    );
    assert_eq!(s.executions.load(Ordering::SeqCst), 6, "each request ran once");
    assert!(s.scheduler.failure().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_panicking_batch_fails_and_queued_requests_are_served_after_the_restart() {
    // One instance batching everything that waits 20 ms: the poisoned request shares its
    // batch with some requests; those fail with it, every request of another batch succeeds.
    let mut cfg = config(1, 3);
    cfg.dynamic_batching = Some(DynamicBatching {
        max_queue_delay: Duration::from_millis(20),
        ..DynamicBatching::default()
    });
    let s = start(30, &[], cfg).unwrap();
    let mut tasks = Vec::new();
    for v in 0..24u32 {
        let scheduler = Arc::clone(&s.scheduler);
        let value = if v == 3 { POISON } else { v };
        tasks.push(tokio::spawn(async move {
            (value, bounded(scheduler.submit(job(value))).await)
        }));
    }
    let (mut failed, mut ok) = (Vec::new(), 0);
    for t in tasks {
        let (value, outcome) = t.await.unwrap();
        match outcome {
            Ok(done) => {
                assert_eq!(value_of(&done), value, "someone else's rows");
                assert_ne!(value, POISON);
                ok += 1;
            }
            Err(ExecError::InstanceFailed(_)) => failed.push(value),
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert!(failed.contains(&POISON), "{failed:?}");
    assert!(failed.len() <= 8, "more than one batch failed: {failed:?}");
    assert_eq!(ok + failed.len(), 24);
    assert!(ok >= 16, "requests outside the poisoned batch failed ({ok} ok)");
    // The poisoned batch may have been the last: a later request runs on the new instance.
    assert_eq!(value_of(&bounded(s.scheduler.submit(job(99))).await.unwrap()), 99);
    assert_eq!(s.creations.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeated_failures_make_the_version_unavailable_and_answer_everything_waiting() {
    // 50 ms per execution, one at a time: while the three poisoned requests fail one after
    // the other, plain requests queue with them and must be answered, not left waiting (some
    // may run between two failures, after a restart).
    let cfg = SchedulerConfig {
        max_batch_size: 0,
        ..config(1, 3)
    };
    let s = start(50, &[], cfg).unwrap();
    let mut tasks = Vec::new();
    for value in [POISON, POISON, POISON] {
        let scheduler = Arc::clone(&s.scheduler);
        tasks.push(tokio::spawn(async move {
            bounded(scheduler.submit(job(value))).await
        }));
    }
    let mut waiting = Vec::new();
    for v in 0..5u32 {
        let scheduler = Arc::clone(&s.scheduler);
        waiting.push(tokio::spawn(
            async move { bounded(scheduler.submit(job(v))).await },
        ));
    }
    let mut instance_failed = 0;
    let mut unavailable = 0;
    for t in tasks.into_iter().chain(waiting) {
        match t.await.unwrap() {
            Err(ExecError::InstanceFailed(_)) => instance_failed += 1,
            Err(ExecError::Unavailable(reason)) => {
                assert!(reason.contains("3 times"), "{reason}");
                unavailable += 1;
            }
            // A plain request may run between two poisoned ones, after a restart.
            Ok(_) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(instance_failed, 3);
    let reason = s.scheduler.failure().expect("the version gave up").to_string();
    assert!(reason.contains("poisoned row"), "{reason}");
    assert!(reason.contains("restart"), "{reason}");
    assert!(unavailable <= 5);
    match bounded(s.scheduler.submit(job(1))).await {
        Err(ExecError::Unavailable(r)) => assert_eq!(r, reason),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(s.scheduler.queued(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_creating_an_instance_at_start_is_a_start_error() {
    // Two instances: the second panics. `start` must return (not wait on a thread that died).
    let err = match start(0, &[2], config(2, 3)) {
        Ok(_) => panic!("start succeeded"),
        Err(e) => e,
    };
    assert!(
        err.message().contains("panicked while being created"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("creation 2"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_creations_that_panic_count_towards_the_limit() {
    // Creation 1 (start) works; after the poisoned request, creations 2 and 3 panic: with a
    // limit of 3 failures the version gives up.
    let s = start(0, &[2, 3], config(1, 3)).unwrap();
    assert!(matches!(
        bounded(s.scheduler.submit(job(POISON))).await,
        Err(ExecError::InstanceFailed(_))
    ));
    let outcome = bounded(s.scheduler.submit(job(7))).await;
    match outcome {
        Err(ExecError::Unavailable(reason)) => {
            assert!(reason.contains("panicked while being created"), "{reason}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(s.creations.load(Ordering::SeqCst), 3);

    // With a higher limit, the third creation works and serving continues.
    let s = start(0, &[2], config(1, 5)).unwrap();
    assert!(bounded(s.scheduler.submit(job(POISON))).await.is_err());
    assert_eq!(value_of(&bounded(s.scheduler.submit(job(9))).await.unwrap()), 9);
    assert_eq!(s.creations.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn preserve_ordering_keeps_answering_after_a_panic() {
    // Answers wait for every earlier request's answer: the failed batch must be answered too,
    // or everything after it would wait forever.
    let mut cfg = config(2, 3);
    cfg.dynamic_batching = Some(DynamicBatching {
        preserve_ordering: true,
        ..DynamicBatching::default()
    });
    cfg.max_batch_size = 1;
    let s = start(5, &[], cfg).unwrap();
    let mut tasks = Vec::new();
    for v in 0..10u32 {
        let scheduler = Arc::clone(&s.scheduler);
        let value = if v == 2 { POISON } else { v };
        tasks.push(tokio::spawn(async move {
            bounded(scheduler.submit(job(value))).await
        }));
    }
    let outcomes: Vec<bool> = futures_ok(tasks).await;
    assert_eq!(outcomes.iter().filter(|ok| !**ok).count(), 1);
}

async fn futures_ok(
    tasks: Vec<tokio::task::JoinHandle<Result<oxserve_scheduler::Completed, ExecError>>>,
) -> Vec<bool> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap().is_ok());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_scheduler_whose_instance_is_restarting_returns() {
    // A long backoff: the instance is waiting to be re-created when the scheduler is dropped.
    let mut cfg = config(1, 3);
    cfg.restart.backoff = Duration::from_secs(30);
    cfg.restart.max_backoff = Duration::from_secs(30);
    let s = start(0, &[], cfg).unwrap();
    assert!(bounded(s.scheduler.submit(job(POISON))).await.is_err());
    let scheduler = Arc::try_unwrap(s.scheduler).ok().expect("one owner");
    let dropped = tokio::task::spawn_blocking(move || drop(scheduler));
    bounded(dropped).await.unwrap();
}
