//! Pure conversions between the gRPC wire messages and oxserve's domain types.

use bytes::Bytes;
use oxserve_core::{
    DataType, Error, InferRequest, InferResponse, ModelMetadata, RequestedOutput, Result, Tensor, TensorMeta,
    element_count,
};
use oxserve_engine::{BatchStat, IndexEntry, ModelStatistics, ServerMetadata, StatDuration};

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
use oxserve_shm::{
    SharedMemoryInputs, SharedMemoryOutputs, SharedMemoryRegistry, ShmRef, check_output_place, output_params,
    place_of, take_shm_ref,
};

/// Parses a version string from a request: empty means "let the server pick" (the latest
/// ready version); anything else must be a non-negative integer.
pub fn parse_version(version: &str) -> Result<Option<u64>> {
    if version.is_empty() {
        return Ok(None);
    }
    version.parse::<u64>().map(Some).map_err(|_| {
        Error::invalid(format!(
            "failed to get model version from specified version string '{version}', \
             version should be an integral value > 0"
        ))
    })
}

/// Decodes an inference request. Tensor data is taken from the shared-memory region an input
/// names, else from `raw_input_contents` when present (one entry per input not in shared
/// memory, no typed contents anywhere), else from each input's typed `contents`; raw data is
/// handed on as `Bytes` slices of the received message, fixed-size inputs in shared memory as
/// views of the region (listed in the returned [`SharedMemoryInputs`]).
pub fn infer_request_from_wire(
    request: ModelInferRequest,
    shm: &SharedMemoryRegistry,
) -> Result<(InferRequest, SharedMemoryInputs, SharedMemoryOutputs)> {
    let ModelInferRequest {
        model_name,
        model_version,
        id,
        parameters,
        inputs,
        outputs,
        raw_input_contents,
    } = request;

    let model_version = parse_version(&model_version)?;
    let parameters = params_from_wire("request", &parameters)?;

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
    let mut shm_inputs = SharedMemoryInputs::new();
    let inputs = inputs
        .into_iter()
        .map(|(input, at)| {
            let source = match at {
                Some(at) => Source::SharedMemory(shm.input(&at, &input.datatype, &mut shm_inputs)?),
                None if use_raw => Source::Raw(raw.next().unwrap_or_default()),
                None => Source::Contents,
            };
            input_from_wire(input, source)
        })
        .collect::<Result<Vec<_>>>()?;

    let mut shm_outputs = SharedMemoryOutputs::new();
    let outputs = outputs
        .into_iter()
        .map(|output| {
            let (requested, at) = output_from_wire(output)?;
            if let Some(at) = at {
                shm_outputs.push((requested.name.clone(), at));
            }
            Ok(requested)
        })
        .collect::<Result<Vec<_>>>()?;

    Ok((
        InferRequest {
            model_name,
            model_version,
            id: (!id.is_empty()).then_some(id),
            parameters,
            inputs,
            outputs,
        },
        shm_inputs,
        shm_outputs,
    ))
}

/// Where an input's bytes come from.
enum Source {
    /// A shared-memory region (a view of it, or a copy for BYTES).
    SharedMemory(Bytes),
    /// Its entry of `raw_input_contents`.
    Raw(Bytes),
    /// Its own typed `contents`.
    Contents,
}

fn input_from_wire(input: InferInputTensor, source: Source) -> Result<Tensor> {
    let InferInputTensor {
        name,
        datatype,
        shape,
        parameters: _,
        contents,
    } = input;

    let datatype = DataType::from_wire_name(&datatype)
        .ok_or_else(|| Error::invalid(format!("input '{name}' has unknown datatype '{datatype}'")))?;
    // Rejects negative dimensions and overflowing products before any data is looked at.
    let count =
        element_count(&shape).map_err(|e| Error::invalid(format!("input '{name}': {}", e.message())))?;

    let data = match source {
        Source::SharedMemory(raw) => {
            if contents.is_some() {
                return Err(Error::invalid(format!(
                    "input '{name}' names a shared memory region and also has contents"
                )));
            }
            Tensor::data_from_wire(&name, datatype, raw)?
        }
        Source::Raw(raw) => {
            if contents.is_some() {
                return Err(Error::invalid(format!(
                    "input '{name}' has contents, which must not be set when the request uses \
                     raw_input_contents"
                )));
            }
            Tensor::data_from_wire(&name, datatype, raw)?
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
            typed_to_data(&name, datatype, count, contents)?
        }
    };

    let tensor = Tensor::new(name, datatype, shape, data);
    // Byte length for raw fixed-size data, element count for BYTES.
    tensor.check_consistent()?;
    Ok(tensor)
}

fn output_from_wire(output: InferRequestedOutputTensor) -> Result<(RequestedOutput, Option<ShmRef>)> {
    let InferRequestedOutputTensor { name, parameters } = output;
    let mut parameters = params_from_wire("output", &parameters)?;
    let at = take_shm_ref("output", &name, &mut parameters)?;
    // Triton's classification extension: `classification` = N asks for the top N classes;
    // 0 (what tritonclient sends for "not set" in some versions) means the plain tensor.
    let classification = match parameters.remove("classification") {
        None => None,
        Some(value) => match value.as_i64() {
            Some(0) => None,
            Some(n) if n > 0 => Some(usize::try_from(n).map_err(|_| {
                Error::invalid(format!("output '{name}': classification count {n} is too large"))
            })?),
            _ => {
                return Err(Error::invalid(format!(
                    "output '{name}': parameter 'classification' must be a non-negative \
                         int64, got {value:?}"
                )));
            }
        },
    };
    check_output_place(&name, at.as_ref(), classification)?;
    Ok((RequestedOutput { name, classification }, at))
}

/// Encodes an inference response with every output in `raw_output_contents` (one entry per
/// output, in order; BYTES length-prefixed), which is what tritonclient reads. An output
/// written to shared memory keeps its (empty) entry, as in Triton, so the indices line up,
/// and says where its data went in its parameters.
pub fn infer_response_to_wire(
    response: InferResponse,
    shm_outputs: &SharedMemoryOutputs,
) -> ModelInferResponse {
    let InferResponse {
        model_name,
        model_version,
        id,
        parameters,
        outputs,
    } = response;
    let mut wire_outputs = Vec::with_capacity(outputs.len());
    let mut raw_output_contents = Vec::with_capacity(outputs.len());
    for tensor in outputs {
        // Fixed-size data is a cheap `Bytes` clone; BYTES is encoded once here. An output in
        // shared memory was written there already and only its length is needed.
        let (raw, parameters) = match place_of(shm_outputs, &tensor.name) {
            Some(at) => (
                Bytes::new(),
                params_to_wire(&output_params(at, tensor.wire_len())),
            ),
            None => (tensor.to_wire_bytes(), WireParams::new()),
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
    }
}

#[cfg(test)]
#[path = "convert_tests.rs"]
mod tests;
