//! Triton's trace settings as values: the level, rate, count and log frequency, which of them
//! a global or model setting specifies itself, how an update from the settings API is read
//! (Triton's parsing and error texts, for HTTP and gRPC alike), and how a setting is shown.

use oxserve_core::{Error, ErrorKind, Result};

/// Triton's trace level: OFF, or TIMESTAMPS and/or TENSORS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Level {
    pub timestamps: bool,
    pub tensors: bool,
}

impl Level {
    pub const OFF: Level = Level {
        timestamps: false,
        tensors: false,
    };

    pub fn is_off(self) -> bool {
        !self.timestamps && !self.tensors
    }

    /// As the settings API shows it.
    pub fn names(self) -> Vec<String> {
        if self.is_off() {
            return vec!["OFF".into()];
        }
        let mut names = Vec::new();
        if self.timestamps {
            names.push("TIMESTAMPS".into());
        }
        if self.tensors {
            names.push("TENSORS".into());
        }
        names
    }

    /// A `level=` value of `--trace-config` / `--trace-level` (Triton's, case-insensitive):
    /// `None` for OFF (which overrides every other level given).
    pub fn from_flag(value: &str) -> std::result::Result<Option<Level>, String> {
        match value.to_ascii_lowercase().as_str() {
            "false" | "off" => Ok(None),
            "true" | "on" | "min" | "max" | "timestamps" => Ok(Some(Level {
                timestamps: true,
                tensors: false,
            })),
            "tensors" => Ok(Some(Level {
                timestamps: false,
                tensors: true,
            })),
            _ => Err(format!("invalid value for trace level option: {value}")),
        }
    }

    pub fn union(self, other: Level) -> Level {
        Level {
            timestamps: self.timestamps || other.timestamps,
            tensors: self.tensors || other.tensors,
        }
    }
}

/// The fields of a setting; `None` = not specified by this setting (inherited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fields {
    pub level: Option<Level>,
    pub rate: Option<u32>,
    pub count: Option<i32>,
    pub log_frequency: Option<u32>,
}

impl Fields {
    pub fn is_empty(&self) -> bool {
        *self == Fields::default()
    }

    /// These fields over `update`: set ones replace, cleared ones become unspecified.
    pub fn updated(mut self, update: &TraceUpdate) -> Fields {
        update.level.apply(&mut self.level);
        update.rate.apply(&mut self.rate);
        update.count.apply(&mut self.count);
        update.log_frequency.apply(&mut self.log_frequency);
        self
    }
}

/// What an update does to one field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Change<T> {
    #[default]
    Keep,
    Set(T),
    /// Back to the inherited value (HTTP `null`, gRPC an empty value list).
    Clear,
}

impl<T: Copy> Change<T> {
    fn apply(self, field: &mut Option<T>) {
        match self {
            Change::Keep => {}
            Change::Set(v) => *field = Some(v),
            Change::Clear => *field = None,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TraceUpdate {
    pub level: Change<Level>,
    pub rate: Change<u32>,
    pub count: Change<i32>,
    pub log_frequency: Change<u32>,
}

/// One setting of an update request as the protocol carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingValue {
    Clear,
    Values(Vec<String>),
}

/// Which protocol sent an update: Triton's texts differ by a space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Grpc,
}

/// Reads an update in Triton's order (trace_file, trace_level, trace_rate, trace_count,
/// log_frequency), failing at the first bad setting before anything is applied. Other keys
/// are ignored, as Triton ignores them.
pub fn parse_update(settings: &[(String, SettingValue)], protocol: Protocol) -> Result<TraceUpdate> {
    let get = |key: &str| settings.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    if get("trace_file").is_some() {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "trace file location can not be updated through network protocol",
        ));
    }
    let mut update = TraceUpdate::default();
    if let Some(value) = get("trace_level") {
        update.level = match value {
            SettingValue::Clear => Change::Clear,
            SettingValue::Values(values) => level_change(values)?,
        };
    }
    if let Some(value) = get("trace_rate") {
        update.rate = match one("trace_rate", value)? {
            None => Change::Clear,
            Some(v) => Change::Set(stoi_u32("trace_rate", v)?),
        };
    }
    if let Some(value) = get("trace_count") {
        update.count = match one("trace_count", value)? {
            None => Change::Clear,
            Some(v) => {
                let n = stoi(v).map_err(|e| e.error("trace_count", v, "[ -1, 2147483647 ]"))?;
                if n < -1 {
                    let space = if protocol == Protocol::Grpc { " " } else { "" };
                    return Err(Error::invalid(format!(
                        "Unable to parse 'trace_count'. Expecting value >= -1, got:{space}{v}"
                    )));
                }
                Change::Set(n)
            }
        };
    }
    if let Some(value) = get("log_frequency") {
        update.log_frequency = match one("log_frequency", value)? {
            None => Change::Clear,
            Some(v) => Change::Set(stoi_u32("log_frequency", v)?),
        };
    }
    Ok(update)
}

fn level_change(values: &[String]) -> Result<Change<Level>> {
    let mut level = None::<Level>;
    for v in values {
        match v.as_str() {
            "OFF" if values.len() == 1 => return Ok(Change::Set(Level::OFF)),
            "OFF" => return Err(Error::invalid("Expect only one trace level 'OFF' is specified")),
            "TIMESTAMPS" => level.get_or_insert_default().timestamps = true,
            "TENSORS" => level.get_or_insert_default().tensors = true,
            // Triton ignores names it does not know.
            _ => {}
        }
    }
    Ok(level.map_or(Change::Keep, Change::Set))
}

/// The single value of a scalar setting; `None` to clear it.
fn one<'a>(name: &str, value: &'a SettingValue) -> Result<Option<&'a str>> {
    match value {
        SettingValue::Clear => Ok(None),
        SettingValue::Values(v) if v.is_empty() => Ok(None),
        SettingValue::Values(v) if v.len() == 1 => Ok(Some(&v[0])),
        SettingValue::Values(_) => Err(Error::invalid(format!("expect only 1 value for '{name}'"))),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum StoiError {
    Invalid,
    OutOfRange,
}

impl StoiError {
    fn error(self, name: &str, value: &str, range: &str) -> Error {
        Error::invalid(match self {
            StoiError::Invalid => format!("Unable to parse '{name}', got: {value}"),
            StoiError::OutOfRange => {
                format!("Unable to parse '{name}', value is out of range {range}, got: {value}")
            }
        })
    }
}

/// C++'s `std::stoi`, which Triton parses these settings with: leading whitespace, a sign,
/// digits, and anything after them ignored ("12abc" is 12); beyond 32 bits is out of range.
fn stoi(s: &str) -> std::result::Result<i32, StoiError> {
    let s = s.trim_start();
    let (negative, rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let digits: &str = &rest[..rest.bytes().take_while(u8::is_ascii_digit).count()];
    if digits.is_empty() {
        return Err(StoiError::Invalid);
    }
    let mut value: i64 = 0;
    for d in digits.bytes() {
        value = value * 10 + i64::from(d - b'0');
        if value > i64::from(i32::MAX) + 1 {
            return Err(StoiError::OutOfRange);
        }
    }
    let value = if negative { -value } else { value };
    i32::try_from(value).map_err(|_| StoiError::OutOfRange)
}

/// Triton's rate and log frequency: `stoi`, then taken as unsigned ("-1" is 4294967295).
fn stoi_u32(name: &str, value: &str) -> Result<u32> {
    stoi(value)
        .map(|n| n as u32)
        .map_err(|e| e.error(name, value, "[ 0, 4294967295 ]"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(v: &[&str]) -> SettingValue {
        SettingValue::Values(v.iter().map(|s| s.to_string()).collect())
    }

    fn parse(pairs: &[(&str, SettingValue)], protocol: Protocol) -> Result<TraceUpdate> {
        let owned: Vec<(String, SettingValue)> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        parse_update(&owned, protocol)
    }

    #[test]
    fn numbers_parse_as_stoi_does() {
        assert_eq!(stoi("12abc"), Ok(12));
        assert_eq!(stoi("  -7"), Ok(-7));
        assert_eq!(stoi("1.5"), Ok(1));
        assert_eq!(stoi("abc"), Err(StoiError::Invalid));
        assert_eq!(stoi("10000000000"), Err(StoiError::OutOfRange));
        assert_eq!(stoi_u32("trace_rate", "-1").unwrap(), u32::MAX);
    }

    #[test]
    fn updates_follow_tritons_rules_and_texts() {
        let u = parse(
            &[
                ("trace_level", values(&["TENSORS", "TIMESTAMPS", "BOGUS"])),
                ("trace_rate", values(&["5"])),
            ],
            Protocol::Http,
        )
        .unwrap();
        assert_eq!(
            u.level,
            Change::Set(Level {
                timestamps: true,
                tensors: true
            })
        );
        assert_eq!(u.rate, Change::Set(5));
        assert_eq!(
            parse(&[("trace_level", values(&[]))], Protocol::Http)
                .unwrap()
                .level,
            Change::Keep
        );
        assert_eq!(
            parse(&[("trace_count", SettingValue::Clear)], Protocol::Http)
                .unwrap()
                .count,
            Change::Clear
        );
        let err = |pairs: &[(&str, SettingValue)], p| parse(pairs, p).unwrap_err().to_string();
        assert!(err(&[("trace_file", SettingValue::Clear)], Protocol::Http).contains("can not be updated"));
        assert!(
            err(&[("trace_level", values(&["OFF", "TENSORS"]))], Protocol::Http)
                .contains("only one trace level 'OFF'")
        );
        assert!(
            err(&[("trace_count", values(&["-2"]))], Protocol::Http)
                .ends_with("Expecting value >= -1, got:-2")
        );
        assert!(
            err(&[("trace_count", values(&["-2"]))], Protocol::Grpc)
                .ends_with("Expecting value >= -1, got: -2")
        );
        assert!(
            err(&[("trace_rate", values(&["x"]))], Protocol::Http)
                .ends_with("Unable to parse 'trace_rate', got: x")
        );
        assert!(
            err(&[("log_frequency", values(&["10000000000"]))], Protocol::Http)
                .contains("out of range [ 0, 4294967295 ]")
        );
        assert!(err(&[("trace_rate", values(&["1", "2"]))], Protocol::Grpc).contains("expect only 1 value"));
    }

    #[test]
    fn cleared_fields_become_unspecified() {
        let f = Fields {
            rate: Some(3),
            count: Some(4),
            ..Fields::default()
        };
        let u = TraceUpdate {
            rate: Change::Clear,
            log_frequency: Change::Set(2),
            ..TraceUpdate::default()
        };
        assert_eq!(
            f.updated(&u),
            Fields {
                count: Some(4),
                log_frequency: Some(2),
                ..Fields::default()
            }
        );
    }
}
