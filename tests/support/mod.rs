//! Test doubles and fixtures shared by the integration tests. Everything listens on
//! 127.0.0.1 only, on ephemeral ports.
#![allow(dead_code)]

pub mod attic;
pub mod cloud;
pub mod http;
pub mod issuer;
pub mod nix;
pub mod proxy;
pub mod sidecar;
pub mod spiffe;
pub mod tls;
pub mod upstream;
pub mod world;

/// The bytes of the files directly in `dir` (0 when it cannot be read).
pub fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
