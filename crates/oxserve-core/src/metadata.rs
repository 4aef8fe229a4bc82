use crate::DataType;

/// Name, type and shape of one model input or output as a client sees it; `-1` marks a
/// variable dimension (including the batch dimension of batchable models).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
}

/// What the model metadata endpoints return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: String,
    pub inputs: Vec<TensorMeta>,
    pub outputs: Vec<TensorMeta>,
    /// Every entry point of a model that has several (SavedModel signatures), the default one
    /// included; empty for models with one (their inputs and outputs are the only one).
    pub signatures: Vec<SignatureMetadata>,
}

/// One named entry point of a model (a SavedModel signature), for TF Serving's metadata and
/// for requests that pick one (`signature_name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureMetadata {
    pub name: String,
    /// TensorFlow's method name: `tensorflow/serving/predict`, `.../classify`, `.../regress`.
    pub method_name: String,
    /// By key, sorted; shapes are the model's (with the batch dimension where it has one).
    pub inputs: Vec<SignatureTensor>,
    pub outputs: Vec<SignatureTensor>,
    pub is_default: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureTensor {
    /// The key, its type and shape.
    pub meta: TensorMeta,
    /// The engine's own tensor name (`serving_default_x:0`).
    pub tensor_name: String,
}
