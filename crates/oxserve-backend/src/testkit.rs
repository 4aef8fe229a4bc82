//! A test backend (`backend: "testkit"`) whose behaviour is declared in a small JSON model file,
//! for end-to-end tests of the scheduler and the front-ends through the real server: a model
//! that is deliberately slow, or that always fails, without any engine installed.
//!
//! The model file (`model.json`; set `default_model_filename: "model.json"` in config.pbtxt):
//!
//! ```json
//! {"inputs":  [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1]}],
//!  "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, -1]}],
//!  "delay_ms": 200, "op": "identity"}
//! ```
//!
//! Shapes are full model shapes (a leading `-1` is the batch dimension of a batching model).
//! Every execution first sleeps `delay_ms` (once per batch, like a real engine whose cost does
//! not grow with small batches), then runs `op`:
//!
//! - `identity` (the default): output `i` is a copy of input `i`, so each output needs an input
//!   at the same position with the same data type and rank.
//! - `fail`: every execution fails with an internal backend error.
//! - `panic`: every execution panics (an engine bug, as the scheduler sees it).
//!
//! Faults on top of `op`, for the instance-failure and load tests:
//!
//! - `"panic_on_executions": [2, 5]`: these executions panic (1-based, counted over all
//!   instances of the loaded version, across instance re-creations).
//! - `"panic_on_instance_creations": [1]`: these `new_instance` calls panic (1-based, counted
//!   the same way: `[1]` fails the first instance at load, `[2]` the first re-creation of a
//!   single-instance model).
//! - `"panic_in_load": true`: loading the model panics.
//!
//! Nothing is recorded outside the model: tests observe the server only through its protocols.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use oxserve_core::{DataType, Tensor, TensorMeta};
use serde::Deserialize;

use crate::{
    Backend, BackendError, BackendErrorKind, Batch, LoadSpec, LoadedModel, ModelInstance, ModelSignature,
};

/// The backend name to put in config.pbtxt.
pub const NAME: &str = "testkit";

/// What an execution does after its delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    #[default]
    Identity,
    Fail,
    Panic,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Identity => "identity",
            Op::Fail => "fail",
            Op::Panic => "panic",
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorJson {
    name: String,
    datatype: String,
    shape: Vec<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelJson {
    inputs: Vec<TensorJson>,
    outputs: Vec<TensorJson>,
    #[serde(default)]
    delay_ms: u64,
    #[serde(default)]
    op: Op,
    #[serde(default)]
    panic_on_executions: Vec<usize>,
    #[serde(default)]
    panic_on_instance_creations: Vec<usize>,
    #[serde(default)]
    panic_in_load: bool,
}

/// Deliberate panics, numbered from 1 over the loaded version's life.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    pub panic_on_executions: Vec<usize>,
    pub panic_on_instance_creations: Vec<usize>,
    pub panic_in_load: bool,
}

/// A parsed and checked model file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestModel {
    pub signature: ModelSignature,
    pub delay: Duration,
    pub op: Op,
    pub faults: Faults,
}

fn invalid(path: &Path, message: impl fmt::Display) -> BackendError {
    BackendError::new(
        BackendErrorKind::InvalidModel,
        format!("testkit model {}: {message}", path.display()),
    )
}

fn tensor_meta(path: &Path, role: &str, t: TensorJson) -> Result<TensorMeta, BackendError> {
    if t.name.is_empty() {
        return Err(invalid(path, format!("an {role} has an empty name")));
    }
    // Both the wire name ("FP32") and the configuration name ("TYPE_FP32") are accepted.
    let datatype = DataType::from_wire_name(&t.datatype)
        .or_else(|| DataType::from_config_name(&t.datatype))
        .ok_or_else(|| {
            invalid(
                path,
                format!("{role} '{}' has unknown datatype '{}'", t.name, t.datatype),
            )
        })?;
    if let Some(d) = t.shape.iter().find(|&&d| d < -1) {
        return Err(invalid(
            path,
            format!(
                "{role} '{}' has dimension {d} in shape {:?} (use -1 for variable)",
                t.name, t.shape
            ),
        ));
    }
    Ok(TensorMeta {
        name: t.name,
        datatype,
        shape: t.shape,
    })
}

fn dims_compatible(a: &[i64], b: &[i64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(&x, &y)| x == -1 || y == -1 || x == y)
}

impl TestModel {
    /// Parses a model file's text; `path` only names it in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<TestModel, BackendError> {
        let json: ModelJson = serde_json::from_str(text).map_err(|e| invalid(path, e))?;
        let mut names = std::collections::HashSet::new();
        let mut inputs = Vec::with_capacity(json.inputs.len());
        for t in json.inputs {
            inputs.push(tensor_meta(path, "input", t)?);
        }
        let mut outputs = Vec::with_capacity(json.outputs.len());
        for t in json.outputs {
            outputs.push(tensor_meta(path, "output", t)?);
        }
        for t in inputs.iter().chain(&outputs) {
            if !names.insert(t.name.as_str()) {
                return Err(invalid(path, format!("tensor name '{}' is used twice", t.name)));
            }
        }
        if outputs.is_empty() {
            return Err(invalid(path, "declares no outputs"));
        }
        if json.op == Op::Identity {
            for (i, out) in outputs.iter().enumerate() {
                let Some(input) = inputs.get(i) else {
                    return Err(invalid(
                        path,
                        format!(
                            "op identity: output '{}' (position {i}) has no input at the same position",
                            out.name
                        ),
                    ));
                };
                if input.datatype != out.datatype || !dims_compatible(&input.shape, &out.shape) {
                    return Err(invalid(
                        path,
                        format!(
                            "op identity: output '{}' ({} {:?}) cannot be a copy of input '{}' ({} {:?})",
                            out.name, out.datatype, out.shape, input.name, input.datatype, input.shape
                        ),
                    ));
                }
            }
        }
        Ok(TestModel {
            signature: ModelSignature { inputs, outputs },
            delay: Duration::from_millis(json.delay_ms),
            op: json.op,
            faults: Faults {
                panic_on_executions: json.panic_on_executions,
                panic_on_instance_creations: json.panic_on_instance_creations,
                panic_in_load: json.panic_in_load,
            },
        })
    }

    /// Reads and parses a model file.
    pub fn read(path: &Path) -> Result<TestModel, BackendError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| invalid(path, format!("cannot read it: {e}")))?;
        Self::parse(path, &text)
    }
}

/// The `testkit` backend.
#[derive(Debug, Default)]
pub struct TestkitBackend;

impl TestkitBackend {
    pub fn new() -> Self {
        TestkitBackend
    }
}

impl Backend for TestkitBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn inspect(&self, model_path: &Path) -> Result<ModelSignature, BackendError> {
        Ok(TestModel::read(model_path)?.signature)
    }

    fn load(&self, spec: &LoadSpec) -> Result<Box<dyn LoadedModel>, BackendError> {
        let model = TestModel::read(&spec.model_path)?;
        if model.faults.panic_in_load {
            panic!(
                "testkit model '{}' panics while loading, by design",
                spec.model_name
            );
        }
        // The configuration may list fewer outputs than the file; each one it lists must be
        // one the file declares (the model manager has checked names and types already).
        let mut output_index = Vec::with_capacity(spec.outputs.len());
        for o in &spec.outputs {
            let i = model
                .signature
                .outputs
                .iter()
                .position(|t| t.name == o.name)
                .ok_or_else(|| invalid(&spec.model_path, format!("has no output '{}'", o.name)))?;
            output_index.push((o.name.clone(), i));
        }
        Ok(Box::new(TestLoaded {
            name: spec.model_name.clone(),
            model,
            output_index,
            creations: AtomicUsize::new(0),
            executions: Arc::new(AtomicUsize::new(0)),
        }))
    }
}

struct TestLoaded {
    name: String,
    model: TestModel,
    /// Output name → its position in the model file (= the input it copies).
    output_index: Vec<(String, usize)>,
    /// `new_instance` calls so far.
    creations: AtomicUsize,
    /// Executions so far, shared by every instance this model makes.
    executions: Arc<AtomicUsize>,
}

impl LoadedModel for TestLoaded {
    fn new_instance(&self, index: usize) -> Result<Box<dyn ModelInstance>, BackendError> {
        let creation = self.creations.fetch_add(1, Ordering::SeqCst) + 1;
        if self.model.faults.panic_on_instance_creations.contains(&creation) {
            panic!(
                "testkit model '{}' panics creating instance #{index} (creation {creation}), by design",
                self.name
            );
        }
        Ok(Box::new(TestInstance {
            name: self.name.clone(),
            model: self.model.clone(),
            output_index: self.output_index.clone(),
            executions: Arc::clone(&self.executions),
        }))
    }
}

struct TestInstance {
    name: String,
    model: TestModel,
    output_index: Vec<(String, usize)>,
    executions: Arc<AtomicUsize>,
}

impl ModelInstance for TestInstance {
    fn execute(&mut self, batch: Batch) -> Result<Vec<Tensor>, BackendError> {
        if !self.model.delay.is_zero() {
            thread::sleep(self.model.delay);
        }
        let execution = self.executions.fetch_add(1, Ordering::SeqCst) + 1;
        if self.model.faults.panic_on_executions.contains(&execution) {
            panic!(
                "testkit model '{}' panics in execution {execution}, by design",
                self.name
            );
        }
        match self.model.op {
            Op::Panic => panic!(
                "testkit model '{}' panics in every execution, by design",
                self.name
            ),
            Op::Fail => Err({
                // As an engine reports its own failures, from the instance thread.
                tracing::warn!(model = %self.name, "testkit model failing by design");
                BackendError::new(
                    BackendErrorKind::Internal,
                    format!("testkit model '{}' fails by design (op \"fail\")", self.name),
                )
            }),
            Op::Identity => batch
                .outputs
                .iter()
                .map(|wanted| {
                    let position = self
                        .output_index
                        .iter()
                        .find(|(name, _)| name == wanted)
                        .map(|&(_, i)| i)
                        .ok_or_else(|| {
                            BackendError::new(
                                BackendErrorKind::InvalidInput,
                                format!("unknown output '{wanted}'"),
                            )
                        })?;
                    let input = batch.inputs.get(position).ok_or_else(|| {
                        BackendError::new(
                            BackendErrorKind::InvalidInput,
                            format!("output '{wanted}' copies input {position}, which the batch lacks"),
                        )
                    })?;
                    Ok(Tensor::new(
                        wanted.clone(),
                        input.datatype,
                        input.shape.clone(),
                        input.data.clone(),
                    ))
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::time::Instant;

    use oxserve_core::TensorData;

    use super::*;

    const TWO_IO: &str = r#"{"inputs":[{"name":"A","datatype":"FP32","shape":[-1,2]},
                                       {"name":"B","datatype":"TYPE_INT32","shape":[-1,3]}],
                             "outputs":[{"name":"X","datatype":"FP32","shape":[-1,2]},
                                        {"name":"Y","datatype":"INT32","shape":[-1,-1]}],
                             "delay_ms":20}"#;

    fn parse(text: &str) -> Result<TestModel, BackendError> {
        TestModel::parse(Path::new("m/1/model.json"), text)
    }

    fn spec(dir: &Path, outputs: &[&str]) -> LoadSpec {
        LoadSpec {
            model_name: "slow".into(),
            version: 1,
            model_path: dir.join("model.json"),
            inputs: vec![],
            outputs: outputs
                .iter()
                .map(|n| TensorMeta {
                    name: (*n).into(),
                    datatype: DataType::F32,
                    shape: vec![-1, 2],
                })
                .collect(),
            max_batch_size: 8,
            instance_count: 1,
            devices: vec![],
            graph_optimization_level: 0,
            parameters: BTreeMap::new(),
            gpu_accelerators: vec![],
        }
    }

    fn write_model(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model.json"), text).unwrap();
        let p = dir.path().to_path_buf();
        (dir, p)
    }

    #[test]
    fn parses_a_model_file() {
        let m = parse(TWO_IO).unwrap();
        assert_eq!(m.op, Op::Identity);
        assert_eq!(m.delay, Duration::from_millis(20));
        assert_eq!(m.signature.inputs[1].datatype, DataType::I32);
        assert_eq!(m.signature.outputs[1].shape, vec![-1, -1]);
        let m = parse(r#"{"inputs":[],"outputs":[{"name":"Y","datatype":"FP32","shape":[1]}],"op":"fail"}"#)
            .unwrap();
        assert_eq!((m.op, m.delay), (Op::Fail, Duration::ZERO));
    }

    #[test]
    fn bad_model_files_say_what_is_wrong() {
        let cases = [
            ("{", "EOF"),
            (r#"{"inputs":[],"outputs":[]}"#, "declares no outputs"),
            (
                r#"{"inputs":[{"name":"A","datatype":"FP99","shape":[1]}],"outputs":[{"name":"B","datatype":"FP32","shape":[1]}]}"#,
                "unknown datatype 'FP99'",
            ),
            (
                r#"{"inputs":[{"name":"A","datatype":"FP32","shape":[1]}],"outputs":[{"name":"B","datatype":"FP32","shape":[1]}],"op":"explode"}"#,
                "unknown variant `explode`",
            ),
            (
                r#"{"inputs":[{"name":"A","datatype":"FP32","shape":[1]}],"outputs":[{"name":"B","datatype":"FP32","shape":[1]}],"delay":3}"#,
                "unknown field `delay`",
            ),
            (
                r#"{"inputs":[{"name":"A","datatype":"FP32","shape":[1]}],"outputs":[{"name":"B","datatype":"INT8","shape":[1]}]}"#,
                "cannot be a copy of input 'A'",
            ),
            (
                r#"{"inputs":[],"outputs":[{"name":"B","datatype":"FP32","shape":[1]}]}"#,
                "has no input at the same position",
            ),
            (
                r#"{"inputs":[{"name":"A","datatype":"FP32","shape":[-2]}],"outputs":[{"name":"A","datatype":"FP32","shape":[1]}]}"#,
                "dimension -2",
            ),
            (
                r#"{"inputs":[{"name":"A","datatype":"FP32","shape":[1]}],"outputs":[{"name":"A","datatype":"FP32","shape":[1]}]}"#,
                "used twice",
            ),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err();
            assert_eq!(e.kind(), BackendErrorKind::InvalidModel);
            assert!(e.message().contains(want), "{text}: {}", e.message());
            assert!(e.message().contains("m/1/model.json"), "{}", e.message());
        }
        let e = TestkitBackend::new()
            .inspect(Path::new("/nonexistent/model.json"))
            .unwrap_err();
        assert!(e.message().contains("cannot read it"), "{}", e.message());
    }

    #[test]
    fn identity_copies_inputs_by_position_after_the_delay() {
        let (_dir, path) = write_model(TWO_IO);
        let backend = TestkitBackend::new();
        assert_eq!(backend.inspect(&path.join("model.json")).unwrap().inputs.len(), 2);
        let loaded = backend.load(&spec(&path, &["Y", "X"])).unwrap();
        let mut instance = loaded.new_instance(0).unwrap();
        let a = Tensor::from_raw("A", DataType::F32, vec![1, 2], f32s(&[1.0, 2.0]));
        let b = Tensor::from_raw("B", DataType::I32, vec![1, 3], i32s(&[7, 8, 9]));
        let started = Instant::now();
        let out = instance
            .execute(Batch {
                inputs: vec![a.clone(), b.clone()],
                outputs: vec!["Y".into(), "X".into()],
            })
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(20));
        assert_eq!(out[0].name, "Y");
        assert_eq!(
            (out[0].datatype, &out[0].shape, &out[0].data),
            (b.datatype, &b.shape, &b.data)
        );
        assert_eq!(out[1].name, "X");
        assert_eq!(out[1].data, a.data);
        let e = instance
            .execute(Batch {
                inputs: vec![a],
                outputs: vec!["Z".into()],
            })
            .unwrap_err();
        assert_eq!(e.kind(), BackendErrorKind::InvalidInput);
        assert!(backend.load(&spec(&path, &["nope"])).is_err());
    }

    #[test]
    fn fail_op_fails_every_execution() {
        let (_dir, path) = write_model(
            r#"{"inputs":[{"name":"A","datatype":"FP32","shape":[-1,2]}],"outputs":[{"name":"X","datatype":"FP32","shape":[-1,2]}],"op":"fail"}"#,
        );
        let loaded = TestkitBackend::new().load(&spec(&path, &["X"])).unwrap();
        let mut instance = loaded.new_instance(0).unwrap();
        let e = instance
            .execute(Batch {
                inputs: vec![Tensor::new(
                    "A",
                    DataType::F32,
                    vec![0, 2],
                    TensorData::Raw(Default::default()),
                )],
                outputs: vec!["X".into()],
            })
            .unwrap_err();
        assert_eq!(e.kind(), BackendErrorKind::Internal);
        assert!(e.message().contains("fails by design"));
    }

    const ONE_IO: &str = r#"{"inputs":[{"name":"A","datatype":"FP32","shape":[-1,2]}],
                             "outputs":[{"name":"X","datatype":"FP32","shape":[-1,2]}]"#;

    fn run(instance: &mut Box<dyn ModelInstance>) -> std::thread::Result<Result<Vec<Tensor>, BackendError>> {
        let batch = Batch {
            inputs: vec![Tensor::from_raw(
                "A",
                DataType::F32,
                vec![1, 2],
                f32s(&[1.0, 2.0]),
            )],
            outputs: vec!["X".into()],
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| instance.execute(batch)))
    }

    #[test]
    fn panic_faults_fire_where_declared() {
        let (_dir, path) = write_model(&format!(
            "{ONE_IO}, \"panic_on_executions\": [2], \"panic_on_instance_creations\": [2]}}"
        ));
        let m = TestModel::read(&path.join("model.json")).unwrap();
        assert_eq!(m.faults.panic_on_executions, vec![2]);
        let loaded = TestkitBackend::new().load(&spec(&path, &["X"])).unwrap();
        let mut first = loaded.new_instance(0).unwrap();
        assert!(run(&mut first).unwrap().is_ok());
        // Execution 2 panics; executions are counted over the model, not the instance.
        assert!(run(&mut first).is_err());
        let second = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loaded.new_instance(0)));
        assert!(second.is_err(), "creation 2 must panic");
        let mut third = loaded.new_instance(0).unwrap();
        assert!(run(&mut third).unwrap().is_ok());

        let (_dir, path) = write_model(&format!("{ONE_IO}, \"op\": \"panic\"}}"));
        let loaded = TestkitBackend::new().load(&spec(&path, &["X"])).unwrap();
        let mut instance = loaded.new_instance(0).unwrap();
        assert!(run(&mut instance).is_err());
        assert!(run(&mut instance).is_err());

        let (_dir, path) = write_model(&format!("{ONE_IO}, \"panic_in_load\": true}}"));
        let backend = TestkitBackend::new();
        assert!(backend.inspect(&path.join("model.json")).is_ok());
        let load = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            backend.load(&spec(&path, &["X"]))
        }));
        assert!(load.is_err(), "the load must panic");
    }

    fn f32s(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn i32s(values: &[i32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}
