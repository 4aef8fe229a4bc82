//! Client-side recording: latencies in HDR histograms and errors, taken window by window.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;

pub(super) fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 10 min at 3 significant digits; the bounds are constants, so this cannot fail.
    Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("constant histogram bounds are valid")
}

struct Shard {
    hist: Histogram<u64>,
    errors: u64,
}

/// Latencies and errors since the last [`Recorder::take`], sharded so that workers rarely
/// share a lock.
pub(super) struct Recorder {
    shards: Vec<Mutex<Shard>>,
    pub(super) dropped: AtomicU64,
    pub(super) first_error: Mutex<Option<String>>,
}

/// What was recorded in one window.
pub(super) struct Taken {
    pub(super) hist: Histogram<u64>,
    pub(super) errors: u64,
    pub(super) dropped: u64,
}

impl Recorder {
    pub(super) fn new(shards: usize) -> Self {
        Recorder {
            shards: (0..shards.max(1))
                .map(|_| {
                    Mutex::new(Shard {
                        hist: new_histogram(),
                        errors: 0,
                    })
                })
                .collect(),
            dropped: AtomicU64::new(0),
            first_error: Mutex::new(None),
        }
    }

    pub(super) fn record(&self, shard: usize, result: Result<Duration, String>) {
        let mut s = self.shards[shard % self.shards.len()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(latency) => {
                let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
                s.hist.saturating_record(us);
            }
            Err(e) => {
                s.errors += 1;
                drop(s);
                let mut first = self.first_error.lock().unwrap_or_else(PoisonError::into_inner);
                if first.is_none() {
                    *first = Some(e);
                }
            }
        }
    }

    pub(super) fn take(&self) -> Taken {
        let mut hist = new_histogram();
        let mut errors = 0;
        for shard in &self.shards {
            let mut s = shard.lock().unwrap_or_else(PoisonError::into_inner);
            // Same bounds on both sides, so adding cannot fail.
            let _ = hist.add(&s.hist);
            s.hist.reset();
            errors += std::mem::take(&mut s.errors);
        }
        Taken {
            hist,
            errors,
            dropped: self.dropped.swap(0, Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn recorder_windows_take_and_reset() {
        let r = Recorder::new(4);
        for i in 0..100u64 {
            r.record(i as usize, Ok(Duration::from_micros(i + 1)));
        }
        r.record(3, Err("boom".into()));
        r.record(3, Err("second".into()));
        r.dropped.fetch_add(2, Ordering::Relaxed);
        let t = r.take();
        assert_eq!((t.hist.len(), t.errors, t.dropped), (100, 2, 2));
        assert_eq!(t.hist.value_at_quantile(0.5), 50);
        let t = r.take();
        assert_eq!((t.hist.len(), t.errors, t.dropped), (0, 0, 0));
        assert_eq!(r.first_error.lock().unwrap().as_deref(), Some("boom"));
    }
}
