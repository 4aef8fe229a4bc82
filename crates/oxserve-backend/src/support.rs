//! Helpers every engine needs: error constructors, short messages that never leak the
//! server's directory layout, panic messages, and the check that a batch input is the one the
//! engine expects.

use std::collections::HashSet;
use std::path::Path;

use oxserve_core::{DataType, Tensor, TensorMeta};

use crate::{BackendError, BackendErrorKind};

pub fn invalid_model(message: impl Into<String>) -> BackendError {
    BackendError::new(BackendErrorKind::InvalidModel, message)
}

pub fn unsupported(message: impl Into<String>) -> BackendError {
    BackendError::new(BackendErrorKind::Unsupported, message)
}

pub fn invalid_input(message: impl Into<String>) -> BackendError {
    BackendError::new(BackendErrorKind::InvalidInput, message)
}

pub fn internal(message: impl Into<String>) -> BackendError {
    BackendError::new(BackendErrorKind::Internal, message)
}

/// A yes/no model parameter: `1`/`0`, `true`/`false`, `on`/`off`, `yes`/`no` (any case), as the
/// engines' own configuration keys accept them.
pub fn bool_parameter(key: &str, value: &str) -> Result<bool, BackendError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" => Ok(false),
        _ => Err(invalid_model(format!(
            "parameter '{key}' must be 1 or 0 (true or false), got '{value}'"
        ))),
    }
}

/// The file name of a model path, for messages: the full path of a repository version
/// directory says little and may leak the server's layout to clients.
pub fn file_label(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Cuts `s` to at most `max` characters, marking the cut.
pub fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

/// The message of a caught panic, when it has one.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Checks that `tensor` is the input the engine expects in this position: its name, data type,
/// shape (`-1` in `shape` = any size) and data length.
pub fn check_input(
    name: &str,
    datatype: DataType,
    shape: &[i64],
    tensor: &Tensor,
) -> Result<(), BackendError> {
    if tensor.name != name {
        return Err(invalid_input(format!(
            "expected input '{name}' in this position, got '{}'",
            truncate(&tensor.name, 100)
        )));
    }
    if tensor.datatype != datatype {
        return Err(invalid_input(format!(
            "input '{name}' must be {datatype}, got {}",
            tensor.datatype
        )));
    }
    let fits = tensor.shape.len() == shape.len()
        && tensor
            .shape
            .iter()
            .zip(shape)
            .all(|(&got, &want)| got >= 0 && (want == -1 || got == want));
    if !fits {
        return Err(invalid_input(format!(
            "input '{name}' has shape {:?}, the model expects {shape:?}",
            tensor.shape
        )));
    }
    tensor
        .check_consistent()
        .map_err(|e| invalid_input(e.message().to_string()))
}

/// Load-time check of a configuration's tensor names against the model file's
/// (`model_names`): every configured name must exist in the model, once; with `all`, every
/// model name must be configured too (for inputs, which the engine needs a value for).
pub fn check_same_names(
    role: &str,
    configured: &[TensorMeta],
    model_names: &[&str],
    all: bool,
) -> Result<(), BackendError> {
    let mut seen = HashSet::new();
    for meta in configured {
        if !seen.insert(meta.name.as_str()) {
            return Err(invalid_model(format!(
                "the configuration lists {role} '{}' twice",
                meta.name
            )));
        }
    }
    let unknown: Vec<&str> = configured
        .iter()
        .map(|m| m.name.as_str())
        .filter(|n| !model_names.contains(n))
        .collect();
    let missing: Vec<&str> = model_names
        .iter()
        .copied()
        .filter(|n| all && !seen.contains(n))
        .collect();
    if unknown.is_empty() && missing.is_empty() {
        return Ok(());
    }
    let mut problems = Vec::new();
    if !unknown.is_empty() {
        problems.push(format!("configured {role}(s) {unknown:?} not in the model"));
    }
    if !missing.is_empty() {
        problems.push(format!("model {role}(s) {missing:?} not configured"));
    }
    Err(invalid_model(format!(
        "{}; the model's {role}s are {model_names:?}",
        problems.join(", ")
    )))
}

/// Load-time check of a configured tensor's type against the one the model file declares.
pub fn check_declared_type(role: &str, meta: &TensorMeta, declared: DataType) -> Result<(), BackendError> {
    if declared != meta.datatype {
        return Err(invalid_model(format!(
            "{role} '{}' is configured as {} but the model declares {declared}",
            meta.name, meta.datatype
        )));
    }
    Ok(())
}

/// Load-time check of a configured shape against the model file's (`-1` = variable). Ranks
/// must match and a fixed configured dim must match a fixed declared one. With `strict` (for
/// inputs), a variable configured dim also needs a variable declared one, or requests the
/// configuration allows would fail on every call; declared output shapes are looser
/// (exporters often leave them vague or stale), so a configuration may be vaguer there.
pub fn check_declared_shape(
    role: &str,
    meta: &TensorMeta,
    declared: &[i64],
    strict: bool,
) -> Result<(), BackendError> {
    let compatible = declared.len() == meta.shape.len()
        && declared
            .iter()
            .zip(&meta.shape)
            .all(|(&m, &c)| c >= -1 && (m == -1 || m == c || (!strict && c == -1)));
    if !compatible {
        return Err(invalid_model(format!(
            "{role} '{}' is configured with shape {:?} but the model declares {declared:?}",
            meta.name, meta.shape
        )));
    }
    Ok(())
}

/// Indices into a model's configured outputs (`configured`, in configuration order) for each
/// output a request names, in request order; no names means every configured output.
pub fn requested_outputs<'a>(
    model_name: &str,
    configured: impl ExactSizeIterator<Item = &'a str> + Clone,
    names: &[String],
) -> Result<Vec<usize>, BackendError> {
    if names.is_empty() {
        return Ok((0..configured.len()).collect());
    }
    names
        .iter()
        .map(|name| {
            configured.clone().position(|o| o == name).ok_or_else(|| {
                invalid_input(format!(
                    "model '{model_name}' has no output '{}'",
                    truncate(name, 100)
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_truncation() {
        assert_eq!(file_label(Path::new("/repo/m/1/model.onnx")), "model.onnx");
        assert_eq!(truncate("hé", 2), "hé");
        assert_eq!(truncate("abcdef", 3), "abc…");
    }

    #[test]
    fn input_checks() {
        let t = Tensor::from_raw("x", DataType::F32, vec![2, 3], vec![0u8; 24]);
        assert!(check_input("x", DataType::F32, &[-1, 3], &t).is_ok());
        assert!(
            check_input("y", DataType::F32, &[-1, 3], &t)
                .unwrap_err()
                .message()
                .contains("expected input 'y'")
        );
        assert!(
            check_input("x", DataType::I32, &[-1, 3], &t)
                .unwrap_err()
                .message()
                .contains("must be INT32")
        );
        assert!(
            check_input("x", DataType::F32, &[-1, 4], &t)
                .unwrap_err()
                .message()
                .contains("expects [-1, 4]")
        );
        let short = Tensor::from_raw("x", DataType::F32, vec![2, 3], vec![0u8; 20]);
        assert!(check_input("x", DataType::F32, &[-1, 3], &short).is_err());
    }

    #[test]
    fn configured_names_must_match_the_model() {
        let meta = |n: &str| TensorMeta {
            name: n.into(),
            datatype: DataType::F32,
            shape: vec![-1],
        };
        let model = ["a", "b"];
        assert!(check_same_names("input", &[meta("a"), meta("b")], &model, true).is_ok());
        // Outputs may be a subset; inputs may not.
        assert!(check_same_names("output", &[meta("b")], &model, false).is_ok());
        let e = check_same_names("input", &[meta("b")], &model, true).unwrap_err();
        assert_eq!(e.kind(), BackendErrorKind::InvalidModel);
        assert!(
            e.message().contains(r#"model input(s) ["a"] not configured"#),
            "{}",
            e.message()
        );
        let e = check_same_names("output", &[meta("c")], &model, false).unwrap_err();
        assert!(
            e.message()
                .contains(r#"configured output(s) ["c"] not in the model"#),
            "{}",
            e.message()
        );
        assert!(
            e.message().contains(r#"the model's outputs are ["a", "b"]"#),
            "{}",
            e.message()
        );
        let e = check_same_names("input", &[meta("a"), meta("a")], &model, false).unwrap_err();
        assert!(e.message().contains("lists input 'a' twice"), "{}", e.message());
    }
}
