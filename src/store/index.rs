//! The redb index: which narinfos and NAR files the cache holds.
//!
//! Two tables. `narinfos`: `<partition>\n<hash>` -> the narinfo text as served and when it was
//! fetched. `nars`: the local NAR key (`nar/<file>[?query]`) -> where it comes from, what its
//! narinfo promised, and, only once the bytes are verified, fsynced and renamed into place,
//! the stored file's size and SHA-256. A row never points at bytes that are not there.

use std::path::Path;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use super::check::Expected;

const NARINFOS: TableDefinition<&str, &[u8]> = TableDefinition::new("narinfos");
const NARS: TableDefinition<&str, &[u8]> = TableDefinition::new("nars");

#[derive(Debug, Clone)]
pub struct NarInfoRow {
    pub text: String,
    pub fetched: u64,
}

impl NarInfoRow {
    /// 8 bytes of fetch time (little endian), then the text: read on every narinfo hit, so
    /// no JSON.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.text.len());
        out.extend_from_slice(&self.fetched.to_le_bytes());
        out.extend_from_slice(self.text.as_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<NarInfoRow> {
        let (time, text) = bytes.split_at_checked(8)?;
        Some(NarInfoRow {
            fetched: u64::from_le_bytes(time.try_into().ok()?),
            text: std::str::from_utf8(text).ok()?.to_string(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NarRow {
    pub upstream: String,
    /// The absolute upstream URL of the file.
    pub source: String,
    pub expected: Expected,
    pub blob: Option<Blob>,
    pub last_access: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    pub size: u64,
    pub sha256: String,
}

pub struct Index {
    db: Database,
}

pub type IndexError = String;

fn err(e: impl std::fmt::Display) -> IndexError {
    format!("cache index: {e}")
}

pub fn narinfo_key(partition: &str, hash: &str) -> String {
    format!("{partition}\n{hash}")
}

impl Index {
    pub fn open(path: &Path) -> Result<Index, IndexError> {
        let db = Database::create(path).map_err(err)?;
        let txn = db.begin_write().map_err(err)?;
        txn.open_table(NARINFOS).map_err(err)?;
        txn.open_table(NARS).map_err(err)?;
        txn.commit().map_err(err)?;
        Ok(Index { db })
    }

    pub fn narinfo(&self, key: &str) -> Result<Option<NarInfoRow>, IndexError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(NARINFOS).map_err(err)?;
        let row = table.get(key).map_err(err)?;
        Ok(row.and_then(|v| NarInfoRow::decode(v.value())))
    }

    pub fn nar(&self, key: &str) -> Result<Option<NarRow>, IndexError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(NARS).map_err(err)?;
        let row = table.get(key).map_err(err)?;
        Ok(row.and_then(|v| serde_json::from_slice(v.value()).ok()))
    }

    /// Stores a narinfo and the NAR it points to, in one durable transaction. A NAR row that
    /// already promises the same bytes keeps its stored file; one that promises other bytes
    /// loses it (returned, for the caller to delete; the NAR will be fetched again).
    pub fn put_narinfo(
        &self,
        narinfo_key: &str,
        row: &NarInfoRow,
        nar_key: &str,
        nar: NarRow,
    ) -> Result<Option<Blob>, IndexError> {
        let txn = self.db.begin_write().map_err(err)?;
        let dropped = {
            let mut infos = txn.open_table(NARINFOS).map_err(err)?;
            infos
                .insert(narinfo_key, row.encode().as_slice())
                .map_err(err)?;
            let mut nars = txn.open_table(NARS).map_err(err)?;
            let old: Option<NarRow> = nars
                .get(nar_key)
                .map_err(err)?
                .and_then(|v| serde_json::from_slice(v.value()).ok());
            let (merged, dropped) = match old {
                Some(old) if old.expected == nar.expected => (
                    NarRow {
                        blob: old.blob,
                        last_access: old.last_access,
                        ..nar
                    },
                    None,
                ),
                Some(old) => (nar, old.blob),
                None => (nar, None),
            };
            nars.insert(nar_key, serde_json::to_vec(&merged).unwrap().as_slice())
                .map_err(err)?;
            dropped
        };
        txn.commit().map_err(err)?;
        Ok(dropped)
    }

    /// Records that the NAR's bytes are now stored (called after fsync and rename).
    pub fn set_blob(&self, nar_key: &str, blob: Option<Blob>, now: u64) -> Result<(), IndexError> {
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut nars = txn.open_table(NARS).map_err(err)?;
            let old: Option<NarRow> = nars
                .get(nar_key)
                .map_err(err)?
                .and_then(|v| serde_json::from_slice(v.value()).ok());
            if let Some(mut row) = old {
                row.blob = blob;
                row.last_access = now;
                nars.insert(nar_key, serde_json::to_vec(&row).unwrap().as_slice())
                    .map_err(err)?;
            }
        }
        txn.commit().map_err(err)
    }

    /// Drops the stored-file part of many rows at once (eviction, recovery, verify).
    pub fn clear_blobs(&self, keys: &[String]) -> Result<(), IndexError> {
        if keys.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(err)?;
        {
            let mut nars = txn.open_table(NARS).map_err(err)?;
            for key in keys {
                let old: Option<NarRow> = nars
                    .get(key.as_str())
                    .map_err(err)?
                    .and_then(|v| serde_json::from_slice(v.value()).ok());
                if let Some(mut row) = old {
                    row.blob = None;
                    nars.insert(key.as_str(), serde_json::to_vec(&row).unwrap().as_slice())
                        .map_err(err)?;
                }
            }
        }
        txn.commit().map_err(err)
    }

    /// Writes remembered access times (not durable: losing them only skews LRU order).
    pub fn touch(&self, touched: &[(String, u64)]) -> Result<(), IndexError> {
        if touched.is_empty() {
            return Ok(());
        }
        let mut txn = self.db.begin_write().map_err(err)?;
        txn.set_durability(redb::Durability::None);
        {
            let mut nars = txn.open_table(NARS).map_err(err)?;
            for (key, at) in touched {
                let old: Option<NarRow> = nars
                    .get(key.as_str())
                    .map_err(err)?
                    .and_then(|v| serde_json::from_slice(v.value()).ok());
                if let Some(mut row) = old {
                    row.last_access = row.last_access.max(*at);
                    nars.insert(key.as_str(), serde_json::to_vec(&row).unwrap().as_slice())
                        .map_err(err)?;
                }
            }
        }
        txn.commit().map_err(err)
    }

    /// Every NAR row that has a stored file.
    pub fn stored_nars(&self) -> Result<Vec<(String, NarRow)>, IndexError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(NARS).map_err(err)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(err)? {
            let (k, v) = item.map_err(err)?;
            if let Ok(row) = serde_json::from_slice::<NarRow>(v.value()) {
                if row.blob.is_some() {
                    out.push((k.value().to_string(), row));
                }
            }
        }
        Ok(out)
    }

    pub fn counts(&self) -> Result<(u64, u64), IndexError> {
        let txn = self.db.begin_read().map_err(err)?;
        let infos = txn.open_table(NARINFOS).map_err(err)?.len().map_err(err)?;
        let nars = txn.open_table(NARS).map_err(err)?.len().map_err(err)?;
        Ok((infos, nars))
    }
}
