//! The access guard: one tower layer, put in front of the HTTP router, the gRPC server and the
//! metrics router, that classifies each request ([`crate::routes::classify`]), checks its API
//! key and scope ([`crate::auth`]), and takes a token from its rate-limit buckets
//! ([`crate::rate_limit`]) before any handler runs, answering refusals in the listener's own
//! wire format.

use std::future::Future;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::{HeaderValue, Request, Response, header};
use http_body::{Body as HttpBody, Frame, SizeHint};
use oxserve_core::ErrorKind;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tower::{Layer, Service};

use crate::auth::{ApiKeys, AuthError};
use crate::rate_limit::{Limited, RateLimits};
use crate::restricted::{Restrictions, grpc_group, http_group, refusal_message};
use crate::routes::{ModelRef, Route, Scope, classify};

/// The client's address, for listeners whose connections do not carry axum's `ConnectInfo`
/// or tonic's `TcpConnectInfo` (a TLS acceptor may insert this instead).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddress(pub SocketAddr);

/// Authentication policy and rate limits for every listener of one server. The default: no
/// keys, no limits (every endpoint open, as without this layer).
#[derive(Debug, Default)]
pub struct AccessPolicy {
    pub keys: ApiKeys,
    /// Whether health endpoints (probes) need a key too once keys are configured.
    pub health_requires_key: bool,
    /// Whether the metrics endpoint is open without a key (TorchServe's metrics API is).
    pub metrics_open: bool,
    pub rate_limits: RateLimits,
    /// Triton's `--http-restricted-api` and `--grpc-restricted-protocol` header gates.
    pub http_restricted: Restrictions,
    pub grpc_restricted: Restrictions,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitedLabels {
    group: String,
    model: String,
    by: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectedLabels {
    group: String,
    reason: String,
}

/// The shared state of every guard of a server.
pub struct Access {
    policy: Arc<AccessPolicy>,
    rate_limited: Family<LimitedLabels, Counter>,
    auth_rejected: Family<RejectedLabels, Counter>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access").field("policy", &self.policy).finish()
    }
}

/// Why a request was refused.
#[derive(Debug)]
pub enum Refusal {
    Auth(AuthError),
    RateLimited(Limited),
}

impl Refusal {
    fn kind(&self) -> ErrorKind {
        match self {
            Refusal::Auth(AuthError::Missing | AuthError::Invalid) => ErrorKind::Unauthenticated,
            Refusal::Auth(AuthError::Forbidden { .. }) => ErrorKind::PermissionDenied,
            Refusal::RateLimited(_) => ErrorKind::Overloaded,
        }
    }

    fn message(&self) -> String {
        match self {
            Refusal::Auth(e) => e.message(),
            Refusal::RateLimited(l) => format!(
                "rate limit exceeded for this {}; retry in {} s",
                match l.by {
                    crate::rate_limit::LimitedBy::Key => "API key",
                    crate::rate_limit::LimitedBy::Address => "client address",
                },
                l.retry_after_secs()
            ),
        }
    }

    /// RFC 6750's challenge for 401 and 403 answers.
    fn www_authenticate(&self) -> Option<HeaderValue> {
        let value = match self {
            Refusal::Auth(AuthError::Missing) => "Bearer realm=\"oxserve\"".to_string(),
            Refusal::Auth(AuthError::Invalid) => {
                "Bearer realm=\"oxserve\", error=\"invalid_token\"".to_string()
            }
            Refusal::Auth(AuthError::Forbidden { scope, .. }) => {
                format!("Bearer realm=\"oxserve\", error=\"insufficient_scope\", scope=\"{scope}\"")
            }
            Refusal::RateLimited(_) => return None,
        };
        HeaderValue::from_str(&value).ok()
    }

    fn retry_after(&self) -> Option<HeaderValue> {
        match self {
            Refusal::RateLimited(l) => Some(HeaderValue::from(l.retry_after_secs())),
            Refusal::Auth(_) => None,
        }
    }
}

impl Access {
    /// Registers `oxserve_rate_limited_total` and `oxserve_auth_rejected_total` in `registry`.
    pub fn new(policy: Arc<AccessPolicy>, registry: &mut Registry) -> Arc<Access> {
        let access = Access {
            policy,
            rate_limited: Family::default(),
            auth_rejected: Family::default(),
        };
        registry.register(
            "rate_limited",
            "Requests refused by a rate limit, by endpoint group, model of the rule and bucket kind",
            access.rate_limited.clone(),
        );
        registry.register(
            "auth_rejected",
            "Requests refused for a missing or invalid API key (unauthenticated) or a missing scope (forbidden)",
            access.auth_rejected.clone(),
        );
        Arc::new(access)
    }

    /// Whether the guard has anything to do.
    pub fn is_active(&self) -> bool {
        !self.policy.keys.is_empty()
            || !self.policy.rate_limits.is_empty()
            || !self.policy.http_restricted.is_empty()
            || !self.policy.grpc_restricted.is_empty()
    }

    /// Triton's restricted-API gate: the header a request to `path` lacks, if it lacks one.
    fn missing_restricted_header(&self, grpc: bool, path: &str, headers: &http::HeaderMap) -> Option<String> {
        let (restrictions, group) = if grpc {
            (&self.policy.grpc_restricted, grpc_group(path))
        } else {
            (&self.policy.http_restricted, http_group(path))
        };
        let (key, value) = restrictions.requirement(group?)?;
        let present = headers
            .get(key.as_str())
            .is_some_and(|v| v.as_bytes() == value.as_bytes());
        (!present).then(|| key.clone())
    }

    pub fn rate_limits(&self) -> &RateLimits {
        &self.policy.rate_limits
    }

    /// Authentication and authorization: the name of the key used, if any.
    fn authorize(&self, route: &Route, headers: &http::HeaderMap) -> Result<Option<Arc<str>>, Refusal> {
        let keys = &self.policy.keys;
        if keys.is_empty() {
            return Ok(None);
        }
        let open = (route.scope == Some(Scope::Health) && !self.policy.health_requires_key)
            || (route.scope == Some(Scope::Metrics) && self.policy.metrics_open);
        match keys.authorize(headers, route.scope) {
            Ok(key) => Ok(Some(key.name.clone())),
            // A probe without a key is fine; a wrong key on an open endpoint is still wrong.
            Err(AuthError::Missing) if open => Ok(None),
            Err(AuthError::Forbidden { .. }) if open => Ok(None),
            Err(e) => {
                let reason = match e {
                    AuthError::Forbidden { .. } => "forbidden",
                    AuthError::Missing | AuthError::Invalid => "unauthenticated",
                };
                self.auth_rejected
                    .get_or_create(&RejectedLabels {
                        group: group_label(route.scope).into(),
                        reason: reason.into(),
                    })
                    .inc();
                Err(Refusal::Auth(e))
            }
        }
    }

    fn limit(&self, route: &Route, key: Option<&Arc<str>>, address: Option<IpAddr>) -> Result<(), Refusal> {
        self.policy
            .rate_limits
            .check(route.scope, &route.model, key, address)
            .map_err(|limited| {
                self.rate_limited
                    .get_or_create(&LimitedLabels {
                        group: limited.group.to_string(),
                        model: limited.model.to_string(),
                        by: limited.by.as_str().into(),
                    })
                    .inc();
                Refusal::RateLimited(limited)
            })
    }
}

fn group_label(scope: Option<Scope>) -> &'static str {
    scope.map_or("other", Scope::as_str)
}

/// How one listener's protocol answers a refusal, and where it names the model.
pub trait Wire: Clone + Send + Sync + 'static {
    type ReqBody: Send + 'static;
    type ResBody: Send + 'static;
    /// Whether the listener speaks gRPC (Triton's restricted protocols are gRPC's).
    const GRPC: bool;

    /// The answer to a refused request for `path`.
    fn refuse(&self, refusal: &Refusal, path: &str) -> Response<Self::ResBody>;

    /// The answer to a request to a restricted API without its header (Triton's).
    fn restricted(&self, header: &str) -> Response<Self::ResBody>;

    /// For a route whose model is in the body: the model, and the request to pass on.
    fn model_in_body(
        &self,
        request: Request<Self::ReqBody>,
    ) -> impl Future<Output = (ModelRef, Request<Self::ReqBody>)> + Send {
        std::future::ready((ModelRef::InBody, request))
    }
}

/// HTTP listeners: the KServe `{"error": "..."}` body with the status of the error kind.
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpWire;

impl Wire for HttpWire {
    type ReqBody = axum::body::Body;
    type ResBody = axum::body::Body;
    const GRPC: bool = false;

    fn restricted(&self, header: &str) -> Response<axum::body::Body> {
        let body = serde_json::json!({ "error": refusal_message(header, false) }).to_string();
        let mut response = Response::new(axum::body::Body::from(body));
        *response.status_mut() = http::StatusCode::FORBIDDEN;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    }

    fn refuse(&self, refusal: &Refusal, path: &str) -> Response<axum::body::Body> {
        // gRPC served on an HTTP listener (TorchServe's gRPC management port): a gRPC status.
        if path.starts_with("/org.pytorch.serve.grpc.") {
            let code = oxserve_kserve::grpc::status::code_for(refusal.kind());
            return tonic::Status::new(code, refusal.message()).into_http::<axum::body::Body>();
        }
        let status = oxserve_kserve::http::http_status(refusal.kind());
        // TorchServe's endpoints answer in TorchServe's error shape, the others in KServe's.
        let body = if is_torchserve_path(path) {
            let kind = match refusal {
                Refusal::Auth(_) => "InvalidKeyException",
                Refusal::RateLimited(_) => "ServiceUnavailableException",
            };
            serde_json::json!({"code": status.as_u16(), "type": kind, "message": refusal.message()})
        } else {
            serde_json::json!({ "error": refusal.message() })
        }
        .to_string();
        let mut response = Response::new(axum::body::Body::from(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(challenge) = refusal.www_authenticate() {
            headers.insert(header::WWW_AUTHENTICATE, challenge);
        }
        if let Some(retry) = refusal.retry_after() {
            headers.insert(header::RETRY_AFTER, retry);
        }
        response
    }
}

/// The gRPC listener: a trailers-only answer with the status code of the error kind.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcWire;

impl Wire for GrpcWire {
    type ReqBody = tonic::body::Body;
    type ResBody = tonic::body::Body;
    const GRPC: bool = true;

    fn restricted(&self, header: &str) -> Response<tonic::body::Body> {
        tonic::Status::unavailable(refusal_message(header, true)).into_http::<tonic::body::Body>()
    }

    fn refuse(&self, refusal: &Refusal, _path: &str) -> Response<tonic::body::Body> {
        let code = oxserve_kserve::grpc::status::code_for(refusal.kind());
        let mut response = tonic::Status::new(code, refusal.message()).into_http::<tonic::body::Body>();
        if let Some(retry) = refusal.retry_after() {
            response.headers_mut().insert(header::RETRY_AFTER, retry);
        }
        response
    }

    async fn model_in_body(
        &self,
        request: Request<tonic::body::Body>,
    ) -> (ModelRef, Request<tonic::body::Body>) {
        let (parts, mut body) = request.into_parts();
        let first = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        let compression = parts.headers.get("grpc-encoding").map(HeaderValue::as_bytes);
        // TF Serving's messages name the model inside a `ModelSpec` (field 1).
        let nested = parts.uri.path().starts_with("/tensorflow.serving.");
        let model = match &first {
            Some(Ok(frame)) => frame
                .data_ref()
                .and_then(|data| model_in_grpc_message(data, compression, nested))
                .map_or(ModelRef::InBody, ModelRef::Named),
            _ => ModelRef::InBody,
        };
        let body = tonic::body::Body::new(Prepended { first, rest: body });
        (model, Request::from_parts(parts, body))
    }
}

/// A gRPC request body whose first frame was already read.
struct Prepended {
    first: Option<Result<Frame<Bytes>, tonic::Status>>,
    rest: tonic::body::Body,
}

impl HttpBody for Prepended {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(first));
        }
        Pin::new(&mut this.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.first {
            None => self.rest.size_hint(),
            Some(_) => SizeHint::default(),
        }
    }
}

/// Bytes of a gRPC message's start that are decompressed to look for the model name.
const MODEL_PEEK_BYTES: u64 = 4096;

/// Field 1 (`name` / `model_name`, a string) of the KServe request messages, from the start of
/// the first length-prefixed gRPC message; `None` when it is not within what was received or
/// not valid UTF-8.
fn model_in_grpc_message(data: &Bytes, compression: Option<&[u8]>, nested: bool) -> Option<String> {
    let (&flag, rest) = data.split_first()?;
    let message = rest.get(4..)?;
    let plain;
    let message = match (flag, compression) {
        (0, _) => message,
        (1, Some(b"gzip")) => {
            plain = read_prefix(flate2::read::GzDecoder::new(message.reader()))?;
            &plain[..]
        }
        (1, Some(b"deflate")) => {
            plain = read_prefix(flate2::read::ZlibDecoder::new(message.reader()))?;
            &plain[..]
        }
        _ => return None,
    };
    let field = protobuf_field_1(message)?;
    let name = if nested { protobuf_field_1(field)? } else { field };
    String::from_utf8(name.to_vec()).ok()
}

fn read_prefix(decoder: impl Read) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    // A truncated stream still yields what was decoded before the cut.
    let _ = decoder.take(MODEL_PEEK_BYTES).read_to_end(&mut out);
    (!out.is_empty()).then_some(out)
}

/// Walks top-level protobuf fields until field 1 of wire type 2, and returns its bytes.
fn protobuf_field_1(mut buf: &[u8]) -> Option<&[u8]> {
    fn varint(buf: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = buf.split_first()?;
            *buf = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    while !buf.is_empty() {
        let tag = varint(&mut buf)?;
        let (field, wire_type) = (tag >> 3, tag & 7);
        match wire_type {
            0 => {
                varint(&mut buf)?;
            }
            1 => buf = buf.get(8..)?,
            5 => buf = buf.get(4..)?,
            2 => {
                let len = usize::try_from(varint(&mut buf)?).ok()?;
                let value = buf.get(..len)?;
                if field == 1 {
                    return Some(value);
                }
                buf = &buf[len..];
            }
            _ => return None,
        }
    }
    None
}

/// TorchServe's inference and management endpoints.
fn is_torchserve_path(path: &str) -> bool {
    path == "/ping" || path.starts_with("/predictions/") || path == "/models" || path.starts_with("/models/")
}

/// The client's IP address from whichever connection info the listener recorded.
fn client_ip(extensions: &http::Extensions) -> Option<IpAddr> {
    if let Some(ClientAddress(a)) = extensions.get::<ClientAddress>() {
        return Some(a.ip());
    }
    if let Some(axum::extract::ConnectInfo(a)) = extensions.get::<axum::extract::ConnectInfo<SocketAddr>>() {
        return Some(a.ip());
    }
    extensions
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|info| info.remote_addr())
        .map(|a| a.ip())
}

/// The layer, for one listener.
#[derive(Clone)]
pub struct GuardLayer<W> {
    access: Arc<Access>,
    wire: W,
}

impl<W> GuardLayer<W> {
    pub fn new(access: Arc<Access>, wire: W) -> Self {
        GuardLayer { access, wire }
    }
}

impl<S, W: Clone> Layer<S> for GuardLayer<W> {
    type Service = Guard<S, W>;
    fn layer(&self, inner: S) -> Guard<S, W> {
        Guard {
            inner,
            access: self.access.clone(),
            wire: self.wire.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Guard<S, W> {
    inner: S,
    access: Arc<Access>,
    wire: W,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, W> Service<Request<W::ReqBody>> for Guard<S, W>
where
    W: Wire,
    S: Service<Request<W::ReqBody>, Response = Response<W::ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<W::ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<W::ReqBody>) -> Self::Future {
        if !self.access.is_active() {
            return Box::pin(self.inner.call(request));
        }
        if let Some(header) =
            self.access
                .missing_restricted_header(W::GRPC, request.uri().path(), request.headers())
        {
            return Box::pin(std::future::ready(Ok(self.wire.restricted(&header))));
        }
        let mut route = classify(request.uri().path());
        let key = match self.access.authorize(&route, request.headers()) {
            Ok(key) => key,
            Err(refusal) => {
                let answer = self.wire.refuse(&refusal, request.uri().path());
                return Box::pin(std::future::ready(Ok(answer)));
            }
        };
        let address = client_ip(request.extensions());
        let limits = self.access.rate_limits();
        if route.model != ModelRef::InBody || !limits.needs_model(route.scope) {
            return match self.access.limit(&route, key.as_ref(), address) {
                Ok(()) => Box::pin(self.inner.call(request)),
                Err(refusal) => {
                    let answer = self.wire.refuse(&refusal, request.uri().path());
                    Box::pin(std::future::ready(Ok(answer)))
                }
            };
        }
        // The model is inside the message: read its first frame, then decide.
        let access = self.access.clone();
        let wire = self.wire.clone();
        // The clone is the one that was made ready by `poll_ready`'s caller: swap it in.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let (model, request) = wire.model_in_body(request).await;
            route.model = model;
            match access.limit(&route, key.as_ref(), address) {
                Ok(()) => inner.call(request).await,
                // Only gRPC names the model in the body: no TorchServe path.
                Err(refusal) => Ok(wire.refuse(&refusal, "")),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn grpc_frame(message: &[u8], compressed: bool) -> Bytes {
        let mut out = vec![u8::from(compressed)];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out.into()
    }

    #[test]
    fn the_model_name_is_read_from_the_start_of_a_grpc_message() {
        // ModelInferRequest { model_name: "add_sub", model_version: "1", id: "x" }
        let msg = b"\x0a\x07add_sub\x12\x011\x1a\x01x";
        assert_eq!(
            model_in_grpc_message(&grpc_frame(msg, false), None, false).as_deref(),
            Some("add_sub")
        );
        // Field order is free in protobuf: found after other fields of every wire type.
        let reordered =
            b"\x12\x011\x18\x96\x01\x21\x01\x02\x03\x04\x05\x06\x07\x08\x2d\x01\x02\x03\x04\x0a\x03abc";
        assert_eq!(
            model_in_grpc_message(&grpc_frame(reordered, false), None, false).as_deref(),
            Some("abc")
        );
        // gzip-compressed messages.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, msg).expect("compress");
        let gz = gz.finish().expect("compress");
        assert_eq!(
            model_in_grpc_message(&grpc_frame(&gz, true), Some(b"gzip"), false).as_deref(),
            Some("add_sub")
        );
        // Not readable: truncated, unknown compression, not UTF-8, garbage.
        assert_eq!(
            model_in_grpc_message(&grpc_frame(&msg[..5], false), None, false),
            None
        );
        assert_eq!(
            model_in_grpc_message(&grpc_frame(&gz, true), Some(b"snappy"), false),
            None
        );
        assert_eq!(
            model_in_grpc_message(&grpc_frame(b"\x0a\x02\xff\xfe", false), None, false),
            None
        );
        assert_eq!(
            model_in_grpc_message(&Bytes::from_static(b"\x00\x00"), None, false),
            None
        );
        assert_eq!(
            model_in_grpc_message(&grpc_frame(b"\x0f\xff\xff", false), None, false),
            None
        );
        assert_eq!(model_in_grpc_message(&grpc_frame(b"", false), None, false), None);
        // TF Serving: PredictRequest { model_spec: ModelSpec { name: "mlp" } }.
        let spec = b"\x0a\x05\x0a\x03mlp\x1a\x00";
        assert_eq!(
            model_in_grpc_message(&grpc_frame(spec, false), None, true).as_deref(),
            Some("mlp")
        );
    }

    fn access(keys: &str, health_requires_key: bool) -> Arc<Access> {
        let keys = if keys.is_empty() {
            ApiKeys::default()
        } else {
            ApiKeys::parse(keys, "keys.toml").expect("valid keys")
        };
        let policy = AccessPolicy {
            metrics_open: false,
            keys,
            health_requires_key,
            rate_limits: RateLimits::default(),
            ..Default::default()
        };
        Access::new(Arc::new(policy), &mut Registry::default())
    }

    fn with_token(token: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(t) = token {
            h.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {t}")).expect("header"),
            );
        }
        h
    }

    const KEYS: &str =
        "[[keys]]\nname = \"m\"\ntoken = \"metrics-token-0123456789\"\nscopes = [\"metrics\"]\n";

    #[test]
    fn health_is_open_unless_configured_and_no_keys_means_open() {
        let ready = classify("/v2/health/ready");
        let repo = classify("/v2/repository/index");
        // No keys: everything open, nothing active.
        let open = access("", true);
        assert!(!open.is_active());
        assert!(matches!(open.authorize(&repo, &with_token(None)), Ok(None)));
        // Keys: health open without a key and with a key lacking the scope, not with a bad key.
        let a = access(KEYS, false);
        assert!(a.is_active());
        assert!(matches!(a.authorize(&ready, &with_token(None)), Ok(None)));
        assert!(
            a.authorize(&ready, &with_token(Some("metrics-token-0123456789")))
                .is_ok()
        );
        assert!(matches!(
            a.authorize(&ready, &with_token(Some("wrong-token-0123456789"))),
            Err(Refusal::Auth(AuthError::Invalid))
        ));
        assert!(matches!(
            a.authorize(&repo, &with_token(None)),
            Err(Refusal::Auth(AuthError::Missing))
        ));
        // health_requires_key: probes need a key with the health scope.
        let closed = access(KEYS, true);
        assert!(matches!(
            closed.authorize(&ready, &with_token(None)),
            Err(Refusal::Auth(AuthError::Missing))
        ));
        assert!(matches!(
            closed.authorize(&ready, &with_token(Some("metrics-token-0123456789"))),
            Err(Refusal::Auth(AuthError::Forbidden { .. }))
        ));
        let metrics = classify("/metrics");
        assert_eq!(
            closed
                .authorize(&metrics, &with_token(Some("metrics-token-0123456789")))
                .ok()
                .flatten()
                .as_deref(),
            Some("m")
        );
    }

    #[test]
    fn refusals_carry_their_status_and_headers() {
        let forbidden = Refusal::Auth(AuthError::Forbidden {
            key: "reader".into(),
            scope: Scope::Repository,
        });
        let r = HttpWire.refuse(&forbidden, "/v2/repository/index");
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(
            r.headers()[header::WWW_AUTHENTICATE]
                .to_str()
                .is_ok_and(|v| v.contains("insufficient_scope") && v.contains("repository"))
        );
        let r = HttpWire.refuse(&Refusal::Auth(AuthError::Missing), "/v2/models/m/infer");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer realm=\"oxserve\"");
        let limited = Refusal::RateLimited(Limited {
            group: "infer".into(),
            model: "".into(),
            by: crate::rate_limit::LimitedBy::Key,
            retry_after: std::time::Duration::from_millis(2500),
        });
        let r = HttpWire.refuse(&limited, "/v2/models/m/infer");
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
        let g = GrpcWire.refuse(&limited, "");
        assert_eq!(g.headers()["grpc-status"], "8");
        let g = GrpcWire.refuse(&Refusal::Auth(AuthError::Invalid), "");
        assert_eq!(g.headers()["grpc-status"], "16");
        let g = GrpcWire.refuse(&forbidden, "");
        assert_eq!(g.headers()["grpc-status"], "7");
        // TorchServe's endpoints answer in TorchServe's error shape.
        let r = HttpWire.refuse(&Refusal::Auth(AuthError::Missing), "/predictions/m");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(is_torchserve_path("/models/m/1.0") && is_torchserve_path("/ping"));
        assert!(!is_torchserve_path("/v2/models/m") && !is_torchserve_path("/modelsx"));
    }
}
