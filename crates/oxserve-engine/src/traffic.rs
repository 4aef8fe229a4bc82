//! Traffic splits and shadow traffic (oxserve's extensions, docs/model-repository.md): which
//! version answers a request that names none, and which candidate also sees it in the
//! background. Decided once per request in the facade, for every protocol.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use oxserve_repository::pb;
use rand::Rng;

use crate::manager::{ModelRecord, VersionState};
use crate::model::ServedVersion;

/// Relative weights over versions or labels, optionally sticky by a request header.
#[derive(Debug, Clone, PartialEq)]
pub struct TrafficSplit {
    /// (version number or label, weight)
    pub weights: Vec<(String, u32)>,
    /// Lowercase header name; `None`: each request is drawn at random.
    pub sticky_header: Option<String>,
}

/// A candidate version (number or label) that also receives `share` of the requests.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowTraffic {
    pub target: String,
    pub share: f64,
}

impl TrafficSplit {
    pub(crate) fn from_config(split: &pb::ModelTrafficSplit) -> TrafficSplit {
        let mut weights: Vec<(String, u32)> = split.weights.iter().map(|(k, w)| (k.clone(), *w)).collect();
        // Map order is arbitrary; the draw must not be.
        weights.sort();
        TrafficSplit {
            weights,
            sticky_header: (!split.sticky_header.is_empty()).then(|| split.sticky_header.clone()),
        }
    }
}

impl TrafficSplit {
    /// The rules config.pbtxt's `traffic_split` follows, for a split set at run time.
    pub fn check(&self) -> Result<(), String> {
        oxserve_repository::check_traffic_split(
            self.weights.iter().map(|(k, w)| (k.as_str(), *w)),
            self.sticky_header.as_deref().unwrap_or(""),
        )
    }
}

impl ShadowTraffic {
    /// The rules config.pbtxt's `shadow` follows, for a shadow set at run time.
    pub fn check(&self) -> Result<(), String> {
        oxserve_repository::check_shadow(&self.target, self.share)
    }

    pub(crate) fn from_config(shadow: &pb::ModelShadow) -> Option<ShadowTraffic> {
        (shadow.share > 0.0).then(|| ShadowTraffic {
            target: shadow.version.clone(),
            share: shadow.share,
        })
    }
}

impl ModelRecord {
    /// The serving version a split target (a version number or a label) names now.
    pub(crate) fn serving_target(&self, target: &str) -> Option<&Arc<ServedVersion>> {
        let version = target.parse::<u64>().ok().or_else(|| self.label(target))?;
        self.versions.get(&version).and_then(VersionState::serving)
    }

    /// The version a request that names none goes to under the split, or `None` when the
    /// model has no split (or none of its targets serves): the caller then uses the default.
    pub(crate) fn split_choice(&self, routing_key: Option<&str>) -> Option<Arc<ServedVersion>> {
        let split = self.split.as_ref()?;
        let serving: Vec<(&Arc<ServedVersion>, u64)> = split
            .weights
            .iter()
            .filter(|(_, w)| *w > 0)
            .filter_map(|(target, w)| self.serving_target(target).map(|s| (s, u64::from(*w))))
            .collect();
        let total: u64 = serving.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return None;
        }
        let mut point = match (routing_key, &split.sticky_header) {
            (Some(key), Some(_)) => {
                let mut hasher = DefaultHasher::new();
                key.hash(&mut hasher);
                hasher.finish() % total
            }
            _ => rand::rng().random_range(0..total),
        };
        for (served, weight) in serving {
            if point < weight {
                return Some(Arc::clone(served));
            }
            point -= weight;
        }
        None
    }

    /// The shadow candidate for one request answered by `primary`, when this request is in
    /// the mirrored share and the candidate serves (and is not the primary itself).
    pub(crate) fn shadow_choice(&self, primary: &ServedVersion) -> Option<Arc<ServedVersion>> {
        let shadow = self.shadow.as_ref()?;
        let candidate = self.serving_target(&shadow.target)?;
        if candidate.version == primary.version || rand::rng().random::<f64>() >= shadow.share {
            return None;
        }
        Some(Arc::clone(candidate))
    }
}
