//! The server's log filter that Triton's logging extension (`/v2/logging`, gRPC `LogSettings`)
//! switches at run time: errors, warnings and info each on or off, and a verbose level for debug
//! output. Checked per event with atomics, so a change applies at once, without a restart.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use oxserve_core::Result;
use oxserve_kserve::logging::{LogControl, LogSettings, LogUpdate};
use std::sync::{Mutex, PoisonError};
use tracing::{Level, Metadata};

pub struct DynamicLog {
    info: AtomicBool,
    warning: AtomicBool,
    error: AtomicBool,
    verbose: AtomicU32,
    format: Mutex<String>,
}

impl DynamicLog {
    fn with(info: bool, warning: bool, error: bool, verbose: u32) -> DynamicLog {
        DynamicLog {
            info: AtomicBool::new(info),
            warning: AtomicBool::new(warning),
            error: AtomicBool::new(error),
            verbose: AtomicU32::new(verbose),
            format: Mutex::new("default".into()),
        }
    }

    /// The settings a plain `--log-level` stands for; `None` for filter directives.
    pub fn from_level(level: &str) -> Option<DynamicLog> {
        Some(match level.trim().to_ascii_lowercase().as_str() {
            "off" => DynamicLog::with(false, false, false, 0),
            "error" => DynamicLog::with(false, false, true, 0),
            "warn" | "warning" => DynamicLog::with(false, true, true, 0),
            "info" => DynamicLog::with(true, true, true, 0),
            "debug" => DynamicLog::with(true, true, true, 1),
            "trace" => DynamicLog::with(true, true, true, 2),
            _ => return None,
        })
    }

    /// Everything on, for use under a fixed filter that decides what is logged.
    pub fn permissive() -> DynamicLog {
        DynamicLog::with(true, true, true, 3)
    }

    /// Whether an event or span passes: verbose 1 shows oxserve's debug events, 2 its trace
    /// events and every library's debug events, 3 everything.
    pub fn enabled(&self, meta: &Metadata<'_>) -> bool {
        let ours = meta.target().starts_with("oxserve");
        let verbose = self.verbose.load(Ordering::Relaxed);
        match *meta.level() {
            Level::ERROR => self.error.load(Ordering::Relaxed),
            Level::WARN => self.warning.load(Ordering::Relaxed),
            Level::INFO => self.info.load(Ordering::Relaxed),
            Level::DEBUG => verbose >= 2 || (verbose >= 1 && ours),
            Level::TRACE => verbose >= 3 || (verbose >= 2 && ours),
        }
    }
}

impl LogControl for DynamicLog {
    fn settings(&self) -> LogSettings {
        LogSettings {
            log_file: String::new(),
            log_info: self.info.load(Ordering::Relaxed),
            log_warning: self.warning.load(Ordering::Relaxed),
            log_error: self.error.load(Ordering::Relaxed),
            log_verbose_level: self.verbose.load(Ordering::Relaxed),
            log_format: self.format.lock().unwrap_or_else(PoisonError::into_inner).clone(),
        }
    }

    fn apply(&self, update: &LogUpdate) -> Result<()> {
        let set = |flag: &AtomicBool, value: Option<bool>| {
            if let Some(v) = value {
                flag.store(v, Ordering::Relaxed);
            }
        };
        set(&self.info, update.log_info);
        set(&self.warning, update.log_warning);
        set(&self.error, update.log_error);
        if let Some(v) = update.log_verbose_level {
            self.verbose.store(v, Ordering::Relaxed);
        }
        if let Some(f) = &update.log_format {
            // Timestamps are ISO 8601 in both of Triton's formats here; the name is kept.
            *self.format.lock().unwrap_or_else(PoisonError::into_inner) = f.clone();
        }
        Ok(())
    }
}
