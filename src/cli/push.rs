//! `nix-sidecar push [--wait] [PATH...]`: hands store paths (with their closures) to the
//! running daemon's upload queue (`POST /_sidecar/push`). Without PATH it reads `$OUT_PATHS`,
//! so it works as Nix's `post-build-hook` (which should only enqueue: the build waits for
//! it). `--wait` blocks until the paths are up or failed for good, prints a summary, and
//! exits 1 if any failed.

use std::process::ExitCode;

use nix_sidecar::push::Summary;

use super::daemon::{post, read_lines, store_paths};

/// As Nix's `post-build-hook` (no PATH): the paths from `$OUT_PATHS`, or, where Nix passes it
/// empty (Nix 2.8, NixOS/nix#6446), the outputs of `$DRV_PATH`. A hook must never fail a
/// build: whatever goes wrong is a warning and exit 0.
async fn as_hook(base: &str) -> ExitCode {
    let queued = async {
        let mut paths: Vec<String> = std::env::var("OUT_PATHS")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if paths.is_empty() {
            paths = outputs_of_drv().await?;
        }
        let ask = serde_json::json!({ "paths": paths, "wait": false }).to_string();
        let body = post(base, "/_sidecar/push", ask).await?;
        nix_sidecar::http::read_limited(body, 64 * 1024, super::daemon::SILENCE)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<usize, String>(paths.len())
    };
    match queued.await {
        Ok(n) => eprintln!("nix-sidecar push: {n} path(s) queued"),
        Err(e) => eprintln!("warning: nix-sidecar push: nothing queued: {e}"),
    }
    ExitCode::SUCCESS
}

/// The output paths of `$DRV_PATH` (`nix-store --query --outputs`).
async fn outputs_of_drv() -> Result<Vec<String>, String> {
    let drv = std::env::var("DRV_PATH")
        .ok()
        .filter(|d| !d.is_empty())
        .ok_or("no store paths given, and $OUT_PATHS and $DRV_PATH are empty")?;
    let out = tokio::process::Command::new("nix-store")
        .args(["--query", "--outputs", &drv])
        .output()
        .await
        .map_err(|e| format!("cannot run nix-store: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nix-store --query --outputs {drv}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect())
}

#[derive(serde::Deserialize)]
struct Line {
    done: bool,
    queued: Option<u64>,
    summary: Option<Summary>,
}

pub async fn run(
    base: &str,
    paths: Vec<String>,
    wait: bool,
    json: bool,
) -> Result<ExitCode, String> {
    if paths.is_empty() && !wait {
        return Ok(as_hook(base).await);
    }
    let paths = store_paths(&paths)?;
    let ask = serde_json::json!({ "paths": paths, "wait": wait }).to_string();
    let body = post(base, "/_sidecar/push", ask).await?;
    if !wait {
        let text = nix_sidecar::http::read_limited(body, 64 * 1024, super::daemon::SILENCE)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&text);
        let queued = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["queued"].as_u64());
        match (json, queued) {
            (false, Some(n)) => println!("push: {n} upload(s) queued (closures included)"),
            _ => println!("{}", text.trim()),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut summary = None;
    read_lines(body, |line: Line| {
        if let Some(queued) = line.queued {
            eprintln!("push: {queued} uploads waiting");
        }
        summary = line.summary;
        line.done
    })
    .await?;
    let summary = summary.ok_or("the daemon's last line had no summary")?;
    println!(
        "push: {} uploaded, {} already there, {} skipped (signed by a push-skip-key), {} failed",
        summary.uploaded,
        summary.already_there,
        summary.skipped,
        summary.failed.len()
    );
    for failed in &summary.failed {
        eprintln!(
            "failed: {} to {}: {}",
            failed.path, failed.upstream, failed.reason
        );
    }
    Ok(if summary.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
