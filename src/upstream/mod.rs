//! One upstream cache as an HTTP client sees it: the token in the `Authorization` header,
//! bounded retries with backoff (honouring `Retry-After` on 429), redirects followed without
//! the token to any other host, one fresh token and one retry on 401, and the answers reduced
//! to what the proxy needs: found, missing, or unavailable with a reason.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use url::Url;

use base64::Engine;

use crate::config::Auth;
use crate::http::{display_url, read_limited, snippet, Client};
mod credential;
mod resume;
mod site;
mod transport;

use crate::identity::{Identity, IdentityError, Token};
use crate::metrics::Metrics;
pub use crate::status::UpstreamHealth;
pub use credential::{Credential, Refused};
pub use site::{parse_hints, SiteRoute, UPSTREAM_HEADER};
pub use transport::SendError;

/// Attempts for one request on 5xx, 429, timeouts and connection errors.
const ATTEMPTS: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// The most a request waits in total between attempts (Retry-After beyond it is not honoured).
const RETRY_BUDGET: Duration = Duration::from_secs(10);
/// Time until the upstream's response headers arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_REDIRECTS: usize = 5;

pub enum Answer {
    Found(Response<Incoming>),
    /// 404, 410, or 403 (outside this identity's view).
    Missing,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// What the upstream said with its 401 goes to the log only (scrubbed): it may echo the
    /// credential it was sent.
    #[error("upstream `{upstream}` rejected this machine's identity `{identity}` (HTTP 401 after a fresh token)")]
    Rejected { upstream: String, identity: String },
    #[error("upstream `{upstream}` answered 401 and no identity is configured for it")]
    NeedsIdentity { upstream: String },
    /// The credential of the sidecar this request is made for (site tier) was refused.
    #[error("upstream `{upstream}` refused the caller's credential (HTTP 401)")]
    CallerRejected { upstream: String },
    #[error("upstream `{upstream}`: {source}")]
    Identity {
        upstream: String,
        source: IdentityError,
    },
    #[error("upstream `{upstream}` is unavailable: {detail}")]
    Unavailable { upstream: String, detail: String },
    /// It answered, but not with a valid answer (a malformed narinfo, one for another path).
    #[error("upstream `{upstream}` answered something unusable: {detail}")]
    Broken { upstream: String, detail: String },
}

pub struct Upstream {
    name: String,
    /// The cache URL, always ending in `/` so relative paths join below it.
    base: Url,
    identity: Option<Arc<Identity>>,
    auth: Auth,
    client: Client,
    metrics: Arc<Metrics>,
    health: Mutex<UpstreamHealth>,
    /// This site's cache, asked first (`site = ...`).
    site: Option<SiteRoute>,
}

impl Upstream {
    pub fn new(
        name: &str,
        url: &Url,
        identity: Option<Arc<Identity>>,
        auth: Auth,
        client: Client,
        metrics: Arc<Metrics>,
    ) -> Upstream {
        let mut base = url.clone();
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        Upstream {
            name: name.to_string(),
            base,
            identity,
            auth,
            client,
            metrics,
            health: Mutex::new(UpstreamHealth {
                healthy: true,
                ..Default::default()
            }),
            site: None,
        }
    }

    /// Asks `site` first from now on.
    pub fn with_site(mut self, site: SiteRoute) -> Upstream {
        self.site = Some(site);
        self
    }

    pub fn site(&self) -> Option<&SiteRoute> {
        self.site.as_ref()
    }

    /// The narinfos of `hash`'s closure that this upstream's site knows and this machine may
    /// have, asked with this machine's credential (closure hints); empty without a site.
    pub async fn closure_hints(&self, hash: &str) -> Vec<String> {
        let Some(site) = &self.site else {
            return Vec::new();
        };
        let mut credential = Credential::of(self.identity.as_ref(), &self.auth);
        let Ok(header) = credential.header().await else {
            return Vec::new();
        };
        site.closure(&self.base, hash, header.as_ref()).await
    }

    /// The cache URL requests are made below (ending in `/`).
    pub fn base(&self) -> &Url {
        &self.base
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn identity_name(&self) -> Option<&str> {
        self.identity.as_ref().map(|i| i.name())
    }

    /// `rel` (a cache path such as `nar/x.nar.xz` or an absolute URL) resolved against the cache URL.
    pub fn resolve(&self, rel: &str) -> Option<Url> {
        self.base.join(rel).ok()
    }

    pub fn health(&self) -> UpstreamHealth {
        let mut health = self.health.lock().unwrap().clone();
        health.site = self.site.as_ref().map(|site| crate::status::SiteHealth {
            url: display_url(site.url()),
            answering: site.is_up(),
        });
        health
    }

    /// GET (or HEAD) `url`, with every rule of the module doc applied.
    pub async fn fetch(&self, url: &Url, method: Method) -> Result<Answer, UpstreamError> {
        let result = self.fetch_inner(url, method).await;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .ok();
        let mut health = self.health.lock().unwrap();
        match &result {
            Ok(_) => {
                health.healthy = true;
                health.last_success = now;
            }
            Err(e) => {
                health.healthy = false;
                health.last_failure = now;
                health.last_error = Some(e.to_string());
            }
        }
        result
    }

    async fn fetch_inner(&self, url: &Url, method: Method) -> Result<Answer, UpstreamError> {
        let credential = Credential::of(self.identity.as_ref(), &self.auth);
        self.fetch_with(url, method, credential).await
    }

    /// GET or HEAD `url` for another sidecar at this site, presenting its `Authorization`
    /// (none: as it came, anonymous): its 401 is the caller's.
    pub async fn fetch_for_caller(
        &self,
        url: &Url,
        method: Method,
        authorization: Option<&http::HeaderValue>,
    ) -> Result<Answer, UpstreamError> {
        let credential = match authorization {
            Some(header) => Credential::of_caller(header),
            None => Credential::Anonymous,
        };
        self.fetch_with(url, method, credential).await
    }

    /// [`Upstream::fetch`] presenting `credential`; every rule of the module doc applied.
    async fn fetch_with(
        &self,
        url: &Url,
        method: Method,
        mut credential: Credential<'_>,
    ) -> Result<Answer, UpstreamError> {
        let mut attempt = 0;
        let mut waited = Duration::ZERO;
        loop {
            let header = credential
                .header()
                .await
                .map_err(|source| UpstreamError::Identity {
                    upstream: self.name.clone(),
                    source,
                })?;
            let started = Instant::now();
            let via_site = match &self.site {
                Some(site) => {
                    let answer = site.ask(&self.base, url, &method, header.as_ref()).await;
                    if url.as_str().starts_with(self.base.as_str()) {
                        self.metrics.site_routed(&self.name, answer.is_some());
                    }
                    answer
                }
                None => None,
            };
            let result = match via_site {
                // The site acts with this request's credential: its answers count as the
                // upstream's own (a 401 there is this token refused upstream).
                Some(response) => Ok((response, true)),
                None => self.send(url, &method, header).await,
            };
            self.metrics.upstream_answered(
                &self.name,
                result.as_ref().ok().map(|r| r.0.status().as_u16()),
                started.elapsed(),
            );
            let retry_after = match result {
                // A host that never got the token (a redirect target, a narinfo's absolute
                // URL) says nothing about the token: it is not dropped.
                Ok((response, false)) if response.status() == StatusCode::UNAUTHORIZED => {
                    return Err(self.unavailable(
                        "a host other than the upstream (which never got the token) answered 401"
                            .into(),
                    ));
                }
                Ok((response, _)) => match response.status() {
                    s if s.is_success() => return Ok(Answer::Found(response)),
                    StatusCode::NOT_FOUND | StatusCode::GONE | StatusCode::FORBIDDEN => {
                        return Ok(Answer::Missing)
                    }
                    StatusCode::UNAUTHORIZED => match credential.refused() {
                        Refused::Retry => continue,
                        Refused::Rejected { identity } => {
                            let body =
                                read_limited(response.into_body(), 4096, Duration::from_secs(5))
                                    .await
                                    .unwrap_or_default();
                            // Scrubbed whole, then cut: a token cut in half would slip through.
                            let body = snippet(
                                credential.scrub(&String::from_utf8_lossy(&body)).as_bytes(),
                            );
                            tracing::warn!(upstream = %self.name, identity, answer = %body, "upstream rejected a fresh token");
                            return Err(UpstreamError::Rejected {
                                upstream: self.name.clone(),
                                identity,
                            });
                        }
                        Refused::Caller => {
                            return Err(UpstreamError::CallerRejected {
                                upstream: self.name.clone(),
                            })
                        }
                        Refused::NeedsIdentity => {
                            return Err(UpstreamError::NeedsIdentity {
                                upstream: self.name.clone(),
                            })
                        }
                    },
                    s if s == StatusCode::TOO_MANY_REQUESTS
                        || s == StatusCode::REQUEST_TIMEOUT
                        || s.is_server_error() =>
                    {
                        let detail = format!("HTTP {}", s.as_u16());
                        (parse_retry_after(&response), detail)
                    }
                    s => {
                        return Err(self.unavailable(format!("unexpected HTTP {}", s.as_u16())));
                    }
                },
                Err(detail) => (None, detail.to_string()),
            };
            let (retry_after, detail) = retry_after;
            attempt += 1;
            if attempt >= ATTEMPTS {
                return Err(self.unavailable(format!("{detail} after {attempt} attempts")));
            }
            let backoff = FIRST_BACKOFF * 2u32.pow(attempt - 1);
            let jitter = backoff.mul_f64(fastrand::f64() * 0.2);
            let wait = retry_after.unwrap_or(backoff + jitter);
            if waited + wait > RETRY_BUDGET {
                return Err(self.unavailable(format!(
                    "{detail}; asked to wait {}s, more than the retry budget",
                    wait.as_secs()
                )));
            }
            tracing::debug!(upstream = %self.name, %detail, ?wait, "retrying");
            tokio::time::sleep(wait).await;
            waited += wait;
        }
    }

    fn unavailable(&self, detail: String) -> UpstreamError {
        UpstreamError::Unavailable {
            upstream: self.name.clone(),
            detail,
        }
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

    /// One request, following redirects. The token goes only to the upstream's own origin;
    /// the flag says whether the final answer came from that origin.
    async fn send(
        &self,
        url: &Url,
        method: &Method,
        authorization: Option<http::HeaderValue>,
    ) -> Result<(Response<Incoming>, bool), SendError> {
        let mut url = url.clone();
        for _ in 0..=MAX_REDIRECTS {
            self.check_target(&url)?;
            let same_origin = url.origin() == self.base.origin();
            let mut request = Request::builder()
                .method(method.clone())
                .uri(url.as_str())
                .header("user-agent", crate::http::USER_AGENT);
            if let (true, Some(value)) = (same_origin, &authorization) {
                request = request.header(http::header::AUTHORIZATION, value.clone());
            }
            let request = request.body(Full::new(Bytes::new()))?;
            let response =
                match tokio::time::timeout(HEADER_TIMEOUT, self.client.request(request)).await {
                    Ok(Ok(response)) => response,
                    Ok(Err(e)) => {
                        let (url, detail) = (display_url(&url), error_chain(&e));
                        return Err(SendError::Failed { url, detail });
                    }
                    Err(_) => {
                        let (url, secs) = (display_url(&url), HEADER_TIMEOUT.as_secs());
                        return Err(SendError::NoAnswer { url, secs });
                    }
                };
            if !response.status().is_redirection() || response.status() == StatusCode::NOT_MODIFIED
            {
                return Ok((response, same_origin));
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
}

/// The `Authorization` value presenting `token` as `auth` says (marked sensitive: never logged).
pub fn authorization(
    auth: &Auth,
    token: &Token,
) -> Result<http::HeaderValue, http::header::InvalidHeaderValue> {
    let value = match auth {
        Auth::Bearer => format!("Bearer {}", token.secret.expose()),
        Auth::Basic { username } => format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD
                .encode(format!("{username}:{}", token.secret.expose()))
        ),
    };
    let mut value = http::HeaderValue::from_str(&value)?;
    value.set_sensitive(true);
    Ok(value)
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after<B>(response: &Response<B>) -> Option<Duration> {
    let value = response.headers().get("retry-after")?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate(value)?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

fn httpdate(value: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(value).ok().or_else(|| {
        // IMF-fixdate: "Sun, 06 Nov 1994 08:49:37 GMT"
        let parts: Vec<&str> = value.split_whitespace().collect();
        if parts.len() != 6 || parts[5] != "GMT" {
            return None;
        }
        let months = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let month = months.iter().position(|m| *m == parts[2])? + 1;
        let text = format!("{}-{:02}-{:0>2}T{}Z", parts[3], month, parts[1], parts[4]);
        humantime::parse_rfc3339(&text).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_retry_after(v: &str) -> Response<()> {
        Response::builder()
            .header("retry-after", v)
            .body(())
            .unwrap()
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(
            parse_retry_after(&with_retry_after("3")),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            parse_retry_after(&with_retry_after("Sun, 06 Nov 1994 08:49:37 GMT")),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after(&with_retry_after("soon")), None);
        assert_eq!(parse_retry_after(&Response::new(())), None);
    }

    #[test]
    fn display_url_drops_query_and_credentials() {
        let url =
            Url::parse("https://user:pw@s3.example.com:8443/b/k?X-Amz-Signature=abc").unwrap();
        assert_eq!(display_url(&url), "https://s3.example.com:8443/b/k");
    }
}
