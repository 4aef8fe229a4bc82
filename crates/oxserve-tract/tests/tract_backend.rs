//! The tract backend against small ONNX models built in Rust.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use common::*;
use half::f16;
use oxserve_backend::{Backend, BackendErrorKind, Batch, LoadSpec, LoadedModel, ModelInstance};
use oxserve_core::{DataType, Tensor, TensorData};
use oxserve_tract::TractBackend;
use tempfile::TempDir;

/// sum = a + b, diff = a - b; a, b: FP32 [N, 16].
fn add_sub_model(dir: &TempDir) -> PathBuf {
    let m = model(
        vec![
            node("Add", &["a", "b"], &["sum"]),
            node("Sub", &["a", "b"], &["diff"]),
        ],
        vec![
            value("a", OnnxType::Float, Some(&[D::P("N"), D::V(16)])),
            value("b", OnnxType::Float, Some(&[D::P("N"), D::V(16)])),
        ],
        vec![
            value("sum", OnnxType::Float, Some(&[D::P("N"), D::V(16)])),
            value("diff", OnnxType::Float, Some(&[D::P("N"), D::V(16)])),
        ],
        vec![],
    );
    write(dir.path(), "model.onnx", &m)
}

fn add_sub_spec(path: &std::path::Path) -> LoadSpec {
    spec(
        path,
        vec![
            meta("a", DataType::F32, &[-1, 16]),
            meta("b", DataType::F32, &[-1, 16]),
        ],
        vec![
            meta("sum", DataType::F32, &[-1, 16]),
            meta("diff", DataType::F32, &[-1, 16]),
        ],
        8,
    )
}

fn instance(spec: &LoadSpec) -> Box<dyn ModelInstance> {
    let loaded: Box<dyn LoadedModel> = TractBackend.load(spec).unwrap();
    loaded.new_instance(0).unwrap()
}

fn batch(inputs: Vec<Tensor>, outputs: &[&str]) -> Batch {
    Batch {
        inputs,
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
    }
}

fn ab(n: usize) -> (Vec<f32>, Vec<f32>) {
    let a = (0..n * 16).map(|i| i as f32 * 0.5 - 3.0).collect();
    let b = (0..n * 16).map(|i| (i * 7 % 13) as f32 * 1.25).collect();
    (a, b)
}

#[test]
fn name_is_tract() {
    assert_eq!(TractBackend.name(), "tract");
}

#[test]
fn add_sub_runs_batches_of_one_and_three() {
    let dir = TempDir::new().unwrap();
    let path = add_sub_model(&dir);
    let mut inst = instance(&add_sub_spec(&path));
    // 3, 1, 3 again: the reused tract state must not keep the previous batch size.
    for n in [1usize, 3, 1, 3] {
        let (a, b) = ab(n);
        let shape = [n as i64, 16];
        let out = inst
            .execute(batch(
                vec![f32_tensor("a", &shape, &a), f32_tensor("b", &shape, &b)],
                &["sum", "diff"],
            ))
            .unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].name, "sum");
        assert_eq!(out[0].datatype, DataType::F32);
        assert_eq!(out[0].shape, shape.to_vec());
        assert_eq!(out[1].name, "diff");
        assert_eq!(out[1].shape, shape.to_vec());
        let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        let diff: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
        assert_eq!(f32s(&out[0]), sum);
        assert_eq!(f32s(&out[1]), diff);
    }
}

#[test]
fn instances_are_independent() {
    let dir = TempDir::new().unwrap();
    let path = add_sub_model(&dir);
    let loaded = TractBackend.load(&add_sub_spec(&path)).unwrap();
    let mut handles = Vec::new();
    for i in 0..2 {
        let mut inst = loaded.new_instance(i).unwrap();
        handles.push(std::thread::spawn(move || {
            for n in 1..=4usize {
                let (a, b) = ab(n);
                let shape = [n as i64, 16];
                let out = inst
                    .execute(batch(
                        vec![f32_tensor("a", &shape, &a), f32_tensor("b", &shape, &b)],
                        &["sum"],
                    ))
                    .unwrap();
                let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
                assert_eq!(f32s(&out[0]), sum);
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn requested_outputs_subset_and_order() {
    let dir = TempDir::new().unwrap();
    let path = add_sub_model(&dir);
    // The configuration lists the outputs in the other order than the model.
    let mut s = add_sub_spec(&path);
    s.outputs.reverse();
    let mut inst = instance(&s);
    let (a, b) = ab(2);
    let inputs = || vec![f32_tensor("a", &[2, 16], &a), f32_tensor("b", &[2, 16], &b)];
    let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    let diff: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x - y).collect();

    let out = inst.execute(batch(inputs(), &["diff"])).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].name.as_str(), f32s(&out[0])), ("diff", diff.clone()));

    let out = inst.execute(batch(inputs(), &["sum", "diff"])).unwrap();
    assert_eq!((out[0].name.as_str(), f32s(&out[0])), ("sum", sum.clone()));
    assert_eq!((out[1].name.as_str(), f32s(&out[1])), ("diff", diff.clone()));

    // No names: every configured output, in configuration order.
    let out = inst.execute(batch(inputs(), &[])).unwrap();
    let names: Vec<&str> = out.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["diff", "sum"]);

    // The same output twice.
    let out = inst.execute(batch(inputs(), &["sum", "sum"])).unwrap();
    assert_eq!(f32s(&out[0]), sum);
    assert_eq!(f32s(&out[1]), sum);

    let err = inst.execute(batch(inputs(), &["nope"])).unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::InvalidInput);
    assert!(err.message().contains("no output 'nope'"), "{}", err.message());
}

#[test]
fn configuration_may_serve_only_some_outputs() {
    let dir = TempDir::new().unwrap();
    let path = add_sub_model(&dir);
    let mut s = add_sub_spec(&path);
    s.outputs.retain(|o| o.name == "diff");
    let mut inst = instance(&s);
    let (a, b) = ab(1);
    let inputs = vec![f32_tensor("a", &[1, 16], &a), f32_tensor("b", &[1, 16], &b)];
    let out = inst.execute(batch(inputs.clone(), &[])).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].name, "diff");
    let err = inst.execute(batch(inputs, &["sum"])).unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::InvalidInput);
}

#[test]
fn unbatched_model_with_fixed_shapes() {
    let dir = TempDir::new().unwrap();
    let path = add_sub_model(&dir);
    let s = spec(
        &path,
        vec![
            meta("a", DataType::F32, &[2, 16]),
            meta("b", DataType::F32, &[2, 16]),
        ],
        vec![meta("sum", DataType::F32, &[2, 16])],
        0,
    );
    let mut inst = instance(&s);
    let (a, b) = ab(2);
    let out = inst
        .execute(batch(
            vec![f32_tensor("a", &[2, 16], &a), f32_tensor("b", &[2, 16], &b)],
            &["sum"],
        ))
        .unwrap();
    assert_eq!(out[0].shape, vec![2, 16]);
    let err = inst
        .execute(batch(
            vec![
                f32_tensor("a", &[1, 16], &a[..16]),
                f32_tensor("b", &[1, 16], &b[..16]),
            ],
            &["sum"],
        ))
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::InvalidInput);
}

#[test]
fn unaligned_input_bytes() {
    let dir = TempDir::new().unwrap();
    let path = add_sub_model(&dir);
    let mut inst = instance(&add_sub_spec(&path));
    let (a, b) = ab(1);
    let mut buf = vec![0xAAu8; 3];
    buf.extend(a.iter().flat_map(|v| v.to_le_bytes()));
    let a_raw = bytes::Bytes::from(buf).slice(3..);
    let a_t = Tensor::from_raw("a", DataType::F32, vec![1, 16], a_raw);
    let out = inst
        .execute(batch(vec![a_t, f32_tensor("b", &[1, 16], &b)], &["sum"]))
        .unwrap();
    let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    assert_eq!(f32s(&out[0]), sum);
}

#[test]
fn inspect_reports_real_inputs_dtypes_and_shapes() {
    let dir = TempDir::new().unwrap();
    // "w" is an initializer listed among the inputs, as older exporters do: not a real input.
    let m = model(
        vec![
            node("Add", &["x", "w"], &["y"]),
            node("Greater", &["ids", "ids"], &["mask"]),
            node("Identity", &["h"], &["h_out"]),
        ],
        vec![
            value("x", OnnxType::Float, Some(&[D::P("batch"), D::V(4)])),
            value("w", OnnxType::Float, Some(&[D::V(4)])),
            value("ids", OnnxType::Int64, Some(&[D::Unknown, D::P("seq"), D::V(3)])),
            value("h", OnnxType::Float16, Some(&[])),
        ],
        vec![
            value("y", OnnxType::Float, Some(&[D::P("batch"), D::V(4)])),
            value("mask", OnnxType::Bool, Some(&[D::Unknown, D::P("seq"), D::V(3)])),
            value("h_out", OnnxType::Bfloat16, Some(&[])),
        ],
        vec![initializer("w", OnnxType::Float, &[4], vec![0; 16])],
    );
    let path = write(dir.path(), "model.onnx", &m);
    let sig = TractBackend.inspect(&path).unwrap();
    assert_eq!(
        sig.inputs,
        vec![
            meta("x", DataType::F32, &[-1, 4]),
            meta("ids", DataType::I64, &[-1, -1, 3]),
            meta("h", DataType::F16, &[]),
        ]
    );
    assert_eq!(
        sig.outputs,
        vec![
            meta("y", DataType::F32, &[-1, 4]),
            meta("mask", DataType::Bool, &[-1, -1, 3]),
            meta("h_out", DataType::BF16, &[]),
        ]
    );
}

#[test]
fn inspect_maps_every_onnx_type() {
    let dir = TempDir::new().unwrap();
    let types = [
        (OnnxType::Float, DataType::F32),
        (OnnxType::Uint8, DataType::U8),
        (OnnxType::Int8, DataType::I8),
        (OnnxType::Uint16, DataType::U16),
        (OnnxType::Int16, DataType::I16),
        (OnnxType::Int32, DataType::I32),
        (OnnxType::Int64, DataType::I64),
        (OnnxType::String, DataType::Bytes),
        (OnnxType::Bool, DataType::Bool),
        (OnnxType::Float16, DataType::F16),
        (OnnxType::Double, DataType::F64),
        (OnnxType::Uint32, DataType::U32),
        (OnnxType::Uint64, DataType::U64),
        (OnnxType::Bfloat16, DataType::BF16),
    ];
    let names: Vec<String> = (0..types.len()).map(|i| format!("t{i}")).collect();
    let outs: Vec<String> = (0..types.len()).map(|i| format!("o{i}")).collect();
    let m = model(
        names
            .iter()
            .zip(&outs)
            .map(|(i, o)| node("Identity", &[i], &[o]))
            .collect(),
        names
            .iter()
            .zip(&types)
            .map(|(n, (t, _))| value(n, *t, Some(&[D::V(1)])))
            .collect(),
        outs.iter()
            .zip(&types)
            .map(|(n, (t, _))| value(n, *t, Some(&[D::V(1)])))
            .collect(),
        vec![],
    );
    let path = write(dir.path(), "types.onnx", &m);
    let sig = TractBackend.inspect(&path).unwrap();
    let got: Vec<DataType> = sig.inputs.iter().map(|m| m.datatype).collect();
    let want: Vec<DataType> = types.iter().map(|(_, d)| *d).collect();
    assert_eq!(got, want);
}

#[test]
fn inspect_errors_name_the_tensor() {
    let dir = TempDir::new().unwrap();
    let no_shape = model(
        vec![node("Identity", &["x"], &["y"])],
        vec![value("x", OnnxType::Float, None)],
        vec![value("y", OnnxType::Float, Some(&[D::V(2)]))],
        vec![],
    );
    let path = write(dir.path(), "noshape.onnx", &no_shape);
    let err = TractBackend.inspect(&path).unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::InvalidModel);
    assert!(err.message().contains("input 'x'"), "{}", err.message());
    assert!(err.message().contains("noshape.onnx"), "{}", err.message());

    let complex = model(
        vec![node("Identity", &["x"], &["y"])],
        vec![value("x", OnnxType::Complex64, Some(&[D::V(2)]))],
        vec![value("y", OnnxType::Complex64, Some(&[D::V(2)]))],
        vec![],
    );
    let path = write(dir.path(), "complex.onnx", &complex);
    let err = TractBackend.inspect(&path).unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::Unsupported);
    assert!(err.message().contains("input 'x'"), "{}", err.message());
    assert!(err.message().contains("COMPLEX64"), "{}", err.message());
}

#[test]
fn fp16_round_trips_exact_values() {
    let dir = TempDir::new().unwrap();
    // y = x + x; z = x * 2 (an FP16 initializer).
    let two = f16::from_f32(2.0).to_le_bytes().to_vec();
    let m = model(
        vec![
            node("Add", &["x", "x"], &["y"]),
            node("Mul", &["x", "two"], &["z"]),
        ],
        vec![value("x", OnnxType::Float16, Some(&[D::P("N"), D::V(4)]))],
        vec![
            value("y", OnnxType::Float16, Some(&[D::P("N"), D::V(4)])),
            value("z", OnnxType::Float16, Some(&[D::P("N"), D::V(4)])),
        ],
        vec![initializer("two", OnnxType::Float16, &[], two)],
    );
    let path = write(dir.path(), "fp16.onnx", &m);
    let s = spec(
        &path,
        vec![meta("x", DataType::F16, &[-1, 4])],
        vec![
            meta("y", DataType::F16, &[-1, 4]),
            meta("z", DataType::F16, &[-1, 4]),
        ],
        4,
    );
    let mut inst = instance(&s);
    let xs: Vec<f16> = [
        1.5f32,
        -0.25,
        1000.0,
        6.1035156e-5,
        0.0,
        -3.0,
        0.099975586,
        16384.0,
    ]
    .iter()
    .map(|&v| f16::from_f32(v))
    .collect();
    let raw: Vec<u8> = xs.iter().flat_map(|v| v.to_le_bytes()).collect();
    let out = inst
        .execute(batch(
            vec![Tensor::from_raw("x", DataType::F16, vec![2, 4], raw)],
            &["y", "z"],
        ))
        .unwrap();
    let expected: Vec<f16> = xs.iter().map(|v| f16::from_f32(v.to_f32() * 2.0)).collect();
    for t in &out {
        assert_eq!(t.datatype, DataType::F16);
        assert_eq!(t.shape, vec![2, 4]);
        let got: Vec<f16> = t
            .raw()
            .unwrap()
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(got, expected, "{}", t.name);
    }
}

#[test]
fn strings_pass_through_identity() {
    let dir = TempDir::new().unwrap();
    let m = model(
        vec![node("Identity", &["text"], &["same"])],
        vec![value("text", OnnxType::String, Some(&[D::P("N"), D::V(2)]))],
        vec![value("same", OnnxType::String, Some(&[D::P("N"), D::V(2)]))],
        vec![],
    );
    let path = write(dir.path(), "strings.onnx", &m);
    let s = spec(
        &path,
        vec![meta("text", DataType::Bytes, &[-1, 2])],
        vec![meta("same", DataType::Bytes, &[-1, 2])],
        4,
    );
    let mut inst = instance(&s);
    let values: [&[u8]; 4] = [b"hello", b"", "h\u{e9}llo w\u{f6}rld".as_bytes(), b"x"];
    let out = inst
        .execute(batch(vec![strings_tensor("text", &[2, 2], &values)], &["same"]))
        .unwrap();
    assert_eq!(out[0].datatype, DataType::Bytes);
    assert_eq!(out[0].shape, vec![2, 2]);
    let expected: Vec<bytes::Bytes> = values.iter().map(|v| bytes::Bytes::copy_from_slice(v)).collect();
    assert_eq!(out[0].data, TensorData::Strings(expected));

    let err = inst
        .execute(batch(
            vec![strings_tensor("text", &[1, 2], &[b"ok", b"\xff\xfe"])],
            &["same"],
        ))
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::InvalidInput);
    assert!(err.message().contains("UTF-8"), "{}", err.message());
}

#[test]
fn int64_greater_gives_bool_and_bool_inputs_are_checked() {
    let dir = TempDir::new().unwrap();
    // gt = a > b (INT64 -> BOOL); both = And(gt, flag) (BOOL -> BOOL).
    let m = model(
        vec![
            node("Greater", &["a", "b"], &["gt"]),
            node("And", &["gt", "flag"], &["both"]),
        ],
        vec![
            value("a", OnnxType::Int64, Some(&[D::P("N"), D::V(3)])),
            value("b", OnnxType::Int64, Some(&[D::P("N"), D::V(3)])),
            value("flag", OnnxType::Bool, Some(&[D::P("N"), D::V(3)])),
        ],
        vec![
            value("gt", OnnxType::Bool, Some(&[D::P("N"), D::V(3)])),
            value("both", OnnxType::Bool, Some(&[D::P("N"), D::V(3)])),
        ],
        vec![],
    );
    let path = write(dir.path(), "logic.onnx", &m);
    let s = spec(
        &path,
        vec![
            meta("a", DataType::I64, &[-1, 3]),
            meta("b", DataType::I64, &[-1, 3]),
            meta("flag", DataType::Bool, &[-1, 3]),
        ],
        vec![
            meta("gt", DataType::Bool, &[-1, 3]),
            meta("both", DataType::Bool, &[-1, 3]),
        ],
        4,
    );
    let mut inst = instance(&s);
    let a = [5i64, -1, i64::MAX, 0, 7, i64::MIN];
    let b = [4i64, 0, i64::MAX - 1, 0, 8, i64::MIN];
    let flag = Tensor::from_raw("flag", DataType::Bool, vec![2, 3], vec![1u8, 1, 0, 1, 1, 1]);
    let out = inst
        .execute(batch(
            vec![i64_tensor("a", &[2, 3], &a), i64_tensor("b", &[2, 3], &b), flag],
            &["gt", "both"],
        ))
        .unwrap();
    assert_eq!(out[0].datatype, DataType::Bool);
    assert_eq!(out[0].raw().unwrap().as_ref(), &[1, 0, 1, 0, 0, 0]);
    assert_eq!(out[1].raw().unwrap().as_ref(), &[1, 0, 0, 0, 0, 0]);

    let bad_flag = Tensor::from_raw("flag", DataType::Bool, vec![2, 3], vec![1u8, 2, 0, 1, 1, 1]);
    let err = inst
        .execute(batch(
            vec![
                i64_tensor("a", &[2, 3], &a),
                i64_tensor("b", &[2, 3], &b),
                bad_flag,
            ],
            &["gt"],
        ))
        .unwrap_err();
    assert_eq!(err.kind(), BackendErrorKind::InvalidInput);
    assert!(err.message().contains("BOOL"), "{}", err.message());
}

#[test]
fn truncated_missing_and_garbage_files_are_invalid_models() {
    let dir = TempDir::new().unwrap();
    let path = add_sub_model(&dir);
    let bytes = std::fs::read(&path).unwrap();
    let truncated = dir.path().join("truncated.onnx");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let empty = dir.path().join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    let text = dir.path().join("text.onnx");
    std::fs::write(&text, b"this is not a protobuf, just some text\n").unwrap();
    let missing = dir.path().join("missing.onnx");

    for p in [&truncated, &empty, &text, &missing] {
        let file = p.file_name().unwrap().to_str().unwrap();
        let err = TractBackend.inspect(p).unwrap_err();
        assert_eq!(
            err.kind(),
            BackendErrorKind::InvalidModel,
            "{file}: {}",
            err.message()
        );
        assert!(err.message().contains(file), "{}", err.message());
        let err = TractBackend.load(&add_sub_spec(p)).err().unwrap();
        assert_eq!(
            err.kind(),
            BackendErrorKind::InvalidModel,
            "{file}: {}",
            err.message()
        );
        assert!(err.message().contains(file), "{}", err.message());
    }
}

#[test]
fn unknown_operator_fails_the_load() {
    let dir = TempDir::new().unwrap();
    let m = model(
        vec![node("Relu", &["x"], &["r"]), node("NoSuchOp", &["r"], &["y"])],
        vec![value("x", OnnxType::Float, Some(&[D::P("N"), D::V(4)]))],
        vec![value("y", OnnxType::Float, Some(&[D::P("N"), D::V(4)]))],
        vec![],
    );
    let path = write(dir.path(), "unknown.onnx", &m);
    // inspect only reads declarations: it succeeds.
    assert!(TractBackend.inspect(&path).is_ok());
    let s = spec(
        &path,
        vec![meta("x", DataType::F32, &[-1, 4])],
        vec![meta("y", DataType::F32, &[-1, 4])],
        4,
    );
    let err = TractBackend.load(&s).err().unwrap();
    assert_eq!(err.kind(), BackendErrorKind::Unsupported);
    assert!(err.message().contains("NoSuchOp"), "{}", err.message());
    assert!(err.message().contains("unknown.onnx"), "{}", err.message());
}

#[test]
fn bf16_models_are_unsupported_at_load() {
    let dir = TempDir::new().unwrap();
    let m = model(
        vec![node("Identity", &["x"], &["y"])],
        vec![value("x", OnnxType::Bfloat16, Some(&[D::P("N"), D::V(4)]))],
        vec![value("y", OnnxType::Bfloat16, Some(&[D::P("N"), D::V(4)]))],
        vec![],
    );
    let path = write(dir.path(), "bf16.onnx", &m);
    let s = spec(
        &path,
        vec![meta("x", DataType::BF16, &[-1, 4])],
        vec![meta("y", DataType::BF16, &[-1, 4])],
        4,
    );
    let err = TractBackend.load(&s).err().unwrap();
    assert_eq!(err.kind(), BackendErrorKind::Unsupported);
    assert!(err.message().contains("BF16"), "{}", err.message());
}

#[test]
fn analysis_failure_fails_the_load() {
    let dir = TempDir::new().unwrap();
    // [N,4] x [5,3]: the inner dimensions disagree, which tract sees while analysing.
    let m = model(
        vec![node("MatMul", &["x", "w"], &["y"])],
        vec![value("x", OnnxType::Float, Some(&[D::P("N"), D::V(4)]))],
        vec![value("y", OnnxType::Float, Some(&[D::P("N"), D::V(3)]))],
        vec![initializer("w", OnnxType::Float, &[5, 3], vec![0; 60])],
    );
    let path = write(dir.path(), "broken.onnx", &m);
    let s = spec(
        &path,
        vec![meta("x", DataType::F32, &[-1, 4])],
        vec![meta("y", DataType::F32, &[-1, 3])],
        4,
    );
    let err = TractBackend.load(&s).err().unwrap();
    eprintln!("{}", err.message());
    assert_eq!(err.kind(), BackendErrorKind::InvalidModel);
    assert!(err.message().contains("broken.onnx"), "{}", err.message());
    assert!(err.message().len() < 1200, "{}", err.message());
}

/// An edit that makes a valid configuration wrong.
type SpecChange = fn(&mut LoadSpec);

#[test]
fn configuration_mismatches_fail_the_load() {
    let dir = TempDir::new().unwrap();
    let path = add_sub_model(&dir);
    let cases: Vec<(&str, SpecChange)> = vec![
        ("[\"c\"]", |s: &mut LoadSpec| s.inputs[1].name = "c".into()),
        ("\"b\"", |s: &mut LoadSpec| {
            s.inputs.pop();
        }),
        ("twice", |s: &mut LoadSpec| s.inputs[1].name = "a".into()),
        ("INT32", |s: &mut LoadSpec| s.inputs[0].datatype = DataType::I32),
        ("[-1, 15]", |s: &mut LoadSpec| s.inputs[0].shape = vec![-1, 15]),
        ("[-1, 16, 1]", |s: &mut LoadSpec| {
            s.inputs[0].shape = vec![-1, 16, 1]
        }),
        ("[-1, -1]", |s: &mut LoadSpec| s.inputs[0].shape = vec![-1, -1]),
        ("batch", |s: &mut LoadSpec| s.inputs[0].shape = vec![2, 16]),
        ("\"prod\"", |s: &mut LoadSpec| s.outputs[0].name = "prod".into()),
        ("FP64", |s: &mut LoadSpec| s.outputs[1].datatype = DataType::F64),
    ];
    for (needle, change) in cases {
        let mut s = add_sub_spec(&path);
        change(&mut s);
        let err = TractBackend.load(&s).err().unwrap();
        assert_eq!(err.kind(), BackendErrorKind::InvalidModel, "{}", err.message());
        assert!(err.message().contains(needle), "{needle}: {}", err.message());
    }
    // Declared output shapes are documentation to tract: a vaguer configured one is fine.
    let mut s = add_sub_spec(&path);
    s.outputs[0].shape = vec![-1, -1];
    assert!(TractBackend.load(&s).is_ok());
}

#[test]
fn bad_batches_are_rejected_without_panicking() {
    let dir = TempDir::new().unwrap();
    let path = add_sub_model(&dir);
    let mut inst = instance(&add_sub_spec(&path));
    let (a, b) = ab(2);
    let good = || vec![f32_tensor("a", &[2, 16], &a), f32_tensor("b", &[2, 16], &b)];
    let a1 = f32_tensor("a", &[1, 16], &a[..16]);

    let cases: Vec<(&str, Vec<Tensor>)> = vec![
        ("expects 2 input(s)", vec![good()[0].clone()]),
        ("expects 2 input(s)", {
            let mut v = good();
            v.push(good()[0].clone());
            v
        }),
        (
            "must be FP32",
            vec![i64_tensor("a", &[2, 16], &[0; 32]), good()[1].clone()],
        ),
        (
            "shape [2, 15]",
            vec![f32_tensor("a", &[2, 15], &a[..30]), good()[1].clone()],
        ),
        ("shape [32]", vec![f32_tensor("a", &[32], &a), good()[1].clone()]),
        ("batch size", vec![a1, good()[1].clone()]),
        (
            "bytes",
            vec![f32_tensor("a", &[2, 16], &a[..31]), good()[1].clone()],
        ),
        ("expected input 'a'", good().into_iter().rev().collect()),
        ("byte strings", {
            let mut bad = strings_tensor("a", &[2, 16], &[b"x"; 32]);
            bad.datatype = DataType::F32;
            vec![bad, good()[1].clone()]
        }),
    ];
    for (needle, inputs) in cases {
        let err = inst.execute(batch(inputs, &["sum"])).unwrap_err();
        assert_eq!(err.kind(), BackendErrorKind::InvalidInput, "{}", err.message());
        assert!(err.message().contains(needle), "{needle}: {}", err.message());
    }
    // Still serving.
    let out = inst.execute(batch(good(), &["sum"])).unwrap();
    assert_eq!(out[0].shape, vec![2, 16]);
}

#[test]
fn engine_errors_at_run_time_are_invalid_input_and_recoverable() {
    let dir = TempDir::new().unwrap();
    // a + b where the model leaves both second dimensions unnamed: the configuration allows
    // any sizes, so a mismatch is only found by tract at run time.
    let m = model(
        vec![node("Add", &["a", "b"], &["y"])],
        vec![
            value("a", OnnxType::Float, Some(&[D::P("N"), D::Unknown])),
            value("b", OnnxType::Float, Some(&[D::P("N"), D::Unknown])),
        ],
        vec![value("y", OnnxType::Float, Some(&[D::P("N"), D::Unknown]))],
        vec![],
    );
    let path = write(dir.path(), "dynamic.onnx", &m);
    let s = spec(
        &path,
        vec![
            meta("a", DataType::F32, &[-1, -1]),
            meta("b", DataType::F32, &[-1, -1]),
        ],
        vec![meta("y", DataType::F32, &[-1, -1])],
        4,
    );
    let mut inst = instance(&s);
    let run = |inst: &mut Box<dyn ModelInstance>, la: usize, lb: usize| {
        let a: Vec<f32> = (0..la).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..lb).map(|i| i as f32 * 10.0).collect();
        inst.execute(batch(
            vec![
                f32_tensor("a", &[1, la as i64], &a),
                f32_tensor("b", &[1, lb as i64], &b),
            ],
            &["y"],
        ))
    };
    let err = run(&mut inst, 3, 4).unwrap_err();
    eprintln!("{}", err.message());
    assert_eq!(err.kind(), BackendErrorKind::InvalidInput, "{}", err.message());
    assert!(err.message().len() < 1200, "{}", err.message());
    // The failed run must leave nothing behind that breaks the next one.
    let out = run(&mut inst, 2, 2).unwrap();
    assert_eq!(f32s(&out[0]), vec![0.0, 11.0]);
    let out = run(&mut inst, 3, 1).unwrap();
    assert_eq!(f32s(&out[0]), vec![0.0, 1.0, 2.0]);
}

#[test]
fn conflicting_value_info_falls_back_to_no_hints() {
    let dir = TempDir::new().unwrap();
    // The inputs name their batch dims differently and value_info uses a third name; with one
    // shared batch symbol, the hint contradicts the inputs.
    let mut m = model(
        vec![node("Add", &["a", "b"], &["s"]), node("Relu", &["s"], &["y"])],
        vec![
            value("a", OnnxType::Float, Some(&[D::P("na"), D::V(4)])),
            value("b", OnnxType::Float, Some(&[D::P("nb"), D::V(4)])),
        ],
        vec![value("y", OnnxType::Float, Some(&[D::P("ny"), D::V(4)]))],
        vec![],
    );
    if let Some(g) = m.graph.as_mut() {
        g.value_info
            .push(value("s", OnnxType::Float, Some(&[D::P("other"), D::V(4)])));
    }
    let path = write(dir.path(), "hints.onnx", &m);
    let s = spec(
        &path,
        vec![
            meta("a", DataType::F32, &[-1, 4]),
            meta("b", DataType::F32, &[-1, 4]),
        ],
        vec![meta("y", DataType::F32, &[-1, 4])],
        4,
    );
    let mut inst = instance(&s);
    let out = inst
        .execute(batch(
            vec![
                f32_tensor("a", &[1, 4], &[1.0, -2.0, 3.0, -4.0]),
                f32_tensor("b", &[1, 4], &[0.5, 0.5, 0.5, 0.5]),
            ],
            &["y"],
        ))
        .unwrap();
    assert_eq!(f32s(&out[0]), vec![1.5, 0.0, 3.5, 0.0]);
}

#[test]
fn shared_dim_params_stay_shared() {
    let dir = TempDir::new().unwrap();
    // Two inputs share a "seq" dimension; tract must see them as equal to add them.
    let m = model(
        vec![node("Add", &["ids", "mask"], &["y"])],
        vec![
            value("ids", OnnxType::Float, Some(&[D::P("batch"), D::P("seq")])),
            value("mask", OnnxType::Float, Some(&[D::P("batch"), D::P("seq")])),
        ],
        vec![value("y", OnnxType::Float, Some(&[D::P("batch"), D::P("seq")]))],
        vec![],
    );
    let path = write(dir.path(), "seq.onnx", &m);
    let s = spec(
        &path,
        vec![
            meta("ids", DataType::F32, &[-1, -1]),
            meta("mask", DataType::F32, &[-1, -1]),
        ],
        vec![meta("y", DataType::F32, &[-1, -1])],
        4,
    );
    let mut inst = instance(&s);
    for (n, len) in [(1usize, 3usize), (2, 5)] {
        let v: Vec<f32> = (0..n * len).map(|i| i as f32).collect();
        let shape = [n as i64, len as i64];
        let out = inst
            .execute(batch(
                vec![f32_tensor("ids", &shape, &v), f32_tensor("mask", &shape, &v)],
                &[],
            ))
            .unwrap();
        assert_eq!(out[0].shape, shape.to_vec());
        assert_eq!(f32s(&out[0]), v.iter().map(|x| x * 2.0).collect::<Vec<_>>());
    }
}
