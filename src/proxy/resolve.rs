//! How a narinfo is resolved: the cache of each upstream first, then every upstream that must
//! be asked at once, their answers taken in the configured order; misses remembered for
//! negative-ttl; one lookup in flight per upstream and hash, shared by latecomers.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Method;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::{Failure, NarInfoAnswer, Proxy};
use crate::metrics::Kind;
use crate::nix::narinfo::{self, NarInfo, MAX_NARINFO_BYTES};
use crate::nix::request::{self, CachePath};
use crate::store::{Expected, NarSource, NewNarInfo};
use crate::upstream::{Answer, Upstream, UpstreamError};

/// What one upstream said of a narinfo.
#[derive(Clone)]
pub(super) enum Lookup {
    Found(String),
    Missing,
    /// It has one, but not signed by a trusted key: a miss, with the reason.
    Untrusted(String),
}

pub(super) type NarInfoResult = Result<Lookup, UpstreamError>;

/// Where a narinfo came from: the cache (of upstream `i`) or upstream `i` just now.
#[derive(Clone, Copy)]
pub(super) enum Source {
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
/// Upstream misses remembered (for negative-ttl) at most.
const MAX_REMEMBERED_MISSES: usize = 100_000;
/// Narinfo lookups in flight, by (upstream index, hash): latecomers share the first one's result.
pub(super) type Flights = Mutex<HashMap<(usize, String), Arc<OnceCell<NarInfoResult>>>>;

/// What the upstreams said that was not an answer, gathered in order.
#[derive(Default)]
struct Unanswered {
    failures: Vec<Failure>,
    /// A failed upstream is `unavailable = "fail"`: its failure is not a miss.
    some_fail_for_good: bool,
    untrusted: Vec<String>,
}

impl Unanswered {
    /// Nix's answer when no upstream had the narinfo.
    fn answer(self) -> NarInfoAnswer {
        if !self.failures.is_empty() && !self.some_fail_for_good {
            let failure = Failure::combine(self.failures);
            NarInfoAnswer::Unknown(format!(
                "not known: an upstream that might have it cannot be asked now, and unavailable = \"miss\" makes that a miss (Nix builds it):\n{}",
                failure.reason()
            ))
        } else if !self.failures.is_empty() {
            NarInfoAnswer::Failed(Failure::combine(self.failures))
        } else if !self.untrusted.is_empty() {
            NarInfoAnswer::Untrusted(self.untrusted.join("\n"))
        } else {
            NarInfoAnswer::Missing
        }
    }
}

impl Proxy {
    /// The answer for `hash`, and where a found one came from. Every upstream that must be asked is asked at once; their answers
    /// are taken in the configured order, so a lower upstream's hit is used only once every
    /// higher one has missed, and answers below the winner are dropped unread (their fetches
    /// cancelled, or cached if they were done).
    pub(super) async fn resolve(&self, hash: &str) -> (NarInfoAnswer, Option<Source>) {
        let mut steps = self.steps(hash);
        let mut unanswered = Unanswered::default();
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
                            unanswered.untrusted.push(reason);
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
                            unanswered.failures.push(Failure::from(e));
                            unanswered.some_fail_for_good |= !self.miss_when_down[i];
                        }
                    },
                }
                next += 1;
            }
            let answer = std::mem::take(&mut unanswered).answer();
            Poll::Ready((answer, None))
        })
        .await
    }

    /// One step per upstream, in order: a fresh cached narinfo ends the list (nothing below
    /// it can matter); a recent miss is not asked again; the rest are asked at once.
    fn steps<'a>(&'a self, hash: &'a str) -> Vec<Step<'a>> {
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
        steps
    }

    /// Whether every upstream said a moment ago that it does not have `hash`.
    pub(super) fn missed_everywhere(&self, hash: &str) -> bool {
        (0..self.upstreams.len()).all(|i| self.recent_miss(i, hash))
    }

    /// Some upstream's cached narinfo for `hash`, fresh or not, and whether it is fresh.
    pub(super) fn known(&self, hash: &str) -> Option<(String, bool)> {
        self.partitions.iter().find_map(|p| {
            self.store
                .narinfo(p, hash)
                .map(|n| (n.text, n.age < self.policy.narinfo_ttl))
        })
    }

    /// Whether some upstream's narinfo for `hash` is in the cache and fresh.
    pub(super) fn is_cached(&self, hash: &str) -> bool {
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
        self.admit(i, hash, &body).await
    }

    /// A narinfo for `hash` that upstream `i` answered (or its site hinted): checked (it
    /// names `hash`, a trusted key signed it) and stored in that upstream's partition, its
    /// NAR recorded under its local name.
    pub(super) async fn admit(&self, i: usize, hash: &str, body: &[u8]) -> NarInfoResult {
        let new = match self.vet(i, hash, body)? {
            Ok(new) => new,
            Err(refused) => return Ok(refused),
        };
        let (store, text) = (self.store.clone(), new.text().to_string());
        let stored = tokio::task::spawn_blocking(move || store.put_narinfos(&[new])).await;
        Ok(Lookup::Found(
            stored
                .ok()
                .and_then(|mut texts| texts.pop())
                .unwrap_or(text),
        ))
    }

    /// Stores many narinfos of upstream `i` (a site's closure hints) in one index commit,
    /// each vetted as [`Proxy::admit`] does (signatures checked off the runtime); how many
    /// were stored.
    pub(super) async fn admit_all(self: &Arc<Self>, i: usize, bodies: Vec<String>) -> usize {
        let proxy = self.clone();
        let vetted = tokio::task::spawn_blocking(move || {
            let batch: Vec<NewNarInfo> = bodies
                .iter()
                .filter_map(|body| {
                    let hash = NarInfo::parse(body.as_bytes())
                        .ok()?
                        .hash_part()
                        .to_string();
                    // One that fails is left out: Nix's own request for it asks again.
                    proxy.vet(i, &hash, body.as_bytes()).ok()?.ok()
                })
                .collect();
            proxy.store.put_narinfos(&batch).len()
        });
        vetted.await.unwrap_or(0)
    }

    /// A narinfo for `hash` from upstream `i`, ready to store, or why it is no hit (an
    /// untrusted one), or why it is unusable.
    fn vet(
        &self,
        i: usize,
        hash: &str,
        body: &[u8],
    ) -> Result<Result<NewNarInfo, Lookup>, UpstreamError> {
        let up = &self.upstreams[i];
        let bad = |detail: String| UpstreamError::Broken {
            upstream: up.name().to_string(),
            detail,
        };
        let info =
            NarInfo::parse(body).map_err(|e| bad(format!("narinfo {hash} is malformed: {e}")))?;
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
            return Ok(Err(Lookup::Untrusted(format!(
                "upstream `{}` has it, but no trusted key signed it (signed by: {}; trusted: {})",
                up.name(),
                if names.is_empty() {
                    "nobody".to_string()
                } else {
                    names.join(", ")
                },
                self.policy.trusted_keys.names().join(", ")
            ))));
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
        let nar = NarSource {
            upstream: up.name().to_string(),
            url: source.to_string(),
            expected: Expected::from_narinfo(&info),
        };
        Ok(Ok(NewNarInfo::new(
            &self.partitions[i],
            hash,
            &text,
            &nar_key,
            nar,
        )))
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
}
