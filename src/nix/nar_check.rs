//! Checking a NAR file against what its narinfo promises: FileHash/FileSize of the file as
//! served, NarHash/NarSize of the NAR inside it (decompressed as needed, capped at NarSize, so
//! a decompression bomb stops early). The checks take bytes as they come; where the bytes come
//! from (a download, a stored file, an upload) is the caller's business.

use std::io::Write;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256 as Hasher};

use super::decode::{decoder, Undecodable};
use super::hash::Sha256;
use super::narinfo::NarInfo;

/// Why NAR bytes were refused. The messages name the narinfo field that was not kept, as
/// clients and logs have always seen them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CheckError {
    #[error("upstream sent more than {field} ({size} bytes)")]
    TooLong { field: &'static str, size: u64 },
    #[error("{sent} bytes came, {field} says {size}")]
    WrongSize {
        sent: u64,
        field: &'static str,
        size: u64,
    },
    #[error("NAR file does not match {0}")]
    WrongFileHash(&'static str),
    #[error("NAR is {got} bytes, NarSize says {size}")]
    WrongNarSize { got: u64, size: u64 },
    #[error("upstream announced {sent} bytes, the narinfo promises {promised}")]
    Announced { sent: u64, promised: u64 },
    #[error("NAR does not match NarHash")]
    WrongNarHash,
    #[error("NAR does not decompress as promised: {0}")]
    Decompress(String),
    #[error(
        "cannot verify a `{0}` NAR without FileHash (supported: none, xz, bzip2, zstd, gzip, br)"
    )]
    Unsupported(String),
    #[error("reading the stored file: {0}")]
    Read(String),
    #[error("verification stopped")]
    Stopped,
}

impl From<Undecodable> for CheckError {
    fn from(e: Undecodable) -> CheckError {
        match e {
            Undecodable::Unknown(compression) => CheckError::Unsupported(compression),
            Undecodable::Broken(why) => CheckError::Decompress(why),
        }
    }
}

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
pub(crate) struct Promise {
    sha256: [u8; 32],
    hash_field: &'static str,
    size: Option<u64>,
    size_field: &'static str,
}

impl Promise {
    /// Refuses a stream that has grown past the promised size.
    pub(crate) fn allows(&self, received: u64) -> Result<(), CheckError> {
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
    pub(crate) fn new(expected: &Expected) -> Result<ContentCheck, CheckError> {
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

    /// What the bytes as served must hash to, when one SHA-256 of them is the whole check.
    pub(crate) fn promise(&self) -> Option<Promise> {
        self.promise
    }

    /// Whether the check decompresses (slow enough to deserve its own thread).
    pub(crate) fn decompresses(&self) -> bool {
        self.nar.is_some()
    }

    pub(crate) fn update(&mut self, chunk: &[u8]) -> Result<(), CheckError> {
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
    pub(crate) fn finish(mut self) -> Result<Sha256, CheckError> {
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
#[path = "nar_check_tests.rs"]
pub(crate) mod tests;
