//! Unit tests of the wire ⇄ domain conversions.

use std::collections::BTreeMap;

use bytes::Bytes;
use oxserve_core::{
    DataType, ErrorKind, InferRequest, InferResponse, ModelMetadata, ParamValue, RequestedOutput, Tensor,
    TensorData, TensorMeta,
};
use oxserve_engine::{IndexEntry, ServerMetadata};
use oxserve_frontend::resolve_inputs;
use oxserve_shm::SharedMemoryRegistry;
use prost::Message;

use super::*;
use crate::grpc::pb::{InferParameter, ModelConfigResponse, infer_parameter::ParameterChoice};

/// Decodes a request and turns its inputs into tensors as the runner does, with an empty
/// shared-memory registry.
fn decode(req: ModelInferRequest) -> Result<InferRequest> {
    let target = ModelTarget::unchecked(req.model_name.clone(), parse_version(&req.model_version)?);
    let decoded = infer_request_from_wire(target, req, &DecodeLimits::default())?;
    let (inputs, _) = resolve_inputs(&SharedMemoryRegistry::new(), decoded.inputs)?;
    Ok(InferRequest {
        routing_key: decoded.routing_key,
        signature: decoded.signature,
        trace: None,
        model_name: decoded.target.name().to_string(),
        model_version: decoded.target.version(),
        id: decoded.id,
        parameters: decoded.parameters,
        inputs,
        outputs: decoded
            .outputs
            .into_iter()
            .map(|o| RequestedOutput {
                name: o.name,
                classification: o.classification,
            })
            .collect(),
    })
}

/// A response with each output placed inline, or in shared memory where `shm` names it.
fn placed(response: InferResponse, shm: &[(&str, ShmRef)]) -> RunResponse {
    RunResponse {
        model_name: response.model_name,
        model_version: response.model_version,
        id: response.id,
        parameters: response.parameters,
        outputs: response
            .outputs
            .into_iter()
            .map(|tensor| {
                let placement = match shm.iter().find(|(n, _)| *n == tensor.name) {
                    Some((_, at)) => Placement::SharedMemory {
                        region: at.region.clone(),
                        offset: at.offset,
                        byte_size: tensor.wire_len(),
                    },
                    None => Placement::Inline,
                };
                PlacedOutput { tensor, placement }
            })
            .collect(),
    }
}

fn input(
    name: &str,
    datatype: &str,
    shape: &[i64],
    contents: Option<InferTensorContents>,
) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
        parameters: Default::default(),
        contents,
    }
}

fn request(inputs: Vec<InferInputTensor>, raw: Vec<Bytes>) -> ModelInferRequest {
    ModelInferRequest {
        model_name: "m".into(),
        inputs,
        raw_input_contents: raw,
        ..Default::default()
    }
}

/// Decodes a single-input request with typed contents.
fn typed(datatype: &str, shape: &[i64], contents: InferTensorContents) -> Result<Tensor> {
    let req = request(vec![input("x", datatype, shape, Some(contents))], vec![]);
    let mut decoded = decode(req)?;
    Ok(decoded.inputs.remove(0))
}

/// Decodes a single-input request with raw contents.
fn raw(datatype: &str, shape: &[i64], bytes: Vec<u8>) -> Result<Tensor> {
    let req = request(vec![input("x", datatype, shape, None)], vec![Bytes::from(bytes)]);
    let mut decoded = decode(req)?;
    Ok(decoded.inputs.remove(0))
}

fn raw_bytes(t: &Result<Tensor>) -> Option<Vec<u8>> {
    t.as_ref().ok().and_then(|t| t.raw()).map(|b| b.to_vec())
}

/// The error's kind and whether its message contains `needle`.
fn fails_with(result: Result<impl std::fmt::Debug>, kind: ErrorKind, needle: &str) {
    match result {
        Ok(v) => panic!("expected a {kind:?} error containing {needle:?}, got {v:?}"),
        Err(e) => {
            assert_eq!(e.kind(), kind, "{e}");
            assert!(
                e.message().contains(needle),
                "{:?} does not contain {needle:?}",
                e.message()
            );
        }
    }
}

fn le<T, const N: usize>(values: &[T], f: impl Fn(&T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(f).collect()
}

// ---- versions ------------------------------------------------------------------------------

#[test]
fn version_strings() {
    assert_eq!(parse_version("").ok(), Some(None));
    assert_eq!(parse_version("3").ok(), Some(Some(3)));
    for bad in ["latest", "-1", "1.5", " 1", "1a"] {
        fails_with(parse_version(bad), ErrorKind::InvalidArgument, bad);
    }
    let mut req = request(vec![], vec![]);
    req.model_version = "two".into();
    fails_with(decode(req), ErrorKind::InvalidArgument, "'two'");
}

// ---- typed contents, every datatype ---------------------------------------------------------

#[test]
fn typed_bool() {
    let c = InferTensorContents {
        bool_contents: vec![true, false, true],
        ..Default::default()
    };
    let t = typed("BOOL", &[3], c);
    assert_eq!(raw_bytes(&t), Some(vec![1, 0, 1]));
    assert_eq!(t.ok().map(|t| t.datatype), Some(DataType::Bool));
}

#[test]
fn typed_signed_integers() {
    let ints = vec![-128, 0, 127];
    let c = || InferTensorContents {
        int_contents: ints.clone(),
        ..Default::default()
    };
    assert_eq!(raw_bytes(&typed("INT8", &[3], c())), Some(vec![0x80, 0, 0x7f]));
    assert_eq!(
        raw_bytes(&typed("INT16", &[3], c())),
        Some(le(&[-128i16, 0, 127], |v| v.to_le_bytes()))
    );
    assert_eq!(
        raw_bytes(&typed("INT32", &[1, 3], c())),
        Some(le(&ints, |v| v.to_le_bytes()))
    );
    let c = InferTensorContents {
        int64_contents: vec![i64::MIN, 5],
        ..Default::default()
    };
    assert_eq!(
        raw_bytes(&typed("INT64", &[2], c)),
        Some(le(&[i64::MIN, 5], |v| v.to_le_bytes()))
    );
}

#[test]
fn typed_unsigned_integers() {
    let c = |v: Vec<u32>| InferTensorContents {
        uint_contents: v,
        ..Default::default()
    };
    assert_eq!(
        raw_bytes(&typed("UINT8", &[2], c(vec![0, 255]))),
        Some(vec![0, 255])
    );
    assert_eq!(
        raw_bytes(&typed("UINT16", &[2], c(vec![1, 65535]))),
        Some(le(&[1u16, 65535], |v| v.to_le_bytes()))
    );
    assert_eq!(
        raw_bytes(&typed("UINT32", &[2], c(vec![1, u32::MAX]))),
        Some(le(&[1u32, u32::MAX], |v| v.to_le_bytes()))
    );
    let c = InferTensorContents {
        uint64_contents: vec![u64::MAX],
        ..Default::default()
    };
    assert_eq!(
        raw_bytes(&typed("UINT64", &[1], c)),
        Some(u64::MAX.to_le_bytes().to_vec())
    );
}

#[test]
fn typed_floats() {
    let c = InferTensorContents {
        fp32_contents: vec![1.5, -0.25],
        ..Default::default()
    };
    assert_eq!(
        raw_bytes(&typed("FP32", &[2], c)),
        Some(le(&[1.5f32, -0.25], |v| v.to_le_bytes()))
    );
    let c = InferTensorContents {
        fp64_contents: vec![std::f64::consts::PI],
        ..Default::default()
    };
    assert_eq!(
        raw_bytes(&typed("FP64", &[1, 1], c)),
        Some(std::f64::consts::PI.to_le_bytes().to_vec())
    );
}

#[test]
fn typed_bytes() {
    let items = vec![Bytes::from_static(b"hello"), Bytes::new()];
    let c = InferTensorContents {
        bytes_contents: items.clone(),
        ..Default::default()
    };
    let t = typed("BYTES", &[2], c).ok();
    assert_eq!(t.map(|t| t.data), Some(TensorData::Strings(items)));
}

// ---- raw contents, every datatype -----------------------------------------------------------

#[test]
fn raw_every_fixed_size_datatype() {
    for dt in DataType::ALL {
        let Some(size) = dt.size() else { continue };
        // BOOL elements must be 0 or 1 (checked in core); other types take any bytes.
        let bytes: Vec<u8> = (0..(3 * size) as u8)
            .map(|b| if dt == DataType::Bool { b % 2 } else { b })
            .collect();
        let t = raw(dt.wire_name(), &[3], bytes.clone());
        assert_eq!(raw_bytes(&t), Some(bytes), "{dt}");
        assert_eq!(t.ok().map(|t| t.datatype), Some(dt));
        // One element short.
        fails_with(
            raw(dt.wire_name(), &[3], vec![0; 2 * size]),
            ErrorKind::InvalidArgument,
            "bytes",
        );
    }
}

#[test]
fn raw_fp16_and_bf16_are_accepted() {
    let half = le(&[half::f16::from_f32(1.0), half::f16::from_f32(-2.0)], |v| {
        v.to_le_bytes()
    });
    assert_eq!(raw_bytes(&raw("FP16", &[2], half.clone())), Some(half));
    let bf = le(&[half::bf16::from_f32(0.5)], |v| v.to_le_bytes());
    assert_eq!(raw_bytes(&raw("BF16", &[1], bf.clone())), Some(bf));
}

#[test]
fn raw_bytes_are_length_prefixed() {
    let mut wire = Vec::new();
    for s in [&b"ab"[..], b"", b"xyz"] {
        wire.extend_from_slice(&(s.len() as u32).to_le_bytes());
        wire.extend_from_slice(s);
    }
    let t = raw("BYTES", &[3], wire.clone()).ok();
    let expected = vec![
        Bytes::from_static(b"ab"),
        Bytes::new(),
        Bytes::from_static(b"xyz"),
    ];
    assert_eq!(t.map(|t| t.data), Some(TensorData::Strings(expected)));
    // Three elements on the wire, shape says two.
    fails_with(
        raw("BYTES", &[2], wire),
        ErrorKind::InvalidArgument,
        "more BYTES elements than its shape holds (2)",
    );
    // Truncated length prefix.
    fails_with(
        raw("BYTES", &[1], vec![5, 0]),
        ErrorKind::InvalidArgument,
        "truncated",
    );
}

#[test]
fn raw_data_is_not_copied() {
    let buffer = Bytes::from(vec![0u8; 16]);
    let req = request(vec![input("x", "FP32", &[4], None)], vec![buffer.clone()]);
    let decoded = decode(req).ok();
    let ptr = decoded
        .as_ref()
        .and_then(|r| r.inputs[0].raw())
        .map(|b| b.as_ptr());
    assert_eq!(ptr, Some(buffer.as_ptr()));
}

// ---- malformed requests ---------------------------------------------------------------------

#[test]
fn raw_count_must_match_inputs() {
    let req = request(
        vec![input("a", "UINT8", &[1], None), input("b", "UINT8", &[1], None)],
        vec![Bytes::from_static(&[1])],
    );
    fails_with(decode(req), ErrorKind::InvalidArgument, "expected 2 entries");
}

#[test]
fn raw_and_contents_are_exclusive() {
    let contents = InferTensorContents {
        uint_contents: vec![1],
        ..Default::default()
    };
    let req = request(
        vec![
            input("a", "UINT8", &[1], None),
            input("b", "UINT8", &[1], Some(contents)),
        ],
        vec![Bytes::from_static(&[1]), Bytes::from_static(&[2])],
    );
    fails_with(decode(req), ErrorKind::InvalidArgument, "input 'b' has contents");
    // Even empty contents count as set, as in Triton (`has_contents()`).
    let req = request(
        vec![input("a", "UINT8", &[1], Some(InferTensorContents::default()))],
        vec![Bytes::from_static(&[1])],
    );
    fails_with(decode(req), ErrorKind::InvalidArgument, "must not be set");
}

#[test]
fn contents_field_must_match_datatype() {
    let fp32 = || InferTensorContents {
        fp32_contents: vec![1.0],
        ..Default::default()
    };
    fails_with(
        typed("INT32", &[1], fp32()),
        ErrorKind::InvalidArgument,
        "int_contents, not fp32_contents",
    );
    fails_with(
        typed("FP64", &[1], fp32()),
        ErrorKind::InvalidArgument,
        "fp64_contents",
    );
    // The right field plus a stray one is still wrong.
    let mut both = fp32();
    both.bool_contents = vec![true];
    fails_with(
        typed("FP32", &[1], both),
        ErrorKind::InvalidArgument,
        "not bool_contents",
    );
    // INT64 data must not come in int_contents.
    let ints = InferTensorContents {
        int_contents: vec![1],
        ..Default::default()
    };
    fails_with(
        typed("INT64", &[1], ints),
        ErrorKind::InvalidArgument,
        "int64_contents",
    );
}

#[test]
fn element_count_must_match_shape() {
    let c = InferTensorContents {
        fp32_contents: vec![1.0, 2.0, 3.0],
        ..Default::default()
    };
    fails_with(
        typed("FP32", &[2, 2], c),
        ErrorKind::InvalidArgument,
        "3 elements in fp32_contents",
    );
    let c = InferTensorContents {
        bytes_contents: vec![Bytes::from_static(b"a")],
        ..Default::default()
    };
    fails_with(typed("BYTES", &[2], c), ErrorKind::InvalidArgument, "needs 2");
}

#[test]
fn negative_dimension_is_rejected() {
    let c = InferTensorContents {
        fp32_contents: vec![1.0],
        ..Default::default()
    };
    fails_with(typed("FP32", &[-1, 1], c), ErrorKind::InvalidArgument, "negative");
    fails_with(
        raw("FP32", &[-1], vec![0; 4]),
        ErrorKind::InvalidArgument,
        "negative",
    );
}

#[test]
fn integers_out_of_range_are_rejected() {
    let int = |v: i32| InferTensorContents {
        int_contents: vec![0, v],
        ..Default::default()
    };
    let uint = |v: u32| InferTensorContents {
        uint_contents: vec![v],
        ..Default::default()
    };
    fails_with(
        typed("INT8", &[2], int(300)),
        ErrorKind::InvalidArgument,
        "value 300 at index 1",
    );
    fails_with(typed("INT8", &[2], int(-129)), ErrorKind::InvalidArgument, "INT8");
    fails_with(
        typed("INT16", &[2], int(40_000)),
        ErrorKind::InvalidArgument,
        "INT16",
    );
    fails_with(
        typed("UINT8", &[1], uint(256)),
        ErrorKind::InvalidArgument,
        "UINT8",
    );
    fails_with(
        typed("UINT16", &[1], uint(70_000)),
        ErrorKind::InvalidArgument,
        "UINT16",
    );
}

#[test]
fn half_floats_need_raw_contents() {
    let c = || InferTensorContents {
        fp32_contents: vec![1.0],
        ..Default::default()
    };
    fails_with(
        typed("FP16", &[1], c()),
        ErrorKind::InvalidArgument,
        "raw_input_contents",
    );
    fails_with(
        typed("BF16", &[1], c()),
        ErrorKind::InvalidArgument,
        "raw_input_contents",
    );
}

#[test]
fn unknown_datatype_and_missing_data() {
    fails_with(
        typed("FLOAT32", &[1], InferTensorContents::default()),
        ErrorKind::InvalidArgument,
        "'FLOAT32'",
    );
    let req = request(vec![input("x", "FP32", &[2], None)], vec![]);
    fails_with(decode(req), ErrorKind::InvalidArgument, "no data");
    // A zero-element tensor needs no contents at all.
    let req = request(vec![input("x", "FP32", &[0, 3], None)], vec![]);
    let t = decode(req).ok();
    assert_eq!(t.and_then(|r| r.inputs[0].raw().map(|b| b.len())), Some(0));
}

#[test]
fn shared_memory_parameters_are_checked() {
    // A region that is not registered.
    let mut x = input("x", "FP32", &[1], None);
    x.parameters
        .insert("shared_memory_region".into(), string_param("r"));
    x.parameters
        .insert("shared_memory_byte_size".into(), int_param(4));
    fails_with(decode(request(vec![x], vec![])), ErrorKind::NotFound, "'r'");
    // A size without a region.
    let mut req = request(vec![], vec![]);
    let mut out = output("y");
    out.parameters
        .insert("shared_memory_byte_size".into(), int_param(4));
    req.outputs.push(out);
    fails_with(decode(req), ErrorKind::InvalidArgument, "shared_memory_region");
    // Shared memory and classification together.
    let mut req = request(vec![], vec![]);
    let mut out = output("y");
    out.parameters
        .insert("shared_memory_region".into(), string_param("r"));
    out.parameters
        .insert("shared_memory_byte_size".into(), int_param(4));
    out.parameters.insert("classification".into(), int_param(2));
    req.outputs.push(out);
    fails_with(decode(req), ErrorKind::InvalidArgument, "classification");
}

// ---- request metadata, parameters, outputs --------------------------------------------------

fn int_param(v: i64) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::Int64Param(v)),
    }
}

fn string_param(v: &str) -> InferParameter {
    InferParameter {
        parameter_choice: Some(ParameterChoice::StringParam(v.into())),
    }
}

fn output(name: &str) -> InferRequestedOutputTensor {
    InferRequestedOutputTensor {
        name: name.into(),
        parameters: Default::default(),
    }
}

#[test]
fn id_version_and_parameters() {
    let mut req = request(vec![], vec![]);
    req.model_version = "7".into();
    req.id = "req-1".into();
    req.parameters.insert("priority".into(), int_param(2));
    let decoded = decode(req).ok();
    let d = decoded.as_ref();
    assert_eq!(d.map(|r| r.model_name.as_str()), Some("m"));
    assert_eq!(d.and_then(|r| r.model_version), Some(7));
    assert_eq!(d.and_then(|r| r.id.as_deref()), Some("req-1"));
    assert_eq!(
        d.and_then(|r| r.parameters.get("priority")),
        Some(&ParamValue::Int(2))
    );

    // No id, no version: both absent rather than empty.
    let decoded = decode(request(vec![], vec![])).ok();
    assert_eq!(decoded.map(|r| (r.id, r.model_version)), Some((None, None)));
}

#[test]
fn requested_outputs_and_classification() {
    let mut req = request(vec![], vec![]);
    req.outputs.push(output("plain"));
    let mut top3 = output("top3");
    top3.parameters.insert("classification".into(), int_param(3));
    req.outputs.push(top3);
    let mut zero = output("zero");
    zero.parameters.insert("classification".into(), int_param(0));
    req.outputs.push(zero);
    let outputs = decode(req).ok().map(|r| r.outputs);
    assert_eq!(
        outputs,
        Some(vec![
            RequestedOutput::new("plain"),
            RequestedOutput {
                name: "top3".into(),
                classification: Some(3),
            },
            RequestedOutput::new("zero"),
        ])
    );

    for bad in [int_param(-1), string_param("3")] {
        let mut req = request(vec![], vec![]);
        let mut o = output("y");
        o.parameters.insert("classification".into(), bad);
        req.outputs.push(o);
        fails_with(decode(req), ErrorKind::InvalidArgument, "classification");
    }
}

// ---- responses and metadata -----------------------------------------------------------------

#[test]
fn outputs_in_shared_memory_keep_an_empty_raw_entry_and_say_where_they_went() {
    let floats = le(&[1.0f32, 2.0], |v| v.to_le_bytes());
    let response = InferResponse {
        model_name: "m".into(),
        model_version: 1,
        id: None,
        parameters: BTreeMap::new(),
        outputs: vec![
            Tensor::from_raw("a", DataType::F32, vec![2], floats.clone()),
            Tensor::from_raw("b", DataType::F32, vec![2], floats.clone()),
        ],
    };
    let at = ShmRef {
        region: "out".into(),
        offset: 16,
        byte_size: 64,
    };
    let wire = infer_response_to_wire(placed(response, &[("a", at)]));
    assert!(wire.raw_output_contents[0].is_empty());
    assert_eq!(wire.raw_output_contents[1].as_ref(), floats.as_slice());
    let p = &wire.outputs[0].parameters;
    assert_eq!(p.get("shared_memory_region"), Some(&string_param("out")));
    assert_eq!(p.get("shared_memory_byte_size"), Some(&int_param(8)));
    assert_eq!(p.get("shared_memory_offset"), Some(&int_param(16)));
    assert!(wire.outputs[1].parameters.is_empty());
}

#[test]
fn response_uses_raw_output_contents() {
    let floats = le(&[1.0f32, 2.0], |v| v.to_le_bytes());
    let strings = vec![Bytes::from_static(b"cat"), Bytes::from_static(b"")];
    let mut parameters = BTreeMap::new();
    parameters.insert("triton_final_response".to_string(), ParamValue::Bool(true));
    let response = InferResponse {
        model_name: "m".into(),
        model_version: 12,
        id: Some("abc".into()),
        parameters,
        outputs: vec![
            Tensor::from_raw("y", DataType::F32, vec![1, 2], floats.clone()),
            Tensor::new("labels", DataType::Bytes, vec![2], TensorData::Strings(strings)),
        ],
    };
    let wire = infer_response_to_wire(placed(response, &[]));
    assert_eq!(wire.model_name, "m");
    assert_eq!(wire.model_version, "12");
    assert_eq!(wire.id, "abc");
    assert_eq!(
        wire.parameters.get("triton_final_response"),
        Some(&InferParameter {
            parameter_choice: Some(ParameterChoice::BoolParam(true))
        })
    );
    let names: Vec<_> = wire
        .outputs
        .iter()
        .map(|o| (o.name.as_str(), o.datatype.as_str(), o.shape.clone()))
        .collect();
    assert_eq!(
        names,
        vec![("y", "FP32", vec![1, 2]), ("labels", "BYTES", vec![2])]
    );
    assert!(wire.outputs.iter().all(|o| o.contents.is_none()));
    assert_eq!(wire.raw_output_contents[0].as_ref(), floats.as_slice());
    assert_eq!(wire.raw_output_contents[1].as_ref(), b"\x03\0\0\0cat\0\0\0\0");

    // No id: the field stays empty.
    let response = InferResponse {
        model_name: "m".into(),
        model_version: 1,
        id: None,
        parameters: BTreeMap::new(),
        outputs: vec![],
    };
    assert_eq!(infer_response_to_wire(placed(response, &[])).id, "");
}

#[test]
fn metadata_conversions() {
    let metadata = ModelMetadata {
        name: "m".into(),
        versions: vec!["1".into(), "2".into()],
        platform: "onnxruntime_onnx".into(),
        signatures: Vec::new(),
        inputs: vec![TensorMeta {
            name: "x".into(),
            datatype: DataType::F16,
            shape: vec![-1, 3],
        }],
        outputs: vec![TensorMeta {
            name: "y".into(),
            datatype: DataType::Bytes,
            shape: vec![-1],
        }],
    };
    let wire = model_metadata_to_wire(metadata);
    assert_eq!(wire.name, "m");
    assert_eq!(wire.versions, vec!["1", "2"]);
    assert_eq!(wire.platform, "onnxruntime_onnx");
    assert_eq!(
        wire.inputs,
        vec![TensorMetadata {
            name: "x".into(),
            datatype: "FP16".into(),
            shape: vec![-1, 3]
        }]
    );
    assert_eq!(wire.outputs[0].datatype, "BYTES");

    let server = server_metadata_to_wire(ServerMetadata {
        name: "oxserve".into(),
        version: "0.1.0".into(),
        extensions: vec!["classification".into()],
    });
    assert_eq!((server.name.as_str(), server.extensions.len()), ("oxserve", 1));

    let row = index_entry_to_wire(IndexEntry {
        name: "broken".into(),
        version: None,
        state: "UNAVAILABLE".into(),
        reason: "bad config".into(),
    });
    assert_eq!(
        (row.version.as_str(), row.state.as_str(), row.reason.as_str()),
        ("", "UNAVAILABLE", "bad config")
    );
    let row = index_entry_to_wire(IndexEntry {
        name: "m".into(),
        version: Some(3),
        state: "READY".into(),
        reason: String::new(),
    });
    assert_eq!(row.version, "3");
}

// ---- wire format (field numbers tritonclient relies on) -------------------------------------

#[test]
fn infer_request_field_numbers() {
    // model_name=1, model_version=2, id=3, raw_input_contents=7 (all length-delimited).
    let wire = [0x0a, 1, b'm', 0x12, 1, b'1', 0x1a, 1, b'x', 0x3a, 2, b'a', b'b'];
    let decoded = ModelInferRequest::decode(&wire[..]).ok();
    let d = decoded.as_ref();
    assert_eq!(
        d.map(|r| (r.model_name.as_str(), r.model_version.as_str(), r.id.as_str())),
        Some(("m", "1", "x"))
    );
    assert_eq!(
        d.map(|r| r.raw_input_contents.clone()),
        Some(vec![Bytes::from_static(b"ab")])
    );
}

#[test]
fn response_and_parameter_field_numbers() {
    let response = ModelInferResponse {
        raw_output_contents: vec![Bytes::from_static(b"z")],
        ..Default::default()
    };
    // raw_output_contents = 6, length-delimited.
    assert_eq!(response.encode_to_vec(), vec![0x32, 1, b'z']);
    // Triton's additions: double_param = 4 (fixed64), uint64_param = 5 (varint).
    let double = InferParameter {
        parameter_choice: Some(ParameterChoice::DoubleParam(1.0)),
    };
    assert_eq!(double.encode_to_vec()[0], 0x21);
    let uint = InferParameter {
        parameter_choice: Some(ParameterChoice::Uint64Param(1)),
    };
    assert_eq!(uint.encode_to_vec(), vec![0x28, 1]);
}

#[test]
fn model_config_is_the_repository_type() {
    // Compiles only if build.rs mapped `.inference.ModelConfig` (and nothing else of
    // ModelConfigResponse) to the repository crate.
    let config = oxserve_repository::pb::ModelConfig {
        name: "m".into(),
        max_batch_size: 8,
        ..Default::default()
    };
    let response = ModelConfigResponse {
        config: Some(config.clone()),
    };
    // config = 1, length-delimited, holding ModelConfig.name = 1 and max_batch_size = 4.
    assert_eq!(response.encode_to_vec(), vec![0x0a, 5, 0x0a, 1, b'm', 0x20, 8]);
    let back = ModelConfigResponse::decode(response.encode_to_vec().as_slice()).ok();
    assert_eq!(back.and_then(|r| r.config), Some(config));
}

fn dur(count: u64, ns: u64) -> oxserve_engine::StatDuration {
    oxserve_engine::StatDuration { count, ns }
}

#[test]
fn model_statistics_to_wire_keeps_every_figure() {
    let stats = oxserve_engine::ModelStatistics {
        shadow: None,
        name: "add_sub".into(),
        version: "3".into(),
        last_inference: 1_700_000_000_123,
        inference_count: 7,
        execution_count: 4,
        inference_stats: oxserve_engine::InferStats {
            success: dur(5, 500),
            fail: dur(1, 10),
            queue: dur(5, 50),
            compute_input: dur(5, 5),
            compute_infer: dur(5, 300),
            compute_output: dur(5, 6),
        },
        batch_stats: vec![
            oxserve_engine::BatchStat {
                batch_size: 1,
                compute_input: dur(3, 3),
                compute_infer: dur(3, 200),
                compute_output: dur(3, 4),
            },
            oxserve_engine::BatchStat {
                batch_size: 4,
                compute_input: dur(1, 2),
                compute_infer: dur(1, 100),
                compute_output: dur(1, 2),
            },
        ],
    };
    let wire = model_statistics_to_wire(stats);
    assert_eq!((wire.name.as_str(), wire.version.as_str()), ("add_sub", "3"));
    assert_eq!(wire.last_inference, 1_700_000_000_123);
    assert_eq!((wire.inference_count, wire.execution_count), (7, 4));
    let s = wire.inference_stats.unwrap_or_default();
    let pair = |d: Option<StatisticDuration>| d.map(|d| (d.count, d.ns));
    assert_eq!(pair(s.success), Some((5, 500)));
    assert_eq!(pair(s.fail), Some((1, 10)));
    assert_eq!(pair(s.queue), Some((5, 50)));
    assert_eq!(pair(s.compute_input), Some((5, 5)));
    assert_eq!(pair(s.compute_infer), Some((5, 300)));
    assert_eq!(pair(s.compute_output), Some((5, 6)));
    // No response cache: present and zero, as Triton reports it.
    assert_eq!(pair(s.cache_hit), Some((0, 0)));
    assert_eq!(pair(s.cache_miss), Some((0, 0)));
    let batches: Vec<_> = wire
        .batch_stats
        .iter()
        .map(|b| (b.batch_size, pair(b.compute_infer)))
        .collect();
    assert_eq!(batches, vec![(1, Some((3, 200))), (4, Some((1, 100)))]);
    assert!(wire.memory_usage.is_empty() && wire.response_stats.is_empty());
    assert!(wire.shadow.is_none());
}

#[test]
fn shadow_statistics_reach_the_wire() {
    let stats = oxserve_engine::ModelStatistics {
        shadow: Some(oxserve_engine::ShadowStats {
            primary_version: 1,
            compared: 4,
            failed: 1,
            max_abs_diff: 6.0,
            max_rel_diff: 2.0,
            classified: 2,
            agreed: 1,
            latency_ns: 4_000,
        }),
        ..Default::default()
    };
    let shadow = model_statistics_to_wire(stats).shadow.unwrap();
    assert_eq!(shadow.primary_version, "1");
    assert_eq!(
        (shadow.compared, shadow.failed, shadow.classified, shadow.agreed),
        (4, 1, 2, 1)
    );
    assert_eq!((shadow.max_abs_diff, shadow.max_rel_diff), (6.0, 2.0));
    assert_eq!(shadow.mean_latency_ns, 1_000);
}

#[test]
fn statistics_field_numbers_are_tritons() {
    use crate::grpc::pb::{
        InferBatchStatistics, ModelStatistics as Wire, ModelStatisticsRequest, ModelStatisticsResponse,
    };
    // ModelStatisticsRequest: name = 1, version = 2.
    let request = ModelStatisticsRequest {
        name: "m".into(),
        version: "2".into(),
    };
    assert_eq!(request.encode_to_vec(), vec![0x0a, 1, b'm', 0x12, 1, b'2']);
    // ModelStatistics: last_inference = 3, inference_count = 4, execution_count = 5 (varints),
    // inference_stats = 6, batch_stats = 7 (length-delimited); StatisticDuration: count = 1,
    // ns = 2; InferBatchStatistics: batch_size = 1, compute_infer = 3.
    let stats = Wire {
        last_inference: 1,
        inference_count: 2,
        execution_count: 3,
        inference_stats: Some(InferStatistics {
            fail: Some(StatisticDuration { count: 4, ns: 5 }),
            ..Default::default()
        }),
        batch_stats: vec![InferBatchStatistics {
            batch_size: 8,
            compute_infer: Some(StatisticDuration { count: 1, ns: 0 }),
            ..Default::default()
        }],
        ..Default::default()
    };
    assert_eq!(
        stats.encode_to_vec(),
        vec![
            0x18, 1, 0x20, 2, 0x28, 3, // counters
            0x32, 6, 0x12, 4, 0x08, 4, 0x10, 5, // inference_stats { fail { 4, 5 } }
            0x3a, 6, 0x08, 8, 0x1a, 2, 0x08, 1, // batch_stats [{ 8, compute_infer { 1 } }]
        ]
    );
    // ModelStatisticsResponse: model_stats = 1.
    let response = ModelStatisticsResponse {
        model_stats: vec![Wire::default()],
    };
    assert_eq!(response.encode_to_vec(), vec![0x0a, 0]);
}
