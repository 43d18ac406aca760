//! Nix's ed25519 secret keys (`nix-store --generate-binary-cache-key`): `name:base64` of the
//! 64-byte keypair, as `secret-key=` and `secret-key-files` take them. Used to sign local
//! builds that are pushed unsigned, so that pulls (here and on other machines) can trust them.

use base64::Engine;
use ed25519_dalek::Signer;

use super::narinfo::NarInfo;

pub struct SigningKey {
    name: String,
    key: ed25519_dalek::SigningKey,
}

/// Never shows the secret.
impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.name)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a Nix secret key (name:base64 of 64 bytes, as nix-store --generate-binary-cache-key writes)")]
pub struct BadSecretKey;

impl SigningKey {
    pub fn parse(text: &str) -> Result<SigningKey, BadSecretKey> {
        let (name, b64) = text.trim().split_once(':').ok_or(BadSecretKey)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| BadSecretKey)?;
        let pair: [u8; 64] = bytes.try_into().map_err(|_| BadSecretKey)?;
        let key = ed25519_dalek::SigningKey::from_keypair_bytes(&pair).map_err(|_| BadSecretKey)?;
        if name.is_empty() {
            return Err(BadSecretKey);
        }
        Ok(SigningKey {
            name: name.to_string(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `name:base64` of the public key, as `trusted-public-keys` lists it.
    pub fn public(&self) -> String {
        let public = self.key.verifying_key().to_bytes();
        format!(
            "{}:{}",
            self.name,
            base64::engine::general_purpose::STANDARD.encode(public)
        )
    }

    /// A `Sig:` value (`name:base64`) over a narinfo's fingerprint.
    pub fn sign(&self, fingerprint: &str) -> String {
        let signature = self.key.sign(fingerprint.as_bytes()).to_bytes();
        format!(
            "{}:{}",
            self.name,
            base64::engine::general_purpose::STANDARD.encode(signature)
        )
    }

    /// `text` (a narinfo) with a `Sig:` line of this key added.
    pub fn sign_narinfo(&self, text: &str, info: &NarInfo) -> String {
        let mut out = text.to_string();
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&format!("Sig: {}\n", self.sign(&info.fingerprint())));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::narinfo::TrustedKeys;

    #[test]
    fn signs_what_the_public_key_verifies_and_refuses_bad_keys() {
        let seed = [7u8; 32];
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        let text = format!(
            "test-1:{}",
            base64::engine::general_purpose::STANDARD.encode(key.to_keypair_bytes())
        );
        let signer = SigningKey::parse(&text).unwrap();
        assert_eq!(format!("{signer:?}"), "SigningKey(test-1)");
        let narinfo = "StorePath: /nix/store/0a2jys1ybdr4l3fjvfib5j5l0k3g5aky-a\nURL: nar/x.nar\nCompression: none\nNarHash: sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s\nNarSize: 120\nReferences: \n";
        let info = NarInfo::parse(narinfo.as_bytes()).unwrap();
        let signed = signer.sign_narinfo(narinfo, &info);
        let trusted = TrustedKeys::parse(&[signer.public()]).unwrap();
        assert!(trusted.verify(&NarInfo::parse(signed.as_bytes()).unwrap()));
        assert!(!trusted.verify(&info));
        assert_eq!(SigningKey::parse("test-1:AAAA").unwrap_err(), BadSecretKey);
        assert!(SigningKey::parse("no colon").is_err());
    }
}
