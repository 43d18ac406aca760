//! `nix-sidecar exchange`: an RFC 8693 token endpoint for self-hosted caches. It verifies
//! workload identities (OIDC JWTs against their issuers' keys, AWS presigned STS requests),
//! applies allow-only rules, and mints short-lived Attic tokens scoped to the granted caches.
//! `config` reads its file, `issuers` and `aws` verify, `policy` decides (pure), `mint`
//! signs, `decide` runs one exchange end to end, `service` speaks HTTP(S).

mod error;
pub use error::SetupError;
pub mod aws;
pub mod config;
pub mod decide;
pub mod issuers;
pub mod mint;
pub mod policy;
pub mod service;

use std::sync::Arc;

pub use config::ServiceConfig;

/// Runs the service until `shutdown` resolves.
pub async fn run(
    config: ServiceConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let service = Arc::new(service::Service::new(&config).map_err(|e| e.to_string())?);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| crate::http::ListenError {
            addr: config.listen,
            source,
        })
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    if config.tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "plain HTTP on a non-loopback address: tokens cross the network unencrypted unless a TLS proxy is in front");
    }
    tracing::info!(%addr, tls = config.tls.is_some(), "exchange listening");
    service::serve(service, listener, config.tls.clone(), shutdown).await
}
