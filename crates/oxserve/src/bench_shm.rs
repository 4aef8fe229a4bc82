//! `oxserve bench --shared-memory system`: the request's tensors live in /dev/shm objects
//! registered with the server as Triton system shared-memory regions (what perf_analyzer's
//! `--shared-memory system` does), so each request carries only region names and sizes. It
//! measures the server without the cost of moving tensor bytes through the network stack,
//! the way a co-located client would use it.

use std::path::PathBuf;

use anyhow::{Context, bail};
use bytes::Bytes;
use oxserve_core::{InferRequest, ModelMetadata, ParamValue};
use oxserve_kserve::grpc::pb;
use oxserve_kserve::shm::{BYTE_SIZE_PARAM, REGION_PARAM};

/// One tensor's region: its registered name and size.
#[derive(Debug, Clone)]
struct Placement {
    tensor: String,
    region: String,
    byte_size: usize,
}

/// The regions of one run: created and registered by [`BenchRegions::create`], unregistered
/// by [`BenchRegions::release`]; the objects are removed when this is dropped, whatever
/// happened.
pub struct BenchRegions {
    http_url: String,
    client: reqwest::Client,
    inputs: Vec<Placement>,
    outputs: Vec<Placement>,
    files: Vec<PathBuf>,
}

/// An output's size in bytes at this batch size, when its shape says it; `None` for BYTES
/// outputs and variable dimensions other than the batch.
fn output_size(meta: &ModelMetadata, output: usize, batch: i64) -> Option<usize> {
    let t = &meta.outputs[output];
    let element = t.datatype.size()?;
    let mut count = 1usize;
    for (i, &d) in t.shape.iter().enumerate() {
        let d = if d >= 0 {
            d
        } else if i == 0 {
            batch
        } else {
            return None;
        };
        count = count.checked_mul(usize::try_from(d).ok()?)?;
    }
    count.checked_mul(element)
}

impl BenchRegions {
    /// One object per input (holding `request`'s data) and per output of `meta`; outputs whose
    /// size the metadata does not fix get `default_output_size` bytes.
    pub async fn create(
        http_url: &str,
        request: &InferRequest,
        meta: &ModelMetadata,
        batch: i64,
        default_output_size: usize,
    ) -> anyhow::Result<Self> {
        let mut regions = BenchRegions {
            http_url: http_url.to_string(),
            client: reqwest::Client::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            files: Vec::new(),
        };
        let tag = format!("oxserve-bench-{}", std::process::id());
        for (i, t) in request.inputs.iter().enumerate() {
            let data = t.to_wire_bytes();
            let placement = regions.add(&format!("{tag}-in{i}"), &t.name, &data).await?;
            regions.inputs.push(placement);
        }
        for (i, t) in meta.outputs.iter().enumerate() {
            let size = output_size(meta, i, batch).unwrap_or(default_output_size);
            let placement = regions
                .add(&format!("{tag}-out{i}"), &t.name, &vec![0u8; size])
                .await?;
            regions.outputs.push(placement);
        }
        Ok(regions)
    }

    /// Creates `/dev/shm/<name>` holding `data` and registers it under `name`.
    async fn add(&mut self, name: &str, tensor: &str, data: &[u8]) -> anyhow::Result<Placement> {
        let path = PathBuf::from("/dev/shm").join(name);
        std::fs::write(&path, data).with_context(|| format!("cannot create {}", path.display()))?;
        self.files.push(path);
        let response = self
            .client
            .post(format!(
                "{}/v2/systemsharedmemory/region/{name}/register",
                self.http_url
            ))
            .json(&serde_json::json!({"key": format!("/{name}"), "offset": 0, "byte_size": data.len()}))
            .send()
            .await
            .with_context(|| format!("cannot register shared memory region '{name}'"))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            bail!("registering shared memory region '{name}': HTTP {status}: {text}");
        }
        Ok(Placement {
            tensor: tensor.to_string(),
            region: name.to_string(),
            byte_size: data.len(),
        })
    }

    /// The HTTP body naming the regions instead of carrying data (the same for JSON and binary).
    pub fn http_body(&self, request: &InferRequest) -> anyhow::Result<Bytes> {
        let param = |p: &Placement| serde_json::json!({REGION_PARAM: p.region, BYTE_SIZE_PARAM: p.byte_size});
        let inputs: Vec<serde_json::Value> = request
            .inputs
            .iter()
            .zip(&self.inputs)
            .map(|(t, p)| {
                serde_json::json!({
                    "name": t.name, "shape": t.shape, "datatype": t.datatype.wire_name(),
                    "parameters": param(p),
                })
            })
            .collect();
        let outputs: Vec<serde_json::Value> = self
            .outputs
            .iter()
            .map(|p| serde_json::json!({"name": p.tensor, "parameters": param(p)}))
            .collect();
        Ok(Bytes::from(serde_json::to_vec(
            &serde_json::json!({"inputs": inputs, "outputs": outputs}),
        )?))
    }

    /// `request` for gRPC with every tensor in its region.
    pub fn grpc_request(&self, mut request: pb::ModelInferRequest) -> pb::ModelInferRequest {
        let params = |p: &Placement| {
            [
                (REGION_PARAM, ParamValue::String(p.region.clone())),
                (BYTE_SIZE_PARAM, ParamValue::Int(p.byte_size as i64)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), wire_param(v)))
            .collect()
        };
        request.raw_input_contents.clear();
        for (input, p) in request.inputs.iter_mut().zip(&self.inputs) {
            input.parameters = params(p);
        }
        request.outputs = self
            .outputs
            .iter()
            .map(|p| pb::model_infer_request::InferRequestedOutputTensor {
                name: p.tensor.clone(),
                parameters: params(p),
            })
            .collect();
        request
    }

    /// Unregisters the regions (best effort: the server may be gone); the objects are removed
    /// on drop.
    pub async fn release(self) {
        for p in self.inputs.iter().chain(&self.outputs) {
            let _ = self
                .client
                .post(format!(
                    "{}/v2/systemsharedmemory/region/{}/unregister",
                    self.http_url, p.region
                ))
                .send()
                .await;
        }
    }
}

impl Drop for BenchRegions {
    fn drop(&mut self) {
        for path in &self.files {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn wire_param(value: ParamValue) -> pb::InferParameter {
    use pb::infer_parameter::ParameterChoice;
    let choice = match value {
        ParamValue::String(s) => ParameterChoice::StringParam(s),
        ParamValue::Int(v) => ParameterChoice::Int64Param(v),
        ParamValue::Uint(v) => ParameterChoice::Uint64Param(v),
        ParamValue::Bool(v) => ParameterChoice::BoolParam(v),
        ParamValue::Double(v) => ParameterChoice::DoubleParam(v),
    };
    pb::InferParameter {
        parameter_choice: Some(choice),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use oxserve_core::{DataType, TensorMeta};

    #[test]
    fn output_sizes_follow_the_batch() {
        let meta = ModelMetadata {
            name: "m".into(),
            versions: vec![],
            platform: String::new(),
            inputs: vec![],
            outputs: vec![
                TensorMeta {
                    name: "a".into(),
                    datatype: DataType::F32,
                    shape: vec![-1, 1000],
                },
                TensorMeta {
                    name: "b".into(),
                    datatype: DataType::F32,
                    shape: vec![-1, -1],
                },
                TensorMeta {
                    name: "c".into(),
                    datatype: DataType::Bytes,
                    shape: vec![1],
                },
            ],
        };
        assert_eq!(output_size(&meta, 0, 8), Some(32_000));
        assert_eq!(output_size(&meta, 1, 8), None);
        assert_eq!(output_size(&meta, 2, 8), None);
    }
}
