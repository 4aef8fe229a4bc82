//! What both schedulers (the dynamic batcher and the sequence batcher) do with instance
//! threads: start one per instance and wait until each has created its instance, create and
//! drop instances without letting an engine's panic out, and re-create a failed instance after
//! the restart policy's backoff.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use oxserve_backend::support::{panic_message, truncate};
use oxserve_backend::{BackendError, BackendErrorKind, LoadedModel, ModelInstance};
use oxserve_core::Tensor;
use parking_lot::{Condvar, Mutex};

use crate::health::{FailureWindow, Verdict};

/// How an instance thread tells `start` that its instance exists (or why it does not).
pub(crate) type Ready = mpsc::Sender<Result<(), BackendError>>;

/// Starts `count` threads named `<name>#<index>` running `body(index, ready)`, pushing their
/// handles into `threads` (so the caller's drop stops them if a later one fails), and waits
/// until every one has reported its instance; the first error is returned.
pub(crate) fn start_threads<F, B>(
    threads: &mut Vec<JoinHandle<()>>,
    count: usize,
    name: &str,
    body: F,
) -> Result<(), BackendError>
where
    F: Fn(usize, Ready) -> B,
    B: FnOnce() + Send + 'static,
{
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), BackendError>>();
    for index in 0..count {
        let run = body(index, ready_tx.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("{name}#{index}"))
            .spawn(move || {
                precise_timeouts();
                run()
            });
        match spawned {
            Ok(handle) => threads.push(handle),
            Err(e) => {
                return Err(BackendError::new(
                    BackendErrorKind::Internal,
                    format!("cannot start instance thread: {e}"),
                ));
            }
        }
    }
    drop(ready_tx);
    for _ in 0..threads.len() {
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
    Ok(())
}

/// Lets the calling thread's timed waits end on time. Linux delays a sleeping thread's timeout
/// by up to its timer slack (50 µs by default) to batch wake-ups; an instance thread waiting
/// out `max_queue_delay_microseconds` then dispatched 80 µs late on average instead of 30
/// (trace timestamps, 500 µs delay), which is latency on every batched request.
fn precise_timeouts() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::set_current_timer_slack(std::num::NonZeroU64::new(1_000)) {
        tracing::debug!(error = %e, "timer slack not set");
    }
}

/// Calls the engine's `new_instance`, turning a panic into an error.
pub(crate) fn create_instance(
    model: &dyn LoadedModel,
    index: usize,
) -> Result<Box<dyn ModelInstance>, BackendError> {
    match catch_unwind(AssertUnwindSafe(|| model.new_instance(index))) {
        Ok(created) => created,
        Err(payload) => Err(BackendError::new(
            BackendErrorKind::Internal,
            format!(
                "instance #{index} panicked while being created: {}",
                truncate(&panic_message(payload.as_ref()), 300)
            ),
        )),
    }
}

/// Drops an instance; a panic in the engine's destructor is logged, never propagated.
pub(crate) fn discard(instance: Box<dyn ModelInstance>, index: usize) {
    if let Err(payload) = catch_unwind(AssertUnwindSafe(move || drop(instance))) {
        tracing::error!(
            instance = index,
            panic = %truncate(&panic_message(payload.as_ref()), 300),
            "model instance panicked while being dropped"
        );
    }
}

/// Creates the thread's first instance and tells `start` how it went; `None` when it could
/// not be made. The sender is let go of here: `start` must see the channel close if a sibling
/// thread dies without answering, which it cannot while serving threads still hold senders.
pub(crate) fn first_instance(
    model: &dyn LoadedModel,
    index: usize,
    ready: Ready,
) -> Option<Box<dyn ModelInstance>> {
    match create_instance(model, index) {
        Ok(instance) => {
            let _ = ready.send(Ok(()));
            Some(instance)
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            None
        }
    }
}

/// Waits `wait` on `wake`; false if `halted` (the scheduler stops or gave up) says so before
/// or meanwhile.
pub(crate) fn pause_unless<S>(
    state: &Mutex<S>,
    wake: &Condvar,
    wait: Duration,
    halted: impl Fn(&S) -> bool,
) -> bool {
    let until = Instant::now() + wait;
    let mut st = state.lock();
    while !halted(&st) {
        if wake.wait_until(&mut st, until).timed_out() {
            break;
        }
    }
    !halted(&st)
}

/// What re-creating a failed instance needs from its scheduler.
pub(crate) trait Supervisor {
    /// The scheduler's thread name, for logs.
    fn name(&self) -> &str;
    /// The failures of the version's instances within the restart policy's window.
    fn failures(&self) -> &parking_lot::Mutex<FailureWindow>;
    /// Stops the version after `failures` failures: every waiting request is answered with the
    /// reason and new ones are refused.
    fn give_up(&self, failures: usize, last: &str);
    /// Waits `wait`; false if the scheduler stops or gives up meanwhile.
    fn pause(&self, wait: Duration) -> bool;

    /// Counts an instance failure, giving up at the limit before anyone hears of the failure,
    /// so that a client answered "the instance failed" finds the version's state settled.
    fn instance_failed(&self, reason: &str) -> Verdict {
        let verdict = self.failures().lock().record(Instant::now());
        if let Verdict::GiveUp { failures } = verdict {
            self.give_up(failures, reason);
        }
        verdict
    }
}

/// Re-creates the instance after the policy's backoff, counting re-creations that fail; `None`
/// when the version gives up (or the scheduler stops meanwhile).
pub(crate) fn recreate(
    supervisor: &dyn Supervisor,
    model: &dyn LoadedModel,
    index: usize,
    mut reason: String,
    mut verdict: Verdict,
) -> Option<Box<dyn ModelInstance>> {
    loop {
        let after = match verdict {
            // `instance_failed` has already given up and answered the queue.
            Verdict::GiveUp { .. } => return None,
            Verdict::Restart { after } => after,
        };
        tracing::error!(
            scheduler = %supervisor.name(), instance = index, %reason,
            retry_in_ms = after.as_millis() as u64,
            "model instance failed; re-creating it"
        );
        if !supervisor.pause(after) {
            return None;
        }
        match create_instance(model, index) {
            Ok(instance) => {
                tracing::info!(scheduler = %supervisor.name(), instance = index, "model instance re-created");
                return Some(instance);
            }
            Err(e) => {
                reason = e.message().to_string();
                verdict = supervisor.instance_failed(&reason);
            }
        }
    }
}

/// A request's input shapes as batching compares them: without the batch dimension when the
/// model batches (requests batch together only when these agree).
pub(crate) fn row_shapes(inputs: &[Tensor], batched: bool) -> Vec<Vec<i64>> {
    inputs
        .iter()
        .map(|t| {
            if batched {
                t.shape.get(1..).unwrap_or_default().to_vec()
            } else {
                t.shape.clone()
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn instance_threads_wake_within_a_microsecond_of_their_timeouts() {
        let (slack_tx, slack_rx) = mpsc::channel();
        let mut threads = Vec::new();
        start_threads(&mut threads, 2, "slack", |_, ready| {
            let slack_tx = slack_tx.clone();
            move || {
                slack_tx
                    .send(rustix::thread::current_timer_slack().unwrap())
                    .unwrap();
                ready.send(Ok(())).unwrap();
            }
        })
        .unwrap();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(slack_rx.try_iter().collect::<Vec<_>>(), [1_000, 1_000]);
    }
}
