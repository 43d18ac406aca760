//! `netrc`: the password of one `machine` entry of a netrc file, such as the one Determinate's
//! daemon keeps logged in to FlakeHub (`/nix/var/determinate/netrc`, rewritten atomically when
//! the token is refreshed). The file is read afresh on every refresh, so a replaced file is
//! picked up without a restart.

use super::FetchError;
use std::path::Path;

use crate::secret::Secret;

pub use crate::config::DEFAULT_NETRC_PATH as DEFAULT_PATH;
const MAX_FILE: u64 = 256 * 1024;

pub async fn fetch(path: &Path, machine: &str) -> Result<Secret, FetchError> {
    let shown = path.display();
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|e| FetchError::NoToken(format!("cannot read netrc {shown}: {e}")))?;
    if meta.len() > MAX_FILE {
        return Err(FetchError::NoToken(format!(
            "netrc {shown} is larger than {MAX_FILE} bytes"
        )));
    }
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| FetchError::NoToken(format!("cannot read netrc {shown}: {e}")))?;
    let password = password_for(&text, machine).ok_or_else(|| {
        FetchError::NoToken(format!(
            "netrc {shown} has no password for machine {machine}"
        ))
    })?;
    Ok(Secret::new(password))
}

/// The password of `machine` (or of `default` when no entry names it).
pub fn password_for(text: &str, machine: &str) -> Option<String> {
    let mut words = text.split_whitespace();
    let mut current: Option<bool> = None; // Some(true) inside the wanted entry
    let mut fallback = None;
    let mut in_default = false;
    while let Some(word) = words.next() {
        match word {
            "machine" => {
                current = Some(words.next()? == machine);
                in_default = false;
            }
            "default" => {
                current = Some(false);
                in_default = true;
            }
            "password" => {
                let value = words.next()?.to_string();
                if current == Some(true) {
                    return Some(value);
                }
                if in_default {
                    fallback = Some(value);
                }
            }
            "login" | "account" => {
                words.next();
            }
            // A macro runs to the next blank line; it holds no credentials for us.
            "macdef" => break,
            _ => {}
        }
    }
    fallback
}

#[cfg(test)]
mod tests {
    use super::password_for;

    #[test]
    fn picks_the_machine_entry_or_the_default() {
        let text = "machine flakehub.com login flakehub password flakehub1_A\n\
                    machine cache.flakehub.com\n  login flakehub\n  password flakehub1_B\n\
                    default login x password D\n";
        assert_eq!(
            password_for(text, "cache.flakehub.com").as_deref(),
            Some("flakehub1_B")
        );
        assert_eq!(
            password_for(text, "flakehub.com").as_deref(),
            Some("flakehub1_A")
        );
        assert_eq!(password_for(text, "elsewhere").as_deref(), Some("D"));
        assert_eq!(password_for("machine a login b", "a"), None);
        assert_eq!(password_for("", "a"), None);
    }
}
