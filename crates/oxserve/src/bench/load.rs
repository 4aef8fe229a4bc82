//! Running one point: the load (closed-loop workers or an open-loop schedule), the warm-up, and
//! the measurement windows until they are stable.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;

use super::cpu::process_cpu_time;
use super::options::Distribution;
use super::record::Recorder;
use super::schedule::{Schedule, WindowFigures, is_stable};
use super::sender::Sender;
use super::server_stats::{ServerBreakdown, StatsSource};

/// The load of one point.
#[derive(Debug, Clone, Copy)]
pub(super) enum Load {
    Concurrency(usize),
    Rate {
        rate: f64,
        distribution: Distribution,
        seed: u64,
    },
}

#[derive(Debug, Clone)]
pub(super) struct Measure {
    pub(super) warmup: Duration,
    pub(super) window: Duration,
    pub(super) stability_percent: f64,
    pub(super) max_windows: usize,
    /// One fixed window (`--duration`) instead of windows until stable.
    pub(super) fixed: bool,
    pub(super) max_outstanding: usize,
}

pub(super) struct Window {
    pub(super) hist: Histogram<u64>,
    pub(super) errors: u64,
    pub(super) dropped: u64,
    pub(super) elapsed: Duration,
}

impl Window {
    fn figures(&self) -> WindowFigures {
        WindowFigures {
            throughput: self.hist.len() as f64 / self.elapsed.as_secs_f64().max(1e-9),
            p50_us: self.hist.value_at_quantile(0.5) as f64,
        }
    }
}

/// Starts the load; returns what to wait on when stopping.
fn start_load(
    sender: &Arc<Sender>,
    load: Load,
    max_outstanding: usize,
    recorder: &Arc<Recorder>,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<LoadHandle> {
    match load {
        Load::Concurrency(n) => {
            let tasks = (0..n.max(1))
                .map(|worker| {
                    let (sender, recorder, stop) =
                        (Arc::clone(sender), Arc::clone(recorder), Arc::clone(stop));
                    tokio::spawn(async move {
                        while !stop.load(Ordering::Relaxed) {
                            let t0 = Instant::now();
                            let result = sender.send(worker).await;
                            recorder.record(worker, result.map(|()| t0.elapsed()));
                        }
                    })
                })
                .collect();
            Ok(LoadHandle::Workers(tasks))
        }
        Load::Rate {
            rate,
            distribution,
            seed,
        } => {
            let mut schedule = Schedule::new(rate, distribution, seed)?;
            let in_flight = Arc::new(AtomicUsize::new(0));
            let handle = tokio::runtime::Handle::current();
            let (sender, recorder, stop, flight) = (
                Arc::clone(sender),
                Arc::clone(recorder),
                Arc::clone(stop),
                Arc::clone(&in_flight),
            );
            // A dedicated OS thread keeps the schedule: tokio's timer ticks in milliseconds,
            // too coarse for rates in the thousands per second. It never spins; a send due
            // while the thread was asleep late goes out at once (latency counts from when it
            // was due), so the schedule never drifts.
            let thread = std::thread::Builder::new()
                .name("bench-schedule".into())
                .spawn(move || {
                    let mut due = Instant::now();
                    let mut n = 0usize;
                    'schedule: while !stop.load(Ordering::Relaxed) {
                        let Some(next) = due.checked_add(schedule.next_interval()) else {
                            break;
                        };
                        due = next;
                        // Sleep in slices, so that stopping never waits for a long interval.
                        loop {
                            let now = Instant::now();
                            if due <= now {
                                break;
                            }
                            if stop.load(Ordering::Relaxed) {
                                break 'schedule;
                            }
                            std::thread::sleep((due - now).min(Duration::from_millis(50)));
                        }
                        if flight.load(Ordering::Relaxed) >= max_outstanding {
                            recorder.dropped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        flight.fetch_add(1, Ordering::Relaxed);
                        n = n.wrapping_add(1);
                        let (sender, recorder, flight) =
                            (Arc::clone(&sender), Arc::clone(&recorder), Arc::clone(&flight));
                        let scheduled = due;
                        handle.spawn(async move {
                            let result = sender.send(n).await;
                            recorder.record(n, result.map(|()| scheduled.elapsed()));
                            flight.fetch_sub(1, Ordering::Relaxed);
                        });
                    }
                })
                .context("cannot start the schedule thread")?;
            Ok(LoadHandle::Scheduled { thread, in_flight })
        }
    }
}

enum LoadHandle {
    Workers(Vec<tokio::task::JoinHandle<()>>),
    Scheduled {
        thread: std::thread::JoinHandle<()>,
        in_flight: Arc<AtomicUsize>,
    },
}

impl LoadHandle {
    /// Waits for the load to wind down after `stop` was set (bounded: stragglers are
    /// abandoned after `grace`).
    async fn finish(self, grace: Duration) {
        match self {
            LoadHandle::Workers(tasks) => {
                let deadline = tokio::time::Instant::now() + grace;
                for t in tasks {
                    let abort = t.abort_handle();
                    if tokio::time::timeout_at(deadline, t).await.is_err() {
                        abort.abort();
                    }
                }
            }
            LoadHandle::Scheduled { thread, in_flight } => {
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
                let deadline = Instant::now() + grace;
                while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
}

/// The outcome of one point's windows.
pub(super) struct Measured {
    pub(super) windows: Vec<Window>,
    pub(super) server: Option<ServerBreakdown>,
    pub(super) stable: bool,
    pub(super) first_error: Option<String>,
    /// The load generator's own CPU time over the reported windows (`None` where the
    /// process's CPU time is not readable).
    pub(super) client_cpu: Option<Duration>,
}

pub(super) async fn measure_point(
    sender: &Arc<Sender>,
    stats: &StatsSource,
    load: Load,
    m: &Measure,
) -> anyhow::Result<Measured> {
    let shards = match load {
        Load::Concurrency(n) => n.max(1),
        Load::Rate { .. } => 64,
    };
    let recorder = Arc::new(Recorder::new(shards));
    let stop = Arc::new(AtomicBool::new(false));
    let handle = start_load(sender, load, m.max_outstanding, &recorder, &stop)?;

    tokio::time::sleep(m.warmup).await;
    // The first statistics are read before the first window opens (the first read can be
    // slow: it connects), so the server's count never misses requests the client counts.
    let mut snapshots = vec![stats.snapshot().await];
    let _ = recorder.take();
    let mut boundary = Instant::now();
    let mut cpu_at_boundaries = vec![process_cpu_time()];
    let mut windows: Vec<Window> = Vec::new();
    let mut figures = Vec::new();
    let max_windows = if m.fixed { 1 } else { m.max_windows.max(3) };
    let mut stable = false;
    while windows.len() < max_windows {
        tokio::time::sleep_until((boundary + m.window).into()).await;
        let taken = recorder.take();
        let now = Instant::now();
        let w = Window {
            hist: taken.hist,
            errors: taken.errors,
            dropped: taken.dropped,
            elapsed: now - boundary,
        };
        boundary = now;
        cpu_at_boundaries.push(process_cpu_time());
        snapshots.push(stats.snapshot().await);
        figures.push(w.figures());
        windows.push(w);
        if !m.fixed && is_stable(&figures, m.stability_percent) {
            stable = true;
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    handle.finish(Duration::from_secs(10)).await;

    let reported = if m.fixed { 1 } else { windows.len().min(3) };
    let first = windows.len() - reported;
    let server = match (&snapshots[first], &snapshots[windows.len()]) {
        (Some(before), Some(after)) => after.breakdown_since(before),
        _ => None,
    };
    let client_cpu = match (cpu_at_boundaries[first], cpu_at_boundaries[windows.len()]) {
        (Some(before), Some(after)) => after.checked_sub(before),
        _ => None,
    };
    let first_error = recorder
        .first_error
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    Ok(Measured {
        windows,
        server,
        stable: stable || m.fixed,
        first_error,
        client_cpu,
    })
}
