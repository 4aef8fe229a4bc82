//! The command line of `oxserve bench`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchProtocol {
    HttpJson,
    HttpBinary,
    Grpc,
    InProcess,
    /// TF Serving's REST API (`/v1/models/M:predict`, columnar JSON) on the HTTP URL.
    TfsRest,
    /// TF Serving's gRPC PredictionService/Predict on the gRPC URL.
    TfsGrpc,
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientKind {
    /// gRPC requests made directly on hyper's HTTP/2 connections, the message framed once:
    /// ~10 % less client CPU per request than tonic's client (BENCHMARKS.md).
    Lean,
    /// tonic's generated client, to measure the lean one against.
    Stock,
}

#[derive(Args)]
pub struct BenchArgs {
    /// HTTP base URL (http-json, http-binary; also where server statistics are read).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub(super) http_url: String,
    /// gRPC URL.
    #[arg(long, default_value = "http://127.0.0.1:8001")]
    pub(super) grpc_url: String,
    /// Repository for `in-process`.
    #[arg(long = "model-repository", value_name = "DIR")]
    pub(super) repository: Vec<PathBuf>,
    #[arg(long)]
    pub(super) model: String,
    /// Protocols to measure, in order (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "http-json")]
    pub(super) protocol: Vec<BenchProtocol>,
    /// Load mode.
    #[arg(long, value_enum, default_value = "concurrency")]
    pub(super) mode: Mode,
    /// Concurrency levels for `--mode concurrency` (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub(super) concurrency: Vec<usize>,
    /// Request rates (requests/s) for `--mode rate` (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub(super) rate: Vec<f64>,
    /// Intervals between requests in `--mode rate`.
    #[arg(long, value_enum, default_value = "constant")]
    pub(super) distribution: Distribution,
    /// Seed of the Poisson schedule (default: random).
    #[arg(long)]
    pub(super) seed: Option<u64>,
    /// `--mode rate`: requests in flight beyond which a scheduled request is dropped.
    #[arg(long, default_value_t = 1024)]
    pub(super) max_outstanding: usize,
    /// Length of one measurement window, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub(super) window_secs: f64,
    /// The last three windows are stable when max/min of their throughput and of their p50
    /// are both within this many percent.
    #[arg(long, default_value_t = 10.0)]
    pub(super) stability_percent: f64,
    /// Windows to try before reporting an unstable result.
    #[arg(long, default_value_t = 10)]
    pub(super) max_windows: usize,
    /// Measure one fixed window of this many seconds instead of windows until stable.
    #[arg(long)]
    pub(super) duration: Option<f64>,
    /// Warm-up time per point, seconds (not measured).
    #[arg(long, default_value_t = 1.0)]
    pub(super) warmup: f64,
    /// Batch size of each request.
    #[arg(long, default_value_t = 1)]
    pub(super) batch: i64,
    /// gRPC connections (HTTP/2) to spread requests over; 0 = one per 8 concurrent
    /// requests of the largest `--concurrency` (1 to 16; 4 in `--mode rate`).
    #[arg(long, default_value_t = 0)]
    pub(super) grpc_channels: usize,
    /// Where the tensors are: in the messages, or in system shared memory (as perf_analyzer's
    /// `--shared-memory`; HTTP and gRPC only). Regions are registered through `--http-url`,
    /// output regions sized from one probe request.
    #[arg(long, value_enum, default_value = "none")]
    pub(super) shared_memory: SharedMemory,
    /// gRPC client implementation (for measuring the load generator itself; HTTP always uses
    /// hyper-util's client).
    #[arg(long, value_enum, default_value = "lean")]
    pub(super) client: ClientKind,
    /// Print one JSON object per point instead of a table.
    #[arg(long)]
    pub(super) json: bool,
    /// An extra header on every request, e.g. an API key: `--header "authorization: Bearer T"`.
    #[arg(long = "header", value_name = "NAME: VALUE", value_parser = super::headers::parse_header)]
    pub(super) headers: Vec<(http::HeaderName, http::HeaderValue)>,
}
