//! Reading request bodies within the size limit, and undoing gzip/deflate Content-Encoding.

use std::io::Read;

use axum::body::Body;
use axum::http::HeaderMap;
use axum::http::header::{CONTENT_ENCODING, CONTENT_LENGTH};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use oxserve_core::{Error, ErrorKind, Result};

fn too_large(limit: usize) -> Error {
    Error::new(
        ErrorKind::PayloadTooLarge,
        format!("request body is larger than the limit of {limit} bytes"),
    )
}

/// Reads the whole body, refusing more than `limit` bytes before or after decompression.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large(limit));
    }
    let collected = Limited::new(body, limit).collect().await.map_err(|e| {
        if e.downcast_ref::<LengthLimitError>().is_some() {
            too_large(limit)
        } else {
            Error::invalid(format!("cannot read request body: {e}"))
        }
    })?;
    let raw = collected.to_bytes();
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

/// Decompresses, stopping one byte past the limit so a small bomb cannot exhaust memory.
fn inflate(decoder: impl Read, name: &str, limit: usize) -> Result<Bytes> {
    let mut out = Vec::new();
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::invalid(format!("request body is not valid {name} data: {e}")))?;
    if out.len() > limit {
        return Err(too_large(limit));
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
