//! Why the exchange cannot start: each names the setting or file at fault, for the log and
//! for `check-config`. Refusals of a request are [`super::decide::Refusal`]s, not these.

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Client(#[from] crate::http::ClientError),
    /// The signing key cannot be read or is not a key of its algorithm.
    #[error("{0}")]
    SigningKey(String),
    /// The deny file must be readable at start: an exchange that cannot tell who is denied
    /// does not start.
    #[error("deny-file: {0}")]
    DenyFile(String),
    #[error("audit-log {}: {source}", path.display())]
    AuditLog {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}
