//! GCP metadata server identity tokens: `GET http://$GCE_METADATA_HOST/computeMetadata/v1/
//! instance/service-accounts/default/identity?audience=...&format=full` with
//! `Metadata-Flavor: Google`. The answer is the raw JWT. Under GKE workload identity
//! `format=full` has been seen to answer 400, so that is retried without it.

use super::FetchError;
use std::time::Duration;

use http::Method;

use super::RawToken;
use crate::http::{fetch_small, snippet, Client};
use crate::secret::Secret;

const TIMEOUT: Duration = Duration::from_secs(10);

/// `host[:port]` of the metadata server; google-auth reads both variables.
pub fn metadata_host() -> String {
    std::env::var("GCE_METADATA_HOST")
        .or_else(|_| std::env::var("GCE_METADATA_ROOT"))
        .unwrap_or_else(|_| "metadata.google.internal".into())
}

pub async fn fetch(client: &Client, audience: &str) -> Result<RawToken, FetchError> {
    let host = metadata_host();
    let audience: String = url::form_urlencoded::byte_serialize(audience.as_bytes()).collect();
    let base = format!("http://{host}/computeMetadata/v1/instance/service-accounts/default/identity?audience={audience}");
    let headers = [("metadata-flavor", "Google")];
    let (mut status, mut body) = fetch_small(
        client,
        Method::GET,
        &format!("{base}&format=full"),
        &headers,
        TIMEOUT,
    )
    .await?;
    if status == http::StatusCode::BAD_REQUEST {
        (status, body) = fetch_small(client, Method::GET, &base, &headers, TIMEOUT).await?;
    }
    if !status.is_success() {
        let hint = match status.as_u16() {
            404 => " (no service account is attached to this instance)",
            _ => "",
        };
        return Err(FetchError::NoToken(format!(
            "GCP metadata server answered {status}{hint}: {}",
            snippet(&body)
        )));
    }
    let token = String::from_utf8(body.to_vec())
        .map_err(|_| FetchError::NoToken("GCP metadata server answered non-text".to_string()))?;
    let token = token.trim();
    super::jwt::claims(token)
        .map_err(|e| FetchError::NoToken(format!("GCP metadata server: {e}")))?;
    Ok(RawToken::new(Secret::new(token)))
}
