//! Conversions between oxserve tensors (little-endian bytes or byte strings) and ONNX Runtime
//! values.
//!
//! Inputs: fixed-size elements are handed to ONNX Runtime as a view of the request's own bytes
//! when they happen to be aligned for the element type, otherwise as a view of the instance's
//! staging copy (see [`Staging`]). BYTES elements may hold any bytes except NUL (ONNX Runtime fills string tensors
//! from C strings).
//!
//! Outputs: fixed-size outputs become `Bytes` that own the ONNX Runtime value, so the buffer
//! is sent without a copy; BYTES outputs are read element by element as raw bytes (not
//! necessarily UTF-8).

use std::fmt::Debug;

use bytemuck::Pod;
use bytes::Bytes;
use half::{bf16, f16};
use ort::session::SessionInputValue;
use ort::value::{DynValue, PrimitiveTensorElementType, Tensor as OrtTensor, TensorRef, Utf8Data, ValueType};
use oxserve_backend::BackendError;
use oxserve_core::{DataType, Tensor, TensorData};

use crate::error::{internal, invalid_input};
use crate::types::{data_type, element_type};

// oxserve's raw tensor data is little-endian and ONNX Runtime's buffers are native-endian.
#[cfg(target_endian = "big")]
compile_error!("oxserve-onnxruntime copies tensor bytes verbatim and needs a little-endian target");

/// Aligned copies of input bytes that arrive misaligned for their element type: raw gRPC
/// contents and binary HTTP payloads sit at whatever offset the client's framing put them.
/// One buffer per input, kept across batches, so a large input is copied once into memory
/// that is already mapped instead of into a fresh allocation whose pages fault in on every
/// request.
#[derive(Default)]
pub(crate) struct Staging {
    buffers: Vec<Vec<u64>>,
}

/// A staging buffer larger than this is released after use rather than kept for the next batch.
const KEEP_STAGING_BYTES: usize = 256 << 20;

impl Staging {
    /// Copies each misaligned fixed-size input; afterwards [`Staging::view`] gives its bytes.
    pub(crate) fn stage(&mut self, inputs: &[Tensor]) {
        self.buffers.resize_with(inputs.len(), Vec::new);
        for (buffer, tensor) in self.buffers.iter_mut().zip(inputs) {
            let size = tensor.datatype.size().unwrap_or(1);
            match tensor.raw() {
                Some(raw) if raw.as_ptr().align_offset(size) != 0 => {
                    // Only a size change touches the whole buffer; the copy overwrites it.
                    buffer.resize(raw.len().div_ceil(8), 0);
                    bytemuck::cast_slice_mut::<u64, u8>(buffer)[..raw.len()].copy_from_slice(raw);
                }
                _ => buffer.clear(),
            }
        }
    }

    /// The staged copy of input `index`, if it needed one.
    fn view(&self, index: usize, len: usize) -> Option<&[u8]> {
        let buffer = self.buffers.get(index).filter(|b| !b.is_empty())?;
        bytemuck::cast_slice::<u64, u8>(buffer).get(..len)
    }

    /// Drops buffers too large to keep around between batches.
    pub(crate) fn trim(&mut self) {
        for buffer in &mut self.buffers {
            if buffer.capacity() * 8 > KEEP_STAGING_BYTES {
                *buffer = Vec::new();
            }
        }
    }
}

/// Builds an ONNX Runtime input from input `index` of the batch, an oxserve tensor whose type,
/// shape and byte length the caller has checked, after [`Staging::stage`] saw the batch.
pub(crate) fn to_ort<'a>(
    tensor: &'a Tensor,
    index: usize,
    staging: &'a Staging,
    shape: Vec<i64>,
) -> Result<SessionInputValue<'a>, BackendError> {
    let name = tensor.name.as_str();
    if let (TensorData::Raw(raw), true) = (&tensor.data, tensor.datatype != DataType::Bool) {
        let bytes = staging.view(index, raw.len()).unwrap_or(raw);
        return numeric_input(name, tensor.datatype, bytes, shape);
    }
    match (&tensor.data, tensor.datatype) {
        (TensorData::Strings(items), DataType::Bytes) => strings_to_ort(name, items, shape),
        (TensorData::Raw(raw), DataType::Bool) => {
            if let Some(pos) = raw.iter().position(|&b| b > 1) {
                return Err(invalid_input(format!(
                    "input '{name}': BOOL element {pos} is {}, not 0 or 1",
                    raw[pos]
                )));
            }
            let values: Vec<bool> = raw.iter().map(|&b| b == 1).collect();
            owned(name, shape, values)
        }
        (TensorData::Raw(_), dt) => Err(invalid_input(format!(
            "input '{name}': {dt} data in the wrong representation"
        ))),
        (TensorData::Strings(_), dt) => Err(invalid_input(format!(
            "input '{name}' holds byte strings but the model expects {dt}"
        ))),
    }
}

/// A fixed-size input as a view of `raw`, which is aligned unless the caller could not stage it.
fn numeric_input<'a>(
    name: &str,
    dt: DataType,
    raw: &'a [u8],
    shape: Vec<i64>,
) -> Result<SessionInputValue<'a>, BackendError> {
    match dt {
        DataType::U8 => numeric::<u8>(name, raw, shape),
        DataType::U16 => numeric::<u16>(name, raw, shape),
        DataType::U32 => numeric::<u32>(name, raw, shape),
        DataType::U64 => numeric::<u64>(name, raw, shape),
        DataType::I8 => numeric::<i8>(name, raw, shape),
        DataType::I16 => numeric::<i16>(name, raw, shape),
        DataType::I32 => numeric::<i32>(name, raw, shape),
        DataType::I64 => numeric::<i64>(name, raw, shape),
        DataType::F16 => numeric::<f16>(name, raw, shape),
        DataType::BF16 => numeric::<bf16>(name, raw, shape),
        DataType::F32 => numeric::<f32>(name, raw, shape),
        DataType::F64 => numeric::<f64>(name, raw, shape),
        DataType::Bool | DataType::Bytes => Err(invalid_input(format!(
            "input '{name}': {dt} data in the wrong representation"
        ))),
    }
}

/// A view of the bytes when aligned, else one copy.
fn numeric<'a, T>(name: &str, raw: &'a [u8], shape: Vec<i64>) -> Result<SessionInputValue<'a>, BackendError>
where
    T: PrimitiveTensorElementType + Pod + Debug + Clone + 'static,
{
    let size = std::mem::size_of::<T>();
    if !raw.len().is_multiple_of(size) {
        return Err(invalid_input(format!(
            "input '{name}' has {} bytes, not a multiple of its element size {size}",
            raw.len()
        )));
    }
    match bytemuck::try_cast_slice::<u8, T>(raw) {
        Ok(view) => TensorRef::from_array_view((shape, view))
            .map(SessionInputValue::from)
            .map_err(|e| value_error(name, &e)),
        Err(_) => owned(name, shape, bytemuck::pod_collect_to_vec::<u8, T>(raw)),
    }
}

fn owned<T>(name: &str, shape: Vec<i64>, values: Vec<T>) -> Result<SessionInputValue<'static>, BackendError>
where
    T: PrimitiveTensorElementType + Debug + Clone + 'static,
{
    let expected = element_count(&shape);
    if expected != Some(values.len()) {
        return Err(invalid_input(format!(
            "input '{name}' has {} elements but shape {shape:?} needs {}",
            values.len(),
            expected.map_or("too many".to_string(), |n| n.to_string())
        )));
    }
    OrtTensor::from_array((shape, values))
        .map(SessionInputValue::from)
        .map_err(|e| value_error(name, &e))
}

fn element_count(shape: &[i64]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
}

/// A BYTES element as ONNX Runtime's string input wants it: any bytes but NUL (despite the
/// trait's name, ONNX strings are byte strings).
#[derive(Clone)]
struct RawString(Bytes);

impl Utf8Data for RawString {
    fn as_utf8_bytes(&self) -> &[u8] {
        &self.0
    }
}

fn strings_to_ort<'a>(
    name: &str,
    items: &'a [Bytes],
    shape: Vec<i64>,
) -> Result<SessionInputValue<'a>, BackendError> {
    if let Some((i, _)) = items.iter().enumerate().find(|(_, s)| s.contains(&0)) {
        return Err(invalid_input(format!(
            "input '{name}': BYTES element {i} contains a NUL byte, which ONNX Runtime strings cannot hold"
        )));
    }
    if element_count(&shape) != Some(items.len()) {
        return Err(invalid_input(format!(
            "input '{name}' has {} elements but shape {shape:?} needs another count",
            items.len()
        )));
    }
    let raw: Vec<RawString> = items.iter().cloned().map(RawString).collect();
    OrtTensor::from_string_array((shape, raw.as_slice()))
        .map(SessionInputValue::from)
        .map_err(|e| value_error(name, &e))
}

fn value_error(name: &str, e: &ort::Error) -> BackendError {
    invalid_input(format!(
        "input '{name}': ONNX Runtime rejected the tensor: {}",
        e.message()
    ))
}

/// Turns an ONNX Runtime output into an oxserve tensor of type `dtype`.
pub(crate) fn from_ort(name: &str, dtype: DataType, value: DynValue) -> Result<Tensor, BackendError> {
    let (ty, shape) = match value.dtype() {
        ValueType::Tensor { ty, shape, .. } => (*ty, shape.to_vec()),
        other => {
            return Err(internal(format!("output '{name}' is a {other}, not a tensor")));
        }
    };
    if ty != element_type(dtype) {
        return Err(internal(format!(
            "output '{name}': ONNX Runtime produced {} where the model declares {dtype}",
            data_type(ty).map_or_else(|| ty.to_string(), |d| d.to_string())
        )));
    }
    if shape.iter().any(|&d| d < 0) {
        return Err(internal(format!(
            "output '{name}' has an unknown dimension in {shape:?}"
        )));
    }
    if dtype == DataType::Bytes {
        let items = raw_strings::extract(&value, element_count(&shape).unwrap_or(0))
            .map_err(|e| internal(format!("output '{name}': {e}")))?;
        return Ok(Tensor::new(name, dtype, shape, TensorData::Strings(items)));
    }
    let expected = element_count(&shape)
        .and_then(|n| n.checked_mul(dtype.size().unwrap_or(0)))
        .ok_or_else(|| internal(format!("output '{name}' is too large")))?;
    let len = output_bytes(&value, dtype)
        .map_err(|e| internal(format!("output '{name}': {}", e.message())))?
        .len();
    if len != expected {
        return Err(internal(format!(
            "output '{name}': ONNX Runtime returned {len} bytes for shape {shape:?}, expected {expected}"
        )));
    }
    // Hand ONNX Runtime's buffer to `Bytes` instead of copying it.
    let raw = Bytes::from_owner(OutputBuffer { value, dtype });
    Ok(Tensor::new(name, dtype, shape, TensorData::Raw(raw)))
}

/// The bytes of a fixed-size output, through the typed (safe) accessor of its element type.
fn output_bytes(value: &DynValue, dtype: DataType) -> Result<&[u8], ort::Error> {
    fn bytes_of<T: PrimitiveTensorElementType + Pod>(value: &DynValue) -> Result<&[u8], ort::Error> {
        value
            .try_extract_tensor::<T>()
            .map(|(_, data)| bytemuck::cast_slice(data))
    }
    match dtype {
        DataType::Bool => value
            .try_extract_tensor::<bool>()
            .map(|(_, data)| bytemuck::cast_slice::<bool, u8>(data)),
        DataType::U8 => bytes_of::<u8>(value),
        DataType::U16 => bytes_of::<u16>(value),
        DataType::U32 => bytes_of::<u32>(value),
        DataType::U64 => bytes_of::<u64>(value),
        DataType::I8 => bytes_of::<i8>(value),
        DataType::I16 => bytes_of::<i16>(value),
        DataType::I32 => bytes_of::<i32>(value),
        DataType::I64 => bytes_of::<i64>(value),
        DataType::F16 => bytes_of::<f16>(value),
        DataType::BF16 => bytes_of::<bf16>(value),
        DataType::F32 => bytes_of::<f32>(value),
        DataType::F64 => bytes_of::<f64>(value),
        DataType::Bytes => Err(ort::Error::new("BYTES outputs have no fixed-size buffer")),
    }
}

/// Lets `Bytes` own an ONNX Runtime output value.
struct OutputBuffer {
    value: DynValue,
    dtype: DataType,
}

impl AsRef<[u8]> for OutputBuffer {
    fn as_ref(&self) -> &[u8] {
        // Checked by `from_ort` before the buffer is built; an empty slice is unreachable.
        output_bytes(&self.value, self.dtype).unwrap_or(&[])
    }
}

/// Reading string outputs as raw bytes. `ort`'s own accessor insists on UTF-8, but ONNX
/// strings are byte strings, so this goes through the C API directly.
#[allow(unsafe_code)]
mod raw_strings {
    use bytes::Bytes;
    use ort::AsPointer;
    use ort::value::DynValue;

    /// Turns an `OrtStatus` into a `Result`, releasing the status.
    fn check(status: ort::sys::OrtStatusPtr) -> Result<(), String> {
        // SAFETY: `status` was just returned by an ONNX Runtime API call; `result_from_status`
        // takes ownership and releases it.
        unsafe { ort::Error::result_from_status(status) }.map_err(|e| e.message().to_string())
    }

    /// The `count` elements of a string tensor.
    pub(super) fn extract(value: &DynValue, count: usize) -> Result<Vec<Bytes>, String> {
        let api = ort::api();
        let ptr = value.ptr();
        let mut total = 0usize;
        // SAFETY: `ptr` is a live string tensor value (the caller checked its element type) owned
        // by `value` for the whole call; `total` is a valid out-pointer.
        check(unsafe { (api.GetStringTensorDataLength)(ptr, &mut total) })?;
        let mut content = vec![0u8; total];
        let mut offsets = vec![0usize; count];
        if count > 0 {
            // SAFETY: `content` has exactly `total` writable bytes and `offsets` exactly `count`
            // slots, the sizes passed; ONNX Runtime writes no more than it is told.
            check(unsafe {
                (api.GetStringTensorContent)(
                    ptr,
                    content.as_mut_ptr().cast(),
                    total,
                    offsets.as_mut_ptr(),
                    count,
                )
            })?;
        }
        let content = Bytes::from(content);
        let mut items = Vec::with_capacity(count);
        for (i, &start) in offsets.iter().enumerate() {
            let end = offsets.get(i + 1).copied().unwrap_or(total);
            if start > end || end > total {
                return Err(format!("string element {i} has invalid offsets {start}..{end}"));
            }
            items.push(content.slice(start..end));
        }
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_counts() {
        assert_eq!(element_count(&[2, 3]), Some(6));
        assert_eq!(element_count(&[]), Some(1));
        assert_eq!(element_count(&[0, 5]), Some(0));
        assert_eq!(element_count(&[-1, 5]), None);
        assert_eq!(element_count(&[i64::MAX, i64::MAX]), None);
    }
}
