//! Where tokens come from. Each source returns a fresh token or a reason it could not; the
//! cache in `mod.rs` decides when to ask. Sources never see a request path or a cache.

use super::FetchError;
use std::path::Path;

use super::aws::{self, Aws};
use super::{auto, azure, exec, gcp, github, gitlab, jwt, netrc, spiffe, RawToken};
use crate::config::{IdentityConfig, Provider};
use crate::http::Client;
use crate::secret::Secret;

const MAX_TOKEN_FILE: u64 = 64 * 1024;

pub struct Source {
    identity: String,
    provider: Provider,
    audience: Option<String>,
    client: Client,
    aws: Option<Aws>,
    /// For `auto`: the source it picked, once it has.
    chosen: tokio::sync::OnceCell<Box<Source>>,
}

impl Source {
    pub fn new(config: &IdentityConfig, client: Client) -> Source {
        let aws = match &config.provider {
            Provider::Aws { region } => Some(Aws::new(
                region,
                config.audience.as_deref().unwrap_or_default(),
            )),
            _ => None,
        };
        Source {
            identity: config.name.clone(),
            provider: config.provider.clone(),
            audience: config.audience.clone(),
            client,
            aws,
            chosen: tokio::sync::OnceCell::new(),
        }
    }

    /// The provider's name; for `auto`, with the one it picked.
    pub fn describe(&self) -> String {
        match self.chosen.get() {
            Some(chosen) => format!("auto: {}", chosen.describe()),
            None => self.provider.name().to_string(),
        }
    }

    /// What an RFC 8693 exchange should call this source's tokens.
    pub fn subject_token_type(&self) -> &'static str {
        if let Some(chosen) = self.chosen.get() {
            return chosen.subject_token_type();
        }
        match self.provider {
            Provider::Aws { .. } => aws::SUBJECT_TOKEN_TYPE,
            _ => super::exchange::JWT_TOKEN_TYPE,
        }
    }

    pub async fn fetch(&self) -> Result<RawToken, FetchError> {
        let audience = self.audience.as_deref();
        match &self.provider {
            Provider::Static { variable } => {
                let value = std::env::var(variable).map_err(|_| {
                    FetchError::NoToken(format!("environment variable {variable} is not set"))
                })?;
                let value = value.trim();
                if value.is_empty() {
                    return Err(FetchError::NoToken(format!(
                        "environment variable {variable} is empty"
                    )));
                }
                Ok(RawToken::stored(Secret::new(value), None))
            }
            Provider::File { path, refresh } | Provider::Kubernetes { path, refresh } => Ok(
                RawToken::stored(read_token_file(path).await?, Some(*refresh)),
            ),
            Provider::GithubActions {} => github::fetch(&self.client, audience).await,
            Provider::Gitlab { variable } => gitlab::fetch(&self.identity, variable),
            Provider::Gcp {} => gcp::fetch(&self.client, audience.unwrap_or_default()).await,
            Provider::Azure(keys) => {
                let select = keys.select();
                azure::fetch(&self.client, audience.unwrap_or_default(), select.as_ref()).await
            }
            Provider::Spiffe { socket } => {
                spiffe::fetch(socket.as_deref(), audience.unwrap_or_default()).await
            }
            Provider::Auto(keys) => {
                let chosen = match self.chosen.get() {
                    Some(chosen) => chosen,
                    None => {
                        let provider =
                            auto::detect(keys, audience.unwrap_or_default(), &self.client).await?;
                        tracing::info!(identity = %self.identity, provider = %provider.name(), "provider `auto` chose its source");
                        let config = IdentityConfig {
                            name: self.identity.clone(),
                            provider,
                            audience: self.audience.clone(),
                            exchange: None,
                        };
                        let source = Box::new(Source::new(&config, self.client.clone()));
                        self.chosen.get_or_init(|| async { source }).await
                    }
                };
                Box::pin(chosen.fetch()).await
            }
            Provider::Aws { .. } => {
                self.aws
                    .as_ref()
                    .expect("made in new")
                    .fetch(&self.client)
                    .await
            }
            Provider::Exec { command } => exec::fetch(&self.identity, command).await,
            Provider::Netrc {
                path,
                machine,
                refresh,
            } => Ok(RawToken::stored(
                netrc::fetch(path, machine).await?,
                Some(*refresh),
            )),
        }
    }
}

/// Reads a JWT file afresh (kubelet swaps a `..data` symlink, so the path is opened each
/// time and no descriptor is kept) and checks it is a whole, unexpired JWT: writers such
/// as spiffe-helper are not atomic, and a half-written file must not replace a good token.
async fn read_token_file(path: &Path) -> Result<Secret, FetchError> {
    use tokio::io::AsyncReadExt;
    let shown = path.display();
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| FetchError::NoToken(format!("cannot open token file {shown}: {e}")))?;
    let mut text = String::new();
    file.take(MAX_TOKEN_FILE + 1)
        .read_to_string(&mut text)
        .await
        .map_err(|e| FetchError::NoToken(format!("cannot read token file {shown}: {e}")))?;
    if text.len() as u64 > MAX_TOKEN_FILE {
        return Err(FetchError::NoToken(format!(
            "token file {shown} is larger than {MAX_TOKEN_FILE} bytes"
        )));
    }
    let token = text.trim();
    if token.is_empty() {
        return Err(FetchError::NoToken(format!("token file {shown} is empty")));
    }
    let claims =
        jwt::claims(token).map_err(|e| FetchError::NoToken(format!("token file {shown}: {e}")))?;
    if let Some(exp) = claims.exp {
        if exp <= super::unix_now() {
            return Err(FetchError::NoToken(format!(
                "token file {shown} holds a token that expired at {exp} (unix time)"
            )));
        }
    }
    Ok(Secret::new(token))
}
