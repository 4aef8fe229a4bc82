//! `--header`: extra headers (an API key) on every request of the run, whatever the client.

use http::{HeaderMap, HeaderName, HeaderValue};

/// `--header` values, for every client of the run (set once, read on every request).
static EXTRA_HEADERS: std::sync::OnceLock<HeaderMap> = std::sync::OnceLock::new();

/// Sets the run's extra headers; the first call wins (one run per process).
pub(super) fn set_extra_headers(headers: &[(HeaderName, HeaderValue)]) {
    let _ = EXTRA_HEADERS.set(headers.iter().cloned().collect());
}

/// Parses `NAME: VALUE`.
pub(super) fn parse_header(s: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = s.split_once(':').ok_or("expected NAME: VALUE")?;
    Ok((
        name.trim().parse().map_err(|e| format!("{e}"))?,
        value.trim().parse().map_err(|e| format!("{e}"))?,
    ))
}

/// `request` with the extra headers added.
pub(super) fn with_extra_headers(mut request: http::request::Builder) -> http::request::Builder {
    if let (Some(extra), Some(headers)) = (EXTRA_HEADERS.get(), request.headers_mut()) {
        headers.extend(extra.clone());
    }
    request
}

/// Adds the extra headers to a tonic request's metadata (names that are not valid gRPC
/// metadata are skipped; `parse_header` already accepted only valid HTTP headers).
pub(super) fn add_extra_metadata(metadata: &mut tonic::metadata::MetadataMap) {
    let Some(extra) = EXTRA_HEADERS.get() else {
        return;
    };
    let mut headers = std::mem::take(metadata).into_headers();
    headers.extend(extra.clone());
    *metadata = tonic::metadata::MetadataMap::from_headers(headers);
}

/// A reqwest client that sends the `--header` values.
pub(super) fn http_client() -> reqwest::ClientBuilder {
    reqwest::Client::builder().default_headers(EXTRA_HEADERS.get().cloned().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_flags_parse_name_and_value() {
        let (name, value) = parse_header("Authorization:  Bearer abc ").unwrap();
        assert_eq!(name, "authorization");
        assert_eq!(value, "Bearer abc");
        assert!(parse_header("no colon").is_err());
        assert!(parse_header("bad name: x").is_err());
    }
}
