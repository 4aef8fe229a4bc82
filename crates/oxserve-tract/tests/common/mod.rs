//! Builds small ONNX models in Rust (prost-encoded `ModelProto`s, opset 17, IR 8) and the
//! oxserve values the tests feed them.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use oxserve_backend::LoadSpec;
use oxserve_core::{DataType, Tensor, TensorData, TensorMeta};
use prost::Message;
use tract_onnx::pb::{
    GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto, tensor_proto::DataType as Onnx, tensor_shape_proto::Dimension,
    tensor_shape_proto::dimension::Value as DimValue, type_proto,
};

pub use tract_onnx::pb::tensor_proto::DataType as OnnxType;

/// One declared dimension.
#[derive(Clone, Copy)]
pub enum D {
    V(i64),
    P(&'static str),
    Unknown,
}

/// A value declaration; `dims: None` declares no shape at all.
pub fn value(name: &str, elem: Onnx, dims: Option<&[D]>) -> ValueInfoProto {
    let shape = dims.map(|dims| TensorShapeProto {
        dim: dims
            .iter()
            .map(|d| Dimension {
                denotation: String::new(),
                value: match d {
                    D::V(v) => Some(DimValue::DimValue(*v)),
                    D::P(p) => Some(DimValue::DimParam(p.to_string())),
                    D::Unknown => None,
                },
            })
            .collect(),
    });
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            denotation: String::new(),
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem as i32,
                shape,
            })),
        }),
        doc_string: String::new(),
    }
}

pub fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        name: format!("{op}_{}", outputs.first().copied().unwrap_or("")),
        op_type: op.to_string(),
        ..Default::default()
    }
}

pub fn initializer(name: &str, elem: Onnx, dims: &[i64], raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: name.to_string(),
        data_type: elem as i32,
        dims: dims.to_vec(),
        raw_data: raw,
        ..Default::default()
    }
}

pub fn model(
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    initializers: Vec<TensorProto>,
) -> ModelProto {
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        producer_name: "oxserve-tract tests".to_string(),
        graph: Some(GraphProto {
            node: nodes,
            name: "g".to_string(),
            initializer: initializers,
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn write(dir: &Path, file: &str, model: &ModelProto) -> PathBuf {
    let path = dir.join(file);
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    path
}

pub fn meta(name: &str, datatype: DataType, shape: &[i64]) -> TensorMeta {
    TensorMeta {
        name: name.to_string(),
        datatype,
        shape: shape.to_vec(),
    }
}

pub fn spec(path: &Path, inputs: Vec<TensorMeta>, outputs: Vec<TensorMeta>, max_batch_size: u32) -> LoadSpec {
    LoadSpec {
        model_name: "m".to_string(),
        version: 1,
        model_path: path.to_path_buf(),
        inputs,
        outputs,
        max_batch_size,
        instance_count: 1,
        devices: Vec::new(),
        graph_optimization_level: 0,
        parameters: BTreeMap::new(),
        gpu_accelerators: vec![],
    }
}

pub fn f32_tensor(name: &str, shape: &[i64], values: &[f32]) -> Tensor {
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::from_raw(name, DataType::F32, shape.to_vec(), raw)
}

pub fn i64_tensor(name: &str, shape: &[i64], values: &[i64]) -> Tensor {
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::from_raw(name, DataType::I64, shape.to_vec(), raw)
}

pub fn strings_tensor<V: AsRef<[u8]>>(name: &str, shape: &[i64], values: &[V]) -> Tensor {
    let items = values
        .iter()
        .map(|v| Bytes::copy_from_slice(v.as_ref()))
        .collect();
    Tensor::new(name, DataType::Bytes, shape.to_vec(), TensorData::Strings(items))
}

pub fn f32s(t: &Tensor) -> Vec<f32> {
    assert_eq!(t.datatype, DataType::F32);
    t.raw()
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
