//! The infer request and response bodies: KServe v2 JSON, plus Triton's binary tensor data
//! extension (a JSON header followed by raw tensor bytes).

use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};
use oxserve_core::{Error, ModelMetadata, ParamValue, Parameters, Result, TensorData};
use oxserve_frontend::{
    DecodeLimits, DecodedInput, DecodedRequest, InputData, ModelTarget, OutputRequest, PlacedOutput,
    Placement, RunResponse, data_from_wire, input_elements, parse_datatype, shm_and_data_error,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::json_data::{JsonData, decode_data};
use oxserve_shm::take_shm_ref;

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

fn params(p: Option<ParamsJson>) -> Parameters {
    p.map(|m| m.into_iter().map(|(k, v)| (k, v.into())).collect())
        .unwrap_or_default()
}

/// Decodes an infer request body for `target`. `header_len` is the
/// `Inference-Header-Content-Length` value when the binary extension is used. Inputs in the
/// body are decoded (JSON `data` into typed bytes, binary data as slices of the body); inputs
/// naming a shared-memory region are left for the runner to read.
pub fn decode_request(
    target: ModelTarget,
    body: &Bytes,
    header_len: Option<usize>,
    limits: &DecodeLimits,
) -> Result<DecodedRequest> {
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
    let parsed: RequestJson<'_> = serde_json::from_slice(&json).map_err(|e| {
        if e.to_string().starts_with("recursion limit exceeded") {
            // serde_json stops at 128 levels of nesting, before the stack is at risk.
            Error::invalid("malformed inference request JSON: nested deeper than 128 levels")
        } else {
            Error::invalid(format!("malformed inference request JSON: {e}"))
        }
    })?;

    let mut request = DecodedRequest::new(target, parsed.id, params(parsed.parameters))?;
    let mut budget = limits.budget();
    let mut cursor = 0usize;
    request.inputs.reserve(parsed.inputs.len());
    for input in parsed.inputs {
        let datatype = parse_datatype(&input.name, &input.datatype)?;
        let elements = input_elements(&input.name, &input.shape)?;
        budget.take(&input.name, datatype, elements)?;
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
        let data = match (shm_ref, binary_size, input.data) {
            (Some(at), None, None) => InputData::SharedMemory(at),
            (Some(_), _, _) => return Err(shm_and_data_error(&input.name)),
            (None, Some(_), Some(_)) => {
                return Err(Error::invalid(format!(
                    "input '{}' has both JSON data and binary_data_size",
                    input.name
                )));
            }
            (None, Some(size), None) => {
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
                InputData::Body(data_from_wire(&input.name, datatype, elements, raw)?)
            }
            (None, None, Some(raw)) => InputData::Body(decode_data(&input.name, datatype, elements, raw)?),
            (None, None, None) => {
                return Err(Error::invalid(format!("input '{}' has no data", input.name)));
            }
        };
        request.inputs.push(DecodedInput {
            name: input.name,
            datatype,
            shape: input.shape,
            data,
        });
    }
    if cursor != binary.len() {
        return Err(Error::invalid(format!(
            "the binary data has {} bytes but the inputs' binary_data_size values add up to {cursor}",
            binary.len()
        )));
    }

    request.outputs = parsed
        .outputs
        .unwrap_or_default()
        .into_iter()
        .map(|o| OutputRequest::from_parameters(o.name, params(o.parameters)))
        .collect::<Result<_>>()?;
    Ok(request)
}

/// Triton's raw binary request (`Inference-Header-Content-Length: 0`): the body is the only
/// input's bytes, as a batch of one; every output comes back binary.
pub fn decode_raw_request(
    target: ModelTarget,
    metadata: &ModelMetadata,
    body: Bytes,
) -> Result<DecodedRequest> {
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
            } else {
                let expected = shape
                    .iter()
                    .map(|&d| d as usize)
                    .product::<usize>()
                    .saturating_mul(size);
                if body.len() != expected {
                    return Err(Error::invalid(format!(
                        "raw binary body of {} bytes does not fit input '{}' of shape {:?} ({expected} bytes)",
                        body.len(),
                        input.name,
                        shape
                    )));
                }
            }
            TensorData::Raw(body)
        }
    };
    let mut request = DecodedRequest::new(target, None, Parameters::new())?;
    request.binary_by_default = true;
    request.inputs.push(DecodedInput::body(
        input.name.clone(),
        input.datatype,
        shape,
        data,
    ));
    Ok(request)
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

/// Encodes a response: JSON alone, or with binary outputs after it (Triton's binary tensor
/// data extension); outputs written to shared memory say where they went.
pub fn encode_response(response: &RunResponse) -> Result<EncodedResponse> {
    let mut binaries: Vec<Bytes> = Vec::new();
    let outputs = response
        .outputs
        .iter()
        .map(|PlacedOutput { tensor: t, placement }| {
            let (parameters, data) = match placement {
                Placement::SharedMemory {
                    region,
                    offset,
                    byte_size,
                } => (
                    Some(OutputParams::SharedMemory {
                        shared_memory_region: region,
                        shared_memory_byte_size: *byte_size,
                        shared_memory_offset: *offset,
                    }),
                    None,
                ),
                Placement::Binary => {
                    let wire = t.to_wire_bytes();
                    let size = wire.len();
                    binaries.push(wire);
                    (
                        Some(OutputParams::Binary {
                            binary_data_size: size,
                        }),
                        None,
                    )
                }
                Placement::Inline => (None, Some(JsonData(t))),
            };
            OutputOut {
                name: &t.name,
                datatype: t.datatype.wire_name(),
                shape: &t.shape,
                parameters,
                data,
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
    use oxserve_core::{DataType, Tensor, TensorMeta};
    use oxserve_frontend::resolve_inputs;
    use oxserve_shm::SharedMemoryRegistry;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn decode(body: &[u8], header_len: Option<usize>) -> Result<DecodedRequest> {
        decode_request(
            ModelTarget::unchecked("m", None),
            &Bytes::copy_from_slice(body),
            header_len,
            &DecodeLimits::default(),
        )
    }

    /// Decodes and turns the inputs into tensors as the runner does (no region registered).
    fn tensors(body: &[u8], header_len: Option<usize>) -> Result<Vec<Tensor>> {
        let request = decode(body, header_len)?;
        Ok(resolve_inputs(&SharedMemoryRegistry::new(), request.inputs)?.0)
    }

    #[test]
    fn json_request_with_parameters_and_outputs() {
        let body = br#"{"id":"7","parameters":{"binary_data_output":true,"priority":2},
                "inputs":[{"name":"A","shape":[1,2],"datatype":"FP32","data":[[1,2]]}],
                "outputs":[{"name":"O","parameters":{"binary_data":false,"classification":2}}]}"#;
        let req = decode(body, None).unwrap();
        assert_eq!(req.id.as_deref(), Some("7"));
        assert_eq!(req.parameters.get("priority"), Some(&ParamValue::Int(2)));
        assert!(!req.parameters.contains_key("binary_data_output"));
        assert!(req.binary_by_default);
        assert_eq!(
            req.inputs[0].data,
            InputData::Body(TensorData::Raw(Bytes::from(f32_bytes(&[1.0, 2.0]))))
        );
        assert_eq!(req.outputs[0].classification, Some(2));
        assert_eq!(req.outputs[0].binary, Some(false));
    }

    #[test]
    fn binary_inputs_are_slices_of_the_body() {
        let header = br#"{"inputs":[{"name":"A","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}},{"name":"S","shape":[2],"datatype":"BYTES","parameters":{"binary_data_size":10}}]}"#;
        let mut body = header.to_vec();
        body.extend(f32_bytes(&[1.0, -1.0]));
        body.extend([1, 0, 0, 0, b'x', 1, 0, 0, 0, b'y']);
        let t = tensors(&body, Some(header.len())).unwrap();
        assert_eq!(t[0].raw().unwrap().as_ref(), f32_bytes(&[1.0, -1.0]).as_slice());
        assert_eq!(
            t[1].data,
            TensorData::Strings(vec![Bytes::from_static(b"x"), Bytes::from_static(b"y")])
        );
    }

    fn err(body: &[u8], header_len: Option<usize>) -> String {
        match tensors(body, header_len) {
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
                br#"{"inputs":[{"name":"A","shape":[1],"datatype":"FP32","data":[1,2]}]}"#,
                None
            )
            .contains("more values than its shape holds")
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
        let shm_and_data = br#"{"inputs":[{"name":"A","shape":[1],"datatype":"FP32","data":[1],
            "parameters":{"shared_memory_region":"r","shared_memory_byte_size":4}}]}"#;
        assert!(err(shm_and_data, None).contains("names a shared memory region and also carries data"));
    }

    #[test]
    fn bytes_elements_are_limited_per_request() {
        let body = br#"{"inputs":[{"name":"A","shape":[2],"datatype":"BYTES","data":["a","b"]},
            {"name":"B","shape":[2],"datatype":"BYTES","data":["c","d"]}]}"#;
        let limits = |n| DecodeLimits {
            max_bytes_elements: n,
        };
        let decode_with = |n| {
            decode_request(
                ModelTarget::unchecked("m", None),
                &Bytes::copy_from_slice(body),
                None,
                &limits(n),
            )
        };
        assert!(decode_with(4).is_ok());
        let e = decode_with(3).err().map(|e| e.message().to_string());
        assert!(
            e.as_deref()
                .is_some_and(|m| m.contains("input 'B'") && m.contains("more than 3 BYTES elements")),
            "{e:?}"
        );
    }

    #[test]
    fn raw_binary_request_is_a_batch_of_one() {
        let md = ModelMetadata {
            name: "m".into(),
            versions: vec![],
            platform: String::new(),
            signatures: Vec::new(),
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
        let target = || ModelTarget::unchecked("m", None);
        let req = decode_raw_request(target(), &md, Bytes::from(f32_bytes(&[1.0, 2.0, 3.0, 4.0]))).unwrap();
        assert_eq!(req.inputs[0].shape, vec![1, 4]);
        assert!(req.binary_by_default);
        assert!(decode_raw_request(target(), &md, Bytes::from(vec![0u8; 6])).is_err());
    }

    #[test]
    fn response_json_binary_and_shared_memory() {
        let tensor = Tensor::from_raw("O", DataType::F32, vec![2], f32_bytes(&[0.5, 2.0]));
        let resp = |placement| RunResponse {
            model_name: "m".into(),
            model_version: 1,
            id: Some("x".into()),
            parameters: Default::default(),
            outputs: vec![PlacedOutput {
                tensor: tensor.clone(),
                placement,
            }],
        };
        let e = encode_response(&resp(Placement::Inline)).unwrap();
        assert!(e.header_len.is_none());
        assert_eq!(
            std::str::from_utf8(&e.body).unwrap(),
            r#"{"model_name":"m","model_version":"1","id":"x","outputs":[{"name":"O","datatype":"FP32","shape":[2],"data":[0.5,2.0]}]}"#
        );
        let e = encode_response(&resp(Placement::Binary)).unwrap();
        let n = e.header_len.unwrap();
        assert!(
            std::str::from_utf8(&e.body[..n])
                .unwrap()
                .contains(r#""parameters":{"binary_data_size":8}"#)
        );
        assert_eq!(&e.body[n..], f32_bytes(&[0.5, 2.0]).as_slice());
        let e = encode_response(&resp(Placement::SharedMemory {
            region: "r".into(),
            offset: 0,
            byte_size: 8,
        }))
        .unwrap();
        assert!(e.header_len.is_none());
        assert!(
            std::str::from_utf8(&e.body)
                .unwrap()
                .contains(r#""parameters":{"shared_memory_region":"r","shared_memory_byte_size":8}}"#)
        );
    }
}
