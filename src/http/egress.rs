//! How outgoing connections leave the machine: straight to the destination, or through the
//! proxy the environment names (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`, upper or
//! lower case, read as curl reads them), as self-hosted CI runners behind an egress proxy need.
//!
//! https destinations go through a `CONNECT` tunnel (with the proxy URL's credentials as
//! `Proxy-Authorization`), so TLS still ends at the upstream; http destinations are sent to the
//! proxy in absolute form. Metadata services are never proxied, whatever `NO_PROXY` says: a
//! proxy cannot reach a link-local address, and must not see what metadata servers hand out.
//! They are the well-known addresses plus whatever the metadata endpoint variables name.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Hosts of metadata services, which are always reached directly.
const METADATA_HOSTS: &[&str] = &[
    "169.254.169.254",
    "169.254.170.2",
    "169.254.170.23",
    "[fd00:ec2::254]",
    "[fd00:ec2::23]",
    "metadata.google.internal",
    "metadata",
];

/// Variables naming metadata endpoints (a URL, or GCE's `host[:port]`).
const METADATA_VARIABLES: &[&str] = &[
    "GCE_METADATA_HOST",
    "GCE_METADATA_ROOT",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "IDENTITY_ENDPOINT",
    "IMDS_ENDPOINT",
    "MSI_ENDPOINT",
];

struct Rules {
    matcher: Matcher,
    /// `host` or `host:port` reached directly.
    metadata: Vec<String>,
}

impl Rules {
    fn from_env() -> Option<Rules> {
        let set = ["HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"]
            .iter()
            .flat_map(|v| [v.to_string(), v.to_lowercase()])
            .any(|v| std::env::var(&v).is_ok_and(|v| !v.is_empty()));
        if !set {
            return None;
        }
        let mut metadata: Vec<String> = METADATA_HOSTS.iter().map(|h| h.to_string()).collect();
        for variable in METADATA_VARIABLES {
            let Ok(value) = std::env::var(variable) else {
                continue;
            };
            let with_scheme = if value.contains("://") {
                value
            } else {
                format!("http://{value}")
            };
            if let Some(authority) = with_scheme
                .parse::<http::Uri>()
                .ok()
                .and_then(|u| u.authority().map(|a| a.to_string()))
            {
                metadata.push(authority);
            }
        }
        Some(Rules {
            matcher: Matcher::from_env(),
            metadata,
        })
    }

    /// The proxy for `dst`, if it is to be used.
    fn proxy_for(&self, dst: &http::Uri) -> Option<hyper_util::client::proxy::matcher::Intercept> {
        let authority = dst.authority()?;
        let is_metadata = self
            .metadata
            .iter()
            .any(|m| m == authority.as_str() || m == authority.host());
        if is_metadata {
            return None;
        }
        self.matcher.intercept(dst)
    }
}

/// The connector under TLS: a TCP connection to the destination or to the proxy.
#[derive(Clone)]
pub struct Egress {
    http: HttpConnector,
    rules: Option<Arc<Rules>>,
}

impl Egress {
    /// Reads the proxy variables once (a daemon's environment does not change).
    pub fn from_env(http: HttpConnector) -> Egress {
        let rules = Rules::from_env();
        if rules.is_some() {
            let shown: Vec<String> = ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"]
                .iter()
                .filter_map(|v| {
                    let value = std::env::var(v).ok()?;
                    Some(format!("{v}={}", without_userinfo(&value)))
                })
                .collect();
            tracing::info!(
                proxy = %shown.join(" "),
                "outgoing connections go through the proxy (metadata services never do)"
            );
        }
        Egress {
            http,
            rules: rules.map(Arc::new),
        }
    }
}

fn without_userinfo(url: &str) -> String {
    match url.parse::<url::Url>() {
        Ok(mut parsed) => {
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        Err(_) => "(not a URL)".into(),
    }
}

impl Service<http::Uri> for Egress {
    type Response = EgressStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<EgressStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        let proxy = self.rules.as_ref().and_then(|r| r.proxy_for(&dst));
        let mut http = self.http.clone();
        Box::pin(async move {
            let Some(proxy) = proxy else {
                let io = http.call(dst).await?;
                return Ok(EgressStream { io, proxied: false });
            };
            if dst.scheme_str() == Some("https") {
                let mut tunnel = Tunnel::new(proxy.uri().clone(), http);
                if let Some(auth) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                let io = tunnel
                    .call(dst)
                    .await
                    .map_err(|e| format!("through the proxy: {e}"))?;
                return Ok(EgressStream { io, proxied: false });
            }
            let io = http.call(proxy.uri().clone()).await?;
            Ok(EgressStream { io, proxied: true })
        })
    }
}

/// A connection; `proxied` when requests on it go to an HTTP proxy (in absolute form).
pub struct EgressStream {
    io: TokioIo<TcpStream>,
    proxied: bool,
}

impl Connection for EgressStream {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.proxied)
    }
}

impl Read for EgressStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for EgressStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_services_are_never_proxied() {
        let rules = Rules {
            matcher: Matcher::builder()
                .all("http://proxy.internal:3128")
                .no("skip.example")
                .build(),
            metadata: METADATA_HOSTS
                .iter()
                .map(|h| h.to_string())
                .chain(["127.0.0.1:9999".to_string()])
                .collect(),
        };
        let via = |url: &str| rules.proxy_for(&url.parse().unwrap()).is_some();
        assert!(via("https://cache.example/nix-cache-info"));
        assert!(
            via("http://127.0.0.1:8080/x"),
            "loopback follows NO_PROXY, as in curl"
        );
        assert!(!via("https://skip.example/x"), "NO_PROXY");
        for direct in [
            "http://169.254.169.254/latest/api/token",
            "http://[fd00:ec2::254]/latest/api/token",
            "http://169.254.170.2/v2/credentials",
            "http://metadata.google.internal/computeMetadata/v1/",
            "http://127.0.0.1:9999/computeMetadata/v1/",
        ] {
            assert!(!via(direct), "{direct}");
        }
        assert_eq!(
            without_userinfo("http://user:pass@proxy:3128"),
            "http://proxy:3128/"
        );
    }
}
