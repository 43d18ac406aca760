//! What can go wrong in the store, by kind. Callers decide on the variant (serve without
//! caching, refuse an upload, cut a stream); the text names what failed and where.

use std::path::{Path, PathBuf};

pub use crate::nix::nar_check::CheckError;

/// The index could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("cache index: {0}")]
    Db(#[from] Box<redb::Error>),
    /// A change refused because the rows no longer say what it was made for.
    #[error("cache index: {0}")]
    Conflict(&'static str),
}

/// Wraps any of redb's error types (they all convert into `redb::Error`).
pub(super) fn db(e: impl Into<redb::Error>) -> IndexError {
    IndexError::Db(Box::new(e.into()))
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("{} is in use: another nix-sidecar (or a `cache` command) has it open", .0.display())]
    InUse(PathBuf),
    #[error("not enough disk space for the cache")]
    NoRoom,
    #[error(transparent)]
    Check(#[from] CheckError),
    /// A file or directory of the cache: what was being done, to which path.
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    #[error("cannot start the {0} thread: {1}")]
    Thread(&'static str, std::io::Error),
}

impl StoreError {
    /// An I/O failure of `what` on `path`, for `map_err`.
    pub fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.to_path_buf();
        move |source| StoreError::Io { what, path, source }
    }
}

/// Why a sink stopped taking an upstream body.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The bytes are not what the narinfo promised.
    #[error(transparent)]
    Check(#[from] CheckError),
    #[error("upstream sent more than the {0} bytes announced")]
    Overlong(u64),
    #[error("no client took bytes for {0}s")]
    Stalled(u64),
    #[error("client went away")]
    ClientGone,
}
