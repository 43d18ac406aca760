//! A client's view of a fill: it follows the growing file (or, for an uncached fill, the
//! bytes held in memory) and hands on what is readable, in order, the last byte only once
//! the whole NAR is verified.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::{Fill, FillState, Piece, PieceStream, Progress, CHUNK};
use crate::store::read::ByteStream;

pub struct FillReader {
    pub(super) fill: Arc<Fill>,
    pub(super) progress: watch::Receiver<Progress>,
    /// How far this reader has taken bytes (see [`Fill::remember`]).
    pub(super) position: Arc<AtomicU64>,
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

    /// The fill's file, for a client that reads it itself along [`FillReader::pieces`].
    pub fn file(&self) -> std::io::Result<File> {
        self.fill.file.try_clone()
    }

    /// Announces the fill's bytes in order as they become readable, as ranges of the file
    /// (at most `most` bytes each) or, for an uncached fill, as bytes; ends with an error if
    /// the fill fails.
    pub fn pieces(self, most: usize) -> PieceStream {
        let fill = self.fill.clone();
        self.follow(most, move |pos, len| fill.piece(pos, len))
    }

    /// Hands each newly readable piece of the file (at most `most` bytes) to `take`, in
    /// order, and what it makes of it to the channel; ends with an error if the fill fails.
    fn follow<T: Measured + Send + 'static>(
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
                    pos += piece.as_ref().map_or(0, |p| p.measure()) as u64;
                    self.position.store(pos, Ordering::Release);
                    self.fill.advanced.notify_waiters();
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

impl Drop for FillReader {
    fn drop(&mut self) {
        // An uncached fill may be waiting for this reader.
        self.position.store(u64::MAX, Ordering::Release);
        self.fill.advanced.notify_waiters();
    }
}

/// What a follower hands on: it may be shorter than asked (a chunk from memory ends early).
pub trait Measured {
    fn measure(&self) -> usize;
}

impl Measured for Bytes {
    fn measure(&self) -> usize {
        self.len()
    }
}

impl Measured for Piece {
    fn measure(&self) -> usize {
        self.size()
    }
}
