//! The exchange service's own TOML file (docs/exchange.md; an example in the README): where it listens,
//! how it mints, which issuers it trusts and the rules. Every error names its key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::policy::{Glob, Rights, Rule, Who};
use crate::config::{parse_duration, ConfigError};

mod report;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileExchange {
    listen: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    token_format: Option<String>,
    signing_key_file: Option<PathBuf>,
    ttl: Option<String>,
    minted_issuer: Option<String>,
    minted_audience: Option<String>,
    deny_file: Option<PathBuf>,
    audit_log: Option<PathBuf>,
    rate_limit: Option<u32>,
    #[serde(default)]
    issuer: Vec<FileIssuer>,
    aws: Option<FileAws>,
    #[serde(default)]
    rule: Vec<FileRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileIssuer {
    url: String,
    audience: String,
    jwks_url: Option<String>,
    jwks_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileAws {
    audience: String,
    sts_endpoint: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileRule {
    issuer: Option<String>,
    aws_arn: Option<String>,
    aws_account: Option<String>,
    #[serde(default)]
    claims: BTreeMap<String, String>,
    grant: BTreeMap<String, Vec<String>>,
}

/// The exchange service's file, checked (not to be confused with `config::ExchangeConfig`,
/// an identity's client side of an exchange).
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub listen: SocketAddr,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub signing_key_file: PathBuf,
    pub ttl: Duration,
    pub minted_issuer: Option<String>,
    pub minted_audience: Option<String>,
    pub deny_file: Option<PathBuf>,
    pub audit_log: Option<PathBuf>,
    /// Exchanges per subject per minute.
    pub rate_limit: u32,
    pub issuers: Vec<IssuerConfig>,
    pub aws: Option<AwsConfig>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// Exactly as tokens carry it in `iss`.
    pub url: String,
    pub audience: String,
    pub jwks: JwksSource,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub enum JwksSource {
    Discovery,
    Url(Url),
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct AwsConfig {
    pub audience: String,
    /// Where the checked request is sent instead of the token's own STS host (a VPC
    /// endpoint, a test double); the `Host` it was signed for is kept.
    pub sts_endpoint: Option<Url>,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_TTL: Duration = Duration::from_secs(15 * 60);
const DEFAULT_RATE_LIMIT: u32 = 60;

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Whether a TOML file is an exchange configuration (it has rules or a signing key) rather
/// than the sidecar's.
pub fn looks_like_exchange(text: &str) -> bool {
    toml::from_str::<toml::Table>(text)
        .map(|t| t.contains_key("rule") || t.contains_key("signing-key-file"))
        .unwrap_or(false)
}

impl ServiceConfig {
    pub fn load(path: &Path) -> Result<ServiceConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ServiceConfig::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<ServiceConfig, ConfigError> {
        let file: FileExchange = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let listen_text = file.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|_| invalid("listen", format!("`{listen_text}` is not ADDRESS:PORT")))?;
        let tls = check_tls(file.tls_cert, file.tls_key)?;
        if let Some(other) = file.token_format.as_deref().filter(|f| *f != "attic") {
            return Err(invalid(
                "token-format",
                format!("`{other}` is not one of attic"),
            ));
        }
        let signing_key_file = file.signing_key_file.ok_or_else(|| {
            invalid(
                "signing-key-file",
                "is required (atticd's base64 HS256 secret, or an RSA private key in PEM)",
            )
        })?;
        super::mint::Minter::load(&signing_key_file, None, None, DEFAULT_TTL)
            .map_err(|e| invalid("signing-key-file", e.to_string()))?;
        let ttl = check_ttl(file.ttl.as_deref())?;
        let rate_limit = file.rate_limit.unwrap_or(DEFAULT_RATE_LIMIT);
        if rate_limit == 0 {
            return Err(invalid(
                "rate-limit",
                "must be at least 1 (exchanges per subject per minute)",
            ));
        }
        let mut issuers = Vec::new();
        for (i, issuer) in file.issuer.into_iter().enumerate() {
            issuers.push(check_issuer(i, issuer)?);
        }
        let aws = file.aws.map(check_aws).transpose()?;
        if issuers.is_empty() && aws.is_none() {
            return Err(invalid("issuer", "trust at least one [[issuer]] or [aws]"));
        }
        let mut rules = Vec::new();
        for (i, rule) in file.rule.into_iter().enumerate() {
            rules.push(check_rule(i, rule, &issuers, aws.is_some())?);
        }
        if rules.is_empty() {
            return Err(invalid(
                "rule",
                "without a [[rule]] every exchange is refused",
            ));
        }
        Ok(ServiceConfig {
            listen,
            tls,
            signing_key_file,
            ttl,
            minted_issuer: file.minted_issuer,
            minted_audience: file.minted_audience,
            deny_file: file.deny_file,
            audit_log: file.audit_log,
            rate_limit,
            issuers,
            aws,
            rules,
        })
    }
}

/// `tls-cert` and `tls-key`: both or neither, each a readable file.
fn check_tls(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
    Ok(match (cert, key) {
        (Some(cert), Some(key)) => {
            for (name, p) in [("tls-cert", &cert), ("tls-key", &key)] {
                if !p.is_file() {
                    return Err(invalid(
                        name,
                        format!("{} is not a readable file", p.display()),
                    ));
                }
            }
            Some((cert, key))
        }
        (None, None) => None,
        (Some(_), None) => return Err(invalid("tls-key", "is needed with tls-cert")),
        (None, Some(_)) => return Err(invalid("tls-cert", "is needed with tls-key")),
    })
}

/// How long minted tokens live: between 10 s and a day.
fn check_ttl(text: Option<&str>) -> Result<Duration, ConfigError> {
    let Some(text) = text else {
        return Ok(DEFAULT_TTL);
    };
    parse_duration(text)
        .filter(|d| *d >= Duration::from_secs(10) && *d <= Duration::from_secs(24 * 3600))
        .ok_or_else(|| {
            invalid(
                "ttl",
                format!("`{text}` is not a duration between 10s and 24h"),
            )
        })
}

fn check_aws(aws: FileAws) -> Result<AwsConfig, ConfigError> {
    let sts_endpoint = aws
        .sts_endpoint
        .map(|text| {
            Url::parse(&text)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https"))
                .ok_or_else(|| {
                    invalid(
                        "aws.sts-endpoint",
                        format!("`{text}` is not an http(s) URL"),
                    )
                })
        })
        .transpose()?;
    Ok(AwsConfig {
        audience: aws.audience,
        sts_endpoint,
    })
}

fn check_issuer(i: usize, issuer: FileIssuer) -> Result<IssuerConfig, ConfigError> {
    let key = |field: &str| format!("issuer[{i}].{field}");
    let url = Url::parse(&issuer.url)
        .map_err(|e| invalid(key("url"), format!("`{}` is not a URL: {e}", issuer.url)))?;
    let loopback = matches!(url.host(), Some(url::Host::Ipv4(ip)) if ip.is_loopback())
        || matches!(url.host(), Some(url::Host::Ipv6(ip)) if ip.is_loopback());
    if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
        return Err(invalid(
            key("url"),
            "must be https:// (http:// only on loopback)",
        ));
    }
    if issuer.audience.is_empty() {
        return Err(invalid(key("audience"), "must not be empty"));
    }
    let jwks = match (issuer.jwks_url, issuer.jwks_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                key("jwks-file"),
                "set jwks-url or jwks-file, not both",
            ))
        }
        (Some(text), None) => JwksSource::Url(
            Url::parse(&text)
                .ok()
                .filter(|u| matches!(u.scheme(), "http" | "https"))
                .ok_or_else(|| {
                    invalid(key("jwks-url"), format!("`{text}` is not an http(s) URL"))
                })?,
        ),
        (None, Some(file)) => {
            if !file.is_file() {
                return Err(invalid(
                    key("jwks-file"),
                    format!("{} is not a readable file", file.display()),
                ));
            }
            JwksSource::File(file)
        }
        (None, None) => JwksSource::Discovery,
    };
    if let Some(ca) = &issuer.ca_file {
        if !ca.is_file() {
            return Err(invalid(
                key("ca-file"),
                format!("{} is not a readable file", ca.display()),
            ));
        }
    }
    Ok(IssuerConfig {
        url: issuer.url,
        audience: issuer.audience,
        jwks,
        ca_file: issuer.ca_file,
    })
}

fn check_rule(
    i: usize,
    rule: FileRule,
    issuers: &[IssuerConfig],
    aws: bool,
) -> Result<Rule, ConfigError> {
    let key = |field: &str| format!("rule[{i}].{field}");
    let who = check_who(&key, &rule, issuers, aws)?;
    let grant = check_grant(&key, rule.grant)?;
    Ok(Rule { who, grant })
}

/// Whom a rule is for: an issuer's tokens (with claim patterns), or AWS callers.
fn check_who(
    key: &dyn Fn(&str) -> String,
    rule: &FileRule,
    issuers: &[IssuerConfig],
    aws: bool,
) -> Result<Who, ConfigError> {
    let glob =
        |field: &str, text: &str| Glob::new(text).map_err(|e| invalid(key(field), e.to_string()));
    Ok(match (&rule.issuer, &rule.aws_arn, &rule.aws_account) {
        (Some(issuer), None, None) => {
            if !issuers.iter().any(|c| &c.url == issuer) {
                return Err(invalid(
                    key("issuer"),
                    format!("`{issuer}` is not an [[issuer]]"),
                ));
            }
            let mut claims = Vec::new();
            for (path, pattern) in &rule.claims {
                if path.is_empty() || path.split('.').any(str::is_empty) {
                    return Err(invalid(
                        key("claims"),
                        format!("`{path}` is not a dotted claim path"),
                    ));
                }
                claims.push((
                    path.split('.').map(str::to_string).collect(),
                    glob("claims", pattern)?,
                ));
            }
            Who::Issuer {
                issuer: issuer.clone(),
                claims,
            }
        }
        (None, arn, account) if arn.is_some() || account.is_some() => {
            if !aws {
                return Err(invalid(key("aws-arn"), "needs an [aws] table"));
            }
            if !rule.claims.is_empty() {
                return Err(invalid(
                    key("claims"),
                    "is for issuer rules; AWS rules match aws-arn and aws-account",
                ));
            }
            Who::Aws {
                arn: arn.as_deref().map(|a| glob("aws-arn", a)).transpose()?,
                account: account
                    .as_deref()
                    .map(|a| glob("aws-account", a))
                    .transpose()?,
            }
        }
        (None, None, None) => {
            return Err(invalid(
                key("issuer"),
                "say whom the rule is for: issuer, or aws-arn / aws-account",
            ))
        }
        _ => {
            return Err(invalid(
                key("issuer"),
                "a rule is for an issuer or for AWS, not both",
            ))
        }
    })
}

/// What a rule grants: cache names (or prefixes ending in `*`), each pull and/or push.
fn check_grant(
    key: &dyn Fn(&str) -> String,
    grants: BTreeMap<String, Vec<String>>,
) -> Result<BTreeMap<String, Rights>, ConfigError> {
    if grants.is_empty() {
        return Err(invalid(key("grant"), "grants nothing"));
    }
    let mut grant = BTreeMap::new();
    for (pattern, rights) in grants {
        if pattern.is_empty() || pattern[..pattern.len() - 1].contains('*') {
            return Err(invalid(
                key("grant"),
                format!("`{pattern}`: a cache name, or a prefix ending in `*`"),
            ));
        }
        let mut parsed = Rights::default();
        for right in rights {
            match right.as_str() {
                "pull" => parsed.pull = true,
                "push" => parsed.push = true,
                other => {
                    return Err(invalid(
                        key("grant"),
                        format!("`{other}` is not pull or push"),
                    ))
                }
            }
        }
        grant.insert(pattern, parsed);
    }
    Ok(grant)
}
