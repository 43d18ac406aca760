//! Filling the cache with one upstream download however many clients ask.
//!
//! The first request for a NAR becomes the leader: it gets a [`FillWriter`] that the caller
//! feeds with the upstream body. Every request, the leader's included, reads through a
//! [`FillReader`] that follows the growing temporary file, so late arrivals start streaming at
//! once and memory does not grow with the NAR or the number of clients. The writer verifies
//! as it goes; only verified, fsynced, renamed bytes reach the index.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch, Notify};

use super::check::Verifier;
use super::index::Blob;
use super::read::read_at;
use super::Expected;
use super::{CheckError, SinkError, Store, StoreError};

mod reader;
pub use reader::FillReader;

pub const CHUNK: usize = 256 * 1024;

/// What readers that read the file themselves receive, in order: file ranges they may read,
/// or bytes that only memory has (a fill whose file could not be written).
pub type PieceStream = mpsc::Receiver<std::io::Result<Piece>>;

#[derive(Debug)]
pub enum Piece {
    /// `len` bytes of the fill's file at `pos`.
    File {
        pos: u64,
        len: usize,
    },
    Bytes(Bytes),
}

impl Piece {
    /// How many bytes it stands for.
    pub fn size(&self) -> usize {
        match self {
            Piece::File { len, .. } => *len,
            Piece::Bytes(bytes) => bytes.len(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FillState {
    /// The leader is still waiting for the upstream's answer.
    Waiting,
    Streaming,
    Complete,
    /// The upstream does not have it (404/403/410).
    Missing,
    Failed(Arc<str>),
}

#[derive(Debug, Clone)]
pub struct Progress {
    pub state: FillState,
    pub written: u64,
    /// The file's length as told to clients (FileSize, NarSize of an uncompressed NAR, or the
    /// upstream's Content-Length); the fill never takes more, nor ends with less.
    pub length: Option<u64>,
    /// The fill is over: stored in the index (or given up); the registry no longer has it.
    pub ended: bool,
}

pub struct Fill {
    file: File,
    progress: watch::Sender<Progress>,
    memory: Mutex<Memory>,
    /// How far each reader has taken bytes, so an uncached fill keeps what one still needs.
    readers: Mutex<Vec<Weak<AtomicU64>>>,
    /// A reader took bytes.
    advanced: Notify,
}

/// The bytes of a fill whose file was given up, held in memory for its readers.
#[derive(Default)]
struct Memory {
    /// The last chunks written past `file_end`.
    recent: VecDeque<(u64, Bytes)>,
    /// Set once the file could not take more (disk full): bytes from here on are only in
    /// `recent`, and stay there until every reader has taken them.
    file_end: Option<u64>,
}

/// How many of the latest chunks an uncached fill keeps in memory for its readers.
const RECENT_CHUNKS: usize = 4;

impl Fill {
    pub fn new(file: File) -> Arc<Fill> {
        let (progress, _) = watch::channel(Progress {
            state: FillState::Waiting,
            written: 0,
            length: None,
            ended: false,
        });
        Arc::new(Fill {
            file,
            progress,
            memory: Mutex::default(),
            readers: Mutex::default(),
            advanced: Notify::new(),
        })
    }

    /// The bytes at `pos` (at most `len`) if a recent chunk has them.
    fn recent(memory: &Memory, pos: u64, len: usize) -> Option<Bytes> {
        memory.recent.iter().find_map(|(at, chunk)| {
            let skip = pos.checked_sub(*at)? as usize;
            (skip < chunk.len()).then(|| chunk.slice(skip..chunk.len().min(skip + len)))
        })
    }

    /// Up to `len` bytes at `pos`, from the file, or from memory past the end of a file given up.
    fn read(&self, pos: u64, len: usize) -> std::io::Result<Bytes> {
        match self.piece(pos, len)? {
            Piece::Bytes(bytes) => Ok(bytes),
            Piece::File { pos, len } => read_at(&self.file, pos, len),
        }
    }

    /// Where a reader finds up to `len` bytes at `pos`: a range of the file, or memory.
    fn piece(&self, pos: u64, len: usize) -> std::io::Result<Piece> {
        let memory = self.memory.lock().unwrap();
        match memory.file_end {
            Some(end) if pos >= end => Fill::recent(&memory, pos, len)
                .map(Piece::Bytes)
                .ok_or_else(|| std::io::Error::other("the uncached download moved on")),
            Some(end) => Ok(Piece::File {
                pos,
                len: len.min((end - pos) as usize),
            }),
            None => Ok(Piece::File { pos, len }),
        }
    }

    /// The lowest position a live reader has reached (None: no reader left).
    fn slowest_reader(&self) -> Option<u64> {
        let mut readers = self.readers.lock().unwrap();
        readers.retain(|r| r.strong_count() > 0);
        readers
            .iter()
            .filter_map(|r| r.upgrade().map(|p| p.load(Ordering::Acquire)))
            .min()
    }

    /// Keeps `chunk` at `offset` for readers of an uncached fill, waiting while the oldest
    /// chunk kept is one a reader has not taken yet. A cached fill keeps nothing: its readers
    /// read the file (by `sendfile`, from the page cache), so memory does not grow with the
    /// number of downloads.
    async fn remember(&self, offset: u64, chunk: Bytes) -> Result<(), SinkError> {
        loop {
            let advanced = self.advanced.notified();
            tokio::pin!(advanced);
            advanced.as_mut().enable();
            {
                let mut memory = self.memory.lock().unwrap();
                if memory.file_end.is_none() {
                    return Ok(());
                }
                let oldest_end = memory
                    .recent
                    .front()
                    .map(|(at, oldest)| at + oldest.len() as u64);
                let needed = oldest_end.is_some_and(|end| {
                    memory.file_end.is_some_and(|f| end > f)
                        && self.slowest_reader().is_some_and(|p| p < end)
                });
                if memory.recent.len() < RECENT_CHUNKS || !needed {
                    if memory.recent.len() >= RECENT_CHUNKS {
                        memory.recent.pop_front();
                    }
                    memory.recent.push_back((offset, chunk));
                    return Ok(());
                }
            }
            if tokio::time::timeout(BODY_IDLE_TIMEOUT, advanced)
                .await
                .is_err()
            {
                return Err(SinkError::Stalled(BODY_IDLE_TIMEOUT.as_secs()));
            }
        }
    }

    pub fn reader(self: &Arc<Fill>) -> FillReader {
        let position = Arc::new(AtomicU64::new(0));
        self.readers.lock().unwrap().push(Arc::downgrade(&position));
        FillReader {
            fill: self.clone(),
            progress: self.progress.subscribe(),
            position,
        }
    }
}

/// Takes chunks from an upstream body. Implemented by the fill writer and by the
/// pass-through used when caching is off.
pub trait ChunkSink {
    fn write(
        &mut self,
        chunk: Bytes,
    ) -> impl std::future::Future<Output = Result<(), SinkError>> + Send;
}

pub struct FillWriter {
    pub(super) store: Store,
    pub(super) key: String,
    pub(super) fill: Arc<Fill>,
    pub(super) tmp: PathBuf,
    pub(super) check: Option<Verifier>,
    pub(super) finished: bool,
    /// Bytes reserved in the store's limits for this fill until it ends.
    pub(super) reserved: u64,
    /// What the bytes were verified against; the index must still promise it when they land.
    pub(super) expected: Expected,
    /// `written` when readers were last woken, and when.
    pub(super) notified: (u64, std::time::Instant),
}

/// How many new bytes wake a fill's readers, or how long since they were last woken.
const NOTIFY_STEP: u64 = 256 * 1024;
const NOTIFY_AFTER: Duration = Duration::from_millis(20);

/// A fill whose length is not known reserves room in steps of this much as it grows.
const RESERVE_STEP: u64 = 1024 * 1024;

impl FillWriter {
    /// The upstream answered 200 with this Content-Length; readers may start. The length
    /// told to clients is the narinfo's if it gives one; an upstream that disagrees with it
    /// is refused before any byte is served.
    pub fn start(&self, content_length: Option<u64>) -> Result<(), CheckError> {
        let promised = self.expected.file_len();
        if let (Some(promised), Some(sent)) = (promised, content_length) {
            if promised != sent {
                self.store.count_verification_failure();
                return Err(CheckError::Announced { sent, promised });
            }
        }
        self.fill.progress.send_modify(|p| {
            p.state = FillState::Streaming;
            p.length = promised.or(content_length);
        });
        Ok(())
    }

    /// Bytes taken so far: where a resumed download must go on from.
    pub fn written(&self) -> u64 {
        self.fill.progress.borrow().written
    }

    pub fn missing(mut self) {
        self.end(FillState::Missing);
    }

    pub fn fail(mut self, reason: &str) {
        tracing::warn!(nar = %self.key, reason, "NAR download failed; nothing stored");
        self.end(FillState::Failed(Arc::from(reason)));
    }

    /// Whether the file was given up and the bytes only pass through memory.
    fn uncached(&self) -> bool {
        self.fill.memory.lock().unwrap().file_end.is_some()
    }

    /// Verifies, fsyncs, renames into place and records the file in the index, in that order.
    pub async fn finish(mut self) {
        let check = self.check.take().expect("finish once");
        let (written, length) = {
            let p = self.fill.progress.borrow();
            (p.written, p.length)
        };
        if let Some(length) = length.filter(|l| *l != written) {
            self.store.count_verification_failure();
            return self.fail(&format!(
                "upstream sent {written} bytes of the {length} announced"
            ));
        }
        let sha256 = match check.finish().await {
            Ok(sha) => sha,
            Err(reason) => {
                self.store.count_verification_failure();
                return self.fail(&reason.to_string());
            }
        };
        // An uncompressed file is its NAR: NarHash checks it now, whatever FileHash said.
        let unchecked_nar = self.expected.file_hash.is_some();
        if unchecked_nar
            && self.expected.compression == "none"
            && (sha256 != self.expected.nar_hash || written != self.expected.nar_size)
        {
            self.store.count_verification_failure();
            return self.fail("NAR does not match NarHash/NarSize (FileHash matched)");
        }
        // Verified: readers may take the last byte now; storing it durably (fsync of the
        // whole file) must not hold clients up. The fill stays registered until the index
        // has it, so nobody starts a second download meanwhile.
        self.fill
            .progress
            .send_modify(|p| p.state = FillState::Complete);
        if self.uncached() {
            return self.end(FillState::Complete);
        }
        let store = self.store.clone();
        let (key, tmp, expected) = (self.key.clone(), self.tmp.clone(), self.expected.clone());
        let file = match self.fill.file.try_clone() {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(nar = %self.key, error = %e, "could not store a verified NAR");
                return self.end(FillState::Complete);
            }
        };
        let blob = Blob {
            size: written,
            sha256: sha256.to_hex(),
            last_access: super::unix_now(),
        };
        let reserved = self.reserved;
        let stored = tokio::task::spawn_blocking(move || {
            store.commit_blob(&key, &expected, (&tmp, file), blob, reserved)
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::Thread("commit", std::io::Error::other(e))));
        match stored {
            Ok(()) => {
                self.finished = true; // the temporary file is now the blob
                self.reserved = 0; // now counted as stored
                self.end(FillState::Complete);
                if unchecked_nar && self.expected.compression != "none" {
                    self.store.check_nar_later(&self.key, &self.expected);
                }
                let store = self.store.clone();
                tokio::task::spawn_blocking(move || store.enforce_limits(0));
            }
            Err(reason) => {
                // The bytes were right; only storing them failed. Readers still get them.
                tracing::warn!(nar = %self.key, %reason, "could not store a verified NAR");
                self.end(FillState::Complete);
            }
        }
    }

    fn end(&mut self, state: FillState) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.tmp);
            self.finished = true;
        }
        self.store
            .forget_fill(&self.key, &self.fill, std::mem::take(&mut self.reserved));
        self.fill.progress.send_modify(|p| {
            p.state = state;
            p.ended = true;
        });
    }

    /// Makes sure the reservation covers `end` bytes.
    fn reserve_up_to(&mut self, end: u64) -> Result<(), StoreError> {
        if end <= self.reserved {
            return Ok(());
        }
        let want = match self.fill.progress.borrow().length {
            Some(length) => length.max(end),
            None => end.max(self.reserved + RESERVE_STEP),
        };
        self.store.reserve(want - self.reserved)?;
        self.reserved = want;
        Ok(())
    }

    /// The cache cannot hold this file (no room, a write failed): its bytes from `offset` on
    /// go to the readers already following it through memory, still verified, and nothing is
    /// stored. The partial file goes now; new requests start afresh instead of joining.
    fn give_up_file(&mut self, offset: u64, reason: &str) {
        tracing::warn!(nar = %self.key, reason, "cannot cache this NAR; serving it uncached");
        self.fill.memory.lock().unwrap().file_end = Some(offset);
        let _ = std::fs::remove_file(&self.tmp);
        self.finished = true;
        self.store
            .forget_fill(&self.key, &self.fill, std::mem::take(&mut self.reserved));
    }
}

impl ChunkSink for FillWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), SinkError> {
        let (offset, length) = {
            let p = self.fill.progress.borrow();
            (p.written, p.length)
        };
        let end = offset + chunk.len() as u64;
        if length.is_some_and(|length| end > length) {
            self.store.count_verification_failure();
            return Err(SinkError::Overlong(length.unwrap_or_default()));
        }
        let check = self.check.as_mut().expect("write before finish");
        if let Err(reason) = check.update(chunk.clone()).await {
            self.store.count_verification_failure();
            return Err(reason.into());
        }
        if !self.uncached() {
            let stored = self.reserve_up_to(end).and_then(|()| {
                self.fill
                    .file
                    .write_all_at(&chunk, offset)
                    .map_err(StoreError::io("cannot write the cache file", &self.tmp))
            });
            if let Err(reason) = stored {
                self.give_up_file(offset, &reason.to_string());
            }
        }
        self.fill.remember(offset, chunk).await?;
        // Readers are woken every NOTIFY_STEP bytes or NOTIFY_AFTER, not every chunk (16-64
        // KiB as TLS hands them over): a wake-up per chunk cost more than the bytes. They see
        // `written` at once whenever they look; the end of the stream always wakes them
        // (`finish`, `end`), and so does every chunk of an uncached fill, whose writer waits
        // for its readers.
        let (last_bytes, last_time) = self.notified;
        let wake = self.uncached()
            || end - last_bytes >= NOTIFY_STEP
            || last_time.elapsed() >= NOTIFY_AFTER;
        self.fill.progress.send_if_modified(|p| {
            p.written = end;
            wake
        });
        if wake {
            self.notified = (end, std::time::Instant::now());
        }
        Ok(())
    }
}

impl Drop for FillWriter {
    fn drop(&mut self) {
        let ended = self.fill.progress.borrow().ended;
        if !ended {
            self.end(FillState::Failed(Arc::from("download abandoned")));
        }
    }
}

/// How long an upstream body may stall before the download is given up.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
