//! What happens after a narinfo is served: Nix will ask next for the narinfos of its
//! references (it walks a closure level by level), so those are fetched now, in the
//! background, and answered from the cache when Nix asks; and, for an upstream with
//! `prefetch-nars`, the NAR's download starts before Nix asks for it.
//!
//! And once Nix downloads a NAR, it is substituting: it will want the NARs of the other
//! narinfos it asked for (it asks only for paths it lacks), so those downloads start now,
//! [`NARS_RUNNING`] at a time ([`NarsAhead`]). A walk of narinfos alone fetches no NAR, and
//! neither does a request for a NAR that no narinfo served to the same client (uid) named:
//! only that client's own narinfos are followed, at most [`NARS_PER_TRIGGER`] per NAR asked
//! (each further NAR it downloads takes the next ones), so a client cannot make the daemon
//! download much more than it downloads itself.
//!
//! Bounded: at most [`BUDGET`] lookups for one narinfo Nix asked for, [`DEPTH`] levels below
//! it; at most [`RUNNING`] lookups at once and [`QUEUED`] waiting in the whole daemon (more are
//! not queued: Nix then asks for those itself); never for a narinfo that is cached, was missed
//! a moment ago, or is being looked up already.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::Method;
use tokio::sync::Semaphore;

use super::{Content, NarAnswer, NarInfoAnswer, Proxy};
use crate::nix::narinfo::{self, NarInfo};

/// Lookups running at once in the daemon: each waits a round trip to a distant cache, so a
/// wide closure level (40 paths in scenario 13) must be asked at once, beside Nix's own 25
/// (`http-connections`); at 32 the walk of 602 narinfos was bound by this, not by its depth.
/// Upstream requests are bounded per upstream too.
const RUNNING: usize = 64;
/// Lookups waiting for a slot, in the whole daemon; more are dropped.
const QUEUED: usize = 4096;
/// Lookups made for one narinfo Nix asked for, all levels together: enough for the direct
/// references of a wide closure's root (Nix asks for all of them next), not for a runaway.
const BUDGET: usize = 1024;
/// Levels of references below the narinfo Nix asked for.
const DEPTH: u32 = 3;
/// Hashes remembered as looked up; the set is cleared when it reaches this size.
const REMEMBERED: usize = 100_000;
/// NAR downloads started ahead of Nix at once (each shares the upstream's bandwidth): small
/// NARs over a WAN cost a round trip each, so with Nix's 16 jobs this many keep the link busy.
const NARS_RUNNING: usize = 32;
/// NARs of narinfos served lately, remembered for that long and that many.
const NARS_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
const NARS_REMEMBERED: usize = 4096;
/// NAR downloads one NAR request may start ahead.
const NARS_PER_TRIGGER: usize = 64;

/// The NAR keys of narinfos served lately, with when and to whom (the client's uid).
pub struct NarsAhead {
    recent: Mutex<std::collections::VecDeque<(std::time::Instant, u32, String)>>,
    running: Arc<Semaphore>,
}

impl Default for NarsAhead {
    fn default() -> NarsAhead {
        NarsAhead {
            recent: Mutex::default(),
            running: Arc::new(Semaphore::new(NARS_RUNNING)),
        }
    }
}

pub struct Lookahead {
    running: Semaphore,
    queued: AtomicUsize,
    seen: Mutex<HashSet<String>>,
}

impl Default for Lookahead {
    fn default() -> Lookahead {
        Lookahead {
            running: Semaphore::new(RUNNING),
            queued: AtomicUsize::new(0),
            seen: Mutex::default(),
        }
    }
}

/// After `text` was served to Nix: the NAR download if its upstream (`upstream`, an index)
/// prefetches NARs; the references' narinfos if it was just fetched from upstream.
pub(super) fn after_serving(
    proxy: &Arc<Proxy>,
    text: &str,
    upstream: usize,
    fetched: bool,
    client: Option<u32>,
) {
    if proxy.prefetch_nars.get(upstream).copied().unwrap_or(false) {
        prefetch_nar(proxy, text);
    } else if let (Some(ahead), Some(uid)) = (&proxy.nars_ahead, client) {
        remember_nar(ahead, text, uid);
    }
    if fetched {
        closure_hints(proxy, text, upstream);
        revalidate_known(proxy, text);
        look_ahead(proxy, text, DEPTH, &Arc::new(AtomicUsize::new(BUDGET)));
    }
}

/// Narinfos one revalidation asks again at most.
const REVALIDATE_MOST: usize = 20_000;

/// A narinfo just fetched whose references the cache holds, gone stale: a re-deploy of a
/// known closure. A store path's References never change, so the stale copies still say what
/// the closure is; every stale narinfo of it is asked again at once ([`RUNNING`] at a time)
/// instead of one level per round trip as Nix would find them. Only stale entries are followed:
/// a fresh one was checked within `narinfo-ttl`, and so was what it was found with.
fn revalidate_known(proxy: &Arc<Proxy>, text: &str) {
    let Some(lookahead) = proxy.lookahead.clone() else {
        return;
    };
    let Ok(info) = NarInfo::parse(text.as_bytes()) else {
        return;
    };
    let roots: Vec<String> = info
        .references
        .iter()
        .filter_map(|r| r.get(..32))
        .filter(|h| *h != info.hash_part())
        .map(str::to_string)
        .collect();
    let tasks = proxy.tasks.clone();
    let proxy = proxy.clone();
    tasks.spawn_until_stopped(async move {
        let walker = proxy.clone();
        let stale = tokio::task::spawn_blocking(move || stale_closure(&walker, roots))
            .await
            .unwrap_or_default();
        if stale.is_empty() {
            return;
        }
        tracing::debug!(
            narinfos = stale.len(),
            "revalidating a known closure at once"
        );
        let mut asked = tokio::task::JoinSet::new();
        for hash in stale {
            if !lookahead.seen.lock().unwrap().insert(hash.clone()) {
                continue; // being looked up already
            }
            let (proxy, lookahead) = (proxy.clone(), lookahead.clone());
            asked.spawn(async move {
                let permit = lookahead.running.acquire().await;
                let _ = proxy.resolve(&hash).await;
                drop(permit);
                lookahead.seen.lock().unwrap().remove(&hash);
            });
        }
        while asked.join_next().await.is_some() {}
    });
}

/// The stale narinfos reachable from `roots` through stale cached narinfos, breadth first.
fn stale_closure(proxy: &Proxy, roots: Vec<String>) -> Vec<String> {
    let mut seen: HashSet<String> = HashSet::new();
    let mut queue: std::collections::VecDeque<String> = roots.into();
    let mut stale = Vec::new();
    while let Some(hash) = queue.pop_front() {
        if stale.len() >= REVALIDATE_MOST || !seen.insert(hash.clone()) {
            continue;
        }
        let Some((text, false)) = proxy.known(&hash) else {
            continue; // fresh, or unknown: nothing stale to follow
        };
        if let Ok(info) = NarInfo::parse(text.as_bytes()) {
            let own = info.hash_part();
            queue.extend(
                info.references
                    .iter()
                    .filter_map(|r| r.get(..32))
                    .filter(|h| *h != own)
                    .map(str::to_string),
            );
        }
        stale.push(hash);
    }
    stale
}

/// For an upstream with a site: the narinfos of the closure the site already knows, asked at
/// once, each checked as if the upstream had sent it and stored, so Nix's walk of the rest is
/// answered locally instead of level by level across the WAN.
fn closure_hints(proxy: &Arc<Proxy>, text: &str, upstream: usize) {
    if proxy.upstreams[upstream].site().is_none() {
        return;
    }
    let Ok(info) = NarInfo::parse(text.as_bytes()) else {
        return;
    };
    let root = info.hash_part().to_string();
    {
        let mut hinted = proxy.hinted.lock().unwrap();
        if hinted.len() >= REMEMBERED {
            hinted.clear();
        }
        if !hinted.insert(root.clone()) {
            return;
        }
    }
    let tasks = proxy.tasks.clone();
    let proxy = proxy.clone();
    tasks.spawn_until_stopped(async move {
        let hints = proxy.upstreams[upstream].closure_hints(&root).await;
        let offered = hints.len();
        let fresh: Vec<String> = hints
            .into_iter()
            .filter(|hint| {
                NarInfo::parse(hint.as_bytes()).is_ok_and(|info| !proxy.is_cached(info.hash_part()))
            })
            .collect();
        // Checked and stored in one commit; one that fails the checks is left out, and Nix's
        // own request for it asks again.
        let stored = proxy.admit_all(upstream, fresh).await;
        tracing::debug!(%root, offered, stored, "closure hints from the site");
        proxy.hinted.lock().unwrap().remove(&root);
    });
}

/// Remembers `text`'s NAR. Whether it is stored is asked only if Nix starts downloading: an
/// index read per narinfo served cost a fifth of the warm narinfo rate (scenario 2).
fn remember_nar(ahead: &NarsAhead, text: &str, uid: u32) {
    let Some(key) = narinfo::field(text, "URL") else {
        return;
    };
    let mut recent = ahead.recent.lock().unwrap();
    if recent.len() >= NARS_REMEMBERED {
        recent.pop_front();
    }
    recent.push_back((std::time::Instant::now(), uid, key.to_string()));
}

/// Nix asked for the NAR `key`: the NARs of the narinfos it was served in the last minute
/// start downloading, a few at a time, each once (a fill is shared with Nix when it asks).
pub(super) fn nar_asked(proxy: &Arc<Proxy>, key: &str, client: Option<u32>) {
    let (Some(ahead), Some(uid)) = (proxy.nars_ahead.clone(), client) else {
        return;
    };
    let keys: Vec<String> = {
        let mut recent = ahead.recent.lock().unwrap();
        recent.retain(|(at, _, _)| at.elapsed() < NARS_WINDOW);
        let named = |(_, who, k): &(std::time::Instant, u32, String)| *who == uid && k == key;
        if !recent.iter().any(named) {
            return; // no narinfo served to this client named it
        }
        recent.retain(|entry| !named(entry));
        let mut taken = Vec::new();
        recent.retain(|(_, who, k)| {
            let take = *who == uid && taken.len() < NARS_PER_TRIGGER;
            if take {
                taken.push(k.clone());
            }
            !take
        });
        taken
    };
    for key in keys {
        let tasks = proxy.tasks.clone();
        let (proxy, running) = (proxy.clone(), ahead.running.clone());
        tasks.spawn_until_stopped(async move {
            let Ok(_permit) = running.acquire_owned().await else {
                return;
            };
            if proxy.store.nar(&key).is_some_and(|row| row.blob.is_some()) {
                return;
            }
            if let NarAnswer::Found(Content::Filling(_, mut reader)) =
                proxy.nar(&key, &Method::GET).await
            {
                reader.ended().await;
            }
        });
    }
}

/// Starts the NAR's fill (a no-op when it is stored or being filled).
fn prefetch_nar(proxy: &Arc<Proxy>, text: &str) {
    let Some(key) = narinfo::field(text, "URL") else {
        return;
    };
    if proxy.store.nar(key).is_some_and(|row| row.blob.is_some()) {
        return;
    }
    let tasks = proxy.tasks.clone();
    let (proxy, key) = (proxy.clone(), key.to_string());
    tasks.spawn_until_stopped(async move {
        // The fill runs on its own; the reader handed back is not needed.
        drop(proxy.nar(&key, &Method::GET).await);
    });
}

/// Looks up `text`'s references, taking one unit of `budget` for each.
fn look_ahead(proxy: &Arc<Proxy>, text: &str, depth: u32, budget: &Arc<AtomicUsize>) {
    let Some(lookahead) = proxy.lookahead.clone() else {
        return;
    };
    if depth == 0 {
        return;
    }
    let Ok(info) = NarInfo::parse(text.as_bytes()) else {
        return;
    };
    let own = info.hash_part().to_string();
    for reference in &info.references {
        let Some(hash) = reference.get(..32).filter(|h| *h != own) else {
            continue;
        };
        if proxy.is_cached(hash) || proxy.missed_everywhere(hash) {
            continue;
        }
        {
            let mut seen = lookahead.seen.lock().unwrap();
            if seen.len() >= REMEMBERED {
                seen.clear();
            }
            if !seen.insert(hash.to_string()) {
                continue;
            }
        }
        let spent = budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(1)
            })
            .is_err();
        if spent || lookahead.queued.fetch_add(1, Ordering::SeqCst) >= QUEUED {
            if !spent {
                lookahead.queued.fetch_sub(1, Ordering::SeqCst);
            }
            lookahead.seen.lock().unwrap().remove(hash);
            return;
        }
        let tasks = proxy.tasks.clone();
        let (proxy, lookahead, hash, budget) = (
            proxy.clone(),
            lookahead.clone(),
            hash.to_string(),
            budget.clone(),
        );
        tasks.spawn_until_stopped(async move {
            let permit = lookahead.running.acquire().await;
            let (answer, source) = proxy.resolve(&hash).await;
            drop(permit);
            lookahead.queued.fetch_sub(1, Ordering::SeqCst);
            lookahead.seen.lock().unwrap().remove(&hash);
            if let (NarInfoAnswer::Found(text), Some(super::Source::Upstream(_))) =
                (&answer, source)
            {
                look_ahead(&proxy, text, depth - 1, &budget);
            }
        });
    }
}
