//! `tensorflow.TensorProto` ↔ oxserve tensors: `tensor_content` (raw little-endian bytes) or
//! the typed value fields (`float_val`, `int64_val`, `string_val`, `half_val`, ...), with
//! TensorFlow's rule for short value lists (the last value repeats to fill the shape; none at
//! all means zeros).

use bytes::Bytes;
use oxserve_core::{DataType, Error, Result, Tensor, TensorData, element_count};

use crate::pb::tensorflow::{TensorProto, TensorShapeProto, tensor_shape_proto};

fn shape_of(key: &str, proto: &TensorProto) -> Result<Vec<i64>> {
    let Some(shape) = &proto.tensor_shape else {
        // No shape: a scalar, as TensorFlow reads it.
        return Ok(Vec::new());
    };
    if shape.unknown_rank {
        return Err(Error::invalid(format!(
            "input '{key}': the tensor shape has an unknown rank"
        )));
    }
    shape
        .dim
        .iter()
        .map(|d| {
            if d.size < 0 {
                Err(Error::invalid(format!(
                    "input '{key}': dimension {} is negative",
                    d.size
                )))
            } else {
                Ok(d.size)
            }
        })
        .collect()
}

/// Fills `count` elements from `values` as TensorFlow does.
fn fill<T: Copy + Default>(key: &str, values: &[T], count: usize) -> Result<Vec<T>> {
    if values.len() > count {
        return Err(Error::invalid(format!(
            "input '{key}': {} values for a shape of {count} elements",
            values.len()
        )));
    }
    let mut out = Vec::with_capacity(count);
    out.extend_from_slice(values);
    let last = values.last().copied().unwrap_or_default();
    out.resize(count, last);
    Ok(out)
}

fn le_bytes<T: Copy, const N: usize>(values: Vec<T>, to: impl Fn(T) -> [u8; N]) -> TensorData {
    let mut out = Vec::with_capacity(values.len() * N);
    for v in values {
        out.extend_from_slice(&to(v));
    }
    TensorData::Raw(Bytes::from(out))
}

/// The tensor a `TensorProto` holds, named `key`. Short value lists expand to the shape, but
/// to no more than `max_bytes` (a few values must not make gigabytes).
pub fn to_tensor(key: &str, proto: TensorProto, max_bytes: usize) -> Result<Tensor> {
    let datatype = DataType::from_tensorflow_code(proto.dtype).ok_or_else(|| {
        Error::invalid(format!(
            "input '{key}': TensorFlow dtype {} is not supported",
            proto.dtype
        ))
    })?;
    let shape = shape_of(key, &proto)?;
    let count = element_count(&shape)?;
    // Strings cost a handle each even when repeated.
    let element_bytes = datatype.size().unwrap_or(std::mem::size_of::<Bytes>());
    if proto.tensor_content.is_empty() && count.saturating_mul(element_bytes) > max_bytes {
        return Err(Error::invalid(format!(
            "input '{key}': the shape {shape:?} has {count} elements, more than this server expands from a value list ({max_bytes} bytes)"
        )));
    }
    if !proto.tensor_content.is_empty() {
        let Some(size) = datatype.size() else {
            return Err(Error::invalid(format!(
                "input '{key}': DT_STRING tensors carry their values in string_val, not tensor_content"
            )));
        };
        if count.checked_mul(size) != Some(proto.tensor_content.len()) {
            return Err(Error::invalid(format!(
                "input '{key}': tensor_content has {} bytes, the shape {shape:?} of {} needs {}",
                proto.tensor_content.len(),
                crate::json::tf_type_name(datatype),
                count.saturating_mul(size)
            )));
        }
        return Ok(Tensor::new(
            key,
            datatype,
            shape,
            TensorData::Raw(proto.tensor_content),
        ));
    }
    let ints = |values: &[i32]| fill(key, values, count);
    let data = match datatype {
        DataType::F32 => le_bytes(fill(key, &proto.float_val, count)?, f32::to_le_bytes),
        DataType::F64 => le_bytes(fill(key, &proto.double_val, count)?, f64::to_le_bytes),
        DataType::I64 => le_bytes(fill(key, &proto.int64_val, count)?, i64::to_le_bytes),
        DataType::U32 => le_bytes(fill(key, &proto.uint32_val, count)?, u32::to_le_bytes),
        DataType::U64 => le_bytes(fill(key, &proto.uint64_val, count)?, u64::to_le_bytes),
        DataType::Bool => le_bytes(fill(key, &proto.bool_val, count)?, |b: bool| [u8::from(b)]),
        // int_val holds the small integer types; half_val the 16-bit float bits.
        DataType::I32 => le_bytes(ints(&proto.int_val)?, i32::to_le_bytes),
        DataType::I16 => le_bytes(ints(&proto.int_val)?, |v: i32| (v as i16).to_le_bytes()),
        DataType::I8 => le_bytes(ints(&proto.int_val)?, |v: i32| (v as i8).to_le_bytes()),
        DataType::U8 => le_bytes(ints(&proto.int_val)?, |v: i32| (v as u8).to_le_bytes()),
        DataType::U16 => le_bytes(ints(&proto.int_val)?, |v: i32| (v as u16).to_le_bytes()),
        DataType::F16 | DataType::BF16 => le_bytes(ints(&proto.half_val)?, |v: i32| (v as u16).to_le_bytes()),
        DataType::Bytes => {
            let values: Vec<Bytes> = proto.string_val.into_iter().map(Bytes::from).collect();
            if values.len() > count {
                return Err(Error::invalid(format!(
                    "input '{key}': {} values for a shape of {count} elements",
                    values.len()
                )));
            }
            let mut out = values;
            let last = out.last().cloned().unwrap_or_default();
            out.resize(count, last);
            TensorData::Strings(out)
        }
    };
    Ok(Tensor::new(key, datatype, shape, data))
}

/// A response tensor: fixed-size types in `tensor_content`, strings in `string_val`.
pub fn from_tensor(tensor: Tensor) -> TensorProto {
    let shape = TensorShapeProto {
        dim: tensor
            .shape
            .iter()
            .map(|&size| tensor_shape_proto::Dim {
                size,
                name: String::new(),
            })
            .collect(),
        unknown_rank: false,
    };
    let mut proto = TensorProto {
        dtype: tensor.datatype.tensorflow_code(),
        tensor_shape: Some(shape),
        ..Default::default()
    };
    match tensor.data {
        TensorData::Raw(raw) => proto.tensor_content = raw,
        TensorData::Strings(items) => proto.string_val = items.into_iter().map(|b| b.to_vec()).collect(),
    }
    proto
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn shaped(dims: &[i64]) -> Option<TensorShapeProto> {
        Some(TensorShapeProto {
            dim: dims
                .iter()
                .map(|&size| tensor_shape_proto::Dim {
                    size,
                    name: String::new(),
                })
                .collect(),
            unknown_rank: false,
        })
    }

    #[test]
    fn typed_values_fill_the_shape_as_tensorflow_does() {
        let proto = TensorProto {
            dtype: 1,
            tensor_shape: shaped(&[2, 2]),
            float_val: vec![1.0, 2.0],
            ..Default::default()
        };
        let t = to_tensor("x", proto, 1 << 20).unwrap();
        let values: Vec<f32> = t
            .raw()
            .unwrap()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(values, [1.0, 2.0, 2.0, 2.0]);
        let scalar = to_tensor(
            "s",
            TensorProto {
                dtype: 9,
                int64_val: vec![7],
                ..Default::default()
            },
            64,
        )
        .unwrap();
        assert!(scalar.shape.is_empty());
        assert_eq!(scalar.raw().unwrap().as_ref(), 7i64.to_le_bytes());
        let too_many = TensorProto {
            dtype: 1,
            tensor_shape: shaped(&[1]),
            float_val: vec![1.0, 2.0],
            ..Default::default()
        };
        assert!(to_tensor("x", too_many, 64).is_err());
        let huge = TensorProto {
            dtype: 1,
            tensor_shape: shaped(&[1 << 40]),
            float_val: vec![1.0],
            ..Default::default()
        };
        assert!(
            to_tensor("x", huge, 1 << 26)
                .unwrap_err()
                .to_string()
                .contains("more than this server expands")
        );
        let strings = TensorProto {
            dtype: 7,
            tensor_shape: shaped(&[2]),
            string_val: vec![b"a".to_vec(), b"b".to_vec()],
            ..Default::default()
        };
        let t = to_tensor("s", strings, 1 << 20).unwrap();
        assert_eq!(
            t.data,
            TensorData::Strings(vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")])
        );
    }

    #[test]
    fn tensor_content_must_match_the_shape() {
        let ok = TensorProto {
            dtype: 3,
            tensor_shape: shaped(&[2]),
            tensor_content: Bytes::from(vec![0u8; 8]),
            ..Default::default()
        };
        assert_eq!(to_tensor("i", ok, 64).unwrap().datatype, DataType::I32);
        let short = TensorProto {
            dtype: 3,
            tensor_shape: shaped(&[3]),
            tensor_content: Bytes::from(vec![0u8; 8]),
            ..Default::default()
        };
        assert!(
            to_tensor("i", short, 64)
                .unwrap_err()
                .to_string()
                .contains("needs 12")
        );
        let negative = TensorProto {
            dtype: 3,
            tensor_shape: shaped(&[-1]),
            ..Default::default()
        };
        assert!(to_tensor("i", negative, 64).is_err());
        assert!(
            to_tensor(
                "c",
                TensorProto {
                    dtype: 8,
                    ..Default::default()
                },
                64
            )
            .is_err()
        );
        let round = from_tensor(Tensor::from_raw("y", DataType::F16, vec![1], vec![0, 0x3c]));
        assert_eq!(round.dtype, 19);
        assert_eq!(round.tensor_content.as_ref(), [0, 0x3c]);
    }
}
