//! `[identity.NAME]`: where a token comes from. [`Provider`] is one serde enum tagged by
//! `provider`, each variant holding exactly the keys its source takes, so the list of
//! providers and of their keys is written once; the checks serde cannot make (an audience
//! where one is needed, one managed identity at most) follow.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use url::Url;

use super::units::refresh_interval;
use super::{has_userinfo, invalid, ConfigError};

pub const KUBERNETES_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// Where Determinate Nix keeps the netrc its login writes.
pub const DEFAULT_NETRC_PATH: &str = "/nix/var/determinate/netrc";

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub name: String,
    pub provider: Provider,
    pub audience: Option<String>,
    pub exchange: Option<ExchangeConfig>,
}

/// Where an identity's token comes from, with the keys each source takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Provider {
    /// The token is the value of an environment variable (tests, or a secret manager's env).
    Static {
        variable: String,
    },
    /// A JWT file re-read on a schedule.
    File {
        path: PathBuf,
        #[serde(
            rename = "refresh-interval",
            with = "refresh_interval",
            default = "every_minute"
        )]
        refresh: Duration,
    },
    /// A projected service-account token (by default the pod's own).
    Kubernetes {
        #[serde(default = "kubernetes_token_path")]
        path: PathBuf,
        #[serde(
            rename = "refresh-interval",
            with = "refresh_interval",
            default = "every_minute"
        )]
        refresh: Duration,
    },
    GithubActions {},
    /// A GitLab `id_tokens` JWT in this environment variable.
    Gitlab {
        variable: String,
    },
    Gcp {},
    Azure(AzureKeys),
    Aws {
        #[serde(default = "aws_region")]
        region: String,
    },
    /// A JWT-SVID from the SPIFFE Workload API on this unix socket (default:
    /// `SPIFFE_ENDPOINT_SOCKET`).
    Spiffe {
        #[serde(skip_serializing_if = "Option::is_none")]
        socket: Option<PathBuf>,
    },
    /// The first source the environment offers (see `identity::auto`).
    Auto(AutoKeys),
    /// A command that prints a token (or JSON with one).
    Exec {
        command: Vec<String>,
    },
    /// The password of a `machine` entry in a netrc file, re-read on a schedule.
    Netrc {
        #[serde(default = "netrc_path")]
        path: PathBuf,
        machine: String,
        #[serde(
            rename = "refresh-interval",
            with = "refresh_interval",
            default = "every_ten_seconds"
        )]
        refresh: Duration,
    },
}

/// Which user-assigned managed identity an Azure host should use (at most one key).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AzureKeys {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
}

/// What `provider = "auto"` passes on to the source it picks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AutoKeys {
    /// GitLab's `id_tokens` variable; GitLab is a candidate only when it is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variable: Option<String>,
    /// A Kubernetes projected token (default: the service account's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    #[serde(default = "aws_region")]
    pub region: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub object_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
}

/// Which of several managed identities on an Azure host to use.
#[derive(Debug, Clone, PartialEq)]
pub enum ManagedIdentity {
    ClientId(String),
    ObjectId(String),
    ResourceId(String),
}

impl AzureKeys {
    /// The one identity selected, if any (checked to be at most one when loaded).
    pub fn select(&self) -> Option<ManagedIdentity> {
        select(&self.client_id, &self.object_id, &self.resource_id)
    }
}

impl AutoKeys {
    /// The Azure identity to use if Azure is picked.
    pub fn azure(&self) -> Option<ManagedIdentity> {
        select(&self.client_id, &self.object_id, &self.resource_id)
    }
}

fn select(
    client: &Option<String>,
    object: &Option<String>,
    resource: &Option<String>,
) -> Option<ManagedIdentity> {
    (client.clone().map(ManagedIdentity::ClientId))
        .or_else(|| object.clone().map(ManagedIdentity::ObjectId))
        .or_else(|| resource.clone().map(ManagedIdentity::ResourceId))
}

fn every_minute() -> Duration {
    Duration::from_secs(60)
}

fn every_ten_seconds() -> Duration {
    Duration::from_secs(10)
}

fn kubernetes_token_path() -> PathBuf {
    PathBuf::from(KUBERNETES_TOKEN_PATH)
}

fn netrc_path() -> PathBuf {
    PathBuf::from(DEFAULT_NETRC_PATH)
}

/// As the AWS SDKs: `AWS_REGION`, `AWS_DEFAULT_REGION`, then us-east-1 (a configured
/// `region` comes first).
fn aws_region() -> String {
    std::env::var("AWS_REGION")
        .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|_| "us-east-1".into())
}

impl Provider {
    /// The name it is configured by (`provider = "..."`), from the one list, serde's.
    pub fn name(&self) -> String {
        toml::Value::try_from(self)
            .ok()
            .and_then(|v| Some(v.get("provider")?.as_str()?.to_string()))
            .unwrap_or_default()
    }

    /// The checks serde cannot make. `key` names a field of this identity.
    fn check(&self, key: &dyn Fn(&str) -> String, audience: bool) -> Result<(), ConfigError> {
        let needs_audience = matches!(
            self,
            Provider::Gcp {}
                | Provider::Azure(_)
                | Provider::Aws { .. }
                | Provider::Spiffe { .. }
                | Provider::Auto(_)
        );
        if needs_audience && !audience {
            return Err(invalid(
                key("audience"),
                format!("provider `{}` needs an audience", self.name()),
            ));
        }
        let (client, object, resource) =
            match self {
                Provider::Azure(k) => (&k.client_id, &k.object_id, &k.resource_id),
                Provider::Auto(k) => (&k.client_id, &k.object_id, &k.resource_id),
                Provider::Exec { command } if command.is_empty() => return Err(invalid(
                    key("command"),
                    "provider `exec` needs a command, e.g. [\"/usr/bin/get-token\", \"--json\"]",
                )),
                _ => return Ok(()),
            };
        let set = [
            ("client-id", client.is_some()),
            ("object-id", object.is_some()),
            ("resource-id", resource.is_some()),
        ];
        if let Some((second, _)) = set.iter().filter(|(_, on)| *on).nth(1) {
            return Err(invalid(
                key(second),
                "client-id, object-id and resource-id each select an identity: set one",
            ));
        }
        Ok(())
    }
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

/// The key a deserialization error is about, so that it is named as every other error is.
/// serde words these "missing field `x`", "unknown field `x`, expected ..." and "unknown
/// variant `x`, expected one of ..." (for the tag: `provider`); the field deserializers of
/// this module start theirs with "key: ".
fn key_of(message: &str) -> Option<&str> {
    let quoted = || message.split('`').nth(1);
    if message.starts_with("unknown variant") || message == "missing field `provider`" {
        Some("provider")
    } else if message.starts_with("missing field") || message.starts_with("unknown field") {
        quoted()
    } else {
        let (key, _) = message.split_once(": ")?;
        key.bytes()
            .all(|c| c.is_ascii_lowercase() || c == b'-')
            .then_some(key)
    }
}

/// Names the key of a deserialization error of the table at `prefix`.
fn named(prefix: &str, error: toml::de::Error) -> ConfigError {
    let message = error.message().trim().to_string();
    match key_of(&message) {
        Some(key) => invalid(format!("{prefix}.{key}"), message),
        None => invalid(prefix, message),
    }
}

/// Checks `[identity.NAME]` (with its `exchange` table) into an [`IdentityConfig`].
pub(super) fn check(name: &str, mut table: toml::Table) -> Result<IdentityConfig, ConfigError> {
    let prefix = format!("identity.{name}");
    let key = |field: &str| format!("{prefix}.{field}");
    let audience = match table.remove("audience") {
        None => None,
        Some(toml::Value::String(audience)) => Some(audience),
        Some(_) => return Err(invalid(key("audience"), "must be a string")),
    };
    let exchange = match table.remove("exchange") {
        None => None,
        Some(value) => Some(check_exchange(
            &key("exchange"),
            value.try_into().map_err(|e| named(&key("exchange"), e))?,
        )?),
    };
    let provider: Provider = toml::Value::Table(table)
        .try_into()
        .map_err(|e| named(&prefix, e))?;
    provider.check(&key, audience.is_some())?;
    Ok(IdentityConfig {
        name: name.to_string(),
        provider,
        audience,
        exchange,
    })
}

fn check_exchange(prefix: &str, ex: FileExchange) -> Result<ExchangeConfig, ConfigError> {
    let key = |field: &str| format!("{prefix}.{field}");
    let url = Url::parse(&ex.url).map_err(|e| invalid(key("url"), format!("is not a URL: {e}")))?;
    if has_userinfo(&url) || !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(
            key("url"),
            "must be an http:// or https:// URL without credentials",
        ));
    }
    if ex.client_secret_file.is_some() && ex.client_id.is_none() {
        return Err(invalid(
            key("client-id"),
            "client-secret-file needs the client-id it belongs to",
        ));
    }
    Ok(ExchangeConfig {
        url,
        audience: ex.audience,
        scope: ex.scope,
        client_id: ex.client_id,
        client_secret_file: ex.client_secret_file,
        subject_token_type: ex.subject_token_type,
        requested_token_type: ex.requested_token_type,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error texts `key_of` reads are serde's; if serde rewords them, this fails.
    #[test]
    fn serde_errors_name_their_key() {
        let check = |text: &str| {
            let table: toml::Table = toml::from_str(text).unwrap();
            super::check("a", table).unwrap_err().to_string()
        };
        assert!(check("provider = \"magic\"").starts_with("identity.a.provider:"));
        assert!(check("variable = \"x\"").starts_with("identity.a.provider:"));
        assert!(check("provider = \"static\"").starts_with("identity.a.variable:"));
        assert!(check("provider = \"gcp\"\nfoo = 1").starts_with("identity.a.foo:"));
        assert!(
            check("provider = \"file\"\npath = \"/x\"\nrefresh-interval = \"soon\"")
                .starts_with("identity.a.refresh-interval:")
        );
        assert!(check("provider = \"static\"\nvariable = \"V\"\n[exchange]\nurl = \"https://x\"\nscopes = \"y\"")
            .starts_with("identity.a.exchange.scopes:"));
        let e =
            check("provider = \"azure\"\naudience = \"x\"\nclient-id = \"c\"\nobject-id = \"o\"");
        assert!(e.starts_with("identity.a.object-id:"), "{e}");
    }

    #[test]
    fn names_come_from_the_one_list() {
        assert_eq!(Provider::GithubActions {}.name(), "github-actions");
        assert_eq!(
            Provider::Kubernetes {
                path: kubernetes_token_path(),
                refresh: every_minute()
            }
            .name(),
            "kubernetes"
        );
    }
}
