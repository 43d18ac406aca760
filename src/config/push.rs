//! An upstream's push keys: `push`, `push-skip-keys`, `push-uids`, `push-identity`, and the
//! protocol's own (`push-cache` for Attic, `flakehub-api`/`flakehub-project` for FlakeHub).

use std::collections::BTreeMap;

use url::Url;

use super::upstream::FileUpstream;
use super::{invalid, ConfigError, IdentityConfig};

/// Where and how one upstream takes uploads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushConfig {
    pub protocol: PushProtocol,
    /// Names of signing keys (`cache.nixos.org-1`): a path signed by one is not uploaded.
    pub skip_keys: Vec<String>,
    /// Local uids allowed to push (`PUT`, `/_sidecar/push`).
    pub uids: Vec<u32>,
    /// The `[identity.*]` table whose token uploads carry (default: the upstream's).
    pub identity: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushProtocol {
    /// Attic's API at `server` (the URL without the cache name) for `cache`.
    Attic { server: Url, cache: String },
    /// FlakeHub: the project lookup at `api`, then Attic's API at the upstream's URL, for the
    /// cache `<organization uuid>:<project uuid>`.
    FlakeHub { api: Url, project: Option<String> },
    /// Nix's own: `PUT nar/<file>` then `PUT <hash>.narinfo` below the upstream's URL.
    Http,
}

pub const DEFAULT_SKIP_KEYS: &[&str] = &["cache.nixos.org-1"];
pub const FLAKEHUB_API: &str = "https://api.flakehub.com";

/// The push keys of the `i`th upstream (`None`: it is never pushed to).
pub(super) fn check(
    i: usize,
    up: &FileUpstream,
    url: &Url,
    identities: &BTreeMap<String, IdentityConfig>,
) -> Result<Option<PushConfig>, ConfigError> {
    let key = |field: &str| format!("upstream[{i}].{field}");
    let Some(kind) = up.push.as_deref() else {
        for (field, set) in [
            ("push-skip-keys", up.push_skip_keys.is_some()),
            ("push-uids", up.push_uids.is_some()),
            ("push-identity", up.push_identity.is_some()),
            ("push-cache", up.push_cache.is_some()),
            ("flakehub-api", up.flakehub_api.is_some()),
            ("flakehub-project", up.flakehub_project.is_some()),
        ] {
            if set {
                return Err(invalid(key(field), "only means something with `push` set"));
            }
        }
        return Ok(None);
    };
    let only_for = |field: &str, set: bool, protocol: &str| {
        if set && kind != protocol {
            Err(invalid(
                key(field),
                format!("is only used with push = \"{protocol}\""),
            ))
        } else {
            Ok(())
        }
    };
    only_for("push-cache", up.push_cache.is_some(), "attic")?;
    only_for("flakehub-api", up.flakehub_api.is_some(), "flakehub")?;
    only_for(
        "flakehub-project",
        up.flakehub_project.is_some(),
        "flakehub",
    )?;
    let protocol = match kind {
        "attic" => {
            // The API is at the server's root: the URL without its last segment (the cache).
            let segments: Vec<String> = url
                .path_segments()
                .map(|s| s.filter(|s| !s.is_empty()).map(str::to_string).collect())
                .unwrap_or_default();
            let mut server = url.clone();
            if let Some((_, parent)) = segments.split_last() {
                server.set_path(&format!("/{}", parent.join("/")));
            }
            let cache = up
                .push_cache
                .clone()
                .or_else(|| segments.last().cloned())
                .ok_or_else(|| {
                    invalid(
                        key("url"),
                        "push = \"attic\" takes the cache name from the URL's last path segment, and this URL has none (or set push-cache)",
                    )
                })?;
            if cache.is_empty() || cache.contains('/') {
                return Err(invalid(key("push-cache"), "is not a cache name"));
            }
            PushProtocol::Attic { server, cache }
        }
        "flakehub" => {
            let text = up.flakehub_api.as_deref().unwrap_or(FLAKEHUB_API);
            let api = Url::parse(text)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https"))
                .ok_or_else(|| {
                    invalid(
                        key("flakehub-api"),
                        format!("`{text}` is not an http(s) URL"),
                    )
                })?;
            if let Some(project) = &up.flakehub_project {
                if project.split('/').count() != 2 || project.split('/').any(str::is_empty) {
                    return Err(invalid(key("flakehub-project"), "is `owner/flake`"));
                }
            }
            PushProtocol::FlakeHub {
                api,
                project: up.flakehub_project.clone(),
            }
        }
        "http" => PushProtocol::Http,
        other => {
            return Err(invalid(
                key("push"),
                format!("`{other}` is not one of attic, flakehub, http"),
            ))
        }
    };
    let identity = match &up.push_identity {
        Some(id) if !identities.contains_key(id) => {
            return Err(invalid(
                key("push-identity"),
                format!("no [identity.{id}] table"),
            ))
        }
        Some(id) => Some(id.clone()),
        None => up.identity.clone(),
    };
    let skip_keys: Vec<String> = match &up.push_skip_keys {
        // A whole public key names its key too: its name is what Sig lines carry.
        Some(keys) => keys
            .iter()
            .map(|k| k.split(':').next().unwrap_or_default().to_string())
            .collect(),
        None => DEFAULT_SKIP_KEYS.iter().map(|k| k.to_string()).collect(),
    };
    if skip_keys.iter().any(String::is_empty) {
        return Err(invalid(key("push-skip-keys"), "holds an empty key name"));
    }
    Ok(Some(PushConfig {
        protocol,
        skip_keys,
        uids: up.push_uids.clone().unwrap_or_else(|| vec![0]),
        identity,
    }))
}
