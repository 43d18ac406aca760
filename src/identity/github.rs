//! GitHub Actions OIDC: `GET $ACTIONS_ID_TOKEN_REQUEST_URL&audience=...` with the job's request
//! token; the answer is `{"value": "<jwt>"}`. Tokens live 5 minutes and can be re-minted for as
//! long as the job runs.

use super::FetchError;
use std::time::Duration;

use http::Method;

use super::RawToken;
use crate::http::{fetch_small, snippet, Client};
use crate::secret::Secret;

const TIMEOUT: Duration = Duration::from_secs(10);

pub async fn fetch(client: &Client, audience: Option<&str>) -> Result<RawToken, FetchError> {
    let url = std::env::var("ACTIONS_ID_TOKEN_REQUEST_URL").map_err(|_| {
        FetchError::NoToken("ACTIONS_ID_TOKEN_REQUEST_URL is not set (does the job have `permissions: id-token: write`?)".to_string())
    })?;
    let request_token = Secret::new(std::env::var("ACTIONS_ID_TOKEN_REQUEST_TOKEN").map_err(
        |_| FetchError::NoToken("ACTIONS_ID_TOKEN_REQUEST_TOKEN is not set".to_string()),
    )?);
    let mut url = url::Url::parse(&url).map_err(|e| {
        FetchError::NoToken(format!("ACTIONS_ID_TOKEN_REQUEST_URL is not a URL: {e}"))
    })?;
    if let Some(audience) = audience {
        url.query_pairs_mut().append_pair("audience", audience);
    }
    let authorization = format!("Bearer {}", request_token.expose());
    let (status, body) = fetch_small(
        client,
        Method::GET,
        url.as_str(),
        &[
            ("authorization", &authorization),
            ("accept", "application/json"),
        ],
        TIMEOUT,
    )
    .await?;
    if !status.is_success() {
        return Err(FetchError::NoToken(request_token.scrub(&format!(
            "GitHub's OIDC endpoint answered {status}: {}",
            snippet(&body)
        ))));
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        value: String,
    }
    let answer: Answer = serde_json::from_slice(&body).map_err(|_| {
        FetchError::NoToken("GitHub's OIDC endpoint answered without a `value`".to_string())
    })?;
    super::jwt::claims(&answer.value)
        .map_err(|e| FetchError::NoToken(format!("GitHub's OIDC endpoint: {e}")))?;
    Ok(RawToken::new(Secret::new(answer.value)))
}
