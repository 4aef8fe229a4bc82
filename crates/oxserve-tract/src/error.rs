//! Shortening tract's error chains; the shared error helpers come from `oxserve_backend`.

pub(crate) use oxserve_backend::support::{
    file_label, internal, invalid_input, invalid_model, panic_message, truncate, unsupported,
};
use tract_onnx::prelude::TractError;

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
}
