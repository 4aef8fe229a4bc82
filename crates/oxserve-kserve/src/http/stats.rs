//! Triton's statistics extension over HTTP:
//! `GET /v2/models[/{model}[/versions/{version}]]/stats`.
//!
//! The body is Triton's `$stats_model_response`: every count and duration is a JSON number
//! (nanoseconds for durations, milliseconds since the epoch for `last_inference`), every
//! duration is present even when zero, and the parts oxserve does not have (response cache,
//! per-response statistics of decoupled models, load-time memory usage) are reported empty,
//! the way Triton reports them for a model that does not use them.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::response::Response;
use oxserve_engine::{BatchStat, ModelStatistics, StatDuration};
use serde::Serialize;

use super::{ApiResult, AppState, json_response, parse_version};

#[derive(Debug, Serialize, PartialEq)]
pub(crate) struct StatsResponseJson {
    model_stats: Vec<ModelStatJson>,
}

#[derive(Debug, Serialize, PartialEq)]
struct ModelStatJson {
    name: String,
    version: String,
    last_inference: u64,
    inference_count: u64,
    execution_count: u64,
    inference_stats: InferStatsJson,
    /// Decoupled models only; always empty here.
    response_stats: BTreeMap<String, ()>,
    batch_stats: Vec<BatchStatJson>,
    /// Load-time memory estimate; not measured, always empty.
    memory_usage: Vec<()>,
    /// oxserve's extension: when this version is a shadow candidate, how its answers compared
    /// with the primary's (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    shadow: Option<ShadowJson>,
}

#[derive(Debug, Serialize, PartialEq, Clone)]
struct ShadowJson {
    primary_version: String,
    compared: u64,
    failed: u64,
    /// Over every compared request (JSON has no infinity: a shape or type mismatch shows as
    /// null).
    max_abs_diff: Option<f64>,
    max_rel_diff: Option<f64>,
    classified: u64,
    agreed: u64,
    /// Mean candidate latency, nanoseconds.
    mean_latency_ns: u64,
}

impl From<oxserve_engine::ShadowStats> for ShadowJson {
    fn from(s: oxserve_engine::ShadowStats) -> Self {
        let finite = |x: f64| x.is_finite().then_some(x);
        ShadowJson {
            primary_version: s.primary_version.to_string(),
            compared: s.compared,
            failed: s.failed,
            max_abs_diff: finite(s.max_abs_diff),
            max_rel_diff: finite(s.max_rel_diff),
            classified: s.classified,
            agreed: s.agreed,
            mean_latency_ns: s.latency_ns.checked_div(s.compared).unwrap_or(0),
        }
    }
}

#[derive(Debug, Serialize, PartialEq, Eq, Clone, Copy)]
struct DurationJson {
    count: u64,
    ns: u64,
}

impl From<StatDuration> for DurationJson {
    fn from(d: StatDuration) -> Self {
        DurationJson {
            count: d.count,
            ns: d.ns,
        }
    }
}

const ZERO: DurationJson = DurationJson { count: 0, ns: 0 };

#[derive(Debug, Serialize, PartialEq, Eq)]
struct InferStatsJson {
    success: DurationJson,
    fail: DurationJson,
    queue: DurationJson,
    compute_input: DurationJson,
    compute_infer: DurationJson,
    compute_output: DurationJson,
    cache_hit: DurationJson,
    cache_miss: DurationJson,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
struct BatchStatJson {
    batch_size: u64,
    compute_input: DurationJson,
    compute_infer: DurationJson,
    compute_output: DurationJson,
}

impl From<BatchStat> for BatchStatJson {
    fn from(b: BatchStat) -> Self {
        BatchStatJson {
            batch_size: b.batch_size as u64,
            compute_input: b.compute_input.into(),
            compute_infer: b.compute_infer.into(),
            compute_output: b.compute_output.into(),
        }
    }
}

impl From<ModelStatistics> for ModelStatJson {
    fn from(m: ModelStatistics) -> Self {
        let s = m.inference_stats;
        ModelStatJson {
            name: m.name,
            version: m.version,
            last_inference: m.last_inference,
            inference_count: m.inference_count,
            execution_count: m.execution_count,
            inference_stats: InferStatsJson {
                success: s.success.into(),
                fail: s.fail.into(),
                queue: s.queue.into(),
                compute_input: s.compute_input.into(),
                compute_infer: s.compute_infer.into(),
                compute_output: s.compute_output.into(),
                cache_hit: ZERO,
                cache_miss: ZERO,
            },
            response_stats: BTreeMap::new(),
            batch_stats: m.batch_stats.into_iter().map(BatchStatJson::from).collect(),
            memory_usage: Vec::new(),
            shadow: m.shadow.map(ShadowJson::from),
        }
    }
}

/// The response body for a list of model-version statistics.
pub(crate) fn stats_json(stats: Vec<ModelStatistics>) -> StatsResponseJson {
    StatsResponseJson {
        model_stats: stats.into_iter().map(ModelStatJson::from).collect(),
    }
}

fn stats_response(s: &AppState, model: Option<&str>, version: Option<u64>) -> ApiResult<Response> {
    let stats = s.engine.model_statistics(model, version)?;
    Ok(json_response(&stats_json(stats)))
}

/// `GET /v2/models/stats`: every ready version of every model.
pub(crate) async fn all_stats(State(s): State<AppState>) -> ApiResult<Response> {
    stats_response(&s, None, None)
}

/// `GET /v2/models/{model}/stats`: every ready version of one model.
pub(crate) async fn model_stats(State(s): State<AppState>, Path(model): Path<String>) -> ApiResult<Response> {
    stats_response(&s, Some(&model), None)
}

/// `GET /v2/models/{model}/versions/{version}/stats`.
pub(crate) async fn model_version_stats(
    State(s): State<AppState>,
    Path((model, version)): Path<(String, String)>,
) -> ApiResult<Response> {
    stats_response(&s, Some(&model), parse_version(&version)?)
}

#[cfg(test)]
mod tests {
    use oxserve_engine::InferStats;

    use super::*;

    fn d(count: u64, ns: u64) -> StatDuration {
        StatDuration { count, ns }
    }

    #[test]
    fn triton_shape_and_number_encoding() {
        let stats = ModelStatistics {
            name: "add_sub".into(),
            version: "1".into(),
            last_inference: 1_700_000_000_123,
            inference_count: 5,
            execution_count: 3,
            inference_stats: InferStats {
                success: d(3, 3_000),
                fail: d(1, 70),
                queue: d(3, 300),
                compute_input: d(3, 30),
                compute_infer: d(3, 2_000),
                compute_output: d(3, 40),
            },
            shadow: None,
            batch_stats: vec![
                BatchStat {
                    batch_size: 1,
                    compute_input: d(2, 20),
                    compute_infer: d(2, 1_500),
                    compute_output: d(2, 25),
                },
                BatchStat {
                    batch_size: 3,
                    compute_input: d(1, 10),
                    compute_infer: d(1, 500),
                    compute_output: d(1, 15),
                },
            ],
        };
        let body = serde_json::to_value(stats_json(vec![stats])).expect("serializes");
        let expected = serde_json::json!({"model_stats": [{
            "name": "add_sub",
            "version": "1",
            "last_inference": 1_700_000_000_123_u64,
            "inference_count": 5,
            "execution_count": 3,
            "inference_stats": {
                "success": {"count": 3, "ns": 3000},
                "fail": {"count": 1, "ns": 70},
                "queue": {"count": 3, "ns": 300},
                "compute_input": {"count": 3, "ns": 30},
                "compute_infer": {"count": 3, "ns": 2000},
                "compute_output": {"count": 3, "ns": 40},
                "cache_hit": {"count": 0, "ns": 0},
                "cache_miss": {"count": 0, "ns": 0}
            },
            "response_stats": {},
            "batch_stats": [
                {"batch_size": 1, "compute_input": {"count": 2, "ns": 20},
                 "compute_infer": {"count": 2, "ns": 1500}, "compute_output": {"count": 2, "ns": 25}},
                {"batch_size": 3, "compute_input": {"count": 1, "ns": 10},
                 "compute_infer": {"count": 1, "ns": 500}, "compute_output": {"count": 1, "ns": 15}}
            ],
            "memory_usage": []
        }]});
        assert_eq!(body, expected);
    }

    #[test]
    fn large_counters_stay_exact_integers() {
        let stats = ModelStatistics {
            name: "m".into(),
            version: "2".into(),
            inference_stats: InferStats {
                success: d(1, u64::MAX),
                ..InferStats::default()
            },
            ..ModelStatistics::default()
        };
        let text = serde_json::to_string(&stats_json(vec![stats])).expect("serializes");
        assert!(
            text.contains(r#""success":{"count":1,"ns":18446744073709551615}"#),
            "{text}"
        );
        assert!(text.contains(r#""batch_stats":[]"#), "{text}");
    }

    #[test]
    fn no_models_is_an_empty_list() {
        let text = serde_json::to_string(&stats_json(Vec::new())).expect("serializes");
        assert_eq!(text, r#"{"model_stats":[]}"#);
    }
}
