#![no_main]
//! The site tier's closure hints: the path a machine asks (`/_sidecar/closure/<hash>`) and the
//! answer it reads back. Only a bare store path hash is a root; an answer is narinfo texts or
//! nothing, and each text still goes through the narinfo parser.
use libfuzzer_sys::fuzz_target;
use nix_sidecar::nix::narinfo::NarInfo;
use nix_sidecar::site::closure_root;
use nix_sidecar::upstream::parse_hints;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(root) = closure_root(text) {
            assert_eq!(root.len(), 32);
            assert!(!root.contains('/') && !root.contains('.'));
        }
    }
    for hint in parse_hints(data) {
        let _ = NarInfo::parse(hint.as_bytes());
    }
});
