//! Reading signatures from a SavedModel: the parts of `saved_model.proto` / `meta_graph.proto`
//! the engine needs, as prost messages with the published field numbers (everything else is
//! skipped when decoding), and the signatures turned into engine entry points.

use std::collections::BTreeMap;
use std::path::Path;

use oxserve_backend::EntryPoint;
use oxserve_core::{DataType, TensorMeta};

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SavedModel {
    #[prost(message, repeated, tag = "2")]
    pub meta_graphs: Vec<MetaGraphDef>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct MetaGraphDef {
    #[prost(message, optional, tag = "1")]
    pub meta_info_def: Option<MetaInfoDef>,
    #[prost(btree_map = "string, message", tag = "5")]
    pub signature_def: BTreeMap<String, SignatureDef>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct MetaInfoDef {
    #[prost(string, repeated, tag = "4")]
    pub tags: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SignatureDef {
    #[prost(btree_map = "string, message", tag = "1")]
    pub inputs: BTreeMap<String, TensorInfo>,
    #[prost(btree_map = "string, message", tag = "2")]
    pub outputs: BTreeMap<String, TensorInfo>,
    #[prost(string, tag = "3")]
    pub method_name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct TensorInfo {
    /// The `name` member of the `encoding` oneof (sparse and composite encodings are fields
    /// 4 and 5, not decoded: such tensors have no name and are reported as unsupported).
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(int32, tag = "2")]
    pub dtype: i32,
    #[prost(message, optional, tag = "3")]
    pub tensor_shape: Option<TensorShapeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct TensorShapeProto {
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<Dim>,
    #[prost(bool, tag = "3")]
    pub unknown_rank: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Dim {
    #[prost(int64, tag = "1")]
    pub size: i64,
}

/// The `ConfigProto` fields the engine sets (tensorflow/core/protobuf/config.proto): thread
/// counts and the spinning switch.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SessionConfig {
    #[prost(int32, tag = "2")]
    pub intra_op_parallelism_threads: i32,
    #[prost(int32, tag = "5")]
    pub inter_op_parallelism_threads: i32,
    #[prost(message, optional, tag = "16")]
    pub experimental: Option<SessionExperimental>,
}

/// `ConfigProto.Experimental`: only the switch the engine sets.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SessionExperimental {
    #[prost(bool, tag = "9")]
    pub disable_thread_spinning: bool,
}

/// The signature a request without a signature name runs, as TF Serving's.
pub const DEFAULT_SIGNATURE: &str = "serving_default";

/// One signature as the engine serves it.
#[derive(Debug, Clone)]
pub(crate) struct Signature {
    pub name: String,
    pub method_name: String,
    /// Sorted by key: (key, type, shape, tensor name).
    pub inputs: Vec<(TensorMeta, String)>,
    pub outputs: Vec<(TensorMeta, String)>,
}

impl Signature {
    pub(crate) fn entry_point(&self, is_default: bool) -> EntryPoint {
        EntryPoint {
            name: self.name.clone(),
            method_name: self.method_name.clone(),
            inputs: self.inputs.iter().map(|(m, _)| m.clone()).collect(),
            outputs: self.outputs.iter().map(|(m, _)| m.clone()).collect(),
            input_tensor_names: self.inputs.iter().map(|(_, n)| n.clone()).collect(),
            output_tensor_names: self.outputs.iter().map(|(_, n)| n.clone()).collect(),
            is_default,
        }
    }
}

/// The servable signatures of a MetaGraphDef, and the name of the default one. Signatures
/// TensorFlow adds for itself (`__saved_model_init_op`) are skipped; signatures with tensors
/// the engine cannot serve are skipped with a warning (an error if none is left).
pub(crate) fn signatures(meta: &MetaGraphDef) -> Result<(Vec<Signature>, String), String> {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for (name, def) in &meta.signature_def {
        if name.starts_with("__") {
            continue;
        }
        match signature(name, def) {
            Ok(sig) => out.push(sig),
            Err(reason) => {
                tracing::warn!(signature = %name, %reason, "signature not served");
                skipped.push(format!("'{name}': {reason}"));
            }
        }
    }
    let default = if out.iter().any(|s| s.name == DEFAULT_SIGNATURE) {
        DEFAULT_SIGNATURE.to_string()
    } else if let Some(first) = out.first() {
        first.name.clone()
    } else if skipped.is_empty() {
        return Err("the SavedModel has no signatures to serve".into());
    } else {
        return Err(format!("no signature can be served: {}", skipped.join("; ")));
    };
    Ok((out, default))
}

fn signature(name: &str, def: &SignatureDef) -> Result<Signature, String> {
    let tensors = |map: &BTreeMap<String, TensorInfo>| -> Result<Vec<(TensorMeta, String)>, String> {
        map.iter()
            .map(|(key, info)| {
                if info.name.is_empty() {
                    return Err(format!("'{key}' is a sparse or composite tensor"));
                }
                let datatype = DataType::from_tensorflow_code(info.dtype).ok_or_else(|| {
                    format!("'{key}' has TensorFlow type {} which is not served", info.dtype)
                })?;
                let shape = match &info.tensor_shape {
                    None => return Err(format!("'{key}' has no shape")),
                    Some(s) if s.unknown_rank => return Err(format!("'{key}' has an unknown rank")),
                    Some(s) => s
                        .dim
                        .iter()
                        .map(|d| if d.size < 0 { -1 } else { d.size })
                        .collect(),
                };
                Ok((
                    TensorMeta {
                        name: key.clone(),
                        datatype,
                        shape,
                    },
                    info.name.clone(),
                ))
            })
            .collect()
    };
    Ok(Signature {
        name: name.to_string(),
        method_name: def.method_name.clone(),
        inputs: tensors(&def.inputs)?,
        outputs: tensors(&def.outputs)?,
    })
}

/// The MetaGraphDef of `saved_model.pb` in `dir` tagged with every one of `tags`.
pub(crate) fn read_meta_graph(dir: &Path, tags: &[String]) -> Result<MetaGraphDef, String> {
    let path = dir.join("saved_model.pb");
    let bytes = std::fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("no SavedModel: {} has no saved_model.pb", dir_label(dir)),
        _ => format!("cannot read saved_model.pb: {e}"),
    })?;
    let model: SavedModel = prost::Message::decode(bytes.as_slice())
        .map_err(|e| format!("saved_model.pb is not a SavedModel: {e}"))?;
    let mut found_tags = Vec::new();
    for graph in model.meta_graphs {
        let graph_tags = graph
            .meta_info_def
            .as_ref()
            .map(|m| m.tags.clone())
            .unwrap_or_default();
        if tags.iter().all(|t| graph_tags.contains(t)) {
            return Ok(graph);
        }
        found_tags.push(format!("{graph_tags:?}"));
    }
    Err(format!(
        "the SavedModel has no MetaGraph tagged {tags:?} (it has {})",
        if found_tags.is_empty() {
            "none".to_string()
        } else {
            found_tags.join(", ")
        }
    ))
}

fn dir_label(dir: &Path) -> String {
    // The version directory and its parent name the model without the server's layout.
    let parts: Vec<String> = dir
        .components()
        .rev()
        .take(2)
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    parts.into_iter().rev().collect::<Vec<_>>().join("/")
}
