//! What can go wrong sending one request to an upstream, before any answer counts. URLs here
//! are display URLs (no query, no userinfo); no header value is ever part of one.

use crate::identity::IdentityError;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// A narinfo's `URL:` or a redirect pointing at this machine's own services.
    #[error("refusing to fetch {0}: a link-local or loopback address")]
    Forbidden(String),
    #[error("cannot build request: {0}")]
    Request(#[from] http::Error),
    #[error("request to {url} failed: {detail}")]
    Failed { url: String, detail: String },
    #[error("no answer from {url} within {secs}s")]
    NoAnswer { url: String, secs: u64 },
    #[error("redirect from {0} without a usable Location")]
    BadRedirect(String),
    #[error("redirect to a non-HTTP URL")]
    NotHttp,
    #[error("more than {0} redirects")]
    TooManyRedirects(usize),
    /// A resumed body must start where the first one broke off.
    #[error("{url} did not answer the rest from byte {offset} (HTTP {status})")]
    NoRange {
        url: String,
        offset: u64,
        status: u16,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
}
