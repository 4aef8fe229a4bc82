//! A request id on every HTTP request and gRPC call: the caller's `x-request-id` when it sends
//! one, else a fresh one. It is echoed in the answer (HTTP header, gRPC response metadata) and
//! recorded on a tracing span around the request, so every log line written while serving it
//! carries the id, and a client can quote it when something went wrong.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue, Request};
use tower::layer::util::{Identity, Stack};
use tower::{Layer, Service, ServiceBuilder};
use tower_http::request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tracing::Instrument;
use tracing::instrument::Instrumented;

/// The header (and gRPC metadata key) carrying the id, as in Envoy, nginx and KServe's
/// ingress.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Fresh ids: a random per-process prefix and a counter, so ids are unique across restarts
/// and replicas without a syscall per request.
#[derive(Clone)]
pub struct NewRequestId {
    prefix: Arc<str>,
    next: Arc<AtomicU64>,
}

impl Default for NewRequestId {
    fn default() -> Self {
        NewRequestId {
            prefix: format!("{:08x}", rand::random::<u32>()).into(),
            next: Arc::new(AtomicU64::new(1)),
        }
    }
}

impl MakeRequestId for NewRequestId {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{}-{n:x}", self.prefix))
            .ok()
            .map(RequestId::new)
    }
}

fn request_span<B>(request: &Request<B>) -> tracing::Span {
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    // ERROR level only so the span exists whenever any log line is written: the level of a
    // span decides when it is recorded, not how the lines inside it are filtered.
    tracing::error_span!("request", id = %id)
}

/// Runs each request inside its [`request_span`]. Lighter than `tower_http::trace`, which
/// also wraps and re-enters the span for every frame of the response body.
#[derive(Clone, Copy, Default)]
pub struct RequestSpanLayer;

impl<S> Layer<S> for RequestSpanLayer {
    type Service = RequestSpan<S>;
    fn layer(&self, inner: S) -> RequestSpan<S> {
        RequestSpan { inner }
    }
}

#[derive(Clone)]
pub struct RequestSpan<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for RequestSpan<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let span = request_span(&request);
        let future = span.in_scope(|| self.inner.call(request));
        future.instrument(span)
    }
}

/// The layers, outermost first: assign the id, run inside the span, copy the id to the answer.
pub type RequestIdLayers =
    Stack<PropagateRequestIdLayer, Stack<RequestSpanLayer, Stack<SetRequestIdLayer<NewRequestId>, Identity>>>;

/// The request-id layers, for the HTTP router and the gRPC server alike.
pub fn request_id_layers() -> ServiceBuilder<RequestIdLayers> {
    ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(REQUEST_ID, NewRequestId::default()))
        .layer(RequestSpanLayer)
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
}
