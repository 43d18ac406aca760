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
use crate::push::target::Target;
use crate::push::{LocalTrust, Pusher};
use crate::server::{Options, Site};
use crate::site::SiteCache;
use crate::status::{CacheStatus, Status};
use crate::store::{Limits, Store};
use crate::tasks::Tasks;
use crate::upstream::{SiteRoute, Upstream};

pub struct App {
    proxy: Arc<Proxy>,
    identities: Vec<Arc<Identity>>,
    upstreams: Vec<Arc<Upstream>>,
    store: Store,
    pusher: Option<Arc<Pusher>>,
    metrics: Arc<Metrics>,
    options: Options,
    /// Who may pin and unpin: whoever may push somewhere (`push-uids`), else root.
    pin_uids: Vec<u32>,
    /// `[site]`: what other sidecars pull through, and where.
    site: Option<SiteListener>,
    /// Everything that runs in the background, told to stop at shutdown.
    tasks: Tasks,
}

/// Why the daemon cannot start with this configuration.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Client(#[from] crate::http::ClientError),
    #[error(transparent)]
    UpstreamClient(#[from] crate::http::UpstreamClientError),
    #[error("upstream `{upstream}` site: {source}")]
    SiteClient {
        upstream: String,
        source: crate::http::ClientError,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Keys(String),
    #[error(transparent)]
    Push(#[from] crate::push::QueueError),
    #[error(transparent)]
    Listen(#[from] crate::http::ListenError),
    #[error(transparent)]
    Tls(#[from] crate::http::ServerTlsError),
}

impl App {
    pub fn build(config: &Config) -> Result<App, StartError> {
        let names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
        let metrics = Arc::new(Metrics::new(&names));
        let default_client = crate::http::client(None)?;
        let identities: Vec<Arc<Identity>> = config
            .identities
            .values()
            .map(|c| Arc::new(Identity::new(c, default_client.clone())))
            .collect();
        let upstreams = upstream_entries(config, &identities, &default_client, &metrics)?;
        let store = Store::open(
            &config.cache_dir,
            Limits {
                max_size: config.max_cache_size,
                min_free: config.min_free_space,
            },
        )?;
        let policy = policy(config)?;
        let trust = LocalTrust {
            keys: policy.trusted_keys.clone(),
            required: policy.require_signatures,
            signer: config.push_signing_key.clone(),
        };
        let upstream_list: Vec<Arc<Upstream>> =
            upstreams.iter().map(|u| u.upstream.clone()).collect();
        let pusher = push_targets(config, &upstream_list, &identities)?
            .map(|(targets, partition)| Pusher::open(targets, store.clone(), partition, trust))
            .transpose()
            .map_err(StartError::Push)?;
        let tasks = Tasks::new();
        let site =
            SiteCache::new(config, store.clone(), metrics.clone(), tasks.clone())?.map(|cache| {
                SiteListener {
                    cache: Arc::new(cache),
                    listeners: Vec::new(),
                    acceptor: None,
                }
            });
        let proxy = Proxy::new(
            upstreams,
            store.clone(),
            metrics.clone(),
            policy,
            tasks.clone(),
        );
        Ok(App {
            proxy: Arc::new(proxy),
            identities,
            upstreams: upstream_list,
            store,
            pusher,
            metrics,
            pin_uids: pin_uids(config),
            site,
            tasks,
            options: Options {
                grace: config.shutdown_grace,
                allowed_uids: config.allowed_uids.clone(),
                max_connections: config.max_connections,
            },
        })
    }

    /// Binds the `[site]` listener, if there is one (before `run`: a taken port stops the
    /// start, as for the main listeners).
    pub async fn bind_site(&mut self) -> Result<(), StartError> {
        if let Some(site) = &mut self.site {
            let config = &site.cache.config;
            if let Some((cert, key)) = &config.tls {
                site.acceptor = Some(crate::http::tls_server::acceptor(
                    cert.clone(),
                    key.clone(),
                )?);
            }
            site.listeners = crate::server::bind(&config.listen).await?;
            for listener in &site.listeners {
                if let Ok(addr) = listener.local_addr() {
                    let tls = config.tls.is_some();
                    tracing::info!(%addr, tls, "site open to other sidecars");
                }
            }
        }
        Ok(())
    }

    /// Serves on `listeners` until `shutdown` resolves; then lets responses in flight and
    /// downloads into the cache finish within the grace period, and saves access times.
    pub async fn run(
        mut self,
        listeners: Vec<TcpListener>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        // Every identity's token is obtained now and kept fresh, requests or not: health must
        // say a token file is missing before the first pull fails on it.
        for identity in &self.identities {
            self.tasks
                .spawn_until_stopped(identity.clone().keep_fresh());
        }
        crate::systemd::spawn_watchdog(&self.tasks);
        // Uploads in flight stop at shutdown; their paths stay queued on disk.
        if let Some(pusher) = self.pusher.clone() {
            self.tasks.spawn(pusher.run(self.tasks.stopping()));
        }
        let (identities, upstreams, store, pusher) = (
            self.identities.clone(),
            self.upstreams.clone(),
            self.store.clone(),
            self.pusher.clone(),
        );
        let status = move || snapshot(&identities, &upstreams, &store, pusher.as_deref());
        let site = Site::new(
            self.proxy.clone(),
            self.pusher.clone(),
            self.metrics.clone(),
            self.pin_uids.clone(),
            status,
        );
        if let Some(site) = self.site.take() {
            site.serve(&self.tasks);
        }
        // Once shutdown starts, walks ahead of Nix and token refreshes stop, the site's
        // listeners and the push queue wind down beside the main listeners, and downloads whose
        // clients are gone may still finish into the cache: all within the grace.
        let tasks = self.tasks.clone();
        let shutdown = async move {
            shutdown.await;
            tasks.stop();
        };
        let deadline =
            crate::server::serve(listeners, Arc::new(site), self.options, shutdown).await;
        self.tasks.wait(deadline).await;
        self.store.settle(deadline).await;
        self.store.flush_access_times();
    }
}

/// Each `[[upstream]]` as the proxy asks it: its client (its own CA, else the shared one),
/// its identity, its site.
fn upstream_entries(
    config: &Config,
    identities: &[Arc<Identity>],
    default_client: &crate::http::Client,
    metrics: &Arc<Metrics>,
) -> Result<Vec<UpstreamEntry>, StartError> {
    let mut upstreams = Vec::new();
    for up in &config.upstreams {
        let client = match &up.ca_file {
            Some(ca) => crate::http::client(Some(ca)).map_err(|source| {
                let upstream = up.name.clone();
                crate::http::UpstreamClientError { upstream, source }
            })?,
            None => Clone::clone(default_client),
        };
        let identity = up
            .identity
            .as_ref()
            .and_then(|name| identities.iter().find(|i| i.name() == name).cloned());
        let mut upstream = Upstream::new(
            &up.name,
            &up.url,
            identity,
            up.auth.clone(),
            client,
            metrics.clone(),
        );
        if let Some(site) = &up.site {
            let client =
                crate::http::site_client(up.site_ca_file.as_deref()).map_err(|source| {
                    let upstream = up.name.clone();
                    StartError::SiteClient { upstream, source }
                })?;
            upstream = upstream.with_site(SiteRoute::new(site, client));
        }
        upstreams.push(UpstreamEntry {
            upstream: Arc::new(upstream),
            partition: partition(up),
            prefetch_nars: up.prefetch_nars,
            unavailable: up.unavailable,
        });
    }
    Ok(upstreams)
}

fn policy(config: &Config) -> Result<Policy, StartError> {
    Ok(Policy {
        trusted_keys: TrustedKeys::parse(&config.trusted_public_keys)
            .map_err(|e| StartError::Keys(e.to_string()))?,
        require_signatures: config.require_signatures,
        narinfo_ttl: config.narinfo_ttl,
        negative_ttl: config.negative_ttl,
        priority: config.priority,
        lookahead: config.narinfo_lookahead,
        nar_lookahead: config.nar_lookahead,
    })
}

/// Who may pin and unpin: whoever may push somewhere (`push-uids`), else root.
fn pin_uids(config: &Config) -> Vec<u32> {
    let mut pin_uids: Vec<u32> = config
        .upstreams
        .iter()
        .filter_map(|u| u.push.as_ref())
        .flat_map(|p| p.uids.iter().copied())
        .collect();
    if pin_uids.is_empty() {
        pin_uids.push(0);
    }
    pin_uids.sort_unstable();
    pin_uids.dedup();
    pin_uids
}

/// The upstreams that take pushes, as upload targets, and the cache partition pushed paths
/// are recorded under; `None` when no upstream takes pushes.
#[allow(clippy::type_complexity)]
fn push_targets(
    config: &Config,
    upstreams: &[Arc<Upstream>],
    identities: &[Arc<Identity>],
) -> Result<Option<(Vec<Arc<Target>>, String)>, StartError> {
    let mut targets = Vec::new();
    let mut partition_of_first = None;
    // One client for the upstreams without a CA file of their own (the system roots are read
    // once).
    let mut shared = None;
    for (up, upstream) in config.upstreams.iter().zip(upstreams) {
        let Some(push) = &up.push else { continue };
        let client = match (&up.ca_file, &shared) {
            (None, Some(client)) => Clone::clone(client),
            (ca, _) => {
                let client = crate::http::client_for(ca.as_deref()).map_err(|source| {
                    let upstream = up.name.clone();
                    crate::http::UpstreamClientError { upstream, source }
                })?;
                if ca.is_none() {
                    shared = Some(Clone::clone(&client));
                }
                client
            }
        };
        let identity = push
            .identity
            .as_ref()
            .and_then(|name| identities.iter().find(|i| i.name() == name).cloned());
        partition_of_first.get_or_insert_with(|| partition(up));
        targets.push(Arc::new(Target::new(
            upstream.clone(),
            push.clone(),
            identity,
            up.auth.clone(),
            client,
        )));
    }
    Ok(partition_of_first.map(|p| (targets, p)))
}

fn snapshot(
    identities: &[Arc<Identity>],
    upstreams: &[Arc<Upstream>],
    store: &Store,
    pusher: Option<&Pusher>,
) -> Status {
    Status {
        upstreams: upstreams
            .iter()
            .map(|u| (u.name().to_string(), u.health()))
            .collect(),
        identities: identities
            .iter()
            .map(|i| (i.name().to_string(), i.health()))
            .collect(),
        cache: {
            let room = store.room();
            CacheStatus {
                stored_bytes: store.size(),
                max_bytes: store.limits().max_size,
                min_free_bytes: store.limits().min_free,
                free_disk_bytes: room.free_disk,
                uncached_since: room.uncached_since,
                no_room: room.refusals,
                evictions: store.evictions(),
                verification_failures: store.verification_failures(),
            }
        },
        push: pusher.map(Pusher::status),
    }
}

/// The `[site]` listeners and what they serve.
struct SiteListener {
    cache: Arc<SiteCache>,
    listeners: Vec<TcpListener>,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
}

impl SiteListener {
    /// One task per listener, each ending once shutdown starts and its requests are done.
    fn serve(self, tasks: &Tasks) {
        let limits = || crate::http::listener::Limits {
            max_connections: 4096,
            read_timeout: std::time::Duration::from_secs(10),
            idle: std::time::Duration::from_secs(60),
            grace: std::time::Duration::from_secs(10),
        };
        for listener in self.listeners {
            let (cache, acceptor) = (self.cache.clone(), self.acceptor.clone());
            let admit = {
                let cache = cache.clone();
                move |remote| cache.admits(remote)
            };
            let handler = move |request| cache.clone().handle(request);
            tasks.spawn(crate::http::listener::serve(
                listener,
                acceptor,
                limits(),
                admit,
                handler,
                tasks.stopping(),
            ));
        }
    }
}
