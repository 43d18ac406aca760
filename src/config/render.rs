//! The effective configuration as TOML, for `check-config`: defaults filled in, secrets
//! never (tokens only ever come from the environment, files or endpoints, named here).

use std::fmt::Write as _;

use super::{format_size, toml_str, url_text_for_log, Auth, Config, PushProtocol};

impl Config {
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
        if let (Some(path), Some(key)) = (&self.push_signing_key_file, &self.push_signing_key) {
            let _ = writeln!(
                out,
                "push-signing-key-file = {}  # key {}",
                toml_str(&path.display().to_string()),
                key.name()
            );
        }
        let _ = writeln!(out, "narinfo-lookahead = {}", self.narinfo_lookahead);
        let _ = writeln!(out, "nar-lookahead = {}", self.nar_lookahead);
        let _ = writeln!(out, "max-connections = {}", self.max_connections);
        let _ = writeln!(
            out,
            "shutdown-grace = \"{}\"",
            humantime::format_duration(self.shutdown_grace)
        );
        if let Some(site) = &self.site {
            let listen: Vec<String> = site
                .listen
                .iter()
                .map(|a| toml_str(&a.to_string()))
                .collect();
            let _ = writeln!(out, "\n[site]\nlisten = [{}]", listen.join(", "));
            if let Some((cert, key)) = &site.tls {
                let _ = writeln!(out, "tls-cert = {}", toml_str(&cert.display().to_string()));
                let _ = writeln!(out, "tls-key = {}", toml_str(&key.display().to_string()));
            }
            if !site.allow_from.is_empty() {
                let nets: Vec<String> = site
                    .allow_from
                    .iter()
                    .map(|n| toml_str(&n.to_string()))
                    .collect();
                let _ = writeln!(out, "allow-from = [{}]", nets.join(", "));
            }
        }
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
            if up.prefetch_nars {
                let _ = writeln!(out, "prefetch-nars = true");
            }
            let _ = writeln!(out, "unavailable = \"{}\"", up.unavailable.as_str());
            if up.insecure_http {
                let _ = writeln!(out, "insecure-http = true");
            }
            if let Auth::Basic { username } = &up.auth {
                let _ = writeln!(out, "auth = \"basic\"\nusername = {}", toml_str(username));
            }
            if let Some(ca) = &up.ca_file {
                let _ = writeln!(out, "ca-file = {}", toml_str(&ca.display().to_string()));
            }
            if let Some(site) = &up.site {
                let _ = writeln!(out, "site = {}", toml_str(site.as_str()));
            }
            if let Some(ca) = &up.site_ca_file {
                let _ = writeln!(
                    out,
                    "site-ca-file = {}",
                    toml_str(&ca.display().to_string())
                );
            }
            if let Some(push) = &up.push {
                let kind = match &push.protocol {
                    PushProtocol::Attic { cache, .. } => {
                        let _ = writeln!(out, "push-cache = {}", toml_str(cache));
                        "attic"
                    }
                    PushProtocol::FlakeHub { api, project } => {
                        let _ = writeln!(out, "flakehub-api = {}", toml_str(api.as_str()));
                        if let Some(project) = project {
                            let _ = writeln!(out, "flakehub-project = {}", toml_str(project));
                        }
                        "flakehub"
                    }
                    PushProtocol::Http => "http",
                };
                let _ = writeln!(out, "push = \"{kind}\"");
                let _ = writeln!(out, "push-skip-keys = {}", list(push.skip_keys.clone()));
                let _ = writeln!(out, "push-uids = {:?}", push.uids);
                if let Some(id) = &push.identity {
                    let _ = writeln!(out, "push-identity = {}", toml_str(id));
                }
            }
        }
        for (name, id) in &self.identities {
            let _ = writeln!(out, "\n[identity.{name}]");
            // The provider's keys as they are written, from the same serde enum that reads
            // them (no value here is a secret: tokens come from elsewhere, named only).
            match toml::to_string(&id.provider) {
                Ok(keys) => out.push_str(&keys),
                Err(e) => {
                    let _ = writeln!(out, "# provider not shown: {e}");
                }
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
