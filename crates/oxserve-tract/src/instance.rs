//! `ModelInstance::execute`: check the batch against the configuration, run the plan, and hand
//! back the requested outputs.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use oxserve_backend::support::requested_outputs;
use oxserve_backend::{BackendError, Batch, ModelInstance};
use oxserve_core::Tensor;
use tract_onnx::prelude::{TValue, TVec, TypedSimpleState};

use crate::convert::{from_tract, to_tract};
use crate::error::{internal, invalid_input, panic_message, summarize, truncate};
use crate::model::{InputSlot, Prepared};

pub(crate) struct TractInstance {
    prepared: Arc<Prepared>,
    /// Reused across batches so tract keeps its per-node state and buffers; `None` after a
    /// failed respawn, retried on the next batch.
    state: Option<TypedSimpleState>,
}

impl TractInstance {
    pub(crate) fn new(prepared: Arc<Prepared>) -> Result<Self, BackendError> {
        let state = spawn(&prepared)?;
        Ok(TractInstance {
            prepared,
            state: Some(state),
        })
    }
}

fn spawn(prepared: &Prepared) -> Result<TypedSimpleState, BackendError> {
    prepared.plan.spawn().map_err(|e| {
        internal(format!(
            "model '{}': cannot create a tract state: {}",
            prepared.model_name,
            summarize(&e)
        ))
    })
}

impl ModelInstance for TractInstance {
    fn execute(&mut self, batch: Batch) -> Result<Vec<Tensor>, BackendError> {
        let prepared = Arc::clone(&self.prepared);
        let wanted = requested_outputs(
            &prepared.model_name,
            prepared.outputs.iter().map(|o| o.name.as_str()),
            &batch.outputs,
        )?;
        let inputs = prepare_inputs(&prepared, &batch.inputs)?;
        let mut state = match self.state.take() {
            Some(state) => state,
            None => spawn(&prepared)?,
        };

        // tract reports bad shapes and the like as errors, but a panic deep in an operator must
        // not take the scheduler thread (and every batch queued behind it) down.
        let outcome = catch_unwind(AssertUnwindSafe(|| state.run(inputs)));
        let outputs = match outcome {
            Ok(Ok(outputs)) => {
                self.state = Some(state);
                outputs
            }
            Ok(Err(e)) => {
                // A run that fails part-way leaves symbol bindings behind that would clash with
                // the next batch's sizes: start the next batch from a fresh state.
                drop(state);
                self.state = spawn(&prepared).ok();
                return Err(invalid_input(format!(
                    "model '{}' rejected the inputs: {}",
                    prepared.model_name,
                    summarize(&e)
                )));
            }
            Err(panic) => {
                drop(state);
                self.state = spawn(&prepared).ok();
                let message = panic_message(panic.as_ref());
                tracing::error!(
                    model = %prepared.model_name,
                    panic = %message,
                    "tract panicked while running a batch"
                );
                // The same model ran other batches, so what differs is the input values: tract
                // checks values such as Gather indices with Rust bounds checks, which panic
                // where ONNX Runtime returns INVALID_ARGUMENT. Answer as ONNX Runtime does.
                return Err(invalid_input(format!(
                    "model '{}' could not run on these input values (out of range?): tract: {}",
                    prepared.model_name,
                    truncate(&message, 200)
                )));
            }
        };

        collect_outputs(&prepared, outputs, &wanted)
    }
}

/// Checks each input against its configured slot and converts it. Checking here, rather than
/// leaving it to tract, gives short messages that name the input.
fn prepare_inputs(prepared: &Prepared, inputs: &[Tensor]) -> Result<TVec<TValue>, BackendError> {
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
    let mut values = TVec::with_capacity(inputs.len());
    for (slot, tensor) in prepared.inputs.iter().zip(inputs) {
        let dims = check_input(slot, tensor)?;
        if prepared.batched {
            let n = dims.first().copied();
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
        values.push(to_tract(tensor, slot.datum, &dims)?);
    }
    Ok(values)
}

/// Checks name, type, shape and data length; returns the shape as `usize`s.
fn check_input(slot: &InputSlot, tensor: &Tensor) -> Result<Vec<usize>, BackendError> {
    oxserve_backend::support::check_input(&slot.name, slot.dtype, &slot.shape, tensor)?;
    tensor
        .shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| invalid_input(format!("input '{}' has a negative dimension", slot.name)))
}

fn collect_outputs(
    prepared: &Prepared,
    outputs: TVec<TValue>,
    wanted: &[usize],
) -> Result<Vec<Tensor>, BackendError> {
    if outputs.len() != prepared.outputs.len() {
        return Err(internal(format!(
            "model '{}': tract returned {} outputs, expected {}",
            prepared.model_name,
            outputs.len(),
            prepared.outputs.len()
        )));
    }
    // Move each value out the last time it is requested so its buffer can be handed over
    // without a copy; earlier requests for the same output share it.
    let mut slots: Vec<Option<TValue>> = outputs.into_iter().map(Some).collect();
    let mut result = Vec::with_capacity(wanted.len());
    for (pos, &ix) in wanted.iter().enumerate() {
        let again = wanted[pos + 1..].contains(&ix);
        let value = if again {
            slots[ix].clone()
        } else {
            slots[ix].take()
        };
        let value = value.ok_or_else(|| internal("output requested twice was consumed"))?;
        let slot = &prepared.outputs[ix];
        result.push(from_tract(&slot.name, slot.dtype, value)?);
    }
    Ok(result)
}
