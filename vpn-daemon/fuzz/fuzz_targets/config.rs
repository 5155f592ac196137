//! The config file (`config.rs`): any text, parsed and validated as vpnd
//! does at start and on reload. A bad file must be an error that names
//! what is wrong, never a panic (a reload that panicked would take the
//! running gateway down).

#![no_main]

use libfuzzer_sys::fuzz_target;
use vpn_daemon::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = Config::parse(text, std::path::Path::new("/nonexistent/fuzz.toml")) {
            let _ = e.to_string();
        }
    }
});
