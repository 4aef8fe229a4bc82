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
        ErrorKind::Conflict => Code::AlreadyExists,
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

/// tonic answers a request message over the size limit with OUT_OF_RANGE, before any handler
/// runs (a trailers-only answer). gRPC's own implementations, and Triton, say
/// RESOURCE_EXHAUSTED, which is what clients look for; oxserve's mapping above never produces
/// OUT_OF_RANGE, so the code is rewritten wherever it appears in a response's headers.
pub fn size_limit_as_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    // OUT_OF_RANGE is 11 and RESOURCE_EXHAUSTED 8 (checked by the test below); compared as
    // bytes so that the common answer, without the header, costs no allocation.
    if response
        .headers()
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"11")
    {
        response
            .headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_limit_answers_become_resource_exhausted() {
        let answer = |code: Code| {
            let r = http::Response::builder()
                .header("grpc-status", code as i32)
                .header("grpc-message", "x")
                .body(())
                .unwrap();
            size_limit_as_resource_exhausted(r).headers()["grpc-status"].clone()
        };
        assert_eq!(Code::OutOfRange as i32, 11);
        assert_eq!(Code::ResourceExhausted as i32, 8);
        assert_eq!(answer(Code::OutOfRange), "8");
        assert_eq!(answer(Code::InvalidArgument), "3");
        assert_eq!(answer(Code::Ok), "0");
        let plain = size_limit_as_resource_exhausted(http::Response::new(()));
        assert!(plain.headers().get("grpc-status").is_none());
    }

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
