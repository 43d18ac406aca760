//! The `nix-sidecar` command line: parse, load the configuration, dispatch.

#![forbid(unsafe_code)]

mod cli {
    pub mod cache;
    pub mod daemon;
    pub mod prefetch;
    pub mod push;
}

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use nix_sidecar::config::{Config, Overrides};
use nix_sidecar::exchange::ServiceConfig;
use nix_sidecar::identity::Identity;

#[derive(Parser)]
#[command(
    name = "nix-sidecar",
    version,
    about = "A loopback Nix binary cache that pulls from access-controlled upstreams with this machine's workload identity"
)]
struct Cli {
    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve(ServeFlags),
    /// Validate and print the effective configuration (secrets are never shown); with serve's
    /// flags, what that command line would run.
    CheckConfig(ServeFlags),
    /// Obtain the token that would be sent upstream and print its non-secret claims.
    Token {
        #[arg(long, env = "NIX_SIDECAR_CONFIG")]
        config: Option<PathBuf>,
        /// The upstream whose identity to use; default: the first with an identity.
        #[arg(long)]
        upstream: Option<String>,
        /// Also print the token itself.
        #[arg(long)]
        raw: bool,
    },
    /// Have the running daemon fetch the closures of store paths into its cache (verified),
    /// e.g. before a deploy; exit 1 listing what was unavailable.
    Prefetch {
        #[arg(long, env = "NIX_SIDECAR_CONFIG")]
        config: Option<PathBuf>,
        /// The daemon's URL [default: http://<the config's first listen address>].
        #[arg(long, env = "NIX_SIDECAR_URL")]
        url: Option<String>,
        /// Keep them from eviction: `--pin` until `nix-sidecar unpin`, `--pin=2h` for a while
        /// (`min-free-space` still wins).
        #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "forever")]
        pin: Option<String>,
        /// Also the paths listed in FILE (`-`: standard input), one per line: a whole closure
        /// (`nix path-info -r` on the builder) is asked at once instead of level by level.
        #[arg(long, value_name = "FILE")]
        paths_from: Option<PathBuf>,
        /// Store paths (`/nix/store/<hash>-<name>`), their basenames or hashes.
        #[arg(required_unless_present = "paths_from")]
        paths: Vec<String>,
    },
    /// Queue store paths (with their closures) for upload to the upstreams that take pushes.
    /// Without PATH, reads `$OUT_PATHS` (as a `post-build-hook`).
    Push {
        #[arg(long, env = "NIX_SIDECAR_CONFIG")]
        config: Option<PathBuf>,
        /// The daemon's URL [default: http://<the config's first listen address>].
        #[arg(long, env = "NIX_SIDECAR_URL")]
        url: Option<String>,
        /// Wait until every path is uploaded or failed for good; print a summary; exit 1 if
        /// any failed. With no PATH (and no `$OUT_PATHS`), waits for the whole queue.
        #[arg(long)]
        wait: bool,
        /// Print the daemon's answer as JSON.
        #[arg(long)]
        json: bool,
        /// Store paths (`/nix/store/<hash>-<name>`), `./result`, or a path inside the store.
        paths: Vec<String>,
    },
    /// Let every NAR pinned by `prefetch --pin` be evicted again.
    Unpin {
        #[arg(long, env = "NIX_SIDECAR_CONFIG")]
        config: Option<PathBuf>,
        /// The daemon's URL [default: http://<the config's first listen address>].
        #[arg(long, env = "NIX_SIDECAR_URL")]
        url: Option<String>,
        /// Print the daemon's answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the token exchange service (its own configuration; see the README, "Self-hosting
    /// without static secrets").
    Exchange {
        #[arg(long)]
        config: PathBuf,
    },
    /// Inspect or maintain the local cache (stop the daemon first: the index is exclusive).
    Cache {
        #[command(subcommand)]
        action: cli::cache::CacheAction,
        #[arg(long, global = true, env = "NIX_SIDECAR_CONFIG")]
        config: Option<PathBuf>,
        /// The cache directory [default: the config's cache-dir, else /var/cache/nix-sidecar
        /// as root, $XDG_CACHE_HOME/nix-sidecar otherwise].
        #[arg(long, global = true)]
        cache_dir: Option<PathBuf>,
    },
}

/// The configuration and what a command line changes of it.
#[derive(clap::Args)]
struct ServeFlags {
    /// The configuration file (TOML; docs/configuration.md); without it, built-in defaults.
    #[arg(long, env = "NIX_SIDECAR_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (repeatable); default 127.0.0.1:37515.
    #[arg(long)]
    listen: Vec<String>,
    /// An upstream cache (repeatable), after those of the config file: a URL, or a preset's
    /// name (`nixos`, `flakehub`); a preset's URL brings its signing keys too. Anonymous
    /// unless --identity is given.
    #[arg(long)]
    upstream: Vec<String>,
    /// Where the disk cache lives [default: /var/cache/nix-sidecar as root,
    /// $XDG_CACHE_HOME/nix-sidecar otherwise].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Admit only clients owned by this uid (repeatable); replaces `allowed-uids`.
    #[arg(long = "allowed-uid")]
    allowed_uids: Vec<u32>,
    /// Give the --upstream caches this identity provider (e.g. `auto`, `github-actions`).
    #[arg(long)]
    identity: Option<String>,
    /// The audience the --identity provider's tokens are made for.
    #[arg(long)]
    audience: Option<String>,
}

impl ServeFlags {
    /// Whether `--config` names an exchange service's file (`check-config` checks both kinds).
    fn is_exchange(&self) -> bool {
        self.config
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .is_some_and(|text| nix_sidecar::exchange::config::looks_like_exchange(&text))
    }

    fn load(self) -> Result<Config, String> {
        let overrides = Overrides {
            listen: self.listen,
            upstreams: self.upstream,
            cache_dir: self.cache_dir,
            allowed_uids: self.allowed_uids,
            identity: self.identity,
            audience: self.audience,
        };
        Config::load(self.config.as_deref(), &overrides).map_err(|e| e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if !matches!(cli.command, Command::Serve(_)) {
        // A one-shot command piped into `head` ends quietly when the pipe closes, as other
        // command-line tools do (the daemon keeps Rust's default: EPIPE as an error).
        nix_sidecar::sys::die_quietly_on_closed_pipes();
    }
    // Two malloc arenas, not one per thread that ever allocated: with a blocking pool the
    // arenas multiplied and fragmented under many downloads. Chunk buffers (256 KiB) are
    // mapped and unmapped whole instead of being carved from (and kept in) the heap; the
    // buffer pool keeps the few that are worth reusing.
    nix_sidecar::sys::tune_malloc();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Blocking work is short (a chunk hashed, a file chunk read, an index commit): a few
        // threads do it, however many downloads are in flight.
        .max_blocking_threads(16)
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(run(cli.command));
    // Downloads still running after the grace period are abandoned (their temporary files
    // are removed as their tasks drop); do not wait for blocking readers either.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("nix-sidecar: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NIX_SIDECAR_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Libraries that print secrets at their most verbose levels stay quiet whatever the
    // user asks for: aws-sigv4 traces the canonical request (with the session token), and
    // h2 traces header blocks.
    let filter = ["aws_sigv4=off", "aws_smithy_runtime_api=off", "h2=info"]
        .into_iter()
        .fold(filter, |f, d| {
            f.add_directive(d.parse().expect("static directive"))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Serve(flags) => {
            serve(flags.load()?).await.map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig(flags) => check_config(flags),
        Command::Exchange { config } => {
            let config = ServiceConfig::load(&config).map_err(|e| e.to_string())?;
            // Many clients means many sockets, as for `serve`.
            nix_sidecar::sys::raise_fd_limit();
            nix_sidecar::exchange::run(config, async {
                shutdown_signal().await;
                nix_sidecar::systemd::stopping();
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            config,
            upstream,
            raw,
        } => token(config, upstream, raw).await,
        Command::Prefetch {
            config,
            url,
            pin,
            paths_from,
            mut paths,
        } => {
            if let Some(source) = paths_from {
                paths.extend(cli::prefetch::read_paths_from(&source)?);
            }
            cli::prefetch::run(&daemon_url(config, url)?, &paths, pin.as_deref()).await
        }
        Command::Push {
            config,
            url,
            wait,
            json,
            paths,
        } => match daemon_url(config, url) {
            Ok(url) => cli::push::run(&url, paths, wait, json).await,
            // As a post-build hook: never fail the build.
            Err(e) if paths.is_empty() && !wait => {
                eprintln!("warning: nix-sidecar push: nothing queued: {e}");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => Err(e),
        },
        Command::Unpin { config, url, json } => {
            cli::prefetch::unpin(&daemon_url(config, url)?, json).await
        }
        Command::Cache {
            action,
            config,
            cache_dir,
        } => {
            let overrides = Overrides {
                cache_dir,
                ..Default::default()
            };
            let config = Config::load(config.as_deref(), &overrides).map_err(|e| e.to_string())?;
            cli::cache::run(config, action)
        }
    }
}

/// `check-config`: the effective configuration (the daemon's or the exchange's) and its
/// warnings, or the first error.
fn check_config(flags: ServeFlags) -> Result<ExitCode, String> {
    if flags.is_exchange() {
        let path = flags.config.expect("is_exchange checked it");
        let config = ServiceConfig::load(&path).map_err(|e| e.to_string())?;
        print!("{}", config.describe());
        for warning in config.warnings() {
            eprintln!("warning: {warning}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let config = flags.load()?;
    print!("{}", config.render());
    for warning in nix_sidecar::identity::token_file_warnings(config.identities.values()) {
        eprintln!("warning: {warning}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn serve(config: Config) -> Result<(), nix_sidecar::app::StartError> {
    // Many clients means many sockets: the hard limit on open files, not the soft default.
    nix_sidecar::sys::raise_fd_limit();
    if config.upstreams.is_empty() {
        tracing::warn!(
            "no upstream configured: every narinfo is a miss (use --upstream URL or a config file)"
        );
    }
    let listeners = nix_sidecar::server::bind(&config.listen).await?;
    let mut app = nix_sidecar::app::App::build(&config)?;
    app.bind_site().await?;
    for listener in &listeners {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, cache_dir = %config.cache_dir.display(), upstreams = config.upstreams.len(), "listening");
        }
    }
    nix_sidecar::systemd::ready();
    app.run(listeners, async {
        shutdown_signal().await;
        nix_sidecar::systemd::stopping();
    })
    .await;
    Ok(())
}

/// The running daemon's URL: given, or from the configuration's first listen address.
fn daemon_url(config: Option<PathBuf>, url: Option<String>) -> Result<String, String> {
    match url {
        Some(url) => Ok(url),
        None => {
            let config = Config::load(config.as_deref(), &Overrides::default())
                .map_err(|e| e.to_string())?;
            Ok(format!("http://{}", config.listen[0]))
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

async fn token(
    config: Option<PathBuf>,
    upstream: Option<String>,
    raw: bool,
) -> Result<ExitCode, String> {
    let config =
        Config::load(config.as_deref(), &Overrides::default()).map_err(|e| e.to_string())?;
    let up = match &upstream {
        Some(name) => config
            .upstreams
            .iter()
            .find(|u| &u.name == name)
            .ok_or_else(|| format!("no upstream named `{name}`"))?,
        None => config
            .upstreams
            .iter()
            .find(|u| u.identity.is_some())
            .ok_or("no upstream has an identity: nothing would be sent")?,
    };
    let Some(id_name) = &up.identity else {
        println!("upstream `{}` is anonymous: no token is sent", up.name);
        return Ok(ExitCode::SUCCESS);
    };
    let identity = Identity::new(
        &config.identities[id_name],
        nix_sidecar::http::client(None).map_err(|e| e.to_string())?,
    );
    let token = identity.token().await.map_err(|e| e.to_string())?;
    let c = &token.claims;
    if let Some(warning) = nix_sidecar::identity::audience_mismatch(&config.identities[id_name], c)
    {
        eprintln!("warning: {warning}");
    }
    println!("upstream: {}", up.name);
    println!("identity: {id_name}");
    println!("provider: {}", identity.provider());
    println!("iss: {}", c.iss.as_deref().unwrap_or("-"));
    println!("sub: {}", c.sub.as_deref().unwrap_or("-"));
    println!(
        "aud: {}",
        if c.aud.is_empty() {
            "-".into()
        } else {
            c.aud.join(", ")
        }
    );
    println!("exp: {}", c.exp.map_or("-".into(), |e| e.to_string()));
    println!(
        "seconds left: {}",
        token
            .seconds_left()
            .map_or("no expiry".into(), |s| s.to_string())
    );
    println!("fingerprint: {}", token.secret.fingerprint());
    for grant in nix_sidecar::identity::jwt::attic_grants(token.secret.expose()) {
        println!("granted: {grant}");
    }
    if raw {
        println!("token: {}", token.secret.expose());
    }
    Ok(ExitCode::SUCCESS)
}
