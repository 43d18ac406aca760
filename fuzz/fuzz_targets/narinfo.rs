#![no_main]
//! narinfo text from an upstream: parse, fingerprint, verify, rewrite.
use libfuzzer_sys::fuzz_target;
use nix_sidecar::nix::narinfo::{replace_url, NarInfo, TrustedKeys};

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = NarInfo::parse(data) {
        let _ = info.fingerprint();
        let _ = TrustedKeys::default().verify(&info);
        let _ = replace_url(std::str::from_utf8(data).unwrap(), "nar/x.nar");
    }
});
