//! Verifying the AWS identity token (docs/exchange.md, "The AWS identity token"): every check of
//! docs/exchange.md on the presigned URL before anything is sent, then the request replayed
//! to STS with our own audience in the signed header: STS answers 200 only if the signature
//! covers exactly that audience, and says whose credentials signed it.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use url::Url;

use super::config::AwsConfig;
use super::issuers::Refused;
use super::policy::Subject;
use crate::http::{fetch_small, Client};

pub use crate::identity::aws::{
    AUDIENCE_HEADER, SUBJECT_TOKEN_TYPE as TOKEN_TYPE, TOKEN_PREFIX as PREFIX,
};
const STS_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_AGE: u64 = 15 * 60;

/// STS requests in flight at once: each token is checked there, so a flood of well-formed
/// but worthless tokens must not turn into a flood of requests to AWS.
const STS_AT_ONCE: usize = 32;

pub struct Aws {
    pub config: AwsConfig,
    client: Client,
    slots: tokio::sync::Semaphore,
}

/// `sts.amazonaws.com`, `sts.<region>.amazonaws.com` or its China form.
fn is_sts_host(host: &str) -> bool {
    if host == "sts.amazonaws.com" {
        return true;
    }
    let Some(rest) = host.strip_prefix("sts.") else {
        return false;
    };
    let region = rest
        .strip_suffix(".amazonaws.com")
        .or_else(|| rest.strip_suffix(".amazonaws.com.cn"));
    region.is_some_and(|r| {
        !r.is_empty()
            && r.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
    })
}
/// Why a presented AWS token is not one this exchange takes.
#[derive(Debug, thiserror::Error)]
pub enum BadToken {
    #[error("{0}")]
    Invalid(&'static str),
    #[error("the AWS token's URL has an unexpected or repeated `{0}`")]
    Parameter(String),
}

/// The presigned URL inside `token`, checked as docs/exchange.md says, before any use.
pub fn check(token: &str, now: u64) -> Result<Url, BadToken> {
    let encoded = token
        .strip_prefix(PREFIX)
        .ok_or(BadToken::Invalid("not a nix-sidecar AWS token"))?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| BadToken::Invalid("the AWS token is not base64url"))?;
    let url = Url::parse(
        std::str::from_utf8(&raw).map_err(|_| BadToken::Invalid("the AWS token is not text"))?,
    )
    .map_err(|_| BadToken::Invalid("the AWS token holds no URL"))?;
    if url.scheme() != "https"
        || !url.host_str().is_some_and(is_sts_host)
        || url.port().is_some()
        || url.path() != "/"
        || url.fragment().is_some()
        || !url.username().is_empty()
    {
        return Err(BadToken::Invalid(
            "the AWS token's URL is not an STS endpoint",
        ));
    }
    const ALLOWED: [&str; 9] = [
        "Action",
        "Version",
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Date",
        "X-Amz-Expires",
        "X-Amz-SignedHeaders",
        "X-Amz-Security-Token",
        "X-Amz-Signature",
    ];
    let mut query = HashMap::new();
    for (k, v) in url.query_pairs() {
        if !ALLOWED.contains(&k.as_ref()) || query.insert(k.to_string(), v.to_string()).is_some() {
            return Err(BadToken::Parameter(k.to_string()));
        }
    }
    let get = |k: &str| query.get(k).map(String::as_str);
    if get("Action") != Some("GetCallerIdentity") || get("Version") != Some("2011-06-15") {
        return Err(BadToken::Invalid(
            "the AWS token is not for GetCallerIdentity (2011-06-15)",
        ));
    }
    if get("X-Amz-Algorithm") != Some("AWS4-HMAC-SHA256") || get("X-Amz-Signature").is_none() {
        return Err(BadToken::Invalid(
            "the AWS token is not signed with AWS4-HMAC-SHA256",
        ));
    }
    if !get("X-Amz-SignedHeaders").is_some_and(|h| h.split(';').any(|h| h == AUDIENCE_HEADER)) {
        return Err(BadToken::Invalid(
            "the AWS token's signature does not cover its audience",
        ));
    }
    let expires = get("X-Amz-Expires").and_then(|e| e.parse::<u64>().ok());
    if expires.is_none_or(|e| e > 900) {
        return Err(BadToken::Invalid(
            "the AWS token's X-Amz-Expires is missing or over 900",
        ));
    }
    let signed_at = get("X-Amz-Date")
        .and_then(parse_amz_date)
        .ok_or(BadToken::Invalid("the AWS token has no valid X-Amz-Date"))?;
    if signed_at > now + super::issuers::LEEWAY || now.saturating_sub(signed_at) > MAX_AGE {
        return Err(BadToken::Invalid(
            "the AWS token was not signed within the last 15 minutes",
        ));
    }
    Ok(url)
}

/// `20240102T030405Z` as unix seconds.
fn parse_amz_date(text: &str) -> Option<u64> {
    if text.len() != 16 || !text.ends_with('Z') || text.as_bytes()[8] != b'T' {
        return None;
    }
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        text.get(0..4)?,
        text.get(4..6)?,
        text.get(6..8)?,
        text.get(9..11)?,
        text.get(11..13)?,
        text.get(13..15)?
    );
    let time = humantime::parse_rfc3339(&rfc3339).ok()?;
    time.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

impl Aws {
    pub fn new(config: AwsConfig, client: Client) -> Aws {
        Aws {
            config,
            client,
            slots: tokio::sync::Semaphore::new(STS_AT_ONCE),
        }
    }

    pub async fn verify(&self, token: &str) -> Result<Subject, Refused> {
        let url =
            check(token, crate::clock::unix_now()).map_err(|e| Refused::Token(e.to_string()))?;
        let host = url.host_str().unwrap_or_default().to_string();
        let target = match &self.config.sts_endpoint {
            Some(endpoint) => {
                let mut target = endpoint.clone();
                target.set_query(url.query());
                target
            }
            None => url,
        };
        // A waiter holds its client's connection: past STS_TIMEOUT in the queue, it is told
        // to come back instead of waiting on.
        let _slot = match tokio::time::timeout(STS_TIMEOUT, self.slots.acquire()).await {
            Ok(Ok(slot)) => slot,
            Ok(Err(_)) => return Err(Refused::KeysUnavailable("shutting down".into())),
            Err(_) => {
                return Err(Refused::KeysUnavailable(format!(
                    "{STS_AT_ONCE} STS requests are in flight; try again"
                )))
            }
        };
        // `fetch_small` names the URL without its query (the signature) in its errors.
        let headers = [
            ("host", host.as_str()),
            (AUDIENCE_HEADER, self.config.audience.as_str()),
            ("accept", "application/json"),
        ];
        let (status, body) = fetch_small(
            &self.client,
            http::Method::GET,
            target.as_str(),
            &headers,
            STS_TIMEOUT,
        )
        .await
        .map_err(|e| Refused::KeysUnavailable(format!("STS: {e}")))?;
        if status == http::StatusCode::FORBIDDEN || status == http::StatusCode::BAD_REQUEST {
            return Err(Refused::Token(
                "STS refused the AWS token: invalid, expired, or made for another audience".into(),
            ));
        }
        if !status.is_success() {
            return Err(Refused::KeysUnavailable(format!("STS answered {status}")));
        }
        let (arn, account) = caller(&body).ok_or_else(|| {
            Refused::KeysUnavailable("STS answered without Arn and Account".into())
        })?;
        Ok(Subject::Aws { arn, account })
    }
}

/// `Arn` and `Account` from GetCallerIdentity's JSON (or XML) answer.
fn caller(body: &[u8]) -> Option<(String, String)> {
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) {
        let result = &json["GetCallerIdentityResponse"]["GetCallerIdentityResult"];
        return Some((
            result["Arn"].as_str()?.to_string(),
            result["Account"].as_str()?.to_string(),
        ));
    }
    let text = std::str::from_utf8(body).ok()?;
    let element = |name: &str| {
        let start = text.find(&format!("<{name}>"))? + name.len() + 2;
        let end = text[start..].find(&format!("</{name}>"))? + start;
        Some(text[start..end].trim().to_string())
    };
    Some((element("Arn")?, element("Account")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(url: &str) -> String {
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(url)
        )
    }

    const NOW: u64 = 1_700_000_000; // 2023-11-14T22:13:20Z
    const GOOD: &str = "https://sts.us-east-1.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKID%2F20231114%2Fus-east-1%2Fsts%2Faws4_request&X-Amz-Date=20231114T221000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host%3Bx-nix-sidecar-audience&X-Amz-Signature=abc";

    #[test]
    fn every_check_before_anything_is_sent() {
        assert!(check(&token(GOOD), NOW).is_ok());
        let bad = |from: &str, to: &str| {
            check(&token(&GOOD.replace(from, to)), NOW)
                .unwrap_err()
                .to_string()
        };
        assert!(bad(
            "https://sts.us-east-1.amazonaws.com/",
            "https://evil.example/"
        )
        .contains("STS endpoint"));
        assert!(bad(
            "https://sts.us-east-1.amazonaws.com/",
            "https://sts.us-east-1.amazonaws.com.evil.example/"
        )
        .contains("STS endpoint"));
        assert!(bad("https://", "http://").contains("STS endpoint"));
        assert!(bad("amazonaws.com/", "amazonaws.com:8443/").contains("STS endpoint"));
        assert!(bad("GetCallerIdentity", "AssumeRole").contains("GetCallerIdentity"));
        assert!(bad("host%3Bx-nix-sidecar-audience", "host").contains("audience"));
        assert!(bad("X-Amz-Expires=900", "X-Amz-Expires=3600").contains("900"));
        assert!(bad("20231114T221000Z", "20231114T200000Z").contains("15 minutes"));
        assert!(bad(
            "&X-Amz-Signature=abc",
            "&X-Amz-Signature=abc&Action=GetCallerIdentity"
        )
        .contains("repeated"));
        assert!(bad("&X-Amz-Signature=abc", "&X-Amz-Signature=abc&Extra=1").contains("unexpected"));
        assert!(check("nix-sidecar-aws-v1.!!!", NOW).is_err());
        assert!(check("eyJhbGciOi", NOW).is_err());
        assert!(is_sts_host("sts.cn-north-1.amazonaws.com.cn"));
        assert!(!is_sts_host("sts..amazonaws.com"));
    }

    #[test]
    fn caller_from_json_or_xml() {
        let json = br#"{"GetCallerIdentityResponse":{"GetCallerIdentityResult":{"Arn":"arn:aws:sts::1:assumed-role/r/s","Account":"1","UserId":"x"}}}"#;
        assert_eq!(
            caller(json),
            Some(("arn:aws:sts::1:assumed-role/r/s".into(), "1".into()))
        );
        let xml = b"<GetCallerIdentityResponse><GetCallerIdentityResult><Arn>arn:aws:iam::2:user/u</Arn><UserId>U</UserId><Account>2</Account></GetCallerIdentityResult></GetCallerIdentityResponse>";
        assert_eq!(
            caller(xml),
            Some(("arn:aws:iam::2:user/u".into(), "2".into()))
        );
        assert_eq!(caller(b"{}"), None);
    }
}
