//! The rows of the index's tables and how they are encoded.

use serde::{Deserialize, Serialize};

use crate::store::Expected;

#[derive(Debug, Clone)]
pub struct NarInfoRow {
    pub text: String,
    pub fetched: u64,
}

impl NarInfoRow {
    /// 8 bytes of fetch time (little endian), then the text: read on every narinfo hit, so
    /// no JSON.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.text.len());
        out.extend_from_slice(&self.fetched.to_le_bytes());
        out.extend_from_slice(self.text.as_bytes());
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<NarInfoRow> {
        let (time, text) = bytes.split_at_checked(8)?;
        Some(NarInfoRow {
            fetched: u64::from_le_bytes(time.try_into().ok()?),
            text: std::str::from_utf8(text).ok()?.to_string(),
        })
    }
}

/// Where a NAR comes from and what it must be, from the narinfo that named it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NarSource {
    pub upstream: String,
    /// The absolute upstream URL of the file.
    pub url: String,
    pub expected: Expected,
}

/// A NAR the index knows, and its stored file if there is one.
#[derive(Debug, Clone)]
pub struct NarRow {
    pub source: NarSource,
    pub blob: Option<Blob>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub size: u64,
    /// Hex SHA-256 of the file as stored.
    pub sha256: String,
    pub last_access: u64,
}

impl Blob {
    /// Size and last access (8 bytes each, little endian), then the hex SHA-256.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.sha256.len());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.last_access.to_le_bytes());
        out.extend_from_slice(self.sha256.as_bytes());
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<Blob> {
        let (size, rest) = bytes.split_at_checked(8)?;
        let (last_access, sha256) = rest.split_at_checked(8)?;
        Some(Blob {
            size: u64::from_le_bytes(size.try_into().ok()?),
            last_access: u64::from_le_bytes(last_access.try_into().ok()?),
            sha256: std::str::from_utf8(sha256).ok()?.to_string(),
        })
    }
}

/// One narinfo to record with the NAR it names.
pub struct NewNarInfo {
    pub(super) key: String,
    pub(super) row: NarInfoRow,
    pub(super) nar_key: String,
    pub(super) nar: NarSource,
}

impl NewNarInfo {
    pub fn text(&self) -> &str {
        &self.row.text
    }

    /// A narinfo fetched now for `partition`, whose NAR is known locally as `nar_key`.
    pub fn new(partition: &str, hash: &str, text: &str, nar_key: &str, nar: NarSource) -> Self {
        NewNarInfo {
            key: narinfo_key(partition, hash),
            row: NarInfoRow {
                text: text.to_string(),
                fetched: crate::store::unix_now(),
            },
            nar_key: nar_key.to_string(),
            nar,
        }
    }
}

/// The database behind the index; replaced when an I/O error (a full disk) has poisoned it,
/// since redb then answers every call with "Previous I/O error" until it is reopened.
/// `nar/<digest of the source>-<file>`: a name of its own for a NAR whose usual name is taken.
pub(super) fn derived_nar_key(nar_key: &str, encoded_source: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(encoded_source);
    let tag = crate::nix::hash::hex(&digest[..8]);
    let file = nar_key
        .strip_prefix("nar/")
        .unwrap_or(nar_key)
        .split('?')
        .next()
        .unwrap_or_default();
    let file: String = file.chars().take(200).collect();
    format!("nar/{tag}-{file}")
}

pub fn narinfo_key(partition: &str, hash: &str) -> String {
    format!("{partition}\n{hash}")
}

pub(super) fn decode_source(bytes: &[u8]) -> Option<NarSource> {
    serde_json::from_slice(bytes).ok()
}
