//! The way to an upstream through this site's cache (`site = ...` on an `[[upstream]]`):
//! requests under the upstream's URL go to the site first, with the same `Authorization` and
//! the upstream named in [`UPSTREAM_HEADER`]; the site acts for this machine only. A site
//! that cannot be reached within a second, or answers anything but a cache's answer, is
//! passed over for the upstream itself: a site never fails a substitution.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use url::Url;

use crate::http::{display_url, Client};

/// Names, on a request to a site, the upstream it is for (its URL, as configured on both).
pub const UPSTREAM_HEADER: &str = "nix-sidecar-upstream";
/// Time until the site's response headers arrive: a NAR it fetches upstream first costs the
/// upstream's round trip, no more.
const SITE_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// A closure's hints at most (20,000 narinfos of ~1.6 KiB).
const HINTS_MOST_BYTES: usize = 32 << 20;

pub struct SiteRoute {
    base: Url,
    client: Client,
    up: AtomicBool,
}

impl SiteRoute {
    pub fn new(base: &Url, client: Client) -> SiteRoute {
        let mut base = base.clone();
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        SiteRoute {
            base,
            client,
            up: AtomicBool::new(true),
        }
    }

    /// Whether the last request reached the site and got a cache's answer.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn url(&self) -> &Url {
        &self.base
    }

    /// The narinfos of `hash`'s closure the site knows and this machine may have (closure
    /// hints); empty when it has none or cannot be asked.
    pub async fn closure(
        &self,
        upstream: &Url,
        hash: &str,
        authorization: Option<&HeaderValue>,
    ) -> Vec<String> {
        let Ok(target) = self.base.join(&format!("_sidecar/closure/{hash}")) else {
            return Vec::new();
        };
        let Some(request) = request(&Method::GET, &target, upstream, authorization) else {
            return Vec::new();
        };
        let answer = tokio::time::timeout(SITE_HEADER_TIMEOUT, self.client.request(request)).await;
        let Ok(Ok(response)) = answer else {
            return Vec::new();
        };
        if response.status() != StatusCode::OK {
            return Vec::new();
        }
        let body =
            crate::http::read_limited(response.into_body(), HINTS_MOST_BYTES, SITE_HEADER_TIMEOUT)
                .await;
        body.map(|b| parse_hints(&b)).unwrap_or_default()
    }

    /// The site's answer for `url` (under `upstream`), or `None` to go to the upstream.
    pub async fn ask(
        &self,
        upstream: &Url,
        url: &Url,
        method: &Method,
        authorization: Option<&HeaderValue>,
    ) -> Option<Response<Incoming>> {
        let rel = url.as_str().strip_prefix(upstream.as_str())?;
        let target = self.base.join(rel).ok()?;
        let request = request(method, &target, upstream, authorization)?;
        let outcome =
            match tokio::time::timeout(SITE_HEADER_TIMEOUT, self.client.request(request)).await {
                Ok(Ok(response)) => match response.status() {
                    StatusCode::OK
                    | StatusCode::NOT_FOUND
                    | StatusCode::FORBIDDEN
                    | StatusCode::GONE
                    | StatusCode::UNAUTHORIZED => Ok(response),
                    other => Err(format!("HTTP {}", other.as_u16())),
                },
                Ok(Err(e)) => Err(super::error_chain(&e)),
                Err(_) => Err(format!(
                    "no answer within {}s",
                    SITE_HEADER_TIMEOUT.as_secs()
                )),
            };
        let was_up = self.up.swap(outcome.is_ok(), Ordering::Relaxed);
        match outcome {
            Ok(response) => {
                if !was_up {
                    tracing::info!(site = %display_url(&self.base), "site answers again");
                }
                Some(response)
            }
            Err(reason) => {
                if was_up {
                    tracing::warn!(site = %display_url(&self.base), %reason, "site unavailable: going straight to the upstream");
                }
                None
            }
        }
    }
}

/// A request to the site for `upstream`, with the machine's credential.
fn request(
    method: &Method,
    target: &Url,
    upstream: &Url,
    authorization: Option<&HeaderValue>,
) -> Option<Request<Full<Bytes>>> {
    let mut request = Request::builder()
        .method(method.clone())
        .uri(target.as_str())
        .header(http::header::USER_AGENT, crate::http::USER_AGENT)
        .header(UPSTREAM_HEADER, upstream.as_str());
    if let Some(value) = authorization {
        request = request.header(http::header::AUTHORIZATION, value.clone());
    }
    request.body(Full::new(Bytes::new())).ok()
}

/// The narinfo texts of a site's closure-hints answer (`{"narinfos": [...]}`); nothing when it
/// is anything else. Each is still only a candidate: the proxy checks it as an upstream's.
pub fn parse_hints(body: &[u8]) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Hints {
        narinfos: Vec<String>,
    }
    serde_json::from_slice::<Hints>(body)
        .map(|h| h.narinfos)
        .unwrap_or_default()
}
