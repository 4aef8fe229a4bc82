//! Triton's classification extension: an output is replaced by the top N of its values as
//! BYTES strings "<value>:<index>[:<label>]", shape [batch, N] (or [N] without batching).

use bytes::Bytes;
use half::{bf16, f16};
use oxserve_core::{DataType, Error, Result, Tensor, TensorData};

/// Values of a numeric raw tensor: as f64 for ranking, and as the text Triton shows.
fn decode(dtype: DataType, raw: &[u8]) -> Result<Vec<(f64, String)>> {
    macro_rules! each {
        ($ty:ty, $n:expr, $to_f64:expr) => {
            raw.chunks_exact($n)
                .map(|c| {
                    let mut a = [0u8; $n];
                    a.copy_from_slice(c);
                    let v = <$ty>::from_le_bytes(a);
                    ($to_f64(v), v.to_string())
                })
                .collect()
        };
    }
    Ok(match dtype {
        DataType::Bool => raw
            .iter()
            .map(|&b| (f64::from(b), (b != 0).to_string()))
            .collect(),
        DataType::U8 => each!(u8, 1, f64::from),
        DataType::U16 => each!(u16, 2, f64::from),
        DataType::U32 => each!(u32, 4, f64::from),
        DataType::U64 => each!(u64, 8, |v: u64| v as f64),
        DataType::I8 => each!(i8, 1, f64::from),
        DataType::I16 => each!(i16, 2, f64::from),
        DataType::I32 => each!(i32, 4, f64::from),
        DataType::I64 => each!(i64, 8, |v: i64| v as f64),
        DataType::F16 => each!(f16, 2, f64::from),
        DataType::BF16 => each!(bf16, 2, f64::from),
        DataType::F32 => each!(f32, 4, f64::from),
        DataType::F64 => each!(f64, 8, |v: f64| v),
        DataType::Bytes => {
            return Err(Error::invalid("classification needs a numeric output, not BYTES"));
        }
    })
}

/// Replaces `tensor` by its top-`count` classes per batch row.
pub(crate) fn classify(
    tensor: &Tensor,
    count: usize,
    batched: bool,
    labels: Option<&[String]>,
) -> Result<Tensor> {
    let Some(raw) = tensor.raw() else {
        return Err(Error::invalid(format!(
            "output '{}' is BYTES; classification needs a numeric output",
            tensor.name
        )));
    };
    let values = decode(tensor.datatype, raw)?;
    let rows = if batched {
        tensor.shape.first().copied().unwrap_or(1).max(1) as usize
    } else {
        1
    };
    let per_row = values.len() / rows.max(1);
    let n = count.min(per_row);
    let mut out = Vec::with_capacity(rows * n);
    for row in values.chunks(per_row.max(1)).take(rows) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        // Highest first; equal values keep the lower index first. NaN ranks last.
        order.sort_by(|&a, &b| {
            row[b]
                .0
                .partial_cmp(&row[a].0)
                .unwrap_or_else(|| row[a].0.is_nan().cmp(&row[b].0.is_nan()))
                .then(a.cmp(&b))
        });
        for &index in order.iter().take(n) {
            let text = match labels.and_then(|l| l.get(index)) {
                Some(label) => format!("{}:{index}:{label}", row[index].1),
                None => format!("{}:{index}", row[index].1),
            };
            out.push(Bytes::from(text));
        }
    }
    let shape = if batched {
        vec![rows as i64, n as i64]
    } else {
        vec![n as i64]
    };
    Ok(Tensor::new(
        tensor.name.clone(),
        DataType::Bytes,
        shape,
        TensorData::Strings(out),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_tensor(shape: Vec<i64>, values: &[f32]) -> Tensor {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::from_raw("out", DataType::F32, shape, raw)
    }

    fn strings(t: &Tensor) -> Vec<String> {
        match &t.data {
            TensorData::Strings(s) => s
                .iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect(),
            TensorData::Raw(_) => panic!("not strings"),
        }
    }

    #[test]
    fn matches_the_triton_spec_example() {
        let t = f32_tensor(vec![4], &[1.1, 3.3, 0.5, 2.4]);
        let c = classify(&t, 2, false, None).unwrap();
        assert_eq!(c.shape, vec![2]);
        assert_eq!(strings(&c), vec!["3.3:1", "2.4:3"]);
        let labels: Vec<String> = (0..4).map(|i| format!("index_{i}_label")).collect();
        let c = classify(&t, 2, false, Some(&labels)).unwrap();
        assert_eq!(strings(&c), vec!["3.3:1:index_1_label", "2.4:3:index_3_label"]);
    }

    #[test]
    fn per_batch_row_and_clamped_count() {
        let t = f32_tensor(vec![2, 3], &[0.1, 0.7, 0.2, 0.9, 0.05, 0.05]);
        let c = classify(&t, 5, true, None).unwrap();
        assert_eq!(c.shape, vec![2, 3]);
        assert_eq!(
            strings(&c),
            vec!["0.7:1", "0.2:2", "0.1:0", "0.9:0", "0.05:1", "0.05:2"]
        );
    }

    #[test]
    fn integer_outputs_and_bytes_rejected() {
        let raw: Vec<u8> = [5i32, -2, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = Tensor::from_raw("o", DataType::I32, vec![3], raw);
        assert_eq!(strings(&classify(&t, 1, false, None).unwrap()), vec!["9:2"]);
        let s = Tensor::new(
            "s",
            DataType::Bytes,
            vec![1],
            TensorData::Strings(vec![Bytes::new()]),
        );
        assert!(classify(&s, 1, false, None).is_err());
    }
}
