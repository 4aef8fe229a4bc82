//! Triton's logging extension: `GET/POST /v2/logging` and gRPC `LogSettings` read and change
//! the running server's logging. The server's log setup implements [`LogControl`] and installs
//! it once ([`install`]); the protocols call it. Logging is process-wide, so the control is too.

use std::sync::{Arc, OnceLock};

use oxserve_core::{Error, ErrorKind, Result};

/// Triton's log settings, as `/v2/logging` reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// Where the log goes; empty: standard error.
    pub log_file: String,
    pub log_info: bool,
    pub log_warning: bool,
    pub log_error: bool,
    /// 0: no debug output; 1: oxserve's debug events; 2: oxserve's trace events and every
    /// library's debug events.
    pub log_verbose_level: u32,
    /// `default` or `ISO8601` (Triton's names).
    pub log_format: String,
}

/// A change: `None` leaves a setting as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogUpdate {
    pub log_file: Option<String>,
    pub log_info: Option<bool>,
    pub log_warning: Option<bool>,
    pub log_error: Option<bool>,
    pub log_verbose_level: Option<u32>,
    pub log_format: Option<String>,
}

/// The running server's logging.
pub trait LogControl: Send + Sync {
    fn settings(&self) -> LogSettings;
    /// Applies every part of `update` or none.
    fn apply(&self, update: &LogUpdate) -> Result<()>;
}

static CONTROL: OnceLock<Arc<dyn LogControl>> = OnceLock::new();

/// Installs the process's log control (the first call wins).
pub fn install(control: Arc<dyn LogControl>) {
    let _ = CONTROL.set(control);
}

/// Checks an update as Triton does, then applies it; answers the settings after it.
pub fn update(update: &LogUpdate) -> Result<LogSettings> {
    let control = control()?;
    if update.log_file.is_some() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "log file location can not be updated through network protocol",
        ));
    }
    if let Some(format) = &update.log_format
        && format != "default"
        && format != "ISO8601"
    {
        return Err(Error::invalid(format!(
            "invalid argument for --log_format, got: {format}"
        )));
    }
    control.apply(update)?;
    Ok(control.settings())
}

/// The current settings.
pub fn settings() -> Result<LogSettings> {
    Ok(control()?.settings())
}

fn control() -> Result<&'static Arc<dyn LogControl>> {
    CONTROL
        .get()
        .ok_or_else(|| Error::unavailable("the server does not support dynamic logging"))
}

/// `POST /v2/logging`'s body: each known setting, `null` or absent to leave it.
pub fn update_from_json(body: &serde_json::Value) -> Result<LogUpdate> {
    let serde_json::Value::Object(map) = body else {
        return Err(Error::invalid("the logging settings must be a JSON object"));
    };
    let boolean = |key: &str| -> Result<Option<bool>> {
        match map.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(Error::invalid(format!("'{key}' must be a boolean, got {other}"))),
        }
    };
    let string = |key: &str| -> Result<Option<String>> {
        match map.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(Error::invalid(format!("'{key}' must be a string, got {other}"))),
        }
    };
    let log_verbose_level = match map.get("log_verbose_level") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
            Error::invalid(format!(
                "'log_verbose_level' must be an unsigned integer, got {v}"
            ))
        })?),
    };
    Ok(LogUpdate {
        log_file: string("log_file")?,
        log_info: boolean("log_info")?,
        log_warning: boolean("log_warning")?,
        log_error: boolean("log_error")?,
        log_verbose_level,
        log_format: string("log_format")?,
    })
}

/// The settings as `/v2/logging` answers them.
pub fn settings_json(s: &LogSettings) -> serde_json::Value {
    serde_json::json!({
        "log_file": s.log_file,
        "log_info": s.log_info,
        "log_warning": s.log_warning,
        "log_error": s.log_error,
        "log_verbose_level": s.log_verbose_level,
        "log_format": s.log_format,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn json_updates_are_typed() {
        let u = update_from_json(
            &serde_json::json!({"log_info": false, "log_verbose_level": 2, "log_format": null}),
        )
        .unwrap();
        assert_eq!(
            u,
            LogUpdate {
                log_info: Some(false),
                log_verbose_level: Some(2),
                ..Default::default()
            }
        );
        for bad in [
            serde_json::json!({"log_info": "yes"}),
            serde_json::json!({"log_verbose_level": -1}),
            serde_json::json!({"log_format": 3}),
            serde_json::json!([1]),
        ] {
            assert_eq!(
                update_from_json(&bad).unwrap_err().kind(),
                ErrorKind::InvalidArgument,
                "{bad}"
            );
        }
    }
}
