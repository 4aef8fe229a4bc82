//! The Prometheus endpoint on its own port (Triton's `:8002/metrics`): the engine's metric
//! families plus the standard process metrics.
//!
//! The body is the Prometheus text format 0.0.4 (`text/plain; version=0.0.4`), which every
//! scraper reads; a scraper that asks for OpenMetrics in `Accept` (Prometheus itself does)
//! gets OpenMetrics text instead.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use oxserve_engine::Metrics;
use prometheus_client::encoding::{prometheus_text, text};
use prometheus_client::registry::Registry;

use crate::process::process_registry;

/// Content type of an OpenMetrics text answer.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

struct MetricsState {
    engine: Arc<Metrics>,
    process: Registry,
    /// The server's own families (authentication, rate limits).
    server: Registry,
    /// More Prometheus text, made at each scrape (TorchServe's `ts_*` families).
    extra: Option<ExtraMetrics>,
}

/// Metric families a protocol renders itself at scrape time, in Prometheus' text format.
#[derive(Clone)]
pub struct ExtraMetrics(pub Arc<dyn Fn() -> String + Send + Sync>);

impl std::fmt::Debug for ExtraMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExtraMetrics")
    }
}

/// `GET /metrics`; every other path is 404.
pub fn metrics_router(engine: Arc<Metrics>) -> Router {
    metrics_router_with(engine, Registry::default())
}

/// [`metrics_router`] that also exposes the families of `server`.
pub fn metrics_router_with(engine: Arc<Metrics>, server: Registry) -> Router {
    MetricsSource::new(engine, server, None)
        .router("/metrics")
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found: metrics are at /metrics\n") })
}

/// The metrics of the engine, the process and the server, for routers at any path (the
/// metrics port's `/metrics`, TF Serving's `--monitoring_config_file` path on its REST port).
#[derive(Clone)]
pub struct MetricsSource(Arc<MetricsState>);

impl MetricsSource {
    pub fn new(engine: Arc<Metrics>, server: Registry, extra: Option<ExtraMetrics>) -> Self {
        MetricsSource(Arc::new(MetricsState {
            engine,
            process: process_registry(),
            server,
            extra,
        }))
    }

    /// `GET path` answers the scrape.
    pub fn router(&self, path: &str) -> Router {
        Router::new()
            .route(path, get(scrape))
            .with_state(Arc::clone(&self.0))
    }
}

fn wants_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

/// The whole exposition in the chosen format, and its content type.
fn encode(state: &MetricsState, openmetrics: bool) -> Result<(String, &'static str), std::fmt::Error> {
    let mut body = String::with_capacity(16 * 1024);
    if openmetrics {
        text::encode_registry(&mut body, state.engine.registry())?;
        text::encode_registry(&mut body, &state.process)?;
        text::encode_registry(&mut body, &state.server)?;
        if let Some(extra) = &state.extra {
            body.push_str(&(extra.0)());
        }
        text::encode_eof(&mut body)?;
        Ok((body, OPENMETRICS_CONTENT_TYPE))
    } else {
        prometheus_text::encode(&mut body, state.engine.registry())?;
        prometheus_text::encode(&mut body, &state.process)?;
        prometheus_text::encode(&mut body, &state.server)?;
        if let Some(extra) = &state.extra {
            body.push_str(&(extra.0)());
        }
        Ok((body, prometheus_text::CONTENT_TYPE))
    }
}

async fn scrape(State(state): State<Arc<MetricsState>>, headers: HeaderMap) -> Response {
    match encode(&state, wants_openmetrics(&headers)) {
        Ok((body, content_type)) => ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        Err(_) => {
            tracing::error!("cannot encode the metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the metrics\n").into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> MetricsState {
        MetricsState {
            engine: Arc::new(Metrics::new()),
            process: process_registry(),
            server: Registry::default(),
            extra: Some(ExtraMetrics(Arc::new(|| {
                "# TYPE ts_x counter\nts_x 1\n".to_string()
            }))),
        }
    }

    // The engine's families appear once a model version exists (the end-to-end tests scrape
    // them); an empty engine registry still yields a valid exposition.
    #[test]
    fn prometheus_text_by_default() {
        let (body, content_type) = encode(&state(), false).expect("encodes");
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        if cfg!(target_os = "linux") {
            assert!(
                body.contains("# TYPE process_cpu_seconds_total counter\n"),
                "{body}"
            );
            assert!(body.contains("\nprocess_resident_memory_bytes "), "{body}");
            assert!(body.contains("\nprocess_open_fds "), "{body}");
        }
        assert!(!body.contains("# EOF"));
        assert!(body.ends_with("ts_x 1\n"), "extra families come last");
    }

    #[test]
    fn openmetrics_when_asked() {
        let mut headers = HeaderMap::new();
        assert!(!wants_openmetrics(&headers));
        headers.insert(header::ACCEPT, "text/plain".parse().expect("valid header"));
        assert!(!wants_openmetrics(&headers));
        headers.insert(
            header::ACCEPT,
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
                .parse()
                .expect("valid header"),
        );
        assert!(wants_openmetrics(&headers));
        let (body, content_type) = encode(&state(), true).expect("encodes");
        assert_eq!(content_type, OPENMETRICS_CONTENT_TYPE);
        if cfg!(target_os = "linux") {
            assert!(body.contains("# TYPE process_cpu_seconds counter\n"), "{body}");
        }
        // Exactly one EOF marker, at the end, after both registries.
        assert!(body.ends_with("# EOF\n"));
        assert_eq!(body.matches("# EOF").count(), 1);
    }
}
