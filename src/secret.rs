//! A string that must never be printed: tokens, request tokens, presigned URLs.
//!
//! `Debug` and `Display` print `[redacted]`, so a secret that slips into a log line, an error
//! or a panic message shows nothing. The only way to the bytes is [`Secret::expose`], which is
//! easy to grep for.

use std::fmt;
use std::sync::Arc;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Arc::from(value.into()))
    }

    /// The secret itself, for the one place that has to send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// A short, non-reversible fingerprint for logs: the first 8 hex digits of SHA-256.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.0.as_bytes());
        crate::nix::hash::hex(&digest[..4])
    }

    /// Replaces every occurrence of the secret in `text`, for text that came from elsewhere
    /// (an upstream's error body) and might echo it back: as it is, percent-encoded, and in
    /// base64 (as a Basic credential `user:secret` carries it, whatever the user).
    pub fn scrub(&self, text: &str) -> String {
        if self.0.len() < 4 {
            return text.to_string();
        }
        let mut text = text.replace(&*self.0, "[redacted]");
        let encoded: String = url::form_urlencoded::byte_serialize(self.0.as_bytes()).collect();
        text = text.replace(&encoded, "[redacted]");
        for form in base64_forms(&self.0) {
            text = text.replace(&form, "[redacted]");
        }
        text
    }
}

/// Runs of base64 that appear wherever `secret` is encoded after any prefix: the three
/// alignments, without the characters that depend on the neighbouring bytes, in both
/// alphabets (standard, and URL-safe as JWTs and presigned tokens use it).
fn base64_forms(secret: &str) -> Vec<String> {
    use base64::Engine;
    let mut forms = Vec::new();
    for shift in 0..3 {
        let padded = [&vec![0u8; shift][..], secret.as_bytes()].concat();
        // The first characters carry the padding bytes; the last may carry what follows.
        let start = (shift * 8).div_ceil(6);
        let end = (padded.len() * 8 / 6).max(start);
        if end - start < 8 {
            continue;
        }
        for engine in [
            base64::engine::general_purpose::STANDARD_NO_PAD,
            base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ] {
            let form = engine.encode(&padded)[start..end].to_string();
            if !forms.contains(&form) {
                forms.push(form);
            }
        }
    }
    forms
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = Secret::new("eyJhbGciOi.secret.value");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{s}"), "[redacted]");
        assert_eq!(s.expose(), "eyJhbGciOi.secret.value");
    }

    #[test]
    fn scrub_removes_the_url_safe_base64_form() {
        use base64::Engine;
        // Bytes whose base64 holds `+` and `/`, so the two alphabets differ.
        let token = Secret::new("\u{00fb}\u{00ff}\u{00fe}secret-credential\u{00fb}\u{00ff}");
        for prefix in ["", "a", "ab"] {
            let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(format!("{prefix}{}", token.expose()));
            assert!(
                url_safe.contains('-') || url_safe.contains('_'),
                "{url_safe}"
            );
            let scrubbed = token.scrub(&format!("token {url_safe} end"));
            let left = scrubbed.split_whitespace().nth(1).unwrap();
            assert!(left.len() < url_safe.len() / 2, "{prefix:?}: {scrubbed}");
        }
    }

    #[test]
    fn scrub_removes_basic_and_url_encoded_forms() {
        use base64::Engine;
        let token = Secret::new("eyJhbGciOi.eyJzdWIi+/=.c2ln");
        for user in ["flakehub", "x", "ab", ""] {
            let basic = base64::engine::general_purpose::STANDARD
                .encode(format!("{user}:{}", token.expose()));
            let scrubbed = token.scrub(&format!("got Authorization: Basic {basic} here"));
            assert!(scrubbed.contains("[redacted]"), "{user}: {scrubbed}");
            // What is left of the base64 cannot give back more than a byte of the token.
            let left = scrubbed.split_whitespace().nth(3).unwrap();
            assert!(left.len() < basic.len() / 2, "{user}: {scrubbed}");
        }
        let encoded: String =
            url::form_urlencoded::byte_serialize(token.expose().as_bytes()).collect();
        assert_eq!(
            token.scrub(&format!("?token={encoded}")),
            "?token=[redacted]"
        );
    }

    #[test]
    fn scrub_removes_echoed_secret() {
        let s = Secret::new("abc123");
        assert_eq!(s.scrub("bad token abc123!"), "bad token [redacted]!");
        assert_eq!(s.fingerprint().len(), 8);
    }
}
