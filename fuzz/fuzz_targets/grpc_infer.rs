//! gRPC `ModelInfer` requests: arbitrary bytes decoded as a `ModelInferRequest` (as tonic
//! decodes the wire message), then the real service, against the example models on tract.
//! This covers the typed contents and `raw_input_contents` into tensors, shapes, datatypes,
//! parameters (shared memory included) and requested outputs.
//!
//! Byte 0 holds flags: bit 0 sends the request to `add_sub` whatever it names, so most
//! inputs reach the tensor conversion rather than stopping at an unknown model.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oxserve_fuzz::{assert_client_status, server};
use oxserve_kserve::grpc::pb::ModelInferRequest;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let [flags, message @ ..] = data else {
        return;
    };
    let Ok(mut request) = ModelInferRequest::decode(message) else {
        return;
    };
    if flags & 1 != 0 {
        request.model_name = "add_sub".into();
    }
    if let Err(status) = server().grpc_infer(request.clone()) {
        assert_client_status(&status, &request);
    }
});
