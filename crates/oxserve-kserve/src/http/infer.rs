//! The infer request and response bodies: KServe v2 JSON, plus Triton's binary tensor data
//! extension (a JSON header followed by raw tensor bytes).

use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};
use oxserve_core::{
    DataType, Error, InferRequest, InferResponse, ModelMetadata, ParamValue, Parameters, RequestedOutput,
    Result, Tensor, TensorData, element_count,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::json_data::{JsonData, decode_data};
use oxserve_shm::{
    SharedMemoryInputs, SharedMemoryOutputs, SharedMemoryRegistry, check_output_place, place_of, take_shm_ref,
};

#[derive(Deserialize)]
#[serde(untagged)]
enum ParamJson {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Double(f64),
    String(String),
}

impl From<ParamJson> for ParamValue {
    fn from(p: ParamJson) -> Self {
        match p {
            ParamJson::Bool(v) => ParamValue::Bool(v),
            ParamJson::Int(v) => ParamValue::Int(v),
            ParamJson::Uint(v) => ParamValue::Uint(v),
            ParamJson::Double(v) => ParamValue::Double(v),
            ParamJson::String(v) => ParamValue::String(v),
        }
    }
}

type ParamsJson = BTreeMap<String, ParamJson>;

#[derive(Deserialize)]
struct RequestJson<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<ParamsJson>,
    #[serde(borrow)]
    inputs: Vec<InputJson<'a>>,
    #[serde(default)]
    outputs: Option<Vec<OutputJson>>,
}

#[derive(Deserialize)]
struct InputJson<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<ParamsJson>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: Option<ParamsJson>,
}

/// How each response output is to be sent: in the JSON or in the binary section.
#[derive(Debug, Default)]
pub struct OutputEncoding {
    /// Request-level `binary_data_output`, or true for raw binary requests.
    pub default_binary: bool,
    /// Per-output `binary_data` parameters.
    pub per_output: Vec<(String, bool)>,
    /// Outputs the client asked to have written into its shared memory.
    pub shared_memory: SharedMemoryOutputs,
    /// The regions the request's inputs are views of, to check once the engine has answered.
    pub shared_memory_inputs: SharedMemoryInputs,
}

impl OutputEncoding {
    fn is_binary(&self, name: &str) -> bool {
        self.per_output
            .iter()
            .find(|(n, _)| n == name)
            .map_or(self.default_binary, |&(_, b)| b)
    }
}

fn take_bool(params: &mut Parameters, key: &str) -> Result<Option<bool>> {
    match params.remove(key) {
        None => Ok(None),
        Some(ParamValue::Bool(b)) => Ok(Some(b)),
        Some(_) => Err(Error::invalid(format!("parameter '{key}' must be a boolean"))),
    }
}

fn params(p: Option<ParamsJson>) -> Parameters {
    p.map(|m| m.into_iter().map(|(k, v)| (k, v.into())).collect())
        .unwrap_or_default()
}

/// Parses an infer request body. `header_len` is the `Inference-Header-Content-Length`
/// value when the binary extension is used; inputs naming a shared-memory region are read
/// from `shm`.
pub fn parse_request(
    model_name: &str,
    model_version: Option<u64>,
    body: &Bytes,
    header_len: Option<usize>,
    shm: &SharedMemoryRegistry,
) -> Result<(InferRequest, OutputEncoding)> {
    let (json, binary) = match header_len {
        Some(n) if n > body.len() => {
            return Err(Error::invalid(format!(
                "Inference-Header-Content-Length {n} is larger than the {}-byte body",
                body.len()
            )));
        }
        Some(n) => (body.slice(..n), body.slice(n..)),
        None => (body.clone(), Bytes::new()),
    };
    if json.is_empty() {
        return Err(Error::invalid(
            "request body is empty; expected a JSON inference request",
        ));
    }
    let parsed: RequestJson<'_> = serde_json::from_slice(&json)
        .map_err(|e| Error::invalid(format!("malformed inference request JSON: {e}")))?;

    let mut parameters = params(parsed.parameters);
    let default_binary = take_bool(&mut parameters, "binary_data_output")?.unwrap_or(false);

    let mut cursor = 0usize;
    let mut shared_memory_inputs = SharedMemoryInputs::new();
    let mut inputs = Vec::with_capacity(parsed.inputs.len());
    for input in parsed.inputs {
        let datatype = DataType::from_wire_name(&input.datatype).ok_or_else(|| {
            Error::invalid(format!(
                "input '{}' has unknown datatype '{}'",
                input.name, input.datatype
            ))
        })?;
        let elements = element_count(&input.shape)
            .map_err(|e| Error::invalid(format!("input '{}': {}", input.name, e.message())))?;
        let mut input_params = params(input.parameters);
        let shm_ref = take_shm_ref("input", &input.name, &mut input_params)?;
        let binary_size = match input_params.remove("binary_data_size") {
            None => None,
            Some(v) => Some(v.as_i64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
                Error::invalid(format!(
                    "input '{}': binary_data_size must be a non-negative integer",
                    input.name
                ))
            })?),
        };
        let data = if let Some(at) = &shm_ref {
            if binary_size.is_some() || input.data.is_some() {
                return Err(Error::invalid(format!(
                    "input '{}' names a shared memory region and also carries data",
                    input.name
                )));
            }
            let bytes = shm.input(at, &input.datatype, &mut shared_memory_inputs)?;
            Tensor::data_from_wire(&input.name, datatype, bytes)?
        } else {
            match (binary_size, input.data) {
                (Some(_), Some(_)) => {
                    return Err(Error::invalid(format!(
                        "input '{}' has both JSON data and binary_data_size",
                        input.name
                    )));
                }
                (Some(size), None) => {
                    let end = cursor
                        .checked_add(size)
                        .filter(|&e| e <= binary.len())
                        .ok_or_else(|| {
                            Error::invalid(format!(
                                "input '{}': binary_data_size {size} goes past the end of the binary data ({} bytes left)",
                                input.name,
                                binary.len() - cursor
                            ))
                        })?;
                    let raw = binary.slice(cursor..end);
                    cursor = end;
                    Tensor::data_from_wire(&input.name, datatype, raw)?
                }
                (None, Some(raw)) => decode_data(&input.name, datatype, elements, raw)?,
                (None, None) => {
                    return Err(Error::invalid(format!("input '{}' has no data", input.name)));
                }
            }
        };
        let tensor = Tensor::new(input.name, datatype, input.shape, data);
        tensor.check_consistent()?;
        inputs.push(tensor);
    }
    if cursor != binary.len() {
        return Err(Error::invalid(format!(
            "the binary data has {} bytes but the inputs' binary_data_size values add up to {cursor}",
            binary.len()
        )));
    }

    let mut outputs = Vec::new();
    let mut per_output = Vec::new();
    let mut shared_memory = Vec::new();
    for output in parsed.outputs.unwrap_or_default() {
        let mut p = params(output.parameters);
        let shm_ref = take_shm_ref("output", &output.name, &mut p)?;
        if let Some(b) = take_bool(&mut p, "binary_data")? {
            per_output.push((output.name.clone(), b));
        }
        let classification = match p.remove("classification") {
            None => None,
            Some(v) => Some(v.as_i64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| {
                Error::invalid(format!(
                    "output '{}': classification must be a non-negative integer",
                    output.name
                ))
            })?),
        };
        check_output_place(&output.name, shm_ref.as_ref(), classification)?;
        if let Some(at) = shm_ref {
            shared_memory.push((output.name.clone(), at));
        }
        outputs.push(RequestedOutput {
            name: output.name,
            classification,
        });
    }

    Ok((
        InferRequest {
            model_name: model_name.to_string(),
            model_version,
            id: parsed.id,
            parameters,
            inputs,
            outputs,
        },
        OutputEncoding {
            default_binary,
            per_output,
            shared_memory,
            shared_memory_inputs,
        },
    ))
}

/// Triton's raw binary request (`Inference-Header-Content-Length: 0`): the body is the only
/// input's bytes, as a batch of one; every output comes back binary.
pub fn parse_raw_request(
    metadata: &ModelMetadata,
    model_version: Option<u64>,
    body: Bytes,
) -> Result<(InferRequest, OutputEncoding)> {
    let [input] = metadata.inputs.as_slice() else {
        return Err(Error::invalid(format!(
            "a raw binary request needs a model with exactly one input; '{}' has {}",
            metadata.name,
            metadata.inputs.len()
        )));
    };
    // The metadata shape already carries -1 for the batch dimension of batched models; a raw
    // request is a batch of one.
    let mut shape: Vec<i64> = input.shape.clone();
    let batched = metadata
        .inputs
        .iter()
        .chain(&metadata.outputs)
        .all(|t| t.shape.first() == Some(&-1));
    if batched && !shape.is_empty() {
        shape[0] = 1;
    }
    let data = match input.datatype.size() {
        None => {
            if shape.iter().product::<i64>() != 1 || shape.contains(&-1) {
                return Err(Error::invalid("a raw binary BYTES input must have shape [1]"));
            }
            TensorData::Strings(vec![body])
        }
        Some(size) => {
            let variable: Vec<usize> = shape
                .iter()
                .enumerate()
                .filter(|(_, d)| **d == -1)
                .map(|(i, _)| i)
                .collect();
            if variable.len() > 1 {
                return Err(Error::invalid(format!(
                    "input '{}' has more than one variable dimension; a raw binary request cannot tell its shape",
                    input.name
                )));
            }
            if let [i] = variable[..] {
                let known: usize = shape.iter().filter(|d| **d != -1).map(|&d| d as usize).product();
                let unit = known.saturating_mul(size).max(1);
                if !body.len().is_multiple_of(unit) {
                    return Err(Error::invalid(format!(
                        "raw binary body of {} bytes does not fit input '{}' of shape {:?}",
                        body.len(),
                        input.name,
                        input.shape
                    )));
                }
                shape[i] = (body.len() / unit) as i64;
            }
            TensorData::Raw(body)
        }
    };
    let tensor = Tensor::new(input.name.clone(), input.datatype, shape, data);
    tensor.check_consistent()?;
    Ok((
        InferRequest {
            model_name: metadata.name.clone(),
            model_version,
            inputs: vec![tensor],
            ..Default::default()
        },
        OutputEncoding {
            default_binary: true,
            ..Default::default()
        },
    ))
}

#[derive(Serialize)]
struct ResponseJson<'a> {
    model_name: &'a str,
    model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    outputs: Vec<OutputOut<'a>>,
}

/// An output's parameters in the response: where its data is, when not in the JSON.
#[derive(Serialize)]
#[serde(untagged)]
enum OutputParams<'a> {
    Binary {
        binary_data_size: usize,
    },
    SharedMemory {
        shared_memory_region: &'a str,
        shared_memory_byte_size: usize,
        #[serde(skip_serializing_if = "is_zero")]
        shared_memory_offset: usize,
    },
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Serialize)]
struct OutputOut<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [i64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<OutputParams<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
}

/// An encoded response: the body, and the JSON header length when binary outputs follow it.
pub struct EncodedResponse {
    pub body: Bytes,
    pub header_len: Option<usize>,
}

pub fn encode_response(response: &InferResponse, encoding: &OutputEncoding) -> Result<EncodedResponse> {
    let mut binaries: Vec<Bytes> = Vec::new();
    let outputs = response
        .outputs
        .iter()
        .map(|t| {
            if let Some(at) = place_of(&encoding.shared_memory, &t.name) {
                OutputOut {
                    name: &t.name,
                    datatype: t.datatype.wire_name(),
                    shape: &t.shape,
                    parameters: Some(OutputParams::SharedMemory {
                        shared_memory_region: &at.region,
                        shared_memory_byte_size: t.wire_len(),
                        shared_memory_offset: at.offset,
                    }),
                    data: None,
                }
            } else if encoding.is_binary(&t.name) {
                let wire = t.to_wire_bytes();
                let size = wire.len();
                binaries.push(wire);
                OutputOut {
                    name: &t.name,
                    datatype: t.datatype.wire_name(),
                    shape: &t.shape,
                    parameters: Some(OutputParams::Binary {
                        binary_data_size: size,
                    }),
                    data: None,
                }
            } else {
                OutputOut {
                    name: &t.name,
                    datatype: t.datatype.wire_name(),
                    shape: &t.shape,
                    parameters: None,
                    data: Some(JsonData(t)),
                }
            }
        })
        .collect();
    let json = ResponseJson {
        model_name: &response.model_name,
        model_version: response.model_version.to_string(),
        id: response.id.as_deref(),
        outputs,
    };
    let binary_len: usize = binaries.iter().map(Bytes::len).sum();
    let mut out = BytesMut::with_capacity(256 + binary_len).writer();
    serde_json::to_writer(&mut out, &json).map_err(|e| Error::invalid(e.to_string()))?;
    let mut out = out.into_inner();
    if binaries.is_empty() {
        return Ok(EncodedResponse {
            body: out.freeze(),
            header_len: None,
        });
    }
    let header_len = out.len();
    for b in &binaries {
        out.extend_from_slice(b);
    }
    Ok(EncodedResponse {
        body: out.freeze(),
        header_len: Some(header_len),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxserve_core::TensorMeta;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn json_request_with_parameters_and_outputs() {
        let body = Bytes::from_static(
            br#"{"id":"7","parameters":{"binary_data_output":true,"priority":2},
                "inputs":[{"name":"A","shape":[1,2],"datatype":"FP32","data":[[1,2]]}],
                "outputs":[{"name":"O","parameters":{"binary_data":false,"classification":2}}]}"#,
        );
        let (req, enc) = parse_request("m", Some(3), &body, None, &SharedMemoryRegistry::new()).unwrap();
        assert_eq!(req.id.as_deref(), Some("7"));
        assert_eq!(req.model_version, Some(3));
        assert_eq!(req.parameters.get("priority"), Some(&ParamValue::Int(2)));
        assert!(!req.parameters.contains_key("binary_data_output"));
        assert_eq!(
            req.inputs[0].raw().unwrap().as_ref(),
            f32_bytes(&[1.0, 2.0]).as_slice()
        );
        assert_eq!(req.outputs[0].classification, Some(2));
        assert!(enc.default_binary);
        assert!(!enc.is_binary("O"));
        assert!(enc.is_binary("other"));
    }

    #[test]
    fn binary_inputs_are_slices_of_the_body() {
        let header = br#"{"inputs":[{"name":"A","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}},{"name":"S","shape":[2],"datatype":"BYTES","parameters":{"binary_data_size":10}}]}"#;
        let mut body = header.to_vec();
        body.extend(f32_bytes(&[1.0, -1.0]));
        body.extend([1, 0, 0, 0, b'x', 1, 0, 0, 0, b'y']);
        let (req, _) = parse_request(
            "m",
            None,
            &Bytes::from(body),
            Some(header.len()),
            &SharedMemoryRegistry::new(),
        )
        .unwrap();
        assert_eq!(
            req.inputs[0].raw().unwrap().as_ref(),
            f32_bytes(&[1.0, -1.0]).as_slice()
        );
        assert_eq!(
            req.inputs[1].data,
            TensorData::Strings(vec![Bytes::from_static(b"x"), Bytes::from_static(b"y")])
        );
    }

    fn err(body: &[u8], header_len: Option<usize>) -> String {
        match parse_request(
            "m",
            None,
            &Bytes::copy_from_slice(body),
            header_len,
            &SharedMemoryRegistry::new(),
        ) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.message().to_string(),
        }
    }

    #[test]
    fn malformed_requests_are_rejected() {
        assert!(err(b"", None).contains("empty"));
        assert!(err(b"{not json", None).contains("malformed"));
        assert!(
            err(
                br#"{"inputs":[{"name":"A","shape":[1],"datatype":"FP33","data":[1]}]}"#,
                None
            )
            .contains("unknown datatype 'FP33'")
        );
        assert!(
            err(
                br#"{"inputs":[{"name":"A","shape":[3],"datatype":"FP32","data":[1,2]}]}"#,
                None
            )
            .contains("needs 12")
        );
        assert!(
            err(
                br#"{"inputs":[{"name":"A","shape":[1],"datatype":"FP32"}]}"#,
                None
            )
            .contains("no data")
        );
        assert!(err(br#"{"inputs":[{"name":"A","shape":[4294967296,4294967296,4294967296],"datatype":"FP32","data":[1]}]}"#, None).contains("too many"));
        let h =
            br#"{"inputs":[{"name":"A","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let mut short = h.to_vec();
        short.extend([0u8; 4]);
        assert!(err(&short, Some(h.len())).contains("past the end"));
        let mut long = h.to_vec();
        long.extend([0u8; 12]);
        assert!(err(&long, Some(h.len())).contains("add up to 8"));
        assert!(err(h, Some(h.len() + 5)).contains("larger than"));
        let hb = br#"{"inputs":[{"name":"S","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":5}}]}"#;
        let mut bad_prefix = hb.to_vec();
        bad_prefix.extend([9, 0, 0, 0, b'a']);
        assert!(err(&bad_prefix, Some(hb.len())).contains("claims 9 bytes"));
    }

    #[test]
    fn raw_binary_request_is_a_batch_of_one() {
        let md = ModelMetadata {
            name: "m".into(),
            versions: vec![],
            platform: String::new(),
            inputs: vec![TensorMeta {
                name: "X".into(),
                datatype: DataType::F32,
                shape: vec![-1, 4],
            }],
            outputs: vec![TensorMeta {
                name: "Y".into(),
                datatype: DataType::F32,
                shape: vec![-1, 4],
            }],
        };
        let (req, enc) = parse_raw_request(&md, None, Bytes::from(f32_bytes(&[1.0, 2.0, 3.0, 4.0]))).unwrap();
        assert_eq!(req.inputs[0].shape, vec![1, 4]);
        assert!(enc.default_binary);
        assert!(parse_raw_request(&md, None, Bytes::from(vec![0u8; 6])).is_err());
    }

    #[test]
    fn response_json_and_binary() {
        let resp = InferResponse {
            model_name: "m".into(),
            model_version: 1,
            id: Some("x".into()),
            parameters: Default::default(),
            outputs: vec![Tensor::from_raw(
                "O",
                DataType::F32,
                vec![2],
                f32_bytes(&[0.5, 2.0]),
            )],
        };
        let e = encode_response(&resp, &OutputEncoding::default()).unwrap();
        assert!(e.header_len.is_none());
        assert_eq!(
            std::str::from_utf8(&e.body).unwrap(),
            r#"{"model_name":"m","model_version":"1","id":"x","outputs":[{"name":"O","datatype":"FP32","shape":[2],"data":[0.5,2.0]}]}"#
        );
        let e = encode_response(
            &resp,
            &OutputEncoding {
                default_binary: true,
                ..Default::default()
            },
        )
        .unwrap();
        let n = e.header_len.unwrap();
        assert!(
            std::str::from_utf8(&e.body[..n])
                .unwrap()
                .contains(r#""parameters":{"binary_data_size":8}"#)
        );
        assert_eq!(&e.body[n..], f32_bytes(&[0.5, 2.0]).as_slice());
    }
}
