//! Triton's restricted APIs (`--http-restricted-api` / `--grpc-restricted-protocol`
//! `<api>[,<api>...]:<key>=<value>`): a request to a restricted group of Triton's endpoints is
//! served only when it carries the header `<key>: <value>` (over gRPC the metadata key is
//! `triton-grpc-protocol-<key>`, as in Triton). Otherwise HTTP answers 403 `{"error": "This
//! API is restricted, expecting header '<key>'"}` and gRPC UNAVAILABLE "This protocol is
//! restricted, expecting header 'triton-grpc-protocol-<key>'" — Triton's words and codes.
//!
//! This gate is independent of API keys: it is Triton's mechanism, for clients that already
//! send such a header (a gateway-injected secret, ...).

use std::collections::BTreeMap;

/// Triton's API groups (`RestrictedCategory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ApiGroup {
    Health,
    Metadata,
    Inference,
    SharedMemory,
    ModelConfig,
    ModelRepository,
    Statistics,
    Trace,
    Logging,
}

impl ApiGroup {
    pub const ALL: [ApiGroup; 9] = [
        ApiGroup::Health,
        ApiGroup::Metadata,
        ApiGroup::Inference,
        ApiGroup::SharedMemory,
        ApiGroup::ModelConfig,
        ApiGroup::ModelRepository,
        ApiGroup::Statistics,
        ApiGroup::Trace,
        ApiGroup::Logging,
    ];

    /// Triton's name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiGroup::Health => "health",
            ApiGroup::Metadata => "metadata",
            ApiGroup::Inference => "inference",
            ApiGroup::SharedMemory => "shared-memory",
            ApiGroup::ModelConfig => "model-config",
            ApiGroup::ModelRepository => "model-repository",
            ApiGroup::Statistics => "statistics",
            ApiGroup::Trace => "trace",
            ApiGroup::Logging => "logging",
        }
    }

    fn parse(name: &str) -> Option<ApiGroup> {
        ApiGroup::ALL.into_iter().find(|g| g.as_str() == name)
    }
}

/// The header a group needs: (name, value). Names are lower-case (HTTP/2 and hyper's HTTP/1
/// header names are).
pub type Requirement = (String, String);

/// The restrictions of one protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restrictions {
    groups: BTreeMap<ApiGroup, Requirement>,
}

impl Restrictions {
    /// Parses Triton's flag values. `grpc`: the metadata key gets Triton's
    /// `triton-grpc-protocol-` prefix. A group restricted twice, an unknown group or a value
    /// without `:` and `=` is an error naming it, as Triton refuses to start.
    pub fn parse(specs: &[String], grpc: bool) -> Result<Restrictions, String> {
        let flag = if grpc {
            "--grpc-restricted-protocol"
        } else {
            "--http-restricted-api"
        };
        let mut groups = BTreeMap::new();
        for spec in specs {
            let (apis, header) = spec
                .rsplit_once(':')
                .ok_or_else(|| format!("{flag} '{spec}': expected <api>[,<api>...]:<key>=<value>"))?;
            let (key, value) = header
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| format!("{flag} '{spec}': expected <api>[,<api>...]:<key>=<value>"))?;
            let key = key.to_ascii_lowercase();
            let key = if grpc {
                format!("triton-grpc-protocol-{key}")
            } else {
                key
            };
            for api in apis.split(',').map(str::trim) {
                let group = ApiGroup::parse(api).ok_or_else(|| {
                    let known: Vec<&str> = ApiGroup::ALL.iter().map(|g| g.as_str()).collect();
                    format!(
                        "{flag} '{spec}': unknown API '{api}' (known: {})",
                        known.join(", ")
                    )
                })?;
                if groups.insert(group, (key.clone(), value.to_string())).is_some() {
                    return Err(format!("{flag}: '{api}' is restricted more than once"));
                }
            }
        }
        Ok(Restrictions { groups })
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// What a request to `group` must carry, if the group is restricted.
    pub fn requirement(&self, group: ApiGroup) -> Option<&Requirement> {
        self.groups.get(&group)
    }
}

/// The group of a Triton HTTP endpoint (`/v2/...`); `None` for other paths.
pub fn http_group(path: &str) -> Option<ApiGroup> {
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some(ApiGroup::Metadata);
    }
    let rest = rest.strip_prefix('/')?;
    let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    Some(match parts.as_slice() {
        ["health", ..] => ApiGroup::Health,
        ["repository", ..] => ApiGroup::ModelRepository,
        ["systemsharedmemory", ..] | ["cudasharedmemory", ..] => ApiGroup::SharedMemory,
        ["trace", ..] => ApiGroup::Trace,
        ["logging", ..] => ApiGroup::Logging,
        ["models", "stats"] => ApiGroup::Statistics,
        ["models", ..] => {
            // /v2/models/M[/versions/V|/labels/L][/<action>]
            let tail: &[&str] = match &parts[1..] {
                [_, "versions" | "labels", _, rest @ ..] => rest,
                [_, rest @ ..] => rest,
                [] => &[],
            };
            match tail {
                [] => ApiGroup::Metadata,
                ["ready"] => ApiGroup::Health,
                ["config"] => ApiGroup::ModelConfig,
                ["stats"] => ApiGroup::Statistics,
                ["trace", ..] => ApiGroup::Trace,
                ["infer" | "generate" | "generate_stream" | "classify"] => ApiGroup::Inference,
                // oxserve's label and rollback endpoints change what serves: administrative.
                _ => ApiGroup::ModelRepository,
            }
        }
        _ => return None,
    })
}

/// The group of a `inference.GRPCInferenceService` method; `None` for other services.
pub fn grpc_group(path: &str) -> Option<ApiGroup> {
    let method = path.strip_prefix("/inference.GRPCInferenceService/")?;
    Some(match method {
        "ServerLive" | "ServerReady" | "ModelReady" => ApiGroup::Health,
        "ServerMetadata" | "ModelMetadata" => ApiGroup::Metadata,
        "ModelInfer" | "ModelStreamInfer" => ApiGroup::Inference,
        "ModelConfig" => ApiGroup::ModelConfig,
        "ModelStatistics" => ApiGroup::Statistics,
        "TraceSetting" => ApiGroup::Trace,
        "LogSettings" => ApiGroup::Logging,
        m if m.starts_with("SystemSharedMemory") || m.starts_with("CudaSharedMemory") => {
            ApiGroup::SharedMemory
        }
        // RepositoryIndex / ModelLoad / ModelUnload and oxserve's label and rollback RPCs.
        _ => ApiGroup::ModelRepository,
    })
}

/// The refusal message, in Triton's words.
pub fn refusal_message(header: &str, grpc: bool) -> String {
    if grpc {
        format!("This protocol is restricted, expecting header '{header}'")
    } else {
        format!("This API is restricted, expecting header '{header}'")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_triton_flag_values() {
        let r = Restrictions::parse(
            &[
                "model-repository,shared-memory:admin-key=secret".into(),
                "inference:Infer-Key=k".into(),
            ],
            false,
        )
        .unwrap();
        assert_eq!(
            r.requirement(ApiGroup::ModelRepository),
            Some(&("admin-key".to_string(), "secret".to_string()))
        );
        assert!(r.requirement(ApiGroup::SharedMemory).is_some());
        assert_eq!(r.requirement(ApiGroup::Inference).unwrap().0, "infer-key");
        assert!(r.requirement(ApiGroup::Health).is_none());
        let g = Restrictions::parse(&["inference:infer-key=v".into()], true).unwrap();
        assert_eq!(
            g.requirement(ApiGroup::Inference).unwrap().0,
            "triton-grpc-protocol-infer-key"
        );
        for bad in ["inference", "inference:novalue", "nosuch:k=v", "inference:=v"] {
            assert!(Restrictions::parse(&[bad.into()], false).is_err(), "{bad}");
        }
        assert!(Restrictions::parse(&["health:a=1".into(), "health:b=2".into()], false).is_err());
    }

    #[test]
    fn classifies_triton_http_paths() {
        let cases = [
            ("/v2", Some(ApiGroup::Metadata)),
            ("/v2/health/ready", Some(ApiGroup::Health)),
            ("/v2/models/m", Some(ApiGroup::Metadata)),
            ("/v2/models/m/versions/2", Some(ApiGroup::Metadata)),
            ("/v2/models/m/ready", Some(ApiGroup::Health)),
            ("/v2/models/m/versions/1/ready", Some(ApiGroup::Health)),
            ("/v2/models/m/config", Some(ApiGroup::ModelConfig)),
            ("/v2/models/m/stats", Some(ApiGroup::Statistics)),
            ("/v2/models/stats", Some(ApiGroup::Statistics)),
            ("/v2/models/m/infer", Some(ApiGroup::Inference)),
            ("/v2/models/m/labels/stable/infer", Some(ApiGroup::Inference)),
            ("/v2/repository/index", Some(ApiGroup::ModelRepository)),
            ("/v2/repository/models/m/load", Some(ApiGroup::ModelRepository)),
            (
                "/v2/systemsharedmemory/region/r/register",
                Some(ApiGroup::SharedMemory),
            ),
            ("/v2/cudasharedmemory/status", Some(ApiGroup::SharedMemory)),
            ("/v2/trace/setting", Some(ApiGroup::Trace)),
            ("/v2/logging", Some(ApiGroup::Logging)),
            ("/v1/models/m:predict", None),
            ("/predictions/m", None),
            ("/metrics", None),
        ];
        for (path, want) in cases {
            assert_eq!(http_group(path), want, "{path}");
        }
    }

    #[test]
    fn classifies_triton_grpc_methods() {
        let p = |m: &str| format!("/inference.GRPCInferenceService/{m}");
        assert_eq!(grpc_group(&p("ServerLive")), Some(ApiGroup::Health));
        assert_eq!(grpc_group(&p("ModelStreamInfer")), Some(ApiGroup::Inference));
        assert_eq!(grpc_group(&p("ModelConfig")), Some(ApiGroup::ModelConfig));
        assert_eq!(
            grpc_group(&p("RepositoryModelLoad")),
            Some(ApiGroup::ModelRepository)
        );
        assert_eq!(
            grpc_group(&p("SystemSharedMemoryRegister")),
            Some(ApiGroup::SharedMemory)
        );
        assert_eq!(grpc_group("/tensorflow.serving.PredictionService/Predict"), None);
        assert_eq!(grpc_group("/grpc.health.v1.Health/Check"), None);
    }
}
