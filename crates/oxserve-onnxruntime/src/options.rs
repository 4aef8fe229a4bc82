//! Session options from the model configuration, with Triton's names where Triton has one:
//!
//! | config.pbtxt | meaning | default |
//! |---|---|---|
//! | `parameters { key: "intra_op_thread_count" value: { string_value: "N" } }` | threads inside one operator | `max(1, cores / instances)`; `0` also means this default |
//! | `parameters { key: "inter_op_thread_count" ... }` | threads across operators (parallel mode only) | 1 |
//! | `parameters { key: "execution_mode" ... }` | `0` sequential, `1` parallel | 0 |
//! | `parameters { key: "enable_mem_pattern" ... }` | `1`/`0` (or `true`/`false`) | ONNX Runtime's (on) |
//! | `parameters { key: "session.<name>" ... }` | any ONNX Runtime session configuration entry | – |
//! | `parameters { key: "session.intra_op.allow_spinning" ... }`, `session.inter_op.allow_spinning` | `1`: idle pool threads spin waiting for work | `0` (ONNX Runtime's own default is `1`) |
//! | `optimization { graph { level: L } }` | `0` all optimizations, `-1` basic, `1` basic + extended, `2` none | 0 |
//! | `parameters { key: "gpu_batch_padding" ... }` | GPU instances: `adaptive`, `max_batch_size` or `none` (`crate::padding`) | `adaptive` |
//! | `optimization { execution_accelerators { gpu_execution_accelerator ... } }`, `cudnn_conv_algo_search`, `gpu_mem_limit`, ... | CUDA execution provider options (`crate::cuda`) | ONNX Runtime's |
//!
//! Unknown parameters are ignored, as Triton does (they may be meant for another tool), but a
//! known one with a bad value is a load error.
//!
//! The default thread counts keep `instances × intra-op threads ≤ cores`, so several instances
//! (or several models) do not oversubscribe the machine. Spinning is off by default for the
//! same reason: a pool thread that spins after each operator burns a core that the server's
//! protocol threads, other instances and other models need; turning it on for a single
//! instance did not raise end-to-end throughput beyond the noise (BENCHMARKS.md, "ONNX Runtime
//! vs tract").

use std::collections::BTreeMap;

use ort::session::builder::GraphOptimizationLevel;
use oxserve_backend::support::bool_parameter;
use oxserve_backend::{BackendError, LoadSpec};

use crate::error::invalid_model;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SessionConfig {
    pub intra_threads: usize,
    pub inter_threads: usize,
    pub parallel: bool,
    pub level: OptimizationLevel,
    pub mem_pattern: Option<bool>,
    /// ONNX Runtime session configuration entries (`session.*` parameters).
    pub entries: Vec<(String, String)>,
    /// CUDA execution provider options for GPU instances (see `crate::cuda`).
    pub cuda: BTreeMap<String, String>,
}

/// Graph optimization levels, Triton's `optimization { graph { level } }` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OptimizationLevel {
    All,
    Basic,
    Extended,
    Disabled,
}

impl OptimizationLevel {
    fn from_triton(level: i32) -> Result<Self, BackendError> {
        Ok(match level {
            0 => OptimizationLevel::All,
            -1 => OptimizationLevel::Basic,
            1 => OptimizationLevel::Extended,
            2 => OptimizationLevel::Disabled,
            other => {
                return Err(invalid_model(format!(
                    "optimization {{ graph {{ level: {other} }} }} is not an ONNX Runtime level: use 0 (all \
                     optimizations, the default), -1 (basic), 1 (basic and extended) or 2 (none)"
                )));
            }
        })
    }

    pub fn ort(self) -> GraphOptimizationLevel {
        match self {
            OptimizationLevel::All => GraphOptimizationLevel::All,
            OptimizationLevel::Basic => GraphOptimizationLevel::Level1,
            OptimizationLevel::Extended => GraphOptimizationLevel::Level2,
            OptimizationLevel::Disabled => GraphOptimizationLevel::Disable,
        }
    }
}

/// CPU cores this process may use.
pub(crate) fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl SessionConfig {
    pub fn from_spec(spec: &LoadSpec, cores: usize) -> Result<Self, BackendError> {
        let params = &spec.parameters;
        let instances = spec.instance_count.max(1);
        let intra = match count(params, "intra_op_thread_count")? {
            Some(n) if n > 0 => n,
            _ => (cores / instances).max(1),
        };
        let inter = match count(params, "inter_op_thread_count")? {
            Some(n) if n > 0 => n,
            _ => 1,
        };
        let parallel = match params.get("execution_mode").map(|v| v.trim()) {
            None | Some("0" | "sequential") => false,
            Some("1" | "parallel") => true,
            Some(other) => {
                return Err(invalid_model(format!(
                    "parameter 'execution_mode' must be 0 (sequential) or 1 (parallel), got '{other}'"
                )));
            }
        };
        let mem_pattern = params
            .get("enable_mem_pattern")
            .map(|v| bool_parameter("enable_mem_pattern", v))
            .transpose()?;
        let mut entries: Vec<(String, String)> = params
            .iter()
            .filter(|(k, _)| k.starts_with("session.") && k.len() > "session.".len())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for key in SPINNING {
            if !params.contains_key(key) {
                entries.push((key.to_string(), "0".to_string()));
            }
        }
        Ok(SessionConfig {
            intra_threads: intra,
            inter_threads: inter,
            parallel,
            level: OptimizationLevel::from_triton(spec.graph_optimization_level)?,
            mem_pattern,
            entries,
            cuda: BTreeMap::new(),
        })
    }
}

/// ONNX Runtime's thread-pool spinning switches; off unless the configuration says otherwise.
const SPINNING: [&str; 2] = [
    "session.intra_op.allow_spinning",
    "session.inter_op.allow_spinning",
];

fn count(params: &BTreeMap<String, String>, key: &str) -> Result<Option<usize>, BackendError> {
    params
        .get(key)
        .map(|v| {
            v.trim().parse::<usize>().map_err(|_| {
                invalid_model(format!(
                    "parameter '{key}' must be a non-negative integer, got '{v}'"
                ))
            })
        })
        .transpose()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::test_spec::spec_with;

    fn spec(instances: usize, params: &[(&str, &str)], level: i32) -> LoadSpec {
        let mut s = spec_with(params);
        s.instance_count = instances;
        s.graph_optimization_level = level;
        s
    }

    #[test]
    fn defaults_share_the_cores_between_instances() {
        let c = SessionConfig::from_spec(&spec(1, &[], 0), 8).unwrap();
        assert_eq!((c.intra_threads, c.inter_threads, c.parallel), (8, 1, false));
        assert_eq!(c.level, OptimizationLevel::All);
        assert_eq!(c.mem_pattern, None);
        assert_eq!(
            c.entries,
            vec![
                ("session.intra_op.allow_spinning".to_string(), "0".to_string()),
                ("session.inter_op.allow_spinning".to_string(), "0".to_string()),
            ]
        );
        assert_eq!(
            SessionConfig::from_spec(&spec(3, &[], 0), 8)
                .unwrap()
                .intra_threads,
            2
        );
        // More instances than cores: one thread each, never zero.
        assert_eq!(
            SessionConfig::from_spec(&spec(4, &[], 0), 2)
                .unwrap()
                .intra_threads,
            1
        );
        // 0 means the default, as in Triton.
        let c = SessionConfig::from_spec(&spec(2, &[("intra_op_thread_count", "0")], 0), 8).unwrap();
        assert_eq!(c.intra_threads, 4);
    }

    #[test]
    fn tritons_parameters_are_read() {
        let c = SessionConfig::from_spec(
            &spec(
                1,
                &[
                    ("intra_op_thread_count", "3"),
                    ("inter_op_thread_count", " 2 "),
                    ("execution_mode", "1"),
                    ("enable_mem_pattern", "0"),
                    ("session.intra_op.allow_spinning", "1"),
                    ("session.", "ignored"),
                    ("unrelated", "x"),
                ],
                1,
            ),
            8,
        )
        .unwrap();
        assert_eq!((c.intra_threads, c.inter_threads, c.parallel), (3, 2, true));
        assert_eq!(c.level, OptimizationLevel::Extended);
        assert_eq!(c.mem_pattern, Some(false));
        // The configured value wins over the default; the other switch keeps its default.
        assert_eq!(
            c.entries,
            vec![
                ("session.intra_op.allow_spinning".to_string(), "1".to_string()),
                ("session.inter_op.allow_spinning".to_string(), "0".to_string()),
            ]
        );
        for (level, expected) in [
            (-1, OptimizationLevel::Basic),
            (2, OptimizationLevel::Disabled),
            (0, OptimizationLevel::All),
        ] {
            assert_eq!(
                SessionConfig::from_spec(&spec(1, &[], level), 2).unwrap().level,
                expected
            );
        }
    }

    #[test]
    fn bad_values_are_load_errors() {
        let err = |params: &[(&str, &str)], level: i32| {
            SessionConfig::from_spec(&spec(1, params, level), 4)
                .unwrap_err()
                .message()
                .to_string()
        };
        assert!(err(&[("intra_op_thread_count", "-1")], 0).contains("'intra_op_thread_count'"));
        assert!(err(&[("inter_op_thread_count", "many")], 0).contains("'many'"));
        assert!(err(&[("execution_mode", "2")], 0).contains("execution_mode"));
        assert!(err(&[("enable_mem_pattern", "maybe")], 0).contains("enable_mem_pattern"));
        assert!(err(&[], 3).contains("level: 3"));
    }
}
