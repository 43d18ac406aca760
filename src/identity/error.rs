//! Why a source gave no token, by kind: a provider that could not be asked (down, slow,
//! unreachable: worth asking again soon) or one that answered without a token (an error
//! status, a malformed answer, a missing setting). The text says what and where, never a secret.

use crate::http::CallError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The provider could not be asked.
    #[error(transparent)]
    Call(#[from] CallError),
    /// It was asked (or looked for) and gave no token.
    #[error("{0}")]
    NoToken(String),
}

impl FetchError {
    /// A timeout, not a refusal: on a metadata link this is often a hop limit.
    pub fn timed_out(&self) -> bool {
        matches!(self, FetchError::Call(CallError::Timeout { .. }))
    }
}
