//! Reading the claims of a JWT without verifying it: nix-sidecar only forwards tokens, the
//! upstream verifies them. Claims drive refresh timing and what `token` and logs show.

use super::FetchError;
use base64::Engine;
use serde::Deserialize;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Claims {
    pub iss: Option<String>,
    pub sub: Option<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    pub exp: Option<i64>,
    pub iat: Option<i64>,
}

const MAX_JWT: usize = 64 * 1024;

/// The claims of a compact JWS (`header.payload.signature`), or why it is not one.
pub fn claims(token: &str) -> Result<Claims, FetchError> {
    if token.len() > MAX_JWT {
        return Err(FetchError::NoToken(format!(
            "token is longer than {MAX_JWT} bytes"
        )));
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 || parts[0].is_empty() || parts[1].is_empty() {
        return Err(FetchError::NoToken(
            "not a JWT (expected three base64url parts)".into(),
        ));
    }
    let engine = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let decode = |part: &str, what: &str| {
        engine
            .decode(part.trim_end_matches('='))
            .map_err(|_| FetchError::NoToken(format!("not a JWT ({what} is not base64url)")))
    };
    let header = decode(parts[0], "header")?;
    serde_json::from_slice::<serde_json::Value>(&header)
        .ok()
        .filter(|v| v.is_object())
        .ok_or(FetchError::NoToken(
            "not a JWT (header is not a JSON object)".into(),
        ))?;
    let payload = decode(parts[1], "payload")?;
    serde_json::from_slice(&payload)
        .map_err(|_| FetchError::NoToken("not a JWT (payload is not a JSON claims object)".into()))
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Aud {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<Aud>::deserialize(d)? {
        None => vec![],
        Some(Aud::One(a)) => vec![a],
        Some(Aud::Many(a)) => a,
    })
}

/// What an Attic token grants (`https://jwt.attic.rs/v1` -> `caches`), as
/// `pattern: rights` lines, e.g. `org-*: pull, push`; empty for other tokens.
pub fn attic_grants(token: &str) -> Vec<String> {
    let Some(payload) = token.split('.').nth(1) else {
        return Vec::new();
    };
    let Ok(bytes) =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('='))
    else {
        return Vec::new();
    };
    let Ok(claims) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Vec::new();
    };
    let Some(caches) = claims["https://jwt.attic.rs/v1"]["caches"].as_object() else {
        return Vec::new();
    };
    caches
        .iter()
        .map(|(pattern, rights)| {
            let names: Vec<&str> = [("r", "pull"), ("w", "push"), ("d", "delete")]
                .into_iter()
                .filter(|(key, _)| rights[*key].as_u64().is_some_and(|v| v > 0))
                .map(|(_, name)| name)
                .collect();
            format!("{pattern}: {}", names.join(", "))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        let e = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.c2ln",
            e.encode(r#"{"alg":"RS256"}"#),
            e.encode(payload)
        )
    }

    #[test]
    fn reads_claims_with_string_or_array_audience() {
        let c = claims(&jwt(
            r#"{"iss":"i","sub":"s","aud":"a","exp":10,"iat":5,"x":1}"#,
        ))
        .unwrap();
        assert_eq!(c.aud, vec!["a"]);
        assert_eq!((c.exp, c.iat), (Some(10), Some(5)));
        let c = claims(&jwt(r#"{"aud":["a","b"]}"#)).unwrap();
        assert_eq!(c.aud, vec!["a", "b"]);
    }

    #[test]
    fn rejects_what_is_not_a_jwt() {
        for bad in [
            "",
            "abc",
            "a.b",
            "a.b.c.d",
            "!!.!!.x",
            &jwt("[1]"),
            &jwt("not json"),
        ] {
            assert!(claims(bad).is_err(), "{bad}");
        }
    }
}
