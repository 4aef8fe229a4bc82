//! Decoding a JSON `data` array (nested or flat) straight into the typed little-endian buffer
//! the engine takes, and encoding output tensors back to JSON, without `serde_json::Value`.

use std::fmt;

use bytes::Bytes;
use half::{bf16, f16};
use oxserve_core::{DataType, Error, Result, Tensor, TensorData};
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde_json::value::RawValue;

enum Sink {
    Raw(Vec<u8>),
    Strings(Vec<Bytes>),
}

struct Flatten<'s> {
    datatype: DataType,
    sink: &'s mut Sink,
    /// Most bytes (fixed-size types) or elements (BYTES) the shape holds: decoding stops
    /// there, so a short shape cannot make the server hold a long array.
    cap: usize,
}

fn too_many<E: de::Error>() -> E {
    E::custom("the data has more values than its shape holds")
}

impl Flatten<'_> {
    fn push_raw<E: de::Error>(&mut self, bytes: &[u8]) -> Result<(), E> {
        if let Sink::Raw(v) = self.sink {
            if v.len() + bytes.len() > self.cap {
                return Err(too_many());
            }
            v.extend_from_slice(bytes);
        }
        Ok(())
    }

    fn number<E: de::Error>(&mut self, n: Number) -> Result<(), E> {
        macro_rules! int {
            ($ty:ty) => {{
                let v: $ty = match n {
                    Number::I(i) => <$ty>::try_from(i).ok(),
                    Number::U(u) => <$ty>::try_from(u).ok(),
                    Number::F(_) => None,
                }
                .ok_or_else(|| E::custom(format_args!("{} is not a valid {} value", n, self.datatype)))?;
                self.push_raw(&v.to_le_bytes())?;
            }};
        }
        match self.datatype {
            DataType::U8 => int!(u8),
            DataType::U16 => int!(u16),
            DataType::U32 => int!(u32),
            DataType::U64 => int!(u64),
            DataType::I8 => int!(i8),
            DataType::I16 => int!(i16),
            DataType::I32 => int!(i32),
            DataType::I64 => int!(i64),
            DataType::F32 => self.push_raw(&(n.as_f64() as f32).to_le_bytes())?,
            DataType::F64 => self.push_raw(&n.as_f64().to_le_bytes())?,
            DataType::Bool => {
                return Err(E::custom(format_args!(
                    "BOOL data must be true or false, not {n}"
                )));
            }
            DataType::Bytes => return Err(E::custom("BYTES data must be strings")),
            DataType::F16 | DataType::BF16 => return Err(half_in_json()),
        }
        Ok(())
    }
}

fn half_in_json<E: de::Error>() -> E {
    E::custom("FP16 and BF16 data cannot be sent as JSON; use the binary tensor data extension")
}

#[derive(Clone, Copy)]
enum Number {
    I(i64),
    U(u64),
    F(f64),
}

impl Number {
    fn as_f64(self) -> f64 {
        match self {
            Number::I(i) => i as f64,
            Number::U(u) => u as f64,
            Number::F(f) => f,
        }
    }
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Number::I(i) => write!(f, "{i}"),
            Number::U(u) => write!(f, "{u}"),
            Number::F(x) => write!(f, "{x}"),
        }
    }
}

impl<'de> DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an array of {} values", self.datatype)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let datatype = self.datatype;
        let cap = self.cap;
        let sink = self.sink;
        while seq
            .next_element_seed(Flatten {
                datatype,
                sink: &mut *sink,
                cap,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_bool<E: de::Error>(mut self, v: bool) -> Result<(), E> {
        if self.datatype != DataType::Bool {
            return Err(E::custom(format_args!(
                "{v} is not a valid {} value",
                self.datatype
            )));
        }
        self.push_raw(&[u8::from(v)])
    }

    fn visit_i64<E: de::Error>(mut self, v: i64) -> Result<(), E> {
        self.number(Number::I(v))
    }

    fn visit_u64<E: de::Error>(mut self, v: u64) -> Result<(), E> {
        self.number(Number::U(v))
    }

    fn visit_f64<E: de::Error>(mut self, v: f64) -> Result<(), E> {
        self.number(Number::F(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        match self.sink {
            Sink::Strings(items) => {
                if items.len() >= self.cap {
                    return Err(too_many());
                }
                items.push(Bytes::copy_from_slice(v.as_bytes()));
                Ok(())
            }
            Sink::Raw(_) if matches!(self.datatype, DataType::F16 | DataType::BF16) => Err(half_in_json()),
            Sink::Raw(_) => Err(E::custom(format_args!(
                "a string is not a valid {} value",
                self.datatype
            ))),
        }
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(format_args!(
            "null is not a valid {} value",
            self.datatype
        )))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _map: A) -> Result<(), A::Error> {
        Err(de::Error::custom(format_args!(
            "an object is not a valid {} value",
            self.datatype
        )))
    }
}

/// Parses an input's JSON `data` for `datatype`, expecting `elements` values.
pub fn decode_data(name: &str, datatype: DataType, elements: usize, data: &RawValue) -> Result<TensorData> {
    // Never trust the shape for the allocation size: the JSON text bounds the real count.
    let hint = elements.min(data.get().len());
    let (mut sink, cap) = match datatype.size() {
        Some(size) => (
            Sink::Raw(Vec::with_capacity(hint.saturating_mul(size))),
            elements.saturating_mul(size),
        ),
        None => (Sink::Strings(Vec::with_capacity(hint)), elements),
    };
    let mut de = serde_json::Deserializer::from_str(data.get());
    Flatten {
        datatype,
        sink: &mut sink,
        cap,
    }
    .deserialize(&mut de)
    .map_err(|e| Error::invalid(format!("input '{name}': {}", strip_position(&e))))?;
    Ok(match sink {
        Sink::Raw(v) => TensorData::Raw(Bytes::from(v)),
        Sink::Strings(v) => TensorData::Strings(v),
    })
}

/// serde_json appends "at line 1 column N" of the sub-document, which only confuses.
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    if s.starts_with("recursion limit exceeded") {
        // serde_json stops at 128 levels of nesting, before the stack is at risk.
        return "the JSON is nested deeper than 128 levels (recursion limit exceeded)".to_string();
    }
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Serializes an output tensor's values as a flat JSON array.
pub struct JsonData<'a>(pub &'a Tensor);

impl serde::Serialize for JsonData<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let tensor = self.0;
        let raw = match &tensor.data {
            TensorData::Strings(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    let text = std::str::from_utf8(item).map_err(|_| {
                        serde::ser::Error::custom(format_args!(
                            "output '{}' holds bytes that are not UTF-8; request it with binary_data",
                            tensor.name
                        ))
                    })?;
                    seq.serialize_element(text)?;
                }
                return seq.end();
            }
            TensorData::Raw(raw) => raw,
        };
        macro_rules! seq_of {
            ($ty:ty, $n:expr, $map:expr) => {{
                let mut seq = s.serialize_seq(Some(raw.len() / $n))?;
                for c in raw.chunks_exact($n) {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    seq.serialize_element(&$map(<$ty>::from_le_bytes(a)))?;
                }
                seq.end()
            }};
        }
        match tensor.datatype {
            DataType::Bool => {
                let mut seq = s.serialize_seq(Some(raw.len()))?;
                for &b in raw.iter() {
                    seq.serialize_element(&(b != 0))?;
                }
                seq.end()
            }
            DataType::U8 => seq_of!(u8, 1, |v| v),
            DataType::U16 => seq_of!(u16, 2, |v| v),
            DataType::U32 => seq_of!(u32, 4, |v| v),
            DataType::U64 => seq_of!(u64, 8, |v| v),
            DataType::I8 => seq_of!(i8, 1, |v| v),
            DataType::I16 => seq_of!(i16, 2, |v| v),
            DataType::I32 => seq_of!(i32, 4, |v| v),
            DataType::I64 => seq_of!(i64, 8, |v| v),
            // Half floats have no JSON form in the protocol; widening keeps the exact value.
            DataType::F16 => seq_of!(f16, 2, f32::from),
            DataType::BF16 => seq_of!(bf16, 2, f32::from),
            DataType::F32 => seq_of!(f32, 4, |v| v),
            DataType::F64 => seq_of!(f64, 8, |v| v),
            DataType::Bytes => Err(serde::ser::Error::custom("BYTES tensor without strings")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    fn decode(dt: DataType, n: usize, s: &str) -> Result<TensorData> {
        decode_data("x", dt, n, &raw(s))
    }

    fn le<T: Copy>(values: &[T], f: impl Fn(T) -> Vec<u8>) -> TensorData {
        TensorData::Raw(Bytes::from(
            values.iter().flat_map(|&v| f(v)).collect::<Vec<u8>>(),
        ))
    }

    #[test]
    fn every_fixed_size_dtype_nested_or_flat() {
        assert_eq!(
            decode(DataType::F32, 4, "[[1, 2.5], [-3, 4e2]]").unwrap(),
            le(&[1f32, 2.5, -3.0, 400.0], |v| v.to_le_bytes().to_vec())
        );
        assert_eq!(
            decode(DataType::F64, 2, "[0.1, 2]").unwrap(),
            le(&[0.1f64, 2.0], |v| v.to_le_bytes().to_vec())
        );
        assert_eq!(
            decode(DataType::I8, 2, "[-128, 127]").unwrap(),
            le(&[-128i8, 127], |v| v.to_le_bytes().to_vec())
        );
        assert_eq!(
            decode(DataType::I16, 1, "[-300]").unwrap(),
            le(&[-300i16], |v| v.to_le_bytes().to_vec())
        );
        assert_eq!(
            decode(DataType::I32, 2, "[[1],[2]]").unwrap(),
            le(&[1i32, 2], |v| v.to_le_bytes().to_vec())
        );
        assert_eq!(
            decode(DataType::I64, 1, "[-9007199254740993]").unwrap(),
            le(&[-9007199254740993i64], |v| v.to_le_bytes().to_vec())
        );
        assert_eq!(
            decode(DataType::U8, 1, "[255]").unwrap(),
            le(&[255u8], |v| vec![v])
        );
        assert_eq!(
            decode(DataType::U16, 1, "[65535]").unwrap(),
            le(&[65535u16], |v| v.to_le_bytes().to_vec())
        );
        assert_eq!(
            decode(DataType::U32, 1, "[4294967295]").unwrap(),
            le(&[u32::MAX], |v| v.to_le_bytes().to_vec())
        );
        assert_eq!(
            decode(DataType::U64, 1, "[18446744073709551615]").unwrap(),
            le(&[u64::MAX], |v| v.to_le_bytes().to_vec())
        );
        assert_eq!(
            decode(DataType::Bool, 3, "[true, false, true]").unwrap(),
            TensorData::Raw(Bytes::from_static(&[1, 0, 1]))
        );
    }

    #[test]
    fn bytes_are_strings() {
        let d = decode(DataType::Bytes, 3, r#"["a", "", "héllo"]"#).unwrap();
        assert_eq!(
            d,
            TensorData::Strings(vec![Bytes::from_static(b"a"), Bytes::new(), Bytes::from("héllo")])
        );
    }

    #[test]
    fn wrong_values_are_clear_errors() {
        let msg = |dt, s| decode(dt, 1, s).unwrap_err().message().to_string();
        assert!(msg(DataType::I8, "[300]").contains("300 is not a valid INT8"));
        assert!(msg(DataType::U8, "[-1]").contains("not a valid UINT8"));
        assert!(msg(DataType::I32, "[1.5]").contains("not a valid INT32"));
        assert!(msg(DataType::F32, r#"["x"]"#).contains("string is not a valid FP32"));
        assert!(msg(DataType::Bytes, "[1]").contains("BYTES data must be strings"));
        assert!(msg(DataType::F16, "[1.0]").contains("binary tensor data"));
        assert!(msg(DataType::Bool, "[1]").contains("true or false"));
        assert!(msg(DataType::F32, "[null]").contains("null"));
        assert!(msg(DataType::F32, r#"[{"a":1}]"#).contains("object"));
    }

    #[test]
    fn decoding_stops_at_the_shape() {
        let msg = |dt, n, s| decode(dt, n, s).unwrap_err().message().to_string();
        assert!(msg(DataType::F32, 2, "[1, 2, 3]").contains("more values than its shape holds"));
        assert!(msg(DataType::Bytes, 1, r#"["a", "b"]"#).contains("more values than its shape holds"));
        assert!(msg(DataType::Bool, 0, "[true]").contains("more values"));
        assert!(decode(DataType::I64, 2, "[[1], [2]]").is_ok());
    }

    #[test]
    fn outputs_encode_as_flat_json() {
        let t = Tensor::from_raw(
            "o",
            DataType::F32,
            vec![2],
            [1.5f32, -0.1]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        assert_eq!(serde_json::to_string(&JsonData(&t)).unwrap(), "[1.5,-0.1]");
        let t = Tensor::from_raw("o", DataType::Bool, vec![2], vec![1u8, 0]);
        assert_eq!(serde_json::to_string(&JsonData(&t)).unwrap(), "[true,false]");
        let t = Tensor::from_raw(
            "o",
            DataType::F16,
            vec![1],
            f16::from_f32(0.5).to_le_bytes().to_vec(),
        );
        assert_eq!(serde_json::to_string(&JsonData(&t)).unwrap(), "[0.5]");
        let t = Tensor::new(
            "o",
            DataType::Bytes,
            vec![1],
            TensorData::Strings(vec![Bytes::from_static(b"\xff")]),
        );
        assert!(serde_json::to_string(&JsonData(&t)).is_err());
    }
}
