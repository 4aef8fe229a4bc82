//! Predict bodies decoded without building a `serde_json::Value` per element: the body is split
//! into its top-level keys as raw JSON slices (serde_json validates it), and each tensor — a
//! nested list — is walked once, byte by byte, straight into a typed buffer while its shape is
//! checked. Only unusual leaves (escaped strings, `{"b64": ...}` objects) and errors go through
//! `serde_json::Value`, so messages stay those of the value-based helpers in [`crate::json`].

use bytes::Bytes;
use half::{bf16, f16};
use oxserve_core::{DataType, Error, Result, Tensor, TensorData};
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::json::{self, Format};
use crate::spec::{SigTensor, Signature};

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow, default)]
    signature_name: Option<&'a RawValue>,
    #[serde(borrow, default)]
    instances: Option<&'a RawValue>,
    #[serde(borrow, default)]
    inputs: Option<&'a RawValue>,
}

/// Decodes a predict body: its signature (looked up with `signature`, given the body's
/// `signature_name`, empty when absent), its format, and the tensors named by key.
pub fn predict_request(
    body: &[u8],
    signature: impl FnOnce(&str) -> Result<Signature>,
) -> Result<(Signature, Format, Vec<Tensor>)> {
    let text =
        std::str::from_utf8(body).map_err(|_| Error::invalid("JSON Parse error: the body is not UTF-8"))?;
    let text = json::quote_float_literals(text);
    let parsed: Body<'_> = serde_json::from_str(&text).map_err(|e| {
        if e.classify() == serde_json::error::Category::Data {
            Error::invalid("JSON Parse error: the body is not a JSON object")
        } else {
            Error::invalid(format!("JSON Parse error: {e}"))
        }
    })?;
    let name = match parsed.signature_name {
        None => String::new(),
        Some(raw) => match serde_json::from_str::<Value>(raw.get()) {
            Ok(Value::Null) => String::new(),
            Ok(Value::String(s)) => s,
            _ => return Err(Error::invalid("'signature_name' must be a string")),
        },
    };
    let sig = signature(&name)?;
    let (format, tensors) = match (parsed.instances, parsed.inputs) {
        (Some(_), Some(_)) => {
            return Err(Error::invalid(
                "Not formatted correctly expecting only one of 'inputs' or 'instances' keys exists",
            ));
        }
        (None, None) => return Err(Error::invalid("Missing 'inputs' or 'instances' key")),
        (Some(instances), None) => (Format::Row, row_inputs(instances.get(), &sig)?),
        (None, Some(inputs)) => (Format::Columnar, columnar_inputs(inputs.get(), &sig)?),
    };
    Ok((sig, format, tensors))
}

/// An object that names tensors (not a `{"b64": ...}` value).
fn named(raw: &str) -> Result<Option<Vec<(String, &RawValue)>>> {
    if !raw.trim_start().starts_with('{') {
        return Ok(None);
    }
    let map: Vec<(String, &RawValue)> =
        serde_json::from_str::<std::collections::BTreeMap<String, &RawValue>>(raw)
            .map(|m| m.into_iter().collect())
            .map_err(|e| Error::invalid(format!("JSON Parse error: {e}")))?;
    if map.len() == 1 && map[0].0 == "b64" {
        return Ok(None);
    }
    Ok(Some(map))
}

fn columnar_inputs(raw: &str, sig: &Signature) -> Result<Vec<Tensor>> {
    match named(raw)? {
        Some(map) => map
            .iter()
            .map(|(key, value)| tensor(json::input_spec(sig, key)?, &[value.get()]))
            .collect(),
        None => Ok(vec![scalar_or_list(json::only_input(sig)?, raw)?]),
    }
}

fn row_inputs(raw: &str, sig: &Signature) -> Result<Vec<Tensor>> {
    let rows: Vec<&RawValue> =
        serde_json::from_str(raw).map_err(|_| Error::invalid("Expecting 'instances' to be an list/array"))?;
    if rows.is_empty() {
        return Err(Error::invalid("Empty 'instances' list"));
    }
    let Some(first) = named(rows[0].get())? else {
        let spec = json::only_input(sig)?;
        let values: Vec<&str> = rows.iter().map(|r| r.get()).collect();
        if let Some(i) = values.iter().position(|v| matches!(named(v), Ok(Some(_)))) {
            return Err(Error::invalid(format!(
                "Expecting value/list but got object at item {i} of input list"
            )));
        }
        return Ok(vec![stacked(spec, &values)?]);
    };
    // Each instance names every input; an input's batch is its rows stacked.
    let mut named_rows = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let Some(map) = named(row.get())? else {
            return Err(Error::invalid(format!(
                "Expecting object but got list at item {i} of input list"
            )));
        };
        if map.len() != first.len() {
            return Err(Error::invalid(format!(
                "Expecting {} named inputs but got {} at item {i} of input list",
                first.len(),
                map.len()
            )));
        }
        named_rows.push(map);
    }
    first
        .iter()
        .map(|(key, _)| {
            let spec = json::input_spec(sig, key)?;
            let values = named_rows
                .iter()
                .enumerate()
                .map(|(i, map)| {
                    map.iter()
                        .find(|(k, _)| k == key)
                        .map(|(_, v)| v.get())
                        .ok_or_else(|| {
                            Error::invalid(format!("Missing named input: {key} at item {i} of input list"))
                        })
                })
                .collect::<Result<Vec<_>>>()?;
            stacked(spec, &values)
        })
        .collect()
}

fn scalar_or_list(spec: &SigTensor, raw: &str) -> Result<Tensor> {
    tensor(spec, &[raw])
}

/// One tensor from one nested list.
fn tensor(spec: &SigTensor, parts: &[&str]) -> Result<Tensor> {
    let mut sink = Sink::new(spec.datatype);
    let shape = walk_one(spec, parts[0], &mut sink)?;
    Ok(Tensor::new(spec.key.clone(), spec.datatype, shape, sink.finish()))
}

/// Rows of the same shape stacked along a new first dimension.
fn stacked(spec: &SigTensor, rows: &[&str]) -> Result<Tensor> {
    let mut sink = Sink::new(spec.datatype);
    let mut row_shape: Option<Vec<i64>> = None;
    for (i, row) in rows.iter().enumerate() {
        let shape = walk_one(spec, row, &mut sink)?;
        match &row_shape {
            None => row_shape = Some(shape),
            Some(first) if *first != shape => {
                let count = |s: &[i64]| s.iter().product::<i64>();
                return Err(Error::invalid(format!(
                    "Expecting tensor size: {} but got: {} at item {i} of input list for input '{}' (ragged instances)",
                    count(first),
                    count(&shape),
                    spec.key
                )));
            }
            Some(_) => {}
        }
    }
    let shape = std::iter::once(rows.len() as i64)
        .chain(row_shape.unwrap_or_default())
        .collect();
    Ok(Tensor::new(spec.key.clone(), spec.datatype, shape, sink.finish()))
}

fn ragged(key: &str) -> Error {
    Error::invalid(format!(
        "Failed to process input '{key}': the nested lists are ragged (not all the same length)"
    ))
}

/// Walks one nested list into `sink`; returns its shape.
fn walk_one(spec: &SigTensor, raw: &str, sink: &mut Sink) -> Result<Vec<i64>> {
    let mut walker = Walker {
        bytes: raw.as_bytes(),
        pos: 0,
        shape: Vec::new(),
        rank: None,
    };
    walker.value(0, spec, sink)?;
    let rank = walker.rank.unwrap_or(walker.shape.len());
    if walker.shape.len() < rank || walker.shape[..rank].contains(&-1) {
        return Err(ragged(&spec.key));
    }
    walker.shape.truncate(rank);
    Ok(walker.shape)
}

struct Walker<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Length of the lists at each depth (-1: none seen yet).
    shape: Vec<i64>,
    /// The depth of the leaves (every leaf must be at the same depth).
    rank: Option<usize>,
}

impl<'a> Walker<'a> {
    fn skip_ws(&mut self) {
        while self.pos < self.bytes.len() && self.bytes[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn peek(&self) -> u8 {
        self.bytes.get(self.pos).copied().unwrap_or(0)
    }

    fn value(&mut self, depth: usize, spec: &SigTensor, sink: &mut Sink) -> Result<()> {
        self.skip_ws();
        if self.peek() != b'[' {
            if *self.rank.get_or_insert(depth) != depth {
                return Err(ragged(&spec.key));
            }
            let token = self.leaf()?;
            return sink.push(spec, token);
        }
        self.pos += 1;
        let mut n = 0i64;
        self.skip_ws();
        if self.peek() == b']' {
            self.pos += 1;
        } else {
            loop {
                self.value(depth + 1, spec, sink)?;
                n += 1;
                self.skip_ws();
                match self.peek() {
                    b',' => self.pos += 1,
                    b']' => {
                        self.pos += 1;
                        break;
                    }
                    _ => return Err(Error::invalid("JSON Parse error: malformed list")),
                }
            }
        }
        if self.shape.len() <= depth {
            self.shape.resize(depth + 1, -1);
        }
        match self.shape[depth] {
            -1 => self.shape[depth] = n,
            m if m != n => return Err(ragged(&spec.key)),
            _ => {}
        }
        Ok(())
    }

    /// The raw text of one leaf: a string, an object, a number or a literal.
    fn leaf(&mut self) -> Result<&'a str> {
        let start = self.pos;
        match self.peek() {
            b'"' => {
                self.pos += 1;
                while self.pos < self.bytes.len() {
                    match self.bytes[self.pos] {
                        b'\\' => self.pos += 2,
                        b'"' => {
                            self.pos += 1;
                            break;
                        }
                        _ => self.pos += 1,
                    }
                }
            }
            b'{' => {
                let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
                while self.pos < self.bytes.len() {
                    let c = self.bytes[self.pos];
                    self.pos += 1;
                    if in_string {
                        match (escaped, c) {
                            (true, _) => escaped = false,
                            (false, b'\\') => escaped = true,
                            (false, b'"') => in_string = false,
                            _ => {}
                        }
                        continue;
                    }
                    match c {
                        b'"' => in_string = true,
                        b'{' => depth += 1,
                        b'}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {
                while self.pos < self.bytes.len()
                    && !matches!(self.bytes[self.pos], b',' | b']' | b'}')
                    && !self.bytes[self.pos].is_ascii_whitespace()
                {
                    self.pos += 1;
                }
            }
        }
        // serde_json validated the whole body, so every slice boundary is a token boundary.
        std::str::from_utf8(&self.bytes[start..self.pos.min(self.bytes.len())])
            .map_err(|_| Error::invalid("JSON Parse error: malformed value"))
    }
}

/// Typed element buffers.
enum Sink {
    Raw { dt: DataType, bytes: Vec<u8> },
    Strings(Vec<Bytes>),
}

impl Sink {
    fn new(dt: DataType) -> Self {
        match dt {
            DataType::Bytes => Sink::Strings(Vec::new()),
            dt => Sink::Raw {
                dt,
                bytes: Vec::new(),
            },
        }
    }

    fn finish(self) -> TensorData {
        match self {
            Sink::Raw { bytes, .. } => TensorData::Raw(Bytes::from(bytes)),
            Sink::Strings(items) => TensorData::Strings(items),
        }
    }

    /// The leaf as a JSON value, for the rare leaves and for messages.
    fn value_of(token: &str) -> Result<Value> {
        serde_json::from_str(token).map_err(|e| Error::invalid(format!("JSON Parse error: {e}")))
    }

    fn push(&mut self, spec: &SigTensor, token: &str) -> Result<()> {
        let first = token.as_bytes().first().copied().unwrap_or(0);
        match self {
            Sink::Strings(items) => {
                let value = if first == b'"' && !token.contains('\\') {
                    Bytes::copy_from_slice(&token.as_bytes()[1..token.len() - 1])
                } else {
                    json::bytes_of(spec, &Self::value_of(token)?)?
                };
                items.push(value);
                Ok(())
            }
            Sink::Raw { dt, bytes } => {
                let is_number = first == b'-' || first.is_ascii_digit();
                match *dt {
                    DataType::F32 | DataType::F64 | DataType::F16 | DataType::BF16 => {
                        let v = match token.parse::<f64>() {
                            Ok(v) if is_number => v,
                            _ => json::float_of(spec, &Self::value_of(token)?)?,
                        };
                        match *dt {
                            DataType::F32 => bytes.extend_from_slice(&(v as f32).to_le_bytes()),
                            DataType::F64 => bytes.extend_from_slice(&v.to_le_bytes()),
                            DataType::F16 => {
                                bytes.extend_from_slice(&f16::from_f64(v).to_bits().to_le_bytes())
                            }
                            _ => bytes.extend_from_slice(&bf16::from_f64(v).to_bits().to_le_bytes()),
                        }
                    }
                    DataType::Bool => match token {
                        "true" => bytes.push(1),
                        "false" => bytes.push(0),
                        _ => return Err(json::type_error(spec, &Self::value_of(token)?)),
                    },
                    int => {
                        let v: i128 = match token.parse::<i64>() {
                            Ok(v) => i128::from(v),
                            Err(_) => match token.parse::<u64>() {
                                Ok(v) => i128::from(v),
                                Err(_) => return Err(json::type_error(spec, &Self::value_of(token)?)),
                            },
                        };
                        let out_of_range =
                            || json::type_error(spec, &Self::value_of(token).unwrap_or(Value::Null));
                        macro_rules! put {
                            ($t:ty) => {
                                bytes.extend_from_slice(
                                    &<$t>::try_from(v).map_err(|_| out_of_range())?.to_le_bytes(),
                                )
                            };
                        }
                        match int {
                            DataType::I8 => put!(i8),
                            DataType::I16 => put!(i16),
                            DataType::I32 => put!(i32),
                            DataType::I64 => put!(i64),
                            DataType::U8 => put!(u8),
                            DataType::U16 => put!(u16),
                            DataType::U32 => put!(u32),
                            _ => put!(u64),
                        }
                    }
                }
                Ok(())
            }
        }
    }
}
