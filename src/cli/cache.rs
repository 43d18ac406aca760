//! `nix-sidecar cache stats | gc | verify`: the cache on disk, with the daemon stopped.

use std::process::ExitCode;

use clap::Subcommand;

use nix_sidecar::config::{self, Config};
use nix_sidecar::store::{Limits, Store};

#[derive(Subcommand)]
pub enum CacheAction {
    /// Size and entry counts.
    Stats,
    /// Evict least recently used files down to a size (default: max-cache-size).
    Gc {
        /// The size to evict down to, e.g. "10GiB", "500MB" or "0" [default: max-cache-size].
        #[arg(long)]
        max_size: Option<String>,
    },
    /// Re-hash every stored file and drop the corrupt ones; exit 1 if any was found.
    Verify,
}

pub fn run(config: Config, action: CacheAction) -> Result<ExitCode, String> {
    let limits = Limits {
        max_size: config.max_cache_size,
        min_free: config.min_free_space,
    };
    // Only `serve` creates a cache: a mistyped --cache-dir must not report an empty one.
    if !config.cache_dir.join("index.redb").is_file() {
        return Err(format!(
            "{} holds no nix-sidecar cache (no index.redb); check --cache-dir",
            config.cache_dir.display()
        ));
    }
    let store = Store::open(&config.cache_dir, limits).map_err(|e| e.to_string())?;
    match action {
        CacheAction::Stats => {
            let s = store.stats();
            println!("cache dir: {}", config.cache_dir.display());
            println!("narinfos: {}", s.narinfos);
            println!("nar entries: {}", s.nars);
            println!("stored files: {}", s.stored_files);
            let size = |bytes: u64| format!("{} ({bytes} bytes)", config::human_size(bytes));
            println!("stored: {}", size(s.stored_bytes));
            println!("pinned: {}", size(s.pinned_bytes));
            println!("max size: {}", size(s.max_size));
            println!("free space: {}", size(s.free_space));
            Ok(ExitCode::SUCCESS)
        }
        CacheAction::Gc { max_size } => {
            let max_size = match max_size {
                Some(text) => config::parse_size(&text)
                    .ok_or_else(|| {
                        format!("--max-size: `{text}` is not a size such as \"20GiB\", \"500MB\" or \"0\" (units B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)")
                    })?,
                None => config.max_cache_size,
            };
            drop(store);
            let store = Store::open(&config.cache_dir, Limits { max_size, ..limits })
                .map_err(|e| e.to_string())?;
            let before = store.size();
            store.enforce_limits(0);
            println!(
                "evicted {} bytes; {} bytes stored",
                before - store.size(),
                store.size()
            );
            Ok(ExitCode::SUCCESS)
        }
        CacheAction::Verify => {
            let total = store.stats();
            eprintln!(
                "verifying {} stored files, {}",
                total.stored_files,
                config::human_size(total.stored_bytes)
            );
            let mut last = std::time::Instant::now();
            let report = store
                .verify_with_progress(|files, bytes| {
                    if last.elapsed() >= std::time::Duration::from_secs(2) {
                        last = std::time::Instant::now();
                        eprintln!(
                            "verify: {files}/{} files, {} of {}",
                            total.stored_files,
                            config::human_size(bytes),
                            config::human_size(total.stored_bytes)
                        );
                    }
                })
                .map_err(|e| e.to_string())?;
            println!(
                "checked: {}\ncorrupt: {}\nmissing: {}\nleftovers removed: {}",
                report.checked, report.corrupt, report.missing, report.leftovers
            );
            Ok(if report.corrupt + report.missing == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
