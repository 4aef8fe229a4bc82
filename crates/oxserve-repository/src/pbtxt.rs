//! Works around a gap in prost-reflect's text-format parser (0.16): protobuf allows the colon
//! before a list of messages to be omitted (`input [ { ... } ]`), and nearly every Triton
//! config is written that way, but prost-reflect insists on `input: [ ... ]`. We insert the
//! colon and remember where, so error positions still point into the user's file.

use std::borrow::Cow;

/// Text with a `:` inserted after every field name that is directly followed by `[`, and the
/// offsets (in the returned text) of the inserted colons, ascending.
pub(crate) fn add_list_colons(text: &str) -> (Cow<'_, str>, Vec<usize>) {
    let insert_at = missing_colons(text);
    if insert_at.is_empty() {
        return (Cow::Borrowed(text), Vec::new());
    }
    let mut out = String::with_capacity(text.len() + insert_at.len());
    let mut inserted = Vec::with_capacity(insert_at.len());
    let mut last = 0;
    for at in insert_at {
        out.push_str(&text[last..at]);
        inserted.push(out.len());
        out.push(':');
        last = at;
    }
    out.push_str(&text[last..]);
    (Cow::Owned(out), inserted)
}

/// Maps an offset in the text returned by [`add_list_colons`] back to the original text.
pub(crate) fn original_offset(offset: usize, inserted: &[usize]) -> usize {
    offset - inserted.iter().take_while(|&&at| at < offset).count()
}

#[derive(Clone, Copy, PartialEq)]
enum Token {
    Ident,
    Colon,
    LeftBracket,
    Other,
}

/// Byte offsets just after each identifier that is a field name followed by `[`. An
/// identifier after `:` is a value (an enum name), never a field name, so it is left alone.
fn missing_colons(text: &str) -> Vec<usize> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let mut previous = Token::Other;
    // End offset of the last identifier, if it was a candidate field name.
    let mut pending: Option<usize> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let token = match b {
            b' ' | b'\t' | b'\r' | b'\n' => {
                i += 1;
                continue;
            }
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' | b'\'' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b {
                    // Skip the escaped byte, so `\"` does not end the string.
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                Token::Other
            }
            b'A'..=b'Z' | b'a'..=b'z' | b'_' => {
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                Token::Ident
            }
            b'0'..=b'9' | b'.' => {
                // Numbers like 1e5 or 0x1f must not be read as containing identifiers.
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b'.')
                {
                    i += 1;
                }
                Token::Other
            }
            b':' => {
                i += 1;
                Token::Colon
            }
            b'[' => {
                i += 1;
                Token::LeftBracket
            }
            _ => {
                i += 1;
                Token::Other
            }
        };
        if token == Token::LeftBracket
            && let Some(at) = pending
        {
            found.push(at);
        }
        pending = (token == Token::Ident && previous != Token::Colon).then_some(i);
        previous = token;
    }
    found
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn fixed(text: &str) -> String {
        add_list_colons(text).0.into_owned()
    }

    #[test]
    fn inserts_colon_before_message_lists_only() {
        assert_eq!(fixed("input [ { dims: [ 1 ] } ]"), "input: [ { dims: [ 1 ] } ]");
        assert_eq!(fixed("input\n  [ {} ]"), "input:\n  [ {} ]");
        assert_eq!(fixed("input # c\n[ ]"), "input: # c\n[ ]");
        // Already has a colon, or the identifier is a value.
        assert_eq!(fixed("input: [ {} ]"), "input: [ {} ]");
        assert_eq!(fixed("kind: KIND_CPU [x]"), "kind: KIND_CPU [x]");
        assert_eq!(fixed("x: [ A, B ]"), "x: [ A, B ]");
        // Nothing inside strings, comments or numbers.
        assert_eq!(
            fixed(r#"name: "a [" s: 'b\' c ['"#),
            r#"name: "a [" s: 'b\' c ['"#
        );
        assert_eq!(fixed("# input [\nname: \"m\""), "# input [\nname: \"m\"");
        assert_eq!(fixed("v: 1e5 [ ]"), "v: 1e5 [ ]");
        assert!(matches!(add_list_colons("name: \"m\"").0, Cow::Borrowed(_)));
    }

    #[test]
    fn maps_offsets_back() {
        let (text, inserted) = add_list_colons("a [ ] b [ ] c");
        assert_eq!(text, "a: [ ] b: [ ] c");
        assert_eq!(inserted, [1, 8]);
        assert_eq!(original_offset(0, &inserted), 0);
        assert_eq!(original_offset(3, &inserted), 2); // the first '['
        assert_eq!(original_offset(14, &inserted), 12); // 'c'
    }
}
