//! `exec`: runs a command that prints a token, or JSON `{"token"|"access_token"|"id_token",
//! "expires_in"}`. Its stderr goes to the log line by line once the command is done, with
//! anything it printed on stdout (the secret) scrubbed from it; its stdout never does.

use super::FetchError;
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};

use super::RawToken;
use crate::secret::Secret;

const TIMEOUT: Duration = Duration::from_secs(30);
const MAX_OUTPUT: u64 = 64 * 1024;
const MAX_STDERR_LINES: usize = 50;

/// `line` without what the helper printed, nor any string inside it if it printed JSON (a
/// token, or an AWS `credential_process`'s keys).
fn scrub_token(printed: &Secret, line: &str) -> String {
    let mut line = printed.scrub(line);
    if let Ok(serde_json::Value::Object(fields)) = serde_json::from_str(printed.expose()) {
        for value in fields.values() {
            if let Some(text) = value.as_str().filter(|t| t.len() >= 8) {
                line = Secret::new(text).scrub(&line);
            }
        }
    }
    line
}

#[derive(Deserialize)]
struct JsonToken {
    #[serde(alias = "access_token", alias = "id_token")]
    token: String,
    expires_in: Option<u64>,
}

pub async fn fetch(identity: &str, command: &[String]) -> Result<RawToken, FetchError> {
    let shown = command.first().cloned().unwrap_or_default();
    let printed = run(identity, command).await?;
    let text = printed.expose();
    if text.starts_with('{') {
        let json: JsonToken = serde_json::from_str(text).map_err(|_| {
            FetchError::NoToken(format!("`{shown}` printed JSON without a token field"))
        })?;
        return Ok(RawToken {
            expires_in: json.expires_in.map(Duration::from_secs),
            ..RawToken::new(Secret::new(json.token))
        });
    }
    Ok(RawToken::new(printed))
}

/// Runs a helper that prints a secret: its trimmed, non-empty stdout. Its stderr is logged
/// (scrubbed) once it is done.
pub async fn run(identity: &str, command: &[String]) -> Result<Secret, FetchError> {
    let shown = command.first().cloned().unwrap_or_default();
    let mut child = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| FetchError::NoToken(format!("cannot run `{shown}`: {e}")))?;
    let stderr = child.stderr.take().expect("piped");
    let identity_name = identity.to_string();
    let collect_stderr = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr.take(MAX_OUTPUT)).lines();
        let mut kept = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            if kept.len() < MAX_STDERR_LINES {
                kept.push(line);
            }
        }
        kept
    });
    let mut stdout = child.stdout.take().expect("piped");
    let run = async {
        let mut out = Vec::new();
        (&mut stdout)
            .take(MAX_OUTPUT + 1)
            .read_to_end(&mut out)
            .await
            .map_err(|e| FetchError::NoToken(format!("reading the output of `{shown}`: {e}")))?;
        let status = child
            .wait()
            .await
            .map_err(|e| FetchError::NoToken(format!("`{shown}`: {e}")))?;
        Ok::<_, FetchError>((status, out))
    };
    let (status, out) = tokio::time::timeout(TIMEOUT, run).await.map_err(|_| {
        FetchError::NoToken(format!(
            "`{shown}` did not finish within {}s",
            TIMEOUT.as_secs()
        ))
    })??;
    let stderr = collect_stderr.await.unwrap_or_default();
    let printed = String::from_utf8_lossy(&out);
    let printed = Secret::new(printed.trim());
    for line in &stderr {
        let line = scrub_token(&printed, line);
        tracing::info!(identity = %identity_name, "exec stderr: {line}");
    }
    if !status.success() {
        return Err(FetchError::NoToken(format!("`{shown}` failed ({status})")));
    }
    if out.len() as u64 > MAX_OUTPUT {
        return Err(FetchError::NoToken(format!(
            "`{shown}` printed more than {MAX_OUTPUT} bytes"
        )));
    }
    let text = String::from_utf8(out)
        .map_err(|_| FetchError::NoToken(format!("`{shown}` printed non-UTF-8 output")))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(FetchError::NoToken(format!("`{shown}` printed nothing")));
    }
    Ok(Secret::new(text))
}
