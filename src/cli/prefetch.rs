//! `nix-sidecar prefetch PATH...`: asks the running daemon to fetch the closures into its
//! cache (`POST /_sidecar/prefetch`) and shows its progress: a bar on a terminal, a plain line
//! per update otherwise. Exit 1 when anything was unavailable, listing it.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use nix_sidecar::config::format_size;
use nix_sidecar::proxy::prefetch::Progress;

/// The daemon sends a line at least every half second; this long without one is a failure.
const SILENCE: Duration = Duration::from_secs(60);

/// POSTs `body` to the daemon's `path`; its answer's body, if it is a success.
async fn post(base: &str, path: &str, body: String) -> Result<hyper::body::Incoming, String> {
    let client = nix_sidecar::http::client(None)?;
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

pub async fn unpin(base: &str) -> Result<ExitCode, String> {
    let body = post(base, "/_sidecar/unpin", String::new()).await?;
    let text = nix_sidecar::http::read_limited(body, 64 * 1024, SILENCE).await?;
    println!("{}", String::from_utf8_lossy(&text).trim());
    Ok(ExitCode::SUCCESS)
}

pub async fn run(base: &str, paths: &[String], pin: Option<&str>) -> Result<ExitCode, String> {
    let ask = serde_json::json!({ "paths": paths, "pin": pin }).to_string();
    let mut body = post(base, "/_sidecar/prefetch", ask).await?;
    let show = Show::new();
    let mut pending = Vec::new();
    let mut last = Progress::default();
    while !last.done {
        let frame = tokio::time::timeout(SILENCE, body.frame())
            .await
            .map_err(|_| "the daemon stopped reporting progress".to_string())?;
        let Some(frame) = frame else {
            return Err("the daemon ended the prefetch before it was done".into());
        };
        let frame = frame.map_err(|e| format!("reading the progress: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            last = serde_json::from_slice(&line)
                .map_err(|e| format!("the daemon sent unreadable progress: {e}"))?;
            show.update(&last);
        }
    }
    show.finish(&last);
    for missing in &last.unavailable {
        eprintln!("unavailable: {}: {}", missing.path, missing.reason);
    }
    Ok(if last.unavailable.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A progress bar on a terminal, plain lines elsewhere (logs, CI).
struct Show(Option<indicatif::ProgressBar>);

impl Show {
    fn new() -> Show {
        if !std::io::stderr().is_terminal() {
            return Show(None);
        }
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Show(Some(bar))
    }

    fn update(&self, p: &Progress) {
        match &self.0 {
            Some(bar) => {
                bar.set_length(p.bytes_total.max(p.bytes_done));
                bar.set_position(p.bytes_done);
                bar.set_message(format!("{}/{} paths", p.paths_done, p.paths_total));
            }
            None => eprintln!("{}", line(p)),
        }
    }

    fn finish(&self, p: &Progress) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
        println!("{}", line(p));
    }
}

fn line(p: &Progress) -> String {
    format!(
        "prefetch: {}/{} paths, {} stored{}",
        p.paths_done,
        p.paths_total,
        format_size(p.bytes_done),
        if p.unavailable.is_empty() {
            String::new()
        } else {
            format!(", {} unavailable", p.unavailable.len())
        }
    )
}
