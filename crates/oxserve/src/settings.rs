//! Layered configuration: built-in defaults → `oxserve.toml` → `OXSERVE__SECTION__KEY`
//! environment variables → command-line flags.

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use oxserve_server::tls::TlsFiles;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub models: ModelSettings,
    pub log: LogSettings,
    pub backends: BackendSettings,
    pub tls: TlsSettings,
    pub auth: AuthSettings,
    /// `[[rate_limits]]` rules (docs/security.md).
    pub rate_limits: Vec<oxserve_server::RateLimitRule>,
}

/// API keys (docs/security.md).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// The key file (`--api-keys`); unset and no `OXSERVE_API_KEY`: no authentication.
    pub api_keys: Option<PathBuf>,
    /// Whether health endpoints need a key too once keys are configured (default: open, for
    /// Kubernetes probes).
    pub health_requires_key: bool,
    /// Triton's `--http-restricted-api` values: `<api>[,<api>...]:<key>=<value>`.
    pub http_restricted_api: Vec<String>,
    /// Triton's `--grpc-restricted-protocol` values.
    pub grpc_restricted_protocol: Vec<String>,
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
    /// Budget of request bytes in flight (bodies, decompressed and decoded data) across all
    /// connections; unset: a quarter of the memory limit, 384 MiB to 16 GiB
    /// (docs/security.md, "Memory limits").
    pub max_inflight_bytes: Option<usize>,
    /// Most BYTES elements decoded per infer request, over all its inputs.
    pub max_bytes_elements: usize,
    /// Seconds shutdown waits for in-flight work before exiting anyway.
    pub exit_timeout_secs: u64,
    /// Threads of the async runtime that serves HTTP and gRPC (unset: one per core).
    pub worker_threads: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    pub repositories: Vec<PathBuf>,
    /// Ready only when every model is ready (Triton's default).
    pub strict_readiness: bool,
    /// Requests that may wait per model version before new ones get 429.
    pub queue_capacity: usize,
    /// Triton's model control mode: `none`, `poll` or `explicit`.
    pub control_mode: String,
    /// Poll mode: seconds between repository scans.
    pub poll_secs: u64,
    /// Explicit mode: the models loaded at start-up (`*`: all).
    pub load: Vec<String>,
    /// Versions loading in the background keep the server ready (per-model readiness stays
    /// exact); default off: as Triton, a loading version makes a strict server unready.
    pub ready_while_loading: bool,
    /// Exit at start-up when a model fails to load (Triton's `--exit-on-error`); default off:
    /// the failure is reported in the index and the other models serve.
    pub exit_on_error: bool,
}

/// Engine settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackendSettings {
    /// The ONNX Runtime shared library (`libonnxruntime.so`); unset: `ORT_DYLIB_PATH`, else
    /// auto-detected in the project's `.venv`.
    pub onnxruntime_library: Option<PathBuf>,
    /// TensorFlow's C API library (`libtensorflow_cc.so.2` or its directory); unset:
    /// `OXSERVE__BACKENDS__TENSORFLOW_LIBRARY`, else where scripts/setup-tensorflow.sh puts it.
    pub tensorflow_library: Option<PathBuf>,
    /// Default TensorFlow intra-op / inter-op thread counts (0: one per core).
    pub tensorflow_intra_op_parallelism: i32,
    pub tensorflow_inter_op_parallelism: i32,
    /// The Python interpreter that runs TorchServe's Python backend workers (custom
    /// handlers); it must have the `torchserve` package. Unset: `python` on PATH (TorchServe's
    /// own default), else `python3`.
    pub torchserve_python: Option<PathBuf>,
}

/// TLS for the HTTP and gRPC listeners (docs/security.md). Unset: both are plain.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// Certificate chain (PEM, leaf first) for both listeners (`--tls-cert`).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM) (`--tls-key`).
    pub key: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates must chain to; set, every client must
    /// present one (mutual TLS) (`--tls-client-ca`).
    pub client_ca: Option<PathBuf>,
    /// Seconds between checks of the files for changes; 0: reload only on SIGHUP.
    pub reload_interval_secs: u64,
    /// The gRPC listener alone, as Triton's `--grpc-*` SSL flags set it.
    pub grpc: GrpcTlsSettings,
}

/// Triton's gRPC SSL options: `--grpc-use-ssl`, `--grpc-use-ssl-mutual`, `--grpc-server-cert`,
/// `--grpc-server-key`, `--grpc-root-cert`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcTlsSettings {
    /// TLS on gRPC; unset: on when a certificate is configured.
    pub use_ssl: Option<bool>,
    /// Require client certificates on gRPC (implies `use_ssl`).
    pub use_ssl_mutual: Option<bool>,
    /// Certificate for gRPC instead of `tls.cert`.
    pub server_cert: Option<PathBuf>,
    /// Key for gRPC instead of `tls.key`.
    pub server_key: Option<PathBuf>,
    /// CA for client certificates on gRPC, used with `use_ssl_mutual` (as in Triton).
    pub root_cert: Option<PathBuf>,
}

/// Which listener speaks TLS with which files.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ListenerTls {
    pub http: Option<TlsFiles>,
    pub grpc: Option<TlsFiles>,
    /// Settings that had no effect, to log once logging is up.
    pub notes: Vec<String>,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings {
            cert: None,
            key: None,
            client_ca: None,
            reload_interval_secs: 5,
            grpc: GrpcTlsSettings::default(),
        }
    }
}

impl TlsSettings {
    /// The files of each listener: `cert`/`key`/`client_ca` serve both, the `grpc` settings
    /// override them for gRPC. Incomplete or contradictory settings are errors.
    pub fn resolve(&self) -> anyhow::Result<ListenerTls> {
        let mut notes = Vec::new();
        let http = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.client_ca.clone(),
            }),
            (None, None) if self.client_ca.is_some() => {
                anyhow::bail!("--tls-client-ca (tls.client_ca) needs --tls-cert and --tls-key")
            }
            (None, None) => None,
            _ => anyhow::bail!("--tls-cert and --tls-key (tls.cert, tls.key) must be given together"),
        };

        let g = &self.grpc;
        let mutual = g.use_ssl_mutual == Some(true);
        if mutual && g.use_ssl == Some(false) {
            anyhow::bail!("--grpc-use-ssl false contradicts --grpc-use-ssl-mutual true");
        }
        let has_files = self.cert.is_some() || g.server_cert.is_some() || g.server_key.is_some();
        let grpc_on = mutual || g.use_ssl.unwrap_or(has_files);
        let grpc = if grpc_on {
            let (Some(cert), Some(key)) = (
                g.server_cert.as_ref().or(self.cert.as_ref()),
                g.server_key.as_ref().or(self.key.as_ref()),
            ) else {
                anyhow::bail!(
                    "TLS on gRPC needs a certificate and a key: --tls-cert and --tls-key, or \
                     --grpc-server-cert and --grpc-server-key"
                );
            };
            let client_ca = match g.use_ssl_mutual {
                Some(true) => Some(
                    g.root_cert
                        .as_ref()
                        .or(self.client_ca.as_ref())
                        .cloned()
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "--grpc-use-ssl-mutual needs --grpc-root-cert (or --tls-client-ca)"
                            )
                        })?,
                ),
                Some(false) => None,
                None => self.client_ca.clone(),
            };
            if g.root_cert.is_some() && !mutual {
                notes.push(
                    "--grpc-root-cert is used only with --grpc-use-ssl-mutual true (as in Triton)"
                        .to_string(),
                );
            }
            Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca,
            })
        } else {
            if has_files {
                notes.push(
                    "--grpc-use-ssl false: gRPC stays plain although a certificate is configured".to_string(),
                );
            }
            None
        };
        Ok(ListenerTls { http, grpc, notes })
    }
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
            max_inflight_bytes: None,
            max_bytes_elements: oxserve_frontend::DEFAULT_MAX_BYTES_ELEMENTS,
            exit_timeout_secs: 30,
            worker_threads: None,
        }
    }
}

impl Default for ModelSettings {
    fn default() -> Self {
        ModelSettings {
            repositories: Vec::new(),
            strict_readiness: true,
            queue_capacity: 1024,
            control_mode: "none".into(),
            poll_secs: 15,
            load: Vec::new(),
            exit_on_error: false,
            ready_while_loading: false,
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

    fn files(cert: &str, key: &str, client_ca: Option<&str>) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: cert.into(),
            key: key.into(),
            client_ca: client_ca.map(PathBuf::from),
        })
    }

    #[test]
    fn tls_settings_from_file_and_environment() {
        figment::Jail::expect_with(|jail| {
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(
                s.tls.resolve().map_err(|e| e.to_string())?,
                ListenerTls::default()
            );
            assert_eq!(s.tls.reload_interval_secs, 5);
            jail.create_file(
                "t.toml",
                "[tls]\ncert = \"s.crt\"\nkey = \"s.key\"\nreload_interval_secs = 2\n\
                 [tls.grpc]\nuse_ssl_mutual = true\nroot_cert = \"ca.crt\"\n",
            )?;
            jail.set_env("OXSERVE__TLS__CLIENT_CA", "env-ca.crt");
            let s = Settings::load(Some(Path::new("t.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(s.tls.reload_interval_secs, 2);
            let tls = s.tls.resolve().map_err(|e| e.to_string())?;
            assert_eq!(tls.http, files("s.crt", "s.key", Some("env-ca.crt")));
            assert_eq!(tls.grpc, files("s.crt", "s.key", Some("ca.crt")));
            jail.create_file("bad.toml", "[tls]\ncrt = \"x\"\n")?;
            let e = Settings::load(Some(Path::new("bad.toml")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("crt"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn tls_flags_resolve_per_listener() {
        let both = TlsSettings {
            cert: Some("a.crt".into()),
            key: Some("a.key".into()),
            ..TlsSettings::default()
        };
        let tls = both.resolve().unwrap();
        assert_eq!(tls.http, files("a.crt", "a.key", None));
        assert_eq!(tls.grpc, tls.http);
        assert!(tls.notes.is_empty());

        // Triton's flags alone: TLS on gRPC only; the root cert acts only with mutual auth.
        let triton = TlsSettings {
            grpc: GrpcTlsSettings {
                use_ssl: Some(true),
                server_cert: Some("g.crt".into()),
                server_key: Some("g.key".into()),
                root_cert: Some("ca.crt".into()),
                use_ssl_mutual: None,
            },
            ..TlsSettings::default()
        };
        let tls = triton.resolve().unwrap();
        assert_eq!((tls.http, tls.grpc), (None, files("g.crt", "g.key", None)));
        assert_eq!(tls.notes.len(), 1);
        let mut mutual = triton.clone();
        mutual.grpc.use_ssl = None;
        mutual.grpc.use_ssl_mutual = Some(true);
        assert_eq!(
            mutual.resolve().unwrap().grpc,
            files("g.crt", "g.key", Some("ca.crt"))
        );

        // --grpc-use-ssl false keeps gRPC plain while HTTP uses TLS.
        let mut plain_grpc = both.clone();
        plain_grpc.grpc.use_ssl = Some(false);
        let tls = plain_grpc.resolve().unwrap();
        assert_eq!((tls.http.is_some(), tls.grpc), (true, None));
    }

    #[test]
    fn incomplete_tls_settings_are_errors() {
        let cases = [
            (
                TlsSettings {
                    cert: Some("a.crt".into()),
                    ..TlsSettings::default()
                },
                "together",
            ),
            (
                TlsSettings {
                    client_ca: Some("ca.crt".into()),
                    ..TlsSettings::default()
                },
                "--tls-client-ca",
            ),
            (
                TlsSettings {
                    grpc: GrpcTlsSettings {
                        use_ssl: Some(true),
                        ..GrpcTlsSettings::default()
                    },
                    ..TlsSettings::default()
                },
                "certificate and a key",
            ),
            (
                TlsSettings {
                    cert: Some("a.crt".into()),
                    key: Some("a.key".into()),
                    grpc: GrpcTlsSettings {
                        use_ssl_mutual: Some(true),
                        ..GrpcTlsSettings::default()
                    },
                    ..TlsSettings::default()
                },
                "--grpc-root-cert",
            ),
            (
                TlsSettings {
                    cert: Some("a.crt".into()),
                    key: Some("a.key".into()),
                    grpc: GrpcTlsSettings {
                        use_ssl: Some(false),
                        use_ssl_mutual: Some(true),
                        root_cert: Some("ca.crt".into()),
                        ..GrpcTlsSettings::default()
                    },
                    ..TlsSettings::default()
                },
                "contradicts",
            ),
        ];
        for (settings, expected) in cases {
            let e = settings.resolve().unwrap_err().to_string();
            assert!(e.contains(expected), "{settings:?}: {e}");
        }
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
    fn auth_and_rate_limits_from_file_and_environment() {
        figment::Jail::expect_with(|jail| {
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.auth.api_keys, None);
            assert!(!s.auth.health_requires_key && s.rate_limits.is_empty());
            jail.create_file(
                "a.toml",
                "[auth]\napi_keys = \"/etc/oxserve/keys.toml\"\n\n\
                 [[rate_limits]]\ngroup = \"infer\"\nmodel = \"resnet\"\nper_key = 50\nburst = 5\n\n\
                 [[rate_limits]]\ngroup = \"all\"\nper_address = 200.5\n",
            )?;
            jail.set_env("OXSERVE__AUTH__HEALTH_REQUIRES_KEY", "true");
            let s = Settings::load(Some(Path::new("a.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(
                s.auth.api_keys.as_deref(),
                Some(Path::new("/etc/oxserve/keys.toml"))
            );
            assert!(s.auth.health_requires_key);
            assert_eq!(s.rate_limits.len(), 2);
            assert_eq!(s.rate_limits[0].model.as_deref(), Some("resnet"));
            assert_eq!(
                (s.rate_limits[0].per_key, s.rate_limits[0].burst),
                (Some(50.0), Some(5))
            );
            assert_eq!(s.rate_limits[1].per_address, Some(200.5));
            jail.create_file("bad.toml", "[[rate_limits]]\ngroup = \"infer\"\nper_sec = 1\n")?;
            let e = Settings::load(Some(Path::new("bad.toml")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("per_sec"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn max_inflight_bytes_from_file_and_environment() {
        figment::Jail::expect_with(|jail| {
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.server.max_inflight_bytes, None);
            jail.create_file("i.toml", "[server]\nmax_inflight_bytes = 1073741824\n")?;
            let s = Settings::load(Some(Path::new("i.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(s.server.max_inflight_bytes, Some(1 << 30));
            jail.set_env("OXSERVE__SERVER__MAX_INFLIGHT_BYTES", "536870912");
            let s = Settings::load(Some(Path::new("i.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(s.server.max_inflight_bytes, Some(512 << 20));
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
