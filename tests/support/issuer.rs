//! A test OIDC issuer: mints RS256/ES256 JWTs and publishes its keys as a JWKS, as a real
//! issuer does at `/.well-known/openid-configuration` and its `jwks_uri`.

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use super::http::{respond, serve};

pub const JWKS: &str = include_str!("keys/jwks.json");

#[derive(Clone)]
pub struct Issuer {
    pub addr: SocketAddr,
    pub url: String,
    /// JWKS requests served.
    pub jwks_requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl Issuer {
    pub async fn start() -> Issuer {
        let jwks_requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = jwks_requests.clone();
        let addr = serve(move |req| {
            let counter = counter.clone();
            async move {
            let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("").to_string();
            match req.uri().path() {
                "/.well-known/openid-configuration" => respond(
                    200,
                    json!({"issuer": format!("http://{host}"), "jwks_uri": format!("http://{host}/jwks")}).to_string(),
                ),
                "/jwks" => {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    respond(200, JWKS)
                }
                _ => respond(404, ""),
            }
            }
        })
        .await;
        Issuer {
            addr,
            url: format!("http://{addr}"),
            jwks_requests,
        }
    }

    /// A token for `sub` and `aud` living `lifetime` seconds, signed RS256 or ES256.
    pub fn mint(&self, sub: &str, aud: &str, lifetime: i64, es256: bool) -> String {
        self.mint_claims(
            json!({"iss": self.url, "sub": sub, "aud": aud, "iat": now(), "nbf": now() - 600, "exp": now() + lifetime}),
            es256,
        )
    }

    pub fn mint_claims(&self, claims: serde_json::Value, es256: bool) -> String {
        let (alg, kid, key) = if es256 {
            (
                Algorithm::ES256,
                "test-ec",
                EncodingKey::from_ec_pem(include_bytes!("keys/ec.pem")).unwrap(),
            )
        } else {
            (
                Algorithm::RS256,
                "test-rsa",
                EncodingKey::from_rsa_pem(include_bytes!("keys/rsa.pem")).unwrap(),
            )
        };
        let mut header = Header::new(alg);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }

    /// Signed with a key the JWKS does not hold, under a kid it does.
    pub fn forge(&self, sub: &str, aud: &str) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("test-rsa".into());
        let key = EncodingKey::from_rsa_pem(include_bytes!("keys/untrusted-rsa.pem")).unwrap();
        let claims =
            json!({"iss": self.url, "sub": sub, "aud": aud, "iat": now(), "exp": now() + 300});
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }
}
