//! Talking to the running daemon from the command line: a JSON POST, and its answers read
//! as lines of JSON (progress that streams while the daemon works).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

/// The daemon sends a line at least every few seconds; this long without one is a failure.
pub const SILENCE: Duration = Duration::from_secs(60);

/// POSTs `body` to the daemon's `path`; its answer's body, if it is a success.
pub async fn post(base: &str, path: &str, body: String) -> Result<hyper::body::Incoming, String> {
    let client = nix_sidecar::http::client(None).map_err(|e| e.to_string())?;
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let request = http::Request::post(&url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("cannot reach the daemon at {base}: {e}"))?;
    let status = response.status();
    let body = response.into_body();
    if !status.is_success() {
        let text = nix_sidecar::http::read_limited(body, 64 * 1024, SILENCE)
            .await
            .unwrap_or_default();
        return Err(format!(
            "the daemon answered {status}: {}",
            String::from_utf8_lossy(&text).trim()
        ));
    }
    Ok(body)
}

/// Reads `body` as lines of JSON, each handed to `each`, until `each` says it was the last.
pub async fn read_lines<T: serde::de::DeserializeOwned>(
    mut body: hyper::body::Incoming,
    mut each: impl FnMut(T) -> bool,
) -> Result<(), String> {
    let mut pending = Vec::new();
    loop {
        let frame = tokio::time::timeout(SILENCE, body.frame())
            .await
            .map_err(|_| "the daemon stopped reporting progress".to_string())?;
        let Some(frame) = frame else {
            return Err("the daemon ended its answer before it was done".into());
        };
        let frame = frame.map_err(|e| format!("reading the daemon's answer: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let value = serde_json::from_slice(&line)
                .map_err(|e| format!("the daemon sent an unreadable line: {e}"))?;
            if each(value) {
                return Ok(());
            }
        }
    }
}

/// The store paths that command-line arguments name: `/nix/store/<hash>-<name>`, a base name
/// or a hash as they are (the daemon checks them), and any other path (`./result`, a file
/// inside a store path) resolved through its symlinks to the store path that holds it.
pub fn store_paths(args: &[String]) -> Result<Vec<String>, String> {
    args.iter().map(|arg| store_path(arg)).collect()
}

fn store_path(arg: &str) -> Result<String, String> {
    if nix_sidecar::nix::narinfo::is_store_path(arg) || !arg.contains('/') {
        return Ok(arg.to_string());
    }
    let resolved = std::fs::canonicalize(arg).map_err(|e| format!("`{arg}`: {e}"))?;
    let text = resolved.to_string_lossy();
    let inside = text
        .strip_prefix("/nix/store/")
        .and_then(|rest| rest.split('/').next())
        .map(|base| format!("/nix/store/{base}"))
        .filter(|path| nix_sidecar::nix::narinfo::is_store_path(path));
    inside.ok_or_else(|| format!("`{arg}` is not in the Nix store (it is {text})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_resolve_to_the_store_path_that_holds_them() {
        let path = "/nix/store/0a2jys1ybdr4l3fjvfib5j5l0k3g5aky-a";
        assert_eq!(store_paths(&[path.to_string()]).unwrap(), [path]);
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("result");
        std::fs::write(&outside, "").unwrap();
        let err = store_paths(&[outside.display().to_string()]).unwrap_err();
        assert!(err.contains("is not in the Nix store"), "{err}");
        let err = store_paths(&["./no-such-result".into()]).unwrap_err();
        assert!(err.contains("no-such-result"), "{err}");
    }
}
