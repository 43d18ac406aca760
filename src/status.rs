//! A snapshot of the daemon's state, taken when health or metrics are asked for: the one way
//! the server learns about upstreams, identities and the cache without reaching into them.
//! Plain data, importing nothing of the crate: the components fill it in.

#[derive(Default, Clone)]
pub struct Status {
    pub upstreams: Vec<(String, UpstreamHealth)>,
    pub identities: Vec<(String, IdentityHealth)>,
    pub cache: CacheStatus,
}

#[derive(Default, Clone, Copy)]
pub struct CacheStatus {
    pub stored_bytes: u64,
    pub evictions: u64,
    pub verification_failures: u64,
}

impl Status {
    /// Healthy when every identity and every upstream is.
    pub fn healthy(&self) -> bool {
        self.identities.iter().all(|(_, h)| h.healthy)
            && self.upstreams.iter().all(|(_, h)| h.healthy)
    }
}

/// One upstream's line of `/_sidecar/health`.
#[derive(Default, Clone, serde::Serialize)]
pub struct UpstreamHealth {
    pub healthy: bool,
    pub last_success: Option<u64>,
    pub last_failure: Option<u64>,
    pub last_error: Option<String>,
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
