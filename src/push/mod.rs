//! Push: paths built here go up to the upstreams that take uploads (`push = ...`), through a
//! queue on disk. Ways in: `nix copy --to` the listener ([`incoming`]), and
//! `nix-sidecar push` / `POST /_sidecar/push`, which read the local Nix store ([`local`]).
//!
//! The runner uploads references before referrers, a few at a time; asks each upstream which
//! paths it lacks before sending (one call per batch), so a path that is already there, or
//! that an upload cut short by a crash did deliver, is not sent again; retries what can be
//! retried with backoff; and records what failed for good, with the reason, for `push
//! --wait`, health and metrics.

mod error;
pub mod incoming;
pub mod info;
pub mod local;
pub mod nar;
mod plan;
pub mod queue;
mod staging;
pub mod target;

pub use error::{NotAllowed, PathInfoError, QueueError, Refusal};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use crate::status::{FailedPush, PushStatus};
use crate::store::Store;
use info::PathInfo;
use queue::{Entry, Origin, Queue};
use target::{PushError, Target};

/// Uploads (or missing-path checks) in flight at once, over all upstreams.
const AT_ONCE: usize = 4;
/// Attempts at one path before it fails for good; the waits between them double from
/// `FIRST_BACKOFF` up to `MAX_BACKOFF` (about four minutes in all).
const MAX_ATTEMPTS: u32 = 8;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Which pushed narinfos local Nix is served: those a pull would serve (`require-signatures`).
/// With `push-signing-key-file`, paths no trusted key signed are signed first.
#[derive(Clone, Default)]
pub struct LocalTrust {
    pub keys: crate::nix::narinfo::TrustedKeys,
    pub required: bool,
    pub signer: Option<Arc<crate::nix::signing::SigningKey>>,
}

impl LocalTrust {
    pub fn serves(&self, info: &crate::nix::narinfo::NarInfo) -> bool {
        !self.required || self.keys.verify(info)
    }

    /// `info` with this machine's signature added, when no trusted key signed it.
    fn signed(&self, mut info: PathInfo) -> PathInfo {
        if let Some(signer) = &self.signer {
            let fingerprint = info.fingerprint();
            if !self.keys.verify_signatures(&fingerprint, &info.sigs) {
                info.sigs.push(signer.sign(&fingerprint));
            }
        }
        info
    }
}

pub struct Pusher {
    targets: Vec<Arc<Target>>,
    queue: Arc<Queue>,
    /// Files Nix uploaded, kept until every upstream has them.
    staging: PathBuf,
    store: Store,
    /// The cache partition pushed narinfos are recorded under (the first push upstream's),
    /// so local pulls find them.
    partition: String,
    trust: LocalTrust,
    /// Staged files and the room each holds in the cache's budget.
    staged: Mutex<HashMap<String, crate::store::Held>>,
    /// Staged files a narinfo PUT is checking and queueing now (how many such PUTs): kept
    /// even if no queued path needs them yet.
    claimed: Mutex<HashMap<String, usize>>,
    state: Mutex<State>,
    /// Bumped on every change of the queue: the runner and waiters look again.
    changed: watch::Sender<u64>,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    uploaded: AtomicU64,
    failures: AtomicU64,
    bytes: AtomicU64,
}

#[derive(Default)]
struct State {
    /// The queue as on disk, by key, with what the runner knows about each.
    live: BTreeMap<String, Live>,
    /// What became of paths that left the queue (for waiters), by key.
    outcomes: HashMap<String, Outcome>,
}

struct Live {
    entry: Entry,
    attempts: u32,
    not_before: Instant,
    /// The upstream said it lacks the path (since this start).
    checked: bool,
    running: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Uploaded,
    AlreadyThere,
    /// Signed by one of the upstream's `push-skip-keys`.
    Skipped,
}

/// What `push --wait` prints.
#[derive(Debug, Default, Clone, Serialize, serde::Deserialize)]
pub struct Summary {
    pub uploaded: u64,
    pub already_there: u64,
    pub skipped: u64,
    pub failed: Vec<FailedPush>,
}

impl Pusher {
    pub fn open(
        targets: Vec<Arc<Target>>,
        store: Store,
        partition: String,
        trust: LocalTrust,
    ) -> Result<Arc<Pusher>, QueueError> {
        let dir = store.dir().join("push");
        crate::store::private_dir(&dir)?;
        let queue = Queue::open(&store.dir().join("push.redb"))?;
        let names: HashSet<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        let mut live = BTreeMap::new();
        for entry in queue.all()? {
            if !names.contains(entry.upstream.as_str()) {
                tracing::warn!(upstream = %entry.upstream, path = %entry.info.store_path, "queued for an upstream that no longer takes pushes; left in the queue");
                continue;
            }
            live.insert(entry.key(), Live::new(entry));
        }
        let pusher = Pusher {
            targets,
            queue: Arc::new(queue),
            staging: dir,
            store,
            partition,
            trust,
            staged: Mutex::default(),
            claimed: Mutex::default(),
            state: Mutex::new(State {
                live,
                outcomes: HashMap::new(),
            }),
            changed: watch::channel(0).0,
            counters: Counters::default(),
        };
        pusher.remove_stray_files();
        pusher.hold_staged_files();
        let waiting = pusher.state.lock().unwrap().live.len();
        if waiting > 0 {
            tracing::info!(paths = waiting, "push queue resumed");
        }
        Ok(Arc::new(pusher))
    }

    /// The upstreams a peer with `uid` may push to; `Err` says why none.
    pub fn targets_for(&self, uid: Option<u32>) -> Result<Vec<Arc<Target>>, NotAllowed> {
        let allowed: Vec<Arc<Target>> = self
            .targets
            .iter()
            .filter(|t| uid.is_some_and(|uid| t.config.uids.contains(&uid)))
            .cloned()
            .collect();
        if allowed.is_empty() {
            return Err(match uid {
                Some(uid) => NotAllowed::Uid(uid),
                None => NotAllowed::Unknown,
            });
        }
        Ok(allowed)
    }

    /// Queues `paths` for `targets` durably; the keys to wait for.
    pub async fn enqueue(
        &self,
        targets: &[Arc<Target>],
        paths: Vec<(PathInfo, Origin)>,
    ) -> Result<Vec<String>, QueueError> {
        let mut entries = Vec::new();
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        let paths: Vec<(PathInfo, Origin)> = paths
            .into_iter()
            .map(|(info, origin)| (self.trust.signed(info), origin))
            .collect();
        for target in targets {
            for (info, origin) in &paths {
                let key = queue::key(&target.name, info.hash());
                keys.push(key.clone());
                if let Some(by) = info.signed_by(&target.config.skip_keys) {
                    tracing::debug!(path = %info.store_path, upstream = %target.name, key = by, "signed by a push-skip-key: not uploaded");
                    skipped.push(key);
                    continue;
                }
                entries.push(Entry {
                    seq: 0,
                    upstream: target.name.clone(),
                    info: info.clone(),
                    origin: origin.clone(),
                    failed: None,
                });
            }
        }
        let queue = self.queue.clone();
        let queued = tokio::task::spawn_blocking(move || queue.add(entries))
            .await
            .map_err(|e| QueueError::Task(e.to_string()))??;
        {
            let mut state = self.state.lock().unwrap();
            for key in skipped {
                state.outcomes.insert(key, Outcome::Skipped);
            }
            for entry in queued {
                let key = entry.key();
                state.outcomes.remove(&key);
                match state.live.get_mut(&key) {
                    Some(live) if live.entry.failed.is_some() => *live = Live::new(entry),
                    Some(_) => {}
                    None => {
                        state.live.insert(key, Live::new(entry));
                    }
                }
            }
        }
        self.changed.send_modify(|n| *n += 1);
        Ok(keys)
    }

    /// Waits until none of `keys` (every queued path, when `None`) is still waiting or
    /// being uploaded; what became of them.
    pub async fn wait(&self, keys: Option<Vec<String>>) -> Summary {
        let mut changed = self.changed.subscribe();
        let keys =
            keys.unwrap_or_else(|| self.state.lock().unwrap().live.keys().cloned().collect());
        loop {
            changed.borrow_and_update();
            {
                let state = self.state.lock().unwrap();
                let pending = keys
                    .iter()
                    .any(|k| state.live.get(k).is_some_and(|l| l.entry.failed.is_none()));
                if !pending {
                    let mut summary = Summary::default();
                    for key in &keys {
                        match (state.live.get(key), state.outcomes.get(key)) {
                            (Some(live), _) => summary.failed.push(failed_push(&live.entry)),
                            (None, Some(Outcome::Uploaded)) => summary.uploaded += 1,
                            (None, Some(Outcome::AlreadyThere)) => summary.already_there += 1,
                            (None, Some(Outcome::Skipped)) => summary.skipped += 1,
                            // Done before this process started.
                            (None, None) => summary.already_there += 1,
                        }
                    }
                    return summary;
                }
            }
            if changed.changed().await.is_err() {
                return Summary::default();
            }
        }
    }

    pub fn status(&self) -> PushStatus {
        let state = self.state.lock().unwrap();
        PushStatus {
            queued: state
                .live
                .values()
                .filter(|l| l.entry.failed.is_none())
                .count() as u64,
            uploading: state.live.values().filter(|l| l.running).count() as u64,
            uploaded: self.counters.uploaded.load(Ordering::Relaxed),
            failures: self.counters.failures.load(Ordering::Relaxed),
            bytes: self.counters.bytes.load(Ordering::Relaxed),
            failed: state
                .live
                .values()
                .filter(|l| l.entry.failed.is_some())
                .map(|l| failed_push(&l.entry))
                .collect(),
        }
    }

    /// Uploads until `stop` resolves. Uploads in flight then are abandoned: their paths are
    /// still queued on disk, and the next start finds out whether they arrived.
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let mut changed = self.changed.subscribe();
        let mut running = tokio::task::JoinSet::new();
        let mut sweep = tokio::time::interval(staging::ORPHAN_AFTER / 10);
        tokio::pin!(stop);
        loop {
            let plan::Plan {
                checks,
                uploads,
                wake,
            } = self.plan(AT_ONCE.saturating_sub(running.len()));
            for (target, keys) in checks {
                running.spawn(self.clone().check(target, keys));
            }
            for (target, key) in uploads {
                running.spawn(self.clone().upload(target, key));
            }
            let sleep = tokio::time::sleep_until(wake.into());
            tokio::select! {
                _ = &mut stop => break,
                Some(_) = running.join_next(), if !running.is_empty() => {}
                _ = changed.changed() => {}
                _ = sweep.tick() => self.remove_orphans(),
                _ = sleep => {}
            }
        }
        let left = self.status();
        if left.queued > 0 {
            tracing::info!(
                queued = left.queued,
                "push queue kept on disk; uploads resume at the next start"
            );
        }
        running.shutdown().await;
    }

    async fn check(self: Arc<Self>, target: Arc<Target>, keys: Vec<String>) {
        let infos: Vec<PathInfo> = {
            let state = self.state.lock().unwrap();
            keys.iter()
                .filter_map(|k| state.live.get(k).map(|l| l.entry.info.clone()))
                .collect()
        };
        let refs: Vec<&PathInfo> = infos.iter().collect();
        match target.missing(&refs).await {
            Ok(missing) => {
                for (key, info) in keys.iter().zip(&infos) {
                    if missing.contains(info.hash()) {
                        if let Some(live) = self.state.lock().unwrap().live.get_mut(key) {
                            live.checked = true;
                            live.running = false;
                        }
                    } else {
                        self.done(key, Outcome::AlreadyThere, 0);
                    }
                }
                self.changed.send_modify(|n| *n += 1);
            }
            Err(error) => {
                for key in &keys {
                    self.attempt_failed(key, &error);
                }
            }
        }
    }

    async fn upload(self: Arc<Self>, target: Arc<Target>, key: String) {
        let Some(entry) = self
            .state
            .lock()
            .unwrap()
            .live
            .get(&key)
            .map(|l| l.entry.clone())
        else {
            return;
        };
        let started = Instant::now();
        match target.upload(&entry, &self.staging).await {
            Ok(bytes) => {
                tracing::info!(path = %entry.info.store_path, upstream = %target.name, bytes, seconds = started.elapsed().as_secs_f32(), "uploaded");
                self.done(&key, Outcome::Uploaded, bytes);
            }
            Err(error) => self.attempt_failed(&key, &error),
        }
    }

    fn done(&self, key: &str, outcome: Outcome, bytes: u64) {
        if let Err(e) = self.queue.remove(key) {
            tracing::warn!(error = %e, "could not remove an uploaded path from the queue");
        }
        if outcome == Outcome::Uploaded {
            self.counters.uploaded.fetch_add(1, Ordering::Relaxed);
            self.counters.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        let file = {
            let mut state = self.state.lock().unwrap();
            let gone = state.live.remove(key);
            state.outcomes.insert(key.to_string(), outcome);
            // A file Nix uploaded is kept while another upstream still needs it.
            gone.and_then(|l| match l.entry.origin {
                Origin::Staged { file, .. } => Some(file),
                Origin::Store => None,
            })
            .filter(|file| {
                !state
                    .live
                    .values()
                    .any(|l| staged_file(&l.entry) == Some(file))
            })
        };
        if let Some(file) = file.filter(|f| !self.claimed.lock().unwrap().contains_key(f)) {
            self.unstage(&file);
        }
        self.changed.send_modify(|n| *n += 1);
    }

    fn attempt_failed(&self, key: &str, error: &PushError) {
        self.counters.failures.fetch_add(1, Ordering::Relaxed);
        let reason = match error {
            PushError::Fatal(reason) => {
                return self.fail_for_good(key, reason);
            }
            PushError::Retry(reason) => reason,
        };
        let mut state = self.state.lock().unwrap();
        let Some(live) = state.live.get_mut(key) else {
            return;
        };
        live.attempts += 1;
        live.running = false;
        if live.attempts >= MAX_ATTEMPTS {
            drop(state);
            return self.fail_for_good(key, &format!("{reason} (after {MAX_ATTEMPTS} attempts)"));
        }
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << (live.attempts - 1).min(16))
            .min(MAX_BACKOFF);
        let jitter = backoff.mul_f64(fastrand::f64() * 0.2);
        live.not_before = Instant::now() + backoff + jitter;
        tracing::warn!(path = %live.entry.info.store_path, upstream = %live.entry.upstream, %reason, retry_in = ?(backoff + jitter), "upload failed; will retry");
        drop(state);
        self.changed.send_modify(|n| *n += 1);
    }

    fn fail_for_good(&self, key: &str, reason: &str) {
        let mut state = self.state.lock().unwrap();
        let Some(live) = state.live.get_mut(key) else {
            return;
        };
        tracing::error!(path = %live.entry.info.store_path, upstream = %live.entry.upstream, %reason, "upload failed for good");
        live.entry.failed = Some(reason.to_string());
        live.running = false;
        let entry = live.entry.clone();
        drop(state);
        if let Err(e) = self.queue.fail(&entry, reason) {
            tracing::warn!(error = %e, "could not record a failed push");
        }
        self.changed.send_modify(|n| *n += 1);
    }
}

impl Live {
    fn new(entry: Entry) -> Live {
        Live {
            entry,
            attempts: 0,
            not_before: Instant::now(),
            checked: false,
            running: false,
        }
    }
}

fn staged_file(entry: &Entry) -> Option<&String> {
    match &entry.origin {
        Origin::Staged { file, .. } => Some(file),
        Origin::Store => None,
    }
}

fn failed_push(entry: &Entry) -> FailedPush {
    FailedPush {
        path: entry.info.store_path.clone(),
        upstream: entry.upstream.clone(),
        reason: entry.failed.clone().unwrap_or_default(),
    }
}
