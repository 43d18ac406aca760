//! The site side of the site tier (README, "A site cache for a fleet"): a second listener
//! through which the other sidecars of a site pull. It holds no identity and no view of its
//! own: every upstream request it makes carries the asking machine's `Authorization`, for that
//! request only, and what it serves from its cache it serves only to a caller the upstream
//! lately answered for that very path (`entitled`). NARs are fetched once per site, verified
//! against their narinfo as on any machine, and shared.

mod entitled;

use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use url::Url;

use crate::config::{Config, SiteConfig};
use crate::metrics::{Kind, Metrics, SiteOutcome};
use crate::nix::narinfo::{NarInfo, MAX_NARINFO_BYTES};
use crate::nix::request::{self, CachePath};
use crate::proxy::download;
use crate::server::body::{self, Body};
use crate::store::{stream_file, Expected, NarSource, NewNarInfo, Slot, Store};
use crate::tasks::Tasks;
use crate::upstream::{Answer, Upstream, UpstreamError, UPSTREAM_HEADER};
use entitled::{Caller, Entitlements};

pub struct SiteCache {
    /// This machine's upstreams as the site asks them: no identity of their own.
    upstreams: Vec<Arc<Upstream>>,
    store: Store,
    metrics: Arc<Metrics>,
    narinfo_ttl: Duration,
    entitled: Entitlements,
    pub config: SiteConfig,
    /// The fills the site starts run here, owned by the daemon.
    tasks: Tasks,
}

impl SiteCache {
    pub fn new(
        config: &Config,
        store: Store,
        metrics: Arc<Metrics>,
        tasks: Tasks,
    ) -> Result<Option<SiteCache>, crate::http::UpstreamClientError> {
        let Some(site) = &config.site else {
            return Ok(None);
        };
        let mut upstreams = Vec::new();
        for up in &config.upstreams {
            let client = crate::http::client(up.ca_file.as_deref()).map_err(|source| {
                let upstream = up.name.clone();
                crate::http::UpstreamClientError { upstream, source }
            })?;
            upstreams.push(Arc::new(Upstream::new(
                &up.name,
                &up.url,
                None,
                up.auth.clone(),
                client,
                metrics.clone(),
            )));
        }
        Ok(Some(SiteCache {
            upstreams,
            store,
            metrics,
            narinfo_ttl: config.narinfo_ttl,
            entitled: Entitlements::default(),
            config: site.clone(),
            tasks,
        }))
    }

    /// Whether a connection from `remote` may be served (`allow-from`).
    pub fn admits(&self, remote: std::net::SocketAddr) -> bool {
        self.config.allow_from.is_empty()
            || self
                .config
                .allow_from
                .iter()
                .any(|n| n.contains(remote.ip()))
    }

    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let method = request.method().clone();
        if method != Method::GET && method != Method::HEAD {
            return body::text(
                StatusCode::METHOD_NOT_ALLOWED,
                "the site answers GET and HEAD\n",
            );
        }
        let Some(route) = SiteRoute::of(request.uri()) else {
            return body::text(StatusCode::NOT_FOUND, "not a binary cache path\n");
        };
        let Some(i) = self.upstream_for(&request) else {
            // Not a cache's answer: the machine goes to its upstream itself.
            return body::text(
                StatusCode::MISDIRECTED_REQUEST,
                format!("not an upstream of this site (the {UPSTREAM_HEADER} header names it)\n"),
            );
        };
        let authorization = request.headers().get(header::AUTHORIZATION).cloned();
        let caller = Caller::new(i, authorization.as_ref());
        let auth = authorization.as_ref();
        match route {
            SiteRoute::CacheInfo => body::text(
                StatusCode::OK,
                "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n",
            ),
            SiteRoute::NarInfo(hash) => self.narinfo(i, &caller, auth, &hash).await,
            SiteRoute::Nar(key) => self.nar(i, &caller, auth, &key, &method).await,
            SiteRoute::Closure(root) => self.closure(i, caller, authorization, root).await,
        }
    }

    /// `GET /_sidecar/closure/<hash>`: the narinfos of `root`'s closure that the site holds
    /// (References followed through its index), each one as this caller may have it (a grant
    /// it holds, else the upstream asked with its credential, [`CHECKS_AT_ONCE`] at a time);
    /// those the upstream refuses it are left out. JSON: `{"narinfos": [text, ...]}`.
    async fn closure(
        self: Arc<Self>,
        i: usize,
        caller: Caller,
        authorization: Option<HeaderValue>,
        root: String,
    ) -> Response<Body> {
        let (store, partition) = (self.store.clone(), self.partition(i));
        let known = tokio::task::spawn_blocking(move || known_closure(&store, &partition, &root))
            .await
            .unwrap_or_default();
        let slots = Arc::new(tokio::sync::Semaphore::new(CHECKS_AT_ONCE));
        let mut checks = tokio::task::JoinSet::new();
        for hash in known {
            let (site, caller, auth, slots) = (
                self.clone(),
                caller.clone(),
                authorization.clone(),
                slots.clone(),
            );
            checks.spawn(async move {
                let _slot = slots.acquire_owned().await;
                site.narinfo_text(i, &caller, auth.as_ref(), &hash)
                    .await
                    .ok()
            });
        }
        let mut narinfos = Vec::new();
        while let Some(checked) = checks.join_next().await {
            narinfos.extend(checked.ok().flatten());
        }
        let json = serde_json::json!({ "narinfos": narinfos }).to_string();
        body::typed(StatusCode::OK, "application/json", json)
    }

    /// The upstream the request names (or the only one).
    fn upstream_for(&self, request: &Request<Incoming>) -> Option<usize> {
        match request.headers().get(UPSTREAM_HEADER) {
            Some(named) => {
                let named = Url::parse(named.to_str().ok()?).ok()?;
                let slash = |u: &Url| u.as_str().trim_end_matches('/').to_string();
                self.upstreams
                    .iter()
                    .position(|up| slash(up.base()) == slash(&named))
            }
            None => (self.upstreams.len() == 1).then_some(0),
        }
    }

    fn partition(&self, i: usize) -> String {
        format!("site|{}", self.upstreams[i].base())
    }

    async fn narinfo(
        &self,
        i: usize,
        caller: &Caller,
        authorization: Option<&HeaderValue>,
        hash: &str,
    ) -> Response<Body> {
        match self.narinfo_text(i, caller, authorization, hash).await {
            Ok(text) => narinfo_response(text),
            Err(refusal) => refusal,
        }
    }

    /// The narinfo for `hash` as this caller may have it: from the cache if the upstream
    /// lately granted it to this caller, else asked upstream with its credential.
    async fn narinfo_text(
        &self,
        i: usize,
        caller: &Caller,
        authorization: Option<&HeaderValue>,
        hash: &str,
    ) -> Result<String, Response<Body>> {
        if self.entitled.holds(caller, hash, self.narinfo_ttl) {
            if let Some(cached) = self.store.narinfo(&self.partition(i), hash) {
                if cached.age < self.narinfo_ttl {
                    self.metrics
                        .site_answered(Kind::narinfo, SiteOutcome::cached);
                    return Ok(cached.text);
                }
            }
        }
        let up = &self.upstreams[i];
        let Some(url) = up.resolve(&format!("{hash}.narinfo")) else {
            return Err(body::text(
                StatusCode::BAD_GATEWAY,
                "cannot form the narinfo URL\n",
            ));
        };
        let response = match up.fetch_for_caller(&url, Method::GET, authorization).await {
            Ok(Answer::Found(response)) => response,
            Ok(Answer::Missing) => {
                self.metrics
                    .site_answered(Kind::narinfo, SiteOutcome::refused);
                self.entitled.revoke(caller, hash);
                return Err(body::text(
                    StatusCode::NOT_FOUND,
                    "not in this caller's view\n",
                ));
            }
            Err(e) => return Err(upstream_failed(&e)),
        };
        let (info, text) = read_narinfo(response, hash).await?;
        let nar_key = self.keep(i, hash, &text, &info).await;
        self.entitled.grant(caller, hash, nar_key.as_deref());
        self.metrics
            .site_answered(Kind::narinfo, SiteOutcome::granted);
        Ok(text)
    }

    /// Records a narinfo the upstream granted, and where its NAR comes from; the key the
    /// NAR is kept under, if the site may serve it.
    async fn keep(&self, i: usize, hash: &str, text: &str, info: &NarInfo) -> Option<String> {
        let up = &self.upstreams[i];
        // The NAR is kept under the name the narinfo gives it below the upstream, which is
        // the name the machine asks for; another URL is not the site's to serve.
        let nar_key = match request::parse(&format!("/{}", info.url), None) {
            Some(CachePath::Nar(key)) if !info.url.contains("://") => Some(key),
            _ => None,
        };
        if let (Some(key), Some(source)) = (&nar_key, up.resolve(&info.url)) {
            let nar = NarSource {
                upstream: up.name().to_string(),
                url: source.to_string(),
                expected: Expected::from_narinfo(info),
            };
            let new = NewNarInfo::new(&self.partition(i), hash, text, key, nar);
            let store = self.store.clone();
            let _ = tokio::task::spawn_blocking(move || store.put_narinfos(&[new])).await;
        }
        nar_key
    }

    async fn nar(
        &self,
        i: usize,
        caller: &Caller,
        authorization: Option<&HeaderValue>,
        key: &str,
        method: &Method,
    ) -> Response<Body> {
        let up = &self.upstreams[i];
        let row = self
            .store
            .nar(key)
            .filter(|r| r.source.upstream == up.name());
        let entitled = self.entitled.holds(caller, key, self.narinfo_ttl);
        if let (true, Some(row)) = (entitled, row) {
            let expected = row.source.expected.clone();
            if method == Method::HEAD {
                return nar_head(expected.file_len());
            }
            match self.store.fill(key, &expected) {
                Slot::Stored(file, size) => {
                    self.metrics.site_answered(Kind::nar, SiteOutcome::cached);
                    let stream = stream_file(file, 0, size);
                    return nar_body(Some(size), body::stream(stream, self.metrics.served()));
                }
                Slot::Join(reader) => {
                    self.metrics.site_answered(Kind::nar, SiteOutcome::cached);
                    let len = expected.file_len();
                    return nar_body(len, body::stream(reader.stream(), self.metrics.served()));
                }
                Slot::Lead(writer, reader) => {
                    self.metrics.site_answered(Kind::nar, SiteOutcome::granted);
                    let source = Url::parse(&row.source.url).ok();
                    let (up, auth, metrics) =
                        (up.clone(), authorization.cloned(), self.metrics.clone());
                    let subject = caller.subject.clone();
                    // The fill runs to its end whoever is still reading: the next machine
                    // finds it stored.
                    self.tasks.spawn(async move {
                        let answer = match source {
                            Some(url) => {
                                up.fetch_for_caller(&url, Method::GET, auth.as_ref()).await
                            }
                            None => Err(UpstreamError::Broken {
                                upstream: up.name().to_string(),
                                detail: "the NAR's URL does not parse".into(),
                            }),
                        };
                        let fetched = download::fill_from(answer, writer, metrics.clone()).await;
                        metrics.site_fetched(&subject, fetched);
                    });
                    let len = expected.file_len();
                    return nar_body(len, body::stream(reader.stream(), self.metrics.served()));
                }
                Slot::Bypass(reason) => {
                    tracing::debug!(nar = %key, %reason, "site cache cannot take the NAR; passing it through");
                }
            }
        }
        // Not one this caller was granted through the site: the upstream decides, the bytes
        // pass through unstored (the machine checks them against its narinfo).
        let Some(url) = up.resolve(key) else {
            return body::text(StatusCode::BAD_REQUEST, "cannot form the NAR URL\n");
        };
        match up
            .fetch_for_caller(&url, method.clone(), authorization)
            .await
        {
            Ok(Answer::Found(response)) => {
                let len = download::content_length(&response);
                let stream = response.into_body().map_err(std::io::Error::other).boxed();
                if method == Method::HEAD {
                    return nar_head(len);
                }
                nar_body(len, stream)
            }
            Ok(Answer::Missing) => body::text(StatusCode::NOT_FOUND, "not in this caller's view\n"),
            Err(e) => upstream_failed(&e),
        }
    }
}

/// What a site request asks for.
enum SiteRoute {
    CacheInfo,
    NarInfo(String),
    Nar(String),
    /// `/_sidecar/closure/<hash>`: closure hints.
    Closure(String),
}

impl SiteRoute {
    fn of(uri: &http::Uri) -> Option<SiteRoute> {
        if uri.path().starts_with(CLOSURE_PREFIX) {
            return closure_root(uri.path()).map(SiteRoute::Closure);
        }
        match request::parse(uri.path(), uri.query())? {
            CachePath::CacheInfo => Some(SiteRoute::CacheInfo),
            CachePath::NarInfo(hash) => Some(SiteRoute::NarInfo(hash)),
            CachePath::Nar(key) => Some(SiteRoute::Nar(key)),
            _ => None,
        }
    }
}

/// Where closure hints are asked (`/_sidecar/closure/<hash>`).
pub const CLOSURE_PREFIX: &str = "/_sidecar/closure/";

/// The store path hash a closure-hints path asks for: exactly 32 nixbase32 characters after
/// [`CLOSURE_PREFIX`], nothing more.
pub fn closure_root(path: &str) -> Option<String> {
    let hash = path.strip_prefix(CLOSURE_PREFIX)?;
    let valid = crate::proxy::prefetch::hash_of(hash).as_deref() == Some(hash);
    valid.then(|| hash.to_string())
}
/// Narinfos of one closure the site answers at most.
const CLOSURE_MOST: usize = 20_000;
/// Entitlement checks (upstream narinfo requests with the caller's credential) at once for
/// one closure request.
const CHECKS_AT_ONCE: usize = 192;

/// The hashes of `root`'s closure whose narinfos `partition` holds, breadth first.
fn known_closure(store: &Store, partition: &str, root: &str) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut queue = std::collections::VecDeque::from([root.to_string()]);
    let mut known = Vec::new();
    while let Some(hash) = queue.pop_front() {
        if known.len() >= CLOSURE_MOST || !seen.insert(hash.clone()) {
            continue;
        }
        let Some(cached) = store.narinfo(partition, &hash) else {
            continue;
        };
        let Ok(info) = NarInfo::parse(cached.text.as_bytes()) else {
            continue;
        };
        queue.extend(
            info.references
                .iter()
                .filter_map(|r| r.get(..32))
                .map(str::to_string),
        );
        known.push(hash);
    }
    known
}

fn narinfo_response(text: String) -> Response<Body> {
    body::typed(StatusCode::OK, "text/x-nix-narinfo", text)
}

fn nar_head(len: Option<u64>) -> Response<Body> {
    nar_body(len, body::empty())
}

fn nar_body(len: Option<u64>, body: Body) -> Response<Body> {
    let mut builder = Response::builder().header(header::CONTENT_TYPE, "application/x-nix-nar");
    if let Some(len) = len {
        builder = builder.header(header::CONTENT_LENGTH, len);
    }
    builder.body(body).unwrap()
}

/// The caller's own credential refused is the caller's 401; anything else is a 502 the machine
/// answers by going to the upstream itself.
fn upstream_failed(e: &UpstreamError) -> Response<Body> {
    let status = match e {
        UpstreamError::CallerRejected { .. } | UpstreamError::NeedsIdentity { .. } => {
            StatusCode::UNAUTHORIZED
        }
        _ => StatusCode::BAD_GATEWAY,
    };
    body::text(status, format!("{e}\n"))
}
/// The narinfo an upstream answered for `hash`: whole, parsed, and for that path.
async fn read_narinfo(
    response: hyper::Response<hyper::body::Incoming>,
    hash: &str,
) -> Result<(NarInfo, String), Response<Body>> {
    let bytes = match crate::http::read_limited(
        response.into_body(),
        MAX_NARINFO_BYTES,
        Duration::from_secs(30),
    )
    .await
    {
        Ok(bytes) => bytes,
        Err(e) => {
            let reason = format!("narinfo {hash}: {e}\n");
            return Err(body::text(StatusCode::BAD_GATEWAY, reason));
        }
    };
    let (Ok(info), Ok(text)) = (NarInfo::parse(&bytes), String::from_utf8(bytes.to_vec())) else {
        return Err(body::text(
            StatusCode::BAD_GATEWAY,
            format!("upstream sent a malformed narinfo for {hash}\n"),
        ));
    };
    if info.hash_part() != hash {
        return Err(body::text(
            StatusCode::BAD_GATEWAY,
            format!("asked for {hash}, upstream answered {}\n", info.store_path),
        ));
    }
    Ok((info, text))
}
