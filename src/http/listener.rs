//! An HTTP/1.1 listener for services other machines reach (the exchange, the site): plain or
//! TLS, admission by source address, a cap on connections (more wait in the kernel's accept
//! queue), header and idle timeouts, and a graceful end.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};

pub struct Limits {
    pub max_connections: usize,
    /// For a request's headers, and for a TLS handshake.
    pub read_timeout: Duration,
    /// A connection with nothing moving for this long is closed.
    pub idle: Duration,
    /// How long requests in flight may finish once shutdown starts.
    pub grace: Duration,
}

/// Serves `handler` until `shutdown` resolves; connections from addresses `admit` refuses
/// are closed at once.
pub async fn serve<H, F, B>(
    listener: tokio::net::TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    limits: Limits,
    admit: impl Fn(SocketAddr) -> bool,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.read_timeout);
    tokio::pin!(shutdown);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let slot = tokio::select! {
            _ = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
        };
        let (stream, remote) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = next_connection(&listener) => accepted,
        };
        if !admit(remote) {
            tracing::debug!(%remote, "connection refused: not an admitted address");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let stream = super::idle::IdleTimeout::new(stream, limits.idle);
        let handler = handler.clone();
        let service = hyper::service::service_fn(move |request| {
            let answer = handler(request);
            async move { Ok::<_, std::convert::Infallible>(answer.await) }
        });
        let watcher = graceful.watcher();
        let (builder, acceptor) = (builder.clone(), acceptor.clone());
        let read_timeout = limits.read_timeout;
        tokio::spawn(async move {
            let result = match acceptor {
                Some(acceptor) => {
                    match tokio::time::timeout(read_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            watcher
                                .watch(builder.serve_connection(TokioIo::new(tls), service))
                                .await
                        }
                        _ => return, // a failed handshake: nothing to answer
                    }
                }
                None => {
                    watcher
                        .watch(builder.serve_connection(TokioIo::new(stream), service))
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
    finish_in_flight(graceful, limits.grace).await;
}

/// The next connection. A failed accept (out of file descriptors and the like) pauses
/// instead of spinning.
pub async fn next_connection(
    listener: &tokio::net::TcpListener,
) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Lets the connections `graceful` watches finish their requests for up to `grace`; those
/// still open then are closed.
pub async fn finish_in_flight(
    graceful: hyper_util::server::graceful::GracefulShutdown,
    grace: Duration,
) {
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "responses still in flight after {}s; closing them",
            grace.as_secs()
        );
    }
}
