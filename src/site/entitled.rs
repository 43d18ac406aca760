//! Which caller an upstream lately told it may have what: a narinfo (by hash) and the NAR that
//! narinfo names. A caller is its upstream, the subject its token names and a fingerprint of
//! the token itself: the subject alone could be written into a token nobody signed, and the
//! site cannot check signatures made for the upstream, so a forged subject finds nothing
//! here and goes to the upstream, which refuses it. A new token (a refresh) asks again once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::HeaderValue;
use sha2::{Digest, Sha256};

/// Entries kept at most; past it the oldest half goes (a caller then asks the upstream again).
const REMEMBERED: usize = 200_000;

/// Who is asking, as far as entitlement goes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Caller {
    upstream: usize,
    /// The subject the token names (unverified: for metrics and logs; never alone a key).
    pub subject: String,
    fingerprint: [u8; 16],
}

impl Caller {
    /// `authorization`: what the machine sent (none: it asks anonymously, and is granted
    /// what the upstream gives anyone).
    pub fn new(upstream: usize, authorization: Option<&HeaderValue>) -> Caller {
        let sent = authorization.map_or(&[][..], |h| h.as_bytes());
        let digest = Sha256::digest(sent);
        let mut fingerprint = [0u8; 16];
        fingerprint.copy_from_slice(&digest[..16]);
        Caller {
            upstream,
            subject: authorization
                .and_then(subject_of)
                .unwrap_or_else(|| "-".into()),
            fingerprint,
        }
    }
}

/// The `sub` claim of a bearer JWT, unverified.
fn subject_of(authorization: &HeaderValue) -> Option<String> {
    use base64::Engine;
    let text = authorization.to_str().ok()?;
    let token = text.strip_prefix("Bearer ")?;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let sub = claims.get("sub")?.as_str()?;
    // Shown in metrics labels and logs: short and plain.
    Some(sub.chars().filter(|c| !c.is_control()).take(128).collect())
}

#[derive(Default)]
pub struct Entitlements {
    granted: Mutex<HashMap<(Caller, String), Instant>>,
}

impl Entitlements {
    /// The upstream answered `caller` with this narinfo (`hash`) naming NAR `nar_key`.
    pub fn grant(&self, caller: &Caller, hash: &str, nar_key: Option<&str>) {
        let mut granted = self.granted.lock().unwrap();
        if granted.len() >= REMEMBERED {
            let mut ages: Vec<Instant> = granted.values().copied().collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            granted.retain(|_, at| *at > cut);
        }
        let now = Instant::now();
        granted.insert((caller.clone(), hash.to_string()), now);
        if let Some(key) = nar_key {
            granted.insert((caller.clone(), key.to_string()), now);
        }
    }

    /// The upstream said no (or nothing) to `caller` for `hash`.
    pub fn revoke(&self, caller: &Caller, hash: &str) {
        self.granted
            .lock()
            .unwrap()
            .remove(&(caller.clone(), hash.to_string()));
    }

    /// Whether `caller` was granted `what` (a narinfo hash or a NAR key) within `ttl`.
    pub fn holds(&self, caller: &Caller, what: &str, ttl: Duration) -> bool {
        self.granted
            .lock()
            .unwrap()
            .get(&(caller.clone(), what.to_string()))
            .is_some_and(|at| at.elapsed() < ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(sub: &str, salt: &str) -> HeaderValue {
        use base64::Engine;
        let enc = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let token = format!(
            "{}.{}.{}",
            enc(r#"{"alg":"RS256"}"#),
            enc(&format!(r#"{{"sub":"{sub}","jti":"{salt}"}}"#)),
            enc("sig")
        );
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap()
    }

    #[test]
    fn a_grant_holds_for_that_token_only_and_not_past_its_ttl() {
        let e = Entitlements::default();
        let alice = Caller::new(0, Some(&bearer("alice", "1")));
        assert_eq!(alice.subject, "alice");
        e.grant(&alice, "h1", Some("nar/x.nar"));
        let ttl = Duration::from_secs(60);
        assert!(e.holds(&alice, "h1", ttl) && e.holds(&alice, "nar/x.nar", ttl));
        // The same subject in another token (forged, or a refresh) holds nothing yet.
        assert!(!e.holds(&Caller::new(0, Some(&bearer("alice", "2"))), "h1", ttl));
        // Nor the same token for another upstream.
        assert!(!e.holds(&Caller::new(1, Some(&bearer("alice", "1"))), "h1", ttl));
        assert!(!e.holds(&alice, "h1", Duration::ZERO));
        e.revoke(&alice, "h1");
        assert!(!e.holds(&alice, "h1", ttl));
    }
}
