//! KServe v2 over HTTP/1.1 and HTTP/2 (axum), with Triton's binary tensor data, classification,
//! model configuration, statistics and repository index extensions.

mod body;
mod error;
mod infer;
mod json_data;
mod labels;
mod shm;
mod stats;
mod traced_body;
mod traffic;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use oxserve_core::{Error, ErrorKind, ModelMetadata};
use oxserve_engine::InferenceService;
use oxserve_frontend::{DecodeLimits, ModelTarget, decode_off_worker};
use oxserve_shm::SharedMemoryRegistry;
use serde::{Deserialize, Serialize};

pub use body::{BodyCharge, current_body_charge, drain_body, read_body, with_body_charge};
pub use error::{ApiError, http_status};
pub use infer::{EncodedResponse, decode_raw_request, decode_request, encode_response};
pub use json_data::JsonData;

/// Triton's header naming the JSON part's length in a binary-extension body.
pub const INFERENCE_HEADER_CONTENT_LENGTH: &str = "inference-header-content-length";

#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Largest request body accepted, before and after decompression (Triton's default 64 MiB).
    pub max_body_bytes: usize,
    /// Limits applied while decoding infer requests (BYTES elements).
    pub decode: DecodeLimits,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            max_body_bytes: 64 << 20,
            decode: DecodeLimits::default(),
        }
    }
}

#[derive(Clone)]
pub(super) struct AppState {
    engine: InferenceService,
    options: HttpOptions,
    shm: Arc<SharedMemoryRegistry>,
}

type ApiResult<T> = Result<T, ApiError>;

/// All KServe v2 routes. `shm` holds the shared-memory regions clients register; the gRPC
/// front-end shares it.
pub fn router(engine: InferenceService, options: HttpOptions, shm: Arc<SharedMemoryRegistry>) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{model}", get(model_metadata))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(model_metadata_version),
        )
        .route("/v2/models/{model}/ready", get(model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(model_ready_version),
        )
        .route("/v2/models/{model}/config", get(model_config))
        .route(
            "/v2/models/{model}/versions/{version}/config",
            get(model_config_version),
        )
        .route("/v2/models/stats", get(stats::all_stats))
        .route("/v2/models/{model}/stats", get(stats::model_stats))
        .route(
            "/v2/models/{model}/versions/{version}/stats",
            get(stats::model_version_stats),
        )
        .route("/v2/models/{model}/labels", get(labels::list))
        .route("/v2/models/{model}/labels/{label}", get(labels::metadata))
        .route("/v2/models/{model}/labels/{label}/ready", get(labels::ready))
        .route("/v2/models/{model}/labels/{label}/config", get(labels::config))
        .route("/v2/models/{model}/labels/{label}/infer", post(labels::infer))
        .route("/v2/repository/models/{model}/labels/{label}", post(labels::set))
        .route("/v2/repository/models/{model}/rollback", post(labels::rollback))
        .route("/v2/models/{model}/traffic", get(traffic::get))
        .route("/v2/repository/models/{model}/traffic", post(traffic::set))
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer_version))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{model}/load", post(load))
        .route("/v2/repository/models/{model}/unload", post(unload))
        .route("/v2/systemsharedmemory/status", get(shm::status_all))
        .route(
            "/v2/systemsharedmemory/region/{name}/status",
            get(shm::status_region),
        )
        .route(
            "/v2/systemsharedmemory/region/{name}/register",
            post(shm::register),
        )
        .route(
            "/v2/systemsharedmemory/region/{name}/unregister",
            post(shm::unregister_region),
        )
        .route("/v2/systemsharedmemory/unregister", post(shm::unregister_all))
        .route("/v2/cudasharedmemory/status", get(shm::cuda_status_all))
        .route(
            "/v2/cudasharedmemory/region/{name}/status",
            get(shm::cuda_status_region),
        )
        .route(
            "/v2/cudasharedmemory/region/{name}/register",
            post(shm::cuda_register),
        )
        .route(
            "/v2/cudasharedmemory/region/{name}/unregister",
            post(shm::cuda_unregister),
        )
        .route("/v2/cudasharedmemory/unregister", post(shm::cuda_unregister))
        .route("/v2/logging", get(logging_get).post(logging_post))
        .route("/v2/trace/setting", get(trace_global_get).post(trace_global_post))
        .route(
            "/v2/models/{model}/trace/setting",
            get(trace_model_get).post(trace_model_post),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(AppState { engine, options, shm })
}

/// Triton's logging extension: the running server's log settings.
async fn logging_get() -> Result<Response, ApiError> {
    let settings = crate::logging::settings()?;
    Ok(axum::Json(crate::logging::settings_json(&settings)).into_response())
}

/// Changes the log settings the body names (`null` or absent: unchanged); answers them all.
async fn logging_post(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(&headers, body, state.options.max_body_bytes).await?;
    let json: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| Error::invalid(format!("the logging settings are not valid JSON: {e}")))?;
    let update = crate::logging::update_from_json(&json)?;
    let settings = crate::logging::update(&update)?;
    Ok(axum::Json(crate::logging::settings_json(&settings)).into_response())
}

/// Triton's trace extension: the global trace setting, or a model's.
async fn trace_global_get(State(s): State<AppState>) -> ApiResult<Response> {
    trace_response(&s, None, None)
}

async fn trace_model_get(State(s): State<AppState>, Path(model): Path<String>) -> ApiResult<Response> {
    trace_response(&s, Some(&model), None)
}

async fn trace_global_post(State(s): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult<Response> {
    let body = read_body(&headers, body, s.options.max_body_bytes).await?;
    trace_response(&s, None, Some(&body))
}

async fn trace_model_post(
    State(s): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let body = read_body(&headers, body, s.options.max_body_bytes).await?;
    trace_response(&s, Some(&model), Some(&body))
}

fn trace_response(s: &AppState, model: Option<&str>, body: Option<&[u8]>) -> ApiResult<Response> {
    let update = body.map(crate::trace::settings_from_json).transpose()?;
    let settings = crate::trace::trace_setting(
        &s.engine,
        model,
        update
            .as_deref()
            .map(|u| (u, oxserve_engine::trace::settings::Protocol::Http)),
    )?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        crate::trace::settings_to_json(&settings),
    )
        .into_response())
}

async fn not_found() -> ApiError {
    ApiError(Error::not_found("no such endpoint"))
}

async fn method_not_allowed() -> Response {
    let mut r = ApiError(Error::invalid("method not allowed for this endpoint")).into_response();
    *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    r
}

fn parse_version(version: &str) -> ApiResult<Option<u64>> {
    Ok(oxserve_frontend::parse_version(version)?)
}

fn json_response<T: Serialize>(value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => ApiError(Error::internal(e.to_string())).into_response(),
    }
}

#[derive(Serialize)]
struct ServerMetadataJson {
    name: String,
    version: String,
    extensions: Vec<String>,
}

async fn server_metadata(State(s): State<AppState>) -> Response {
    let m = s.engine.server_metadata();
    json_response(&ServerMetadataJson {
        name: m.name,
        version: m.version,
        extensions: m.extensions,
    })
}

async fn live(State(s): State<AppState>) -> StatusCode {
    if s.engine.is_live() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn ready(State(s): State<AppState>) -> StatusCode {
    if s.engine.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

#[derive(Serialize)]
struct TensorMetaJson<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [i64],
}

#[derive(Serialize)]
struct ModelMetadataJson<'a> {
    name: &'a str,
    versions: &'a [String],
    platform: &'a str,
    inputs: Vec<TensorMetaJson<'a>>,
    outputs: Vec<TensorMetaJson<'a>>,
}

fn meta(t: &oxserve_core::TensorMeta) -> TensorMetaJson<'_> {
    TensorMetaJson {
        name: &t.name,
        datatype: t.datatype.wire_name(),
        shape: &t.shape,
    }
}

pub(super) fn metadata_json(m: &ModelMetadata) -> Response {
    let body = ModelMetadataJson {
        name: &m.name,
        versions: &m.versions,
        platform: &m.platform,
        inputs: m.inputs.iter().map(meta).collect(),
        outputs: m.outputs.iter().map(meta).collect(),
    };
    json_response(&body)
}

async fn model_metadata(State(s): State<AppState>, Path(model): Path<String>) -> ApiResult<Response> {
    Ok(metadata_json(&s.engine.model_metadata(&model, None)?))
}

async fn model_metadata_version(
    State(s): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> ApiResult<Response> {
    Ok(metadata_json(
        &s.engine.model_metadata(&model, parse_version(&version)?)?,
    ))
}

pub(super) fn ready_status(s: &AppState, model: &str, version: Option<u64>) -> ApiResult<StatusCode> {
    match s.engine.check_model_ready(model, version) {
        Ok(()) => Ok(StatusCode::OK),
        Err(e) if e.kind() == ErrorKind::NotFound => Err(ApiError(e)),
        Err(_) => Ok(StatusCode::SERVICE_UNAVAILABLE),
    }
}

async fn model_ready(State(s): State<AppState>, Path(model): Path<String>) -> ApiResult<StatusCode> {
    ready_status(&s, &model, None)
}

async fn model_ready_version(
    State(s): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    ready_status(&s, &model, parse_version(&version)?)
}

pub(super) fn config_response(s: &AppState, model: &str, version: Option<u64>) -> ApiResult<Response> {
    let config = s.engine.model_config(model, version)?;
    let json = oxserve_repository::config_to_json(&config);
    Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
}

async fn model_config(State(s): State<AppState>, Path(model): Path<String>) -> ApiResult<Response> {
    config_response(&s, &model, None)
}

async fn model_config_version(
    State(s): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> ApiResult<Response> {
    config_response(&s, &model, parse_version(&version)?)
}

pub(super) async fn infer(
    State(s): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    run_infer(s, model, None, headers, body).await
}

async fn infer_version(
    State(s): State<AppState>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let version = parse_version(&version)?;
    run_infer(s, model, version, headers, body).await
}

fn header_length(headers: &HeaderMap) -> ApiResult<Option<usize>> {
    match headers.get(INFERENCE_HEADER_CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .map(Some)
            .ok_or_else(|| {
                ApiError(Error::invalid(
                    "Inference-Header-Content-Length is not a non-negative integer",
                ))
            }),
    }
}

/// The infer endpoint: the model is looked up first (an unknown one costs no body read and no
/// decoding), then the body is read and decoded (off the async workers when large), run by
/// the shared request runner, and encoded.
pub(super) async fn run_infer(
    s: AppState,
    model: String,
    version: Option<u64>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let received = std::time::Instant::now();
    let checked =
        header_length(&headers).and_then(|len| Ok((len, ModelTarget::resolve(&s.engine, &model, version)?)));
    let (header_len, target) = match checked {
        Ok(ok) => ok,
        Err(e) => {
            body::drain_body(&headers, body, s.options.max_body_bytes).await;
            return Err(e);
        }
    };
    let trace = s
        .engine
        .trace()
        .sample(&model, headers.get("traceparent").and_then(|v| v.to_str().ok()));
    if let Some(t) = &trace {
        t.timestamp_at("HTTP_RECV_START", received);
    }
    let body = body::read_body(&headers, body, s.options.max_body_bytes).await?;
    let request = match header_len {
        Some(0) => {
            let metadata = s.engine.model_metadata(&model, version)?;
            infer::decode_raw_request(target, &metadata, body)?
        }
        _ => {
            let limits = s.options.decode;
            decode_off_worker(body.len(), move || {
                infer::decode_request(target, &body, header_len, &limits)
            })
            .await?
        }
    };
    let mut request = request;
    request.routing_key = oxserve_frontend::sticky_routing_key(&s.engine, &model, |name| {
        headers.get(name).and_then(|v| v.to_str().ok())
    });
    if let Some(t) = &trace {
        t.timestamp("HTTP_RECV_END");
    }
    request.trace = trace.clone();
    let response = oxserve_frontend::run(&s.engine, &s.shm, request).await?;
    if let Some(t) = &trace {
        t.timestamp("INFER_RESPONSE_COMPLETE");
    }
    let encoded = infer::encode_response(&response)?;
    let mut r = match encoded.header_len {
        None => ([(header::CONTENT_TYPE, "application/json")], encoded.body).into_response(),
        Some(n) => {
            let mut r = ([(header::CONTENT_TYPE, "application/octet-stream")], encoded.body).into_response();
            r.headers_mut()
                .insert(INFERENCE_HEADER_CONTENT_LENGTH, HeaderValue::from(n));
            r
        }
    };
    if let Some(t) = trace {
        t.timestamp("HTTP_SEND_START");
        r = traced_body::record_send_end(r, t);
    }
    Ok(r)
}

#[derive(Deserialize, Default)]
struct IndexRequest {
    #[serde(default)]
    ready: bool,
}

#[derive(Serialize)]
struct IndexEntryJson {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<String>,
    state: String,
    reason: String,
}

async fn repository_index(State(s): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult<Response> {
    let body: Bytes = body::read_body(&headers, body, s.options.max_body_bytes).await?;
    let request: IndexRequest = if body.iter().all(u8::is_ascii_whitespace) {
        IndexRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| Error::invalid(format!("malformed repository index request: {e}")))?
    };
    let entries: Vec<IndexEntryJson> = s
        .engine
        .repository_index(request.ready)
        .into_iter()
        .map(|e| IndexEntryJson {
            name: e.name,
            version: e.version.map(|v| v.to_string()),
            state: e.state,
            reason: e.reason,
        })
        .collect();
    Ok(json_response(&entries))
}

/// `POST /v2/repository/models/{model}/load` with an optional body
/// `{"parameters": {"config": "<model config JSON>", "file:<version>/<name>": "<base64>"}}`
/// (Triton's): answers once the model serves, or with why it does not.
async fn load(
    State(s): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let body: Bytes = body::read_body(&headers, body, s.options.max_body_bytes).await?;
    let parameters = repository_parameters(&body, "load")?;
    let overrides = crate::repository::load_override(&model, parameters)?;
    s.engine.load_model(&model, overrides).await?;
    Ok(json_response(&serde_json::json!({})))
}

/// `POST /v2/repository/models/{model}/unload`, optionally `{"parameters":
/// {"unload_dependents": bool}}` (no model here depends on another, so it changes nothing).
async fn unload(
    State(s): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let body: Bytes = body::read_body(&headers, body, s.options.max_body_bytes).await?;
    let parameters = repository_parameters(&body, "unload")?;
    crate::repository::check_unload_parameters(&model, &parameters)?;
    s.engine.unload_model(&model).await?;
    Ok(json_response(&serde_json::json!({})))
}

/// The `parameters` object of a load or unload body (an empty body has none).
fn repository_parameters(
    body: &[u8],
    what: &str,
) -> Result<Vec<(String, crate::repository::RepositoryParameter)>, Error> {
    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct RepositoryRequest {
        #[serde(default)]
        parameters: serde_json::Map<String, serde_json::Value>,
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let request: RepositoryRequest = serde_json::from_slice(body)
        .map_err(|e| Error::invalid(format!("malformed repository {what} request: {e}")))?;
    request
        .parameters
        .into_iter()
        .map(|(key, value)| {
            let parameter = match value {
                serde_json::Value::Bool(b) => crate::repository::RepositoryParameter::Bool(b),
                serde_json::Value::Number(n) => match n.as_i64() {
                    Some(i) => crate::repository::RepositoryParameter::Int(i),
                    None => {
                        return Err(Error::invalid(format!(
                            "repository {what} parameter '{key}' must be a boolean, an integer or a string"
                        )));
                    }
                },
                serde_json::Value::String(text) => crate::repository::RepositoryParameter::Text(text),
                _ => {
                    return Err(Error::invalid(format!(
                        "repository {what} parameter '{key}' must be a boolean, an integer or a string"
                    )));
                }
            };
            Ok((key, parameter))
        })
        .collect()
}
