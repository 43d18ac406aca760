//! `nix-sidecar push [--wait] [PATH...]`: hands store paths (with their closures) to the
//! running daemon's upload queue (`POST /_sidecar/push`). Without PATH it reads `$OUT_PATHS`,
//! so it works as Nix's `post-build-hook` (which should only enqueue: the build waits for
//! it). `--wait` blocks until the paths are up or failed for good, prints a summary, and
//! exits 1 if any failed.

use std::process::ExitCode;

use nix_sidecar::push::Summary;

use super::daemon::{post, read_lines};

#[derive(serde::Deserialize)]
struct Line {
    done: bool,
    queued: Option<u64>,
    summary: Option<Summary>,
}

pub async fn run(base: &str, paths: Vec<String>, wait: bool) -> Result<ExitCode, String> {
    let paths = if paths.is_empty() {
        let from_env = std::env::var("OUT_PATHS").unwrap_or_default();
        from_env.split_whitespace().map(str::to_string).collect()
    } else {
        paths
    };
    if paths.is_empty() && !wait {
        return Err("no store paths given, and $OUT_PATHS is empty".into());
    }
    let ask = serde_json::json!({ "paths": paths, "wait": wait }).to_string();
    let body = post(base, "/_sidecar/push", ask).await?;
    if !wait {
        let text = nix_sidecar::http::read_limited(body, 64 * 1024, super::daemon::SILENCE).await?;
        println!("{}", String::from_utf8_lossy(&text).trim());
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
