//! Triton's trace flags: `--trace-config [<mode>,]<setting>=<value>` (repeatable) and the
//! deprecated `--trace-file`, `--trace-level`, `--trace-rate`, `--trace-count`,
//! `--trace-log-frequency`, read as Triton's command line reads them (docs/protocols.md,
//! "Trace extension").

use std::time::Duration;

use clap::Args;
use oxserve_engine::trace::settings::Level;
use oxserve_engine::trace::{OtelConfig, TraceConfig, TraceMode};

#[derive(Args, Debug, Default, Clone)]
pub struct TraceArgs {
    /// Triton: `<setting>=<value>` for level, rate, count, mode; `triton,file=<path>`,
    /// `triton,log-frequency=<n>`; `opentelemetry,url=<url>`, `opentelemetry,resource=<k>=<v>`,
    /// `opentelemetry,bsp_max_queue_size|bsp_schedule_delay|bsp_max_export_batch_size=<n>`
    /// (repeatable).
    #[arg(long = "trace-config", value_name = "[MODE,]SETTING=VALUE")]
    trace_config: Vec<String>,
    /// Triton (deprecated): the trace file; `--trace-config triton,file=` wins.
    #[arg(long, value_name = "FILE")]
    trace_file: Option<String>,
    /// Triton (deprecated): OFF, TIMESTAMPS or TENSORS (repeatable).
    #[arg(long, value_name = "LEVEL")]
    trace_level: Vec<String>,
    /// Triton (deprecated): trace every N-th request.
    #[arg(long, value_name = "N")]
    trace_rate: Option<String>,
    /// Triton (deprecated): how many requests to trace (-1: no limit).
    #[arg(long, value_name = "N")]
    trace_count: Option<String>,
    /// Triton (deprecated): write the traces to `<file>.<n>` every N traces.
    #[arg(long, value_name = "N")]
    trace_log_frequency: Option<String>,
}

/// One `--trace-config` value: its mode (`None`: a global setting), setting and value.
fn split(arg: &str) -> Result<(Option<TraceMode>, String, String), String> {
    let format_error =
        || format!("--trace-config option format is '<trace mode>,<setting>=<value>'. Got {arg}");
    let (mode, rest) = match arg.find(',') {
        Some(0) => {
            return Err(format!(
                "No trace mode specified. --trace-config option format is <trace mode>,<setting>=<value> \
                 or <setting>=<value>. Got {arg}"
            ));
        }
        Some(i) => (Some(parse_mode(&arg[..i])?), &arg[i + 1..]),
        None => (None, arg),
    };
    let (setting, value) = rest.split_once('=').ok_or_else(format_error)?;
    if setting.is_empty() || value.is_empty() {
        return Err(format_error());
    }
    Ok((mode, setting.to_string(), value.to_string()))
}

fn parse_mode(value: &str) -> Result<TraceMode, String> {
    match value.to_ascii_lowercase().as_str() {
        "triton" => Ok(TraceMode::Triton),
        "opentelemetry" => Ok(TraceMode::OpenTelemetry),
        _ => Err(format!(
            "invalid value for trace mode option: {value}. Available options are \"triton\" and \"opentelemetry\""
        )),
    }
}

fn int(flag: &str, value: &str) -> Result<i32, String> {
    value
        .trim()
        .parse()
        .map_err(|_| format!("Bad option: \"{flag}\".\nfailed to convert '{value}' to an integer"))
}

impl TraceArgs {
    /// Whether any trace flag was given (otherwise tracing stays as a server without them
    /// has it: off, Triton's defaults).
    pub fn given(&self) -> bool {
        !self.trace_config.is_empty()
            || self.trace_file.is_some()
            || !self.trace_level.is_empty()
            || self.trace_rate.is_some()
            || self.trace_count.is_some()
            || self.trace_log_frequency.is_some()
    }

    /// Triton's warnings for its deprecated trace flags.
    fn warn_deprecated(&self) {
        let given = [
            (
                "--trace-file",
                self.trace_file.is_some(),
                "triton,file=<filepath>",
            ),
            ("--trace-level", !self.trace_level.is_empty(), "level=<level>"),
            ("--trace-rate", self.trace_rate.is_some(), "rate=<rate>"),
            ("--trace-count", self.trace_count.is_some(), "count=<count>"),
            (
                "--trace-log-frequency",
                self.trace_log_frequency.is_some(),
                "triton,log-frequency=<value>",
            ),
        ];
        for (flag, _, instead) in given.iter().filter(|(_, given, _)| *given) {
            tracing::warn!(
                "Warning: '{flag}' has been deprecated and will be removed in future releases. Please \
                 use '--trace-config {instead}' instead."
            );
        }
    }

    /// The start-up trace settings, as Triton derives them from its flags.
    pub fn config(&self) -> Result<TraceConfig, String> {
        let mut config = TraceConfig::default();
        self.warn_deprecated();
        // The deprecated flags first; --trace-config overrides them.
        let mut levels: Vec<String> = self.trace_level.clone();
        if let Some(file) = &self.trace_file {
            config.file = file.clone();
        }
        if let Some(v) = &self.trace_rate {
            config.rate = int("--trace-rate", v)? as u32;
        }
        if let Some(v) = &self.trace_count {
            config.count = int("--trace-count", v)?;
        }
        if let Some(v) = &self.trace_log_frequency {
            config.log_frequency = int("--trace-log-frequency", v)? as u32;
        }
        let mut mode_settings: Vec<(TraceMode, String, String)> = Vec::new();
        let mut config_levels = Vec::new();
        for arg in &self.trace_config {
            let (mode, setting, value) = split(arg)?;
            let flag = format!("--trace-config {setting}");
            match mode {
                None => match setting.as_str() {
                    "rate" => config.rate = int(&flag, &value)? as u32,
                    "count" => config.count = int(&flag, &value)?,
                    "mode" => config.mode = parse_mode(&value)?,
                    "level" => config_levels.push(value),
                    // Triton ignores other global settings.
                    _ => {}
                },
                Some(mode) => mode_settings.push((mode, setting, value)),
            }
        }
        if !config_levels.is_empty() {
            levels = config_levels;
        }
        let mut level = Level::OFF;
        let mut off = false;
        for value in &levels {
            match Level::from_flag(value)? {
                None => off = true,
                Some(l) => level = level.union(l),
            }
        }
        // An explicit OFF wins over every other level given.
        config.level = if off { Level::OFF } else { level };
        let mut otel = OtelConfig::default();
        for (mode, setting, value) in mode_settings {
            if mode != config.mode {
                continue;
            }
            let flag = format!("--trace-config {},{setting}", mode.name());
            match (mode, setting.as_str()) {
                (TraceMode::Triton, "file") => config.file = value,
                (TraceMode::Triton, "log-frequency") => config.log_frequency = int(&flag, &value)? as u32,
                (TraceMode::OpenTelemetry, "url") => {
                    otel.url = value.clone();
                    config.extras.push((setting, value));
                }
                (TraceMode::OpenTelemetry, "resource") => {
                    let (k, v) = value
                        .split_once('=')
                        .ok_or_else(|| format!("{flag}: expected <key>=<value>, got {value}"))?;
                    otel.resource.push((k.to_string(), v.to_string()));
                    config.extras.push((setting, value));
                }
                (TraceMode::OpenTelemetry, "bsp_max_queue_size") => {
                    let n = int(&flag, &value)? as u32;
                    otel.max_queue_size = n as usize;
                    config.extras.push((setting, n.to_string()));
                }
                (TraceMode::OpenTelemetry, "bsp_schedule_delay") => {
                    let n = int(&flag, &value)? as u32;
                    otel.schedule_delay = Duration::from_millis(u64::from(n));
                    config.extras.push((setting, n.to_string()));
                }
                (TraceMode::OpenTelemetry, "bsp_max_export_batch_size") => {
                    let n = int(&flag, &value)? as u32;
                    otel.max_export_batch_size = n as usize;
                    config.extras.push((setting, n.to_string()));
                }
                // Triton keeps other settings and shows them in the settings response.
                _ => config.extras.push((setting, value)),
            }
        }
        if config.mode == TraceMode::OpenTelemetry {
            // Triton shows the batch span processor's settings, given or not: the given ones
            // where they were given, the defaults after.
            let defaults = [
                ("bsp_max_queue_size", otel.max_queue_size.to_string()),
                ("bsp_schedule_delay", otel.schedule_delay.as_millis().to_string()),
                (
                    "bsp_max_export_batch_size",
                    otel.max_export_batch_size.to_string(),
                ),
            ];
            for (key, value) in defaults {
                if !config.extras.iter().any(|(k, _)| k == key) {
                    config.extras.push((key.to_string(), value));
                }
            }
        }
        config.otel = otel;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(config: &[&str]) -> TraceArgs {
        TraceArgs {
            trace_config: config.iter().map(|s| s.to_string()).collect(),
            ..TraceArgs::default()
        }
    }

    #[test]
    fn trace_config_reads_as_tritons() {
        let c = args(&[
            "triton,file=/tmp/t.json",
            "level=TIMESTAMPS",
            "level=tensors",
            "rate=6",
            "count=3",
        ])
        .config()
        .unwrap();
        assert_eq!(c.file, "/tmp/t.json");
        assert!(c.level.timestamps && c.level.tensors);
        assert_eq!((c.rate, c.count), (6, 3));
        let off = args(&["level=TIMESTAMPS", "level=OFF"]).config().unwrap();
        assert!(off.level.is_off());
        let otel = args(&[
            "mode=opentelemetry",
            "opentelemetry,url=localhost:10000/v1/traces",
            "opentelemetry,resource=service.name=test",
            "opentelemetry,bsp_schedule_delay=100",
        ])
        .config()
        .unwrap();
        assert_eq!(otel.mode, TraceMode::OpenTelemetry);
        assert_eq!(otel.otel.schedule_delay, Duration::from_millis(100));
        assert_eq!(otel.otel.resource, vec![("service.name".into(), "test".into())]);
        assert!(
            otel.extras
                .iter()
                .any(|(k, v)| k == "bsp_schedule_delay" && v == "100")
        );
        assert!(
            args(&[",file=x"])
                .config()
                .unwrap_err()
                .contains("No trace mode specified")
        );
        assert!(
            args(&["jaeger,url=x"])
                .config()
                .unwrap_err()
                .contains("invalid value for trace mode")
        );
        assert!(args(&["level"]).config().unwrap_err().contains("option format"));
    }

    #[test]
    fn deprecated_flags_yield_to_trace_config() {
        let c = TraceArgs {
            trace_file: Some("old.json".into()),
            trace_rate: Some("5".into()),
            trace_level: vec!["TIMESTAMPS".into()],
            trace_config: vec!["triton,file=new.json".into()],
            ..TraceArgs::default()
        }
        .config()
        .unwrap();
        assert_eq!((c.file.as_str(), c.rate), ("new.json", 5));
        assert!(c.level.timestamps);
    }
}
