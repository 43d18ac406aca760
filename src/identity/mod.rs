//! Workload identities and the token cache in front of them.
//!
//! An [`Identity`] hands out the token to send upstream. It refreshes ahead of expiry (at 80 %
//! of the lifetime, at least 60 s early, with jitter), lets one refresh run at a time while
//! everyone else keeps using the still-valid token or waits for the new one, keeps the last
//! good token while the provider fails, and backs off. Lifetimes are measured from local
//! receipt time so a skewed clock cannot make a token look fresh for longer than it lives.
//! This module knows nothing about caches or Nix.

mod error;
pub use error::FetchError;
pub mod auto;
pub mod aws;
pub mod azure;
pub mod exchange;
pub mod exec;
pub mod gcp;
pub mod github;
pub mod gitlab;
pub mod jwt;
pub mod netrc;
pub mod sources;
pub mod spiffe;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::IdentityConfig;
use crate::http::Client;
use crate::secret::Secret;
pub use crate::status::IdentityHealth;
use exchange::Exchange;
use sources::Source;

/// What a source (or the exchange) produced, before the cache dates it.
pub struct RawToken {
    pub secret: Secret,
    /// From an exchange answer's `expires_in`; otherwise the JWT's claims decide.
    pub expires_in: Option<Duration>,
    /// Ask the source again after this long even if the token lives longer (token files).
    pub reread_after: Option<Duration>,
    /// Minted for this call (a provider endpoint), rather than read from where it was put
    /// some time ago (a file, an environment variable): see [`jwt_lifetime`].
    pub minted_now: bool,
}

impl RawToken {
    pub fn new(secret: Secret) -> RawToken {
        RawToken {
            secret,
            expires_in: None,
            reread_after: None,
            minted_now: true,
        }
    }

    /// A token that was put where it is read from some time ago.
    pub fn stored(secret: Secret, reread_after: Option<Duration>) -> RawToken {
        RawToken {
            reread_after,
            minted_now: false,
            ..RawToken::new(secret)
        }
    }
}

/// A token as handed to the upstream client.
#[derive(Clone, Debug)]
pub struct Token {
    pub secret: Secret,
    /// Increases with every token this identity obtains; a 401 invalidates only its own.
    pub generation: u64,
    pub claims: jwt::Claims,
    expires_at: Option<Instant>,
    refresh_at: Option<Instant>,
}

impl Token {
    pub fn seconds_left(&self) -> Option<u64> {
        self.expires_at
            .map(|at| at.saturating_duration_since(Instant::now()).as_secs())
    }

    fn is_valid(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|at| now < at)
    }

    fn is_fresh(&self, now: Instant) -> bool {
        self.refresh_at.is_none_or(|at| now < at)
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("identity `{identity}` could not provide a token: {reason}")]
pub struct IdentityError {
    pub identity: String,
    pub reason: String,
}

#[derive(Default)]
struct State {
    current: Option<Token>,
    consecutive_failures: u32,
    retry_at: Option<Instant>,
    last_success: Option<SystemTime>,
    last_failure: Option<(SystemTime, String)>,
}

/// A warning when the token was not made for the configured audience (a Kubernetes
/// service-account token read from the default path carries the API server's audience, not the
/// cache's). Not checked behind an exchange: the exchanged token has the exchange's audience.
pub fn audience_mismatch(config: &IdentityConfig, claims: &jwt::Claims) -> Option<String> {
    let wanted = config.audience.as_deref()?;
    // An Entra ID scope (`api://x/.default`) yields tokens for the resource `api://x`.
    let resource = wanted.strip_suffix("/.default").unwrap_or(wanted);
    if config.exchange.is_some()
        || claims.aud.is_empty()
        || claims.aud.iter().any(|a| a == wanted || a == resource)
    {
        return None;
    }
    Some(format!(
        "identity `{}`: the token's aud is {:?}, which does not contain the configured audience `{wanted}` (for Kubernetes: set `path` to a projected token made for it)",
        config.name, claims.aud
    ))
}

/// Warnings about the token files of `identities`: one that cannot be read now, and one not
/// made for its identity's audience (see [`audience_mismatch`]).
pub fn token_file_warnings<'a>(
    identities: impl IntoIterator<Item = &'a IdentityConfig>,
) -> Vec<String> {
    use crate::config::Provider;
    identities
        .into_iter()
        .filter_map(|identity| {
            let (Provider::File { path, .. } | Provider::Kubernetes { path, .. }) =
                &identity.provider
            else {
                return None;
            };
            let text = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(e) => {
                    return Some(format!(
                        "identity `{}`: cannot read its token file {}: {e} (the daemon starts, and its pulls fail with 503 until the file is there)",
                        identity.name,
                        path.display()
                    ))
                }
            };
            let claims = jwt::claims(text.trim()).ok()?;
            audience_mismatch(identity, &claims)
        })
        .collect()
}

pub struct Identity {
    name: String,
    /// The configuration, for the audience check of the first token.
    config: IdentityConfig,
    source: Source,
    exchange: Option<Exchange>,
    state: Mutex<State>,
    refreshing: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    refreshes: AtomicU64,
    failures: AtomicU64,
}

/// With no valid token left, ask the provider at most this often (a miss answers 503 meanwhile).
const RETRY_WITHOUT_TOKEN: Duration = Duration::from_secs(1);
/// With a valid token in hand, failed refreshes back off from this ...
const RETRY_WITH_TOKEN: Duration = Duration::from_secs(5);
/// ... up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(20);
/// A token with no expiry or re-read schedule (a static one) is looked at again this often.
const IDLE_CHECK: Duration = Duration::from_secs(300);

impl Identity {
    pub fn new(config: &IdentityConfig, client: Client) -> Identity {
        Identity {
            name: config.name.clone(),
            config: config.clone(),
            source: Source::new(config, client.clone()),
            exchange: config.exchange.clone().map(|ex| Exchange::new(ex, client)),
            state: Mutex::new(State::default()),
            refreshing: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            refreshes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The provider; for `auto`, with the source it picked.
    pub fn provider(&self) -> String {
        self.source.describe()
    }

    /// The token to send now. Calls the provider only when the cached token is due for
    /// refresh, and then only once however many callers arrive together.
    pub async fn token(&self) -> Result<Token, IdentityError> {
        if let Some(token) = self.usable_without_refresh(Instant::now(), true) {
            return Ok(token);
        }
        let _one_at_a_time = self.refreshing.lock().await;
        let now = Instant::now();
        if let Some(token) = self.usable_without_refresh(now, false) {
            return Ok(token);
        }
        let backing_off = {
            let state = self.state.lock().unwrap();
            state.retry_at.is_some_and(|at| now < at)
        };
        if backing_off {
            return self.last_good_or_error(now, None);
        }
        let fetched = match tokio::time::timeout(PROVIDER_TIMEOUT, self.fetch()).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::NoToken(format!(
                "no answer within {}s",
                PROVIDER_TIMEOUT.as_secs()
            ))),
        };
        match fetched {
            Ok(raw) => Ok(self.accept(raw, now)),
            Err(reason) => {
                let reason = reason.to_string();
                self.record_failure(now, &reason);
                self.last_good_or_error(now, Some(reason))
            }
        }
    }

    /// Obtains the token now and keeps it fresh on its refresh schedule whether or not
    /// requests come, so health tells the truth before the first request and soon after a
    /// provider (or a token file) goes away. Runs until the runtime ends.
    pub async fn keep_fresh(self: std::sync::Arc<Self>) {
        loop {
            let _ = self.token().await;
            tokio::time::sleep_until(self.next_attempt().into()).await;
        }
    }

    /// When the token is next due: its refresh time, or the retry time after a failure.
    fn next_attempt(&self) -> Instant {
        let state = self.state.lock().unwrap();
        let now = Instant::now();
        let due = match (&state.current, state.retry_at) {
            (_, Some(retry)) if retry > now => retry,
            (Some(token), _) => token.refresh_at.unwrap_or(now + IDLE_CHECK),
            (None, _) => now + RETRY_WITHOUT_TOKEN,
        };
        due.clamp(now + Duration::from_millis(200), now + IDLE_CHECK)
    }

    /// Forgets the token of `generation` after the upstream rejected it, unless a newer one
    /// has already replaced it.
    pub fn invalidate(&self, generation: u64) {
        let mut state = self.state.lock().unwrap();
        if state
            .current
            .as_ref()
            .is_some_and(|t| t.generation == generation)
        {
            tracing::info!(identity = %self.name, "upstream rejected the token; fetching a new one");
            state.current = None;
            state.retry_at = None;
        }
    }

    pub fn health(&self) -> IdentityHealth {
        let state = self.state.lock().unwrap();
        let now = Instant::now();
        let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).ok();
        let valid = state.current.as_ref().is_some_and(|t| t.is_valid(now));
        // Degraded as soon as a refresh fails, even while the last token still works: that
        // is when an operator can act before it expires.
        let last_attempt_failed = state.consecutive_failures > 0;
        IdentityHealth {
            provider: self.source.describe(),
            healthy: (valid && !last_attempt_failed)
                || (state.last_failure.is_none() && state.current.is_none()),
            token_seconds_left: state.current.as_ref().and_then(Token::seconds_left),
            last_success: state.last_success.and_then(unix),
            last_failure: state.last_failure.as_ref().and_then(|(t, _)| unix(*t)),
            last_error: state.last_failure.as_ref().map(|(_, e)| e.clone()),
            refreshes: self.refreshes.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }

    /// A cached token that can be used without calling the provider: fresh, or still valid
    /// while another caller refreshes it (`others_may_refresh`) or the provider backs off.
    fn usable_without_refresh(&self, now: Instant, others_may_refresh: bool) -> Option<Token> {
        let state = self.state.lock().unwrap();
        let token = state.current.as_ref()?;
        if token.is_fresh(now) {
            return Some(token.clone());
        }
        let refresh_running = others_may_refresh && self.refreshing.try_lock().is_err();
        let backing_off = state.retry_at.is_some_and(|at| now < at);
        (token.is_valid(now) && (refresh_running || backing_off)).then(|| token.clone())
    }

    async fn fetch(&self) -> Result<RawToken, FetchError> {
        let raw = self.source.fetch().await?;
        match &self.exchange {
            Some(exchange) => {
                let mut exchanged = exchange
                    .exchange(&raw.secret, self.source.subject_token_type())
                    .await?;
                // The exchanged token is what is sent: it is refreshed on its own lifetime,
                // not on the subject file's re-read interval (which asked the exchange every
                // minute for a token living fifteen). Only when its lifetime is unknown does
                // the source's interval still pace it.
                let lifetime_known = exchanged.expires_in.is_some()
                    || jwt::claims(exchanged.secret.expose()).is_ok_and(|c| c.exp.is_some());
                exchanged.reread_after = if lifetime_known {
                    None
                } else {
                    raw.reread_after
                };
                Ok(exchanged)
            }
            None => Ok(raw),
        }
    }

    fn accept(&self, raw: RawToken, received: Instant) -> Token {
        let claims = jwt::claims(raw.secret.expose()).unwrap_or_default();
        let just_minted = raw.minted_now;
        let now = unix_now();
        let lifetime = raw
            .expires_in
            .or_else(|| jwt_lifetime(&claims, now, just_minted));
        if let Some(skew) = clock_skew(&claims, now).filter(|_| just_minted) {
            tracing::warn!(
                identity = %self.name,
                seconds = skew,
                "this machine's clock differs from the token issuer's (positive: ahead); lifetimes are measured from receipt"
            );
        }
        let refresh_after = lifetime.map(refresh_delay);
        let refresh_after = match (refresh_after, raw.reread_after) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let token = Token {
            secret: raw.secret,
            generation: self.generation.fetch_add(1, Ordering::Relaxed) + 1,
            expires_at: lifetime.map(|l| received + l),
            refresh_at: refresh_after.map(|d| received + d),
            claims,
        };
        tracing::debug!(
            identity = %self.name,
            iss = token.claims.iss.as_deref().unwrap_or("-"),
            sub = token.claims.sub.as_deref().unwrap_or("-"),
            aud = ?token.claims.aud,
            exp = token.claims.exp,
            token = %token.secret.fingerprint(),
            "obtained a token"
        );
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock().unwrap();
        if state.last_success.is_none() {
            if let Some(warning) = audience_mismatch(&self.config, &token.claims) {
                tracing::warn!("{warning}");
            }
        }
        if state.last_success.is_none() || state.consecutive_failures > 0 {
            tracing::info!(
                identity = %self.name,
                sub = token.claims.sub.as_deref().unwrap_or("-"),
                seconds_left = ?token.seconds_left(),
                "obtained a token"
            );
        }
        state.current = Some(token.clone());
        state.consecutive_failures = 0;
        state.retry_at = None;
        state.last_success = Some(SystemTime::now());
        token
    }

    fn record_failure(&self, now: Instant, reason: &str) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock().unwrap();
        state.consecutive_failures += 1;
        let has_valid = state.current.as_ref().is_some_and(|t| t.is_valid(now));
        let delay = if has_valid {
            let exp = state.consecutive_failures.saturating_sub(1).min(6);
            (RETRY_WITH_TOKEN * 2u32.pow(exp)).min(MAX_BACKOFF)
        } else {
            RETRY_WITHOUT_TOKEN
        };
        state.retry_at = Some(now + delay);
        state.last_failure = Some((SystemTime::now(), reason.to_string()));
        tracing::warn!(identity = %self.name, reason, retry_in = ?delay, "token refresh failed");
    }

    fn last_good_or_error(
        &self,
        now: Instant,
        reason: Option<String>,
    ) -> Result<Token, IdentityError> {
        let state = self.state.lock().unwrap();
        if let Some(token) = state.current.as_ref().filter(|t| t.is_valid(now)) {
            return Ok(token.clone());
        }
        let reason = reason
            .or_else(|| state.last_failure.as_ref().map(|(_, e)| e.clone()))
            .unwrap_or_else(|| "no token yet".into());
        Err(IdentityError {
            identity: self.name.clone(),
            reason,
        })
    }
}

/// Seconds since the epoch, signed for arithmetic with JWT times.
pub fn unix_now() -> i64 {
    crate::clock::unix_now() as i64
}

/// How long a JWT has left: `exp - iat`, immune to our clock's skew. A token read from a file
/// (`just_minted` false) may have been issued a while before we read it, so there `exp - now`
/// caps it too; a token a provider minted for this request is as old as the request, and our
/// clock running ahead of the issuer's must not shrink its lifetime (to zero, at worst).
fn jwt_lifetime(claims: &jwt::Claims, now: i64, just_minted: bool) -> Option<Duration> {
    let exp = claims.exp?;
    let by_clock = exp - now;
    let lifetime = match claims.iat {
        Some(iat) if exp > iat && just_minted => exp - iat,
        Some(iat) if exp > iat => (exp - iat).min(by_clock),
        _ => by_clock,
    };
    Some(Duration::from_secs(lifetime.max(0) as u64))
}

/// How far our clock is from the issuer's, judged by a token minted just now, when it is off
/// by more than a minute (it does not change lifetimes, but upstreams that check `nbf`/`exp`
/// against their own clocks see it too).
fn clock_skew(claims: &jwt::Claims, now: i64) -> Option<i64> {
    let skew = now - claims.iat?;
    (skew.abs() > 60).then_some(skew)
}

/// When to refresh a token that lives `lifetime`: at 80 %, at least 60 s before the end, never
/// later than half-way for very short tokens, less a little jitter so a fleet spreads out.
fn refresh_delay(lifetime: Duration) -> Duration {
    let ahead = (lifetime / 5)
        .max(Duration::from_secs(60))
        .min(lifetime / 2);
    let delay = lifetime - ahead;
    let jitter = delay.mul_f64(fastrand::f64() * 0.05);
    delay - jitter
}

#[cfg(test)]
mod tests;
