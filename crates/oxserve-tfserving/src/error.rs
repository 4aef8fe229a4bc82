//! TF Serving's error statuses and the `{ "error": "..." }` body.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use oxserve_core::{Error, ErrorKind};

/// TF Serving's REST statuses (its `ToHTTPStatusCode`) and gRPC codes are the ones KServe's
/// adapter maps oxserve's error kinds to, so both come from there: one mapping, not two copies.
pub use oxserve_kserve::http::http_status;

pub fn grpc_status(e: &Error) -> tonic::Status {
    tonic::Status::new(oxserve_kserve::grpc::status::code_for(e.kind()), e.message())
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
