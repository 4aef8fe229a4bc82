//! The trace extension's OpenTelemetry mode: each traced request becomes Triton's spans,
//! `InferRequest` (the protocol's timestamps as events) → `<model name>` (request and queue
//! events, the model's attributes) → `compute` (the compute events), exported over OTLP/HTTP
//! by the SDK's batch span processor. A client's W3C `traceparent` parents the root span.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span as _, SpanKind, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider};
use oxserve_core::{TraceEvent, TraceRecord, unix_nanos};

/// `--trace-config opentelemetry,<key>=<value>` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct OtelConfig {
    /// The OTLP/HTTP traces endpoint (a URL without a scheme is taken as `http://`).
    pub url: String,
    /// Resource attributes over `service.name=triton-inference-server`.
    pub resource: Vec<(String, String)>,
    pub max_queue_size: usize,
    pub schedule_delay: Duration,
    pub max_export_batch_size: usize,
}

impl Default for OtelConfig {
    fn default() -> Self {
        OtelConfig {
            url: "http://localhost:4318/v1/traces".into(),
            resource: Vec::new(),
            max_queue_size: 2048,
            schedule_delay: Duration::from_millis(5000),
            max_export_batch_size: 512,
        }
    }
}

pub(crate) struct Exporter {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Exporter {
    pub fn start(config: &OtelConfig) -> Result<Self, String> {
        let url = if config.url.contains("://") {
            config.url.clone()
        } else {
            format!("http://{}", config.url)
        };
        let exporter = SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url.clone())
            .build()
            .map_err(|e| format!("cannot create the OTLP exporter for {url}: {e}"))?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(config.max_queue_size.max(1))
            .with_scheduled_delay(config.schedule_delay)
            .with_max_export_batch_size(config.max_export_batch_size.max(1))
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch)
            .build();
        let mut resource = vec![KeyValue::new("service.name", "triton-inference-server")];
        for (key, value) in &config.resource {
            resource.retain(|kv| kv.key.as_str() != key);
            resource.push(KeyValue::new(key.clone(), value.clone()));
        }
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(Resource::builder_empty().with_attributes(resource).build())
            .build();
        let tracer = provider.tracer("triton-server");
        Ok(Exporter { provider, tracer })
    }

    /// Turns a finished trace into spans (ended at once, with their recorded times).
    pub fn export(&self, record: TraceRecord) {
        let time = |at| UNIX_EPOCH + Duration::from_nanos(unix_nanos(at));
        let stamps: Vec<(&'static str, SystemTime)> = record
            .events
            .iter()
            .filter_map(|e| match e {
                TraceEvent::Timestamp { name, at } => Some((*name, time(*at))),
                TraceEvent::Tensor { .. } => None,
            })
            .collect();
        let Some(first) = stamps.iter().map(|(_, t)| *t).min() else {
            return;
        };
        let last = stamps.iter().map(|(_, t)| *t).max().unwrap_or(first);
        let at = |name: &str| stamps.iter().find(|(n, _)| *n == name).map(|(_, t)| *t);
        let parent = record.traceparent.as_deref().map(extract).unwrap_or_default();

        let mut root = self.tracer.build_with_context(
            self.tracer
                .span_builder("InferRequest")
                .with_kind(SpanKind::Server)
                .with_start_time(first),
            &parent,
        );
        for (name, t) in &stamps {
            if name.starts_with("HTTP_") || name.starts_with("GRPC_") || *name == "INFER_RESPONSE_COMPLETE" {
                root.add_event_with_timestamp(*name, *t, Vec::new());
            }
        }
        let root_cx = parent.with_span(root);

        let mut attributes = vec![
            KeyValue::new("triton.model_name", record.model_name.clone()),
            KeyValue::new("triton.model_version", record.model_version),
            KeyValue::new("triton.trace_id", i64::try_from(record.id).unwrap_or(i64::MAX)),
            KeyValue::new("triton.trace_parent_id", 0i64),
        ];
        if let Some(id) = &record.request_id {
            attributes.push(KeyValue::new("triton.request_id", id.clone()));
        }
        let model_start = at("REQUEST_START").unwrap_or(first);
        let mut model = self.tracer.build_with_context(
            self.tracer
                .span_builder(record.model_name.clone())
                .with_kind(SpanKind::Server)
                .with_start_time(model_start)
                .with_attributes(attributes),
            &root_cx,
        );
        for name in ["REQUEST_START", "QUEUE_START", "REQUEST_END"] {
            if let Some(t) = at(name) {
                model.add_event_with_timestamp(name, t, Vec::new());
            }
        }
        let model_cx = root_cx.with_span(model);
        if let Some(start) = at("COMPUTE_START") {
            let mut compute = self.tracer.build_with_context(
                self.tracer
                    .span_builder("compute")
                    .with_kind(SpanKind::Server)
                    .with_start_time(start),
                &model_cx,
            );
            for name in [
                "COMPUTE_START",
                "COMPUTE_INPUT_END",
                "COMPUTE_OUTPUT_START",
                "COMPUTE_END",
            ] {
                if let Some(t) = at(name) {
                    compute.add_event_with_timestamp(name, t, Vec::new());
                }
            }
            compute.end_with_timestamp(at("COMPUTE_END").unwrap_or(start));
        }
        model_cx
            .span()
            .end_with_timestamp(at("REQUEST_END").unwrap_or(last));
        root_cx.span().end_with_timestamp(last);
    }

    /// Exports what is queued (the server stops).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "OpenTelemetry export at shutdown failed");
        }
    }
}

/// The parent context a W3C `traceparent` header carries.
fn extract(traceparent: &str) -> Context {
    let carrier: HashMap<String, String> =
        HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    TraceContextPropagator::new().extract(&carrier)
}

/// Whether a `traceparent` header value is a valid W3C trace context.
pub(crate) fn valid_traceparent(traceparent: &str) -> bool {
    extract(traceparent).span().span_context().is_valid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_headers_are_checked_as_w3c_contexts() {
        assert!(valid_traceparent(
            "00-0af7651916cd43dd8448eb211c12666c-b7ad6b7169242424-01"
        ));
        assert!(!valid_traceparent(
            "00-00000000000000000000000000000000-b7ad6b7169242424-01"
        ));
        assert!(!valid_traceparent("garbage"));
    }
}
