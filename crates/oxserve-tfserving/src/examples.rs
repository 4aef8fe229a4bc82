//! tf.Example protos from TF Serving's JSON `examples` / `context`, serialized for a
//! classify or regress signature's string input.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use oxserve_core::{Error, Result};
use prost::Message;
use serde_json::Value;

use crate::pb::tensorflow::{BytesList, Example, Feature, Features, FloatList, Int64List, feature};

/// One feature's values: a JSON scalar or list of strings (or `{"b64": ...}`), or of numbers
/// (int64 when every number is an integer, as TF Serving decides; else float).
fn feature_of(name: &str, value: &Value) -> Result<Feature> {
    let items: Vec<&Value> = match value {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    let bad = || {
        Error::invalid(format!(
            "feature '{name}': values must be numbers or strings, all of one kind"
        ))
    };
    // NaN and Infinity (bare in the request) are float values, not strings.
    let float_literal = |v: &Value| crate::json::float_literal(v);
    let kind = if !items.is_empty() && items.iter().all(|v| v.is_number() || float_literal(v).is_some()) {
        if items.iter().all(|v| v.is_i64() || v.is_u64()) {
            let values = items
                .iter()
                .map(|v| {
                    v.as_i64()
                        .ok_or_else(|| Error::invalid(format!("feature '{name}': {v} is out of int64 range")))
                })
                .collect::<Result<_>>()?;
            feature::Kind::Int64List(Int64List { value: values })
        } else {
            feature::Kind::FloatList(FloatList {
                value: items
                    .iter()
                    .map(|v| float_literal(v).or_else(|| v.as_f64()).unwrap_or(0.0) as f32)
                    .collect(),
            })
        }
    } else if items.iter().all(|v| v.is_string() || v.is_object()) {
        let mut values = Vec::with_capacity(items.len());
        for v in &items {
            values.push(match v {
                Value::String(s) => s.as_bytes().to_vec(),
                Value::Object(m) => match m.get("b64") {
                    Some(Value::String(b)) if m.len() == 1 => B64.decode(b).map_err(|e| {
                        Error::invalid(format!("feature '{name}': Unable to base64 decode: {e}"))
                    })?,
                    _ => return Err(bad()),
                },
                _ => return Err(bad()),
            });
        }
        feature::Kind::BytesList(BytesList { value: values })
    } else {
        return Err(bad());
    };
    Ok(Feature { kind: Some(kind) })
}

/// An Example from one JSON object of features.
pub fn example_from_json(value: &Value) -> Result<Example> {
    let Value::Object(features) = value else {
        return Err(Error::invalid("each example must be a JSON object of features"));
    };
    let feature = features
        .iter()
        .map(|(k, v)| Ok((k.clone(), feature_of(k, v)?)))
        .collect::<Result<_>>()?;
    Ok(Example {
        features: Some(Features { feature }),
    })
}

/// The serialized examples of a classify or regress body: each example with the context's
/// features merged in (the context's bytes first, so an example's own feature wins: protobuf
/// merges maps entry by entry, later entries replacing earlier ones).
pub fn serialized_from_json(body: &serde_json::Map<String, Value>) -> Result<Vec<Bytes>> {
    let Some(Value::Array(examples)) = body.get("examples") else {
        return Err(Error::invalid("Expected 'examples' to be an array of objects"));
    };
    if examples.is_empty() {
        return Err(Error::invalid("Empty 'examples' list"));
    }
    let context = match body.get("context") {
        None | Some(Value::Null) => None,
        Some(c) => Some(example_from_json(c)?.encode_to_vec()),
    };
    examples
        .iter()
        .map(|e| {
            Ok(with_context(
                context.as_deref(),
                &example_from_json(e)?.encode_to_vec(),
            ))
        })
        .collect()
}

pub fn with_context(context: Option<&[u8]>, example: &[u8]) -> Bytes {
    match context {
        None => Bytes::copy_from_slice(example),
        Some(c) => {
            let mut out = Vec::with_capacity(c.len() + example.len());
            out.extend_from_slice(c);
            out.extend_from_slice(example);
            Bytes::from(out)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn features_are_typed_as_tf_serving_types_them() {
        let body: serde_json::Map<String, Value> = serde_json::from_str(
            r#"{"context": {"c": "ctx", "x1": 9.0}, "examples": [{"x1": 1.5, "n": [1, 2], "s": {"b64": "/w=="}}]}"#,
        )
        .unwrap();
        let serialized = serialized_from_json(&body).unwrap();
        let merged = Example::decode(serialized[0].as_ref()).unwrap();
        let f = merged.features.unwrap().feature;
        assert_eq!(
            f["x1"].kind,
            Some(feature::Kind::FloatList(FloatList { value: vec![1.5] }))
        );
        assert_eq!(
            f["n"].kind,
            Some(feature::Kind::Int64List(Int64List { value: vec![1, 2] }))
        );
        assert_eq!(
            f["s"].kind,
            Some(feature::Kind::BytesList(BytesList {
                value: vec![vec![0xff]]
            }))
        );
        assert_eq!(
            f["c"].kind,
            Some(feature::Kind::BytesList(BytesList {
                value: vec![b"ctx".to_vec()]
            }))
        );
        let bad: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"examples": [{"x": [1, "a"]}]}"#).unwrap();
        assert!(serialized_from_json(&bad).is_err());
    }
}
