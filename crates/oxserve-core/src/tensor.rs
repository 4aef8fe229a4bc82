use bytes::Bytes;

use crate::{DataType, Error, Result};

/// Tensor contents, kept as the wire delivered them where possible so adapters can hand slices
/// of a request body to the engine without copying element by element.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    /// Fixed-size elements: little-endian, row-major, no padding.
    Raw(Bytes),
    /// BYTES elements, one entry per element, row-major.
    Strings(Vec<Bytes>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
    pub data: TensorData,
}

/// Number of elements of a shape; rejects negative dimensions and products that overflow.
pub fn element_count(shape: &[i64]) -> Result<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        let d = usize::try_from(d)
            .map_err(|_| Error::invalid(format!("shape {shape:?} has a negative dimension")))?;
        acc.checked_mul(d)
            .ok_or_else(|| Error::invalid(format!("shape {shape:?} has too many elements")))
    })
}

/// An error naming the first byte of a BOOL tensor that is neither 0 nor 1.
pub fn check_bools(name: &str, raw: &[u8]) -> Result<()> {
    match raw.iter().position(|&b| b > 1) {
        None => Ok(()),
        Some(pos) => Err(Error::invalid(format!(
            "input '{name}': BOOL element {pos} is {}, not 0 or 1",
            raw[pos]
        ))),
    }
}

impl Tensor {
    pub fn new(name: impl Into<String>, datatype: DataType, shape: Vec<i64>, data: TensorData) -> Self {
        Tensor {
            name: name.into(),
            datatype,
            shape,
            data,
        }
    }

    /// A tensor of fixed-size elements from their little-endian bytes.
    pub fn from_raw(
        name: impl Into<String>,
        datatype: DataType,
        shape: Vec<i64>,
        raw: impl Into<Bytes>,
    ) -> Self {
        Self::new(name, datatype, shape, TensorData::Raw(raw.into()))
    }

    pub fn element_count(&self) -> Result<usize> {
        element_count(&self.shape)
    }

    /// Checks that the contents hold exactly as many elements as the shape says, in the
    /// representation the data type needs, and that every BOOL byte is 0 or 1 (an engine
    /// written in Rust holds them as `bool`, where any other byte is undefined behaviour).
    /// Meaningful only on bytes the client can no longer change: a shared-memory input of any
    /// type but floating point is a private copy for this reason.
    pub fn check_consistent(&self) -> Result<()> {
        let count = self.element_count()?;
        match (&self.data, self.datatype.size()) {
            (TensorData::Raw(raw), Some(size)) => {
                let expected = count
                    .checked_mul(size)
                    .ok_or_else(|| Error::invalid(format!("input '{}' is too large", self.name)))?;
                if raw.len() != expected {
                    return Err(Error::invalid(format!(
                        "input '{}' has {} bytes of {} data but shape {:?} needs {}",
                        self.name,
                        raw.len(),
                        self.datatype,
                        self.shape,
                        expected
                    )));
                }
                if self.datatype == DataType::Bool {
                    check_bools(&self.name, raw)?;
                }
            }
            (TensorData::Strings(items), None) => {
                if items.len() != count {
                    return Err(Error::invalid(format!(
                        "input '{}' has {} elements but shape {:?} needs {}",
                        self.name,
                        items.len(),
                        self.shape,
                        count
                    )));
                }
            }
            (TensorData::Raw(_), None) => {
                return Err(Error::invalid(format!(
                    "input '{}': BYTES data must be a list of byte strings",
                    self.name
                )));
            }
            (TensorData::Strings(_), Some(_)) => {
                return Err(Error::invalid(format!(
                    "input '{}': {} data cannot be byte strings",
                    self.name, self.datatype
                )));
            }
        }
        Ok(())
    }

    /// The raw bytes of a fixed-size tensor.
    pub fn raw(&self) -> Option<&Bytes> {
        match &self.data {
            TensorData::Raw(b) => Some(b),
            TensorData::Strings(_) => None,
        }
    }

    /// The length of [`Tensor::to_wire_bytes`], without encoding anything.
    pub fn wire_len(&self) -> usize {
        match &self.data {
            TensorData::Raw(raw) => raw.len(),
            TensorData::Strings(items) => items.iter().map(|s| s.len() + 4).sum(),
        }
    }

    /// Encodes BYTES elements as Triton's binary form: each element a 4-byte little-endian
    /// length followed by its bytes. Fixed-size tensors return their raw bytes.
    pub fn to_wire_bytes(&self) -> Bytes {
        match &self.data {
            TensorData::Raw(b) => b.clone(),
            TensorData::Strings(items) => {
                let total: usize = items.iter().map(|s| s.len() + 4).sum();
                let mut out = Vec::with_capacity(total);
                for s in items {
                    // A single element larger than 4 GiB cannot come from a request body within
                    // any sane limit; clamp rather than panic.
                    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
                    out.extend_from_slice(&len.to_le_bytes());
                    out.extend_from_slice(s);
                }
                Bytes::from(out)
            }
        }
    }

    /// Decodes Triton's length-prefixed binary BYTES form into elements, at most `at_most` of
    /// them (an input's shape bounds what a body may make the server hold).
    pub fn strings_from_wire(name: &str, raw: &Bytes, at_most: usize) -> Result<Vec<Bytes>> {
        let mut items = Vec::with_capacity(at_most.min(raw.len() / 4));
        let mut pos = 0usize;
        while pos < raw.len() {
            if items.len() == at_most {
                return Err(Error::invalid(format!(
                    "input '{name}' has more BYTES elements than its shape holds ({at_most})"
                )));
            }
            let Some(prefix) = raw.get(pos..pos + 4) else {
                return Err(Error::invalid(format!(
                    "input '{name}': BYTES element at offset {pos} has a truncated length prefix"
                )));
            };
            let len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
            let start = pos + 4;
            let end = start
                .checked_add(len)
                .filter(|&e| e <= raw.len())
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "input '{name}': BYTES element at offset {pos} claims {len} bytes but only {} remain",
                        raw.len() - start
                    ))
                })?;
            items.push(raw.slice(start..end));
            pos = end;
        }
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn element_count_rejects_negative_and_overflow() {
        assert_eq!(element_count(&[2, 3]).ok(), Some(6));
        assert_eq!(element_count(&[]).ok(), Some(1));
        assert!(element_count(&[2, -1]).is_err());
        assert!(element_count(&[i64::MAX, i64::MAX, 4]).is_err());
    }

    #[test]
    fn consistency_checks_byte_length() {
        let t = Tensor::from_raw("x", DataType::F32, vec![2], vec![0u8; 8]);
        assert!(t.check_consistent().is_ok());
        let t = Tensor::from_raw("x", DataType::F32, vec![3], vec![0u8; 8]);
        assert!(t.check_consistent().is_err());
        let t = Tensor::new(
            "s",
            DataType::Bytes,
            vec![2],
            TensorData::Strings(vec![Bytes::from_static(b"a")]),
        );
        assert!(t.check_consistent().is_err());
    }

    #[test]
    fn bool_bytes_other_than_0_or_1_are_rejected() {
        let t = Tensor::from_raw("b", DataType::Bool, vec![3], vec![0u8, 1, 0]);
        assert!(t.check_consistent().is_ok());
        let t = Tensor::from_raw("b", DataType::Bool, vec![3], vec![0u8, 1, 2]);
        let e = t.check_consistent().unwrap_err();
        assert_eq!(e.message(), "input 'b': BOOL element 2 is 2, not 0 or 1");
        // The same bytes as UINT8 are fine.
        let t = Tensor::from_raw("u", DataType::U8, vec![3], vec![0u8, 1, 255]);
        assert!(t.check_consistent().is_ok());
    }

    #[test]
    fn bytes_wire_round_trip_and_truncation() {
        let items = vec![
            Bytes::from_static(b"hello"),
            Bytes::new(),
            Bytes::from_static(b"\xff\x00"),
        ];
        let t = Tensor::new("s", DataType::Bytes, vec![3], TensorData::Strings(items.clone()));
        let wire = t.to_wire_bytes();
        assert_eq!(
            Tensor::strings_from_wire("s", &wire, usize::MAX).ok(),
            Some(items)
        );
        // Length prefix claims more than remains.
        let bad = Bytes::from_static(&[10, 0, 0, 0, b'a']);
        assert!(Tensor::strings_from_wire("s", &bad, usize::MAX).is_err());
        // Truncated prefix.
        let bad = Bytes::from_static(&[1, 0]);
        assert!(Tensor::strings_from_wire("s", &bad, usize::MAX).is_err());
    }
}
