//! Triton's `model_warmup`: sample requests run through a freshly loaded version's own
//! scheduler and instances before it is published, so its first real request does not pay
//! for lazy initialisation (and a version that cannot run its samples never serves).

use std::path::Path;

use bytes::Bytes;
use oxserve_core::{DataType, Tensor, TensorData};
use oxserve_repository::pb::ModelWarmup;
use oxserve_repository::pb::model_warmup::input::InputDataType;
use oxserve_scheduler::Job;
use rand::Rng;

use crate::model::ServedVersion;
use crate::validate::prepare;

/// Where Triton keeps `input_data_file` files: `<model>/warmup/<file>`.
const WARMUP_DIR: &str = "warmup";

/// Runs every warmup of the version's configuration `count` times (at least once), on the
/// calling (loader) thread. Err: which warmup failed and why.
pub(crate) fn run(served: &ServedVersion, model_dir: &Path) -> Result<(), String> {
    for warmup in &served.config.model_warmup {
        let fail = |reason: String| format!("warmup '{}' failed: {reason}", warmup.name);
        let inputs = sample_inputs(warmup, served.io.max_batch_size > 0, model_dir).map_err(fail)?;
        for _ in 0..warmup.count.max(1) {
            let prepared = prepare(&served.io, &served.model_name, inputs.clone(), Vec::new())
                .map_err(|e| fail(e.message().to_string()))?;
            let job = Job {
                inputs: prepared.batch.inputs,
                outputs: prepared.batch.outputs,
                priority: 0,
                timeout: None,
                sequence: None,
            };
            futures::executor::block_on(served.scheduler.submit(job))
                .map_err(|e| fail(crate::service::exec_error(served, e).0.message().to_string()))?;
        }
        tracing::info!(model = %served.model_name, version = served.version, warmup = %warmup.name, "warmup done");
    }
    Ok(())
}

/// The sample's tensors: each input's dims, with `batch_size` in front for batching models.
fn sample_inputs(warmup: &ModelWarmup, batched: bool, model_dir: &Path) -> Result<Vec<Tensor>, String> {
    let mut names: Vec<&String> = warmup.inputs.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let input = &warmup.inputs[name];
        let datatype = oxserve_repository::data_type_of(input.data_type)
            .ok_or_else(|| format!("input '{name}' has no usable data_type"))?;
        let rows = if batched {
            warmup.batch_size.max(1) as usize
        } else {
            1
        };
        let row_elements = input
            .dims
            .iter()
            .try_fold(1usize, |n, &d| {
                usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
            })
            .ok_or_else(|| format!("input '{name}' needs fixed, non-negative dims"))?;
        let mut shape: Vec<i64> = input.dims.clone();
        if batched {
            shape.insert(0, rows as i64);
        }
        let elements = row_elements * rows;
        let data = match &input.input_data_type {
            Some(InputDataType::ZeroData(_)) => zeros(datatype, elements),
            Some(InputDataType::RandomData(_)) => random(datatype, elements),
            Some(InputDataType::InputDataFile(file)) => from_file(
                datatype,
                row_elements,
                rows,
                &model_dir.join(WARMUP_DIR).join(file),
            )
            .map_err(|e| format!("input '{name}': {e}"))?,
            None => {
                return Err(format!(
                    "input '{name}' sets none of zero_data, random_data, input_data_file"
                ));
            }
        };
        tensors.push(Tensor::new(name.clone(), datatype, shape, data));
    }
    Ok(tensors)
}

fn zeros(datatype: DataType, elements: usize) -> TensorData {
    match datatype.size() {
        Some(size) => TensorData::Raw(Bytes::from(vec![0u8; elements * size])),
        None => TensorData::Strings(vec![Bytes::new(); elements]),
    }
}

/// Values the model can take whatever it checks: floats in [0, 1), integers 0..=9, BOOL 0/1;
/// BYTES elements are random lowercase words.
fn random(datatype: DataType, elements: usize) -> TensorData {
    let mut rng = rand::rng();
    let mut out = Vec::with_capacity(elements * datatype.size().unwrap_or(0));
    for _ in 0..elements {
        match datatype {
            DataType::Bool => out.push(rng.random_range(0..=1u8)),
            DataType::U8 | DataType::I8 => out.push(rng.random_range(0..=9u8)),
            DataType::U16 | DataType::I16 => out.extend(rng.random_range(0..=9u16).to_le_bytes()),
            DataType::U32 | DataType::I32 => out.extend(rng.random_range(0..=9u32).to_le_bytes()),
            DataType::U64 | DataType::I64 => out.extend(rng.random_range(0..=9u64).to_le_bytes()),
            DataType::F16 => out.extend(half::f16::from_f32(rng.random::<f32>()).to_le_bytes()),
            DataType::BF16 => out.extend(half::bf16::from_f32(rng.random::<f32>()).to_le_bytes()),
            DataType::F32 => out.extend(rng.random::<f32>().to_le_bytes()),
            DataType::F64 => out.extend(rng.random::<f64>().to_le_bytes()),
            DataType::Bytes => {}
        }
    }
    if datatype == DataType::Bytes {
        let words = (0..elements)
            .map(|_| {
                let len = rng.random_range(1..=8);
                Bytes::from(
                    (0..len)
                        .map(|_| rng.random_range(b'a'..=b'z'))
                        .collect::<Vec<u8>>(),
                )
            })
            .collect();
        return TensorData::Strings(words);
    }
    TensorData::Raw(Bytes::from(out))
}

/// One row of raw data (Triton's layout: fixed-size elements row-major, BYTES elements each
/// a 4-byte little-endian length and the bytes), repeated for every row of the batch.
fn from_file(
    datatype: DataType,
    row_elements: usize,
    rows: usize,
    path: &Path,
) -> Result<TensorData, String> {
    let raw = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    match datatype.size() {
        Some(size) => {
            let expected = row_elements * size;
            if raw.len() != expected {
                return Err(format!(
                    "{} holds {} bytes, one sample of this input is {expected}",
                    path.display(),
                    raw.len()
                ));
            }
            Ok(TensorData::Raw(Bytes::from(raw.repeat(rows))))
        }
        None => {
            let mut items = Vec::with_capacity(row_elements);
            let mut rest = raw.as_slice();
            while !rest.is_empty() {
                let (len, tail) = rest
                    .split_first_chunk::<4>()
                    .ok_or_else(|| format!("{}: a BYTES length prefix is cut short", path.display()))?;
                let len = u32::from_le_bytes(*len) as usize;
                if tail.len() < len {
                    return Err(format!("{}: a BYTES element is cut short", path.display()));
                }
                items.push(Bytes::copy_from_slice(&tail[..len]));
                rest = &tail[len..];
            }
            if items.len() != row_elements {
                return Err(format!(
                    "{} holds {} BYTES elements, one sample of this input has {row_elements}",
                    path.display(),
                    items.len()
                ));
            }
            Ok(TensorData::Strings(
                std::iter::repeat_n(items, rows).flatten().collect(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_have_the_batch_in_front_and_valid_values() {
        let TensorData::Raw(b) = random(DataType::Bool, 64) else {
            panic!()
        };
        assert!(b.iter().all(|&v| v <= 1));
        let TensorData::Raw(f) = random(DataType::F32, 4) else {
            panic!()
        };
        assert_eq!(f.len(), 16);
        let TensorData::Strings(s) = zeros(DataType::Bytes, 3) else {
            panic!()
        };
        assert_eq!(s, vec![Bytes::new(); 3]);
    }

    #[test]
    fn file_samples_are_checked_and_repeated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        std::fs::write(&path, 1.5f32.to_le_bytes().repeat(2)).unwrap();
        let TensorData::Raw(b) = from_file(DataType::F32, 2, 3, &path).unwrap() else {
            panic!()
        };
        assert_eq!(b.len(), 24);
        assert!(
            from_file(DataType::F32, 3, 1, &path)
                .unwrap_err()
                .contains("one sample")
        );
        std::fs::write(&path, [2, 0, 0, 0, b'h', b'i', 0, 0, 0, 0]).unwrap();
        let TensorData::Strings(s) = from_file(DataType::Bytes, 2, 2, &path).unwrap() else {
            panic!()
        };
        assert_eq!(
            s,
            vec![Bytes::from("hi"), Bytes::new(), Bytes::from("hi"), Bytes::new()]
        );
        std::fs::write(&path, [9, 0, 0, 0, b'h']).unwrap();
        assert!(
            from_file(DataType::Bytes, 1, 1, &path)
                .unwrap_err()
                .contains("cut short")
        );
    }
}
