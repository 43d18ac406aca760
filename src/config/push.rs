//! An upstream's push keys: `push`, `push-skip-keys`, `push-uids`, `push-identity`, and the
//! protocol's own (`push-cache` for Attic, `flakehub-api`/`flakehub-project` for FlakeHub).

use std::collections::BTreeMap;

use url::Url;

use super::file_upstream::FileUpstream;
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
        return no_push_keys(&key, up).map(|()| None);
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
        "attic" => attic(&key, up, url)?,
        "flakehub" => flakehub(&key, up)?,
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

/// Without `push`, no push key may be set: it would be silently ignored.
fn no_push_keys(key: &dyn Fn(&str) -> String, up: &FileUpstream) -> Result<(), ConfigError> {
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
    Ok(())
}

/// Attic: the API is at the server's root, the URL without its last segment (the cache).
fn attic(
    key: &dyn Fn(&str) -> String,
    up: &FileUpstream,
    url: &Url,
) -> Result<PushProtocol, ConfigError> {
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
    Ok(PushProtocol::Attic { server, cache })
}

/// FlakeHub: its API (the public one unless `flakehub-api`), and `owner/flake` if given.
fn flakehub(key: &dyn Fn(&str) -> String, up: &FileUpstream) -> Result<PushProtocol, ConfigError> {
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
    Ok(PushProtocol::FlakeHub {
        api,
        project: up.flakehub_project.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn push_of(upstream: &str) -> Result<Option<PushConfig>, crate::config::ConfigError> {
        Config::parse_str(&format!(
            "[[upstream]]\n{upstream}\n[identity.p]\nprovider = \"static\"\nvariable = \"T\"\n"
        ))
        .map(|c| c.upstreams[0].push.clone())
    }

    #[test]
    fn attic_takes_the_cache_from_the_url_and_the_rest_has_defaults() {
        let push = push_of("url = \"https://attic.example.org/a/org-ci\"\npush = \"attic\"")
            .unwrap()
            .unwrap();
        assert_eq!(
            push.protocol,
            PushProtocol::Attic {
                server: Url::parse("https://attic.example.org/a").unwrap(),
                cache: "org-ci".into()
            }
        );
        assert_eq!(push.skip_keys, ["cache.nixos.org-1"]);
        assert_eq!(push.uids, [0]);
        let push = push_of("url = \"https://x/c\"\npush = \"http\"\npush-identity = \"p\"\npush-uids = [0, 1000]\npush-skip-keys = [\"k-1:AAAA\"]")
            .unwrap()
            .unwrap();
        assert_eq!(
            (push.identity.as_deref(), push.uids, push.skip_keys),
            (Some("p"), vec![0, 1000], vec!["k-1".to_string()])
        );
        assert_eq!(push_of("url = \"https://x/c\"").unwrap(), None);
        // What check-config prints reads back the same.
        let text = "[[upstream]]\nurl = \"https://x/c\"\npush = \"flakehub\"\nflakehub-project = \"o/f\"\n";
        let config = Config::parse_str(text).unwrap();
        let again = Config::parse_str(&config.render()).unwrap();
        assert_eq!(config.upstreams[0].push, again.upstreams[0].push);
    }

    #[test]
    fn push_errors_name_their_key() {
        let err = |upstream: &str| push_of(upstream).unwrap_err().to_string();
        assert!(err("url = \"https://x/c\"\npush = \"s3\"").contains("upstream[0].push"));
        assert!(err("url = \"https://x\"\npush = \"attic\"").contains("upstream[0].url"));
        assert!(err("url = \"https://x/c\"\npush-uids = [0]").contains("upstream[0].push-uids"));
        assert!(
            err("url = \"https://x/c\"\npush = \"http\"\npush-identity = \"nope\"")
                .contains("upstream[0].push-identity")
        );
        assert!(
            err("url = \"https://x/c\"\npush = \"http\"\npush-cache = \"c\"")
                .contains("upstream[0].push-cache")
        );
        assert!(
            err("url = \"https://x/c\"\npush = \"flakehub\"\nflakehub-project = \"x\"")
                .contains("upstream[0].flakehub-project")
        );
    }
}
