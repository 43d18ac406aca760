//! Azure managed identity on every host `ManagedIdentityCredential` knows, chosen from the
//! environment the same way and in the same order:
//!
//! - App Service, Functions, Container Apps: `IDENTITY_ENDPOINT` + `IDENTITY_HEADER`,
//!   `GET ?api-version=2019-08-01&resource=` with `X-IDENTITY-HEADER`.
//! - Azure Arc: `IDENTITY_ENDPOINT` + `IMDS_ENDPOINT`; the first GET answers 401 with
//!   `WWW-Authenticate: Basic realm=<key file>`, and the key file's contents (readable only by
//!   the agent's group) are sent back as `Authorization: Basic <key>`.
//! - Cloud Shell: `MSI_ENDPOINT`, a form POST `resource=` with `Metadata: true` (with
//!   `MSI_SECRET` too, the 2017 App Service protocol).
//! - AKS workload identity: `AZURE_FEDERATED_TOKEN_FILE` (+ `AZURE_TENANT_ID`,
//!   `AZURE_CLIENT_ID`), a client-credentials grant with the projected token as the client
//!   assertion at `AZURE_AUTHORITY_HOST` (default `https://login.microsoftonline.com`).
//! - Otherwise a VM's IMDS: `GET http://169.254.169.254/metadata/identity/oauth2/token?
//!   api-version=2018-02-01&resource=` with `Metadata: true` (host overridable with
//!   `AZURE_POD_IDENTITY_AUTHORITY_HOST`, as the SDKs allow), retried on 404 and 410 too,
//!   which IMDS answers while the identity is being set up.
//!
//! Answers carry `expires_in` as a number or a string, or only `expires_on`; when there is no
//! `expires_in` the token's own `exp - iat` decides. A scope such as `api://x/.default` is
//! the resource `api://x` for the managed identity endpoints.

use super::FetchError;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde::Deserialize;

use super::RawToken;
use crate::config::ManagedIdentity;
use crate::http::{snippet, Client, SmallCall};
use crate::secret::Secret;

const TIMEOUT: Duration = Duration::from_secs(10);
/// Where the Arc agent puts its key files (the SDKs refuse a realm pointing elsewhere).
pub const ARC_KEY_DIR: &str = "/var/opt/azcmagent/tokens";
const ARC_MAX_KEY: u64 = 4096;
pub const IMDS_DEFAULT: &str = "http://169.254.169.254";

/// The managed identity endpoint this environment offers.
#[derive(Debug, Clone, PartialEq)]
pub enum Host {
    AppService { endpoint: String, header: Secret },
    ServiceFabric,
    Arc { endpoint: String },
    CloudShell { endpoint: String },
    AppService2017 { endpoint: String, secret: Secret },
    WorkloadIdentity { token_file: PathBuf },
    Vm { imds: String },
}

impl Host {
    /// Reads the environment in `ManagedIdentityCredential`'s order.
    pub fn detect() -> Host {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if let Some(endpoint) = var("IDENTITY_ENDPOINT") {
            if let Some(header) = var("IDENTITY_HEADER") {
                if var("IDENTITY_SERVER_THUMBPRINT").is_some() {
                    return Host::ServiceFabric;
                }
                return Host::AppService {
                    endpoint,
                    header: Secret::new(header),
                };
            }
            if var("IMDS_ENDPOINT").is_some() {
                return Host::Arc { endpoint };
            }
        }
        if let Some(endpoint) = var("MSI_ENDPOINT") {
            return match var("MSI_SECRET") {
                Some(secret) => Host::AppService2017 {
                    endpoint,
                    secret: Secret::new(secret),
                },
                None => Host::CloudShell { endpoint },
            };
        }
        if let Some(file) = var("AZURE_FEDERATED_TOKEN_FILE") {
            return Host::WorkloadIdentity {
                token_file: file.into(),
            };
        }
        Host::Vm {
            imds: var("AZURE_POD_IDENTITY_AUTHORITY_HOST").unwrap_or_else(|| IMDS_DEFAULT.into()),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Host::AppService { .. } => "App Service",
            Host::ServiceFabric => "Service Fabric",
            Host::Arc { .. } => "Azure Arc",
            Host::CloudShell { .. } => "Cloud Shell",
            Host::AppService2017 { .. } => "App Service (MSI_SECRET)",
            Host::WorkloadIdentity { .. } => "AKS workload identity",
            Host::Vm { .. } => "Azure IMDS",
        }
    }
}

/// The resource a managed identity endpoint wants for a configured audience or scope.
fn resource(audience: &str) -> &str {
    audience.strip_suffix("/.default").unwrap_or(audience)
}

pub async fn fetch(
    client: &Client,
    audience: &str,
    select: Option<&ManagedIdentity>,
) -> Result<RawToken, FetchError> {
    let host = Host::detect();
    let resource = resource(audience);
    let shown = host.name();
    let unsupported = |what: &str| {
        Err(FetchError::NoToken(format!(
            "{shown} does not support {what}; remove client-id/object-id/resource-id"
        )))
    };
    let answer = match &host {
        Host::AppService { endpoint, header } => {
            let mut query = vec![("api-version", "2019-08-01"), ("resource", resource)];
            query.extend(select.map(|s| match s {
                ManagedIdentity::ClientId(id) => ("client_id", id.as_str()),
                ManagedIdentity::ObjectId(id) => ("principal_id", id.as_str()),
                ManagedIdentity::ResourceId(id) => ("mi_res_id", id.as_str()),
            }));
            let url = with_query(endpoint, &query)?;
            get(client, &url, &[("x-identity-header", header.expose())], &[]).await?
        }
        Host::ServiceFabric => {
            return Err(FetchError::NoToken("Service Fabric managed identity (IDENTITY_SERVER_THUMBPRINT) is not supported; use provider `exec` with a helper".into()))
        }
        Host::Arc { endpoint } => {
            if select.is_some() {
                return unsupported("user-assigned identities");
            }
            arc(client, endpoint, resource, Path::new(ARC_KEY_DIR)).await?
        }
        Host::CloudShell { endpoint } => {
            if select.is_some() {
                return unsupported("user-assigned identities");
            }
            cloud_shell(client, endpoint, resource).await?
        }
        Host::AppService2017 { endpoint, secret } => {
            let mut query = vec![("api-version", "2017-09-01"), ("resource", resource)];
            match select {
                Some(ManagedIdentity::ClientId(id)) => query.push(("clientid", id)),
                Some(_) => return unsupported("object-id or resource-id"),
                None => {}
            }
            let url = with_query(endpoint, &query)?;
            get(client, &url, &[("secret", secret.expose())], &[]).await?
        }
        Host::WorkloadIdentity { token_file } => {
            workload_identity(client, token_file, resource, select).await?
        }
        Host::Vm { imds } => {
            let mut query = vec![("api-version", "2018-02-01"), ("resource", resource)];
            query.extend(select.map(|s| match s {
                ManagedIdentity::ClientId(id) => ("client_id", id.as_str()),
                ManagedIdentity::ObjectId(id) => ("object_id", id.as_str()),
                ManagedIdentity::ResourceId(id) => ("msi_res_id", id.as_str()),
            }));
            let url = with_query(
                &format!("{}/metadata/identity/oauth2/token", imds.trim_end_matches('/')),
                &query,
            )?;
            get(client, &url, &[("metadata", "true")], &[404, 410]).await?
        }
    };
    token_from(shown, answer)
}

/// Cloud Shell's endpoint takes the resource as a form.
async fn cloud_shell(
    client: &Client,
    endpoint: &str,
    resource: &str,
) -> Result<http::Response<bytes::Bytes>, FetchError> {
    let form = form(&[("resource", resource)]);
    let call = SmallCall {
        method: Method::POST,
        url: endpoint,
        headers: &[
            ("metadata", "true"),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        body: form.into(),
        timeout: TIMEOUT,
        also_retry: &[],
    };
    Ok(call.send(client).await?)
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    form.extend_pairs(pairs);
    form.finish()
}

fn with_query(base: &str, pairs: &[(&str, &str)]) -> Result<String, FetchError> {
    let mut url = url::Url::parse(base)
        .map_err(|e| FetchError::NoToken(format!("`{base}` is not a URL: {e}")))?;
    url.query_pairs_mut().extend_pairs(pairs);
    Ok(url.into())
}

async fn get(
    client: &Client,
    url: &str,
    headers: &[(&str, &str)],
    also_retry: &[u16],
) -> Result<http::Response<Bytes>, FetchError> {
    SmallCall {
        method: Method::GET,
        url,
        headers,
        body: Bytes::new(),
        timeout: TIMEOUT,
        also_retry,
    }
    .send(client)
    .await
    .map_err(FetchError::from)
}

/// Azure Arc's challenge: the first request is refused with the path of a key file, whose
/// contents prove the caller may read the agent's files. The path is checked as the SDKs do
/// (inside `key_dir`, `.key`, small) so a hostile endpoint cannot make us send any file.
pub async fn arc(
    client: &Client,
    endpoint: &str,
    resource: &str,
    key_dir: &Path,
) -> Result<http::Response<Bytes>, FetchError> {
    let url = with_query(
        endpoint,
        &[("api-version", "2020-06-01"), ("resource", resource)],
    )?;
    let challenge = get(client, &url, &[("metadata", "true")], &[]).await?;
    if challenge.status() != http::StatusCode::UNAUTHORIZED {
        return Err(FetchError::NoToken(format!(
            "Azure Arc answered {} where it challenges with 401",
            challenge.status()
        )));
    }
    let realm = challenge
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once("realm="))
        .map(|(_, path)| path.trim().to_string())
        .ok_or(FetchError::NoToken(
            "Azure Arc's 401 has no WWW-Authenticate realm".into(),
        ))?;
    let key = read_arc_key(Path::new(&realm), key_dir)?;
    let authorization = format!("Basic {}", key.expose());
    get(
        client,
        &url,
        &[("metadata", "true"), ("authorization", &authorization)],
        &[],
    )
    .await
}

fn read_arc_key(path: &Path, key_dir: &Path) -> Result<Secret, FetchError> {
    let shown = path.display();
    if path.parent() != Some(key_dir) || path.extension().is_none_or(|e| e != "key") {
        return Err(FetchError::NoToken(format!(
            "Azure Arc pointed at {shown}, which is not a .key file in {}",
            key_dir.display()
        )));
    }
    let size = std::fs::metadata(path)
        .map_err(|e| FetchError::NoToken(format!("Azure Arc key file {shown}: {e}")))?
        .len();
    if size > ARC_MAX_KEY {
        return Err(FetchError::NoToken(format!(
            "Azure Arc key file {shown} is larger than {ARC_MAX_KEY} bytes"
        )));
    }
    let key = std::fs::read_to_string(path).map_err(|e| {
        FetchError::NoToken(format!(
            "Azure Arc key file {shown}: {e} (is this user in the himds group?)"
        ))
    })?;
    Ok(Secret::new(key.trim()))
}

/// AKS workload identity: the projected service-account token (re-read each time, the
/// kubelet rotates it) is the client assertion of a client-credentials grant.
async fn workload_identity(
    client: &Client,
    token_file: &Path,
    resource: &str,
    select: Option<&ManagedIdentity>,
) -> Result<http::Response<Bytes>, FetchError> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let client_id = match select {
        Some(ManagedIdentity::ClientId(id)) => id.clone(),
        Some(_) => {
            return Err(FetchError::NoToken(
                "AKS workload identity selects the identity by client-id only".to_string(),
            ))
        }
        None => var("AZURE_CLIENT_ID").ok_or(FetchError::NoToken(
            "AZURE_FEDERATED_TOKEN_FILE is set but AZURE_CLIENT_ID is not".into(),
        ))?,
    };
    let tenant = var("AZURE_TENANT_ID").ok_or(FetchError::NoToken(
        "AZURE_FEDERATED_TOKEN_FILE is set but AZURE_TENANT_ID is not".into(),
    ))?;
    let authority =
        var("AZURE_AUTHORITY_HOST").unwrap_or_else(|| "https://login.microsoftonline.com".into());
    let assertion = Secret::new(
        std::fs::read_to_string(token_file)
            .map_err(|e| {
                FetchError::NoToken(format!(
                    "AZURE_FEDERATED_TOKEN_FILE {}: {e}",
                    token_file.display()
                ))
            })?
            .trim(),
    );
    let scope = format!("{resource}/.default");
    let body = form(&[
        ("client_id", &client_id),
        ("grant_type", "client_credentials"),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", assertion.expose()),
        ("scope", &scope),
    ]);
    let url = format!(
        "{}/{tenant}/oauth2/v2.0/token",
        authority.trim_end_matches('/')
    );
    let answer = SmallCall {
        method: Method::POST,
        url: &url,
        headers: &[("content-type", "application/x-www-form-urlencoded")],
        body: body.into(),
        timeout: TIMEOUT,
        also_retry: &[],
    }
    .send(client)
    .await?;
    // An error answer may quote the assertion back.
    let (parts, body) = answer.into_parts();
    let body = Bytes::from(assertion.scrub(&String::from_utf8_lossy(&body)));
    Ok(http::Response::from_parts(parts, body))
}

#[derive(Deserialize)]
struct Answer {
    access_token: String,
    #[serde(default, deserialize_with = "number_or_string")]
    expires_in: Option<u64>,
}

fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Number(u64),
        Text(String),
    }
    Ok(match Option::<Either>::deserialize(d)? {
        Some(Either::Number(n)) => Some(n),
        Some(Either::Text(t)) => t.trim().parse().ok(),
        None => None,
    })
}

fn token_from(host: &str, answer: http::Response<Bytes>) -> Result<RawToken, FetchError> {
    let status = answer.status();
    let body = answer.body();
    if !status.is_success() {
        let hint = match status.as_u16() {
            400 if host == "Azure IMDS" => " (is a managed identity assigned to this VM?)",
            _ => "",
        };
        return Err(FetchError::NoToken(format!(
            "{host} answered {status}{hint}: {}",
            snippet(body)
        )));
    }
    let answer: Answer = serde_json::from_slice(body)
        .map_err(|_| FetchError::NoToken(format!("{host} answered without an access_token")))?;
    Ok(RawToken {
        expires_in: answer.expires_in.map(Duration::from_secs),
        ..RawToken::new(Secret::new(answer.access_token))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_names_its_resource() {
        assert_eq!(resource("api://nix-cache/.default"), "api://nix-cache");
        assert_eq!(resource("https://cache.test"), "https://cache.test");
    }

    #[test]
    fn an_arc_realm_outside_the_key_directory_is_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("abc.key");
        std::fs::write(&key, "s3cret\n").unwrap();
        assert_eq!(read_arc_key(&key, dir.path()).unwrap().expose(), "s3cret");
        for bad in [dir.path().join("abc.txt"), PathBuf::from("/etc/shadow")] {
            std::fs::write(dir.path().join("abc.txt"), "x").unwrap();
            let e = read_arc_key(&bad, dir.path()).unwrap_err();
            assert!(e.to_string().contains("not a .key file"), "{e}");
        }
        std::fs::write(&key, vec![b'k'; 5000]).unwrap();
        assert!(read_arc_key(&key, dir.path())
            .unwrap_err()
            .to_string()
            .contains("larger than"));
    }
}
