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

/// An address could not be listened on.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct ListenError {
    pub addr: std::net::SocketAddr,
    pub source: std::io::Error,
}

/// A served certificate and key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    #[error("{}: {detail}", path.display())]
    File { path: PathBuf, detail: String },
    #[error("{} holds no certificate", .0.display())]
    NoCertificate(PathBuf),
    #[error("{} holds no private key", .0.display())]
    NoKey(PathBuf),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// The client of one upstream could not be built (its `ca-file`).
#[derive(Debug, thiserror::Error)]
#[error("upstream `{upstream}`: {source}")]
pub struct UpstreamClientError {
    pub upstream: String,
    pub source: ClientError,
}
