//! What can go wrong making a client or a small call. URLs in these errors are shown without
//! their query (presigned URLs carry signatures there), and no header value is ever part of one.

use std::path::PathBuf;

/// A client could not be built from the configured CA file.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {detail}", path.display())]
    Certificate { path: PathBuf, detail: String },
    #[error("{} holds no PEM certificate", .0.display())]
    NoCertificate(PathBuf),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// A small body could not be read whole.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BodyError {
    #[error("answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading the answer failed: {0}")]
    Failed(String),
    #[error("no complete answer within {0}s")]
    Timeout(u64),
}

/// A small call got no usable answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("bad request for {url}: {detail}")]
    BadRequest { url: String, detail: String },
    /// Nothing came back in time: on a metadata link, often a hop limit.
    #[error("{url} did not answer within {secs}s")]
    Timeout { url: String, secs: u64 },
    #[error("{url} unreachable: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("{url}: {source}")]
    Body { url: String, source: BodyError },
}
