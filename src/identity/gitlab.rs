//! GitLab CI `id_tokens`: the JWT is handed to the job in an environment variable named in
//! `.gitlab-ci.yml`. There is no endpoint, so it cannot be refreshed: it lives as long as the
//! job's timeout, and nix-sidecar warns loudly well before it runs out.

use super::FetchError;
use super::{jwt, unix_now, RawToken};
use crate::secret::Secret;

/// Warn when less than this is left.
const WARN_BEFORE_SECS: i64 = 600;

pub fn fetch(identity: &str, variable: &str) -> Result<RawToken, FetchError> {
    let value = std::env::var(variable).map_err(|_| {
        FetchError::NoToken(format!("environment variable {variable} is not set (declare it under `id_tokens:` in .gitlab-ci.yml)"))
    })?;
    let value = value.trim();
    let claims = jwt::claims(value).map_err(|e| FetchError::NoToken(format!("{variable}: {e}")))?;
    if let Some(exp) = claims.exp {
        let left = exp - unix_now();
        if left <= 0 {
            return Err(FetchError::NoToken(format!(
                "the GitLab id_token in {variable} expired {}s ago and cannot be refreshed",
                -left
            )));
        }
        if left < WARN_BEFORE_SECS {
            tracing::warn!(
                identity,
                variable,
                seconds_left = left,
                "the GitLab id_token expires soon and cannot be refreshed; raise the job's timeout"
            );
        }
    }
    // Minted at the start of the job, not now.
    Ok(RawToken::stored(Secret::new(value), None))
}
