//! What to answer Nix: the local cache first, then the upstreams in order, with the status
//! mapping of the README's "What Nix is told" table (a miss only when every upstream said so; 503 with a reason
//! otherwise; stale cache over an error). The bytes themselves move in `download`.

mod download;
mod lookahead;
pub mod prefetch;

use download::content_length;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Method;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use crate::metrics::{Kind, Metrics};
use crate::nix::narinfo::{self, NarInfo, TrustedKeys, MAX_NARINFO_BYTES};
use crate::nix::request::{self, CachePath};
use crate::store::{ByteStream, Expected, FillReader, FillState, PassThrough};
use crate::store::{NarSource, NewNarInfo, Slot, Store};
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

/// What one upstream said of a narinfo.
#[derive(Clone)]
enum Lookup {
    Found(String),
    Missing,
    /// It has one, but not signed by a trusted key: a miss, with the reason.
    Untrusted(String),
}

type NarInfoResult = Result<Lookup, UpstreamError>;

/// Where a narinfo came from: the cache (of upstream `i`) or upstream `i` just now.
#[derive(Clone, Copy)]
enum Source {
    Cache(usize),
    Upstream(usize),
}

/// Where one upstream stands in answering a narinfo request.
enum Step<'a> {
    /// Its narinfo is in the cache and fresh.
    Cached(String),
    /// It said it does not have it, a moment ago.
    RecentMiss,
    /// Being asked; a stale copy to fall back on if it fails.
    Asking {
        fetch: Pin<Box<dyn Future<Output = NarInfoResult> + Send + 'a>>,
        stale: Option<String>,
    },
    Answered {
        result: NarInfoResult,
        stale: Option<String>,
    },
}

impl Step<'_> {
    /// Moves an answer that has come in from `Asking` to `Answered`.
    fn poll(&mut self, cx: &mut Context<'_>) {
        if let Step::Asking { fetch, stale } = self {
            if let Poll::Ready(result) = fetch.as_mut().poll(cx) {
                *self = Step::Answered {
                    result,
                    stale: stale.take(),
                };
            }
        }
    }
}
const MAX_REMEMBERED_MISSES: usize = 100_000;
/// Narinfo lookups in flight, by (upstream index, hash): latecomers share the first one's result.
type Flights = Mutex<HashMap<(usize, String), Arc<OnceCell<NarInfoResult>>>>;

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
        }
    }

    /// Lets every pinned NAR be evicted again; how many pins there were.
    pub fn unpin_all(&self) -> Result<u64, String> {
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

    /// The answer for `hash`, and where a found one came from. Every upstream that must be asked is asked at once; their answers
    /// are taken in the configured order, so a lower upstream's hit is used only once every
    /// higher one has missed, and answers below the winner are dropped unread (their fetches
    /// cancelled, or cached if they were done).
    async fn resolve(&self, hash: &str) -> (NarInfoAnswer, Option<Source>) {
        let mut steps: Vec<Step<'_>> = Vec::new();
        for i in 0..self.upstreams.len() {
            let cached = match self.store.narinfo(&self.partitions[i], hash) {
                Some(fresh) if fresh.age < self.policy.narinfo_ttl => {
                    // Nothing below this one can matter.
                    steps.push(Step::Cached(fresh.text));
                    break;
                }
                stale_or_none => stale_or_none.map(|stale| stale.text),
            };
            if self.recent_miss(i, hash) {
                steps.push(Step::RecentMiss);
                continue;
            }
            self.metrics.cache_miss(Kind::narinfo);
            steps.push(Step::Asking {
                fetch: Box::pin(self.fetch_narinfo_once(i, hash)),
                stale: cached,
            });
        }
        let mut failures = Vec::new();
        let mut all_failed_miss = true;
        let mut untrusted = Vec::new();
        let mut next = 0;
        std::future::poll_fn(|cx| {
            for step in steps.iter_mut().skip(next) {
                step.poll(cx);
            }
            // Take the answers in order, as far as they are in.
            while let Some(step) = steps.get_mut(next) {
                let i = next;
                let up = &self.upstreams[i];
                match std::mem::replace(step, Step::RecentMiss) {
                    Step::Cached(text) => {
                        self.metrics.cache_hit(Kind::narinfo);
                        return Poll::Ready((NarInfoAnswer::Found(text), Some(Source::Cache(i))));
                    }
                    Step::RecentMiss => {}
                    asking @ Step::Asking { .. } => {
                        *step = asking;
                        return Poll::Pending;
                    }
                    Step::Answered { result, stale } => match result {
                        Ok(Lookup::Found(text)) => {
                            return Poll::Ready((
                                NarInfoAnswer::Found(text),
                                Some(Source::Upstream(i)),
                            ))
                        }
                        Ok(Lookup::Missing) => self.remember_miss(i, hash),
                        Ok(Lookup::Untrusted(reason)) => {
                            self.remember_miss(i, hash);
                            untrusted.push(reason);
                        }
                        Err(e) => {
                            if let Some(stale) = stale {
                                tracing::info!(upstream = %up.name(), error = %e, "serving a stale narinfo");
                                return Poll::Ready((
                                    NarInfoAnswer::Found(stale),
                                    Some(Source::Cache(i)),
                                ));
                            }
                            tracing::warn!(upstream = %up.name(), error = %e, "narinfo lookup failed");
                            failures.push(Failure::from(e));
                            all_failed_miss &= self.miss_when_down[i];
                        }
                    },
                }
                next += 1;
            }
            let answer = if !failures.is_empty() && all_failed_miss {
                let failure = Failure::combine(std::mem::take(&mut failures));
                NarInfoAnswer::Unknown(format!(
                    "not known: an upstream that might have it cannot be asked now, and unavailable = \"miss\" makes that a miss (Nix builds it):\n{}",
                    failure.reason()
                ))
            } else if !failures.is_empty() {
                NarInfoAnswer::Failed(Failure::combine(std::mem::take(&mut failures)))
            } else if !untrusted.is_empty() {
                NarInfoAnswer::Untrusted(untrusted.join("\n"))
            } else {
                NarInfoAnswer::Missing
            };
            Poll::Ready((answer, None))
        })
        .await
    }

    /// Whether every upstream said a moment ago that it does not have `hash`.
    fn missed_everywhere(&self, hash: &str) -> bool {
        (0..self.upstreams.len()).all(|i| self.recent_miss(i, hash))
    }

    /// Whether some upstream's narinfo for `hash` is in the cache and fresh.
    fn is_cached(&self, hash: &str) -> bool {
        self.partitions.iter().any(|p| {
            self.store
                .narinfo(p, hash)
                .is_some_and(|n| n.age < self.policy.narinfo_ttl)
        })
    }

    /// Remembers a miss for `negative-ttl`. A flood of distinct misses (Nix asks for whole
    /// closures) must not grow the map for ever: expired entries go when it gets large.
    fn remember_miss(&self, i: usize, hash: &str) {
        let mut misses = self.misses.lock().unwrap();
        if misses.len() >= MAX_REMEMBERED_MISSES {
            let ttl = self.policy.negative_ttl;
            misses.retain(|_, at| at.elapsed() < ttl);
            if misses.len() >= MAX_REMEMBERED_MISSES {
                misses.clear();
            }
        }
        misses.insert((i, hash.to_string()), Instant::now());
    }

    fn recent_miss(&self, i: usize, hash: &str) -> bool {
        let mut misses = self.misses.lock().unwrap();
        let key = (i, hash.to_string());
        match misses.get(&key) {
            Some(at) if at.elapsed() < self.policy.negative_ttl => true,
            Some(_) => {
                misses.remove(&key);
                false
            }
            None => false,
        }
    }

    /// One upstream lookup per (upstream, hash) however many clients ask at once.
    async fn fetch_narinfo_once(&self, i: usize, hash: &str) -> NarInfoResult {
        let key = (i, hash.to_string());
        let cell = self
            .flights
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone();
        let result = cell
            .get_or_init(|| self.fetch_narinfo(i, hash))
            .await
            .clone();
        let mut flights = self.flights.lock().unwrap();
        if flights.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            flights.remove(&key);
        }
        result
    }

    async fn fetch_narinfo(&self, i: usize, hash: &str) -> NarInfoResult {
        let up = &self.upstreams[i];
        let bad = |detail: String| UpstreamError::Broken {
            upstream: up.name().to_string(),
            detail,
        };
        let url =
            up.resolve(&format!("{hash}.narinfo"))
                .ok_or_else(|| UpstreamError::Unavailable {
                    upstream: up.name().to_string(),
                    detail: "cannot form the narinfo URL".into(),
                })?;
        // A slot for the whole request, body included; the semaphore is never closed.
        let _slot = self.narinfo_slots[i].acquire().await;
        let response = match up.fetch(&url, Method::GET).await? {
            Answer::Found(response) => response,
            Answer::Missing => return Ok(Lookup::Missing),
        };
        let body = crate::http::read_limited(
            response.into_body(),
            MAX_NARINFO_BYTES,
            Duration::from_secs(30),
        )
        .await
        .map_err(|e| UpstreamError::Unavailable {
            upstream: up.name().to_string(),
            detail: format!("narinfo {hash}: {e}"),
        })?;
        let info =
            NarInfo::parse(&body).map_err(|e| bad(format!("narinfo {hash} is malformed: {e}")))?;
        if info.hash_part() != hash {
            return Err(bad(format!(
                "asked for narinfo {hash}, got one for {}",
                info.store_path
            )));
        }
        if self.policy.require_signatures && !self.policy.trusted_keys.verify(&info) {
            tracing::warn!(
                upstream = %up.name(),
                store_path = %info.store_path,
                "narinfo has no valid signature by a trusted key; treating it as a miss"
            );
            self.metrics.signature_failed(up.name());
            let names: Vec<&str> = info
                .sigs
                .iter()
                .filter_map(|sig| sig.split_once(':').map(|(name, _)| name))
                .collect();
            return Ok(Lookup::Untrusted(format!(
                "upstream `{}` has it, but no trusted key signed it (signed by: {}; trusted: {})",
                up.name(),
                if names.is_empty() {
                    "nobody".to_string()
                } else {
                    names.join(", ")
                },
                self.policy.trusted_keys.names().join(", ")
            )));
        }
        let text =
            String::from_utf8(body.to_vec()).map_err(|_| bad("narinfo is not UTF-8".into()))?;
        let (nar_key, source) = self
            .nar_location(up, &info.url)
            .ok_or_else(|| bad(format!("narinfo {hash} has an unusable URL")))?;
        let text = if nar_key == info.url {
            text
        } else {
            narinfo::replace_url(&text, &nar_key)
        };
        let store = self.store.clone();
        let (partition, hash_owned, text_owned) =
            (self.partitions[i].clone(), hash.to_string(), text.clone());
        let nar = NarSource {
            upstream: up.name().to_string(),
            url: source.to_string(),
            expected: Expected::from_narinfo(&info),
        };
        let new = NewNarInfo::new(&partition, &hash_owned, &text_owned, &nar_key, nar);
        let stored = tokio::task::spawn_blocking(move || store.put_narinfos(&[new])).await;
        Ok(Lookup::Found(
            stored
                .ok()
                .and_then(|mut texts| texts.pop())
                .unwrap_or(text),
        ))
    }

    /// The local NAR key for a narinfo `URL:` and the absolute upstream URL behind it. A plain
    /// `nar/<file>` keeps its name; anything else (absolute, other directories) gets a local
    /// name derived from the absolute URL.
    fn nar_location(&self, up: &Upstream, url: &str) -> Option<(String, url::Url)> {
        let absolute = up.resolve(url)?;
        let (path, query) = match url.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (url, None),
        };
        if !url.contains("://") {
            if let Some(CachePath::Nar(key)) = request::parse(&format!("/{path}"), query) {
                return Some((key, absolute));
            }
        }
        let digest = Sha256::digest(absolute.as_str().as_bytes());
        let name = crate::nix::hash::hex(&digest[..16]);
        let last = absolute.path_segments()?.next_back().unwrap_or("");
        let ext = last
            .find(".nar")
            .map(|i| &last[i..])
            .filter(|e| request::is_file_name(e));
        Some((format!("nar/{name}{}", ext.unwrap_or(".nar")), absolute))
    }

    /// A NAR by its local key: from disk, from a fill in progress, or fetched now.
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
                tokio::spawn(download::fill(
                    up.clone(),
                    source,
                    writer,
                    self.metrics.clone(),
                ));
                reader
            }
            Slot::Stored(file, size) => return NarAnswer::Found(Content::File(file, size)),
            Slot::Bypass(reason) => {
                tracing::debug!(nar = %key, reason, "passing through without caching");
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
                tracing::warn!(upstream = %up.name(), reason, "refusing a NAR that cannot be verified");
                return NarAnswer::Failed(Failure::Unavailable(reason));
            }
        };
        tokio::spawn(download::pass_through(response, sink, self.metrics.clone()));
        NarAnswer::Found(Content::Stream(length, stream))
    }
}
