//! RFC 8693 token exchange: trade the source token for an upstream access token.

use super::FetchError;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;

use super::RawToken;
use crate::config::ExchangeConfig;
use crate::http::{snippet, Client};
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
    /// A number, or (some servers) a string of one.
    expires_in: Option<serde_json::Value>,
}

impl Answer {
    fn expires_in(&self) -> Option<Duration> {
        let seconds = match self.expires_in.as_ref()? {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        seconds.map(Duration::from_secs)
    }
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

    pub async fn exchange(
        &self,
        subject: &Secret,
        subject_type: &str,
    ) -> Result<RawToken, FetchError> {
        let body = self.form(subject, subject_type);
        let client_auth = self.client_authentication()?;
        let mut headers = vec![
            ("content-type", "application/x-www-form-urlencoded"),
            ("accept", "application/json"),
        ];
        if let Some(auth) = &client_auth {
            headers.push(("authorization", auth.expose()));
        }
        // Never the query: it may carry a client secret.
        let url = crate::http::display_url(&self.config.url);
        let (status, body) = crate::http::send_small(
            &self.client,
            http::Method::POST,
            self.config.url.as_str(),
            &headers,
            Bytes::from(body),
            TIMEOUT,
        )
        .await
        .map_err(|e| {
            let e = subject.scrub(&e.to_string());
            FetchError::NoToken(match &client_auth {
                Some(auth) => auth.scrub(&e),
                None => e,
            })
        })?;
        if !status.is_success() {
            let detail = match serde_json::from_slice::<ErrorAnswer>(&body) {
                Ok(e) => format!("{}: {}", e.error, e.error_description.unwrap_or_default()),
                Err(_) => snippet(&body),
            };
            return Err(FetchError::NoToken(subject.scrub(&format!(
                "token exchange at {url} refused ({status}): {detail}"
            ))));
        }
        let answer: Answer = serde_json::from_slice(&body).map_err(|_| {
            FetchError::NoToken(format!(
                "token exchange at {url} answered without an access_token"
            ))
        })?;
        if answer.access_token.is_empty() {
            return Err(FetchError::NoToken(format!(
                "token exchange at {url} answered an empty access_token"
            )));
        }
        Ok(RawToken {
            expires_in: answer.expires_in(),
            ..RawToken::new(Secret::new(answer.access_token))
        })
    }

    /// The RFC 8693 request: the subject token, its type (or the configured override), and
    /// what is asked for.
    fn form(&self, subject: &Secret, subject_type: &str) -> String {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.append_pair(
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        )
        .append_pair("subject_token", subject.expose())
        .append_pair(
            "subject_token_type",
            self.config
                .subject_token_type
                .as_deref()
                .unwrap_or(subject_type),
        );
        if let (Some(id), None) = (&self.config.client_id, &self.config.client_secret_file) {
            form.append_pair("client_id", id); // a public client
        }
        if let Some(requested) = &self.config.requested_token_type {
            form.append_pair("requested_token_type", requested);
        }
        if let Some(aud) = &self.config.audience {
            form.append_pair("audience", aud);
        }
        if let Some(scope) = &self.config.scope {
            form.append_pair("scope", scope);
        }
        form.finish()
    }

    /// `Basic base64(urlencode(id):urlencode(secret))` (RFC 6749 2.3.1), the secret read from
    /// its file now, so a rotated secret is used at once.
    fn client_authentication(&self) -> Result<Option<Secret>, FetchError> {
        let (Some(id), Some(path)) = (&self.config.client_id, &self.config.client_secret_file)
        else {
            return Ok(None);
        };
        let secret = std::fs::read_to_string(path).map_err(|e| {
            FetchError::NoToken(format!(
                "exchange client-secret-file {}: {e}",
                path.display()
            ))
        })?;
        let encode =
            |s: &str| -> String { url::form_urlencoded::byte_serialize(s.as_bytes()).collect() };
        let pair = format!("{}:{}", encode(id), encode(secret.trim()));
        Ok(Some(Secret::new(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        ))))
    }
}
