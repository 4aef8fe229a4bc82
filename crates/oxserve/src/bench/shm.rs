//! `oxserve bench --shared-memory system`: the request's tensors live in /dev/shm objects
//! registered with the server as Triton system shared-memory regions (what perf_analyzer's
//! `--shared-memory system` does), so each request carries only region names and sizes. It
//! measures the server without the cost of moving tensor bytes through the network stack,
//! the way a co-located client would use it.

use std::path::PathBuf;

use anyhow::{Context, bail};
use bytes::Bytes;
use oxserve_core::InferRequest;
use oxserve_kserve::grpc::{params_to_wire, pb};
use oxserve_kserve::http::INFERENCE_HEADER_CONTENT_LENGTH;
use oxserve_shm::{BYTE_SIZE_PARAM, REGION_PARAM, ShmRef};

use crate::client::http_body;

/// One tensor's region: the whole of a registered region.
#[derive(Debug, Clone)]
struct Placement {
    tensor: String,
    at: ShmRef,
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

/// The byte size of each output the server answers `request` with: one request sent with
/// binary outputs, whose sizes the response header states. The load generator sends that same
/// request every time, so these are exactly the regions it needs.
async fn probe_output_sizes(
    client: &reqwest::Client,
    http_url: &str,
    request: &InferRequest,
) -> anyhow::Result<Vec<(String, usize)>> {
    let (body, header_len) = http_body(request, true)?;
    let mut post = client
        .post(format!("{http_url}/v2/models/{}/infer", request.model_name))
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(body);
    if let Some(n) = header_len {
        post = post.header(INFERENCE_HEADER_CONTENT_LENGTH, n);
    }
    let response = post.send().await.context("probe request")?;
    let status = response.status();
    let json_len = response
        .headers()
        .get(INFERENCE_HEADER_CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let body = response.bytes().await.context("probe response")?;
    if !status.is_success() {
        bail!("probe request: HTTP {status}: {}", String::from_utf8_lossy(&body));
    }
    let header: ProbeResponse =
        serde_json::from_slice(&body[..json_len.unwrap_or(body.len()).min(body.len())])
            .context("probe response is not a KServe v2 response")?;
    header
        .outputs
        .into_iter()
        .map(|o| {
            let size = o
                .parameters
                .and_then(|p| p.binary_data_size)
                .with_context(|| format!("probe response: output '{}' has no binary_data_size", o.name))?;
            Ok((o.name, size))
        })
        .collect()
}

#[derive(serde::Deserialize)]
struct ProbeResponse {
    outputs: Vec<ProbeOutput>,
}

#[derive(serde::Deserialize)]
struct ProbeOutput {
    name: String,
    parameters: Option<ProbeParams>,
}

#[derive(serde::Deserialize)]
struct ProbeParams {
    binary_data_size: Option<usize>,
}

impl BenchRegions {
    /// One object per input (holding `request`'s data) and per output of the answer to it.
    /// If any step fails, what was registered is unregistered again.
    pub async fn create(http_url: &str, request: &InferRequest) -> anyhow::Result<Self> {
        let mut regions = BenchRegions {
            http_url: http_url.to_string(),
            client: super::headers::http_client().build()?,
            inputs: Vec::new(),
            outputs: Vec::new(),
            files: Vec::new(),
        };
        match regions.fill(request).await {
            Ok(()) => Ok(regions),
            Err(e) => {
                regions.release().await;
                Err(e)
            }
        }
    }

    async fn fill(&mut self, request: &InferRequest) -> anyhow::Result<()> {
        let tag = format!("oxserve-bench-{}", std::process::id());
        for (i, t) in request.inputs.iter().enumerate() {
            let data = t.to_wire_bytes();
            let placement = self.add(&format!("{tag}-in{i}"), &t.name, &data).await?;
            self.inputs.push(placement);
        }
        let outputs = probe_output_sizes(&self.client, &self.http_url, request).await?;
        for (i, (name, size)) in outputs.iter().enumerate() {
            let placement = self
                .add(&format!("{tag}-out{i}"), name, &vec![0u8; *size])
                .await?;
            self.outputs.push(placement);
        }
        Ok(())
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
            at: ShmRef {
                region: name.to_string(),
                offset: 0,
                byte_size: data.len(),
            },
        })
    }

    /// The HTTP body naming the regions instead of carrying data (the same for JSON and binary).
    pub fn http_body(&self, request: &InferRequest) -> anyhow::Result<Bytes> {
        let param =
            |p: &Placement| serde_json::json!({REGION_PARAM: p.at.region, BYTE_SIZE_PARAM: p.at.byte_size});
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
        let params = |p: &Placement| params_to_wire(&p.at.params());
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
                    self.http_url, p.at.region
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
