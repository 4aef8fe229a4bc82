//! Triton's trace extension over KServe v2: `GET/POST /v2/trace/setting` and
//! `/v2/models/{m}/trace/setting`, gRPC `TraceSetting`. The settings and the sampling live in
//! the engine ([`oxserve_engine::trace`]); this is the protocols' reading and writing of them,
//! in Triton's shapes and words.

use oxserve_core::{Error, Result};
use oxserve_engine::InferenceService;
use oxserve_engine::trace::settings::{Protocol, SettingValue, parse_update};

/// The setting in force for `model` (or the global one) after applying `update` when there
/// is one; the model must be ready, as Triton requires.
pub fn trace_setting(
    engine: &InferenceService,
    model: Option<&str>,
    update: Option<(&[(String, SettingValue)], Protocol)>,
) -> Result<Vec<(String, Vec<String>)>> {
    if let Some(m) = model
        && !engine.model_ready(m, None)
    {
        return Err(Error::invalid(format!("Request for unknown model : {m}")));
    }
    match update {
        None => Ok(engine.trace().settings(model)),
        Some((settings, protocol)) => {
            let update = parse_update(settings, protocol)?;
            engine.trace().update(model, &update)
        }
    }
}

/// Triton's words, with what they mean (Triton answers these with 500; a client's mistake is a
/// 400 here).
const NOT_AN_ARRAY: &str =
    "attempt to access JSON non-array as array: 'trace_level' must be a list of strings";

/// An HTTP update body: `null` clears a setting, `trace_level` is a list of strings, every
/// other setting a string (as Triton reads them).
pub fn settings_from_json(body: &[u8]) -> Result<Vec<(String, SettingValue)>> {
    let json: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| Error::invalid(format!("failed to parse the request JSON buffer: {e}")))?;
    let serde_json::Value::Object(map) = json else {
        return Err(Error::invalid("the trace settings must be a JSON object"));
    };
    map.into_iter()
        .map(|(key, value)| {
            let setting = match (key.as_str(), value) {
                (_, serde_json::Value::Null) => SettingValue::Clear,
                ("trace_level", serde_json::Value::Array(items)) => SettingValue::Values(
                    items
                        .into_iter()
                        .map(|v| match v {
                            serde_json::Value::String(s) => Ok(s),
                            _ => Err(Error::invalid(NOT_AN_ARRAY)),
                        })
                        .collect::<Result<_>>()?,
                ),
                ("trace_level", _) => return Err(Error::invalid(NOT_AN_ARRAY)),
                (_, serde_json::Value::String(s)) => SettingValue::Values(vec![s]),
                (key, _) => {
                    return Err(Error::invalid(format!(
                        "attempt to access JSON non-string as string: trace setting '{key}' must be a string"
                    )));
                }
            };
            Ok((key, setting))
        })
        .collect()
}

/// The settings as Triton's HTTP JSON: keys in Triton's order, `trace_level` a list, the
/// others strings (a setting given several times, like `resource`, a list).
pub fn settings_to_json(settings: &[(String, Vec<String>)]) -> String {
    let mut out = String::from("{");
    for (i, (key, values)) in settings.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let value = if key == "trace_level" || values.len() != 1 {
            serde_json::Value::from(values.clone())
        } else {
            serde_json::Value::from(values[0].clone())
        };
        out.push_str(&serde_json::Value::from(key.as_str()).to_string());
        out.push(':');
        out.push_str(&value.to_string());
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_bodies_read_and_write_as_tritons() {
        let parsed =
            settings_from_json(br#"{"trace_level":["TIMESTAMPS"],"trace_rate":null,"log_frequency":"3"}"#)
                .unwrap();
        assert!(parsed.contains(&("trace_rate".into(), SettingValue::Clear)));
        assert!(parsed.contains(&("log_frequency".into(), SettingValue::Values(vec!["3".into()]))));
        assert!(settings_from_json(br#"{"trace_rate":5}"#).is_err());
        assert!(settings_from_json(br#"{"trace_level":"OFF"}"#).is_err());
        let text = settings_to_json(&[
            ("trace_level".into(), vec!["OFF".into()]),
            ("trace_rate".into(), vec!["1000".into()]),
        ]);
        assert_eq!(text, r#"{"trace_level":["OFF"],"trace_rate":"1000"}"#);
    }
}
