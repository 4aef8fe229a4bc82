//! Runs requests on a model version's instances with Triton's scheduling semantics: priority
//! levels, queue timeouts and limits, and dynamic batching (requests concatenated along the
//! first dimension, outputs split back). Each instance lives on its own OS thread (never a
//! tokio worker); the async front-ends only wait on a reply channel.

mod batch;
mod facade;
mod health;
mod instances;
mod queue;
mod scheduler;
mod sequence;
mod types;

pub use facade::Scheduler;
pub use sequence::{
    ControlInput, ControlKind, CorrelationId, SequenceConfig, SequenceFlags, SequenceStrategy, StateSpec,
};
pub use types::{
    BatchTiming, Completed, DynamicBatching, ExecError, ExecutionObserver, Job, NoObserver, QueuePolicy,
    RequestTiming, RestartPolicy, SchedulerConfig, TimeoutAction,
};
