//! Checks a request against the model's inputs and outputs and turns it into an engine batch;
//! shapes the engine's outputs back into what the client asked for.

use oxserve_backend::Batch;
use oxserve_core::{Error, RequestedOutput, Result, Tensor, element_count};

use crate::classification::classify;
use crate::model::{ModelIo, OutputSpec};

/// A validated request, ready for an instance.
pub(crate) struct Prepared {
    pub batch: Batch,
    /// Rows in this request (1 for models without a batch dimension).
    pub rows: usize,
    /// For each output in `batch.outputs`: its spec index and classification count.
    pub outputs: Vec<(usize, Option<usize>)>,
}

fn dims_match(actual: &[i64], expected: &[i64]) -> bool {
    actual.len() == expected.len() && actual.iter().zip(expected).all(|(&a, &e)| e == -1 || a == e)
}

/// Resolves a `-1` in a reshape target from the element count it must hold.
fn resolve_reshape(target: &[i64], elements: usize) -> Result<Vec<i64>> {
    let known: i64 = target.iter().filter(|&&d| d != -1).product();
    let mut out = target.to_vec();
    if let Some(slot) = out.iter_mut().find(|d| **d == -1) {
        if known <= 0 || elements as i64 % known != 0 {
            return Err(Error::invalid(format!(
                "cannot reshape {elements} elements to {target:?}"
            )));
        }
        *slot = elements as i64 / known;
    }
    Ok(out)
}

pub(crate) fn prepare(
    io: &ModelIo,
    model_name: &str,
    inputs: Vec<Tensor>,
    requested: Vec<RequestedOutput>,
) -> Result<Prepared> {
    let batched = io.max_batch_size > 0;
    if inputs.len() != io.inputs.len() {
        // Triton checks the count first, in these words (its tests match them whole).
        let given: std::collections::BTreeSet<&str> = inputs.iter().map(|t| t.name.as_str()).collect();
        let quoted = |names: Vec<&str>| {
            names
                .iter()
                .map(|n| format!("'{n}'"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let missing = io
            .inputs
            .iter()
            .map(|s| s.name.as_str())
            .filter(|n| !given.contains(n))
            .collect();
        return Err(Error::invalid(format!(
            "expected {} inputs but got {} inputs for model '{model_name}'. Got input(s) [{}], but \
             missing required input(s) [{}]. Please provide all required input(s).",
            io.inputs.len(),
            inputs.len(),
            quoted(given.into_iter().collect()),
            quoted(missing)
        )));
    }
    let mut slots: Vec<Option<Tensor>> = vec![None; io.inputs.len()];
    let mut batch_size: Option<usize> = None;
    for mut tensor in inputs {
        let Some(index) = io.inputs.iter().position(|s| s.name == tensor.name) else {
            return Err(Error::invalid(format!(
                "unexpected inference input '{}' for model '{model_name}'",
                tensor.name
            )));
        };
        let spec = &io.inputs[index];
        if slots[index].is_some() {
            return Err(Error::invalid(format!(
                "input '{}' is given more than once",
                tensor.name
            )));
        }
        if tensor.datatype != spec.datatype {
            return Err(Error::invalid(format!(
                "input '{}' has datatype {}, model '{model_name}' expects {}",
                tensor.name, tensor.datatype, spec.datatype
            )));
        }
        // Also rejects negative dims and overflowing products.
        let elements = element_count(&tensor.shape)?;
        let inner = if batched {
            let Some((&rows, rest)) = tensor.shape.split_first() else {
                return Err(Error::invalid(format!(
                    "input '{}' needs a batch dimension: expected shape [-1{}]",
                    tensor.name,
                    spec.dims.iter().map(|d| format!(", {d}")).collect::<String>()
                )));
            };
            let rows = rows as usize;
            if rows > io.max_batch_size {
                // Triton's words: clients parse the limit out of them.
                return Err(Error::invalid(format!(
                    "inference request batch-size must be <= {} for '{model_name}'",
                    io.max_batch_size
                )));
            }
            if rows == 0 {
                return Err(Error::invalid(format!(
                    "input '{}' has batch size 0; model '{model_name}' takes 1 to {}",
                    tensor.name, io.max_batch_size
                )));
            }
            match batch_size {
                Some(b) if b != rows => {
                    return Err(Error::invalid(format!(
                        "input '{}' has batch size {rows} but another input has {b}",
                        tensor.name
                    )));
                }
                _ => batch_size = Some(rows),
            }
            rest
        } else {
            tensor.shape.as_slice()
        };
        if !dims_match(inner, &spec.dims) {
            let expected: Vec<i64> = if batched {
                std::iter::once(-1).chain(spec.dims.iter().copied()).collect()
            } else {
                spec.dims.clone()
            };
            // Triton's words and its dims format (`[-1,4]`), which its tests match.
            let dims =
                |d: &[i64]| format!("[{}]", d.iter().map(i64::to_string).collect::<Vec<_>>().join(","));
            let note = if batched {
                " NOTE: Setting a non-zero max_batch_size in the model config requires a batch \
                 dimension to be prepended to each input shape. If you want to specify the full \
                 shape including the batch dim in your input dims config, try setting \
                 max_batch_size to zero. See the model configuration docs for more info on \
                 max_batch_size."
            } else {
                ""
            };
            return Err(Error::invalid(format!(
                "unexpected shape for input '{}' for model '{model_name}'. Expected {}, got {}.{note}",
                tensor.name,
                dims(&expected),
                dims(&tensor.shape)
            )));
        }
        tensor.check_consistent()?;
        if let Some(target) = &spec.reshape {
            let rows = if batched { tensor.shape[0] } else { 1 };
            let per_row = if rows > 0 { elements / rows as usize } else { 0 };
            let mut shape = Vec::with_capacity(target.len() + 1);
            if batched {
                shape.push(rows);
            }
            shape.extend(resolve_reshape(target, per_row)?);
            tensor.shape = shape;
        }
        slots[index] = Some(tensor);
    }
    let mut batch_inputs = Vec::with_capacity(slots.len());
    for (slot, spec) in slots.into_iter().zip(&io.inputs) {
        match slot {
            Some(t) => batch_inputs.push(t),
            None => {
                return Err(Error::invalid(format!(
                    "missing input '{}' for model '{model_name}'",
                    spec.name
                )));
            }
        }
    }

    let mut outputs = Vec::with_capacity(requested.len().max(io.outputs.len()));
    let mut names = Vec::with_capacity(outputs.capacity());
    if requested.is_empty() {
        for (index, spec) in io.outputs.iter().enumerate() {
            outputs.push((index, None));
            names.push(spec.name.clone());
        }
    } else {
        for r in requested {
            let Some((index, spec)) = io.output(&r.name) else {
                return Err(Error::invalid(format!(
                    "unexpected inference output '{}' for model '{model_name}'",
                    r.name
                )));
            };
            if outputs.iter().any(|&(i, _)| i == index) {
                return Err(Error::invalid(format!(
                    "output '{}' is requested more than once",
                    r.name
                )));
            }
            if let Some(count) = r.classification {
                if !spec.datatype.is_numeric() {
                    return Err(Error::invalid(format!(
                        "classification is not supported for output '{}' of datatype {}",
                        r.name, spec.datatype
                    )));
                }
                if count == 0 {
                    return Err(Error::invalid("classification count must be at least 1"));
                }
            }
            outputs.push((index, r.classification));
            names.push(spec.name.clone());
        }
    }
    Ok(Prepared {
        batch: Batch {
            inputs: batch_inputs,
            outputs: names,
        },
        rows: batch_size.unwrap_or(1),
        outputs,
    })
}

/// Client-facing shape of an output the engine produced with a model-facing shape.
fn client_shape(spec: &OutputSpec, model_shape: &[i64], batched: bool) -> Vec<i64> {
    if spec.reshape.is_none() {
        return model_shape.to_vec();
    }
    let (rows, inner) = match (batched, model_shape.split_first()) {
        (true, Some((&rows, inner))) => (Some(rows), inner),
        _ => (None, model_shape),
    };
    let elements = inner.iter().product::<i64>().max(0) as usize;
    let dims = resolve_reshape(&spec.dims, elements).unwrap_or_else(|_| inner.to_vec());
    rows.into_iter().chain(dims).collect()
}

/// Turns engine outputs into the response's outputs.
pub(crate) fn finish(
    io: &ModelIo,
    plan: &[(usize, Option<usize>)],
    produced: Vec<Tensor>,
) -> Result<Vec<Tensor>> {
    if produced.len() != plan.len() {
        return Err(Error::internal(format!(
            "engine returned {} outputs, {} were requested",
            produced.len(),
            plan.len()
        )));
    }
    let batched = io.max_batch_size > 0;
    produced
        .into_iter()
        .zip(plan)
        .map(|(mut tensor, &(index, classification))| {
            let spec = &io.outputs[index];
            tensor.shape = client_shape(spec, &tensor.shape, batched);
            match classification {
                Some(count) => classify(&tensor, count, batched, spec.labels.as_deref().map(Vec::as_slice)),
                None => Ok(tensor),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::InputSpec;
    use oxserve_core::{DataType, ErrorKind};

    fn io() -> ModelIo {
        ModelIo {
            max_batch_size: 8,
            inputs: vec![
                InputSpec {
                    name: "A".into(),
                    datatype: DataType::F32,
                    dims: vec![4],
                    reshape: Some(vec![2, 2]),
                },
                InputSpec {
                    name: "B".into(),
                    datatype: DataType::I32,
                    dims: vec![-1],
                    reshape: None,
                },
            ],
            outputs: vec![OutputSpec {
                name: "O".into(),
                datatype: DataType::F32,
                dims: vec![4],
                reshape: Some(vec![2, 2]),
                labels: None,
            }],
        }
    }

    fn f32s(name: &str, shape: Vec<i64>, n: usize) -> Tensor {
        Tensor::from_raw(name, DataType::F32, shape, vec![0u8; n * 4])
    }
    fn i32s(name: &str, shape: Vec<i64>, n: usize) -> Tensor {
        Tensor::from_raw(name, DataType::I32, shape, vec![0u8; n * 4])
    }

    fn err(inputs: Vec<Tensor>, outputs: Vec<RequestedOutput>) -> String {
        match prepare(&io(), "m", inputs, outputs) {
            Ok(_) => panic!("expected an error"),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::InvalidArgument);
                e.message().to_string()
            }
        }
    }

    #[test]
    fn valid_request_is_reshaped_for_the_engine() {
        let p = prepare(
            &io(),
            "m",
            vec![i32s("B", vec![2, 3], 6), f32s("A", vec![2, 4], 8)],
            vec![],
        )
        .unwrap();
        assert_eq!(p.batch.inputs[0].name, "A");
        assert_eq!(p.batch.inputs[0].shape, vec![2, 2, 2]);
        assert_eq!(p.batch.outputs, vec!["O".to_string()]);
        let out = finish(&io(), &p.outputs, vec![f32s("O", vec![2, 2, 2], 8)]).unwrap();
        assert_eq!(out[0].shape, vec![2, 4]);
    }

    #[test]
    fn rejects_bad_requests_with_clear_messages() {
        // A valid B beside the input under test, so that the input count is right.
        let b = || i32s("B", vec![1, 1], 1);
        assert_eq!(
            err(vec![f32s("A", vec![1, 4], 4)], vec![]),
            "expected 2 inputs but got 1 inputs for model 'm'. Got input(s) ['A'], but missing \
             required input(s) ['B']. Please provide all required input(s)."
        );
        assert!(err(vec![f32s("Z", vec![1, 4], 4), b()], vec![]).contains("unexpected inference input 'Z'"));
        assert!(
            err(vec![f32s("A", vec![1, 4], 4), f32s("A", vec![1, 4], 4)], vec![]).contains("more than once")
        );
        assert!(err(vec![i32s("A", vec![1, 4], 4), b()], vec![]).contains("datatype INT32"));
        assert!(err(vec![f32s("A", vec![1, 5], 5), b()], vec![]).contains("Expected [-1,4], got [1,5]"));
        assert!(err(vec![f32s("A", vec![9, 4], 36), b()], vec![]).contains("batch-size must be <= 8 for"));
        assert!(err(vec![f32s("A", vec![0, 4], 0), b()], vec![]).contains("batch size 0"));
        assert!(err(vec![f32s("A", vec![1, 4], 3), b()], vec![]).contains("bytes"));
        assert!(err(vec![f32s("A", vec![], 1), b()], vec![]).contains("batch dimension"));
        assert!(
            err(vec![f32s("A", vec![1, 4], 4), i32s("B", vec![2, 1], 2)], vec![]).contains("batch size 2")
        );
        assert!(err(vec![f32s("A", vec![i64::MAX, i64::MAX], 0), b()], vec![]).contains("too many"));
        let both = || vec![f32s("A", vec![1, 4], 4), i32s("B", vec![1, 1], 1)];
        assert!(err(both(), vec![RequestedOutput::new("X")]).contains("unexpected inference output 'X'"));
        let mut c = RequestedOutput::new("O");
        c.classification = Some(0);
        assert!(err(both(), vec![c]).contains("at least 1"));
    }
}
