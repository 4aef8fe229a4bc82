//! Element types and what a session declares about its inputs and outputs.

use ort::value::{Outlet, TensorElementType, ValueType};
use oxserve_backend::BackendError;
use oxserve_core::{DataType, TensorMeta};

use crate::error::unsupported;

/// The ONNX Runtime element type of an oxserve data type (every one has one).
pub(crate) fn element_type(dt: DataType) -> TensorElementType {
    match dt {
        DataType::Bool => TensorElementType::Bool,
        DataType::U8 => TensorElementType::Uint8,
        DataType::U16 => TensorElementType::Uint16,
        DataType::U32 => TensorElementType::Uint32,
        DataType::U64 => TensorElementType::Uint64,
        DataType::I8 => TensorElementType::Int8,
        DataType::I16 => TensorElementType::Int16,
        DataType::I32 => TensorElementType::Int32,
        DataType::I64 => TensorElementType::Int64,
        DataType::F16 => TensorElementType::Float16,
        DataType::BF16 => TensorElementType::Bfloat16,
        DataType::F32 => TensorElementType::Float32,
        DataType::F64 => TensorElementType::Float64,
        DataType::Bytes => TensorElementType::String,
    }
}

/// The oxserve data type of an ONNX Runtime element type; `None` for the ones oxserve has no
/// wire type for (complex numbers, 8- and 4-bit floats and integers).
pub(crate) fn data_type(ty: TensorElementType) -> Option<DataType> {
    Some(match ty {
        TensorElementType::Bool => DataType::Bool,
        TensorElementType::Uint8 => DataType::U8,
        TensorElementType::Uint16 => DataType::U16,
        TensorElementType::Uint32 => DataType::U32,
        TensorElementType::Uint64 => DataType::U64,
        TensorElementType::Int8 => DataType::I8,
        TensorElementType::Int16 => DataType::I16,
        TensorElementType::Int32 => DataType::I32,
        TensorElementType::Int64 => DataType::I64,
        TensorElementType::Float16 => DataType::F16,
        TensorElementType::Bfloat16 => DataType::BF16,
        TensorElementType::Float32 => DataType::F32,
        TensorElementType::Float64 => DataType::F64,
        TensorElementType::String => DataType::Bytes,
        _ => return None,
    })
}

/// An input or output as the session reports it: name, type and shape (`-1` = variable).
pub(crate) fn outlet_meta(role: &str, outlet: &Outlet) -> Result<TensorMeta, BackendError> {
    match outlet.dtype() {
        ValueType::Tensor { ty, shape, .. } => {
            let datatype = data_type(*ty).ok_or_else(|| {
                unsupported(format!(
                    "{role} '{}' has element type {ty}, which oxserve does not support",
                    outlet.name()
                ))
            })?;
            Ok(TensorMeta {
                name: outlet.name().to_string(),
                datatype,
                shape: shape.iter().map(|&d| if d < 0 { -1 } else { d }).collect(),
            })
        }
        other => Err(unsupported(format!(
            "{role} '{}' is a {other}, not a tensor; oxserve serves tensor inputs and outputs only",
            outlet.name()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_data_type_round_trips() {
        for dt in DataType::ALL {
            assert_eq!(data_type(element_type(dt)), Some(dt), "{dt}");
        }
        assert_eq!(data_type(TensorElementType::Complex64), None);
    }
}
