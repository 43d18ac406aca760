//! `nix-sidecar prefetch PATH...`: asks the running daemon to fetch the closures into its
//! cache (`POST /_sidecar/prefetch`) and shows its progress: a bar on a terminal, a plain line
//! per update otherwise. Exit 1 when anything was unavailable, listing it.

use std::io::IsTerminal;
use std::process::ExitCode;

use super::daemon::{post, read_lines, store_paths, SILENCE};
use nix_sidecar::config::format_size;
use nix_sidecar::proxy::prefetch::Progress;

pub async fn unpin(base: &str) -> Result<ExitCode, String> {
    let body = post(base, "/_sidecar/unpin", String::new()).await?;
    let text = nix_sidecar::http::read_limited(body, 64 * 1024, SILENCE).await?;
    println!("{}", String::from_utf8_lossy(&text).trim());
    Ok(ExitCode::SUCCESS)
}

pub async fn run(base: &str, paths: &[String], pin: Option<&str>) -> Result<ExitCode, String> {
    let paths = store_paths(paths)?;
    let ask = serde_json::json!({ "paths": paths, "pin": pin }).to_string();
    let body = post(base, "/_sidecar/prefetch", ask).await?;
    let show = Show::new();
    let mut last = Progress::default();
    read_lines(body, |progress: Progress| {
        show.update(&progress);
        last = progress;
        last.done
    })
    .await?;
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
