//! TF Serving's REST API: `POST /v1/models/M[/versions/V|/labels/L]:predict|classify|regress`,
//! `GET /v1/models/M[/versions/V|/labels/L]` (status) and `.../metadata`. As TF Serving's
//! handler, paths are matched case-insensitively and every failure is `{ "error": "..." }`.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use oxserve_core::{Error, Result};
use oxserve_engine::InferenceService;
use oxserve_shm::SharedMemoryRegistry;
use serde_json::Value;

use crate::error::RestError;
use crate::json;
use crate::spec::{self, ModelRef, VersionChoice};

#[derive(Debug, Clone)]
pub struct RestOptions {
    /// The largest request body read (after decompression).
    pub max_body_bytes: usize,
    /// TF Serving's `--rest_api_timeout_in_ms`: a predict, classify or regress call not answered
    /// within it ends with DEADLINE_EXCEEDED (its work is abandoned); `None`: no limit.
    pub request_timeout: Option<std::time::Duration>,
}

impl Default for RestOptions {
    fn default() -> Self {
        RestOptions {
            max_body_bytes: 64 << 20,
            request_timeout: None,
        }
    }
}

#[derive(Clone)]
struct RestState {
    engine: InferenceService,
    /// TF Serving has no shared memory: requests carry their tensors.
    shm: Arc<SharedMemoryRegistry>,
    options: RestOptions,
}

/// The `/v1/...` routes.
pub fn router(engine: InferenceService, options: RestOptions) -> Router {
    let state = RestState {
        engine,
        shm: Arc::new(SharedMemoryRegistry::disabled()),
        options,
    };
    Router::new()
        .route("/v1/models", get(missing_model).post(missing_model))
        .route("/v1/models/", get(missing_model).post(missing_model))
        .route("/v1/models/{*rest}", get(get_model).post(post_model_in_time))
        .with_state(state)
}

async fn missing_model() -> RestError {
    RestError(Error::invalid("Missing model name in request."))
}

fn malformed(method: &str, rest: &str) -> Error {
    Error::invalid(format!("Malformed request: {method} /v1/models/{rest}"))
}

/// `M`, `M/versions/V` or `M/labels/L`.
fn model_ref(path: &str, method: &str, rest: &str) -> Result<ModelRef> {
    let segments: Vec<&str> = path.split('/').collect();
    let version = match segments.as_slice() {
        [_] => VersionChoice::Latest,
        [_, kind, v] if kind.eq_ignore_ascii_case("versions") => VersionChoice::Specific(
            v.parse()
                .map_err(|_| Error::invalid(format!("Failed to convert version: {v} to numeric.")))?,
        ),
        [_, kind, l] if kind.eq_ignore_ascii_case("labels") && !l.is_empty() => {
            VersionChoice::Label((*l).to_string())
        }
        _ => return Err(malformed(method, rest)),
    };
    let name = segments[0];
    if name.is_empty() || name.contains(':') {
        return Err(malformed(method, rest));
    }
    Ok(ModelRef {
        name: name.to_string(),
        version,
    })
}

fn json_response(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn get_model(
    State(s): State<RestState>,
    Path(rest): Path<String>,
) -> std::result::Result<Response, RestError> {
    let (path, metadata) = match rest.strip_suffix("/metadata") {
        Some(p) => (p, true),
        None => (rest.as_str(), false),
    };
    let model = model_ref(path, "GET", &rest)?;
    if metadata {
        let target = model.resolve(&s.engine)?;
        let md = s.engine.model_metadata(target.name(), target.version())?;
        let version = match target.version() {
            Some(v) => v,
            None => md
                .versions
                .iter()
                .filter_map(|v| v.parse().ok())
                .max()
                .unwrap_or(0),
        };
        let body = crate::describe::metadata_json(&model.name, version, &spec::signatures(&md));
        return Ok(json_response(
            serde_json::to_string_pretty(&body).unwrap_or_default(),
        ));
    }
    let statuses = crate::describe::model_status(&s.engine, &model.name, &model.version)?;
    let body = crate::describe::status_json(&statuses);
    Ok(json_response(
        serde_json::to_string_pretty(&body).unwrap_or_default(),
    ))
}

/// [`post_model`] within `--rest_api_timeout_in_ms`. Dropping the call on time-out abandons
/// its request: a queued one never runs, a running batch finishes for its other requests.
async fn post_model_in_time(
    State(s): State<RestState>,
    Path(rest): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> std::result::Result<Response, RestError> {
    let limit = s.options.request_timeout;
    let answer = post_model(State(s), Path(rest), headers, body);
    let Some(limit) = limit else {
        return answer.await;
    };
    match tokio::time::timeout(limit, answer).await {
        Ok(answer) => answer,
        Err(_) => Err(RestError(Error::new(
            oxserve_core::ErrorKind::DeadlineExceeded,
            format!(
                "Deadline exceeded: no answer within the REST API timeout of {} ms",
                limit.as_millis()
            ),
        ))),
    }
}

async fn post_model(
    State(s): State<RestState>,
    Path(rest): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> std::result::Result<Response, RestError> {
    let Some((path, verb)) = rest.rsplit_once(':') else {
        return Err(malformed("POST", &rest).into());
    };
    let verb = verb.to_ascii_lowercase();
    if !["predict", "classify", "regress"].contains(&verb.as_str()) {
        return Err(malformed("POST", &rest).into());
    }
    // The model is looked up before the body is read: an unknown one costs no decoding (what
    // the client still sends is read and dropped, so it sees the answer).
    let looked_up = model_ref(path, "POST", &rest).and_then(|model| Ok((model.resolve(&s.engine)?, model)));
    let (target, _model) = match looked_up {
        Ok(found) => found,
        Err(e) => {
            oxserve_kserve::http::drain_body(&headers, body, s.options.max_body_bytes).await;
            return Err(e.into());
        }
    };
    let body = oxserve_kserve::http::read_body(&headers, body, s.options.max_body_bytes).await?;
    let metadata = s.engine.model_metadata(target.name(), target.version())?;
    if verb == "predict" {
        // One pass over the body, off the async workers when it is large.
        let (sig, format, inputs) = {
            let metadata = metadata.clone();
            oxserve_frontend::decode_off_worker(body.len(), move || {
                crate::json_tensor::predict_request(&body, |name| spec::signature(&metadata, name))
            })
            .await?
        };
        let predicted =
            crate::run::predict(&s.engine, &s.shm, target, &metadata.inputs, &sig, inputs, &[]).await?;
        let mut outputs = predicted.outputs;
        outputs.sort_by(|a, b| a.name.cmp(&b.name));
        let large = outputs.iter().map(|t| t.wire_len()).sum::<usize>();
        let out =
            oxserve_frontend::decode_off_worker(large, move || json::predict_response(format, &outputs))
                .await?;
        return Ok(json_response(out));
    }
    let parsed = oxserve_frontend::decode_off_worker(body.len(), move || json::parse_body(&body)).await?;
    let sig = spec::signature(&metadata, &json::signature_name(&parsed)?)?;
    let out = match verb.as_str() {
        "classify" => {
            let examples = crate::examples::serialized_from_json(&parsed)?;
            let (_, results) =
                crate::run::classify(&s.engine, &s.shm, target, &metadata.inputs, &sig, examples).await?;
            let mut out = String::from("{\n    \"results\": [");
            for (i, classes) in results.iter().enumerate() {
                out.push_str(if i == 0 { "[" } else { ", [" });
                for (j, (label, score)) in classes.iter().enumerate() {
                    if j > 0 {
                        out.push_str(", ");
                    }
                    out.push('[');
                    out.push_str(&Value::String(String::from_utf8_lossy(label).into_owned()).to_string());
                    out.push_str(", ");
                    json::write_float(&mut out, f64::from(*score), *score);
                    out.push(']');
                }
                out.push(']');
            }
            out.push_str("]\n}");
            out
        }
        _ => {
            let examples = crate::examples::serialized_from_json(&parsed)?;
            let (_, values) =
                crate::run::regress(&s.engine, &s.shm, target, &metadata.inputs, &sig, examples).await?;
            let mut out = String::from("{\n    \"results\": [");
            for (i, v) in values.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                json::write_float(&mut out, f64::from(*v), *v);
            }
            out.push_str("]\n}");
            out
        }
    };
    Ok(json_response(out))
}
