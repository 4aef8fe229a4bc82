//! Version labels and rollback (oxserve's extension, docs/model-repository.md): a label names
//! a version wherever the KServe v2 routes take one (`/v2/models/M/labels/L/...`); labels are
//! set and rolled back under the repository routes, which need the `repository` scope when
//! API keys are configured.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use oxserve_core::Error;
use serde::Deserialize;

use super::{
    ApiResult, AppState, body, config_response, json_response, metadata_json, ready_status, run_infer,
};

/// `GET /v2/models/M/labels`: `{"name", "labels": {label: "version"}, "default_version"}`.
pub(super) async fn list(State(s): State<AppState>, Path(model): Path<String>) -> ApiResult<Response> {
    let (labels, default) = s.engine.version_labels(&model)?;
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .into_iter()
        .map(|(l, v)| (l, serde_json::Value::String(v.to_string())))
        .collect();
    Ok(json_response(&serde_json::json!({
        "name": model,
        "labels": labels,
        "default_version": default.map(|v| v.to_string()),
    })))
}

pub(super) async fn metadata(
    State(s): State<AppState>,
    Path((model, label)): Path<(String, String)>,
) -> ApiResult<Response> {
    let version = s.engine.label_version(&model, &label)?;
    Ok(metadata_json(&s.engine.model_metadata(&model, Some(version))?))
}

pub(super) async fn ready(
    State(s): State<AppState>,
    Path((model, label)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let version = s.engine.label_version(&model, &label)?;
    ready_status(&s, &model, Some(version))
}

pub(super) async fn config(
    State(s): State<AppState>,
    Path((model, label)): Path<(String, String)>,
) -> ApiResult<Response> {
    let version = s.engine.label_version(&model, &label)?;
    config_response(&s, &model, Some(version))
}

pub(super) async fn infer(
    State(s): State<AppState>,
    Path((model, label)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let version = s.engine.label_version(&model, &label)?;
    run_infer(s, model, Some(version), headers, body).await
}

/// A version as JSON carries it: a number or a numeric string.
#[derive(Deserialize)]
#[serde(untagged)]
enum VersionJson {
    Number(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetLabel {
    version: VersionJson,
}

/// `POST /v2/repository/models/M/labels/L` with `{"version": 3}`: points the label at a
/// serving version.
pub(super) async fn set(
    State(s): State<AppState>,
    Path((model, label)): Path<(String, String)>,
    headers: HeaderMap,
    request: Body,
) -> ApiResult<Response> {
    let bytes: Bytes = body::read_body(&headers, request, s.options.max_body_bytes).await?;
    let SetLabel { version } = serde_json::from_slice(&bytes).map_err(|e| {
        Error::invalid(format!(
            "malformed label request (expected {{\"version\": N}}): {e}"
        ))
    })?;
    let version = match version {
        VersionJson::Number(v) => v,
        VersionJson::Text(text) => oxserve_frontend::parse_version(&text)?
            .ok_or_else(|| Error::invalid("the label request needs a version"))?,
    };
    s.engine.set_version_label(&model, &label, version)?;
    Ok(json_response(&serde_json::json!({})))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    #[serde(default)]
    label: Option<String>,
}

/// `POST /v2/repository/models/M/rollback`, optionally `{"label": "stable"}`: the label, or
/// the default version, points back at the previous version for the next request.
pub(super) async fn rollback(
    State(s): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    request: Body,
) -> ApiResult<Response> {
    let bytes: Bytes = body::read_body(&headers, request, s.options.max_body_bytes).await?;
    let RollbackRequest { label } = if bytes.iter().all(u8::is_ascii_whitespace) {
        RollbackRequest::default()
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::invalid(format!("malformed rollback request: {e}")))?
    };
    let version = s.engine.rollback(&model, label.as_deref())?;
    Ok(json_response(&serde_json::json!({
        "name": model,
        "label": label,
        "version": version.to_string(),
    })))
}
