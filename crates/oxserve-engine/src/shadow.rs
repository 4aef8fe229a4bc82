//! Shadow traffic: a mirrored request runs on the candidate version in the background after
//! the primary answered; the candidate's answer is compared with the primary's and thrown
//! away. What the comparison found goes to Prometheus (`oxserve_shadow_*`) and to the
//! candidate's statistics, so a canary can be judged before it takes traffic.

use std::sync::Arc;
use std::time::Instant;

use oxserve_core::{DataType, InferRequest, InferResponse, Tensor, TensorData};
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::model::ServedVersion;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PairLabels {
    model: String,
    primary: String,
    candidate: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    model: String,
    primary: String,
    candidate: String,
    /// `compared`, or `failed` (the candidate returned an error).
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgreementLabels {
    model: String,
    primary: String,
    candidate: String,
    /// `true` when every BYTES output (classification results) was equal.
    agree: String,
}

fn diff_histogram() -> Histogram {
    // 1e-9 … ~1e3: from float rounding to answers that have nothing in common.
    Histogram::new(exponential_buckets(1e-9, 10.0, 13))
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(50e-6, 2.0, 16))
}

/// The shadow families of the metrics registry.
pub(crate) struct ShadowMetrics {
    requests: Family<OutcomeLabels, Counter>,
    max_abs_diff: Family<PairLabels, Histogram, fn() -> Histogram>,
    max_rel_diff: Family<PairLabels, Histogram, fn() -> Histogram>,
    agreement: Family<AgreementLabels, Counter>,
    latency: Family<PairLabels, Histogram, fn() -> Histogram>,
}

impl ShadowMetrics {
    pub(crate) fn register(registry: &mut Registry) -> ShadowMetrics {
        let m = ShadowMetrics {
            requests: Family::default(),
            max_abs_diff: Family::new_with_constructor(diff_histogram),
            max_rel_diff: Family::new_with_constructor(diff_histogram),
            agreement: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
        };
        registry.register(
            "shadow_requests",
            "Requests mirrored to a shadow candidate, by outcome (compared, failed)",
            m.requests.clone(),
        );
        registry.register(
            "shadow_max_abs_diff",
            "Per mirrored request, the largest absolute difference between the candidate's and the primary's numeric outputs",
            m.max_abs_diff.clone(),
        );
        registry.register(
            "shadow_max_rel_diff",
            "Per mirrored request, the largest relative difference |a-b|/max(|a|,|b|) between the candidate's and the primary's numeric outputs",
            m.max_rel_diff.clone(),
        );
        registry.register(
            "shadow_agreement",
            "Mirrored requests whose BYTES outputs (classification results) the candidate matched exactly (agree=true) or not",
            m.agreement.clone(),
        );
        registry.register(
            "shadow_latency_seconds",
            "The shadow candidate's time to answer a mirrored request",
            m.latency.clone(),
        );
        m
    }
}

/// The running totals a candidate version shows in its statistics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShadowStats {
    /// The version the compared requests were answered by.
    pub primary_version: u64,
    pub compared: u64,
    pub failed: u64,
    /// Over every compared request.
    pub max_abs_diff: f64,
    pub max_rel_diff: f64,
    /// Compared requests with BYTES outputs, and how many of them agreed.
    pub classified: u64,
    pub agreed: u64,
    pub latency_ns: u64,
}

/// A candidate version's shadow totals (kept with its statistics).
#[derive(Default)]
pub(crate) struct ShadowRecord(Mutex<Option<ShadowStats>>);

impl ShadowRecord {
    pub(crate) fn snapshot(&self) -> Option<ShadowStats> {
        self.0.lock().clone()
    }
}

/// How far two answers are apart.
#[derive(Debug, Default, PartialEq)]
struct Divergence {
    max_abs: f64,
    max_rel: f64,
    /// `Some(agree)` when the answers have BYTES outputs.
    bytes_agree: Option<bool>,
}

/// A numeric tensor's elements as f64 (`None` for BYTES).
fn values(t: &Tensor) -> Option<Vec<f64>> {
    let TensorData::Raw(raw) = &t.data else {
        return None;
    };
    let size = t.datatype.size()?;
    fn le<const N: usize>(c: &[u8]) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        a
    }
    let convert: fn(&[u8]) -> f64 = match t.datatype {
        DataType::F32 => |c| f64::from(f32::from_le_bytes(le(c))),
        DataType::F64 => |c| f64::from_le_bytes(le(c)),
        DataType::F16 => |c| f64::from(half::f16::from_le_bytes(le(c))),
        DataType::BF16 => |c| f64::from(half::bf16::from_le_bytes(le(c))),
        DataType::I8 => |c| f64::from(c[0] as i8),
        DataType::U8 | DataType::Bool => |c| f64::from(c[0]),
        DataType::I16 => |c| f64::from(i16::from_le_bytes(le(c))),
        DataType::U16 => |c| f64::from(u16::from_le_bytes(le(c))),
        DataType::I32 => |c| f64::from(i32::from_le_bytes(le(c))),
        DataType::U32 => |c| f64::from(u32::from_le_bytes(le(c))),
        DataType::I64 => |c| i64::from_le_bytes(le(c)) as f64,
        DataType::U64 => |c| u64::from_le_bytes(le(c)) as f64,
        DataType::Bytes => return None,
    };
    Some(raw.chunks_exact(size).map(convert).collect())
}

/// Compares the candidate's answer with the primary's, output by output (by name). Outputs
/// that differ in shape or type, or that the candidate lacks, count as infinitely far apart.
fn diverge(primary: &InferResponse, candidate: &InferResponse) -> Divergence {
    let mut d = Divergence::default();
    for p in &primary.outputs {
        let Some(c) = candidate.outputs.iter().find(|c| c.name == p.name) else {
            d.max_abs = f64::INFINITY;
            d.max_rel = f64::INFINITY;
            continue;
        };
        if p.shape != c.shape || p.datatype != c.datatype {
            d.max_abs = f64::INFINITY;
            d.max_rel = f64::INFINITY;
            continue;
        }
        if let (TensorData::Strings(a), TensorData::Strings(b)) = (&p.data, &c.data) {
            d.bytes_agree = Some(d.bytes_agree.unwrap_or(true) && a == b);
            continue;
        }
        let (Some(a), Some(b)) = (values(p), values(c)) else {
            continue;
        };
        for (x, y) in a.iter().zip(&b) {
            let abs = (x - y).abs();
            let scale = x.abs().max(y.abs());
            let rel = if scale == 0.0 { 0.0 } else { abs / scale };
            // NaN against NaN is agreement; NaN against a number is not.
            let (abs, rel) = match (x.is_nan(), y.is_nan()) {
                (true, true) => (0.0, 0.0),
                (false, false) => (abs, rel),
                _ => (f64::INFINITY, f64::INFINITY),
            };
            d.max_abs = d.max_abs.max(abs);
            d.max_rel = d.max_rel.max(rel);
        }
    }
    d
}

/// Runs `request` on `candidate` in the background and records how its answer compares with
/// `primary_answer`. Never touches the client's response.
pub(crate) fn mirror(
    metrics: Arc<crate::stats::Metrics>,
    primary_version: u64,
    candidate: Arc<ServedVersion>,
    mut request: InferRequest,
    primary_answer: InferResponse,
) {
    request.model_version = Some(candidate.version);
    let pair = PairLabels {
        model: candidate.model_name.clone(),
        primary: primary_version.to_string(),
        candidate: candidate.version.to_string(),
    };
    tokio::spawn(async move {
        let started = Instant::now();
        let answer = crate::service::run_on(&candidate, request).await;
        let elapsed = started.elapsed();
        let shadow = &metrics.shadow;
        let outcome = |outcome: &str| OutcomeLabels {
            model: pair.model.clone(),
            primary: pair.primary.clone(),
            candidate: pair.candidate.clone(),
            outcome: outcome.to_string(),
        };
        let mut totals = candidate.shadow.0.lock();
        let stats = totals.get_or_insert_with(ShadowStats::default);
        stats.primary_version = primary_version;
        match answer {
            Ok(answer) => {
                let d = diverge(&primary_answer, &answer);
                shadow.requests.get_or_create(&outcome("compared")).inc();
                shadow.max_abs_diff.get_or_create(&pair).observe(d.max_abs);
                shadow.max_rel_diff.get_or_create(&pair).observe(d.max_rel);
                shadow.latency.get_or_create(&pair).observe(elapsed.as_secs_f64());
                stats.compared += 1;
                stats.max_abs_diff = stats.max_abs_diff.max(d.max_abs);
                stats.max_rel_diff = stats.max_rel_diff.max(d.max_rel);
                stats.latency_ns += elapsed.as_nanos() as u64;
                if let Some(agree) = d.bytes_agree {
                    shadow
                        .agreement
                        .get_or_create(&AgreementLabels {
                            model: pair.model.clone(),
                            primary: pair.primary.clone(),
                            candidate: pair.candidate.clone(),
                            agree: agree.to_string(),
                        })
                        .inc();
                    stats.classified += 1;
                    stats.agreed += u64::from(agree);
                }
            }
            Err(e) => {
                tracing::debug!(model = %pair.model, candidate = %pair.candidate, error = %e, "shadow request failed");
                shadow.requests.get_or_create(&outcome("failed")).inc();
                stats.failed += 1;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(outputs: Vec<Tensor>) -> InferResponse {
        InferResponse {
            model_name: "m".into(),
            model_version: 1,
            id: None,
            parameters: Default::default(),
            outputs,
        }
    }

    fn f32s(name: &str, v: &[f32]) -> Tensor {
        let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        Tensor::from_raw(name, DataType::F32, vec![v.len() as i64], raw)
    }

    #[test]
    fn identical_answers_do_not_diverge() {
        let a = response(vec![f32s("y", &[1.0, -2.0, 0.0])]);
        assert_eq!(diverge(&a, &a), Divergence::default());
    }

    #[test]
    fn divergence_is_the_largest_difference() {
        let a = response(vec![f32s("y", &[1.0, 10.0])]);
        let b = response(vec![f32s("y", &[1.5, 10.0])]);
        let d = diverge(&a, &b);
        assert_eq!(d.max_abs, 0.5);
        assert!((d.max_rel - 0.5 / 1.5).abs() < 1e-12);
        let other_shape = response(vec![f32s("y", &[1.0])]);
        assert_eq!(diverge(&a, &other_shape).max_abs, f64::INFINITY);
        assert_eq!(diverge(&a, &response(vec![])).max_abs, f64::INFINITY);
    }

    #[test]
    fn classification_results_agree_or_not() {
        let strings = |v: &[&str]| Tensor {
            name: "c".into(),
            datatype: DataType::Bytes,
            shape: vec![v.len() as i64],
            data: TensorData::Strings(v.iter().map(|s| bytes::Bytes::from(s.to_string())).collect()),
        };
        let a = response(vec![strings(&["0.9:1:cat"])]);
        assert_eq!(diverge(&a, &a).bytes_agree, Some(true));
        assert_eq!(
            diverge(&a, &response(vec![strings(&["0.8:2:dog"])])).bytes_agree,
            Some(false)
        );
    }
}
