//! Pure conversions between the gRPC wire messages and oxserve's domain types.

use bytes::Bytes;
use oxserve_core::{DataType, Error, ModelMetadata, Result, TensorMeta};
use oxserve_engine::{BatchStat, IndexEntry, ModelStatistics, ServerMetadata, StatDuration};
use oxserve_frontend::{
    BytesBudget, DecodeLimits, DecodedInput, DecodedRequest, InputData, ModelTarget, OutputRequest,
    PlacedOutput, Placement, RunResponse, data_from_wire, input_elements, parse_datatype, shm_and_data_error,
};

use super::contents::typed_to_data;
use super::params::{WireParams, params_from_wire, params_to_wire};
use super::pb::{
    InferBatchStatistics, InferStatistics, InferTensorContents, ModelInferRequest, ModelInferResponse,
    ModelMetadataResponse, ModelStatistics as WireModelStatistics, ServerMetadataResponse, StatisticDuration,
    model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
    model_infer_response::InferOutputTensor,
    model_metadata_response::TensorMetadata,
    repository_index_response::ModelIndex,
};
use oxserve_shm::{ShmRef, output_params, take_shm_ref};

/// The version string of a request: empty lets the server pick (the one rule for every
/// protocol lives in the front-end crate).
pub use oxserve_frontend::parse_version;

/// How much decoding work a request's tensors take, for [`oxserve_frontend::decode_off_worker`]:
/// typed contents are converted element by element and BYTES raw contents are split; other
/// raw contents are handed on as they are and cost nothing.
pub fn decode_work_bytes(request: &ModelInferRequest) -> usize {
    let typed: usize = request
        .inputs
        .iter()
        .filter_map(|i| i.contents.as_ref())
        .map(|c| {
            c.bool_contents.len()
                + 4 * (c.int_contents.len() + c.uint_contents.len() + c.fp32_contents.len())
                + 8 * (c.int64_contents.len() + c.uint64_contents.len() + c.fp64_contents.len())
                + c.bytes_contents.iter().map(|b| b.len() + 4).sum::<usize>()
        })
        .sum();
    let has_bytes = request
        .inputs
        .iter()
        .any(|i| i.datatype == DataType::Bytes.wire_name());
    let raw_bytes: usize = if has_bytes {
        request.raw_input_contents.iter().map(Bytes::len).sum()
    } else {
        0
    };
    typed + raw_bytes
}

/// Decodes an inference request for `target` (already resolved from its model name and
/// version). Tensor data comes from the shared-memory region an input names (read later by
/// the runner), else from `raw_input_contents` when present (one entry per input not in
/// shared memory, no typed contents anywhere), else from each input's typed `contents`; raw
/// data is handed on as `Bytes` slices of the received message.
pub fn infer_request_from_wire(
    target: ModelTarget,
    request: ModelInferRequest,
    limits: &DecodeLimits,
) -> Result<DecodedRequest> {
    let ModelInferRequest {
        model_name: _,
        model_version: _,
        id,
        parameters,
        inputs,
        outputs,
        raw_input_contents,
    } = request;

    let mut request = DecodedRequest::new(
        target,
        (!id.is_empty()).then_some(id),
        params_from_wire("request", &parameters)?,
    )?;

    // Inputs in shared memory have no entry in raw_input_contents (as tritonclient sends them).
    let inputs = inputs
        .into_iter()
        .map(|input| {
            let mut params = params_from_wire("input", &input.parameters)?;
            let at = take_shm_ref("input", &input.name, &mut params)?;
            Ok((input, at))
        })
        .collect::<Result<Vec<_>>>()?;
    let in_message = inputs.iter().filter(|(_, at)| at.is_none()).count();
    let use_raw = !raw_input_contents.is_empty();
    if use_raw && raw_input_contents.len() != in_message {
        return Err(Error::invalid(format!(
            "expected {in_message} entries in raw_input_contents, one per input not in shared \
             memory, but got {}",
            raw_input_contents.len()
        )));
    }
    // With the counts equal, `raw.next()` yields exactly one entry per such input in raw mode.
    let mut raw = raw_input_contents.into_iter();
    let mut budget = limits.budget();
    request.inputs = inputs
        .into_iter()
        .map(|(input, at)| {
            let source = match at {
                Some(at) => Source::SharedMemory(at),
                None if use_raw => Source::Raw(raw.next().unwrap_or_default()),
                None => Source::Contents,
            };
            input_from_wire(input, source, &mut budget)
        })
        .collect::<Result<Vec<_>>>()?;

    request.outputs = outputs
        .into_iter()
        .map(|output| {
            let InferRequestedOutputTensor { name, parameters } = output;
            OutputRequest::from_parameters(name, params_from_wire("output", &parameters)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(request)
}

/// Where an input's bytes come from.
enum Source {
    /// A shared-memory region.
    SharedMemory(ShmRef),
    /// Its entry of `raw_input_contents`.
    Raw(Bytes),
    /// Its own typed `contents`.
    Contents,
}

fn input_from_wire(
    input: InferInputTensor,
    source: Source,
    budget: &mut BytesBudget,
) -> Result<DecodedInput> {
    let InferInputTensor {
        name,
        datatype,
        shape,
        parameters: _,
        contents,
    } = input;

    let datatype = parse_datatype(&name, &datatype)?;
    // Rejects negative dimensions and overflowing products before any data is looked at.
    let count = input_elements(&name, &shape)?;
    budget.take(&name, datatype, count)?;

    let data = match source {
        Source::SharedMemory(at) => {
            if contents.is_some() {
                return Err(shm_and_data_error(&name));
            }
            InputData::SharedMemory(at)
        }
        Source::Raw(raw) => {
            if contents.is_some() {
                return Err(Error::invalid(format!(
                    "input '{name}' has contents, which must not be set when the request uses \
                     raw_input_contents"
                )));
            }
            InputData::Body(data_from_wire(&name, datatype, count, raw)?)
        }
        Source::Contents => {
            let contents = match contents {
                Some(contents) => contents,
                // A zero-element tensor needs no data; treat it as empty contents.
                None if count == 0 => InferTensorContents::default(),
                None => {
                    return Err(Error::invalid(format!(
                        "input '{name}' has no data: set its contents or raw_input_contents"
                    )));
                }
            };
            InputData::Body(typed_to_data(&name, datatype, count, contents)?)
        }
    };
    // The byte length against the shape is checked by the runner, for every input.
    Ok(DecodedInput {
        name,
        datatype,
        shape,
        data,
    })
}

/// Encodes an inference response with every output in `raw_output_contents` (one entry per
/// output, in order; BYTES length-prefixed), which is what tritonclient reads: gRPC has no
/// inline form worth its cost, so inline and binary outputs travel the same way. An output
/// written to shared memory keeps its (empty) entry, as in Triton, so the indices line up,
/// and says where its data went in its parameters.
pub fn infer_response_to_wire(response: RunResponse) -> ModelInferResponse {
    let RunResponse {
        model_name,
        model_version,
        id,
        parameters,
        outputs,
    } = response;
    let mut wire_outputs = Vec::with_capacity(outputs.len());
    let mut raw_output_contents = Vec::with_capacity(outputs.len());
    for PlacedOutput { tensor, placement } in outputs {
        // Fixed-size data is a cheap `Bytes` clone; BYTES is encoded once here. An output in
        // shared memory was written there already and only where it went is sent.
        let (raw, parameters) = match placement {
            Placement::SharedMemory {
                region,
                offset,
                byte_size,
            } => {
                let at = ShmRef {
                    region,
                    offset,
                    byte_size,
                };
                (Bytes::new(), params_to_wire(&output_params(&at, byte_size)))
            }
            Placement::Inline | Placement::Binary => (tensor.to_wire_bytes(), WireParams::new()),
        };
        raw_output_contents.push(raw);
        wire_outputs.push(InferOutputTensor {
            name: tensor.name,
            datatype: tensor.datatype.wire_name().to_owned(),
            shape: tensor.shape,
            parameters,
            contents: None,
        });
    }
    ModelInferResponse {
        model_name,
        model_version: model_version.to_string(),
        id: id.unwrap_or_default(),
        parameters: params_to_wire(&parameters),
        outputs: wire_outputs,
        raw_output_contents,
    }
}

pub fn model_metadata_to_wire(metadata: ModelMetadata) -> ModelMetadataResponse {
    let tensor = |t: TensorMeta| TensorMetadata {
        name: t.name,
        datatype: t.datatype.wire_name().to_owned(),
        shape: t.shape,
    };
    ModelMetadataResponse {
        name: metadata.name,
        versions: metadata.versions,
        platform: metadata.platform,
        inputs: metadata.inputs.into_iter().map(tensor).collect(),
        outputs: metadata.outputs.into_iter().map(tensor).collect(),
    }
}

pub fn server_metadata_to_wire(metadata: ServerMetadata) -> ServerMetadataResponse {
    ServerMetadataResponse {
        name: metadata.name,
        version: metadata.version,
        extensions: metadata.extensions,
    }
}

/// A repository index row; a model that failed as a whole has no version, sent as "".
pub fn index_entry_to_wire(entry: IndexEntry) -> ModelIndex {
    ModelIndex {
        name: entry.name,
        version: entry.version.map(|v| v.to_string()).unwrap_or_default(),
        state: entry.state,
        reason: entry.reason,
    }
}

fn duration_to_wire(d: StatDuration) -> Option<StatisticDuration> {
    Some(StatisticDuration {
        count: d.count,
        ns: d.ns,
    })
}

fn batch_stat_to_wire(b: BatchStat) -> InferBatchStatistics {
    InferBatchStatistics {
        batch_size: b.batch_size as u64,
        compute_input: duration_to_wire(b.compute_input),
        compute_infer: duration_to_wire(b.compute_infer),
        compute_output: duration_to_wire(b.compute_output),
    }
}

/// One model version's statistics. Every duration is present (zero when nothing happened),
/// as Triton sends them; the response cache, memory usage and decoupled response statistics
/// do not exist in oxserve and stay zero or empty.
pub fn model_statistics_to_wire(stats: ModelStatistics) -> WireModelStatistics {
    let s = stats.inference_stats;
    WireModelStatistics {
        name: stats.name,
        version: stats.version,
        last_inference: stats.last_inference,
        inference_count: stats.inference_count,
        execution_count: stats.execution_count,
        inference_stats: Some(InferStatistics {
            success: duration_to_wire(s.success),
            fail: duration_to_wire(s.fail),
            queue: duration_to_wire(s.queue),
            compute_input: duration_to_wire(s.compute_input),
            compute_infer: duration_to_wire(s.compute_infer),
            compute_output: duration_to_wire(s.compute_output),
            cache_hit: duration_to_wire(StatDuration::default()),
            cache_miss: duration_to_wire(StatDuration::default()),
        }),
        batch_stats: stats.batch_stats.into_iter().map(batch_stat_to_wire).collect(),
        memory_usage: Vec::new(),
        response_stats: Default::default(),
        shadow: stats.shadow.map(|s| super::pb::ShadowStatistics {
            primary_version: s.primary_version.to_string(),
            compared: s.compared,
            failed: s.failed,
            max_abs_diff: s.max_abs_diff,
            max_rel_diff: s.max_rel_diff,
            classified: s.classified,
            agreed: s.agreed,
            mean_latency_ns: s.latency_ns.checked_div(s.compared).unwrap_or(0),
        }),
    }
}

#[cfg(test)]
#[path = "convert_tests.rs"]
mod tests;
