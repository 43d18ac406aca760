//! Minting Attic tokens: `sub`, `exp`, `iat`, `nbf`, `jti`, optional `iss`/`aud` (to match
//! atticd's `token-bound-issuer`/`token-bound-audiences`), and the permissions claim
//! `https://jwt.attic.rs/v1`. Signed HS256 with atticd's base64 secret, or RS256 from a PEM.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Map, Value};

use super::policy::Grant;
use super::SetupError;
use crate::secret::Secret;

pub const ATTIC_CLAIM: &str = "https://jwt.attic.rs/v1";

pub struct Minter {
    key: EncodingKey,
    algorithm: Algorithm,
    issuer: Option<String>,
    audience: Option<String>,
    ttl: Duration,
}

/// A minted token and what the audit log says of it.
pub struct Minted {
    pub token: Secret,
    pub jti: String,
    pub exp: u64,
}

impl Minter {
    /// Reads the key: an RSA private key in PEM, else atticd's base64 HS256 secret.
    pub fn load(
        path: &Path,
        issuer: Option<String>,
        audience: Option<String>,
        ttl: Duration,
    ) -> Result<Minter, SetupError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SetupError::SigningKey(format!("cannot read {}: {e}", path.display())))?;
        let (key, algorithm) = if text.contains("-----BEGIN") {
            let key = EncodingKey::from_rsa_pem(text.as_bytes()).map_err(|e| {
                SetupError::SigningKey(format!(
                    "{}: not an RSA private key in PEM: {e}",
                    path.display()
                ))
            })?;
            (key, Algorithm::RS256)
        } else {
            let secret = base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| {
                    SetupError::SigningKey(format!(
                        "{}: neither a PEM key nor base64 (atticd's token-hs256-secret-base64)",
                        path.display()
                    ))
                })?;
            if secret.len() < 32 {
                return Err(SetupError::SigningKey(format!(
                    "{}: an HS256 secret of {} bytes is too short (32 or more)",
                    path.display(),
                    secret.len()
                )));
            }
            (EncodingKey::from_secret(&secret), Algorithm::HS256)
        };
        Ok(Minter {
            key,
            algorithm,
            issuer,
            audience,
            ttl,
        })
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn mint(
        &self,
        subject: &str,
        grant: &Grant,
    ) -> Result<Minted, jsonwebtoken::errors::Error> {
        let now = crate::clock::unix_now();
        let exp = now + self.ttl.as_secs();
        let jti = crate::nix::hash::hex(&fastrand::u128(..).to_le_bytes());
        let caches: Map<String, Value> = grant
            .iter()
            .map(|(pattern, rights)| {
                let mut perms = Map::new();
                if rights.pull {
                    perms.insert("r".into(), json!(1));
                }
                if rights.push {
                    perms.insert("w".into(), json!(1));
                }
                (pattern.clone(), Value::Object(perms))
            })
            .collect();
        let mut claims = json!({
            "sub": subject,
            "exp": exp,
            "iat": now,
            "nbf": now,
            "jti": jti,
            ATTIC_CLAIM: {"caches": caches},
        });
        if let Some(iss) = &self.issuer {
            claims["iss"] = json!(iss);
        }
        if let Some(aud) = &self.audience {
            claims["aud"] = json!(aud);
        }
        let token = jsonwebtoken::encode(&Header::new(self.algorithm), &claims, &self.key)?;
        Ok(Minted {
            token: Secret::new(token),
            jti,
            exp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::policy::Rights;
    use jsonwebtoken::{DecodingKey, Validation};

    fn grant() -> Grant {
        [(
            "org-ci".to_string(),
            Rights {
                pull: true,
                push: true,
            },
        )]
        .into()
    }

    #[test]
    fn hs256_from_atticds_base64_secret_with_bound_issuer_and_audience() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let secret = [7u8; 40];
        std::fs::write(
            &path,
            base64::engine::general_purpose::STANDARD.encode(secret),
        )
        .unwrap();
        let minter = Minter::load(
            &path,
            Some("exchange".into()),
            Some("attic".into()),
            Duration::from_secs(60),
        )
        .unwrap();
        let minted = minter.mint("iss|sub", &grant()).unwrap();
        let mut v = Validation::new(Algorithm::HS256);
        v.set_issuer(&["exchange"]);
        v.set_audience(&["attic"]);
        let data = jsonwebtoken::decode::<Value>(
            minted.token.expose(),
            &DecodingKey::from_secret(&secret),
            &v,
        )
        .unwrap();
        assert_eq!(
            data.claims[ATTIC_CLAIM]["caches"]["org-ci"],
            json!({"r": 1, "w": 1})
        );
        assert_eq!(data.claims["jti"], minted.jti);
        std::fs::write(
            &path,
            base64::engine::general_purpose::STANDARD.encode([1u8; 8]),
        )
        .unwrap();
        assert!(Minter::load(&path, None, None, Duration::from_secs(60))
            .err()
            .unwrap()
            .to_string()
            .contains("too short"));
        std::fs::write(&path, "not base64 !").unwrap();
        assert!(Minter::load(&path, None, None, Duration::from_secs(60)).is_err());
    }

    #[test]
    fn rs256_from_a_pem() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(&path, include_str!("../../tests/support/keys/rsa.pem")).unwrap();
        let minter = Minter::load(&path, None, None, Duration::from_secs(60)).unwrap();
        let minted = minter.mint("aws|arn", &grant()).unwrap();
        let header = jsonwebtoken::decode_header(minted.token.expose()).unwrap();
        assert_eq!(header.alg, Algorithm::RS256);
    }
}
