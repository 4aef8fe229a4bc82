//! HTTP and gRPC give the same answer, or the same error (kind and message), for the same
//! request: both go through the one request runner of `oxserve-frontend`. The real engine
//! facade with the `testkit` identity model; the HTTP router is called in process and the
//! gRPC service through its generated trait, so only the wire codecs differ.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt;
use oxserve_backend::Backend;
use oxserve_backend::testkit::TestkitBackend;
use oxserve_engine::{InferenceService, ManagerOptions, ModelManager};
use oxserve_frontend::DecodeLimits;
use oxserve_kserve::grpc::GrpcFrontend;
use oxserve_kserve::grpc::pb::infer_parameter::ParameterChoice;
use oxserve_kserve::grpc::pb::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use oxserve_kserve::grpc::pb::{
    GrpcInferenceService, InferParameter, InferTensorContents, ModelInferRequest,
};
use oxserve_kserve::http::{HttpOptions, router};
use oxserve_shm::SharedMemoryRegistry;
use serde_json::{Value, json};
use tower::ServiceExt;

/// At most this many BYTES elements per request on both front-ends.
const BYTES_LIMIT: usize = 3;

struct Frontends {
    _repo: tempfile::TempDir,
    http: axum::Router,
    grpc: GrpcFrontend,
}

async fn frontends() -> Result<Frontends> {
    let repo = tempfile::tempdir()?;
    let model = repo.path().join("m");
    std::fs::create_dir_all(model.join("1"))?;
    std::fs::write(
        model.join("1").join("model.json"),
        r#"{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1]},
                       {"name": "INPUT1", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1]},
                        {"name": "OUTPUT1", "datatype": "BYTES", "shape": [-1]}]}"#,
    )?;
    std::fs::write(
        model.join("config.pbtxt"),
        r#"
        backend: "testkit"
        default_model_filename: "model.json"
        max_batch_size: 0
        input [{ name: "INPUT0", data_type: TYPE_FP32, dims: [-1] },
               { name: "INPUT1", data_type: TYPE_STRING, dims: [-1] }]
        output [{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [-1] },
                { name: "OUTPUT1", data_type: TYPE_STRING, dims: [-1] }]
        "#,
    )?;
    let manager = ModelManager::new(
        vec![Arc::new(TestkitBackend::new()) as Arc<dyn Backend>],
        ManagerOptions {
            repositories: vec![repo.path().to_path_buf()],
            ..Default::default()
        },
    );
    let engine = InferenceService::new(manager, true);
    engine.load_models().await;
    let shm = Arc::new(SharedMemoryRegistry::new());
    let limits = DecodeLimits {
        max_bytes_elements: BYTES_LIMIT,
    };
    let http = router(
        engine.clone(),
        HttpOptions {
            decode: limits,
            ..Default::default()
        },
        Arc::clone(&shm),
    );
    let grpc = GrpcFrontend::new(engine, shm).with_decode_limits(limits);
    Ok(Frontends {
        _repo: repo,
        http,
        grpc,
    })
}

/// One request case, written once and sent over both protocols. Parameters are JSON values
/// (numbers are int64, strings are strings).
#[derive(Clone)]
struct Case {
    name: &'static str,
    model: &'static str,
    version: &'static str,
    floats: Vec<f32>,
    strings: Vec<&'static str>,
    input0_params: Vec<(&'static str, Value)>,
    outputs: Vec<(&'static str, Vec<(&'static str, Value)>)>,
}

fn case(name: &'static str) -> Case {
    Case {
        name,
        model: "m",
        version: "",
        floats: vec![0.5, 2.0, 1.0],
        strings: vec!["a"],
        input0_params: vec![],
        outputs: vec![],
    }
}

/// What a protocol answered: the outputs (name, datatype, shape, FP32 values or strings), or
/// the error as a gRPC code name and its message.
#[derive(Debug, PartialEq)]
enum Answer {
    Outputs(Vec<(String, String, Vec<i64>, Value)>),
    Error(&'static str, String),
}

fn http_code(status: u16) -> &'static str {
    match status {
        400 => "InvalidArgument",
        404 => "NotFound",
        413 | 429 => "ResourceExhausted",
        501 => "Unimplemented",
        503 => "Unavailable",
        _ => "Internal",
    }
}

fn grpc_code(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::InvalidArgument => "InvalidArgument",
        tonic::Code::NotFound => "NotFound",
        tonic::Code::ResourceExhausted => "ResourceExhausted",
        tonic::Code::Unimplemented => "Unimplemented",
        tonic::Code::Unavailable => "Unavailable",
        _ => "Internal",
    }
}

fn json_params(params: &[(&str, Value)]) -> Value {
    Value::Object(
        params
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.clone()))
            .collect(),
    )
}

async fn over_http(f: &Frontends, c: &Case) -> Result<Answer> {
    let mut input0 =
        json!({"name": "INPUT0", "datatype": "FP32", "shape": [c.floats.len()], "data": c.floats});
    if !c.input0_params.is_empty() {
        input0["parameters"] = json_params(&c.input0_params);
    }
    let input1 =
        json!({"name": "INPUT1", "datatype": "BYTES", "shape": [c.strings.len()], "data": c.strings});
    let mut body = json!({"inputs": [input0, input1]});
    if !c.outputs.is_empty() {
        body["outputs"] = c
            .outputs
            .iter()
            .map(|(name, params)| json!({"name": name, "parameters": json_params(params)}))
            .collect();
    }
    let uri = if c.version.is_empty() {
        format!("/v2/models/{}/infer", c.model)
    } else {
        format!("/v2/models/{}/versions/{}/infer", c.model, c.version)
    };
    let request = http::Request::post(uri)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body)?))?;
    let response = f.http.clone().oneshot(request).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    let value: Value = serde_json::from_slice(&bytes)?;
    if status != 200 {
        let message = value["error"].as_str().context("error body")?.to_string();
        return Ok(Answer::Error(http_code(status), message));
    }
    let outputs = value["outputs"]
        .as_array()
        .context("outputs")?
        .iter()
        .map(|o| {
            let shape = o["shape"]
                .as_array()
                .map_or(vec![], |s| s.iter().filter_map(Value::as_i64).collect());
            (
                o["name"].as_str().unwrap_or_default().to_string(),
                o["datatype"].as_str().unwrap_or_default().to_string(),
                shape,
                o["data"].clone(),
            )
        })
        .collect();
    Ok(Answer::Outputs(outputs))
}

fn wire_param(v: &Value) -> InferParameter {
    let choice = match v {
        Value::String(s) => ParameterChoice::StringParam(s.clone()),
        Value::Bool(b) => ParameterChoice::BoolParam(*b),
        other => ParameterChoice::Int64Param(other.as_i64().unwrap_or(i64::MIN)),
    };
    InferParameter {
        parameter_choice: Some(choice),
    }
}

fn wire_params(params: &[(&str, Value)]) -> HashMap<String, InferParameter> {
    params
        .iter()
        .map(|(k, v)| ((*k).to_string(), wire_param(v)))
        .collect()
}

async fn over_grpc(f: &Frontends, c: &Case) -> Result<Answer> {
    let request = ModelInferRequest {
        model_name: c.model.into(),
        model_version: c.version.into(),
        inputs: vec![
            InferInputTensor {
                name: "INPUT0".into(),
                datatype: "FP32".into(),
                shape: vec![c.floats.len() as i64],
                parameters: wire_params(&c.input0_params),
                contents: Some(InferTensorContents {
                    fp32_contents: c.floats.clone(),
                    ..Default::default()
                }),
            },
            InferInputTensor {
                name: "INPUT1".into(),
                datatype: "BYTES".into(),
                shape: vec![c.strings.len() as i64],
                parameters: Default::default(),
                contents: Some(InferTensorContents {
                    bytes_contents: c
                        .strings
                        .iter()
                        .map(|s| Bytes::from(s.as_bytes().to_vec()))
                        .collect(),
                    ..Default::default()
                }),
            },
        ],
        outputs: c
            .outputs
            .iter()
            .map(|(name, params)| InferRequestedOutputTensor {
                name: (*name).into(),
                parameters: wire_params(params),
            })
            .collect(),
        ..Default::default()
    };
    let response = match f.grpc.model_infer(tonic::Request::new(request)).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            return Ok(Answer::Error(
                grpc_code(status.code()),
                status.message().to_string(),
            ));
        }
    };
    let outputs = response
        .outputs
        .iter()
        .zip(&response.raw_output_contents)
        .map(|(o, raw)| -> Result<_> {
            Ok((
                o.name.clone(),
                o.datatype.clone(),
                o.shape.clone(),
                values(&o.datatype, raw)?,
            ))
        })
        .collect::<Result<_>>()?;
    Ok(Answer::Outputs(outputs))
}

/// Raw output contents as the JSON values HTTP would have sent.
fn values(datatype: &str, raw: &Bytes) -> Result<Value> {
    Ok(match datatype {
        "FP32" => raw
            .chunks_exact(4)
            .map(|c| json!(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        "BYTES" => oxserve_core::Tensor::strings_from_wire("o", raw, usize::MAX)?
            .iter()
            .map(|s| json!(String::from_utf8_lossy(s)))
            .collect(),
        other => anyhow::bail!("unexpected datatype {other}"),
    })
}

fn cases() -> Vec<Case> {
    let shm_params = || {
        vec![
            ("shared_memory_region", json!("r")),
            ("shared_memory_byte_size", json!(12)),
        ]
    };
    vec![
        case("plain"),
        Case {
            outputs: vec![("OUTPUT0", vec![("classification", json!(0))])],
            ..case("classification 0 is the plain tensor")
        },
        Case {
            outputs: vec![("OUTPUT0", vec![("classification", json!(2))])],
            ..case("classification 2")
        },
        Case {
            outputs: vec![("OUTPUT0", vec![("classification", json!(-1))])],
            ..case("negative classification")
        },
        Case {
            outputs: vec![("OUTPUT0", vec![("classification", json!("2"))])],
            ..case("classification as a string")
        },
        Case {
            outputs: vec![("nope", vec![])],
            ..case("unknown output")
        },
        Case {
            outputs: vec![("OUTPUT1", vec![])],
            ..case("one output asked for")
        },
        Case {
            version: "x",
            ..case("version that is not a number")
        },
        Case {
            version: "7",
            ..case("version that does not exist")
        },
        Case {
            model: "nope",
            ..case("unknown model")
        },
        Case {
            input0_params: shm_params(),
            ..case("shared memory and data both set")
        },
        Case {
            outputs: vec![("OUTPUT0", shm_params())],
            ..case("output in an unregistered region")
        },
        Case {
            outputs: vec![(
                "OUTPUT0",
                [shm_params(), vec![("classification", json!(1))]].concat(),
            )],
            ..case("output in shared memory with classification")
        },
        Case {
            outputs: vec![("OUTPUT0", vec![("shared_memory_byte_size", json!(4))])],
            ..case("output region size without a region")
        },
        Case {
            strings: vec!["a", "b", "c", "d"],
            ..case("more BYTES elements than the limit")
        },
        Case {
            outputs: vec![("OUTPUT0", vec![("binary_data", json!(1))])],
            ..case("binary_data that is not a boolean")
        },
    ]
}

#[tokio::test]
async fn http_and_grpc_answer_alike() -> Result<()> {
    let f = frontends().await?;
    let mut answered = Vec::new();
    for c in cases() {
        let http = over_http(&f, &c).await?;
        let grpc = over_grpc(&f, &c).await?;
        assert_eq!(http, grpc, "case '{}'", c.name);
        match &http {
            Answer::Error(code, message) => {
                assert_ne!(*code, "Internal", "case '{}': {message}", c.name)
            }
            _ => answered.push(c.name),
        }
    }
    // Every other case must fail, with a client error.
    assert_eq!(
        answered,
        [
            "plain",
            "classification 0 is the plain tensor",
            "classification 2",
            "one output asked for"
        ]
    );
    Ok(())
}

#[tokio::test]
async fn classification_zero_and_the_plain_tensor_are_the_same_answer() -> Result<()> {
    let f = frontends().await?;
    let plain = over_http(&f, &case("plain")).await?;
    let zero = Case {
        outputs: vec![
            ("OUTPUT0", vec![("classification", json!(0))]),
            ("OUTPUT1", vec![]),
        ],
        ..case("zero")
    };
    assert_eq!(over_http(&f, &zero).await?, plain);
    assert_eq!(over_grpc(&f, &zero).await?, plain);
    Ok(())
}
