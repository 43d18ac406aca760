//! A snapshot of the daemon's state, taken when health or metrics are asked for: the one way
//! the server learns about upstreams, identities and the cache without reaching into them.

use crate::identity::IdentityHealth;
use crate::upstream::UpstreamHealth;

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
