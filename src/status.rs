//! A snapshot of the daemon's state, taken when health or metrics are asked for: the one way
//! the server learns about upstreams, identities and the cache without reaching into them.
//! Plain data, importing nothing of the crate: the components fill it in.

#[derive(Default, Clone)]
pub struct Status {
    pub upstreams: Vec<(String, UpstreamHealth)>,
    pub identities: Vec<(String, IdentityHealth)>,
    pub cache: CacheStatus,
    /// The upload queue, when some upstream takes pushes.
    pub push: Option<PushStatus>,
}

/// The upload queue: `push` in `/_sidecar/health`, `push_*` metrics.
#[derive(Default, Clone, serde::Serialize)]
pub struct PushStatus {
    /// Paths waiting or being uploaded (one per upstream they go to).
    pub queued: u64,
    pub uploading: u64,
    /// Since the daemon started.
    pub uploaded: u64,
    pub failures: u64,
    pub bytes: u64,
    /// Paths that failed for good, until they are pushed again.
    pub failed: Vec<FailedPush>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FailedPush {
    pub path: String,
    pub upstream: String,
    pub reason: String,
}

#[derive(Default, Clone, Copy)]
pub struct CacheStatus {
    pub stored_bytes: u64,
    pub max_bytes: u64,
    pub min_free_bytes: u64,
    /// Free space on the cache's disk, when it can be read.
    pub free_disk_bytes: Option<u64>,
    /// Since when (unix seconds) downloads have been served without caching for want of room
    /// (max-cache-size or min-free-space); `None` while the cache takes files.
    pub uncached_since: Option<u64>,
    /// Times the cache had no room for a download or an upload, since start.
    pub no_room: u64,
    pub evictions: u64,
    pub verification_failures: u64,
}

impl Status {
    /// Healthy when every identity and every upstream is, and no push has failed for good.
    pub fn healthy(&self) -> bool {
        self.identities.iter().all(|(_, h)| h.healthy)
            && self.upstreams.iter().all(|(_, h)| h.healthy)
            && self.push.as_ref().is_none_or(|p| p.failed.is_empty())
    }
}

/// One upstream's line of `/_sidecar/health`.
#[derive(Default, Clone, serde::Serialize)]
pub struct UpstreamHealth {
    pub healthy: bool,
    pub last_success: Option<u64>,
    pub last_failure: Option<u64>,
    pub last_error: Option<String>,
    /// Its site (`site = ...`): whether the last request got a cache's answer there. A site
    /// down costs speed, not substitutions: it does not make the machine unhealthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<SiteHealth>,
    /// Requests made to push here (once there was one). A failed push is retried by the queue
    /// and reported under `push` too; it does not make the machine unhealthy for pulls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pushes: Option<Outcomes>,
}

/// When requests last succeeded and failed, and why the last failure.
#[derive(Default, Clone, serde::Serialize)]
pub struct Outcomes {
    pub last_success: Option<u64>,
    pub last_failure: Option<u64>,
    pub last_error: Option<String>,
}

#[derive(Clone, serde::Serialize)]
pub struct SiteHealth {
    pub url: String,
    pub answering: bool,
}

/// One identity's line of `/_sidecar/health`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IdentityHealth {
    /// The provider; for `auto`, with the source it picked (`auto: gcp`).
    pub provider: String,
    pub healthy: bool,
    pub token_seconds_left: Option<u64>,
    pub last_success: Option<u64>,
    pub last_failure: Option<u64>,
    pub last_error: Option<String>,
    pub refreshes: u64,
    pub failures: u64,
}
