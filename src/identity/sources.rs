//! Where tokens come from. Each source returns a fresh token or a reason it could not; the
//! cache in `mod.rs` decides when to ask. Sources never see a request path or a cache.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{jwt, RawToken};
use crate::config::Provider;
use crate::secret::Secret;

const MAX_TOKEN_FILE: u64 = 64 * 1024;

pub enum Source {
    Static { variable: String },
    File { path: PathBuf, refresh: Duration },
}

impl Source {
    pub fn new(provider: &Provider) -> Source {
        match provider {
            Provider::Static { variable } => Source::Static {
                variable: variable.clone(),
            },
            Provider::File { path, refresh } => Source::File {
                path: path.clone(),
                refresh: *refresh,
            },
        }
    }

    pub async fn fetch(&self) -> Result<RawToken, String> {
        match self {
            Source::Static { variable } => {
                let value = std::env::var(variable)
                    .map_err(|_| format!("environment variable {variable} is not set"))?;
                let value = value.trim();
                if value.is_empty() {
                    return Err(format!("environment variable {variable} is empty"));
                }
                Ok(RawToken::new(Secret::new(value)))
            }
            Source::File { path, refresh } => {
                let token = read_token_file(path).await?;
                Ok(RawToken {
                    reread_after: Some(*refresh),
                    ..RawToken::new(token)
                })
            }
        }
    }
}

/// Reads a JWT file afresh (kubelet swaps a `..data` symlink, so the path is opened each
/// time and no descriptor is kept) and checks it is a whole, unexpired JWT: writers such
/// as spiffe-helper are not atomic, and a half-written file must not replace a good token.
async fn read_token_file(path: &Path) -> Result<Secret, String> {
    use tokio::io::AsyncReadExt;
    let shown = path.display();
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| format!("cannot open token file {shown}: {e}"))?;
    let mut text = String::new();
    file.take(MAX_TOKEN_FILE + 1)
        .read_to_string(&mut text)
        .await
        .map_err(|e| format!("cannot read token file {shown}: {e}"))?;
    if text.len() as u64 > MAX_TOKEN_FILE {
        return Err(format!(
            "token file {shown} is larger than {MAX_TOKEN_FILE} bytes"
        ));
    }
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("token file {shown} is empty"));
    }
    let claims = jwt::claims(token).map_err(|e| format!("token file {shown}: {e}"))?;
    if let Some(exp) = claims.exp {
        if exp <= super::unix_now() {
            return Err(format!(
                "token file {shown} holds a token that expired at {exp} (unix time)"
            ));
        }
    }
    Ok(Secret::new(token))
}
