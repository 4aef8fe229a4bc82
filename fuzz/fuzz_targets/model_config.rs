//! `config.pbtxt`: the text-format parser (with its list-colon fix-up and error positions),
//! the checks a config must pass before a model loads, and Triton's JSON rendering of it,
//! which must parse back (clients read it from `GET /v2/models/M/config`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use oxserve_repository::{config_from_json, config_to_json, parse_config_text, validate_config};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = parse_config_text(text) else {
        return;
    };
    let _ = validate_config(&config);
    let json = config_to_json(&config);
    if let Err(e) = config_from_json(&json) {
        panic!("the JSON rendering of a parsed config does not parse back: {e}\n{json}");
    }
});
