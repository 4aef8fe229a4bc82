//! How one request is sent: over HTTP/1.1, gRPC or to the engine in this process, with the
//! tensors in the messages or in shared memory.

use anyhow::{Context, bail};
use bytes::Bytes;
use http::HeaderValue;
use oxserve_core::InferRequest;
use oxserve_engine::InferenceService;
use oxserve_kserve::grpc::pb;

use super::grpc::GrpcConns;
use super::headers::http_client;
use super::options::{BenchArgs, BenchProtocol, ClientKind};
use super::shm::BenchRegions;
use super::stock::{StockGrpc, StockHttp};
use crate::client::{grpc_metadata, grpc_request, http_body, http_metadata, random_request};
use oxserve_tfserving::pb::tensorflow::serving::PredictRequest;
use oxserve_tfserving::pb::tensorflow::serving::prediction_service_client::PredictionServiceClient;

/// One way of sending the request, shared by every worker. Built once per run, so the
/// variants' size difference does not matter.
#[allow(clippy::large_enum_variant)]
pub(super) enum Sender {
    Http {
        pool: HttpClient,
        body: Bytes,
        content_type: HeaderValue,
        /// Triton's `Inference-Header-Content-Length` for the binary tensor extension.
        header_len: Option<HeaderValue>,
    },
    Grpc(GrpcClient),
    /// TF Serving's Predict over tonic's generated client, one channel per slot group.
    TfsGrpc {
        clients: Vec<PredictionServiceClient<tonic::transport::Channel>>,
        request: PredictRequest,
    },
    InProcess {
        engine: InferenceService,
        request: InferRequest,
    },
}

impl Sender {
    /// Sends one request and reads the whole answer; `Err` carries a short reason. `slot` (a
    /// worker or request number) spreads requests over gRPC channels.
    pub(super) async fn send(&self, slot: usize) -> Result<(), String> {
        match self {
            Sender::Http {
                pool,
                body,
                content_type,
                header_len,
            } => pool.post(body, content_type, header_len.as_ref()).await,
            Sender::Grpc(conns) => conns.call(slot).await,
            Sender::TfsGrpc { clients, request } => {
                let mut client = clients[slot % clients.len()].clone();
                client
                    .predict(request.clone())
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("{}: {}", e.code(), e.message()))
            }
            Sender::InProcess { engine, request } => engine
                .infer(request.clone())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        }
    }
}

/// The HTTP/1.1 client: hyper-util's pooled `Client`. (A hand-written HTTP/1.1 pool measured
/// no less client CPU per request than it, BENCHMARKS.md "The load generator's clients", so it
/// gave way.)
pub(super) struct HttpClient(StockHttp);

impl HttpClient {
    fn new(base_url: &str, path: &str) -> anyhow::Result<Self> {
        Ok(HttpClient(StockHttp::new(base_url, path)?))
    }

    async fn post(
        &self,
        body: &Bytes,
        content_type: &HeaderValue,
        header_len: Option<&HeaderValue>,
    ) -> Result<(), String> {
        self.0.post(body, content_type, header_len).await
    }
}

/// The gRPC client `--client` chose.
pub(super) enum GrpcClient {
    Lean(GrpcConns),
    Stock(StockGrpc),
}

impl GrpcClient {
    async fn new(
        kind: ClientKind,
        url: &str,
        request: &pb::ModelInferRequest,
        connections: usize,
    ) -> anyhow::Result<Self> {
        Ok(match kind {
            ClientKind::Lean => GrpcClient::Lean(GrpcConns::new(url, request, connections).await?),
            ClientKind::Stock => GrpcClient::Stock(StockGrpc::new(url, request, connections).await?),
        })
    }

    async fn call(&self, slot: usize) -> Result<(), String> {
        match self {
            GrpcClient::Lean(conns) => conns.call(slot).await,
            GrpcClient::Stock(client) => client.call(slot).await,
        }
    }
}

/// The request every worker sends with `--shared-memory system`, and the regions holding its
/// tensors.
pub(super) struct ShmRequest {
    request: InferRequest,
    pub(super) regions: BenchRegions,
}

pub(super) async fn shm_request(args: &BenchArgs) -> anyhow::Result<ShmRequest> {
    if args.protocol.contains(&BenchProtocol::InProcess) {
        bail!("--shared-memory applies to http-json, http-binary and grpc, not in-process");
    }
    let http_url = args.http_url.trim_end_matches('/');
    let meta = http_metadata(&http_client().build()?, http_url, &args.model, None).await?;
    let request = random_request(&meta, None, args.batch);
    let regions = BenchRegions::create(http_url, &request).await?;
    Ok(ShmRequest { request, regions })
}

pub(super) async fn sender_for(
    args: &BenchArgs,
    protocol: BenchProtocol,
    engine: Option<&InferenceService>,
    grpc_channels: usize,
    shm: Option<&ShmRequest>,
) -> anyhow::Result<Sender> {
    let http_url = args.http_url.trim_end_matches('/');
    if let Some(shm) = shm {
        return Ok(match protocol {
            BenchProtocol::HttpJson | BenchProtocol::HttpBinary => Sender::Http {
                pool: HttpClient::new(http_url, &format!("/v2/models/{}/infer", args.model))?,
                body: shm.regions.http_body(&shm.request)?,
                content_type: HeaderValue::from_static("application/json"),
                header_len: None,
            },
            BenchProtocol::Grpc => {
                let request = shm.regions.grpc_request(grpc_request(&shm.request));
                Sender::Grpc(GrpcClient::new(args.client, &args.grpc_url, &request, grpc_channels).await?)
            }
            BenchProtocol::InProcess | BenchProtocol::TfsRest | BenchProtocol::TfsGrpc => {
                bail!("--shared-memory applies to the KServe protocols only")
            }
        });
    }
    Ok(match protocol {
        BenchProtocol::HttpJson | BenchProtocol::HttpBinary => {
            let client = http_client().build()?;
            let meta = http_metadata(&client, http_url, &args.model, None).await?;
            let binary = protocol == BenchProtocol::HttpBinary;
            let (body, header_len) = http_body(&random_request(&meta, None, args.batch), binary)?;
            Sender::Http {
                pool: HttpClient::new(http_url, &format!("/v2/models/{}/infer", args.model))?,
                body,
                content_type: HeaderValue::from_static(if binary {
                    "application/octet-stream"
                } else {
                    "application/json"
                }),
                header_len: header_len.map(HeaderValue::from),
            }
        }
        BenchProtocol::Grpc => {
            let mut client = pb::GrpcInferenceServiceClient::connect(args.grpc_url.clone())
                .await
                .with_context(|| format!("cannot connect to {}", args.grpc_url))?;
            // With `--header` (an API key), the metadata comes over HTTP, whose client sends it.
            let meta = match args.headers.is_empty() {
                true => grpc_metadata(&mut client, &args.model, None).await?,
                false => http_metadata(&http_client().build()?, http_url, &args.model, None).await?,
            };
            let request = grpc_request(&random_request(&meta, None, args.batch));
            Sender::Grpc(GrpcClient::new(args.client, &args.grpc_url, &request, grpc_channels).await?)
        }
        BenchProtocol::TfsRest => {
            let meta = http_metadata(&http_client().build()?, http_url, &args.model, None).await?;
            let request = random_request(&meta, None, args.batch);
            let body = oxserve_tfserving::json::columnar("inputs", &request.inputs)?;
            Sender::Http {
                pool: HttpClient::new(http_url, &format!("/v1/models/{}:predict", args.model))?,
                body: Bytes::from(body),
                content_type: HeaderValue::from_static("application/json"),
                header_len: None,
            }
        }
        BenchProtocol::TfsGrpc => {
            let meta = http_metadata(&http_client().build()?, http_url, &args.model, None).await?;
            let request = random_request(&meta, None, args.batch);
            let predict = PredictRequest {
                model_spec: Some(oxserve_tfserving::pb::tensorflow::serving::ModelSpec {
                    name: args.model.clone(),
                    ..Default::default()
                }),
                inputs: request
                    .inputs
                    .into_iter()
                    .map(|t| (t.name.clone(), oxserve_tfserving::tensor_proto::from_tensor(t)))
                    .collect(),
                ..Default::default()
            };
            let mut clients = Vec::new();
            for _ in 0..grpc_channels.max(1) {
                let channel = tonic::transport::Endpoint::from_shared(args.grpc_url.clone())?
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .with_context(|| format!("cannot connect to {}", args.grpc_url))?;
                clients.push(PredictionServiceClient::new(channel).max_decoding_message_size(usize::MAX));
            }
            Sender::TfsGrpc {
                clients,
                request: predict,
            }
        }
        BenchProtocol::InProcess => {
            let engine = engine.context("in-process needs --model-repository")?.clone();
            let meta = engine.model_metadata(&args.model, None)?;
            Sender::InProcess {
                request: random_request(&meta, None, args.batch),
                engine,
            }
        }
    })
}
