//! What every protocol adapter shares (KServe v2 HTTP and gRPC today; TF Serving and
//! TorchServe next): the protocol-neutral [`DecodedRequest`], the decisions about a request that
//! do not depend on the wire, and the request runner [`run`].
//!
//! An adapter's part is wire bytes only:
//!
//! 1. [`ModelTarget::resolve`] the model named by the request (NOT_FOUND before anything is
//!    decoded);
//! 2. decode its wire into a [`DecodedRequest`] — inputs in the body as
//!    [`oxserve_core::TensorData`] or as a shared-memory reference, requested outputs through
//!    [`OutputRequest::from_parameters`], BYTES counted against a [`BytesBudget`], large
//!    bodies through [`decode_off_worker`];
//! 3. [`run`] it;
//! 4. encode the [`RunResponse`]: each output says whether it goes inline, binary or was
//!    written to shared memory.

mod decode;
mod request;
mod runner;

pub use decode::{
    BytesBudget, DEFAULT_MAX_BYTES_ELEMENTS, DecodeLimits, OFF_WORKER_DECODE_BYTES, data_from_wire,
    decode_off_worker,
};
pub use request::{
    BINARY_DATA, BINARY_DATA_OUTPUT, CLASSIFICATION, DecodedInput, DecodedRequest, InputData, ModelTarget,
    OutputRequest, VERSION_LABEL, input_elements, parse_classification, parse_datatype, parse_version,
    shm_and_data_error, sticky_routing_key, take_bool, version_or_label,
};
pub use runner::{PlacedOutput, Placement, RunResponse, resolve_inputs, run};
