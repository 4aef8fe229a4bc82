//! Property tests of `config.pbtxt` parsing and validation: arbitrary text, and a real config
//! mutated byte by byte and token by token. Parsing answers a config or an error (with a
//! position inside the text), never a panic; a config that parses renders to Triton's JSON
//! and parses back. The coverage-guided counterpart is `fuzz/` (docs/fuzzing.md).

use oxserve_repository::{ConfigError, config_from_json, config_to_json, parse_config_text, validate_config};
use proptest::prelude::*;

const ADD_SUB: &str = include_str!("../../../examples/models/add_sub/config.pbtxt");

/// Tokens of the text format and of Triton's schema, for edits that keep the text
/// almost-valid so the parser gets past its first line.
const TOKENS: &[&str] = &[
    "[",
    "]",
    "{",
    "}",
    ":",
    ",",
    "\"",
    "#",
    "\n",
    "-1",
    "0",
    "18446744073709551616",
    "1e400",
    "nan",
    "TYPE_FP32",
    "TYPE_STRING",
    "TYPE_BOOL",
    "TYPE_INVALID",
    "dims",
    "reshape",
    "input",
    "output",
    "max_batch_size",
    "instance_group",
    "KIND_CPU",
    "KIND_GPU",
    "count",
    "dynamic_batching",
    "version_policy",
    "specific",
    "versions",
    "parameters",
    "key",
    "value",
    "string_value",
    "\\x",
    "\u{fffd}",
    "é",
    "\0",
];

fn check(text: &str) -> Result<(), TestCaseError> {
    match parse_config_text(text) {
        Ok(config) => {
            let _ = validate_config(&config);
            let json = config_to_json(&config);
            prop_assert!(
                config_from_json(&json).is_ok(),
                "rendered JSON does not parse back: {json}"
            );
        }
        Err(ConfigError::Parse {
            position: Some((line, column)),
            ..
        }) => {
            let lines = text.split('\n').count();
            prop_assert!(
                line >= 1 && line <= lines && column >= 1,
                "position {line}:{column}"
            );
        }
        Err(_) => {}
    }
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_text(text in ".{0,300}") {
        check(&text)?;
    }

    #[test]
    fn byte_edits_of_a_real_config(edits in prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..8)) {
        let mut bytes = ADD_SUB.as_bytes().to_vec();
        for (at, byte, op) in edits {
            let n = bytes.len();
            match op {
                0 if n > 0 => bytes[at % n] = byte,
                1 => bytes.insert(at % (n + 1), byte),
                _ if n > 0 => { bytes.remove(at % n); }
                _ => {}
            }
        }
        check(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn token_edits_of_a_real_config(edits in prop::collection::vec((any::<usize>(), prop::sample::select(TOKENS), any::<bool>()), 1..8)) {
        let mut text = ADD_SUB.to_string();
        for (at, token, replace_word) in edits {
            let mut at = at % (text.len() + 1);
            while !text.is_char_boundary(at) { at -= 1; }
            if replace_word {
                let end = text[at..].find(|c: char| c.is_whitespace()).map_or(text.len(), |i| at + i);
                text.replace_range(at..end, token);
            } else {
                text.insert_str(at, token);
            }
        }
        check(&text)?;
    }
}
