//! An archive's handler: what turns a request into the model's input and the model's output
//! into the response. TorchServe's `image_classifier` and `image_segmenter` run natively (no
//! Python); every other handler — a custom `handler.py`, TorchServe's other default handlers —
//! runs unchanged in TorchServe's own Python worker (crate::worker).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use bytes::Bytes;
use oxserve_core::{DataType, Error, Result, Tensor, TensorData};

/// ImageNet's normalisation, as torchvision's `Normalize` in TorchServe's `VisionHandler`.
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];
const RESIZE: u32 = 256;
const CROP: u32 = 224;
const TOP_K: usize = 5;
/// The largest image side decoded, and the most memory a decode may take.
const MAX_SIDE: u32 = 8192;
const MAX_DECODE_BYTES: u64 = 256 << 20;

/// A handler of an archive, by its manifest's `handler` field.
#[derive(Debug, Clone)]
pub enum Handler {
    /// `image_classifier`: decode (JPEG/PNG), resize the short side to 256, centre-crop 224,
    /// scale to [0, 1] and normalise, CHW float32; answer the top 5 classes with softmax
    /// probabilities, named by `index_to_name.json` when the archive has one.
    ImageClassifier { labels: Option<HashMap<usize, String>> },
    /// `image_segmenter`: the classifier's preprocessing; the model's `out` (a dict result's
    /// key, `[classes, H, W]` scores per image) becomes, per pixel, the most probable class
    /// and its softmax probability: TorchServe's `[H][W][class, probability]` list.
    ImageSegmenter,
    /// Any other handler, run by TorchServe's Python worker: the manifest's `handler` value
    /// (`handler.py`, `handler.py:entry`, `image_segmenter`, a module name, ...).
    Python { handler: String },
}

impl Handler {
    /// The handler an archive names.
    pub fn from_manifest(name: &str, archive_dir: &Path) -> Result<Handler> {
        match name {
            "image_classifier" => Ok(Handler::ImageClassifier {
                labels: read_labels(&archive_dir.join("index_to_name.json"))?,
            }),
            "image_segmenter" => Ok(Handler::ImageSegmenter),
            "" => Err(Error::invalid("the archive's manifest names no handler")),
            other => Ok(Handler::Python {
                handler: other.to_string(),
            }),
        }
    }

    /// The kind of handler, for messages: the versions of a model must share it.
    pub fn kind(&self) -> &'static str {
        match self {
            Handler::ImageClassifier { .. } => "native image_classifier",
            Handler::ImageSegmenter => "native image_segmenter",
            Handler::Python { .. } => "Python",
        }
    }

    /// Whether the handler runs in a Python worker.
    pub fn is_python(&self) -> bool {
        matches!(self, Handler::Python { .. })
    }

    /// The model's input for one request (native handlers).
    pub fn input_shape(&self) -> Vec<i64> {
        match self {
            Handler::ImageClassifier { .. } | Handler::ImageSegmenter => {
                vec![3, i64::from(CROP), i64::from(CROP)]
            }
            Handler::Python { .. } => vec![1],
        }
    }

    /// The model output a native handler reads, and its dims per image: the classifier's
    /// first result, the segmenter's `out` (torchvision's segmentation models answer a dict).
    pub fn output(&self) -> (&'static str, Vec<i64>) {
        match self {
            Handler::ImageSegmenter => ("out", vec![-1, -1, -1]),
            Handler::ImageClassifier { .. } | Handler::Python { .. } => ("OUTPUT__0", vec![-1]),
        }
    }

    /// Turns one request's body into the model's input (one row, without the batch dim).
    pub fn preprocess(&self, body: &[u8]) -> Result<Tensor> {
        match self {
            Handler::ImageClassifier { .. } | Handler::ImageSegmenter => image_tensor(body),
            Handler::Python { .. } => Err(Error::internal("a Python handler has no native preprocessing")),
        }
    }

    /// The response body for one row of the model's output (`[classes]` scores for the
    /// classifier, `[classes, H, W]` for the segmenter).
    pub fn postprocess(&self, output: &Tensor) -> Result<String> {
        match self {
            Handler::ImageClassifier { labels } => top_k(output, labels.as_ref()),
            Handler::ImageSegmenter => segments(output),
            Handler::Python { .. } => Err(Error::internal("a Python handler has no native postprocessing")),
        }
    }
}

/// `index_to_name.json`: `{"0": ["n01440764", "tench"], ...}` or `{"0": "tench", ...}`.
fn read_labels(path: &Path) -> Result<Option<HashMap<usize, String>>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(None);
    };
    let raw: HashMap<String, serde_json::Value> = serde_json::from_str(&text)
        .map_err(|e| Error::invalid(format!("index_to_name.json is not a JSON object: {e}")))?;
    let mut labels = HashMap::with_capacity(raw.len());
    for (key, value) in raw {
        let index: usize = key
            .parse()
            .map_err(|_| Error::invalid(format!("index_to_name.json: key '{key}' is not a class index")))?;
        // TorchServe's map_class_to_label: the second element of a list, else the value.
        let label = match &value {
            serde_json::Value::Array(items) => items.get(1).or(items.first()).cloned().unwrap_or_default(),
            other => other.clone(),
        };
        let label = match label {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        labels.insert(index, label);
    }
    Ok(Some(labels))
}

fn image_tensor(body: &[u8]) -> Result<Tensor> {
    // A small file can declare a huge image: dimensions and decoder memory are capped so a
    // request cannot make the server allocate gigabytes.
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    let mut reader = image::ImageReader::new(std::io::Cursor::new(body))
        .with_guessed_format()
        .map_err(|e| Error::invalid(format!("cannot decode the image: {e}")))?;
    reader.limits(limits);
    let image = reader
        .decode()
        .map_err(|e| Error::invalid(format!("cannot decode the image: {e}")))?
        .to_rgb8();
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::invalid("the image is empty"));
    }
    // torchvision's Resize(256): the short side to 256, the long one in proportion (floored).
    let (nw, nh) = if w <= h {
        (RESIZE, ((u64::from(RESIZE) * u64::from(h)) / u64::from(w)) as u32)
    } else {
        (((u64::from(RESIZE) * u64::from(w)) / u64::from(h)) as u32, RESIZE)
    };
    let resized = image::imageops::resize(&image, nw, nh, image::imageops::FilterType::Triangle);
    // CenterCrop(224): offsets rounded as torchvision rounds them (Python's round: halves to
    // even, so a 341-pixel side starts the crop at 58, not 59).
    let top = ((f64::from(nh) - f64::from(CROP)) / 2.0)
        .round_ties_even()
        .max(0.0) as u32;
    let left = ((f64::from(nw) - f64::from(CROP)) / 2.0)
        .round_ties_even()
        .max(0.0) as u32;
    let plane = (CROP * CROP) as usize;
    let mut chw = vec![0f32; 3 * plane];
    for y in 0..CROP.min(nh) {
        for x in 0..CROP.min(nw) {
            let pixel = resized.get_pixel(left + x, top + y);
            for c in 0..3 {
                let v = f32::from(pixel[c]) / 255.0;
                chw[c * plane + (y * CROP + x) as usize] = (v - MEAN[c]) / STD[c];
            }
        }
    }
    let mut raw = Vec::with_capacity(chw.len() * 4);
    for v in chw {
        raw.extend_from_slice(&v.to_le_bytes());
    }
    Ok(Tensor::new(
        "INPUT__0",
        DataType::F32,
        vec![3, i64::from(CROP), i64::from(CROP)],
        TensorData::Raw(Bytes::from(raw)),
    ))
}

/// Softmax over one row of scores, the top 5, as TorchServe's JSON (most probable first).
fn top_k(output: &Tensor, labels: Option<&HashMap<usize, String>>) -> Result<String> {
    let raw = output
        .raw()
        .filter(|_| output.datatype == DataType::F32)
        .ok_or_else(|| Error::internal("the classifier's output is not FP32 scores"))?;
    let scores: Vec<f32> = raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if scores.is_empty() {
        return Err(Error::internal("the classifier returned no scores"));
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f64> = scores.iter().map(|&s| f64::from(s - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    let mut ranked: Vec<(usize, f64)> = exps.iter().map(|e| e / sum).enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(TOP_K);
    let mut out = String::from("{\n");
    for (i, (class, prob)) in ranked.iter().enumerate() {
        let label = labels
            .and_then(|l| l.get(class).cloned())
            .unwrap_or_else(|| class.to_string());
        let _ = writeln!(
            out,
            "  {}: {}{}",
            serde_json::Value::String(label),
            python_float(f64::from(*prob as f32)),
            if i + 1 < ranked.len() { "," } else { "" }
        );
    }
    out.push('}');
    Ok(out)
}

/// TorchServe's `image_segmenter` answer for one image's `[classes, H, W]` scores: softmax over
/// the classes, then per pixel `[class, probability]` (the class as a float, as torch.stack
/// makes it), as the worker's `json.dumps(..., indent=2)` writes the `[H][W][2]` list.
fn segments(output: &Tensor) -> Result<String> {
    let raw = output
        .raw()
        .filter(|_| output.datatype == DataType::F32)
        .ok_or_else(|| Error::internal("the segmenter's output 'out' is not FP32 scores"))?;
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
    let scores: Vec<f32> = raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
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
    use image::ImageEncoder;

    use super::*;

    /// PNG's CRC-32 (for the chunk patched in the test).
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn images_become_normalised_chw_crops() {
        let mut png = Vec::new();
        let img = image::RgbImage::from_fn(300, 200, |x, _| image::Rgb([(x % 256) as u8, 128, 255]));
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let t = image_tensor(&png).unwrap();
        assert_eq!(t.shape, [3, 224, 224]);
        let v: Vec<f32> = t
            .raw()
            .unwrap()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        // Blue is 255 everywhere: (1 - 0.406) / 0.225.
        assert!((v[2 * 224 * 224] - (1.0 - 0.406) / 0.225).abs() < 1e-5);
        assert!(
            image_tensor(b"not an image")
                .unwrap_err()
                .to_string()
                .contains("cannot decode")
        );
        // A tiny PNG that declares a 100,000 × 100,000 image is refused, not allocated.
        let mut header = Vec::new();
        image::codecs::png::PngEncoder::new(&mut header)
            .write_image(&[0u8; 3], 1, 1, image::ExtendedColorType::Rgb8)
            .unwrap();
        // Patch the IHDR width and height (bytes 16..24) and its CRC (bytes 29..33).
        header[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        header[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32(&header[12..29]);
        header[29..33].copy_from_slice(&crc.to_be_bytes());
        let err = image_tensor(&header).unwrap_err().to_string();
        assert!(
            err.contains("cannot decode") && err.to_lowercase().contains("limit"),
            "{err}"
        );
    }

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
}
