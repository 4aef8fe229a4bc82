//! The ONNX Runtime backend against the real library, on the repository's own fixture models.
//!
//! These tests need the ONNX Runtime shared library. They find it the way the server does
//! (`ORT_DYLIB_PATH`, else the project's `.venv` made by `scripts/setup-python.sh`) and FAIL
//! with a message saying so when it cannot be loaded; they are never skipped silently.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use bytes::Bytes;
use oxserve_backend::{Accelerator, Backend, BackendErrorKind, Batch, Device, LoadSpec, ModelInstance};
use oxserve_core::{DataType, Tensor, TensorData, TensorMeta};
use oxserve_onnxruntime::{OrtBackend, OrtOptions};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(rel: &str) -> PathBuf {
    root().join(rel)
}

const ADD_SUB: &str = "examples/models/add_sub/1/model.onnx";
const STRINGS: &str = "tests/fixtures/models/string_identity/1/model.onnx";
const FP16: &str = "tests/fixtures/models/fp16_double/1/model.onnx";
const MIXED: &str = "tests/fixtures/models/mixed_types/1/model.onnx";

/// The backend with the library loaded; fails the test with instructions otherwise.
fn backend() -> &'static OrtBackend {
    static BACKEND: OnceLock<OrtBackend> = OnceLock::new();
    let backend = BACKEND.get_or_init(|| OrtBackend::new(OrtOptions::default()));
    if let Err(e) = backend.availability() {
        panic!(
            "these tests need the ONNX Runtime library and could not load it: {e}\n\
             Run scripts/setup-python.sh (it installs onnxruntime 1.32.0 into .venv) or set \
             ORT_DYLIB_PATH to a libonnxruntime.so."
        );
    }
    backend
}

fn meta(name: &str, datatype: DataType, shape: &[i64]) -> TensorMeta {
    TensorMeta {
        name: name.into(),
        datatype,
        shape: shape.to_vec(),
    }
}

fn spec(path: &Path, inputs: Vec<TensorMeta>, outputs: Vec<TensorMeta>, max_batch_size: u32) -> LoadSpec {
    LoadSpec {
        model_name: "m".into(),
        version: 1,
        model_path: path.to_path_buf(),
        inputs,
        outputs,
        max_batch_size,
        instance_count: 1,
        devices: vec![],
        graph_optimization_level: 0,
        parameters: BTreeMap::new(),
        gpu_accelerators: vec![],
    }
}

fn add_sub_spec(path: &Path) -> LoadSpec {
    spec(
        path,
        vec![
            meta("INPUT0", DataType::F32, &[-1, 16]),
            meta("INPUT1", DataType::F32, &[-1, 16]),
        ],
        vec![
            meta("OUTPUT0", DataType::F32, &[-1, 16]),
            meta("OUTPUT1", DataType::F32, &[-1, 16]),
        ],
        8,
    )
}

fn instance(spec: &LoadSpec) -> Box<dyn ModelInstance> {
    backend().load(spec).unwrap().new_instance(0).unwrap()
}

fn f32_raw(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    assert_eq!(t.datatype, DataType::F32);
    t.raw()
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn batch(inputs: Vec<Tensor>, outputs: &[&str]) -> Batch {
    Batch {
        inputs,
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
    }
}

fn add_sub_inputs(rows: usize) -> (Vec<f32>, Vec<f32>, Vec<Tensor>) {
    let a: Vec<f32> = (0..rows * 16).map(|i| i as f32 * 0.5 - 3.0).collect();
    let b: Vec<f32> = (0..rows * 16).map(|i| (i % 7) as f32 * 1.25).collect();
    let shape = vec![rows as i64, 16];
    let tensors = vec![
        Tensor::from_raw("INPUT0", DataType::F32, shape.clone(), f32_raw(&a)),
        Tensor::from_raw("INPUT1", DataType::F32, shape, f32_raw(&b)),
    ];
    (a, b, tensors)
}

#[test]
fn library_is_found_and_described() {
    let info = backend().availability().unwrap();
    assert!(info.starts_with("ONNX Runtime "), "{info}");
    assert!(info.contains("libonnxruntime"), "{info}");
    assert!(backend().library_path().is_some());
}

#[test]
fn inspect_reads_the_session_metadata() {
    let sig = backend().inspect(&fixture(ADD_SUB)).unwrap();
    let names: Vec<&str> = sig.inputs.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["INPUT0", "INPUT1"]);
    assert_eq!(sig.inputs[0].datatype, DataType::F32);
    assert_eq!(sig.inputs[0].shape, vec![-1, 16]);
    assert_eq!(sig.outputs.len(), 2);
    assert_eq!(sig.outputs[1].name, "OUTPUT1");

    let sig = backend().inspect(&fixture(MIXED)).unwrap();
    let types: Vec<DataType> = sig
        .inputs
        .iter()
        .chain(&sig.outputs)
        .map(|t| t.datatype)
        .collect();
    assert_eq!(
        types,
        [DataType::I64, DataType::F64, DataType::I32, DataType::Bool]
    );
    assert_eq!(sig.inputs[0].shape, vec![3]);
}

#[test]
fn add_sub_runs_with_aligned_and_unaligned_inputs() {
    let mut inst = instance(&add_sub_spec(&fixture(ADD_SUB)));
    let (a, b, inputs) = add_sub_inputs(3);
    let out = inst.execute(batch(inputs, &["OUTPUT0", "OUTPUT1"])).unwrap();
    assert_eq!(out[0].shape, vec![3, 16]);
    let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    let diff: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
    assert_eq!(f32s(&out[0]), sum);
    assert_eq!(f32s(&out[1]), diff);

    // Request bytes at an odd offset (the usual case for slices of a request body) are copied.
    let mut buf = vec![0u8];
    buf.extend(f32_raw(&a));
    let unaligned = Bytes::from(buf).slice(1..);
    let inputs = vec![
        Tensor::from_raw("INPUT0", DataType::F32, vec![3, 16], unaligned),
        Tensor::from_raw("INPUT1", DataType::F32, vec![3, 16], f32_raw(&b)),
    ];
    let out = inst.execute(batch(inputs, &["OUTPUT0"])).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(f32s(&out[0]), sum);

    // The instance reuses its staging copy: a smaller misaligned batch afterwards must see only
    // its own rows, and both inputs misaligned at different offsets must each be right.
    let (c, d, _) = add_sub_inputs(1);
    let misaligned = |values: &[f32], offset: usize| {
        let mut buf = vec![7u8; offset];
        buf.extend(f32_raw(values));
        Bytes::from(buf).slice(offset..)
    };
    let inputs = vec![
        Tensor::from_raw("INPUT0", DataType::F32, vec![1, 16], misaligned(&d, 3)),
        Tensor::from_raw("INPUT1", DataType::F32, vec![1, 16], misaligned(&c, 1)),
    ];
    let out = inst.execute(batch(inputs, &["OUTPUT1"])).unwrap();
    let expected: Vec<f32> = d.iter().zip(&c).map(|(x, y)| x - y).collect();
    assert_eq!(f32s(&out[0]), expected);
}

#[test]
fn outputs_come_back_in_request_order_and_by_default_all() {
    let mut inst = instance(&add_sub_spec(&fixture(ADD_SUB)));
    let (a, b, inputs) = add_sub_inputs(1);
    let out = inst
        .execute(batch(inputs.clone(), &["OUTPUT1", "OUTPUT0", "OUTPUT1"]))
        .unwrap();
    let names: Vec<&str> = out.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["OUTPUT1", "OUTPUT0", "OUTPUT1"]);
    assert_eq!(f32s(&out[0]), f32s(&out[2]));
    assert_eq!(f32s(&out[1])[0], a[0] + b[0]);
    let out = inst.execute(batch(inputs.clone(), &[])).unwrap();
    assert_eq!(out.len(), 2);
    let err = inst.execute(batch(inputs, &["NOPE"])).unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::InvalidInput);
    assert!(err.message().contains("'NOPE'"), "{}", err.message());
}

#[test]
fn bad_inputs_are_rejected_with_clear_messages() {
    let mut inst = instance(&add_sub_spec(&fixture(ADD_SUB)));
    let (_, _, good) = add_sub_inputs(2);
    let cases: Vec<(Vec<Tensor>, &str)> = vec![
        (vec![good[0].clone()], "expects 2 input(s)"),
        (
            vec![
                good[0].clone(),
                Tensor::from_raw("INPUT1", DataType::F32, vec![3, 16], f32_raw(&[0.0; 48])),
            ],
            "batch size 3",
        ),
        (
            vec![
                good[0].clone(),
                Tensor::from_raw("INPUT1", DataType::F32, vec![2, 15], f32_raw(&[0.0; 30])),
            ],
            "shape [2, 15]",
        ),
        (
            vec![
                good[0].clone(),
                Tensor::from_raw("INPUT1", DataType::I32, vec![2, 16], vec![0u8; 128]),
            ],
            "must be FP32, got INT32",
        ),
        (
            vec![
                good[0].clone(),
                Tensor::from_raw("INPUT1", DataType::F32, vec![2, 16], vec![0u8; 7]),
            ],
            "bytes",
        ),
        (vec![good[1].clone(), good[0].clone()], "expected input 'INPUT0'"),
    ];
    for (inputs, expected) in cases {
        let err = inst.execute(batch(inputs, &[])).unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::InvalidInput, "{}", err.message());
        assert!(
            err.message().contains(expected),
            "'{expected}' not in '{}'",
            err.message()
        );
    }
    // The instance still works afterwards.
    assert!(inst.execute(batch(good, &[])).is_ok());
}

#[test]
fn strings_are_byte_strings() {
    let path = fixture(STRINGS);
    let s = spec(
        &path,
        vec![meta("INPUT0", DataType::Bytes, &[-1, 1])],
        vec![meta("OUTPUT0", DataType::Bytes, &[-1, 1])],
        8,
    );
    let mut inst = instance(&s);
    let items = vec![
        Bytes::from_static(b"hello"),
        Bytes::from_static("héllo wörld".as_bytes()),
        Bytes::new(),
        Bytes::from_static(b"\xff\xfe not utf-8"),
        Bytes::from(vec![b'a'; 300]),
    ];
    let input = Tensor::new(
        "INPUT0",
        DataType::Bytes,
        vec![5, 1],
        TensorData::Strings(items.clone()),
    );
    let out = inst.execute(batch(vec![input], &[])).unwrap();
    assert_eq!(out[0].shape, vec![5, 1]);
    assert_eq!(out[0].data, TensorData::Strings(items));

    let nul = Tensor::new(
        "INPUT0",
        DataType::Bytes,
        vec![1, 1],
        TensorData::Strings(vec![Bytes::from_static(b"a\0b")]),
    );
    let err = inst.execute(batch(vec![nul], &[])).unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::InvalidInput);
    assert!(err.message().contains("NUL"), "{}", err.message());
}

#[test]
fn fp16_and_mixed_types_run_exactly() {
    let s = spec(
        &fixture(FP16),
        vec![meta("INPUT0", DataType::F16, &[-1, 4])],
        vec![meta("OUTPUT0", DataType::F16, &[-1, 4])],
        8,
    );
    let mut inst = instance(&s);
    let xs = [1.5f32, -2.25, 1000.0, 0.0, 3.0, -0.5, 7.0, 8.125];
    let raw: Vec<u8> = xs
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect();
    let out = inst
        .execute(batch(
            vec![Tensor::from_raw("INPUT0", DataType::F16, vec![2, 4], raw)],
            &[],
        ))
        .unwrap();
    let got: Vec<f32> = out[0]
        .raw()
        .unwrap()
        .chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    let want: Vec<f32> = xs.iter().map(|v| v * 2.0).collect();
    assert_eq!(got, want);

    let s = spec(
        &fixture(MIXED),
        vec![meta("A", DataType::I64, &[3]), meta("B", DataType::F64, &[3])],
        vec![
            meta("A_INT32", DataType::I32, &[3]),
            meta("A_GT_B", DataType::Bool, &[3]),
        ],
        0,
    );
    let mut inst = instance(&s);
    let a: Vec<u8> = [5i64, -7, 100].iter().flat_map(|v| v.to_le_bytes()).collect();
    let b: Vec<u8> = [4.5f64, -6.5, 100.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let out = inst
        .execute(batch(
            vec![
                Tensor::from_raw("A", DataType::I64, vec![3], a),
                Tensor::from_raw("B", DataType::F64, vec![3], b),
            ],
            &[],
        ))
        .unwrap();
    let ints: Vec<u8> = [5i32, -7, 100].iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(out[0].raw().unwrap().to_vec(), ints);
    assert_eq!(out[1].raw().unwrap().to_vec(), vec![1u8, 0, 0]);
}

#[test]
fn configuration_that_disagrees_with_the_model_fails_the_load() {
    let path = fixture(ADD_SUB);
    type Edit = fn(&mut LoadSpec);
    let cases: [(&str, Edit); 6] = [
        ("configured as INT32 but the model declares FP32", |s| {
            s.inputs[0].datatype = DataType::I32
        }),
        ("configured with shape [-1, 15]", |s| {
            s.inputs[1].shape = vec![-1, 15]
        }),
        ("not in the model", |s| s.inputs[1].name = "NOPE".into()),
        ("twice", |s| s.inputs[1].name = "INPUT0".into()),
        ("variable batch dimension", |s| {
            s.inputs[0].shape = vec![4, 16];
            s.inputs[1].shape = vec![4, 16];
        }),
        ("output(s) [\"OUT\"] not in the model", |s| {
            s.outputs[0].name = "OUT".into()
        }),
    ];
    for (expected, edit) in cases {
        let mut s = add_sub_spec(&path);
        edit(&mut s);
        let err = backend().load(&s).err().unwrap();
        assert_eq!(err.kind(), BackendErrorKind::InvalidModel, "{}", err.message());
        assert!(
            err.message().contains(expected),
            "'{expected}' not in '{}'",
            err.message()
        );
        assert!(err.message().contains("model.onnx"), "{}", err.message());
    }
}

#[test]
fn broken_files_fail_the_load_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(fixture(ADD_SUB)).unwrap();
    let truncated = dir.path().join("truncated.onnx");
    std::fs::write(&truncated, &good[..good.len() / 2]).unwrap();
    let text = dir.path().join("text.onnx");
    std::fs::write(&text, b"this is not an ONNX model\n").unwrap();
    let empty = dir.path().join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    let missing = dir.path().join("missing.onnx");
    for (path, expected) in [
        (&truncated, "truncated.onnx"),
        (&text, "text.onnx"),
        (&empty, "empty"),
        (&missing, "cannot open"),
    ] {
        let err = backend().load(&add_sub_spec(path)).err().unwrap();
        assert_eq!(err.kind(), BackendErrorKind::InvalidModel, "{}", err.message());
        assert!(
            err.message().contains(expected),
            "'{expected}' not in '{}'",
            err.message()
        );
        assert!(
            !err.message().contains(&dir.path().display().to_string()),
            "the message leaks the directory: {}",
            err.message()
        );
        assert!(backend().inspect(path).is_err());
    }
}

#[test]
fn session_options_come_from_the_parameters() {
    let path = fixture(ADD_SUB);
    let mut s = add_sub_spec(&path);
    s.instance_count = 2;
    s.graph_optimization_level = 2;
    s.parameters = [
        ("intra_op_thread_count", "2"),
        ("inter_op_thread_count", "2"),
        ("execution_mode", "1"),
        ("enable_mem_pattern", "false"),
        ("session.intra_op.allow_spinning", "0"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let loaded = backend().load(&s).unwrap();
    for index in 0..2 {
        let mut inst = loaded.new_instance(index).unwrap();
        let (a, b, inputs) = add_sub_inputs(2);
        let out = inst.execute(batch(inputs, &["OUTPUT0"])).unwrap();
        assert_eq!(f32s(&out[0])[5], a[5] + b[5]);
    }

    s.parameters.insert("execution_mode".into(), "fast".into());
    let err = backend().load(&s).err().unwrap();
    assert!(err.message().contains("execution_mode"), "{}", err.message());

    let mut s = add_sub_spec(&path);
    s.parameters.insert("session.no.such.option".into(), "1".into());
    // ONNX Runtime accepts unknown configuration keys; the load must still succeed.
    assert!(backend().load(&s).is_ok());

    let mut s = add_sub_spec(&path);
    s.graph_optimization_level = 7;
    let err = backend().load(&s).err().unwrap();
    assert!(err.message().contains("level: 7"), "{}", err.message());
}

#[test]
fn kind_gpu_needs_the_cuda_execution_provider() {
    let mut s = add_sub_spec(&fixture(ADD_SUB));
    s.devices = vec![Device::Gpu(0)];
    let cuda = backend().availability().unwrap();
    match backend().load(&s) {
        // Only with the onnxruntime-gpu library and a GPU: the model runs there.
        Ok(loaded) => {
            let mut inst = loaded.new_instance(0).unwrap();
            let (a, b, inputs) = add_sub_inputs(2);
            let out = inst.execute(batch(inputs, &["OUTPUT1"])).unwrap();
            assert_eq!(f32s(&out[0])[3], a[3] - b[3]);
            eprintln!("KIND_GPU ran on the CUDA execution provider ({cuda})");
        }
        Err(err) => {
            assert_eq!(err.kind(), BackendErrorKind::Unsupported, "{}", err.message());
            assert!(
                err.message()
                    .contains("CUDA execution provider not available in the loaded onnxruntime library")
                    || err.message().contains("cannot use GPU 0"),
                "{}",
                err.message()
            );
        }
    }
    // CUDA options: one the provider knows runs; a misspelled one fails the load naming it
    // (ONNX Runtime checks them); without CUDA the load fails for that reason first.
    let cuda_spec = |params: &[(&str, &str)]| {
        let mut s = add_sub_spec(&fixture(ADD_SUB));
        s.devices = vec![Device::Gpu(0)];
        s.gpu_accelerators = vec![Accelerator {
            name: "cuda".into(),
            parameters: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }];
        s
    };
    let known = backend().load(&cuda_spec(&[
        ("use_tf32", "0"),
        ("cudnn_conv_algo_search", "HEURISTIC"),
    ]));
    let misspelled = backend().load(&cuda_spec(&[("use_tf3", "0")]));
    match known {
        Ok(loaded) => {
            let mut inst = loaded.new_instance(0).unwrap();
            let (a, b, inputs) = add_sub_inputs(2);
            let out = inst.execute(batch(inputs, &["OUTPUT0"])).unwrap();
            assert_eq!(f32s(&out[0])[3], a[3] + b[3]);
            let err = misspelled
                .err()
                .expect("an unknown CUDA option must fail the load");
            assert!(err.message().contains("use_tf3"), "{}", err.message());
        }
        Err(err) => {
            assert!(err.message().contains("KIND_GPU"), "{}", err.message());
            assert!(misspelled.is_err());
        }
    }
    // Only the CUDA execution provider is there to take GPU options.
    let mut s = cuda_spec(&[]);
    s.gpu_accelerators[0].name = "tensorrt".into();
    let err = backend().load(&s).err().unwrap();
    assert!(
        err.message().contains("'tensorrt' is not available"),
        "{}",
        err.message()
    );

    // A CPU first instance with a GPU second one fails the load too, not the instance start.
    let mut s = add_sub_spec(&fixture(ADD_SUB));
    s.instance_count = 2;
    s.devices = vec![Device::Cpu, Device::Gpu(0)];
    if let Err(err) = backend().load(&s) {
        assert!(err.message().contains("KIND_GPU"), "{}", err.message());
    }
}

#[test]
fn a_missing_library_is_a_clear_error() {
    let b = OrtBackend::new(OrtOptions {
        library: Some(PathBuf::from("/no/such/dir/libonnxruntime.so.1.32.0")),
    });
    let err = b.availability().unwrap_err();
    assert!(
        err.message().contains("/no/such/dir/libonnxruntime.so.1.32.0")
            && err.message().contains("does not exist"),
        "{}",
        err.message()
    );
    let err = b.load(&add_sub_spec(&fixture(ADD_SUB))).err().unwrap();
    assert!(err.message().contains("does not exist"), "{}", err.message());
    assert!(b.inspect(&fixture(ADD_SUB)).is_err());
}
