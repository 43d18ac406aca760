//! NAR bytes on their way up: read from the local Nix store (`nix-store --dump`) or from a
//! file Nix uploaded (decompressed when the protocol wants the NAR itself), checked against
//! NarHash/NarSize as they go, and handed to the HTTP client as a streaming body of known
//! length. A mismatch ends the body with an error, so the upload is cut short and can never
//! be taken for complete.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sha2::{Digest, Sha256 as Hasher};
use tokio::sync::mpsc;

use super::info::PathInfo;
use crate::nix::hash::Sha256;

const CHUNK: usize = 256 * 1024;

/// A request body fed by a producer thread, announcing its exact length.
pub type UploadBody = crate::http::ChannelBody;

/// A body of `bytes`.
pub fn full(bytes: Bytes) -> UploadBody {
    let (tx, rx) = mpsc::channel(1);
    let len = bytes.len() as u64;
    let _ = tx.try_send(Ok(bytes));
    UploadBody::new(rx).with_len(len)
}

/// Where the bytes come from, and in what form they go.
#[derive(Clone)]
pub enum Feed {
    /// `nix-store --dump <path>`: the NAR itself.
    Store(String),
    /// A stored file, sent as the NAR inside it (`compression` says how to get it out).
    Nar { path: PathBuf, compression: String },
    /// A stored file sent as it is, which must still be the bytes that were checked when it
    /// arrived: SHA-256 `sha256` and `size` bytes (its FileHash and FileSize).
    AsIs {
        path: PathBuf,
        sha256: Sha256,
        size: u64,
    },
}

/// The body for `source`, preceded by `preamble`: `preamble.len() + len` bytes, where `len`
/// is NarSize (or the file's size when it goes as it is).
pub fn body(source: Feed, info: &PathInfo, preamble: Bytes, len: u64) -> UploadBody {
    let (tx, rx) = mpsc::channel(8);
    let total = preamble.len() as u64 + len;
    if !preamble.is_empty() {
        let _ = tx.try_send(Ok(preamble));
    }
    let expected = info.clone();
    tokio::task::spawn_blocking(move || {
        let state = Arc::new(Mutex::new((Hasher::new(), 0u64)));
        let mut out = Out {
            tx: tx.clone(),
            buf: Vec::with_capacity(CHUNK),
            state: state.clone(),
            limit: expected.nar_size,
        };
        let (what, sha256, size, result) = match source {
            Feed::Store(path) => (
                "NAR",
                expected.nar_hash,
                expected.nar_size,
                dump(&path, out),
            ),
            Feed::Nar { path, compression } => (
                "NAR",
                expected.nar_hash,
                expected.nar_size,
                decompress(&path, &compression, out),
            ),
            Feed::AsIs { path, sha256, size } => {
                out.limit = size;
                ("file", sha256, size, copy_file(&path, out))
            }
        };
        let result = result.and_then(|()| {
            let (hasher, len) = std::mem::take(&mut *state.lock().unwrap());
            let hash: [u8; 32] = hasher.finalize().into();
            if len != size {
                Err(std::io::Error::other(format!(
                    "the {what} is {len} bytes, not the {size} checked"
                )))
            } else if hash != sha256.0 {
                Err(std::io::Error::other(format!(
                    "the {what} is not the one that was checked (its SHA-256 differs)"
                )))
            } else {
                Ok(())
            }
        });
        if let Err(reason) = result {
            tracing::warn!(path = %expected.store_path, %reason, "upload cut short");
            let _ = tx.blocking_send(Err(reason));
        }
    });
    UploadBody::new(rx).with_len(total)
}

/// The NAR of a store path, as `nix-store --dump` writes it.
fn dump(path: &str, mut out: Out) -> std::io::Result<()> {
    let failed = |what: String| {
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"))
    };
    let mut child = std::process::Command::new("nix-store")
        .args(["--dump", path])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(failed("cannot run nix-store --dump".into()))?;
    let copied =
        std::io::copy(&mut child.stdout.take().expect("piped"), &mut out).and_then(|_| out.flush());
    let output = child
        .wait_with_output()
        .map_err(failed("nix-store --dump".into()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(std::io::Error::other(format!(
            "nix-store --dump {path} failed: {}",
            stderr.trim()
        )));
    }
    copied.map(drop).map_err(failed(format!("reading {path}")))
}

fn decompress(path: &std::path::Path, compression: &str, out: Out) -> std::io::Result<()> {
    let mut file = std::fs::File::open(path).map_err(about("opening", path))?;
    let mut decoder =
        crate::nix::decode::decoder(compression, out).map_err(std::io::Error::other)?;
    std::io::copy(&mut file, &mut decoder)
        .and_then(|_| decoder.flush())
        .map(drop)
        .map_err(about("decompressing", path))
}

fn copy_file(path: &std::path::Path, mut out: Out) -> std::io::Result<()> {
    let mut file = std::fs::File::open(path).map_err(about("opening", path))?;
    let mut buf = vec![0; CHUNK];
    loop {
        let n = file.read(&mut buf).map_err(about("reading", path))?;
        if n == 0 {
            return out.flush();
        }
        out.write_all(&buf[..n])?;
    }
}

/// Says what was being done to which file, keeping the error's kind.
fn about(what: &'static str, path: &std::path::Path) -> impl Fn(std::io::Error) -> std::io::Error {
    let shown = path.display().to_string();
    move |e| std::io::Error::new(e.kind(), format!("{what} {shown}: {e}"))
}

/// Gathers bytes into chunks for the body, hashing and counting them.
struct Out {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
    state: Arc<Mutex<(Hasher, u64)>>,
    limit: u64,
}

impl Write for Out {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        {
            let mut state = self.state.lock().unwrap();
            state.1 += data.len() as u64;
            if state.1 > self.limit {
                return Err(std::io::Error::other("the NAR is longer than NarSize"));
            }
            state.0.update(data);
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

impl Out {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::other("the upload was abandoned"))
    }
}

impl Drop for Out {
    fn drop(&mut self) {
        let _ = self.send();
    }
}
