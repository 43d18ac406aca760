//! The cache's accounting: what its bytes are promised to (stored files and reservations of
//! fills and staged uploads), checked against max-cache-size and min-free-space in one step,
//! and eviction of the least recently used files when they do not fit; pins keep files from it.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{free_space, unix_now, IndexError, Limits, Store, StoreError};

/// The cache's last answers to "is there room": a refusal means a download is served (or an
/// upload refused) without being cached, which costs speed, not substitutions, so it is
/// reported rather than made an error.
#[derive(Debug, Default)]
pub(super) struct Room {
    /// Since when (unix seconds) every reservation has been refused; `None` once one fits.
    since: Option<u64>,
    refusals: u64,
    last_warning: Option<Instant>,
}

/// What [`Store::room`] reports.
#[derive(Debug, Clone, Copy)]
pub struct RoomStatus {
    pub uncached_since: Option<u64>,
    /// Reservations refused since start.
    pub refusals: u64,
    pub free_disk: Option<u64>,
}

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

/// What the cache's bytes are promised to. `stored` follows the files the index records;
/// `reserved` is what fills in progress may still write. Both only change under one lock, so
/// a check and the reservation it allows are one step, and neither can go below zero.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Ledger {
    pub(super) stored: u64,
    pub(super) reserved: u64,
}

impl Ledger {
    pub(super) fn fits(&self, limits: Limits, incoming: u64, free: Option<u64>) -> bool {
        self.stored
            .saturating_add(self.reserved)
            .saturating_add(incoming)
            <= limits.max_size
            && free.is_none_or(|f| f >= limits.min_free.saturating_add(incoming))
    }

    /// Subtracts `n` from a counter; more than it holds is a bug reported once, never a wrap.
    pub(super) fn take(counter: &mut u64, n: u64, what: &str) {
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

impl Store {
    /// Reserves room for `incoming` more bytes, evicting if needed; an error means caching
    /// must be skipped.
    pub(crate) fn reserve(&self, incoming: u64) -> Result<(), StoreError> {
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
        let fits = try_reserve(self) || {
            self.enforce_limits(incoming);
            try_reserve(self)
        };
        let mut room = self.0.room.lock().unwrap();
        if fits {
            if room.since.take().is_some() {
                tracing::info!(dir = %self.0.dir.display(), "there is room again: caching resumed");
            }
            return Ok(());
        }
        room.refusals += 1;
        room.since.get_or_insert_with(unix_now);
        if room
            .last_warning
            .is_none_or(|t| t.elapsed() > Duration::from_secs(60))
        {
            tracing::warn!(
                dir = %self.0.dir.display(),
                free = ?free_space(&self.0.dir),
                min_free = limits.min_free,
                "not enough disk space: serving without caching until space is free"
            );
            room.last_warning = Some(Instant::now());
        }
        Err(StoreError::NoRoom)
    }

    /// Whether the cache is taking new files, for health and metrics.
    pub fn room(&self) -> RoomStatus {
        let free_disk = free_space(&self.0.dir);
        let room = self.0.room.lock().unwrap();
        RoomStatus {
            uncached_since: room.since,
            refusals: room.refusals,
            free_disk,
        }
    }

    /// Counts `bytes` kept outside the cache's files (an upload staged for push) against its
    /// limits until the returned guard is dropped: evicts to make room, and refuses when
    /// there is none.
    pub fn hold(&self, bytes: u64) -> Result<Held, StoreError> {
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
    pub(super) fn release(&self, n: u64) {
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
    pub fn pin(&self, keys: &[String], until: u64) -> Result<(), IndexError> {
        self.0.index.pin(keys, until)
    }

    /// Removes the pins of `keys`, or all pins; how many there were.
    pub fn unpin(&self, keys: Option<&[String]>) -> Result<u64, IndexError> {
        self.0.index.unpin(keys)
    }

    /// The NAR keys pinned now.
    pub(super) fn pinned(&self) -> std::collections::HashSet<String> {
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

    pub fn size(&self) -> u64 {
        self.0.ledger.lock().unwrap().stored
    }

    pub fn evictions(&self) -> u64 {
        self.0.evictions.load(Ordering::Relaxed)
    }
}
