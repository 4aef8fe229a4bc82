//! Finding TensorFlow's C API library. First match wins:
//!
//! 1. an explicit path: `--tensorflow-library`, `[backends] tensorflow_library`, or its
//!    environment form `OXSERVE__BACKENDS__TENSORFLOW_LIBRARY` (the binary merges these);
//! 2. `OXSERVE__BACKENDS__TENSORFLOW_LIBRARY` read here as well, so it also works where the
//!    configuration layers are not used (the `tensorflow_model_server` command line);
//! 3. where `scripts/setup-tensorflow.sh` puts it:
//!    `$OXSERVE_CACHE/tensorflow/<version>/lib/` (default `~/.cache/oxserve`), newest version
//!    first.
//!
//! A path may name the library file or the directory holding it. The directory must also hold
//! `libtensorflow_framework.so.2`, which the library finds next to itself.

use std::path::{Path, PathBuf};

/// The C API library's file name in the PyPI wheels.
pub const LIBRARY_FILE: &str = "libtensorflow_cc.so.2";
/// The environment form of `[backends] tensorflow_library`.
pub const LIBRARY_ENV: &str = "OXSERVE__BACKENDS__TENSORFLOW_LIBRARY";

/// Where a library path came from, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LibrarySource {
    Configured,
    Environment,
    AutoDetected,
}

impl LibrarySource {
    pub fn describe(self) -> &'static str {
        match self {
            LibrarySource::Configured => "configured",
            LibrarySource::Environment => "from OXSERVE__BACKENDS__TENSORFLOW_LIBRARY",
            LibrarySource::AutoDetected => "found where scripts/setup-tensorflow.sh puts it",
        }
    }
}

/// A file, or `LIBRARY_FILE` inside a directory.
fn library_at(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(LIBRARY_FILE)
    } else {
        path.to_path_buf()
    }
}

/// The cache directory of the project's set-up scripts.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("OXSERVE_CACHE").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| PathBuf::from(home).join(".cache/oxserve"))
}

/// `<cache>/tensorflow/<version>/lib/libtensorflow_cc.so.2`, newest version first.
fn in_cache(cache: &Path) -> Option<PathBuf> {
    let mut versions: Vec<(Vec<u64>, PathBuf)> = std::fs::read_dir(cache.join("tensorflow"))
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let key: Vec<u64> = name.split('.').map(|p| p.parse().ok()).collect::<Option<_>>()?;
            let lib = e.path().join("lib").join(LIBRARY_FILE);
            lib.is_file().then_some((key, lib))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, lib)| lib)
}

/// Picks the library path and says where it came from.
pub fn resolve(explicit: Option<&Path>) -> Result<(PathBuf, LibrarySource), String> {
    if let Some(path) = explicit {
        return Ok((library_at(path), LibrarySource::Configured));
    }
    if let Some(path) = std::env::var_os(LIBRARY_ENV).filter(|p| !p.is_empty()) {
        return Ok((library_at(Path::new(&path)), LibrarySource::Environment));
    }
    let cache = cache_dir();
    if let Some(found) = cache.as_deref().and_then(in_cache) {
        return Ok((found, LibrarySource::AutoDetected));
    }
    Err(format!(
        "no TensorFlow library found: run scripts/setup-tensorflow.sh (it extracts {LIBRARY_FILE} \
         from the tensorflow-cpu wheel into {}), or set --tensorflow-library, [backends] \
         tensorflow_library or {LIBRARY_ENV}",
        cache
            .map(|c| c.join("tensorflow/<version>/lib").display().to_string())
            .unwrap_or_else(|| "$OXSERVE_CACHE/tensorflow/<version>/lib".into())
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_cached_version_wins() {
        let cache = tempfile::tempdir().unwrap();
        assert_eq!(in_cache(cache.path()), None);
        for v in ["2.9.0", "2.21.0", "2.20.1", "notes"] {
            let lib = cache.path().join("tensorflow").join(v).join("lib");
            std::fs::create_dir_all(&lib).unwrap();
            std::fs::write(lib.join(LIBRARY_FILE), b"").unwrap();
        }
        assert_eq!(
            in_cache(cache.path()).unwrap(),
            cache.path().join("tensorflow/2.21.0/lib").join(LIBRARY_FILE)
        );
    }

    #[test]
    fn a_directory_names_the_library_inside_it() {
        let dir = tempfile::tempdir().unwrap();
        let (path, source) = resolve(Some(dir.path())).unwrap();
        assert_eq!(path, dir.path().join(LIBRARY_FILE));
        assert_eq!(source, LibrarySource::Configured);
        let file = dir.path().join("custom.so");
        assert_eq!(resolve(Some(&file)).unwrap().0, file);
    }
}
