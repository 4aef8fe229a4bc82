//! Which endpoint group (scope) a request belongs to, decided from its path alone, for every
//! listener: the KServe v2 HTTP routes, the gRPC methods (`/package.Service/Method`) and the
//! metrics port. This is the ONE place that knows; authentication and rate limits ask it. A new
//! front-end (TF Serving, TorchServe) adds its routes to [`classify`] and nothing else.

use std::fmt;

/// An endpoint group. API keys are granted scopes of these names, and rate limits are set per
/// group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Running a model.
    Infer,
    /// Server and model metadata, model configuration.
    Metadata,
    /// Liveness and readiness of the server and of models (Kubernetes probes).
    Health,
    /// Repository index, model load and unload: administrative.
    Repository,
    /// Registering shared-memory regions: administrative.
    SharedMemory,
    /// The Prometheus endpoint.
    Metrics,
    /// Per-model inference statistics.
    Statistics,
}

impl Scope {
    pub const ALL: [Scope; 7] = [
        Scope::Infer,
        Scope::Metadata,
        Scope::Health,
        Scope::Repository,
        Scope::SharedMemory,
        Scope::Metrics,
        Scope::Statistics,
    ];

    /// The name used in key files, rate-limit rules and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Infer => "infer",
            Scope::Metadata => "metadata",
            Scope::Health => "health",
            Scope::Repository => "repository",
            Scope::SharedMemory => "shared_memory",
            Scope::Metrics => "metrics",
            Scope::Statistics => "statistics",
        }
    }

    pub fn parse(name: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// A bit of its own, for scope sets.
    pub(crate) fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The model a request is about, as far as the path (or, for gRPC, the first bytes of the
/// message) tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// The endpoint is not about one model (server metadata, health, repository index).
    NotApplicable,
    /// The model named in the path or message.
    Named(String),
    /// The model is named inside the request body, which is read later (gRPC messages).
    InBody,
}

/// A classified request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// `None`: not a known endpoint (it answers 404 or UNIMPLEMENTED further in); it still
    /// needs a valid key, of any scope, once keys are configured.
    pub scope: Option<Scope>,
    pub model: ModelRef,
}

impl Route {
    fn new(scope: Scope) -> Route {
        Route {
            scope: Some(scope),
            model: ModelRef::NotApplicable,
        }
    }

    fn for_model(scope: Scope, model: &str) -> Route {
        Route {
            scope: Some(scope),
            model: ModelRef::Named(decode_segment(model)),
        }
    }

    fn in_body(scope: Scope) -> Route {
        Route {
            scope: Some(scope),
            model: ModelRef::InBody,
        }
    }

    const UNKNOWN: Route = Route {
        scope: None,
        model: ModelRef::NotApplicable,
    };
}

/// The gRPC service of KServe v2 / Triton.
const KSERVE_GRPC: &str = "inference.GRPCInferenceService";
/// TF Serving's gRPC services.
const TFS_PREDICTION: &str = "tensorflow.serving.PredictionService";
const TFS_MODEL: &str = "tensorflow.serving.ModelService";
/// The standard gRPC health service.
const GRPC_HEALTH: &str = "grpc.health.v1.Health";
const TS_INFERENCE: &str = "org.pytorch.serve.grpc.inference.InferenceAPIsService";
const TS_MANAGEMENT: &str = "org.pytorch.serve.grpc.management.ManagementAPIsService";

/// The endpoint group of a request path, on any listener.
pub fn classify(path: &str) -> Route {
    let Some(rest) = path.strip_prefix('/') else {
        return Route::UNKNOWN;
    };
    // gRPC: `/package.Service/Method`.
    if let Some((service, method)) = rest.split_once('/')
        && service.contains('.')
    {
        return classify_grpc(service, method);
    }
    let segments: Vec<&str> = rest.split('/').collect();
    classify_http(&segments)
}

fn classify_http(segments: &[&str]) -> Route {
    use Scope::*;
    match segments {
        ["metrics"] => Route::new(Metrics),
        // KServe v2 (Triton's extensions included).
        ["v2"] => Route::new(Metadata),
        ["v2", "health", "live" | "ready"] => Route::new(Health),
        ["v2", "models", "stats"] => Route::new(Statistics),
        ["v2", "models", model] | ["v2", "models", model, "versions", _] => Route::for_model(Metadata, model),
        ["v2", "models", model, "ready"] | ["v2", "models", model, "versions", _, "ready"] => {
            Route::for_model(Health, model)
        }
        ["v2", "models", model, "config"] | ["v2", "models", model, "versions", _, "config"] => {
            Route::for_model(Metadata, model)
        }
        ["v2", "models", model, "stats"] | ["v2", "models", model, "versions", _, "stats"] => {
            Route::for_model(Statistics, model)
        }
        ["v2", "models", model, "infer"] | ["v2", "models", model, "versions", _, "infer"] => {
            Route::for_model(Infer, model)
        }
        ["v2", "models", model, "labels"] | ["v2", "models", model, "labels", _] => {
            Route::for_model(Metadata, model)
        }
        ["v2", "models", model, "labels", _, "ready"] => Route::for_model(Health, model),
        ["v2", "models", model, "labels", _, "config"] => Route::for_model(Metadata, model),
        ["v2", "models", model, "labels", _, "infer"] => Route::for_model(Infer, model),
        ["v2", "models", _, "trace", "setting"] => Route::new(Repository),
        // Repository changes, and Triton's logging and trace settings: administrative.
        ["v2", "repository", ..] | ["v2", "logging"] | ["v2", "trace", ..] => Route::new(Repository),
        ["v2", "systemsharedmemory" | "cudasharedmemory", ..] => Route::new(SharedMemory),
        // TF Serving's REST API: `M[/versions/V|/labels/L]:predict` (also classify and
        // regress) runs the model; without a verb it is status or metadata.
        ["v1", "models", first, rest @ ..] => {
            let model = first.split(':').next().unwrap_or(first);
            let last = rest.last().unwrap_or(first);
            if last.contains(':') {
                Route::for_model(Infer, model)
            } else {
                Route::for_model(Metadata, model)
            }
        }
        ["v1", "models"] => Route::new(Metadata),
        // TorchServe's inference API (the management API's `/models...` is administration).
        ["ping"] => Route::new(Health),
        ["api-description"] | [""] => Route::new(Metadata),
        ["predictions", model] | ["predictions", model, _] => Route::for_model(Infer, model),
        ["models", ..] => Route::new(Repository),
        _ => Route::UNKNOWN,
    }
}

fn classify_grpc(service: &str, method: &str) -> Route {
    use Scope::*;
    match (service, method) {
        (GRPC_HEALTH, _) => Route::new(Health),
        (KSERVE_GRPC, "ServerLive" | "ServerReady") => Route::new(Health),
        (KSERVE_GRPC, "ModelReady") => Route::in_body(Health),
        (KSERVE_GRPC, "ServerMetadata") => Route::new(Metadata),
        (KSERVE_GRPC, "ModelMetadata" | "ModelConfig" | "ModelVersionLabels") => Route::in_body(Metadata),
        (KSERVE_GRPC, "ModelInfer" | "ModelStreamInfer") => Route::in_body(Infer),
        (KSERVE_GRPC, "ModelStatistics") => Route::in_body(Statistics),
        // Triton's administrative calls (some answer UNIMPLEMENTED here, but must not be
        // reachable with a lesser key when they are added).
        (
            KSERVE_GRPC,
            "RepositoryIndex"
            | "RepositoryModelLoad"
            | "RepositoryModelUnload"
            | "ModelVersionLabelSet"
            | "ModelRollback"
            | "TraceSetting"
            | "LogSettings",
        ) => Route::new(Repository),
        (KSERVE_GRPC, m) if m.starts_with("SystemSharedMemory") || m.starts_with("CudaSharedMemory") => {
            Route::new(SharedMemory)
        }
        (TFS_PREDICTION, "Predict" | "Classify" | "Regress" | "MultiInference") => Route::in_body(Infer),
        (TFS_PREDICTION, "GetModelMetadata") | (TFS_MODEL, "GetModelStatus") => Route::in_body(Metadata),
        (TFS_MODEL, "HandleReloadConfigRequest") => Route::new(Repository),
        // TorchServe's gRPC APIs, scoped as its HTTP APIs (model_name is field 1 of its
        // prediction requests).
        (TS_INFERENCE, "Ping") => Route::new(Health),
        (TS_INFERENCE, _) => Route::in_body(Infer),
        (TS_MANAGEMENT, _) => Route::new(Repository),
        _ => Route::UNKNOWN,
    }
}

/// A path segment as the router sees it (percent-decoded), so that limits set for model `a b`
/// apply to `/v2/models/a%20b/infer`.
fn decode_segment(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .map_or_else(|_| segment.to_string(), |s| s.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(path: &str) -> Option<Scope> {
        classify(path).scope
    }

    /// Every route of the KServe HTTP router (crates/oxserve-kserve/src/http/mod.rs), the
    /// metrics port, and every gRPC method of inference.GRPCInferenceService and
    /// grpc.health.v1.
    #[test]
    fn every_endpoint_has_its_group() {
        use Scope::*;
        let table: &[(&str, Option<Scope>)] = &[
            ("/v2", Some(Metadata)),
            ("/v2/health/live", Some(Health)),
            ("/v2/health/ready", Some(Health)),
            ("/v2/models/m", Some(Metadata)),
            ("/v2/models/m/versions/1", Some(Metadata)),
            ("/v2/models/m/ready", Some(Health)),
            ("/v2/models/m/versions/1/ready", Some(Health)),
            ("/v2/models/m/config", Some(Metadata)),
            ("/v2/models/m/versions/1/config", Some(Metadata)),
            ("/v2/models/stats", Some(Statistics)),
            ("/v2/models/m/stats", Some(Statistics)),
            ("/v2/models/m/versions/1/stats", Some(Statistics)),
            ("/v2/models/m/infer", Some(Infer)),
            ("/v2/models/m/versions/1/infer", Some(Infer)),
            ("/v2/repository/index", Some(Repository)),
            ("/v2/repository/models/m/load", Some(Repository)),
            ("/v2/repository/models/m/unload", Some(Repository)),
            ("/v2/systemsharedmemory/status", Some(SharedMemory)),
            ("/v2/systemsharedmemory/region/r/status", Some(SharedMemory)),
            ("/v2/systemsharedmemory/region/r/register", Some(SharedMemory)),
            ("/v2/systemsharedmemory/region/r/unregister", Some(SharedMemory)),
            ("/v2/systemsharedmemory/unregister", Some(SharedMemory)),
            ("/v2/cudasharedmemory/status", Some(SharedMemory)),
            ("/v2/cudasharedmemory/region/r/status", Some(SharedMemory)),
            ("/v2/cudasharedmemory/region/r/register", Some(SharedMemory)),
            ("/v2/cudasharedmemory/region/r/unregister", Some(SharedMemory)),
            ("/v2/cudasharedmemory/unregister", Some(SharedMemory)),
            ("/metrics", Some(Metrics)),
            ("/inference.GRPCInferenceService/ServerLive", Some(Health)),
            ("/inference.GRPCInferenceService/ServerReady", Some(Health)),
            ("/inference.GRPCInferenceService/ModelReady", Some(Health)),
            ("/inference.GRPCInferenceService/ServerMetadata", Some(Metadata)),
            ("/inference.GRPCInferenceService/ModelMetadata", Some(Metadata)),
            ("/inference.GRPCInferenceService/ModelConfig", Some(Metadata)),
            ("/inference.GRPCInferenceService/ModelInfer", Some(Infer)),
            ("/inference.GRPCInferenceService/ModelStreamInfer", Some(Infer)),
            ("/v2/logging", Some(Repository)),
            ("/inference.GRPCInferenceService/LogSettings", Some(Repository)),
            (
                "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Ping",
                Some(Health),
            ),
            (
                "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions",
                Some(Infer),
            ),
            (
                "/org.pytorch.serve.grpc.management.ManagementAPIsService/RegisterModel",
                Some(Repository),
            ),
            (
                "/inference.GRPCInferenceService/ModelStatistics",
                Some(Statistics),
            ),
            (
                "/inference.GRPCInferenceService/RepositoryIndex",
                Some(Repository),
            ),
            (
                "/inference.GRPCInferenceService/RepositoryModelLoad",
                Some(Repository),
            ),
            (
                "/inference.GRPCInferenceService/RepositoryModelUnload",
                Some(Repository),
            ),
            ("/inference.GRPCInferenceService/TraceSetting", Some(Repository)),
            ("/inference.GRPCInferenceService/LogSettings", Some(Repository)),
            (
                "/inference.GRPCInferenceService/SystemSharedMemoryStatus",
                Some(SharedMemory),
            ),
            (
                "/inference.GRPCInferenceService/SystemSharedMemoryRegister",
                Some(SharedMemory),
            ),
            (
                "/inference.GRPCInferenceService/SystemSharedMemoryUnregister",
                Some(SharedMemory),
            ),
            (
                "/inference.GRPCInferenceService/CudaSharedMemoryRegister",
                Some(SharedMemory),
            ),
            ("/grpc.health.v1.Health/Check", Some(Health)),
            ("/grpc.health.v1.Health/Watch", Some(Health)),
            // TF Serving's REST API and gRPC services.
            ("/v1/models/m:predict", Some(Infer)),
            ("/v1/models/m/versions/2:classify", Some(Infer)),
            ("/v1/models/m/labels/stable:regress", Some(Infer)),
            ("/v1/models/m", Some(Metadata)),
            ("/v1/models/m/versions/2", Some(Metadata)),
            ("/v1/models/m/labels/stable/metadata", Some(Metadata)),
            ("/tensorflow.serving.PredictionService/Predict", Some(Infer)),
            ("/tensorflow.serving.PredictionService/Classify", Some(Infer)),
            ("/tensorflow.serving.PredictionService/Regress", Some(Infer)),
            (
                "/tensorflow.serving.PredictionService/MultiInference",
                Some(Infer),
            ),
            (
                "/tensorflow.serving.PredictionService/GetModelMetadata",
                Some(Metadata),
            ),
            ("/tensorflow.serving.ModelService/GetModelStatus", Some(Metadata)),
            (
                "/tensorflow.serving.ModelService/HandleReloadConfigRequest",
                Some(Repository),
            ),
            // Unknown endpoints: no group (a key of any scope), never a lesser one.
            // TorchServe's API description (OPTIONS /, GET /api-description).
            ("/", Some(Metadata)),
            ("/api-description", Some(Metadata)),
            ("", None),
            ("/v2/", None),
            ("/v2/health", None),
            ("/v2/models", None),
            ("/v2/models/m/infer/extra", None),
            ("/v2/models/m/versions/1/infer/x", None),
            ("/v3/models/m/infer", None),
            ("/inference.GRPCInferenceService/NoSuchMethod", None),
            ("/other.Service/ModelInfer", None),
        ];
        for (path, expected) in table {
            assert_eq!(scope(path), *expected, "{path}");
        }
    }

    #[test]
    fn the_model_comes_from_the_path_or_the_body() {
        assert_eq!(
            classify("/v2/models/resnet/versions/2/infer").model,
            ModelRef::Named("resnet".into())
        );
        assert_eq!(
            classify("/v1/models/resnet:predict").model,
            ModelRef::Named("resnet".into())
        );
        assert_eq!(
            classify("/v1/models/resnet/labels/canary:predict").model,
            ModelRef::Named("resnet".into())
        );
        assert_eq!(
            classify("/v2/models/a%20b/infer").model,
            ModelRef::Named("a b".into())
        );
        // Not valid UTF-8 once decoded: kept as sent.
        assert_eq!(
            classify("/v2/models/%ff/infer").model,
            ModelRef::Named("%ff".into())
        );
        assert_eq!(classify("/v2/health/ready").model, ModelRef::NotApplicable);
        assert_eq!(
            classify("/inference.GRPCInferenceService/ModelInfer").model,
            ModelRef::InBody
        );
        assert_eq!(
            classify("/inference.GRPCInferenceService/ServerMetadata").model,
            ModelRef::NotApplicable
        );
    }

    #[test]
    fn scope_names_round_trip() {
        for s in Scope::ALL {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
        }
        assert_eq!(Scope::parse("all"), None);
        assert_eq!(Scope::parse("Infer"), None);
        let bits: u8 = Scope::ALL.iter().map(|s| s.bit()).fold(0, |a, b| a | b);
        assert_eq!(bits.count_ones(), 7);
    }
}
