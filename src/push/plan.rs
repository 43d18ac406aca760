//! What the runner starts next: missing-path checks by upstream, uploads whose references are
//! all up, and the paths that can never go (a reference failed, or a cycle).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::queue::{self};
use super::target::{self, Target};
use super::{Live, Pusher};

/// What to start now, and when to look again at the latest.
pub(super) struct Plan {
    /// Missing-path checks, a batch per upstream.
    pub checks: Vec<(Arc<Target>, Vec<String>)>,
    pub uploads: Vec<(Arc<Target>, String)>,
    pub wake: Instant,
}

/// Whether a checked path may be uploaded now.
enum Readiness {
    Ready,
    /// A reference is still queued.
    Waiting,
    /// A reference failed for good: this path never can go.
    Doomed(String),
}

impl Pusher {
    /// What to start now with `slots` free: missing-path checks (by upstream) and uploads
    /// whose references are all up, oldest first; paths that can never go are failed.
    pub(super) fn plan(&self, mut slots: usize) -> Plan {
        let now = Instant::now();
        let mut wake = now + Duration::from_secs(3600);
        let mut state = self.state.lock().unwrap();
        let mut order: Vec<(u64, String)> = state
            .live
            .iter()
            .map(|(k, l)| (l.entry.seq, k.clone()))
            .collect();
        order.sort();
        let mut checks: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut checking: HashSet<String> = state
            .live
            .values()
            .filter(|l| l.running && !l.checked)
            .map(|l| l.entry.upstream.clone())
            .collect();
        let mut uploads = Vec::new();
        let mut doomed = Vec::new();
        for (_, key) in order {
            let live = &state.live[&key];
            if live.running || live.entry.failed.is_some() {
                continue;
            }
            if live.not_before > now {
                wake = wake.min(live.not_before);
                continue;
            }
            let upstream = live.entry.upstream.clone();
            if !live.checked {
                // One check per upstream at a time, of up to a batch of paths.
                match checks.get_mut(&upstream) {
                    Some(batch) if batch.len() < target::MISSING_BATCH => batch.push(key),
                    Some(_) => {}
                    None if !checking.contains(&upstream) && slots > 0 => {
                        slots -= 1;
                        checking.insert(upstream.clone());
                        checks.insert(upstream, vec![key]);
                    }
                    None => {}
                }
                continue;
            }
            match readiness(&state.live, &key, live) {
                Readiness::Ready if slots > 0 => {
                    slots -= 1;
                    uploads.push(key);
                }
                Readiness::Doomed(reason) => doomed.push((key, reason)),
                Readiness::Ready | Readiness::Waiting => {}
            }
        }
        for key in checks.values().flatten().chain(&uploads) {
            state.live.get_mut(key).expect("planned").running = true;
        }
        // Nothing can move while every waiting path waits for another: a reference cycle
        // between distinct paths (which no valid store has) would hold them for ever.
        if uploads.is_empty() && checks.is_empty() && !state.live.values().any(|l| l.running) {
            for key in in_cycles(&state.live) {
                doomed.push((
                    key,
                    "its references form a cycle with other queued paths (invalid in a Nix store)"
                        .into(),
                ));
            }
        }
        drop(state);
        for (key, reason) in doomed {
            self.fail_for_good(&key, &reason);
        }
        self.with_targets(checks, uploads, wake)
    }

    /// The plan, each check and upload with the target it goes to.
    fn with_targets(
        &self,
        checks: BTreeMap<String, Vec<String>>,
        uploads: Vec<String>,
        wake: Instant,
    ) -> Plan {
        let checks = checks
            .into_iter()
            .map(|(upstream, keys)| (self.target(&upstream), keys))
            .collect();
        let uploads = uploads
            .into_iter()
            .map(|key| {
                let upstream = key.split('\t').next().unwrap_or_default();
                (self.target(upstream), key)
            })
            .collect();
        Plan {
            checks,
            uploads,
            wake,
        }
    }

    fn target(&self, name: &str) -> Arc<Target> {
        self.targets
            .iter()
            .find(|t| t.name == name)
            .cloned()
            .expect("entries of unknown upstreams are not live")
    }
}

/// Whether the checked path `key` may go: each of its references (itself aside) must be up
/// already, that is no longer queued.
fn readiness(all: &BTreeMap<String, Live>, key: &str, live: &Live) -> Readiness {
    for reference in &live.entry.info.references {
        let ref_key = queue::key(&live.entry.upstream, &reference[..32.min(reference.len())]);
        if ref_key == key {
            continue;
        }
        match all.get(&ref_key) {
            Some(r) if r.entry.failed.is_some() => {
                return Readiness::Doomed(format!(
                    "its reference {reference} could not be uploaded"
                ))
            }
            Some(_) => return Readiness::Waiting,
            None => {}
        }
    }
    Readiness::Ready
}

/// The waiting paths that can never be uploaded because they wait for one another: what is
/// left of the graph "waits for" once every path that waits for nothing, and every path that
/// nothing waits for, is peeled off again and again.
pub(super) fn in_cycles(live: &BTreeMap<String, Live>) -> Vec<String> {
    let waiting = |l: &Live| l.entry.failed.is_none();
    let mut waits_for: HashMap<&str, HashSet<String>> = live
        .iter()
        .filter(|(_, l)| waiting(l))
        .map(|(key, l)| {
            let refs = l
                .entry
                .info
                .references
                .iter()
                .map(|r| queue::key(&l.entry.upstream, &r[..32.min(r.len())]))
                .filter(|r| r != key && live.get(r).is_some_and(waiting))
                .collect();
            (key.as_str(), refs)
        })
        .collect();
    loop {
        let needed: HashSet<String> = waits_for.values().flatten().cloned().collect();
        let before = waits_for.len();
        let kept: HashSet<String> = waits_for
            .iter()
            .filter(|(key, refs)| {
                !refs.iter().all(|r| !waits_for.contains_key(r.as_str())) && needed.contains(**key)
            })
            .map(|(key, _)| key.to_string())
            .collect();
        waits_for.retain(|key, _| kept.contains(*key));
        if waits_for.len() == before {
            return waits_for.into_keys().map(str::to_string).collect();
        }
    }
}
