//! The trace of one request (Triton's trace extension): when each stage of the request began
//! and ended and, at the TENSORS level, its input and output tensors. The front-end that
//! received the request creates it when the server's trace settings sample the request; every
//! stage adds to it; when the last holder lets go, the record goes to its sink (the trace
//! file, or an OpenTelemetry exporter).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::Tensor;

/// One thing that happened to a traced request.
#[derive(Debug, Clone)]
pub enum TraceEvent {
    /// Triton's timestamp names (`REQUEST_START`, `COMPUTE_END`, `HTTP_RECV_START`, ...).
    Timestamp { name: &'static str, at: Instant },
    /// `TENSOR_QUEUE_INPUT` / `TENSOR_BACKEND_OUTPUT` with the tensor (TENSORS level).
    Tensor { activity: &'static str, tensor: Tensor },
}

/// What a finished trace hands its sink.
#[derive(Debug, Clone, Default)]
pub struct TraceRecord {
    /// Triton's trace id: unique in the process, from 1.
    pub id: u64,
    pub model_name: String,
    /// -1 until the request reached a model version.
    pub model_version: i64,
    pub request_id: Option<String>,
    /// The client's W3C `traceparent`, when it sent one.
    pub traceparent: Option<String>,
    /// In the order they were recorded.
    pub events: Vec<TraceEvent>,
}

/// Where finished traces go.
pub trait TraceSink: Send + Sync {
    fn finish(&self, record: TraceRecord);
}

/// A request's trace while the request runs; shared by the stages that add to it.
pub struct Trace {
    tensors: bool,
    record: Mutex<TraceRecord>,
    sink: Arc<dyn TraceSink>,
}

impl std::fmt::Debug for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trace")
            .field("tensors", &self.tensors)
            .finish_non_exhaustive()
    }
}

impl Trace {
    /// A trace of the request for `model_name`; `tensors`: record tensors too.
    pub fn new(
        id: u64,
        model_name: &str,
        tensors: bool,
        traceparent: Option<String>,
        sink: Arc<dyn TraceSink>,
    ) -> Self {
        Trace {
            tensors,
            record: Mutex::new(TraceRecord {
                id,
                model_name: model_name.to_string(),
                model_version: -1,
                traceparent,
                ..TraceRecord::default()
            }),
            sink,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut TraceRecord) -> R) -> R {
        // A poisoned lock only means another stage panicked mid-push: the record is still a
        // list of events.
        let mut record = self
            .record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut record)
    }

    pub fn timestamp(&self, name: &'static str) {
        self.timestamp_at(name, Instant::now());
    }

    pub fn timestamp_at(&self, name: &'static str, at: Instant) {
        self.with(|r| r.events.push(TraceEvent::Timestamp { name, at }));
    }

    /// Whether tensors are recorded (the TENSORS level).
    pub fn records_tensors(&self) -> bool {
        self.tensors
    }

    pub fn tensor(&self, activity: &'static str, tensor: &Tensor) {
        if self.tensors {
            self.with(|r| {
                r.events.push(TraceEvent::Tensor {
                    activity,
                    tensor: tensor.clone(),
                })
            });
        }
    }

    /// The version that runs the request, and the client's request id.
    pub fn set_request(&self, model_version: u64, request_id: Option<&str>) {
        self.with(|r| {
            r.model_version = i64::try_from(model_version).unwrap_or(i64::MAX);
            r.request_id = request_id.filter(|id| !id.is_empty()).map(str::to_string);
        });
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        let record = std::mem::take(
            self.record
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        self.sink.finish(record);
    }
}

/// Nanoseconds since the Unix epoch of an instant, on a clock that never goes backwards
/// within the process (instants are placed on the wall clock once, at the first call).
pub fn unix_nanos(at: Instant) -> u64 {
    static BASE: OnceLock<(Instant, u128)> = OnceLock::new();
    let (base_instant, base_nanos) = *BASE.get_or_init(|| {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        (Instant::now(), now)
    });
    let nanos = if at >= base_instant {
        base_nanos + at.duration_since(base_instant).as_nanos()
    } else {
        base_nanos.saturating_sub(base_instant.duration_since(at).as_nanos())
    };
    u64::try_from(nanos).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Keep(Mutex<Vec<TraceRecord>>);
    impl TraceSink for Keep {
        fn finish(&self, record: TraceRecord) {
            self.0.lock().unwrap().push(record);
        }
    }

    #[test]
    fn the_record_reaches_the_sink_when_the_last_holder_lets_go() {
        let sink = Arc::new(Keep(Mutex::new(Vec::new())));
        let trace = Arc::new(Trace::new(7, "m", false, None, sink.clone()));
        let other = Arc::clone(&trace);
        trace.timestamp("REQUEST_START");
        other.set_request(3, Some("r1"));
        other.tensor(
            "TENSOR_QUEUE_INPUT",
            &Tensor::from_raw("x", crate::DataType::U8, vec![1], vec![1u8]),
        );
        drop(trace);
        assert!(sink.0.lock().unwrap().is_empty());
        drop(other);
        let records = sink.0.lock().unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!((records[0].id, records[0].model_version), (7, 3));
        assert_eq!(records[0].request_id.as_deref(), Some("r1"));
        // Tensors only at the TENSORS level.
        assert_eq!(records[0].events.len(), 1);
    }

    #[test]
    fn unix_nanos_keep_the_order_of_instants() {
        let a = Instant::now();
        let b = a + std::time::Duration::from_micros(5);
        assert_eq!(unix_nanos(b) - unix_nanos(a), 5_000);
    }
}
