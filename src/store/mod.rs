//! The local cache: NAR files on disk, a redb index, single-flight fills and eviction.
//!
//! Layout under the cache directory: `index.redb`, `nars/<sha256 of the NAR key>` (one file
//! per NAR, stored exactly as served), `tmp/` (fills in progress; emptied at start-up).
//! The store never calls an upstream: a fill takes the bytes it is given.

// The store's parts are its own; what others use is re-exported below (its face).
mod buffers;
mod check;
mod fill;
mod index;
mod read;

use std::collections::HashMap;
use std::fs::{File, Permissions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub use buffers::{freeze as freeze_buffer, take as take_buffer};
use check::Verifier;
pub use check::{check_nar, decoder, Expected};
use fill::Fill;
pub use fill::{
    ChunkSink, FillReader, FillState, FillWriter, PassThrough, Piece, PieceStream,
    BODY_IDLE_TIMEOUT, CHUNK,
};
use index::{Blob, Index, NarRow};
pub use index::{NarSource, NewNarInfo};
pub use read::{stream_file, ByteStream};

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_size: u64,
    pub min_free: u64,
}

#[derive(Clone)]
pub struct Store(Arc<Inner>);

/// Bytes outside the cache's files counted against its limits until dropped.
pub struct Held {
    store: Store,
    bytes: u64,
}

impl Held {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.store.release(self.bytes);
    }
}

struct Inner {
    dir: PathBuf,
    index: Index,
    limits: Limits,
    fills: Mutex<HashMap<String, Arc<Fill>>>,
    /// Access times not yet written to the index (LRU order; flushed in batches).
    touched: Mutex<HashMap<String, u64>>,
    /// Stored and reserved bytes, changed only under its lock and with checked arithmetic.
    ledger: Mutex<Ledger>,
    /// One eviction at a time: two that read the same rows would remove (and count) the same
    /// file twice.
    evicting: Mutex<()>,
    evictions: AtomicU64,
    verify_failures: AtomicU64,
    last_space_warning: Mutex<Option<Instant>>,
    /// What start-up repaired, reported by the next `verify`.
    repaired_at_open: Mutex<VerifyReport>,
    /// Stored files whose NarHash is still to be checked, for the checker thread.
    nar_checks: Mutex<Option<SyncSender<(String, Expected)>>>,
    /// NAR checks queued or running.
    nar_checks_pending: AtomicU64,
}

/// Stored files waiting for their NarHash check at most; past it a check is skipped (and
/// `cache verify` still does it).
const NAR_CHECK_QUEUE: usize = 4096;
/// How long a NAR check waits for downloads in progress to end before it runs anyway.
const NAR_CHECK_DEFER: Duration = Duration::from_secs(10);

/// What the cache's bytes are promised to. `stored` follows the files the index records;
/// `reserved` is what fills in progress may still write. Both only change under one lock, so
/// a check and the reservation it allows are one step, and neither can go below zero.
#[derive(Debug, Default, Clone, Copy)]
struct Ledger {
    stored: u64,
    reserved: u64,
}

impl Ledger {
    fn fits(&self, limits: Limits, incoming: u64, free: Option<u64>) -> bool {
        self.stored
            .saturating_add(self.reserved)
            .saturating_add(incoming)
            <= limits.max_size
            && free.is_none_or(|f| f >= limits.min_free.saturating_add(incoming))
    }

    /// Subtracts `n` from a counter; more than it holds is a bug reported once, never a wrap.
    fn take(counter: &mut u64, n: u64, what: &str) {
        if n > *counter {
            tracing::error!(
                what,
                held = *counter,
                taken = n,
                "cache accounting would go below zero"
            );
        }
        *counter = counter.saturating_sub(n);
    }
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
    Bypass(String),
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
    pub fn open(dir: &Path, limits: Limits) -> Result<Store, String> {
        private_dir(dir)?;
        for sub in ["nars", "tmp"] {
            private_dir(&dir.join(sub))?;
        }
        let index_path = dir.join("index.redb");
        let index = Index::open(&index_path).map_err(|e| match e {
            index::OpenError::InUse => format!(
                "{} is in use: another nix-sidecar (or a `cache` command) has it open",
                dir.display()
            ),
            index::OpenError::Other(e) => e,
        })?;
        let _ = std::fs::set_permissions(&index_path, Permissions::from_mode(0o600));
        let store = Store(Arc::new(Inner {
            dir: dir.to_path_buf(),
            index,
            limits,
            fills: Mutex::default(),
            touched: Mutex::default(),
            ledger: Mutex::default(),
            evicting: Mutex::default(),
            evictions: AtomicU64::new(0),
            verify_failures: AtomicU64::new(0),
            last_space_warning: Mutex::new(None),
            repaired_at_open: Mutex::default(),
            nar_checks: Mutex::default(),
            nar_checks_pending: AtomicU64::new(0),
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

    /// The thread that checks stored files against NarHash (see [`Store::check_nar_later`]).
    /// It holds the store weakly and ends with it.
    fn start_nar_checks(&self) -> Result<SyncSender<(String, Expected)>, String> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(String, Expected)>(NAR_CHECK_QUEUE);
        let store = Arc::downgrade(&self.0);
        std::thread::Builder::new()
            .name("nar-check".into())
            .spawn(move || {
                // Decompressing a NAR again is work a cold copy waits on when it competes:
                // this thread yields to everything else, and waits (up to NAR_CHECK_DEFER)
                // for downloads in progress to end.
                crate::sys::lower_this_threads_priority();
                while let Ok((key, expected)) = rx.recv() {
                    let deadline = Instant::now() + NAR_CHECK_DEFER;
                    loop {
                        let Some(inner) = store.upgrade() else { return };
                        let busy = !inner.fills.lock().unwrap().is_empty();
                        if !busy || Instant::now() >= deadline {
                            let store = Store(inner);
                            store.check_stored_nar(&key, &expected);
                            store.0.nar_checks_pending.fetch_sub(1, Ordering::SeqCst);
                            break;
                        }
                        drop(inner);
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })
            .map_err(|e| format!("cannot start the NAR checker: {e}"))?;
        Ok(tx)
    }

    /// A file stored on the strength of FileHash, which the signature does not cover, is
    /// checked against NarHash right after, off the client's path: a lying upstream that
    /// swapped in another path's file gets it removed within seconds, not at eviction.
    pub(crate) fn check_nar_later(&self, key: &str, expected: &Expected) {
        if let Some(checks) = &*self.0.nar_checks.lock().unwrap() {
            self.0.nar_checks_pending.fetch_add(1, Ordering::SeqCst);
            if checks
                .try_send((key.to_string(), expected.clone()))
                .is_err()
            {
                self.0.nar_checks_pending.fetch_sub(1, Ordering::SeqCst);
                tracing::debug!(nar = %key, "NAR check queue full; `cache verify` will check it");
            }
        }
    }

    /// Returns once no NAR check is queued or running (files stored on the strength of their
    /// FileHash have then been checked against their signed NarHash too).
    pub async fn nar_checks_done(&self) {
        while self.0.nar_checks_pending.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn check_stored_nar(&self, key: &str, expected: &Expected) {
        let Ok(mut file) = File::open(self.blob_path(key)) else {
            return; // evicted meanwhile
        };
        if let Err(reason) = check::check_nar(&mut file, expected) {
            tracing::warn!(nar = %key, reason, "a stored NAR does not match its signed NarHash; removed");
            self.count_verification_failure();
            self.drop_stored(key);
        }
    }

    /// Forgets and removes a stored file, counting its size off; false if the index had no
    /// such file (someone else removed it) or could not be changed.
    fn drop_stored(&self, key: &str) -> bool {
        let mut ledger = self.0.ledger.lock().unwrap();
        match self.0.index.clear_blobs(&[key.to_string()]) {
            Ok(removed) if !removed.is_empty() => {
                let size: u64 = removed.iter().map(|(_, b)| b.size).sum();
                Ledger::take(&mut ledger.stored, size, "stored");
                let _ = std::fs::remove_file(self.blob_path(key));
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(error = %e, nar = %key, "could not drop a stored NAR");
                false
            }
        }
    }

    pub fn dir(&self) -> &Path {
        &self.0.dir
    }

    fn blob_path(&self, nar_key: &str) -> PathBuf {
        let name = crate::nix::hash::hex(&Sha256::digest(nar_key.as_bytes()));
        self.0.dir.join("nars").join(name)
    }

    fn recover(&self) -> Result<VerifyReport, String> {
        let mut tmp_files = 0;
        for entry in read_dir(&self.0.dir.join("tmp")) {
            let _ = std::fs::remove_file(entry);
            tmp_files += 1;
        }
        let mut report = self.reconcile()?;
        report.leftovers += tmp_files;
        Ok(report)
    }

    /// After the index was reopened (an I/O error had poisoned it), rows committed since its
    /// last durable commit are gone: files and sizes are counted again from what it holds.
    fn reconcile_if_reopened(&self) {
        if self.0.index.take_reopened() {
            match self.reconcile() {
                Ok(report) => tracing::info!(
                    dropped_rows = report.missing,
                    removed_files = report.leftovers,
                    "cache index reopened; files recounted"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "could not recount the cache after reopening its index")
                }
            }
        }
    }

    /// Drops rows whose file is missing or of another size and files no row knows, and sets
    /// the stored size from what is left. Under the ledger's lock, so no file lands meanwhile.
    fn reconcile(&self) -> Result<VerifyReport, String> {
        let mut report = VerifyReport::default();
        let mut ledger = self.0.ledger.lock().unwrap();
        let rows = self.0.index.blobs()?;
        let mut bad = Vec::new();
        let mut known = std::collections::HashSet::new();
        let mut total = 0;
        for (key, blob) in rows {
            let path = self.blob_path(&key);
            let size = std::fs::metadata(&path).map(|m| m.len()).ok();
            match size {
                Some(size) if size == blob.size => {
                    total += size;
                    known.insert(path);
                }
                _ => {
                    let _ = std::fs::remove_file(&path);
                    bad.push(key)
                }
            }
        }
        report.missing = bad.len() as u64;
        self.0.index.clear_blobs(&bad)?;
        for path in read_dir(&self.0.dir.join("nars")) {
            if !known.contains(&path) {
                let _ = std::fs::remove_file(&path);
                report.leftovers += 1;
            }
        }
        ledger.stored = total;
        Ok(report)
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
            Err(reason) => return Slot::Bypass(reason),
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
                return Slot::Bypass(format!("cannot create a cache file: {e}"));
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
        while !self.0.fills.lock().unwrap().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
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
    ) -> Result<(), String> {
        file.sync_all().map_err(|e| format!("fsync: {e}"))?;
        let dest = self.blob_path(key);
        let size = blob.size;
        // Under the ledger's lock from the rename on: an eviction reading the rows cannot see
        // the row before its size counts, nor a recount the file before its row.
        let mut ledger = self.0.ledger.lock().unwrap();
        std::fs::rename(tmp, &dest).map_err(|e| format!("rename: {e}"))?;
        if let Ok(dir) = File::open(self.0.dir.join("nars")) {
            let _ = dir.sync_all();
        }
        if let Err(e) = self.0.index.set_blob(key, expected, &blob) {
            let _ = std::fs::remove_file(&dest);
            drop(ledger);
            self.reconcile_if_reopened();
            return Err(e);
        }
        Ledger::take(&mut ledger.reserved, reserved, "reserved");
        ledger.stored = ledger.stored.saturating_add(size);
        drop(ledger);
        self.reconcile_if_reopened();
        Ok(())
    }

    /// Reserves room for `incoming` more bytes, evicting if needed; an error means caching
    /// must be skipped.
    pub(crate) fn reserve(&self, incoming: u64) -> Result<(), String> {
        let limits = self.0.limits;
        let try_reserve = |store: &Store| {
            let free = free_space(&store.0.dir);
            let mut ledger = store.0.ledger.lock().unwrap();
            let fits = ledger.fits(limits, incoming, free);
            if fits {
                ledger.reserved = ledger.reserved.saturating_add(incoming);
            }
            fits
        };
        if try_reserve(self) {
            return Ok(());
        }
        self.enforce_limits(incoming);
        if try_reserve(self) {
            return Ok(());
        }
        let mut last = self.0.last_space_warning.lock().unwrap();
        if last.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
            tracing::warn!(
                dir = %self.0.dir.display(),
                free = ?free_space(&self.0.dir),
                min_free = limits.min_free,
                "not enough disk space: serving without caching until space is free"
            );
            *last = Some(Instant::now());
        }
        Err("not enough disk space for the cache".into())
    }

    /// Counts `bytes` kept outside the cache's files (an upload staged for push) against its
    /// limits until the returned guard is dropped: evicts to make room, and refuses when
    /// there is none.
    pub fn hold(&self, bytes: u64) -> Result<Held, String> {
        self.reserve(bytes)?;
        Ok(Held {
            store: self.clone(),
            bytes,
        })
    }

    /// Like [`Store::hold`] for bytes already on disk (staged files found at start-up): they
    /// are counted even when over the limits, so eviction makes room for them.
    pub fn hold_existing(&self, bytes: u64) -> Held {
        {
            let mut ledger = self.0.ledger.lock().unwrap();
            ledger.reserved = ledger.reserved.saturating_add(bytes);
        }
        Held {
            store: self.clone(),
            bytes,
        }
    }

    /// The configured limits.
    pub fn limits(&self) -> Limits {
        self.0.limits
    }

    /// Gives back bytes reserved for a fill that ended or wrote less.
    fn release(&self, n: u64) {
        Ledger::take(&mut self.0.ledger.lock().unwrap().reserved, n, "reserved");
    }

    /// Evicts least-recently-used files until the cache (plus `incoming` bytes) is under
    /// max-cache-size and the disk has min-free-space. A file that is being read stays
    /// readable: its reader holds it open, and unlinking does not take the bytes away.
    pub fn enforce_limits(&self, incoming: u64) {
        let limits = self.0.limits;
        let over = |store: &Store| {
            let free = free_space(&store.0.dir);
            !store.0.ledger.lock().unwrap().fits(limits, incoming, free)
        };
        if !over(self) {
            return;
        }
        let _one_at_a_time = self.0.evicting.lock().unwrap();
        self.flush_access_times();
        let mut rows = match self.0.index.blobs() {
            Ok(rows) => rows,
            Err(e) => return tracing::warn!(error = %e, "eviction could not read the index"),
        };
        rows.sort_by_key(|(_, blob)| blob.last_access);
        // Pinned files are kept over max-cache-size, never over the disk's floor.
        let pinned = self.pinned();
        let below_floor = |store: &Store| {
            free_space(&store.0.dir)
                .is_some_and(|free| free < limits.min_free.saturating_add(incoming))
        };
        let mut evicted = Vec::new();
        for (key, _) in rows {
            if !over(self) {
                break;
            }
            if pinned.contains(&key) {
                if !below_floor(self) {
                    continue;
                }
                tracing::warn!(nar = %key, min_free = limits.min_free, "evicting a pinned NAR: the disk is below min-free-space");
            }
            // Only a row this call removed counts: the NAR checker may have dropped it since
            // the scan.
            if self.drop_stored(&key) {
                self.0.evictions.fetch_add(1, Ordering::Relaxed);
                evicted.push(key);
            }
        }
        if !evicted.is_empty() {
            tracing::info!(files = evicted.len(), "evicted least recently used NARs");
        }
    }

    /// Keeps `keys` (NAR keys) from eviction until `until` (unix seconds; `u64::MAX`: until
    /// unpinned), except to keep `min-free-space` free.
    pub fn pin(&self, keys: &[String], until: u64) -> Result<(), String> {
        self.0.index.pin(keys, until)
    }

    /// Removes the pins of `keys`, or all pins; how many there were.
    pub fn unpin(&self, keys: Option<&[String]>) -> Result<u64, String> {
        self.0.index.unpin(keys)
    }

    /// The NAR keys pinned now.
    fn pinned(&self) -> std::collections::HashSet<String> {
        let now = unix_now();
        self.0
            .index
            .pins()
            .unwrap_or_default()
            .into_iter()
            .filter(|(_, until)| *until > now)
            .map(|(key, _)| key)
            .collect()
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

    pub fn size(&self) -> u64 {
        self.0.ledger.lock().unwrap().stored
    }

    pub fn evictions(&self) -> u64 {
        self.0.evictions.load(Ordering::Relaxed)
    }

    pub fn verification_failures(&self) -> u64 {
        self.0.verify_failures.load(Ordering::Relaxed)
    }

    /// Re-hashes every stored file and drops those that do not match the index, or whose NAR
    /// does not match the NarHash and NarSize its narinfo promised.
    pub fn verify(&self) -> Result<VerifyReport, String> {
        self.verify_with_progress(|_, _| {})
    }

    /// [`Store::verify`], telling `progress` (files checked, bytes checked) after each file.
    pub fn verify_with_progress(
        &self,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<VerifyReport, String> {
        let mut report = VerifyReport::default();
        let mut bad = Vec::new();
        let mut bytes = 0u64;
        for (key, blob) in self.0.index.blobs()? {
            report.checked += 1;
            bytes += blob.size;
            progress(report.checked, bytes);
            let path = self.blob_path(&key);
            let promise = self.nar(&key).map(|row| row.source.expected);
            let keeps_promise = || {
                let mut file = File::open(&path).map_err(|e| e.to_string())?;
                promise
                    .as_ref()
                    .map_or(Ok(()), |p| check::check_nar(&mut file, p))
            };
            match hash_file(&path) {
                Ok((size, sha)) if size == blob.size && sha == blob.sha256 => {
                    if let Err(reason) = keeps_promise() {
                        tracing::warn!(nar = %key, reason, "stored file does not match its narinfo; dropped");
                        report.corrupt += 1;
                        bad.push(key);
                    }
                }
                Ok(_) => {
                    tracing::warn!(nar = %key, "stored file is corrupt; dropped");
                    report.corrupt += 1;
                    bad.push(key);
                }
                Err(_) => {
                    report.missing += 1;
                    bad.push(key);
                }
            }
        }
        self.0.index.clear_blobs(&bad)?;
        for key in &bad {
            let _ = std::fs::remove_file(self.blob_path(key));
        }
        let recovered = self.recover()?;
        let at_open = std::mem::take(&mut *self.0.repaired_at_open.lock().unwrap());
        report.leftovers = recovered.leftovers + at_open.leftovers;
        report.missing += recovered.missing + at_open.missing;
        Ok(report)
    }
}

/// Creates `dir` (if missing) readable by its owner only, whatever the umask: without the
/// unit's `UMask`, 0755 would let every local user read the NARs that `allowed-uids` guards.
/// A symlink in its place is replaced by a directory, never followed: start-up deletes what
/// it finds in `tmp/` and `nars/`.
pub fn private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    let shown = dir.display();
    if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
        tracing::warn!(dir = %shown, "a symlink stands where the cache keeps a directory; replacing it");
        std::fs::remove_file(dir).map_err(|e| format!("cannot remove the symlink {shown}: {e}"))?;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {shown}: {e}"))?;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{shown}: {e}"))?;
    if !meta.is_dir() {
        return Err(format!("{shown} is not a directory"));
    }
    if meta.uid() == crate::sys::euid() && meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot make {shown} private: {e}"))?;
    }
    Ok(())
}

fn read_dir(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    use std::io::Read;
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((size, crate::nix::hash::hex(&hasher.finalize())))
}

pub use crate::sys::free_space;

#[cfg(test)]
mod tests;
