//! Where a registration's `url` points: an archive in the model store, or — when it matches
//! one of TorchServe's `allowed_urls` patterns — a `file://` path or an `http(s)://` download.
//!
//! As in TorchServe, each pattern is a regular expression matched case-insensitively against
//! the whole URL, the default allowing every file and http(s) URL; a URL that matches none is
//! refused (404, TorchServe's message) without being fetched. The archive is placed in the
//! model store under the URL's file name while its model is registered (TorchServe's layout:
//! unregistering deletes it); a name already in the store is refused before anything is
//! fetched. Downloads are size- and time-limited, written to a partial file that is renamed
//! only when complete, and follow a redirect only to a URL that is itself allowed, so an
//! allowed host cannot bounce the server to one that is not.

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
/// a file name in the model store), else the archive placed in `store` under the URL's file
/// name (which the caller deletes when the model is unregistered).
pub async fn resolve(allowed: &AllowedUrls, url: &str, store: Option<&Path>) -> Result<Option<PathBuf>> {
    if !allowed.allows(url) {
        if is_url(url) {
            return Err(Error::not_found(format!(
                "Given URL {url} does not match any allowed URL(s)"
            )));
        }
        return Ok(None);
    }
    if !is_url(url) {
        return Ok(None);
    }
    let store = store.ok_or_else(|| Error::invalid("no model store is configured (--model-store)"))?;
    let (scheme, rest) = url.split_once("://").unwrap_or_default();
    let name = rest
        .split(['?', '#'])
        .next()
        .and_then(|p| p.rsplit('/').next())
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .ok_or_else(|| Error::invalid(format!("Given URL {url} names no archive file")))?
        .to_string();
    let target = store.join(&name);
    if target.exists() {
        return Err(Error::internal(format!("Model file already exists {name}")));
    }
    let partial = store.join(format!(".{name}.partial"));
    let placed = match scheme.to_ascii_lowercase().as_str() {
        "file" => copy_file(url, rest, &partial).await,
        "http" | "https" => download(allowed, url, &partial).await,
        other => Err(Error::invalid(format!(
            "Given URL {url}: the scheme '{other}' is not supported (file, http, https)"
        ))),
    };
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    std::fs::rename(&partial, &target).map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        Error::internal(format!("cannot place {}: {e}", target.display()))
    })?;
    Ok(Some(target))
}

/// Copies a `file://` URL's file (an absolute path) to `to`.
async fn copy_file(url: &str, path: &str, to: &Path) -> Result<()> {
    let path = PathBuf::from(path);
    if !path.is_absolute() || path.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(Error::invalid(format!(
            "Relative path is not allowed in url: {url}"
        )));
    }
    if !path.is_file() {
        return Err(Error::not_found(format!("Model not found at: {url}")));
    }
    let to = to.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::copy(&path, &to))
        .await
        .map_err(|e| Error::internal(e.to_string()))?
        .map_err(|e| Error::internal(format!("cannot copy the archive: {e}")))?;
    Ok(())
}

/// Downloads `url` into the file `path`.
async fn download(allowed: &AllowedUrls, url: &str, path: &Path) -> Result<()> {
    // TorchServe's message; the cause goes to the log.
    let failed = |why: String| {
        tracing::warn!(%url, %why, "archive download failed");
        Error::invalid(format!("Failed to download archive from: {url}"))
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| failed(e.to_string()))?;
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
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|e| Error::internal(format!("cannot create {}: {e}", path.display())))?;
    let mut written = 0u64;
    while let Some(chunk) = response.chunk().await.map_err(|e| failed(e.to_string()))? {
        written += chunk.len() as u64;
        if written > MAX_DOWNLOAD_BYTES {
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
    Ok(())
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
        let store = dir.path().join("store");
        std::fs::create_dir_all(&store).unwrap();
        let e = resolve(&a, "http://127.0.0.1:1/x.mar", Some(&store))
            .await
            .unwrap_err();
        assert_eq!(
            e.message(),
            "Given URL http://127.0.0.1:1/x.mar does not match any allowed URL(s)"
        );
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(resolve(&a, "densenet.mar", Some(&store)).await.unwrap().is_none());
        let allowed = dir.path().join("allowed");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::write(allowed.join("m.mar"), b"zip").unwrap();
        let url = format!("file://{}", allowed.join("m.mar").display());
        // Copied into the store under its name; a second registration of it is refused.
        assert_eq!(
            resolve(&a, &url, Some(&store)).await.unwrap(),
            Some(store.join("m.mar"))
        );
        assert_eq!(std::fs::read(store.join("m.mar")).unwrap(), b"zip");
        let again = resolve(&a, &url, Some(&store)).await.unwrap_err();
        assert_eq!(again.message(), "Model file already exists m.mar");
        let missing = format!("file://{}", allowed.join("none.mar").display());
        assert_eq!(
            resolve(&a, &missing, Some(&store)).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
        // Nothing partial is left behind.
        let names: Vec<_> = std::fs::read_dir(&store)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("m.mar")]);
    }
}
