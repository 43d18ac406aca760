//! RFC 8693 token exchange: trade the source token for an upstream access token.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use serde::Deserialize;

use super::RawToken;
use crate::config::ExchangeConfig;
use crate::http::{read_limited, snippet, Client};
use crate::secret::Secret;

pub const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
const TIMEOUT: Duration = Duration::from_secs(15);

pub struct Exchange {
    config: ExchangeConfig,
    client: Client,
}

#[derive(Deserialize)]
struct Answer {
    access_token: String,
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error: String,
    error_description: Option<String>,
}

impl Exchange {
    pub fn new(config: ExchangeConfig, client: Client) -> Exchange {
        Exchange { config, client }
    }

    pub async fn exchange(&self, subject: &Secret, subject_type: &str) -> Result<RawToken, String> {
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair(
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            )
            .append_pair("subject_token", subject.expose())
            .append_pair("subject_token_type", subject_type);
            if let Some(aud) = &self.config.audience {
                form.append_pair("audience", aud);
            }
            if let Some(scope) = &self.config.scope {
                form.append_pair("scope", scope);
            }
            form.finish()
        };
        let request = hyper::Request::post(self.config.url.as_str())
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("token exchange request: {e}"))?;
        let url = self.config.url.as_str();
        let response = tokio::time::timeout(TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| {
                format!(
                    "token exchange at {url} did not answer within {}s",
                    TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| format!("token exchange at {url} failed: {e}"))?;
        let status = response.status();
        let body = read_limited(response.into_body(), 256 * 1024, TIMEOUT)
            .await
            .map_err(|e| format!("token exchange at {url}: {e}"))?;
        if !status.is_success() {
            let detail = match serde_json::from_slice::<ErrorAnswer>(&body) {
                Ok(e) => format!("{}: {}", e.error, e.error_description.unwrap_or_default()),
                Err(_) => snippet(&body),
            };
            return Err(subject.scrub(&format!(
                "token exchange at {url} refused ({status}): {detail}"
            )));
        }
        let answer: Answer = serde_json::from_slice(&body)
            .map_err(|_| format!("token exchange at {url} answered without an access_token"))?;
        if answer.access_token.is_empty() {
            return Err(format!(
                "token exchange at {url} answered an empty access_token"
            ));
        }
        Ok(RawToken {
            expires_in: answer.expires_in.map(Duration::from_secs),
            ..RawToken::new(Secret::new(answer.access_token))
        })
    }
}
