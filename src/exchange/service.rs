//! The exchange's HTTP side: `POST /token`, `GET /healthz`, `GET /metrics`, over TLS (the
//! certificate and key re-read when they change) or plain HTTP behind a proxy; request size
//! limits; graceful stop on SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::config::ServiceConfig;
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
    pub fn new(config: &ServiceConfig) -> Result<Service, super::SetupError> {
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
        Some((cert, key)) => {
            Some(crate::http::tls_server::acceptor(cert, key).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    let limits = crate::http::listener::Limits {
        max_connections: MAX_CONNECTIONS,
        read_timeout: READ_TIMEOUT,
        idle: IDLE,
        grace: GRACE,
    };
    let handler = move |request| {
        let service = service.clone();
        async move { service.handle(request).await }
    };
    crate::http::listener::serve(listener, acceptor, limits, |_| true, handler, shutdown).await;
    Ok(())
}
