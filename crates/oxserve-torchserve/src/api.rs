//! TorchServe's inference API (`/ping`, `/predictions/{model}[/{version}]`) and management API
//! (`/models...`), with TorchServe's error body `{"code", "type", "message"}`.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use bytes::Bytes;
use oxserve_core::{Error, ErrorKind};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::registry::{Registration, TorchServe};

/// An error in TorchServe's shape.
#[derive(Debug)]
pub struct TsError(pub Error);

impl From<Error> for TsError {
    fn from(e: Error) -> Self {
        TsError(e)
    }
}

/// The one mapping from oxserve's error kinds to TorchServe's statuses and exception names.
pub fn status_and_type(kind: ErrorKind) -> (StatusCode, &'static str) {
    match kind {
        ErrorKind::InvalidArgument => (StatusCode::BAD_REQUEST, "BadRequestException"),
        ErrorKind::NotFound => (StatusCode::NOT_FOUND, "ModelNotFoundException"),
        ErrorKind::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailableException"),
        ErrorKind::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailableException"),
        ErrorKind::DeadlineExceeded => (StatusCode::REQUEST_TIMEOUT, "RequestTimeoutException"),
        ErrorKind::Unauthenticated => (StatusCode::UNAUTHORIZED, "InvalidKeyException"),
        ErrorKind::PermissionDenied => (StatusCode::FORBIDDEN, "InvalidKeyException"),
        ErrorKind::Unsupported => (StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowedException"),
        ErrorKind::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLargeException"),
        ErrorKind::Conflict => (StatusCode::CONFLICT, "ConflictStatusException"),
        ErrorKind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "InternalServerException"),
    }
}

impl IntoResponse for TsError {
    fn into_response(self) -> Response {
        let (status, kind) = status_and_type(self.0.kind());
        // A version that is missing is TorchServe's own exception.
        let message = self.0.message();
        let kind = if message.starts_with("Model version") && kind == "ModelNotFoundException" {
            "ModelVersionNotFoundException"
        } else if message.starts_with("Failed to download archive from: ")
            && status == StatusCode::BAD_REQUEST
        {
            "DownloadArchiveException"
        } else {
            kind
        };
        let body = json!({"code": status.as_u16(), "type": kind, "message": self.0.message()});
        json_response(status, &body)
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let text = serde_json::to_string_pretty(body).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], text).into_response()
}

type ApiResult = std::result::Result<Response, TsError>;

/// The inference API's routes (TorchServe's `inference_address`).
pub fn inference_router(ts: Arc<TorchServe>, max_body_bytes: usize) -> Router {
    Router::new()
        .route(
            "/",
            axum::routing::options(describe_inference).fallback(not_found),
        )
        .route("/api-description", get(describe_inference))
        .route("/ping", get(ping))
        .route(
            "/predictions/{model}",
            axum::routing::post(predict_default).put(predict_default),
        )
        .route(
            "/predictions/{model}/{version}",
            axum::routing::post(predict_version).put(predict_version),
        )
        .with_state(Ctx { ts, max_body_bytes })
}

/// The management API's routes (TorchServe's `management_address`).
pub fn management_router(ts: Arc<TorchServe>, max_body_bytes: usize) -> Router {
    Router::new()
        .route(
            "/",
            axum::routing::options(describe_management).fallback(not_found),
        )
        .route("/api-description", get(describe_management))
        .route("/models", get(list).post(register))
        .route(
            "/models/{model}",
            get(describe_all).put(scale_all).delete(unregister_default),
        )
        .route(
            "/models/{model}/{version}",
            get(describe_one).put(scale_one).delete(unregister_one),
        )
        .route("/models/{model}/{version}/set-default", put(set_default))
        .fallback(not_found)
        .with_state(Ctx { ts, max_body_bytes })
}

#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) ts: Arc<TorchServe>,
    pub(crate) max_body_bytes: usize,
}

impl Ctx {
    /// Registering and unregistering through the API is off unless enabled (TorchServe ≥ 0.11's
    /// `enable_model_api`).
    fn check_model_api(&self) -> std::result::Result<(), TsError> {
        if self.ts.model_api_enabled() {
            Ok(())
        } else {
            Err(TsError(Error::new(
                ErrorKind::Unsupported,
                "Model API disabled: set enable_model_api=true in config.properties (or --enable-model-api) to register and unregister models",
            )))
        }
    }
}

async fn describe_inference() -> Response {
    json_response(StatusCode::OK, &crate::openapi::inference())
}

async fn describe_management() -> Response {
    json_response(StatusCode::OK, &crate::openapi::management())
}

/// A router that answers every request with TorchServe's 404 (for the inference port's
/// unknown paths).
pub fn not_found_router() -> Router {
    Router::new().fallback(not_found)
}

async fn not_found() -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"code": 404, "type": "ResourceNotFoundException",
                "message": "Requested resource is not found, please refer to API document."}),
    )
}

pub(crate) async fn ping(State(ctx): State<Ctx>) -> Response {
    let healthy = ctx.ts.engine.is_live();
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    json_response(
        status,
        &json!({"status": if healthy { "Healthy" } else { "Unhealthy" }}),
    )
}

async fn predict_default(
    State(ctx): State<Ctx>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    predict(ctx, model, None, headers, body).await
}

async fn predict_version(
    State(ctx): State<Ctx>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    predict(ctx, model, Some(version), headers, body).await
}

async fn predict(
    ctx: Ctx,
    model: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let entry = match ctx.ts.version(&model, version.as_deref()) {
        Ok(entry) => entry,
        Err(e) => {
            oxserve_kserve::http::drain_body(&headers, body, ctx.max_body_bytes).await;
            return Err(e.into());
        }
    };
    let raw = oxserve_kserve::http::read_body(&headers, body, ctx.max_body_bytes).await?;
    if entry.handler.is_python() {
        let part = python_request(&headers, raw).await?;
        let reply = ctx.ts.predict_python(&model, version.as_deref(), part).await?;
        return Ok(reply_response(reply));
    }
    let data = request_data(&headers, raw).await?;
    let answer = ctx.ts.predict(&model, version.as_deref(), data).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], answer).into_response())
}

/// A request as TorchServe's frontend hands it to a Python worker: every header (under the
/// name the client sent; HTTP/1 names reach us lower-cased, so the conventional capitalised
/// form is added too, for handlers that look up `Content-Type` or `X-Request-Id`), then the
/// form's fields (multipart or url-encoded) or the body as `body` with its media type. Query
/// parameters are not passed (TorchServe 0.12 does not pass them on `/predictions`).
async fn python_request(headers: &HeaderMap, body: Bytes) -> std::result::Result<Bytes, TsError> {
    use crate::worker::protocol::{Input, encode_request};
    let mut header_list = Vec::with_capacity(headers.len() * 2);
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        let capitalised = capitalise(name.as_str());
        if capitalised != name.as_str() {
            header_list.push((capitalised, value.clone()));
        }
        header_list.push((name.as_str().to_string(), value));
    }
    // TorchServe's frontend adds these two to every prediction's headers.
    header_list.push(("explain".into(), "False".into()));
    header_list.push(("url_path".into(), String::new()));
    let mut inputs: Vec<Input> = Vec::new();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media_type = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let boundary = multer::parse_boundary(content_type).ok();
    if let Some(boundary) = boundary {
        for part in crate::multipart::parts(&boundary, body).await? {
            inputs.push(Input {
                name: part.name,
                content_type: part.content_type,
                value: part.data,
            });
        }
    } else if media_type == "application/x-www-form-urlencoded" {
        inputs.extend(form_urlencoded::parse(&body).map(|(k, v)| Input {
            name: k.into_owned(),
            content_type: String::new(),
            value: Bytes::from(v.into_owned()),
        }));
    } else {
        inputs.push(Input {
            name: "body".into(),
            content_type: media_type,
            value: body,
        });
    }
    Ok(encode_request(&header_list, &inputs))
}

/// `x-request-id` → `X-Request-Id`.
fn capitalise(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut up = true;
    for c in name.chars() {
        out.push(if up { c.to_ascii_uppercase() } else { c });
        up = c == '-';
    }
    out
}

/// A Python handler's answer as TorchServe's frontend sends it: the handler's status, reason
/// phrase, content type and headers with its bytes; a failed batch as TorchServe's error.
fn reply_response(reply: crate::worker::protocol::Reply) -> Response {
    use crate::worker::protocol::Reply;
    match reply {
        Reply::Failed { code, message } => {
            let status = u16::try_from(code)
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            json_response(
                status,
                // TorchServe names every failure a worker reports InternalServerException.
                &json!({"code": status.as_u16(), "type": "InternalServerException", "message": message}),
            )
        }
        Reply::Response {
            status,
            reason: _,
            content_type,
            headers,
            body,
        } => {
            let status = u16::try_from(status)
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = (status, body).into_response();
            let out = response.headers_mut();
            // Without a content type from the handler TorchServe sends none.
            out.remove(header::CONTENT_TYPE);
            if !content_type.is_empty()
                && let Ok(v) = header::HeaderValue::from_str(&content_type)
            {
                out.insert(header::CONTENT_TYPE, v);
            }
            for (name, value) in headers {
                if let (Ok(n), Ok(v)) = (
                    header::HeaderName::from_bytes(name.as_bytes()),
                    header::HeaderValue::from_str(&value),
                ) {
                    out.insert(n, v);
                }
            }
            response
        }
    }
}

/// The request's data: the raw body, or for multipart forms the field TorchServe's handlers
/// read (`data`, else `body`, else the first part).
async fn request_data(headers: &HeaderMap, body: Bytes) -> std::result::Result<Bytes, TsError> {
    let Some(boundary) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| multer::parse_boundary(ct).ok())
    else {
        return Ok(body);
    };
    let parts = crate::multipart::parts(&boundary, body).await?;
    let pick = |name: &str| parts.iter().find(|p| p.name == name).map(|p| p.data.clone());
    pick("data")
        .or_else(|| pick("body"))
        .or_else(|| parts.first().map(|p| p.data.clone()))
        .ok_or_else(|| TsError(Error::invalid("the multipart body has no parts")))
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    pub(crate) limit: Option<String>,
    pub(crate) next_page_token: Option<String>,
}

pub(crate) async fn list(State(ctx): State<Ctx>, Query(q): Query<ListQuery>) -> ApiResult {
    // As TorchServe: a limit or token that is not a number is ignored.
    let limit: usize = q
        .limit
        .as_deref()
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(100)
        .min(1000);
    let start: usize = q
        .next_page_token
        .as_deref()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let models = ctx.ts.models();
    let all: Vec<(String, String)> = models
        .iter()
        .map(|(name, m)| {
            let url = m
                .versions
                .get(&m.default)
                .map(|v| v.url.clone())
                .unwrap_or_default();
            (name.clone(), url)
        })
        .collect();
    let page: Vec<Value> = all
        .iter()
        .skip(start)
        .take(limit)
        .map(|(name, url)| json!({"modelName": name, "modelUrl": url}))
        .collect();
    let mut body = json!({"models": page});
    if start + limit < all.len() {
        body["nextPageToken"] = Value::String((start + limit).to_string());
    }
    Ok(json_response(StatusCode::OK, &body))
}

#[derive(Debug, Deserialize, Default)]
pub(crate) struct RegisterQuery {
    pub(crate) url: Option<String>,
    pub(crate) model_name: Option<String>,
    pub(crate) initial_workers: Option<u32>,
    pub(crate) batch_size: Option<u32>,
    pub(crate) max_batch_delay: Option<u64>,
    pub(crate) response_timeout: Option<u64>,
    pub(crate) synchronous: Option<bool>,
}

/// A process's resident memory in bytes (TorchServe's worker `memoryUsage`); 0 if unknown.
fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        // statm counts pages; 4 KiB on the x86-64 and arm64 Linux we build for.
        .map_or(0, |pages| pages * 4096)
}

/// TorchServe's answer to a worker change it does in the background (`synchronous=false`).
fn processing() -> Response {
    json_response(
        StatusCode::ACCEPTED,
        &json!({"status": "Processing worker updates..."}),
    )
}

pub(crate) async fn register(State(ctx): State<Ctx>, Query(q): Query<RegisterQuery>) -> ApiResult {
    ctx.check_model_api()?;
    let Some(url) = q.url.filter(|u| !u.is_empty()) else {
        return Err(TsError(Error::invalid("Parameter url is required.")));
    };
    let workers = q.initial_workers.unwrap_or(0);
    let registration = Registration {
        url,
        model_name: q.model_name,
        initial_workers: workers,
        batch_size: q.batch_size.unwrap_or(1),
        max_batch_delay_ms: q.max_batch_delay.unwrap_or(100),
        response_timeout_s: q.response_timeout.unwrap_or(120),
        loaded_at_startup: false,
    };
    // Registration is synchronous unless asked otherwise, as in TorchServe.
    if workers > 0 && q.synchronous == Some(false) {
        let ts = ctx.ts.clone();
        tokio::spawn(async move {
            if let Err(e) = ts.register(registration).await {
                tracing::error!(error = %e, "background registration failed");
            }
        });
        return Ok(processing());
    }
    let (name, version) = ctx.ts.register(registration).await?;
    let status = if workers > 0 {
        format!("Model \"{name}\" Version: {version} registered with {workers} initial workers")
    } else {
        format!(
            "Model \"{name}\" Version: {version} registered with 0 initial workers. Use scale workers API to add workers for the model."
        )
    };
    Ok(json_response(StatusCode::OK, &json!({"status": status})))
}

async fn describe_all(State(ctx): State<Ctx>, Path(model): Path<String>) -> ApiResult {
    describe(&ctx, &model, None)
}

async fn describe_one(State(ctx): State<Ctx>, Path((model, version)): Path<(String, String)>) -> ApiResult {
    describe(&ctx, &model, Some(&version))
}

pub(crate) fn describe(ctx: &Ctx, model: &str, version: Option<&str>) -> ApiResult {
    let models = ctx.ts.models();
    let entry = models
        .get(model)
        .ok_or_else(|| TsError(crate::registry::model_not_found(model)))?;
    let versions: Vec<&crate::registry::VersionEntry> = match version {
        None | Some("all") => entry.versions.values().collect(),
        Some(v) => vec![
            entry
                .versions
                .get(v)
                .ok_or_else(|| TsError(crate::registry::version_not_found(model, v)))?,
        ],
    };
    let pid = std::process::id();
    let described: Vec<Value> = versions
        .iter()
        .map(|v| {
            // Python handlers: each worker process as it is now; native ones run in the server.
            let python = v
                .handler
                .is_python()
                .then(|| crate::worker::workers(model, v.engine_version));
            let workers: Vec<Value> = (0..v.min_workers)
                .map(|i| {
                    let process = python
                        .as_ref()
                        .and_then(|ws| ws.iter().find(|w| w.index == i as usize));
                    let (pid, status) = match (&python, process) {
                        (None, _) => (pid, "READY"),
                        (Some(_), Some(w)) => (w.pid, w.status),
                        // Still starting.
                        (Some(_), None) => (0, "UNLOADING"),
                    };
                    json!({
                        "id": (9000 + i).to_string(),
                        "startTime": v.started,
                        "status": status,
                        "memoryUsage": if python.is_some() { rss_bytes(pid) } else { 0 },
                        "pid": pid,
                        "gpu": false,
                        "gpuUsage": "N/A"
                    })
                })
                .collect();
            json!({
                "modelName": model,
                "modelVersion": v.version,
                "modelUrl": v.url,
                "runtime": "python",
                "minWorkers": v.min_workers,
                "maxWorkers": v.max_workers,
                "batchSize": v.batch_size,
                "maxBatchDelay": v.max_batch_delay_ms,
                "responseTimeout": v.response_timeout_s,
                "startupTimeout": 120,
                "maxRetryTimeoutInSec": 300,
                "clientTimeoutInMills": 0,
                "parallelType": "",
                "parallelLevel": 0,
                "deviceType": "cpu",
                "continuousBatching": false,
                "useJobTicket": false,
                "useVenv": false,
                "stateful": false,
                "sequenceMaxIdleMSec": 0,
                "sequenceTimeoutMSec": 0,
                "maxNumSequence": 0,
                "maxSequenceJobQueueSize": 0,
                "loadedAtStartup": v.loaded_at_startup,
                "workers": workers,
                "jobQueueStatus": {"remainingCapacity": 100, "pendingRequests": 0}
            })
        })
        .collect();
    Ok(json_response(StatusCode::OK, &Value::Array(described)))
}

#[derive(Debug, Deserialize, Default)]
pub(crate) struct ScaleQuery {
    pub(crate) min_worker: Option<u32>,
    pub(crate) max_worker: Option<u32>,
    pub(crate) synchronous: Option<bool>,
}

async fn scale_all(
    State(ctx): State<Ctx>,
    Path(model): Path<String>,
    Query(q): Query<ScaleQuery>,
) -> ApiResult {
    scale(&ctx, &model, None, q).await
}

async fn scale_one(
    State(ctx): State<Ctx>,
    Path((model, version)): Path<(String, String)>,
    Query(q): Query<ScaleQuery>,
) -> ApiResult {
    scale(&ctx, &model, Some(&version), q).await
}

pub(crate) async fn scale(ctx: &Ctx, model: &str, version: Option<&str>, q: ScaleQuery) -> ApiResult {
    let min = q.min_worker.unwrap_or(1);
    let max = q.max_worker.unwrap_or(min).max(min);
    // Scaling is asynchronous unless asked otherwise, as in TorchServe: the model and version
    // are checked now, the workers change in the background.
    if q.synchronous != Some(true) {
        ctx.ts.version(model, version)?;
        let (ts, model, version) = (ctx.ts.clone(), model.to_string(), version.map(str::to_string));
        tokio::spawn(async move {
            if let Err(e) = ts.scale(&model, version.as_deref(), min, max).await {
                tracing::error!(model = %model, error = %e, "background scaling failed");
            }
        });
        return Ok(processing());
    }
    ctx.ts.scale(model, version, min, max).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"status": format!("Workers scaled to {min} for model: {model}")}),
    ))
}

async fn unregister_default(State(ctx): State<Ctx>, Path(model): Path<String>) -> ApiResult {
    unregister(&ctx, &model, None).await
}

async fn unregister_one(State(ctx): State<Ctx>, Path((model, version)): Path<(String, String)>) -> ApiResult {
    unregister(&ctx, &model, Some(&version)).await
}

pub(crate) async fn unregister(ctx: &Ctx, model: &str, version: Option<&str>) -> ApiResult {
    ctx.check_model_api()?;
    ctx.ts.unregister(model, version).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"status": format!("Model \"{model}\" unregistered")}),
    ))
}

pub(crate) async fn set_default(
    State(ctx): State<Ctx>,
    Path((model, version)): Path<(String, String)>,
) -> ApiResult {
    ctx.ts.set_default(&model, &version).map_err(|e| {
        // TorchServe's wording here has no colons.
        if e.message().starts_with("Model version:") {
            TsError(Error::not_found(format!(
                "Model version {version} does not exist for model {model}"
            )))
        } else {
            TsError(e)
        }
    })?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"status": format!("Default version successfully updated for model \"{model}\" to \"{version}\"")}),
    ))
}
