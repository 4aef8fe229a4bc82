//! Models with several entry points (SavedModel signatures): each non-default entry point is
//! served by its own scheduler over the version's one loaded model, with tensors taken from
//! the engine's description rather than from config.pbtxt (which describes the default one).

use std::sync::Arc;

use oxserve_backend::{BackendError, EntryPoint, LoadedModel, ModelInstance};
use oxserve_core::{SignatureMetadata, SignatureTensor, TensorMeta};
use oxserve_repository::pb::ModelConfig;

use crate::model::{InputSpec, ModelIo, OutputSpec};

/// A loaded model seen through one of its entry points: its instances run that entry point.
pub(crate) struct EntryModel {
    model: Arc<dyn LoadedModel>,
    entry: String,
}

impl EntryModel {
    pub(crate) fn shared(model: Arc<dyn LoadedModel>, entry: &str) -> Arc<dyn LoadedModel> {
        Arc::new(EntryModel {
            model,
            entry: entry.to_string(),
        })
    }
}

impl LoadedModel for EntryModel {
    fn new_instance(&self, index: usize) -> Result<Box<dyn ModelInstance>, BackendError> {
        self.model.new_entry_instance(&self.entry, index)
    }
}

/// Whether every tensor has a leading variable dimension the scheduler can batch along.
fn batchable(entry: &EntryPoint) -> bool {
    entry
        .inputs
        .iter()
        .chain(&entry.outputs)
        .all(|t| t.shape.first() == Some(&-1))
}

/// The client-facing tensors of an entry point: batched like the model (its configuration's
/// `max_batch_size`) when every tensor has a batch dimension, else unbatched.
pub(crate) fn entry_io(entry: &EntryPoint, max_batch_size: usize) -> ModelIo {
    let batched = max_batch_size > 0 && batchable(entry);
    let dims = |t: &TensorMeta| -> Vec<i64> {
        if batched {
            t.shape[1..].to_vec()
        } else {
            t.shape.clone()
        }
    };
    ModelIo {
        max_batch_size: if batched { max_batch_size } else { 0 },
        inputs: entry
            .inputs
            .iter()
            .map(|t| InputSpec {
                name: t.name.clone(),
                datatype: t.datatype,
                dims: dims(t),
                reshape: None,
            })
            .collect(),
        outputs: entry
            .outputs
            .iter()
            .map(|t| OutputSpec {
                name: t.name.clone(),
                datatype: t.datatype,
                dims: dims(t),
                reshape: None,
                labels: None,
            })
            .collect(),
    }
}

/// The model's scheduling settings for an entry point: unchanged when it batches, without
/// batching when it cannot.
pub(crate) fn entry_config(config: &ModelConfig, io: &ModelIo) -> ModelConfig {
    let mut cfg = config.clone();
    if io.max_batch_size == 0 {
        cfg.max_batch_size = 0;
        cfg.scheduling_choice = None;
    }
    cfg
}

pub(crate) fn signature_metadata(entry: &EntryPoint) -> SignatureMetadata {
    let tensors = |metas: &[TensorMeta], names: &[String]| -> Vec<SignatureTensor> {
        metas
            .iter()
            .enumerate()
            .map(|(i, meta)| SignatureTensor {
                meta: meta.clone(),
                tensor_name: names.get(i).cloned().unwrap_or_default(),
            })
            .collect()
    };
    SignatureMetadata {
        name: entry.name.clone(),
        method_name: entry.method_name.clone(),
        inputs: tensors(&entry.inputs, &entry.input_tensor_names),
        outputs: tensors(&entry.outputs, &entry.output_tensor_names),
        is_default: entry.is_default,
    }
}

#[cfg(test)]
mod tests {
    use oxserve_core::DataType;

    use super::*;

    fn meta(name: &str, shape: &[i64]) -> TensorMeta {
        TensorMeta {
            name: name.into(),
            datatype: DataType::F32,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn entry_points_batch_only_when_every_tensor_can() {
        let entry = EntryPoint {
            name: "double".into(),
            inputs: vec![meta("a", &[-1, 2])],
            outputs: vec![meta("b", &[-1, 2])],
            ..Default::default()
        };
        let io = entry_io(&entry, 8);
        assert_eq!(io.max_batch_size, 8);
        assert_eq!(io.inputs[0].dims, [2]);
        assert_eq!(entry_io(&entry, 0).inputs[0].dims, [-1, 2]);
        let scalar = EntryPoint {
            outputs: vec![meta("s", &[])],
            ..entry
        };
        let io = entry_io(&scalar, 8);
        assert_eq!(io.max_batch_size, 0);
        assert_eq!(io.inputs[0].dims, [-1, 2]);
        let cfg = ModelConfig {
            max_batch_size: 8,
            ..Default::default()
        };
        assert_eq!(entry_config(&cfg, &io).max_batch_size, 0);
    }
}
