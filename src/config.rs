//! The TOML configuration: schema, defaults and validation. Every error names the key.
//!
//! The file is read into `FileConfig` (serde, `deny_unknown_fields`, kebab-case), then checked
//! and completed into `Config`, the only form the rest of the program sees.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::nix::narinfo::TrustedKeys;

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
    shutdown_grace: Option<String>,
    max_connections: Option<usize>,
    #[serde(default)]
    upstream: Vec<FileUpstream>,
    #[serde(default)]
    identity: BTreeMap<String, FileIdentity>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileUpstream {
    name: Option<String>,
    url: Option<String>,
    preset: Option<String>,
    identity: Option<String>,
    ca_file: Option<PathBuf>,
    auth: Option<String>,
    username: Option<String>,
    trusted_public_keys: Option<Vec<String>>,
    insecure_http: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileIdentity {
    provider: String,
    audience: Option<String>,
    variable: Option<String>,
    path: Option<PathBuf>,
    refresh_interval: Option<String>,
    command: Option<Vec<String>>,
    region: Option<String>,
    client_id: Option<String>,
    object_id: Option<String>,
    resource_id: Option<String>,
    socket: Option<PathBuf>,
    machine: Option<String>,
    exchange: Option<FileExchange>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileExchange {
    url: String,
    audience: Option<String>,
    scope: Option<String>,
    client_id: Option<String>,
    client_secret_file: Option<PathBuf>,
    subject_token_type: Option<String>,
    requested_token_type: Option<String>,
}

impl Config {
    /// Warnings about token files that can be read now: one not made for its identity's
    /// audience (see [`crate::identity::audience_mismatch`]).
    pub fn token_file_warnings(&self) -> Vec<String> {
        self.identities
            .values()
            .filter_map(|identity| {
                let Provider::File { path, .. } = &identity.provider else {
                    return None;
                };
                let text = std::fs::read_to_string(path).ok()?;
                let claims = crate::identity::jwt::claims(text.trim()).ok()?;
                crate::identity::audience_mismatch(identity, &claims)
            })
            .collect()
    }
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
    /// How long in-flight responses may finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    pub upstreams: Vec<UpstreamConfig>,
    pub identities: BTreeMap<String, IdentityConfig>,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: String,
    pub url: Url,
    pub identity: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub auth: Auth,
    /// Keys this upstream's narinfos are signed with (a preset's, or its own list); they join
    /// the global `trusted-public-keys`.
    pub trusted_public_keys: Vec<String>,
    /// The token may go over plain http:// to a non-loopback host.
    pub insecure_http: bool,
}

/// How the token is presented to an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// `Authorization: Bearer <token>` (Attic, most caches).
    Bearer,
    /// `Authorization: Basic base64(<username>:<token>)` (FlakeHub: username `flakehub`).
    Basic { username: String },
}

/// Known upstreams: URL, Basic user (if they take the token as a Basic password) and signing
/// keys, each overridable. One file for this and the NixOS module, which adds the keys to
/// `nix.settings`.
#[derive(Deserialize)]
struct Preset {
    url: String,
    username: Option<String>,
    keys: Vec<String>,
}

impl Preset {
    fn auth(&self) -> Auth {
        match &self.username {
            Some(username) => Auth::Basic {
                username: username.clone(),
            },
            None => Auth::Bearer,
        }
    }
}

fn preset(name: &str) -> Option<&'static Preset> {
    static PRESETS: std::sync::LazyLock<BTreeMap<String, Preset>> =
        std::sync::LazyLock::new(|| {
            serde_json::from_str(include_str!("../nixos-module/presets.json"))
                .expect("nixos-module/presets.json is valid")
        });
    PRESETS.get(name)
}

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub name: String,
    pub provider: Provider,
    pub audience: Option<String>,
    pub exchange: Option<ExchangeConfig>,
}

#[derive(Debug, Clone)]
pub struct ExchangeConfig {
    pub url: Url,
    pub audience: Option<String>,
    pub scope: Option<String>,
    /// Client authentication (RFC 6749 2.3.1, HTTP Basic), the secret read from a file at
    /// each exchange.
    pub client_id: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    /// Overrides of the token types sent (default: the source's type; none requested).
    pub subject_token_type: Option<String>,
    pub requested_token_type: Option<String>,
}

/// Where an identity's token comes from, with the keys each source needs.
#[derive(Debug, Clone)]
pub enum Provider {
    /// The token is the value of an environment variable (tests, or a secret manager's env).
    Static {
        variable: String,
    },
    /// A JWT file re-read on a schedule (also `kubernetes`, with its default path).
    File {
        path: PathBuf,
        refresh: Duration,
    },
    GithubActions,
    /// A GitLab `id_tokens` JWT in this environment variable.
    Gitlab {
        variable: String,
    },
    Gcp,
    Azure {
        select: Option<ManagedIdentity>,
    },
    Aws {
        region: String,
    },
    /// A JWT-SVID from the SPIFFE Workload API on this unix socket (default:
    /// `SPIFFE_ENDPOINT_SOCKET`).
    Spiffe {
        socket: Option<PathBuf>,
    },
    /// The first source the environment offers (see `identity::auto`), with the keys the
    /// candidates take.
    Auto(AutoKeys),
    /// A command that prints a token (or JSON with one).
    Exec {
        command: Vec<String>,
    },
    /// The password of a `machine` entry in a netrc file, re-read on a schedule.
    Netrc {
        path: PathBuf,
        machine: String,
        refresh: Duration,
    },
}

/// Which of several managed identities on an Azure host to use.
#[derive(Debug, Clone, PartialEq)]
pub enum ManagedIdentity {
    ClientId(String),
    ObjectId(String),
    ResourceId(String),
}

/// What `provider = "auto"` passes on to the source it picks.
#[derive(Debug, Clone, Default)]
pub struct AutoKeys {
    /// GitLab's `id_tokens` variable; GitLab is a candidate only when it is set.
    pub variable: Option<String>,
    /// A Kubernetes projected token (default: the service account's).
    pub path: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub azure: Option<ManagedIdentity>,
    pub region: String,
}

/// As the AWS SDKs: the configured region, then AWS_REGION, AWS_DEFAULT_REGION, us-east-1.
fn aws_region(configured: Option<&str>) -> String {
    configured
        .map(str::to_string)
        .or_else(|| std::env::var("AWS_REGION").ok())
        .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
        .unwrap_or_else(|| "us-east-1".into())
}

impl Provider {
    pub fn name(&self) -> &'static str {
        match self {
            Provider::Static { .. } => "static",
            Provider::File { .. } => "file",
            Provider::GithubActions => "github-actions",
            Provider::Gitlab { .. } => "gitlab",
            Provider::Gcp => "gcp",
            Provider::Azure { .. } => "azure",
            Provider::Aws { .. } => "aws",
            Provider::Spiffe { .. } => "spiffe",
            Provider::Auto(_) => "auto",
            Provider::Exec { .. } => "exec",
            Provider::Netrc { .. } => "netrc",
        }
    }
}

pub const KUBERNETES_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
const PROVIDERS: &[&str] = &[
    "static",
    "file",
    "github-actions",
    "gitlab",
    "kubernetes",
    "gcp",
    "aws",
    "azure",
    "spiffe",
    "auto",
    "exec",
    "netrc",
];

/// Command-line values that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Vec<String>,
    pub upstreams: Vec<String>,
    pub cache_dir: Option<PathBuf>,
    /// Replaces `allowed-uids` when not empty.
    pub allowed_uids: Vec<u32>,
    /// `--identity PROVIDER`: the command-line upstreams use this provider ...
    pub identity: Option<String>,
    /// ... for this `--audience`.
    pub audience: Option<String>,
}

/// The name of the identity `--identity` creates.
pub const CLI_IDENTITY: &str = "cli";

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
        if !overrides.listen.is_empty() {
            file.listen = Some(overrides.listen.clone());
        }
        if overrides.cache_dir.is_some() {
            file.cache_dir = overrides.cache_dir.clone();
        }
        if !overrides.allowed_uids.is_empty() {
            file.allowed_uids = Some(overrides.allowed_uids.clone());
        }
        if let Some(provider) = &overrides.identity {
            if overrides.upstreams.is_empty() {
                return Err(invalid(
                    "--identity",
                    "gives the command-line upstreams an identity: name at least one with --upstream",
                ));
            }
            if file.identity.contains_key(CLI_IDENTITY) {
                return Err(invalid(
                    format!("identity.{CLI_IDENTITY}"),
                    "is the name --identity uses; rename it in the file",
                ));
            }
            file.identity.insert(
                CLI_IDENTITY.into(),
                FileIdentity {
                    provider: provider.clone(),
                    audience: overrides.audience.clone(),
                    ..FileIdentity::default()
                },
            );
        } else if overrides.audience.is_some() {
            return Err(invalid(
                "--audience",
                "is the audience of --identity, which is not given",
            ));
        }
        for (i, url) in overrides.upstreams.iter().enumerate() {
            file.upstream.push(FileUpstream {
                name: Some(format!("cli-{}", i + 1)),
                url: Some(url.clone()),
                preset: None,
                identity: overrides
                    .identity
                    .as_ref()
                    .map(|_| CLI_IDENTITY.to_string()),
                ca_file: None,
                auth: None,
                username: None,
                trusted_public_keys: None,
                insecure_http: None,
            });
        }

        let allow_remote = file.allow_remote.unwrap_or(false);
        let listen = file
            .listen
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
                        format!("{addr} is not a loopback address; set allow-remote = true to listen on it"),
                    ));
                }
                Ok(addr)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if listen.is_empty() {
            return Err(invalid("listen", "needs at least one address"));
        }

        let trusted_public_keys = file.trusted_public_keys.unwrap_or_default();
        TrustedKeys::parse(&trusted_public_keys)
            .map_err(|e| invalid("trusted-public-keys", e.to_string()))?;

        let mut identities = BTreeMap::new();
        for (name, id) in file.identity {
            let checked = check_identity(&name, id)?;
            identities.insert(name, checked);
        }

        let mut upstreams: Vec<UpstreamConfig> = Vec::new();
        let mut all_keys = trusted_public_keys.clone();
        for (i, up) in file.upstream.into_iter().enumerate() {
            let key = |field: &str| format!("upstream[{i}].{field}");
            let preset = match &up.preset {
                Some(name) => Some(preset(name).ok_or_else(|| {
                    invalid(
                        key("preset"),
                        format!("`{name}` is not one of flakehub, nixos"),
                    )
                })?),
                None => None,
            };
            let url_text = match (&up.url, &preset) {
                (Some(url), _) => url.clone(),
                (None, Some(p)) => p.url.clone(),
                (None, None) => return Err(invalid(key("url"), "is required (or set a preset)")),
            };
            let url = Url::parse(&url_text)
                .map_err(|e| invalid(key("url"), format!("`{url_text}` is not a URL: {e}")))?;
            let auth = match (up.auth.as_deref(), &up.username, &preset) {
                (Some("bearer"), None, _) => Auth::Bearer,
                (Some("basic"), Some(user), _) => Auth::Basic {
                    username: user.clone(),
                },
                (Some("basic"), None, Some(p)) => p.auth(),
                (Some("basic"), None, None) => {
                    return Err(invalid(
                        key("username"),
                        "auth = \"basic\" needs a username (FlakeHub: \"flakehub\")",
                    ))
                }
                (Some("bearer"), Some(_), _) => {
                    return Err(invalid(
                        key("username"),
                        "is only used with auth = \"basic\"",
                    ))
                }
                (Some(other), _, _) => {
                    return Err(invalid(
                        key("auth"),
                        format!("`{other}` is not one of bearer, basic"),
                    ))
                }
                (None, Some(user), _) => Auth::Basic {
                    username: user.clone(),
                },
                (None, None, Some(p)) => p.auth(),
                (None, None, None) => Auth::Bearer,
            };
            let upstream_keys = match (&up.trusted_public_keys, &preset) {
                (Some(keys), _) => keys.clone(),
                (None, Some(p)) => p.keys.clone(),
                (None, None) => vec![],
            };
            TrustedKeys::parse(&upstream_keys)
                .map_err(|e| invalid(key("trusted-public-keys"), e.to_string()))?;
            for k in &upstream_keys {
                if !all_keys.contains(k) {
                    all_keys.push(k.clone());
                }
            }
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(invalid(
                    key("url"),
                    "must be an http:// or https:// URL with a host",
                ));
            }
            if url.query().is_some() || url.fragment().is_some() || has_userinfo(&url) {
                return Err(invalid(
                    key("url"),
                    "must not carry a query, fragment or credentials (identities supply the token)",
                ));
            }
            let insecure_http = up.insecure_http.unwrap_or(false);
            if up.identity.is_some()
                && url.scheme() == "http"
                && !is_loopback_host(&url)
                && !insecure_http
            {
                return Err(invalid(
                    key("url"),
                    "sends this machine's token over plain http:// to another host; use https:// (or set insecure-http = true)",
                ));
            }
            if insecure_http {
                tracing::warn!(upstream = %url_text_for_log(&url), "insecure-http: the token crosses the network unencrypted");
            }
            let name = up
                .name
                .or(up.preset.clone())
                .unwrap_or_else(|| format!("upstream-{}", i + 1));
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
            {
                return Err(invalid(
                    key("name"),
                    "use letters, digits, '-', '_' and '.'",
                ));
            }
            if upstreams.iter().any(|u| u.name == name) {
                return Err(invalid(
                    key("name"),
                    format!("`{name}` names two upstreams"),
                ));
            }
            if let Some(id) = &up.identity {
                if !identities.contains_key(id) {
                    return Err(invalid(
                        key("identity"),
                        format!("no [identity.{id}] table"),
                    ));
                }
            }
            if let Some(ca) = &up.ca_file {
                if !ca.is_file() {
                    return Err(invalid(
                        key("ca-file"),
                        format!("{} is not a readable file", ca.display()),
                    ));
                }
            }
            upstreams.push(UpstreamConfig {
                name,
                url,
                identity: up.identity,
                ca_file: up.ca_file,
                auth,
                trusted_public_keys: upstream_keys,
                insecure_http,
            });
        }

        let size = |key: &str, value: Option<String>, default: u64| match value {
            Some(text) => parse_size(&text).ok_or_else(|| {
                invalid(
                    key,
                    format!("`{text}` is not a size such as \"20GiB\" or \"500MB\""),
                )
            }),
            None => Ok(default),
        };
        let duration = |key: &str, value: Option<String>, default: Duration| match value {
            Some(text) => parse_duration(&text).ok_or_else(|| {
                invalid(
                    key,
                    format!("`{text}` is not a duration such as \"1h\" or \"30s\""),
                )
            }),
            None => Ok(default),
        };

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
        })
    }

    /// The effective configuration as TOML. It holds no secret: tokens only ever come from
    /// the environment, files or endpoints, and those are shown by name, never by value.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let list = |items: Vec<String>| {
            let quoted: Vec<String> = items.iter().map(|s| toml_str(s)).collect();
            format!("[{}]", quoted.join(", "))
        };
        let _ = writeln!(
            out,
            "listen = {}",
            list(self.listen.iter().map(|a| a.to_string()).collect())
        );
        let _ = writeln!(out, "allow-remote = {}", self.allow_remote);
        let _ = writeln!(out, "allowed-uids = {:?}", self.allowed_uids);
        let _ = writeln!(
            out,
            "cache-dir = {}",
            toml_str(&self.cache_dir.display().to_string())
        );
        let _ = writeln!(
            out,
            "max-cache-size = \"{}\"",
            format_size(self.max_cache_size)
        );
        let _ = writeln!(
            out,
            "min-free-space = \"{}\"",
            format_size(self.min_free_space)
        );
        let _ = writeln!(
            out,
            "narinfo-ttl = \"{}\"",
            humantime::format_duration(self.narinfo_ttl)
        );
        let _ = writeln!(
            out,
            "negative-ttl = \"{}\"",
            humantime::format_duration(self.negative_ttl)
        );
        let _ = writeln!(out, "priority = {}", self.priority);
        let _ = writeln!(
            out,
            "trusted-public-keys = {}",
            list(self.trusted_public_keys.clone())
        );
        let _ = writeln!(out, "require-signatures = {}", self.require_signatures);
        let _ = writeln!(out, "max-connections = {}", self.max_connections);
        let _ = writeln!(
            out,
            "shutdown-grace = \"{}\"",
            humantime::format_duration(self.shutdown_grace)
        );
        for up in &self.upstreams {
            let _ = writeln!(
                out,
                "\n[[upstream]]\nname = {}\nurl = {}",
                toml_str(&up.name),
                toml_str(up.url.as_str())
            );
            if let Some(id) = &up.identity {
                let _ = writeln!(out, "identity = {}", toml_str(id));
            }
            if up.insecure_http {
                let _ = writeln!(out, "insecure-http = true");
            }
            if let Auth::Basic { username } = &up.auth {
                let _ = writeln!(out, "auth = \"basic\"\nusername = {}", toml_str(username));
            }
            if let Some(ca) = &up.ca_file {
                let _ = writeln!(out, "ca-file = {}", toml_str(&ca.display().to_string()));
            }
        }
        for (name, id) in &self.identities {
            let _ = writeln!(out, "\n[identity.{name}]");
            let _ = writeln!(out, "provider = \"{}\"", id.provider.name());
            match &id.provider {
                Provider::Static { variable } | Provider::Gitlab { variable } => {
                    let _ = writeln!(out, "variable = {}  # value not shown", toml_str(variable));
                }
                Provider::File { path, refresh } => {
                    let _ = writeln!(
                        out,
                        "path = {}\nrefresh-interval = \"{}\"",
                        toml_str(&path.display().to_string()),
                        humantime::format_duration(*refresh)
                    );
                }
                Provider::Azure { select } => {
                    render_managed_identity(&mut out, select.as_ref());
                }
                Provider::Aws { region } => {
                    let _ = writeln!(out, "region = {}", toml_str(region));
                }
                Provider::Spiffe { socket } => {
                    if let Some(socket) = socket {
                        let _ =
                            writeln!(out, "socket = {}", toml_str(&socket.display().to_string()));
                    }
                }
                Provider::Auto(keys) => {
                    let _ = writeln!(out, "region = {}", toml_str(&keys.region));
                    if let Some(variable) = &keys.variable {
                        let _ =
                            writeln!(out, "variable = {}  # value not shown", toml_str(variable));
                    }
                    for (name, path) in [("path", &keys.path), ("socket", &keys.socket)] {
                        if let Some(path) = path {
                            let _ =
                                writeln!(out, "{name} = {}", toml_str(&path.display().to_string()));
                        }
                    }
                    render_managed_identity(&mut out, keys.azure.as_ref());
                }
                Provider::Exec { command } => {
                    let _ = writeln!(out, "command = {}", list(command.clone()));
                }
                Provider::Netrc {
                    path,
                    machine,
                    refresh,
                } => {
                    let _ = writeln!(
                        out,
                        "path = {}\nmachine = {}\nrefresh-interval = \"{}\"",
                        toml_str(&path.display().to_string()),
                        toml_str(machine),
                        humantime::format_duration(*refresh)
                    );
                }
                Provider::GithubActions | Provider::Gcp => {}
            }
            if let Some(aud) = &id.audience {
                let _ = writeln!(out, "audience = {}", toml_str(aud));
            }
            if let Some(ex) = &id.exchange {
                let _ = writeln!(
                    out,
                    "\n[identity.{name}.exchange]\nurl = {}",
                    toml_str(&url_text_for_log(&ex.url))
                );
                if let Some(aud) = &ex.audience {
                    let _ = writeln!(out, "audience = {}", toml_str(aud));
                }
                for (name, value) in [
                    ("client-id", ex.client_id.clone()),
                    (
                        "client-secret-file",
                        ex.client_secret_file
                            .as_ref()
                            .map(|p| p.display().to_string()),
                    ),
                    ("subject-token-type", ex.subject_token_type.clone()),
                    ("requested-token-type", ex.requested_token_type.clone()),
                ] {
                    if let Some(value) = value {
                        let _ = writeln!(out, "{name} = {}", toml_str(&value));
                    }
                }
                if let Some(scope) = &ex.scope {
                    let _ = writeln!(out, "scope = {}", toml_str(scope));
                }
            }
        }
        out
    }
}

fn render_managed_identity(out: &mut String, select: Option<&ManagedIdentity>) {
    use std::fmt::Write;
    let (key, id) = match select {
        Some(ManagedIdentity::ClientId(id)) => ("client-id", id),
        Some(ManagedIdentity::ObjectId(id)) => ("object-id", id),
        Some(ManagedIdentity::ResourceId(id)) => ("resource-id", id),
        None => return,
    };
    let _ = writeln!(out, "{key} = {}", toml_str(id));
}

fn check_identity(name: &str, id: FileIdentity) -> Result<IdentityConfig, ConfigError> {
    let key = |field: &str| format!("identity.{name}.{field}");
    if !PROVIDERS.contains(&id.provider.as_str()) {
        return Err(invalid(
            key("provider"),
            format!("`{}` is not one of {}", id.provider, PROVIDERS.join(", ")),
        ));
    }
    let unused = |field: &str, set: bool| {
        if set {
            Err(invalid(
                key(field),
                format!("is not used by provider `{}`", id.provider),
            ))
        } else {
            Ok(())
        }
    };
    let refresh = match &id.refresh_interval {
        Some(text) => parse_duration(text)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                invalid(
                    key("refresh-interval"),
                    format!("`{text}` is not a duration such as \"1m\""),
                )
            })?,
        None => Duration::from_secs(60),
    };
    let needs_audience = || {
        id.audience.clone().ok_or_else(|| {
            invalid(
                key("audience"),
                format!("provider `{}` needs an audience", id.provider),
            )
        })
    };
    let only = |allowed: &[&str]| {
        let set = [
            ("variable", id.variable.is_some()),
            ("path", id.path.is_some()),
            ("refresh-interval", id.refresh_interval.is_some()),
            ("command", id.command.is_some()),
            ("region", id.region.is_some()),
            ("client-id", id.client_id.is_some()),
            ("object-id", id.object_id.is_some()),
            ("resource-id", id.resource_id.is_some()),
            ("socket", id.socket.is_some()),
            ("machine", id.machine.is_some()),
        ];
        for (field, present) in set {
            unused(field, present && !allowed.contains(&field))?;
        }
        Ok::<(), ConfigError>(())
    };
    let managed_identity = || {
        let set: Vec<_> = [
            (
                "client-id",
                id.client_id.clone().map(ManagedIdentity::ClientId),
            ),
            (
                "object-id",
                id.object_id.clone().map(ManagedIdentity::ObjectId),
            ),
            (
                "resource-id",
                id.resource_id.clone().map(ManagedIdentity::ResourceId),
            ),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect();
        match set.as_slice() {
            [] => Ok(None),
            [(_, one)] => Ok(Some(one.clone())),
            [_, (second, _), ..] => Err(invalid(
                key(second),
                "client-id, object-id and resource-id each select an identity: set one",
            )),
        }
    };
    let provider = match id.provider.as_str() {
        "static" | "gitlab" => {
            only(&["variable"])?;
            let variable = id.variable.clone().ok_or_else(|| {
                invalid(
                    key("variable"),
                    format!(
                        "provider `{}` needs the name of an environment variable",
                        id.provider
                    ),
                )
            })?;
            if id.provider == "static" {
                Provider::Static { variable }
            } else {
                Provider::Gitlab { variable }
            }
        }
        "file" | "kubernetes" => {
            only(&["path", "refresh-interval"])?;
            let path = match (&id.path, id.provider.as_str()) {
                (Some(path), _) => path.clone(),
                (None, "kubernetes") => PathBuf::from(KUBERNETES_TOKEN_PATH),
                (None, _) => {
                    return Err(invalid(
                        key("path"),
                        "provider `file` needs the path of a token file",
                    ))
                }
            };
            Provider::File { path, refresh }
        }
        "github-actions" => {
            only(&[])?;
            Provider::GithubActions
        }
        "gcp" => {
            only(&[])?;
            needs_audience()?;
            Provider::Gcp
        }
        "azure" => {
            only(&["client-id", "object-id", "resource-id"])?;
            needs_audience()?;
            Provider::Azure {
                select: managed_identity()?,
            }
        }
        "aws" => {
            only(&["region"])?;
            needs_audience()?;
            Provider::Aws {
                region: aws_region(id.region.as_deref()),
            }
        }
        "spiffe" => {
            only(&["socket"])?;
            needs_audience()?;
            Provider::Spiffe {
                socket: id.socket.clone(),
            }
        }
        "auto" => {
            only(&[
                "variable",
                "path",
                "socket",
                "region",
                "client-id",
                "object-id",
                "resource-id",
            ])?;
            needs_audience()?;
            Provider::Auto(AutoKeys {
                variable: id.variable.clone(),
                path: id.path.clone(),
                socket: id.socket.clone(),
                azure: managed_identity()?,
                region: aws_region(id.region.as_deref()),
            })
        }
        "exec" => {
            only(&["command"])?;
            let command = id.command.clone().filter(|c| !c.is_empty()).ok_or_else(|| {
                invalid(key("command"), "provider `exec` needs a command, e.g. [\"/usr/bin/get-token\", \"--json\"]")
            })?;
            Provider::Exec { command }
        }
        "netrc" => {
            only(&["path", "machine", "refresh-interval"])?;
            let machine = id.machine.clone().ok_or_else(|| {
                invalid(key("machine"), "provider `netrc` needs the machine whose password to use, e.g. \"cache.flakehub.com\"")
            })?;
            let path = id
                .path
                .clone()
                .unwrap_or_else(|| PathBuf::from(crate::identity::netrc::DEFAULT_PATH));
            let refresh = if id.refresh_interval.is_some() {
                refresh
            } else {
                Duration::from_secs(10)
            };
            Provider::Netrc {
                path,
                machine,
                refresh,
            }
        }
        _ => unreachable!("checked above"),
    };
    let exchange = match id.exchange {
        Some(ex) => {
            let url = Url::parse(&ex.url)
                .map_err(|e| invalid(key("exchange.url"), format!("is not a URL: {e}")))?;
            if has_userinfo(&url) || !matches!(url.scheme(), "http" | "https") {
                return Err(invalid(
                    key("exchange.url"),
                    "must be an http:// or https:// URL without credentials",
                ));
            }
            if ex.client_secret_file.is_some() && ex.client_id.is_none() {
                return Err(invalid(
                    key("exchange.client-id"),
                    "client-secret-file needs the client-id it belongs to",
                ));
            }
            Some(ExchangeConfig {
                url,
                audience: ex.audience,
                scope: ex.scope,
                client_id: ex.client_id,
                client_secret_file: ex.client_secret_file,
                subject_token_type: ex.subject_token_type,
                requested_token_type: ex.requested_token_type,
            })
        }
        None => None,
    };
    Ok(IdentityConfig {
        name: name.to_string(),
        provider,
        audience: id.audience,
        exchange,
    })
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

/// "20GiB", "500 MB", "1024" (bytes).
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        _ => return None,
    };
    let bytes = number * factor as f64;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

pub fn format_size(bytes: u64) -> String {
    for (unit, factor) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if bytes >= factor && bytes % factor == 0 {
            return format!("{}{unit}", bytes / factor);
        }
    }
    format!("{bytes}B")
}

pub fn parse_duration(text: &str) -> Option<Duration> {
    humantime::parse_duration(text.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse_str(text).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_those_of_the_spec() {
        let c = Config::parse_str("").unwrap();
        assert_eq!(c.listen, vec!["127.0.0.1:37515".parse().unwrap()]);
        assert_eq!(c.max_cache_size, 20 << 30);
        assert_eq!(c.min_free_space, 2 << 30);
        assert_eq!(c.narinfo_ttl, Duration::from_secs(3600));
        assert_eq!(c.negative_ttl, Duration::from_secs(30));
        assert_eq!(c.priority, 30);
        assert!(!c.require_signatures);
        assert!(c.upstreams.is_empty());
    }

    #[test]
    fn full_example_parses() {
        let c = Config::parse_str(
            r#"
listen = ["127.0.0.1:4000", "[::1]:4000"]
max-cache-size = "1GiB"
narinfo-ttl = "10m"
trusted-public-keys = ["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="]

[[upstream]]
name = "org"
url = "https://cache.example.org/org-view"
identity = "ci"

[[upstream]]
url = "https://cache.nixos.org"

[identity.ci]
provider = "kubernetes"
audience = "https://cache.example.org"
[identity.ci.exchange]
url = "https://cache.example.org/token"
scope = "cache:read"
"#,
        )
        .unwrap();
        assert!(
            c.require_signatures,
            "keys set: signatures required by default"
        );
        assert_eq!(c.upstreams[1].name, "upstream-2");
        assert!(
            matches!(&c.identities["ci"].provider, Provider::File { path, .. } if path == Path::new(KUBERNETES_TOKEN_PATH))
        );
        let rendered = c.render();
        assert!(rendered.contains("max-cache-size = \"1GiB\""), "{rendered}");
        Config::parse_str(&rendered).expect("rendered config parses again");
    }

    #[test]
    fn every_error_names_its_key() {
        assert!(err("bogus = 1").contains("bogus"));
        assert!(err("listen = [\"0.0.0.0:1\"]").contains("listen[0]"));
        assert!(err("max-cache-size = \"lots\"").contains("max-cache-size"));
        assert!(err("narinfo-ttl = \"soon\"").contains("narinfo-ttl"));
        assert!(err("trusted-public-keys = [\"x\"]").contains("trusted-public-keys"));
        assert!(err("[[upstream]]\nurl = \"ftp://x\"").contains("upstream[0].url"));
        assert!(err("[[upstream]]\nurl = \"https://:hunter2@x\"").contains("upstream[0].url"));
        let e = err("[[upstream]]\nurl = \"https://x\"\nidentity = \"i\"\n[identity.i]\nprovider = \"static\"\nvariable = \"T\"\n[identity.i.exchange]\nurl = \"https://client:clientsecret@x/token\"");
        assert!(
            e.contains("exchange.url") && !e.contains("clientsecret"),
            "{e}"
        );
        let plain = "[[upstream]]\nurl = \"http://cache.example\"\nidentity = \"i\"\n[identity.i]\nprovider = \"static\"\nvariable = \"T\"\n";
        assert!(err(plain).contains("insecure-http"));
        assert!(Config::parse_str(
            &plain.replace("identity = ", "insecure-http = true\nidentity = ")
        )
        .is_ok());
        assert!(Config::parse_str(&plain.replace("cache.example", "127.0.0.1:8080")).is_ok());
        assert!(
            err("[[upstream]]\nurl = \"https://x\"\nidentity = \"nope\"")
                .contains("upstream[0].identity")
        );
        assert!(err("[[upstream]]\nurl = \"https://x\"\nfoo = 1").contains("foo"));
        assert!(err("[identity.a]\nprovider = \"magic\"").contains("identity.a.provider"));
        assert!(err("[identity.a]\nprovider = \"static\"").contains("identity.a.variable"));
        assert!(
            err("[identity.a]\nprovider = \"file\"\npath = \"/x\"\nvariable = \"V\"")
                .contains("identity.a.variable")
        );
        assert!(err("[identity.a]\nprovider = \"file\"\npath = \"/x\"\nfoo = 1").contains("foo"));
        assert!(err("[identity.a]\nprovider = \"gcp\"").contains("identity.a.audience"));
        assert!(err("[identity.a]\nprovider = \"exec\"").contains("identity.a.command"));
        assert!(
            err("[identity.a]\nprovider = \"aws\"\naudience = \"x\"\npath = \"/p\"")
                .contains("identity.a.path")
        );
    }

    #[test]
    fn presets_fill_url_auth_and_keys_and_can_be_overridden() {
        let c = Config::parse_str(
            "[[upstream]]\npreset = \"flakehub\"\n[[upstream]]\npreset = \"nixos\"",
        )
        .unwrap();
        assert_eq!(c.upstreams[0].url.as_str(), "https://cache.flakehub.com/");
        assert_eq!(
            c.upstreams[0].auth,
            Auth::Basic {
                username: "flakehub".into()
            }
        );
        assert_eq!(c.upstreams[1].auth, Auth::Bearer);
        assert_eq!(c.upstreams[1].name, "nixos", "a preset names its upstream");
        assert_eq!(
            c.trusted_public_keys.len(),
            9,
            "eight FlakeHub keys and cache.nixos.org's"
        );
        assert!(c.require_signatures);
        let c = Config::parse_str(
            "[[upstream]]\npreset = \"nixos\"\nurl = \"https://mirror.test\"\ntrusted-public-keys = []",
        )
        .unwrap();
        assert_eq!(c.upstreams[0].url.as_str(), "https://mirror.test/");
        assert!(c.trusted_public_keys.is_empty());
        assert!(err("[[upstream]]\npreset = \"other\"").contains("upstream[0].preset"));
        assert!(err("[[upstream]]\nurl = \"https://x\"\nauth = \"basic\"")
            .contains("upstream[0].username"));
        assert!(err("[[upstream]]\nurl = \"https://x\"\nauth = \"digest\"")
            .contains("upstream[0].auth"));
        assert!(err("[[upstream]]\nname = \"x\"").contains("upstream[0].url"));
        assert!(err("[identity.a]\nprovider = \"netrc\"").contains("identity.a.machine"));
    }

    #[test]
    fn allow_remote_unlocks_other_addresses() {
        let c = Config::parse_str("listen = [\"0.0.0.0:1\"]\nallow-remote = true").unwrap();
        assert!(!c.listen[0].ip().is_loopback());
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("20GiB"), Some(20 << 30));
        assert_eq!(parse_size("2 GB"), Some(2_000_000_000));
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("1.5KiB"), Some(1536));
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("5 parsecs"), None);
        assert_eq!(format_size(20 << 30), "20GiB");
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("nope"), None);
    }
}
