//! What keeps the cache's files honest: start-up recovery (temporary files, files no row
//! knows, rows whose file is gone), the background check of files stored on the strength of
//! their FileHash against the signed NarHash, and `cache verify`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::space::Ledger;
use super::{Expected, IndexError, Store, StoreError, VerifyReport};
use crate::nix::nar_check::check_nar;

/// Stored files waiting for their NarHash check at most; past it a check is skipped (and
/// `cache verify` still does it).
const NAR_CHECK_QUEUE: usize = 4096;
/// How long a NAR check waits for downloads in progress to end before it runs anyway.
const NAR_CHECK_DEFER: Duration = Duration::from_secs(10);

/// Raised each time the last fill in progress ends. The NAR check thread waits on it without
/// holding the store, so a store dropped meanwhile is not kept open.
#[derive(Default)]
pub(super) struct FillsIdle {
    times: Mutex<u64>,
    raised: Condvar,
}

impl FillsIdle {
    pub(super) fn raise(&self) {
        *self.times.lock().unwrap() += 1;
        self.raised.notify_all();
    }

    fn times(&self) -> u64 {
        *self.times.lock().unwrap()
    }

    /// Waits until raised again after `seen` (read before looking at the fills, so an end
    /// between the look and the wait is not missed), or until `deadline`.
    fn wait_after(&self, seen: u64, deadline: Instant) {
        let times = self.times.lock().unwrap();
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = self
            .raised
            .wait_timeout_while(times, left, |times| *times == seen);
    }
}

impl Store {
    /// The thread that checks stored files against NarHash (see [`Store::check_nar_later`]).
    /// It holds the store weakly and ends with it.
    pub(super) fn start_nar_checks(&self) -> Result<SyncSender<(String, Expected)>, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(String, Expected)>(NAR_CHECK_QUEUE);
        let store = Arc::downgrade(&self.0);
        let idle = self.0.fills_idle.clone();
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
                        let seen = idle.times();
                        let busy = !inner.fills.lock().unwrap().is_empty();
                        if !busy || Instant::now() >= deadline {
                            let store = Store(inner);
                            store.check_stored_nar(&key, &expected);
                            store.nar_check_ended();
                            break;
                        }
                        drop(inner);
                        idle.wait_after(seen, deadline);
                    }
                }
            })
            .map_err(|e| StoreError::Thread("NAR check", e))?;
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
                self.nar_check_ended();
                tracing::debug!(nar = %key, "NAR check queue full; `cache verify` will check it");
            }
        }
    }

    /// Returns once no NAR check is queued or running (files stored on the strength of their
    /// FileHash have then been checked against their signed NarHash too).
    pub async fn nar_checks_done(&self) {
        loop {
            let ended = self.0.nar_checks_ended.notified();
            if self.0.nar_checks_pending.load(Ordering::SeqCst) == 0 {
                return;
            }
            ended.await;
        }
    }

    fn nar_check_ended(&self) {
        if self.0.nar_checks_pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.nar_checks_ended.notify_waiters();
        }
    }

    fn check_stored_nar(&self, key: &str, expected: &Expected) {
        let Ok(mut file) = File::open(self.blob_path(key)) else {
            return; // evicted meanwhile
        };
        if let Err(reason) = check_nar(&mut file, expected) {
            tracing::warn!(nar = %key, %reason, "a stored NAR does not match its signed NarHash; removed");
            self.count_verification_failure();
            self.drop_stored(key);
        }
    }

    /// Forgets and removes a stored file, counting its size off; false if the index had no
    /// such file (someone else removed it) or could not be changed.
    pub(super) fn drop_stored(&self, key: &str) -> bool {
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

    pub(super) fn recover(&self) -> Result<VerifyReport, IndexError> {
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
    pub(super) fn reconcile_if_reopened(&self) {
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
    fn reconcile(&self) -> Result<VerifyReport, IndexError> {
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

    /// Re-hashes every stored file and drops those that do not match the index, or whose NAR
    /// does not match the NarHash and NarSize its narinfo promised.
    pub fn verify(&self) -> Result<VerifyReport, IndexError> {
        self.verify_with_progress(|_, _| {})
    }

    /// [`Store::verify`], telling `progress` (files checked, bytes checked) after each file.
    pub fn verify_with_progress(
        &self,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<VerifyReport, IndexError> {
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
                let mut file = File::open(&path)
                    .map_err(|e| crate::nix::nar_check::CheckError::Read(e.to_string()))?;
                promise.as_ref().map_or(Ok(()), |p| check_nar(&mut file, p))
            };
            match hash_file(&path) {
                Ok((size, sha)) if size == blob.size && sha == blob.sha256 => {
                    if let Err(reason) = keeps_promise() {
                        tracing::warn!(nar = %key, %reason, "stored file does not match its narinfo; dropped");
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
