//! A view-scoped upstream cache double. It serves a binary cache directory written by real
//! Nix, verifies bearer JWTs (RS256/ES256) against the JWKS it discovers from the issuer,
//! checks `aud` and `exp`, maps the token's `sub` to a view (a set of store path hashes, and
//! the NARs their narinfos name) and answers 401 for a bad token, 403 (or 404) outside the
//! view. It can be told to misbehave, and records every request it sees.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use jsonwebtoken::{jwk::JwkSet, DecodingKey, Validation};

use super::http::{full, get, respond, serve, Body};

#[derive(Clone, Debug)]
pub enum Fault {
    Status(u16),
    /// 429 with this Retry-After (seconds).
    RetryAfter(u64),
    /// Sends half the body, then breaks the connection.
    ResetMidBody,
    /// Sends a shorter body whose Content-Length matches it (looks complete).
    Truncate,
    /// Flips one byte.
    WrongBytes,
    /// Waits before answering.
    Delay(Duration),
    /// 307 to this base URL + the path, with a presigned-looking query.
    RedirectTo(String),
    /// Sends the body in 16 KiB pieces with this pause between them.
    Slow(Duration),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    NarInfo,
    Nar,
    Any,
}

#[derive(Clone, Debug)]
pub struct Recorded {
    pub path: String,
    pub authorization: Option<String>,
}

pub struct State {
    pub dir: PathBuf,
    /// None: anonymous, every path public.
    pub auth: Option<Auth>,
    pub views: Mutex<HashMap<String, HashSet<String>>>,
    pub outside_view_status: u16,
    /// Remove FileHash/FileSize from narinfos (as Attic serves them).
    pub strip_file_hash: bool,
    faults: Mutex<Vec<(Target, Fault, Option<usize>)>>,
    pub requests: Mutex<Vec<Recorded>>,
    /// Rejects requests that carry both a presigned query and an Authorization header (S3).
    pub object_store: bool,
    /// Serve the cache under this path (Attic: `/<cache>`), e.g. "/main".
    pub prefix: String,
    /// Accept the JWT as the password of Basic auth for this user (FlakeHub: `flakehub`).
    pub basic_user: Option<String>,
    /// Attic's permission model: the claim `https://jwt.attic.rs/v1` grants pull (`r`) per
    /// cache; no claim (or a bad token) is 401, a claim without pull is 403.
    pub attic_cache: Option<String>,
    /// Answer `Range: bytes=N-` on NARs with 206 (nginx and S3 do; off by default so the
    /// tests of broken bodies see them break).
    pub ranges: bool,
}

pub struct Auth {
    pub issuer: String,
    pub audience: String,
    jwks: tokio::sync::OnceCell<JwkSet>,
}

pub struct UpstreamDouble {
    pub addr: SocketAddr,
    pub url: String,
    pub state: Arc<State>,
}

impl UpstreamDouble {
    pub async fn start(dir: PathBuf, auth: Option<(&str, &str)>) -> UpstreamDouble {
        Self::start_with(dir, auth, |_| {}).await
    }

    pub async fn start_with(
        dir: PathBuf,
        auth: Option<(&str, &str)>,
        tweak: impl FnOnce(&mut State),
    ) -> UpstreamDouble {
        let mut state = State {
            dir,
            auth: auth.map(|(issuer, audience)| Auth {
                issuer: issuer.into(),
                audience: audience.into(),
                jwks: tokio::sync::OnceCell::new(),
            }),
            views: Mutex::default(),
            outside_view_status: 403,
            strip_file_hash: false,
            faults: Mutex::default(),
            requests: Mutex::default(),
            object_store: false,
            prefix: String::new(),
            basic_user: None,
            attic_cache: None,
            ranges: false,
        };
        tweak(&mut state);
        let state = Arc::new(state);
        let s = state.clone();
        let addr = serve(move |req| handle(s.clone(), req)).await;
        UpstreamDouble {
            addr,
            url: format!("http://{addr}"),
            state,
        }
    }

    /// Lets `sub` see these store paths (full paths or hash parts).
    pub fn grant(&self, sub: &str, paths: &[String]) {
        let hashes = paths.iter().map(|p| hash_part(p).to_string());
        self.state
            .views
            .lock()
            .unwrap()
            .entry(sub.into())
            .or_default()
            .extend(hashes);
    }

    /// Applies `fault` to the next `times` matching requests (None: to all of them).
    pub fn fault(&self, target: Target, fault: Fault, times: Option<usize>) {
        self.state
            .faults
            .lock()
            .unwrap()
            .push((target, fault, times));
    }

    pub fn clear_faults(&self) {
        self.state.faults.lock().unwrap().clear();
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn count(&self, path_contains: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.path.contains(path_contains))
            .count()
    }
}

pub fn hash_part(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap();
    &base[..32.min(base.len())]
}

fn take_fault(state: &State, path: &str) -> Option<Fault> {
    let mut faults = state.faults.lock().unwrap();
    let kind = if path.ends_with(".narinfo") {
        Target::NarInfo
    } else if path.contains("/nar/") {
        Target::Nar
    } else {
        Target::Any
    };
    let i = faults
        .iter()
        .position(|(t, _, n)| (*t == Target::Any || *t == kind) && n != &Some(0))?;
    let (_, fault, times) = &mut faults[i];
    if let Some(n) = times {
        *n -= 1;
    }
    Some(fault.clone())
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let range_from = req
        .headers()
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse::<usize>().ok());
    let authorization = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    state.requests.lock().unwrap().push(Recorded {
        path: path.clone(),
        authorization: authorization.clone(),
    });
    if state.object_store
        && authorization.is_some()
        && query
            .as_deref()
            .is_some_and(|q| q.contains("X-Amz-Signature"))
    {
        return respond(400, "InvalidArgument: Only one auth mechanism allowed");
    }
    let fault = take_fault(&state, &path);
    match &fault {
        Some(Fault::Status(code)) => return respond(*code, format!("injected {code}")),
        Some(Fault::RetryAfter(secs)) => {
            return Response::builder()
                .status(429)
                .header("retry-after", secs.to_string())
                .body(full("slow down"))
                .unwrap()
        }
        Some(Fault::Delay(d)) => tokio::time::sleep(*d).await,
        Some(Fault::RedirectTo(base)) => {
            return Response::builder()
                .status(307)
                .header(
                    "location",
                    format!("{base}{path}?X-Amz-Signature=deadbeef&X-Amz-Expires=600"),
                )
                .body(full(""))
                .unwrap()
        }
        _ => {}
    }
    if path == "/nix-cache-info" {
        return respond(
            200,
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n",
        );
    }
    let Some(path) = path.strip_prefix(state.prefix.as_str()).map(str::to_string) else {
        return respond(404, "no such cache");
    };
    let claims = match &state.auth {
        None => None,
        Some(auth) => {
            match verify(auth, authorization.as_deref(), state.basic_user.as_deref()).await {
                Ok(claims) => Some(claims),
                Err(why) => return respond(401, format!("invalid token: {why}")),
            }
        }
    };
    if let (Some(cache), Some(claims)) = (&state.attic_cache, &claims) {
        let Some(perms) = claims.get("https://jwt.attic.rs/v1") else {
            return respond(401, "Unauthorized");
        };
        if perms["caches"][cache.as_str()]["r"] != 1 {
            return respond(403, "Forbidden");
        }
    }
    let sub = claims
        .filter(|_| state.attic_cache.is_none())
        .map(|c| c["sub"].as_str().unwrap_or_default().to_string());
    let rel = path.trim_start_matches('/');
    if rel.contains("..") || rel.is_empty() {
        return respond(404, "");
    }
    let file = state.dir.join(rel);
    let Ok(bytes) = tokio::fs::read(&file).await else {
        return respond(404, "no such file");
    };
    let visible_hash = if rel.ends_with(".narinfo") {
        Some(rel.trim_end_matches(".narinfo").to_string())
    } else {
        nar_owner(&state, rel)
    };
    if let Some(sub) = &sub {
        let views = state.views.lock().unwrap();
        let allowed = visible_hash.is_some_and(|h| views.get(sub).is_some_and(|v| v.contains(&h)));
        if !allowed {
            return respond(state.outside_view_status, "not in your view");
        }
    }
    let mut bytes = bytes;
    if rel.ends_with(".narinfo") && state.strip_file_hash {
        let text = String::from_utf8(bytes).unwrap();
        bytes = text
            .lines()
            .filter(|l| !l.starts_with("FileHash:") && !l.starts_with("FileSize:"))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
            .into_bytes();
    }
    let body_intact = matches!(fault, None | Some(Fault::Delay(_)));
    let ranged = state.ranges && rel.starts_with("nar/") && body_intact;
    if let (true, Some(from)) = (ranged, range_from) {
        if from < bytes.len() {
            let total = bytes.len();
            return Response::builder()
                .status(206)
                .header(
                    "content-range",
                    format!("bytes {from}-{}/{total}", total - 1),
                )
                .header("content-length", total - from)
                .body(full(bytes[from..].to_vec()))
                .unwrap();
        }
    }
    // Attic streams NARs from chunks, without a length.
    let streamed = state.strip_file_hash && !rel.ends_with(".narinfo");
    body_with_fault(bytes, fault, streamed)
}

fn body_with_fault(mut bytes: Vec<u8>, fault: Option<Fault>, streamed: bool) -> Response<Body> {
    match fault {
        Some(Fault::WrongBytes) => {
            let i = bytes.len() / 2;
            bytes[i] ^= 0x55;
        }
        Some(Fault::Truncate) => {
            bytes.truncate(bytes.len() * 2 / 3);
        }
        Some(Fault::Slow(pause)) => {
            let len = bytes.len();
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
            tokio::spawn(async move {
                for piece in bytes.chunks(16 * 1024) {
                    if tx
                        .send(Ok(Frame::data(Bytes::copy_from_slice(piece))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                }
            });
            return Response::builder()
                .status(200)
                .header("content-length", len)
                .body(ChannelBody(rx).boxed())
                .unwrap();
        }
        Some(Fault::ResetMidBody) => {
            let len = bytes.len();
            let half = Bytes::from(bytes[..len / 2].to_vec());
            let stream = cut_after(half);
            return Response::builder()
                .status(200)
                .header("content-length", len)
                .body(stream)
                .unwrap();
        }
        _ => {}
    }
    if streamed {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.try_send(Ok(Frame::data(Bytes::from(bytes)))).unwrap();
        return Response::builder()
            .status(200)
            .body(ChannelBody(rx).boxed())
            .unwrap();
    }
    Response::builder()
        .status(200)
        .header("content-length", bytes.len())
        .body(full(bytes))
        .unwrap()
}

/// A body that yields `first`, then an error (the connection is cut).
fn cut_after(first: Bytes) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
    tokio::spawn(async move {
        let _ = tx.send(Ok(Frame::data(first))).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = tx.send(Err(std::io::Error::other("reset"))).await;
    });
    ChannelBody(rx).boxed()
}

struct ChannelBody(tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, std::io::Error>>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx)
    }
}

/// Which store path hash a NAR file belongs to: the narinfo that names it.
fn nar_owner(state: &State, rel: &str) -> Option<String> {
    for entry in std::fs::read_dir(&state.dir).ok()?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(hash) = name.strip_suffix(".narinfo") {
            let text = std::fs::read_to_string(entry.path()).ok()?;
            if text.lines().any(|l| l == format!("URL: {rel}")) {
                return Some(hash.to_string());
            }
        }
    }
    None
}

async fn verify(
    auth: &Auth,
    header: Option<&str>,
    basic_user: Option<&str>,
) -> Result<serde_json::Value, String> {
    let basic = header.and_then(|h| h.strip_prefix("Basic ")).and_then(|b| {
        use base64::Engine;
        let raw = base64::engine::general_purpose::STANDARD.decode(b).ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (user, password) = text.split_once(':')?;
        (Some(user) == basic_user).then(|| password.to_string())
    });
    let bearer = header
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::to_string);
    let token = basic
        .or(bearer)
        .ok_or("no bearer token or basic password")?;
    let token = token.as_str();
    let jwks = auth
        .jwks
        .get_or_init(|| async {
            let config = get(
                &format!("{}/.well-known/openid-configuration", auth.issuer),
                "GET",
                &[],
            )
            .await;
            let config: serde_json::Value = serde_json::from_str(&config.text()).unwrap();
            let jwks = get(config["jwks_uri"].as_str().unwrap(), "GET", &[]).await;
            serde_json::from_str(&jwks.text()).unwrap()
        })
        .await;
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    let kid = header.kid.ok_or("no kid")?;
    let jwk = jwks.find(&kid).ok_or("unknown kid")?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let mut validation = Validation::new(header.alg);
    validation.set_audience(&[&auth.audience]);
    validation.set_issuer(&[&auth.issuer]);
    validation.leeway = 0;
    let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
        .map_err(|e| format!("{e}"))?;
    Ok(data.claims)
}

/// The store path hash of synthetic path `i` (nix32 digits of `i`, zero-padded to 32).
pub fn synthetic_hash(i: usize) -> String {
    const NIX32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut digits = vec![b'0'; 32];
    let mut n = i;
    for d in digits.iter_mut().rev() {
        *d = NIX32[n % 32];
        n /= 32;
    }
    String::from_utf8(digits).unwrap()
}
