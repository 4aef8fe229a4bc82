//! The `oxserve` command: run the server, inspect a model repository, send a request, or
//! generate load.

mod allocator;
mod bench;
mod client;
mod logging;
mod settings;
mod tfserving_cli;
mod torchserve_cli;
mod trace_flags;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use oxserve_backend::Backend;
use oxserve_engine::{InferenceService, ManagerOptions, ModelManager};
use oxserve_kserve::grpc::GrpcOptions;
use oxserve_kserve::http::HttpOptions;
use oxserve_server::{Listeners, ServerOptions};
use settings::Settings;

#[derive(Parser)]
#[command(
    name = "oxserve",
    version,
    about = "A production model server for ONNX, TensorFlow and PyTorch models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the models of one or more repositories over KServe v2 HTTP and gRPC.
    Serve(Box<ServeArgs>),
    /// Load a repository and print what would serve, with the reason for each failure.
    Models(ModelsArgs),
    /// Send one inference request to a running server and print the result.
    Infer(client::InferArgs),
    /// Generate load against a server (or the engine in-process) and report latency.
    Bench(bench::BenchArgs),
    /// Point a model's version label, or its default version, back at the previous version.
    Rollback(RollbackArgs),
}

#[derive(Args)]
struct RollbackArgs {
    /// The model.
    model: String,
    /// Roll this version label back; without it, the version requests without a version get.
    #[arg(long)]
    label: Option<String>,
    /// The server's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// An extra header, e.g. an API key with the repository scope:
    /// `--header "authorization: Bearer T"`.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
}

/// `oxserve rollback`: the repository extension's rollback request; prints where the label
/// (or the default) points now.
async fn rollback(args: RollbackArgs) -> anyhow::Result<()> {
    let mut headers = reqwest::header::HeaderMap::new();
    for h in &args.headers {
        let (name, value) = h.split_once(':').context("--header needs NAME: VALUE")?;
        headers.insert(
            reqwest::header::HeaderName::from_bytes(name.trim().as_bytes())?,
            reqwest::header::HeaderValue::from_str(value.trim())?,
        );
    }
    let client = reqwest::Client::builder().default_headers(headers).build()?;
    let url = format!(
        "{}/v2/repository/models/{}/rollback",
        args.url.trim_end_matches('/'),
        args.model
    );
    let response = client
        .post(&url)
        .json(&serde_json::json!({ "label": args.label }))
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("{status}: {}", body["error"].as_str().unwrap_or("(no message)"));
    }
    let target = args
        .label
        .map_or("the default version".to_string(), |l| format!("label '{l}'"));
    println!(
        "{}: {target} now points at version {}",
        args.model,
        body["version"].as_str().unwrap_or("?")
    );
    Ok(())
}

#[derive(Args)]
struct ServeArgs {
    /// Model repository directory (repeatable). Triton's `--model-store` works too.
    #[arg(long = "model-repository", alias = "model-store", value_name = "DIR")]
    model_repository: Vec<PathBuf>,
    /// Address to listen on.
    #[arg(long, alias = "http-address")]
    host: Option<String>,
    /// HTTP port (0 picks a free port).
    #[arg(long)]
    http_port: Option<u16>,
    /// gRPC port (0 picks a free port).
    #[arg(long)]
    grpc_port: Option<u16>,
    /// Prometheus metrics port, serving GET /metrics (0 picks a free port).
    #[arg(long)]
    metrics_port: Option<u16>,
    /// Serve Prometheus metrics at all.
    #[arg(long, value_name = "BOOL")]
    allow_metrics: Option<bool>,
    /// Let clients register system shared-memory regions (Triton's extension).
    #[arg(long, value_name = "BOOL")]
    allow_shared_memory: Option<bool>,
    /// Clients may register only shared-memory objects whose names start with this prefix
    /// (leading slashes ignored; "" = any name, as in Triton). Default: oxserve.
    #[arg(long, value_name = "PREFIX")]
    shared_memory_prefix: Option<String>,
    /// Accept shared-memory registrations from clients that are not on the loopback interface.
    #[arg(long, value_name = "BOOL")]
    allow_remote_shared_memory: Option<bool>,
    /// Largest HTTP request body / gRPC message in bytes (Triton: --http-max-input-size).
    #[arg(long, visible_alias = "http-max-input-size")]
    max_input_size: Option<usize>,
    /// Budget of request bytes in flight across all connections; over it requests get 429 /
    /// RESOURCE_EXHAUSTED. Default: a quarter of the memory limit, 384 MiB to 16 GiB.
    #[arg(long, value_name = "BYTES")]
    max_inflight_bytes: Option<usize>,
    /// Most BYTES elements decoded per infer request (default 1048576); more is a 400.
    #[arg(long)]
    max_bytes_elements: Option<usize>,
    /// Report ready only when every model is ready.
    #[arg(long, value_name = "BOOL")]
    strict_readiness: Option<bool>,
    /// Triton's model control mode: none (load everything at start-up), poll (and apply
    /// repository changes every --repository-poll-secs) or explicit (--load-model at start-up,
    /// then the load and unload requests).
    #[arg(long, value_name = "MODE")]
    model_control_mode: Option<String>,
    /// Poll mode: seconds between repository scans (default 15).
    #[arg(long, value_name = "SECS")]
    repository_poll_secs: Option<u64>,
    /// Explicit mode: a model to load at start-up (repeatable; `*` loads every model).
    #[arg(long = "load-model", value_name = "NAME")]
    load_model: Vec<String>,
    /// Keep reporting ready while versions load in the background (load requests, poll
    /// reloads), so Kubernetes does not restart a pod that still serves (default: false).
    #[arg(long, value_name = "BOOL")]
    ready_while_loading: Option<bool>,
    /// Exit at start-up when any model fails to load (default: false; true when invoked as
    /// `tritonserver`, as in Triton).
    #[arg(long, value_name = "BOOL")]
    exit_on_error: Option<bool>,
    /// Seconds shutdown waits for in-flight requests before exiting anyway.
    #[arg(long)]
    exit_timeout_secs: Option<u64>,
    /// Configuration file (default: ./oxserve.toml when present).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long)]
    log_format: Option<String>,
    /// The ONNX Runtime shared library (libonnxruntime.so). Default: ORT_DYLIB_PATH, else the
    /// `onnxruntime` package of the project's .venv (see docs/backends.md).
    #[arg(long, value_name = "PATH")]
    onnxruntime_library: Option<PathBuf>,
    /// TensorFlow's C API library (libtensorflow_cc.so.2, or its directory). Default:
    /// OXSERVE__BACKENDS__TENSORFLOW_LIBRARY, else where scripts/setup-tensorflow.sh puts it.
    #[arg(long, value_name = "PATH")]
    tensorflow_library: Option<PathBuf>,
    /// API key file (TOML `[[keys]]` with name, token or token_sha256, scopes); with keys,
    /// every endpoint but health needs `Authorization: Bearer <token>` (docs/security.md).
    #[arg(long, value_name = "FILE")]
    api_keys: Option<PathBuf>,
    /// Whether health endpoints need a key too once keys are configured.
    #[arg(long, value_name = "BOOL")]
    health_requires_key: Option<bool>,
    /// Triton: `<api>[,<api>...]:<key>=<value>`: HTTP requests to those API groups (health,
    /// metadata, inference, shared-memory, model-config, model-repository, statistics, trace,
    /// logging) must carry the header `<key>: <value>` (repeatable).
    #[arg(long, value_name = "APIS:KEY=VALUE")]
    http_restricted_api: Vec<String>,
    /// Triton: the same for gRPC; the metadata key is `triton-grpc-protocol-<key>`.
    #[arg(long, value_name = "APIS:KEY=VALUE")]
    grpc_restricted_protocol: Vec<String>,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    trace: trace_flags::TraceArgs,
}

/// TLS for the HTTP and gRPC listeners (docs/security.md); the metrics port stays plain.
#[derive(Args)]
struct TlsArgs {
    /// Serve HTTP and gRPC over TLS with this certificate chain (PEM, leaf first).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by these CAs (PEM): mutual TLS on both listeners.
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// Triton: serve gRPC over TLS.
    #[arg(long, value_name = "BOOL", value_parser = clap::builder::BoolishValueParser::new())]
    grpc_use_ssl: Option<bool>,
    /// Triton: require client certificates on gRPC (implies --grpc-use-ssl).
    #[arg(long, value_name = "BOOL", value_parser = clap::builder::BoolishValueParser::new())]
    grpc_use_ssl_mutual: Option<bool>,
    /// Triton: the gRPC certificate (PEM), instead of --tls-cert.
    #[arg(long, value_name = "FILE")]
    grpc_server_cert: Option<PathBuf>,
    /// Triton: the gRPC private key (PEM), instead of --tls-key.
    #[arg(long, value_name = "FILE")]
    grpc_server_key: Option<PathBuf>,
    /// Triton: CA (PEM) for gRPC client certificates, with --grpc-use-ssl-mutual.
    #[arg(long, value_name = "FILE")]
    grpc_root_cert: Option<PathBuf>,
}

impl TlsArgs {
    /// Flags override the file and environment, one setting at a time.
    fn apply(self, tls: &mut settings::TlsSettings) {
        let set = |target: &mut Option<PathBuf>, flag: Option<PathBuf>| {
            if flag.is_some() {
                *target = flag;
            }
        };
        set(&mut tls.cert, self.tls_cert);
        set(&mut tls.key, self.tls_key);
        set(&mut tls.client_ca, self.tls_client_ca);
        set(&mut tls.grpc.server_cert, self.grpc_server_cert);
        set(&mut tls.grpc.server_key, self.grpc_server_key);
        set(&mut tls.grpc.root_cert, self.grpc_root_cert);
        tls.grpc.use_ssl = self.grpc_use_ssl.or(tls.grpc.use_ssl);
        tls.grpc.use_ssl_mutual = self.grpc_use_ssl_mutual.or(tls.grpc.use_ssl_mutual);
    }
}

#[derive(Args)]
struct ModelsArgs {
    /// Model repository directories.
    #[arg(required = true, value_name = "DIR")]
    repositories: Vec<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// The ONNX Runtime shared library, as for `serve`.
    #[arg(long, value_name = "PATH")]
    onnxruntime_library: Option<PathBuf>,
    /// TensorFlow's C API library, as for `serve`.
    #[arg(long, value_name = "PATH")]
    tensorflow_library: Option<PathBuf>,
}

/// Invoked under this name (a link or copy of the binary), oxserve takes Triton's command
/// line: `tritonserver --model-repository=/models ...` is `oxserve serve ...` with Triton's
/// defaults (docs/model-repository.md, "Running as tritonserver").
const TRITONSERVER: &str = "tritonserver";

fn invoked_as(name: &str) -> bool {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n == name))
        .unwrap_or(false)
}

/// Triton's command line as `oxserve serve`: its flags are ours (the same names), Triton's
/// `--exit-on-error` default (true) applies, and any flag we do not honour is refused.
fn tritonserver_cli() -> Cli {
    let args = std::iter::once(std::ffi::OsString::from(TRITONSERVER))
        .chain(std::iter::once(std::ffi::OsString::from("serve")))
        .chain(std::env::args_os().skip(1));
    match Cli::try_parse_from(args) {
        Ok(mut cli) => {
            if let Command::Serve(serve) = &mut cli.command {
                serve.exit_on_error = serve.exit_on_error.or(Some(true));
            }
            cli
        }
        Err(e) if e.kind() == clap::error::ErrorKind::UnknownArgument => {
            let _ = e.print();
            eprintln!(
                "note: oxserve running as tritonserver honours the Triton flags listed in docs/model-repository.md \
                 (\"Running as tritonserver\"); this one is not among them"
            );
            std::process::exit(2);
        }
        Err(e) => e.exit(),
    }
}

fn main() -> std::process::ExitCode {
    disable_onnxruntime_telemetry();
    oxserve_engine::set_memory_release_hook(allocator::release_freed_memory);
    if invoked_as(tfserving_cli::TENSORFLOW_MODEL_SERVER) {
        let args = tfserving_cli::parse();
        return exit_code(tfserving_cli::run(args));
    }
    if invoked_as(torchserve_cli::TORCHSERVE) {
        let args = torchserve_cli::parse();
        return exit_code(torchserve_cli::run(args));
    }
    let cli = if invoked_as(TRITONSERVER) {
        tritonserver_cli()
    } else {
        Cli::parse()
    };
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Models(args) => models(args),
        Command::Infer(args) => runtime().and_then(|rt| rt.block_on(client::run(args))),
        Command::Bench(args) => runtime().and_then(|rt| rt.block_on(bench::run(args))),
        Command::Rollback(args) => runtime().and_then(|rt| rt.block_on(rollback(args))),
    };
    exit_code(result)
}

fn exit_code(result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    runtime_with(None)
}

/// The async runtime with `workers` worker threads (default: one per core).
fn runtime_with(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers.filter(|n| *n > 0) {
        builder.worker_threads(n);
    }
    builder
        // After a model is unloaded each worker gives back the pages its own heap freed.
        .on_thread_park(allocator::collect_after_release)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn init_logging(format: &str, level: &str) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    // A plain level (`info`, `debug`, ...) becomes Triton's switchable settings; directives
    // (`OXSERVE_LOG`, or `--log-level oxserve=debug,h2=info`) stay a fixed ceiling under them.
    let (control, ceiling) = match (
        std::env::var("OXSERVE_LOG"),
        logging::DynamicLog::from_level(level),
    ) {
        (Err(_), Some(control)) => (control, None),
        (directives, _) => {
            let filter = match directives {
                Ok(d) => EnvFilter::try_new(d),
                Err(_) => EnvFilter::try_new(level),
            }
            .context("invalid log level")?;
            (logging::DynamicLog::permissive(), Some(filter))
        }
    };
    let control = Arc::new(control);
    let switch = control.clone();
    let switchable = tracing_subscriber::filter::dynamic_filter_fn(move |meta, _| switch.enabled(meta));
    use std::io::IsTerminal;
    let output = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let output = match format {
        "json" => output.json().with_filter(switchable).boxed(),
        "text" => output.with_filter(switchable).boxed(),
        other => anyhow::bail!("unknown log format '{other}' (use text or json)"),
    };
    tracing_subscriber::registry().with(ceiling).with(output).init();
    oxserve_kserve::logging::install(control);
    Ok(())
}

/// ONNX Runtime (loaded later, when a model needs it) writes usage data and a device id under
/// the system temp directory and `~/.cache` unless `ORT_DISABLE_TELEMETRY` is set; a server
/// must not. An explicit setting from the caller is kept.
#[allow(unsafe_code)]
fn disable_onnxruntime_telemetry() {
    if std::env::var_os("ORT_DISABLE_TELEMETRY").is_none() {
        // SAFETY: called first thing in `main`, before the async runtime, the loggers or any
        // other thread exist, so nothing reads or writes the environment concurrently.
        unsafe { std::env::set_var("ORT_DISABLE_TELEMETRY", "1") };
    }
    // TensorFlow logs every kernel registration and oneDNN notice at INFO to stderr; keep
    // its warnings and errors (an operator can still set the variable).
    if std::env::var_os("TF_CPP_MIN_LOG_LEVEL").is_none() {
        // SAFETY: as above, before any other thread exists.
        unsafe { std::env::set_var("TF_CPP_MIN_LOG_LEVEL", "1") };
    }
}

/// The engines compiled into this binary, with the ONNX Runtime library from
/// `ORT_DYLIB_PATH` or auto-detection.
fn backends() -> Vec<Arc<dyn Backend>> {
    backends_with(&settings::BackendSettings::default())
}

/// The engines compiled into this binary. ONNX Runtime and TensorFlow are always registered;
/// whether their libraries load is decided when the first model needs them (the configured
/// path first, then the environment, then auto-detection).
fn backends_with(settings: &settings::BackendSettings) -> Vec<Arc<dyn Backend>> {
    #[allow(unused_mut)]
    let mut backends: Vec<Arc<dyn Backend>> = vec![
        Arc::new(oxserve_tract::TractBackend::new()),
        Arc::new(oxserve_onnxruntime::OrtBackend::new(
            oxserve_onnxruntime::OrtOptions {
                library: settings.onnxruntime_library.clone(),
            },
        )),
        Arc::new(oxserve_tensorflow::TfBackend::new(
            oxserve_tensorflow::TfOptions {
                library: settings.tensorflow_library.clone(),
                intra_op_threads: settings.tensorflow_intra_op_parallelism,
                inter_op_threads: settings.tensorflow_inter_op_parallelism,
            },
        )),
    ];
    // TorchServe's custom Python handlers, in TorchServe's own Python workers.
    backends.push(Arc::new(oxserve_torchserve::worker::PythonBackend::new(
        settings
            .torchserve_python
            .clone()
            .unwrap_or_else(oxserve_torchserve::worker::default_python),
    )));
    // TorchScript on libtorch; only in `--features torch` builds (they need libtorch).
    #[cfg(feature = "torch")]
    backends.push(Arc::new(oxserve_torch::TorchBackend::new()));
    // Test models (slow, failing) for the end-to-end tests; only in `--features testkit` builds.
    #[cfg(feature = "testkit")]
    backends.push(Arc::new(oxserve_backend::testkit::TestkitBackend::new()));
    backends
}

/// Set when `--exit-on-error` stops the server because a model failed to load at start-up.
static START_UP_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut settings = Settings::load(args.config.as_deref())?;
    if !args.model_repository.is_empty() {
        settings.models.repositories = args.model_repository;
    }
    let s = &mut settings.server;
    s.host = args.host.unwrap_or(std::mem::take(&mut s.host));
    s.http_port = args.http_port.unwrap_or(s.http_port);
    s.grpc_port = args.grpc_port.unwrap_or(s.grpc_port);
    s.metrics_port = args.metrics_port.unwrap_or(s.metrics_port);
    s.allow_metrics = args.allow_metrics.unwrap_or(s.allow_metrics);
    s.allow_shared_memory = args.allow_shared_memory.unwrap_or(s.allow_shared_memory);
    if let Some(prefix) = args.shared_memory_prefix {
        s.shared_memory_prefix = prefix;
    }
    s.allow_remote_shared_memory = args
        .allow_remote_shared_memory
        .unwrap_or(s.allow_remote_shared_memory);
    s.max_input_size = args.max_input_size.unwrap_or(s.max_input_size);
    s.max_inflight_bytes = args.max_inflight_bytes.or(s.max_inflight_bytes);
    s.max_bytes_elements = args.max_bytes_elements.unwrap_or(s.max_bytes_elements);
    s.exit_timeout_secs = args.exit_timeout_secs.unwrap_or(s.exit_timeout_secs);
    settings.models.strict_readiness = args.strict_readiness.unwrap_or(settings.models.strict_readiness);
    if let Some(mode) = args.model_control_mode {
        settings.models.control_mode = mode;
    }
    settings.models.poll_secs = args.repository_poll_secs.unwrap_or(settings.models.poll_secs);
    if !args.load_model.is_empty() {
        settings.models.load = args.load_model;
    }
    settings.models.exit_on_error = args.exit_on_error.unwrap_or(settings.models.exit_on_error);
    settings.models.ready_while_loading = args
        .ready_while_loading
        .unwrap_or(settings.models.ready_while_loading);
    if let Some(library) = args.onnxruntime_library {
        settings.backends.onnxruntime_library = Some(library);
    }
    if let Some(library) = args.tensorflow_library {
        settings.backends.tensorflow_library = Some(library);
    }
    if let Some(f) = args.log_format {
        settings.log.format = f;
    }
    args.tls.apply(&mut settings.tls);
    settings.auth.api_keys = args.api_keys.or(settings.auth.api_keys);
    settings.auth.health_requires_key = args
        .health_requires_key
        .unwrap_or(settings.auth.health_requires_key);
    if !args.http_restricted_api.is_empty() {
        settings.auth.http_restricted_api = args.http_restricted_api;
    }
    if !args.grpc_restricted_protocol.is_empty() {
        settings.auth.grpc_restricted_protocol = args.grpc_restricted_protocol;
    }
    init_logging(&settings.log.format, &settings.log.level)?;
    if settings.models.repositories.is_empty() {
        anyhow::bail!("no model repository given (use --model-repository DIR)");
    }
    let trace = match args.trace.given() {
        true => Some(args.trace.config().map_err(anyhow::Error::msg)?),
        false => None,
    };
    run_server(
        settings,
        ServeExtras {
            trace,
            ..ServeExtras::default()
        },
    )
}

/// What a server runs besides its settings: TF Serving's model list and monitoring path.
#[derive(Default)]
struct ServeExtras {
    /// Models defined by a list rather than repository directories.
    listed_models: Vec<oxserve_engine::ListedModel>,
    /// Prometheus scrapes on the HTTP listener at this path.
    http_metrics_path: Option<String>,
    /// Re-reads the model list every interval and applies it when it changed.
    model_list_poll: Option<(std::time::Duration, ModelListSource)>,
    /// How TF Serving's config reload serves the models it lists.
    tfserving_grpc: oxserve_tfserving::grpc::GrpcOptions,
    /// TF Serving's `--rest_api_timeout_in_ms`.
    tfserving_rest_timeout: Option<std::time::Duration>,
    /// TF Serving's `--grpc_socket_path`: gRPC on a Unix domain socket too.
    grpc_unix_socket: Option<PathBuf>,
    /// TorchServe's APIs (inference routes on the HTTP listener, management on its own).
    torchserve: Option<TorchServeSetup>,
    /// Triton's trace settings at start (`--trace-config`); `None`: tracing off.
    trace: Option<oxserve_engine::trace::TraceConfig>,
}

/// TorchServe's part of a server (`torchserve` mode).
struct TorchServeSetup {
    model_store: Option<PathBuf>,
    management_port: u16,
    /// Archives registered at start-up.
    startup: Vec<oxserve_torchserve::Registration>,
    model_api: bool,
    /// TorchServe's token authorization, when on.
    keys: Option<TorchServeKeys>,
    /// `install_py_dep_per_model`: install archives' requirements for their Python workers.
    install_dependencies: bool,
    /// `max_response_size`: the largest answer a Python worker may send for a request.
    max_response_size: Option<usize>,
    /// TorchServe's gRPC management API port (`grpc_management_port`, 7071).
    grpc_management_port: u16,
    /// `allowed_urls`: the patterns registration URLs must match (TorchServe's default: any
    /// file or http(s) URL).
    allowed_urls: Option<Vec<String>>,
}

/// The tokens of TorchServe's `key_file.json`.
struct TorchServeKeys {
    inference: String,
    management: String,
    api: String,
}

type ModelListSource = Box<dyn Fn() -> anyhow::Result<Vec<oxserve_engine::ListedModel>> + Send + Sync>;

/// Runs the server until shutdown: listeners, models (repositories and listed), polling.
fn run_server(settings: Settings, extras: ServeExtras) -> anyhow::Result<()> {
    let mut access = access_policy(&settings)?;
    if let Some(keys) = extras.torchserve.as_ref().and_then(|t| t.keys.as_ref()) {
        use oxserve_server::Scope;
        let add = |access: &mut oxserve_server::AccessPolicy, name: &str, token: &str, scopes: &[Scope]| {
            access
                .keys
                .add_scoped_token(name, token, scopes)
                .map_err(|e| anyhow::anyhow!("TorchServe key '{name}': {e}"))
        };
        add(
            &mut access,
            "torchserve-inference",
            &keys.inference,
            &[Scope::Infer, Scope::Metadata, Scope::Health],
        )?;
        add(
            &mut access,
            "torchserve-management",
            &keys.management,
            &[
                Scope::Repository,
                Scope::Metadata,
                Scope::Health,
                Scope::Statistics,
            ],
        )?;
        add(&mut access, "torchserve-api", &keys.api, &Scope::ALL)?;
        // TorchServe's metrics API needs no token.
        access.metrics_open = true;
    }
    // As Triton: a repository that cannot be read stops the start, rather than a server that
    // reports ready with no models.
    for root in &settings.models.repositories {
        // The message already holds the OS error; `{:#}` would print it twice.
        oxserve_repository::check_repository(root).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let tls = settings.tls.resolve()?;
    for note in &tls.notes {
        tracing::warn!("{note}");
    }

    let decode_limits = oxserve_frontend::DecodeLimits {
        max_bytes_elements: settings.server.max_bytes_elements,
    };
    let options = ServerOptions {
        host: settings.server.host.clone(),
        http_port: settings.server.http_port,
        grpc_port: settings.server.grpc_port,
        metrics_port: settings
            .server
            .allow_metrics
            .then_some(settings.server.metrics_port),
        http: HttpOptions {
            max_body_bytes: settings.server.max_input_size,
            decode: decode_limits,
        },
        grpc: GrpcOptions {
            max_message_bytes: settings.server.max_input_size,
            decode: decode_limits,
        },
        exit_timeout: std::time::Duration::from_secs(settings.server.exit_timeout_secs),
        shared_memory: settings.server.allow_shared_memory,
        shared_memory_registration: oxserve_shm::RegistrationPolicy {
            key_prefix: settings.server.shared_memory_prefix.clone(),
            allow_remote: settings.server.allow_remote_shared_memory,
        },
        http_tls: tls.http,
        grpc_tls: tls.grpc,
        tls_reload_interval: Some(std::time::Duration::from_secs(settings.tls.reload_interval_secs))
            .filter(|interval| !interval.is_zero()),
        access: Arc::new(access),
        max_inflight_bytes: settings.server.max_inflight_bytes,
        http_metrics_path: extras.http_metrics_path,
        tfserving_grpc: extras.tfserving_grpc,
        tfserving_rest_timeout: extras.tfserving_rest_timeout,
        grpc_unix_socket: extras.grpc_unix_socket,
        extra_http_routes: None,
        extra_listeners: Vec::new(),
        extra_grpc: None,
        http_fallback: None,
        extra_metrics: None,
    };
    let control_mode: oxserve_engine::ControlMode = settings
        .models
        .control_mode
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--model-control-mode: {e}"))?;
    if control_mode != oxserve_engine::ControlMode::Explicit && !settings.models.load.is_empty() {
        anyhow::bail!("--load-model needs --model-control-mode=explicit (as in Triton)");
    }
    // Ensembles run their steps on this server's engine, which exists only once the manager
    // (holding the ensemble engine) does: attached below.
    let ensembles = Arc::new(oxserve_ensemble::EnsembleBackend::new());
    let mut backends = backends_with(&settings.backends);
    backends.push(ensembles.clone());
    let manager = ModelManager::new(
        backends,
        ManagerOptions {
            repositories: settings.models.repositories.clone(),
            queue_capacity: settings.models.queue_capacity,
            control_mode,
            startup_models: settings.models.load.clone(),
            listed_models: extras.listed_models,
        },
    );
    let engine = InferenceService::new(manager, settings.models.strict_readiness);
    engine.set_ready_while_loading(settings.models.ready_while_loading);
    if let Some(config) = extras.trace {
        let tracer = oxserve_engine::trace::TraceManager::new(config).map_err(anyhow::Error::msg)?;
        engine.set_trace(Arc::new(tracer));
    }
    let tracer = Arc::clone(engine.trace());
    let mut options = options;
    let torchserve = match extras.torchserve {
        None => None,
        Some(setup) => {
            let ts = oxserve_torchserve::TorchServe::new(
                engine.clone(),
                setup.model_store.clone(),
                setup.model_api,
            )?;
            if setup.install_dependencies {
                ts.install_dependencies_with(
                    settings
                        .backends
                        .torchserve_python
                        .clone()
                        .unwrap_or_else(oxserve_torchserve::worker::default_python),
                );
            }
            if let Some(bytes) = setup.max_response_size {
                ts.set_max_response_bytes(bytes);
            }
            if let Some(patterns) = &setup.allowed_urls {
                ts.set_allowed_urls(patterns)
                    .map_err(|e| anyhow::anyhow!("config.properties allowed_urls: {e}"))?;
            }
            let max = settings.server.max_input_size;
            options.extra_http_routes = Some(oxserve_torchserve::inference_router(ts.clone(), max));
            options.http_fallback = Some(oxserve_torchserve::api::not_found_router());
            let metrics_ts = ts.clone();
            options.extra_metrics = Some(oxserve_server::ExtraMetrics(Arc::new(move || {
                metrics_ts.metrics_text()
            })));
            options.extra_listeners.push(oxserve_server::ExtraListener {
                name: "management",
                port: setup.management_port,
                routes: oxserve_torchserve::management_router(ts.clone(), max),
            });
            // TorchServe's gRPC APIs: inference beside KServe v2 and TF Serving on the gRPC
            // port, management on its own.
            let inference_ts = ts.clone();
            options.extra_grpc = Some(oxserve_server::ExtraGrpc(Arc::new(move |routes| {
                oxserve_torchserve::grpc::add_inference_service(routes, inference_ts.clone(), max)
            })));
            options.extra_listeners.push(oxserve_server::ExtraListener {
                name: "grpc_management",
                port: setup.grpc_management_port,
                routes: oxserve_torchserve::grpc::management_routes(ts.clone(), max),
            });
            Some((ts, setup.startup))
        }
    };
    let poll_interval = std::time::Duration::from_secs(settings.models.poll_secs.max(1));
    let exit_on_error = settings.models.exit_on_error;

    runtime_with(settings.server.worker_threads)?.block_on(async move {
        ensembles.attach(engine.clone(), tokio::runtime::Handle::current());
        let listeners = Listeners::bind(&options).await?;
        let (http, grpc) = (listeners.http_addr()?, listeners.grpc_addr()?);
        let metrics = listeners.metrics_addr()?;
        // One machine-readable line on stdout for scripts and tests; logs go to stderr.
        let mut line =
            serde_json::json!({"event": "listening", "http": http.to_string(), "grpc": grpc.to_string()});
        if let Some(metrics) = metrics {
            line["metrics"] = serde_json::Value::String(metrics.to_string());
        }
        for (listener, addr) in options.extra_listeners.iter().zip(listeners.extra_addrs()?) {
            line[listener.name] = serde_json::Value::String(addr.to_string());
        }
        println!("{line}");
        let metrics_text = metrics.map_or_else(|| "off".to_string(), |m| m.to_string());
        let (http_tls, grpc_tls) = (listeners.http_tls(), listeners.grpc_tls());
        tracing::info!(%http, http_tls, %grpc, grpc_tls, metrics = %metrics_text, "listening");
        let loader = engine.clone();
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<String>();
        tokio::spawn(async move {
            loader.load_models().await;
            tracing::info!(ready = loader.is_ready(), "model repository loaded");
            let failures: Vec<String> = loader
                .repository_index(false)
                .into_iter()
                .filter(|e| e.state == "UNAVAILABLE")
                .map(|e| format!("'{}': {}", e.name, e.reason))
                .collect();
            if exit_on_error && !failures.is_empty() {
                let _ = failed_tx.send(failures.join("; "));
                return;
            }
            loader.start_polling(poll_interval);
            if let Some((ts, startup)) = torchserve {
                for registration in startup {
                    let url = registration.url.clone();
                    if let Err(e) = ts.register(registration).await {
                        tracing::error!(archive = %url, error = %e, "cannot load a start-up model");
                    }
                }
            }
            if let Some((interval, source)) = extras.model_list_poll {
                poll_model_list(loader, interval, source).await;
            }
        });
        // With --exit-on-error, a model that fails to load at start-up stops the server.
        let stop = async move {
            tokio::select! {
                () = oxserve_server::shutdown_signal() => {}
                Ok(failures) = failed_rx => {
                    tracing::error!(%failures, "failed to load all models; exiting (--exit-on-error)");
                    START_UP_FAILED.store(true, std::sync::atomic::Ordering::Release);
                }
            }
        };
        oxserve_server::serve(engine, listeners, &options, stop).await?;
        // Buffered traces go to the trace file, whose array is closed; spans are exported.
        tokio::task::spawn_blocking(move || tracer.shutdown()).await.ok();
        if START_UP_FAILED.load(std::sync::atomic::Ordering::Acquire) {
            anyhow::bail!("failed to load all models (--exit-on-error)");
        }
        Ok(())
    })
}

/// Re-reads the model list every `interval` and applies it when it changed (TF Serving's
/// `--model_config_file_poll_wait_seconds`). A list that cannot be read is logged and skipped;
/// the models keep serving.
async fn poll_model_list(engine: InferenceService, interval: std::time::Duration, source: ModelListSource) {
    let source = Arc::new(source);
    let mut last = None;
    loop {
        tokio::time::sleep(interval).await;
        let read = Arc::clone(&source);
        let list = match tokio::task::spawn_blocking(move || read()).await {
            Ok(Ok(list)) => list,
            Ok(Err(e)) => {
                tracing::error!(error = %format!("{e:#}"), "cannot read the model config file; keeping the models as they are");
                continue;
            }
            Err(_) => return,
        };
        if last.as_ref() == Some(&list) {
            continue;
        }
        last = Some(list.clone());
        match engine.set_model_list(list).await {
            Ok(()) => tracing::info!("model config file changed: applied"),
            Err(e) => tracing::error!(error = %e, "model config file changed: some models failed to load"),
        }
    }
}

/// API keys from the key file and `OXSERVE_API_KEY` (one token with every scope), and the
/// rate limits; any mistake stops start-up with the reason.
fn access_policy(settings: &Settings) -> anyhow::Result<oxserve_server::AccessPolicy> {
    let mut keys = match &settings.auth.api_keys {
        Some(path) => oxserve_server::ApiKeys::from_file(path)?,
        None => oxserve_server::ApiKeys::default(),
    };
    if let Some(token) = std::env::var_os("OXSERVE_API_KEY") {
        let token = token.to_str().context("OXSERVE_API_KEY is not valid UTF-8")?;
        keys.add_token("OXSERVE_API_KEY", token)
            .map_err(|e| anyhow::anyhow!("OXSERVE_API_KEY: {e}"))?;
    }
    let rate_limits = oxserve_server::RateLimits::new(&settings.rate_limits)
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    match keys.len() {
        0 => tracing::warn!("no API keys configured: every endpoint is open to anyone who can connect"),
        n => tracing::info!(
            keys = n,
            health_requires_key = settings.auth.health_requires_key,
            "API keys required"
        ),
    }
    let restricted = |specs: &[String], grpc: bool| {
        oxserve_server::restricted::Restrictions::parse(specs, grpc).map_err(|e| anyhow::anyhow!("{e}"))
    };
    Ok(oxserve_server::AccessPolicy {
        metrics_open: false,
        keys,
        health_requires_key: settings.auth.health_requires_key,
        rate_limits,
        http_restricted: restricted(&settings.auth.http_restricted_api, false)?,
        grpc_restricted: restricted(&settings.auth.grpc_restricted_protocol, true)?,
    })
}

fn models(args: ModelsArgs) -> anyhow::Result<()> {
    init_logging("text", "warn")?;
    for root in &args.repositories {
        oxserve_repository::check_repository(root).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let manager = ModelManager::new(
        backends_with(&settings::BackendSettings {
            onnxruntime_library: args.onnxruntime_library,
            tensorflow_library: args.tensorflow_library,
            ..Default::default()
        }),
        ManagerOptions {
            repositories: args.repositories,
            ..ManagerOptions::default()
        },
    );
    let engine = InferenceService::new(manager, true);
    runtime()?.block_on(engine.load_models());
    let index = engine.repository_index(false);
    if args.json {
        let rows: Vec<_> = index
            .iter()
            .map(|e| serde_json::json!({"name": e.name, "version": e.version.map(|v| v.to_string()), "state": e.state, "reason": e.reason}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{:<24} {:>7}  {:<12} REASON", "MODEL", "VERSION", "STATE");
        for e in &index {
            let version = e.version.map_or("-".to_string(), |v| v.to_string());
            println!("{:<24} {:>7}  {:<12} {}", e.name, version, e.state, e.reason);
        }
    }
    if index.iter().any(|e| e.state != "READY") {
        anyhow::bail!("some models failed to load");
    }
    Ok(())
}
