//! An Attic-like cache server (docs/push.md): HS256 JWTs carrying the
//! `https://jwt.attic.rs/v1` permissions claim, `get-missing-paths`, `upload-path` with the
//! path's info in the `X-Attic-Nar-Info` header or as a preamble, the NAR re-hashed against
//! `nar_hash`/`nar_size` before anything is accepted, and the caches served back as Nix
//! binary caches (`/<cache>/<hash>.narinfo`, signed with the server's own key). It also
//! answers FlakeHub's project lookup (`GET /project[/<owner>/<flake>]`, HTTP Basic
//! `flakehub:<jwt>`), and takes plain `PUT`s of a Nix HTTP cache under `/http/`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use ed25519_dalek::{Signer, SigningKey};
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use nix_sidecar::nix::base32;
use nix_sidecar::nix::hash::Sha256 as NixHash;

use super::http::{respond, serve, Body};

pub const SECRET: &[u8] = b"attic-double-hs256-secret-of-32-bytes!";
const CLAIM: &str = "https://jwt.attic.rs/v1";
pub const ORG: &str = "0190a7b4-0000-7000-8000-00000000000a";
pub const PROJECT: &str = "0190a7b4-0000-7000-8000-00000000000b";

/// One path as the server keeps it.
#[derive(Clone)]
pub struct Stored {
    pub info: Value,
    pub nar: Bytes,
}

#[derive(Default)]
pub struct Record {
    /// cache -> store path hash -> what was uploaded.
    pub caches: HashMap<String, HashMap<String, Stored>>,
    /// Accepted uploads per store path hash (over all caches).
    pub accepted: HashMap<String, u32>,
    /// Store path hashes in the order their uploads were accepted.
    pub order: Vec<String>,
    /// Uploads refused, with why.
    pub rejected: Vec<String>,
    /// Uploads whose body broke off before its end.
    pub aborted: u32,
    pub preamble_uploads: u32,
    pub header_uploads: u32,
    /// `(method, path, status)` of every request.
    pub requests: Vec<(String, String, u16)>,
    /// Plain HTTP cache files under `/http/`.
    pub http_files: HashMap<String, Bytes>,
    pub project_lookups: Vec<String>,
}

pub struct Attic {
    pub addr: SocketAddr,
    pub url: String,
    pub record: Arc<Mutex<Record>>,
    /// Pause between body frames of an upload (a slow link).
    pub upload_pause: Arc<Mutex<Duration>>,
    pub key_name: String,
    signing: SigningKey,
}

/// Writes the server's HS256 secret as atticd takes it (`token-hs256-secret-base64`) to
/// `dir/attic.key`, for an exchange to mint tokens this server accepts.
pub fn write_secret(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("attic.key");
    std::fs::write(
        &path,
        base64::engine::general_purpose::STANDARD.encode(SECRET),
    )
    .unwrap();
    path
}

/// An Attic token for `sub` with these permissions: `[(cache pattern, "rw")]`.
pub fn token(sub: &str, grants: &[(&str, &str)], lifetime: i64) -> String {
    token_signed_with(SECRET, sub, grants, lifetime)
}

/// The same, signed with another server's secret: this one answers it with 401.
pub fn foreign_token(sub: &str, grants: &[(&str, &str)], lifetime: i64) -> String {
    token_signed_with(
        b"another-attic-server-secret-32-bytes",
        sub,
        grants,
        lifetime,
    )
}

fn token_signed_with(secret: &[u8], sub: &str, grants: &[(&str, &str)], lifetime: i64) -> String {
    let caches: serde_json::Map<String, Value> = grants
        .iter()
        .map(|(pattern, rights)| {
            let mut perms = serde_json::Map::new();
            for (letter, key) in [('r', "r"), ('w', "w")] {
                if rights.contains(letter) {
                    perms.insert(key.into(), json!(1));
                }
            }
            (pattern.to_string(), Value::Object(perms))
        })
        .collect();
    let now = super::issuer::now();
    let claims =
        json!({"sub": sub, "exp": now + lifetime, "nbf": now - 60, CLAIM: {"caches": caches}});
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

/// The rights the bearer of `token` has on `cache` (`None`: not a valid token).
pub fn rights_of(token: &str, cache: &str) -> Option<(bool, bool)> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.required_spec_claims.clear();
    validation.validate_aud = false;
    let data = jsonwebtoken::decode::<Value>(token, &DecodingKey::from_secret(SECRET), &validation)
        .ok()?;
    let caches = data.claims.get(CLAIM)?.get("caches")?.as_object()?.clone();
    let mut r = false;
    let mut w = false;
    for (pattern, perms) in caches {
        let matches = match pattern.strip_suffix('*') {
            Some(prefix) => cache.starts_with(prefix),
            None => pattern == cache,
        };
        if matches {
            r |= perms.get("r").is_some_and(|v| v == 1);
            w |= perms.get("w").is_some_and(|v| v == 1);
        }
    }
    Some((r, w))
}

fn readable(token: Option<&str>, cache: &str) -> bool {
    token
        .and_then(|t| rights_of(t, cache))
        .is_some_and(|(r, _)| r)
}

fn stored(record: &Mutex<Record>, cache: &str, hash: &str) -> Option<Stored> {
    let record = record.lock().unwrap();
    record.caches.get(cache)?.get(hash).cloned()
}

fn bearer(req: &Request<Incoming>) -> Option<String> {
    let value = req.headers().get("authorization")?.to_str().ok()?;
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Some(token.to_string());
    }
    let basic = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(basic)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.strip_prefix("flakehub:").map(str::to_string)
}

fn error(status: u16, code: &str, message: &str) -> Response<Body> {
    respond(
        status,
        json!({"code": status, "error": code, "message": message}).to_string(),
    )
}

impl Attic {
    pub async fn start() -> Attic {
        let record = Arc::new(Mutex::new(Record::default()));
        let upload_pause = Arc::new(Mutex::new(Duration::ZERO));
        let signing = SigningKey::from_bytes(&[7; 32]);
        let key_name = "attic-double-1".to_string();
        let (r, p, s, k) = (
            record.clone(),
            upload_pause.clone(),
            signing.clone(),
            key_name.clone(),
        );
        let addr = serve(move |req| {
            let (record, pause, signing, key_name) = (r.clone(), p.clone(), s.clone(), k.clone());
            async move {
                let (method, path) = (req.method().to_string(), req.uri().path().to_string());
                let response = route(req, &record, &pause, &signing, &key_name).await;
                record
                    .lock()
                    .unwrap()
                    .requests
                    .push((method, path, response.status().as_u16()));
                response
            }
        })
        .await;
        Attic {
            addr,
            url: format!("http://{addr}"),
            record,
            upload_pause,
            key_name,
            signing,
        }
    }

    /// `name:base64(public key)`, for `trusted-public-keys`.
    pub fn public_key(&self) -> String {
        let public = self.signing.verifying_key().to_bytes();
        format!(
            "{}:{}",
            self.key_name,
            base64::engine::general_purpose::STANDARD.encode(public)
        )
    }

    /// Puts the closures of local store `paths` into `cache`, as an upload would.
    pub async fn put_local(&self, cache: &str, paths: &[String]) {
        let infos = nix_sidecar::push::local::closure(paths).await.unwrap();
        for info in infos {
            let dump = std::process::Command::new("nix-store")
                .args(["--dump", &info.store_path])
                .output()
                .unwrap();
            assert!(dump.status.success());
            self.record
                .lock()
                .unwrap()
                .caches
                .entry(cache.to_string())
                .or_default()
                .insert(
                    info.hash().to_string(),
                    Stored {
                        info: info.attic_json(cache),
                        nar: Bytes::from(dump.stdout),
                    },
                );
        }
    }

    pub fn accepted(&self, hash: &str) -> u32 {
        self.record
            .lock()
            .unwrap()
            .accepted
            .get(hash)
            .copied()
            .unwrap_or(0)
    }

    pub fn holds(&self, cache: &str, hash: &str) -> bool {
        self.record
            .lock()
            .unwrap()
            .caches
            .get(cache)
            .is_some_and(|c| c.contains_key(hash))
    }

    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        self.record
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|(m, p, _)| m == method && p.contains(path_contains))
            .count()
    }
}

async fn route(
    req: Request<Incoming>,
    record: &Mutex<Record>,
    pause: &Mutex<Duration>,
    signing: &SigningKey,
    key_name: &str,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let token = bearer(&req);
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (req.method().clone(), parts.as_slice()) {
        (Method::GET, ["project", ..]) => {
            // FlakeHub's lookup: a valid token (any grant) names the project.
            if token.as_deref().and_then(|t| rights_of(t, "")).is_none() {
                return error(401, "Unauthorized", "no valid token");
            }
            if !req
                .headers()
                .get("authorization")
                .is_some_and(|v| v.as_bytes().starts_with(b"Basic "))
            {
                return error(
                    401,
                    "Unauthorized",
                    "FlakeHub takes the token as HTTP Basic flakehub:<jwt>",
                );
            }
            record.lock().unwrap().project_lookups.push(path.clone());
            respond(
                200,
                json!({"organization_uuid_v7": ORG, "project_uuid_v7": PROJECT}).to_string(),
            )
        }
        (Method::POST, ["_api", "v1", "get-missing-paths"]) => {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let Ok(ask) = serde_json::from_slice::<Value>(&body) else {
                return error(400, "BadRequest", "not JSON");
            };
            let cache = ask["cache"].as_str().unwrap_or_default().to_string();
            match token.as_deref().and_then(|t| rights_of(t, &cache)) {
                None => return error(401, "Unauthorized", "no valid token"),
                Some((_, false)) => return error(403, "PermissionDenied", "no push permission"),
                Some(_) => {}
            }
            let held = record
                .lock()
                .unwrap()
                .caches
                .get(&cache)
                .cloned()
                .unwrap_or_default();
            let missing: Vec<&str> = ask["store_path_hashes"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .filter(|h| !held.contains_key(*h))
                        .collect()
                })
                .unwrap_or_default();
            respond(200, json!({"missing_paths": missing}).to_string())
        }
        (Method::PUT, ["_api", "v1", "upload-path"]) => upload(req, token, record, pause).await,
        (Method::PUT, ["http", rest @ ..]) => {
            if token.is_none() {
                return error(401, "Unauthorized", "no token");
            }
            let body = req.into_body().collect().await.unwrap().to_bytes();
            record
                .lock()
                .unwrap()
                .http_files
                .insert(rest.join("/"), body);
            respond(200, "")
        }
        (Method::GET, ["http", rest @ ..]) => {
            match record.lock().unwrap().http_files.get(&rest.join("/")) {
                Some(bytes) => respond(200, bytes.clone()),
                None => respond(404, ""),
            }
        }
        (Method::GET, [cache, file]) | (Method::HEAD, [cache, file]) => {
            // A cache one may not read looks absent.
            if !readable(token.as_deref(), cache) {
                return error(404, "NoSuchCache", "no such cache");
            }
            if *file == "nix-cache-info" {
                return respond(
                    200,
                    "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 41\n",
                );
            }
            let Some(hash) = file.strip_suffix(".narinfo") else {
                return respond(404, "");
            };
            match stored(record, cache, hash) {
                Some(stored) => respond(200, narinfo(&stored, signing, key_name)),
                None => respond(404, ""),
            }
        }
        (Method::GET, [cache, "nar", file]) => {
            if !readable(token.as_deref(), cache) {
                return error(404, "NoSuchCache", "no such cache");
            }
            match stored(record, cache, file.trim_end_matches(".nar")) {
                Some(stored) => respond(200, stored.nar),
                None => respond(404, ""),
            }
        }
        _ => respond(404, ""),
    }
}

async fn upload(
    req: Request<Incoming>,
    token: Option<String>,
    record: &Mutex<Record>,
    pause: &Mutex<Duration>,
) -> Response<Body> {
    let header_info = req
        .headers()
        .get("x-attic-nar-info")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let preamble_size: Option<usize> = req
        .headers()
        .get("x-attic-nar-info-preamble-size")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let mut body = req.into_body();
    let mut bytes = Vec::new();
    let pause = *pause.lock().unwrap();
    loop {
        match body.frame().await {
            None => break,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    bytes.extend_from_slice(&data);
                }
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            Some(Err(_)) => {
                record.lock().unwrap().aborted += 1;
                return error(400, "BadRequest", "the body broke off");
            }
        }
    }
    let (info, nar) = match (header_info, preamble_size) {
        (Some(info), None) => (info, &bytes[..]),
        (None, Some(size)) if size <= bytes.len() => (
            String::from_utf8_lossy(&bytes[..size]).into_owned(),
            &bytes[size..],
        ),
        _ => return error(400, "BadRequest", "no path info (header or preamble)"),
    };
    let reject = |why: String| {
        record.lock().unwrap().rejected.push(why.clone());
        error(400, "BadRequest", &why)
    };
    let Ok(info) = serde_json::from_str::<Value>(&info) else {
        return reject("path info is not JSON".into());
    };
    let cache = info["cache"].as_str().unwrap_or_default().to_string();
    match token.as_deref().and_then(|t| rights_of(t, &cache)) {
        None => return error(401, "Unauthorized", "no valid token"),
        Some((_, false)) => return error(403, "PermissionDenied", "no push permission"),
        Some(_) => {}
    }
    let hash = info["store_path_hash"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let store_path = info["store_path"].as_str().unwrap_or_default();
    if !store_path.starts_with("/nix/store/") || store_path.get(11..43) != Some(hash.as_str()) {
        return reject(format!(
            "store_path {store_path} does not have the hash {hash}"
        ));
    }
    if info["references"].as_array().is_none_or(|refs| {
        refs.iter()
            .any(|r| r.as_str().is_none_or(|r| r.contains('/')))
    }) {
        return reject("references must be base names".into());
    }
    let Some(nar_hash) = info["nar_hash"].as_str().and_then(NixHash::parse) else {
        return reject("nar_hash is not a hash".into());
    };
    if info["nar_size"].as_u64() != Some(nar.len() as u64) {
        return reject(format!(
            "{hash}: {} bytes, nar_size says {}",
            nar.len(),
            info["nar_size"]
        ));
    }
    let actual: [u8; 32] = Sha256::digest(nar).into();
    if actual != nar_hash.0 {
        return reject(format!("{hash}: the NAR does not match nar_hash"));
    }
    let mut record = record.lock().unwrap();
    if preamble_size.is_some() {
        record.preamble_uploads += 1;
    } else {
        record.header_uploads += 1;
    }
    *record.accepted.entry(hash.clone()).or_default() += 1;
    record.order.push(hash.clone());
    let size = nar.len();
    record.caches.entry(cache).or_default().insert(
        hash,
        Stored {
            info,
            nar: Bytes::copy_from_slice(nar),
        },
    );
    respond(
        200,
        json!({"kind": "Uploaded", "file_size": size, "frac_deduplicated": 0.0}).to_string(),
    )
}

/// The narinfo Attic would serve: the NAR uncompressed, signed with the server's key.
fn narinfo(stored: &Stored, signing: &SigningKey, key_name: &str) -> String {
    let info = &stored.info;
    let store_path = info["store_path"].as_str().unwrap();
    let hash = &store_path[11..43];
    let nar_hash = NixHash::parse(info["nar_hash"].as_str().unwrap()).unwrap();
    let nar_hash = format!("sha256:{}", base32::encode(&nar_hash.0));
    let size = info["nar_size"].as_u64().unwrap();
    let refs: Vec<&str> = info["references"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let full_refs: Vec<String> = refs.iter().map(|r| format!("/nix/store/{r}")).collect();
    let fingerprint = format!("1;{store_path};{nar_hash};{size};{}", full_refs.join(","));
    let sig = base64::engine::general_purpose::STANDARD
        .encode(signing.sign(fingerprint.as_bytes()).to_bytes());
    let mut text = format!(
        "StorePath: {store_path}\nURL: nar/{hash}.nar\nCompression: none\nNarHash: {nar_hash}\nNarSize: {size}\nReferences: {}\n",
        refs.join(" ")
    );
    if let Some(deriver) = info["deriver"].as_str() {
        text.push_str(&format!("Deriver: {deriver}\n"));
    }
    text.push_str(&format!("Sig: {key_name}:{sig}\n"));
    text
}
