//! The loopback listener: HTTP/1.1 and HTTP/2 (cleartext), header-read timeouts, graceful
//! shutdown. The only place that speaks HTTP to Nix; `routes` decides the answers.

pub mod body;
mod idle;
mod peer;
pub mod routes;
mod sendfile;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::proxy::Proxy;

/// For request headers, and for a connection on which nothing moves either way.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn bind(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, String> {
    let mut listeners = Vec::new();
    for addr in addrs {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Serves until `shutdown` resolves, then stops accepting and lets in-flight requests
/// finish for up to `grace`.
pub async fn serve(
    listeners: Vec<TcpListener>,
    proxy: Arc<Proxy>,
    grace: Duration,
    allowed_uids: Vec<u32>,
    max_connections: usize,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let allowed_uids = Arc::new(allowed_uids);
    // Shared by all listeners: past the cap, new connections wait in the accept queue instead
    // of taking file descriptors and memory from the ones being served.
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let graceful = Arc::new(hyper_util::server::graceful::GracefulShutdown::new());
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(64 * 1024)
        // Body chunks are queued as they are, never copied: `sendfile` depends on it.
        .writev(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);
    let mut accept_loops = tokio::task::JoinSet::new();
    for listener in listeners {
        let (proxy, builder, graceful) = (proxy.clone(), builder.clone(), graceful.clone());
        let (allowed_uids, slots) = (allowed_uids.clone(), slots.clone());
        accept_loops.spawn(async move {
            loop {
                let slot = slots.clone().acquire_owned().await.expect("never closed");
                let (stream, peer) = match listener.accept().await {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if !allowed_uids.is_empty() {
                    let uid = stream.local_addr().ok().and_then(|us| peer::uid_of(peer, us));
                    if !uid.is_some_and(|uid| allowed_uids.contains(&uid)) {
                        tracing::warn!(%peer, ?uid, "connection refused: its owner is not in allowed-uids");
                        continue;
                    }
                }
                let _ = stream.set_nodelay(true);
                let proxy = proxy.clone();
                let segments = Arc::new(sendfile::Segments::default());
                let service = {
                    let segments = segments.clone();
                    service_fn(move |mut request: Request<Incoming>| {
                        // HTTP/2 copies bodies into its frames: no sendfile there.
                        if request.version() < Version::HTTP_2 {
                            request.extensions_mut().insert(segments.clone());
                        }
                        let proxy = proxy.clone();
                        async move { Ok::<_, Infallible>(routes::handle(&proxy, request).await) }
                    })
                };
                let stream = sendfile::SendfileStream::new(stream, segments);
                let connection = builder
                    .serve_connection(TokioIo::new(idle::IdleTimeout::new(stream, HEADER_READ_TIMEOUT)), service)
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
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
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "responses still in flight after {}s; closing them",
            grace.as_secs()
        );
    }
    // Downloads whose clients are gone may still be finishing into the cache.
    proxy.store.settle(deadline).await;
    proxy.store.flush_access_times();
}
