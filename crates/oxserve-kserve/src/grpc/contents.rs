//! Typed `InferTensorContents` → oxserve tensor data.
//!
//! Each datatype has exactly one repeated field; values are range-checked where the field is
//! wider than the type (INT8 in `int_contents`, ...) and written as little-endian bytes, the
//! layout backends read. This is the slow path by nature (protobuf already decoded every
//! element); clients that care use raw contents, which are never copied.

use std::fmt::Display;

use bytes::Bytes;
use oxserve_core::{DataType, Error, Result, TensorData};

use super::pb::InferTensorContents;

/// The `InferTensorContents` field that carries a datatype; `None` for FP16/BF16, which have
/// no typed field and travel only as raw contents.
pub(crate) fn field_for(datatype: DataType) -> Option<&'static str> {
    Some(match datatype {
        DataType::Bool => "bool_contents",
        DataType::I8 | DataType::I16 | DataType::I32 => "int_contents",
        DataType::I64 => "int64_contents",
        DataType::U8 | DataType::U16 | DataType::U32 => "uint_contents",
        DataType::U64 => "uint64_contents",
        DataType::F32 => "fp32_contents",
        DataType::F64 => "fp64_contents",
        DataType::Bytes => "bytes_contents",
        DataType::F16 | DataType::BF16 => return None,
    })
}

/// Names and lengths of every field of `contents`, in field-number order.
fn field_lengths(c: &InferTensorContents) -> [(&'static str, usize); 8] {
    [
        ("bool_contents", c.bool_contents.len()),
        ("int_contents", c.int_contents.len()),
        ("int64_contents", c.int64_contents.len()),
        ("uint_contents", c.uint_contents.len()),
        ("uint64_contents", c.uint64_contents.len()),
        ("fp32_contents", c.fp32_contents.len()),
        ("fp64_contents", c.fp64_contents.len()),
        ("bytes_contents", c.bytes_contents.len()),
    ]
}

/// Converts the typed contents of input `name`, which must hold exactly `count` elements of
/// `datatype` in the matching field and nothing in any other field.
pub(crate) fn typed_to_data(
    name: &str,
    datatype: DataType,
    count: usize,
    contents: InferTensorContents,
) -> Result<TensorData> {
    let Some(field) = field_for(datatype) else {
        return Err(no_typed_field(name, datatype));
    };
    let mut len = 0;
    for (other, other_len) in field_lengths(&contents) {
        if other == field {
            len = other_len;
        } else if other_len > 0 {
            return Err(Error::invalid(format!(
                "input '{name}' of type {datatype} must carry its data in {field}, not {other}"
            )));
        }
    }
    if len != count {
        return Err(Error::invalid(format!(
            "input '{name}' has {len} elements in {field} but its shape needs {count}"
        )));
    }

    let c = contents;
    let raw = match datatype {
        DataType::Bool => c.bool_contents.into_iter().map(u8::from).collect(),
        DataType::I8 => narrow(name, datatype, &c.int_contents, |v| {
            i8::try_from(v).ok().map(i8::to_le_bytes)
        })?,
        DataType::I16 => narrow(name, datatype, &c.int_contents, |v| {
            i16::try_from(v).ok().map(i16::to_le_bytes)
        })?,
        DataType::I32 => widen(&c.int_contents, i32::to_le_bytes),
        DataType::I64 => widen(&c.int64_contents, i64::to_le_bytes),
        DataType::U8 => narrow(name, datatype, &c.uint_contents, |v| {
            u8::try_from(v).ok().map(u8::to_le_bytes)
        })?,
        DataType::U16 => narrow(name, datatype, &c.uint_contents, |v| {
            u16::try_from(v).ok().map(u16::to_le_bytes)
        })?,
        DataType::U32 => widen(&c.uint_contents, u32::to_le_bytes),
        DataType::U64 => widen(&c.uint64_contents, u64::to_le_bytes),
        DataType::F32 => widen(&c.fp32_contents, f32::to_le_bytes),
        DataType::F64 => widen(&c.fp64_contents, f64::to_le_bytes),
        // Already `Bytes` slices of the request buffer (see build.rs).
        DataType::Bytes => return Ok(TensorData::Strings(c.bytes_contents)),
        DataType::F16 | DataType::BF16 => return Err(no_typed_field(name, datatype)),
    };
    Ok(TensorData::Raw(Bytes::from(raw)))
}

fn no_typed_field(name: &str, datatype: DataType) -> Error {
    Error::invalid(format!(
        "input '{name}': {datatype} data has no typed contents field; send it in raw_input_contents"
    ))
}

/// Little-endian bytes of values that always fit their type.
fn widen<T: Copy, const N: usize>(values: &[T], to_le: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len().saturating_mul(N));
    for &v in values {
        out.extend_from_slice(&to_le(v));
    }
    out
}

/// Little-endian bytes of values carried in a wider field; `to_le` returns `None` for a value
/// out of the type's range.
fn narrow<T: Copy + Display, const N: usize>(
    name: &str,
    datatype: DataType,
    values: &[T],
    to_le: impl Fn(T) -> Option<[u8; N]>,
) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(values.len().saturating_mul(N));
    for (i, &v) in values.iter().enumerate() {
        let Some(le) = to_le(v) else {
            return Err(Error::invalid(format!(
                "input '{name}': value {v} at index {i} is out of range for {datatype}"
            )));
        };
        out.extend_from_slice(&le);
    }
    Ok(out)
}
