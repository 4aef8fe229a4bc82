use std::collections::BTreeMap;

use crate::Tensor;

/// A request or response parameter value (KServe v2 allows bool, number and string; Triton adds
/// double and uint64 over gRPC).
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Double(f64),
    String(String),
}

impl ParamValue {
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            ParamValue::Int(v) => Some(v),
            ParamValue::Uint(v) => i64::try_from(v).ok(),
            ParamValue::Double(v) if v.fract() == 0.0 && v.abs() < 9.0e15 => Some(v as i64),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            ParamValue::Bool(v) => Some(v),
            _ => None,
        }
    }
}

pub type Parameters = BTreeMap<String, ParamValue>;

/// An output the client asked for, with the protocol-independent options that change it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedOutput {
    pub name: String,
    /// Triton classification extension: return the top N classes instead of the tensor.
    pub classification: Option<usize>,
}

impl RequestedOutput {
    pub fn new(name: impl Into<String>) -> Self {
        RequestedOutput {
            name: name.into(),
            classification: None,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct InferRequest {
    pub model_name: String,
    /// `None` picks the latest ready version.
    pub model_version: Option<u64>,
    pub id: Option<String>,
    pub parameters: Parameters,
    pub inputs: Vec<Tensor>,
    /// Empty means every output of the model.
    pub outputs: Vec<RequestedOutput>,
    /// The value of the model's sticky header, when its traffic split has one: requests with
    /// the same value go to the same version.
    pub routing_key: Option<String>,
    /// The model's entry point to run (a SavedModel signature); `None` = the default one.
    pub signature: Option<String>,
    /// The request's trace, when the trace settings sampled it.
    pub trace: Option<std::sync::Arc<crate::Trace>>,
}

#[derive(Debug, Clone)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: u64,
    pub id: Option<String>,
    pub parameters: Parameters,
    pub outputs: Vec<Tensor>,
}
