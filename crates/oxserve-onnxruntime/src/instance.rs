//! `ModelInstance::execute`: check the batch against the configuration, run the session, and
//! hand back the requested outputs.

use std::borrow::Cow;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use ort::ErrorCode;
use ort::session::{HasSelectedOutputs, OutputSelector, RunOptions, Session, SessionInputValue};
use oxserve_backend::support::requested_outputs;
use oxserve_backend::{BackendError, Batch, ModelInstance};
use oxserve_core::Tensor;

use crate::convert::{Staging, from_ort, to_ort};
use crate::error::{internal, invalid_input, panic_message, summarize};
use crate::model::{InputSlot, Prepared};
use crate::padding::{Padding, RowTarget, pad_rows, take_rows};

pub(crate) struct OrtInstance {
    prepared: Arc<Prepared>,
    session: Session,
    /// Run options selecting every configured output, the common case.
    all_outputs: RunOptions<HasSelectedOutputs>,
    staging: Staging,
    /// The rows batches are padded to (GPU instances, see `crate::padding`).
    pad_to: Option<RowTarget>,
}

impl OrtInstance {
    pub(crate) fn new(
        prepared: Arc<Prepared>,
        session: Session,
        padding: Option<Padding>,
    ) -> Result<Self, BackendError> {
        let indices: Vec<usize> = (0..prepared.outputs.len()).collect();
        let all_outputs = run_options(&prepared, &indices)?;
        Ok(OrtInstance {
            prepared,
            session,
            all_outputs,
            staging: Staging::default(),
            pad_to: padding.map(RowTarget::new),
        })
    }
}

fn run_options(
    prepared: &Prepared,
    outputs: &[usize],
) -> Result<RunOptions<HasSelectedOutputs>, BackendError> {
    let mut selector = OutputSelector::no_default();
    for &ix in outputs {
        if let Some(slot) = prepared.outputs.get(ix) {
            selector = selector.with(slot.name.clone());
        }
    }
    RunOptions::new()
        .map(|o| o.with_outputs(selector))
        .map_err(|e| internal(format!("ONNX Runtime cannot create run options: {}", e.message())))
}

impl ModelInstance for OrtInstance {
    fn execute(&mut self, batch: Batch) -> Result<Vec<Tensor>, BackendError> {
        let prepared = Arc::clone(&self.prepared);
        let wanted = requested_outputs(
            &prepared.model_name,
            prepared.outputs.iter().map(|o| o.name.as_str()),
            &batch.outputs,
        )?;
        // Each distinct output once, in configuration order.
        let mut distinct: Vec<usize> = wanted.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let rows = check_inputs(&prepared, &batch.inputs)?;
        let padded = match rows {
            Some(rows) => self.pad(&batch.inputs, rows)?,
            None => None,
        };
        let (given, rows) = match &padded {
            Some((inputs, rows, to)) => (inputs.as_slice(), Some((*rows, *to))),
            None => (batch.inputs.as_slice(), None),
        };
        self.staging.stage(given);
        let inputs = convert_inputs(&prepared, given, &self.staging)?;

        let custom;
        let options = if distinct.len() == prepared.outputs.len() {
            &self.all_outputs
        } else {
            custom = run_options(&prepared, &distinct)?;
            &custom
        };
        let session = &mut self.session;
        // ONNX Runtime reports bad inputs as errors, but a panic in the bindings must not take
        // down the scheduler thread (and every batch queued behind it).
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            session.run_with_options(inputs, options).map(|mut outputs| {
                distinct
                    .iter()
                    .map(|&ix| outputs.remove(&prepared.outputs[ix].name))
                    .collect::<Vec<_>>()
            })
        }));
        self.staging.trim();
        let values = match outcome {
            Ok(Ok(values)) => values,
            Ok(Err(e)) => {
                let message = format!(
                    "model '{}' rejected the inputs: {}",
                    prepared.model_name,
                    summarize(e.message(), None)
                );
                return Err(match e.code() {
                    ErrorCode::InvalidArgument => invalid_input(message),
                    _ => {
                        tracing::warn!(model = %prepared.model_name, error = %e, "onnxruntime run failed");
                        internal(format!(
                            "model '{}': ONNX Runtime failed on this batch: {}",
                            prepared.model_name,
                            summarize(e.message(), None)
                        ))
                    }
                });
            }
            Err(panic) => {
                tracing::error!(
                    model = %prepared.model_name,
                    panic = %panic_message(panic.as_ref()),
                    "onnxruntime panicked while running a batch"
                );
                return Err(internal(format!(
                    "model '{}': the ONNX Runtime engine failed on this batch",
                    prepared.model_name
                )));
            }
        };

        let mut converted: Vec<Option<Tensor>> = (0..prepared.outputs.len()).map(|_| None).collect();
        for (&ix, value) in distinct.iter().zip(values) {
            let slot = &prepared.outputs[ix];
            let value = value.ok_or_else(|| {
                internal(format!(
                    "model '{}': ONNX Runtime did not return output '{}'",
                    prepared.model_name, slot.name
                ))
            })?;
            let mut tensor = from_ort(&slot.name, slot.dtype, value)?;
            if let Some((rows, padded)) = rows {
                tensor = take_rows(tensor, rows, padded)?;
            }
            converted[ix] = Some(tensor);
        }
        wanted
            .iter()
            .map(|&ix| {
                converted[ix]
                    .clone()
                    .ok_or_else(|| internal("requested output was not produced"))
            })
            .collect()
    }
}

impl OrtInstance {
    /// The (checked) inputs of a batch of `rows` rows padded to the instance's row target,
    /// with `rows` and the padded count; `None` when this instance does not pad or the batch
    /// needs no padding.
    fn pad(&mut self, inputs: &[Tensor], rows: usize) -> Result<Option<Padded>, BackendError> {
        let Some(target) = self.pad_to.as_mut() else {
            return Ok(None);
        };
        if rows == 0 {
            return Ok(None);
        }
        let to = target.rows_for(rows);
        if rows == to {
            return Ok(None);
        }
        Ok(Some((pad_rows(inputs, to)?, rows, to)))
    }
}

/// Padded inputs, the batch's own row count and the padded one.
type Padded = (Vec<Tensor>, usize, usize);

type Inputs<'a> = Vec<(Cow<'a, str>, SessionInputValue<'a>)>;

/// Checks each input against its configured slot, and that batched inputs agree on their
/// row count; that count, for a batched model.
fn check_inputs(prepared: &Prepared, inputs: &[Tensor]) -> Result<Option<usize>, BackendError> {
    if inputs.len() != prepared.inputs.len() {
        let expected: Vec<&str> = prepared.inputs.iter().map(|i| i.name.as_str()).collect();
        return Err(invalid_input(format!(
            "model '{}' expects {} input(s) {expected:?}, got {}",
            prepared.model_name,
            expected.len(),
            inputs.len()
        )));
    }
    let mut batch_size = None;
    for (slot, tensor) in prepared.inputs.iter().zip(inputs) {
        check_input(slot, tensor)?;
        if prepared.batched {
            let n = tensor.shape.first().copied();
            match batch_size {
                None => batch_size = n,
                Some(b) if Some(b) != n => {
                    return Err(invalid_input(format!(
                        "input '{}' has batch size {} but the first input has {b}",
                        slot.name,
                        n.unwrap_or_default()
                    )));
                }
                Some(_) => {}
            }
        }
    }
    Ok(batch_size.and_then(|n| usize::try_from(n).ok()))
}

/// Converts checked inputs for the session.
fn convert_inputs<'a>(
    prepared: &'a Prepared,
    inputs: &'a [Tensor],
    staging: &'a Staging,
) -> Result<Inputs<'a>, BackendError> {
    prepared
        .inputs
        .iter()
        .zip(inputs)
        .enumerate()
        .map(|(index, (slot, tensor))| {
            Ok((
                Cow::Borrowed(slot.name.as_str()),
                to_ort(tensor, index, staging, tensor.shape.clone())?,
            ))
        })
        .collect()
}

/// Checks name, type, shape and data length.
fn check_input(slot: &InputSlot, tensor: &Tensor) -> Result<(), BackendError> {
    oxserve_backend::support::check_input(&slot.name, slot.dtype, &slot.shape, tensor)
}
