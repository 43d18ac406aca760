#![no_main]
//! A `POST /token` body as the exchange reads it: the form, then the AWS token check.
use libfuzzer_sys::fuzz_target;
use nix_sidecar::exchange::{aws, decide};

fuzz_target!(|data: &[u8]| {
    if let Ok(form) = decide::parse_form(data) {
        let _ = aws::check(&form.subject_token, 1_700_000_000);
    }
});
