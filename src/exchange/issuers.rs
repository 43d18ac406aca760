//! Verifying OIDC tokens (docs/exchange.md): the issuer's keys from discovery, a JWKS URL or
//! a file, cached; refetched when a token names a key not known yet: the same unknown `kid`
//! at most once per [`REFETCH_EVERY`], any at most once per [`MIN_REFETCH_GAP`] per issuer.
//! So made-up `kid`s cannot make us hammer the issuer, and cannot keep a freshly rotated key
//! out for longer than the gap either. RS256 and ES256 only, `iss` exact, `aud` containing the
//! configured audience, `exp`, `nbf`, `iat` numbers within [`LEEWAY`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::config::{IssuerConfig, JwksSource};
use crate::http::{fetch_small, Client, ClientError};

pub const LEEWAY: u64 = 60;
pub const REFETCH_EVERY: Duration = Duration::from_secs(30);
pub const MIN_REFETCH_GAP: Duration = Duration::from_secs(2);
/// Unknown kids remembered at most (then forgotten all at once).
const MAX_MISSING_KIDS: usize = 1024;
/// After a failed first fetch, requests are refused (503) without asking again for this long:
/// an issuer that is down is not hammered once per request.
pub const RETRY_FIRST_FETCH: Duration = Duration::from_secs(5);
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a token was refused: `invalid_grant` (its fault) or the issuer's keys could not be
/// had (ours, or the issuer's: 503).
#[derive(Debug)]
pub enum Refused {
    Token(String),
    KeysUnavailable(String),
}

struct Keys {
    by_kid: HashMap<String, (Arc<DecodingKey>, Algorithm)>,
    fetched_at: Option<Instant>,
    /// The last fetch made because of an unknown kid.
    refetched_at: Option<Instant>,
    /// When the first fetch last failed, and why.
    failed: Option<(Instant, String)>,
    /// Kids a refetch did not find, and when.
    missing: HashMap<String, Instant>,
}

pub struct Issuer {
    pub config: IssuerConfig,
    client: Client,
    keys: std::sync::RwLock<Keys>,
    /// Held while fetching: one fetch at a time, the others wait for its keys.
    fetching: tokio::sync::Mutex<()>,
    /// JWKS fetches made (for metrics and tests).
    pub fetches: AtomicU64,
}

impl Issuer {
    /// `client` serves issuers without a `ca-file` of their own.
    pub fn new(config: IssuerConfig, client: &Client) -> Result<Issuer, ClientError> {
        let client = match &config.ca_file {
            Some(ca) => crate::http::client(Some(ca))?,
            None => client.clone(),
        };
        Ok(Issuer {
            config,
            client,
            keys: std::sync::RwLock::new(Keys {
                by_kid: HashMap::new(),
                fetched_at: None,
                refetched_at: None,
                failed: None,
                missing: HashMap::new(),
            }),
            fetching: tokio::sync::Mutex::new(()),
            fetches: AtomicU64::new(0),
        })
    }

    /// The verified claims of `token` (whose unverified `iss` named this issuer).
    pub async fn verify(&self, token: &str) -> Result<Value, Refused> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Refused::Token(format!("not a signed JWT: {e}")))?;
        let kid = header
            .kid
            .ok_or_else(|| Refused::Token("the token names no key (kid)".into()))?;
        let (key, algorithm) = self.key(&kid).await?;
        if header.alg != algorithm {
            return Err(Refused::Token(format!(
                "the token says {:?}, its key is for {algorithm:?}",
                header.alg
            )));
        }
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[&self.config.url]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY;
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<Value>(token, key.as_ref(), &validation)
            .map_err(|e| Refused::Token(describe(&e)))?;
        // jsonwebtoken checks `exp` and `nbf` only when they are numbers: any other type
        // (a far-future string `nbf`) must not pass for absent.
        for claim in ["exp", "nbf", "iat"] {
            match &data.claims[claim] {
                Value::Null => {}
                Value::Number(n) if n.as_f64().is_some_and(|t| t >= 0.0) => {}
                _ => {
                    return Err(Refused::Token(format!(
                        "`{claim}` is not a time (seconds since 1970)"
                    )))
                }
            }
        }
        let now = crate::clock::unix_now() as f64;
        if data.claims["iat"]
            .as_f64()
            .is_some_and(|iat| iat > now + LEEWAY as f64)
        {
            return Err(Refused::Token(
                "the token was issued in the future (iat)".into(),
            ));
        }
        Ok(data.claims)
    }

    async fn key(&self, kid: &str) -> Result<(Arc<DecodingKey>, Algorithm), Refused> {
        if let Some(found) = self.keys.read().unwrap().by_kid.get(kid) {
            return Ok(found.clone());
        }
        let _one_fetch = self.fetching.lock().await;
        let (fetched, refetch_due) = {
            let keys = self.keys.read().unwrap();
            if let Some(found) = keys.by_kid.get(kid) {
                return Ok(found.clone()); // another request's fetch brought it
            }
            if let Some((at, why)) = &keys.failed {
                if keys.fetched_at.is_none() && at.elapsed() < RETRY_FIRST_FETCH {
                    return Err(Refused::KeysUnavailable(why.clone()));
                }
            }
            let seen_missing = keys
                .missing
                .get(kid)
                .is_some_and(|at| at.elapsed() < REFETCH_EVERY);
            let gap_passed = keys
                .refetched_at
                .is_none_or(|at| at.elapsed() >= MIN_REFETCH_GAP);
            (keys.fetched_at.is_some(), gap_passed && !seen_missing)
        };
        if !fetched {
            if let Err(e) = self.fetch().await {
                if let Refused::KeysUnavailable(why) = &e {
                    self.keys.write().unwrap().failed = Some((Instant::now(), why.clone()));
                }
                return Err(e);
            }
        } else if refetch_due {
            self.keys.write().unwrap().refetched_at = Some(Instant::now());
            if let Err(e) = self.fetch().await {
                tracing::warn!(issuer = %self.config.url, error = ?e, "JWKS refetch failed; keeping the keys known");
            }
        }
        let mut keys = self.keys.write().unwrap();
        if let Some(found) = keys.by_kid.get(kid) {
            return Ok(found.clone());
        }
        if refetch_due {
            if keys.missing.len() >= MAX_MISSING_KIDS {
                keys.missing.clear();
            }
            keys.missing.insert(kid.to_string(), Instant::now());
        }
        Err(Refused::Token(format!(
            "no key `{kid}` in the issuer's JWKS"
        )))
    }

    async fn fetch(&self) -> Result<(), Refused> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let unavailable = |e: String| Refused::KeysUnavailable(format!("{}: {e}", self.config.url));
        let failed = |e: KeysFetch| unavailable(e.to_string());
        let text = match &self.config.jwks {
            JwksSource::File(path) => std::fs::read(path)
                .map(bytes::Bytes::from)
                .map_err(|e| unavailable(format!("reading {}: {e}", path.display())))?,
            JwksSource::Url(url) => self.get(url.as_str()).await.map_err(failed)?,
            JwksSource::Discovery => {
                let discovery = format!(
                    "{}/.well-known/openid-configuration",
                    self.config.url.trim_end_matches('/')
                );
                let document = self.get(&discovery).await.map_err(failed)?;
                let document: Value = serde_json::from_slice(&document)
                    .map_err(|e| unavailable(format!("discovery document: {e}")))?;
                let jwks_uri = document["jwks_uri"]
                    .as_str()
                    .ok_or_else(|| unavailable("discovery document without jwks_uri".into()))?;
                self.get(jwks_uri).await.map_err(failed)?
            }
        };
        let set: JwkSet =
            serde_json::from_slice(&text).map_err(|e| unavailable(format!("JWKS: {e}")))?;
        let mut by_kid = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let algorithm = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                _ => continue, // only RS256 and ES256 are accepted
            };
            if let Ok(key) = DecodingKey::from_jwk(jwk) {
                by_kid.insert(kid, (Arc::new(key), algorithm));
            }
        }
        tracing::info!(issuer = %self.config.url, keys = by_kid.len(), "JWKS fetched");
        let mut keys = self.keys.write().unwrap();
        keys.by_kid = by_kid;
        keys.fetched_at = Some(Instant::now());
        Ok(())
    }

    async fn get(&self, url: &str) -> Result<bytes::Bytes, KeysFetch> {
        let accept = [("accept", "application/json")];
        let (status, body) =
            fetch_small(&self.client, http::Method::GET, url, &accept, FETCH_TIMEOUT).await?;
        if !status.is_success() {
            return Err(KeysFetch::Status {
                url: url.to_string(),
                status,
            });
        }
        Ok(body)
    }
}

/// Why an issuer's keys (or its discovery document) could not be fetched.
#[derive(Debug, thiserror::Error)]
enum KeysFetch {
    #[error(transparent)]
    Call(#[from] crate::http::CallError),
    #[error("{url} answered {status}")]
    Status {
        url: String,
        status: http::StatusCode,
    },
}

/// jsonwebtoken's errors in words for the refusal.
fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "the token has expired".into(),
        K::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        K::InvalidAudience => "the token is for another audience".into(),
        K::InvalidIssuer => "the token is from another issuer".into(),
        K::InvalidSignature => "the signature does not verify".into(),
        K::InvalidAlgorithm => "the token's algorithm does not fit its key".into(),
        K::MissingRequiredClaim(c) => format!("the token has no `{c}`"),
        K::Json(_) => "the token's claims do not parse (exp, nbf and iat must be numbers)".into(),
        other => format!("the token is invalid: {other:?}"),
    }
}

/// The trusted issuers, by `iss`.
pub struct Issuers(pub Vec<Arc<Issuer>>);

impl Issuers {
    /// The issuer a token claims (unverified), if it is one of ours.
    pub fn find(&self, token: &str) -> Option<&Arc<Issuer>> {
        let payload = token.split('.').nth(1)?;
        let bytes = base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            payload.trim_end_matches('='),
        )
        .ok()?;
        let claims: Value = serde_json::from_slice(&bytes).ok()?;
        let iss = claims["iss"].as_str()?;
        self.0.iter().find(|i| i.config.url == iss)
    }
}
