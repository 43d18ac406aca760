//! What to answer Nix: the local cache first, then the upstreams in order, with the status
//! mapping of the README's "What Nix is told" table (a miss only when every upstream said so; 503 with a reason
//! otherwise; stale cache over an error). The bytes themselves move in `download`.

pub(crate) mod download;
mod lookahead;
pub mod prefetch;
mod resolve;

use download::content_length;
use resolve::{Flights, Source};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Method;

use crate::metrics::{Kind, Metrics};
use crate::nix::narinfo::TrustedKeys;
use crate::store::{ByteStream, Expected, FillReader, FillState, PassThrough};
use crate::store::{Slot, Store};
use crate::tasks::Tasks;
use crate::upstream::{Answer, Upstream, UpstreamError};

pub enum NarInfoAnswer {
    Found(String),
    Missing,
    /// A miss because no upstream's narinfo carries a valid trusted signature.
    Untrusted(String),
    /// Not known: an upstream that might have it cannot be asked, and each such upstream
    /// says `unavailable = "miss"` (so Nix builds it); the reason.
    Unknown(String),
    Failed(Failure),
}

/// Why there is no answer; it decides the status Nix gets (the README's "What Nix is told").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The upstreams or identities could not be asked, or failed: worth asking again.
    Unavailable(String),
    /// Every upstream that failed answered something unusable (a broken upstream).
    Broken(String),
}

impl Failure {
    pub fn reason(&self) -> &str {
        match self {
            Failure::Unavailable(reason) | Failure::Broken(reason) => reason,
        }
    }

    /// The failure of several upstreams: broken only if every one of them was.
    fn combine(failures: Vec<Failure>) -> Failure {
        let broken = failures.iter().all(|f| matches!(f, Failure::Broken(_)));
        let text = failures
            .iter()
            .map(Failure::reason)
            .collect::<Vec<_>>()
            .join("\n");
        if broken {
            Failure::Broken(text)
        } else {
            Failure::Unavailable(text)
        }
    }
}

impl From<UpstreamError> for Failure {
    fn from(e: UpstreamError) -> Failure {
        match e {
            UpstreamError::Broken { .. } => Failure::Broken(e.to_string()),
            _ => Failure::Unavailable(e.to_string()),
        }
    }
}

pub enum Content {
    /// A stored file, served from disk.
    File(std::fs::File, u64),
    /// A file being filled, read along as it grows; its length when known.
    Filling(Option<u64>, FillReader),
    /// A stream; its length when known.
    Stream(Option<u64>, ByteStream),
    /// Headers only (HEAD): the length when known.
    Head(Option<u64>),
}

impl Content {
    /// The body's length, when it is known before it is sent.
    pub fn length(&self) -> Option<u64> {
        match self {
            Content::File(_, size) => Some(*size),
            Content::Filling(len, _) | Content::Stream(len, _) | Content::Head(len) => *len,
        }
    }
}

pub enum NarAnswer {
    Found(Content),
    Missing,
    Failed(Failure),
}

/// How answers are decided, from the configuration.
pub struct Policy {
    pub trusted_keys: TrustedKeys,
    pub require_signatures: bool,
    pub narinfo_ttl: Duration,
    pub negative_ttl: Duration,
    /// `Priority:` of nix-cache-info.
    pub priority: u32,
    /// Fetch the references of a narinfo fetched for Nix ahead of its asking.
    pub lookahead: bool,
    /// Once Nix downloads a NAR, fetch those of the narinfos it asked for lately.
    pub nar_lookahead: bool,
}

/// One upstream as the proxy uses it.
pub struct UpstreamEntry {
    pub upstream: Arc<Upstream>,
    /// Its index partition (see [`partition`]).
    pub partition: String,
    /// Start the NAR download when its narinfo is served.
    pub prefetch_nars: bool,
    /// What a narinfo it might have is while it cannot be asked.
    pub unavailable: crate::config::Unavailable,
}

/// Narinfo requests in flight to one upstream at most (Nix's own and lookahead's).
const NARINFO_REQUESTS_PER_UPSTREAM: usize = 64;

pub struct Proxy {
    upstreams: Vec<Arc<Upstream>>,
    /// Index partition of each upstream: answers for one identity never serve another.
    partitions: Vec<String>,
    store: Store,
    metrics: Arc<Metrics>,
    policy: Policy,
    misses: Mutex<HashMap<(usize, String), Instant>>,
    flights: Flights,
    prefetch_nars: Vec<bool>,
    /// Per upstream: `unavailable = "miss"`.
    miss_when_down: Vec<bool>,
    narinfo_slots: Vec<tokio::sync::Semaphore>,
    lookahead: Option<Arc<lookahead::Lookahead>>,
    nars_ahead: Option<Arc<lookahead::NarsAhead>>,
    /// Roots whose closure hints are being asked of a site (see `lookahead`).
    hinted: Mutex<std::collections::HashSet<String>>,
    /// Downloads into the cache and walks ahead of Nix run here, owned by the daemon.
    tasks: Tasks,
}

/// The index partition of an upstream's narinfos: one identity's view must not answer for
/// another's, nor one URL's for another's.
pub fn partition(up: &crate::config::UpstreamConfig) -> String {
    format!(
        "{}|{}|{}",
        up.name,
        up.url,
        up.identity.as_deref().unwrap_or("-")
    )
}

impl Proxy {
    /// The upstreams in their order of precedence.
    pub fn new(
        upstreams: Vec<UpstreamEntry>,
        store: Store,
        metrics: Arc<Metrics>,
        policy: Policy,
        tasks: Tasks,
    ) -> Proxy {
        Proxy {
            partitions: upstreams.iter().map(|u| u.partition.clone()).collect(),
            prefetch_nars: upstreams.iter().map(|u| u.prefetch_nars).collect(),
            miss_when_down: upstreams
                .iter()
                .map(|u| u.unavailable == crate::config::Unavailable::Miss)
                .collect(),
            narinfo_slots: upstreams
                .iter()
                .map(|_| tokio::sync::Semaphore::new(NARINFO_REQUESTS_PER_UPSTREAM))
                .collect(),
            upstreams: upstreams.into_iter().map(|u| u.upstream).collect(),
            lookahead: policy.lookahead.then(Arc::default),
            nars_ahead: policy.nar_lookahead.then(Arc::default),
            store,
            metrics,
            policy,
            misses: Mutex::default(),
            flights: Mutex::default(),
            hinted: Mutex::default(),
            tasks,
        }
    }

    /// Lets every pinned NAR be evicted again; how many pins there were.
    pub fn unpin_all(&self) -> Result<u64, crate::store::IndexError> {
        self.store.unpin(None)
    }

    pub fn cache_info(&self) -> String {
        format!(
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: {}\n",
            self.policy.priority
        )
    }

    /// The narinfo for `hash`: the first upstream (in order) that has it wins. When it came
    /// from an upstream, its references are looked up ahead, in the background.
    /// `client`: the asking peer's uid, when known (see `lookahead`).
    pub async fn narinfo(self: &Arc<Self>, hash: &str, client: Option<u32>) -> NarInfoAnswer {
        let (answer, source) = self.resolve(hash).await;
        if let (NarInfoAnswer::Found(text), Some(source)) = (&answer, source) {
            let (i, fetched) = match source {
                Source::Cache(i) => (i, false),
                Source::Upstream(i) => (i, true),
            };
            lookahead::after_serving(self, text, i, fetched, client);
        }
        answer
    }

    /// A NAR Nix asked for: once Nix downloads, the NARs of the narinfos it asked for lately
    /// are fetched too (see `lookahead`).
    pub async fn nar_for_client(
        self: &Arc<Self>,
        key: &str,
        method: &Method,
        client: Option<u32>,
    ) -> NarAnswer {
        if method == Method::GET {
            lookahead::nar_asked(self, key, client);
        }
        self.nar(key, method).await
    }

    /// A NAR by its local key: from disk, from a fill in progress, or fetched now.
    pub async fn nar(&self, key: &str, method: &Method) -> NarAnswer {
        let head = method == Method::HEAD;
        let row = self.store.nar(key);
        let upstream = row.as_ref().and_then(|r| {
            self.upstreams
                .iter()
                .find(|u| u.name() == r.source.upstream)
        });
        let (Some(row), Some(up)) = (row.as_ref(), upstream) else {
            return self.forward(key, method).await;
        };
        if let Some((file, size)) = self.store.open_stored(key, row) {
            self.metrics.cache_hit(Kind::nar);
            return NarAnswer::Found(if head {
                Content::Head(Some(size))
            } else {
                Content::File(file, size)
            });
        }
        self.metrics.cache_miss(Kind::nar);
        let Ok(source) = url::Url::parse(&row.source.url) else {
            return NarAnswer::Failed(Failure::Unavailable(format!(
                "index holds a bad URL for {key}"
            )));
        };
        if head {
            return match up.fetch(&source, Method::HEAD).await {
                Ok(Answer::Found(r)) => NarAnswer::Found(Content::Head(
                    content_length(&r).or(row.source.expected.file_len()),
                )),
                Ok(Answer::Missing) => NarAnswer::Missing,
                Err(e) => NarAnswer::Failed(e.into()),
            };
        }
        let mut reader = match self.store.fill(key, &row.source.expected) {
            Slot::Join(reader) => reader,
            Slot::Lead(writer, reader) => {
                // The fill runs on its own: clients that go away do not stop it.
                self.tasks.spawn(download::fill(
                    up.clone(),
                    source,
                    writer,
                    self.metrics.clone(),
                ));
                reader
            }
            Slot::Stored(file, size) => return NarAnswer::Found(Content::File(file, size)),
            Slot::Bypass(reason) => {
                tracing::debug!(nar = %key, %reason, "passing through without caching");
                return self
                    .pass_through(up, &source, Some(&row.source.expected))
                    .await;
            }
        };
        let progress = reader.started().await;
        if progress.state == FillState::Complete {
            // Joined a verified fill that is being stored: serve the stored file (Range and
            // all) once it is there.
            reader.ended().await;
            if let Some((file, size)) = self.store.stored(key) {
                return NarAnswer::Found(Content::File(file, size));
            }
        }
        match progress.state {
            FillState::Missing => NarAnswer::Missing,
            FillState::Failed(reason) if progress.written == 0 => {
                NarAnswer::Failed(Failure::Unavailable(reason.to_string()))
            }
            _ => NarAnswer::Found(Content::Filling(progress.length, reader)),
        }
    }

    /// Passed through from the first upstream that has it, unverified and not stored: `log/`,
    /// `realisations/`, `build-trace-v2/`, and a NAR no narinfo of ours pointed to (say, the
    /// cache was wiped while Nix still remembered the narinfo; Nix checks NarHash itself).
    pub async fn forward(&self, key: &str, method: &Method) -> NarAnswer {
        let mut failures = Vec::new();
        for up in &self.upstreams {
            let Some(url) = up.resolve(key) else { continue };
            if method == Method::HEAD {
                match up.fetch(&url, Method::HEAD).await {
                    Ok(Answer::Found(r)) => {
                        return NarAnswer::Found(Content::Head(content_length(&r)))
                    }
                    Ok(Answer::Missing) => continue,
                    Err(e) => failures.push(e.into()),
                }
                continue;
            }
            match self.pass_through(up, &url, None).await {
                NarAnswer::Missing => continue,
                NarAnswer::Failed(failure) => failures.push(failure),
                found => return found,
            }
        }
        if failures.is_empty() {
            NarAnswer::Missing
        } else {
            NarAnswer::Failed(Failure::combine(failures))
        }
    }

    async fn pass_through(
        &self,
        up: &Upstream,
        url: &url::Url,
        expected: Option<&Expected>,
    ) -> NarAnswer {
        let response = match up.fetch(url, Method::GET).await {
            Ok(Answer::Found(response)) => response,
            Ok(Answer::Missing) => return NarAnswer::Missing,
            Err(e) => return NarAnswer::Failed(e.into()),
        };
        let promised = expected.and_then(Expected::file_len);
        let sent = content_length(&response);
        if let (Some(promised), Some(sent)) = (promised, sent) {
            if promised != sent {
                self.store.count_verification_failure();
                return NarAnswer::Failed(Failure::Broken(format!(
                    "upstream `{}` announced {sent} bytes, the narinfo promises {promised}",
                    up.name()
                )));
            }
        }
        let length = promised.or(sent);
        let (sink, stream) = match PassThrough::new(&self.store, expected, length) {
            Ok(pass) => pass,
            Err(reason) => {
                tracing::warn!(upstream = %up.name(), %reason, "refusing a NAR that cannot be verified");
                return NarAnswer::Failed(Failure::Unavailable(reason.to_string()));
            }
        };
        tokio::spawn(download::pass_through(response, sink, self.metrics.clone()));
        NarAnswer::Found(Content::Stream(length, stream))
    }
}
