//! Reading request bodies within the size limit, and undoing gzip/deflate Content-Encoding.
//!
//! Memory: the server's in-flight byte budget (oxserve-server's `inflight` layer) charges
//! the body's frames as they arrive. What reading adds on top of the frames — the
//! decompressed bytes, and the one contiguous copy of a body that came in pieces without a
//! Content-Length — is charged here, through the [`BodyCharge`] the layer puts in scope for
//! the request, before the bytes are kept.

use std::future::Future;
use std::io::Read;
use std::sync::Arc;

use axum::body::Body;
use axum::http::HeaderMap;
use axum::http::header::{CONTENT_ENCODING, CONTENT_LENGTH};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use oxserve_core::{Error, ErrorKind, Result};
use tokio::task::futures::TaskLocalFuture;

/// Decompressed output is produced and charged in pieces of this size.
const INFLATE_CHUNK: usize = 256 << 10;

/// Charges memory a request's body holds against the server's in-flight budget.
pub trait BodyCharge: Send + Sync {
    /// `bytes` more decompressed body bytes are about to be kept (priced like the body's
    /// content: JSON bytes cost more than binary tensor data once decoded).
    fn charge_decoded(&self, bytes: usize) -> Result<()>;
    /// `bytes` more bytes of a plain copy are about to be kept (weight 1).
    fn charge_copy(&self, bytes: usize) -> Result<()>;
    /// One message of a stream (gRPC ModelStreamInfer) of `wire_bytes` bytes has been
    /// answered: what its frames were charged goes back to the budget while the stream goes
    /// on (otherwise a long stream would hold the sum of all its messages).
    fn release_message(&self, _wire_bytes: usize) {}
}

/// The charge in scope for the running handler, for work that outlives the handler's own
/// future (a stream's answers are produced after the handler returned its stream).
pub fn current_body_charge() -> Option<Arc<dyn BodyCharge>> {
    BODY_CHARGE.try_with(Arc::clone).ok()
}

tokio::task_local! {
    static BODY_CHARGE: Arc<dyn BodyCharge>;
}

/// Runs `future` (a request handler) with `charge` receiving what [`read_body`] adds to the
/// body's memory.
pub fn with_body_charge<F: Future>(
    charge: Arc<dyn BodyCharge>,
    future: F,
) -> TaskLocalFuture<Arc<dyn BodyCharge>, F> {
    BODY_CHARGE.scope(charge, future)
}

fn charge_decoded(bytes: usize) -> Result<()> {
    BODY_CHARGE
        .try_with(|c| c.charge_decoded(bytes))
        .unwrap_or(Ok(()))
}

fn charge_copy(bytes: usize) -> Result<()> {
    BODY_CHARGE.try_with(|c| c.charge_copy(bytes)).unwrap_or(Ok(()))
}

fn too_large(limit: usize) -> Error {
    Error::new(
        ErrorKind::PayloadTooLarge,
        format!("request body is larger than the limit of {limit} bytes"),
    )
}

/// The error that stopped reading: the budget's own (429 / 413, as the in-flight layer put it
/// in the body) when there is one in the chain, else a malformed-body 400.
fn read_error(e: &(dyn std::error::Error + 'static), limit: usize) -> Error {
    if e.downcast_ref::<LengthLimitError>().is_some() {
        return too_large(limit);
    }
    let mut source = Some(e);
    while let Some(err) = source {
        if let Some(found) = err.downcast_ref::<Error>() {
            return found.clone();
        }
        source = err.source();
    }
    Error::invalid(format!("cannot read request body: {e}"))
}

/// Reads and drops what the client still sends of a request that is answered without its
/// body (an unknown model): a client that is still writing when the connection closes under
/// it (over TLS in particular) sees a broken connection instead of the answer. At most
/// `limit` bytes are read (a larger declared body is not waited for: the answer goes at once
/// and the connection closes); each frame is dropped as it arrives.
pub async fn drain_body(headers: &HeaderMap, body: Body, limit: usize) {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return;
    }
    let mut body = Limited::new(body, limit);
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            return;
        }
    }
}

/// Reads the whole body, refusing more than `limit` bytes before or after decompression.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large(limit));
    }
    let raw = collect(Limited::new(body, limit), declared, limit).await?;
    match headers.get(CONTENT_ENCODING).map(|v| v.to_str().map(str::trim)) {
        None => Ok(raw),
        Some(Ok(enc)) if enc.is_empty() || enc.eq_ignore_ascii_case("identity") => Ok(raw),
        Some(Ok(enc)) if enc.eq_ignore_ascii_case("gzip") => {
            inflate(flate2::read::GzDecoder::new(raw.as_ref()), "gzip", limit)
        }
        Some(Ok(enc)) if enc.eq_ignore_ascii_case("deflate") => {
            inflate(flate2::read::ZlibDecoder::new(raw.as_ref()), "deflate", limit)
        }
        Some(Ok(enc)) => Err(Error::invalid(format!(
            "unsupported Content-Encoding '{enc}' (supported: gzip, deflate)"
        ))),
        Some(Err(_)) => Err(Error::invalid("Content-Encoding header is not valid text")),
    }
}

/// The body as one buffer. With a Content-Length the buffer is allocated once at that size
/// and each frame is freed as soon as it is copied in, so memory stays at one body; without
/// one, the frames are kept and joined at the end, and the joined copy is charged.
async fn collect(mut body: Limited<Body>, declared: Option<u64>, limit: usize) -> Result<Bytes> {
    let mut frames: Vec<Bytes> = Vec::new();
    let mut contiguous = declared.map(|len| BytesMut::with_capacity(len as usize));
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| read_error(e.as_ref(), limit))?;
        let Ok(data) = frame.into_data() else { continue };
        total += data.len();
        match &mut contiguous {
            // A body longer than it said is refused by the HTTP layer before it gets here.
            Some(buf) => buf.extend_from_slice(&data),
            None => frames.push(data),
        }
    }
    if let Some(buf) = contiguous {
        return Ok(buf.freeze());
    }
    if frames.len() <= 1 {
        return Ok(frames.pop().unwrap_or_default());
    }
    charge_copy(total)?;
    let mut joined = BytesMut::with_capacity(total);
    for frame in frames {
        joined.extend_from_slice(&frame);
    }
    Ok(joined.freeze())
}

/// Decompresses in pieces, charging each before it is kept and stopping one byte past the
/// limit, so a small bomb can exhaust neither the budget nor memory. The pieces are joined
/// into one buffer at the end (that copy is charged too).
fn inflate(decoder: impl Read, name: &str, limit: usize) -> Result<Bytes> {
    let mut decoder = decoder.take(limit as u64 + 1);
    let mut pieces: Vec<Vec<u8>> = Vec::new();
    let mut total = 0usize;
    loop {
        let mut piece = Vec::with_capacity(INFLATE_CHUNK);
        let n = (&mut decoder)
            .take(INFLATE_CHUNK as u64)
            .read_to_end(&mut piece)
            .map_err(|e| Error::invalid(format!("request body is not valid {name} data: {e}")))?;
        if n == 0 {
            break;
        }
        total += n;
        if total > limit {
            return Err(too_large(limit));
        }
        charge_decoded(n)?;
        pieces.push(piece);
    }
    if pieces.len() == 1 {
        return Ok(Bytes::from(pieces.pop().unwrap_or_default()));
    }
    charge_copy(total)?;
    let mut out = Vec::with_capacity(total);
    for piece in pieces {
        out.extend_from_slice(&piece);
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use flate2::Compression;
    use std::io::Write;

    fn headers(encoding: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(e) = encoding {
            h.insert(CONTENT_ENCODING, HeaderValue::from_str(e).unwrap());
        }
        h
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[tokio::test]
    async fn plain_gzip_and_deflate_bodies() {
        let b = read_body(&headers(None), Body::from("abc"), 10).await.unwrap();
        assert_eq!(b.as_ref(), b"abc");
        let b = read_body(&headers(Some("gzip")), Body::from(gzip(b"hello")), 100)
            .await
            .unwrap();
        assert_eq!(b.as_ref(), b"hello");
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), Compression::fast());
        z.write_all(b"hi").unwrap();
        let b = read_body(&headers(Some("deflate")), Body::from(z.finish().unwrap()), 100)
            .await
            .unwrap();
        assert_eq!(b.as_ref(), b"hi");
    }

    #[tokio::test]
    async fn limits_and_bad_encodings() {
        let e = read_body(&headers(None), Body::from(vec![0u8; 11]), 10)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PayloadTooLarge);
        let bomb = gzip(&vec![0u8; 1 << 20]);
        let e = read_body(&headers(Some("gzip")), Body::from(bomb), 4096)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PayloadTooLarge);
        let e = read_body(&headers(Some("br")), Body::from("x"), 10)
            .await
            .unwrap_err();
        assert!(e.message().contains("unsupported Content-Encoding 'br'"));
        let e = read_body(&headers(Some("gzip")), Body::from("not gzip"), 100)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }
}
