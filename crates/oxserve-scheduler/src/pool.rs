use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use oxserve_backend::{BackendError, Batch, LoadedModel};
use oxserve_core::Tensor;
use tokio::sync::oneshot;

type Reply = oneshot::Sender<Result<Vec<Tensor>, BackendError>>;

struct Job {
    batch: Batch,
    reply: Reply,
}

#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Instances (threads) to run.
    pub instances: usize,
    /// Jobs that may wait for an instance before new ones are rejected as overloaded.
    pub queue_capacity: usize,
    /// Thread name prefix, for debuggers and `top -H`.
    pub thread_name: String,
}

#[derive(Debug)]
pub enum ExecError {
    /// The queue is full; the caller should shed the request.
    Overloaded,
    /// The pool is shutting down.
    Stopped,
    /// The engine failed on this batch.
    Backend(BackendError),
}

/// A fixed set of model instances fed from one bounded queue.
pub struct InstancePool {
    sender: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl InstancePool {
    /// Creates every instance on the thread that will own it and returns once all are ready,
    /// or with the first instance's error (the threads already started are stopped).
    pub fn start(model: Arc<dyn LoadedModel>, options: &PoolOptions) -> Result<Self, BackendError> {
        let (sender, receiver) = crossbeam_channel::bounded::<Job>(options.queue_capacity.max(1));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), BackendError>>();
        let mut threads = Vec::with_capacity(options.instances);
        for index in 0..options.instances.max(1) {
            let model = Arc::clone(&model);
            let receiver = receiver.clone();
            let ready_tx = ready_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{}#{index}", options.thread_name))
                .spawn(move || run_instance(model.as_ref(), index, &receiver, &ready_tx));
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    drop(sender);
                    join_all(threads);
                    return Err(BackendError::new(
                        oxserve_backend::BackendErrorKind::Internal,
                        format!("cannot start instance thread: {e}"),
                    ));
                }
            }
        }
        drop(ready_tx);
        let mut first_error = None;
        for _ in 0..threads.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => break,
            }
        }
        if let Some(error) = first_error {
            drop(sender);
            join_all(threads);
            return Err(error);
        }
        Ok(InstancePool {
            sender: Some(sender),
            threads,
        })
    }

    /// Queues a batch and waits for its outputs.
    pub async fn execute(&self, batch: Batch) -> Result<Vec<Tensor>, ExecError> {
        let sender = self.sender.as_ref().ok_or(ExecError::Stopped)?;
        let (reply, receiver) = oneshot::channel();
        match sender.try_send(Job { batch, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(ExecError::Overloaded),
            Err(TrySendError::Disconnected(_)) => return Err(ExecError::Stopped),
        }
        match receiver.await {
            Ok(result) => result.map_err(ExecError::Backend),
            Err(_) => Err(ExecError::Stopped),
        }
    }

    /// Jobs waiting for an instance.
    pub fn queued(&self) -> usize {
        self.sender.as_ref().map_or(0, Sender::len)
    }
}

impl Drop for InstancePool {
    /// Closes the queue, lets the instances finish what is queued, and joins them.
    fn drop(&mut self) {
        self.sender.take();
        join_all(std::mem::take(&mut self.threads));
    }
}

fn join_all(threads: Vec<JoinHandle<()>>) {
    for t in threads {
        if t.join().is_err() {
            tracing::error!("a model instance thread panicked");
        }
    }
}

fn run_instance(
    model: &dyn LoadedModel,
    index: usize,
    receiver: &Receiver<Job>,
    ready: &mpsc::Sender<Result<(), BackendError>>,
) {
    let mut instance = match model.new_instance(index) {
        Ok(instance) => {
            let _ = ready.send(Ok(()));
            instance
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    while let Ok(job) = receiver.recv() {
        // The client went away while the job waited: don't spend an instance on it.
        if job.reply.is_closed() {
            continue;
        }
        let result = instance.execute(job.batch);
        let _ = job.reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxserve_backend::{BackendErrorKind, ModelInstance};
    use oxserve_core::DataType;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Returns its inputs unchanged and counts executions.
    struct Echo(Arc<AtomicUsize>);
    struct EchoInstance(Arc<AtomicUsize>);
    impl LoadedModel for Echo {
        fn new_instance(&self, index: usize) -> Result<Box<dyn ModelInstance>, BackendError> {
            if index == 99 {
                return Err(BackendError::new(BackendErrorKind::Internal, "no"));
            }
            Ok(Box::new(EchoInstance(Arc::clone(&self.0))))
        }
    }
    impl ModelInstance for EchoInstance {
        fn execute(&mut self, batch: Batch) -> Result<Vec<Tensor>, BackendError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(batch.inputs)
        }
    }

    struct FailsToStart;
    impl LoadedModel for FailsToStart {
        fn new_instance(&self, index: usize) -> Result<Box<dyn ModelInstance>, BackendError> {
            Err(BackendError::new(
                BackendErrorKind::Internal,
                format!("instance {index} failed"),
            ))
        }
    }

    fn options(instances: usize) -> PoolOptions {
        PoolOptions {
            instances,
            queue_capacity: 64,
            thread_name: "test".into(),
        }
    }

    #[tokio::test]
    async fn every_job_gets_its_own_answer() {
        let count = Arc::new(AtomicUsize::new(0));
        let pool = Arc::new(InstancePool::start(Arc::new(Echo(Arc::clone(&count))), &options(3)).unwrap());
        let mut handles = Vec::new();
        for i in 0..50u8 {
            let pool = Arc::clone(&pool);
            handles.push(tokio::spawn(async move {
                let t = Tensor::from_raw("x", DataType::U8, vec![1], vec![i]);
                let out = pool
                    .execute(Batch {
                        inputs: vec![t],
                        outputs: vec![],
                    })
                    .await
                    .unwrap();
                assert_eq!(out[0].raw().unwrap().as_ref(), &[i]);
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(count.load(Ordering::SeqCst), 50);
    }

    #[test]
    fn instance_creation_failure_is_reported() {
        let err = InstancePool::start(Arc::new(FailsToStart), &options(2))
            .err()
            .unwrap();
        assert!(err.message().contains("failed"));
    }
}
