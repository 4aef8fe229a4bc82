//! The one mapping from oxserve's error kinds to HTTP statuses, and the `{"error": "..."}` body
//! every failure carries.

use axum::Json;
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
        ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error on its way to an HTTP client.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

#[derive(serde::Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = http_status(self.0.kind());
        if status.is_server_error() {
            tracing::warn!(kind = self.0.kind().as_str(), error = %self.0, "request failed");
        } else {
            tracing::debug!(kind = self.0.kind().as_str(), error = %self.0, "request rejected");
        }
        let mut response = (
            status,
            Json(ErrorBody {
                error: self.0.message(),
            }),
        )
            .into_response();
        if self.0.kind() == ErrorKind::Overloaded {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_the_documented_status() {
        let expected = [
            (ErrorKind::InvalidArgument, 400),
            (ErrorKind::NotFound, 404),
            (ErrorKind::Unavailable, 503),
            (ErrorKind::Overloaded, 429),
            (ErrorKind::DeadlineExceeded, 504),
            (ErrorKind::Unauthenticated, 401),
            (ErrorKind::PermissionDenied, 403),
            (ErrorKind::Unsupported, 501),
            (ErrorKind::PayloadTooLarge, 413),
            (ErrorKind::Internal, 500),
        ];
        for (kind, status) in expected {
            assert_eq!(http_status(kind).as_u16(), status, "{kind:?}");
        }
    }

    #[test]
    fn overloaded_carries_retry_after() {
        let r = ApiError(Error::new(ErrorKind::Overloaded, "busy")).into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers().get(header::RETRY_AFTER).unwrap(), "1");
    }
}
