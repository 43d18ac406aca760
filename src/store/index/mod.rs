//! The redb index: which narinfos and NAR files the cache holds.
//!
//! Three tables. `narinfo`: `<partition>\n<hash>` -> the narinfo text as served and when it
//! was fetched. `nar`: the local NAR key (`nar/<file>[?query]`) -> where it comes from and
//! what its narinfo promised. `blob`: the NAR key -> the stored file's size, SHA-256 and last
//! access, written only once the bytes are verified, fsynced and renamed into place, so a
//! row never points at bytes that are not there. Start-up, eviction and `cache stats` scan
//! `blob` only: its size follows the files on disk, not the million narinfos beside them.
//!
//! Commits skip the fsync; a flusher thread makes them durable within [`FLUSH_AFTER`], in one
//! durable commit that also saves redb's allocator state (quick repair: after a crash the index
//! opens at once instead of being walked whole, which takes seconds at a million rows). Waiting
//! for the disk on every commit made a cold narinfo lookup five times slower, and the durable
//! commit of every stored NAR a quarter of the cold path's CPU (real Nix, bench scenario 6).
//!
//! A crash inside the window loses the last index changes, nothing else: a file is fsynced and
//! renamed before its row is written, so no durable row points at bytes that are not there; a
//! file whose row was lost is a leftover the next start removes; a row whose file was removed
//! is dropped by the same check. A NAR that Nix asks for by a lost narinfo is passed through
//! unverified and not stored (Nix checks its NarHash itself).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::Expected;

mod durability;
mod rows;

use durability::{spawn_flusher, Unflushed};
use rows::{decode_source, derived_nar_key};
pub use rows::{narinfo_key, Blob, NarInfoRow, NarRow, NarSource, NewNarInfo};

const NARINFOS: TableDefinition<&str, &[u8]> = TableDefinition::new("narinfo");
const NARS: TableDefinition<&str, &[u8]> = TableDefinition::new("nar");
const BLOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("blob");
/// Pinned NAR keys and until when (unix seconds; `u64::MAX`: until unpinned).
const PINS: TableDefinition<&str, u64> = TableDefinition::new("pin");
/// Tables of earlier versions, dropped at open (their files become leftovers).
const RETIRED: [&str; 2] = ["narinfos", "nars"];

/// Lazy commits are made durable this soon.
pub const FLUSH_AFTER: Duration = Duration::from_millis(100);

type Slot = Arc<RwLock<Arc<Database>>>;

pub struct Index {
    db: Slot,
    /// The index file (None: it lives in memory).
    path: Option<PathBuf>,
    /// Set when the database was reopened: rows committed lazily since the last durable
    /// commit are gone, so the store recounts its files.
    reopened: AtomicBool,
    /// Some commit since the last durable one skipped the fsync.
    unflushed: Arc<Unflushed>,
    /// Joined when the index closes, so the database is closed when `Index` is dropped.
    flusher: Option<std::thread::JoinHandle<()>>,
}

use super::error::db as err;
pub use super::error::IndexError;

/// Why the index could not be opened: the caller says which directory is in use.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the cache index is locked by another process")]
    InUse,
    #[error(transparent)]
    Other(IndexError),
}

impl Index {
    /// Opens the index at `path`. One that cannot be read (corrupt, another format) is moved
    /// aside to `index.redb.broken` and started afresh; when no index file can be written at
    /// all (a full disk), the index lives in memory until the next start, and says so.
    pub fn open(path: &Path) -> Result<Index, OpenError> {
        let existed = path.exists();
        let error = match Index::with_db(Database::create(path), Some(path)) {
            Ok(index) => return Ok(index),
            Err(e) if matches!(*e, redb::Error::DatabaseAlreadyOpen) => {
                return Err(OpenError::InUse)
            }
            Err(e) => e,
        };
        if existed && unreadable(&error) {
            let aside = path.with_extension("redb.broken");
            tracing::warn!(error = %error, moved_to = %aside.display(), "cache index is unreadable; starting a new one");
            if std::fs::rename(path, &aside).is_ok() {
                if let Ok(index) = Index::with_db(Database::create(path), Some(path)) {
                    return Ok(index);
                }
            }
        }
        tracing::warn!(
            error = %error,
            path = %path.display(),
            "cannot write the cache index (disk full?): keeping it in memory until restart"
        );
        Index::with_db(in_memory(), None).map_err(|e| OpenError::Other(e.into()))
    }

    fn with_db(
        db: Result<Database, redb::DatabaseError>,
        path: Option<&Path>,
    ) -> Result<Index, Box<redb::Error>> {
        let boxed = |e: redb::Error| Box::new(e);
        let db = Arc::new(db.map_err(|e| boxed(e.into()))?);
        prepare_tables(&db)?;
        let db = Arc::new(RwLock::new(db));
        let unflushed = Arc::new(Unflushed::default());
        let flusher = spawn_flusher(&db, &unflushed).map_err(|e| boxed(e.into()))?;
        Ok(Index {
            db,
            path: path.map(Path::to_path_buf),
            reopened: AtomicBool::new(false),
            unflushed,
            flusher: Some(flusher),
        })
    }

    fn db(&self) -> Arc<Database> {
        self.db.read().unwrap().clone()
    }

    /// Whether the database was reopened since the last call (see `reopened`).
    pub fn take_reopened(&self) -> bool {
        self.reopened.swap(false, Ordering::SeqCst)
    }

    /// After `error`, reopens a database that an I/O error poisoned (or, when its file cannot
    /// be opened again, goes on in memory until restart). Returns whether it did.
    fn reopen_after(&self, error: &redb::Error) -> bool {
        if !matches!(error, redb::Error::PreviousIo | redb::Error::Io(_)) {
            return false;
        }
        let Some(path) = &self.path else {
            return false;
        };
        let mut slot = self.db.write().unwrap();
        if begin_write(&slot).is_ok() {
            return true; // another caller reopened it meanwhile
        }
        tracing::warn!(error = %error, "cache index hit an I/O error (disk full?); reopening it");
        let Ok(memory) = in_memory() else {
            return false;
        };
        drop(std::mem::replace(&mut *slot, Arc::new(memory)));
        // The old database closes (and lets go of its file lock) once its last reader ends.
        for _ in 0..200 {
            match Database::create(path) {
                Ok(db) if prepare_tables(&db).is_ok() => {
                    *slot = Arc::new(db);
                    self.reopened.store(true, Ordering::SeqCst);
                    return true;
                }
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => break,
            }
        }
        tracing::warn!(path = %path.display(), "cannot reopen the cache index: keeping it in memory until restart");
        let _ = prepare_tables(&slot);
        self.reopened.store(true, Ordering::SeqCst);
        true
    }

    fn commit_lazily(&self, mut txn: redb::WriteTransaction) -> Result<(), IndexError> {
        txn.set_durability(Durability::None);
        if let Err(e) = txn.commit() {
            let e = redb::Error::from(e);
            self.reopen_after(&e);
            return Err(err(e));
        }
        if !self.unflushed.lazy.swap(true, Ordering::SeqCst) {
            if let Some(flusher) = &self.flusher {
                flusher.thread().unpark();
            }
        }
        Ok(())
    }

    /// Makes every commit so far durable now (at shutdown).
    pub fn flush(&self) {
        if let Err(e) = self.unflushed.flush(&self.db()) {
            tracing::warn!(error = %e, "could not make the cache index durable");
        }
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction, IndexError> {
        match begin_write(&self.db()) {
            Err(e) if self.reopen_after(&e) => Ok(begin_write(&self.db())?),
            other => Ok(other?),
        }
    }

    fn begin_read(&self) -> Result<redb::ReadTransaction, IndexError> {
        match self.db().begin_read() {
            Ok(txn) => Ok(txn),
            Err(e) => {
                let e = redb::Error::from(e);
                if self.reopen_after(&e) {
                    self.db().begin_read().map_err(err)
                } else {
                    Err(err(e))
                }
            }
        }
    }

    pub fn narinfo(&self, key: &str) -> Result<Option<NarInfoRow>, IndexError> {
        let txn = self.begin_read()?;
        let table = txn.open_table(NARINFOS).map_err(err)?;
        let row = table.get(key).map_err(err)?;
        Ok(row.and_then(|v| NarInfoRow::decode(v.value())))
    }

    pub fn nar(&self, key: &str) -> Result<Option<NarRow>, IndexError> {
        let txn = self.begin_read()?;
        let nars = txn.open_table(NARS).map_err(err)?;
        let Some(source) = nars
            .get(key)
            .map_err(err)?
            .and_then(|v| decode_source(v.value()))
        else {
            return Ok(None);
        };
        let blobs = txn.open_table(BLOBS).map_err(err)?;
        let blob = blobs
            .get(key)
            .map_err(err)?
            .and_then(|v| Blob::decode(v.value()));
        Ok(Some(NarRow { source, blob }))
    }

    /// Stores narinfos and the NARs they point to, in one transaction; returns each
    /// narinfo's text as stored. A NAR name already recorded for other bytes or another source
    /// (another upstream naming its file alike, or an upstream that changed what a name
    /// holds) is not re-pointed: that would hand the first narinfo's clients the second's
    /// bytes. The newcomer gets a name of its own, derived from what it promises, and its
    /// text says so in `URL:` (which the signature does not cover).
    pub fn put_narinfos(&self, batch: &[NewNarInfo]) -> Result<Vec<String>, IndexError> {
        let txn = self.begin_write()?;
        let mut texts = Vec::with_capacity(batch.len());
        {
            let mut infos = txn.open_table(NARINFOS).map_err(err)?;
            let mut nars = txn.open_table(NARS).map_err(err)?;
            for new in batch {
                let encoded = serde_json::to_vec(&new.nar).expect("serializable");
                let mut nar_key = new.nar_key.clone();
                let holds_other = |nars: &redb::Table<&str, &[u8]>, key: &str| {
                    let old = nars.get(key).map_err(err)?;
                    Ok::<_, IndexError>(old.is_some_and(|v| v.value() != encoded.as_slice()))
                };
                if holds_other(&nars, &nar_key)? {
                    nar_key = derived_nar_key(&new.nar_key, &encoded);
                    if holds_other(&nars, &nar_key)? {
                        return Err(IndexError::Conflict("two NAR sources share a derived name"));
                    }
                }
                let mut row = new.row.clone();
                if nar_key != new.nar_key {
                    row.text = crate::nix::narinfo::replace_url(&row.text, &nar_key);
                }
                infos
                    .insert(new.key.as_str(), row.encode().as_slice())
                    .map_err(err)?;
                nars.insert(nar_key.as_str(), encoded.as_slice())
                    .map_err(err)?;
                texts.push(row.text);
            }
        }
        self.commit_lazily(txn)?;
        Ok(texts)
    }

    /// Records that the NAR's bytes are now stored (called after fsync and rename), if the
    /// NAR still promises what the bytes were verified against.
    pub fn set_blob(
        &self,
        nar_key: &str,
        verified_against: &Expected,
        blob: &Blob,
    ) -> Result<(), IndexError> {
        let txn = self.begin_write()?;
        {
            let nars = txn.open_table(NARS).map_err(err)?;
            let source = nars
                .get(nar_key)
                .map_err(err)?
                .and_then(|v| decode_source(v.value()));
            match source {
                None => return Err(IndexError::Conflict("the NAR is no longer known")),
                Some(source) if source.expected != *verified_against => {
                    return Err(IndexError::Conflict(
                        "a newer narinfo promises other bytes under this name",
                    ))
                }
                Some(_) => {}
            }
            let mut blobs = txn.open_table(BLOBS).map_err(err)?;
            blobs
                .insert(nar_key, blob.encode().as_slice())
                .map_err(err)?;
        }
        self.commit_lazily(txn)
    }

    /// Forgets the stored files of many NARs at once (eviction, recovery, verify); returns
    /// the rows that were there, so only what was really removed is counted.
    pub fn clear_blobs(&self, keys: &[String]) -> Result<Vec<(String, Blob)>, IndexError> {
        let mut removed = Vec::new();
        if keys.is_empty() {
            return Ok(removed);
        }
        let txn = self.begin_write()?;
        {
            let mut blobs = txn.open_table(BLOBS).map_err(err)?;
            for key in keys {
                let blob = blobs
                    .remove(key.as_str())
                    .map_err(err)?
                    .and_then(|v| Blob::decode(v.value()));
                removed.extend(blob.map(|b| (key.clone(), b)));
            }
        }
        self.commit_lazily(txn)?;
        Ok(removed)
    }

    /// Writes remembered access times.
    pub fn touch(&self, touched: &[(String, u64)]) -> Result<(), IndexError> {
        if touched.is_empty() {
            return Ok(());
        }
        let txn = self.begin_write()?;
        {
            let mut blobs = txn.open_table(BLOBS).map_err(err)?;
            for (key, at) in touched {
                let old = blobs
                    .get(key.as_str())
                    .map_err(err)?
                    .and_then(|v| Blob::decode(v.value()));
                if let Some(mut blob) = old {
                    blob.last_access = blob.last_access.max(*at);
                    blobs
                        .insert(key.as_str(), blob.encode().as_slice())
                        .map_err(err)?;
                }
            }
        }
        self.commit_lazily(txn)
    }

    /// Every stored file, by NAR key.
    pub fn blobs(&self) -> Result<Vec<(String, Blob)>, IndexError> {
        let txn = self.begin_read()?;
        let table = txn.open_table(BLOBS).map_err(err)?;
        let mut out = Vec::with_capacity(table.len().map_err(err)? as usize);
        for item in table.iter().map_err(err)? {
            let (k, v) = item.map_err(err)?;
            if let Some(blob) = Blob::decode(v.value()) {
                out.push((k.value().to_string(), blob));
            }
        }
        Ok(out)
    }

    /// Pins `keys` until `until` (a later pin of a key wins over an earlier, shorter one).
    pub fn pin(&self, keys: &[String], until: u64) -> Result<(), IndexError> {
        let txn = self.begin_write()?;
        {
            let mut pins = txn.open_table(PINS).map_err(err)?;
            for key in keys {
                let old = pins.get(key.as_str()).map_err(err)?.map(|v| v.value());
                pins.insert(key.as_str(), until.max(old.unwrap_or(0)))
                    .map_err(err)?;
            }
        }
        self.commit_lazily(txn)
    }

    /// Every pin: NAR key and until when.
    pub fn pins(&self) -> Result<Vec<(String, u64)>, IndexError> {
        let txn = self.begin_read()?;
        let table = txn.open_table(PINS).map_err(err)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(err)? {
            let (k, v) = item.map_err(err)?;
            out.push((k.value().to_string(), v.value()));
        }
        Ok(out)
    }

    /// Removes pins: `keys`, or all of them when `keys` is None; how many went.
    pub fn unpin(&self, keys: Option<&[String]>) -> Result<u64, IndexError> {
        let txn = self.begin_write()?;
        let removed = {
            let mut pins = txn.open_table(PINS).map_err(err)?;
            let keys: Vec<String> = match keys {
                Some(keys) => keys.to_vec(),
                None => {
                    let mut all = Vec::new();
                    for item in pins.iter().map_err(err)? {
                        all.push(item.map_err(err)?.0.value().to_string());
                    }
                    all
                }
            };
            let mut removed = 0;
            for key in &keys {
                removed += u64::from(pins.remove(key.as_str()).map_err(err)?.is_some());
            }
            removed
        };
        self.commit_lazily(txn)?;
        Ok(removed)
    }

    /// Narinfos, NARs and stored files known.
    pub fn counts(&self) -> Result<(u64, u64, u64), IndexError> {
        let txn = self.begin_read()?;
        let len = |def| -> Result<u64, IndexError> {
            txn.open_table(def).map_err(err)?.len().map_err(err)
        };
        Ok((len(NARINFOS)?, len(NARS)?, len(BLOBS)?))
    }
}

impl Drop for Index {
    fn drop(&mut self) {
        self.unflushed.closing.store(true, Ordering::SeqCst);
        if let Some(flusher) = self.flusher.take() {
            flusher.thread().unpark();
            let _ = flusher.join();
        }
        self.flush();
    }
}

fn in_memory() -> Result<Database, redb::DatabaseError> {
    Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())
}

/// Creates the tables and drops those of earlier versions (their files become leftovers).
fn prepare_tables(db: &Database) -> Result<(), Box<redb::Error>> {
    let boxed = |e: redb::Error| Box::new(e);
    let mut txn = begin_write(db)?;
    txn.set_quick_repair(true);
    for retired in RETIRED {
        txn.delete_table(TableDefinition::<&str, &[u8]>::new(retired))
            .map_err(|e| boxed(e.into()))?;
    }
    for table in [NARINFOS, NARS, BLOBS] {
        txn.open_table(table).map_err(|e| boxed(e.into()))?;
    }
    txn.open_table(PINS).map_err(|e| boxed(e.into()))?;
    txn.commit().map_err(|e| boxed(e.into()))
}

fn begin_write(db: &Database) -> Result<redb::WriteTransaction, Box<redb::Error>> {
    let mut txn = db.begin_write().map_err(|e| Box::new(e.into()))?;
    txn.set_quick_repair(true);
    Ok(txn)
}

/// Whether an open failed on the file's contents (redb reports garbage as invalid data), not
/// on writing it.
fn unreadable(error: &redb::Error) -> bool {
    use std::io::ErrorKind::{InvalidData, UnexpectedEof};
    match error {
        redb::Error::Io(e) => matches!(e.kind(), InvalidData | UnexpectedEof),
        _ => true,
    }
}

#[cfg(test)]
mod tests;
