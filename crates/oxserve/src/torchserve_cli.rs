//! Invoked as `torchserve` (a link or copy of the binary), oxserve takes TorchServe's start-up:
//!
//! ```text
//! torchserve --start --model-store model_store --models densenet=densenet.mar --ncs --disable-token-auth
//! torchserve --stop
//! ```
//!
//! `--start` runs the server in the background (as TorchServe does; `--foreground` keeps it in
//! front) and records its pid for `--stop`. The inference API (and KServe v2, TF Serving REST)
//! listens on `inference_address` (:8080), the management API on `management_address` (:8081),
//! Prometheus metrics on `metrics_address` (:8082), gRPC on 7070. Token authorization is on by
//! default as in TorchServe ≥ 0.11: keys are written to `key_file.json` in the working
//! directory; `--disable-token-auth` turns it off. docs/torchserve.md lists the honoured
//! config.properties keys; unknown keys are warned about.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;

use crate::settings::Settings;
use crate::{ServeExtras, init_logging, run_server};

pub const TORCHSERVE: &str = "torchserve";

#[derive(Parser, Debug)]
#[command(
    name = "torchserve",
    about = "oxserve running as TorchServe",
    disable_version_flag = true
)]
pub struct TorchServeArgs {
    /// Start the server (in the background unless --foreground).
    #[arg(long)]
    start: bool,
    /// Stop the server started with --start.
    #[arg(long)]
    stop: bool,
    /// Stay in the foreground.
    #[arg(long)]
    foreground: bool,
    /// The directory of .mar archives.
    #[arg(long = "model-store")]
    model_store: Option<PathBuf>,
    /// Models to load at start-up: `name=file.mar`, `file.mar` or `all` (comma-separated or
    /// repeated).
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    models: Vec<String>,
    /// A config.properties file.
    #[arg(long = "ts-config")]
    ts_config: Option<PathBuf>,
    /// No config snapshots (oxserve keeps none either way).
    #[arg(long = "ncs", alias = "no-config-snapshots")]
    ncs: bool,
    /// Turn token authorization off.
    #[arg(long = "disable-token-auth")]
    disable_token_auth: bool,
    /// Allow registering and unregistering models through the management API.
    #[arg(long = "enable-model-api")]
    enable_model_api: bool,
    /// Print the version and exit.
    #[arg(long, short = 'v')]
    version: bool,
}

pub fn parse() -> TorchServeArgs {
    match TorchServeArgs::try_parse_from(std::env::args_os()) {
        Ok(args) => args,
        Err(e) if e.kind() == clap::error::ErrorKind::UnknownArgument => {
            let _ = e.print();
            eprintln!(
                "note: oxserve running as torchserve honours the flags listed by --help and in docs/torchserve.md; this one is not among them"
            );
            std::process::exit(2);
        }
        Err(e) => e.exit(),
    }
}

fn pid_file() -> PathBuf {
    std::env::temp_dir().join(".model_server.pid")
}

/// TorchServe's config.properties (Java properties): `key=value` lines, `#` comments, a
/// trailing `\` continues a value on the next line (the `models` JSON is written so).
fn read_properties(path: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(parse_properties(&text))
}

fn parse_properties(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = if pending.is_empty() {
            raw.trim()
        } else {
            raw.trim_start()
        };
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with('!')) {
            continue;
        }
        // An odd number of trailing backslashes continues the line; `\\\\` is a backslash.
        let trailing = line.chars().rev().take_while(|c| *c == '\\').count();
        if trailing % 2 == 1 {
            pending.push_str(&line[..line.len() - 1]);
            continue;
        }
        pending.push_str(line);
        let whole = std::mem::take(&mut pending);
        if let Some((key, value)) = split_property(&whole) {
            out.insert(unescape(key.trim()), unescape(value.trim()));
        }
    }
    out
}

/// `key=value` or `key:value` at the first separator that is not escaped.
fn split_property(line: &str) -> Option<(&str, &str)> {
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '=' | ':' => return Some((&line[..i], &line[i + 1..])),
            _ => {}
        }
    }
    None
}

/// Java's properties escapes: `\\t`, `\\n`, `\\r`, `\\f`, `\\uXXXX`; a backslash before any other
/// character stands for that character (so a regex's `\\d` is written `\\\\d`, as for TorchServe).
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('f') => out.push('\u{c}'),
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                match u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                    Some(ch) => out.push(ch),
                    None => out.push_str(&hex),
                }
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// Per-model settings of config.properties' `models` JSON
/// (`{"name": {"1.0": {"marName", "minWorkers", "maxWorkers", "batchSize", "maxBatchDelay",
/// "responseTimeout", "defaultVersion"}}}`), applied to the start-up models of that name.
fn model_settings(models: Option<&str>) -> anyhow::Result<BTreeMap<String, serde_json::Value>> {
    let Some(text) = models else {
        return Ok(BTreeMap::new());
    };
    let parsed: BTreeMap<String, BTreeMap<String, serde_json::Value>> =
        serde_json::from_str(text).context("config.properties: 'models' is not valid JSON")?;
    // One version's settings per model: the default version's, else the first.
    Ok(parsed
        .into_iter()
        .filter_map(|(name, versions)| {
            let chosen = versions
                .values()
                .find(|v| v.get("defaultVersion").and_then(serde_json::Value::as_bool) == Some(true))
                .or_else(|| versions.values().next())
                .cloned()?;
            Some((name, chosen))
        })
        .collect())
}

/// `http://127.0.0.1:8080` → (host, port).
fn address(value: &str) -> anyhow::Result<(String, u16)> {
    let rest = value
        .strip_prefix("http://")
        .or_else(|| value.strip_prefix("https://"))
        .unwrap_or(value);
    let (host, port) = rest
        .rsplit_once(':')
        .with_context(|| format!("address '{value}' has no port"))?;
    let port = port
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("address '{value}' has an invalid port"))?;
    Ok((host.to_string(), port))
}

/// The config.properties keys oxserve acts on.
const HONOURED: &[&str] = &[
    "inference_address",
    "management_address",
    "metrics_address",
    "model_store",
    "load_models",
    "default_workers_per_model",
    "number_of_netty_threads",
    "max_request_size",
    "enable_model_api",
    "disable_token_authorization",
    "enable_metrics_api",
    "grpc_inference_port",
    "models",
    "python",
    "install_py_dep_per_model",
    "allowed_urls",
    "grpc_management_port",
    "max_response_size",
];

pub fn run(args: TorchServeArgs) -> anyhow::Result<()> {
    if args.version {
        println!("TorchServe Version is oxserve-{}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    if args.stop {
        return stop();
    }
    if !args.start {
        anyhow::bail!("give --start or --stop");
    }
    if !args.foreground {
        return start_in_background();
    }
    let properties = match &args.ts_config {
        Some(path) => read_properties(path)?,
        None => match std::fs::metadata("config.properties") {
            Ok(_) => read_properties(Path::new("config.properties"))?,
            Err(_) => BTreeMap::new(),
        },
    };
    let mut settings = Settings::load(None)?;
    init_logging(&settings.log.format, &settings.log.level)?;
    for key in properties.keys().filter(|k| !HONOURED.contains(&k.as_str())) {
        tracing::warn!(key = %key, "config.properties key not acted on by oxserve (docs/torchserve.md)");
    }
    let get = |key: &str| properties.get(key).map(String::as_str);
    let (host, inference_port) = address(get("inference_address").unwrap_or("http://127.0.0.1:8080"))?;
    let (_, management_port) = address(get("management_address").unwrap_or("http://127.0.0.1:8081"))?;
    let (_, metrics_port) = address(get("metrics_address").unwrap_or("http://127.0.0.1:8082"))?;
    let model_store = args
        .model_store
        .clone()
        .or_else(|| get("model_store").map(PathBuf::from));
    if let Some(store) = &model_store
        && !store.is_dir()
    {
        anyhow::bail!("model store {} is not a directory", store.display());
    }
    let truthy = |key: &str| get(key).is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let workers = match get("default_workers_per_model") {
        Some(n) => n.parse().context("default_workers_per_model must be a number")?,
        None => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
    };
    let mut models = args.models.clone();
    if models.is_empty()
        && let Some(load) = get("load_models")
    {
        models = load
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
    }
    let settings_by_model = model_settings(get("models"))?;
    let startup = startup_models(&models, model_store.as_deref())?
        .into_iter()
        .map(|(name, url)| {
            let number = |value: Option<&serde_json::Value>| value.and_then(serde_json::Value::as_u64);
            let key = name
                .clone()
                .unwrap_or_else(|| url.trim_end_matches(".mar").to_string());
            let own = settings_by_model.get(&key);
            let field = |f: &str| number(own.and_then(|o| o.get(f)));
            oxserve_torchserve::Registration {
                url,
                model_name: name,
                initial_workers: field("minWorkers").map_or(workers, |n| n as u32).max(1),
                batch_size: field("batchSize").map_or(1, |n| n as u32),
                max_batch_delay_ms: field("maxBatchDelay").unwrap_or(100),
                response_timeout_s: field("responseTimeout").unwrap_or(120),
                loaded_at_startup: true,
            }
        })
        .collect();

    let s = &mut settings.server;
    s.host = host;
    s.http_port = inference_port;
    s.grpc_port = match get("grpc_inference_port") {
        Some(p) => p.parse().context("grpc_inference_port must be a port number")?,
        None => 7070,
    };
    s.metrics_port = metrics_port;
    s.allow_metrics = get("enable_metrics_api").is_none_or(|v| !v.eq_ignore_ascii_case("false"));
    if let Some(size) = get("max_request_size") {
        s.max_input_size = size
            .parse()
            .context("max_request_size must be a number of bytes")?;
    }
    if let Some(threads) = get("number_of_netty_threads") {
        s.worker_threads = Some(
            threads
                .parse()
                .context("number_of_netty_threads must be a number")?,
        );
    }
    // The Python that runs custom handlers: config.properties' `python` (TorchServe's
    // PYTHON_EXECUTABLE key), else `python` on PATH.
    if let Some(python) = get("python") {
        settings.backends.torchserve_python = Some(PathBuf::from(python));
    }
    let max_response_size = match get("max_response_size") {
        Some(size) => Some(
            size.parse()
                .context("max_response_size must be a number of bytes")?,
        ),
        None => None,
    };
    settings.models.repositories.clear();
    settings.models.control_mode = "none".into();
    let token_auth = !(args.disable_token_auth || truthy("disable_token_authorization"));
    let keys = if token_auth { Some(write_key_file()?) } else { None };
    run_server(
        settings,
        ServeExtras {
            torchserve: Some(crate::TorchServeSetup {
                model_store,
                management_port,
                startup,
                model_api: args.enable_model_api || truthy("enable_model_api"),
                keys,
                install_dependencies: truthy("install_py_dep_per_model"),
                grpc_management_port: match get("grpc_management_port") {
                    Some(p) => p.parse().context("grpc_management_port must be a port number")?,
                    None => 7071,
                },
                // TorchServe splits the value on commas (a pattern cannot contain one).
                allowed_urls: get("allowed_urls").map(|v| {
                    v.split(',')
                        .map(|p| p.trim().to_string())
                        .filter(|p| !p.is_empty())
                        .collect()
                }),
                max_response_size,
            }),
            ..Default::default()
        },
    )
}

/// `--models` entries: `name=file.mar`, `file.mar`, or `all` (every archive in the store).
fn startup_models(models: &[String], store: Option<&Path>) -> anyhow::Result<Vec<(Option<String>, String)>> {
    let mut out = Vec::new();
    for entry in models {
        if entry == "all" {
            let store = store.context("--models all needs a model store")?;
            let mut names: Vec<String> = std::fs::read_dir(store)?
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".mar"))
                .collect();
            names.sort();
            out.extend(names.into_iter().map(|n| (None, n)));
        } else if let Some((name, url)) = entry.split_once('=') {
            out.push((Some(name.to_string()), url.to_string()));
        } else {
            out.push((None, entry.clone()));
        }
    }
    Ok(out)
}

/// TorchServe's `key_file.json`: an inference key, a management key and an API key, written to
/// the working directory (readable by the owner only).
fn write_key_file() -> anyhow::Result<crate::TorchServeKeys> {
    use rand::RngCore;
    let token = || {
        let mut bytes = [0u8; 12];
        rand::rng().fill_bytes(&mut bytes);
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let keys = crate::TorchServeKeys {
        inference: token(),
        management: token(),
        api: token(),
    };
    let expires = "never (oxserve keys last until the server stops)";
    let body = serde_json::json!({
        "management": {"key": keys.management, "expiration time": expires},
        "inference": {"key": keys.inference, "expiration time": expires},
        "API": {"key": keys.api}
    });
    let path = Path::new("key_file.json");
    std::fs::write(path, serde_json::to_string_pretty(&body)?).context("cannot write key_file.json")?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(keys)
}

/// `--start` without `--foreground`: the same command in the background, its pid recorded.
fn start_in_background() -> anyhow::Result<()> {
    let exe = std::env::args_os().next().context("no program name")?;
    let mut command = std::process::Command::new(exe);
    command.args(std::env::args_os().skip(1)).arg("--foreground");
    command.stdin(std::process::Stdio::null());
    let log_dir = PathBuf::from("logs");
    std::fs::create_dir_all(&log_dir).ok();
    let log = std::fs::File::create(log_dir.join("ts_log.log")).context("cannot create logs/ts_log.log")?;
    command.stdout(log.try_clone()?).stderr(log);
    let child = command.spawn().context("cannot start the server")?;
    std::fs::write(pid_file(), child.id().to_string()).context("cannot record the server's pid")?;
    println!(
        "TorchServe is starting (oxserve, pid {}); logs in logs/ts_log.log",
        child.id()
    );
    Ok(())
}

fn stop() -> anyhow::Result<()> {
    let path = pid_file();
    let Ok(text) = std::fs::read_to_string(&path) else {
        println!("TorchServe is not currently running.");
        return Ok(());
    };
    let pid: i32 = text.trim().parse().context("invalid pid file")?;
    let status = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()?;
    let _ = std::fs::remove_file(&path);
    if status.success() {
        // Wait for it to finish its requests and exit.
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        for _ in 0..300 {
            if !proc_dir.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        println!("TorchServe has stopped.");
    } else {
        println!("TorchServe is not currently running.");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn properties_with_continued_models_json() {
        let text = "# comment\ninference_address=http://0.0.0.0:8080\nmodels={\\\n  \"noop\": {\\\n    \"1.0\": {\"marName\": \"noop.mar\", \"minWorkers\": 3, \"batchSize\": 4, \"defaultVersion\": true}\\\n  }\\\n}\nload_models=all\n";
        let props = parse_properties(text);
        assert_eq!(props["inference_address"], "http://0.0.0.0:8080");
        assert_eq!(props["load_models"], "all");
        let models = model_settings(props.get("models").map(String::as_str)).unwrap();
        assert_eq!(models["noop"]["minWorkers"], 3);
        assert_eq!(
            address("http://0.0.0.0:8080").unwrap(),
            ("0.0.0.0".to_string(), 8080)
        );
        assert!(model_settings(Some("{not json")).is_err());
    }

    #[test]
    fn properties_unescape_as_java_does() {
        let text = "allowed_urls=http://127\\\\.0\\\\.0\\\\.1:\\\\d+/a/.*,file://.*\nkey\\:x=v\\tw\nend=a\\\\\nu=\\u0041\n";
        let props = parse_properties(text);
        assert_eq!(props["allowed_urls"], r"http://127\.0\.0\.1:\d+/a/.*,file://.*");
        assert_eq!(props["key:x"], "v\tw");
        // An even number of trailing backslashes is an escaped backslash, not a continuation.
        assert_eq!(props["end"], "a\\");
        assert_eq!(props["u"], "A");
    }
}
