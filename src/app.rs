//! The composition root: builds every component of the daemon from the configuration, runs
//! it, and stops it in order. Components get what they need here and never reach into one
//! another; health and metrics see them through a [`Status`] snapshot.

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::Config;
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::nix::narinfo::TrustedKeys;
use crate::proxy::{partition, Policy, Proxy, UpstreamEntry};
use crate::server::{Options, Site};
use crate::status::{CacheStatus, Status};
use crate::store::{Limits, Store};
use crate::upstream::Upstream;

pub struct App {
    proxy: Arc<Proxy>,
    identities: Vec<Arc<Identity>>,
    upstreams: Vec<Arc<Upstream>>,
    store: Store,
    metrics: Arc<Metrics>,
    options: Options,
}

impl App {
    pub fn build(config: &Config) -> Result<App, String> {
        let names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
        let metrics = Arc::new(Metrics::new(&names));
        let default_client = crate::http::client(None)?;
        let identities: Vec<Arc<Identity>> = config
            .identities
            .values()
            .map(|c| Arc::new(Identity::new(c, default_client.clone())))
            .collect();
        let mut upstreams = Vec::new();
        for up in &config.upstreams {
            let client = match &up.ca_file {
                Some(ca) => crate::http::client(Some(ca))
                    .map_err(|e| format!("upstream `{}`: {e}", up.name))?,
                None => default_client.clone(),
            };
            let identity = up
                .identity
                .as_ref()
                .and_then(|name| identities.iter().find(|i| i.name() == name).cloned());
            let upstream = Upstream::new(
                &up.name,
                &up.url,
                identity,
                up.auth.clone(),
                client,
                metrics.clone(),
            );
            upstreams.push(UpstreamEntry {
                upstream: Arc::new(upstream),
                partition: partition(up),
                prefetch_nars: up.prefetch_nars,
            });
        }
        let store = Store::open(
            &config.cache_dir,
            Limits {
                max_size: config.max_cache_size,
                min_free: config.min_free_space,
            },
        )?;
        let policy = Policy {
            trusted_keys: TrustedKeys::parse(&config.trusted_public_keys)
                .map_err(|e| e.to_string())?,
            require_signatures: config.require_signatures,
            narinfo_ttl: config.narinfo_ttl,
            negative_ttl: config.negative_ttl,
            priority: config.priority,
            lookahead: config.narinfo_lookahead,
        };
        let upstream_list = upstreams.iter().map(|u| u.upstream.clone()).collect();
        let proxy = Proxy::new(upstreams, store.clone(), metrics.clone(), policy);
        Ok(App {
            proxy: Arc::new(proxy),
            identities,
            upstreams: upstream_list,
            store,
            metrics,
            options: Options {
                grace: config.shutdown_grace,
                allowed_uids: config.allowed_uids.clone(),
                max_connections: config.max_connections,
            },
        })
    }

    /// Serves on `listeners` until `shutdown` resolves; then lets responses in flight and
    /// downloads into the cache finish within the grace period, and saves access times.
    pub async fn run(
        self,
        listeners: Vec<TcpListener>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        // Every identity's token is obtained now and kept fresh, requests or not: health must
        // say a token file is missing before the first pull fails on it.
        for identity in &self.identities {
            tokio::spawn(identity.clone().keep_fresh());
        }
        let (identities, upstreams, store) = (
            self.identities.clone(),
            self.upstreams.clone(),
            self.store.clone(),
        );
        let status = move || snapshot(&identities, &upstreams, &store);
        let site = Site::new(self.proxy.clone(), self.metrics.clone(), status);
        let deadline =
            crate::server::serve(listeners, Arc::new(site), self.options, shutdown).await;
        // Downloads whose clients are gone may still be finishing into the cache.
        self.store.settle(deadline).await;
        self.store.flush_access_times();
    }
}

fn snapshot(identities: &[Arc<Identity>], upstreams: &[Arc<Upstream>], store: &Store) -> Status {
    Status {
        upstreams: upstreams
            .iter()
            .map(|u| (u.name().to_string(), u.health()))
            .collect(),
        identities: identities
            .iter()
            .map(|i| (i.name().to_string(), i.health()))
            .collect(),
        cache: CacheStatus {
            stored_bytes: store.size(),
            evictions: store.evictions(),
            verification_failures: store.verification_failures(),
        },
    }
}
