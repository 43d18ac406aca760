//! The outgoing HTTP client shared by upstreams and identity providers: hyper + rustls with
//! the ring provider, the system's roots plus an optional extra CA file, HTTP/1.1 and HTTP/2,
//! through the environment's proxy where one is set (see [`egress`]).

mod egress;
mod error;
pub mod idle;
pub mod listener;
pub mod tls_server;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
pub use error::{
    BodyError, CallError, ClientError, ListenError, ServerTlsError, UpstreamClientError,
};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub type Body = Full<Bytes>;
pub type Client = ClientFor<Body>;
/// A client whose requests carry bodies of type `B`.
pub type ClientFor<B> = hyper_util::client::legacy::Client<HttpsConnector<egress::Egress>, B>;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A site is on the LAN: a connection that takes longer means it is down.
pub const SITE_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The `User-Agent` of every request the daemon makes.
pub const USER_AGENT: &str = concat!("nix-sidecar/", env!("CARGO_PKG_VERSION"));

/// A body fed through a bounded channel (a slow reader slows its producer instead of growing
/// memory); an error from the channel aborts it, so a short body never looks complete.
pub struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
    /// Adds the bytes sent.
    counted: Option<prometheus_client::metrics::counter::Counter>,
    /// Announced as the exact size.
    len: Option<u64>,
}

impl ChannelBody {
    pub fn new(rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>) -> ChannelBody {
        ChannelBody {
            rx,
            counted: None,
            len: None,
        }
    }

    pub fn counted(self, counter: prometheus_client::metrics::counter::Counter) -> ChannelBody {
        ChannelBody {
            counted: Some(counter),
            ..self
        }
    }

    pub fn with_len(self, len: u64) -> ChannelBody {
        ChannelBody {
            len: Some(len),
            ..self
        }
    }
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        self.rx.poll_recv(cx).map(|chunk| {
            chunk.map(|result| {
                result.map(|bytes| {
                    if let Some(counter) = &self.counted {
                        counter.inc_by(bytes.len() as u64);
                    }
                    hyper::body::Frame::data(bytes)
                })
            })
        })
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self.len {
            Some(len) => hyper::body::SizeHint::with_exact(len),
            None => hyper::body::SizeHint::default(),
        }
    }
}

/// Builds a client trusting the system roots and, if given, the certificates in `extra_ca`.
pub fn client(extra_ca: Option<&Path>) -> Result<Client, ClientError> {
    client_for(extra_ca)
}

/// A client for a site cache: as [`client`], but giving up on a connection within
/// [`SITE_CONNECT_TIMEOUT`] (the upstream itself is the fallback, not a wait).
pub fn site_client(extra_ca: Option<&Path>) -> Result<Client, ClientError> {
    build(extra_ca, SITE_CONNECT_TIMEOUT)
}

/// The same client, for request bodies of type `B` (uploads stream theirs).
pub fn client_for<B>(extra_ca: Option<&Path>) -> Result<ClientFor<B>, ClientError>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    build(extra_ca, CONNECT_TIMEOUT)
}

fn build<B>(extra_ca: Option<&Path>, connect_timeout: Duration) -> Result<ClientFor<B>, ClientError>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A broken system certificate should not stop the daemon; it just is not trusted.
        let _ = roots.add(cert);
    }
    if let Some(path) = extra_ca {
        let pem = std::fs::read(path).map_err(|source| ClientError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |detail: String| ClientError::Certificate {
            path: path.to_path_buf(),
            detail,
        };
        let mut found = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| bad(e.to_string()))?;
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
            found += 1;
        }
        if found == 0 {
            return Err(ClientError::NoCertificate(path.to_path_buf()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(egress::Egress::from_env(http));
    Ok(
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            // After a burst of downloads, warm connections are worth keeping (a new one costs
            // round trips to a distant cache): as many as lookahead runs at once, not the
            // hundreds (each with its TLS state and buffers) that kept memory at a burst's peak.
            .pool_max_idle_per_host(64)
            // hyper grows a connection's read buffer up to ~400 KiB; every NAR chunk is
            // gathered into our own 256 KiB buffers anyway, so 64 KiB per connection is enough
            // and keeps many concurrent downloads small.
            .http1_max_buf_size(64 * 1024)
            .build(https),
    )
}

/// Reads a whole (small) body, refusing more than `limit` bytes or taking longer than `timeout`.
pub async fn read_limited<B>(body: B, limit: usize, timeout: Duration) -> Result<Bytes, BodyError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) => Err(if e.is::<http_body_util::LengthLimitError>() {
            BodyError::TooLarge(limit)
        } else {
            BodyError::Failed(e.to_string())
        }),
        Err(_) => Err(BodyError::Timeout(timeout.as_secs())),
    }
}

/// Printable, bounded text from a body that came from elsewhere, for error messages.
pub fn snippet(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)]);
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

/// One GET (or other bodiless request) whose answer is small: status and body.
/// Errors name the URL without its query and never a header value.
pub async fn fetch_small(
    client: &Client,
    method: http::Method,
    url: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<(http::StatusCode, Bytes), CallError> {
    send_small(client, method, url, headers, Bytes::new(), timeout).await
}

/// [`fetch_small`] with a request body.
pub async fn send_small(
    client: &Client,
    method: http::Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    timeout: Duration,
) -> Result<(http::StatusCode, Bytes), CallError> {
    let call = SmallCall {
        method,
        url,
        headers,
        body,
        timeout,
        also_retry: &[],
    };
    call.send(client)
        .await
        .map(|answer| (answer.status(), answer.into_body()))
}

/// Attempts of a small call (identity providers, metadata servers) on a connection error, a
/// timeout, 5xx or 429: a metadata server that answers 503 once must not fail the token.
const SMALL_ATTEMPTS: u32 = 3;

/// A request whose answer is small, retried on failure.
pub struct SmallCall<'a> {
    pub method: http::Method,
    pub url: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: Bytes,
    pub timeout: Duration,
    /// Statuses retried besides 5xx and 429 (Azure IMDS answers 404 and 410 while it starts).
    pub also_retry: &'a [u16],
}

impl SmallCall<'_> {
    /// The whole answer, headers included, after at most [`SMALL_ATTEMPTS`] attempts.
    pub async fn send(&self, client: &Client) -> Result<http::Response<Bytes>, CallError> {
        let mut attempt = 1;
        loop {
            let result = self.send_once(client).await;
            let retry = match &result {
                Err(_) => true,
                Ok(answer) => {
                    let status = answer.status();
                    status.is_server_error()
                        || status == http::StatusCode::TOO_MANY_REQUESTS
                        || self.also_retry.contains(&status.as_u16())
                }
            };
            if !retry || attempt >= SMALL_ATTEMPTS {
                return result;
            }
            // 100 ms, then 300 ms, with jitter.
            let backoff = 100 * 3u64.pow(attempt - 1) + fastrand::u64(0..100);
            tokio::time::sleep(Duration::from_millis(backoff)).await;
            attempt += 1;
        }
    }

    /// One attempt, for probes that must not wait for retries.
    pub async fn send_once(&self, client: &Client) -> Result<http::Response<Bytes>, CallError> {
        let url = self.url.split('?').next().unwrap_or(self.url).to_string();
        let mut request = hyper::Request::builder()
            .method(self.method.clone())
            .uri(self.url)
            .header("user-agent", USER_AGENT);
        for (name, value) in self.headers {
            request = request.header(*name, *value);
        }
        let request =
            request
                .body(Full::new(self.body.clone()))
                .map_err(|e| CallError::BadRequest {
                    url: url.clone(),
                    detail: e.to_string(),
                })?;
        let timeout = self.timeout;
        let response = match tokio::time::timeout(timeout, client.request(request)).await {
            Err(_) => {
                let secs = timeout.as_secs();
                return Err(CallError::Timeout { url, secs });
            }
            Ok(Err(e)) => {
                let detail = e.to_string();
                return Err(CallError::Unreachable { url, detail });
            }
            Ok(Ok(response)) => response,
        };
        let (parts, body) = response.into_parts();
        let body = read_limited(body, 256 * 1024, timeout)
            .await
            .map_err(|source| CallError::Body { url, source })?;
        Ok(http::Response::from_parts(parts, body))
    }
}

/// A URL fit for logs and errors: no query (presigned URLs carry signatures there), no userinfo.
pub fn display_url(url: &url::Url) -> String {
    format!(
        "{}://{}{}",
        url.scheme(),
        url.host_str().unwrap_or(""),
        url.port().map(|p| format!(":{p}")).unwrap_or_default()
    ) + url.path()
}
