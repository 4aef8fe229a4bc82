//! Finding and loading the ONNX Runtime shared library.
//!
//! The library is not linked: it is opened at run time (`ort`'s `load-dynamic`), so oxserve
//! builds and runs without it and only models served by ONNX Runtime need it. Where it comes
//! from, first match wins:
//!
//! 1. an explicit path (`--onnxruntime-library`, `[backends] onnxruntime_library`);
//! 2. the `ORT_DYLIB_PATH` environment variable (`ort`'s own convention);
//! 3. auto-detection: the `onnxruntime` package of a Python virtual environment, as the
//!    project's `scripts/setup-python.sh` installs it: `$VIRTUAL_ENV`, then `.venv` in the
//!    current directory or any parent, then `.venv` next to the executable or any parent.
//!    Inside it, `lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so*` (the PyPI
//!    wheels ship `libonnxruntime.so.<version>` with no unversioned link).
//!
//! ONNX Runtime allows one library and one environment per process, so the loaded runtime is
//! process-global: asking for a second, different library is an error, not a silent swap.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ort::environment::Environment;
use ort::ep::ExecutionProvider;
use ort::logging::LogLevel;

/// Where the library path came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LibrarySource {
    /// `--onnxruntime-library` or `[backends] onnxruntime_library`.
    Configured,
    /// `ORT_DYLIB_PATH`.
    Environment,
    /// Found in a Python virtual environment.
    AutoDetected,
}

impl LibrarySource {
    fn describe(&self) -> &'static str {
        match self {
            LibrarySource::Configured => "configured",
            LibrarySource::Environment => "from ORT_DYLIB_PATH",
            LibrarySource::AutoDetected => "auto-detected",
        }
    }
}

/// The environment variable `ort` reads for the library path.
pub const DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// Picks the library path: explicit, then `ORT_DYLIB_PATH`, then auto-detection.
pub fn resolve_library(explicit: Option<&Path>) -> Result<(PathBuf, LibrarySource), String> {
    if let Some(path) = explicit {
        return Ok((path.to_path_buf(), LibrarySource::Configured));
    }
    if let Some(path) = std::env::var_os(DYLIB_ENV).filter(|p| !p.is_empty()) {
        return Ok((PathBuf::from(path), LibrarySource::Environment));
    }
    let venvs = candidate_venvs();
    if let Some(found) = venvs.iter().find_map(|v| library_in_venv(v)) {
        return Ok((found, LibrarySource::AutoDetected));
    }
    let looked: Vec<String> = venvs.iter().map(|v| v.display().to_string()).collect();
    Err(format!(
        "no ONNX Runtime library found: set --onnxruntime-library, [backends] onnxruntime_library \
         or {DYLIB_ENV} to a libonnxruntime.so (the PyPI 'onnxruntime' wheel has one), or run \
         scripts/setup-python.sh (looked for the onnxruntime package in: {})",
        if looked.is_empty() {
            "no virtual environment".to_string()
        } else {
            looked.join(", ")
        }
    ))
}

/// Virtual environments to search, most specific first, without repeats.
fn candidate_venvs() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let mut push = |p: PathBuf| {
        if !out.contains(&p) {
            out.push(p);
        }
    };
    if let Some(v) = std::env::var_os("VIRTUAL_ENV").filter(|v| !v.is_empty()) {
        push(PathBuf::from(v));
    }
    if let Ok(cwd) = std::env::current_dir() {
        for dir in cwd.ancestors() {
            push(dir.join(".venv"));
        }
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(parent) = exe.parent()
    {
        for dir in parent.ancestors() {
            push(dir.join(".venv"));
        }
    }
    out.retain(|p| p.is_dir());
    out
}

/// `<venv>/lib/python*/site-packages/onnxruntime/capi/libonnxruntime.so*`, the highest
/// version when there are several.
pub(crate) fn library_in_venv(venv: &Path) -> Option<PathBuf> {
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    let mut found: Vec<PathBuf> = Vec::new();
    for python in lib.flatten() {
        if !python.file_name().to_string_lossy().starts_with("python") {
            continue;
        }
        let capi = python.path().join("site-packages/onnxruntime/capi");
        let Ok(entries) = std::fs::read_dir(&capi) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_library_name(&name) && entry.path().is_file() {
                found.push(entry.path());
            }
        }
    }
    found.sort_by_key(|a| version_key(a));
    found.pop()
}

/// `libonnxruntime.so` or `libonnxruntime.so.<numbers>`; not the providers' libraries.
fn is_library_name(name: &str) -> bool {
    match name.strip_prefix("libonnxruntime.so") {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix('.')
            .is_some_and(|v| !v.is_empty() && v.split('.').all(|p| p.parse::<u32>().is_ok())),
        None => false,
    }
}

/// The numeric version suffix of a library file name, for ordering (`.so` alone sorts last,
/// as it is normally a link to the newest).
fn version_key(path: &Path) -> Vec<u32> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.strip_prefix("libonnxruntime.so.") {
        Some(v) => v.split('.').filter_map(|p| p.parse().ok()).collect(),
        None => vec![u32::MAX],
    }
}

/// A loaded ONNX Runtime: the library and the process's environment.
pub(crate) struct Runtime {
    pub env: Environment,
    pub library: PathBuf,
    pub source: LibrarySource,
    pub version: String,
    /// Whether the library has the CUDA execution provider (the `onnxruntime-gpu` build).
    pub cuda: bool,
}

impl Runtime {
    pub fn describe(&self) -> String {
        format!(
            "ONNX Runtime {} from {} ({})",
            self.version,
            self.library.display(),
            self.source.describe()
        )
    }
}

static LOADED: Mutex<Option<Arc<Runtime>>> = Mutex::new(None);

/// Loads the library at `path` and creates the process's ONNX Runtime environment, or returns
/// the runtime loaded before from the same file.
pub(crate) fn load(path: &Path, source: LibrarySource) -> Result<Arc<Runtime>, String> {
    if !path.exists() {
        return Err(format!(
            "ONNX Runtime library {} ({}) does not exist",
            path.display(),
            source.describe()
        ));
    }
    let canonical = path.canonicalize().map_err(|e| {
        format!(
            "ONNX Runtime library {} ({}): {e}",
            path.display(),
            source.describe()
        )
    })?;
    let mut slot = LOADED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(runtime) = slot.as_ref() {
        if runtime.library == canonical {
            return Ok(Arc::clone(runtime));
        }
        return Err(format!(
            "ONNX Runtime is already loaded from {} in this process; it cannot also load {}",
            runtime.library.display(),
            canonical.display()
        ));
    }
    let builder = ort::init_from(&canonical).map_err(|e| {
        format!(
            "cannot load the ONNX Runtime library {} ({}): {e}",
            canonical.display(),
            source.describe()
        )
    })?;
    let env = builder
        .with_name("oxserve")
        .with_telemetry(false)
        .with_logger(Arc::new(forward_log))
        .build()
        .map_err(|e| format!("cannot create the ONNX Runtime environment: {e}"))?;
    // The custom logger registers at verbose level; only warnings and errors are worth a line.
    env.set_log_level(LogLevel::Warning);
    let runtime = Arc::new(Runtime {
        env,
        version: version_of(&canonical),
        cuda: ort::ep::CUDA::is_available().unwrap_or(false),
        library: canonical,
        source,
    });
    *slot = Some(Arc::clone(&runtime));
    Ok(runtime)
}

/// The library's version: from its build information ("git-branch=rel-1.32.0"), else from
/// its file name ("libonnxruntime.so.1.32.0").
fn version_of(library: &Path) -> String {
    let info = ort::info();
    let from_branch = info
        .split([',', ' '])
        .find_map(|part| part.trim().strip_prefix("git-branch=rel-"))
        .map(str::to_string);
    from_branch.unwrap_or_else(|| {
        let v = version_key(library);
        if v.first() == Some(&u32::MAX) || v.is_empty() {
            "(unknown version)".to_string()
        } else {
            v.iter().map(u32::to_string).collect::<Vec<_>>().join(".")
        }
    })
}

/// ONNX Runtime's own log lines, into `tracing` (never onto stdout, which belongs to the
/// server's machine-readable listening line).
fn forward_log(level: LogLevel, category: &str, id: &str, location: &str, message: &str) {
    match level {
        LogLevel::Fatal | LogLevel::Error => {
            tracing::error!(target: "onnxruntime", category, id, location, "{message}");
        }
        LogLevel::Warning => tracing::warn!(target: "onnxruntime", category, id, location, "{message}"),
        LogLevel::Info => tracing::debug!(target: "onnxruntime", category, id, location, "{message}"),
        LogLevel::Verbose => tracing::trace!(target: "onnxruntime", category, id, location, "{message}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn library_names() {
        assert!(is_library_name("libonnxruntime.so"));
        assert!(is_library_name("libonnxruntime.so.1.32.0"));
        assert!(!is_library_name("libonnxruntime_providers_shared.so"));
        assert!(!is_library_name("libonnxruntime.so.1.32.0.bak"));
        assert!(!is_library_name("libonnxruntime.so."));
    }

    #[test]
    fn finds_the_newest_library_in_a_venv() {
        let venv = tempfile::tempdir().unwrap();
        assert_eq!(library_in_venv(venv.path()), None);
        let capi = venv.path().join("lib/python3.11/site-packages/onnxruntime/capi");
        std::fs::create_dir_all(&capi).unwrap();
        for name in [
            "libonnxruntime.so.1.9.0",
            "libonnxruntime.so.1.32.0",
            "libonnxruntime_providers_shared.so",
        ] {
            std::fs::write(capi.join(name), b"").unwrap();
        }
        assert_eq!(
            library_in_venv(venv.path()),
            Some(capi.join("libonnxruntime.so.1.32.0"))
        );
    }

    #[test]
    fn explicit_path_wins_and_missing_files_are_clear_errors() {
        let (path, source) = resolve_library(Some(Path::new("/x/libonnxruntime.so"))).unwrap();
        assert_eq!(path, Path::new("/x/libonnxruntime.so"));
        assert_eq!(source, LibrarySource::Configured);
        let err = load(Path::new("/no/such/libonnxruntime.so"), LibrarySource::Configured)
            .err()
            .unwrap();
        assert!(
            err.contains("/no/such/libonnxruntime.so") && err.contains("does not exist"),
            "{err}"
        );
    }

    #[test]
    fn a_file_that_is_not_a_library_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("libonnxruntime.so.1.0.0");
        std::fs::write(&fake, b"not a shared object").unwrap();
        let err = load(&fake, LibrarySource::Configured).err().unwrap();
        assert!(err.contains("cannot load the ONNX Runtime library"), "{err}");
        assert!(err.contains("libonnxruntime.so.1.0.0"), "{err}");
    }
}
