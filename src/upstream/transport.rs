//! One request to an upstream on the wire, before any answer counts: the token only to the
//! origin it is for, redirects followed (without the token to any other origin), link-local
//! and foreign loopback targets refused. URLs in errors are display URLs (no query, no
//! userinfo); no header value is ever part of one.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use url::Url;

use super::{error_chain, Upstream};
use crate::http::{display_url, ClientFor};
use crate::identity::IdentityError;

const MAX_REDIRECTS: usize = 5;

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

impl SendError {
    /// Whether asking again could change anything (a refused target or a request that
    /// cannot be built stays so).
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            SendError::Forbidden(_) | SendError::Request(_) | SendError::NotHttp
        )
    }
}

/// A request to make of an upstream. Its body is made afresh for each try: a redirect or a
/// 401 sends it again.
pub struct Outgoing<'a, B> {
    pub method: Method,
    pub url: &'a Url,
    pub headers: &'a [(HeaderName, String)],
    pub body: &'a (dyn Fn() -> B + Send + Sync),
    /// The origin the credential is for: the upstream's own for pulls, an Attic server's or
    /// FlakeHub's API for pushes. Nothing else ever gets the token.
    pub credential_for: url::Origin,
    /// How long the answer's headers may take (`None`: as long as sending the body takes).
    pub timeout: Option<Duration>,
    /// Ask this upstream's site first (pulls only: a site takes no uploads).
    pub via_site: bool,
}

impl Upstream {
    /// Sends `out` once with `authorization`, following redirects. The flag says whether
    /// the final answer came from the origin the credential is for.
    pub(super) async fn exchange<B>(
        &self,
        client: &ClientFor<B>,
        out: &Outgoing<'_, B>,
        authorization: Option<&HeaderValue>,
    ) -> Result<(Response<Incoming>, bool), SendError>
    where
        B: hyper::body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut url = out.url.clone();
        for _ in 0..=MAX_REDIRECTS {
            self.check_target(&url)?;
            let trusted = url.origin() == out.credential_for;
            let body = (out.body)();
            let mut request = Request::builder()
                .method(out.method.clone())
                .uri(url.as_str())
                .header(http::header::USER_AGENT, crate::http::USER_AGENT);
            if !matches!(out.method, Method::GET | Method::HEAD) {
                let len = hyper::body::Body::size_hint(&body).lower();
                request = request.header(http::header::CONTENT_LENGTH, len);
            }
            for (name, value) in out.headers {
                request = request.header(name, value);
            }
            if let (true, Some(value)) = (trusted, authorization) {
                request = request.header(http::header::AUTHORIZATION, value.clone());
            }
            let sent = client.request(request.body(body)?);
            let answered = match out.timeout {
                Some(limit) => tokio::time::timeout(limit, sent).await.map_err(|_| limit),
                None => Ok(sent.await),
            };
            let response = match answered {
                Ok(Ok(response)) => response,
                Ok(Err(e)) => {
                    let (url, detail) = (display_url(&url), error_chain(&e));
                    return Err(SendError::Failed { url, detail });
                }
                Err(limit) => {
                    let (url, secs) = (display_url(&url), limit.as_secs());
                    return Err(SendError::NoAnswer { url, secs });
                }
            };
            if !response.status().is_redirection() || response.status() == StatusCode::NOT_MODIFIED
            {
                return Ok((response, trusted));
            }
            let location = response
                .headers()
                .get("location")
                .and_then(|l| l.to_str().ok())
                .and_then(|l| url.join(l).ok())
                .ok_or_else(|| SendError::BadRedirect(display_url(&url)))?;
            if !matches!(location.scheme(), "http" | "https") {
                return Err(SendError::NotHttp);
            }
            tracing::debug!(from = %display_url(&url), to = %display_url(&location), "following redirect");
            url = location;
        }
        Err(SendError::TooManyRedirects(MAX_REDIRECTS))
    }

    /// Refuses URLs on link-local addresses (cloud metadata services), and loopback ones
    /// unless the upstream itself is on loopback: a narinfo `URL:` or a redirect must not
    /// turn the sidecar against this machine's own services.
    fn check_target(&self, url: &Url) -> Result<(), SendError> {
        let ip = match url.host() {
            Some(url::Host::Ipv4(v4)) => std::net::IpAddr::V4(v4),
            Some(url::Host::Ipv6(v6)) => std::net::IpAddr::V6(v6).to_canonical(),
            _ => return Ok(()),
        };
        let link_local = match ip {
            std::net::IpAddr::V4(v4) => v4.is_link_local(),
            std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        };
        let loopback_upstream = match self.base.host() {
            Some(url::Host::Ipv4(v4)) => v4.is_loopback(),
            Some(url::Host::Ipv6(v6)) => v6.is_loopback(),
            Some(url::Host::Domain(d)) => d == "localhost",
            None => false,
        };
        if link_local || (ip.is_loopback() && !loopback_upstream) {
            return Err(SendError::Forbidden(display_url(url)));
        }
        Ok(())
    }
}
