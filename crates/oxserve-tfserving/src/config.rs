//! TF Serving's model server configuration: `--model_config_file` (a `ModelServerConfig`
//! text proto), `--batching_parameters_file` (`BatchingParameters`), `--monitoring_config_file`
//! (`MonitoringConfig`), and the mapping of each listed model onto oxserve's model
//! configuration.

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use oxserve_engine::ListedModel;
use oxserve_repository::pb as triton;
use prost_reflect::{DescriptorPool, DynamicMessage};

use crate::pb::tensorflow::serving::{
    BatchingParameters, ModelServerConfig, MonitoringConfig,
    file_system_storage_path_source_config::servable_version_policy, model_server_config,
};

// The bytes are produced by build.rs from our own protos; failing to decode them is a build
// defect (a unit test decodes them).
#[allow(clippy::expect_used)]
static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(crate::DESCRIPTOR_SET).expect("built-in TF Serving descriptors decode")
});

fn parse_text<T: prost::Message + Default>(full_name: &str, text: &str, what: &str) -> Result<T, String> {
    let descriptor = POOL
        .get_message_by_name(full_name)
        .ok_or_else(|| format!("no descriptor for {full_name}"))?;
    let message = DynamicMessage::parse_text_format(descriptor, text).map_err(|e| format!("{what}: {e}"))?;
    message.transcode_to::<T>().map_err(|e| format!("{what}: {e}"))
}

fn read(path: &Path, what: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

pub fn parse_model_server_config(text: &str) -> Result<ModelServerConfig, String> {
    parse_text(
        "tensorflow.serving.ModelServerConfig",
        text,
        "invalid model config file",
    )
}

pub fn read_model_server_config(path: &Path) -> Result<ModelServerConfig, String> {
    parse_model_server_config(&read(path, "the model config file")?)
}

pub fn read_batching_parameters(path: &Path) -> Result<BatchingParameters, String> {
    parse_text(
        "tensorflow.serving.BatchingParameters",
        &read(path, "the batching parameters file")?,
        "invalid batching parameters file",
    )
}

pub fn read_monitoring_config(path: &Path) -> Result<MonitoringConfig, String> {
    parse_text(
        "tensorflow.serving.MonitoringConfig",
        &read(path, "the monitoring config file")?,
        "invalid monitoring config file",
    )
}

/// How every listed model is served (TF Serving's global flags).
#[derive(Debug, Clone, Default)]
pub struct ServingDefaults {
    /// `--enable_batching` with `--batching_parameters_file`'s parameters (defaults when the
    /// file is absent); `None`: requests run as they come.
    pub batching: Option<BatchingParameters>,
    /// Requests run concurrently on this many instances (all sharing one loaded model).
    pub instances: usize,
    /// `--saved_model_tags`.
    pub saved_model_tags: Option<String>,
}

/// TF Serving's default `max_batch_size` when the batching parameters leave it out.
const DEFAULT_MAX_BATCH_SIZE: i64 = 1000;

/// One TF Serving model as an oxserve model configuration.
pub fn listed_model(
    config: &crate::pb::tensorflow::serving::ModelConfig,
    defaults: &ServingDefaults,
    relative_to: &Path,
) -> Result<ListedModel, String> {
    if config.name.is_empty() {
        return Err("a model config has no name".into());
    }
    if config.base_path.is_empty() {
        return Err(format!("model '{}' has no base_path", config.name));
    }
    // TF Serving serves SavedModels ("tensorflow"); oxserve also takes ONNX models here (the
    // platform is detected from the version directories either way).
    if !config.model_platform.is_empty() && config.model_platform != "tensorflow" {
        return Err(format!(
            "model '{}': model_platform '{}' is not supported (use \"tensorflow\")",
            config.name, config.model_platform
        ));
    }
    let mut out = triton::ModelConfig {
        name: config.name.clone(),
        ..Default::default()
    };
    out.version_policy = config.model_version_policy.as_ref().map(|p| {
        use triton::model_version_policy::{All, Latest, PolicyChoice, Specific};
        triton::ModelVersionPolicy {
            policy_choice: p.policy_choice.as_ref().map(|choice| match choice {
                servable_version_policy::PolicyChoice::Latest(l) => PolicyChoice::Latest(Latest {
                    num_versions: l.num_versions.max(1),
                }),
                servable_version_policy::PolicyChoice::All(_) => PolicyChoice::All(All {}),
                servable_version_policy::PolicyChoice::Specific(s) => PolicyChoice::Specific(Specific {
                    versions: s.versions.clone(),
                }),
            }),
        }
    });
    for (label, version) in &config.version_labels {
        if *version <= 0 {
            return Err(format!(
                "model '{}': label '{label}' points at version {version}",
                config.name
            ));
        }
        out.version_labels.insert(label.clone(), *version);
    }
    out.instance_group = vec![triton::ModelInstanceGroup {
        count: i32::try_from(defaults.instances.max(1)).unwrap_or(1),
        kind: triton::model_instance_group::Kind::Cpu as i32,
        ..Default::default()
    }];
    if let Some(batching) = &defaults.batching {
        let max = batching.max_batch_size.unwrap_or(DEFAULT_MAX_BATCH_SIZE);
        out.max_batch_size = i32::try_from(max).map_err(|_| format!("max_batch_size {max} is too large"))?;
        if let Some(threads) = batching.num_batch_threads.filter(|n| *n > 0) {
            out.instance_group[0].count = i32::try_from(threads).unwrap_or(1);
        }
        out.scheduling_choice = Some(triton::model_config::SchedulingChoice::DynamicBatching(
            triton::ModelDynamicBatching {
                max_queue_delay_microseconds: batching.batch_timeout_micros.unwrap_or(0).max(0) as u64,
                preferred_batch_size: batching
                    .allowed_batch_sizes
                    .iter()
                    .map(|&s| i32::try_from(s).unwrap_or(i32::MAX))
                    .collect(),
                ..Default::default()
            },
        ));
    }
    if defaults.batching.is_none() {
        // Unbatched as in TF Serving: any batch size goes to the model as it comes.
        out.parameters.insert(
            oxserve_engine::AUTO_BATCHING_PARAMETER.into(),
            triton::ModelParameter {
                string_value: "false".into(),
            },
        );
    }
    if let Some(tags) = &defaults.saved_model_tags {
        out.parameters.insert(
            "saved_model_tags".into(),
            triton::ModelParameter {
                string_value: tags.clone(),
            },
        );
    }
    let path = PathBuf::from(&config.base_path);
    let path = if path.is_relative() {
        relative_to.join(path)
    } else {
        path
    };
    Ok(ListedModel {
        name: config.name.clone(),
        path,
        config: out,
    })
}

/// Every model of a `ModelServerConfig`.
pub fn model_list(
    config: &ModelServerConfig,
    defaults: &ServingDefaults,
    relative_to: &Path,
) -> Result<Vec<ListedModel>, String> {
    match &config.config {
        None => Ok(Vec::new()),
        Some(model_server_config::Config::ModelConfigList(list)) => {
            let mut seen = std::collections::HashSet::new();
            list.config
                .iter()
                .map(|c| {
                    if !seen.insert(c.name.clone()) {
                        return Err(format!("model '{}' is listed twice", c.name));
                    }
                    listed_model(c, defaults, relative_to)
                })
                .collect()
        }
        Some(model_server_config::Config::CustomModelConfig(_)) => {
            Err("custom_model_config is not supported; use model_config_list".into())
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn model_config_list_maps_onto_model_configs() {
        let cfg = parse_model_server_config(
            r#"
            model_config_list {
              config {
                name: "mnist"
                base_path: "/models/mnist"
                model_platform: "tensorflow"
                model_version_policy { specific { versions: 1 versions: 2 } }
                version_labels { key: "stable" value: 1 }
                version_labels { key: "canary" value: 2 }
              }
              config { name: "other" base_path: "rel/other" }
            }"#,
        )
        .unwrap();
        let defaults = ServingDefaults {
            instances: 3,
            ..Default::default()
        };
        let models = model_list(&cfg, &defaults, Path::new("/srv")).unwrap();
        assert_eq!(models.len(), 2);
        assert_eq!(models[0].path, PathBuf::from("/models/mnist"));
        assert_eq!(models[0].config.version_labels["canary"], 2);
        assert_eq!(models[0].config.max_batch_size, 0);
        assert_eq!(models[0].config.instance_group[0].count, 3);
        assert!(matches!(
            models[0].config.version_policy.as_ref().unwrap().policy_choice,
            Some(triton::model_version_policy::PolicyChoice::Specific(_))
        ));
        assert_eq!(models[1].path, PathBuf::from("/srv/rel/other"));
        let dup = parse_model_server_config(
            r#"model_config_list { config { name: "a" base_path: "/a" } config { name: "a" base_path: "/b" } }"#,
        )
        .unwrap();
        assert!(
            model_list(&dup, &defaults, Path::new("/"))
                .unwrap_err()
                .contains("twice")
        );
        assert!(parse_model_server_config("model_config_list { config { nme: \"x\" } }").is_err());
    }

    #[test]
    fn batching_parameters_map_onto_the_dynamic_batcher() {
        let params: BatchingParameters = parse_text(
            "tensorflow.serving.BatchingParameters",
            "max_batch_size { value: 32 } batch_timeout_micros { value: 2000 } num_batch_threads { value: 4 } allowed_batch_sizes: 8 allowed_batch_sizes: 32",
            "test",
        )
        .unwrap();
        let defaults = ServingDefaults {
            batching: Some(params),
            instances: 2,
            saved_model_tags: Some("serve,gpu".into()),
        };
        let cfg = crate::pb::tensorflow::serving::ModelConfig {
            name: "m".into(),
            base_path: "/m".into(),
            ..Default::default()
        };
        let m = listed_model(&cfg, &defaults, Path::new("/")).unwrap();
        assert_eq!(m.config.max_batch_size, 32);
        assert_eq!(m.config.instance_group[0].count, 4);
        let Some(triton::model_config::SchedulingChoice::DynamicBatching(db)) = &m.config.scheduling_choice
        else {
            panic!("no dynamic batching");
        };
        assert_eq!(db.max_queue_delay_microseconds, 2000);
        assert_eq!(db.preferred_batch_size, [8, 32]);
        assert_eq!(m.config.parameters["saved_model_tags"].string_value, "serve,gpu");
        let monitoring: MonitoringConfig = parse_text(
            "tensorflow.serving.MonitoringConfig",
            r#"prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }"#,
            "test",
        )
        .unwrap();
        assert!(monitoring.prometheus_config.unwrap().enable);
    }
}
