//! Small helpers to build [`BackendError`]s and to shorten ONNX Runtime's messages.

use std::path::Path;

use oxserve_backend::{BackendError, BackendErrorKind};

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

/// Most characters kept of one ONNX Runtime message.
const MAX_MESSAGE_CHARS: usize = 400;

/// One line of an ONNX Runtime error: its messages name the full model path (which the
/// repository index would show to clients) and sometimes run over several lines.
pub(crate) fn summarize(message: &str, model_path: Option<&Path>) -> String {
    let mut text = message.to_string();
    if let Some(path) = model_path {
        let full = path.display().to_string();
        if !full.is_empty() {
            text = text.replace(&full, &file_label(path));
        }
    }
    let joined: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    truncate(&joined.join(" "), MAX_MESSAGE_CHARS)
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
mod tests {
    use super::*;

    #[test]
    fn summary_hides_the_directory_and_joins_lines() {
        let path = Path::new("/srv/models/m/1/model.onnx");
        let s = summarize(
            "Load model from /srv/models/m/1/model.onnx failed:\n  Protobuf parsing failed.\n",
            Some(path),
        );
        assert_eq!(s, "Load model from model.onnx failed: Protobuf parsing failed.");
        assert!(!s.contains("/srv"));
    }

    #[test]
    fn long_messages_are_cut() {
        let s = summarize(&"x".repeat(1000), None);
        assert_eq!(s.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(s.ends_with('…'));
        assert_eq!(truncate("héllo", 2), "hé…");
    }
}
