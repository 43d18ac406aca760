#![no_main]
//! Token files, provider answers and netrc files: JWT claims, netrc, hashes, Retry-After.
use libfuzzer_sys::fuzz_target;
use nix_sidecar::identity::{jwt, netrc};
use nix_sidecar::nix::hash::Sha256;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = jwt::claims(text);
    let _ = netrc::password_for(text, "cache.flakehub.com");
    let _ = Sha256::parse(text);
    let response = http::Response::builder().header("retry-after", text).body(());
    if let Ok(response) = response {
        let _ = nix_sidecar::upstream::parse_retry_after(&response);
    }
});
