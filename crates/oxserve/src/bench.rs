//! `oxserve bench`: the load generator our benchmarks use, measuring the way perf_analyzer does.
//!
//! Load modes:
//! - `concurrency` (closed loop): N workers each keep one request in flight.
//! - `rate` (open loop): requests are sent on a schedule (constant intervals or a Poisson
//!   process) whatever the answers do; latency counts from the *scheduled* send time, so a
//!   client or server that falls behind shows up in the latency, and a request that would
//!   exceed `--max-outstanding` in flight is dropped and counted.
//!
//! Measurement: after a warm-up, the load runs in windows of `--window-secs` until the last
//! three windows agree (max/min of both throughput and p50 within `--stability-percent`), or
//! `--max-windows` have passed. The figures reported are those of the last three windows
//! together: throughput, client latency percentiles from an HDR histogram, errors, and the
//! server-side breakdown (queue / compute input / compute infer / compute output, average per
//! request) from the difference of the server's statistics before and after those windows
//! (`GET /v2/models/{m}/stats`; the engine's own statistics for `in-process`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use http::{HeaderValue, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use oxserve_core::InferRequest;
use oxserve_engine::{InferenceService, ManagerOptions, ModelManager, ModelStatistics};
use oxserve_kserve::grpc::pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::bench_shm::BenchRegions;
use crate::client::{grpc_metadata, grpc_request, http_body, http_metadata, random_request};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchProtocol {
    HttpJson,
    HttpBinary,
    Grpc,
    InProcess,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Closed loop: keep N requests in flight.
    Concurrency,
    /// Open loop: send R requests per second on a schedule.
    Rate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Distribution {
    /// Equal intervals of 1/R.
    Constant,
    /// Exponentially distributed intervals with mean 1/R (a Poisson arrival process).
    Poisson,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SharedMemory {
    /// Tensors travel in the requests and responses.
    None,
    /// Tensors stay in /dev/shm regions registered with the server (Triton's system
    /// shared-memory extension); requests name them.
    System,
}

#[derive(Args)]
pub struct BenchArgs {
    /// HTTP base URL (http-json, http-binary; also where server statistics are read).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    http_url: String,
    /// gRPC URL.
    #[arg(long, default_value = "http://127.0.0.1:8001")]
    grpc_url: String,
    /// Repository for `in-process`.
    #[arg(long = "model-repository", value_name = "DIR")]
    repository: Vec<PathBuf>,
    #[arg(long)]
    model: String,
    /// Protocols to measure, in order (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "http-json")]
    protocol: Vec<BenchProtocol>,
    /// Load mode.
    #[arg(long, value_enum, default_value = "concurrency")]
    mode: Mode,
    /// Concurrency levels for `--mode concurrency` (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    concurrency: Vec<usize>,
    /// Request rates (requests/s) for `--mode rate` (comma-separated).
    #[arg(long, value_delimiter = ',')]
    rate: Vec<f64>,
    /// Intervals between requests in `--mode rate`.
    #[arg(long, value_enum, default_value = "constant")]
    distribution: Distribution,
    /// Seed of the Poisson schedule (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// `--mode rate`: requests in flight beyond which a scheduled request is dropped.
    #[arg(long, default_value_t = 1024)]
    max_outstanding: usize,
    /// Length of one measurement window, seconds.
    #[arg(long, default_value_t = 2.0)]
    window_secs: f64,
    /// The last three windows are stable when max/min of their throughput and of their p50
    /// are both within this many percent.
    #[arg(long, default_value_t = 10.0)]
    stability_percent: f64,
    /// Windows to try before reporting an unstable result.
    #[arg(long, default_value_t = 10)]
    max_windows: usize,
    /// Measure one fixed window of this many seconds instead of windows until stable.
    #[arg(long)]
    duration: Option<f64>,
    /// Warm-up time per point, seconds (not measured).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Batch size of each request.
    #[arg(long, default_value_t = 1)]
    batch: i64,
    /// gRPC connections (HTTP/2) to spread requests over; 0 = one per 8 concurrent
    /// requests of the largest `--concurrency` (1 to 16; 4 in `--mode rate`).
    #[arg(long, default_value_t = 0)]
    grpc_channels: usize,
    /// Where the tensors are: in the messages, or in system shared memory (as perf_analyzer's
    /// `--shared-memory`; HTTP and gRPC only). Regions are registered through `--http-url`,
    /// output regions sized from one probe request.
    #[arg(long, value_enum, default_value = "none")]
    shared_memory: SharedMemory,
    /// Print one JSON object per point instead of a table.
    #[arg(long)]
    json: bool,
    /// An extra header on every request, e.g. an API key: `--header "authorization: Bearer T"`.
    #[arg(long = "header", value_name = "NAME: VALUE", value_parser = parse_header)]
    headers: Vec<(http::HeaderName, HeaderValue)>,
}

/// `--header` values, for every client of the run (set once, read on every request).
static EXTRA_HEADERS: std::sync::OnceLock<http::HeaderMap> = std::sync::OnceLock::new();

fn parse_header(s: &str) -> Result<(http::HeaderName, HeaderValue), String> {
    let (name, value) = s.split_once(':').ok_or("expected NAME: VALUE")?;
    Ok((
        name.trim().parse().map_err(|e| format!("{e}"))?,
        value.trim().parse().map_err(|e| format!("{e}"))?,
    ))
}

fn with_extra_headers(mut request: http::request::Builder) -> http::request::Builder {
    if let (Some(extra), Some(headers)) = (EXTRA_HEADERS.get(), request.headers_mut()) {
        headers.extend(extra.clone());
    }
    request
}

/// A reqwest client that sends the `--header` values.
pub(crate) fn http_client() -> reqwest::ClientBuilder {
    reqwest::Client::builder().default_headers(EXTRA_HEADERS.get().cloned().unwrap_or_default())
}

/// One measured point, as printed by `--json`.
#[derive(Serialize, Debug)]
pub struct Point {
    pub protocol: BenchProtocol,
    pub shared_memory: SharedMemory,
    pub mode: Mode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distribution: Option<Distribution>,
    pub batch: i64,
    /// Successful requests in the reported windows.
    pub requests: u64,
    pub errors: u64,
    /// `--mode rate`: scheduled requests not sent because `--max-outstanding` were in flight.
    pub dropped: u64,
    pub throughput_rps: f64,
    /// `throughput_rps` × batch.
    pub infer_per_sec: f64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// Windows measured in all, and whether the last three agreed.
    pub windows: usize,
    pub stable: bool,
    pub window_secs: f64,
    /// Seconds covered by the reported windows.
    pub measured_secs: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Server-side averages over the reported windows; absent when no statistics were
    /// readable.
    pub server: Option<ServerBreakdown>,
}

/// Average server-side time per request over the reported windows, from the statistics
/// extension.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ServerBreakdown {
    /// Successful requests the server counted.
    pub requests: u64,
    pub queue_us: f64,
    pub compute_input_us: f64,
    pub compute_infer_us: f64,
    pub compute_output_us: f64,
    /// Engine executions, and rows per execution (> 1 means dynamic batching formed batches).
    pub executions: u64,
    pub avg_batch_size: f64,
}

// ---------------------------------------------------------------------------------------------
// Sending requests

/// One way of sending the request, shared by every worker. Built once per run, so the
/// variants' size difference does not matter.
#[allow(clippy::large_enum_variant)]
enum Sender {
    Http {
        pool: HttpPool,
        body: Bytes,
        content_type: HeaderValue,
        /// Triton's `Inference-Header-Content-Length` for the binary tensor extension.
        header_len: Option<HeaderValue>,
    },
    Grpc(GrpcConns),
    InProcess {
        engine: InferenceService,
        request: InferRequest,
    },
}

impl Sender {
    /// Sends one request and reads the whole answer; `Err` carries a short reason. `slot` (a
    /// worker or request number) spreads requests over gRPC channels.
    async fn send(&self, slot: usize) -> Result<(), String> {
        match self {
            Sender::Http {
                pool,
                body,
                content_type,
                header_len,
            } => pool.post(body, content_type, header_len.as_ref()).await,
            Sender::Grpc(conns) => conns.call(slot).await,
            Sender::InProcess { engine, request } => engine
                .infer(request.clone())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        }
    }
}

type Conn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Keep-alive HTTP/1.1 connections to one server, reused by whichever request needs one: a
/// closed-loop worker keeps reusing the same few, an open-loop burst opens more. Leaner than a
/// general-purpose client (no URL parsing, redirect policy or timers per request), so that
/// the load generator's own CPU, which shares the machine with the server, stays small.
struct HttpPool {
    /// `host:port` to connect to.
    addr: String,
    host: HeaderValue,
    /// Origin-form request target, e.g. `/v2/models/add_sub/infer`.
    target: Uri,
    idle: Mutex<Vec<Conn>>,
}

impl HttpPool {
    fn new(base_url: &str, path: &str) -> anyhow::Result<Self> {
        let uri: Uri = base_url
            .parse()
            .with_context(|| format!("invalid URL '{base_url}'"))?;
        if uri.scheme_str() != Some("http") {
            bail!("the load generator sends plain http:// requests, not '{base_url}'");
        }
        let authority = uri
            .authority()
            .with_context(|| format!("no host in '{base_url}'"))?;
        let addr = format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(80));
        let target: Uri = format!("{}{path}", uri.path().trim_end_matches('/'))
            .parse()
            .with_context(|| format!("invalid request path '{path}'"))?;
        Ok(HttpPool {
            addr,
            host: HeaderValue::from_str(authority.as_str())?,
            target,
            idle: Mutex::new(Vec::new()),
        })
    }

    async fn connect(&self) -> Result<Conn, String> {
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.addr))?;
        let _ = tcp.set_nodelay(true);
        let (conn, driver) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP handshake with {}: {e}", self.addr))?;
        tokio::spawn(async move {
            let _ = driver.await;
        });
        Ok(conn)
    }

    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(conn) = idle.pop() {
            if !conn.is_closed() {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, conn: Conn) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(conn);
    }

    async fn post(
        &self,
        body: &Bytes,
        content_type: &HeaderValue,
        header_len: Option<&HeaderValue>,
    ) -> Result<(), String> {
        let (mut conn, reused) = match self.checkout() {
            Some(conn) => (conn, true),
            None => (self.connect().await?, false),
        };
        let mut outcome = self.exchange(&mut conn, body, content_type, header_len).await;
        if outcome.is_err() && reused {
            // A kept-alive connection the server has since closed: once more on a new one.
            conn = self.connect().await?;
            outcome = self.exchange(&mut conn, body, content_type, header_len).await;
        }
        let answer = outcome?;
        self.checkin(conn);
        answer
    }

    /// One request on `conn`. The outer `Err` is a transport failure (the connection is not
    /// reusable); the inner one an HTTP error status.
    async fn exchange(
        &self,
        conn: &mut Conn,
        body: &Bytes,
        content_type: &HeaderValue,
        header_len: Option<&HeaderValue>,
    ) -> Result<Result<(), String>, String> {
        conn.ready().await.map_err(|e| e.to_string())?;
        let mut request = http::Request::builder()
            .method(http::Method::POST)
            .uri(self.target.clone())
            .header(http::header::HOST, self.host.clone())
            .header(http::header::CONTENT_TYPE, content_type.clone());
        if let Some(n) = header_len {
            request = request.header("inference-header-content-length", n.clone());
        }
        let request = with_extra_headers(request)
            .body(Full::new(body.clone()))
            .map_err(|e| e.to_string())?;
        let response = conn.send_request(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(if status.is_success() {
            Ok(())
        } else {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            Err(format!("HTTP {status}: {text}"))
        })
    }
}

type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// gRPC unary `ModelInfer` calls made directly on HTTP/2 connections: the request message is
/// encoded once, gRPC framing included, and each answer is read and its `grpc-status` checked
/// without decoding the message. A general-purpose gRPC client re-encodes and decodes every
/// message and queues each call through a buffer task; on a machine whose cores the server
/// shares, that client cost would be measured as server throughput.
struct GrpcConns {
    addr: String,
    /// `http://host:port/inference.GRPCInferenceService/ModelInfer`
    uri: Uri,
    /// The framed request: compression flag, big-endian length, protobuf message.
    framed: Bytes,
    /// Requests are spread over these connections by slot; a closed one is replaced.
    conns: Vec<Mutex<H2>>,
}

impl GrpcConns {
    async fn new(url: &str, request: &pb::ModelInferRequest, connections: usize) -> anyhow::Result<Self> {
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

    async fn call(&self, slot: usize) -> Result<(), String> {
        let cell = &self.conns[slot % self.conns.len()];
        let mut conn = cell.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if conn.is_closed() {
            conn = Self::connect(&self.addr).await?;
            *cell.lock().unwrap_or_else(PoisonError::into_inner) = conn.clone();
        }
        conn.ready().await.map_err(|e| e.to_string())?;
        let request = with_extra_headers(http::Request::builder())
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

/// The request every worker sends with `--shared-memory system`, and the regions holding its
/// tensors.
struct ShmRequest {
    request: InferRequest,
    regions: BenchRegions,
}

async fn shm_request(args: &BenchArgs) -> anyhow::Result<ShmRequest> {
    if args.protocol.contains(&BenchProtocol::InProcess) {
        bail!("--shared-memory applies to http-json, http-binary and grpc, not in-process");
    }
    let http_url = args.http_url.trim_end_matches('/');
    let meta = http_metadata(&http_client().build()?, http_url, &args.model, None).await?;
    let request = random_request(&meta, None, args.batch);
    let regions = BenchRegions::create(http_url, &request).await?;
    Ok(ShmRequest { request, regions })
}

async fn sender_for(
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
                pool: HttpPool::new(http_url, &format!("/v2/models/{}/infer", args.model))?,
                body: shm.regions.http_body(&shm.request)?,
                content_type: HeaderValue::from_static("application/json"),
                header_len: None,
            },
            BenchProtocol::Grpc => {
                let request = shm.regions.grpc_request(grpc_request(&shm.request));
                Sender::Grpc(GrpcConns::new(&args.grpc_url, &request, grpc_channels).await?)
            }
            BenchProtocol::InProcess => bail!("--shared-memory does not apply to in-process"),
        });
    }
    Ok(match protocol {
        BenchProtocol::HttpJson | BenchProtocol::HttpBinary => {
            let client = http_client().build()?;
            let meta = http_metadata(&client, http_url, &args.model, None).await?;
            let binary = protocol == BenchProtocol::HttpBinary;
            let (body, header_len) = http_body(&random_request(&meta, None, args.batch), binary)?;
            Sender::Http {
                pool: HttpPool::new(http_url, &format!("/v2/models/{}/infer", args.model))?,
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
            Sender::Grpc(GrpcConns::new(&args.grpc_url, &request, grpc_channels).await?)
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

// ---------------------------------------------------------------------------------------------
// Recording

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 10 min at 3 significant digits; the bounds are constants, so this cannot fail.
    Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("constant histogram bounds are valid")
}

struct Shard {
    hist: Histogram<u64>,
    errors: u64,
}

/// Latencies and errors since the last [`Recorder::take`], sharded so that workers rarely
/// share a lock.
struct Recorder {
    shards: Vec<Mutex<Shard>>,
    dropped: AtomicU64,
    first_error: Mutex<Option<String>>,
}

/// What was recorded in one window.
struct Taken {
    hist: Histogram<u64>,
    errors: u64,
    dropped: u64,
}

impl Recorder {
    fn new(shards: usize) -> Self {
        Recorder {
            shards: (0..shards.max(1))
                .map(|_| {
                    Mutex::new(Shard {
                        hist: new_histogram(),
                        errors: 0,
                    })
                })
                .collect(),
            dropped: AtomicU64::new(0),
            first_error: Mutex::new(None),
        }
    }

    fn record(&self, shard: usize, result: Result<Duration, String>) {
        let mut s = self.shards[shard % self.shards.len()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(latency) => {
                let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
                s.hist.saturating_record(us);
            }
            Err(e) => {
                s.errors += 1;
                drop(s);
                let mut first = self.first_error.lock().unwrap_or_else(PoisonError::into_inner);
                if first.is_none() {
                    *first = Some(e);
                }
            }
        }
    }

    fn take(&self) -> Taken {
        let mut hist = new_histogram();
        let mut errors = 0;
        for shard in &self.shards {
            let mut s = shard.lock().unwrap_or_else(PoisonError::into_inner);
            // Same bounds on both sides, so adding cannot fail.
            let _ = hist.add(&s.hist);
            s.hist.reset();
            errors += std::mem::take(&mut s.errors);
        }
        Taken {
            hist,
            errors,
            dropped: self.dropped.swap(0, Ordering::Relaxed),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Schedules and stability (pure, unit-tested)

/// Intervals between scheduled sends in `--mode rate`.
pub struct Schedule {
    mean_secs: f64,
    distribution: Distribution,
    rng: StdRng,
}

impl Schedule {
    pub fn new(rate: f64, distribution: Distribution, seed: u64) -> anyhow::Result<Self> {
        if !rate.is_finite() || rate <= 0.0 {
            bail!("--rate must be a positive number of requests per second, got {rate}");
        }
        Ok(Schedule {
            mean_secs: 1.0 / rate,
            distribution,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    /// The time from one scheduled send to the next.
    pub fn next_interval(&mut self) -> Duration {
        let secs = match self.distribution {
            Distribution::Constant => self.mean_secs,
            Distribution::Poisson => {
                // Inverse transform: 1 - u lies in (0, 1], so the logarithm is finite.
                let u: f64 = self.rng.random();
                -(1.0 - u).ln() * self.mean_secs
            }
        };
        // A rate so low that the interval overflows a Duration just never sends again.
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
    }
}

/// The figures the stability rule compares.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowFigures {
    pub throughput: f64,
    pub p50_us: f64,
}

/// perf_analyzer's rule: stable when the last three windows all completed requests and, for
/// both throughput and p50 latency, max / min ≤ 1 + percent/100.
pub fn is_stable(windows: &[WindowFigures], percent: f64) -> bool {
    const STABILITY_WINDOWS: usize = 3;
    if windows.len() < STABILITY_WINDOWS {
        return false;
    }
    let last = &windows[windows.len() - STABILITY_WINDOWS..];
    let within = |values: &mut dyn Iterator<Item = f64>| {
        let (mut min, mut max) = (f64::INFINITY, 0.0f64);
        for v in values {
            if v.is_nan() || v <= 0.0 || v.is_infinite() {
                return false;
            }
            min = min.min(v);
            max = max.max(v);
        }
        max / min <= 1.0 + percent / 100.0
    };
    within(&mut last.iter().map(|w| w.throughput)) && within(&mut last.iter().map(|w| w.p50_us))
}

// ---------------------------------------------------------------------------------------------
// Server statistics

/// Sums of the statistics of every version of the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerTotals {
    success: u64,
    queue: (u64, u64),
    compute_input: (u64, u64),
    compute_infer: (u64, u64),
    compute_output: (u64, u64),
    inference_count: u64,
    execution_count: u64,
}

#[derive(Deserialize)]
struct StatsJson {
    #[serde(default)]
    model_stats: Vec<ModelStatJson>,
}

#[derive(Deserialize, Default)]
struct DurationJson {
    #[serde(default)]
    count: u64,
    #[serde(default)]
    ns: u64,
}

#[derive(Deserialize, Default)]
struct InferStatsJson {
    #[serde(default)]
    success: DurationJson,
    #[serde(default)]
    queue: DurationJson,
    #[serde(default)]
    compute_input: DurationJson,
    #[serde(default)]
    compute_infer: DurationJson,
    #[serde(default)]
    compute_output: DurationJson,
}

#[derive(Deserialize)]
struct ModelStatJson {
    #[serde(default)]
    inference_count: u64,
    #[serde(default)]
    execution_count: u64,
    #[serde(default)]
    inference_stats: InferStatsJson,
}

impl ServerTotals {
    /// From Triton's statistics JSON (`GET /v2/models/{m}/stats`).
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let stats: StatsJson = serde_json::from_str(text).context("malformed statistics")?;
        let mut t = ServerTotals::default();
        for m in stats.model_stats {
            let s = m.inference_stats;
            t.success += s.success.count;
            add(&mut t.queue, &s.queue);
            add(&mut t.compute_input, &s.compute_input);
            add(&mut t.compute_infer, &s.compute_infer);
            add(&mut t.compute_output, &s.compute_output);
            t.inference_count += m.inference_count;
            t.execution_count += m.execution_count;
        }
        Ok(t)
    }

    fn from_engine(stats: &[ModelStatistics]) -> Self {
        let mut t = ServerTotals::default();
        for m in stats {
            let s = &m.inference_stats;
            t.success += s.success.count;
            t.queue = (t.queue.0 + s.queue.count, t.queue.1 + s.queue.ns);
            t.compute_input = (
                t.compute_input.0 + s.compute_input.count,
                t.compute_input.1 + s.compute_input.ns,
            );
            t.compute_infer = (
                t.compute_infer.0 + s.compute_infer.count,
                t.compute_infer.1 + s.compute_infer.ns,
            );
            t.compute_output = (
                t.compute_output.0 + s.compute_output.count,
                t.compute_output.1 + s.compute_output.ns,
            );
            t.inference_count += m.inference_count;
            t.execution_count += m.execution_count;
        }
        t
    }

    /// Averages per request between two snapshots (`None` when nothing ran in between).
    pub fn breakdown_since(&self, before: &ServerTotals) -> Option<ServerBreakdown> {
        let avg_us = |after: (u64, u64), before: (u64, u64)| {
            let count = after.0.saturating_sub(before.0);
            if count == 0 {
                0.0
            } else {
                after.1.saturating_sub(before.1) as f64 / count as f64 / 1000.0
            }
        };
        let requests = self.success.saturating_sub(before.success);
        if requests == 0 {
            return None;
        }
        let executions = self.execution_count.saturating_sub(before.execution_count);
        let rows = self.inference_count.saturating_sub(before.inference_count);
        Some(ServerBreakdown {
            requests,
            queue_us: avg_us(self.queue, before.queue),
            compute_input_us: avg_us(self.compute_input, before.compute_input),
            compute_infer_us: avg_us(self.compute_infer, before.compute_infer),
            compute_output_us: avg_us(self.compute_output, before.compute_output),
            executions,
            avg_batch_size: if executions == 0 {
                0.0
            } else {
                rows as f64 / executions as f64
            },
        })
    }
}

fn add(acc: &mut (u64, u64), d: &DurationJson) {
    acc.0 += d.count;
    acc.1 += d.ns;
}

/// Where the server's statistics come from.
enum StatsSource {
    Http { client: reqwest::Client, url: String },
    InProcess(InferenceService),
    None,
}

impl StatsSource {
    async fn new(args: &BenchArgs, protocol: BenchProtocol, engine: Option<&InferenceService>) -> Self {
        if protocol == BenchProtocol::InProcess {
            return match engine {
                Some(e) => StatsSource::InProcess(e.clone()),
                None => StatsSource::None,
            };
        }
        let Ok(client) = http_client().timeout(Duration::from_secs(5)).build() else {
            return StatsSource::None;
        };
        let url = format!(
            "{}/v2/models/{}/stats",
            args.http_url.trim_end_matches('/'),
            args.model
        );
        let source = StatsSource::Http { client, url };
        match source.fetch().await {
            Ok(_) => source,
            Err(e) => {
                eprintln!("note: no server-side breakdown ({e:#})");
                StatsSource::None
            }
        }
    }

    async fn fetch(&self) -> anyhow::Result<ServerTotals> {
        match self {
            StatsSource::Http { client, url } => {
                let resp = client
                    .get(url.as_str())
                    .send()
                    .await
                    .with_context(|| format!("GET {url}"))?;
                let status = resp.status();
                let text = resp.text().await?;
                if !status.is_success() {
                    bail!("GET {url}: HTTP {status}");
                }
                ServerTotals::from_json(&text)
            }
            StatsSource::InProcess(engine) => {
                Ok(ServerTotals::from_engine(&engine.model_statistics(None, None)?))
            }
            StatsSource::None => bail!("no statistics source"),
        }
    }

    async fn snapshot(&self) -> Option<ServerTotals> {
        self.fetch().await.ok()
    }
}

// ---------------------------------------------------------------------------------------------
// Running one point

/// The load of one point.
#[derive(Debug, Clone, Copy)]
enum Load {
    Concurrency(usize),
    Rate {
        rate: f64,
        distribution: Distribution,
        seed: u64,
    },
}

#[derive(Debug, Clone)]
struct Measure {
    warmup: Duration,
    window: Duration,
    stability_percent: f64,
    max_windows: usize,
    /// One fixed window (`--duration`) instead of windows until stable.
    fixed: bool,
    max_outstanding: usize,
}

struct Window {
    hist: Histogram<u64>,
    errors: u64,
    dropped: u64,
    elapsed: Duration,
}

impl Window {
    fn figures(&self) -> WindowFigures {
        WindowFigures {
            throughput: self.hist.len() as f64 / self.elapsed.as_secs_f64().max(1e-9),
            p50_us: self.hist.value_at_quantile(0.5) as f64,
        }
    }
}

/// Starts the load; returns what to wait on when stopping.
fn start_load(
    sender: &Arc<Sender>,
    load: Load,
    max_outstanding: usize,
    recorder: &Arc<Recorder>,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<LoadHandle> {
    match load {
        Load::Concurrency(n) => {
            let tasks = (0..n.max(1))
                .map(|worker| {
                    let (sender, recorder, stop) =
                        (Arc::clone(sender), Arc::clone(recorder), Arc::clone(stop));
                    tokio::spawn(async move {
                        while !stop.load(Ordering::Relaxed) {
                            let t0 = Instant::now();
                            let result = sender.send(worker).await;
                            recorder.record(worker, result.map(|()| t0.elapsed()));
                        }
                    })
                })
                .collect();
            Ok(LoadHandle::Workers(tasks))
        }
        Load::Rate {
            rate,
            distribution,
            seed,
        } => {
            let mut schedule = Schedule::new(rate, distribution, seed)?;
            let in_flight = Arc::new(AtomicUsize::new(0));
            let handle = tokio::runtime::Handle::current();
            let (sender, recorder, stop, flight) = (
                Arc::clone(sender),
                Arc::clone(recorder),
                Arc::clone(stop),
                Arc::clone(&in_flight),
            );
            // A dedicated OS thread keeps the schedule: tokio's timer ticks in milliseconds,
            // too coarse for rates in the thousands per second. It never spins; a send due
            // while the thread was asleep late goes out at once (latency counts from when it
            // was due), so the schedule never drifts.
            let thread = std::thread::Builder::new()
                .name("bench-schedule".into())
                .spawn(move || {
                    let mut due = Instant::now();
                    let mut n = 0usize;
                    'schedule: while !stop.load(Ordering::Relaxed) {
                        let Some(next) = due.checked_add(schedule.next_interval()) else {
                            break;
                        };
                        due = next;
                        // Sleep in slices, so that stopping never waits for a long interval.
                        loop {
                            let now = Instant::now();
                            if due <= now {
                                break;
                            }
                            if stop.load(Ordering::Relaxed) {
                                break 'schedule;
                            }
                            std::thread::sleep((due - now).min(Duration::from_millis(50)));
                        }
                        if flight.load(Ordering::Relaxed) >= max_outstanding {
                            recorder.dropped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        flight.fetch_add(1, Ordering::Relaxed);
                        n = n.wrapping_add(1);
                        let (sender, recorder, flight) =
                            (Arc::clone(&sender), Arc::clone(&recorder), Arc::clone(&flight));
                        let scheduled = due;
                        handle.spawn(async move {
                            let result = sender.send(n).await;
                            recorder.record(n, result.map(|()| scheduled.elapsed()));
                            flight.fetch_sub(1, Ordering::Relaxed);
                        });
                    }
                })
                .context("cannot start the schedule thread")?;
            Ok(LoadHandle::Scheduled { thread, in_flight })
        }
    }
}

enum LoadHandle {
    Workers(Vec<tokio::task::JoinHandle<()>>),
    Scheduled {
        thread: std::thread::JoinHandle<()>,
        in_flight: Arc<AtomicUsize>,
    },
}

impl LoadHandle {
    /// Waits for the load to wind down after `stop` was set (bounded: stragglers are
    /// abandoned after `grace`).
    async fn finish(self, grace: Duration) {
        match self {
            LoadHandle::Workers(tasks) => {
                let deadline = tokio::time::Instant::now() + grace;
                for t in tasks {
                    let abort = t.abort_handle();
                    if tokio::time::timeout_at(deadline, t).await.is_err() {
                        abort.abort();
                    }
                }
            }
            LoadHandle::Scheduled { thread, in_flight } => {
                let _ = tokio::task::spawn_blocking(move || thread.join()).await;
                let deadline = Instant::now() + grace;
                while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
}

/// The outcome of one point's windows.
struct Measured {
    windows: Vec<Window>,
    server: Option<ServerBreakdown>,
    stable: bool,
    first_error: Option<String>,
}

async fn measure_point(
    sender: &Arc<Sender>,
    stats: &StatsSource,
    load: Load,
    m: &Measure,
) -> anyhow::Result<Measured> {
    let shards = match load {
        Load::Concurrency(n) => n.max(1),
        Load::Rate { .. } => 64,
    };
    let recorder = Arc::new(Recorder::new(shards));
    let stop = Arc::new(AtomicBool::new(false));
    let handle = start_load(sender, load, m.max_outstanding, &recorder, &stop)?;

    tokio::time::sleep(m.warmup).await;
    // The first statistics are read before the first window opens (the first read can be
    // slow: it connects), so the server's count never misses requests the client counts.
    let mut snapshots = vec![stats.snapshot().await];
    let _ = recorder.take();
    let mut boundary = Instant::now();
    let mut windows: Vec<Window> = Vec::new();
    let mut figures = Vec::new();
    let max_windows = if m.fixed { 1 } else { m.max_windows.max(3) };
    let mut stable = false;
    while windows.len() < max_windows {
        tokio::time::sleep_until((boundary + m.window).into()).await;
        let taken = recorder.take();
        let now = Instant::now();
        let w = Window {
            hist: taken.hist,
            errors: taken.errors,
            dropped: taken.dropped,
            elapsed: now - boundary,
        };
        boundary = now;
        snapshots.push(stats.snapshot().await);
        figures.push(w.figures());
        windows.push(w);
        if !m.fixed && is_stable(&figures, m.stability_percent) {
            stable = true;
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    handle.finish(Duration::from_secs(10)).await;

    let reported = if m.fixed { 1 } else { windows.len().min(3) };
    let first = windows.len() - reported;
    let server = match (&snapshots[first], &snapshots[windows.len()]) {
        (Some(before), Some(after)) => after.breakdown_since(before),
        _ => None,
    };
    let first_error = recorder
        .first_error
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    Ok(Measured {
        windows,
        server,
        stable: stable || m.fixed,
        first_error,
    })
}

fn summarize(
    protocol: BenchProtocol,
    shared_memory: SharedMemory,
    load: Load,
    batch: i64,
    m: &Measure,
    measured: Measured,
) -> Point {
    let Measured {
        windows,
        server,
        stable,
        first_error,
    } = measured;
    let reported = if m.fixed { 1 } else { windows.len().min(3) };
    let last = &windows[windows.len() - reported..];
    let mut hist = new_histogram();
    let (mut errors, mut dropped, mut secs) = (0, 0, 0.0);
    for w in last {
        let _ = hist.add(&w.hist);
        errors += w.errors;
        dropped += w.dropped;
        secs += w.elapsed.as_secs_f64();
    }
    let throughput = hist.len() as f64 / f64::max(secs, 1e-9);
    let (mode, concurrency, rate, distribution) = match load {
        Load::Concurrency(n) => (Mode::Concurrency, Some(n), None, None),
        Load::Rate {
            rate, distribution, ..
        } => (Mode::Rate, None, Some(rate), Some(distribution)),
    };
    Point {
        protocol,
        shared_memory,
        mode,
        concurrency,
        rate,
        distribution,
        batch,
        requests: hist.len(),
        errors,
        dropped,
        throughput_rps: throughput,
        infer_per_sec: throughput * batch as f64,
        mean_us: hist.mean(),
        p50_us: hist.value_at_quantile(0.5),
        p90_us: hist.value_at_quantile(0.9),
        p95_us: hist.value_at_quantile(0.95),
        p99_us: hist.value_at_quantile(0.99),
        max_us: hist.max(),
        windows: windows.len(),
        stable,
        window_secs: m.window.as_secs_f64(),
        measured_secs: secs,
        first_error,
        server,
    }
}

fn print_header() {
    println!(
        "{:<15} {:>9} {:>9} {:>6} {:>6} {:>10} {:>7} {:>7} {:>7} {:>7} {:>5}  {:>7} {:>7} {:>7} {:>7} {:>6}",
        "protocol",
        "load",
        "requests",
        "errors",
        "drop",
        "req/s",
        "p50µs",
        "p90µs",
        "p95µs",
        "p99µs",
        "win",
        "queue",
        "c_in",
        "infer",
        "c_out",
        "batch"
    );
}

fn print_row(p: &Point) -> anyhow::Result<()> {
    let mut name = serde_json::to_value(p.protocol)?
        .as_str()
        .unwrap_or_default()
        .to_string();
    if p.shared_memory == SharedMemory::System {
        name.push_str("+shm");
    }
    let load = match (p.concurrency, p.rate) {
        (Some(c), _) => format!("c={c}"),
        (None, Some(r)) => format!("r={r}"),
        _ => String::new(),
    };
    let win = format!("{}{}", p.windows, if p.stable { "" } else { "!" });
    let server = match &p.server {
        Some(s) => format!(
            "{:>7.0} {:>7.0} {:>7.0} {:>7.0} {:>6.2}",
            s.queue_us, s.compute_input_us, s.compute_infer_us, s.compute_output_us, s.avg_batch_size
        ),
        None => format!("{:>7} {:>7} {:>7} {:>7} {:>6}", "-", "-", "-", "-", "-"),
    };
    println!(
        "{:<15} {:>9} {:>9} {:>6} {:>6} {:>10.0} {:>7} {:>7} {:>7} {:>7} {:>5}  {server}",
        name,
        load,
        p.requests,
        p.errors,
        p.dropped,
        p.throughput_rps,
        p.p50_us,
        p.p90_us,
        p.p95_us,
        p.p99_us,
        win
    );
    if let Some(e) = &p.first_error {
        eprintln!("  first error: {e}");
    }
    Ok(())
}

fn positive_secs(name: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| anyhow::anyhow!("{name} must be a non-negative number of seconds, got {v}"))
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if !args.json {
        print_header();
    }
    let json = args.json;
    run_points(&args, |point| {
        if json {
            println!("{}", serde_json::to_string(point)?);
            Ok(())
        } else {
            print_row(point)
        }
    })
    .await
}

/// Measures every protocol × load and hands each point to `emit` as soon as it is measured.
async fn run_points(
    args: &BenchArgs,
    mut emit: impl FnMut(&Point) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let window = match args.duration {
        Some(d) => positive_secs("--duration", d)?,
        None => positive_secs("--window-secs", args.window_secs)?,
    };
    if window.is_zero() {
        bail!("the measurement window must be longer than zero");
    }
    let _ = EXTRA_HEADERS.set(args.headers.iter().cloned().collect());
    if args.batch < 1 {
        bail!("--batch must be at least 1, got {}", args.batch);
    }
    let m = Measure {
        warmup: positive_secs("--warmup", args.warmup)?,
        window,
        stability_percent: args.stability_percent,
        max_windows: args.max_windows,
        fixed: args.duration.is_some(),
        max_outstanding: args.max_outstanding.max(1),
    };
    let loads: Vec<Load> = match args.mode {
        Mode::Concurrency => args
            .concurrency
            .iter()
            .map(|&c| Load::Concurrency(c.max(1)))
            .collect(),
        Mode::Rate => {
            if args.rate.is_empty() {
                bail!("--mode rate needs --rate R[,R2...]");
            }
            let seed = args.seed.unwrap_or_else(|| rand::rng().random());
            args.rate
                .iter()
                .map(|&rate| {
                    Schedule::new(rate, args.distribution, seed)?;
                    Ok(Load::Rate {
                        rate,
                        distribution: args.distribution,
                        seed,
                    })
                })
                .collect::<anyhow::Result<_>>()?
        }
    };
    let engine = if args.protocol.contains(&BenchProtocol::InProcess) {
        if args.repository.is_empty() {
            bail!("--protocol in-process needs --model-repository");
        }
        let manager = ModelManager::new(
            crate::backends(),
            ManagerOptions {
                repositories: args.repository.clone(),
                ..ManagerOptions::default()
            },
        );
        let engine = InferenceService::new(manager, false);
        engine.load_models().await;
        Some(engine)
    } else {
        None
    };
    let grpc_channels = match (args.grpc_channels, args.mode) {
        (0, Mode::Concurrency) => args
            .concurrency
            .iter()
            .max()
            .copied()
            .unwrap_or(1)
            .div_ceil(8)
            .clamp(1, 16),
        (0, Mode::Rate) => 4,
        (n, _) => n,
    };
    let shm = match args.shared_memory {
        SharedMemory::None => None,
        SharedMemory::System => Some(shm_request(args).await?),
    };
    let measured = async {
        for &protocol in &args.protocol {
            let sender =
                Arc::new(sender_for(args, protocol, engine.as_ref(), grpc_channels, shm.as_ref()).await?);
            let stats = StatsSource::new(args, protocol, engine.as_ref()).await;
            for &load in &loads {
                let measured = measure_point(&sender, &stats, load, &m).await?;
                emit(&summarize(
                    protocol,
                    args.shared_memory,
                    load,
                    args.batch,
                    &m,
                    measured,
                ))?;
            }
        }
        anyhow::Ok(())
    }
    .await;
    if let Some(shm) = shm {
        shm.regions.release().await;
    }
    measured
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn w(throughput: f64, p50_us: f64) -> WindowFigures {
        WindowFigures { throughput, p50_us }
    }

    #[test]
    fn stability_needs_three_windows_within_the_percentage() {
        assert!(!is_stable(&[], 10.0));
        assert!(!is_stable(&[w(100.0, 10.0), w(100.0, 10.0)], 10.0));
        assert!(is_stable(&[w(100.0, 10.0), w(105.0, 10.5), w(109.9, 10.9)], 10.0));
        // Throughput spread 11 %.
        assert!(!is_stable(
            &[w(100.0, 10.0), w(105.0, 10.0), w(111.0, 10.0)],
            10.0
        ));
        // Latency spread 20 % with a flat throughput.
        assert!(!is_stable(
            &[w(100.0, 10.0), w(100.0, 12.0), w(100.0, 10.0)],
            10.0
        ));
        // Only the last three count.
        assert!(is_stable(
            &[w(10.0, 99.0), w(100.0, 10.0), w(101.0, 10.0), w(99.0, 10.0)],
            10.0
        ));
        assert!(!is_stable(
            &[w(100.0, 10.0), w(101.0, 10.0), w(99.0, 10.0), w(10.0, 99.0)],
            10.0
        ));
        // A window without completed requests is never stable.
        assert!(!is_stable(&[w(0.0, 0.0), w(0.0, 0.0), w(0.0, 0.0)], 10.0));
        // The percentage is a parameter.
        assert!(is_stable(&[w(100.0, 10.0), w(120.0, 10.0), w(110.0, 11.0)], 25.0));
        assert!(!is_stable(
            &[w(100.0, 10.0), w(120.0, 10.0), w(110.0, 11.0)],
            10.0
        ));
    }

    #[test]
    fn constant_schedule_has_equal_intervals() {
        let mut s = Schedule::new(1000.0, Distribution::Constant, 1).unwrap();
        for _ in 0..100 {
            assert_eq!(s.next_interval(), Duration::from_millis(1));
        }
        assert!(Schedule::new(0.0, Distribution::Constant, 1).is_err());
        assert!(Schedule::new(-5.0, Distribution::Poisson, 1).is_err());
        assert!(Schedule::new(f64::NAN, Distribution::Poisson, 1).is_err());
        // An absurdly low rate saturates instead of panicking.
        let mut s = Schedule::new(1e-300, Distribution::Constant, 1).unwrap();
        assert_eq!(s.next_interval(), Duration::MAX);
    }

    #[test]
    fn poisson_schedule_is_exponential_with_the_right_mean() {
        let rate = 2000.0;
        let mut s = Schedule::new(rate, Distribution::Poisson, 42).unwrap();
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| s.next_interval().as_secs_f64()).collect();
        assert!(xs.iter().all(|&x| x.is_finite() && x >= 0.0));
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        // Exponential: mean 1/rate, coefficient of variation 1, P(X > mean) = e^-1.
        assert!((mean * rate - 1.0).abs() < 0.01, "mean {mean}");
        assert!((var.sqrt() / mean - 1.0).abs() < 0.02, "cv {}", var.sqrt() / mean);
        let above = xs.iter().filter(|&&x| x > 1.0 / rate).count() as f64 / n as f64;
        assert!((above - (-1.0f64).exp()).abs() < 0.01, "P(X > mean) = {above}");
        // The same seed gives the same schedule; another seed another one.
        let mut a = Schedule::new(rate, Distribution::Poisson, 7).unwrap();
        let mut b = Schedule::new(rate, Distribution::Poisson, 7).unwrap();
        let mut c = Schedule::new(rate, Distribution::Poisson, 8).unwrap();
        let (va, vb, vc): (Vec<_>, Vec<_>, Vec<_>) = (0..10)
            .map(|_| (a.next_interval(), b.next_interval(), c.next_interval()))
            .fold((vec![], vec![], vec![]), |mut acc, (x, y, z)| {
                acc.0.push(x);
                acc.1.push(y);
                acc.2.push(z);
                acc
            });
        assert_eq!(va, vb);
        assert_ne!(va, vc);
    }

    #[test]
    fn server_breakdown_from_triton_statistics() {
        let before = ServerTotals::from_json(
            r#"{"model_stats":[{"name":"m","version":"1","inference_count":10,"execution_count":5,
                "inference_stats":{"success":{"count":10,"ns":1000000},"fail":{"count":0,"ns":0},
                "queue":{"count":10,"ns":100000},"compute_input":{"count":10,"ns":10000},
                "compute_infer":{"count":10,"ns":500000},"compute_output":{"count":10,"ns":20000}},
                "batch_stats":[]}]}"#,
        )
        .unwrap();
        let after = ServerTotals::from_json(
            r#"{"model_stats":[{"name":"m","version":"1","inference_count":110,"execution_count":30,
                "inference_stats":{"success":{"count":110,"ns":9000000},
                "queue":{"count":110,"ns":300000},"compute_input":{"count":110,"ns":110000},
                "compute_infer":{"count":110,"ns":2500000},"compute_output":{"count":110,"ns":220000}}},
               {"name":"m","version":"2","inference_count":0,"execution_count":0,"inference_stats":{}}]}"#,
        )
        .unwrap();
        let b = after.breakdown_since(&before).unwrap();
        assert_eq!(b.requests, 100);
        assert!((b.queue_us - 2.0).abs() < 1e-9);
        assert!((b.compute_input_us - 1.0).abs() < 1e-9);
        assert!((b.compute_infer_us - 20.0).abs() < 1e-9);
        assert!((b.compute_output_us - 2.0).abs() < 1e-9);
        assert_eq!(b.executions, 25);
        assert!((b.avg_batch_size - 4.0).abs() < 1e-9);
        assert!(before.breakdown_since(&before).is_none());
        assert!(ServerTotals::from_json("not json").is_err());
    }

    #[test]
    fn recorder_windows_take_and_reset() {
        let r = Recorder::new(4);
        for i in 0..100u64 {
            r.record(i as usize, Ok(Duration::from_micros(i + 1)));
        }
        r.record(3, Err("boom".into()));
        r.record(3, Err("second".into()));
        r.dropped.fetch_add(2, Ordering::Relaxed);
        let t = r.take();
        assert_eq!((t.hist.len(), t.errors, t.dropped), (100, 2, 2));
        assert_eq!(t.hist.value_at_quantile(0.5), 50);
        let t = r.take();
        assert_eq!((t.hist.len(), t.errors, t.dropped), (0, 0, 0));
        assert_eq!(r.first_error.lock().unwrap().as_deref(), Some("boom"));
    }

    fn args(cmdline: &str) -> BenchArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        <Cli as clap::Parser>::try_parse_from(std::iter::once("bench").chain(cmdline.split_whitespace()))
            .unwrap()
            .bench
    }

    fn examples() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/models")
    }

    /// The real server in this process, on ephemeral ports; dropping the sender stops it.
    async fn start_server() -> (
        String,
        String,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let options = oxserve_server::ServerOptions {
            host: "127.0.0.1".into(),
            http_port: 0,
            grpc_port: 0,
            metrics_port: None,
            http: Default::default(),
            grpc: Default::default(),
            exit_timeout: Duration::from_secs(5),
            shared_memory: true,
            shared_memory_registration: Default::default(),
            http_tls: None,
            grpc_tls: None,
            tls_reload_interval: None,
            access: Default::default(),
            max_inflight_bytes: None,
        };
        let engine = InferenceService::new(
            ModelManager::new(
                crate::backends(),
                ManagerOptions {
                    repositories: vec![examples()],
                    ..ManagerOptions::default()
                },
            ),
            true,
        );
        engine.load_models().await;
        let listeners = oxserve_server::Listeners::bind(&options).await.unwrap();
        let http = format!("http://{}", listeners.http_addr().unwrap());
        let grpc = format!("http://{}", listeners.grpc_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            oxserve_server::serve(engine, listeners, &options, shutdown)
                .await
                .unwrap();
        });
        (http, grpc, stop, task)
    }

    /// Every wire protocol against the real server: requests succeed, and the statistics
    /// endpoint gives the server-side breakdown; a request the server rejects counts as an
    /// error with its reason; a model that does not exist stops the run with a clear error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn measures_the_real_server_over_every_protocol() {
        let (http, grpc, stop, task) = start_server().await;
        let common = format!("--http-url {http} --grpc-url {grpc} --warmup 0.05 --duration 0.3");
        let mut points = Vec::new();
        let a = args(&format!(
            "{common} --model add_sub --protocol http-json,http-binary,grpc --concurrency 1,4"
        ));
        run_points(&a, |p| {
            points.push(serde_json::to_value(p)?);
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(points.len(), 6);
        for p in &points {
            assert!(p["requests"].as_u64().unwrap() > 10, "{p}");
            assert_eq!(p["errors"], 0, "{p}");
            let server = &p["server"];
            // The two sides count at slightly different instants around each boundary.
            let (client, counted) = (
                p["requests"].as_f64().unwrap(),
                server["requests"].as_f64().unwrap(),
            );
            assert!((counted - client).abs() <= 0.1 * client + 5.0, "{p}");
            assert!(server["compute_infer_us"].as_f64().unwrap() > 0.0, "{p}");
        }
        let protocols: Vec<_> = points.iter().map(|p| p["protocol"].as_str().unwrap()).collect();
        assert_eq!(
            protocols,
            [
                "http-json",
                "http-json",
                "http-binary",
                "http-binary",
                "grpc",
                "grpc"
            ]
        );

        // iris takes at most 8 rows a request: every request of 9 is refused.
        let mut refused = Vec::new();
        let a = args(&format!(
            "{common} --model iris --batch 9 --protocol http-json,grpc --mode rate --rate 200 --distribution poisson"
        ));
        run_points(&a, |p| {
            refused.push((p.requests, p.errors, p.first_error.clone()));
            Ok(())
        })
        .await
        .unwrap();
        for (requests, errors, first) in refused {
            assert_eq!(requests, 0);
            assert!(errors > 10, "{errors} errors");
            let first = first.unwrap();
            assert!(
                first.contains("400") || first.contains("InvalidArgument"),
                "{first}"
            );
        }

        let e = run_points(&args(&format!("{common} --model nope")), |_| Ok(()))
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("nope"), "{e:#}");
        let e = run_points(&args(&format!("{common} --model add_sub --batch 0")), |_| Ok(()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("--batch"), "{e}");

        drop(stop);
        task.await.unwrap();
    }

    /// The whole loop, in-process on the bundled add_sub model: both modes measure, the
    /// stability loop ends, and the engine's statistics give the server breakdown.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn measures_add_sub_in_process_in_both_modes() {
        let repo = examples();
        let engine = InferenceService::new(
            ModelManager::new(
                crate::backends(),
                ManagerOptions {
                    repositories: vec![repo],
                    ..ManagerOptions::default()
                },
            ),
            false,
        );
        engine.load_models().await;
        let meta = engine.model_metadata("add_sub", None).unwrap();
        let sender = Arc::new(Sender::InProcess {
            request: random_request(&meta, None, 1),
            engine: engine.clone(),
        });
        let stats = StatsSource::InProcess(engine.clone());
        let m = Measure {
            warmup: Duration::from_millis(50),
            window: Duration::from_millis(150),
            stability_percent: 1000.0,
            max_windows: 5,
            fixed: false,
            max_outstanding: 64,
        };
        let load = Load::Concurrency(2);
        let measured = measure_point(&sender, &stats, load, &m).await.unwrap();
        assert!(measured.stable, "a 1000 % band is met by the first three windows");
        assert_eq!(measured.windows.len(), 3);
        assert_eq!(measured.first_error, None);
        let p = summarize(
            BenchProtocol::InProcess,
            SharedMemory::None,
            load,
            1,
            &m,
            measured,
        );
        assert!(p.stable);
        assert!(p.requests > 0 && p.errors == 0 && p.throughput_rps > 0.0);
        assert!(p.p50_us <= p.p90_us && p.p90_us <= p.p95_us && p.p95_us <= p.p99_us);
        let s = p.server.unwrap();
        assert!(s.requests > 0 && s.executions > 0 && s.compute_infer_us > 0.0);

        let load = Load::Rate {
            rate: 500.0,
            distribution: Distribution::Poisson,
            seed: 3,
        };
        let fixed = Measure { fixed: true, ..m };
        let measured = measure_point(&sender, &stats, load, &fixed).await.unwrap();
        let p = summarize(
            BenchProtocol::InProcess,
            SharedMemory::None,
            load,
            1,
            &fixed,
            measured,
        );
        assert_eq!(p.windows, 1);
        // 500/s for 150 ms is about 75 requests; allow for a slow, shared machine.
        assert!((20..=150).contains(&p.requests), "{} requests", p.requests);
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["mode"], "rate");
        assert_eq!(json["distribution"], "poisson");
        assert!(json.get("concurrency").is_none());
    }
}
