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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::check::{Expected, Verifier};
use super::index::Blob;
use super::Store;

pub const CHUNK: usize = 256 * 1024;

/// What readers receive: chunks, or an error that must abort the client's response.
pub type ByteStream = mpsc::Receiver<std::io::Result<Bytes>>;
/// What readers that read the file themselves receive: `(offset, length)` of readable bytes.
pub type RangeStream = mpsc::Receiver<std::io::Result<(u64, usize)>>;

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
    /// The file's length if known in advance (FileSize, or the upstream's Content-Length).
    pub length: Option<u64>,
    /// The fill is over: stored in the index (or given up); the registry no longer has it.
    pub ended: bool,
}

pub struct Fill {
    file: File,
    progress: watch::Sender<Progress>,
    /// The last chunks written, so readers keeping up take them from memory instead of
    /// reading the file back (the page cache copy and a buffer per chunk).
    recent: Mutex<VecDeque<(u64, Bytes)>>,
}

/// How many of the latest chunks a fill keeps in memory for its readers.
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
            recent: Mutex::new(VecDeque::with_capacity(RECENT_CHUNKS)),
        })
    }

    fn remember(&self, offset: u64, chunk: Bytes) {
        let mut recent = self.recent.lock().unwrap();
        if recent.len() == RECENT_CHUNKS {
            recent.pop_front();
        }
        recent.push_back((offset, chunk));
    }

    /// Up to `len` bytes at `pos`, from memory if a recent chunk has them, else from the file.
    fn read(&self, pos: u64, len: usize) -> std::io::Result<Bytes> {
        let cached = self.recent.lock().unwrap().iter().find_map(|(at, chunk)| {
            let skip = pos.checked_sub(*at)? as usize;
            (skip < chunk.len()).then(|| chunk.slice(skip..chunk.len().min(skip + len)))
        });
        match cached {
            Some(bytes) => Ok(bytes),
            None => super::read::read_at(&self.file, pos, len),
        }
    }

    pub fn reader(self: &Arc<Fill>) -> FillReader {
        FillReader {
            fill: self.clone(),
            progress: self.progress.subscribe(),
        }
    }
}

/// Takes chunks from an upstream body. Implemented by the fill writer and by the
/// pass-through used when caching is off.
pub trait ChunkSink {
    fn write(
        &mut self,
        chunk: Bytes,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
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
}

impl FillWriter {
    /// The upstream answered 200; readers may start.
    pub fn start(&self, length: Option<u64>) {
        self.fill.progress.send_modify(|p| {
            p.state = FillState::Streaming;
            p.length = length;
        });
    }

    pub fn missing(mut self) {
        self.end(FillState::Missing);
    }

    pub fn fail(mut self, reason: &str) {
        tracing::warn!(nar = %self.key, reason, "NAR download failed; nothing stored");
        self.end(FillState::Failed(Arc::from(reason)));
    }

    /// Verifies, fsyncs, renames into place and records the file in the index, in that order.
    pub async fn finish(mut self) {
        let check = self.check.take().expect("finish once");
        let sha256 = match check.finish().await {
            Ok(sha) => sha,
            Err(reason) => {
                self.store.count_verification_failure();
                return self.fail(&reason);
            }
        };
        let size = self.fill.progress.borrow().written;
        let store = self.store.clone();
        let (key, tmp) = (self.key.clone(), self.tmp.clone());
        let file = match self.fill.file.try_clone() {
            Ok(f) => f,
            Err(e) => return self.fail(&format!("cache file: {e}")),
        };
        let blob = Blob {
            size,
            sha256,
            last_access: super::unix_now(),
        };
        // Verified: readers may take the last byte now; storing it durably (fsync of the
        // whole file) must not hold clients up. The fill stays registered until the index
        // has it, so nobody starts a second download meanwhile.
        self.fill
            .progress
            .send_modify(|p| p.state = FillState::Complete);
        let stored = tokio::task::spawn_blocking(move || store.commit_blob(&key, &tmp, file, blob))
            .await
            .unwrap_or_else(|e| Err(format!("commit task: {e}")));
        match stored {
            Ok(()) => {
                self.finished = true; // the temporary file is now the blob
                self.end(FillState::Complete);
                let store = self.store.clone();
                tokio::task::spawn_blocking(move || store.enforce_limits(0));
            }
            Err(reason) => {
                // The bytes were right; only storing them failed. Readers still get them.
                tracing::warn!(nar = %self.key, reason, "could not store a verified NAR");
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
}

impl ChunkSink for FillWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), String> {
        let check = self.check.as_mut().expect("write before finish");
        if let Err(reason) = check.update(chunk.clone()).await {
            self.store.count_verification_failure();
            return Err(reason);
        }
        let offset = self.fill.progress.borrow().written;
        self.fill
            .file
            .write_all_at(&chunk, offset)
            .map_err(|e| format!("writing the cache file: {e}"))?;
        self.fill.remember(offset, chunk.clone());
        self.fill
            .progress
            .send_modify(|p| p.written += chunk.len() as u64);
        Ok(())
    }
}

impl Drop for FillWriter {
    fn drop(&mut self) {
        if !self.finished {
            self.end(FillState::Failed(Arc::from("download abandoned")));
        }
    }
}

pub struct FillReader {
    fill: Arc<Fill>,
    progress: watch::Receiver<Progress>,
}

impl FillReader {
    /// Waits until the leader knows the upstream's answer.
    pub async fn started(&mut self) -> Progress {
        let progress = self
            .progress
            .wait_for(|p| p.state != FillState::Waiting)
            .await
            .map(|p| p.clone());
        progress.unwrap_or(Progress {
            state: FillState::Failed(Arc::from("download abandoned")),
            written: 0,
            length: None,
            ended: true,
        })
    }

    /// Waits until the fill is over (stored or given up).
    pub async fn ended(&mut self) {
        let _ = self.progress.wait_for(|p| p.ended).await;
    }

    /// Streams the file from the start as it grows; ends with an error if the fill fails.
    pub fn stream(self) -> ByteStream {
        let fill = self.fill.clone();
        self.follow(CHUNK, move |pos, len| fill.read(pos, len))
    }

    /// The fill's file, for a client that reads it itself along [`FillReader::ranges`].
    pub fn file(&self) -> std::io::Result<File> {
        self.fill.file.try_clone()
    }

    /// Announces the file's bytes as `(offset, length)` ranges, in order, as they become
    /// readable; ends with an error if the fill fails.
    pub fn ranges(self, most: usize) -> RangeStream {
        self.follow(most, |pos, len| Ok((pos, len)))
    }

    /// Hands each newly readable piece of the file (at most `most` bytes) to `take`, in
    /// order, and what it makes of it to the channel; ends with an error if the fill fails.
    fn follow<T: Piece + Send + 'static>(
        mut self,
        most: usize,
        take: impl Fn(u64, usize) -> std::io::Result<T> + Send + 'static,
    ) -> mpsc::Receiver<std::io::Result<T>> {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut pos = 0u64;
            loop {
                let progress = self.progress.borrow_and_update().clone();
                // The last byte waits for verification: a client must not hold a complete
                // response for a NAR that turns out to be wrong.
                let readable = if progress.state == FillState::Complete {
                    progress.written
                } else {
                    progress.written.saturating_sub(1)
                };
                if pos < readable {
                    let len = (readable - pos).min(most as u64) as usize;
                    let piece = take(pos, len);
                    let failed = piece.is_err();
                    pos += piece.as_ref().map_or(0, |p| p.bytes()) as u64;
                    if tx.send(piece).await.is_err() || failed {
                        return; // the client went away, or the file cannot be read
                    }
                    continue;
                }
                let reason = match progress.state {
                    FillState::Complete => return,
                    FillState::Failed(reason) => reason.to_string(),
                    FillState::Missing => "upstream lost the file".to_string(),
                    FillState::Waiting | FillState::Streaming => {
                        if self.progress.changed().await.is_ok() {
                            continue;
                        }
                        "download abandoned".to_string()
                    }
                };
                let _ = tx.send(Err(std::io::Error::other(reason))).await;
                return;
            }
        });
        rx
    }
}

/// What a follower hands on: it may be shorter than asked (a chunk from memory ends early).
trait Piece {
    fn bytes(&self) -> usize;
}

impl Piece for Bytes {
    fn bytes(&self) -> usize {
        self.len()
    }
}

impl Piece for (u64, usize) {
    fn bytes(&self) -> usize {
        self.1
    }
}

/// Pass-through for when the cache cannot take the file (disk full, no narinfo known):
/// verifies what it can and aborts the client's stream on a mismatch.
pub struct PassThrough {
    store: Store,
    check: Option<Verifier>,
    tx: mpsc::Sender<std::io::Result<Bytes>>,
    /// The latest chunk, held back until the next one arrives or the check passes, so a
    /// wrong NAR never reaches the client whole.
    held: Option<Bytes>,
}

impl PassThrough {
    pub fn new(store: &Store, expected: Option<&Expected>) -> (PassThrough, ByteStream) {
        let (tx, rx) = mpsc::channel(4);
        let check = expected.and_then(|e| Verifier::start(e).ok());
        (
            PassThrough {
                store: store.clone(),
                check,
                tx,
                held: None,
            },
            rx,
        )
    }

    pub async fn finish(mut self, outcome: Result<(), String>) {
        let outcome = match (outcome, self.check.take()) {
            (Ok(()), Some(check)) => check.finish().await.map(drop).inspect_err(|_| {
                self.store.count_verification_failure();
            }),
            (outcome, _) => outcome,
        };
        let last = match outcome {
            Ok(()) => match self.held.take() {
                Some(chunk) => Ok(chunk),
                None => return,
            },
            Err(reason) => {
                tracing::warn!(reason, "pass-through NAR failed");
                Err(std::io::Error::other(reason))
            }
        };
        let _ = self.tx.send(last).await;
    }
}

impl ChunkSink for PassThrough {
    async fn write(&mut self, chunk: Bytes) -> Result<(), String> {
        if let Some(check) = &mut self.check {
            check
                .update(chunk.clone())
                .await
                .inspect_err(|_| self.store.count_verification_failure())?;
        }
        match self.held.replace(chunk) {
            Some(previous) => self
                .tx
                .send(Ok(previous))
                .await
                .map_err(|_| "client went away".to_string()),
            None => Ok(()),
        }
    }
}

/// How long an upstream body may stall before the download is given up.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
