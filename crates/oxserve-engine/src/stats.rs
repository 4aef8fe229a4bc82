//! Per model-version statistics (Triton's statistics extension) and the Prometheus metrics
//! derived from the same events. Recording is a few atomic adds; nothing here takes a lock
//! on the request path except the per-batch-size table, once per execution.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use oxserve_scheduler::{BatchTiming, ExecutionObserver, RequestTiming};
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A `{count, ns}` pair of Triton's statistics.
#[derive(Debug, Default)]
pub struct Duration2 {
    count: AtomicU64,
    ns: AtomicU64,
}

impl Duration2 {
    fn add(&self, d: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
    fn get(&self) -> StatDuration {
        StatDuration {
            count: self.count.load(Ordering::Relaxed),
            ns: self.ns.load(Ordering::Relaxed),
        }
    }
}

/// `{count, ns}` as reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatDuration {
    pub count: u64,
    pub ns: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStat {
    pub batch_size: usize,
    pub compute_input: StatDuration,
    pub compute_infer: StatDuration,
    pub compute_output: StatDuration,
}

/// Triton's `InferStatistics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InferStats {
    pub success: StatDuration,
    pub fail: StatDuration,
    pub queue: StatDuration,
    pub compute_input: StatDuration,
    pub compute_infer: StatDuration,
    pub compute_output: StatDuration,
}

/// One model version's statistics, Triton's `ModelStatistics` shape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelStatistics {
    pub name: String,
    pub version: String,
    /// Milliseconds since the epoch of the last inference; 0 = never.
    pub last_inference: u64,
    /// Rows inferred (a batch of 4 counts 4).
    pub inference_count: u64,
    /// Engine executions.
    pub execution_count: u64,
    pub inference_stats: InferStats,
    pub batch_stats: Vec<BatchStat>,
    /// When this version is a shadow candidate: how its answers compared with the primary's.
    pub shadow: Option<crate::shadow::ShadowStats>,
}

/// Why a request failed, as a metric label (Triton's `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// Shed by admission control or timed out in the queue.
    Rejected,
    /// The client went away.
    Canceled,
    /// The engine failed.
    Backend,
    /// Invalid requests and anything else.
    Other,
}

impl FailureReason {
    fn label(self) -> &'static str {
        match self {
            FailureReason::Rejected => "REJECTED",
            FailureReason::Canceled => "CANCELED",
            FailureReason::Backend => "BACKEND",
            FailureReason::Other => "OTHER",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    model: String,
    version: String,
    reason: String,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~26 s.
    Histogram::new(exponential_buckets(0.00005, 2.0, 20))
}

fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 12))
}

/// The metric families, registered once per server.
pub struct Metrics {
    registry: Registry,
    success: Family<ModelLabels, Counter>,
    failure: Family<FailureLabels, Counter>,
    inference_count: Family<ModelLabels, Counter>,
    exec_count: Family<ModelLabels, Counter>,
    pending: Family<ModelLabels, Gauge>,
    request_duration: Family<ModelLabels, Histogram, fn() -> Histogram>,
    queue_duration: Family<ModelLabels, Histogram, fn() -> Histogram>,
    compute_duration: Family<ModelLabels, Histogram, fn() -> Histogram>,
    batch_size: Family<ModelLabels, Histogram, fn() -> Histogram>,
    load_duration: Family<ModelLabels, Gauge<f64, AtomicU64>>,
    pub(crate) shadow: crate::shadow::ShadowMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("oxserve");
        let m = Metrics {
            success: Family::default(),
            failure: Family::default(),
            inference_count: Family::default(),
            exec_count: Family::default(),
            pending: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            queue_duration: Family::new_with_constructor(latency_histogram),
            compute_duration: Family::new_with_constructor(latency_histogram),
            batch_size: Family::new_with_constructor(batch_histogram),
            load_duration: Family::default(),
            shadow: crate::shadow::ShadowMetrics::register(&mut registry),
            registry: Registry::default(),
        };
        registry.register(
            "inference_request_success",
            "Successful inference requests",
            m.success.clone(),
        );
        registry.register(
            "inference_request_failure",
            "Failed inference requests, by reason",
            m.failure.clone(),
        );
        registry.register(
            "inference_count",
            "Inferences performed (a batch of N counts N)",
            m.inference_count.clone(),
        );
        registry.register(
            "inference_exec_count",
            "Engine executions (batches)",
            m.exec_count.clone(),
        );
        registry.register(
            "inference_pending_request_count",
            "Requests accepted and not yet answered",
            m.pending.clone(),
        );
        registry.register(
            "inference_request_duration_seconds",
            "End-to-end request time inside the server",
            m.request_duration.clone(),
        );
        registry.register(
            "inference_queue_duration_seconds",
            "Time requests waited in the scheduler queue",
            m.queue_duration.clone(),
        );
        registry.register(
            "inference_compute_duration_seconds",
            "Engine execution time per request's batch",
            m.compute_duration.clone(),
        );
        registry.register(
            "inference_batch_size",
            "Rows per engine execution",
            m.batch_size.clone(),
        );
        registry.register(
            "model_load_duration_seconds",
            "Time to load a model version",
            m.load_duration.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The registry, for adding process metrics and encoding.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            tracing::error!("cannot encode metrics");
        }
        out
    }

    pub(crate) fn record_load(&self, model: &str, version: u64, took: Duration) {
        let labels = ModelLabels {
            model: model.to_string(),
            version: version.to_string(),
        };
        self.load_duration.get_or_create(&labels).set(took.as_secs_f64());
    }
}

/// Counters of one model version, cached out of the families so recording needs no lookup.
pub struct ModelStats {
    inference_count: AtomicU64,
    execution_count: AtomicU64,
    last_inference_ms: AtomicU64,
    success: Duration2,
    fail: Duration2,
    queue: Duration2,
    compute_input: Duration2,
    compute_infer: Duration2,
    compute_output: Duration2,
    batch_stats: Mutex<BTreeMap<usize, [Duration2; 3]>>,
    metrics: Arc<Metrics>,
    labels: ModelLabels,
    m_success: Counter,
    m_inference_count: Counter,
    m_exec_count: Counter,
    m_pending: Gauge,
    m_request: Histogram,
    m_queue: Histogram,
    m_compute: Histogram,
    m_batch: Histogram,
}

impl ModelStats {
    pub fn new(model: &str, version: u64, metrics: Arc<Metrics>) -> Self {
        let labels = ModelLabels {
            model: model.to_string(),
            version: version.to_string(),
        };
        let m_success = metrics.success.get_or_create(&labels).clone();
        let m_inference_count = metrics.inference_count.get_or_create(&labels).clone();
        let m_exec_count = metrics.exec_count.get_or_create(&labels).clone();
        let m_pending = metrics.pending.get_or_create(&labels).clone();
        let m_request = metrics.request_duration.get_or_create(&labels).clone();
        let m_queue = metrics.queue_duration.get_or_create(&labels).clone();
        let m_compute = metrics.compute_duration.get_or_create(&labels).clone();
        let m_batch = metrics.batch_size.get_or_create(&labels).clone();
        ModelStats {
            inference_count: AtomicU64::new(0),
            execution_count: AtomicU64::new(0),
            last_inference_ms: AtomicU64::new(0),
            success: Duration2::default(),
            fail: Duration2::default(),
            queue: Duration2::default(),
            compute_input: Duration2::default(),
            compute_infer: Duration2::default(),
            compute_output: Duration2::default(),
            batch_stats: Mutex::new(BTreeMap::new()),
            m_success,
            m_inference_count,
            m_exec_count,
            m_pending,
            m_request,
            m_queue,
            m_compute,
            m_batch,
            labels,
            metrics,
        }
    }

    /// A request was accepted for this version.
    pub(crate) fn request_started(&self) {
        self.m_pending.inc();
    }

    /// A request got its answer (success or failure).
    pub(crate) fn request_finished(&self) {
        self.m_pending.dec();
    }

    pub(crate) fn record_success(&self, rows: usize, total: Duration, timing: &RequestTiming) {
        self.success.add(total);
        self.queue.add(timing.queue);
        self.compute_input.add(timing.compute_input);
        self.compute_infer.add(timing.compute_infer);
        self.compute_output.add(timing.compute_output);
        self.inference_count.fetch_add(rows as u64, Ordering::Relaxed);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_inference_ms.store(now_ms, Ordering::Relaxed);
        self.m_success.inc();
        self.m_inference_count.inc_by(rows as u64);
        self.m_request.observe(total.as_secs_f64());
        self.m_queue.observe(timing.queue.as_secs_f64());
        self.m_compute.observe(timing.compute_infer.as_secs_f64());
    }

    pub(crate) fn record_failure(&self, reason: FailureReason, total: Duration) {
        self.fail.add(total);
        let labels = FailureLabels {
            model: self.labels.model.clone(),
            version: self.labels.version.clone(),
            reason: reason.label().to_string(),
        };
        self.metrics.failure.get_or_create(&labels).inc();
    }

    pub fn snapshot(&self) -> ModelStatistics {
        let batch_stats = self
            .batch_stats
            .lock()
            .iter()
            .map(|(&batch_size, [input, infer, output])| BatchStat {
                batch_size,
                compute_input: input.get(),
                compute_infer: infer.get(),
                compute_output: output.get(),
            })
            .collect();
        ModelStatistics {
            name: self.labels.model.clone(),
            version: self.labels.version.clone(),
            last_inference: self.last_inference_ms.load(Ordering::Relaxed),
            inference_count: self.inference_count.load(Ordering::Relaxed),
            execution_count: self.execution_count.load(Ordering::Relaxed),
            inference_stats: InferStats {
                success: self.success.get(),
                fail: self.fail.get(),
                queue: self.queue.get(),
                compute_input: self.compute_input.get(),
                compute_infer: self.compute_infer.get(),
                compute_output: self.compute_output.get(),
            },
            batch_stats,
            shadow: None,
        }
    }
}

impl ExecutionObserver for ModelStats {
    fn on_execution(&self, t: &BatchTiming) {
        self.execution_count.fetch_add(1, Ordering::Relaxed);
        self.m_exec_count.inc();
        self.m_batch.observe(t.batch_size as f64);
        let mut table = self.batch_stats.lock();
        let entry = table.entry(t.batch_size).or_default();
        entry[0].add(t.compute_input);
        entry[1].add(t.compute_infer);
        entry[2].add(t.compute_output);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_requests_executions_and_metrics() {
        let metrics = Arc::new(Metrics::new());
        let stats = ModelStats::new("m", 3, Arc::clone(&metrics));
        stats.request_started();
        stats.on_execution(&BatchTiming {
            batch_size: 4,
            requests: 2,
            compute_input: Duration::from_micros(1),
            compute_infer: Duration::from_micros(10),
            compute_output: Duration::from_micros(2),
        });
        let timing = RequestTiming {
            queue: Duration::from_micros(5),
            compute_input: Duration::from_micros(1),
            compute_infer: Duration::from_micros(10),
            compute_output: Duration::from_micros(2),
            batch_size: 4,
        };
        stats.record_success(2, Duration::from_micros(30), &timing);
        stats.request_finished();
        stats.request_started();
        stats.record_failure(FailureReason::Rejected, Duration::from_micros(3));
        stats.request_finished();

        let s = stats.snapshot();
        assert_eq!((s.name.as_str(), s.version.as_str()), ("m", "3"));
        assert_eq!(s.inference_count, 2);
        assert_eq!(s.execution_count, 1);
        assert_eq!(s.inference_stats.success, StatDuration { count: 1, ns: 30_000 });
        assert_eq!(s.inference_stats.fail, StatDuration { count: 1, ns: 3_000 });
        assert_eq!(s.inference_stats.queue.ns, 5_000);
        assert_eq!(s.batch_stats.len(), 1);
        assert_eq!(s.batch_stats[0].batch_size, 4);
        assert_eq!(
            s.batch_stats[0].compute_infer,
            StatDuration { count: 1, ns: 10_000 }
        );
        assert!(s.last_inference > 0);

        let text = metrics.encode();
        assert!(
            text.contains(r#"oxserve_inference_request_success_total{model="m",version="3"} 1"#),
            "{text}"
        );
        assert!(text.contains(
            r#"oxserve_inference_request_failure_total{model="m",version="3",reason="REJECTED"} 1"#
        ));
        assert!(text.contains(r#"oxserve_inference_count_total{model="m",version="3"} 2"#));
        assert!(text.contains(r#"oxserve_inference_exec_count_total{model="m",version="3"} 1"#));
        assert!(text.contains(r#"oxserve_inference_pending_request_count{model="m",version="3"} 0"#));
        assert!(text.contains("oxserve_inference_batch_size_bucket"));
    }
}
