//! AWS: a SigV4-presigned `sts:GetCallerIdentity` instead of a JWT.
//!
//! The token is `nix-sidecar-aws-v1.` + base64url (no padding) of a presigned
//! `https://sts.<region>.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15&X-Amz-...`
//! whose `X-Amz-SignedHeaders` are `host;x-nix-sidecar-audience`: the audience header is signed
//! but not sent, so a verifier replaying the URL to STS with its own audience proves the token
//! was made for it. STS honours it for 15 minutes; it is re-signed after 9.
//!
//! Credentials, in the SDKs' order: environment; the shared config and credentials files
//! (static keys or `credential_process`); web identity (EKS IRSA); the ECS/EKS container
//! endpoint; IMDSv2. Temporary credentials are renewed 5 minutes before their `Expiration`.

mod imds;
mod profile;

use crate::identity::FetchError;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
};
use aws_sigv4::sign::v4;
use base64::Engine;
use http::Method;
use serde::Deserialize;

use super::RawToken;
use crate::http::{fetch_small, Client};
use crate::secret::Secret;
use imds::from_imds;
pub use imds::{imds_endpoint, imds_session_request};

pub const TOKEN_PREFIX: &str = "nix-sidecar-aws-v1.";
pub const SUBJECT_TOKEN_TYPE: &str = "urn:nix-sidecar:token-type:aws-sts-presigned-url";
pub const AUDIENCE_HEADER: &str = "x-nix-sidecar-audience";
const VALIDITY: Duration = Duration::from_secs(15 * 60);
const RESIGN_AFTER: Duration = Duration::from_secs(9 * 60);
const TIMEOUT: Duration = Duration::from_secs(5);
const RENEW_BEFORE: Duration = Duration::from_secs(5 * 60);

#[derive(Clone)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
    pub expiration: Option<SystemTime>,
}

pub struct Aws {
    pub region: String,
    pub audience: String,
    cached: Mutex<Option<AwsCredentials>>,
}

impl Aws {
    pub fn new(region: &str, audience: &str) -> Aws {
        Aws {
            region: region.to_string(),
            audience: audience.to_string(),
            cached: Mutex::new(None),
        }
    }

    pub async fn fetch(&self, client: &Client) -> Result<RawToken, FetchError> {
        let credentials = self.credentials(client).await?;
        let now = SystemTime::now();
        let (validity, resign_after) = lifetimes(credentials.expiration, now)?;
        let url = presign_for(&credentials, &self.region, &self.audience, now, validity)?;
        let token = format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(url.expose())
        );
        Ok(RawToken {
            expires_in: Some(validity),
            reread_after: Some(resign_after),
            ..RawToken::new(Secret::new(token))
        })
    }

    async fn credentials(&self, client: &Client) -> Result<AwsCredentials, FetchError> {
        let fresh = |c: &AwsCredentials| {
            c.expiration
                .is_none_or(|at| at > SystemTime::now() + RENEW_BEFORE)
        };
        if let Some(c) = self.cached.lock().unwrap().as_ref().filter(|c| fresh(c)) {
            return Ok(c.clone());
        }
        // The SDKs' order: the environment, the shared files, then web identity (EKS IRSA:
        // the pod's role, not the node's), then the container endpoint, then the instance's.
        let credentials = if let Some(c) = from_env() {
            c
        } else if let Some(c) = from_profile().await? {
            c
        } else if let Some(c) = from_web_identity(client, &self.region).await? {
            c
        } else if let Some(c) = from_container(client).await? {
            c
        } else {
            from_imds(client).await?
        };
        *self.cached.lock().unwrap() = Some(credentials.clone());
        Ok(credentials)
    }
}

/// How long a token signed at `now` may live and when to sign again: 15 and 9 minutes, but
/// never past the expiry of the credentials that sign it.
fn lifetimes(
    expiration: Option<SystemTime>,
    now: SystemTime,
) -> Result<(Duration, Duration), FetchError> {
    let Some(at) = expiration else {
        return Ok((VALIDITY, RESIGN_AFTER));
    };
    let left = at
        .duration_since(now)
        .map_err(|_| FetchError::NoToken("the AWS credentials have already expired".to_string()))?;
    let validity = VALIDITY.min(left);
    if validity < Duration::from_secs(1) {
        return Err(FetchError::NoToken(
            "the AWS credentials expire within a second".into(),
        ));
    }
    Ok((validity, RESIGN_AFTER.min(validity * 2 / 3)))
}

/// The presigned GetCallerIdentity URL (a secret: it is a bearer credential for 15 minutes).
pub fn presign(
    credentials: &AwsCredentials,
    region: &str,
    audience: &str,
    time: SystemTime,
) -> Result<Secret, FetchError> {
    presign_for(credentials, region, audience, time, VALIDITY)
}

/// [`presign`] for a token that lives `validity` (at most 15 minutes).
fn presign_for(
    credentials: &AwsCredentials,
    region: &str,
    audience: &str,
    time: SystemTime,
    validity: Duration,
) -> Result<Secret, FetchError> {
    let identity = Credentials::new(
        &credentials.access_key_id,
        credentials.secret_access_key.expose(),
        credentials
            .session_token
            .as_ref()
            .map(|t| t.expose().to_string()),
        credentials.expiration,
        "nix-sidecar",
    )
    .into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(validity.min(VALIDITY));
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("sts")
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| FetchError::NoToken(format!("SigV4 parameters: {e}")))?
        .into();
    let host = format!("sts.{region}.{}", dns_suffix(region));
    let base = format!("https://{host}/?Action=GetCallerIdentity&Version=2011-06-15");
    let headers = [("host", host.as_str()), (AUDIENCE_HEADER, audience)];
    let request = SignableRequest::new("GET", &base, headers.into_iter(), SignableBody::Bytes(&[]))
        .map_err(|e| FetchError::NoToken(format!("SigV4 request: {e}")))?;
    let (instructions, _) = sign(request, &params)
        .map_err(|e| FetchError::NoToken(format!("SigV4 signing failed: {e}")))?
        .into_parts();
    let mut url = url::Url::parse(&base).map_err(|e| FetchError::NoToken(e.to_string()))?;
    for (name, value) in instructions.params() {
        url.query_pairs_mut().append_pair(name, value);
    }
    Ok(Secret::new(url.to_string()))
}

/// Where credentials would come from before IMDS, if anywhere: `auto` picks AWS on these
/// without probing the link-local address.
pub fn source_without_imds() -> Result<Option<&'static str>, FetchError> {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty());
    Ok(if from_env().is_some() {
        Some("AWS environment credentials")
    } else if profile::load()?.is_some() {
        Some("AWS shared config profile")
    } else if set("AWS_WEB_IDENTITY_TOKEN_FILE") && set("AWS_ROLE_ARN") {
        Some("AWS web identity (IRSA)")
    } else if set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        || set("AWS_CONTAINER_CREDENTIALS_FULL_URI")
    {
        Some("AWS container credentials")
    } else {
        None
    })
}

async fn from_profile() -> Result<Option<AwsCredentials>, FetchError> {
    Ok(match profile::load()? {
        Some(profile::ProfileCredentials::Static(c)) => Some(c),
        Some(profile::ProfileCredentials::Process(command)) => {
            Some(profile::run_process(&command).await?)
        }
        None => None,
    })
}

fn from_env() -> Option<AwsCredentials> {
    let id = std::env::var("AWS_ACCESS_KEY_ID")
        .ok()
        .filter(|v| !v.is_empty())?;
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY")
        .ok()
        .filter(|v| !v.is_empty())?;
    Some(AwsCredentials {
        access_key_id: id,
        secret_access_key: Secret::new(secret),
        session_token: std::env::var("AWS_SESSION_TOKEN")
            .ok()
            .filter(|v| !v.is_empty())
            .map(Secret::new),
        expiration: None,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct JsonCredentials {
    code: Option<String>,
    access_key_id: String,
    secret_access_key: String,
    token: Option<String>,
    expiration: Option<String>,
}

impl JsonCredentials {
    fn parse(body: &[u8], source: &str) -> Result<AwsCredentials, FetchError> {
        let c: JsonCredentials = serde_json::from_slice(body).map_err(|_| {
            FetchError::NoToken(format!("{source} answered without AWS credentials"))
        })?;
        if let Some(code) = c.code.as_deref().filter(|c| *c != "Success") {
            return Err(FetchError::NoToken(format!(
                "{source} answered Code={code}"
            )));
        }
        Ok(AwsCredentials {
            access_key_id: c.access_key_id,
            secret_access_key: Secret::new(c.secret_access_key),
            session_token: c.token.map(Secret::new),
            expiration: c
                .expiration
                .map(|e| {
                    humantime::parse_rfc3339_weak(&e).map_err(|_| {
                        FetchError::NoToken(format!(
                            "{source} answered an unreadable Expiration `{e}`"
                        ))
                    })
                })
                .transpose()?,
        })
    }
}

/// EKS IAM Roles for Service Accounts: the projected token in `AWS_WEB_IDENTITY_TOKEN_FILE`
/// (read again each time credentials are renewed) exchanged for the role in `AWS_ROLE_ARN` by
/// an unsigned `AssumeRoleWithWebIdentity`, at `AWS_ENDPOINT_URL_STS`, `AWS_ENDPOINT_URL` or the
/// region's STS endpoint.
async fn from_web_identity(
    client: &Client,
    region: &str,
) -> Result<Option<AwsCredentials>, FetchError> {
    let (Ok(token_file), Ok(role)) = (
        std::env::var("AWS_WEB_IDENTITY_TOKEN_FILE"),
        std::env::var("AWS_ROLE_ARN"),
    ) else {
        return Ok(None);
    };
    let token = Secret::new(
        std::fs::read_to_string(&token_file)
            .map_err(|e| {
                FetchError::NoToken(format!("AWS_WEB_IDENTITY_TOKEN_FILE {token_file}: {e}"))
            })?
            .trim(),
    );
    let session = std::env::var("AWS_ROLE_SESSION_NAME")
        .unwrap_or_else(|_| format!("nix-sidecar-{}", crate::clock::unix_now()));
    let endpoint = std::env::var("AWS_ENDPOINT_URL_STS")
        .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
        .unwrap_or_else(|_| format!("https://sts.{region}.{}", dns_suffix(region)));
    let form: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("Action", "AssumeRoleWithWebIdentity")
        .append_pair("Version", "2011-06-15")
        .append_pair("RoleArn", &role)
        .append_pair("RoleSessionName", &session)
        .append_pair("WebIdentityToken", token.expose())
        .finish();
    let headers = [("content-type", "application/x-www-form-urlencoded")];
    let (status, body) = crate::http::send_small(
        client,
        Method::POST,
        endpoint.trim_end_matches('/'),
        &headers,
        form.into(),
        TIMEOUT,
    )
    .await?;
    let text = token.scrub(&String::from_utf8_lossy(&body));
    if !status.is_success() {
        let code = xml_text(&text, "Code").unwrap_or("no error code");
        return Err(FetchError::NoToken(format!(
            "STS AssumeRoleWithWebIdentity for {role} answered {status}: {code}"
        )));
    }
    let field = |name: &str| {
        xml_text(&text, name).map(str::to_string).ok_or_else(|| {
            FetchError::NoToken(format!(
                "STS AssumeRoleWithWebIdentity answered without {name}"
            ))
        })
    };
    let expiration = field("Expiration")?;
    Ok(Some(AwsCredentials {
        access_key_id: field("AccessKeyId")?,
        secret_access_key: Secret::new(field("SecretAccessKey")?),
        session_token: Some(Secret::new(field("SessionToken")?)),
        expiration: Some(humantime::parse_rfc3339_weak(&expiration).map_err(|_| {
            FetchError::NoToken(format!(
                "STS answered an unreadable Expiration `{expiration}`"
            ))
        })?),
    }))
}

/// The text of the first `<name>` element of a small XML answer.
fn xml_text<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let start = xml.find(&format!("<{name}>"))? + name.len() + 2;
    let end = start + xml[start..].find(&format!("</{name}>"))?;
    Some(xml[start..end].trim())
}

/// AWS's DNS suffix for a region (the China partition has its own).
fn dns_suffix(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    }
}

/// ECS task roles and EKS Pod Identity.
async fn from_container(client: &Client) -> Result<Option<AwsCredentials>, FetchError> {
    let Some(url) = container_url(
        std::env::var("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI").ok(),
        std::env::var("AWS_CONTAINER_CREDENTIALS_FULL_URI").ok(),
    )?
    else {
        return Ok(None);
    };
    let token = match std::env::var("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE") {
        Ok(path) => Some(Secret::new(
            std::fs::read_to_string(&path)
                .map_err(|e| {
                    FetchError::NoToken(format!(
                        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE {path}: {e}"
                    ))
                })?
                .trim(),
        )),
        Err(_) => std::env::var("AWS_CONTAINER_AUTHORIZATION_TOKEN")
            .ok()
            .map(Secret::new),
    };
    let authorization = token.as_ref().map(|t| t.expose().to_string());
    let mut headers = vec![("accept", "application/json")];
    if let Some(a) = &authorization {
        headers.push(("authorization", a));
    }
    let (status, body) = fetch_small(client, Method::GET, &url, &headers, TIMEOUT).await?;
    if !status.is_success() {
        return Err(FetchError::NoToken(format!(
            "AWS container credentials endpoint answered {status}"
        )));
    }
    JsonCredentials::parse(&body, "the AWS container credentials endpoint").map(Some)
}

/// The container credentials URL, as the SDKs choose it: the relative URI (on the ECS agent's
/// address) first; a full URI only over https, or over http to a loopback address or the ECS
/// and EKS Pod Identity agents' addresses (anything else could be a credential thief's).
fn container_url(
    relative: Option<String>,
    full: Option<String>,
) -> Result<Option<String>, FetchError> {
    if let Some(relative) = relative {
        return Ok(Some(format!("http://169.254.170.2{relative}")));
    }
    let Some(full) = full else {
        return Ok(None);
    };
    let url = url::Url::parse(&full).map_err(|e| {
        FetchError::NoToken(format!(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI is not a URL: {e}"
        ))
    })?;
    let allowed_host = match url.host() {
        Some(url::Host::Ipv4(ip)) => {
            ip.is_loopback()
                || ip.octets() == [169, 254, 170, 2]
                || ip.octets() == [169, 254, 170, 23]
        }
        Some(url::Host::Ipv6(ip)) => {
            ip.is_loopback() || ip == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23)
        }
        Some(url::Host::Domain(name)) => name == "localhost",
        None => false,
    };
    if url.scheme() == "https" || (url.scheme() == "http" && allowed_host) {
        Ok(Some(full))
    } else {
        Err(FetchError::NoToken("AWS_CONTAINER_CREDENTIALS_FULL_URI must be https, or http to a loopback or container agent address".into()))
    }
}

#[cfg(test)]
mod tests;
