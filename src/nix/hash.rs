//! SHA-256 hashes as narinfo files write them: `sha256:<nixbase32>` (Nix), `sha256:<hex>`
//! (Attic) and SRI `sha256-<base64>`. All three name the same 32 bytes.

use base64::Engine;

use super::base32;

/// Lower-case hexadecimal of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    pub fn parse(text: &str) -> Option<Sha256> {
        let bytes = if let Some(rest) = text.strip_prefix("sha256:") {
            match rest.len() {
                52 => base32::decode(rest, 32)?,
                64 => decode_hex(rest)?,
                _ => return None,
            }
        } else if let Some(rest) = text.strip_prefix("sha256-") {
            base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()?
        } else {
            return None;
        };
        Some(Sha256(bytes.try_into().ok()?))
    }

    /// `sha256:<nixbase32>`, the form signatures are made over.
    pub fn to_nix_string(&self) -> String {
        format!("sha256:{}", base32::encode(&self.0))
    }

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// From 64 hexadecimal digits (the form the cache index keeps).
    pub fn from_hex(text: &str) -> Option<Sha256> {
        (text.len() == 64)
            .then(|| decode_hex(text))
            .flatten()
            .and_then(|bytes| Some(Sha256(bytes.try_into().ok()?)))
    }
}

/// Kept (in the cache index) as 64 hexadecimal digits.
impl serde::Serialize for Sha256 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for Sha256 {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Sha256, D::Error> {
        let text = String::deserialize(deserializer)?;
        Sha256::from_hex(&text).ok_or_else(|| serde::de::Error::custom("not a hex SHA-256"))
    }
}

impl std::fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_nix_string())
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || !text.is_ascii() {
        return None;
    }
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn three_spellings_parse_to_the_same_hash() {
        let nix =
            Sha256::parse("sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73").unwrap();
        let hex = Sha256::parse(&format!("sha256:{HEX}")).unwrap();
        let sri = Sha256::parse("sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=").unwrap();
        assert_eq!(nix, hex);
        assert_eq!(nix, sri);
        assert_eq!(hex.to_hex(), HEX);
        assert_eq!(
            hex.to_nix_string(),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
    }

    #[test]
    fn rejects_other_algorithms_and_lengths() {
        for bad in [
            "md5:abc",
            "sha256:",
            "sha256:zz",
            "sha256-AAAA",
            "sha512:00",
            HEX,
        ] {
            assert!(Sha256::parse(bad).is_none(), "{bad}");
        }
    }
}
