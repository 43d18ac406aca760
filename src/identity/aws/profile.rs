//! The shared config and credentials files, as the AWS SDKs read them: the profile named by
//! `AWS_PROFILE` (else `default`) in `AWS_CONFIG_FILE` (`~/.aws/config`, sections
//! `[profile NAME]`, or `[default]`) and `AWS_SHARED_CREDENTIALS_FILE` (`~/.aws/credentials`,
//! sections `[NAME]`), the credentials file winning key by key. Static keys and
//! `credential_process` are supported. A profile that assumes roles or uses SSO is refused
//! rather than skipped: falling through to the instance's role would sign as someone else.

use crate::identity::FetchError;
use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::AwsCredentials;
use crate::secret::Secret;

/// What the selected profile provides.
pub enum ProfileCredentials {
    Static(AwsCredentials),
    /// A `credential_process` command line (run by the shell, as the SDKs do).
    Process(String),
}

/// Keys of profiles that need the SDK's role or SSO machinery.
const UNSUPPORTED: &[&str] = &[
    "role_arn",
    "source_profile",
    "web_identity_token_file",
    "sso_session",
    "sso_start_url",
    "sso_account_id",
];

/// The selected profile's credentials; `None` when there are no files, or the `default`
/// profile is absent or holds no credentials (other sources then decide).
pub fn load() -> Result<Option<ProfileCredentials>, FetchError> {
    let named = std::env::var("AWS_PROFILE").ok().filter(|p| !p.is_empty());
    let profile = named.clone().unwrap_or_else(|| "default".into());
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let file = |variable: &str, default: &str| {
        std::env::var_os(variable)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws").join(default)))
    };
    let mut keys = HashMap::new();
    let mut found = false;
    let config_section = if profile == "default" {
        "default".to_string()
    } else {
        format!("profile {profile}")
    };
    for (path, section) in [
        (file("AWS_CONFIG_FILE", "config"), config_section.as_str()),
        (file("AWS_SHARED_CREDENTIALS_FILE", "credentials"), &profile),
    ] {
        let Some(path) = path else { continue };
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(FetchError::NoToken(format!(
                    "AWS shared file {}: {e}",
                    path.display()
                )))
            }
        };
        if let Some(section) = parse_ini(&text).remove(section) {
            found = true;
            keys.extend(section);
        }
    }
    if !found {
        return match named {
            Some(name) => Err(FetchError::NoToken(format!(
                "AWS_PROFILE is `{name}`, but no such profile is in the AWS config or credentials file"
            ))),
            None => Ok(None),
        };
    }
    credentials_from(&profile, &keys)
}

fn credentials_from(
    profile: &str,
    keys: &HashMap<String, String>,
) -> Result<Option<ProfileCredentials>, FetchError> {
    let get = |k: &str| keys.get(k).filter(|v| !v.is_empty()).cloned();
    if let (Some(id), Some(secret)) = (get("aws_access_key_id"), get("aws_secret_access_key")) {
        return Ok(Some(ProfileCredentials::Static(AwsCredentials {
            access_key_id: id,
            secret_access_key: Secret::new(secret),
            session_token: get("aws_session_token").map(Secret::new),
            expiration: None,
        })));
    }
    if let Some(command) = get("credential_process") {
        return Ok(Some(ProfileCredentials::Process(command)));
    }
    if let Some(key) = UNSUPPORTED.iter().find(|k| keys.contains_key(**k)) {
        return Err(FetchError::NoToken(format!(
            "AWS profile `{profile}` uses `{key}`, which nix-sidecar does not follow; give it a credential_process (e.g. `aws configure export-credentials --format process`)"
        )));
    }
    Ok(None)
}

/// The output of a `credential_process` (version 1).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ProcessOutput {
    version: u32,
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
    expiration: Option<String>,
}

/// Runs the profile's `credential_process` and reads its JSON.
pub async fn run_process(command: &str) -> Result<AwsCredentials, FetchError> {
    let argv = ["sh".to_string(), "-c".to_string(), command.to_string()];
    let printed = crate::identity::exec::run("aws credential_process", &argv).await?;
    let output: ProcessOutput = serde_json::from_str(printed.expose()).map_err(|_| {
        FetchError::NoToken("the AWS credential_process printed no credentials JSON".to_string())
    })?;
    if output.version != 1 {
        return Err(FetchError::NoToken(format!(
            "the AWS credential_process printed Version {}, expected 1",
            output.version
        )));
    }
    Ok(AwsCredentials {
        access_key_id: output.access_key_id,
        secret_access_key: Secret::new(output.secret_access_key),
        session_token: output.session_token.map(Secret::new),
        expiration: output
            .expiration
            .map(|e| {
                humantime::parse_rfc3339_weak(&e).map_err(|_| {
                    FetchError::NoToken(format!(
                        "the AWS credential_process printed an unreadable Expiration `{e}`"
                    ))
                })
            })
            .transpose()?,
    })
}

/// Sections of an INI file: `[name]`, `key = value`, `#` and `;` comments. Indented lines
/// continue a nested block (`s3 =` sub-settings) that no key here needs, so they are skipped.
fn parse_ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut sections: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            sections.entry(name.clone()).or_default();
            current = Some(name);
        } else if let (Some(section), Some((key, value))) = (&current, line.split_once('=')) {
            sections
                .get_mut(section)
                .expect("entered above")
                .insert(key.trim().to_lowercase(), value.trim().to_string());
        }
    }
    sections
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ini_sections_keys_and_comments() {
        let ini = parse_ini(
            "# comment\n[default]\nregion = eu-west-1\n\n[profile  ci ]\naws_access_key_id=AKID\n; x\ns3 =\n  max_concurrent_requests = 4\ncredential_process = /bin/helper --json\n",
        );
        assert_eq!(ini["default"]["region"], "eu-west-1");
        assert_eq!(ini["profile ci"]["aws_access_key_id"], "AKID");
        assert_eq!(
            ini["profile ci"]["credential_process"],
            "/bin/helper --json"
        );
        assert!(!ini["profile ci"].contains_key("max_concurrent_requests"));
    }

    #[test]
    fn a_role_profile_is_refused_not_skipped() {
        let keys = HashMap::from([
            ("role_arn".to_string(), "arn:aws:iam::1:role/x".to_string()),
            ("source_profile".to_string(), "base".to_string()),
        ]);
        let e = credentials_from("deploy", &keys).err().unwrap();
        assert!(
            e.to_string().contains("role_arn") && e.to_string().contains("credential_process"),
            "{e}"
        );
        let region_only = HashMap::from([("region".to_string(), "us-west-2".to_string())]);
        assert!(credentials_from("default", &region_only).unwrap().is_none());
    }
}
