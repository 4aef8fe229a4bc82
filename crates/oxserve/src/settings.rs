//! Layered configuration: built-in defaults → `oxserve.toml` → `OXSERVE__SECTION__KEY`
//! environment variables → command-line flags.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub models: ModelSettings,
    pub log: LogSettings,
    pub backends: BackendSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    pub host: String,
    pub http_port: u16,
    pub grpc_port: u16,
    /// Port of the Prometheus `/metrics` endpoint (Triton's `--metrics-port`).
    pub metrics_port: u16,
    /// Serve `/metrics` at all (Triton's `--allow-metrics`).
    pub allow_metrics: bool,
    /// Accept system shared-memory registrations (Triton's extension; only clients on the
    /// same host can use it, so a server reachable only over the network may turn it off).
    pub allow_shared_memory: bool,
    /// Shared-memory objects a client may register must be named with this prefix (leading
    /// slashes ignored); empty: any name, as in Triton.
    pub shared_memory_prefix: String,
    /// Accept shared-memory registrations from clients that are not on the loopback interface.
    pub allow_remote_shared_memory: bool,
    /// Largest HTTP request body and gRPC message, in bytes.
    pub max_input_size: usize,
    /// Seconds shutdown waits for in-flight work before exiting anyway.
    pub exit_timeout_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    pub repositories: Vec<PathBuf>,
    /// Ready only when every model is ready (Triton's default).
    pub strict_readiness: bool,
    /// Requests that may wait per model version before new ones get 429.
    pub queue_capacity: usize,
}

/// Engine settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendSettings {
    /// The ONNX Runtime shared library (`libonnxruntime.so`); unset: `ORT_DYLIB_PATH`, else
    /// auto-detected in the project's `.venv`.
    pub onnxruntime_library: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info` or `oxserve_engine=debug,info`.
    pub level: String,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            host: "127.0.0.1".into(),
            http_port: 8000,
            grpc_port: 8001,
            metrics_port: 8002,
            allow_metrics: true,
            allow_shared_memory: true,
            shared_memory_prefix: oxserve_shm::DEFAULT_KEY_PREFIX.into(),
            allow_remote_shared_memory: false,
            max_input_size: 64 << 20,
            exit_timeout_secs: 30,
        }
    }
}

impl Default for ModelSettings {
    fn default() -> Self {
        ModelSettings {
            repositories: Vec::new(),
            strict_readiness: true,
            queue_capacity: 1024,
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

impl Settings {
    /// Defaults, then the TOML file (the given one must exist; `./oxserve.toml` is read when
    /// present), then the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Settings> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        match file {
            Some(path) => {
                if !path.is_file() {
                    anyhow::bail!("configuration file {} does not exist", path.display());
                }
                figment = figment.merge(Toml::file_exact(path));
            }
            None => figment = figment.merge(Toml::file("oxserve.toml")),
        }
        let settings = figment
            .merge(Env::prefixed("OXSERVE__").split("__"))
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        Ok(settings)
    }
}

#[cfg(test)]
// figment's Jail returns its own large error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn layers_apply_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("custom.toml", "[server]\nhttp_port = 9000\ngrpc_port = 9001\n")?;
            jail.set_env("OXSERVE__SERVER__GRPC_PORT", "9100");
            let s = Settings::load(Some(Path::new("custom.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(s.server.http_port, 9000);
            assert_eq!(s.server.grpc_port, 9100);
            assert_eq!(s.server.host, "127.0.0.1");
            assert!(s.models.strict_readiness);
            assert_eq!((s.server.metrics_port, s.server.allow_metrics), (8002, true));
            Ok(())
        });
    }

    #[test]
    fn metrics_settings_from_file_and_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("m.toml", "[server]\nmetrics_port = 9102\nallow_metrics = true\n")?;
            jail.set_env("OXSERVE__SERVER__ALLOW_METRICS", "false");
            let s = Settings::load(Some(Path::new("m.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(s.server.metrics_port, 9102);
            assert!(!s.server.allow_metrics);
            Ok(())
        });
    }

    #[test]
    fn onnxruntime_library_from_file_and_environment() {
        figment::Jail::expect_with(|jail| {
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.backends.onnxruntime_library, None);
            jail.create_file(
                "b.toml",
                "[backends]\nonnxruntime_library = \"/opt/ort/libonnxruntime.so\"\n",
            )?;
            let s = Settings::load(Some(Path::new("b.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(
                s.backends.onnxruntime_library.as_deref(),
                Some(Path::new("/opt/ort/libonnxruntime.so"))
            );
            jail.set_env("OXSERVE__BACKENDS__ONNXRUNTIME_LIBRARY", "/env/libonnxruntime.so");
            let s = Settings::load(Some(Path::new("b.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(
                s.backends.onnxruntime_library.as_deref(),
                Some(Path::new("/env/libonnxruntime.so"))
            );
            jail.create_file("bad.toml", "[backends]\nonnxruntime_libary = \"x\"\n")?;
            let e = Settings::load(Some(Path::new("bad.toml")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("onnxruntime_libary"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn shared_memory_registration_from_file_and_environment() {
        figment::Jail::expect_with(|jail| {
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.server.shared_memory_prefix, "oxserve");
            assert!(!s.server.allow_remote_shared_memory);
            jail.create_file(
                "s.toml",
                "[server]\nshared_memory_prefix = \"\"\nallow_remote_shared_memory = true\n",
            )?;
            let s = Settings::load(Some(Path::new("s.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(s.server.shared_memory_prefix, "");
            assert!(s.server.allow_remote_shared_memory);
            jail.set_env("OXSERVE__SERVER__SHARED_MEMORY_PREFIX", "team_a_");
            jail.set_env("OXSERVE__SERVER__ALLOW_REMOTE_SHARED_MEMORY", "false");
            let s = Settings::load(Some(Path::new("s.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(s.server.shared_memory_prefix, "team_a_");
            assert!(!s.server.allow_remote_shared_memory);
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_missing_files_are_errors() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "[server]\nhttp_prot = 1\n")?;
            let e = Settings::load(Some(Path::new("bad.toml")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("http_prot"), "{e}");
            assert!(Settings::load(Some(Path::new("missing.toml"))).is_err());
            Ok(())
        });
    }
}
