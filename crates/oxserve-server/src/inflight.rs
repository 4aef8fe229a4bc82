//! The in-flight byte budget: one server-wide bound on the memory that requests hold before
//! and while they are served, so that no set of clients can exhaust it.
//!
//! A request takes permits from one weighted semaphore (one permit per byte) before its body
//! is read: the whole Content-Length up front when the header is there, else frame by frame
//! as the body arrives (chunked HTTP/1.1, HTTP/2 streams, gRPC). What reading and decoding
//! add is charged too: decompressed bytes as they are inflated (through the
//! [`BodyCharge`] the layer puts in scope for the handler), and a decoding weight per body
//! byte ([`JSON_WEIGHT`], [`GRPC_WEIGHT`]). The permits are held until the response has been
//! produced — so requests waiting in a model's queue still count — and released when the
//! request ends in any way: answered, failed, or dropped because the client went away.
//!
//! Over budget the request is refused at once, never queued: 429 with `Retry-After` over
//! HTTP, RESOURCE_EXHAUSTED over gRPC, the message naming `--max-inflight-bytes`. A request
//! that alone needs more than the whole budget can never fit and gets 413 /
//! RESOURCE_EXHAUSTED saying so.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use axum::response::IntoResponse;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use oxserve_core::{Error, ErrorKind};
use oxserve_kserve::http::{ApiError, BodyCharge, INFERENCE_HEADER_CONTENT_LENGTH, with_body_charge};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tower::{Layer, Service};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Memory per byte of a JSON body (or of the JSON part of a binary-extension body) while it
/// is served: the body itself plus the typed tensors decoded from it. The worst numeric case
/// is `0,` (2 bytes) becoming an 8-byte INT64/UINT64/FP64 element: 1 + 4 = 5; measured on the
/// real server (BENCHMARKS.md, "Memory under a flood"). BYTES elements cost a fixed overhead
/// each, which the per-request BYTES element limit bounds instead.
pub const JSON_WEIGHT: usize = 5;
/// Memory per byte of a gRPC request: the HTTP/2 frames, tonic's contiguous copy of the
/// message, and the decoded message (typed `*_contents` copied once more into the tensor).
pub const GRPC_WEIGHT: usize = 3;
/// Deflate (gzip, zlib) cannot expand data more than 1032-fold, so a compressed gRPC
/// message's decompressed size is bounded by this times its compressed size.
const DEFLATE_MAX_RATIO: usize = 1032;

/// The default budget when `--max-inflight-bytes` is not given: a quarter of the memory this
/// process may use (the cgroup limit in a container, else physical memory), at least
/// [`MIN_DEFAULT_BUDGET`] so that a body of the default 64 MiB limit fits even as JSON, at
/// most [`MAX_DEFAULT_BUDGET`].
pub fn default_budget_bytes() -> usize {
    let quarter = usable_memory_bytes().map_or(MIN_DEFAULT_BUDGET, |m| (m / 4) as usize);
    quarter.clamp(MIN_DEFAULT_BUDGET, MAX_DEFAULT_BUDGET)
}

/// Floor of the default budget: 5 × 64 MiB (one JSON body at the default size limit) + 64 MiB.
pub const MIN_DEFAULT_BUDGET: usize = 384 << 20;
/// Cap of the default budget.
pub const MAX_DEFAULT_BUDGET: usize = 16 << 30;

/// The smaller of physical memory and the cgroup (v2, else v1) memory limit.
fn usable_memory_bytes() -> Option<u64> {
    let physical = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    });
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|path| std::fs::read_to_string(path).ok()?.trim().parse::<u64>().ok());
    match (physical, cgroup) {
        (Some(p), Some(c)) => Some(p.min(c)),
        (p, c) => p.or(c),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectedLabels {
    protocol: &'static str,
    /// `busy`: the budget was full; `too_large`: the request alone exceeds the whole budget.
    reason: &'static str,
}

struct BudgetInner {
    semaphore: Arc<Semaphore>,
    limit: usize,
    in_flight: Gauge<i64, AtomicI64>,
    rejected: Family<RejectedLabels, Counter>,
}

/// The server-wide budget; clone it freely (one shared semaphore).
#[derive(Clone)]
pub struct InflightBudget {
    inner: Arc<BudgetInner>,
}

impl InflightBudget {
    /// A budget of `limit` bytes (at least 1).
    pub fn new(limit: usize) -> Self {
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        InflightBudget {
            inner: Arc::new(BudgetInner {
                semaphore: Arc::new(Semaphore::new(limit)),
                limit,
                in_flight: Gauge::default(),
                rejected: Family::default(),
            }),
        }
    }

    pub fn limit(&self) -> usize {
        self.inner.limit
    }

    /// Bytes charged now.
    pub fn in_flight(&self) -> usize {
        self.inner.limit - self.inner.semaphore.available_permits()
    }

    /// Adds `inflight_bytes`, `inflight_bytes_limit` and
    /// `inflight_rejected_total{protocol,reason}` to `registry` (the server's registry, which
    /// prefixes them with `oxserve_`).
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "inflight_bytes",
            "Request bytes in flight, as charged against --max-inflight-bytes",
            self.inner.in_flight.clone(),
        );
        let limit: Gauge<i64, AtomicI64> = Gauge::default();
        limit.set(i64::try_from(self.inner.limit).unwrap_or(i64::MAX));
        registry.register(
            "inflight_bytes_limit",
            "The in-flight byte budget (--max-inflight-bytes)",
            limit,
        );
        registry.register(
            "inflight_rejected",
            "Requests refused because the in-flight byte budget was exhausted (busy) or smaller than the request (too_large)",
            self.inner.rejected.clone(),
        );
    }

    /// The layer for the HTTP router; `max_body_bytes` is the body size limit, above which a
    /// declared Content-Length is left to the handler's 413 instead of being charged.
    pub fn http_layer(&self, max_body_bytes: usize) -> InflightLayer<Http> {
        InflightLayer {
            budget: self.inner.clone(),
            protocol: Http { max_body_bytes },
        }
    }

    /// The layer for the tonic server; `max_message_bytes` bounds a compressed message's
    /// decompressed size.
    pub fn grpc_layer(&self, max_message_bytes: usize) -> InflightLayer<Grpc> {
        InflightLayer {
            budget: self.inner.clone(),
            protocol: Grpc { max_message_bytes },
        }
    }
}

/// Why a charge was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Other requests hold the budget now; retrying later can succeed.
    Busy,
    /// This request alone needs `needed` bytes, more than the whole budget.
    TooLarge { needed: usize },
}

impl Refusal {
    fn error(self, limit: usize) -> Error {
        match self {
            Refusal::Busy => Error::new(
                ErrorKind::Overloaded,
                format!(
                    "too many request bytes in flight: the server's in-flight budget of {limit} bytes (--max-inflight-bytes) is in use; retry later"
                ),
            ),
            Refusal::TooLarge { needed } => Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "the request needs about {needed} bytes of memory in flight, more than the server's whole in-flight budget of {limit} bytes (--max-inflight-bytes)"
                ),
            ),
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Refusal::Busy => "busy",
            Refusal::TooLarge { .. } => "too_large",
        }
    }
}

/// How a request's bytes are priced: the first `head_len` bytes of its (decoded) body at
/// `head_weight` bytes of memory each, the rest at 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pricing {
    head_len: usize,
    head_weight: usize,
}

impl Pricing {
    /// The cost of `len` bytes starting at offset `from`.
    fn cost(self, from: usize, len: usize) -> usize {
        let head = len.min(self.head_len.saturating_sub(from));
        head.saturating_mul(self.head_weight).saturating_add(len - head)
    }
}

/// What the body's frames turn into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The frames are the body: priced as they arrive.
    Plain,
    /// HTTP Content-Encoding: frames cost 1 each; the handler's body reader charges the
    /// decompressed bytes through [`BodyCharge`].
    Inflated,
    /// gRPC message compression, decompressed inside tonic where nothing can charge it: each
    /// frame also charges the most it can decompress to (the deflate ratio), up to `cap`.
    Bounded { cap: usize },
}

#[derive(Default)]
struct TicketState {
    permit: Option<OwnedSemaphorePermit>,
    /// Bytes charged (and held) by this request.
    held: usize,
    /// Bytes charged up front from Content-Length, not yet used up by frames.
    prepaid: usize,
    /// Body frame bytes seen.
    raw_seen: usize,
    /// Decompressed bytes charged (Inflated) or their charged bound (Bounded).
    decoded_seen: usize,
}

/// One request's share of the budget. Released when the last holder (the layer's future, the
/// body) drops it.
pub struct Ticket {
    budget: Arc<BudgetInner>,
    protocol: &'static str,
    pricing: Pricing,
    encoding: Encoding,
    state: Mutex<TicketState>,
}

impl Ticket {
    fn state(&self) -> std::sync::MutexGuard<'_, TicketState> {
        // The lock guards plain counters, consistent at every unlock.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `bytes` more permits, without waiting.
    fn acquire(&self, state: &mut TicketState, bytes: usize) -> Result<(), Refusal> {
        if bytes == 0 {
            return Ok(());
        }
        let needed = state.held.saturating_add(bytes);
        let refused = |refusal: Refusal| {
            self.budget
                .rejected
                .get_or_create(&RejectedLabels {
                    protocol: self.protocol,
                    reason: refusal.reason(),
                })
                .inc();
            refusal
        };
        if needed > self.budget.limit {
            return Err(refused(Refusal::TooLarge { needed }));
        }
        // `needed` fits the budget and so `usize`; the semaphore takes at most u32::MAX
        // permits per call.
        let mut taken: Option<OwnedSemaphorePermit> = None;
        let mut left = bytes;
        while left > 0 {
            let step = left.min(u32::MAX as usize);
            match self.budget.semaphore.clone().try_acquire_many_owned(step as u32) {
                Ok(p) => match &mut taken {
                    Some(t) => t.merge(p),
                    None => taken = Some(p),
                },
                // Dropping `taken` returns what was taken so far.
                Err(TryAcquireError::NoPermits | TryAcquireError::Closed) => {
                    return Err(refused(Refusal::Busy));
                }
            }
            left -= step;
        }
        if let Some(t) = taken {
            match &mut state.permit {
                Some(p) => p.merge(t),
                None => state.permit = Some(t),
            }
        }
        state.held = needed;
        self.budget.in_flight.inc_by(bytes as i64);
        Ok(())
    }

    /// Charges the declared Content-Length before any of the body is read.
    fn prepay(&self, content_length: usize) -> Result<(), Refusal> {
        let cost = match self.encoding {
            Encoding::Plain => self.pricing.cost(0, content_length),
            Encoding::Inflated | Encoding::Bounded { .. } => content_length,
        };
        let mut state = self.state();
        self.acquire(&mut state, cost)?;
        state.prepaid = cost;
        Ok(())
    }

    /// Charges a body frame of `len` bytes.
    fn charge_frame(&self, len: usize) -> Result<(), Refusal> {
        let mut state = self.state();
        let mut cost = match self.encoding {
            Encoding::Plain => self.pricing.cost(state.raw_seen, len),
            Encoding::Inflated => len,
            Encoding::Bounded { cap } => {
                let bound = state
                    .raw_seen
                    .saturating_add(len)
                    .saturating_mul(DEFLATE_MAX_RATIO)
                    .min(cap);
                let extra = bound.saturating_sub(state.decoded_seen);
                let decoded = self.pricing.cost(state.decoded_seen, extra);
                state.decoded_seen += extra;
                len.saturating_add(decoded)
            }
        };
        state.raw_seen = state.raw_seen.saturating_add(len);
        let from_prepaid = cost.min(state.prepaid);
        state.prepaid -= from_prepaid;
        cost -= from_prepaid;
        self.acquire(&mut state, cost)
    }

    fn charge_decoded(&self, len: usize) -> Result<(), Refusal> {
        let mut state = self.state();
        let cost = self.pricing.cost(state.decoded_seen, len);
        state.decoded_seen = state.decoded_seen.saturating_add(len);
        self.acquire(&mut state, cost)
    }

    fn charge_copy(&self, len: usize) -> Result<(), Refusal> {
        let mut state = self.state();
        self.acquire(&mut state, len)
    }

    /// Gives back what `wire_bytes` of a streamed message were charged (priced as frames at
    /// the start of a body), once the message has been answered.
    fn release(&self, wire_bytes: usize) {
        let mut state = self.state();
        let cost = self.pricing.cost(0, wire_bytes).min(state.held);
        if cost == 0 {
            return;
        }
        if let Some(permit) = &mut state.permit {
            // Dropping the split part returns its permits to the semaphore.
            let mut left = cost;
            while left > 0 {
                let step = left.min(u32::MAX as usize);
                drop(permit.split(step));
                left -= step;
            }
        }
        state.held -= cost;
        self.budget.in_flight.dec_by(cost as i64);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // The permit returns to the semaphore as the state drops.
        let held = self.state().held;
        self.budget.in_flight.dec_by(held as i64);
    }
}

/// The handler's body reader charges decompression and joined copies through this.
struct HandlerCharge(Arc<Ticket>);

impl BodyCharge for HandlerCharge {
    fn charge_decoded(&self, bytes: usize) -> oxserve_core::Result<()> {
        self.0
            .charge_decoded(bytes)
            .map_err(|r| r.error(self.0.budget.limit))
    }

    fn charge_copy(&self, bytes: usize) -> oxserve_core::Result<()> {
        self.0
            .charge_copy(bytes)
            .map_err(|r| r.error(self.0.budget.limit))
    }

    fn release_message(&self, wire_bytes: usize) {
        self.0.release(wire_bytes);
    }
}

/// What differs between the HTTP router and the tonic server.
pub trait Protocol: Clone + Send + Sync + 'static {
    type ReqBody: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static;
    type ResBody;
    const NAME: &'static str;
    /// How the request's bytes are priced, and what its frames turn into.
    fn pricing(&self, headers: &HeaderMap) -> (Pricing, Encoding);
    /// Content-Length bodies larger than this are not charged up front (the handler refuses
    /// them without reading).
    fn max_prepaid(&self) -> usize;
    fn wrap(body: ChargedBody<Self::ReqBody>) -> Self::ReqBody;
    /// The error a charged body yields when a frame is refused.
    fn body_error(error: Error) -> BoxError;
    /// The answer to a request refused before its body was read.
    fn reject(error: Error) -> Response<Self::ResBody>;
    /// Runs the handler with what it needs to charge decoding.
    fn scope<F: Future + Send>(ticket: Arc<Ticket>, future: F) -> impl Future<Output = F::Output> + Send;
}

/// KServe (and later TF Serving, TorchServe) HTTP on axum.
#[derive(Clone, Copy)]
pub struct Http {
    max_body_bytes: usize,
}

impl Protocol for Http {
    type ReqBody = axum::body::Body;
    type ResBody = axum::body::Body;
    const NAME: &'static str = "http";

    fn pricing(&self, headers: &HeaderMap) -> (Pricing, Encoding) {
        // A binary-extension body: the JSON header part decodes, the binary part is sliced.
        let head_len = headers
            .get(INFERENCE_HEADER_CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.trim().parse::<usize>().ok())
            .unwrap_or(usize::MAX);
        let pricing = Pricing {
            head_len,
            head_weight: JSON_WEIGHT,
        };
        let encoding = match headers
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
        {
            Some(e) if !e.trim().is_empty() && !e.trim().eq_ignore_ascii_case("identity") => {
                Encoding::Inflated
            }
            _ => Encoding::Plain,
        };
        (pricing, encoding)
    }

    fn max_prepaid(&self) -> usize {
        self.max_body_bytes
    }

    fn wrap(body: ChargedBody<Self::ReqBody>) -> Self::ReqBody {
        axum::body::Body::new(body)
    }

    fn body_error(error: Error) -> BoxError {
        Box::new(error)
    }

    fn reject(error: Error) -> Response<Self::ResBody> {
        ApiError(error).into_response()
    }

    fn scope<F: Future + Send>(ticket: Arc<Ticket>, future: F) -> impl Future<Output = F::Output> + Send {
        with_body_charge(Arc::new(HandlerCharge(ticket)), future)
    }
}

/// KServe gRPC on tonic.
#[derive(Clone, Copy)]
pub struct Grpc {
    max_message_bytes: usize,
}

impl Protocol for Grpc {
    type ReqBody = tonic::body::Body;
    type ResBody = tonic::body::Body;
    const NAME: &'static str = "grpc";

    fn pricing(&self, headers: &HeaderMap) -> (Pricing, Encoding) {
        let pricing = Pricing {
            head_len: usize::MAX,
            head_weight: GRPC_WEIGHT,
        };
        let encoding = match headers.get("grpc-encoding").and_then(|v| v.to_str().ok()) {
            Some(e) if !e.trim().eq_ignore_ascii_case("identity") => Encoding::Bounded {
                cap: self.max_message_bytes,
            },
            _ => Encoding::Plain,
        };
        (pricing, encoding)
    }

    fn max_prepaid(&self) -> usize {
        self.max_message_bytes.saturating_add(5)
    }

    fn wrap(body: ChargedBody<Self::ReqBody>) -> Self::ReqBody {
        tonic::body::Body::new(body)
    }

    fn body_error(error: Error) -> BoxError {
        Box::new(tonic::Status::resource_exhausted(error.message()))
    }

    fn reject(error: Error) -> Response<Self::ResBody> {
        tonic::Status::resource_exhausted(error.message()).into_http()
    }

    fn scope<F: Future + Send>(ticket: Arc<Ticket>, future: F) -> impl Future<Output = F::Output> + Send {
        // tonic decompresses and decodes inside, where nothing charges; the scope is for
        // streams, which give back each answered message's share (BodyCharge::release_message).
        with_body_charge(Arc::new(HandlerCharge(ticket)), future)
    }
}

/// A request body whose frames are charged as they arrive.
pub struct ChargedBody<B> {
    inner: B,
    ticket: Arc<Ticket>,
    refused: Option<Refusal>,
    error: fn(Error) -> BoxError,
}

impl<B> Body for ChargedBody<B>
where
    B: Body<Data = Bytes, Error: Into<BoxError>> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(refusal) = self.refused {
            return Poll::Ready(Some(Err((self.error)(refusal.error(self.ticket.budget.limit)))));
        }
        let frame = match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            None => return Poll::Ready(None),
            Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            Some(Ok(frame)) => frame,
        };
        if let Some(data) = frame.data_ref()
            && let Err(refusal) = self.ticket.charge_frame(data.len())
        {
            // Stop here: the frame is dropped, and the handler answers with the error.
            self.refused = Some(refusal);
            return Poll::Ready(Some(Err((self.error)(refusal.error(self.ticket.budget.limit)))));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.refused.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The tower layer; build it with [`InflightBudget::http_layer`] or
/// [`InflightBudget::grpc_layer`].
#[derive(Clone)]
pub struct InflightLayer<P> {
    budget: Arc<BudgetInner>,
    protocol: P,
}

impl<S, P: Clone> Layer<S> for InflightLayer<P> {
    type Service = InflightService<S, P>;
    fn layer(&self, inner: S) -> Self::Service {
        InflightService {
            inner,
            budget: self.budget.clone(),
            protocol: self.protocol.clone(),
        }
    }
}

#[derive(Clone)]
pub struct InflightService<S, P> {
    inner: S,
    budget: Arc<BudgetInner>,
    protocol: P,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, P> Service<Request<P::ReqBody>> for InflightService<S, P>
where
    P: Protocol,
    S: Service<Request<P::ReqBody>, Response = Response<P::ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    P::ResBody: Send + 'static,
{
    type Response = Response<P::ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<P::ReqBody>) -> Self::Future {
        let (pricing, encoding) = self.protocol.pricing(request.headers());
        let ticket = Arc::new(Ticket {
            budget: self.budget.clone(),
            protocol: P::NAME,
            pricing,
            encoding,
            state: Mutex::new(TicketState::default()),
        });
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .filter(|&len| len <= self.protocol.max_prepaid());
        if let Some(len) = declared
            && let Err(refusal) = ticket.prepay(len)
        {
            let response = P::reject(refusal.error(self.budget.limit));
            return Box::pin(std::future::ready(Ok(response)));
        }
        let request = request.map(|body| {
            P::wrap(ChargedBody {
                inner: body,
                ticket: ticket.clone(),
                refused: None,
                error: P::body_error,
            })
        });
        // The clone that was polled ready serves this request (tower's usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let future = P::scope(ticket.clone(), inner.call(request));
        Box::pin(async move {
            let response = future.await;
            // The answer exists: this request's bytes are no longer in flight (the body,
            // dropped with the handler, held the other reference).
            drop(ticket);
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body as AxumBody;
    use axum::routing::post;
    use http::StatusCode;
    use http_body_util::BodyExt;
    use std::io::Write;
    use tower::ServiceExt;

    const LIMIT: usize = 1000;

    /// An app whose handler reads the body with the KServe body reader and reports the budget
    /// in use while it holds the body.
    fn app(budget: &InflightBudget) -> Router {
        let seen = budget.clone();
        Router::new()
            .route(
                "/read",
                post(move |headers: HeaderMap, body: AxumBody| {
                    let seen = seen.clone();
                    async move {
                        match oxserve_kserve::http::read_body(&headers, body, 1 << 20).await {
                            Ok(b) => format!("{} {}", b.len(), seen.in_flight()).into_response(),
                            Err(e) => ApiError(e).into_response(),
                        }
                    }
                }),
            )
            .route("/fail", post(|| async { StatusCode::INTERNAL_SERVER_ERROR }))
            .route("/never", post(std::future::pending::<StatusCode>))
            .layer(budget.http_layer(1 << 20))
    }

    async fn text(response: Response<AxumBody>) -> (StatusCode, String) {
        let status = response.status();
        let body = response.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn with_length(path: &str, bytes: Vec<u8>, binary_header: bool) -> Request<AxumBody> {
        let mut b = Request::post(path).header(header::CONTENT_LENGTH, bytes.len());
        if binary_header {
            b = b.header(INFERENCE_HEADER_CONTENT_LENGTH, "0");
        }
        b.body(AxumBody::from(bytes)).expect("request")
    }

    /// A body of `chunks` frames without a Content-Length (as chunked HTTP/1.1 or HTTP/2).
    fn streamed(path: &str, chunks: Vec<Vec<u8>>, binary_header: bool) -> Request<AxumBody> {
        let stream = futures_stream(chunks);
        let mut b = Request::post(path);
        if binary_header {
            b = b.header(INFERENCE_HEADER_CONTENT_LENGTH, "0");
        }
        b.body(AxumBody::new(stream)).expect("request")
    }

    type FrameStream =
        futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>>;

    fn futures_stream(chunks: Vec<Vec<u8>>) -> http_body_util::StreamBody<FrameStream> {
        let frames: Vec<_> = chunks
            .into_iter()
            .map(|c| Ok(Frame::data(Bytes::from(c))))
            .collect();
        http_body_util::StreamBody::new(futures::stream::iter(frames))
    }

    #[tokio::test]
    async fn content_length_is_charged_before_reading_and_released_after() {
        let budget = InflightBudget::new(LIMIT);
        // Binary body (weight 1): 600 bytes charged while the handler runs, none after.
        let r = app(&budget)
            .oneshot(with_length("/read", vec![b'x'; 600], true))
            .await
            .unwrap();
        assert_eq!(text(r).await, (StatusCode::OK, "600 600".into()));
        assert_eq!(budget.in_flight(), 0);
        // JSON body: charged at JSON_WEIGHT.
        let r = app(&budget)
            .oneshot(with_length("/read", vec![b' '; 100], false))
            .await
            .unwrap();
        assert_eq!(
            text(r).await,
            (StatusCode::OK, format!("100 {}", 100 * JSON_WEIGHT))
        );
        assert_eq!(budget.in_flight(), 0);
    }

    #[tokio::test]
    async fn over_budget_is_429_busy_and_alone_too_large_is_413() {
        let budget = InflightBudget::new(LIMIT);
        let mut registry = Registry::with_prefix("oxserve");
        budget.register_metrics(&mut registry);
        // Hold 700 bytes with a request that never finishes.
        let mut held = app(&budget).oneshot(with_length("/never", vec![0; 700], true));
        assert!(futures_poll_once(&mut held).await);
        assert_eq!(budget.in_flight(), 700);
        let r = app(&budget)
            .oneshot(with_length("/read", vec![0; 400], true))
            .await
            .unwrap();
        assert_eq!(
            r.headers().get(header::RETRY_AFTER).map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
        let (status, body) = text(r).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert!(body.contains("--max-inflight-bytes"), "{body}");
        // Cancellation (the client went away) releases the held bytes.
        drop(held);
        assert_eq!(budget.in_flight(), 0);
        let r = app(&budget)
            .oneshot(with_length("/read", vec![0; 1001], true))
            .await
            .unwrap();
        let (status, body) = text(r).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(body.contains("whole in-flight budget of 1000 bytes"), "{body}");
        let mut exposition = String::new();
        prometheus_client::encoding::text::encode(&mut exposition, &registry).unwrap();
        assert!(
            exposition.contains(r#"oxserve_inflight_rejected_total{protocol="http",reason="busy"} 1"#),
            "{exposition}"
        );
        assert!(exposition.contains(r#"reason="too_large"} 1"#), "{exposition}");
        assert!(
            exposition.contains("oxserve_inflight_bytes_limit 1000"),
            "{exposition}"
        );
    }

    /// Polls a future once; true when it is still pending.
    async fn futures_poll_once<F: Future + Unpin>(f: &mut F) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *f).poll(cx).is_pending())).await
    }

    #[tokio::test]
    async fn released_after_an_error_response() {
        let budget = InflightBudget::new(LIMIT);
        let r = app(&budget)
            .oneshot(with_length("/fail", vec![0; 900], true))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(budget.in_flight(), 0);
    }

    #[tokio::test]
    async fn streamed_bodies_are_charged_frame_by_frame() {
        let budget = InflightBudget::new(LIMIT);
        // 3 × 150 bytes, plus the joined copy the reader makes of a multi-frame body.
        let r = app(&budget)
            .oneshot(streamed("/read", vec![vec![1; 150]; 3], true))
            .await
            .unwrap();
        assert_eq!(text(r).await, (StatusCode::OK, "450 900".into()));
        assert_eq!(budget.in_flight(), 0);
        // 6 × 200 bytes pass the whole budget at the sixth frame: 413, everything released.
        let r = app(&budget)
            .oneshot(streamed("/read", vec![vec![1; 200]; 6], true))
            .await
            .unwrap();
        let (status, body) = text(r).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        assert_eq!(budget.in_flight(), 0);
    }

    #[tokio::test]
    async fn decompressed_bytes_are_charged() {
        let budget = InflightBudget::new(100_000);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&[b'0'; 50_000]).unwrap();
        let compressed = gz.finish().unwrap();
        let n = compressed.len();
        let request = |bytes: Vec<u8>| {
            Request::post("/read")
                .header(header::CONTENT_ENCODING, "gzip")
                .header(INFERENCE_HEADER_CONTENT_LENGTH, "0")
                .header(header::CONTENT_LENGTH, bytes.len())
                .body(AxumBody::from(bytes))
                .unwrap()
        };
        let r = app(&budget).oneshot(request(compressed.clone())).await.unwrap();
        assert_eq!(text(r).await, (StatusCode::OK, format!("50000 {}", n + 50_000)));
        assert_eq!(budget.in_flight(), 0);
        // The same body decompressed as JSON (weight 5) needs 250 kB: more than the budget.
        let json = Request::post("/read")
            .header(header::CONTENT_ENCODING, "gzip")
            .body(AxumBody::from(compressed))
            .unwrap();
        let r = app(&budget).oneshot(json).await.unwrap();
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(budget.in_flight(), 0);
    }

    #[test]
    fn pricing_of_a_binary_extension_body() {
        let p = Pricing {
            head_len: 10,
            head_weight: 5,
        };
        assert_eq!(p.cost(0, 4), 20);
        assert_eq!(p.cost(8, 4), 2 * 5 + 2);
        assert_eq!(p.cost(20, 4), 4);
        let all = Pricing {
            head_len: usize::MAX,
            head_weight: 3,
        };
        assert_eq!(all.cost(usize::MAX - 1, 2), 3 + 1);
    }

    #[test]
    fn grpc_compressed_frames_charge_the_deflate_bound() {
        let budget = InflightBudget::new(1 << 30);
        let ticket = Ticket {
            budget: budget.inner.clone(),
            protocol: "grpc",
            pricing: Pricing {
                head_len: usize::MAX,
                head_weight: GRPC_WEIGHT,
            },
            encoding: Encoding::Bounded { cap: 1 << 20 },
            state: Mutex::new(TicketState::default()),
        };
        ticket.charge_frame(100).unwrap();
        assert_eq!(budget.in_flight(), 100 + 100 * DEFLATE_MAX_RATIO * GRPC_WEIGHT);
        // Past the cap only the frames themselves cost.
        ticket.charge_frame(10_000).unwrap();
        assert_eq!(budget.in_flight(), 10_100 + (1 << 20) * GRPC_WEIGHT);
        drop(ticket);
        assert_eq!(budget.in_flight(), 0);
    }

    #[test]
    fn default_budget_is_within_its_bounds() {
        let b = default_budget_bytes();
        assert!((MIN_DEFAULT_BUDGET..=MAX_DEFAULT_BUDGET).contains(&b), "{b}");
    }
}
