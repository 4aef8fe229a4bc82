//! TF Serving's error statuses: the one mapping from oxserve's error kinds to the HTTP status
//! TF Serving's REST server answers (its `ToHTTPStatusCode`) and to the gRPC code, and the
//! `{ "error": "..." }` body.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use oxserve_core::{Error, ErrorKind};

pub fn http_status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Overloaded => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorKind::Unsupported => StatusCode::NOT_IMPLEMENTED,
        // TF Serving has no such status of its own; the HTTP one says it best.
        ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

pub fn grpc_status(e: &Error) -> tonic::Status {
    let code = match e.kind() {
        ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorKind::NotFound => tonic::Code::NotFound,
        ErrorKind::Unavailable => tonic::Code::Unavailable,
        ErrorKind::Overloaded | ErrorKind::PayloadTooLarge => tonic::Code::ResourceExhausted,
        ErrorKind::Conflict => tonic::Code::AlreadyExists,
        ErrorKind::DeadlineExceeded => tonic::Code::DeadlineExceeded,
        ErrorKind::Unauthenticated => tonic::Code::Unauthenticated,
        ErrorKind::PermissionDenied => tonic::Code::PermissionDenied,
        ErrorKind::Unsupported => tonic::Code::Unimplemented,
        ErrorKind::Internal => tonic::Code::Internal,
    };
    tonic::Status::new(code, e.message())
}

/// An error on its way to a REST client, in TF Serving's shape.
#[derive(Debug)]
pub struct RestError(pub Error);

impl From<Error> for RestError {
    fn from(e: Error) -> Self {
        RestError(e)
    }
}

impl IntoResponse for RestError {
    fn into_response(self) -> Response {
        let status = http_status(self.0.kind());
        if status.is_server_error() {
            tracing::warn!(kind = self.0.kind().as_str(), error = %self.0, "request failed");
        } else {
            tracing::debug!(kind = self.0.kind().as_str(), error = %self.0, "request rejected");
        }
        let body = serde_json::json!({ "error": self.0.message() }).to_string();
        let mut response = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if self.0.kind() == ErrorKind::Overloaded {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
