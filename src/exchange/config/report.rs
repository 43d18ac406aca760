//! What `check-config` says of an exchange configuration: its effective settings, and the
//! settings that work but are probably not meant.

use url::Url;

use super::{JwksSource, ServiceConfig};

impl ServiceConfig {
    /// What `check-config` prints: the effective settings, the key file by name only.
    pub fn describe(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "listen = \"{}\"", self.listen);
        if let Some((cert, key)) = &self.tls {
            let _ = writeln!(
                out,
                "tls-cert = \"{}\"\ntls-key = \"{}\"",
                cert.display(),
                key.display()
            );
        }
        let _ = writeln!(out, "token-format = \"attic\"");
        let _ = writeln!(
            out,
            "signing-key-file = \"{}\"",
            self.signing_key_file.display()
        );
        let _ = writeln!(out, "ttl = \"{}\"", humantime::format_duration(self.ttl));
        let _ = writeln!(out, "rate-limit = {}", self.rate_limit);
        for (key, value) in [
            ("minted-issuer", self.minted_issuer.clone()),
            ("minted-audience", self.minted_audience.clone()),
            (
                "deny-file",
                self.deny_file.as_ref().map(|p| p.display().to_string()),
            ),
            (
                "audit-log",
                self.audit_log.as_ref().map(|p| p.display().to_string()),
            ),
        ] {
            if let Some(value) = value {
                let _ = writeln!(out, "{key} = \"{value}\"");
            }
        }
        for issuer in &self.issuers {
            let _ = writeln!(
                out,
                "\n[[issuer]]\nurl = \"{}\"\naudience = \"{}\"",
                issuer.url, issuer.audience
            );
            match &issuer.jwks {
                JwksSource::Discovery => {}
                JwksSource::Url(url) => {
                    let _ = writeln!(out, "jwks-url = \"{url}\"");
                }
                JwksSource::File(path) => {
                    let _ = writeln!(out, "jwks-file = \"{}\"", path.display());
                }
            }
        }
        if let Some(aws) = &self.aws {
            let _ = writeln!(out, "\n[aws]\naudience = \"{}\"", aws.audience);
        }
        let _ = writeln!(out, "\n# {} rule(s)", self.rules.len());
        out
    }
}

impl ServiceConfig {
    /// What `check-config` warns about: settings that work but are probably not meant, each
    /// naming its key and the risk.
    pub fn warnings(&self) -> Vec<String> {
        use crate::exchange::policy::Who;
        let mut out = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            match &rule.who {
                Who::Issuer { issuer, claims } if claims.iter().all(|(_, g)| g.is_anything()) => {
                    let who = match issuer.as_str() {
                        "https://token.actions.githubusercontent.com" => {
                            "every GitHub Actions job of every repository on GitHub".to_string()
                        }
                        "https://gitlab.com" => {
                            "every CI job of every project on gitlab.com".into()
                        }
                        other => format!("every token {other} issues for this audience"),
                    };
                    out.push(format!(
                        "rule[{i}]: no claims narrow it, so {who} gets its grant; add claims such as repository = \"your-org/*\""
                    ));
                }
                Who::Aws { arn, account }
                    if arn.as_ref().is_none_or(|g| g.is_anything())
                        && account.as_ref().is_none_or(|g| g.is_anything()) =>
                {
                    out.push(format!(
                        "rule[{i}]: aws-arn and aws-account match anything, so every AWS identity in every account gets its grant; name your account or role"
                    ));
                }
                _ => {}
            }
        }
        let plain_remote = |url: &Url| {
            url.scheme() == "http"
                && !matches!(url.host(), Some(url::Host::Ipv4(ip)) if ip.is_loopback())
                && !matches!(url.host(), Some(url::Host::Ipv6(ip)) if ip.is_loopback())
                && url.host_str() != Some("localhost")
        };
        for (i, issuer) in self.issuers.iter().enumerate() {
            if let JwksSource::Url(url) = &issuer.jwks {
                if plain_remote(url) {
                    out.push(format!(
                        "issuer[{i}].jwks-url: plain http:// to another host, so anyone on the path can substitute the keys and mint any identity; use https://"
                    ));
                }
            }
        }
        if let Some(endpoint) = self.aws.as_ref().and_then(|a| a.sts_endpoint.as_ref()) {
            if plain_remote(endpoint) {
                out.push("aws.sts-endpoint: plain http:// to another host, so anyone on the path can answer for STS and claim any AWS identity; use https://".into());
            }
        }
        match &self.deny_file {
            None => out.push(
                "deny-file is not set: a leaked identity token cannot be revoked before it expires"
                    .into(),
            ),
            Some(path) => {
                if let Err(e) = std::fs::read(path) {
                    out.push(format!(
                        "deny-file: cannot read {}: {e}; the exchange refuses to start without it (an empty file denies nobody)",
                        path.display()
                    ));
                }
            }
        }
        out
    }
}
