//! Checking NAR bytes against what their narinfo promises while they stream, without holding
//! up the download: the check itself is `nix::nar_check`; this decides where it runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::nix::hash::Sha256;
use crate::nix::nar_check::{CheckError, ContentCheck, Expected, Promise};

/// Checks a NAR while it streams. A check that is one SHA-256 of the bytes as served (an
/// uncompressed NAR, or a FileHash) runs inline, chunk by chunk: handing each chunk to another
/// thread cost more than hashing it (a cold copy of 1 GiB in 16-64 KiB chunks spent a sixth of
/// the sidecar's CPU in wake-ups and context switches), and a chunk is at most 256 KiB (under
/// 0.2 ms of hashing). A check that decompresses queues its chunks (up to 8) for a blocking
/// worker that exists only while there is work: decompressing can take milliseconds a chunk,
/// and a slow download holds no thread between chunks (a thread per download made memory grow
/// with the number of downloads). Overlong streams are refused here, before their bytes go
/// anywhere.
pub struct Verifier {
    mode: Mode,
    promise: Option<Promise>,
    received: u64,
}

enum Mode {
    /// Hashed as it comes, on the caller's thread (`None` once failed or finished).
    Inline(Option<Box<ContentCheck>>),
    /// Decompressed and hashed by a blocking worker.
    Worker {
        chunks: mpsc::Sender<Bytes>,
        shared: Arc<Shared>,
    },
}

struct Shared {
    /// The queue and the check, held by whichever worker is draining them.
    work: std::sync::Mutex<Work>,
    /// A worker is draining (or about to).
    running: AtomicBool,
    /// Set once a chunk failed; later chunks are dropped unhashed.
    failed: std::sync::Mutex<Option<CheckError>>,
}

struct Work {
    queue: mpsc::Receiver<Bytes>,
    /// Taken by `finish`; a worker that starts after that finds nothing to do.
    check: Option<ContentCheck>,
}

impl Shared {
    /// Hashes queued chunks until the queue is empty, then leaves (see `Verifier::update`).
    fn drain(&self) {
        let mut work = self.work.lock().unwrap();
        loop {
            while let Ok(chunk) = work.queue.try_recv() {
                let Some(check) = work.check.as_mut() else {
                    continue;
                };
                if self.failed.lock().unwrap().is_some() {
                    continue;
                }
                if let Err(reason) = check.update(&chunk) {
                    *self.failed.lock().unwrap() = Some(reason);
                }
            }
            self.running.store(false, Ordering::SeqCst);
            // A chunk sent after the last look saw `running` still set: take it too.
            if work.queue.is_empty() || self.running.swap(true, Ordering::SeqCst) {
                return;
            }
        }
    }

    fn failure(&self) -> Option<CheckError> {
        self.failed.lock().unwrap().clone()
    }
}

impl Verifier {
    /// Must be called within the runtime.
    pub fn start(expected: &Expected) -> Result<Verifier, CheckError> {
        let check = ContentCheck::new(expected)?;
        let promise = check.promise();
        let mode = if !check.decompresses() {
            Mode::Inline(Some(Box::new(check)))
        } else {
            let (chunks, queue) = mpsc::channel(8);
            let shared = Arc::new(Shared {
                work: std::sync::Mutex::new(Work {
                    queue,
                    check: Some(check),
                }),
                running: AtomicBool::new(false),
                failed: std::sync::Mutex::new(None),
            });
            Mode::Worker { chunks, shared }
        };
        Ok(Verifier {
            mode,
            promise,
            received: 0,
        })
    }

    pub async fn update(&mut self, chunk: Bytes) -> Result<(), CheckError> {
        self.received += chunk.len() as u64;
        if let Some(promise) = &self.promise {
            promise.allows(self.received)?;
        }
        match &mut self.mode {
            Mode::Inline(check) => {
                let running = check.as_mut().ok_or(CheckError::Stopped)?;
                running.update(&chunk).inspect_err(|_| *check = None)
            }
            Mode::Worker { chunks, shared } => {
                if let Some(reason) = shared.failure() {
                    return Err(reason);
                }
                chunks.send(chunk).await.map_err(|_| CheckError::Stopped)?;
                if !shared.running.swap(true, Ordering::SeqCst) {
                    let shared = shared.clone();
                    tokio::task::spawn_blocking(move || shared.drain());
                }
                Ok(())
            }
        }
    }

    /// Ends the stream; returns the SHA-256 of the bytes as stored.
    pub async fn finish(self) -> Result<Sha256, CheckError> {
        let (chunks, shared) = match self.mode {
            Mode::Inline(check) => return check.ok_or(CheckError::Stopped)?.finish(),
            Mode::Worker { chunks, shared } => (chunks, shared),
        };
        drop(chunks);
        tokio::task::spawn_blocking(move || {
            // Waits for a worker still draining, then takes what is left.
            shared.drain();
            if let Some(reason) = shared.failure() {
                return Err(reason);
            }
            let check = shared.work.lock().unwrap().check.take();
            check.ok_or(CheckError::Stopped)?.finish()
        })
        .await
        .unwrap_or(Err(CheckError::Stopped))
    }
}

#[cfg(test)]
#[path = "check_tests.rs"]
mod tests;
