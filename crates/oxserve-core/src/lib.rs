//! Protocol- and engine-independent domain types: data types, tensors, inference requests and
//! responses, model metadata and the closed error set every front-end maps exactly once.

mod dtype;
mod error;
mod metadata;
mod request;
mod tensor;
mod trace;

pub use dtype::DataType;
pub use error::{Error, ErrorKind, Result};
pub use metadata::{ModelMetadata, SignatureMetadata, SignatureTensor, TensorMeta};
pub use request::{InferRequest, InferResponse, ParamValue, Parameters, RequestedOutput};
pub use tensor::{Tensor, TensorData, check_bools, element_count};
pub use trace::{Trace, TraceEvent, TraceRecord, TraceSink, unix_nanos};
