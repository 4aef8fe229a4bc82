//! Invoked as `tensorflow_model_server` (a link or copy of the binary), oxserve takes TF
//! Serving's command line, so the official Docker image's command runs unchanged:
//!
//! ```text
//! tensorflow_model_server --port=8500 --rest_api_port=8501 \
//!     --model_name=${MODEL_NAME} --model_base_path=${MODEL_BASE_PATH}/${MODEL_NAME}
//! ```
//!
//! Only the flags listed in [`TfServingArgs`] are taken, each with TF Serving's meaning and
//! default; any other is refused with the list (docs/tfserving.md). The models are served over
//! TF Serving's gRPC (`--port`) and REST (`--rest_api_port`) APIs, and over KServe v2 on the
//! same ports.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use oxserve_engine::ListedModel;
use oxserve_tfserving::config::{self, ServingDefaults};
use oxserve_tfserving::pb::tensorflow::serving as pb;

use crate::settings::Settings;
use crate::{ServeExtras, init_logging, run_server};

/// The name the binary answers to in this mode.
pub const TENSORFLOW_MODEL_SERVER: &str = "tensorflow_model_server";

fn boolish() -> clap::builder::BoolishValueParser {
    clap::builder::BoolishValueParser::new()
}

/// TF Serving's flags (tensorflow_serving/model_servers/main.cc) that oxserve honours.
#[derive(Parser, Debug)]
#[command(
    name = "tensorflow_model_server",
    about = "oxserve running as TensorFlow Serving's model server",
    disable_version_flag = true
)]
pub struct TfServingArgs {
    /// gRPC port (PredictionService, ModelService; also KServe v2 gRPC).
    #[arg(long = "port", default_value_t = 8500)]
    port: u16,
    /// REST API port (`/v1/models/...`; also KServe v2 HTTP). 0: TF Serving serves no REST
    /// API; oxserve then listens on a free port chosen by the system.
    #[arg(long = "rest_api_port", default_value_t = 0)]
    rest_api_port: u16,
    /// Timeout of a REST API call in milliseconds (predict, classify, regress): an answer not
    /// ready by then is DEADLINE_EXCEEDED (HTTP 504). 0: no limit.
    #[arg(long = "rest_api_timeout_in_ms", default_value_t = 30_000)]
    rest_api_timeout_in_ms: u64,
    /// Also serve gRPC on this Unix domain socket (clients use `unix:PATH`).
    #[arg(long = "grpc_socket_path")]
    grpc_socket_path: Option<PathBuf>,
    /// Threads serving requests (the async runtime's workers, for REST and gRPC alike).
    #[arg(long = "rest_api_num_threads")]
    rest_api_num_threads: Option<usize>,
    /// Batch requests (with --batching_parameters_file's parameters, else TF Serving's defaults).
    #[arg(long = "enable_batching", num_args = 0..=1, default_missing_value = "true", value_parser = boolish(), default_value = "false")]
    enable_batching: bool,
    /// A BatchingParameters text proto (implies batching, as in TF Serving).
    #[arg(long = "batching_parameters_file")]
    batching_parameters_file: Option<PathBuf>,
    /// A ModelServerConfig text proto listing the models (instead of --model_name/--model_base_path).
    #[arg(long = "model_config_file")]
    model_config_file: Option<PathBuf>,
    /// Re-read --model_config_file every N seconds (0: never).
    #[arg(long = "model_config_file_poll_wait_seconds", default_value_t = 0)]
    model_config_file_poll_wait_seconds: u64,
    /// The model's name (default: $MODEL_NAME, else "default").
    #[arg(long = "model_name")]
    model_name: Option<String>,
    /// The directory of the model's numeric version directories (default:
    /// $MODEL_BASE_PATH/$MODEL_NAME when MODEL_BASE_PATH is set, as the Docker image does).
    #[arg(long = "model_base_path")]
    model_base_path: Option<String>,
    /// Look for new and removed versions every N seconds (0: only at start-up).
    #[arg(long = "file_system_poll_wait_seconds", default_value_t = 1)]
    file_system_poll_wait_seconds: u64,
    /// Sets both intra-op and inter-op thread counts (0: TensorFlow's choice).
    #[arg(long = "tensorflow_session_parallelism", default_value_t = 0)]
    tensorflow_session_parallelism: i32,
    #[arg(long = "tensorflow_intra_op_parallelism", default_value_t = 0)]
    tensorflow_intra_op_parallelism: i32,
    #[arg(long = "tensorflow_inter_op_parallelism", default_value_t = 0)]
    tensorflow_inter_op_parallelism: i32,
    /// A MonitoringConfig text proto: Prometheus metrics at its path on the REST port.
    #[arg(long = "monitoring_config_file")]
    monitoring_config_file: Option<PathBuf>,
    /// Comma-separated SavedModel tags to load (default: serve).
    #[arg(long = "saved_model_tags")]
    saved_model_tags: Option<String>,
    /// Print the version and exit.
    #[arg(long = "version", num_args = 0..=1, default_missing_value = "true", value_parser = boolish(), default_value = "false")]
    version: bool,
}

/// Parses the command line as TF Serving would, refusing flags oxserve does not honour.
pub fn parse() -> TfServingArgs {
    match TfServingArgs::try_parse_from(std::env::args_os()) {
        Ok(args) => args,
        Err(e) if e.kind() == clap::error::ErrorKind::UnknownArgument => {
            let _ = e.print();
            eprintln!(
                "note: oxserve running as tensorflow_model_server honours the TF Serving flags listed by \
                 --help and in docs/tfserving.md; this one is not among them"
            );
            std::process::exit(2);
        }
        Err(e) => e.exit(),
    }
}

/// The single model of `--model_name` / `--model_base_path` (or the Docker image's
/// environment) as a model server config.
fn single_model(args: &TfServingArgs) -> anyhow::Result<pb::ModelServerConfig> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let name = args
        .model_name
        .clone()
        .or_else(|| env("MODEL_NAME"))
        .unwrap_or_else(|| "default".into());
    let base_path = match (&args.model_base_path, env("MODEL_BASE_PATH")) {
        (Some(path), _) => path.clone(),
        (None, Some(base)) => format!("{}/{name}", base.trim_end_matches('/')),
        (None, None) => anyhow::bail!(
            "Both server_model_config_file and model_base_path are empty! Give --model_base_path (or \
             --model_config_file, or MODEL_BASE_PATH in the environment)"
        ),
    };
    Ok(pb::ModelServerConfig {
        config: Some(pb::model_server_config::Config::ModelConfigList(
            pb::ModelConfigList {
                config: vec![pb::ModelConfig {
                    name,
                    base_path,
                    model_platform: "tensorflow".into(),
                    ..Default::default()
                }],
            },
        )),
    })
}

fn serving_defaults(args: &TfServingArgs) -> anyhow::Result<ServingDefaults> {
    let batching = match (&args.batching_parameters_file, args.enable_batching) {
        (Some(path), _) => Some(config::read_batching_parameters(path).map_err(anyhow::Error::msg)?),
        (None, true) => Some(pb::BatchingParameters::default()),
        (None, false) => None,
    };
    Ok(ServingDefaults {
        batching,
        instances: std::thread::available_parallelism().map_or(2, |n| n.get()),
        saved_model_tags: args.saved_model_tags.clone(),
    })
}

pub fn run(args: TfServingArgs) -> anyhow::Result<()> {
    if args.version {
        println!(
            "TensorFlow ModelServer: oxserve-{}\nTensorFlow Library: 2.21.0 (loaded at run time)",
            env!("CARGO_PKG_VERSION")
        );
        return Ok(());
    }
    // oxserve.toml and OXSERVE__* apply here too (OXSERVE__BACKENDS__TENSORFLOW_LIBRARY, logs).
    let mut settings = Settings::load(None)?;
    init_logging(&settings.log.format, &settings.log.level)?;
    if args.model_config_file.is_some() && (args.model_base_path.is_some() || args.model_name.is_some()) {
        anyhow::bail!("--model_config_file cannot be combined with --model_name / --model_base_path");
    }
    let defaults = serving_defaults(&args)?;
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let read_list = {
        let defaults = defaults.clone();
        let file = args.model_config_file.clone();
        let single = match &file {
            Some(_) => None,
            None => Some(single_model(&args)?),
        };
        let cwd = cwd.clone();
        move || -> anyhow::Result<Vec<ListedModel>> {
            let server_config = match (&file, &single) {
                (Some(path), _) => config::read_model_server_config(path).map_err(anyhow::Error::msg)?,
                (None, Some(single)) => single.clone(),
                (None, None) => pb::ModelServerConfig::default(),
            };
            config::model_list(&server_config, &defaults, &cwd).map_err(anyhow::Error::msg)
        }
    };
    let listed_models = read_list()?;
    for model in &listed_models {
        check_base_path(&model.name, &model.path)?;
    }

    let s = &mut settings.server;
    // TF Serving listens on every interface, with no flag to change it.
    s.host = "0.0.0.0".into();
    s.grpc_port = args.port;
    s.http_port = args.rest_api_port;
    s.allow_metrics = false;
    settings.server.worker_threads = args.rest_api_num_threads.or(settings.server.worker_threads);
    settings.models.repositories.clear();
    // New and removed versions are picked up by polling, as TF Serving's file system source.
    if args.file_system_poll_wait_seconds > 0 {
        settings.models.control_mode = "poll".into();
        settings.models.poll_secs = args.file_system_poll_wait_seconds;
    } else {
        settings.models.control_mode = "none".into();
    }
    let session = args.tensorflow_session_parallelism;
    let pick = |specific: i32| if specific != 0 { specific } else { session };
    settings.backends.tensorflow_intra_op_parallelism = pick(args.tensorflow_intra_op_parallelism);
    settings.backends.tensorflow_inter_op_parallelism = pick(args.tensorflow_inter_op_parallelism);

    let http_metrics_path = match &args.monitoring_config_file {
        None => None,
        Some(path) => {
            let monitoring = config::read_monitoring_config(path).map_err(anyhow::Error::msg)?;
            monitoring.prometheus_config.filter(|p| p.enable).map(|p| {
                if p.path.is_empty() {
                    "/monitoring/prometheus/metrics".into()
                } else {
                    p.path
                }
            })
        }
    };
    let model_list_poll = (args.model_config_file.is_some() && args.model_config_file_poll_wait_seconds > 0)
        .then(|| {
            (
                Duration::from_secs(args.model_config_file_poll_wait_seconds),
                Box::new(read_list) as crate::ModelListSource,
            )
        });
    run_server(
        settings,
        ServeExtras {
            listed_models,
            http_metrics_path,
            model_list_poll,
            tfserving_grpc: oxserve_tfserving::grpc::GrpcOptions {
                defaults,
                base_dir: cwd,
                ..Default::default()
            },
            tfserving_rest_timeout: (args.rest_api_timeout_in_ms > 0)
                .then(|| Duration::from_millis(args.rest_api_timeout_in_ms)),
            grpc_unix_socket: args
                .grpc_socket_path
                .clone()
                .filter(|p| !p.as_os_str().is_empty()),
            torchserve: None,
            trace: None,
        },
    )
}

/// TF Serving refuses to start without the model's directory; so does oxserve.
fn check_base_path(name: &str, path: &Path) -> anyhow::Result<()> {
    if !path.is_dir() {
        anyhow::bail!(
            "model '{name}': base path {} is not a directory (it must hold numeric version directories)",
            path.display()
        );
    }
    Ok(())
}
