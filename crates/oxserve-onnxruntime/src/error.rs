//! Shortening ONNX Runtime's messages; the shared error helpers come from `oxserve_backend`.

use std::path::Path;

pub(crate) use oxserve_backend::support::{
    file_label, internal, invalid_input, invalid_model, panic_message, truncate, unsupported,
};

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
