//! What can go wrong on this machine's side of a push: the queue on disk, the local store
//! asked for a closure, a peer not allowed to push, an upload from Nix not taken. Failures of
//! an upload to an upstream are [`super::target::PushError`]s (retry or give up).

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

/// Why an upload from Nix (`PUT /nar/...`, `PUT /<hash>.narinfo`) or a push request was not
/// taken. Push says what went wrong; the listener (`server/push.rs`) says which status that
/// is, in one table. The text is the answer's body.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    NotAllowed(#[from] NotAllowed),
    /// What was sent is not something this listener takes (a bad name, a narinfo that does
    /// not parse or does not match its NAR, a body of the wrong length).
    #[error("{0}")]
    Invalid(String),
    #[error("PUT /nar/<file> needs a Content-Length")]
    NoLength,
    #[error("the upload took longer than {0}s")]
    TooSlow(u64),
    /// Staging it would pass the staging cap or the cache's limits.
    #[error("{0}")]
    NoRoom(String),
    /// This machine failed to keep it (a write, a queue commit); the upload itself was fine.
    #[error("{0}")]
    Failed(String),
}

impl Refusal {
    pub(super) fn invalid(reason: impl Into<String>) -> Refusal {
        Refusal::Invalid(reason.into())
    }

    pub(super) fn failed(reason: impl ToString) -> Refusal {
        Refusal::Failed(reason.to_string())
    }
}
