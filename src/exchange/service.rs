//! The exchange's HTTP side: `POST /token`, `GET /healthz`, `GET /metrics`, over TLS (the
//! certificate and key re-read when they change) or plain HTTP behind a proxy; request size
//! limits; graceful stop on SIGTERM.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::config::ExchangeConfig;
use super::decide::Decider;

/// The largest form taken (a subject token is at most 16 KiB).
const MAX_BODY: usize = 64 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(10);
const GRACE: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the kernel's accept queue (so a crowd of idle
/// clients cannot take every file descriptor and starve `/healthz`).
const MAX_CONNECTIONS: usize = 4096;
/// A connection on which nothing moves either way for this long is closed.
const IDLE: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuerLabel {
    issuer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

struct Metrics {
    registry: Registry,
    exchanges: Family<ResultLabel, Counter>,
    seconds: Histogram,
}

impl Metrics {
    fn new() -> Metrics {
        let exchanges = Family::<ResultLabel, Counter>::default();
        let seconds = Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0]);
        let mut registry = Registry::with_prefix("nix_sidecar_exchange");
        registry.register(
            "exchanges",
            "Exchanges answered, by result",
            exchanges.clone(),
        );
        registry.register("seconds", "Time to answer an exchange", seconds.clone());
        // Every result exported from the start, so an alert sees the first one.
        for result in [
            "granted",
            "invalid_request",
            "invalid_grant",
            "unauthorized_client",
            "invalid_scope",
            "invalid_target",
            "rate_limited",
            "temporarily_unavailable",
            "server_error",
        ] {
            drop(exchanges.get_or_create(&ResultLabel { result }));
        }
        Metrics {
            registry,
            exchanges,
            seconds,
        }
    }
}

pub struct Service {
    decider: Decider,
    metrics: Metrics,
}

impl Service {
    pub fn new(config: &ExchangeConfig) -> Result<Service, String> {
        let decider = Decider::new(config)?;
        let mut metrics = Metrics::new();
        metrics.registry.register(
            "deny_file_readable",
            "1 while the deny file can be read (or none is set); 0 while exchanges are refused",
            decider.deny_file_readable(),
        );
        Ok(Service { decider, metrics })
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        match (request.method(), request.uri().path()) {
            (&Method::POST, "/token") => self.token(request).await,
            (_, "/token") => json(
                405,
                r#"{"error":"invalid_request","error_description":"POST a form to /token"}"#.into(),
            ),
            (&Method::GET, "/healthz") => {
                let issuers: serde_json::Map<String, serde_json::Value> = self
                    .decider
                    .issuers()
                    .0
                    .iter()
                    .map(|i| (i.config.url.clone(), serde_json::json!({"jwks_fetches": i.fetches.load(std::sync::atomic::Ordering::Relaxed)})))
                    .collect();
                json(
                    200,
                    serde_json::json!({"status": "ok", "issuers": issuers}).to_string(),
                )
            }
            (&Method::GET, "/metrics") => {
                let fetches = Family::<IssuerLabel, Counter>::default();
                for issuer in &self.decider.issuers().0 {
                    let label = IssuerLabel {
                        issuer: issuer.config.url.clone(),
                    };
                    fetches
                        .get_or_create(&label)
                        .inc_by(issuer.fetches.load(std::sync::atomic::Ordering::Relaxed));
                }
                let mut now = Registry::with_prefix("nix_sidecar_exchange");
                now.register(
                    "jwks_fetches",
                    "JWKS fetches (the first, and refetches for an unknown kid)",
                    fetches,
                );
                let mut text = String::new();
                let _ =
                    prometheus_client::encoding::text::encode(&mut text, &self.metrics.registry);
                let _ = prometheus_client::encoding::text::encode(&mut text, &now);
                Response::builder()
                    .header(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)
                    .body(Full::new(Bytes::from(text)))
                    .unwrap()
            }
            _ => json(404, r#"{"error":"not_found"}"#.into()),
        }
    }

    async fn token(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let form_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';').next().is_some_and(|t| {
                    t.trim()
                        .eq_ignore_ascii_case("application/x-www-form-urlencoded")
                })
            });
        let answer = if !form_type {
            Err((
                400,
                "invalid_request",
                "the body must be application/x-www-form-urlencoded".to_string(),
            ))
        } else {
            match tokio::time::timeout(
                READ_TIMEOUT,
                Limited::new(request.into_body(), MAX_BODY).collect(),
            )
            .await
            {
                Ok(Ok(body)) => Ok(body.to_bytes()),
                Ok(Err(_)) => Err((
                    413,
                    "invalid_request",
                    format!("the request is larger than {MAX_BODY} bytes, or broke off"),
                )),
                Err(_) => Err((
                    400,
                    "invalid_request",
                    "the request body did not arrive in time".to_string(),
                )),
            }
        };
        let (status, result, body) = match answer {
            Err((status, error, description)) => (
                status,
                error,
                serde_json::json!({"error": error, "error_description": description}).to_string(),
            ),
            Ok(form) => match self.decider.exchange(&form).await {
                Ok(granted) => (200, "granted", granted.body),
                Err(refusal) => (refusal.status, refusal.result(), refusal.body()),
            },
        };
        self.metrics
            .exchanges
            .get_or_create(&ResultLabel { result })
            .inc();
        self.metrics
            .seconds
            .observe(started.elapsed().as_secs_f64());
        let mut response = json(status, body);
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, "no-store".parse().unwrap());
        response
            .headers_mut()
            .insert(header::PRAGMA, "no-cache".parse().unwrap());
        if status == 429 {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, "60".parse().unwrap());
        }
        response
    }
}

fn json(status: u16, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// Serves until `shutdown` resolves, then lets requests in flight finish for a while.
pub async fn serve(
    service: Arc<Service>,
    listener: tokio::net::TcpListener,
    tls: Option<(PathBuf, PathBuf)>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let acceptor = match tls {
        Some((cert, key)) => Some(tls_acceptor(cert, key)?),
        None => None,
    };
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT);
    tokio::pin!(shutdown);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = tokio::select! {
            _ = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
        };
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let stream = crate::http::idle::IdleTimeout::new(stream, IDLE);
        let service = service.clone();
        let handler = hyper::service::service_fn(move |request| {
            let service = service.clone();
            async move { Ok::<_, Infallible>(service.handle(request).await) }
        });
        let watcher = graceful.watcher();
        let (builder, acceptor) = (builder.clone(), acceptor.clone());
        tokio::spawn(async move {
            let result = match acceptor {
                Some(acceptor) => {
                    match tokio::time::timeout(READ_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            watcher
                                .watch(builder.serve_connection(TokioIo::new(tls), handler))
                                .await
                        }
                        _ => return, // a failed handshake: nothing to answer
                    }
                }
                None => {
                    watcher
                        .watch(builder.serve_connection(TokioIo::new(stream), handler))
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    tracing::info!("shutting down: finishing requests in flight");
    if tokio::time::timeout(GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "requests still in flight after {}s; closing them",
            GRACE.as_secs()
        );
    }
    Ok(())
}

fn tls_acceptor(cert: PathBuf, key: PathBuf) -> Result<tokio_rustls::TlsAcceptor, String> {
    let resolver = Reloading::new(cert, key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The certificate and key, read again when either file changes (looked at at most once a
/// second, on a handshake); a change that does not load keeps the old pair, with a warning.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    certified: Arc<rustls::sign::CertifiedKey>,
    stamps: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
}

impl Reloading {
    fn new(cert: PathBuf, key: PathBuf) -> Result<Reloading, String> {
        let certified = load_pair(&cert, &key)?;
        let stamps = (modified(&cert), modified(&key));
        Ok(Reloading {
            cert,
            key,
            current: RwLock::new(Loaded {
                certified,
                stamps,
                checked: Instant::now(),
            }),
        })
    }
}

fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load_pair(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let certs = rustls_pemfile::certs(&mut read(cert)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", cert.display()));
    }
    let private = rustls_pemfile::private_key(&mut read(key)?.as_slice())
        .map_err(|e| format!("{}: {e}", key.display()))?
        .ok_or_else(|| format!("{} holds no private key", key.display()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&private)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(certs, signing)))
}

impl rustls::server::ResolvesServerCert for Reloading {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let due = self.current.read().unwrap().checked.elapsed() >= Duration::from_secs(1);
        if due {
            let mut current = self.current.write().unwrap();
            current.checked = Instant::now();
            let stamps = (modified(&self.cert), modified(&self.key));
            if stamps != current.stamps {
                current.stamps = stamps;
                match load_pair(&self.cert, &self.key) {
                    Ok(certified) => {
                        tracing::info!("TLS certificate reloaded");
                        current.certified = certified;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS certificate changed but does not load; keeping the old one")
                    }
                }
            }
        }
        Some(self.current.read().unwrap().certified.clone())
    }
}
