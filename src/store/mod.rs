//! The local cache: NAR files on disk, a redb index, single-flight fills and eviction.
//!
//! Layout under the cache directory: `index.redb`, `nars/<sha256 of the NAR key>` (one file
//! per NAR, stored exactly as served), `tmp/` (fills in progress; emptied at start-up).
//! The store never calls an upstream: a fill takes the bytes it is given.

// The store's parts are its own; what others use is re-exported below (its face).
mod buffers;
mod check;
mod error;
mod fill;
mod import;
mod index;
mod passthrough;
mod read;
mod repair;
mod space;

use std::collections::HashMap;
use std::fs::{File, Permissions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub use crate::nix::nar_check::Expected;
pub use buffers::{freeze as freeze_buffer, take as take_buffer};
use check::Verifier;
pub use error::{CheckError, IndexError, SinkError, StoreError};
use fill::Fill;
pub use fill::{
    ChunkSink, FillReader, FillState, FillWriter, Piece, PieceStream, BODY_IDLE_TIMEOUT, CHUNK,
};
use index::{Blob, Index, NarRow};
pub use index::{NarSource, NewNarInfo};
pub use passthrough::PassThrough;
pub use read::{stream_file, ByteStream};
use space::Ledger;
pub use space::{Held, RoomStatus};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_size: u64,
    pub min_free: u64,
}

#[derive(Clone)]
pub struct Store(Arc<Inner>);

struct Inner {
    dir: PathBuf,
    index: Index,
    limits: Limits,
    fills: Mutex<HashMap<String, Arc<Fill>>>,
    /// Told when the last fill in progress ends (shutdown waits for it).
    fills_ended: tokio::sync::Notify,
    /// The same, for the NAR check thread (which holds the store weakly).
    fills_idle: Arc<repair::FillsIdle>,
    /// Access times not yet written to the index (LRU order; flushed in batches).
    touched: Mutex<HashMap<String, u64>>,
    /// Stored and reserved bytes, changed only under its lock and with checked arithmetic.
    ledger: Mutex<Ledger>,
    /// One eviction at a time: two that read the same rows would remove (and count) the same
    /// file twice.
    evicting: Mutex<()>,
    evictions: AtomicU64,
    verify_failures: AtomicU64,
    room: Mutex<space::Room>,
    /// What start-up repaired, reported by the next `verify`.
    repaired_at_open: Mutex<VerifyReport>,
    /// Stored files whose NarHash is still to be checked, for the checker thread.
    nar_checks: Mutex<Option<SyncSender<(String, Expected)>>>,
    /// NAR checks queued or running, and told when that reaches zero.
    nar_checks_pending: AtomicU64,
    nar_checks_ended: tokio::sync::Notify,
}

/// A cached narinfo and how old it is.
pub struct CachedNarInfo {
    pub text: String,
    pub age: Duration,
}

/// What a fill request gets.
pub enum Slot {
    /// Nobody is fetching this NAR: fetch it and feed the writer.
    Lead(Box<FillWriter>, FillReader),
    /// Somebody is: read along.
    Join(FillReader),
    /// It was stored meanwhile (a fill ended since the caller looked).
    Stored(File, u64),
    /// The cache cannot take it now (disk full, ...): pass it through uncached.
    Bypass(StoreError),
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Stats {
    pub narinfos: u64,
    pub nars: u64,
    pub stored_files: u64,
    pub stored_bytes: u64,
    /// Bytes of stored files pinned now.
    pub pinned_bytes: u64,
    pub max_size: u64,
    pub free_space: u64,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    pub checked: u64,
    pub corrupt: u64,
    pub missing: u64,
    pub leftovers: u64,
}

pub use crate::clock::unix_now;

impl Store {
    /// Opens (or creates) the cache and repairs what a crash may have left: temporary
    /// files, files the index does not know, rows whose file is missing or of the wrong size.
    pub fn open(dir: &Path, limits: Limits) -> Result<Store, StoreError> {
        private_dir(dir)?;
        for sub in ["nars", "tmp"] {
            private_dir(&dir.join(sub))?;
        }
        let index_path = dir.join("index.redb");
        let index = Index::open(&index_path).map_err(|e| match e {
            index::OpenError::InUse => StoreError::InUse(dir.to_path_buf()),
            index::OpenError::Other(e) => e.into(),
        })?;
        let _ = std::fs::set_permissions(&index_path, Permissions::from_mode(0o600));
        let store = Store(Arc::new(Inner {
            dir: dir.to_path_buf(),
            index,
            limits,
            fills: Mutex::default(),
            fills_ended: tokio::sync::Notify::new(),
            fills_idle: Arc::default(),
            touched: Mutex::default(),
            ledger: Mutex::default(),
            evicting: Mutex::default(),
            evictions: AtomicU64::new(0),
            verify_failures: AtomicU64::new(0),
            room: Mutex::default(),
            repaired_at_open: Mutex::default(),
            nar_checks: Mutex::default(),
            nar_checks_pending: AtomicU64::new(0),
            nar_checks_ended: tokio::sync::Notify::new(),
        }));
        let report = store.recover()?;
        if report.leftovers + report.missing > 0 {
            tracing::info!(
                leftovers = report.leftovers,
                dropped_rows = report.missing,
                "cache recovered from an unclean stop"
            );
        }
        *store.0.repaired_at_open.lock().unwrap() = report;
        *store.0.nar_checks.lock().unwrap() = Some(store.start_nar_checks()?);
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.0.dir
    }

    fn blob_path(&self, nar_key: &str) -> PathBuf {
        let name = crate::nix::hash::hex(&Sha256::digest(nar_key.as_bytes()));
        self.0.dir.join("nars").join(name)
    }

    pub fn narinfo(&self, partition: &str, hash: &str) -> Option<CachedNarInfo> {
        let row = self
            .0
            .index
            .narinfo(&index::narinfo_key(partition, hash))
            .inspect_err(|e| tracing::warn!(error = %e, "cache index read failed"))
            .ok()??;
        Some(CachedNarInfo {
            text: row.text,
            age: Duration::from_secs(unix_now().saturating_sub(row.fetched)),
        })
    }

    /// Records verified narinfos and where their NARs come from (blocking); returns each
    /// narinfo's text as it is to be served (see [`Index::put_narinfos`]).
    pub fn put_narinfos(&self, batch: &[NewNarInfo]) -> Vec<String> {
        let texts = self.0.index.put_narinfos(batch).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not record a narinfo in the cache index");
            batch.iter().map(|new| new.text().to_string()).collect()
        });
        self.reconcile_if_reopened();
        texts
    }

    pub fn nar(&self, key: &str) -> Option<NarRow> {
        self.0
            .index
            .nar(key)
            .inspect_err(|e| tracing::warn!(error = %e, "cache index read failed"))
            .ok()?
    }

    /// Opens the stored file of a NAR row, if it is there and whole.
    pub fn open_stored(&self, key: &str, row: &NarRow) -> Option<(File, u64)> {
        let blob = row.blob.as_ref()?;
        let file = File::open(self.blob_path(key)).ok()?;
        let len = file.metadata().ok()?.len();
        if len != blob.size {
            return None;
        }
        self.0
            .touched
            .lock()
            .unwrap()
            .insert(key.to_string(), unix_now());
        Some((file, len))
    }

    /// Joins the fill in progress for `key` or starts one.
    pub fn fill(&self, key: &str, expected: &Expected) -> Slot {
        if let Some(slot) = self.fill_or_file(&self.0.fills.lock().unwrap(), key) {
            return slot;
        }
        let check = match Verifier::start(expected) {
            Ok(check) => check,
            Err(reason) => return Slot::Bypass(reason.into()),
        };
        // Without a known length the fill reserves as it grows (FillWriter::write).
        let needed = expected.file_len().unwrap_or(0);
        if let Err(reason) = self.reserve(needed) {
            return Slot::Bypass(reason);
        }
        let tmp = self.0.dir.join("tmp").join(format!(
            "{:016x}{:016x}",
            fastrand::u64(..),
            fastrand::u64(..)
        ));
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
        {
            Ok(f) => f,
            Err(e) => {
                self.release(needed);
                return Slot::Bypass(StoreError::io("cannot create the cache file", &tmp)(e));
            }
        };
        let mut fills = self.0.fills.lock().unwrap();
        if let Some(slot) = self.fill_or_file(&fills, key) {
            // Someone else started (or even finished) while we prepared.
            let _ = std::fs::remove_file(&tmp);
            self.release(needed);
            return slot;
        }
        let fill = Fill::new(file);
        fills.insert(key.to_string(), fill.clone());
        let reader = fill.reader();
        Slot::Lead(
            Box::new(FillWriter {
                store: self.clone(),
                key: key.to_string(),
                fill,
                tmp,
                check: Some(check),
                finished: false,
                reserved: needed,
                expected: expected.clone(),
                notified: (0, Instant::now()),
            }),
            reader,
        )
    }

    /// The fill in progress for `key`, or its stored file. Called with the fills locked: a fill
    /// records its file before it leaves the registry, so one of the two is always seen.
    fn fill_or_file(&self, fills: &HashMap<String, Arc<Fill>>, key: &str) -> Option<Slot> {
        if let Some(fill) = fills.get(key) {
            return Some(Slot::Join(fill.reader()));
        }
        let (file, size) = self.stored(key)?;
        Some(Slot::Stored(file, size))
    }

    /// The stored file of the NAR `key`, if there is one and it is whole.
    pub fn stored(&self, key: &str) -> Option<(File, u64)> {
        self.open_stored(key, &self.nar(key)?)
    }

    /// Waits (up to `deadline`) for fills in progress to be stored or given up, then makes
    /// the index durable.
    pub async fn settle(&self, deadline: Instant) {
        loop {
            // Created before the check: a fill that ends in between still wakes it.
            let ended = self.0.fills_ended.notified();
            if self.0.fills.lock().unwrap().is_empty()
                || tokio::time::timeout_at(deadline.into(), ended)
                    .await
                    .is_err()
            {
                break;
            }
        }
        let store = self.clone();
        let _ = tokio::task::spawn_blocking(move || store.0.index.flush()).await;
    }

    fn forget_fill(&self, key: &str, fill: &Arc<Fill>, reserved: u64) {
        self.release(reserved);
        let mut fills = self.0.fills.lock().unwrap();
        if fills.get(key).is_some_and(|f| Arc::ptr_eq(f, fill)) {
            fills.remove(key);
            if fills.is_empty() {
                self.0.fills_ended.notify_waiters();
                self.0.fills_idle.raise();
                buffers::trim_when_idle();
            }
        }
    }

    /// Bytes from an upstream did not match their narinfo.
    pub fn count_verification_failure(&self) {
        self.0.verify_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// fsync the file, rename it into place, fsync the directory, then record it; its
    /// reservation (`reserved` bytes) becomes stored bytes in the same step. The row must
    /// still promise what the fill verified: a narinfo that re-pointed the NAR meanwhile
    /// makes the file useless.
    fn commit_blob(
        &self,
        key: &str,
        expected: &Expected,
        (tmp, file): (&Path, File),
        blob: Blob,
        reserved: u64,
    ) -> Result<(), StoreError> {
        file.sync_all()
            .map_err(StoreError::io("cannot fsync", tmp))?;
        let dest = self.blob_path(key);
        let size = blob.size;
        // Under the ledger's lock from the rename on: an eviction reading the rows cannot see
        // the row before its size counts, nor a recount the file before its row.
        let mut ledger = self.0.ledger.lock().unwrap();
        std::fs::rename(tmp, &dest).map_err(StoreError::io("cannot rename", tmp))?;
        if let Ok(dir) = File::open(self.0.dir.join("nars")) {
            let _ = dir.sync_all();
        }
        if let Err(e) = self.0.index.set_blob(key, expected, &blob) {
            let _ = std::fs::remove_file(&dest);
            drop(ledger);
            self.reconcile_if_reopened();
            return Err(e.into());
        }
        Ledger::take(&mut ledger.reserved, reserved, "reserved");
        ledger.stored = ledger.stored.saturating_add(size);
        drop(ledger);
        self.reconcile_if_reopened();
        Ok(())
    }

    pub fn flush_access_times(&self) {
        let touched: Vec<(String, u64)> = self.0.touched.lock().unwrap().drain().collect();
        if let Err(e) = self.0.index.touch(&touched) {
            tracing::debug!(error = %e, "could not record access times");
        }
    }

    pub fn stats(&self) -> Stats {
        let (narinfos, nars, stored_files) = self.0.index.counts().unwrap_or_default();
        let pinned = self.pinned();
        let pinned_bytes = self
            .0
            .index
            .blobs()
            .unwrap_or_default()
            .iter()
            .filter(|(key, _)| pinned.contains(key))
            .map(|(_, blob)| blob.size)
            .sum();
        Stats {
            pinned_bytes,
            narinfos,
            nars,
            stored_files,
            stored_bytes: self.size(),
            max_size: self.0.limits.max_size,
            free_space: free_space(&self.0.dir).unwrap_or(0),
        }
    }

    pub fn verification_failures(&self) -> u64 {
        self.0.verify_failures.load(Ordering::Relaxed)
    }
}

/// Creates `dir` (if missing) readable by its owner only, whatever the umask: without the
/// unit's `UMask`, 0755 would let every local user read the NARs that `allowed-uids` guards.
/// A symlink in its place is replaced by a directory, never followed: start-up deletes what
/// it finds in `tmp/` and `nars/`.
pub fn private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    let shown = dir.display();
    if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
        tracing::warn!(dir = %shown, "a symlink stands where the cache keeps a directory; replacing it");
        std::fs::remove_file(dir).map_err(StoreError::io("cannot remove the symlink", dir))?;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(StoreError::io("cannot create", dir))?;
    let meta = std::fs::symlink_metadata(dir).map_err(StoreError::io("cannot inspect", dir))?;
    if !meta.is_dir() {
        return Err(StoreError::NotADirectory(dir.to_path_buf()));
    }
    if meta.uid() == crate::sys::euid() && meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, Permissions::from_mode(0o700))
            .map_err(StoreError::io("cannot make private", dir))?;
    }
    Ok(())
}

pub use crate::sys::free_space;

#[cfg(test)]
mod tests;
