//! Property tests of the inference request parsers, through the public entry points (the axum
//! router and the gRPC service) and the real engine running the example models on tract:
//! arbitrary bytes, and valid requests mutated (bytes flipped, inserted, deleted; shapes,
//! datatypes, sizes and header lengths changed). Every answer is a success or a client error,
//! never a panic or a 5xx. The coverage-guided counterpart is the `fuzz/` crate
//! (docs/fuzzing.md); `PROPTEST_CASES=N` runs more cases.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use oxserve_engine::{InferenceService, ManagerOptions, ModelManager};
use oxserve_kserve::grpc::GrpcFrontend;
use oxserve_kserve::grpc::pb::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use oxserve_kserve::grpc::pb::{GrpcInferenceService, InferTensorContents, ModelInferRequest};
use oxserve_kserve::http::{HttpOptions, router};
use oxserve_shm::SharedMemoryRegistry;
use proptest::prelude::*;
use prost::Message as _;
use serde_json::{Value, json};
use tower::ServiceExt;

struct Server {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    grpc: GrpcFrontend,
}

/// The real front-ends over the example models on tract, started once for all cases.
fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let repository = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/models");
        let engine = runtime.block_on(async {
            let engine = InferenceService::new(
                ModelManager::new(
                    vec![Arc::new(oxserve_tract::TractBackend::new())],
                    ManagerOptions {
                        repositories: vec![repository],
                        ..ManagerOptions::default()
                    },
                ),
                false,
            );
            engine.load_models().await;
            engine
        });
        let shm = Arc::new(SharedMemoryRegistry::new());
        Server {
            router: router(engine.clone(), HttpOptions::default(), Arc::clone(&shm)),
            grpc: GrpcFrontend::new(engine, shm),
            runtime,
        }
    })
}

/// Sends one HTTP request; fails the case on a server error (429 and the client's own
/// timeout, 504, are the client's to handle).
fn http(request: http::Request<Body>) -> Result<StatusCode, TestCaseError> {
    let s = server();
    let (status, body) = s.runtime.block_on(async {
        let response = match s.router.clone().oneshot(request).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        (status, body)
    });
    prop_assert!(
        !status.is_server_error() || status == StatusCode::GATEWAY_TIMEOUT,
        "HTTP {status} for client input: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(status)
}

fn grpc(request: ModelInferRequest) -> Result<(), TestCaseError> {
    use tonic::Code;
    let s = server();
    if let Err(status) = s
        .runtime
        .block_on(s.grpc.model_infer(tonic::Request::new(request)))
    {
        prop_assert!(
            !matches!(
                status.code(),
                Code::Internal | Code::Unknown | Code::DataLoss | Code::Unimplemented | Code::Unavailable
            ),
            "gRPC {:?} for client input: {}",
            status.code(),
            status.message()
        );
    }
    Ok(())
}

fn post(path: &str, content_type: &str, header_len: Option<String>, body: Vec<u8>) -> http::Request<Body> {
    let mut request = http::Request::post(path).header(http::header::CONTENT_TYPE, content_type);
    if let Some(n) = header_len {
        request = request.header("inference-header-content-length", n);
    }
    request.body(Body::from(body)).expect("a valid request")
}

/// A valid JSON request for add_sub (two FP32 inputs of 16, batch 1).
fn valid_json() -> Value {
    let data: Vec<f32> = (0..16).map(|i| i as f32).collect();
    json!({
        "id": "1",
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": data},
            {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "data": data},
        ],
        "outputs": [{"name": "OUTPUT0"}, {"name": "OUTPUT1", "parameters": {"binary_data": true}}]
    })
}

/// The same request with binary inputs: the JSON header and its length, then the tensors.
fn valid_binary() -> (Vec<u8>, usize) {
    let header = json!({
        "inputs": [
            {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "parameters": {"binary_data_size": 64}},
            {"name": "INPUT1", "datatype": "FP32", "shape": [1, 16], "parameters": {"binary_data_size": 64}},
        ]
    });
    let mut body = serde_json::to_vec(&header).expect("JSON");
    let header_len = body.len();
    body.extend((0..32).flat_map(|i| (i as f32).to_le_bytes()));
    (body, header_len)
}

fn valid_grpc() -> ModelInferRequest {
    let raw: Vec<u8> = (0..16).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let input = |name: &str| InferInputTensor {
        name: name.into(),
        datatype: "FP32".into(),
        shape: vec![1, 16],
        ..Default::default()
    };
    ModelInferRequest {
        model_name: "add_sub".into(),
        inputs: vec![input("INPUT0"), input("INPUT1")],
        outputs: vec![InferRequestedOutputTensor {
            name: "OUTPUT0".into(),
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::from(raw.clone()), Bytes::from(raw)],
        ..Default::default()
    }
}

/// A byte-level edit of a valid message.
#[derive(Debug, Clone)]
enum Edit {
    Flip { at: usize, bit: u8 },
    Insert { at: usize, byte: u8 },
    Delete { at: usize, len: usize },
    Set { at: usize, byte: u8 },
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Edit::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Edit::Insert { at, byte }),
        (any::<usize>(), 1usize..16).prop_map(|(at, len)| Edit::Delete { at, len }),
        // Bytes that matter to JSON and to protobuf varints.
        (
            any::<usize>(),
            prop::sample::select(vec![
                b'"', b'[', b']', b'{', b'}', b',', b'-', b'9', 0x80, 0xff, 0
            ])
        )
            .prop_map(|(at, byte)| Edit::Set { at, byte }),
    ];
    prop::collection::vec(edit, 1..6)
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = bytes.len();
        match *e {
            Edit::Flip { at, bit } if n > 0 => bytes[at % n] ^= 1 << bit,
            Edit::Insert { at, byte } => bytes.insert(at % (n + 1), byte),
            Edit::Delete { at, len } if n > 0 => {
                let at = at % n;
                bytes.drain(at..(at + len).min(n));
            }
            Edit::Set { at, byte } if n > 0 => bytes[at % n] = byte,
            _ => {}
        }
    }
    bytes
}

/// Values that break sizes: empty, negative, zero, off by one, huge, overflowing products.
fn dim() -> impl Strategy<Value = i64> {
    prop_oneof![
        prop::sample::select(vec![
            -2i64,
            -1,
            0,
            1,
            2,
            8,
            9,
            15,
            16,
            17,
            1 << 31,
            1 << 40,
            i64::MAX,
            i64::MIN
        ]),
        0i64..64,
    ]
}

fn datatype() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "BF16",
            "FP32", "FP64", "BYTES", "fp32", "", "FP8",
        ])
        .prop_map(String::from),
        "[A-Z0-9]{0,6}",
    ]
}

fn config() -> ProptestConfig {
    // Fast enough for every CI run; PROPTEST_CASES raises it.
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn http_arbitrary_bodies(body in prop::collection::vec(any::<u8>(), 0..512),
                             binary in any::<bool>(),
                             header_len in prop::option::of(prop_oneof![any::<u32>().prop_map(|n| n.to_string()),
                                                                       any::<i64>().prop_map(|n| n.to_string()),
                                                                       "[ 0-9a-z+-]{0,8}"])) {
        let content_type = if binary { "application/octet-stream" } else { "application/json" };
        http(post("/v2/models/add_sub/infer", content_type, header_len, body))?;
    }

    #[test]
    fn http_json_byte_mutations(edits in edits()) {
        let body = apply(serde_json::to_vec(&valid_json()).expect("JSON"), &edits);
        http(post("/v2/models/add_sub/infer", "application/json", None, body))?;
    }

    #[test]
    fn http_json_shapes_datatypes_and_sizes(shape in prop::collection::vec(dim(), 0..4),
                                            dtype in datatype(),
                                            len in 0usize..40,
                                            which in 0usize..2,
                                            as_strings in any::<bool>(),
                                            binary_output in any::<bool>(),
                                            classification in prop::option::of(-2i64..20)) {
        let mut request = valid_json();
        let input = &mut request["inputs"][which];
        input["shape"] = json!(shape);
        input["datatype"] = json!(dtype);
        input["data"] = if as_strings { json!(vec!["1"; len]) } else { json!(vec![1.5; len]) };
        if let Some(c) = classification {
            request["outputs"][0]["parameters"] = json!({"classification": c, "binary_data": binary_output});
        }
        let body = serde_json::to_vec(&request).expect("JSON");
        http(post("/v2/models/add_sub/infer", "application/json", None, body))?;
    }

    #[test]
    fn http_binary_header_length_and_split(delta in -80i64..80,
                                           size in prop_oneof![Just(64i64), -1i64..200, Just(i64::MAX), Just(1 << 40)],
                                           trim in 0usize..140,
                                           edits in prop::option::of(edits()),
                                           gzip in any::<bool>()) {
        let (body, header_len) = valid_binary();
        let mut text = String::from_utf8(body[..header_len].to_vec()).expect("UTF-8");
        text = text.replacen("\"binary_data_size\":64", &format!("\"binary_data_size\":{size}"), 1);
        let mut body_bytes = text.into_bytes();
        let header_len = body_bytes.len() as i64 + delta;
        body_bytes.extend_from_slice(&body[body.len() - 128..]);
        body_bytes.truncate(body_bytes.len().saturating_sub(trim));
        if let Some(edits) = edits {
            body_bytes = apply(body_bytes, &edits);
        }
        let mut request = http::Request::post("/v2/models/add_sub/infer")
            .header(http::header::CONTENT_TYPE, "application/octet-stream")
            .header("inference-header-content-length", header_len.to_string());
        if gzip {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&body_bytes).expect("in memory");
            body_bytes = gz.finish().expect("in memory");
            request = request.header(http::header::CONTENT_ENCODING, "gzip");
        }
        http(request.body(Body::from(body_bytes)).expect("a valid request"))?;
    }

    #[test]
    fn http_shared_memory_parameters(region in prop_oneof![Just(json!("nope")), Just(json!(7)), Just(json!(null)), "[a-z]{0,4}".prop_map(|s| json!(s))],
                                     offset in prop::option::of(prop_oneof![any::<i64>().prop_map(|n| json!(n)), Just(json!(u64::MAX)), Just(json!(-1.5)), Just(json!("0"))]),
                                     byte_size in prop::option::of(prop_oneof![any::<i64>().prop_map(|n| json!(n)), Just(json!(u64::MAX)), Just(json!(true))]),
                                     on_output in any::<bool>()) {
        let mut request = valid_json();
        let mut params = serde_json::Map::new();
        params.insert("shared_memory_region".into(), region);
        if let Some(o) = offset { params.insert("shared_memory_offset".into(), o); }
        if let Some(b) = byte_size { params.insert("shared_memory_byte_size".into(), b); }
        if on_output {
            request["outputs"][0]["parameters"] = Value::Object(params);
        } else {
            request["inputs"][0]["parameters"] = Value::Object(params);
            request["inputs"][0].as_object_mut().expect("object").remove("data");
        }
        let body = serde_json::to_vec(&request).expect("JSON");
        http(post("/v2/models/add_sub/infer", "application/json", None, body))?;
    }

    #[test]
    fn grpc_arbitrary_messages(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(mut request) = ModelInferRequest::decode(bytes.as_slice()) {
            request.model_name = "add_sub".into();
            grpc(request)?;
        }
    }

    #[test]
    fn grpc_byte_mutations(edits in edits()) {
        let bytes = apply(valid_grpc().encode_to_vec(), &edits);
        if let Ok(request) = ModelInferRequest::decode(bytes.as_slice()) {
            grpc(request)?;
        }
    }

    #[test]
    fn grpc_raw_and_typed_contents(shape in prop::collection::vec(dim(), 0..4),
                                   dtype in datatype(),
                                   raw_len in prop::option::of(0usize..200),
                                   raw_count in 0usize..4,
                                   typed_len in prop::option::of(0usize..40),
                                   which in 0usize..2) {
        let mut request = valid_grpc();
        let input = &mut request.inputs[which];
        input.shape = shape;
        input.datatype = dtype;
        if let Some(n) = typed_len {
            input.contents = Some(InferTensorContents {
                fp32_contents: vec![1.0; n],
                int64_contents: vec![3; n / 2],
                bytes_contents: vec![Bytes::from_static(b"ab"); n / 3],
                ..Default::default()
            });
        }
        match raw_len {
            Some(n) => request.raw_input_contents = vec![Bytes::from(vec![7u8; n]); raw_count],
            None => request.raw_input_contents.clear(),
        }
        grpc(request)?;
    }
}
