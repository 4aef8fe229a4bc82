//! A response body that records Triton's `HTTP_SEND_END` on its request's trace when hyper is
//! done with it (the last byte handed to the connection), keeping the body's size hint so the
//! response keeps its Content-Length.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use oxserve_core::Trace;

struct TracedBody {
    inner: Body,
    trace: Option<Arc<Trace>>,
}

impl http_body::Body for TracedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TracedBody {
    fn drop(&mut self) {
        if let Some(trace) = self.trace.take() {
            trace.timestamp("HTTP_SEND_END");
        }
    }
}

/// `response` with a body that records `HTTP_SEND_END` on `trace` once sent.
pub(super) fn record_send_end(response: Response, trace: Arc<Trace>) -> Response {
    response.map(|inner| {
        Body::new(TracedBody {
            inner,
            trace: Some(trace),
        })
    })
}
