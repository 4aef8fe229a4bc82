//! Building and sending requests from the command line (`oxserve infer`); shared with
//! `oxserve bench`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use oxserve_core::{DataType, InferRequest, InferResponse, ModelMetadata, Tensor, TensorData, TensorMeta};
use oxserve_frontend::{DecodeLimits, InputData, ModelTarget, PlacedOutput, Placement, RunResponse};
use oxserve_kserve::grpc::pb;
use oxserve_kserve::http::{JsonData, decode_request, encode_response};
use rand::Rng;
use serde::Deserialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    Http,
    Grpc,
}

#[derive(Args)]
pub struct InferArgs {
    /// Server address: the HTTP port for --protocol http, the gRPC port for --protocol grpc.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    #[arg(long, value_enum, default_value = "http")]
    protocol: Protocol,
    /// Model name.
    #[arg(long)]
    model: String,
    /// Model version (default: latest).
    #[arg(long)]
    version: Option<u64>,
    /// A KServe v2 JSON inference request; random inputs when absent.
    #[arg(long, value_name = "FILE")]
    input: Option<PathBuf>,
    /// Batch size for random inputs.
    #[arg(long, default_value_t = 1)]
    batch: i64,
}

#[derive(Deserialize)]
struct TensorMetaJson {
    name: String,
    datatype: String,
    shape: Vec<i64>,
}

#[derive(Deserialize)]
struct ModelMetadataJson {
    name: String,
    #[serde(default)]
    versions: Vec<String>,
    #[serde(default)]
    platform: String,
    inputs: Vec<TensorMetaJson>,
    outputs: Vec<TensorMetaJson>,
}

fn tensor_meta(name: String, datatype: &str, shape: Vec<i64>) -> anyhow::Result<TensorMeta> {
    let datatype =
        DataType::from_wire_name(datatype).with_context(|| format!("unknown datatype {datatype}"))?;
    Ok(TensorMeta {
        name,
        datatype,
        shape,
    })
}

fn model_path(model: &str, version: Option<u64>) -> String {
    match version {
        Some(v) => format!("/v2/models/{model}/versions/{v}"),
        None => format!("/v2/models/{model}"),
    }
}

pub async fn http_metadata(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    version: Option<u64>,
) -> anyhow::Result<ModelMetadata> {
    let response = client
        .get(format!("{url}{}", model_path(model, version)))
        .send()
        .await?;
    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        bail!("model metadata: HTTP {status}: {text}");
    }
    let m: ModelMetadataJson = serde_json::from_str(&text).context("malformed model metadata")?;
    Ok(ModelMetadata {
        name: m.name,
        versions: m.versions,
        platform: m.platform,
        inputs: m
            .inputs
            .into_iter()
            .map(|t| tensor_meta(t.name, &t.datatype, t.shape))
            .collect::<Result<_, _>>()?,
        outputs: m
            .outputs
            .into_iter()
            .map(|t| tensor_meta(t.name, &t.datatype, t.shape))
            .collect::<Result<_, _>>()?,
        signatures: Vec::new(),
    })
}

pub async fn grpc_metadata(
    client: &mut pb::GrpcInferenceServiceClient<tonic::transport::Channel>,
    model: &str,
    version: Option<u64>,
) -> anyhow::Result<ModelMetadata> {
    let m = client
        .model_metadata(pb::ModelMetadataRequest {
            name: model.to_string(),
            version: version.map(|v| v.to_string()).unwrap_or_default(),
        })
        .await?
        .into_inner();
    let convert = |ts: Vec<pb::model_metadata_response::TensorMetadata>| -> anyhow::Result<Vec<TensorMeta>> {
        ts.into_iter()
            .map(|t| tensor_meta(t.name, &t.datatype, t.shape))
            .collect()
    };
    Ok(ModelMetadata {
        name: m.name,
        versions: m.versions,
        platform: m.platform,
        inputs: convert(m.inputs)?,
        outputs: convert(m.outputs)?,
        signatures: Vec::new(),
    })
}

/// A request with random values for every input; `-1` in the first dimension becomes `batch`,
/// other `-1`s become 1.
pub fn random_request(meta: &ModelMetadata, version: Option<u64>, batch: i64) -> InferRequest {
    let mut rng = rand::rng();
    let inputs = meta
        .inputs
        .iter()
        .map(|t| {
            let shape: Vec<i64> = t
                .shape
                .iter()
                .enumerate()
                .map(|(i, &d)| {
                    if d >= 0 {
                        d
                    } else if i == 0 {
                        batch
                    } else {
                        1
                    }
                })
                .collect();
            let n = shape.iter().product::<i64>().max(0) as usize;
            let mut raw = Vec::new();
            for _ in 0..n {
                match t.datatype {
                    DataType::Bool => raw.push(u8::from(rng.random::<bool>())),
                    DataType::U8 | DataType::I8 => raw.push(rng.random_range(0..10u8)),
                    DataType::U16 | DataType::I16 => raw.extend(rng.random_range(0..10u16).to_le_bytes()),
                    DataType::U32 | DataType::I32 => raw.extend(rng.random_range(0..10u32).to_le_bytes()),
                    DataType::U64 | DataType::I64 => raw.extend(rng.random_range(0..10u64).to_le_bytes()),
                    DataType::F16 => raw.extend(half::f16::from_f32(rng.random::<f32>()).to_le_bytes()),
                    DataType::BF16 => raw.extend(half::bf16::from_f32(rng.random::<f32>()).to_le_bytes()),
                    DataType::F32 => raw.extend(rng.random::<f32>().to_le_bytes()),
                    DataType::F64 => raw.extend(rng.random::<f64>().to_le_bytes()),
                    DataType::Bytes => {}
                }
            }
            let data = if t.datatype == DataType::Bytes {
                TensorData::Strings(vec![Bytes::from_static(b"oxserve"); n])
            } else {
                TensorData::Raw(Bytes::from(raw))
            };
            Tensor::new(t.name.clone(), t.datatype, shape, data)
        })
        .collect();
    InferRequest {
        model_name: meta.name.clone(),
        model_version: version,
        inputs,
        ..Default::default()
    }
}

/// An HTTP body for `request`: plain JSON, or Triton's binary form (JSON header + raw bytes)
/// with the header length to send in `Inference-Header-Content-Length`.
pub fn http_body(request: &InferRequest, binary: bool) -> anyhow::Result<(Bytes, Option<usize>)> {
    let inputs: Vec<serde_json::Value> = request
        .inputs
        .iter()
        .map(|t| -> anyhow::Result<serde_json::Value> {
            let mut v =
                serde_json::json!({"name": t.name, "shape": t.shape, "datatype": t.datatype.wire_name()});
            if binary {
                v["parameters"] = serde_json::json!({"binary_data_size": t.to_wire_bytes().len()});
            } else {
                v["data"] = serde_json::to_value(JsonData(t))?;
            }
            Ok(v)
        })
        .collect::<Result<_, _>>()?;
    let mut body = serde_json::to_vec(&serde_json::json!({
        "inputs": inputs,
        "parameters": {"binary_data_output": binary},
    }))?;
    if !binary {
        return Ok((Bytes::from(body), None));
    }
    let header_len = body.len();
    for t in &request.inputs {
        body.extend_from_slice(&t.to_wire_bytes());
    }
    Ok((Bytes::from(body), Some(header_len)))
}

pub fn grpc_request(request: &InferRequest) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: request.model_name.clone(),
        model_version: request.model_version.map(|v| v.to_string()).unwrap_or_default(),
        inputs: request
            .inputs
            .iter()
            .map(|t| pb::model_infer_request::InferInputTensor {
                name: t.name.clone(),
                datatype: t.datatype.wire_name().to_string(),
                shape: t.shape.clone(),
                ..Default::default()
            })
            .collect(),
        raw_input_contents: request.inputs.iter().map(Tensor::to_wire_bytes).collect(),
        ..Default::default()
    }
}

fn grpc_response(r: pb::ModelInferResponse) -> anyhow::Result<InferResponse> {
    let mut outputs = Vec::with_capacity(r.outputs.len());
    for (o, raw) in r.outputs.into_iter().zip(r.raw_output_contents) {
        let datatype = DataType::from_wire_name(&o.datatype)
            .with_context(|| format!("unknown datatype {}", o.datatype))?;
        let data = if datatype == DataType::Bytes {
            TensorData::Strings(Tensor::strings_from_wire(&o.name, &raw, usize::MAX)?)
        } else {
            TensorData::Raw(raw)
        };
        outputs.push(Tensor::new(o.name, datatype, o.shape, data));
    }
    Ok(InferResponse {
        model_name: r.model_name,
        model_version: r.model_version.parse().unwrap_or(0),
        id: (!r.id.is_empty()).then_some(r.id),
        parameters: Default::default(),
        outputs,
    })
}

/// A request read from a KServe v2 JSON file: the server's own decoder, so the file means
/// what it would mean sent to the server. Its inputs must carry their data.
fn request_from_file(model: &str, version: Option<u64>, body: &Bytes) -> anyhow::Result<InferRequest> {
    let decoded = decode_request(
        ModelTarget::unchecked(model, version),
        body,
        None,
        &DecodeLimits::default(),
    )?;
    let inputs = decoded
        .inputs
        .into_iter()
        .map(|input| match input.data {
            InputData::Body(data) => Ok(Tensor::new(input.name, input.datatype, input.shape, data)),
            InputData::SharedMemory(_) => {
                bail!("input '{}': shared memory is not supported here", input.name)
            }
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(InferRequest {
        model_name: model.to_string(),
        model_version: version,
        id: decoded.id,
        parameters: decoded.parameters,
        inputs,
        outputs: Vec::new(),
        routing_key: None,
        signature: decoded.signature,
        trace: None,
    })
}

/// A response with every output in the JSON, for printing.
fn inline(response: InferResponse) -> RunResponse {
    RunResponse {
        model_name: response.model_name,
        model_version: response.model_version,
        id: response.id,
        parameters: response.parameters,
        outputs: response
            .outputs
            .into_iter()
            .map(|tensor| PlacedOutput {
                tensor,
                placement: Placement::Inline,
            })
            .collect(),
    }
}

pub async fn run(args: InferArgs) -> anyhow::Result<()> {
    let url = args.url.trim_end_matches('/').to_string();
    let file_request = match &args.input {
        Some(path) => {
            let body =
                Bytes::from(std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?);
            Some(request_from_file(&args.model, args.version, &body)?)
        }
        None => None,
    };
    let printed = match args.protocol {
        Protocol::Http => {
            let client = reqwest::Client::new();
            let request = match file_request {
                Some(r) => r,
                None => random_request(
                    &http_metadata(&client, &url, &args.model, args.version).await?,
                    args.version,
                    args.batch,
                ),
            };
            let (body, _) = http_body(&request, false)?;
            let response = client
                .post(format!("{url}{}/infer", model_path(&args.model, args.version)))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            let status = response.status();
            let text = response.text().await?;
            if !status.is_success() {
                bail!("HTTP {status}: {text}");
            }
            text
        }
        Protocol::Grpc => {
            let mut client = pb::GrpcInferenceServiceClient::connect(url.clone())
                .await
                .with_context(|| format!("cannot connect to {url}"))?;
            let request = match file_request {
                Some(r) => r,
                None => random_request(
                    &grpc_metadata(&mut client, &args.model, args.version).await?,
                    args.version,
                    args.batch,
                ),
            };
            let response = client.model_infer(grpc_request(&request)).await?.into_inner();
            let encoded = encode_response(&inline(grpc_response(response)?))?;
            String::from_utf8_lossy(&encoded.body).into_owned()
        }
    };
    let value: serde_json::Value = serde_json::from_str(&printed)?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}
