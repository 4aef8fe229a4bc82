//! Small helpers to build [`BackendError`]s and to shorten tract's error chains.

use std::path::Path;

use oxserve_backend::{BackendError, BackendErrorKind};
use tract_onnx::prelude::TractError;

pub(crate) fn invalid_model(message: impl Into<String>) -> BackendError {
    BackendError::new(BackendErrorKind::InvalidModel, message)
}

pub(crate) fn unsupported(message: impl Into<String>) -> BackendError {
    BackendError::new(BackendErrorKind::Unsupported, message)
}

pub(crate) fn invalid_input(message: impl Into<String>) -> BackendError {
    BackendError::new(BackendErrorKind::InvalidInput, message)
}

pub(crate) fn internal(message: impl Into<String>) -> BackendError {
    BackendError::new(BackendErrorKind::Internal, message)
}

/// The file name of a model path, for messages: the full path of a repository version
/// directory says little and may leak the server's layout to clients.
pub(crate) fn file_label(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Most causes a summary keeps, and the most characters it keeps of each.
const MAX_CAUSES: usize = 4;
const MAX_CAUSE_CHARS: usize = 200;

/// Condenses a tract error chain into one line.
///
/// tract wraps errors in many layers of context ("Failed analyse for node #3 ...",
/// "Translating node ...") and some layers embed whole `Debug` dumps of nodes, facts or run
/// state. The outermost layers say *where* it failed and the innermost (root) cause says *why*,
/// so keep the first line of the first few causes plus the root cause, each cut to a sane
/// length, and drop repeats.
pub(crate) fn summarize(err: &TractError) -> String {
    let causes: Vec<String> = err.chain().map(|c| first_line(&c.to_string())).collect();
    let mut kept: Vec<&str> = Vec::new();
    for cause in causes.iter().take(MAX_CAUSES) {
        push_unique(&mut kept, cause);
    }
    if let Some(root) = causes.last() {
        push_unique(&mut kept, root);
    }
    if kept.is_empty() {
        return "unknown tract error".to_string();
    }
    kept.join(": ")
}

fn push_unique<'a>(kept: &mut Vec<&'a str>, cause: &'a str) {
    if !cause.is_empty() && !kept.contains(&cause) {
        kept.push(cause);
    }
}

fn first_line(s: &str) -> String {
    let line = s.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
    truncate(line, MAX_CAUSE_CHARS)
}

/// Cuts `s` to at most `max` characters, marking the cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

/// The message of a caught panic, when it has one.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tract_onnx::prelude::TractResult;
    use tract_onnx::prelude::tract_data::internal::anyhow;

    #[test]
    fn summary_keeps_outer_context_and_root_cause() {
        let root: TractResult<()> = Err(anyhow!("Unimplemented(NoSuchOp)\nlots of debug"));
        let err = root
            .map_err(|e| e.context("layer 4"))
            .map_err(|e| e.context("layer 3"))
            .map_err(|e| e.context("layer 2"))
            .map_err(|e| e.context("Failed analyse for node #2 \"n\""))
            .map_err(|e| e.context("Failed analyse for node #2 \"n\""))
            .err()
            .map(|e| summarize(&e));
        assert_eq!(
            err.as_deref(),
            Some("Failed analyse for node #2 \"n\": layer 2: layer 3: Unimplemented(NoSuchOp)")
        );
    }

    #[test]
    fn long_causes_are_cut() {
        let long = "x".repeat(1000);
        let err = anyhow!(long);
        let s = summarize(&err);
        assert_eq!(s.chars().count(), MAX_CAUSE_CHARS + 1);
        assert!(s.ends_with('…'));
        assert_eq!(truncate("héllo", 2), "hé…");
        assert_eq!(truncate("hé", 2), "hé");
    }

    #[test]
    fn file_label_is_the_file_name() {
        assert_eq!(file_label(Path::new("/repo/m/1/model.onnx")), "model.onnx");
    }
}
