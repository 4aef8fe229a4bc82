//! Triton's trace extension: which requests are traced (every `rate`-th, until `count` runs
//! out), the settings the API reads and changes (global, and per model over the global one),
//! and where finished traces go (Triton's trace file, or OpenTelemetry spans).
//!
//! Each setting in force is an object with its own counters and buffer, as in Triton: an
//! update replaces the object (its counters start again); the old one writes what it
//! buffered to the main file once its last traced request is done.

mod file;
mod otel;
pub mod settings;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use oxserve_core::{Error, Result, Trace, TraceRecord, TraceSink};
use parking_lot::Mutex;

use file::TraceFile;
pub use otel::OtelConfig;
use settings::{Fields, Level, TraceUpdate};

/// Where traces go.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TraceMode {
    /// Triton's JSON trace file.
    #[default]
    Triton,
    /// OpenTelemetry spans exported over OTLP/HTTP.
    OpenTelemetry,
}

impl TraceMode {
    pub fn name(self) -> &'static str {
        match self {
            TraceMode::Triton => "triton",
            TraceMode::OpenTelemetry => "opentelemetry",
        }
    }
}

/// The server's trace settings at start (`--trace-config`).
#[derive(Debug, Clone, PartialEq)]
pub struct TraceConfig {
    pub mode: TraceMode,
    pub level: Level,
    pub rate: u32,
    pub count: i32,
    pub log_frequency: u32,
    /// Mode triton: the trace file; empty = tracing cannot be switched on.
    pub file: String,
    /// Mode-specific settings shown by the settings API after the common ones (Triton echoes
    /// the `--trace-config <mode>,<key>=<value>` it was given).
    pub extras: Vec<(String, String)>,
    pub otel: OtelConfig,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            mode: TraceMode::Triton,
            level: Level::OFF,
            rate: 1000,
            count: -1,
            log_frequency: 0,
            file: String::new(),
            extras: Vec::new(),
            otel: OtelConfig::default(),
        }
    }
}

/// The values a setting object runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resolved {
    level: Level,
    rate: u32,
    count: i32,
    log_frequency: u32,
}

#[derive(Default)]
struct Counters {
    /// What is left of the count (-1: unlimited).
    count: i32,
    /// Requests that reached this setting's sampler.
    sampled: u64,
    collected: u64,
    in_stream: u64,
    buffer: Vec<String>,
}

/// One setting in force (the global one, or a model's).
struct Active {
    values: Resolved,
    mode: TraceMode,
    file: Option<Arc<TraceFile>>,
    exporter: Option<Arc<otel::Exporter>>,
    counters: Mutex<Counters>,
}

impl Active {
    fn new(values: Resolved, shared: &Shared) -> Arc<Self> {
        Arc::new(Active {
            values,
            mode: shared.config.mode,
            file: shared.file.clone(),
            exporter: shared.exporter.clone(),
            counters: Mutex::new(Counters {
                count: values.count,
                ..Counters::default()
            }),
        })
    }

    /// Why this setting cannot trace (Triton's reasons; empty for a used-up count), `None`
    /// when it can.
    fn invalid_reason(&self, count: i32) -> Option<&'static str> {
        if self.values.level.is_off() {
            Some("tracing is disabled")
        } else if self.values.rate == 0 {
            Some("sample rate must be non-zero")
        } else if self.mode == TraceMode::Triton && self.file.is_none() {
            Some("trace file name is not given")
        } else if count == 0 {
            Some("")
        } else {
            None
        }
    }

    /// Triton's sampler: every `rate`-th request, while the count lasts; `forced` (a client's
    /// trace context in OpenTelemetry mode) traces the request anyway.
    fn sample(&self, forced: bool) -> bool {
        let mut c = self.counters.lock();
        let mut hit = false;
        if self.values.rate != 0 {
            if self.invalid_reason(c.count).is_some() && !forced {
                return false;
            }
            c.sampled += 1;
            hit = c.sampled.is_multiple_of(u64::from(self.values.rate));
            if hit && c.count > 0 {
                c.count -= 1;
            } else if hit && c.count == 0 {
                hit = false;
            }
        }
        hit || (forced && !self.values.level.is_off())
    }
}

impl TraceSink for Active {
    fn finish(&self, record: TraceRecord) {
        if let Some(exporter) = &self.exporter {
            exporter.export(record);
            return;
        }
        let Some(file) = &self.file else { return };
        let text = file::render(&record);
        let mut c = self.counters.lock();
        c.buffer.push(text);
        c.collected += 1;
        c.in_stream += 1;
        let frequency_reached =
            self.values.log_frequency != 0 && c.in_stream >= u64::from(self.values.log_frequency);
        let count_done = c.count == 0 && c.collected == c.sampled;
        if frequency_reached || count_done {
            let traces = std::mem::take(&mut c.buffer);
            c.in_stream = 0;
            drop(c);
            file.write_indexed(&traces);
        }
    }
}

impl Active {
    /// Saves what is still buffered (the setting is replaced, or the server stops): to the
    /// next `<file>.<n>` when the setting writes by frequency, else to the main file.
    fn save_remaining(&self) {
        let Some(file) = &self.file else { return };
        let traces = std::mem::take(&mut self.counters.lock().buffer);
        if self.values.log_frequency != 0 {
            file.write_indexed(&traces);
        } else {
            file.append(&traces);
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.save_remaining();
    }
}

struct Layers {
    /// What the global setting specifies itself (the rest comes from the start-up values).
    global_fields: Fields,
    global: Arc<Active>,
    /// Models with their own setting: what it specifies, and the object in force.
    models: HashMap<String, (Fields, Arc<Active>)>,
}

struct Shared {
    config: TraceConfig,
    file: Option<Arc<TraceFile>>,
    exporter: Option<Arc<otel::Exporter>>,
}

/// The server's tracing.
pub struct TraceManager {
    shared: Shared,
    layers: Mutex<Layers>,
    next_id: AtomicU64,
    /// Some setting in force traces at all (its level is not OFF): when none does, requests
    /// are not sampled and pay one atomic load, not the settings' locks.
    any_on: AtomicBool,
}

impl Layers {
    fn any_on(&self) -> bool {
        !self.global.values.level.is_off() || self.models.values().any(|(_, a)| !a.values.level.is_off())
    }
}

impl TraceManager {
    pub fn new(config: TraceConfig) -> std::result::Result<Self, String> {
        let file = (config.mode == TraceMode::Triton && !config.file.is_empty())
            .then(|| Arc::new(TraceFile::new(&config.file)));
        let exporter = match config.mode {
            TraceMode::OpenTelemetry => Some(Arc::new(otel::Exporter::start(&config.otel)?)),
            TraceMode::Triton => None,
        };
        let shared = Shared {
            config,
            file,
            exporter,
        };
        let defaults = Resolved {
            level: shared.config.level,
            rate: shared.config.rate,
            count: shared.config.count,
            log_frequency: shared.config.log_frequency,
        };
        let shared_level_off = defaults.level.is_off();
        let global = Active::new(defaults, &shared);
        Ok(TraceManager {
            shared,
            layers: Mutex::new(Layers {
                global_fields: Fields::default(),
                global,
                models: HashMap::new(),
            }),
            next_id: AtomicU64::new(1),
            any_on: AtomicBool::new(!shared_level_off),
        })
    }

    /// Tracing as a server without trace flags has it: off, every setting at Triton's default.
    pub fn disabled() -> Self {
        match Self::new(TraceConfig::default()) {
            Ok(m) => m,
            // Mode triton with no file never starts an exporter, so this cannot fail.
            Err(_) => unreachable!("the default trace configuration starts nothing"),
        }
    }

    fn active_for(&self, model: &str) -> Arc<Active> {
        let layers = self.layers.lock();
        layers
            .models
            .get(model)
            .map_or_else(|| Arc::clone(&layers.global), |(_, a)| Arc::clone(a))
    }

    /// A trace for a request to `model` when the settings sample it. `traceparent` is the
    /// client's W3C trace context: in OpenTelemetry mode a valid one forces the trace.
    pub fn sample(&self, model: &str, traceparent: Option<&str>) -> Option<Arc<Trace>> {
        if !self.any_on.load(Ordering::Acquire) {
            return None;
        }
        let active = self.active_for(model);
        let context = traceparent
            .filter(|_| self.shared.config.mode == TraceMode::OpenTelemetry)
            .filter(|t| otel::valid_traceparent(t));
        if !active.sample(context.is_some()) {
            return None;
        }
        let tensors = active.values.level.tensors && self.shared.config.mode == TraceMode::Triton;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Some(Arc::new(Trace::new(
            id,
            model,
            tensors,
            context.map(str::to_string),
            active as Arc<dyn TraceSink>,
        )))
    }

    /// The setting in force for `model` (its own, or the global one), as Triton shows it:
    /// keys in Triton's order, every value a list of strings.
    pub fn settings(&self, model: Option<&str>) -> Vec<(String, Vec<String>)> {
        let active = match model {
            Some(m) => self.active_for(m),
            None => Arc::clone(&self.layers.lock().global),
        };
        self.show(&active)
    }

    fn show(&self, active: &Active) -> Vec<(String, Vec<String>)> {
        let config = &self.shared.config;
        let v = active.values;
        let mut out = vec![
            ("trace_level".to_string(), v.level.names()),
            ("trace_rate".to_string(), vec![v.rate.to_string()]),
            (
                "trace_count".to_string(),
                vec![active.counters.lock().count.to_string()],
            ),
        ];
        if config.mode == TraceMode::Triton {
            out.push(("log_frequency".into(), vec![v.log_frequency.to_string()]));
            out.push(("trace_file".into(), vec![config.file.clone()]));
        }
        out.push(("trace_mode".into(), vec![config.mode.name().to_string()]));
        for (key, value) in &config.extras {
            match out.iter_mut().find(|(k, _)| k == key) {
                Some((_, values)) => values.push(value.clone()),
                None => out.push((key.clone(), vec![value.clone()])),
            }
        }
        out
    }

    /// Applies an update to the global setting or a model's, as Triton does: the fields it
    /// sets or clears change; a model setting left with nothing of its own is removed (the
    /// model follows the global one again); a global change reaches the models that inherit.
    pub fn update(&self, model: Option<&str>, update: &TraceUpdate) -> Result<Vec<(String, Vec<String>)>> {
        let mut layers = self.layers.lock();
        let applied = self.apply(&mut layers, model, update);
        // Whatever was applied (a global change stays when re-deriving a model fails, as in
        // Triton), the fast path follows it.
        self.any_on.store(layers.any_on(), Ordering::Release);
        drop(layers);
        applied.map(|shown| self.show(&shown))
    }

    /// [`Self::update`] on the locked settings: the setting to show afterwards.
    fn apply(&self, layers: &mut Layers, model: Option<&str>, update: &TraceUpdate) -> Result<Arc<Active>> {
        match model {
            None => {
                let fields = layers.global_fields.updated(update);
                let global = self.resolve(&fields, None)?;
                layers.global_fields = fields;
                layers.global = global;
                let names: Vec<String> = layers.models.keys().cloned().collect();
                for name in names {
                    let fields = layers.models[&name].0;
                    let derived = self.resolve(&fields, Some(&layers.global))?;
                    layers.models.insert(name, (fields, derived));
                }
                Ok(Arc::clone(&layers.global))
            }
            Some(m) => {
                let current = layers.models.get(m).map(|(f, _)| *f).unwrap_or_default();
                let fields = current.updated(update);
                if fields.is_empty() {
                    layers.models.remove(m);
                    return Ok(Arc::clone(&layers.global));
                }
                let active = self.resolve(&fields, Some(&layers.global))?;
                layers.models.insert(m.to_string(), (fields, Arc::clone(&active)));
                Ok(active)
            }
        }
    }

    /// A new setting object: `fields` over `inherit` (a model's) or over the start-up values
    /// (the global one), checked as Triton checks it.
    fn resolve(&self, fields: &Fields, inherit: Option<&Arc<Active>>) -> Result<Arc<Active>> {
        let config = &self.shared.config;
        let base = match inherit {
            Some(a) => Resolved {
                count: a.counters.lock().count,
                ..a.values
            },
            None => Resolved {
                level: config.level,
                rate: config.rate,
                count: config.count,
                log_frequency: config.log_frequency,
            },
        };
        let values = Resolved {
            level: fields.level.unwrap_or(base.level),
            rate: fields.rate.unwrap_or(base.rate),
            count: fields.count.unwrap_or(base.count),
            log_frequency: fields.log_frequency.unwrap_or(base.log_frequency),
        };
        let active = Active::new(values, &self.shared);
        if !values.level.is_off()
            && let Some(reason) = active.invalid_reason(values.count)
        {
            return Err(Error::invalid(format!(
                "Attempting to set invalid trace setting :{reason}"
            )));
        }
        Ok(active)
    }

    /// Writes what is buffered and closes the trace file's array (the server stops).
    pub fn shutdown(&self) {
        let mut layers = self.layers.lock();
        layers.global.save_remaining();
        for (_, a) in layers.models.values() {
            a.save_remaining();
        }
        layers.models.clear();
        drop(layers);
        if let Some(file) = &self.shared.file {
            file.close();
        }
        if let Some(exporter) = &self.shared.exporter {
            exporter.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::settings::{Change, Protocol, SettingValue, parse_update};
    use super::*;

    fn manager(file: &str, level: Level, rate: u32) -> TraceManager {
        TraceManager::new(TraceConfig {
            file: file.into(),
            level,
            rate,
            ..TraceConfig::default()
        })
        .unwrap()
    }

    const TIMESTAMPS: Level = Level {
        timestamps: true,
        tensors: false,
    };

    fn get(settings: &[(String, Vec<String>)], key: &str) -> String {
        settings
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.join("|"))
            .unwrap_or_default()
    }

    #[test]
    fn every_rate_th_request_is_traced_while_the_count_lasts() {
        let m = manager("/nonexistent/t.json", TIMESTAMPS, 3);
        let hits = (0..9).filter(|_| m.sample("m", None).is_some()).count();
        assert_eq!(hits, 3);
        m.update(
            None,
            &TraceUpdate {
                rate: Change::Set(1),
                count: Change::Set(2),
                ..TraceUpdate::default()
            },
        )
        .unwrap();
        let kept: Vec<_> = (0..5).filter_map(|_| m.sample("m", None)).collect();
        assert_eq!(kept.len(), 2);
        assert_eq!(get(&m.settings(Some("m")), "trace_count"), "0");
    }

    #[test]
    fn model_settings_inherit_and_fall_back_as_tritons() {
        let m = manager("t.json", TIMESTAMPS, 1);
        let model = |pairs: &[(&str, SettingValue)]| {
            let owned: Vec<(String, SettingValue)> =
                pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
            parse_update(&owned, Protocol::Http).unwrap()
        };
        let s = |v: &str| SettingValue::Values(vec![v.into()]);
        m.update(
            Some("simple"),
            &model(&[("trace_rate", s("12")), ("log_frequency", s("34"))]),
        )
        .unwrap();
        m.update(
            None,
            &model(&[
                ("trace_rate", s("56")),
                ("trace_count", s("78")),
                ("trace_level", s("OFF")),
            ]),
        )
        .unwrap();
        let g = m
            .update(
                None,
                &model(&[
                    ("trace_rate", SettingValue::Clear),
                    ("trace_count", SettingValue::Clear),
                ]),
            )
            .unwrap();
        assert_eq!(
            (
                get(&g, "trace_level"),
                get(&g, "trace_rate"),
                get(&g, "trace_count")
            ),
            ("OFF".into(), "1".into(), "-1".into())
        );
        let s_model = m.settings(Some("simple"));
        assert_eq!(
            (
                get(&s_model, "trace_level"),
                get(&s_model, "trace_rate"),
                get(&s_model, "log_frequency")
            ),
            ("OFF".into(), "12".into(), "34".into())
        );
        let cleared = m
            .update(
                Some("simple"),
                &model(&[
                    ("trace_rate", SettingValue::Clear),
                    ("trace_level", SettingValue::Clear),
                ]),
            )
            .unwrap();
        assert_eq!(
            (get(&cleared, "trace_rate"), get(&cleared, "log_frequency")),
            ("1".into(), "34".into())
        );
        assert_eq!(
            get(&m.settings(None), "trace_file"),
            "t.json",
            "the file shows as given on the command line"
        );
    }

    #[test]
    fn switching_a_level_on_or_off_reaches_the_sampler() {
        let m = manager("/nonexistent/t.json", Level::OFF, 1);
        assert!(m.sample("m", None).is_none());
        let on = TraceUpdate {
            level: Change::Set(TIMESTAMPS),
            ..TraceUpdate::default()
        };
        m.update(Some("m"), &on).unwrap();
        assert!(m.sample("m", None).is_some(), "the model's own level is on");
        assert!(m.sample("other", None).is_none(), "the global level is still off");
        let off = TraceUpdate {
            level: Change::Clear,
            ..TraceUpdate::default()
        };
        m.update(Some("m"), &off).unwrap();
        assert!(m.sample("m", None).is_none());
    }

    #[test]
    fn tracing_cannot_be_switched_on_without_a_file() {
        let m = manager("", Level::OFF, 1);
        let err = m
            .update(
                None,
                &TraceUpdate {
                    level: Change::Set(TIMESTAMPS),
                    ..TraceUpdate::default()
                },
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Attempting to set invalid trace setting :trace file name is not given"
        );
        assert!(m.sample("m", None).is_none());
    }
}
