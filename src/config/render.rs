//! The effective configuration as TOML, for `check-config`: defaults filled in, secrets
//! never (tokens only ever come from the environment, files or endpoints, named here).

use std::fmt::{Display, Write as _};
use std::path::Path;
use std::time::Duration;

use super::identity::{ExchangeConfig, IdentityConfig};
use super::site::SiteConfig;
use super::UpstreamConfig;
use super::{format_size, toml_str, url_text_for_log, Auth, Config, PushConfig, PushProtocol};

/// TOML being written, a key at a time.
#[derive(Default)]
struct Toml(String);

impl Toml {
    /// `key = value`, the value written as it is (numbers, booleans, ready-made TOML).
    fn raw(&mut self, key: &str, value: impl Display) {
        let _ = writeln!(self.0, "{key} = {value}");
    }

    fn text(&mut self, key: &str, value: &str) {
        self.raw(key, toml_str(value));
    }

    fn path(&mut self, key: &str, value: &Path) {
        self.text(key, &value.display().to_string());
    }

    fn list<T: Display>(&mut self, key: &str, items: &[T]) {
        let quoted: Vec<String> = items.iter().map(|s| toml_str(&s.to_string())).collect();
        self.raw(key, format!("[{}]", quoted.join(", ")));
    }

    fn duration(&mut self, key: &str, value: Duration) {
        self.raw(key, format!("\"{}\"", humantime::format_duration(value)));
    }

    fn table(&mut self, header: &str) {
        let _ = writeln!(self.0, "\n{header}");
    }
}

impl Config {
    /// The effective configuration as TOML. It holds no secret: tokens only ever come from
    /// the environment, files or endpoints, and those are shown by name, never by value.
    pub fn render(&self) -> String {
        let mut out = Toml::default();
        self.render_top(&mut out);
        if let Some(site) = &self.site {
            render_site(&mut out, site);
        }
        for up in &self.upstreams {
            render_upstream(&mut out, up);
        }
        for (name, id) in &self.identities {
            render_identity(&mut out, name, id);
        }
        out.0
    }

    fn render_top(&self, out: &mut Toml) {
        out.list("listen", &self.listen);
        out.raw("allow-remote", self.allow_remote);
        out.raw("allowed-uids", format!("{:?}", self.allowed_uids));
        out.path("cache-dir", &self.cache_dir);
        out.raw(
            "max-cache-size",
            format!("\"{}\"", format_size(self.max_cache_size)),
        );
        out.raw(
            "min-free-space",
            format!("\"{}\"", format_size(self.min_free_space)),
        );
        out.duration("narinfo-ttl", self.narinfo_ttl);
        out.duration("negative-ttl", self.negative_ttl);
        out.raw("priority", self.priority);
        out.list("trusted-public-keys", &self.trusted_public_keys);
        out.raw("require-signatures", self.require_signatures);
        if let (Some(path), Some(key)) = (&self.push_signing_key_file, &self.push_signing_key) {
            let shown = format!(
                "{}  # key {}",
                toml_str(&path.display().to_string()),
                key.name()
            );
            out.raw("push-signing-key-file", shown);
        }
        out.raw("narinfo-lookahead", self.narinfo_lookahead);
        out.raw("nar-lookahead", self.nar_lookahead);
        out.raw("max-connections", self.max_connections);
        out.duration("shutdown-grace", self.shutdown_grace);
    }
}

fn render_site(out: &mut Toml, site: &SiteConfig) {
    out.table("[site]");
    out.list("listen", &site.listen);
    if let Some((cert, key)) = &site.tls {
        out.path("tls-cert", cert);
        out.path("tls-key", key);
    }
    if !site.allow_from.is_empty() {
        out.list("allow-from", &site.allow_from);
    }
}

fn render_upstream(out: &mut Toml, up: &UpstreamConfig) {
    out.table("[[upstream]]");
    out.text("name", &up.name);
    out.text("url", up.url.as_str());
    if let Some(id) = &up.identity {
        out.text("identity", id);
    }
    if up.prefetch_nars {
        out.raw("prefetch-nars", true);
    }
    out.raw("unavailable", format!("\"{}\"", up.unavailable.as_str()));
    if up.insecure_http {
        out.raw("insecure-http", true);
    }
    if let Auth::Basic { username } = &up.auth {
        out.raw("auth", "\"basic\"");
        out.text("username", username);
    }
    if let Some(ca) = &up.ca_file {
        out.path("ca-file", ca);
    }
    if let Some(site) = &up.site {
        out.text("site", site.as_str());
    }
    if let Some(ca) = &up.site_ca_file {
        out.path("site-ca-file", ca);
    }
    if let Some(push) = &up.push {
        render_push(out, push);
    }
}

fn render_push(out: &mut Toml, push: &PushConfig) {
    let kind = match &push.protocol {
        PushProtocol::Attic { cache, .. } => {
            out.text("push-cache", cache);
            "attic"
        }
        PushProtocol::FlakeHub { api, project } => {
            out.text("flakehub-api", api.as_str());
            if let Some(project) = project {
                out.text("flakehub-project", project);
            }
            "flakehub"
        }
        PushProtocol::Http => "http",
    };
    out.raw("push", format!("\"{kind}\""));
    out.list("push-skip-keys", &push.skip_keys);
    out.raw("push-uids", format!("{:?}", push.uids));
    if let Some(id) = &push.identity {
        out.text("push-identity", id);
    }
}

fn render_identity(out: &mut Toml, name: &str, id: &IdentityConfig) {
    out.table(&format!("[identity.{name}]"));
    // The provider's keys as they are written, from the same serde enum that reads them (no
    // value here is a secret: tokens come from elsewhere, named only).
    match toml::to_string(&id.provider) {
        Ok(keys) => out.0.push_str(&keys),
        Err(e) => {
            let _ = writeln!(out.0, "# provider not shown: {e}");
        }
    }
    if let Some(aud) = &id.audience {
        out.text("audience", aud);
    }
    if let Some(ex) = &id.exchange {
        render_exchange(out, name, ex);
    }
}

fn render_exchange(out: &mut Toml, name: &str, ex: &ExchangeConfig) {
    out.table(&format!("[identity.{name}.exchange]"));
    out.text("url", &url_text_for_log(&ex.url));
    let secret_file = ex
        .client_secret_file
        .as_ref()
        .map(|p| p.display().to_string());
    for (key, value) in [
        ("audience", &ex.audience),
        ("client-id", &ex.client_id),
        ("client-secret-file", &secret_file),
        ("subject-token-type", &ex.subject_token_type),
        ("requested-token-type", &ex.requested_token_type),
        ("scope", &ex.scope),
    ] {
        if let Some(value) = value {
            out.text(key, value);
        }
    }
}
