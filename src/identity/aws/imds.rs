//! EC2 instance metadata (IMDSv2): the endpoint the SDKs would use, the session that opens it,
//! and the instance role's credentials, the last place the AWS provider looks.

use std::time::Duration;

use http::Method;

use super::{AwsCredentials, JsonCredentials};
use crate::http::{fetch_small, snippet, CallError, Client};
use crate::identity::FetchError;
use crate::secret::Secret;

/// The IMDSv2 endpoint, unless disabled: `AWS_EC2_METADATA_SERVICE_ENDPOINT`, else the IPv4
/// or (with `AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE=IPv6`) IPv6 link-local address.
pub fn imds_endpoint() -> Option<String> {
    if std::env::var("AWS_EC2_METADATA_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    let ipv6 = std::env::var("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE")
        .is_ok_and(|m| m.eq_ignore_ascii_case("ipv6"));
    let endpoint = std::env::var("AWS_EC2_METADATA_SERVICE_ENDPOINT").unwrap_or_else(|_| {
        if ipv6 {
            "http://[fd00:ec2::254]".into()
        } else {
            "http://169.254.169.254".into()
        }
    });
    Some(endpoint.trim_end_matches('/').to_string())
}

/// The request that opens an IMDSv2 session (also `auto`'s probe).
pub fn imds_session_request(endpoint: &str) -> (String, [(&'static str, &'static str); 1]) {
    (
        format!("{endpoint}/latest/api/token"),
        [("x-aws-ec2-metadata-token-ttl-seconds", "21600")],
    )
}

/// How long IMDS may take to answer: it is on the link, so 1 s (with retries) as the SDKs.
const IMDS_TIMEOUT: Duration = Duration::from_secs(1);

/// EC2 instance metadata, version 2 (a session token first).
pub(super) async fn from_imds(client: &Client) -> Result<AwsCredentials, FetchError> {
    let Some(endpoint) = imds_endpoint() else {
        return Err(FetchError::NoToken("no AWS credentials in the environment, the shared files or a container endpoint, and IMDS is disabled (AWS_EC2_METADATA_DISABLED)".into()));
    };
    let endpoint = endpoint.as_str();
    let (session_url, session_headers) = imds_session_request(endpoint);
    let (status, session) = fetch_small(
        client,
        Method::PUT,
        &session_url,
        &session_headers,
        IMDS_TIMEOUT,
    )
    .await
    .map_err(|e| {
        let hint = if matches!(e, CallError::Timeout { .. }) {
            " (in a container on EC2, the instance's metadata hop limit must be at least 2)"
        } else {
            ""
        };
        FetchError::NoToken(format!(
            "no AWS credentials in the environment, the shared files or a container endpoint, and IMDS failed: {e}{hint}"
        ))
    })?;
    if !status.is_success() {
        return Err(FetchError::NoToken(format!(
            "IMDSv2 session token request answered {status}"
        )));
    }
    let session = Secret::new(String::from_utf8_lossy(&session).trim());
    let header = [("x-aws-ec2-metadata-token", session.expose())];
    let roles_url = format!("{endpoint}/latest/meta-data/iam/security-credentials/");
    let (status, roles) =
        fetch_small(client, Method::GET, &roles_url, &header, IMDS_TIMEOUT).await?;
    if !status.is_success() {
        return Err(FetchError::NoToken(format!(
            "IMDS answered {status} for the instance role (is an instance profile attached?)"
        )));
    }
    let roles = String::from_utf8_lossy(&roles);
    let role = roles
        .lines()
        .next()
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .ok_or(FetchError::NoToken("IMDS lists no instance role".into()))?;
    let (status, body) = fetch_small(
        client,
        Method::GET,
        &format!("{roles_url}{role}"),
        &header,
        IMDS_TIMEOUT,
    )
    .await?;
    if !status.is_success() {
        return Err(FetchError::NoToken(format!(
            "IMDS answered {status} for role {role}: {}",
            snippet(&body)
        )));
    }
    JsonCredentials::parse(&body, "IMDS")
}
