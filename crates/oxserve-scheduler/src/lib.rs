//! Runs batches on a model version's instances. Each instance lives on its own OS thread (never
//! a tokio worker) and takes work from one shared queue, so the async front-ends only ever wait
//! on a reply channel.
//!
//! This is the first-in-first-out core; dynamic batching, priorities and deadlines build on it.

mod pool;

pub use pool::{ExecError, InstancePool, PoolOptions};
