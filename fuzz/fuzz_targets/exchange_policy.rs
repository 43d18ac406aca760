#![no_main]
//! The exchange's rules against made-up claims: a claim glob (first line), a scope (second
//! line), a cache (third) and claims JSON (the rest).
use libfuzzer_sys::fuzz_target;
use nix_sidecar::exchange::policy;

fuzz_target!(|data: &[u8]| {
    policy::fuzz_one(data);
});
