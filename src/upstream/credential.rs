//! What one request to a cache presents, and the rule every client of a cache follows on
//! 401: one fresh token and one more attempt, then a refusal whose text is scrubbed of the
//! secret that was sent. Pull (`upstream`) and push (`push::target`) both follow it here.

use std::sync::Arc;

use std::time::Duration;

use http::{HeaderValue, Response};
use hyper::body::Incoming;

use super::authorization;
use crate::config::Auth;
use crate::http::{read_limited, snippet};
use crate::identity::{Identity, IdentityError, Token};
use crate::secret::Secret;

/// Who a request speaks for.
pub enum Credential<'a> {
    /// This machine's identity, presented as `auth` says.
    Identity {
        identity: &'a Arc<Identity>,
        auth: &'a Auth,
        current: Option<Token>,
        refreshed: bool,
    },
    /// Another sidecar's `Authorization`, passed on as it came (the site tier): its 401 is
    /// the caller's to handle.
    Caller {
        header: &'a HeaderValue,
        secret: Secret,
    },
    Anonymous,
}

/// What a 401 leaves to do.
pub enum Refused {
    /// A fresh token was asked for: try once more.
    Retry,
    /// Refused after a fresh token.
    Rejected { identity: String },
    /// The caller's own credential was refused.
    Caller,
    /// Nothing was presented.
    NeedsIdentity,
}

impl<'a> Credential<'a> {
    pub fn of(identity: Option<&'a Arc<Identity>>, auth: &'a Auth) -> Credential<'a> {
        match identity {
            Some(identity) => Credential::Identity {
                identity,
                auth,
                current: None,
                refreshed: false,
            },
            None => Credential::Anonymous,
        }
    }

    pub fn of_caller(header: &'a HeaderValue) -> Credential<'a> {
        // What follows the scheme is the secret a scrub must find in echoed text.
        let text = String::from_utf8_lossy(header.as_bytes());
        let secret = text.split_once(' ').map_or(&*text, |(_, s)| s).to_string();
        Credential::Caller {
            header,
            secret: Secret::new(secret),
        }
    }

    /// The `Authorization` header of the next attempt (`None`: nothing to present).
    pub async fn header(&mut self) -> Result<Option<HeaderValue>, IdentityError> {
        match self {
            Credential::Identity {
                identity,
                auth,
                current,
                ..
            } => {
                let token = identity.token().await?;
                let header = authorization(auth, &token).map_err(|_| IdentityError {
                    identity: identity.name().to_string(),
                    reason: "the token is not a valid header value".into(),
                })?;
                *current = Some(token);
                Ok(Some(header))
            }
            Credential::Caller { header, .. } => Ok(Some((*header).clone())),
            Credential::Anonymous => Ok(None),
        }
    }

    /// The cache answered 401 to the last header presented.
    pub fn refused(&mut self) -> Refused {
        match self {
            Credential::Identity {
                identity,
                current,
                refreshed,
                ..
            } => match current {
                Some(token) if !*refreshed => {
                    identity.invalidate(token.generation);
                    *refreshed = true;
                    Refused::Retry
                }
                _ => Refused::Rejected {
                    identity: identity.name().to_string(),
                },
            },
            Credential::Caller { .. } => Refused::Caller,
            Credential::Anonymous => Refused::NeedsIdentity,
        }
    }

    /// What a refusal said (its body's first bytes), scrubbed whole of the secret presented,
    /// then cut and made printable: a token cut in half would slip through a scrub.
    pub async fn said(&self, response: Response<Incoming>) -> String {
        let body = read_limited(response.into_body(), 4096, Duration::from_secs(5))
            .await
            .unwrap_or_default();
        snippet(self.scrub(&String::from_utf8_lossy(&body)).as_bytes())
    }

    /// `text` (an answer that may echo what was sent) without the secret presented.
    pub fn scrub(&self, text: &str) -> String {
        match self {
            Credential::Identity {
                current: Some(token),
                ..
            } => token.secret.scrub(text),
            Credential::Caller { secret, .. } => secret.scrub(text),
            _ => text.to_string(),
        }
    }
}
