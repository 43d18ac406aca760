#![no_main]
//! Request paths and queries from local clients: nothing accepted may climb out of the cache.
use libfuzzer_sys::fuzz_target;
use nix_sidecar::nix::request::{parse, CachePath};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (path, query) = match text.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (text, None),
    };
    if let Some(CachePath::Nar(key) | CachePath::Forwarded(key)) = parse(path, query) {
        let path_part = key.split('?').next().unwrap();
        assert!(!path_part.split('/').any(|s| s.is_empty() || s == ".." || s.starts_with('.')));
    }
});
