//! The scheduler of one model version, as the engine sees it: the dynamic batcher for
//! ordinary models, the sequence batcher for models with `sequence_batching`.

use std::sync::Arc;

use oxserve_backend::{BackendError, LoadedModel};

use crate::scheduler::BatchScheduler;
use crate::sequence::SequenceScheduler;
use crate::types::{Completed, ExecError, ExecutionObserver, Job, SchedulerConfig};

/// The scheduler of one model version.
pub struct Scheduler {
    inner: Inner,
}

enum Inner {
    Batch(BatchScheduler),
    Sequence(SequenceScheduler),
}

impl Scheduler {
    /// Creates every instance on the thread that will own it and returns once all are ready,
    /// or with the first instance's error (threads already started are stopped).
    pub fn start(
        model: Arc<dyn LoadedModel>,
        config: SchedulerConfig,
        observer: Arc<dyn ExecutionObserver>,
    ) -> Result<Self, BackendError> {
        let inner = match config.sequence.clone() {
            Some(sequence) => Inner::Sequence(SequenceScheduler::start(model, config, sequence, observer)?),
            None => Inner::Batch(BatchScheduler::start(model, config, observer)?),
        };
        Ok(Scheduler { inner })
    }

    /// Queues a request and waits for its outputs.
    pub async fn submit(&self, job: Job) -> Result<Completed, ExecError> {
        match &self.inner {
            Inner::Batch(b) => b.submit(job).await,
            Inner::Sequence(s) => s.submit(job.sequence, job.inputs, job.outputs).await,
        }
    }

    /// Why the version stopped serving after repeated instance failures; `None` while it serves.
    pub fn failure(&self) -> Option<&str> {
        match &self.inner {
            Inner::Batch(b) => b.failure(),
            Inner::Sequence(s) => s.failure(),
        }
    }

    /// Requests waiting for an instance.
    pub fn queued(&self) -> usize {
        match &self.inner {
            Inner::Batch(b) => b.queued(),
            Inner::Sequence(s) => s.queued(),
        }
    }
}
