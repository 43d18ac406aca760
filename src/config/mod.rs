//! The TOML configuration: schema, defaults and validation. Every error names the key.
//!
//! The file is read into `FileConfig` (serde, `deny_unknown_fields`, kebab-case), then checked
//! and completed into `Config`, the only form the rest of the program sees.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::nix::narinfo::TrustedKeys;
use crate::nix::signing::SigningKey;

mod file_upstream;
mod identity;
mod overrides;
mod push;
mod render;
mod site;
mod units;
mod upstream;

use file_upstream::FileUpstream;
pub use identity::{
    AutoKeys, AzureKeys, ExchangeConfig, IdentityConfig, ManagedIdentity, Provider,
    DEFAULT_NETRC_PATH, KUBERNETES_TOKEN_PATH,
};
pub use overrides::{Overrides, CLI_IDENTITY};
pub use push::{PushConfig, PushProtocol};
pub use site::{Network, SiteConfig};
pub use units::{format_size, human_size, parse_duration, parse_size};
pub use upstream::{Auth, Unavailable, UpstreamConfig};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:37515";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    listen: Option<Vec<String>>,
    allow_remote: Option<bool>,
    allowed_uids: Option<Vec<u32>>,
    cache_dir: Option<PathBuf>,
    max_cache_size: Option<String>,
    min_free_space: Option<String>,
    narinfo_ttl: Option<String>,
    negative_ttl: Option<String>,
    priority: Option<u32>,
    trusted_public_keys: Option<Vec<String>>,
    require_signatures: Option<bool>,
    narinfo_lookahead: Option<bool>,
    nar_lookahead: Option<bool>,
    shutdown_grace: Option<String>,
    max_connections: Option<usize>,
    push_signing_key_file: Option<PathBuf>,
    unavailable: Option<String>,
    site: Option<site::FileSite>,
    #[serde(default)]
    upstream: Vec<FileUpstream>,
    #[serde(default)]
    identity: BTreeMap<String, toml::Table>,
}

/// Whether a URL carries a user name or password (`https://:secret@host` has only the latter).
fn has_userinfo(url: &Url) -> bool {
    !url.username().is_empty() || url.password().is_some()
}

fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name == "localhost",
        None => false,
    }
}

/// A URL without its query (it may carry a client secret), for output.
fn url_text_for_log(url: &Url) -> String {
    let mut shown = url.clone();
    if shown.query().is_some() {
        shown.set_query(Some("[redacted]"));
    }
    let _ = shown.set_password(None);
    let _ = shown.set_username("");
    shown.to_string()
}

/// The validated, complete configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub allow_remote: bool,
    pub allowed_uids: Vec<u32>,
    pub cache_dir: PathBuf,
    pub max_cache_size: u64,
    pub min_free_space: u64,
    pub narinfo_ttl: Duration,
    pub negative_ttl: Duration,
    pub priority: u32,
    pub trusted_public_keys: Vec<String>,
    pub require_signatures: bool,
    /// Fetch the references of a narinfo fetched for Nix in the background.
    pub narinfo_lookahead: bool,
    /// Once Nix downloads a NAR, fetch the NARs of the narinfos it asked for lately.
    pub nar_lookahead: bool,
    /// How long in-flight responses may finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    pub upstreams: Vec<UpstreamConfig>,
    pub identities: BTreeMap<String, IdentityConfig>,
    /// A Nix secret key that signs pushed paths no trusted key signed (its public key is
    /// trusted here too).
    pub push_signing_key: Option<Arc<SigningKey>>,
    pub push_signing_key_file: Option<PathBuf>,
    /// `[site]`: the listener other sidecars pull through.
    pub site: Option<SiteConfig>,
}

impl Config {
    /// Loads `path` (if any), applies the overrides and validates.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Syntax {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?
            }
            None => FileConfig::default(),
        };
        Config::from_file(file, overrides)
    }

    pub fn parse_str(text: &str) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: PathBuf::from("config"),
            message: e.to_string(),
        })?;
        Config::from_file(file, &Overrides::default())
    }

    fn from_file(mut file: FileConfig, overrides: &Overrides) -> Result<Config, ConfigError> {
        overrides.apply_to(&mut file)?;
        let allow_remote = file.allow_remote.unwrap_or(false);
        let listen = check_listen(file.listen, allow_remote)?;

        let trusted_public_keys = file.trusted_public_keys.unwrap_or_default();
        TrustedKeys::parse(&trusted_public_keys)
            .map_err(|e| invalid("trusted-public-keys", e.to_string()))?;

        let mut identities = BTreeMap::new();
        for (name, id) in file.identity {
            let checked = identity::check(&name, id)?;
            identities.insert(name, checked);
        }

        let push_signing_key = match &file.push_signing_key_file {
            Some(path) => Some(Arc::new(read_signing_key(path)?)),
            None => None,
        };
        let unavailable = match &file.unavailable {
            Some(value) => Unavailable::parse("unavailable", value)?,
            None => Unavailable::Fail,
        };
        let mut all_keys = trusted_public_keys.clone();
        all_keys.extend(push_signing_key.as_ref().map(|key| key.public()));
        let upstreams = check_upstreams(file.upstream, &identities, unavailable, &mut all_keys)?;

        Ok(Config {
            listen,
            allow_remote,
            allowed_uids: file.allowed_uids.unwrap_or_default(),
            cache_dir: file.cache_dir.unwrap_or_else(default_cache_dir),
            max_cache_size: size("max-cache-size", file.max_cache_size, 20 << 30)?,
            min_free_space: size("min-free-space", file.min_free_space, 2 << 30)?,
            narinfo_ttl: duration("narinfo-ttl", file.narinfo_ttl, Duration::from_secs(3600))?,
            negative_ttl: duration("negative-ttl", file.negative_ttl, Duration::from_secs(30))?,
            priority: file.priority.unwrap_or(30),
            require_signatures: file.require_signatures.unwrap_or(!all_keys.is_empty()),
            narinfo_lookahead: file.narinfo_lookahead.unwrap_or(true),
            nar_lookahead: file.nar_lookahead.unwrap_or(true),
            max_connections: match file.max_connections {
                Some(0) => return Err(invalid("max-connections", "must be at least 1")),
                Some(n) => n,
                None => 4096,
            },
            shutdown_grace: duration(
                "shutdown-grace",
                file.shutdown_grace,
                Duration::from_secs(10),
            )?,
            trusted_public_keys: all_keys,
            upstreams,
            identities,
            push_signing_key,
            push_signing_key_file: file.push_signing_key_file,
            site: file.site.map(site::check).transpose()?,
        })
    }
}

/// The listen addresses (the default one if none), each parsed and loopback unless
/// `allow-remote`.
fn check_listen(
    listen: Option<Vec<String>>,
    allow_remote: bool,
) -> Result<Vec<SocketAddr>, ConfigError> {
    let listen = listen
        .unwrap_or_else(|| vec![DEFAULT_LISTEN.to_string()])
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let key = format!("listen[{i}]");
            let addr: SocketAddr = text
                .parse()
                .map_err(|_| invalid(&key, format!("`{text}` is not an address:port")))?;
            if !addr.ip().is_loopback() && !allow_remote {
                return Err(invalid(
                    key,
                    format!(
                        "{addr} is not a loopback address; set allow-remote = true to listen on it"
                    ),
                ));
            }
            Ok(addr)
        })
        .collect::<Result<Vec<_>, _>>()?;
    if listen.is_empty() {
        return Err(invalid("listen", "needs at least one address"));
    }
    Ok(listen)
}

fn read_signing_key(path: &Path) -> Result<SigningKey, ConfigError> {
    let key = "push-signing-key-file";
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    SigningKey::parse(&text).map_err(|e| invalid(key, format!("{}: {e}", path.display())))
}

/// Checks each `[[upstream]]` in order (a later one may not reuse an earlier one's name) and
/// adds the keys they bring (presets) to `all_keys`.
fn check_upstreams(
    files: Vec<FileUpstream>,
    identities: &BTreeMap<String, IdentityConfig>,
    unavailable: Unavailable,
    all_keys: &mut Vec<String>,
) -> Result<Vec<UpstreamConfig>, ConfigError> {
    let mut upstreams: Vec<UpstreamConfig> = Vec::new();
    for (i, up) in files.into_iter().enumerate() {
        let checked = upstream::check(i, up, identities, &upstreams, unavailable)?;
        for k in &checked.trusted_public_keys {
            if !all_keys.contains(k) {
                all_keys.push(k.clone());
            }
        }
        upstreams.push(checked);
    }
    Ok(upstreams)
}

/// A size key's value (`default` when absent).
fn size(key: &str, value: Option<String>, default: u64) -> Result<u64, ConfigError> {
    match value {
        Some(text) => parse_size(&text).ok_or_else(|| {
            invalid(
                key,
                format!("`{text}` is not a size such as \"20GiB\" or \"500MB\""),
            )
        }),
        None => Ok(default),
    }
}

/// A duration key's value (`default` when absent).
fn duration(key: &str, value: Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    match value {
        Some(text) => parse_duration(&text).ok_or_else(|| {
            invalid(
                key,
                format!("`{text}` is not a duration such as \"1h\" or \"30s\""),
            )
        }),
        None => Ok(default),
    }
}

fn default_cache_dir() -> PathBuf {
    if crate::sys::euid() == 0 {
        return PathBuf::from("/var/cache/nix-sidecar");
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("nix-sidecar")
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests;
