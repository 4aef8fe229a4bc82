//! TF Serving's JSON tensor formats: the request's row (`instances`) and columnar (`inputs`)
//! forms typed by the signature, and the `predictions` / `outputs` responses.
//!
//! As TF Serving: binary strings travel as `{"b64": "..."}`; string outputs whose key ends in
//! `_bytes` are sent base64-encoded that way; `NaN`, `Infinity` and `-Infinity` are accepted and
//! written as bare literals (not valid JSON, but what TF Serving's clients parse).

use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use half::{bf16, f16};
use oxserve_core::{DataType, Error, Result, Tensor, TensorData, element_count};
use serde_json::Value;

use crate::spec::{SigTensor, Signature};

/// Which request format a predict used; the response answers in the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Row,
    Columnar,
}

/// Bare `NaN` / `Infinity` / `-Infinity` outside strings become these strings, so the rest
/// can be parsed as JSON; they are numbers again when typed for a float tensor.
const NAN: &str = "\u{0}NaN";
const INF: &str = "\u{0}Infinity";
const NEG_INF: &str = "\u{0}-Infinity";

/// Rewrites TF Serving's non-standard float literals into marker strings.
pub(crate) fn quote_float_literals(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("NaN") && !text.contains("Infinity") {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    let bytes = text.as_bytes();
    let (mut i, mut in_string, mut escaped) = (0, false, false);
    while i < bytes.len() {
        let c = bytes[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_string = false;
            }
        } else if c == b'"' {
            in_string = true;
        } else {
            let rest = &text[i..];
            let found = [("-Infinity", NEG_INF), ("Infinity", INF), ("NaN", NAN)]
                .into_iter()
                .find(|(literal, _)| rest.starts_with(literal));
            if let Some((literal, marker)) = found {
                out.push('"');
                out.push_str(&marker.replace('\u{0}', "\\u0000"));
                out.push('"');
                i += literal.len();
                continue;
            }
        }
        // Copy one UTF-8 character.
        let len = utf8_len(c);
        out.push_str(&text[i..i + len]);
        i += len;
    }
    std::borrow::Cow::Owned(out)
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

/// Parses a request body (NaN and Infinity allowed) into a JSON object.
pub fn parse_body(body: &[u8]) -> Result<serde_json::Map<String, Value>> {
    let text =
        std::str::from_utf8(body).map_err(|_| Error::invalid("JSON Parse error: the body is not UTF-8"))?;
    let text = quote_float_literals(text);
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::invalid("JSON Parse error: the body is not a JSON object")),
        Err(e) => Err(Error::invalid(format!("JSON Parse error: {e}"))),
    }
}

/// The `signature_name` of a request body (empty when absent).
pub fn signature_name(body: &serde_json::Map<String, Value>) -> Result<String> {
    match body.get("signature_name") {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(Error::invalid("'signature_name' must be a string")),
    }
}

fn is_b64(v: &Value) -> bool {
    matches!(v, Value::Object(m) if m.len() == 1 && m.contains_key("b64"))
}

pub(crate) fn input_spec<'a>(sig: &'a Signature, key: &str) -> Result<&'a SigTensor> {
    sig.inputs.iter().find(|t| t.key == key).ok_or_else(|| {
        let keys: Vec<&str> = sig.inputs.iter().map(|t| t.key.as_str()).collect();
        Error::invalid(format!(
            "input tensor alias not found in signature: {}. Inputs expected to be in the set {{{}}}.",
            crate::spec::truncate(key),
            keys.join(",")
        ))
    })
}

pub(crate) fn only_input(sig: &Signature) -> Result<&SigTensor> {
    match sig.inputs.as_slice() {
        [one] => Ok(one),
        _ => Err(Error::invalid(format!(
            "the signature has {} inputs: send named inputs (objects keyed by input name)",
            sig.inputs.len()
        ))),
    }
}

pub(crate) fn type_error(spec: &SigTensor, v: &Value) -> Error {
    let shown = crate::spec::truncate(&v.to_string());
    Error::invalid(format!(
        "JSON Value: {shown} Type: {} is not of expected type: {}",
        json_type(v),
        tf_type_name(spec.datatype)
    ))
}

pub(crate) fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "Null",
        Value::Bool(_) => "Bool",
        Value::Number(_) => "Number",
        Value::String(s) if [NAN, INF, NEG_INF].contains(&s.as_str()) => "Number",
        Value::String(_) => "String",
        Value::Array(_) => "Array",
        Value::Object(_) => "Object",
    }
}

pub fn tf_type_name(dt: DataType) -> &'static str {
    match dt {
        DataType::Bool => "bool",
        DataType::U8 => "uint8",
        DataType::U16 => "uint16",
        DataType::U32 => "uint32",
        DataType::U64 => "uint64",
        DataType::I8 => "int8",
        DataType::I16 => "int16",
        DataType::I32 => "int32",
        DataType::I64 => "int64",
        DataType::F16 => "half",
        DataType::BF16 => "bfloat16",
        DataType::F32 => "float",
        DataType::F64 => "double",
        DataType::Bytes => "string",
    }
}

pub(crate) fn float_of(spec: &SigTensor, v: &Value) -> Result<f64> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| type_error(spec, v)),
        Value::String(s) if s == NAN => Ok(f64::NAN),
        Value::String(s) if s == INF => Ok(f64::INFINITY),
        Value::String(s) if s == NEG_INF => Ok(f64::NEG_INFINITY),
        _ => Err(type_error(spec, v)),
    }
}

pub(crate) fn bytes_of(spec: &SigTensor, v: &Value) -> Result<Bytes> {
    match v {
        Value::String(s) if [NAN, INF, NEG_INF].contains(&s.as_str()) => Err(type_error(spec, v)),
        Value::String(s) => Ok(Bytes::copy_from_slice(s.as_bytes())),
        Value::Object(m) if is_b64(v) => match m.get("b64") {
            Some(Value::String(text)) => B64
                .decode(text)
                .map(Bytes::from)
                .map_err(|e| Error::invalid(format!("Unable to base64 decode: {e}"))),
            _ => Err(Error::invalid("'b64' must be a string")),
        },
        _ => Err(type_error(spec, v)),
    }
}

/// A columnar body: `{"<key>": tensor}` for one tensor, `{"<key>": {name: tensor, ...}}` for
/// several (TF Serving's `outputs` answer, and the `inputs` of a columnar request).
pub fn columnar(key: &str, tensors: &[Tensor]) -> Result<String> {
    let mut out = String::with_capacity(256);
    out.push_str("{\n    ");
    write_key(&mut out, key);
    if let [one] = tensors {
        write_tensor(&mut out, one)?;
    } else {
        out.push('{');
        for (i, t) in tensors.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_key(&mut out, &t.name);
            write_tensor(&mut out, t)?;
        }
        out.push('}');
    }
    out.push_str("\n}");
    Ok(out)
}

/// The response body of a predict, in the request's format.
pub fn predict_response(format: Format, outputs: &[Tensor]) -> Result<String> {
    let mut out = String::with_capacity(256);
    match format {
        Format::Columnar => return columnar("outputs", outputs),
        Format::Row => {
            let batch = batch_size(outputs)?;
            out.push_str("{\n    \"predictions\": [");
            for row in 0..batch {
                if row > 0 {
                    out.push_str(", ");
                }
                if let [one] = outputs {
                    write_row(&mut out, one, row)?;
                } else {
                    out.push('{');
                    for (i, t) in outputs.iter().enumerate() {
                        if i > 0 {
                            out.push_str(", ");
                        }
                        write_key(&mut out, &t.name);
                        write_row(&mut out, t, row)?;
                    }
                    out.push('}');
                }
            }
            out.push_str("\n    ]\n}");
        }
    }
    Ok(out)
}

/// Every output of a row-format response must have the same first dimension.
fn batch_size(outputs: &[Tensor]) -> Result<usize> {
    let mut batch: Option<i64> = None;
    for t in outputs {
        let Some(&n) = t.shape.first() else {
            return Err(Error::invalid(format!(
                "Tensor name: {} has no shape information (a scalar cannot be split into instances)",
                t.name
            )));
        };
        match batch {
            None => batch = Some(n),
            Some(b) if b != n => {
                return Err(Error::invalid(format!(
                    "Tensor name: {} has inconsistent batch size: {n} expecting: {b}",
                    t.name
                )));
            }
            _ => {}
        }
    }
    Ok(batch.unwrap_or(0).max(0) as usize)
}

fn write_key(out: &mut String, key: &str) {
    out.push_str(&serde_json::Value::String(key.to_string()).to_string());
    out.push_str(": ");
}

fn write_tensor(out: &mut String, t: &Tensor) -> Result<()> {
    let total = element_count(&t.shape)?;
    let mut next = 0;
    write_nested(out, t, &t.shape, &mut next, total)
}

fn write_row(out: &mut String, t: &Tensor, row: usize) -> Result<()> {
    let inner = &t.shape[1..];
    let per_row = element_count(inner)?;
    let mut next = row * per_row;
    write_nested(out, t, inner, &mut next, (row + 1) * per_row)
}

fn write_nested(out: &mut String, t: &Tensor, shape: &[i64], next: &mut usize, end: usize) -> Result<()> {
    match shape.split_first() {
        None => {
            if *next >= end {
                return Err(Error::internal(format!(
                    "output '{}' has fewer elements than its shape",
                    t.name
                )));
            }
            write_element(out, t, *next)?;
            *next += 1;
            Ok(())
        }
        Some((&n, rest)) => {
            out.push('[');
            for i in 0..n.max(0) {
                if i > 0 {
                    out.push_str(", ");
                }
                write_nested(out, t, rest, next, end)?;
            }
            out.push(']');
            Ok(())
        }
    }
}

/// A float as TF Serving writes it: always with a decimal point or an exponent (so a list
/// never mixes integers and decimals), shortest round-trip digits, bare NaN and Infinity.
pub fn write_float(out: &mut String, v: f64, shortest: impl std::fmt::Debug) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "Infinity" } else { "-Infinity" });
    } else {
        // Rust's Debug form is the shortest round-trip text with a `.0` or an exponent.
        let _ = write!(out, "{shortest:?}");
    }
}

/// The number a JSON value stands for when it is one of TF Serving's bare float literals.
pub fn float_literal(v: &Value) -> Option<f64> {
    match v {
        Value::String(s) if s == NAN => Some(f64::NAN),
        Value::String(s) if s == INF => Some(f64::INFINITY),
        Value::String(s) if s == NEG_INF => Some(f64::NEG_INFINITY),
        _ => None,
    }
}

fn write_element(out: &mut String, t: &Tensor, i: usize) -> Result<()> {
    macro_rules! num {
        ($ty:ty) => {{
            let raw = raw_of(t)?;
            let size = std::mem::size_of::<$ty>();
            let bytes = raw
                .get(i * size..(i + 1) * size)
                .ok_or_else(|| Error::internal(format!("output '{}' is shorter than its shape", t.name)))?;
            <$ty>::from_le_bytes(bytes.try_into().map_err(|_| Error::internal("element size"))?)
        }};
    }
    match t.datatype {
        DataType::F32 => {
            let v = num!(f32);
            write_float(out, f64::from(v), v);
        }
        DataType::F64 => {
            let v = num!(f64);
            write_float(out, v, v);
        }
        DataType::F16 => {
            let v = f16::from_bits(num!(u16));
            write_float(out, v.to_f64(), v.to_f32());
        }
        DataType::BF16 => {
            let v = bf16::from_bits(num!(u16));
            write_float(out, v.to_f64(), v.to_f32());
        }
        DataType::I8 => write_int(out, num!(i8)),
        DataType::I16 => write_int(out, num!(i16)),
        DataType::I32 => write_int(out, num!(i32)),
        DataType::I64 => write_int(out, num!(i64)),
        DataType::U8 => write_int(out, num!(u8)),
        DataType::U16 => write_int(out, num!(u16)),
        DataType::U32 => write_int(out, num!(u32)),
        DataType::U64 => write_int(out, num!(u64)),
        DataType::Bool => out.push_str(if num!(u8) != 0 { "true" } else { "false" }),
        DataType::Bytes => {
            let TensorData::Strings(items) = &t.data else {
                return Err(Error::internal(format!("output '{}' holds no strings", t.name)));
            };
            let item = items
                .get(i)
                .ok_or_else(|| Error::internal(format!("output '{}' is shorter than its shape", t.name)))?;
            // As TF Serving: keys ending in `_bytes` are binary; so is anything not UTF-8.
            match std::str::from_utf8(item) {
                Ok(text) if !t.name.ends_with("_bytes") => {
                    out.push_str(&Value::String(text.to_string()).to_string());
                }
                _ => {
                    let _ = write!(out, "{{\"b64\": \"{}\"}}", B64.encode(item));
                }
            }
        }
    }
    Ok(())
}

fn write_int(out: &mut String, v: impl std::fmt::Display) {
    let _ = write!(out, "{v}");
}

fn raw_of(t: &Tensor) -> Result<&Bytes> {
    t.raw()
        .ok_or_else(|| Error::internal(format!("output '{}' holds strings", t.name)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sig(inputs: &[(&str, DataType)]) -> Signature {
        Signature {
            name: "serving_default".into(),
            method_name: crate::spec::PREDICT_METHOD.into(),
            inputs: inputs
                .iter()
                .map(|(k, d)| SigTensor {
                    key: (*k).into(),
                    datatype: *d,
                    shape: vec![-1, 2],
                    tensor_name: format!("{k}:0"),
                })
                .collect(),
            outputs: Vec::new(),
            is_default: true,
            native: true,
        }
    }

    fn decode(body: &[u8], s: &Signature) -> Result<(Format, Vec<Tensor>)> {
        crate::json_tensor::predict_request(body, |_| Ok(s.clone())).map(|(_, f, t)| (f, t))
    }

    fn f32s(t: &Tensor) -> Vec<f32> {
        t.raw()
            .unwrap()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn row_and_columnar_requests() {
        let s = sig(&[("x", DataType::F32)]);
        let (format, inputs) = decode(br#"{"instances": [[1, 2], [3.5, NaN]]}"#, &s).unwrap();
        assert_eq!(format, Format::Row);
        assert_eq!(inputs[0].shape, [2, 2]);
        let v = f32s(&inputs[0]);
        assert_eq!(&v[..3], &[1.0, 2.0, 3.5]);
        assert!(v[3].is_nan());
        let (format, inputs) = decode(br#"{"inputs": {"x": [[1, 2]]}}"#, &s).unwrap();
        assert_eq!(format, Format::Columnar);
        assert_eq!(inputs[0].shape, [1, 2]);
        let (_, inputs) = decode(br#"{"inputs": -Infinity}"#, &s).unwrap();
        assert!(inputs[0].shape.is_empty());
        assert_eq!(f32s(&inputs[0]), [f32::NEG_INFINITY]);
    }

    #[test]
    fn named_instances_and_strings() {
        let s = sig(&[("a", DataType::I64), ("t", DataType::Bytes)]);
        let (_, inputs) = decode(
            br#"{"instances": [{"a": [1, 2], "t": "x"}, {"a": [3, 4], "t": {"b64": "/w=="}}]}"#,
            &s,
        )
        .unwrap();
        let t = inputs.iter().find(|t| t.name == "t").unwrap();
        assert_eq!(
            t.data,
            TensorData::Strings(vec![Bytes::from_static(b"x"), Bytes::from_static(&[0xff])])
        );
        // A string containing NaN stays a string.
        let (_, inputs) = decode(br#"{"instances": [{"a": [1, 2], "t": "NaN and Infinity"}]}"#, &s).unwrap();
        let t = inputs.iter().find(|t| t.name == "t").unwrap();
        assert_eq!(
            t.data,
            TensorData::Strings(vec![Bytes::from_static(b"NaN and Infinity")])
        );
    }

    #[test]
    fn bad_requests_are_clear() {
        let s = sig(&[("x", DataType::F32)]);
        let err = |body: &[u8]| decode(body, &s).unwrap_err().to_string();
        assert!(err(br#"{"instances": [[1, 2], [3]]}"#).contains("Expecting tensor size"));
        assert!(err(br#"{"instances": [1], "inputs": [1]}"#).contains("only one of"));
        assert!(err(br#"{"instances": []}"#).contains("Empty"));
        assert!(err(br#"{"instances": ["a"]}"#).contains("is not of expected type: float"));
        assert!(err(br#"{"inputs": {"y": [1]}}"#).contains("input tensor alias not found"));
        assert!(err(br#"{"inputs": [[1, 2], [3]]}"#).contains("ragged"));
        assert!(err(br#"{}"#).contains("Missing 'inputs' or 'instances'"));
        let i = sig(&[("i", DataType::I32)]);
        let e = decode(br#"{"inputs": [1.5]}"#, &i).unwrap_err();
        assert!(e.to_string().contains("int32"), "{e}");
        let e = decode(br#"{"inputs": [3000000000]}"#, &i).unwrap_err();
        assert!(e.to_string().contains("int32"), "{e}");
        let b = sig(&[("b", DataType::Bytes)]);
        let e = decode(br#"{"inputs": [{"b64": "!!"}]}"#, &b).unwrap_err();
        assert!(e.to_string().contains("base64"), "{e}");
        assert!(parse_body(b"[1]").is_err());
        assert!(parse_body(b"{").is_err());
    }

    #[test]
    fn responses_in_both_formats() {
        let y = Tensor::new(
            "y",
            DataType::F32,
            vec![2, 2],
            TensorData::Raw(Bytes::from(
                [1.5f32, f32::NAN, 3.0, f32::INFINITY]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            )),
        );
        let s = Tensor::new(
            "s_bytes",
            DataType::Bytes,
            vec![2],
            TensorData::Strings(vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]),
        );
        let row = predict_response(Format::Row, std::slice::from_ref(&y)).unwrap();
        assert_eq!(
            row,
            "{\n    \"predictions\": [[1.5, NaN], [3.0, Infinity]\n    ]\n}"
        );
        let both = predict_response(Format::Row, &[y.clone(), s.clone()]).unwrap();
        assert!(
            both.contains(r#"{"y": [1.5, NaN], "s_bytes": {"b64": "YQ=="}}"#),
            "{both}"
        );
        let col = predict_response(Format::Columnar, &[y, s]).unwrap();
        assert!(col.contains(r#""outputs": {"y": [[1.5, NaN], [3.0, Infinity]],"s_bytes": [{"b64": "YQ=="}, {"b64": "Yg=="}]}"#), "{col}");
        let scalar = Tensor::new(
            "z",
            DataType::I32,
            vec![],
            TensorData::Raw(Bytes::from(7i32.to_le_bytes().to_vec())),
        );
        assert!(predict_response(Format::Row, std::slice::from_ref(&scalar)).is_err());
        assert!(
            predict_response(Format::Columnar, &[scalar])
                .unwrap()
                .contains("\"outputs\": 7")
        );
    }

    #[test]
    fn floats_are_written_as_tf_serving_writes_them() {
        let mut text = String::new();
        for v in [6.0f32, 1e38, 0.1, -2.5e-8] {
            write_float(&mut text, f64::from(v), v);
            text.push(' ');
        }
        assert_eq!(text, "6.0 1e38 0.1 -2.5e-8 ");
    }
}
