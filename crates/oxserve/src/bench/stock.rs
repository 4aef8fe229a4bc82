//! The general-purpose clients that the lean ones ([`super::http1`], [`super::grpc`]) are
//! measured against (`--client stock`): hyper-util's pooled `Client` for HTTP/1.1 and tonic's
//! generated client for gRPC, both set up as the lean ones are (TCP_NODELAY, the same HTTP/2
//! windows, the same number of gRPC connections). BENCHMARKS.md has the comparison.

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderValue, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use oxserve_kserve::grpc::pb;
use tonic::transport::{Channel, Endpoint};

/// HTTP/1.1 requests through hyper-util's `Client` (its own connection pool).
pub(super) struct StockHttp {
    client: Client<HttpConnector, Full<Bytes>>,
    /// The absolute request URI, e.g. `http://127.0.0.1:8000/v2/models/add_sub/infer`.
    uri: Uri,
}

impl StockHttp {
    pub(super) fn new(base_url: &str, path: &str) -> anyhow::Result<Self> {
        let uri: Uri = format!("{}{path}", base_url.trim_end_matches('/'))
            .parse()
            .with_context(|| format!("invalid URL '{base_url}{path}'"))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Ok(StockHttp {
            client: Client::builder(TokioExecutor::new()).build(connector),
            uri,
        })
    }

    pub(super) async fn post(
        &self,
        body: &Bytes,
        content_type: &HeaderValue,
        header_len: Option<&HeaderValue>,
    ) -> Result<(), String> {
        let mut request = http::Request::builder()
            .method(http::Method::POST)
            .uri(self.uri.clone())
            .header(http::header::CONTENT_TYPE, content_type.clone());
        if let Some(n) = header_len {
            request = request.header("inference-header-content-length", n.clone());
        }
        let request = super::headers::with_extra_headers(request)
            .body(Full::new(body.clone()))
            .map_err(|e| e.to_string())?;
        let response = self.client.request(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if status.is_success() {
            Ok(())
        } else {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            Err(format!("HTTP {status}: {text}"))
        }
    }
}

/// gRPC `ModelInfer` calls through tonic's generated client: every call encodes the request
/// message and decodes the answer.
pub(super) struct StockGrpc {
    /// One client per connection; requests are spread over them by slot.
    clients: Vec<pb::GrpcInferenceServiceClient<Channel>>,
    request: pb::ModelInferRequest,
}

impl StockGrpc {
    pub(super) async fn new(
        url: &str,
        request: &pb::ModelInferRequest,
        connections: usize,
    ) -> anyhow::Result<Self> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .with_context(|| format!("invalid gRPC URL '{url}'"))?
            .tcp_nodelay(true)
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20);
        let mut clients = Vec::with_capacity(connections.max(1));
        for _ in 0..connections.max(1) {
            let channel = endpoint
                .connect()
                .await
                .with_context(|| format!("cannot connect to {url}"))?;
            clients.push(pb::GrpcInferenceServiceClient::new(channel));
        }
        Ok(StockGrpc {
            clients,
            request: request.clone(),
        })
    }

    pub(super) async fn call(&self, slot: usize) -> Result<(), String> {
        let mut client = self.clients[slot % self.clients.len()].clone();
        let mut request = tonic::Request::new(self.request.clone());
        super::headers::add_extra_metadata(request.metadata_mut());
        client
            .model_infer(request)
            .await
            .map(|_| ())
            .map_err(|s| format!("gRPC {:?}: {}", s.code(), s.message()))
    }
}
