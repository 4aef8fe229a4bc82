//! The settings file (`oxserve.toml`, `--config`): the server's own settings module, loaded
//! from a file holding the input. Every input is either settings or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The settings module lives in the `oxserve` binary crate; it is compiled here as it is there.
#[allow(dead_code)]
#[path = "../../crates/oxserve/src/settings.rs"]
mod settings;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("oxserve-fuzz-settings-{}.toml", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let _ = settings::Settings::load(Some(&path));
});
