//! Concatenating requests into one batch along the first dimension and splitting the outputs
//! back, so each request gets exactly its own rows.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use oxserve_backend::{BackendError, BackendErrorKind, Batch, ModelInstance};
use oxserve_core::{Tensor, TensorData};

/// The span the lines written while a batch runs belong to: its one request's own, or a
/// `batch` span under the first request's that records the others as causes.
pub(crate) fn batch_span<'a>(mut spans: impl ExactSizeIterator<Item = &'a tracing::Span>) -> tracing::Span {
    let requests = spans.len();
    let Some(first) = spans.next() else {
        return tracing::Span::none();
    };
    if requests == 1 {
        return first.clone();
    }
    let span = tracing::error_span!(parent: first, "batch", requests);
    for other in spans {
        span.follows_from(other);
    }
    span
}

/// What one execution took: assembling the inputs (from `started`), the engine's run, and the
/// outputs it produced.
pub(crate) struct Executed {
    pub compute_input: Duration,
    pub compute_infer: Duration,
    pub produced: Vec<Tensor>,
}

/// Concatenates the requests' inputs and runs them on the instance.
pub(crate) fn run_concatenated(
    instance: &mut dyn ModelInstance,
    inputs: Vec<Vec<Tensor>>,
    wanted: &[String],
    started: Instant,
) -> Result<Executed, BackendError> {
    let inputs = concat_inputs(inputs).map_err(|m| BackendError::new(BackendErrorKind::InvalidInput, m))?;
    let compute_input = started.elapsed();
    let t0 = Instant::now();
    let produced = instance.execute(Batch {
        inputs,
        outputs: wanted.to_vec(),
    })?;
    Ok(Executed {
        compute_input,
        compute_infer: t0.elapsed(),
        produced,
    })
}

/// Concatenates the `i`-th input of every request. One request passes through untouched.
pub(crate) fn concat_inputs(mut requests: Vec<Vec<Tensor>>) -> Result<Vec<Tensor>, String> {
    if requests.len() == 1 {
        return Ok(requests.pop().unwrap_or_default());
    }
    let inputs = requests.first().map_or(0, Vec::len);
    let mut out = Vec::with_capacity(inputs);
    for i in 0..inputs {
        let parts: Vec<&Tensor> = requests.iter().filter_map(|r| r.get(i)).collect();
        let first = parts[0];
        let rows: i64 = parts.iter().map(|t| t.shape.first().copied().unwrap_or(1)).sum();
        let mut shape = first.shape.clone();
        if let Some(d) = shape.first_mut() {
            *d = rows;
        }
        let data = match &first.data {
            TensorData::Raw(_) => {
                let total: usize = parts.iter().filter_map(|t| t.raw()).map(Bytes::len).sum();
                let mut buf = BytesMut::with_capacity(total);
                for t in &parts {
                    match t.raw() {
                        Some(raw) => buf.extend_from_slice(raw),
                        None => return Err(format!("input '{}' mixes data representations", t.name)),
                    }
                }
                TensorData::Raw(buf.freeze())
            }
            TensorData::Strings(_) => {
                let mut all = Vec::new();
                for t in &parts {
                    match &t.data {
                        TensorData::Strings(s) => all.extend(s.iter().cloned()),
                        TensorData::Raw(_) => {
                            return Err(format!("input '{}' mixes data representations", t.name));
                        }
                    }
                }
                TensorData::Strings(all)
            }
        };
        out.push(Tensor::new(first.name.clone(), first.datatype, shape, data));
    }
    Ok(out)
}

/// Takes rows `start..start + rows` of a batched output (zero-copy for fixed-size data).
pub(crate) fn slice_rows(t: &Tensor, total_rows: usize, start: usize, rows: usize) -> Result<Tensor, String> {
    let first = t.shape.first().copied().unwrap_or(0);
    if first != total_rows as i64 {
        return Err(format!(
            "model output '{}' has first dimension {first}, but the batch had {total_rows} rows",
            t.name
        ));
    }
    let mut shape = t.shape.clone();
    shape[0] = rows as i64;
    let data = match &t.data {
        TensorData::Raw(raw) => {
            let per_row = raw.len().checked_div(total_rows).unwrap_or(0);
            TensorData::Raw(raw.slice(start * per_row..(start + rows) * per_row))
        }
        TensorData::Strings(items) => {
            let per_row = items.len().checked_div(total_rows).unwrap_or(0);
            TensorData::Strings(items[start * per_row..(start + rows) * per_row].to_vec())
        }
    };
    Ok(Tensor::new(t.name.clone(), t.datatype, shape, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxserve_core::DataType;

    fn t(rows: i64, vals: &[u8]) -> Tensor {
        Tensor::from_raw("x", DataType::U8, vec![rows, 2], vals.to_vec())
    }

    #[test]
    fn concat_then_split_gives_each_request_its_rows() {
        let batched = concat_inputs(vec![vec![t(1, &[1, 2])], vec![t(2, &[3, 4, 5, 6])]]).unwrap();
        assert_eq!(batched[0].shape, vec![3, 2]);
        assert_eq!(batched[0].raw().unwrap().as_ref(), &[1, 2, 3, 4, 5, 6]);
        let a = slice_rows(&batched[0], 3, 0, 1).unwrap();
        let b = slice_rows(&batched[0], 3, 1, 2).unwrap();
        assert_eq!(a.raw().unwrap().as_ref(), &[1, 2]);
        assert_eq!(b.shape, vec![2, 2]);
        assert_eq!(b.raw().unwrap().as_ref(), &[3, 4, 5, 6]);
        assert!(slice_rows(&batched[0], 4, 0, 1).is_err());
    }

    #[test]
    fn strings_concat_and_split() {
        let s = |v: &[&'static str]| {
            Tensor::new(
                "s",
                DataType::Bytes,
                vec![v.len() as i64, 1],
                TensorData::Strings(v.iter().map(|x| Bytes::from_static(x.as_bytes())).collect()),
            )
        };
        let batched = concat_inputs(vec![vec![s(&["a"])], vec![s(&["b", "c"])]]).unwrap();
        let back = slice_rows(&batched[0], 3, 1, 2).unwrap();
        assert_eq!(
            back.data,
            TensorData::Strings(vec![Bytes::from_static(b"b"), Bytes::from_static(b"c")])
        );
    }
}
