//! Checking NAR bytes against what their narinfo promises, while they stream.
//!
//! With a `FileHash` the compressed bytes are hashed as they come. Without one (Attic), the
//! stream is decompressed on the fly and `NarHash`/`NarSize` are checked instead; the
//! decompressed size is capped at `NarSize`, so a decompression bomb stops early.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256 as Hasher};
use tokio::sync::mpsc;

use super::decode::decoder;
pub use super::error::CheckError;
use crate::nix::hash::Sha256;
use crate::nix::narinfo::NarInfo;

/// What the narinfo promised about a NAR file, as stored in the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expected {
    pub file_hash: Option<Sha256>,
    pub file_size: Option<u64>,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    pub compression: String,
}

impl Expected {
    pub fn from_narinfo(info: &NarInfo) -> Expected {
        Expected {
            file_hash: info.file_hash,
            file_size: info.file_size,
            nar_hash: info.nar_hash,
            nar_size: info.nar_size,
            compression: info.compression.clone(),
        }
    }

    /// The size of the file as served, when the narinfo says it (or it is uncompressed).
    pub fn file_len(&self) -> Option<u64> {
        self.file_size
            .or(self.is_uncompressed().then_some(self.nar_size))
    }

    /// Whether the file as served is the NAR itself.
    fn is_uncompressed(&self) -> bool {
        self.compression == "none"
    }
}

/// What the bytes as served must hash to and how long they must be, with the narinfo
/// fields that said so (for the error messages).
#[derive(Clone, Copy)]
struct Promise {
    sha256: [u8; 32],
    hash_field: &'static str,
    size: Option<u64>,
    size_field: &'static str,
}

impl Promise {
    /// Refuses a stream that has grown past the promised size.
    fn allows(&self, received: u64) -> Result<(), CheckError> {
        match self.size {
            Some(size) if received > size => Err(CheckError::TooLong {
                field: self.size_field,
                size,
            }),
            _ => Ok(()),
        }
    }
}

pub struct ContentCheck {
    /// Set when the bytes as served can be checked directly (FileHash, or an uncompressed
    /// NAR); otherwise they are decompressed and checked against NarHash.
    promise: Option<Promise>,
    raw: Hasher,
    raw_len: u64,
    nar: Option<Box<dyn Write + Send>>,
    nar_state: std::sync::Arc<std::sync::Mutex<NarState>>,
    nar_hash: [u8; 32],
    nar_size: u64,
}

#[derive(Default)]
struct NarState {
    hasher: Hasher,
    len: u64,
}

/// Counts and hashes the decompressed NAR, refusing to grow past `limit`.
struct NarSink {
    state: std::sync::Arc<std::sync::Mutex<NarState>>,
    limit: u64,
}

impl Write for NarSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut state = self.state.lock().unwrap();
        state.len += buf.len() as u64;
        if state.len > self.limit {
            return Err(std::io::Error::other(
                "decompressed NAR is larger than NarSize",
            ));
        }
        state.hasher.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

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
        let promise = check.promise;
        let mode = if check.nar.is_none() {
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

/// Checks a whole file as served against what the signature covers: NarHash and NarSize of
/// the NAR inside it (decompressed as needed). FileHash and FileSize, which a lying upstream
/// can swap for another path's, are checked on the way in; this is the check they cannot
/// satisfy.
pub fn check_nar(file: &mut impl std::io::Read, expected: &Expected) -> Result<(), CheckError> {
    let signed_only = Expected {
        file_hash: None,
        file_size: None,
        ..expected.clone()
    };
    let mut check = ContentCheck::new(&signed_only)?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| CheckError::Read(e.to_string()))?;
        if n == 0 {
            return check.finish().map(drop);
        }
        check.update(&buf[..n])?;
    }
}

impl ContentCheck {
    fn new(expected: &Expected) -> Result<ContentCheck, CheckError> {
        let nar_hash = expected.nar_hash.0;
        // An uncompressed NAR is its own file: without a FileHash, NarHash and NarSize
        // check the bytes as they come, and one SHA-256 pass does it.
        let promise = match expected.file_hash {
            Some(file_hash) => Some(Promise {
                sha256: file_hash.0,
                hash_field: "FileHash",
                size: expected.file_size,
                size_field: "FileSize",
            }),
            None if expected.is_uncompressed() => Some(Promise {
                sha256: nar_hash,
                hash_field: "NarHash",
                size: Some(expected.nar_size),
                size_field: "NarSize",
            }),
            None => None,
        };
        let nar_state = std::sync::Arc::new(std::sync::Mutex::new(NarState::default()));
        let nar = match promise {
            Some(_) => None,
            None => {
                let sink = NarSink {
                    state: nar_state.clone(),
                    limit: expected.nar_size,
                };
                Some(decoder(&expected.compression, sink)?)
            }
        };
        Ok(ContentCheck {
            promise,
            raw: Hasher::new(),
            raw_len: 0,
            nar,
            nar_state,
            nar_hash,
            nar_size: expected.nar_size,
        })
    }

    fn update(&mut self, chunk: &[u8]) -> Result<(), CheckError> {
        self.raw_len += chunk.len() as u64;
        if let Some(promise) = &self.promise {
            promise.allows(self.raw_len)?;
        }
        self.raw.update(chunk);
        if let Some(nar) = &mut self.nar {
            nar.write_all(chunk)
                .map_err(|e| CheckError::Decompress(e.to_string()))?;
        }
        Ok(())
    }

    /// Checks the end of the stream; returns the SHA-256 of the bytes as stored.
    fn finish(mut self) -> Result<Sha256, CheckError> {
        let raw: [u8; 32] = self.raw.finalize().into();
        if let Some(promise) = self.promise {
            if let Some(size) = promise.size.filter(|size| self.raw_len != *size) {
                return Err(CheckError::WrongSize {
                    sent: self.raw_len,
                    field: promise.size_field,
                    size,
                });
            }
            if raw != promise.sha256 {
                return Err(CheckError::WrongFileHash(promise.hash_field));
            }
        }
        if let Some(mut nar) = self.nar.take() {
            nar.flush()
                .map_err(|e| CheckError::Decompress(e.to_string()))?;
            drop(nar); // finishes the decoder, writing its last bytes
            let state = std::mem::take(&mut *self.nar_state.lock().unwrap());
            if state.len != self.nar_size {
                return Err(CheckError::WrongNarSize {
                    got: state.len,
                    size: self.nar_size,
                });
            }
            let hash: [u8; 32] = state.hasher.finalize().into();
            if hash != self.nar_hash {
                return Err(CheckError::WrongNarHash);
            }
        }
        Ok(Sha256(raw))
    }
}

#[cfg(test)]
#[path = "check_tests.rs"]
mod tests;
