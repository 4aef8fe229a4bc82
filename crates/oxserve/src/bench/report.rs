//! What a point reports: the figures of its last windows, as a table row or a JSON object.

use serde::Serialize;

use super::load::{Load, Measure, Measured};
use super::options::{BenchProtocol, ClientKind, Distribution, Mode, SharedMemory};
use super::record::new_histogram;
use super::server_stats::ServerBreakdown;

/// One measured point, as printed by `--json`.
#[derive(Serialize, Debug)]
pub struct Point {
    pub protocol: BenchProtocol,
    pub client: ClientKind,
    pub shared_memory: SharedMemory,
    pub mode: Mode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distribution: Option<Distribution>,
    pub batch: i64,
    /// Successful requests in the reported windows.
    pub requests: u64,
    pub errors: u64,
    /// `--mode rate`: scheduled requests not sent because `--max-outstanding` were in flight.
    pub dropped: u64,
    pub throughput_rps: f64,
    /// `throughput_rps` × batch.
    pub infer_per_sec: f64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// The load generator's own CPU time per successful request (user + system, all
    /// threads), over the reported windows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cpu_us: Option<f64>,
    /// Windows measured in all, and whether the last three agreed.
    pub windows: usize,
    pub stable: bool,
    pub window_secs: f64,
    /// Seconds covered by the reported windows.
    pub measured_secs: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Server-side averages over the reported windows; absent when no statistics were
    /// readable.
    pub server: Option<ServerBreakdown>,
}

pub(super) fn summarize(
    protocol: BenchProtocol,
    client: ClientKind,
    shared_memory: SharedMemory,
    load: Load,
    batch: i64,
    m: &Measure,
    measured: Measured,
) -> Point {
    let Measured {
        windows,
        server,
        stable,
        first_error,
        client_cpu,
    } = measured;
    let reported = if m.fixed { 1 } else { windows.len().min(3) };
    let last = &windows[windows.len() - reported..];
    let mut hist = new_histogram();
    let (mut errors, mut dropped, mut secs) = (0, 0, 0.0);
    for w in last {
        let _ = hist.add(&w.hist);
        errors += w.errors;
        dropped += w.dropped;
        secs += w.elapsed.as_secs_f64();
    }
    let throughput = hist.len() as f64 / f64::max(secs, 1e-9);
    let (mode, concurrency, rate, distribution) = match load {
        Load::Concurrency(n) => (Mode::Concurrency, Some(n), None, None),
        Load::Rate {
            rate, distribution, ..
        } => (Mode::Rate, None, Some(rate), Some(distribution)),
    };
    let requests = hist.len();
    Point {
        protocol,
        client,
        shared_memory,
        mode,
        concurrency,
        rate,
        distribution,
        batch,
        requests,
        errors,
        dropped,
        throughput_rps: throughput,
        infer_per_sec: throughput * batch as f64,
        mean_us: hist.mean(),
        p50_us: hist.value_at_quantile(0.5),
        p90_us: hist.value_at_quantile(0.9),
        p95_us: hist.value_at_quantile(0.95),
        p99_us: hist.value_at_quantile(0.99),
        max_us: hist.max(),
        client_cpu_us: client_cpu
            .filter(|_| requests > 0)
            .map(|cpu| cpu.as_secs_f64() * 1e6 / requests as f64),
        windows: windows.len(),
        stable,
        window_secs: m.window.as_secs_f64(),
        measured_secs: secs,
        first_error,
        server,
    }
}

pub(super) fn print_header() {
    println!(
        "{:<15} {:>9} {:>9} {:>6} {:>6} {:>10} {:>7} {:>7} {:>7} {:>7} {:>5}  {:>7} {:>7} {:>7} {:>7} {:>6}",
        "protocol",
        "load",
        "requests",
        "errors",
        "drop",
        "req/s",
        "p50µs",
        "p90µs",
        "p95µs",
        "p99µs",
        "win",
        "queue",
        "c_in",
        "infer",
        "c_out",
        "batch"
    );
}

pub(super) fn print_row(p: &Point) -> anyhow::Result<()> {
    let mut name = serde_json::to_value(p.protocol)?
        .as_str()
        .unwrap_or_default()
        .to_string();
    if p.shared_memory == SharedMemory::System {
        name.push_str("+shm");
    }
    let load = match (p.concurrency, p.rate) {
        (Some(c), _) => format!("c={c}"),
        (None, Some(r)) => format!("r={r}"),
        _ => String::new(),
    };
    let win = format!("{}{}", p.windows, if p.stable { "" } else { "!" });
    let server = match &p.server {
        Some(s) => format!(
            "{:>7.0} {:>7.0} {:>7.0} {:>7.0} {:>6.2}",
            s.queue_us, s.compute_input_us, s.compute_infer_us, s.compute_output_us, s.avg_batch_size
        ),
        None => format!("{:>7} {:>7} {:>7} {:>7} {:>6}", "-", "-", "-", "-", "-"),
    };
    println!(
        "{:<15} {:>9} {:>9} {:>6} {:>6} {:>10.0} {:>7} {:>7} {:>7} {:>7} {:>5}  {server}",
        name,
        load,
        p.requests,
        p.errors,
        p.dropped,
        p.throughput_rps,
        p.p50_us,
        p.p90_us,
        p.p95_us,
        p.p99_us,
        win
    );
    if let Some(e) = &p.first_error {
        eprintln!("  first error: {e}");
    }
    Ok(())
}
