//! Conversions between oxserve tensors (little-endian bytes or byte strings) and tract tensors.

use bytes::Bytes;
use oxserve_backend::BackendError;
use oxserve_core::{DataType, Tensor, TensorData, check_bools};
use tract_onnx::prelude::tract_ndarray::{ArrayD, IxDyn};
use tract_onnx::prelude::{Blob, DatumType, IntoTensor, TValue, Tensor as TractTensor};

use crate::error::{internal, invalid_input};

// oxserve's raw tensor data is little-endian and tract's buffers are native-endian; the byte
// copies below are only correct on little-endian hosts (every target tract supports).
#[cfg(target_endian = "big")]
compile_error!("oxserve-tract copies tensor bytes verbatim and needs a little-endian target");

/// The tract element type for an oxserve data type; `None` where tract has none (BF16).
pub(crate) fn datum_type(dt: DataType) -> Option<DatumType> {
    Some(match dt {
        DataType::Bool => DatumType::Bool,
        DataType::U8 => DatumType::U8,
        DataType::U16 => DatumType::U16,
        DataType::U32 => DatumType::U32,
        DataType::U64 => DatumType::U64,
        DataType::I8 => DatumType::I8,
        DataType::I16 => DatumType::I16,
        DataType::I32 => DatumType::I32,
        DataType::I64 => DatumType::I64,
        DataType::F16 => DatumType::F16,
        DataType::F32 => DatumType::F32,
        DataType::F64 => DatumType::F64,
        DataType::Bytes => DatumType::String,
        DataType::BF16 => return None,
    })
}

/// Whether tract values of `actual` can be returned as `expected` (after [`from_tract`]'s cast).
pub(crate) fn output_compatible(actual: DatumType, expected: DatumType) -> bool {
    // Shape arithmetic (Shape, Size, ...) may leave tract's symbolic integer type on an output
    // that ONNX calls INT64; it evaluates to plain integers at run time.
    actual == expected || (actual == DatumType::TDim && expected == DatumType::I64)
}

/// Builds a tract tensor from an oxserve tensor whose type, shape and byte length the caller
/// has checked; `dims` is its shape.
pub(crate) fn to_tract(tensor: &Tensor, datum: DatumType, dims: &[usize]) -> Result<TValue, BackendError> {
    let name = &tensor.name;
    match &tensor.data {
        TensorData::Raw(raw) => {
            // Safe construction (the workspace forbids `unsafe`): an aligned, zeroed buffer,
            // then one byte copy. The copy also takes care of request bytes that are not aligned
            // for the element type, which is the common case for slices of a request body.
            let mut t = TractTensor::zero_dt(datum, dims).map_err(|e| tract_internal(name, &e))?;
            let mut view = t.try_as_plain_ram_mut().map_err(|e| tract_internal(name, &e))?;
            let dst = view.as_bytes_mut();
            if dst.len() != raw.len() {
                return Err(invalid_input(format!(
                    "input '{name}' has {} bytes but shape {dims:?} needs {}",
                    raw.len(),
                    dst.len()
                )));
            }
            dst.copy_from_slice(raw);
            // Checked on tract's own copy, after copying and before anything reads it as `bool`
            // (where any byte but 0 or 1 is undefined behaviour): what is checked is what tract
            // runs on, even if the source bytes could change (they cannot today: shared-memory
            // BOOL inputs are copied, see oxserve_shm::may_stay_a_view).
            if datum == DatumType::Bool {
                check_bools(name, dst).map_err(|e| invalid_input(e.message().to_string()))?;
            }
            Ok(t.into())
        }
        TensorData::Strings(items) => {
            if datum != DatumType::String {
                return Err(invalid_input(format!(
                    "input '{name}' holds byte strings but the model expects {datum:?}"
                )));
            }
            let strings = items
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    std::str::from_utf8(b).map(str::to_owned).map_err(|_| {
                        invalid_input(format!(
                            "input '{name}': BYTES element {i} is not valid UTF-8, which this \
                             model (run by tract) needs"
                        ))
                    })
                })
                .collect::<Result<Vec<String>, _>>()?;
            let array = ArrayD::from_shape_vec(IxDyn(dims), strings).map_err(|e| {
                invalid_input(format!(
                    "input '{name}': {} strings do not fit shape {dims:?}: {e}",
                    items.len()
                ))
            })?;
            Ok(array.into_tensor().into())
        }
    }
}

/// Turns a tract output into an oxserve tensor of type `dtype`, taking over tract's buffer
/// when tract no longer shares it.
pub(crate) fn from_tract(name: &str, dtype: DataType, value: TValue) -> Result<Tensor, BackendError> {
    let shape = value
        .shape()
        .iter()
        .map(|&d| i64::try_from(d))
        .collect::<Result<Vec<i64>, _>>()
        .map_err(|_| internal(format!("output '{name}' has a dimension beyond i64")))?;
    let expected = datum_type(dtype)
        .ok_or_else(|| internal(format!("output '{name}': tract cannot produce {dtype}")))?;
    let actual = value.datum_type();
    if actual == DatumType::String {
        if expected != DatumType::String {
            return Err(mismatch(name, dtype, actual));
        }
        let view = value.try_as_plain_ram().map_err(|e| tract_internal(name, &e))?;
        let items = view
            .as_slice::<String>()
            .map_err(|e| tract_internal(name, &e))?
            .iter()
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect();
        return Ok(Tensor::new(name, dtype, shape, TensorData::Strings(items)));
    }
    let tensor = if actual == expected {
        value.into_tensor()
    } else if output_compatible(actual, expected) {
        value
            .cast_to_dt(expected)
            .map_err(|e| tract_internal(name, &e))?
            .into_owned()
    } else {
        return Err(mismatch(name, dtype, actual));
    };
    let expected_len = tensor.len() * expected.size_of();
    let blob = tensor.into_blob().map_err(|e| tract_internal(name, &e))?;
    if blob.len() < expected_len {
        return Err(internal(format!(
            "output '{name}': tract returned a short buffer"
        )));
    }
    // Hand tract's (aligned) allocation to `Bytes` instead of copying it.
    let raw = Bytes::from_owner(OwnedBlob(blob)).slice(..expected_len);
    Ok(Tensor::new(name, dtype, shape, TensorData::Raw(raw)))
}

/// Lets `Bytes` own a tract buffer.
struct OwnedBlob(Blob);

impl AsRef<[u8]> for OwnedBlob {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

fn mismatch(name: &str, dtype: DataType, actual: DatumType) -> BackendError {
    internal(format!(
        "output '{name}': tract produced {actual:?} where the model declares {dtype}"
    ))
}

fn tract_internal(name: &str, e: &tract_onnx::prelude::TractError) -> BackendError {
    internal(format!("tensor '{name}': {}", crate::error::summarize(e)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn round_trip(dtype: DataType, shape: Vec<i64>, raw: Vec<u8>) -> Tensor {
        let t = Tensor::from_raw("x", dtype, shape.clone(), raw);
        let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        let datum = datum_type(dtype).unwrap();
        let v = to_tract(&t, datum, &dims).unwrap();
        from_tract("x", dtype, v).unwrap()
    }

    #[test]
    fn raw_types_round_trip_bit_exact() {
        for dtype in DataType::ALL {
            let (Some(size), Some(_)) = (dtype.size(), datum_type(dtype)) else {
                continue;
            };
            let count = 6;
            let raw: Vec<u8> = if dtype == DataType::Bool {
                vec![0, 1, 1, 0, 1, 0]
            } else {
                (0..count * size).map(|i| (i * 37 % 251) as u8).collect()
            };
            let back = round_trip(dtype, vec![2, 3], raw.clone());
            assert_eq!(back.shape, vec![2, 3], "{dtype}");
            assert_eq!(back.raw().map(|b| b.to_vec()), Some(raw), "{dtype}");
        }
    }

    #[test]
    fn unaligned_bytes_are_accepted() {
        let mut buf = vec![0u8; 1];
        for v in [1.5f32, -2.25, 3.0, 1e-3] {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        let raw = Bytes::from(buf).slice(1..);
        let t = Tensor::from_raw("x", DataType::F32, vec![4], raw.clone());
        let v = to_tract(&t, DatumType::F32, &[4]).unwrap();
        assert_eq!(
            v.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap(),
            &[1.5, -2.25, 3.0, 1e-3]
        );
        assert_eq!(from_tract("x", DataType::F32, v).unwrap().raw(), Some(&raw));
    }

    #[test]
    fn empty_tensors_round_trip() {
        let back = round_trip(DataType::F32, vec![0, 4], vec![]);
        assert_eq!(back.shape, vec![0, 4]);
        assert_eq!(back.raw().map(|b| b.len()), Some(0));
    }

    #[test]
    fn bad_bool_and_utf8_are_rejected() {
        let t = Tensor::from_raw("b", DataType::Bool, vec![2], vec![1u8, 2]);
        let err = to_tract(&t, DatumType::Bool, &[2]).unwrap_err();
        assert!(err.message().contains("BOOL element 1 is 2"), "{}", err.message());
        let t = Tensor::new(
            "s",
            DataType::Bytes,
            vec![2],
            TensorData::Strings(vec![Bytes::from_static(b"ok"), Bytes::from_static(b"\xff")]),
        );
        let err = to_tract(&t, DatumType::String, &[2]).unwrap_err();
        assert!(
            err.message().contains("element 1 is not valid UTF-8"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn strings_round_trip() {
        let items = vec![
            Bytes::from_static(b"h\xc3\xa9"),
            Bytes::new(),
            Bytes::from_static(b"x"),
        ];
        let t = Tensor::new(
            "s",
            DataType::Bytes,
            vec![3, 1],
            TensorData::Strings(items.clone()),
        );
        let v = to_tract(&t, DatumType::String, &[3, 1]).unwrap();
        let back = from_tract("s", DataType::Bytes, v).unwrap();
        assert_eq!(back.shape, vec![3, 1]);
        assert_eq!(back.data, TensorData::Strings(items));
    }

    #[test]
    fn tdim_outputs_become_int64() {
        let t = TractTensor::from(tract_onnx::prelude::tract_ndarray::arr1(&[
            tract_onnx::prelude::TDim::from(3i64),
            tract_onnx::prelude::TDim::from(4i64),
        ]));
        let out = from_tract("shape", DataType::I64, t.into()).unwrap();
        let expected: Vec<u8> = [3i64, 4].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(out.raw().map(|b| b.to_vec()), Some(expected));
        assert!(output_compatible(DatumType::TDim, DatumType::I64));
        assert!(!output_compatible(DatumType::F32, DatumType::I64));
    }
}
