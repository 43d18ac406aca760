//! narinfo files: parsing, the signature fingerprint, ed25519 verification against
//! `trusted-public-keys`, and the one rewrite nix-sidecar makes (an absolute `URL:`).

use std::collections::HashMap;

use base64::Engine;
use ed25519_dalek::{Signature, VerifyingKey};

use super::hash::Sha256;

/// The largest narinfo accepted; real ones are a few hundred bytes to a few KiB.
pub const MAX_NARINFO_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: String,
    pub url: String,
    pub compression: String,
    pub file_hash: Option<Sha256>,
    pub file_size: Option<u64>,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    pub references: Vec<String>,
    pub sigs: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NarInfoError {
    #[error("narinfo is larger than {MAX_NARINFO_BYTES} bytes")]
    TooLarge,
    #[error("narinfo is not UTF-8 text")]
    NotText,
    #[error("narinfo line {0} is not `Key: value`")]
    BadLine(usize),
    #[error("narinfo has no {0}")]
    Missing(&'static str),
    #[error("narinfo has a malformed {0}")]
    Malformed(&'static str),
    #[error("narinfo repeats {0}")]
    Repeated(&'static str),
}

impl NarInfo {
    pub fn parse(bytes: &[u8]) -> Result<NarInfo, NarInfoError> {
        if bytes.len() > MAX_NARINFO_BYTES {
            return Err(NarInfoError::TooLarge);
        }
        let text = std::str::from_utf8(bytes).map_err(|_| NarInfoError::NotText)?;
        let mut fields: HashMap<&str, &str> = HashMap::new();
        let mut sigs = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let (key, value) = line.split_once(": ").ok_or(NarInfoError::BadLine(n + 1))?;
            if key == "Sig" {
                sigs.push(value.to_string());
            } else if let Some(name) = KNOWN_SINGLE_KEYS.iter().find(|k| **k == key) {
                if fields.insert(key, value).is_some() {
                    return Err(NarInfoError::Repeated(name));
                }
            }
        }
        let get = |key: &'static str| fields.get(key).copied();
        let need = |key: &'static str| get(key).ok_or(NarInfoError::Missing(key));
        let size =
            |key: &'static str, v: &str| v.parse::<u64>().map_err(|_| NarInfoError::Malformed(key));
        let hash =
            |key: &'static str, v: &str| Sha256::parse(v).ok_or(NarInfoError::Malformed(key));

        let store_path = need("StorePath")?;
        if !is_store_path(store_path) {
            return Err(NarInfoError::Malformed("StorePath"));
        }
        let url = need("URL")?;
        if url.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(NarInfoError::Malformed("URL"));
        }
        let references = get("References")
            .unwrap_or("")
            .split_whitespace()
            .map(|r| {
                if is_store_basename(r) {
                    Ok(r.to_string())
                } else {
                    Err(NarInfoError::Malformed("References"))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(NarInfo {
            store_path: store_path.to_string(),
            url: url.to_string(),
            compression: get("Compression").unwrap_or("bzip2").to_string(),
            file_hash: get("FileHash").map(|v| hash("FileHash", v)).transpose()?,
            file_size: get("FileSize").map(|v| size("FileSize", v)).transpose()?,
            nar_hash: hash("NarHash", need("NarHash")?)?,
            nar_size: size("NarSize", need("NarSize")?)?,
            references,
            sigs,
        })
    }

    /// The 32-character hash part of the store path.
    pub fn hash_part(&self) -> &str {
        let base = self.store_path.rsplit('/').next().unwrap_or("");
        &base[..32.min(base.len())]
    }

    /// What an ed25519 key signs (see [`fingerprint`]).
    pub fn fingerprint(&self) -> String {
        fingerprint(
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }
}

/// What an ed25519 key signs of a path: `1;<path>;<narhash>;<narsize>;<refs as full paths>`
/// (`references` are base names).
pub fn fingerprint(
    store_path: &str,
    nar_hash: &Sha256,
    nar_size: u64,
    references: &[String],
) -> String {
    let store_dir = store_path.rsplit_once('/').map_or("", |(dir, _)| dir);
    let refs: Vec<String> = references
        .iter()
        .map(|r| format!("{store_dir}/{r}"))
        .collect();
    format!(
        "1;{store_path};{};{nar_size};{}",
        nar_hash.to_nix_string(),
        refs.join(",")
    )
}

const KNOWN_SINGLE_KEYS: &[&str] = &[
    "StorePath",
    "URL",
    "Compression",
    "FileHash",
    "FileSize",
    "NarHash",
    "NarSize",
    "References",
    "Deriver",
    "System",
    "CA",
];

/// `<32 nixbase32 letters>-<name>` with Nix's store-name characters.
pub fn is_store_basename(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() > 33
        && b.len() <= 211
        && b[..32].iter().all(|&c| super::base32::is_digit(c))
        && b[32] == b'-'
        && b[33..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
        && b[33] != b'.'
}

pub fn is_store_path(path: &str) -> bool {
    match path.rsplit_once('/') {
        Some((dir, base)) => dir.starts_with('/') && is_store_basename(base),
        None => false,
    }
}

/// The value of a single-valued field (`Deriver`, `CA`, ...) of narinfo text.
pub fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        line.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix(": "))
    })
}

/// Replaces the value of the `URL:` line, keeping every other byte as it was (signatures do
/// not cover the URL, so they stay valid).
pub fn replace_url(text: &str, new_url: &str) -> String {
    let mut out = String::with_capacity(text.len() + new_url.len());
    for line in text.split_inclusive('\n') {
        if line.starts_with("URL: ") {
            out.push_str("URL: ");
            out.push_str(new_url);
            out.push('\n');
        } else {
            out.push_str(line);
        }
    }
    out
}

/// The keys listed in `trusted-public-keys`, by name.
#[derive(Clone, Default)]
pub struct TrustedKeys {
    keys: HashMap<String, VerifyingKey>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not a public key of the form name:base64(32 bytes)")]
pub struct BadKey(pub String);

impl TrustedKeys {
    /// The names of the keys, sorted (for messages).
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<TrustedKeys, BadKey> {
        let mut keys = HashMap::new();
        for entry in entries {
            let entry = entry.as_ref();
            let bad = || BadKey(entry.to_string());
            let (name, b64) = entry.split_once(':').ok_or_else(bad)?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| bad())?;
            let array: [u8; 32] = bytes.try_into().map_err(|_| bad())?;
            let key = VerifyingKey::from_bytes(&array).map_err(|_| bad())?;
            if name.is_empty() {
                return Err(bad());
            }
            keys.insert(name.to_string(), key);
        }
        Ok(TrustedKeys { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// True when at least one `Sig` is by a trusted key and verifies.
    pub fn verify(&self, info: &NarInfo) -> bool {
        self.verify_signatures(&info.fingerprint(), &info.sigs)
    }

    /// True when at least one of `sigs` (`name:base64`) is by a trusted key over `fingerprint`.
    pub fn verify_signatures(&self, fingerprint: &str, sigs: &[String]) -> bool {
        sigs.iter().any(|sig| {
            let Some((name, b64)) = sig.split_once(':') else {
                return false;
            };
            let Some(key) = self.keys.get(name) else {
                return false;
            };
            let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(b64) else {
                return false;
            };
            let Ok(signature) = Signature::from_slice(&bytes) else {
                return false;
            };
            key.verify_strict(fingerprint.as_bytes(), &signature)
                .is_ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    const SAMPLE: &str = "StorePath: /nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-hello-2.12\n\
URL: nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz\n\
Compression: xz\n\
FileHash: sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3\n\
FileSize: 50088\n\
NarHash: sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\n\
NarSize: 226560\n\
References: 0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-hello-2.12 1w1fff338fvdw53sqgamddn1b2xgds47-glibc-2.35\n\
Deriver: 3zzz-hello-2.12.drv\n";

    #[test]
    fn parses_fields_and_makes_the_fingerprint() {
        let info = NarInfo::parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!(info.hash_part(), "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr");
        assert_eq!(info.compression, "xz");
        assert_eq!(info.file_size, Some(50088));
        assert_eq!(
            info.fingerprint(),
            "1;/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-hello-2.12;\
sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73;226560;\
/nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-hello-2.12,\
/nix/store/1w1fff338fvdw53sqgamddn1b2xgds47-glibc-2.35"
        );
    }

    #[test]
    fn compression_defaults_to_bzip2_and_hex_narhash_is_accepted() {
        let text = "StorePath: /nix/store/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-x\nURL: nar/0mdqa9w1p6cmli6976v4wi0sw9r4p5pr.nar\n\
NarHash: sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\nNarSize: 0\nReferences: \n";
        let info = NarInfo::parse(text.as_bytes()).unwrap();
        assert_eq!(info.compression, "bzip2");
        assert!(info.references.is_empty());
        assert!(info.file_hash.is_none());
    }

    #[test]
    fn rejects_malformed_narinfos() {
        let cases = [
            ("URL: x\n", NarInfoError::Missing("StorePath")),
            ("garbage\n", NarInfoError::BadLine(1)),
            (
                "StorePath: /nix/store/short\nURL: a\nNarHash: sha256:00\nNarSize: 1\n",
                NarInfoError::Malformed("StorePath"),
            ),
        ];
        for (text, err) in cases {
            assert_eq!(NarInfo::parse(text.as_bytes()).unwrap_err(), err);
        }
        let bad_size = SAMPLE.replace("NarSize: 226560", "NarSize: -1");
        assert_eq!(
            NarInfo::parse(bad_size.as_bytes()).unwrap_err(),
            NarInfoError::Malformed("NarSize")
        );
        let twice = format!("{SAMPLE}NarSize: 1\n");
        assert_eq!(
            NarInfo::parse(twice.as_bytes()).unwrap_err(),
            NarInfoError::Repeated("NarSize")
        );
        let escape = SAMPLE.replace(
            "References: 0mdqa9w1p6cmli6976v4wi0sw9r4p5pr-hello-2.12",
            "References: ../../etc",
        );
        assert!(NarInfo::parse(escape.as_bytes()).is_err());
    }

    #[test]
    fn signatures_verify_only_with_a_trusted_key_over_the_exact_fingerprint() {
        let signing = SigningKey::from_bytes(&[7u8; 32]);
        let public =
            base64::engine::general_purpose::STANDARD.encode(signing.verifying_key().as_bytes());
        let info = NarInfo::parse(SAMPLE.as_bytes()).unwrap();
        let sig = base64::engine::general_purpose::STANDARD
            .encode(signing.sign(info.fingerprint().as_bytes()).to_bytes());
        let signed = NarInfo::parse(format!("{SAMPLE}Sig: test-1:{sig}\n").as_bytes()).unwrap();

        let trusted = TrustedKeys::parse(&[format!("test-1:{public}")]).unwrap();
        assert!(trusted.verify(&signed));
        let other_name = TrustedKeys::parse(&[format!("other-1:{public}")]).unwrap();
        assert!(!other_name.verify(&signed));
        let mut tampered = signed.clone();
        tampered.nar_size += 1;
        assert!(!trusted.verify(&tampered));
        assert!(!trusted.verify(&info));
        assert!(TrustedKeys::parse(&["nocolon"]).is_err());
        assert!(TrustedKeys::parse(&["k:AAAA"]).is_err());
    }

    #[test]
    fn replace_url_changes_only_the_url_line() {
        let out = replace_url(SAMPLE, "nar/local.nar.xz");
        assert!(out.contains("\nURL: nar/local.nar.xz\n"));
        assert_eq!(out.lines().count(), SAMPLE.lines().count());
        assert_eq!(
            out.replace("URL: nar/local.nar.xz", ""),
            SAMPLE.replace(
                "URL: nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz",
                ""
            )
        );
    }
}
