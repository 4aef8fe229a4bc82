//! The gRPC client of the `grpc` protocol: unary `ModelInfer` calls framed once and sent on
//! HTTP/2 connections made directly with hyper's connection API.

use std::sync::{Mutex, PoisonError};

use anyhow::{Context, bail};
use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use oxserve_kserve::grpc::pb;

type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// gRPC unary `ModelInfer` calls made directly on HTTP/2 connections: the request message is
/// encoded once, gRPC framing included, and each answer is read and its `grpc-status` checked
/// without decoding the message. A general-purpose gRPC client re-encodes and decodes every
/// message and queues each call through a buffer task; on a machine whose cores the server
/// shares, that client cost would be measured as server throughput.
pub(super) struct GrpcConns {
    addr: String,
    /// `http://host:port/inference.GRPCInferenceService/ModelInfer`
    uri: Uri,
    /// The framed request: compression flag, big-endian length, protobuf message.
    framed: Bytes,
    /// Requests are spread over these connections by slot; a closed one is replaced.
    conns: Vec<Mutex<H2>>,
}

impl GrpcConns {
    pub(super) async fn new(
        url: &str,
        request: &pb::ModelInferRequest,
        connections: usize,
    ) -> anyhow::Result<Self> {
        use prost::Message as _;
        let base: Uri = url.parse().with_context(|| format!("invalid gRPC URL '{url}'"))?;
        if base.scheme_str() != Some("http") {
            bail!("the load generator speaks gRPC over plain http://, not '{url}'");
        }
        let authority = base.authority().with_context(|| format!("no host in '{url}'"))?;
        let addr = format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(80));
        let uri: Uri = format!("http://{authority}/inference.GRPCInferenceService/ModelInfer").parse()?;
        let message = request.encode_to_vec();
        let len = u32::try_from(message.len()).context("request message over 4 GiB")?;
        let mut framed = Vec::with_capacity(5 + message.len());
        framed.push(0);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&message);
        let mut conns = Vec::with_capacity(connections.max(1));
        for _ in 0..connections.max(1) {
            conns.push(Mutex::new(
                Self::connect(&addr).await.map_err(|e| anyhow::anyhow!(e))?,
            ));
        }
        Ok(GrpcConns {
            addr,
            uri,
            framed: Bytes::from(framed),
            conns,
        })
    }

    async fn connect(addr: &str) -> Result<H2, String> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let (conn, driver) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP/2 handshake with {addr}: {e}"))?;
        tokio::spawn(async move {
            let _ = driver.await;
        });
        Ok(conn)
    }

    pub(super) async fn call(&self, slot: usize) -> Result<(), String> {
        let cell = &self.conns[slot % self.conns.len()];
        let mut conn = cell.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if conn.is_closed() {
            conn = Self::connect(&self.addr).await?;
            *cell.lock().unwrap_or_else(PoisonError::into_inner) = conn.clone();
        }
        conn.ready().await.map_err(|e| e.to_string())?;
        let request = super::headers::with_extra_headers(http::Request::builder())
            .method(http::Method::POST)
            .version(http::Version::HTTP_2)
            .uri(self.uri.clone())
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(Full::new(self.framed.clone()))
            .map_err(|e| e.to_string())?;
        let (head, body) = conn
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?
            .into_parts();
        if head.status != http::StatusCode::OK {
            return Err(format!("gRPC call answered HTTP {}", head.status));
        }
        // A "trailers-only" answer (an error) carries the status in its headers.
        if let Some(status) = grpc_status(&head.headers) {
            return status;
        }
        let collected = body.collect().await.map_err(|e| e.to_string())?;
        let status = collected.trailers().and_then(grpc_status);
        let message = collected.to_bytes();
        match status {
            Some(Ok(())) if message.len() >= 5 => Ok(()),
            Some(Ok(())) => Err("gRPC answer without a message".into()),
            Some(Err(e)) => Err(e),
            None => Err("gRPC answer without grpc-status".into()),
        }
    }
}

/// `grpc-status` (and `grpc-message`) from headers or trailers, if present.
fn grpc_status(headers: &http::HeaderMap) -> Option<Result<(), String>> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    if code == 0 {
        return Some(Ok(()));
    }
    let message = headers
        .get("grpc-message")
        .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned())
        .unwrap_or_default();
    Some(Err(format!("gRPC {:?}: {message}", tonic::Code::from(code))))
}
