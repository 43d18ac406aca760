//! `POST /_sidecar/prefetch` (and `nix-sidecar prefetch`): the closures of some store paths,
//! resolved through their narinfos' References, with every NAR fetched, verified and stored,
//! so that a deploy later finds them local (and survives an upstream outage). Progress is
//! published while it runs; the last state says what was unavailable and why.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use http::Method;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Content, NarAnswer, NarInfoAnswer, Proxy};
use crate::nix::narinfo::NarInfo;

/// Paths worked on at once (narinfo, then NAR): each waits a round trip to a distant cache
/// twice, and a closure given whole (`--paths-from`) is as wide as it is long.
const AT_ONCE: usize = 32;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    pub paths_done: u64,
    pub paths_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub done: bool,
    pub unavailable: Vec<Unavailable>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Unavailable {
    /// The store path hash, with the name when the narinfo was found.
    pub path: String,
    pub reason: String,
}

/// The 32-character hash of a store path, a store path's basename, or a bare hash.
pub fn hash_of(path: &str) -> Option<String> {
    let base = path.trim_end_matches('/').rsplit('/').next()?;
    let hash = base.get(..32)?;
    let valid = hash.bytes().all(crate::nix::base32::is_digit)
        && (base.len() == 32 || base.as_bytes()[32] == b'-');
    valid.then(|| hash.to_string())
}

/// Starts prefetching the closures of `roots` (store path hashes), pinning every NAR stored
/// until `pin_until` (unix seconds) if given; its progress.
pub fn start(
    proxy: Arc<Proxy>,
    roots: Vec<String>,
    pin_until: Option<u64>,
) -> watch::Receiver<Progress> {
    let (tx, rx) = watch::channel(Progress {
        paths_total: roots.len() as u64,
        ..Progress::default()
    });
    let tasks = proxy.tasks.clone();
    tasks.spawn_until_stopped(walk(proxy, roots, pin_until, tx));
    rx
}

/// What became of one path.
struct Outcome {
    hash: String,
    references: Vec<String>,
    bytes: u64,
    failure: Option<Unavailable>,
}

async fn walk(
    proxy: Arc<Proxy>,
    roots: Vec<String>,
    pin_until: Option<u64>,
    tx: watch::Sender<Progress>,
) {
    let mut seen: HashSet<String> = roots.iter().cloned().collect();
    let mut queue: VecDeque<String> = seen.iter().cloned().collect();
    let mut running = tokio::task::JoinSet::new();
    loop {
        while running.len() < AT_ONCE {
            let Some(hash) = queue.pop_front() else { break };
            running.spawn(one(proxy.clone(), hash, pin_until));
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        let outcome = match joined {
            Ok(outcome) => outcome,
            Err(e) => Outcome {
                hash: "?".into(),
                references: vec![],
                bytes: 0,
                failure: Some(Unavailable {
                    path: "?".into(),
                    reason: format!("prefetch task failed: {e}"),
                }),
            },
        };
        let fresh: Vec<String> = outcome
            .references
            .into_iter()
            .filter(|r| *r != outcome.hash && seen.insert(r.clone()))
            .collect();
        tx.send_modify(|p| {
            p.paths_done += 1;
            p.paths_total += fresh.len() as u64;
            p.bytes_done += outcome.bytes;
            p.unavailable.extend(outcome.failure);
        });
        queue.extend(fresh);
    }
    // "Verified" means against the signed NarHash too: the background check of files stored
    // on the strength of their FileHash ends before the prefetch does, instead of competing
    // with the deploy that follows it.
    proxy.store.nar_checks_done().await;
    tx.send_modify(|p| p.done = true);
}

async fn one(proxy: Arc<Proxy>, hash: String, pin_until: Option<u64>) -> Outcome {
    let failed = |path: &str, reason: String| Outcome {
        hash: hash.clone(),
        references: vec![],
        bytes: 0,
        failure: Some(Unavailable {
            path: path.to_string(),
            reason,
        }),
    };
    let (answer, _) = proxy.resolve(&hash).await;
    let text = match answer {
        NarInfoAnswer::Found(text) => text,
        NarInfoAnswer::Missing => return failed(&hash, "not in any upstream's view".into()),
        NarInfoAnswer::Untrusted(reason) | NarInfoAnswer::Unknown(reason) => {
            return failed(&hash, reason)
        }
        NarInfoAnswer::Failed(failure) => return failed(&hash, failure.reason().to_string()),
    };
    let Ok(info) = NarInfo::parse(text.as_bytes()) else {
        return failed(&hash, "its narinfo does not parse".into());
    };
    let name = info
        .store_path
        .rsplit('/')
        .next()
        .unwrap_or(&hash)
        .to_string();
    let references = info
        .references
        .iter()
        .filter_map(|r| r.get(..32).map(str::to_string))
        .collect();
    let bytes = info.file_size.unwrap_or(info.nar_size);
    let stored = match proxy.nar(&info.url, &Method::GET).await {
        NarAnswer::Found(Content::File(..)) => Ok(()),
        NarAnswer::Found(Content::Filling(_, mut reader)) => {
            reader.ended().await;
            proxy
                .store
                .stored(&info.url)
                .map(drop)
                .ok_or_else(|| "its NAR could not be downloaded and verified".to_string())
        }
        NarAnswer::Found(_) => Err("its NAR could not be stored (no room in the cache)".into()),
        NarAnswer::Missing => Err("its NAR is missing upstream".into()),
        NarAnswer::Failed(failure) => Err(failure.reason().to_string()),
    };
    let stored = stored.and_then(|()| match pin_until {
        Some(until) => proxy
            .store
            .pin(std::slice::from_ref(&info.url), until)
            .map_err(|e| e.to_string()),
        None => Ok(()),
    });
    match stored {
        Ok(()) => Outcome {
            hash: hash.clone(),
            references,
            bytes,
            failure: None,
        },
        Err(reason) => Outcome {
            references,
            ..failed(&name, reason)
        },
    }
}

#[cfg(test)]
mod tests {
    use super::hash_of;

    #[test]
    fn paths_hashes_and_basenames() {
        let hash = "0c6kzph7l0dcbfmjap64f0czdafn3b7x";
        assert_eq!(
            hash_of(&format!("/nix/store/{hash}-hello-2.12")).as_deref(),
            Some(hash)
        );
        assert_eq!(hash_of(&format!("{hash}-hello")).as_deref(), Some(hash));
        assert_eq!(hash_of(hash).as_deref(), Some(hash));
        assert_eq!(hash_of("/nix/store/not-a-path"), None);
        assert_eq!(hash_of(&format!("{hash}x")), None);
        assert_eq!(
            hash_of("/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x"),
            None,
            "e is not nix32"
        );
    }
}
