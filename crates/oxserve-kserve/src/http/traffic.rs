//! Traffic splits and shadow traffic at run time (oxserve's extension,
//! docs/model-repository.md): read under the model routes, changed under the repository ones
//! (the `repository` scope when API keys are configured).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use oxserve_core::Error;
use oxserve_engine::{ShadowTraffic, TrafficSplit};
use serde::{Deserialize, Deserializer, Serialize};

use super::{ApiResult, AppState, body, json_response};

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SplitJson {
    /// version number or label → weight
    weights: std::collections::BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sticky_header: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShadowJson {
    version: String,
    share: f64,
}

/// `Some(None)` for an explicit null (remove), `None` for an absent key (leave as it is).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrafficRequest {
    #[serde(default, deserialize_with = "present")]
    traffic_split: Option<Option<SplitJson>>,
    #[serde(default, deserialize_with = "present")]
    shadow: Option<Option<ShadowJson>>,
}

fn traffic_json(split: Option<TrafficSplit>, shadow: Option<ShadowTraffic>) -> serde_json::Value {
    serde_json::json!({
        "traffic_split": split.map(|s| SplitJson {
            weights: s.weights.into_iter().collect(),
            sticky_header: s.sticky_header,
        }),
        "shadow": shadow.map(|s| ShadowJson { version: s.target, share: s.share }),
    })
}

/// `GET /v2/models/M/traffic`.
pub(super) async fn get(State(s): State<AppState>, Path(model): Path<String>) -> ApiResult<Response> {
    let (split, shadow) = s.engine.traffic(&model)?;
    Ok(json_response(&traffic_json(split, shadow)))
}

/// `POST /v2/repository/models/M/traffic` with `{"traffic_split": {"weights": {"1": 90,
/// "canary": 10}, "sticky_header": "x-user"}, "shadow": {"version": "2", "share": 0.1}}`; a
/// key left out stays as it is, `null` removes it. Answers with the model's traffic now.
pub(super) async fn set(
    State(s): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    request: Body,
) -> ApiResult<Response> {
    let bytes = body::read_body(&headers, request, s.options.max_body_bytes).await?;
    let request: TrafficRequest = serde_json::from_slice(&bytes)
        .map_err(|e| Error::invalid(format!("malformed traffic request: {e}")))?;
    let split = request.traffic_split.map(|split| {
        split.map(|s| TrafficSplit {
            weights: s.weights.into_iter().collect(),
            sticky_header: s
                .sticky_header
                .filter(|h| !h.is_empty())
                .map(|h| h.to_ascii_lowercase()),
        })
    });
    let shadow = request.shadow.map(|shadow| {
        shadow.map(|s| ShadowTraffic {
            target: s.version,
            share: s.share,
        })
    });
    s.engine.set_traffic(&model, split, shadow)?;
    let (split, shadow) = s.engine.traffic(&model)?;
    Ok(json_response(&traffic_json(split, shadow)))
}
