//! Lazy commits made durable in the background: one durable commit, [`FLUSH_AFTER`] after
//! the first lazy one, covers them all.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redb::Database;

use super::{begin_write, err, IndexError, Slot, FLUSH_AFTER};

/// Every write saves redb's allocator state (quick repair): after a crash the index opens at
/// once instead of being walked whole, which takes seconds at a million rows.
/// Makes lazy commits durable [`FLUSH_AFTER`] after the first of them; woken by
/// `commit_lazily`, stopped by the index's `Drop`.
pub(super) fn spawn_flusher(
    db: &Slot,
    unflushed: &Arc<Unflushed>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let (db, unflushed) = (Arc::downgrade(db), unflushed.clone());
    std::thread::Builder::new()
        .name("index-flush".into())
        .spawn(move || loop {
            if unflushed.closing.load(Ordering::SeqCst) {
                return; // the index flushes itself as it closes
            }
            if !unflushed.lazy.load(Ordering::SeqCst) {
                std::thread::park();
                continue;
            }
            std::thread::park_timeout(FLUSH_AFTER); // gathers commits; cut short on close
            if unflushed.closing.load(Ordering::SeqCst) {
                return;
            }
            let Some(slot) = db.upgrade() else { return };
            let db = slot.read().unwrap().clone();
            drop(slot);
            if let Err(e) = unflushed.flush(&db) {
                tracing::warn!(error = %e, "could not make the cache index durable");
                std::thread::park_timeout(Duration::from_secs(5));
            }
        })
}

/// Whether some commit skipped the fsync; one durable commit at a time fixes that.
#[derive(Default)]
pub(super) struct Unflushed {
    pub(super) lazy: AtomicBool,
    pub(super) closing: AtomicBool,
    flushing: std::sync::Mutex<()>,
}

impl Unflushed {
    /// Makes every commit made before the call durable. Waits for a flush in progress: it
    /// may have taken the flag before our commits and not be done yet.
    pub(super) fn flush(&self, db: &Database) -> Result<(), IndexError> {
        let _one_at_a_time = self.flushing.lock().unwrap();
        if !self.lazy.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        durable_commit(db).inspect_err(|_| self.lazy.store(true, Ordering::SeqCst))
    }
}

/// An empty durable commit: it makes every lazy commit before it durable too.
pub(super) fn durable_commit(db: &Database) -> Result<(), IndexError> {
    begin_write(db)?.commit().map_err(err)
}
