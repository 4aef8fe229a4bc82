//! Batch padding for GPU instances: batches keep one shape while the load stays the same.
//!
//! ONNX Runtime's CUDA execution provider plans each convolution for the input shape it last
//! saw (cuDNN's algorithm search, and since 1.20 a cuDNN graph per shape) and plans again
//! whenever the shape changes, without keeping earlier plans. A dynamic batcher hands a GPU
//! instance a different number of rows nearly every time under load, so each batch paid a
//! new plan: measured on an H200 with the corpus CNN, 60 ms per batch with ONNX Runtime's
//! default exhaustive search (13 ms heuristic, 5 ms without search), against 0.4 to 1.7 ms to
//! run batches of 1 to 32.
//!
//! So a GPU instance pads each batch to a row count that changes rarely: the next power of
//! two above the largest batch seen lately (at most `max_batch_size`), raised at once when a
//! larger batch comes, lowered only after [`SHRINK_AFTER`] batches in a row would fit in half
//! of it. Steady traffic then runs one shape (one plan), and light traffic does not pay for
//! rows it does not need. The padding rows repeat the batch's last row (real data: nothing a
//! zero row might turn into a division by zero) and their outputs are dropped. Rows are
//! independent, which a model with `max_batch_size > 0` already promises the batcher.
//!
//! `parameters { key: "gpu_batch_padding" value: { string_value: "..." } }`: `"adaptive"`
//! (the default for GPU instances of batched models), `"max_batch_size"` (always that many
//! rows: one shape whatever the load) or `"none"`. CPU instances never pad (ONNX Runtime's CPU
//! kernels do not re-plan per shape).

use bytes::{Bytes, BytesMut};
use oxserve_backend::{BackendError, LoadSpec};
use oxserve_core::{Tensor, TensorData};

use crate::error::{internal, invalid_model};

pub(crate) const PARAMETER: &str = "gpu_batch_padding";

/// Batches in a row that would fit in half the current row count before it is lowered: long
/// enough that alternating loads do not make it flap (each change costs a new plan), short
/// enough that a burst does not leave light traffic padded for long.
pub(crate) const SHRINK_AFTER: u32 = 64;

/// How a GPU instance pads its batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Padding {
    /// To a power of two that follows the load, at most `max` rows.
    Adaptive { max: usize },
    /// Always to `max` rows.
    Fixed { max: usize },
}

/// The padding of GPU instances, from the configuration; `None`: no padding.
pub(crate) fn gpu_padding(spec: &LoadSpec) -> Result<Option<Padding>, BackendError> {
    let max = spec.max_batch_size as usize;
    let padding = match spec.parameters.get(PARAMETER).map(|v| v.trim()) {
        None | Some("adaptive") => Padding::Adaptive { max },
        Some("max_batch_size") => Padding::Fixed { max },
        Some("none") => return Ok(None),
        Some(other) => {
            return Err(invalid_model(format!(
                "parameter '{PARAMETER}' must be \"adaptive\", \"max_batch_size\" or \"none\", got \
                 '{other}'"
            )));
        }
    };
    Ok((max > 1).then_some(padding))
}

/// The row count one GPU instance pads to, following its recent batches.
#[derive(Debug)]
pub(crate) struct RowTarget {
    padding: Padding,
    current: usize,
    /// Batches in a row that fit in half of `current`, and the largest of them.
    small_streak: u32,
    streak_max: usize,
}

impl RowTarget {
    pub(crate) fn new(padding: Padding) -> Self {
        RowTarget {
            padding,
            current: 0,
            small_streak: 0,
            streak_max: 0,
        }
    }

    /// The rows to run a batch of `rows` rows with (never fewer than `rows`).
    pub(crate) fn rows_for(&mut self, rows: usize) -> usize {
        let max = match self.padding {
            Padding::Fixed { max } => return max.max(rows),
            Padding::Adaptive { max } => max,
        };
        let fit = |n: usize| n.next_power_of_two().min(max).max(n);
        if rows > self.current {
            self.current = fit(rows);
            self.small_streak = 0;
        } else if rows <= self.current / 2 {
            self.streak_max = if self.small_streak == 0 {
                rows
            } else {
                self.streak_max.max(rows)
            };
            self.small_streak += 1;
            if self.small_streak >= SHRINK_AFTER {
                self.current = fit(self.streak_max);
                self.small_streak = 0;
            }
        } else {
            self.small_streak = 0;
        }
        self.current
    }
}

/// The batch's inputs with `rows` rows each: the last row repeated. Inputs that already have
/// `rows` rows (or more, which the scheduler does not send) are passed on as they are.
pub(crate) fn pad_rows(inputs: &[Tensor], rows: usize) -> Result<Vec<Tensor>, BackendError> {
    inputs.iter().map(|t| pad_one(t, rows)).collect()
}

fn pad_one(tensor: &Tensor, rows: usize) -> Result<Tensor, BackendError> {
    let have = leading_rows(tensor)?;
    if have >= rows || have == 0 {
        return Ok(tensor.clone());
    }
    let mut shape = tensor.shape.clone();
    shape[0] = rows as i64;
    let data = match &tensor.data {
        TensorData::Raw(raw) => {
            let row = raw.len() / have;
            let last = &raw[raw.len() - row..];
            let mut out = BytesMut::with_capacity(row * rows);
            out.extend_from_slice(raw);
            for _ in have..rows {
                out.extend_from_slice(last);
            }
            TensorData::Raw(out.freeze())
        }
        TensorData::Strings(items) => {
            let row = items.len() / have;
            let mut out = Vec::with_capacity(row * rows);
            out.extend_from_slice(items);
            for _ in have..rows {
                out.extend_from_slice(&items[items.len() - row..]);
            }
            TensorData::Strings(out)
        }
    };
    Ok(Tensor::new(tensor.name.clone(), tensor.datatype, shape, data))
}

/// The first `rows` rows of an output computed for a padded batch of `padded` rows.
pub(crate) fn take_rows(output: Tensor, rows: usize, padded: usize) -> Result<Tensor, BackendError> {
    if rows == padded {
        return Ok(output);
    }
    if output.shape.first().copied() != Some(padded as i64) {
        return Err(internal(format!(
            "output '{}' has shape {:?}, not {padded} rows as the padded batch: this model's rows \
             are not independent; set parameter '{PARAMETER}' to \"none\"",
            output.name, output.shape
        )));
    }
    let mut shape = output.shape;
    shape[0] = rows as i64;
    let data = match output.data {
        TensorData::Raw(raw) => {
            let row = raw.len() / padded;
            TensorData::Raw(Bytes::slice(&raw, ..row * rows))
        }
        TensorData::Strings(mut items) => {
            let row = items.len() / padded;
            items.truncate(row * rows);
            TensorData::Strings(items)
        }
    };
    Ok(Tensor::new(output.name, output.datatype, shape, data))
}

fn leading_rows(tensor: &Tensor) -> Result<usize, BackendError> {
    tensor
        .shape
        .first()
        .and_then(|&n| usize::try_from(n).ok())
        .ok_or_else(|| internal(format!("input '{}' has no batch dimension", tensor.name)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use oxserve_core::DataType;

    use super::*;
    use crate::test_spec::spec_with;

    fn f32s(t: &Tensor) -> Vec<f32> {
        t.raw()
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn rows_of(values: &[f32], shape: Vec<i64>) -> Tensor {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::from_raw("x", DataType::F32, shape, raw)
    }

    #[test]
    fn padding_repeats_the_last_row_and_taking_drops_the_padding() {
        let t = rows_of(&[1., 2., 3., 4.], vec![2, 2]);
        let padded = pad_rows(std::slice::from_ref(&t), 4).unwrap().remove(0);
        assert_eq!(padded.shape, [4, 2]);
        assert_eq!(f32s(&padded), [1., 2., 3., 4., 3., 4., 3., 4.]);
        let back = take_rows(padded, 2, 4).unwrap();
        assert_eq!(back, t);
        // A full batch is passed through.
        assert_eq!(pad_rows(std::slice::from_ref(&t), 2).unwrap()[0], t);
    }

    #[test]
    fn strings_are_padded_by_rows_too() {
        let items: Vec<Bytes> = ["a", "b", "c"].iter().map(|s| Bytes::from(*s)).collect();
        let t = Tensor::new("s", DataType::Bytes, vec![3, 1], TensorData::Strings(items));
        let padded = pad_rows(std::slice::from_ref(&t), 5).unwrap().remove(0);
        assert_eq!(padded.shape, [5, 1]);
        assert_eq!(
            padded.data,
            TensorData::Strings(
                ["a", "b", "c", "c", "c"]
                    .iter()
                    .map(|s| Bytes::from(*s))
                    .collect()
            )
        );
        assert_eq!(take_rows(padded, 3, 5).unwrap(), t);
    }

    #[test]
    fn an_output_without_the_padded_rows_is_an_error_naming_the_switch() {
        let out = rows_of(&[1., 2.], vec![2]);
        let err = take_rows(out, 1, 4).unwrap_err();
        assert!(err.message().contains("gpu_batch_padding"), "{}", err.message());
    }

    #[test]
    fn the_configuration_chooses_padding() {
        let spec = |max: u32, value: Option<&str>| {
            let params: Vec<(&str, &str)> = value.map(|v| (PARAMETER, v)).into_iter().collect();
            let mut s = spec_with(&params);
            s.max_batch_size = max;
            s
        };
        assert_eq!(
            gpu_padding(&spec(32, None)).unwrap(),
            Some(Padding::Adaptive { max: 32 })
        );
        assert_eq!(
            gpu_padding(&spec(32, Some("adaptive"))).unwrap(),
            Some(Padding::Adaptive { max: 32 })
        );
        assert_eq!(
            gpu_padding(&spec(8, Some("max_batch_size"))).unwrap(),
            Some(Padding::Fixed { max: 8 })
        );
        assert_eq!(gpu_padding(&spec(32, Some("none"))).unwrap(), None);
        // Nothing to pad: unbatched models and batches of at most one row.
        assert_eq!(gpu_padding(&spec(0, None)).unwrap(), None);
        assert_eq!(gpu_padding(&spec(1, None)).unwrap(), None);
        let err = gpu_padding(&spec(32, Some("16"))).unwrap_err();
        assert!(err.message().contains("gpu_batch_padding"), "{}", err.message());
    }

    #[test]
    fn the_adaptive_target_rises_at_once_and_falls_slowly() {
        let mut t = RowTarget::new(Padding::Adaptive { max: 24 });
        // Steady single rows: no padding at all.
        assert!((0..10).all(|_| t.rows_for(1) == 1));
        // A batcher merging 1 to 8 rows: one shape, 8 rows.
        assert_eq!(t.rows_for(5), 8);
        assert!([1, 3, 8, 2, 6, 7, 4].iter().all(|&n| t.rows_for(n) == 8));
        // Never above max_batch_size (not a power of two here), never below the batch.
        assert_eq!(t.rows_for(17), 24);
        assert_eq!(t.rows_for(24), 24);
        // Light traffic again: the target stays until SHRINK_AFTER small batches in a row...
        for _ in 1..SHRINK_AFTER {
            assert_eq!(t.rows_for(3), 24);
        }
        // ...then fits the largest of them; a batch that needs more than half resets the count.
        assert_eq!(t.rows_for(2), 4);
        for _ in 1..SHRINK_AFTER {
            t.rows_for(1);
        }
        assert_eq!(t.rows_for(3), 4, "3 rows need more than half of 4: no shrink");
        assert_eq!(t.rows_for(1), 4);
    }

    #[test]
    fn the_fixed_target_is_always_max_batch_size() {
        let mut t = RowTarget::new(Padding::Fixed { max: 32 });
        assert!([1, 5, 32, 2].iter().all(|&n| t.rows_for(n) == 32));
    }
}
