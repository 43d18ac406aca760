//! Azure managed identity through IMDS: `GET http://169.254.169.254/metadata/identity/oauth2/
//! token?api-version=2018-02-01&resource=...` with `Metadata: true`. The answer's
//! `expires_in` is a string. The host can be overridden with
//! `AZURE_POD_IDENTITY_AUTHORITY_HOST`, as the Azure SDKs allow.

use std::time::Duration;

use http::Method;
use serde::Deserialize;

use super::RawToken;
use crate::http::{fetch_small, snippet, Client};
use crate::secret::Secret;

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Deserialize)]
struct Answer {
    access_token: String,
    #[serde(default, deserialize_with = "number_or_string")]
    expires_in: Option<u64>,
}

fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Number(u64),
        Text(String),
    }
    Ok(match Option::<Either>::deserialize(d)? {
        Some(Either::Number(n)) => Some(n),
        Some(Either::Text(t)) => t.trim().parse().ok(),
        None => None,
    })
}

pub async fn fetch(
    client: &Client,
    resource: &str,
    client_id: Option<&str>,
) -> Result<RawToken, String> {
    let host = std::env::var("AZURE_POD_IDENTITY_AUTHORITY_HOST")
        .unwrap_or_else(|_| "http://169.254.169.254".into());
    let mut url = url::Url::parse(&format!(
        "{}/metadata/identity/oauth2/token",
        host.trim_end_matches('/')
    ))
    .map_err(|e| format!("Azure IMDS URL: {e}"))?;
    url.query_pairs_mut()
        .append_pair("api-version", "2018-02-01")
        .append_pair("resource", resource);
    if let Some(id) = client_id {
        url.query_pairs_mut().append_pair("client_id", id);
    }
    let (status, body) = fetch_small(
        client,
        Method::GET,
        url.as_str(),
        &[("metadata", "true")],
        TIMEOUT,
    )
    .await?;
    if !status.is_success() {
        let hint = if status == http::StatusCode::BAD_REQUEST {
            " (is a managed identity assigned to this VM?)"
        } else {
            ""
        };
        return Err(format!(
            "Azure IMDS answered {status}{hint}: {}",
            snippet(&body)
        ));
    }
    let answer: Answer = serde_json::from_slice(&body)
        .map_err(|_| "Azure IMDS answered without an access_token".to_string())?;
    Ok(RawToken {
        expires_in: answer.expires_in.map(Duration::from_secs),
        ..RawToken::new(Secret::new(answer.access_token))
    })
}
