//! The command line's `--listen`, `--upstream`, `--cache-dir`, `--allowed-uid`, `--identity`
//! and `--audience`, applied to the file's configuration before it is checked, so a value
//! from either place is checked (and its errors named) the same way.

use std::path::PathBuf;

use super::file_upstream::FileUpstream;
use super::{invalid, upstream, ConfigError, FileConfig};

/// Command-line values that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Vec<String>,
    pub upstreams: Vec<String>,
    pub cache_dir: Option<PathBuf>,
    /// Replaces `allowed-uids` when not empty.
    pub allowed_uids: Vec<u32>,
    /// `--identity PROVIDER`: the command-line upstreams use this provider ...
    pub identity: Option<String>,
    /// ... for this `--audience`.
    pub audience: Option<String>,
}

/// The name of the identity `--identity` creates.
pub const CLI_IDENTITY: &str = "cli";

impl Overrides {
    pub(super) fn apply_to(&self, file: &mut FileConfig) -> Result<(), ConfigError> {
        if !self.listen.is_empty() {
            file.listen = Some(self.listen.clone());
        }
        if self.cache_dir.is_some() {
            file.cache_dir = self.cache_dir.clone();
        }
        if !self.allowed_uids.is_empty() {
            file.allowed_uids = Some(self.allowed_uids.clone());
        }
        if let Some(provider) = &self.identity {
            if self.upstreams.is_empty() {
                return Err(invalid(
                    "--identity",
                    "gives the command-line upstreams an identity: name at least one with --upstream",
                ));
            }
            if file.identity.contains_key(CLI_IDENTITY) {
                return Err(invalid(
                    format!("identity.{CLI_IDENTITY}"),
                    "is the name --identity uses; rename it in the file",
                ));
            }
            let mut table = toml::Table::new();
            table.insert("provider".into(), provider.clone().into());
            if let Some(audience) = &self.audience {
                table.insert("audience".into(), audience.clone().into());
            }
            file.identity.insert(CLI_IDENTITY.into(), table);
        } else if self.audience.is_some() {
            return Err(invalid(
                "--audience",
                "is the audience of --identity, which is not given",
            ));
        }
        for (i, url) in self.upstreams.iter().enumerate() {
            // A preset's name or URL brings its keys (the quick start checks signatures).
            let preset = upstream::preset_named_by(url);
            let is_name = preset == Some(url.as_str());
            file.upstream.push(FileUpstream {
                name: Some(match (preset, is_name) {
                    (Some(name), true) => name.to_string(),
                    _ => format!("cli-{}", i + 1),
                }),
                url: (!is_name).then(|| url.clone()),
                preset: preset.map(str::to_string),
                identity: self.identity.as_ref().map(|_| CLI_IDENTITY.to_string()),
                ..FileUpstream::default()
            });
        }
        Ok(())
    }
}
