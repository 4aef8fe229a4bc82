//! The repository extension's load and unload parameters, the same over HTTP and gRPC:
//! `config` (a model configuration as JSON), `file:<version>/<name>` (a model file: base64 in
//! HTTP's JSON, raw bytes over gRPC) and `unload_dependents`.

use base64::Engine;
use oxserve_core::{Error, Result};
use oxserve_engine::{LoadOverride, OverrideFile};

/// A load or unload parameter as the wire carried it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RepositoryParameter {
    Bool(bool),
    Int(i64),
    Text(String),
    /// gRPC's `bytes_param`.
    Bytes(Vec<u8>),
    /// A gRPC parameter with none of its fields set.
    Unset,
}

const FILE_PREFIX: &str = "file:";

/// The overrides of a load request; unknown parameters are refused with their name.
pub(crate) fn load_override(
    model: &str,
    parameters: Vec<(String, RepositoryParameter)>,
) -> Result<LoadOverride> {
    let mut overrides = LoadOverride::default();
    for (key, value) in parameters {
        if key == "config" {
            match value {
                RepositoryParameter::Text(json) => overrides.config_json = Some(json),
                _ => {
                    return Err(Error::invalid(format!(
                        "failed to load '{model}': parameter 'config' must be a string holding the model configuration as JSON"
                    )));
                }
            }
        } else if let Some(path) = key.strip_prefix(FILE_PREFIX) {
            let contents = match value {
                RepositoryParameter::Bytes(bytes) => bytes,
                RepositoryParameter::Text(encoded) => base64::engine::general_purpose::STANDARD
                    .decode(encoded.trim())
                    .map_err(|e| {
                        Error::invalid(format!(
                            "failed to load '{model}': parameter '{key}' is not valid base64: {e}"
                        ))
                    })?,
                _ => {
                    return Err(Error::invalid(format!(
                        "failed to load '{model}': parameter '{key}' must carry the file's contents (base64 over HTTP, bytes over gRPC)"
                    )));
                }
            };
            overrides.files.push(OverrideFile {
                path: path.to_string(),
                contents,
            });
        } else {
            return Err(Error::invalid(format!(
                "failed to load '{model}': unknown parameter '{key}' (supported: 'config', 'file:<version>/<name>')"
            )));
        }
    }
    Ok(overrides)
}

/// Checks an unload request's parameters: only `unload_dependents` (a boolean) is known.
/// No model here depends on another one, so it has nothing more to unload.
pub(crate) fn check_unload_parameters(
    model: &str,
    parameters: &[(String, RepositoryParameter)],
) -> Result<()> {
    for (key, value) in parameters {
        match (key.as_str(), value) {
            ("unload_dependents", RepositoryParameter::Bool(_)) => {}
            ("unload_dependents", _) => {
                return Err(Error::invalid(format!(
                    "failed to unload '{model}': parameter 'unload_dependents' must be a boolean"
                )));
            }
            _ => {
                return Err(Error::invalid(format!(
                    "failed to unload '{model}': unknown parameter '{key}' (supported: 'unload_dependents')"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_parameters_become_overrides() {
        let overrides = load_override(
            "m",
            vec![
                ("config".into(), RepositoryParameter::Text("{}".into())),
                (
                    "file:1/model.onnx".into(),
                    RepositoryParameter::Text("AAEC".into()),
                ),
                ("file:1/extra.bin".into(), RepositoryParameter::Bytes(vec![7])),
            ],
        )
        .unwrap();
        assert_eq!(overrides.config_json.as_deref(), Some("{}"));
        assert_eq!(overrides.files[0].path, "1/model.onnx");
        assert_eq!(overrides.files[0].contents, vec![0, 1, 2]);
        assert_eq!(overrides.files[1].contents, vec![7]);
    }

    #[test]
    fn bad_load_parameters_name_the_parameter() {
        let err = |p: Vec<(String, RepositoryParameter)>| {
            load_override("m", p).err().unwrap().message().to_string()
        };
        assert!(err(vec![("config".into(), RepositoryParameter::Bool(true))]).contains("'config'"));
        assert!(err(vec![("file:1/a".into(), RepositoryParameter::Text("***".into()))]).contains("base64"));
        assert!(err(vec![("file:1/a".into(), RepositoryParameter::Int(3))]).contains("'file:1/a'"));
        assert!(
            err(vec![("colour".into(), RepositoryParameter::Int(3))]).contains("unknown parameter 'colour'")
        );
    }

    #[test]
    fn unload_knows_only_unload_dependents() {
        assert!(
            check_unload_parameters(
                "m",
                &[("unload_dependents".into(), RepositoryParameter::Bool(true))]
            )
            .is_ok()
        );
        assert!(
            check_unload_parameters("m", &[("unload_dependents".into(), RepositoryParameter::Int(1))])
                .is_err()
        );
        assert!(check_unload_parameters("m", &[("x".into(), RepositoryParameter::Bool(true))]).is_err());
    }
}
