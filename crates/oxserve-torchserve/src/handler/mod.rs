//! An archive's handler: what turns a request into the model's input and the model's output
//! into the response. TorchServe's `image_classifier`, `image_segmenter` and `object_detector`
//! run natively (no Python; [`image`] prepares the input, [`answer`] writes the answer as
//! TorchServe's worker would); every other handler — a custom `handler.py`, TorchServe's
//! `text_classifier` — runs unchanged in TorchServe's own Python worker (crate::worker).

mod answer;
mod image;

use std::collections::HashMap;
use std::path::Path;

use oxserve_core::{DataType, Error, Result, Tensor};

use self::image::CROP;

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
    /// `object_detector`: the image as it is (ToTensor), one image per run; the model's
    /// `boxes`, `labels` and `scores` (the dict a detection model answers for an image) become
    /// the detections scoring at least 0.5, `{label: box, "score": score}`.
    ObjectDetector { labels: Option<HashMap<usize, String>> },
    /// Any other handler, run by TorchServe's Python worker: the manifest's `handler` value
    /// (`handler.py`, `handler.py:entry`, `text_classifier`, a module name, ...).
    Python { handler: String },
}

/// A model output a native handler reads: its name (a dict key or `OUTPUT__<i>`), type and
/// dims per request.
pub struct HandlerOutput {
    pub name: &'static str,
    pub datatype: DataType,
    pub dims: Vec<i64>,
}

impl Handler {
    /// The handler an archive names.
    pub fn from_manifest(name: &str, archive_dir: &Path) -> Result<Handler> {
        let labels = || read_labels(&archive_dir.join("index_to_name.json"));
        match name {
            "image_classifier" => Ok(Handler::ImageClassifier { labels: labels()? }),
            "image_segmenter" => Ok(Handler::ImageSegmenter),
            "object_detector" => Ok(Handler::ObjectDetector { labels: labels()? }),
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
            Handler::ObjectDetector { .. } => "native object_detector",
            Handler::Python { .. } => "Python",
        }
    }

    /// Whether the handler runs in a Python worker.
    pub fn is_python(&self) -> bool {
        matches!(self, Handler::Python { .. })
    }

    /// Whether requests batch together: a detector's results differ in length from image to
    /// image (and its images in size), so each runs alone, the model unbatched.
    pub fn batches(&self) -> bool {
        !matches!(self, Handler::ObjectDetector { .. })
    }

    /// The model's input for one request (native handlers), without a batch dimension.
    pub fn input_shape(&self) -> Vec<i64> {
        match self {
            Handler::ImageClassifier { .. } | Handler::ImageSegmenter => {
                vec![3, i64::from(CROP), i64::from(CROP)]
            }
            Handler::ObjectDetector { .. } => vec![3, -1, -1],
            Handler::Python { .. } => vec![1],
        }
    }

    /// The model outputs a native handler reads: the classifier's first result, the
    /// segmenter's `out` and the detector's `boxes`, `labels`, `scores` (torchvision's
    /// segmentation and detection models answer dicts).
    pub fn outputs(&self) -> Vec<HandlerOutput> {
        let output = |name, datatype, dims: &[i64]| HandlerOutput {
            name,
            datatype,
            dims: dims.to_vec(),
        };
        match self {
            Handler::ImageSegmenter => vec![output("out", DataType::F32, &[-1, -1, -1])],
            Handler::ObjectDetector { .. } => vec![
                output("boxes", DataType::F32, &[-1, 4]),
                output("labels", DataType::I64, &[-1]),
                output("scores", DataType::F32, &[-1]),
            ],
            Handler::ImageClassifier { .. } | Handler::Python { .. } => {
                vec![output("OUTPUT__0", DataType::F32, &[-1])]
            }
        }
    }

    /// Turns one request's body into the model's input (without the batch dim).
    pub fn preprocess(&self, body: &[u8]) -> Result<Tensor> {
        match self {
            Handler::ImageClassifier { .. } | Handler::ImageSegmenter => image::normalised_crop(body),
            Handler::ObjectDetector { .. } => image::to_tensor(body),
            Handler::Python { .. } => Err(Error::internal("a Python handler has no native preprocessing")),
        }
    }

    /// The response body from one request's outputs, in the order of [`Handler::outputs`]
    /// (`[classes]` scores for the classifier, `[classes, H, W]` for the segmenter, the
    /// detector's boxes, labels and scores).
    pub fn postprocess(&self, outputs: &[Tensor]) -> Result<String> {
        let first = || {
            outputs
                .first()
                .ok_or_else(|| Error::internal("the model returned no output"))
        };
        match self {
            Handler::ImageClassifier { labels } => answer::top_k(first()?, labels.as_ref()),
            Handler::ImageSegmenter => answer::segments(first()?),
            Handler::ObjectDetector { labels } => answer::detections(outputs, labels.as_ref()),
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
