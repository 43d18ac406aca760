//! The upload queue on disk (`push.redb` in the cache directory): one row per path and
//! upstream, written with a durable commit before a push is acknowledged, removed once the
//! upstream has the path. A path that failed for good keeps its row, with the reason, until
//! it is pushed again. Nothing about an upload in progress is written: after a crash it is
//! simply queued, and the upstream's "already have it" answer keeps it from being sent twice.

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::info::PathInfo;

/// `<upstream>\t<hash>` -> the entry as JSON (rows are written once or twice per path).
const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("push");

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Order of arrival: among paths whose references are all up, the oldest goes first.
    pub seq: u64,
    pub upstream: String,
    pub info: PathInfo,
    pub origin: Origin,
    /// Why it failed for good; `None` while it is waiting or being uploaded.
    pub failed: Option<String>,
}

impl Entry {
    pub fn key(&self) -> String {
        key(&self.upstream, self.info.hash())
    }
}

pub fn key(upstream: &str, hash: &str) -> String {
    format!("{upstream}\t{hash}")
}

/// Where the NAR's bytes are read from at upload time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// The local Nix store (`nix-store --dump`).
    Store,
    /// A file Nix uploaded to us (`PUT /nar/<file>`), kept in the staging directory until
    /// every upstream has it, with the narinfo Nix uploaded beside it.
    Staged {
        file: String,
        compression: String,
        narinfo: String,
    },
}

pub struct Queue {
    db: Database,
}

type Result<T> = std::result::Result<T, QueueError>;
use super::error::{db as err, QueueError};

impl Queue {
    pub fn open(path: &Path) -> Result<Queue> {
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => QueueError::InUse(path.to_path_buf()),
            e => err(e),
        })?;
        // What is queued (store paths, narinfos) is this machine's business only.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|source| QueueError::File {
                path: path.to_path_buf(),
                source,
            })?;
        let txn = db.begin_write().map_err(err)?;
        txn.open_table(ENTRIES).map_err(err)?;
        txn.commit().map_err(err)?;
        Ok(Queue { db })
    }

    pub fn all(&self) -> Result<Vec<Entry>> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(ENTRIES).map_err(err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            match serde_json::from_slice::<Entry>(v.value()) {
                Ok(entry) => out.push(entry),
                Err(e) => {
                    tracing::warn!(key = k.value(), error = %e, "unreadable push queue row left alone")
                }
            }
        }
        out.sort_by_key(|e| e.seq);
        Ok(out)
    }

    /// Adds `entries` (numbered after everything queued) in one durable commit. A path
    /// already waiting keeps its place; one that had failed for good is queued again. The
    /// entries as queued (new or already there), in the order given.
    pub fn add(&self, entries: Vec<Entry>) -> Result<Vec<Entry>> {
        let txn = self.db.begin_write().map_err(err)?;
        let mut out = Vec::with_capacity(entries.len());
        {
            let mut table = txn.open_table(ENTRIES).map_err(err)?;
            let mut next = max_seq(&table)? + 1;
            for mut entry in entries {
                let key = entry.key();
                let existing = table
                    .get(key.as_str())
                    .map_err(err)?
                    .and_then(|v| serde_json::from_slice::<Entry>(v.value()).ok());
                if let Some(waiting) = existing.filter(|e| e.failed.is_none()) {
                    out.push(waiting);
                    continue;
                }
                entry.seq = next;
                entry.failed = None;
                next += 1;
                let json = serde_json::to_vec(&entry)?;
                table.insert(key.as_str(), json.as_slice()).map_err(err)?;
                out.push(entry);
            }
        }
        txn.commit().map_err(err)?;
        Ok(out)
    }

    /// The upstream has the path: its row goes.
    pub fn remove(&self, key: &str) -> Result<()> {
        let txn = self.db.begin_write().map_err(err)?;
        txn.open_table(ENTRIES)
            .map_err(err)?
            .remove(key)
            .map_err(err)?;
        txn.commit().map_err(err)
    }

    /// Records that `entry` failed for good, and why.
    pub fn fail(&self, entry: &Entry, reason: &str) -> Result<()> {
        let failed = Entry {
            failed: Some(reason.to_string()),
            ..entry.clone()
        };
        let txn = self.db.begin_write().map_err(err)?;
        {
            let json = serde_json::to_vec(&failed)?;
            let mut table = txn.open_table(ENTRIES).map_err(err)?;
            table
                .insert(failed.key().as_str(), json.as_slice())
                .map_err(err)?;
        }
        txn.commit().map_err(err)
    }
}

fn max_seq(table: &redb::Table<&str, &[u8]>) -> Result<u64> {
    let mut max = 0;
    for row in table.iter().map_err(err)? {
        let (_, v) = row.map_err(err)?;
        if let Ok(entry) = serde_json::from_slice::<Entry>(v.value()) {
            max = max.max(entry.seq);
        }
    }
    Ok(max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::hash::Sha256;

    fn entry(upstream: &str, hash: &str) -> Entry {
        Entry {
            seq: 0,
            upstream: upstream.into(),
            info: PathInfo {
                store_path: format!("/nix/store/{hash}-x"),
                nar_hash: Sha256([1; 32]),
                nar_size: 1,
                references: vec![],
                deriver: None,
                sigs: vec![],
                ca: None,
            },
            origin: Origin::Store,
            failed: None,
        }
    }

    #[test]
    fn rows_survive_reopening_keep_their_place_and_failures_requeue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("push.redb");
        let a = "0a2jys1ybdr4l3fjvfib5j5l0k3g5aky";
        let b = "1b2jys1ybdr4l3fjvfib5j5l0k3g5aky";
        {
            let queue = Queue::open(&path).unwrap();
            let added = queue.add(vec![entry("up", a), entry("up", b)]).unwrap();
            assert_eq!((added[0].seq, added[1].seq), (1, 2));
            queue.fail(&added[0], "HTTP 403").unwrap();
        }
        let queue = Queue::open(&path).unwrap();
        let all = queue.all().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].failed.as_deref(), Some("HTTP 403"));
        let again = queue.add(vec![entry("up", b), entry("up", a)]).unwrap();
        assert_eq!(again[0].seq, 2, "b was waiting: it keeps its place");
        assert_eq!(
            (again[1].seq, again[1].failed.as_deref()),
            (3, None),
            "a is queued again"
        );
        queue.remove(&key("up", b)).unwrap();
        assert_eq!(queue.all().unwrap().len(), 1);
    }
}
