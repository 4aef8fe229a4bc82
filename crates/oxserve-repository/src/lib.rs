//! The model repository: Triton's directory layout (`<root>/<model>/<version>/<file>`), the
//! model configuration schema (`config.pbtxt`, a subset of Triton's `inference.ModelConfig`),
//! version policies and label files.

use std::sync::LazyLock;

use prost_reflect::{DescriptorPool, MessageDescriptor};

mod config;
mod error;
mod layout;
mod pbtxt;

pub use config::{
    check_shadow, check_traffic_split, config_from_json, config_to_json, config_to_json_value, data_type_of,
    data_type_to_config, is_label_name, parse_config_text, validate_config,
};
pub use error::{ConfigError, RepositoryError};
pub use layout::{
    ModelDir, check_repository, detect_platform, list_models, list_versions, model_file_path, read_labels,
    read_model_config, select_versions,
};

/// Prost types generated from `proto/inference/model_config.proto` (package `inference`).
/// Crates compiling protos that import it can map `.inference` here with `extern_path`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/inference.rs"));
}

/// Encoded `FileDescriptorSet` of `inference/model_config.proto` (e.g. for gRPC reflection).
pub const MODEL_CONFIG_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/model_config_descriptor.bin"));

struct Descriptors {
    pool: DescriptorPool,
    model_config: MessageDescriptor,
}

// The bytes are produced by build.rs from our own proto, so failing to decode them is a
// build defect, not a runtime condition; a unit test decodes them.
#[allow(clippy::expect_used)]
static DESCRIPTORS: LazyLock<Descriptors> = LazyLock::new(|| {
    let pool = DescriptorPool::decode(MODEL_CONFIG_DESCRIPTOR_SET)
        .expect("built-in model_config descriptor set decodes");
    let model_config = pool
        .get_message_by_name("inference.ModelConfig")
        .expect("built-in descriptor set defines inference.ModelConfig");
    Descriptors { pool, model_config }
});

/// The reflection pool for `inference/model_config.proto`, built on first use.
pub fn descriptor_pool() -> &'static DescriptorPool {
    &DESCRIPTORS.pool
}

fn model_config_descriptor() -> MessageDescriptor {
    DESCRIPTORS.model_config.clone()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_pool_has_every_message() {
        let pool = descriptor_pool();
        for name in [
            "inference.ModelConfig",
            "inference.ModelInput",
            "inference.ModelOutput",
            "inference.ModelTensorReshape",
            "inference.ModelInstanceGroup",
            "inference.ModelVersionPolicy",
            "inference.ModelVersionPolicy.Latest",
            "inference.ModelParameter",
            "inference.ModelOptimizationPolicy",
            "inference.ModelOptimizationPolicy.Graph",
        ] {
            assert!(pool.get_message_by_name(name).is_some(), "{name}");
        }
        assert!(pool.get_enum_by_name("inference.DataType").is_some());
    }

    #[test]
    fn optimization_policy_matches_triton() {
        let policy = descriptor_pool()
            .get_message_by_name("inference.ModelOptimizationPolicy")
            .unwrap();
        assert_eq!(policy.get_field_by_name("graph").unwrap().number(), 1);
        assert_eq!(
            policy
                .get_field_by_name("execution_accelerators")
                .unwrap()
                .number(),
            4
        );
        assert_eq!(
            policy.fields().count(),
            2,
            "the graph level and the accelerators so far"
        );
        let accelerators = descriptor_pool()
            .get_message_by_name("inference.ModelOptimizationPolicy.ExecutionAccelerators")
            .unwrap();
        assert_eq!(
            accelerators
                .get_field_by_name("gpu_execution_accelerator")
                .unwrap()
                .number(),
            1
        );
        assert_eq!(
            accelerators
                .get_field_by_name("cpu_execution_accelerator")
                .unwrap()
                .number(),
            2
        );
        let accelerator = descriptor_pool()
            .get_message_by_name("inference.ModelOptimizationPolicy.ExecutionAccelerators.Accelerator")
            .unwrap();
        assert_eq!(accelerator.get_field_by_name("name").unwrap().number(), 1);
        assert_eq!(accelerator.get_field_by_name("parameters").unwrap().number(), 2);
        let graph = descriptor_pool()
            .get_message_by_name("inference.ModelOptimizationPolicy.Graph")
            .unwrap();
        assert_eq!(graph.get_field_by_name("level").unwrap().number(), 1);
        assert_eq!(graph.fields().count(), 1);
    }

    #[test]
    fn field_numbers_match_triton() {
        let cfg = model_config_descriptor();
        let numbers: Vec<(String, u32)> = cfg.fields().map(|f| (f.name().to_owned(), f.number())).collect();
        for (name, number) in [
            ("name", 1),
            ("platform", 2),
            ("version_policy", 3),
            ("max_batch_size", 4),
            ("input", 5),
            ("output", 6),
            ("instance_group", 7),
            ("default_model_filename", 8),
            ("parameters", 14),
            ("backend", 17),
            ("dynamic_batching", 11),
            ("optimization", 12),
            ("model_warmup", 16),
            ("ensemble_scheduling", 15),
            ("sequence_batching", 13),
            ("model_transaction_policy", 19),
            ("version_labels", 1000),
            ("traffic_split", 1001),
            ("shadow", 1002),
        ] {
            assert!(numbers.contains(&(name.to_owned(), number)), "{name} = {number}");
        }
        assert_eq!(numbers.len(), 19, "no fields beyond the agreed subset");
        let sequence = descriptor_pool()
            .get_message_by_name("inference.ModelSequenceBatching")
            .unwrap();
        for (name, number) in [
            ("max_sequence_idle_microseconds", 1),
            ("control_input", 2),
            ("direct", 3),
            ("oldest", 4),
            ("state", 5),
            ("iterative_sequence", 6),
        ] {
            assert_eq!(
                sequence.get_field_by_name(name).unwrap().number(),
                number,
                "{name}"
            );
        }
        let step = descriptor_pool()
            .get_message_by_name("inference.ModelEnsembling.Step")
            .unwrap();
        for (name, number) in [
            ("model_name", 1),
            ("model_version", 2),
            ("input_map", 3),
            ("output_map", 4),
            ("model_namespace", 5),
        ] {
            assert_eq!(step.get_field_by_name(name).unwrap().number(), number, "{name}");
        }
        let warmup = descriptor_pool()
            .get_message_by_name("inference.ModelWarmup")
            .unwrap();
        let numbers: Vec<(String, u32)> = warmup
            .fields()
            .map(|f| (f.name().to_owned(), f.number()))
            .collect();
        for (name, number) in [("name", 1), ("batch_size", 2), ("inputs", 3), ("count", 4)] {
            assert!(numbers.contains(&(name.to_owned(), number)), "{name} = {number}");
        }
        let input = descriptor_pool()
            .get_message_by_name("inference.ModelWarmup.Input")
            .unwrap();
        let numbers: Vec<(String, u32)> = input
            .fields()
            .map(|f| (f.name().to_owned(), f.number()))
            .collect();
        for (name, number) in [
            ("data_type", 1),
            ("dims", 2),
            ("zero_data", 3),
            ("random_data", 4),
            ("input_data_file", 5),
        ] {
            assert!(numbers.contains(&(name.to_owned(), number)), "{name} = {number}");
        }
        let batching = descriptor_pool()
            .get_message_by_name("inference.ModelDynamicBatching")
            .unwrap();
        let numbers: Vec<(String, u32)> = batching
            .fields()
            .map(|f| (f.name().to_owned(), f.number()))
            .collect();
        for (name, number) in [
            ("preferred_batch_size", 1),
            ("max_queue_delay_microseconds", 2),
            ("preserve_ordering", 3),
            ("priority_levels", 4),
            ("default_priority_level", 5),
            ("default_queue_policy", 6),
            ("priority_queue_policy", 7),
        ] {
            assert!(numbers.contains(&(name.to_owned(), number)), "{name} = {number}");
        }
        let policy = descriptor_pool()
            .get_message_by_name("inference.ModelQueuePolicy")
            .unwrap();
        let numbers: Vec<(String, u32)> = policy
            .fields()
            .map(|f| (f.name().to_owned(), f.number()))
            .collect();
        for (name, number) in [
            ("timeout_action", 1),
            ("default_timeout_microseconds", 2),
            ("allow_timeout_override", 3),
            ("max_queue_size", 4),
        ] {
            assert!(numbers.contains(&(name.to_owned(), number)), "{name} = {number}");
        }
        let dt = descriptor_pool().get_enum_by_name("inference.DataType").unwrap();
        assert_eq!(dt.get_value_by_name("TYPE_STRING").unwrap().number(), 13);
        assert_eq!(dt.get_value_by_name("TYPE_BF16").unwrap().number(), 14);
    }
}
