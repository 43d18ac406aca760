//! `[[upstream]]`: the caches, in order, with their presets, authentication and keys.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use url::Url;

use super::file_upstream::FileUpstream;
use super::{
    has_userinfo, invalid, is_loopback_host, url_text_for_log, ConfigError, IdentityConfig,
};
use crate::nix::narinfo::TrustedKeys;

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
    /// Start the NAR download when one of its narinfos is served.
    pub prefetch_nars: bool,
    /// Uploads go here too (`push = ...`).
    pub push: Option<super::PushConfig>,
    /// What Nix is told of a narinfo this upstream might have while it cannot be asked.
    pub unavailable: Unavailable,
    /// The site cache asked first (`site = ...`), and the CA it is checked against.
    pub site: Option<Url>,
    pub site_ca_file: Option<PathBuf>,
}

/// `unavailable = "fail" | "miss"` (README, "When the cache is down").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// 503 with Retry-After: Nix stops rather than rebuild what the cache may hold (fleets).
    Fail,
    /// 404 with the reason: Nix builds it (CI builders: the cache is an optimisation).
    Miss,
}

impl Unavailable {
    pub fn parse(key: &str, value: &str) -> Result<Unavailable, ConfigError> {
        match value {
            "fail" => Ok(Unavailable::Fail),
            "miss" => Ok(Unavailable::Miss),
            other => Err(invalid(
                key,
                format!(
                    "`{other}` is not \"fail\" (503: Nix stops) or \"miss\" (404: Nix builds it)"
                ),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Unavailable::Fail => "fail",
            Unavailable::Miss => "miss",
        }
    }
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
            serde_json::from_str(include_str!("../../nixos-module/presets.json"))
                .expect("nixos-module/presets.json is valid")
        });
    PRESETS.get(name)
}

/// The preset a command-line `--upstream` names: its name (`nixos`), or its URL
/// (`https://cache.nixos.org`, with or without a trailing slash), which then brings its keys.
pub(super) fn preset_named_by(text: &str) -> Option<&'static str> {
    static NAMES: std::sync::LazyLock<Vec<(String, String)>> = std::sync::LazyLock::new(|| {
        let all: BTreeMap<String, Preset> =
            serde_json::from_str(include_str!("../../nixos-module/presets.json"))
                .expect("nixos-module/presets.json is valid");
        all.into_iter().map(|(name, p)| (name, p.url)).collect()
    });
    let bare = text.trim_end_matches('/');
    NAMES
        .iter()
        .find(|(name, url)| name == text || url.trim_end_matches('/') == bare)
        .map(|(name, _)| preset(name).map(|_| name.as_str()))?
}

/// Checks the `i`th `[[upstream]]` against the identities and the upstreams before it.
pub(super) fn check(
    i: usize,
    up: FileUpstream,
    identities: &BTreeMap<String, IdentityConfig>,
    earlier: &[UpstreamConfig],
    unavailable: Unavailable,
) -> Result<UpstreamConfig, ConfigError> {
    let key = |field: &str| format!("upstream[{i}].{field}");
    let unavailable = match &up.unavailable {
        Some(value) => Unavailable::parse(&key("unavailable"), value)?,
        None => unavailable,
    };
    let preset = match &up.preset {
        Some(name) => Some(preset(name).ok_or_else(|| {
            invalid(
                key("preset"),
                format!("`{name}` is not one of flakehub, nixos"),
            )
        })?),
        None => None,
    };
    let url = check_url(&key, &up, preset)?;
    let auth = check_auth(&key, &up, preset)?;
    let upstream_keys = match (&up.trusted_public_keys, &preset) {
        (Some(keys), _) => keys.clone(),
        (None, Some(p)) => p.keys.clone(),
        (None, None) => vec![],
    };
    TrustedKeys::parse(&upstream_keys)
        .map_err(|e| invalid(key("trusted-public-keys"), e.to_string()))?;
    let insecure_http = up.insecure_http.unwrap_or(false);
    if up.identity.is_some() && url.scheme() == "http" && !is_loopback_host(&url) && !insecure_http
    {
        return Err(invalid(
                key("url"),
                "sends this machine's token over plain http:// to another host; use https:// (or set insecure-http = true)",
            ));
    }
    if insecure_http {
        tracing::warn!(upstream = %url_text_for_log(&url), "insecure-http: the token crosses the network unencrypted");
    }
    let site = check_site(&key, &up, insecure_http)?;
    let push = super::push::check(i, &up, &url, identities)?;
    let name = check_name(&key, &up, i, earlier)?;
    check_references(&key, &up, identities)?;
    Ok(UpstreamConfig {
        name,
        url,
        identity: up.identity,
        ca_file: up.ca_file,
        auth,
        trusted_public_keys: upstream_keys,
        insecure_http,
        prefetch_nars: up.prefetch_nars.unwrap_or(false),
        push,
        unavailable,
        site,
        site_ca_file: up.site_ca_file,
    })
}

/// `url` (or the preset's): http(s), with a host, and nothing a token could leak through.
fn check_url(
    key: &dyn Fn(&str) -> String,
    up: &FileUpstream,
    preset: Option<&Preset>,
) -> Result<Url, ConfigError> {
    let url_text = match (&up.url, preset) {
        (Some(url), _) => url.clone(),
        (None, Some(p)) => p.url.clone(),
        (None, None) => return Err(invalid(key("url"), "is required (or set a preset)")),
    };
    let url = Url::parse(&url_text)
        .map_err(|e| invalid(key("url"), format!("`{url_text}` is not a URL: {e}")))?;
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
    Ok(url)
}

/// `auth` and `username` (or the preset's way of presenting the token).
fn check_auth(
    key: &dyn Fn(&str) -> String,
    up: &FileUpstream,
    preset: Option<&Preset>,
) -> Result<Auth, ConfigError> {
    Ok(match (up.auth.as_deref(), &up.username, preset) {
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
    })
}

/// The upstream's name (given, the preset's, or `upstream-N`): one word, used once.
fn check_name(
    key: &dyn Fn(&str) -> String,
    up: &FileUpstream,
    i: usize,
    earlier: &[UpstreamConfig],
) -> Result<String, ConfigError> {
    let name = up
        .name
        .clone()
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
    if earlier.iter().any(|u| u.name == name) {
        return Err(invalid(
            key("name"),
            format!("`{name}` names two upstreams"),
        ));
    }
    Ok(name)
}

/// What the upstream refers to exists: its identity's table, its CA file.
fn check_references(
    key: &dyn Fn(&str) -> String,
    up: &FileUpstream,
    identities: &BTreeMap<String, IdentityConfig>,
) -> Result<(), ConfigError> {
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
    Ok(())
}

/// `site` and `site-ca-file`: the site gets this machine's token, so https:// unless it is on
/// loopback (or insecure-http says so).
fn check_site(
    key: &dyn Fn(&str) -> String,
    up: &FileUpstream,
    insecure_http: bool,
) -> Result<Option<Url>, ConfigError> {
    if let Some(ca) = &up.site_ca_file {
        if up.site.is_none() {
            return Err(invalid(key("site-ca-file"), "is only used with site = ..."));
        }
        if !ca.is_file() {
            return Err(invalid(
                key("site-ca-file"),
                format!("{} is not a readable file", ca.display()),
            ));
        }
    }
    let Some(text) = &up.site else {
        return Ok(None);
    };
    let url = Url::parse(text)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
        .filter(|u| u.query().is_none() && u.fragment().is_none() && !has_userinfo(u))
        .ok_or_else(|| {
            invalid(
                key("site"),
                format!("`{text}` is not an http:// or https:// URL with a host (and nothing after the path)"),
            )
        })?;
    if url.scheme() == "http" && !is_loopback_host(&url) && !insecure_http {
        return Err(invalid(
            key("site"),
            "sends this machine's token over plain http:// to another host; use https:// (the site's [site] tls-cert)",
        ));
    }
    Ok(Some(url))
}
