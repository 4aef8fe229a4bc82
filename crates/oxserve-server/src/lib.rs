//! Listeners and lifecycle of a running server: bind the HTTP, gRPC and metrics ports, serve
//! the protocol front-ends over one engine, report health, and shut down gracefully.

mod auth;
mod guard;
mod inflight;
mod metrics;
mod process;
mod rate_limit;
mod request_id;
pub mod restricted;
mod routes;
pub mod tls;

pub use auth::{ApiKey, ApiKeys, KeyFileError, MIN_TOKEN_LEN, Scopes};
pub use guard::{Access, AccessPolicy, ClientAddress, GrpcWire, GuardLayer, HttpWire};
pub use inflight::{
    GRPC_WEIGHT, InflightBudget, InflightLayer, JSON_WEIGHT, MAX_DEFAULT_BUDGET, MIN_DEFAULT_BUDGET,
    default_budget_bytes,
};
pub use metrics::{
    ExtraMetrics, MetricsSource, OPENMETRICS_CONTENT_TYPE, metrics_router, metrics_router_with,
};
pub use process::{ProcessStats, process_registry};
pub use rate_limit::{MAX_TRACKED_CLIENTS, RateLimitRule, RateLimits};
pub use request_id::REQUEST_ID;
pub use routes::{ModelRef, Route, Scope, classify};

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context;
use oxserve_engine::InferenceService;
use oxserve_kserve::grpc::status::size_limit_as_resource_exhausted;
use oxserve_kserve::grpc::{GrpcOptions, grpc_service_with_options};
use oxserve_kserve::http::{HttpOptions, router};
use oxserve_shm::{RegistrationPolicy, SharedMemoryRegistry};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;

use crate::tls::{GRPC_ALPN, HTTP_ALPN, ReloadableTls, TlsFiles, TlsListener};

/// Where and how to listen.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub host: String,
    pub http_port: u16,
    pub grpc_port: u16,
    /// Port of the Prometheus `/metrics` endpoint; `None` = no metrics listener (Triton's
    /// `--allow-metrics false`).
    pub metrics_port: Option<u16>,
    pub http: HttpOptions,
    pub grpc: GrpcOptions,
    /// How long shutdown waits for in-flight requests and open connections before exiting
    /// anyway (Triton's `--exit-timeout-secs`).
    pub exit_timeout: std::time::Duration,
    /// Whether clients may register system shared-memory regions.
    pub shared_memory: bool,
    /// Which clients may register which objects (loopback, a key prefix).
    pub shared_memory_registration: RegistrationPolicy,
    /// TLS on the HTTP listener; `None` = plain HTTP. (Metrics stay plain HTTP.)
    pub http_tls: Option<TlsFiles>,
    /// TLS on the gRPC listener; `None` = plain gRPC.
    pub grpc_tls: Option<TlsFiles>,
    /// How often the TLS files are checked for changes; `None` = only on SIGHUP.
    pub tls_reload_interval: Option<std::time::Duration>,
    /// API keys, their scopes and rate limits, for every listener (default: all open).
    pub access: std::sync::Arc<AccessPolicy>,
    /// The in-flight byte budget (`--max-inflight-bytes`); `None`: [`default_budget_bytes`].
    pub max_inflight_bytes: Option<usize>,
    /// Also answer Prometheus scrapes at this path of the HTTP listener (TF Serving's
    /// `--monitoring_config_file` `prometheus_config { enable: true path: ... }`).
    pub http_metrics_path: Option<String>,
    /// TF Serving's gRPC services (served on the gRPC listener beside KServe's).
    pub tfserving_grpc: oxserve_tfserving::grpc::GrpcOptions,
    /// TF Serving's `--rest_api_timeout_in_ms` for its REST API's calls; `None`: no limit.
    pub tfserving_rest_timeout: Option<std::time::Duration>,
    /// Also serve every gRPC service on this Unix domain socket (TF Serving's
    /// `--grpc_socket_path`).
    pub grpc_unix_socket: Option<std::path::PathBuf>,
    /// More routes on the HTTP listener (TorchServe's inference API).
    pub extra_http_routes: Option<axum::Router>,
    /// More metric families rendered at each scrape (TorchServe's `ts_*`).
    pub extra_metrics: Option<ExtraMetrics>,
    /// What the HTTP listener answers for paths no protocol knows (default: KServe's 404);
    /// TorchServe mode answers in TorchServe's shape.
    pub http_fallback: Option<axum::Router>,
    /// More HTTP listeners, each with its own routes (TorchServe's management API), behind
    /// the same access checks and in-flight budget as the HTTP listener.
    pub extra_listeners: Vec<ExtraListener>,
    /// More gRPC services on the gRPC listener (TorchServe's inference API).
    pub extra_grpc: Option<ExtraGrpc>,
}

/// Adds gRPC services to the gRPC listener's routes.
#[derive(Clone)]
pub struct ExtraGrpc(pub Arc<dyn Fn(tonic::service::Routes) -> tonic::service::Routes + Send + Sync>);

impl std::fmt::Debug for ExtraGrpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExtraGrpc")
    }
}

/// An HTTP listener of its own (plain HTTP).
#[derive(Debug, Clone)]
pub struct ExtraListener {
    pub name: &'static str,
    pub port: u16,
    pub routes: axum::Router,
}

/// Bound sockets, so the caller can report the real ports (port 0 picks a free one) before
/// serving starts.
pub struct Listeners {
    http: TcpListener,
    grpc: TcpListener,
    metrics: Option<TcpListener>,
    extra: Vec<TcpListener>,
    http_tls: Option<Arc<ReloadableTls>>,
    grpc_tls: Option<Arc<ReloadableTls>>,
}

impl Listeners {
    /// Reads the TLS files (an unusable one fails here, before any port is bound) and binds.
    pub async fn bind(options: &ServerOptions) -> anyhow::Result<Self> {
        let load_tls = |listener, files: &Option<TlsFiles>, alpn| {
            files
                .clone()
                .map(|files| ReloadableTls::load(listener, files, alpn).map(Arc::new))
                .transpose()
        };
        let http_tls = load_tls("HTTP", &options.http_tls, HTTP_ALPN)?;
        let grpc_tls = load_tls("gRPC", &options.grpc_tls, GRPC_ALPN)?;
        let http = TcpListener::bind((options.host.as_str(), options.http_port))
            .await
            .with_context(|| format!("cannot listen for HTTP on {}:{}", options.host, options.http_port))?;
        let grpc = TcpListener::bind((options.host.as_str(), options.grpc_port))
            .await
            .with_context(|| format!("cannot listen for gRPC on {}:{}", options.host, options.grpc_port))?;
        let metrics = match options.metrics_port {
            None => None,
            Some(port) => Some(
                TcpListener::bind((options.host.as_str(), port))
                    .await
                    .with_context(|| format!("cannot listen for metrics on {}:{port}", options.host))?,
            ),
        };
        let mut extra = Vec::with_capacity(options.extra_listeners.len());
        for listener in &options.extra_listeners {
            extra.push(
                TcpListener::bind((options.host.as_str(), listener.port))
                    .await
                    .with_context(|| {
                        format!(
                            "cannot listen for {} on {}:{}",
                            listener.name, options.host, listener.port
                        )
                    })?,
            );
        }
        Ok(Listeners {
            http,
            grpc,
            metrics,
            extra,
            http_tls,
            grpc_tls,
        })
    }

    /// The extra listeners' addresses, in the order of `ServerOptions::extra_listeners`.
    pub fn extra_addrs(&self) -> std::io::Result<Vec<SocketAddr>> {
        self.extra.iter().map(TcpListener::local_addr).collect()
    }

    pub fn http_addr(&self) -> std::io::Result<SocketAddr> {
        self.http.local_addr()
    }

    pub fn grpc_addr(&self) -> std::io::Result<SocketAddr> {
        self.grpc.local_addr()
    }

    /// The metrics listener's address, if metrics are enabled.
    pub fn metrics_addr(&self) -> std::io::Result<Option<SocketAddr>> {
        self.metrics.as_ref().map(TcpListener::local_addr).transpose()
    }

    /// Whether the HTTP listener speaks TLS.
    pub fn http_tls(&self) -> bool {
        self.http_tls.is_some()
    }

    /// Whether the gRPC listener speaks TLS.
    pub fn grpc_tls(&self) -> bool {
        self.grpc_tls.is_some()
    }
}

type ServerFuture<E> = Pin<Box<dyn Future<Output = Result<(), E>> + Send>>;

/// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish and
/// returns.
pub async fn serve(
    engine: InferenceService,
    listeners: Listeners,
    options: &ServerOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(report_health(engine.clone(), health, stop_rx.clone()));

    // Shared-memory regions registered over either protocol serve requests on both.
    let shm = std::sync::Arc::new(if options.shared_memory {
        SharedMemoryRegistry::with_policy(options.shared_memory_registration.clone())
    } else {
        SharedMemoryRegistry::disabled()
    });
    // API keys and rate limits, checked before any handler runs (after the request id, so
    // refusals carry one too); counted in the metrics.
    let mut server_metrics = prometheus_client::registry::Registry::with_prefix("oxserve");
    let access = Access::new(options.access.clone(), &mut server_metrics);
    tokio::spawn(rate_limit_housekeeping(access.clone(), stop_rx.clone()));
    // One budget of request bytes in flight for both listeners, taken before bodies are read
    // (inside the guard: a refused key costs no budget).
    let budget = InflightBudget::new(options.max_inflight_bytes.unwrap_or_else(default_budget_bytes));
    tracing::info!(bytes = budget.limit(), "in-flight request byte budget");
    budget.register_metrics(&mut server_metrics);
    let metrics_source = MetricsSource::new(engine.metrics(), server_metrics, options.extra_metrics.clone());
    // Every HTTP protocol on one listener: KServe v2 (`/v2`) and TF Serving's REST API (`/v1`).
    let mut app =
        router(engine.clone(), options.http.clone(), shm.clone()).merge(oxserve_tfserving::rest::router(
            engine.clone(),
            oxserve_tfserving::rest::RestOptions {
                max_body_bytes: options.http.max_body_bytes,
                request_timeout: options.tfserving_rest_timeout,
            },
        ));
    if let Some(path) = &options.http_metrics_path {
        app = app.merge(metrics_source.router(path));
    }
    if let Some(routes) = &options.extra_http_routes {
        app = app.merge(routes.clone());
    }
    if let Some(fallback) = &options.http_fallback {
        app = app.fallback_service(fallback.clone());
    }
    // The extra listeners, behind the same checks as the HTTP listener.
    let extra_servers: Vec<_> = options
        .extra_listeners
        .iter()
        .zip(listeners.extra)
        .map(|(listener, tcp)| {
            let routes = listener
                .routes
                .clone()
                .layer(budget.http_layer(options.http.max_body_bytes))
                .layer(GuardLayer::new(access.clone(), HttpWire))
                .layer(request_id::request_id_layers())
                .into_make_service_with_connect_info::<SocketAddr>();
            let name = listener.name;
            let serve = axum::serve(tcp, routes).with_graceful_shutdown(stopped(stop_rx.clone()));
            tokio::spawn(async move {
                if let Err(e) = serve.await {
                    tracing::error!(listener = name, error = %e, "listener failed");
                }
            })
        })
        .collect();
    let app = app
        .layer(budget.http_layer(options.http.max_body_bytes))
        .layer(GuardLayer::new(access.clone(), HttpWire))
        .layer(request_id::request_id_layers());
    // Handlers and the guard's per-address rate limits see the client's address
    // (`ConnectInfo<SocketAddr>`) over TCP and TLS alike.
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    let http: ServerFuture<std::io::Error> = match listeners.http_tls.clone() {
        Some(tls) => Box::pin(
            // `tap_io` (a no-op here: the TLS listener sets TCP_NODELAY itself) is what lets
            // axum derive `ConnectInfo<SocketAddr>` from any listener with that address type.
            axum::serve(
                axum::serve::ListenerExt::tap_io(TlsListener::new(listeners.http, tls), |_| {}),
                app,
            )
            .with_graceful_shutdown(stopped(stop_rx.clone()))
            .into_future(),
        ),
        None => {
            let http_listener = axum::serve::ListenerExt::tap_io(listeners.http, |tcp| {
                // Small responses must not wait for Nagle's algorithm.
                let _ = tcp.set_nodelay(true);
            });
            Box::pin(
                axum::serve(http_listener, app)
                    .with_graceful_shutdown(stopped(stop_rx.clone()))
                    .into_future(),
            )
        }
    };

    let (prediction_service, model_service) = oxserve_tfserving::grpc::services(
        engine.clone(),
        oxserve_tfserving::grpc::GrpcOptions {
            max_message_bytes: options.grpc.max_message_bytes,
            ..options.tfserving_grpc.clone()
        },
    );
    let mut grpc_routes = tonic::service::Routes::new(health_service)
        .add_service(grpc_service_with_options(engine.clone(), options.grpc, shm))
        .add_service(prediction_service)
        .add_service(model_service);
    if let Some(extra) = &options.extra_grpc {
        grpc_routes = (extra.0)(grpc_routes);
    }
    let grpc_router = tonic::transport::Server::builder()
        .layer(request_id::request_id_layers())
        .layer(tower::util::MapResponseLayer::new(
            size_limit_as_resource_exhausted::<tonic::body::Body>,
        ))
        .layer(GuardLayer::new(access.clone(), GrpcWire))
        .layer(budget.grpc_layer(options.grpc.max_message_bytes))
        .add_routes(grpc_routes);
    // The same services on a Unix domain socket, beside the TCP listener.
    let grpc_unix: Option<ServerFuture<tonic::transport::Error>> = match &options.grpc_unix_socket {
        None => None,
        Some(path) => Some(Box::pin(
            grpc_router
                .clone()
                .serve_with_incoming_shutdown(unix_incoming(path)?, stopped(stop_rx.clone())),
        )),
    };
    let grpc: ServerFuture<tonic::transport::Error> = match listeners.grpc_tls.clone() {
        Some(tls) => Box::pin(grpc_router.serve_with_incoming_shutdown(
            tls::grpc_incoming(TlsListener::new(listeners.grpc, tls)),
            stopped(stop_rx.clone()),
        )),
        None => Box::pin(grpc_router.serve_with_incoming_shutdown(
            TcpIncoming::from(listeners.grpc).with_nodelay(Some(true)),
            stopped(stop_rx.clone()),
        )),
    };

    // Certificates reload on SIGHUP and when their files change, without a restart.
    let tls_sources: Vec<_> = [listeners.http_tls, listeners.grpc_tls]
        .into_iter()
        .flatten()
        .collect();
    tokio::spawn(tls::watch_certificates(
        tls_sources,
        options.tls_reload_interval,
        stopped(stop_rx.clone()),
    ));

    let metrics = listeners.metrics.map(|listener| {
        let router = metrics_source
            .router("/metrics")
            .fallback(|| async {
                (
                    axum::http::StatusCode::NOT_FOUND,
                    "not found: metrics are at /metrics\n",
                )
            })
            .layer(GuardLayer::new(access.clone(), HttpWire));
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stopped(stop_rx.clone()))
    });

    let engine_for_signal = engine.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        engine_for_signal.begin_shutdown();
        let _ = stop_tx.send(true);
    });

    let servers = async {
        tokio::join!(
            async { http.await.context("HTTP server failed") },
            async { grpc.await.context("gRPC server failed") },
            async {
                match grpc_unix {
                    Some(server) => server.await.context("gRPC server on the Unix socket failed"),
                    None => Ok(()),
                }
            },
            async {
                match metrics {
                    Some(server) => server.await.context("metrics server failed"),
                    None => Ok(()),
                }
            }
        )
    };
    // A client that never lets its connection close must not keep the process alive forever.
    let grace = options.exit_timeout;
    let deadline = async move {
        stopped(stop_rx).await;
        tokio::time::sleep(grace).await;
    };
    let servers = async {
        let results = servers.await;
        for task in extra_servers {
            let _ = task.await;
        }
        results
    };
    tokio::select! {
        (http_result, grpc_result, grpc_unix_result, metrics_result) = servers => {
            http_result?;
            grpc_result?;
            grpc_unix_result?;
            metrics_result?;
            tracing::info!("all connections closed");
        }
        () = deadline => {
            tracing::warn!(timeout_s = grace.as_secs_f64(), "exit timeout reached with connections still open; exiting");
        }
    }
    Ok(())
}

/// Connections accepted on a Unix domain socket at `path`. A file left there by an earlier
/// run is replaced (as gRPC's own `unix:` listener does); anything else there is an error.
fn unix_incoming(
    path: &std::path::Path,
) -> anyhow::Result<impl futures::Stream<Item = std::io::Result<tokio::net::UnixStream>> + use<>> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        anyhow::ensure!(
            meta.file_type().is_socket(),
            "gRPC socket path {} exists and is not a socket",
            path.display()
        );
        std::fs::remove_file(path).with_context(|| format!("cannot replace {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on the Unix socket {}", path.display()))?;
    tracing::info!(path = %path.display(), "gRPC listening on a Unix socket");
    Ok(futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    }))
}

/// Drops idle rate-limit buckets every few seconds, so memory follows the active clients.
async fn rate_limit_housekeeping(access: std::sync::Arc<Access>, mut stop: watch::Receiver<bool>) {
    if access.rate_limits().is_empty() {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => access.rate_limits().housekeeping(),
            _ = stop.changed() => return,
        }
    }
}

/// Keeps grpc.health.v1 in step with the engine's readiness.
async fn report_health(
    engine: InferenceService,
    reporter: tonic_health::server::HealthReporter,
    mut stop: watch::Receiver<bool>,
) {
    const SERVICES: [&str; 4] = [
        "",
        "inference.GRPCInferenceService",
        "tensorflow.serving.PredictionService",
        "tensorflow.serving.ModelService",
    ];
    let mut last: Option<bool> = None;
    loop {
        let ready = engine.is_ready() && !*stop.borrow();
        if last != Some(ready) {
            for service in SERVICES {
                let status = if ready {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter.set_service_status(service, status).await;
            }
            last = Some(ready);
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() && last == Some(false) {
            return;
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
