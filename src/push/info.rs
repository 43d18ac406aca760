//! What an upload needs to know about a store path, from a narinfo Nix uploaded or from the
//! local Nix store (`nix path-info --json`), in the forms the upload protocols want.

use serde::{Deserialize, Serialize};

use super::error::PathInfoError;
use crate::nix::hash::Sha256;
use crate::nix::narinfo::{self, is_store_basename, NarInfo};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathInfo {
    /// `/nix/store/<hash>-<name>`.
    pub store_path: String,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    /// Base names (`<hash>-<name>`), as narinfo files and Attic write them.
    pub references: Vec<String>,
    pub deriver: Option<String>,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
}

impl PathInfo {
    pub fn from_narinfo(info: &NarInfo, text: &str) -> PathInfo {
        PathInfo {
            store_path: info.store_path.clone(),
            nar_hash: info.nar_hash,
            nar_size: info.nar_size,
            references: info.references.clone(),
            deriver: narinfo::field(text, "Deriver")
                .filter(|d| is_store_basename(d))
                .map(str::to_string),
            sigs: info.sigs.clone(),
            ca: narinfo::field(text, "CA").map(str::to_string),
        }
    }

    /// What a signature signs.
    pub fn fingerprint(&self) -> String {
        narinfo::fingerprint(
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }

    /// The 32-character hash part.
    pub fn hash(&self) -> &str {
        let base = self.base_name();
        &base[..32.min(base.len())]
    }

    pub fn base_name(&self) -> &str {
        self.store_path.rsplit('/').next().unwrap_or("")
    }

    /// The name of a key in `names` that signed this path, if any.
    pub fn signed_by<'a>(&self, names: &'a [String]) -> Option<&'a str> {
        names
            .iter()
            .find(|name| {
                self.sigs
                    .iter()
                    .any(|sig| sig.split_once(':').is_some_and(|(n, _)| n == name.as_str()))
            })
            .map(String::as_str)
    }

    /// Attic's `X-Attic-Nar-Info` JSON for `cache`.
    pub fn attic_json(&self, cache: &str) -> serde_json::Value {
        serde_json::json!({
            "cache": cache,
            "store_path_hash": self.hash(),
            "store_path": self.store_path,
            "references": self.references,
            "system": null,
            "deriver": self.deriver,
            "sigs": self.sigs,
            "ca": self.ca,
            "nar_hash": format!("sha256:{}", self.nar_hash.to_hex()),
            "nar_size": self.nar_size,
        })
    }

    /// A narinfo for the uncompressed NAR at `url` (an upload to a plain HTTP cache).
    pub fn narinfo_uncompressed(&self, url: &str) -> String {
        let mut text = format!(
            "StorePath: {}\nURL: {url}\nCompression: none\nFileHash: {hash}\nFileSize: {size}\nNarHash: {hash}\nNarSize: {size}\nReferences: {}\n",
            self.store_path,
            self.references.join(" "),
            hash = self.nar_hash.to_nix_string(),
            size = self.nar_size,
        );
        if let Some(deriver) = &self.deriver {
            text.push_str(&format!("Deriver: {deriver}\n"));
        }
        for sig in &self.sigs {
            text.push_str(&format!("Sig: {sig}\n"));
        }
        if let Some(ca) = &self.ca {
            text.push_str(&format!("CA: {ca}\n"));
        }
        text
    }
}

/// Reads `nix path-info --json` output: an array of objects with `path` (Nix up to 2.18) or
/// an object keyed by path (later), `narHash` as `sha256:<base32>` or SRI, full reference
/// paths. Paths Nix reports as invalid are left out.
pub fn parse_path_info_json(json: &[u8]) -> Result<Vec<PathInfo>, PathInfoError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Row {
        path: Option<String>,
        nar_hash: Option<String>,
        nar_size: Option<u64>,
        #[serde(default)]
        references: Vec<String>,
        deriver: Option<String>,
        #[serde(default)]
        signatures: Vec<String>,
        ca: Option<String>,
        valid: Option<bool>,
    }
    let value: serde_json::Value = serde_json::from_slice(json)?;
    let rows: Vec<(Option<String>, serde_json::Value)> = match value {
        serde_json::Value::Array(items) => items.into_iter().map(|v| (None, v)).collect(),
        serde_json::Value::Object(map) => map.into_iter().map(|(k, v)| (Some(k), v)).collect(),
        _ => return Err(PathInfoError::Shape("neither a list nor an object".into())),
    };
    let base = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
    let mut out = Vec::new();
    for (key, value) in rows {
        if value.is_null() {
            continue; // an invalid path, in the keyed format
        }
        let row: Row = serde_json::from_value(value)?;
        if row.valid == Some(false) {
            continue;
        }
        let store_path = row
            .path
            .or(key)
            .ok_or_else(|| PathInfoError::Shape("an entry without a path".into()))?;
        let nar_hash = row
            .nar_hash
            .as_deref()
            .and_then(Sha256::parse)
            .ok_or_else(|| {
                PathInfoError::Shape(format!("{store_path} without a usable narHash"))
            })?;
        out.push(PathInfo {
            nar_size: row
                .nar_size
                .ok_or_else(|| PathInfoError::Shape(format!("{store_path} without narSize")))?,
            references: row.references.iter().map(|r| base(r)).collect(),
            deriver: row.deriver.as_deref().map(base),
            sigs: row.signatures,
            ca: row.ca,
            nar_hash,
            store_path,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "/nix/store/0a2jys1ybdr4l3fjvfib5j5l0k3g5aky-a";
    const B: &str = "/nix/store/1b2jys1ybdr4l3fjvfib5j5l0k3g5aky-b";

    #[test]
    fn reads_both_json_formats_of_nix_path_info() {
        let old = format!(
            r#"[{{"path":"{A}","narHash":"sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s","narSize":120,"references":["{A}","{B}"],"deriver":"/nix/store/2c2jys1ybdr4l3fjvfib5j5l0k3g5aky-a.drv","signatures":["k-1:c2ln"],"valid":true}}]"#
        );
        let new = format!(
            r#"{{"{A}":{{"narHash":"sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=","narSize":120,"references":["{B}"],"deriver":null,"signatures":[],"ca":null}},"{B}":null}}"#
        );
        let old = parse_path_info_json(old.as_bytes()).unwrap();
        assert_eq!(old[0].references, [&A[11..], &B[11..]]);
        assert_eq!(
            old[0].deriver.as_deref(),
            Some("2c2jys1ybdr4l3fjvfib5j5l0k3g5aky-a.drv")
        );
        assert_eq!(old[0].signed_by(&["k-1".into()]), Some("k-1"));
        let new = parse_path_info_json(new.as_bytes()).unwrap();
        assert_eq!(new.len(), 1, "the invalid path is left out");
        assert_eq!(new[0].store_path, A);
        assert_eq!(new[0].hash(), "0a2jys1ybdr4l3fjvfib5j5l0k3g5aky");
        assert!(parse_path_info_json(b"[{\"path\":\"x\"}]").is_err());
    }
}
