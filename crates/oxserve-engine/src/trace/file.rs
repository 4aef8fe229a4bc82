//! Triton's trace file (mode `triton`): traces as one JSON array. Every `log_frequency`
//! traces (or when the count runs out) the buffered ones go to `<file>.<n>`, each a whole
//! array; the rest are appended to `<file>` itself, whose array is closed when the server
//! stops. No trace, no file.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use oxserve_core::{TensorData, TraceEvent, TraceRecord, unix_nanos};
use parking_lot::Mutex;

pub(crate) struct TraceFile {
    path: PathBuf,
    /// The next `<file>.<n>`, shared by every setting writing to this file.
    next_index: AtomicU32,
    main: Mutex<Main>,
}

/// The main file: not yet written, its array open, or closed at shutdown (a trace finishing
/// after that is dropped rather than starting the file over).
enum Main {
    NotOpen,
    Open(File),
    Closed,
}

impl TraceFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        TraceFile {
            path: path.into(),
            next_index: AtomicU32::new(0),
            main: Mutex::new(Main::NotOpen),
        }
    }

    /// Writes traces to the next indexed file, as a complete array.
    pub fn write_indexed(&self, traces: &[String]) {
        if traces.is_empty() {
            return;
        }
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{index}"));
        let text = format!("[{}]", traces.join(","));
        if let Err(e) = std::fs::write(&name, text) {
            tracing::error!(file = %PathBuf::from(&name).display(), error = %e, "cannot write the trace file");
        }
    }

    /// Appends traces to the main file's array (opening it, and the array, at the first).
    pub fn append(&self, traces: &[String]) {
        if traces.is_empty() {
            return;
        }
        let mut main = self.main.lock();
        let first = matches!(*main, Main::NotOpen);
        if first {
            match File::create(&self.path) {
                Ok(f) => *main = Main::Open(f),
                Err(e) => {
                    tracing::error!(file = %self.path.display(), error = %e, "cannot create the trace file");
                    return;
                }
            }
        }
        let Main::Open(file) = &mut *main else {
            tracing::warn!(
                traces = traces.len(),
                "traces finished after the trace file was closed"
            );
            return;
        };
        let text = format!("{}{}", if first { "[" } else { "," }, traces.join(","));
        if let Err(e) = file.write_all(text.as_bytes()) {
            tracing::error!(file = %self.path.display(), error = %e, "cannot write the trace file");
        }
    }

    /// Closes the main file's array (at shutdown).
    pub fn close(&self) {
        if let Main::Open(mut file) = std::mem::replace(&mut *self.main.lock(), Main::Closed) {
            let _ = file.write_all(b"]").and_then(|()| file.flush());
        }
    }
}

/// One trace as Triton writes it: an object per event, the model object right before
/// `REQUEST_START`.
pub(crate) fn render(record: &TraceRecord) -> String {
    let id = record.id;
    let mut out = String::new();
    let mut model_written = false;
    let push = |out: &mut String, text: String| {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&text);
    };
    let model = || {
        let mut m = serde_json::Map::new();
        m.insert("id".into(), id.into());
        m.insert("model_name".into(), record.model_name.clone().into());
        m.insert("model_version".into(), record.model_version.into());
        if let Some(rid) = &record.request_id {
            m.insert("request_id".into(), rid.clone().into());
        }
        serde_json::Value::Object(m).to_string()
    };
    for event in &record.events {
        match event {
            TraceEvent::Timestamp { name, at } => {
                if *name == "REQUEST_START" && !model_written {
                    push(&mut out, model());
                    model_written = true;
                }
                push(
                    &mut out,
                    format!(
                        "{{\"id\":{id},\"timestamps\":[{{\"name\":\"{name}\",\"ns\":{}}}]}}",
                        unix_nanos(*at)
                    ),
                );
            }
            TraceEvent::Tensor { activity, tensor } => {
                let tensor_json = serde_json::json!({
                    "name": tensor.name,
                    "data": tensor_values(tensor),
                    "shape": tensor.shape.iter().map(i64::to_string).collect::<Vec<_>>().join(","),
                    "dtype": tensor.datatype.wire_name(),
                });
                push(
                    &mut out,
                    serde_json::json!({"id": id, "activity": activity, "tensor": tensor_json}).to_string(),
                );
            }
        }
    }
    if !model_written {
        push(&mut out, model());
    }
    out
}

/// A tensor's values, comma-separated, as Triton's trace shows them (strings quoted; FP16
/// and BF16 empty, as Triton leaves them).
fn tensor_values(t: &oxserve_core::Tensor) -> String {
    use oxserve_core::DataType as D;
    let mut out = String::new();
    let sep = |out: &mut String| {
        if !out.is_empty() {
            out.push(',');
        }
    };
    match &t.data {
        TensorData::Strings(items) => {
            for s in items {
                sep(&mut out);
                let _ = write!(out, "\"{}\"", String::from_utf8_lossy(s));
            }
        }
        TensorData::Raw(raw) => {
            macro_rules! each {
                ($ty:ty) => {
                    for chunk in raw.chunks_exact(std::mem::size_of::<$ty>()) {
                        sep(&mut out);
                        let v = <$ty>::from_le_bytes(chunk.try_into().unwrap_or_default());
                        let _ = write!(out, "{v}");
                    }
                };
            }
            match t.datatype {
                D::Bool | D::U8 => each!(u8),
                D::I8 => each!(i8),
                D::U16 => each!(u16),
                D::I16 => each!(i16),
                D::U32 => each!(u32),
                D::I32 => each!(i32),
                D::U64 => each!(u64),
                D::I64 => each!(i64),
                D::F32 => each!(f32),
                D::F64 => each!(f64),
                D::F16 | D::BF16 | D::Bytes => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxserve_core::{DataType, Tensor};
    use std::time::Instant;

    #[test]
    fn a_trace_renders_as_tritons_objects() {
        let at = Instant::now();
        let record = TraceRecord {
            id: 3,
            model_name: "m".into(),
            model_version: 1,
            request_id: Some("r".into()),
            traceparent: None,
            events: vec![
                TraceEvent::Timestamp {
                    name: "HTTP_RECV_START",
                    at,
                },
                TraceEvent::Timestamp {
                    name: "REQUEST_START",
                    at,
                },
                TraceEvent::Tensor {
                    activity: "TENSOR_QUEUE_INPUT",
                    tensor: Tensor::from_raw(
                        "X",
                        DataType::I32,
                        vec![1, 2],
                        [1i32, -2]
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect::<Vec<u8>>(),
                    ),
                },
            ],
        };
        let json: serde_json::Value = serde_json::from_str(&format!("[{}]", render(&record))).unwrap();
        let items = json.as_array().unwrap();
        assert_eq!(items.len(), 4);
        assert_eq!(items[0]["timestamps"][0]["name"], "HTTP_RECV_START");
        assert_eq!(items[1]["model_name"], "m");
        assert_eq!(items[1]["request_id"], "r");
        assert_eq!(items[2]["timestamps"][0]["name"], "REQUEST_START");
        assert_eq!(items[3]["tensor"]["data"], "1,-2");
        assert_eq!(items[3]["tensor"]["shape"], "1,2");
        assert_eq!(items[3]["tensor"]["dtype"], "INT32");
    }

    #[test]
    fn the_main_file_is_one_array_and_indexed_files_are_whole_arrays() {
        let dir = std::env::temp_dir().join(format!("oxserve-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = TraceFile::new(dir.join("t.json"));
        file.append(&["{\"id\":1}".into()]);
        file.append(&["{\"id\":2}".into(), "{\"id\":3}".into()]);
        file.close();
        file.write_indexed(&["{\"id\":4}".into()]);
        let main: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("t.json")).unwrap()).unwrap();
        assert_eq!(main.as_array().unwrap().len(), 3);
        let first: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("t.json.0")).unwrap()).unwrap();
        assert_eq!(first[0]["id"], 4);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
