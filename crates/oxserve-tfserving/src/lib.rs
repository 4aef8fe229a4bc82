//! TensorFlow Serving's APIs over the oxserve engine, for every model (SavedModels and ONNX
//! alike): REST `/v1/models/...` ([`rest`]), gRPC `tensorflow.serving.PredictionService` and
//! `ModelService` ([`grpc`]), and the model server's own configuration files ([`config`]).

pub mod pb {
    #![allow(clippy::all, missing_docs, rustdoc::all)]
    pub mod tensorflow {
        include!(concat!(env!("OUT_DIR"), "/tensorflow.rs"));
        pub mod serving {
            include!(concat!(env!("OUT_DIR"), "/tensorflow.serving.rs"));
        }
        pub mod error {
            include!(concat!(env!("OUT_DIR"), "/tensorflow.error.rs"));
        }
    }
}

/// Encoded `FileDescriptorSet` of the TF Serving protos.
pub const DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tfserving_descriptor.bin"));

pub mod config;
pub mod describe;
pub mod error;
pub mod examples;
pub mod grpc;
pub mod json;
pub mod json_tensor;
pub mod rest;
pub mod run;
pub mod spec;
pub mod tensor_proto;
