//! `oxserve bench`: a closed-loop load generator. N workers each keep one request in flight
//! for a fixed time; latencies go into an HDR histogram. `--protocol in-process` calls the
//! engine facade directly, which is the baseline the server's overhead is measured against.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use oxserve_core::InferRequest;
use oxserve_engine::{InferenceService, ManagerOptions, ModelManager};
use oxserve_kserve::grpc::pb;
use serde::Serialize;

use crate::client::{grpc_metadata, grpc_request, http_body, http_metadata, random_request};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchProtocol {
    HttpJson,
    HttpBinary,
    Grpc,
    InProcess,
}

#[derive(Args)]
pub struct BenchArgs {
    /// HTTP base URL (http-json, http-binary).
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
    /// Concurrency levels (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    concurrency: Vec<usize>,
    /// Measurement time per point, seconds.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Warm-up time per point, seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Batch size of each request.
    #[arg(long, default_value_t = 1)]
    batch: i64,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Point {
    protocol: BenchProtocol,
    concurrency: usize,
    requests: u64,
    errors: u64,
    throughput_rps: f64,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
}

/// One way of sending the request, cheap to clone per worker. Built once per run, so the
/// variants' size difference does not matter.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
enum Sender {
    Http {
        client: reqwest::Client,
        url: String,
        body: bytes::Bytes,
        header_len: Option<usize>,
    },
    Grpc {
        client: pb::GrpcInferenceServiceClient<tonic::transport::Channel>,
        request: pb::ModelInferRequest,
    },
    InProcess {
        engine: InferenceService,
        request: InferRequest,
    },
}

impl Sender {
    async fn send(&mut self) -> bool {
        match self {
            Sender::Http {
                client,
                url,
                body,
                header_len,
            } => {
                let mut r = client.post(url.as_str()).body(body.clone());
                if let Some(n) = header_len {
                    r = r
                        .header("inference-header-content-length", *n)
                        .header("content-type", "application/octet-stream");
                } else {
                    r = r.header("content-type", "application/json");
                }
                match r.send().await {
                    Ok(resp) => resp.status().is_success() && resp.bytes().await.is_ok(),
                    Err(_) => false,
                }
            }
            Sender::Grpc { client, request } => client.model_infer(request.clone()).await.is_ok(),
            Sender::InProcess { engine, request } => engine.infer(request.clone()).await.is_ok(),
        }
    }
}

async fn sender_for(
    args: &BenchArgs,
    protocol: BenchProtocol,
    engine: Option<&InferenceService>,
) -> anyhow::Result<Sender> {
    let http_url = args.http_url.trim_end_matches('/');
    Ok(match protocol {
        BenchProtocol::HttpJson | BenchProtocol::HttpBinary => {
            let client = reqwest::Client::builder()
                .tcp_nodelay(true)
                .pool_max_idle_per_host(1024)
                .build()?;
            let meta = http_metadata(&client, http_url, &args.model, None).await?;
            let (body, header_len) = http_body(
                &random_request(&meta, None, args.batch),
                protocol == BenchProtocol::HttpBinary,
            )?;
            Sender::Http {
                client,
                url: format!("{http_url}/v2/models/{}/infer", args.model),
                body,
                header_len,
            }
        }
        BenchProtocol::Grpc => {
            let mut client = pb::GrpcInferenceServiceClient::connect(args.grpc_url.clone())
                .await
                .with_context(|| format!("cannot connect to {}", args.grpc_url))?;
            let meta = grpc_metadata(&mut client, &args.model, None).await?;
            let request = grpc_request(&random_request(&meta, None, args.batch));
            Sender::Grpc { client, request }
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

async fn measure(
    sender: &Sender,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<(Histogram<u64>, u64, Duration)> {
    let start = Instant::now();
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let mut sender = sender.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut errors = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let ok = sender.send().await;
                if t0 >= measure_from {
                    if ok {
                        hist.record(t0.elapsed().as_micros().max(1) as u64)?;
                    } else {
                        errors += 1;
                    }
                }
            }
            anyhow::Ok((hist, errors))
        }));
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await??;
        total.add(h)?;
        errors += e;
    }
    Ok((
        total,
        errors,
        Instant::now().saturating_duration_since(measure_from),
    ))
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
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
    let warmup = Duration::from_secs_f64(args.warmup);
    let duration = Duration::from_secs_f64(args.duration);
    if !args.json {
        println!(
            "{:<12} {:>5} {:>10} {:>7} {:>12} {:>9} {:>9} {:>9}",
            "protocol", "conc", "requests", "errors", "req/s", "p50 µs", "p90 µs", "p99 µs"
        );
    }
    for &protocol in &args.protocol {
        let sender = Arc::new(sender_for(&args, protocol, engine.as_ref()).await?);
        for &concurrency in &args.concurrency {
            let (hist, errors, elapsed) = measure(&sender, concurrency.max(1), warmup, duration).await?;
            let point = Point {
                protocol,
                concurrency,
                requests: hist.len(),
                errors,
                throughput_rps: hist.len() as f64 / elapsed.as_secs_f64().max(1e-9),
                p50_us: hist.value_at_quantile(0.5),
                p90_us: hist.value_at_quantile(0.9),
                p99_us: hist.value_at_quantile(0.99),
            };
            if args.json {
                println!("{}", serde_json::to_string(&point)?);
            } else {
                let name = serde_json::to_value(protocol)?
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                println!(
                    "{:<12} {:>5} {:>10} {:>7} {:>12.0} {:>9} {:>9} {:>9}",
                    name,
                    point.concurrency,
                    point.requests,
                    point.errors,
                    point.throughput_rps,
                    point.p50_us,
                    point.p90_us,
                    point.p99_us
                );
            }
        }
    }
    Ok(())
}
