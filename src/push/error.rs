//! What can go wrong on this machine's side of a push: the queue on disk, the local store
//! asked for a closure, a peer not allowed to push. Failures of an upload itself are
//! [`super::target::PushError`]s (retry or give up).

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("push queue: {0}")]
    Db(#[from] Box<redb::Error>),
    #[error("push queue: {0}")]
    Encoding(#[from] serde_json::Error),
    #[error("{} is in use by another nix-sidecar", .0.display())]
    InUse(std::path::PathBuf),
    #[error("{}: {source}", path.display())]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("push queue: {0}")]
    Task(String),
}

/// Wraps any of redb's error types.
pub(super) fn db(e: impl Into<redb::Error>) -> QueueError {
    QueueError::Db(Box::new(e.into()))
}

/// What `nix path-info` could not say.
#[derive(Debug, thiserror::Error)]
pub enum PathInfoError {
    #[error("cannot run nix path-info (is Nix on the daemon's PATH?): {0}")]
    Run(std::io::Error),
    #[error("nix path-info: {0}")]
    Failed(String),
    #[error("nix path-info --json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("nix path-info --json printed {0}")]
    Shape(String),
}

/// Why a peer may not push (the text is the 403's body).
#[derive(Debug, thiserror::Error)]
pub enum NotAllowed {
    #[error("uid {0} may not push here (push-uids)")]
    Uid(u32),
    #[error("the pushing process's uid cannot be told (push-uids)")]
    Unknown,
}
