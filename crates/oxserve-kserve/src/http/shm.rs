//! Triton's shared-memory endpoints: `/v2/systemsharedmemory[/region/{name}]/{status,register,
//! unregister}`. CUDA shared memory has the same routes; this server has no CUDA regions, so it
//! reports none and refuses to register one.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use oxserve_core::Error;
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiResult, AppState, body, json_response};

#[derive(Deserialize)]
struct RegisterJson {
    key: String,
    #[serde(default)]
    offset: u64,
    byte_size: u64,
}

#[derive(Serialize)]
struct RegionJson {
    name: String,
    key: String,
    offset: u64,
    byte_size: u64,
}

fn status_json(s: &AppState, name: Option<&str>) -> ApiResult<Response> {
    let regions: Vec<RegionJson> = s
        .shm
        .status(name)?
        .into_iter()
        .map(|r| RegionJson {
            name: r.name,
            key: r.key,
            offset: r.offset,
            byte_size: r.byte_size,
        })
        .collect();
    Ok(json_response(&regions))
}

pub(super) async fn status_all(State(s): State<AppState>) -> ApiResult<Response> {
    status_json(&s, None)
}

pub(super) async fn status_region(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    status_json(&s, Some(&name))
}

/// Registration is admitted by the client's address (see `oxserve_shm::admit_registration`),
/// which the listener records as `ConnectInfo`. A server that serves this router without it
/// has no client addresses: every registration then counts as remote (fail closed).
pub(super) async fn register(
    State(s): State<AppState>,
    Path(name): Path<String>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let peer = peer.map(|axum::Extension(ConnectInfo(addr))| addr.ip());
    let body = body::read_body(&headers, body, s.options.max_body_bytes).await?;
    let request: RegisterJson = serde_json::from_slice(&body).map_err(|e| {
        Error::invalid(format!(
            "malformed shared memory register request (expected {{\"key\", \"offset\", \"byte_size\"}}): {e}"
        ))
    })?;
    s.shm
        .register(peer, &name, &request.key, request.offset, request.byte_size)?;
    Ok(json_response(&serde_json::json!({})))
}

pub(super) async fn unregister_region(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    s.shm.unregister(&name);
    json_response(&serde_json::json!({}))
}

pub(super) async fn unregister_all(State(s): State<AppState>) -> Response {
    s.shm.unregister_all();
    json_response(&serde_json::json!({}))
}

pub(super) async fn cuda_status_all() -> Response {
    json_response(&serde_json::json!([]))
}

pub(super) async fn cuda_status_region(Path(name): Path<String>) -> ApiError {
    ApiError(Error::not_found(format!(
        "Unable to find cuda shared memory region: '{name}'"
    )))
}

pub(super) async fn cuda_register(Path(name): Path<String>) -> ApiError {
    ApiError(Error::unsupported(format!(
        "cannot register CUDA shared memory region '{name}': this server has no CUDA shared memory support"
    )))
}

pub(super) async fn cuda_unregister() -> Response {
    json_response(&serde_json::json!({}))
}
