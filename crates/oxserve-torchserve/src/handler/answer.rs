//! The answers of the native handlers, written as TorchServe's Python worker writes what a
//! handler returns: `json.dumps(result, indent=2)`, floats as Python's `repr`, non-ASCII
//! escaped (`ensure_ascii`).

use std::collections::HashMap;
use std::fmt::Write as _;

use oxserve_core::{DataType, Error, Result, Tensor};

const TOP_K: usize = 5;
/// TorchServe's `ObjectDetector.threshold`.
const DETECTION_THRESHOLD: f32 = 0.5;

/// A value as Python's `json.dumps` sees it.
#[derive(Debug, Clone, PartialEq)]
enum Py {
    Float(f64),
    List(Vec<Py>),
    /// Keys in insertion order, as a Python dict keeps them.
    Dict(Vec<(String, Py)>),
}

impl Py {
    /// `json.dumps(self, indent=2)`.
    fn dumps(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out
    }

    fn write(&self, out: &mut String, depth: usize) {
        let pad = |out: &mut String, depth: usize| {
            out.push('\n');
            out.push_str(&"  ".repeat(depth));
        };
        match self {
            Py::Float(v) => out.push_str(&python_float(*v)),
            Py::List(items) if items.is_empty() => out.push_str("[]"),
            Py::Dict(items) if items.is_empty() => out.push_str("{}"),
            Py::List(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    pad(out, depth + 1);
                    item.write(out, depth + 1);
                }
                pad(out, depth);
                out.push(']');
            }
            Py::Dict(items) => {
                out.push('{');
                for (i, (key, item)) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    pad(out, depth + 1);
                    out.push_str(&ascii_json_string(key));
                    out.push_str(": ");
                    item.write(out, depth + 1);
                }
                pad(out, depth);
                out.push('}');
            }
        }
    }
}

/// A JSON string as Python's `json.dumps` writes it (`ensure_ascii`: every non-ASCII character
/// as `\uXXXX`, surrogate pairs beyond the BMP).
fn ascii_json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn floats(t: &Tensor, what: &str) -> Result<Vec<f32>> {
    let raw = t
        .raw()
        .filter(|_| t.datatype == DataType::F32)
        .ok_or_else(|| Error::internal(format!("{what} is not FP32")))?;
    Ok(raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// The classifier: softmax over one row of scores, the top 5 as `{label: probability}`, most
/// probable first (labels from `index_to_name.json`, else the class index).
pub(super) fn top_k(output: &Tensor, labels: Option<&HashMap<usize, String>>) -> Result<String> {
    let scores = floats(output, "the classifier's output")?;
    if scores.is_empty() {
        return Err(Error::internal("the classifier returned no scores"));
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = scores.iter().map(|&s| f64::from(s - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    let mut ranked: Vec<(usize, f64)> = exps.iter().map(|e| e / sum).enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(TOP_K);
    let answer = ranked
        .into_iter()
        .map(|(class, prob)| {
            let label = labels
                .and_then(|l| l.get(&class).cloned())
                .unwrap_or_else(|| class.to_string());
            (label, Py::Float(f64::from(prob as f32)))
        })
        .collect();
    Ok(Py::Dict(answer).dumps())
}

/// The object detector: for one image's `boxes` `[K, 4]`, `labels` `[K]` and `scores` `[K]`,
/// the detections scoring at least 0.5 as `[{label: box, "score": score}, ...]` in the
/// model's order (labels as `map_class_to_label` names them).
pub(super) fn detections(outputs: &[Tensor], labels: Option<&HashMap<usize, String>>) -> Result<String> {
    let [boxes, classes, scores] = outputs else {
        return Err(Error::internal(
            "the detector needs the model's boxes, labels and scores",
        ));
    };
    let boxes = floats(boxes, "the detector's 'boxes'")?;
    let scores = floats(scores, "the detector's 'scores'")?;
    let classes: Vec<i64> = match classes.datatype {
        DataType::I64 => classes
            .raw()
            .map(|r| {
                r.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default(),
        other => {
            return Err(Error::internal(format!(
                "the detector's 'labels' are {other}, not INT64"
            )));
        }
    };
    if boxes.len() != scores.len() * 4 || classes.len() != scores.len() {
        return Err(Error::internal(format!(
            "the detector answered {} boxes, {} labels and {} scores",
            boxes.len() / 4,
            classes.len(),
            scores.len()
        )));
    }
    let answer = scores
        .iter()
        .enumerate()
        .filter(|(_, s)| **s >= DETECTION_THRESHOLD)
        .map(|(i, &score)| {
            let class = classes[i];
            let name = usize::try_from(class)
                .ok()
                .and_then(|c| labels.and_then(|l| l.get(&c).cloned()))
                .unwrap_or_else(|| class.to_string());
            let bbox = boxes[i * 4..i * 4 + 4]
                .iter()
                .map(|&v| Py::Float(f64::from(v)))
                .collect();
            Py::Dict(vec![
                (name, Py::List(bbox)),
                ("score".into(), Py::Float(f64::from(score))),
            ])
        })
        .collect();
    Ok(Py::List(answer).dumps())
}

/// TorchServe's `image_segmenter` answer for one image's `[classes, H, W]` scores: softmax over
/// the classes, then per pixel `[class, probability]` (the class as a float, as torch.stack
/// makes it), as the worker's `json.dumps(..., indent=2)` writes the `[H][W][2]` list.
pub(super) fn segments(output: &Tensor) -> Result<String> {
    let scores = floats(output, "the segmenter's output 'out'")?;
    let [classes, height, width] = output.shape[..] else {
        return Err(Error::internal(format!(
            "the segmenter's output 'out' has shape {:?}; expected [classes, height, width] per image",
            output.shape
        )));
    };
    let (classes, height, width) = (
        classes.max(0) as usize,
        height.max(0) as usize,
        width.max(0) as usize,
    );
    if classes == 0 {
        return Err(Error::internal("the segmenter returned no classes"));
    }
    let plane = height * width;
    let mut out = String::with_capacity(plane * 48);
    out.push_str("[\n");
    for y in 0..height {
        out.push_str("  [\n");
        for x in 0..width {
            let at = |k: usize| scores[k * plane + y * width + x];
            // softmax in float32 as torch computes it, then the largest (the first on ties).
            let max = (0..classes).map(at).fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = (0..classes).map(|k| (at(k) - max).exp()).sum();
            let (best, top) = (0..classes).fold((0, f32::NEG_INFINITY), |(bk, bp), k| {
                let p = (at(k) - max).exp() / sum;
                if p > bp { (k, p) } else { (bk, bp) }
            });
            let _ = write!(
                out,
                "    [\n      {},\n      {}\n    ]{}\n",
                python_float(best as f64),
                python_float(f64::from(top)),
                if x + 1 < width { "," } else { "" }
            );
        }
        out.push_str(if y + 1 < height { "  ],\n" } else { "  ]\n" });
    }
    out.push(']');
    Ok(out)
}

/// Scientific digits (`-1.2345`, exponent 2) written out positionally (`-123.45`), keeping a
/// `.0` on integral values.
fn positional(mantissa: &str, exponent: i32) -> String {
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let point = 1 + exponent; // digits before the decimal point
    let (int, frac) = if point <= 0 {
        (
            "0".to_string(),
            format!("{}{digits}", "0".repeat(point.unsigned_abs() as usize)),
        )
    } else if point as usize >= digits.len() {
        (
            format!("{digits}{}", "0".repeat(point as usize - digits.len())),
            String::new(),
        )
    } else {
        (
            digits[..point as usize].to_string(),
            digits[point as usize..].to_string(),
        )
    };
    let frac = frac.trim_end_matches('0');
    format!("{sign}{int}.{}", if frac.is_empty() { "0" } else { frac })
}

/// A float as Python's `repr` (and so `json.dumps`) writes it: the shortest digits that read
/// back, positional for exponents -4 to 15 (integral values keep `.0`), otherwise scientific
/// with a signed two-digit exponent (`1e-05`).
fn python_float(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // The shortest digits that read back (Rust's `{:e}`), re-rounded at that length with
    // halves to even, as Python breaks the ties of its shortest repr.
    let shortest = format!("{v:e}");
    let digits = shortest
        .split_once('e')
        .map_or(1, |(m, _)| m.bytes().filter(u8::is_ascii_digit).count());
    let scientific = format!("{v:.*e}", digits.saturating_sub(1));
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if (-4..16).contains(&exponent) {
        positional(mantissa, exponent)
    } else {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.unsigned_abs())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use bytes::Bytes;
    use oxserve_core::TensorData;

    use super::*;

    #[test]
    fn floats_read_as_pythons_repr() {
        for (v, python) in [
            (15.0, "15.0"),
            (0.5, "0.5"),
            (1e-5, "1e-05"),
            (1.25e-7, "1.25e-07"),
            (0.0001, "0.0001"),
            (f64::from(0.1f32), "0.10000000149011612"),
            (1e16, "1e+16"),
            (123456789012345.0, "123456789012345.0"),
            (-0.0, "-0.0"),
            (0.5100784301757812, "0.5100784301757812"),
            (-123.45, "-123.45"),
            (0.00012, "0.00012"),
            (100.0, "100.0"),
        ] {
            assert_eq!(python_float(v), python, "{v}");
        }
    }

    #[test]
    fn segments_are_the_top_class_and_its_probability_per_pixel() {
        // 2 classes, 1 x 2 pixels: class 1 wins the first pixel, class 0 the second.
        let scores: Vec<u8> = [0f32, 3., 2., 0.].iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = Tensor::new(
            "out",
            DataType::F32,
            vec![2, 1, 2],
            TensorData::Raw(Bytes::from(scores)),
        );
        let body = segments(&t).unwrap();
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        let p = 1.0 / (1.0 + (-2f32).exp());
        assert_eq!(parsed[0][0][0], 1.0);
        assert_eq!(parsed[0][1][0], 0.0);
        assert!((parsed[0][0][1].as_f64().unwrap() - f64::from(p)).abs() < 1e-7);
        assert!(body.starts_with("[\n  [\n    [\n      1.0,\n"), "{body}");
    }

    #[test]
    fn top_5_with_labels_most_probable_first() {
        let scores: Vec<u8> = [0f32, 1., 2., 3., 4., 5.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let t = Tensor::new(
            "OUTPUT__0",
            DataType::F32,
            vec![6],
            TensorData::Raw(Bytes::from(scores)),
        );
        let labels: HashMap<usize, String> = [(5, "five".to_string()), (4, "four".to_string())].into();
        let body = top_k(&t, Some(&labels)).unwrap();
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed.as_object().unwrap().len(), 5);
        assert!(body.find("five").unwrap() < body.find("four").unwrap());
        assert!(body.contains("\"3\""));
        assert!(!body.contains("\"0\""));
        let total: f64 = parsed
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .sum();
        assert!(total < 1.0 && total > 0.9);
    }

    fn f32_tensor(name: &str, shape: Vec<i64>, values: &[f32]) -> Tensor {
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::new(name, DataType::F32, shape, TensorData::Raw(Bytes::from(raw)))
    }

    #[test]
    fn detections_keep_scores_from_the_threshold_as_torchserve_writes_them() {
        let boxes = f32_tensor(
            "boxes",
            vec![3, 4],
            &[1., 2., 3., 4., 5., 6., 7., 8., 0.5, 0.25, 9., 10.],
        );
        let scores = f32_tensor("scores", vec![3], &[0.9, 0.2, 0.5]);
        let classes: Vec<u8> = [1i64, 2, 7].iter().flat_map(|v| v.to_le_bytes()).collect();
        let classes = Tensor::new(
            "labels",
            DataType::I64,
            vec![3],
            TensorData::Raw(Bytes::from(classes)),
        );
        let labels: HashMap<usize, String> = [(1, "cat".to_string())].into();
        let body = detections(&[boxes, classes, scores], Some(&labels)).unwrap();
        assert_eq!(
            body,
            "[\n  {\n    \"cat\": [\n      1.0,\n      2.0,\n      3.0,\n      4.0\n    ],\n    \"score\": \
             0.8999999761581421\n  },\n  {\n    \"7\": [\n      0.5,\n      0.25,\n      9.0,\n      \
             10.0\n    ],\n    \"score\": 0.5\n  }\n]"
        );
        let none = detections(
            &[
                f32_tensor("boxes", vec![0, 4], &[]),
                Tensor::new("labels", DataType::I64, vec![0], TensorData::Raw(Bytes::new())),
                f32_tensor("scores", vec![0], &[]),
            ],
            None,
        )
        .unwrap();
        assert_eq!(none, "[]");
    }

    #[test]
    fn keys_are_escaped_as_pythons_ensure_ascii() {
        assert_eq!(
            ascii_json_string("chat \u{e9}\"\u{1f600}"),
            "\"chat \\u00e9\\\"\\ud83d\\ude00\""
        );
    }
}
