//! Where a registration's `url` points: an archive in the model store, or — when it matches
//! one of TorchServe's `allowed_urls` patterns — a `file://` path or an `http(s)://` download.
//!
//! As in TorchServe, each pattern is a regular expression matched case-insensitively against
//! the whole URL, the default allowing every file and http(s) URL; a URL that matches none is
//! refused with TorchServe's message. Downloads go to the server's private work directory
//! (never the model store), are size-limited, and follow a redirect only to a URL that is
//! itself allowed, so an allowed host cannot bounce the server to one that is not.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use oxserve_core::{Error, ErrorKind, Result};

/// TorchServe's default `allowed_urls`.
pub const DEFAULT_ALLOWED_URLS: &str = "file://.*|http(s)?://.*";

/// The largest archive downloaded.
const MAX_DOWNLOAD_BYTES: u64 = 8 << 30;
/// How long a download may take.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// The compiled `allowed_urls` patterns.
#[derive(Debug, Clone)]
pub struct AllowedUrls(Arc<Vec<regex::Regex>>);

impl Default for AllowedUrls {
    fn default() -> Self {
        AllowedUrls::new(&[DEFAULT_ALLOWED_URLS.to_string()]).unwrap_or(AllowedUrls(Arc::new(Vec::new())))
    }
}

impl AllowedUrls {
    /// Compiles Java-style patterns (whole-string, case-insensitive matches).
    pub fn new(patterns: &[String]) -> Result<AllowedUrls> {
        let compiled = patterns
            .iter()
            .map(|p| {
                regex::RegexBuilder::new(&format!("^(?:{p})$"))
                    .case_insensitive(true)
                    .build()
                    .map_err(|e| Error::invalid(format!("allowed_urls pattern '{p}' is invalid: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AllowedUrls(Arc::new(compiled)))
    }

    pub fn allows(&self, url: &str) -> bool {
        self.0.iter().any(|r| r.is_match(url))
    }
}

/// Whether `url` is a URL at all (TorchServe's `isValidURL`): a scheme, then `://`.
fn is_url(url: &str) -> bool {
    url.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    })
}

/// The archive a registration names: `Ok(None)` when `url` is not an allowed URL (it is then
/// a file name in the model store), else the local file (downloaded into `downloads`).
pub async fn resolve(allowed: &AllowedUrls, url: &str, downloads: &Path) -> Result<Option<PathBuf>> {
    if !allowed.allows(url) {
        if is_url(url) {
            return Err(Error::invalid(format!(
                "Given URL {url} does not match any allowed URL(s)"
            )));
        }
        return Ok(None);
    }
    if !is_url(url) {
        return Ok(None);
    }
    let (scheme, rest) = url.split_once("://").unwrap_or_default();
    match scheme.to_ascii_lowercase().as_str() {
        "file" => {
            let path = PathBuf::from(rest);
            if !path.is_absolute() || path.components().any(|c| c == std::path::Component::ParentDir) {
                return Err(Error::invalid(format!(
                    "Relative path is not allowed in url: {url}"
                )));
            }
            if !path.is_file() {
                return Err(Error::not_found(format!("Model not found at: {url}")));
            }
            Ok(Some(path))
        }
        "http" | "https" => download(allowed, url, downloads).await.map(Some),
        other => Err(Error::invalid(format!(
            "Given URL {url}: the scheme '{other}' is not supported (file, http, https)"
        ))),
    }
}

/// Downloads `url` into a new file in `dir`, named after the URL's last path segment.
async fn download(allowed: &AllowedUrls, url: &str, dir: &Path) -> Result<PathBuf> {
    let failed = |why: String| Error::invalid(format!("Failed to download archive from: {url}: {why}"));
    let parsed = reqwest::Url::parse(url).map_err(|e| failed(e.to_string()))?;
    let name = parsed
        .path_segments()
        .and_then(|mut s| s.next_back())
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .ok_or_else(|| failed("the URL names no file".into()))?
        .to_string();
    let redirects = allowed.clone();
    let client = reqwest::Client::builder()
        .timeout(DOWNLOAD_TIMEOUT)
        .redirect(reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 10 {
                attempt.error("too many redirects")
            } else if redirects.allows(attempt.url().as_str()) {
                attempt.follow()
            } else {
                attempt.error("a redirect to a URL that allowed_urls does not allow")
            }
        }))
        .build()
        .map_err(|e| failed(e.to_string()))?;
    let mut response = client
        .get(parsed)
        .send()
        .await
        .map_err(|e| failed(e.to_string()))?;
    if !response.status().is_success() {
        return Err(failed(format!("HTTP {}", response.status())));
    }
    if response.content_length().is_some_and(|n| n > MAX_DOWNLOAD_BYTES) {
        return Err(Error::new(
            ErrorKind::PayloadTooLarge,
            format!("the archive at {url} is larger than {MAX_DOWNLOAD_BYTES} bytes"),
        ));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::internal(format!("cannot create {}: {e}", dir.display())))?;
    let path = dir.join(&name);
    let mut file = tokio::fs::File::create(&path)
        .await
        .map_err(|e| Error::internal(format!("cannot create {}: {e}", path.display())))?;
    let mut written = 0u64;
    while let Some(chunk) = response.chunk().await.map_err(|e| failed(e.to_string()))? {
        written += chunk.len() as u64;
        if written > MAX_DOWNLOAD_BYTES {
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!("the archive at {url} is larger than {MAX_DOWNLOAD_BYTES} bytes"),
            ));
        }
        tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
            .await
            .map_err(|e| Error::internal(format!("cannot write {}: {e}", path.display())))?;
    }
    tokio::io::AsyncWriteExt::flush(&mut file)
        .await
        .map_err(|e| Error::internal(format!("cannot write {}: {e}", path.display())))?;
    Ok(path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_urls_case_insensitively() {
        let a = AllowedUrls::new(&[
            r"http://127\.0\.0\.1:\d+/allowed/.*".into(),
            "file://.*/allowed/.*".into(),
        ])
        .unwrap();
        assert!(a.allows("http://127.0.0.1:8000/allowed/m.mar"));
        assert!(a.allows("HTTP://127.0.0.1:8000/allowed/m.mar"));
        assert!(!a.allows("http://127.0.0.1:8000/denied/m.mar"));
        assert!(!a.allows("xhttp://127.0.0.1:8000/allowed/m.mar"));
        assert!(a.allows("file:///tmp/allowed/m.mar"));
        assert!(AllowedUrls::new(&["(".into()]).is_err());
        let default = AllowedUrls::default();
        assert!(default.allows("https://example.com/x.mar") && default.allows("file:///x.mar"));
        assert!(!default.allows("ftp://example.com/x.mar") && !default.allows("x.mar"));
    }

    #[tokio::test]
    async fn urls_outside_the_patterns_are_refused_and_names_go_to_the_store() {
        let a = AllowedUrls::new(&["file://.*/allowed/.*".into()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let e = resolve(&a, "http://127.0.0.1:1/x.mar", dir.path())
            .await
            .unwrap_err();
        assert_eq!(
            e.message(),
            "Given URL http://127.0.0.1:1/x.mar does not match any allowed URL(s)"
        );
        assert!(resolve(&a, "densenet.mar", dir.path()).await.unwrap().is_none());
        let allowed = dir.path().join("allowed");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::write(allowed.join("m.mar"), b"zip").unwrap();
        let url = format!("file://{}", allowed.join("m.mar").display());
        assert_eq!(
            resolve(&a, &url, dir.path()).await.unwrap(),
            Some(allowed.join("m.mar"))
        );
        let missing = format!("file://{}", allowed.join("none.mar").display());
        assert_eq!(
            resolve(&a, &missing, dir.path()).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }
}
