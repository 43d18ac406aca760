//! One upstream cache as an HTTP client sees it: the token in the `Authorization` header,
//! bounded retries with backoff (honouring `Retry-After` on 429), redirects followed without
//! the token to any other host, one fresh token and one retry on 401, and the answers reduced
//! to what the proxy needs: found, missing, or unavailable with a reason.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use url::Url;

use base64::Engine;

use crate::config::Auth;
use crate::http::{display_url, Client, ClientFor};
mod credential;
mod resume;
mod site;
mod transport;

use crate::identity::{Identity, IdentityError, Token};
use crate::metrics::Metrics;
pub use crate::status::UpstreamHealth;
pub use credential::{Credential, Refused};
pub use site::{parse_hints, SiteRoute, UPSTREAM_HEADER};
pub use transport::{Outgoing, SendError};

/// Attempts for one request on 5xx, 429, timeouts and connection errors.
const ATTEMPTS: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// The most a request waits in total between attempts (Retry-After beyond it is not honoured).
const RETRY_BUDGET: Duration = Duration::from_secs(10);
/// Time until the upstream's response headers arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

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
        let now = crate::clock::unix_now();
        let mut health = self.health.lock().unwrap();
        match &result {
            Ok(_) => {
                health.healthy = true;
                health.last_success = Some(now);
            }
            Err(e) => {
                health.healthy = false;
                health.last_failure = Some(now);
                health.last_error = Some(e.to_string());
            }
        }
        result
    }

    /// How a request made to push here ended (`Err`: why it failed).
    pub fn record_push(&self, outcome: Result<(), &str>) {
        let now = crate::clock::unix_now();
        let mut health = self.health.lock().unwrap();
        let pushes = health.pushes.get_or_insert_with(Default::default);
        match outcome {
            Ok(()) => pushes.last_success = Some(now),
            Err(why) => {
                pushes.last_failure = Some(now);
                pushes.last_error = Some(why.to_string());
            }
        }
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
        let empty = || Full::new(Bytes::new());
        let out = Outgoing {
            method,
            url,
            headers: &[],
            body: &empty,
            credential_for: self.base.origin(),
            timeout: Some(HEADER_TIMEOUT),
            via_site: true,
        };
        let mut attempt = 0;
        let mut waited = Duration::ZERO;
        loop {
            let (retry_after, detail) = match self.send(&self.client, &mut credential, &out).await {
                Ok(response) => match response.status() {
                    s if s.is_success() => return Ok(Answer::Found(response)),
                    StatusCode::NOT_FOUND | StatusCode::GONE | StatusCode::FORBIDDEN => {
                        return Ok(Answer::Missing)
                    }
                    s if s == StatusCode::TOO_MANY_REQUESTS
                        || s == StatusCode::REQUEST_TIMEOUT
                        || s.is_server_error() =>
                    {
                        (parse_retry_after(&response), format!("HTTP {}", s.as_u16()))
                    }
                    s => {
                        let detail = format!("unexpected HTTP {}", s.as_u16());
                        return Err(self.unavailable(detail));
                    }
                },
                Err(Unanswered::Transport(e)) if e.is_transient() => (None, e.to_string()),
                Err(Unanswered::Transport(e)) => return Err(self.unavailable(e.to_string())),
                Err(Unanswered::Refused(e)) => return Err(e),
            };
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

    /// One request to this upstream presenting `credential`, as pulls and pushes both make
    /// them (`out` says what to send, with which client's body type): the token goes only to
    /// the origin it is for; every answer is counted (`upstream_requests_total`); a 401 from
    /// that origin gets one fresh token and one more try, then is a refusal, and what the
    /// upstream said with it is logged scrubbed of the credential. Any other answer is the
    /// caller's to read, whatever its status.
    pub async fn send<B>(
        &self,
        client: &ClientFor<B>,
        credential: &mut Credential<'_>,
        out: &Outgoing<'_, B>,
    ) -> Result<Response<Incoming>, Unanswered>
    where
        B: hyper::body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        loop {
            let header = credential.header().await.map_err(|source| {
                Unanswered::Refused(UpstreamError::Identity {
                    upstream: self.name.clone(),
                    source,
                })
            })?;
            let started = Instant::now();
            let via_site = match (&self.site, out.via_site) {
                (Some(site), true) => {
                    let answer = site.ask(&self.base, out.url, &out.method, header.as_ref());
                    let answer = answer.await;
                    if out.url.as_str().starts_with(self.base.as_str()) {
                        self.metrics.site_routed(&self.name, answer.is_some());
                    }
                    answer
                }
                _ => None,
            };
            let result = match via_site {
                // The site acts with this request's credential: its answers count as the
                // upstream's own (a 401 there is this token refused upstream).
                Some(response) => Ok((response, true)),
                None => self.exchange(client, out, header.as_ref()).await,
            };
            self.metrics.upstream_answered(
                &self.name,
                out.method.as_str(),
                result.as_ref().ok().map(|r| r.0.status().as_u16()),
                started.elapsed(),
            );
            let (response, trusted) = result.map_err(Unanswered::Transport)?;
            if response.status() != StatusCode::UNAUTHORIZED {
                return Ok(response);
            }
            // A host that never got the token (a redirect target, a narinfo's absolute URL)
            // says nothing about the token: it is not dropped.
            if !trusted {
                return Err(Unanswered::Refused(
                    self.unavailable(
                        "a host other than the upstream (which never got the token) answered 401"
                            .into(),
                    ),
                ));
            }
            let refusal = match credential.refused() {
                Refused::Retry => continue,
                Refused::Rejected { identity } => {
                    let said = credential.said(response).await;
                    tracing::warn!(upstream = %self.name, identity, answer = %said, "upstream rejected a fresh token");
                    UpstreamError::Rejected {
                        upstream: self.name.clone(),
                        identity,
                    }
                }
                Refused::Caller => UpstreamError::CallerRejected {
                    upstream: self.name.clone(),
                },
                Refused::NeedsIdentity => UpstreamError::NeedsIdentity {
                    upstream: self.name.clone(),
                },
            };
            return Err(Unanswered::Refused(refusal));
        }
    }

    fn unavailable(&self, detail: String) -> UpstreamError {
        UpstreamError::Unavailable {
            upstream: self.name.clone(),
            detail,
        }
    }
}

/// Why [`Upstream::send`] has no answer to give.
#[derive(Debug)]
pub enum Unanswered {
    /// Nothing usable came back this time (no connection, no answer in time, a bad redirect).
    Transport(SendError),
    /// The credential could not be had or was refused for good, or a host that never got it
    /// answered 401: asking again the same way will not change that.
    Refused(UpstreamError),
}

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unanswered::Transport(e) => e.fmt(f),
            Unanswered::Refused(e) => e.fmt(f),
        }
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
