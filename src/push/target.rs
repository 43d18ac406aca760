//! One upstream as an upload target, in its protocol (docs/push.md): Attic's API, FlakeHub
//! (a project lookup, then Attic's API), or a plain Nix HTTP cache. Every request goes through
//! the upstream's one `send` (token, 401 rule, scrubbing, metrics), as pulls do; answers are
//! reduced to what the queue decides on: done, try again later, or failed for good.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use hyper::body::Incoming;
use url::Url;

use super::info::PathInfo;
use super::nar::{self, Feed, UploadBody};
use super::queue::{Entry, Origin};
use crate::config::{Auth, PushConfig, PushProtocol};
use crate::http::{display_url, read_limited};
use crate::identity::Identity;
use crate::upstream::{Credential, Outgoing, Unanswered, Upstream};

pub type UploadClient = crate::http::ClientFor<UploadBody>;

/// Attic's client sends the path's info in a header up to this size, as a preamble beyond.
const HEADER_INFO_LIMIT: usize = 4096;
/// Answers to small requests (missing paths, a narinfo probe) must come within this.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Paths asked about in one get-missing-paths call.
pub const MISSING_BATCH: usize = 256;
/// Narinfo requests at once when a plain HTTP cache is asked which paths it has.
const NARINFO_PROBES_AT_ONCE: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushError {
    /// Worth trying again later (5xx, 429, a timeout, a refused connection, a 401 after a
    /// fresh token).
    Retry(String),
    /// Trying again will not help (403: this identity may not push here).
    Fatal(String),
}

pub struct Target {
    pub name: String,
    pub config: PushConfig,
    /// The upstream as pulls see it: its URL, and the `send` every request goes through.
    upstream: Arc<Upstream>,
    /// The identity pushes speak for (`push.identity`, else none).
    identity: Option<Arc<Identity>>,
    /// How a plain HTTP cache takes the token (Attic's API always takes a Bearer token).
    auth: Auth,
    client: UploadClient,
    /// FlakeHub's cache name, looked up once.
    flakehub_cache: tokio::sync::Mutex<Option<String>>,
}

impl Target {
    pub fn new(
        upstream: Arc<Upstream>,
        config: PushConfig,
        identity: Option<Arc<Identity>>,
        auth: Auth,
        client: UploadClient,
    ) -> Target {
        Target {
            name: upstream.name().to_string(),
            config,
            upstream,
            identity,
            auth,
            client,
            flakehub_cache: tokio::sync::Mutex::new(None),
        }
    }

    /// Which of `paths` the upstream does not have yet (their hashes).
    pub async fn missing(
        self: &Arc<Self>,
        paths: &[&PathInfo],
    ) -> Result<HashSet<String>, PushError> {
        match &self.config.protocol {
            PushProtocol::Http => {
                // No batch API: one narinfo request per path, a few at once (each costs a
                // round trip to a distant cache).
                let mut missing = HashSet::new();
                let mut asking = tokio::task::JoinSet::new();
                let mut hashes = paths.iter().map(|p| p.hash().to_string());
                loop {
                    while asking.len() < NARINFO_PROBES_AT_ONCE {
                        let Some(hash) = hashes.next() else { break };
                        let target = self.clone();
                        asking.spawn(async move {
                            let present = target.has_narinfo(&hash).await;
                            (hash, present)
                        });
                    }
                    let Some(done) = asking.join_next().await else {
                        break;
                    };
                    let (hash, present) =
                        done.map_err(|e| PushError::Retry(format!("narinfo probe: {e}")))?;
                    if !present? {
                        missing.insert(hash);
                    }
                }
                Ok(missing)
            }
            _ => {
                let (server, cache) = self.attic().await?;
                let url = self.join(&server, "_api/v1/get-missing-paths")?;
                let hashes: Vec<&str> = paths.iter().map(|p| p.hash()).collect();
                let body = serde_json::json!({"cache": cache, "store_path_hashes": hashes});
                let body = Bytes::from(body.to_string());
                let json = [(http::header::CONTENT_TYPE, "application/json".to_string())];
                let response = self
                    .send(
                        Method::POST,
                        &url,
                        &Auth::Bearer,
                        &json,
                        || nar::full(body.clone()),
                        false,
                    )
                    .await?;
                #[derive(serde::Deserialize)]
                struct Missing {
                    missing_paths: Vec<String>,
                }
                let answer = read_limited(response.into_body(), 16 << 20, ANSWER_TIMEOUT)
                    .await
                    .map_err(|e| PushError::Retry(e.to_string()))?;
                let missing: Missing = serde_json::from_slice(&answer).map_err(|e| {
                    PushError::Retry(format!(
                        "get-missing-paths answered something unusable: {e}"
                    ))
                })?;
                Ok(missing.missing_paths.into_iter().collect())
            }
        }
    }

    /// Whether a plain HTTP cache has `<hash>.narinfo`.
    async fn has_narinfo(&self, hash: &str) -> Result<bool, PushError> {
        let url = self.join(self.upstream.base(), &format!("{hash}.narinfo"))?;
        let response = self
            .send(
                Method::GET,
                &url,
                &self.auth,
                &[],
                || nar::full(Bytes::new()),
                true,
            )
            .await?;
        Ok(response.status() != StatusCode::NOT_FOUND)
    }

    /// Uploads one path; the bytes sent.
    pub async fn upload(&self, entry: &Entry, staging: &Path) -> Result<u64, PushError> {
        let info = &entry.info;
        match &self.config.protocol {
            PushProtocol::Http => self.upload_http(entry, staging).await,
            _ => {
                let (server, cache) = self.attic().await?;
                let url = self.join(&server, "_api/v1/upload-path")?;
                let json = info.attic_json(&cache).to_string();
                let mut headers = vec![(
                    http::header::CONTENT_TYPE,
                    "application/octet-stream".to_string(),
                )];
                let preamble = if json.len() < HEADER_INFO_LIMIT {
                    headers.push((http::HeaderName::from_static("x-attic-nar-info"), json));
                    Bytes::new()
                } else {
                    headers.push((
                        http::HeaderName::from_static("x-attic-nar-info-preamble-size"),
                        json.len().to_string(),
                    ));
                    Bytes::from(json)
                };
                let feed = || match &entry.origin {
                    Origin::Store => Feed::Store(info.store_path.clone()),
                    Origin::Staged {
                        file, compression, ..
                    } => Feed::Nar {
                        path: staging.join(file),
                        compression: compression.clone(),
                    },
                };
                let make = || nar::body(feed(), info, preamble.clone(), info.nar_size);
                self.send(Method::PUT, &url, &Auth::Bearer, &headers, make, false)
                    .await?;
                Ok(preamble.len() as u64 + info.nar_size)
            }
        }
    }

    /// `PUT nar/<file>`, then `PUT <hash>.narinfo`, as `nix copy --to` does.
    async fn upload_http(&self, entry: &Entry, staging: &Path) -> Result<u64, PushError> {
        let info = &entry.info;
        let (nar_url, narinfo, staged_feed, size) = match &entry.origin {
            Origin::Staged { file, narinfo, .. } => {
                let path = staging.join(file);
                // What was checked when Nix uploaded it, checked again on the way up.
                let staged = crate::nix::narinfo::NarInfo::parse(narinfo.as_bytes())
                    .map_err(|e| PushError::Fatal(format!("the queued narinfo: {e}")))?;
                let (sha256, size) = match (staged.file_hash, staged.file_size) {
                    (Some(hash), Some(size)) => (hash, size),
                    _ if staged.compression == "none" => (staged.nar_hash, staged.nar_size),
                    _ => {
                        return Err(PushError::Fatal(
                            "the queued narinfo has no FileHash/FileSize".into(),
                        ))
                    }
                };
                let feed = Feed::AsIs { path, sha256, size };
                (format!("nar/{file}"), narinfo.clone(), Some(feed), size)
            }
            Origin::Store => {
                let url = format!("nar/{}.nar", crate::nix::base32::encode(&info.nar_hash.0));
                let text = info.narinfo_uncompressed(&url);
                (url, text, None, info.nar_size)
            }
        };
        let feed = || {
            staged_feed
                .clone()
                .unwrap_or_else(|| Feed::Store(info.store_path.clone()))
        };
        let nar_type = [(
            http::header::CONTENT_TYPE,
            "application/x-nix-nar".to_string(),
        )];
        let url = self.join(self.upstream.base(), &nar_url)?;
        let make = || nar::body(feed(), info, Bytes::new(), size);
        self.send(Method::PUT, &url, &self.auth, &nar_type, make, false)
            .await?;
        let url = self.join(self.upstream.base(), &format!("{}.narinfo", info.hash()))?;
        let text_type = [(http::header::CONTENT_TYPE, "text/x-nix-narinfo".to_string())];
        let narinfo = Bytes::from(narinfo);
        self.send(
            Method::PUT,
            &url,
            &self.auth,
            &text_type,
            || nar::full(narinfo.clone()),
            false,
        )
        .await?;
        Ok(size + narinfo.len() as u64)
    }

    /// Attic's server root and cache name (FlakeHub's looked up on first use).
    async fn attic(&self) -> Result<(Url, String), PushError> {
        match &self.config.protocol {
            PushProtocol::Attic { server, cache } => Ok((with_slash(server), cache.clone())),
            PushProtocol::FlakeHub { api, project } => {
                let mut known = self.flakehub_cache.lock().await;
                if let Some(cache) = known.as_ref() {
                    return Ok((self.upstream.base().clone(), cache.clone()));
                }
                let path = match project {
                    Some(project) => format!("project/{project}"),
                    None => "project".to_string(),
                };
                let url = self.join(&with_slash(api), &path)?;
                let basic = Auth::Basic {
                    username: "flakehub".into(),
                };
                let response = self
                    .send(
                        Method::GET,
                        &url,
                        &basic,
                        &[],
                        || nar::full(Bytes::new()),
                        false,
                    )
                    .await?;
                #[derive(serde::Deserialize)]
                struct Project {
                    organization_uuid_v7: String,
                    project_uuid_v7: String,
                }
                let body = read_limited(response.into_body(), 1 << 20, ANSWER_TIMEOUT)
                    .await
                    .map_err(|e| PushError::Retry(e.to_string()))?;
                let project: Project = serde_json::from_slice(&body).map_err(|e| {
                    PushError::Fatal(format!(
                        "FlakeHub's project lookup answered something unusable: {e}"
                    ))
                })?;
                let cache = format!(
                    "{}:{}",
                    project.organization_uuid_v7, project.project_uuid_v7
                );
                *known = Some(cache.clone());
                Ok((self.upstream.base().clone(), cache))
            }
            PushProtocol::Http => unreachable!("plain HTTP caches have no Attic API"),
        }
    }

    /// Where the upstream serves `rel` (a narinfo's `URL:`), as a pull would fetch it.
    pub fn resolve(&self, rel: &str) -> Option<Url> {
        self.upstream.resolve(rel)
    }

    fn join(&self, base: &Url, rel: &str) -> Result<Url, PushError> {
        base.join(rel)
            .map_err(|e| PushError::Fatal(format!("cannot make a URL of {rel}: {e}")))
    }

    /// One request with the push identity's token, through the upstream's `send` (a 401
    /// gets one fresh token and one more try; `make_body` is called again). `missing_ok`: a
    /// 404 is an answer, not a failure. The outcome goes into the upstream's health.
    async fn send(
        &self,
        method: Method,
        url: &Url,
        auth: &Auth,
        headers: &[(http::HeaderName, String)],
        make_body: impl Fn() -> UploadBody + Send + Sync,
        missing_ok: bool,
    ) -> Result<Response<Incoming>, PushError> {
        let mut credential = Credential::of(self.identity.as_ref(), auth);
        let out = Outgoing {
            method: method.clone(),
            url,
            headers,
            body: &make_body,
            // An Attic server or FlakeHub's API may live elsewhere than the cache itself.
            credential_for: url.origin(),
            timeout: None,
            via_site: false,
        };
        let sent = self
            .upstream
            .send(&self.client, &mut credential, &out)
            .await;
        let outcome = match sent {
            Ok(response) => {
                let status = response.status();
                if status.is_success() || (missing_ok && status == StatusCode::NOT_FOUND) {
                    Ok(response)
                } else {
                    let what = format!(
                        "{method} {} answered HTTP {}: {}",
                        display_url(url),
                        status.as_u16(),
                        credential.said(response).await
                    );
                    Err(self.judge(status, what))
                }
            }
            Err(Unanswered::Transport(e)) if e.is_transient() => Err(PushError::Retry(format!(
                "{method} {}: {e}",
                display_url(url)
            ))),
            Err(Unanswered::Transport(e)) => Err(PushError::Fatal(e.to_string())),
            // The token could not be had, or was refused after a fresh one: it may be
            // fixed later (a rotated secret, an identity provider back up).
            Err(Unanswered::Refused(e)) => Err(PushError::Retry(e.to_string())),
        };
        self.upstream
            .record_push(outcome.as_ref().map(drop).map_err(PushError::text));
        outcome
    }

    /// Whether an upload refused with `status` is worth trying again.
    fn judge(&self, status: StatusCode, what: String) -> PushError {
        match status {
            StatusCode::FORBIDDEN | StatusCode::NOT_FOUND => PushError::Fatal(format!(
                "{what} (this identity may not push to upstream `{}`)",
                self.name
            )),
            s if s.is_server_error()
                || s == StatusCode::TOO_MANY_REQUESTS
                || s == StatusCode::REQUEST_TIMEOUT =>
            {
                PushError::Retry(what)
            }
            _ => PushError::Fatal(what),
        }
    }
}

impl PushError {
    pub fn text(&self) -> &str {
        match self {
            PushError::Retry(text) | PushError::Fatal(text) => text,
        }
    }
}

fn with_slash(url: &Url) -> Url {
    let mut url = url.clone();
    if !url.path().ends_with('/') {
        url.set_path(&format!("{}/", url.path()));
    }
    url
}
