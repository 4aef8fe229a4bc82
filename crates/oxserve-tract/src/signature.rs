//! What an ONNX file declares about its inputs and outputs, read from the protobuf alone
//! (no tract model is built): `inspect` turns it into a [`ModelSignature`] to auto-complete the
//! model configuration, and `load` checks the configuration against it.

use std::fs::File;
use std::path::Path;

use oxserve_backend::{BackendError, ModelSignature};
use oxserve_core::{DataType, TensorMeta};
use tract_onnx::pb::tensor_shape_proto::dimension::Value as DimValue;
use tract_onnx::pb::{self, tensor_proto::DataType as OnnxType};
use tract_onnx::prelude::Framework;

use crate::error::{file_label, invalid_model, unsupported};

/// Reads and decodes an ONNX file, checking that it at least holds a graph with outputs.
///
/// The file is read into memory rather than memory-mapped (tract's `proto_model_for_path`
/// maps it): a repository may rewrite a model file in place while a new version loads, and a
/// mapped file that shrinks under us kills the process with SIGBUS instead of returning an
/// error.
pub(crate) fn read_proto(path: &Path) -> Result<pb::ModelProto, BackendError> {
    let label = file_label(path);
    let mut file =
        File::open(path).map_err(|e| invalid_model(format!("cannot open ONNX model '{label}': {e}")))?;
    let proto = tract_onnx::onnx().proto_model_for_read(&mut file).map_err(|e| {
        invalid_model(format!(
            "'{label}' is not a valid ONNX model (truncated or not ONNX): {}",
            crate::error::summarize(&e)
        ))
    })?;
    // Protobuf decoding is lenient: an empty file, or some unrelated bytes, can decode into an
    // empty message. Insist on the parts every ONNX model has.
    let graph = proto.graph.as_ref().ok_or_else(|| {
        invalid_model(format!(
            "'{label}' is not a valid ONNX model: it holds no graph (empty, truncated or not ONNX)"
        ))
    })?;
    if graph.output.is_empty() {
        return Err(invalid_model(format!(
            "'{label}' is not a valid ONNX model: its graph declares no outputs"
        )));
    }
    Ok(proto)
}

/// One dimension as the file declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DeclaredDim {
    Fixed(i64),
    /// A `dim_param`: a symbol name ("batch") or an expression ("seq+1").
    Param(String),
    /// Neither `dim_value` nor `dim_param`.
    Unknown,
}

impl DeclaredDim {
    fn as_i64(&self) -> i64 {
        match self {
            DeclaredDim::Fixed(v) if *v >= 0 => *v,
            _ => -1,
        }
    }
}

/// An input or output as the file declares it; lenient, so `load` can check what it needs and
/// `inspect` can insist on the rest.
#[derive(Debug, Clone)]
pub(crate) struct Declared {
    pub name: String,
    /// ONNX `TensorProto.DataType` code; `None` when the value has no tensor type at all.
    pub elem_type: Option<i32>,
    /// `None` when the type carries no shape.
    pub dims: Option<Vec<DeclaredDim>>,
}

impl Declared {
    fn from_value_info(info: &pb::ValueInfoProto) -> Declared {
        let tensor_type = info.r#type.as_ref().and_then(|t| t.value.as_ref()).map(|v| {
            let pb::type_proto::Value::TensorType(t) = v;
            t
        });
        let dims = tensor_type.and_then(|t| t.shape.as_ref()).map(|shape| {
            shape
                .dim
                .iter()
                .map(|d| match &d.value {
                    Some(DimValue::DimValue(v)) => DeclaredDim::Fixed(*v),
                    Some(DimValue::DimParam(p)) if !p.is_empty() => DeclaredDim::Param(p.clone()),
                    _ => DeclaredDim::Unknown,
                })
                .collect()
        });
        Declared {
            name: info.name.clone(),
            elem_type: tensor_type.map(|t| t.elem_type),
            dims,
        }
    }

    /// The oxserve data type, or an error naming the tensor.
    pub fn datatype(&self, role: &str) -> Result<DataType, BackendError> {
        let Some(code) = self.elem_type else {
            return Err(invalid_model(format!(
                "{role} '{}' has no tensor type in the model",
                self.name
            )));
        };
        onnx_to_datatype(code).ok_or_else(|| {
            unsupported(format!(
                "{role} '{}' has ONNX type {}, which oxserve does not support",
                self.name,
                onnx_type_name(code)
            ))
        })
    }

    /// Full metadata, for auto-completing a configuration: needs a type and a shape.
    fn meta(&self, role: &str) -> Result<TensorMeta, BackendError> {
        let datatype = self.datatype(role)?;
        let Some(dims) = &self.dims else {
            return Err(invalid_model(format!(
                "{role} '{}' declares no shape in the model, so its rank is unknown; \
                 give its dims in the model configuration",
                self.name
            )));
        };
        Ok(TensorMeta {
            name: self.name.clone(),
            datatype,
            shape: dims.iter().map(DeclaredDim::as_i64).collect(),
        })
    }
}

/// The graph's real inputs: `graph.input` minus the entries an initializer feeds (older
/// exporters list every weight as an input too).
pub(crate) fn declared_inputs(graph: &pb::GraphProto) -> Vec<Declared> {
    graph
        .input
        .iter()
        .filter(|i| !graph.initializer.iter().any(|init| init.name == i.name))
        .map(Declared::from_value_info)
        .collect()
}

pub(crate) fn declared_outputs(graph: &pb::GraphProto) -> Vec<Declared> {
    graph.output.iter().map(Declared::from_value_info).collect()
}

/// `Backend::inspect`: the inputs and outputs the file declares, `-1` for every dimension that
/// is not a fixed `dim_value`.
pub(crate) fn inspect(path: &Path) -> Result<ModelSignature, BackendError> {
    let proto = read_proto(path)?;
    let label = file_label(path);
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| invalid_model(format!("'{label}' holds no graph")))?;
    let with_file = |e: BackendError| BackendError::new(e.kind(), format!("{label}: {e}"));
    let inputs = declared_inputs(graph)
        .iter()
        .map(|d| d.meta("input"))
        .collect::<Result<_, _>>()
        .map_err(with_file)?;
    let outputs = declared_outputs(graph)
        .iter()
        .map(|d| d.meta("output"))
        .collect::<Result<_, _>>()
        .map_err(with_file)?;
    Ok(ModelSignature { inputs, outputs })
}

pub(crate) fn onnx_to_datatype(code: i32) -> Option<DataType> {
    Some(match OnnxType::try_from(code).ok()? {
        OnnxType::Float => DataType::F32,
        OnnxType::Uint8 => DataType::U8,
        OnnxType::Int8 => DataType::I8,
        OnnxType::Uint16 => DataType::U16,
        OnnxType::Int16 => DataType::I16,
        OnnxType::Int32 => DataType::I32,
        OnnxType::Int64 => DataType::I64,
        OnnxType::String => DataType::Bytes,
        OnnxType::Bool => DataType::Bool,
        OnnxType::Float16 => DataType::F16,
        OnnxType::Double => DataType::F64,
        OnnxType::Uint32 => DataType::U32,
        OnnxType::Uint64 => DataType::U64,
        OnnxType::Bfloat16 => DataType::BF16,
        _ => return None,
    })
}

pub(crate) fn onnx_type_name(code: i32) -> String {
    match OnnxType::try_from(code) {
        Ok(t) => t.as_str_name().to_string(),
        Err(_) => format!("#{code}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_oxserve_type_has_an_onnx_code() {
        let mapped: Vec<DataType> = (0..=23).filter_map(onnx_to_datatype).collect();
        for d in DataType::ALL {
            assert!(mapped.contains(&d), "{d} has no ONNX type");
        }
        assert_eq!(onnx_to_datatype(OnnxType::Complex64 as i32), None);
        assert_eq!(onnx_to_datatype(999), None);
        assert_eq!(onnx_type_name(14), "COMPLEX64");
        assert_eq!(onnx_type_name(999), "#999");
    }
}
