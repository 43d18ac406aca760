//! `nix-sidecar prefetch PATH...`: asks the running daemon to fetch the closures into its
//! cache (`POST /_sidecar/prefetch`) and shows its progress: a bar on a terminal, a plain line
//! per update otherwise. Exit 1 when anything was unavailable, listing it.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use super::daemon::{post, read_lines, store_paths, SILENCE};
use nix_sidecar::config::human_size;
use nix_sidecar::proxy::prefetch::Progress;

/// `nix-sidecar unpin`: how many pins were removed (`--json`: the daemon's answer as it is).
pub async fn unpin(base: &str, json: bool) -> Result<ExitCode, String> {
    let body = post(base, "/_sidecar/unpin", String::new()).await?;
    let text = nix_sidecar::http::read_limited(body, 64 * 1024, SILENCE)
        .await
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&text);
    let unpinned = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["unpinned"].as_u64());
    match (json, unpinned) {
        (false, Some(n)) => println!("unpin: {n} pinned NAR(s) may be evicted again"),
        _ => println!("{}", text.trim()),
    }
    Ok(ExitCode::SUCCESS)
}

/// The paths listed in `source` (`-`: standard input), one per line; blank lines skipped.
pub fn read_paths_from(source: &Path) -> Result<Vec<String>, String> {
    let text = if source == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(source)
    }
    .map_err(|e| format!("--paths-from {}: {e}", source.display()))?;
    let paths: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_string)
        .collect();
    if paths.is_empty() {
        return Err(format!("--paths-from {}: no paths in it", source.display()));
    }
    Ok(paths)
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

/// A progress bar on a terminal; elsewhere (logs, CI) a plain line when something changed,
/// at most every 5 seconds.
struct Show(
    Option<indicatif::ProgressBar>,
    std::sync::Mutex<(String, Option<std::time::Instant>)>,
);

impl Show {
    fn new() -> Show {
        if !std::io::stderr().is_terminal() {
            return Show(None, Default::default());
        }
        // A spinner until the first sizes are known (a bar of 0 B/0 B looks done).
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Show(Some(bar), Default::default())
    }

    fn update(&self, p: &Progress) {
        match &self.0 {
            Some(bar) => {
                // Sizes come in as narinfos are read: no bar before any is known.
                if p.bytes_total > 0 {
                    if bar.length().is_none() {
                        bar.set_style(
                            indicatif::ProgressStyle::with_template(
                                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                            )
                            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                        );
                    }
                    bar.set_length(p.bytes_total.max(p.bytes_done));
                    bar.set_position(p.bytes_done);
                }
                bar.set_message(format!("{}/{} paths", p.paths_done, p.paths_total));
            }
            None => {
                let text = line(p);
                let mut last = self.1.lock().unwrap();
                let due = last
                    .1
                    .is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(5));
                if text != last.0 && due {
                    eprintln!("{text}");
                    *last = (text, Some(std::time::Instant::now()));
                }
            }
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
        "prefetch: {}/{} paths, {} of {} stored{}",
        p.paths_done,
        p.paths_total,
        human_size(p.bytes_done),
        human_size(p.bytes_total.max(p.bytes_done)),
        if p.unavailable.is_empty() {
            String::new()
        } else {
            format!(", {} unavailable", p.unavailable.len())
        }
    )
}
