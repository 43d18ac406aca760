//! An `[[upstream]]` table as written in the file, before any check: the pull keys checked by
//! `upstream`, the push keys by `push`.

use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct FileUpstream {
    pub(super) name: Option<String>,
    pub(super) url: Option<String>,
    pub(super) preset: Option<String>,
    pub(super) identity: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) auth: Option<String>,
    pub(super) username: Option<String>,
    pub(super) trusted_public_keys: Option<Vec<String>>,
    pub(super) insecure_http: Option<bool>,
    pub(super) prefetch_nars: Option<bool>,
    pub(super) push: Option<String>,
    pub(super) push_skip_keys: Option<Vec<String>>,
    pub(super) push_uids: Option<Vec<u32>>,
    pub(super) push_identity: Option<String>,
    pub(super) push_cache: Option<String>,
    pub(super) flakehub_api: Option<String>,
    pub(super) flakehub_project: Option<String>,
    pub(super) unavailable: Option<String>,
    pub(super) site: Option<String>,
    pub(super) site_ca_file: Option<PathBuf>,
}
