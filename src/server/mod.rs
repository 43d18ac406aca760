//! The loopback listener: HTTP/1.1, header-read timeouts, graceful shutdown. The only place
//! that speaks HTTP to Nix; `routes` decides the answers.
//!
//! No HTTP/2: Nix speaks HTTP/1.1 to `http://` substituters, h2c earned nothing measurable,
//! and its streams could each hold a reader waiting on a client that never reads. A client
//! that opens with the HTTP/2 preface gets its connection closed.

mod admin;
pub mod body;
mod cache;
mod host;
mod peer;
mod push;
pub mod routes;
mod sendfile;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::push::Pusher;
use crate::status::Status;

/// For request headers, and for a connection on which nothing moves either way.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How every client connection is served, in production and in the tests of `sendfile`.
pub(crate) fn connection_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(64 * 1024)
        // Body chunks are queued as they are, never copied: `sendfile` depends on it.
        .writev(true);
    builder
}

pub async fn bind(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, crate::http::ListenError> {
    let mut listeners = Vec::new();
    for &addr in addrs {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| crate::http::ListenError { addr, source })?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Why a peer may not pin or unpin (the text is the 403's body).
#[derive(Debug, thiserror::Error)]
pub enum PinRefused {
    #[error("uid {0} may not pin or unpin (push-uids, or root without push)\n")]
    Uid(u32),
    #[error("the requesting process's uid cannot be told: pins and unpin refused\n")]
    Unknown,
}

/// What the server serves: the answers, the counters it adds to, and the state for health
/// and metrics (a snapshot taken per request).
pub struct Site {
    answers: Arc<Proxy>,
    /// Takes uploads when some upstream does.
    pusher: Option<Arc<Pusher>>,
    metrics: Arc<Metrics>,
    /// Who may pin (`/_sidecar/prefetch` with `pin`) and `/_sidecar/unpin`.
    pin_uids: Vec<u32>,
    status: Box<dyn Fn() -> Status + Send + Sync>,
}

impl Site {
    /// `Err` (why, for a 403) unless the request's peer may pin and unpin.
    pub(crate) fn may_pin(&self, request: &Request<Incoming>) -> Result<(), PinRefused> {
        let uid = request.extensions().get::<Peer>().and_then(|p| p.uid);
        if uid.is_some_and(|uid| self.pin_uids.contains(&uid)) {
            return Ok(());
        }
        tracing::warn!(?uid, "pin or unpin refused: not a push-uid");
        Err(match uid {
            Some(uid) => PinRefused::Uid(uid),
            None => PinRefused::Unknown,
        })
    }

    pub fn new(
        answers: Arc<Proxy>,
        pusher: Option<Arc<Pusher>>,
        metrics: Arc<Metrics>,
        pin_uids: Vec<u32>,
        status: impl Fn() -> Status + Send + Sync + 'static,
    ) -> Site {
        Site {
            answers,
            pusher,
            metrics,
            pin_uids,
            status: Box::new(status),
        }
    }
}

/// The two ends of a request's connection and who owns the client's end, asked of the kernel
/// once when it was accepted (`peer`): `None` when that could not be established, which no
/// uid rule (`allowed-uids`, `push-uids`, pins) ever admits.
#[derive(Clone, Copy)]
pub struct Peer {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub uid: Option<u32>,
}

/// How connections are admitted and ended.
pub struct Options {
    /// How long responses in flight may take once shutdown starts.
    pub grace: Duration,
    /// Only clients owned by these uids (empty: any).
    pub allowed_uids: Vec<u32>,
    pub max_connections: usize,
}

/// Serves until `shutdown` resolves, then stops accepting and lets in-flight requests finish
/// for up to `grace`. Returns when that time is up (or nothing is left in flight): the
/// deadline for the rest of the shutdown.
pub async fn serve(
    listeners: Vec<TcpListener>,
    site: Arc<Site>,
    options: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::time::Instant {
    let Options {
        grace,
        allowed_uids,
        max_connections,
    } = options;
    let allowed_uids = Arc::new(allowed_uids);
    // Shared by all listeners: past the cap, new connections wait in the accept queue instead
    // of taking file descriptors and memory from the ones being served.
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
    let builder = connection_builder();
    let mut accept_loops = tokio::task::JoinSet::new();
    for listener in listeners {
        let (site, builder, graceful) = (site.clone(), builder.clone(), graceful.clone());
        let (allowed_uids, slots) = (allowed_uids.clone(), slots.clone());
        accept_loops.spawn(async move {
            loop {
                let slot = slots.clone().acquire_owned().await.expect("never closed");
                let (stream, peer) = crate::http::listener::next_connection(&listener).await;
                let Ok(local) = stream.local_addr() else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (site, allowed_uids, builder) =
                    (site.clone(), allowed_uids.clone(), builder.clone());
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let accepted = Accepted {
                        stream,
                        peer,
                        local,
                    };
                    serve_connection(accepted, site, &allowed_uids, builder, watcher).await;
                    drop(slot);
                });
            }
        });
    }
    shutdown.await;
    tracing::info!("shutting down: no new connections; finishing responses in flight");
    accept_loops.shutdown().await; // aborted and gone: no clone of `graceful` is left
    let graceful =
        Arc::try_unwrap(graceful).unwrap_or_else(|_| unreachable!("accept loops are gone"));
    let deadline = std::time::Instant::now() + grace;
    crate::http::listener::finish_in_flight(graceful, grace).await;
    deadline
}

/// A connection just accepted: its socket and both its ends.
struct Accepted {
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
}

/// Serves one connection: its owner asked of the kernel once (and refused unless in
/// `allowed_uids`), then HTTP/1.1 with keep-alive until it ends or shutdown closes it.
async fn serve_connection(
    accepted: Accepted,
    site: Arc<Site>,
    allowed_uids: &[u32],
    builder: http1::Builder,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let Accepted {
        stream,
        peer,
        local,
    } = accepted;
    let uid = match peer::uid_of(peer, local) {
        Ok(uid) => Some(uid),
        Err(e) => {
            tracing::debug!(%peer, reason = %e, "the connection's owner is not known");
            None
        }
    };
    if !allowed_uids.is_empty() && !uid.is_some_and(|uid| allowed_uids.contains(&uid)) {
        tracing::warn!(%peer, ?uid, "connection refused: its owner is not in allowed-uids");
        return;
    }
    let peer = Peer {
        remote: peer,
        local,
        uid,
    };
    let segments = Arc::new(sendfile::Segments::default());
    let service = {
        let segments = segments.clone();
        service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(segments.clone());
            request.extensions_mut().insert(peer);
            let site = site.clone();
            async move {
                let answer = match host::refusal(&request, local) {
                    Some(refused) => refused,
                    None => routes::handle(&site, request).await,
                };
                Ok::<_, Infallible>(answer)
            }
        })
    };
    let stream = sendfile::SendfileStream::new(stream, segments);
    let io = TokioIo::new(crate::http::idle::IdleTimeout::new(
        stream,
        HEADER_READ_TIMEOUT,
    ));
    let connection = watcher.watch(builder.serve_connection(io, service));
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
