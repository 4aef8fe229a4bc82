//! The one mapping from oxserve's error kinds to gRPC status codes.

use oxserve_core::{Error, ErrorKind};
use tonic::{Code, Status};

/// The gRPC code for an error kind. Exhaustive on purpose: a new kind must be mapped here
/// before the crate compiles.
pub fn code_for(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::Unavailable => Code::Unavailable,
        // Admission control: gRPC clients treat RESOURCE_EXHAUSTED as "back off and retry".
        ErrorKind::Overloaded => Code::ResourceExhausted,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        // Triton maps its UNSUPPORTED to UNIMPLEMENTED too.
        ErrorKind::Unsupported => Code::Unimplemented,
        // gRPC's own code for a message over the size limit.
        ErrorKind::PayloadTooLarge => Code::ResourceExhausted,
        ErrorKind::Internal => Code::Internal,
    }
}

/// A status carrying the error's client-safe message.
pub fn to_status(err: &Error) -> Status {
    tracing::debug!(
        kind = err.kind().as_str(),
        message = err.message(),
        "grpc request failed"
    );
    Status::new(code_for(err.kind()), err.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_maps_to_its_code() {
        let cases = [
            (ErrorKind::InvalidArgument, Code::InvalidArgument),
            (ErrorKind::NotFound, Code::NotFound),
            (ErrorKind::Unavailable, Code::Unavailable),
            (ErrorKind::Overloaded, Code::ResourceExhausted),
            (ErrorKind::DeadlineExceeded, Code::DeadlineExceeded),
            (ErrorKind::Unauthenticated, Code::Unauthenticated),
            (ErrorKind::PermissionDenied, Code::PermissionDenied),
            (ErrorKind::Unsupported, Code::Unimplemented),
            (ErrorKind::PayloadTooLarge, Code::ResourceExhausted),
            (ErrorKind::Internal, Code::Internal),
        ];
        for (kind, code) in cases {
            assert_eq!(code_for(kind), code, "{kind:?}");
        }
    }

    #[test]
    fn status_keeps_the_message() {
        let status = to_status(&Error::not_found("unknown model 'x'"));
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "unknown model 'x'");
    }
}
