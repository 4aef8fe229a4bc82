//! The scheduler with real threads and a test engine that echoes its input and records every
//! batch it ran.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use oxserve_backend::{BackendError, Batch, LoadedModel, ModelInstance};
use oxserve_core::{DataType, Tensor};
use oxserve_scheduler::{
    DynamicBatching, ExecError, Job, NoObserver, QueuePolicy, Scheduler, SchedulerConfig, TimeoutAction,
};
use parking_lot::Mutex;

/// The first value of each row of every batch that ran, in order.
type BatchLog = Arc<Mutex<Vec<Vec<u32>>>>;

/// Echoes input 0 as output "OUT", after `delay`; records (batch rows, first value of each row).
struct Echo {
    delay: Duration,
    log: BatchLog,
}

struct EchoInstance {
    delay: Duration,
    log: BatchLog,
}

impl LoadedModel for Echo {
    fn new_instance(&self, _index: usize) -> Result<Box<dyn ModelInstance>, BackendError> {
        Ok(Box::new(EchoInstance {
            delay: self.delay,
            log: Arc::clone(&self.log),
        }))
    }
}

impl ModelInstance for EchoInstance {
    fn execute(&mut self, batch: Batch) -> Result<Vec<Tensor>, BackendError> {
        std::thread::sleep(self.delay);
        let input = &batch.inputs[0];
        let raw = input.raw().unwrap();
        let per_row = raw.len() / input.shape[0] as usize;
        let firsts = raw
            .chunks(per_row)
            .map(|row| u32::from_le_bytes(row[..4].try_into().unwrap()))
            .collect();
        self.log.lock().push(firsts);
        let mut out = input.clone();
        out.name = "OUT".into();
        Ok(vec![out])
    }
}

fn row(value: u32, width: usize) -> Tensor {
    let raw: Vec<u8> = (0..width)
        .flat_map(|i| (value + i as u32).to_le_bytes())
        .collect();
    Tensor::from_raw("IN", DataType::U32, vec![1, width as i64], raw)
}

fn job(value: u32) -> Job {
    Job {
        inputs: vec![row(value, 3)],
        outputs: vec!["OUT".into()],
        priority: 0,
        timeout: None,
        sequence: None,
    }
}

fn start(delay_ms: u64, config: SchedulerConfig) -> (Arc<Scheduler>, BatchLog) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let model = Arc::new(Echo {
        delay: Duration::from_millis(delay_ms),
        log: Arc::clone(&log),
    });
    (
        Arc::new(Scheduler::start(model, config, Arc::new(NoObserver)).unwrap()),
        log,
    )
}

fn batching(max_batch_size: usize, delay_us: u64) -> SchedulerConfig {
    SchedulerConfig {
        instances: 2,
        max_batch_size,
        dynamic_batching: Some(DynamicBatching {
            preferred_batch_sizes: vec![],
            max_queue_delay: Duration::from_micros(delay_us),
            preserve_ordering: false,
        }),
        ..SchedulerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_client_gets_exactly_its_own_rows_from_shared_batches() {
    let (scheduler, log) = start(1, batching(8, 2000));
    let mut tasks = Vec::new();
    for client in 0..200u32 {
        let scheduler = Arc::clone(&scheduler);
        tasks.push(tokio::spawn(async move {
            let value = client * 1000;
            let done = scheduler.submit(job(value)).await.unwrap();
            let out = &done.outputs[0];
            assert_eq!(out.shape, vec![1, 3]);
            let expect: Vec<u8> = (0..3u32).flat_map(|i| (value + i).to_le_bytes()).collect();
            assert_eq!(
                out.raw().unwrap().as_ref(),
                expect.as_slice(),
                "client {client} got someone else's rows"
            );
            done.timing.batch_size
        }));
    }
    let mut biggest = 0;
    for t in tasks {
        biggest = biggest.max(t.await.unwrap());
    }
    let batches = log.lock().clone();
    assert!(
        batches.iter().all(|b| b.len() <= 8),
        "a batch exceeded max_batch_size"
    );
    assert_eq!(
        batches.iter().map(Vec::len).sum::<usize>(),
        200,
        "a request ran twice or never"
    );
    assert!(biggest > 1, "no batch larger than 1 formed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_sheds_and_the_rest_succeed() {
    let mut config = SchedulerConfig {
        instances: 1,
        ..SchedulerConfig::default()
    };
    config.default_queue_policy.max_queue_size = 2;
    let (scheduler, log) = start(100, config);
    let mut tasks = Vec::new();
    for i in 0..6u32 {
        let scheduler = Arc::clone(&scheduler);
        tasks.push(tokio::spawn(async move { scheduler.submit(job(i)).await }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut ok = 0;
    let mut shed = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(ExecError::Overloaded) => shed += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    // One running plus two waiting fit; the other three are shed and never run.
    assert_eq!((ok, shed), (3, 3));
    assert_eq!(log.lock().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_timeouts_reject_without_running_or_delay() {
    let mut config = SchedulerConfig {
        instances: 1,
        ..SchedulerConfig::default()
    };
    config.default_queue_policy = QueuePolicy {
        timeout_action: TimeoutAction::Reject,
        default_timeout: Some(Duration::from_millis(30)),
        allow_timeout_override: true,
        max_queue_size: 0,
    };
    let (scheduler, log) = start(300, config);
    let busy = {
        let s = Arc::clone(&scheduler);
        tokio::spawn(async move { s.submit(job(1)).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    let started = std::time::Instant::now();
    let late = scheduler.submit(job(2)).await;
    assert!(matches!(late, Err(ExecError::DeadlineExceeded)), "{late:?}");
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "the rejection waited for the busy instance"
    );
    busy.await.unwrap().unwrap();
    // Only the first request ever ran.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(log.lock().clone(), vec![vec![1]]);

    // DELAY: the request runs after its timeout instead of failing.
    let mut config = SchedulerConfig {
        instances: 1,
        ..SchedulerConfig::default()
    };
    config.default_queue_policy.timeout_action = TimeoutAction::Delay;
    config.default_queue_policy.default_timeout = Some(Duration::from_millis(5));
    let (scheduler, _) = start(30, config);
    let s = Arc::clone(&scheduler);
    let first = tokio::spawn(async move { s.submit(job(1)).await });
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(scheduler.submit(job(2)).await.is_ok());
    assert!(first.await.unwrap().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_runs_first() {
    let config = SchedulerConfig {
        instances: 1,
        priority_levels: 2,
        default_priority_level: 2,
        ..SchedulerConfig::default()
    };
    let (scheduler, log) = start(100, config);
    let mut tasks = Vec::new();
    // Occupies the instance.
    let s = Arc::clone(&scheduler);
    tasks.push(tokio::spawn(async move { s.submit(job(0)).await.map(|_| ()) }));
    tokio::time::sleep(Duration::from_millis(10)).await;
    for (value, priority) in [(1, 2), (2, 2), (3, 1)] {
        let s = Arc::clone(&scheduler);
        let mut j = job(value);
        j.priority = priority;
        tasks.push(tokio::spawn(async move { s.submit(j).await.map(|_| ()) }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(log.lock().clone(), vec![vec![0], vec![3], vec![1], vec![2]]);
    let mut bad = job(9);
    bad.priority = 3;
    assert!(matches!(scheduler.submit(bad).await, Err(ExecError::Invalid(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn preserve_ordering_answers_in_queue_order() {
    /// Slow for the first request only, so a second instance finishes later work first.
    struct Uneven(Arc<AtomicUsize>);
    struct UnevenInstance(Arc<AtomicUsize>);
    impl LoadedModel for Uneven {
        fn new_instance(&self, _: usize) -> Result<Box<dyn ModelInstance>, BackendError> {
            Ok(Box::new(UnevenInstance(Arc::clone(&self.0))))
        }
    }
    impl ModelInstance for UnevenInstance {
        fn execute(&mut self, batch: Batch) -> Result<Vec<Tensor>, BackendError> {
            if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                std::thread::sleep(Duration::from_millis(80));
            }
            let mut out = batch.inputs[0].clone();
            out.name = "OUT".into();
            Ok(vec![out])
        }
    }
    let mut config = batching(1, 0);
    config.dynamic_batching.as_mut().unwrap().preserve_ordering = true;
    let scheduler = Arc::new(
        Scheduler::start(
            Arc::new(Uneven(Arc::new(AtomicUsize::new(0)))),
            config,
            Arc::new(NoObserver),
        )
        .unwrap(),
    );
    let start = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..4u32 {
        let s = Arc::clone(&scheduler);
        tasks.push(tokio::spawn(async move {
            s.submit(job(i)).await.unwrap();
            start.elapsed()
        }));
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let mut done = Vec::new();
    for t in tasks {
        done.push(t.await.unwrap());
    }
    // Requests 1..3 ran on the fast instance within a few ms, but are answered only once the
    // slow first request is: none finishes before 80 ms.
    assert!(done.iter().all(|d| *d >= Duration::from_millis(75)), "{done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_are_not_run() {
    let config = SchedulerConfig {
        instances: 1,
        ..SchedulerConfig::default()
    };
    let (scheduler, log) = start(50, config);
    let s = Arc::clone(&scheduler);
    let busy = tokio::spawn(async move { s.submit(job(1)).await });
    tokio::time::sleep(Duration::from_millis(10)).await;
    // The client gives up while its request waits.
    let _ = tokio::time::timeout(Duration::from_millis(5), scheduler.submit(job(2))).await;
    busy.await.unwrap().unwrap();
    scheduler.submit(job(3)).await.unwrap();
    assert_eq!(log.lock().clone(), vec![vec![1], vec![3]]);
}
