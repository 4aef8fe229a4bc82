//! The request runner: one path from a decoded request to a placed response, for every
//! protocol.

use oxserve_core::{InferRequest, InferResponse, Parameters, RequestedOutput, Result, Tensor};
use oxserve_engine::InferenceService;
use oxserve_shm::{SharedMemoryInputs, SharedMemoryRegistry, ShmRef};

use crate::decode::data_from_wire;
use crate::request::{DecodedInput, DecodedRequest, InputData, OutputRequest, input_elements};

/// Where a response output's data goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// In the response, in the protocol's structured form (JSON `data`); protocols without
    /// one (gRPC raw contents) send it as they send binary outputs.
    Inline,
    /// In the response, as raw bytes (Triton's binary tensor data, gRPC raw contents).
    Binary,
    /// Already written into the client's shared memory: the response carries only where.
    SharedMemory {
        region: String,
        offset: usize,
        /// Bytes written (Triton sends this back as `shared_memory_byte_size`).
        byte_size: usize,
    },
}

/// One output of a response, with its placement.
#[derive(Debug, Clone)]
pub struct PlacedOutput {
    pub tensor: Tensor,
    pub placement: Placement,
}

/// The protocol-neutral answer each adapter encodes.
#[derive(Debug, Clone)]
pub struct RunResponse {
    pub model_name: String,
    pub model_version: u64,
    pub id: Option<String>,
    pub parameters: Parameters,
    pub outputs: Vec<PlacedOutput>,
}

/// Runs a decoded request: reads its shared-memory inputs, has the engine validate and run
/// it, checks that no shared-memory input region was shrunk under the engine's read, writes
/// the outputs placed in shared memory, and places every output.
///
/// The model was resolved when `request.target` was made, before the adapter decoded the
/// request's tensors; the engine resolves it again when it runs (it may have been unloaded
/// in between).
pub async fn run(
    engine: &InferenceService,
    shm: &SharedMemoryRegistry,
    request: DecodedRequest,
) -> Result<RunResponse> {
    let DecodedRequest {
        target,
        id,
        mut parameters,
        inputs,
        outputs: output_requests,
        binary_by_default,
        routing_key,
        signature,
        trace,
    } = request;
    // A version label travels as a request parameter over every protocol.
    let target = target.with_label_parameter(engine, &mut parameters)?;

    let (tensors, shm_inputs) = resolve_inputs(shm, inputs)?;

    let requested = output_requests
        .iter()
        .map(|o| RequestedOutput {
            name: o.name.clone(),
            classification: o.classification,
        })
        .collect();
    let response = engine
        .infer(InferRequest {
            model_name: target.name().to_string(),
            model_version: target.version(),
            id,
            parameters,
            inputs: tensors,
            outputs: requested,
            routing_key,
            signature,
            trace,
        })
        .await?;
    // Fixed-size inputs in shared memory were views of the client's pages: if the client
    // shrank an object while the engine read it, the engine read zeros, not its data.
    shm_inputs.check()?;
    place_outputs(shm, response, &output_requests, binary_by_default)
}

/// The request's inputs as tensors: data in the body as it is, shared-memory inputs read
/// from their regions (views for fixed-size types, copies for BYTES; the returned
/// [`SharedMemoryInputs`] lists the regions to check after the engine ran). Every input is
/// checked against its shape here, once, whatever protocol or placement it came from.
pub fn resolve_inputs(
    shm: &SharedMemoryRegistry,
    inputs: Vec<DecodedInput>,
) -> Result<(Vec<Tensor>, SharedMemoryInputs)> {
    let mut shm_inputs = SharedMemoryInputs::new();
    let tensors = inputs
        .into_iter()
        .map(|input| {
            let data = match input.data {
                InputData::Body(data) => data,
                InputData::SharedMemory(at) => {
                    let elements = input_elements(&input.name, &input.shape)?;
                    let bytes = shm.input(&at, input.datatype.wire_name(), &mut shm_inputs)?;
                    data_from_wire(&input.name, input.datatype, elements, bytes)?
                }
            };
            let tensor = Tensor::new(input.name, input.datatype, input.shape, data);
            tensor.check_consistent()?;
            Ok(tensor)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((tensors, shm_inputs))
}

/// Writes the outputs asked for in shared memory and decides every output's placement.
fn place_outputs(
    shm: &SharedMemoryRegistry,
    response: InferResponse,
    requests: &[OutputRequest],
    binary_by_default: bool,
) -> Result<RunResponse> {
    let InferResponse {
        model_name,
        model_version,
        id,
        parameters,
        outputs,
    } = response;
    let outputs = outputs
        .into_iter()
        .map(|tensor| {
            let request = requests.iter().find(|r| r.name == tensor.name);
            let placement = match request {
                Some(OutputRequest {
                    shared_memory: Some(at),
                    ..
                }) => write_to_shm(shm, &tensor, at)?,
                Some(OutputRequest { binary: Some(b), .. }) => binary_or_inline(*b),
                _ => binary_or_inline(binary_by_default),
            };
            Ok(PlacedOutput { tensor, placement })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RunResponse {
        model_name,
        model_version,
        id,
        parameters,
        outputs,
    })
}

fn binary_or_inline(binary: bool) -> Placement {
    if binary {
        Placement::Binary
    } else {
        Placement::Inline
    }
}

fn write_to_shm(shm: &SharedMemoryRegistry, tensor: &Tensor, at: &ShmRef) -> Result<Placement> {
    let bytes = tensor.to_wire_bytes();
    shm.write(&tensor.name, at, &bytes)?;
    Ok(Placement::SharedMemory {
        region: at.region.clone(),
        offset: at.offset,
        byte_size: bytes.len(),
    })
}
