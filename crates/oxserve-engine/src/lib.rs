//! The engine facade every protocol front-end calls: it resolves model and version, validates
//! requests against the model's configuration, runs them on the version's instances and shapes
//! the outputs. It also owns the model table that the lifecycle path fills.

mod autocomplete;
mod classification;
mod entries;
mod lifecycle;
mod manager;
mod memory;
mod model;
mod scheduling;
mod sequence;
mod service;
mod shadow;
mod stats;
pub mod trace;
mod traffic;
mod validate;
mod warmup;

pub use autocomplete::AUTO_BATCHING_PARAMETER;
pub use lifecycle::{LoadOverride, OverrideFile};
pub use manager::{
    BACKEND_REASON_PARAMETER, ControlMode, ENSEMBLE, ENSEMBLE_STEPS_PARAMETER, ListedModel, ManagerOptions,
    ModelManager, PLACEMENT_REASON_PARAMETER, UNLOADED_REASON,
};
pub use memory::set_memory_release_hook;
pub use service::{IndexEntry, InferenceService, ServerMetadata};
pub use shadow::ShadowStats;
pub use stats::{BatchStat, FailureReason, InferStats, Metrics, ModelStatistics, StatDuration};
pub use traffic::{ShadowTraffic, TrafficSplit};
