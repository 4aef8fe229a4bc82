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

mod cpu;
mod grpc;
mod headers;
mod load;
mod options;
mod record;
mod report;
mod schedule;
mod sender;
mod server_stats;
mod shm;
mod stock;

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use oxserve_engine::{InferenceService, ManagerOptions, ModelManager};
use rand::Rng;

use load::{Load, Measure, measure_point};
pub use options::BenchArgs;
use options::{BenchProtocol, Mode, SharedMemory};
use report::{Point, print_header, print_row, summarize};
use schedule::Schedule;
use sender::{sender_for, shm_request};
use server_stats::StatsSource;

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
    headers::set_extra_headers(&args.headers);
    if window.is_zero() {
        bail!("the measurement window must be longer than zero");
    }
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
                    args.client,
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

    use std::path::PathBuf;

    use super::*;
    use crate::client::random_request;
    use options::Distribution;
    use sender::Sender;

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
            http_metrics_path: None,
            tfserving_grpc: Default::default(),
            tfserving_rest_timeout: None,
            grpc_unix_socket: None,
            extra_http_routes: None,
            extra_listeners: Vec::new(),
            extra_grpc: None,
            http_fallback: None,
            extra_metrics: None,
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

        // The stock clients (hyper-util's and tonic's) the lean ones are measured against
        // reach the same server; every point reports the client's own CPU per request.
        let mut stock = Vec::new();
        let a = args(&format!(
            "{common} --model add_sub --protocol http-binary,grpc --concurrency 4 --client stock"
        ));
        run_points(&a, |p| {
            stock.push(serde_json::to_value(p)?);
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(stock.len(), 2);
        for p in stock.iter().chain(&points) {
            assert!(p["requests"].as_u64().unwrap() > 10, "{p}");
            assert_eq!(p["errors"], 0, "{p}");
            assert!(p["client_cpu_us"].as_f64().is_some(), "{p}");
        }
        assert!(stock.iter().all(|p| p["client"] == "stock"));
        assert!(points.iter().all(|p| p["client"] == "lean"));

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
            options::ClientKind::Lean,
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
            options::ClientKind::Lean,
            SharedMemory::None,
            load,
            1,
            &fixed,
            measured,
        );
        assert_eq!(p.windows, 1);
        // 500/s over the window (about 75 requests in 150 ms). On a loaded machine the window
        // runs late and sends that fell behind go out at once, so the rate over the window's
        // real length is what is checked, with a margin for a slow, shared machine.
        let achieved = p.requests as f64 / p.measured_secs;
        assert!(
            p.requests >= 20 && (200.0..=1000.0).contains(&achieved),
            "{} requests in {} s",
            p.requests,
            p.measured_secs
        );
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["mode"], "rate");
        assert_eq!(json["distribution"], "poisson");
        assert!(json.get("concurrency").is_none());
    }
}
