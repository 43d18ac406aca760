//! `provider = "auto"`: the first identity source this environment offers, in the documented
//! order (docs/configuration.md): GitHub Actions, GitLab (the configured `variable`), a Kubernetes projected token,
//! a SPIFFE Workload API socket, GCP, Azure, AWS.
//!
//! The first four and the environment-announced Azure and AWS hosts are recognised from
//! variables and files alone. The metadata servers (GCP, an Azure VM's IMDS, EC2's IMDS) are
//! probed together, once, with one short attempt each, so a laptop with none of them knows
//! within a second. Detection runs again on every attempt until something is found (a token
//! file mounted after start is picked up), then the choice is kept.

use super::FetchError;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::Method;

use super::{aws, azure, spiffe};
use crate::config::{AutoKeys, AzureKeys, Provider, KUBERNETES_TOKEN_PATH};
use crate::http::{Client, SmallCall};

const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// The provider to use, or what was looked for (for the 503 bodies and the log).
pub async fn detect(
    keys: &AutoKeys,
    audience: &str,
    client: &Client,
) -> Result<Provider, FetchError> {
    let mut tried = Vec::new();
    if let Some(found) = on_this_machine(keys, &mut tried) {
        return Ok(found);
    }
    if let Some(found) = in_a_cloud(keys, audience, client, &mut tried).await? {
        return Ok(found);
    }
    Err(FetchError::NoToken(format!(
        "no identity found; looked for {}",
        tried.join(", ")
    )))
}

/// What this machine's environment and files say: CI variables, a Kubernetes token file, a
/// SPIFFE socket. What was looked for goes into `tried`.
fn on_this_machine(keys: &AutoKeys, tried: &mut Vec<String>) -> Option<Provider> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());

    if env("ACTIONS_ID_TOKEN_REQUEST_URL").is_some()
        && env("ACTIONS_ID_TOKEN_REQUEST_TOKEN").is_some()
    {
        return Some(Provider::GithubActions {});
    }
    tried.push("GitHub Actions (ACTIONS_ID_TOKEN_REQUEST_URL/_TOKEN not set)".to_string());

    match &keys.variable {
        Some(variable) if env(variable).is_some() => {
            return Some(Provider::Gitlab {
                variable: variable.clone(),
            })
        }
        Some(variable) => tried.push(format!("GitLab ({variable} not set)")),
        None => tried.push("GitLab (no `variable` configured)".into()),
    }

    let token_path = keys
        .path
        .clone()
        .unwrap_or_else(|| PathBuf::from(KUBERNETES_TOKEN_PATH));
    if token_path.is_file() {
        return Some(Provider::Kubernetes {
            path: token_path,
            refresh: Duration::from_secs(60),
        });
    }
    tried.push(format!("Kubernetes ({} absent)", token_path.display()));

    match spiffe::socket_path(keys.socket.as_deref()) {
        Ok(socket) if socket.exists() => {
            return Some(Provider::Spiffe {
                socket: keys.socket.clone(),
            })
        }
        Ok(socket) => tried.push(format!("SPIFFE ({} absent)", socket.display())),
        Err(e) => tried.push(format!("SPIFFE ({e})")),
    }
    None
}

/// The cloud this machine runs in, asked of its metadata services at once (GCP, Azure, AWS),
/// after the host variables and credential files that say so without asking.
async fn in_a_cloud(
    keys: &AutoKeys,
    audience: &str,
    client: &Client,
    tried: &mut Vec<String>,
) -> Result<Option<Provider>, FetchError> {
    let azure_host = azure::Host::detect();
    let aws_source = aws::source_without_imds();
    let (gcp, azure_vm, aws_imds) = tokio::join!(
        probe_gcp(client),
        probe_azure_imds(client, &azure_host, audience),
        probe_aws_imds(client, aws_source.as_ref().is_ok_and(Option::is_some)),
    );
    let azure = Provider::Azure(AzureKeys {
        client_id: keys.client_id.clone(),
        object_id: keys.object_id.clone(),
        resource_id: keys.resource_id.clone(),
    });
    let aws = Provider::Aws {
        region: keys.region.clone(),
    };
    match gcp {
        Ok(()) => return Ok(Some(Provider::Gcp {})),
        Err(why) => tried.push(format!("GCP ({why})")),
    }
    if !matches!(azure_host, azure::Host::Vm { .. }) {
        return Ok(Some(azure));
    }
    match azure_vm {
        Ok(()) => return Ok(Some(azure)),
        Err(why) => tried.push(format!("Azure (no host variables; IMDS: {why})")),
    }
    match aws_source {
        Ok(Some(_)) => return Ok(Some(aws)),
        // A profile that cannot be used is an answer, not a miss: say so.
        Err(e) => return Err(e),
        Ok(None) => {}
    }
    match aws_imds {
        Ok(()) => return Ok(Some(aws)),
        Err(why) => tried.push(format!(
            "AWS (no credentials in the environment or files; IMDS: {why})"
        )),
    }
    Ok(None)
}

/// One short attempt; any answer at all is returned.
async fn probe(
    client: &Client,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> Result<http::Response<Bytes>, FetchError> {
    SmallCall {
        method,
        url,
        headers,
        body: Bytes::new(),
        timeout: PROBE_TIMEOUT,
        also_retry: &[],
    }
    .send_once(client)
    .await
    .map_err(|_| FetchError::NoToken("no answer".to_string()))
}

/// The metadata server answers its root with `Metadata-Flavor: Google` (google-auth's test).
async fn probe_gcp(client: &Client) -> Result<(), FetchError> {
    let answer = probe(
        client,
        Method::GET,
        &format!("http://{}/", super::gcp::metadata_host()),
        &[("metadata-flavor", "Google")],
    )
    .await?;
    let flavor = answer
        .headers()
        .get("metadata-flavor")
        .and_then(|v| v.to_str().ok());
    if flavor == Some("Google") {
        Ok(())
    } else {
        Err(FetchError::NoToken(
            "the metadata address is not Google's".into(),
        ))
    }
}

/// Azure IMDS refuses a token request without `Metadata: true` with a 400 that says so
/// (the Azure SDKs' probe); EC2's IMDS on the same address answers otherwise.
async fn probe_azure_imds(
    client: &Client,
    host: &azure::Host,
    audience: &str,
) -> Result<(), FetchError> {
    let azure::Host::Vm { imds } = host else {
        return Ok(());
    };
    let mut url = url::Url::parse(&format!("{imds}/metadata/identity/oauth2/token"))
        .map_err(|e| FetchError::NoToken(e.to_string()))?;
    url.query_pairs_mut()
        .append_pair("api-version", "2018-02-01")
        .append_pair("resource", audience);
    let answer = probe(client, Method::GET, url.as_str(), &[]).await?;
    let text = String::from_utf8_lossy(answer.body()).to_lowercase();
    if answer.status() == http::StatusCode::BAD_REQUEST && text.contains("metadata") {
        Ok(())
    } else {
        Err(FetchError::NoToken(format!(
            "answered {}, not as Azure's",
            answer.status()
        )))
    }
}

async fn probe_aws_imds(client: &Client, not_needed: bool) -> Result<(), FetchError> {
    if not_needed {
        return Ok(());
    }
    let endpoint = aws::imds_endpoint().ok_or(FetchError::NoToken(
        "disabled by AWS_EC2_METADATA_DISABLED".into(),
    ))?;
    let (url, headers) = aws::imds_session_request(&endpoint);
    let answer = probe(client, Method::PUT, &url, &headers).await?;
    if answer.status().is_success() {
        Ok(())
    } else {
        Err(FetchError::NoToken(format!("answered {}", answer.status())))
    }
}
