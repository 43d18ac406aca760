#![no_main]
//! Configuration files: any text gets an answer, never a panic.
use libfuzzer_sys::fuzz_target;
use nix_sidecar::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(config) = Config::parse_str(text) {
            let _ = Config::parse_str(&config.render()).expect("rendered config parses");
        }
    }
});
