//! Request -> answer, per the README's "What Nix is told" table: the routes as one table
//! (`route`), each family answered in its own file (`cache.rs` for narinfos and NARs,
//! `admin.rs` for the daemon's own routes, `push.rs` for uploads).

use std::sync::Arc;

use http::{header, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;

use super::admin::{health, prefetch, unpin};
use super::body::{self, text, typed, Body};
use super::cache::{nar_response, narinfo};
use super::sendfile::Segments;
use super::{push, Site};
use crate::nix::request::{self, CachePath};
use crate::proxy::NarAnswer;
use crate::push::Pusher;

/// Every request the listener answers, decided from its method and path in one place.
enum Route<'a> {
    CacheInfo,
    NarInfo(String),
    Nar(String),
    Forwarded(String),
    Health,
    Metrics,
    Prefetch,
    Unpin,
    Push(&'a Arc<Pusher>),
    /// `POST /_sidecar/push` with no upstream taking pushes.
    NoPush,
    PutNarInfo(&'a Pusher, String),
    PutNar(&'a Pusher, String),
    /// Nix asking before it uploads a NAR.
    HeadUploaded(&'a Pusher, String),
    /// 405, with the methods the path takes.
    NotAllowed(&'static str),
    NotFound,
}

/// The table of routes: (method, path, whether some upstream takes pushes) -> route.
fn route<'a>(
    method: &Method,
    path: Option<CachePath>,
    pusher: Option<&'a Arc<Pusher>>,
) -> Route<'a> {
    use CachePath as P;
    let Some(path) = path else {
        return Route::NotFound;
    };
    match (method, path, pusher) {
        (&Method::POST, P::Prefetch, _) => Route::Prefetch,
        (&Method::POST, P::Unpin, _) => Route::Unpin,
        (&Method::POST, P::Push, Some(pusher)) => Route::Push(pusher),
        (&Method::POST, P::Push, None) => Route::NoPush,
        (_, P::Prefetch | P::Unpin | P::Push, _) => Route::NotAllowed("POST"),
        (&Method::PUT, P::NarInfo(hash), Some(pusher)) => Route::PutNarInfo(pusher, hash),
        (&Method::PUT, P::Nar(key), Some(pusher)) => Route::PutNar(pusher, key),
        (&Method::HEAD, P::Nar(key), Some(pusher)) => Route::HeadUploaded(pusher, key),
        (&Method::GET | &Method::HEAD, P::CacheInfo, _) => Route::CacheInfo,
        (&Method::GET | &Method::HEAD, P::NarInfo(hash), _) => Route::NarInfo(hash),
        (&Method::GET | &Method::HEAD, P::Nar(key), _) => Route::Nar(key),
        (&Method::GET | &Method::HEAD, P::Forwarded(rel), _) => Route::Forwarded(rel),
        (&Method::GET | &Method::HEAD, P::Health, _) => Route::Health,
        (&Method::GET | &Method::HEAD, P::Metrics, _) => Route::Metrics,
        (_, P::NarInfo(_) | P::Nar(_), Some(_)) => Route::NotAllowed("GET, HEAD, PUT"),
        _ => Route::NotAllowed("GET, HEAD"),
    }
}

/// The route's name in `nix_sidecar_requests_total`.
fn route_name(path: &Option<CachePath>) -> &'static str {
    match path {
        None => "invalid",
        Some(CachePath::CacheInfo) => "cache-info",
        Some(CachePath::NarInfo(_)) => "narinfo",
        Some(CachePath::Nar(_)) => "nar",
        Some(CachePath::Forwarded(_)) => "forwarded",
        Some(CachePath::Health) => "health",
        Some(CachePath::Metrics) => "metrics",
        Some(CachePath::Prefetch) => "prefetch",
        Some(CachePath::Unpin) => "unpin",
        Some(CachePath::Push) => "push",
    }
}

pub async fn handle(site: &Site, request: Request<Incoming>) -> Response<Body> {
    let proxy = &site.answers;
    let method = request.method().clone();
    let uri = request.uri().clone();
    let path = request::parse(uri.path(), uri.query());
    let client = request
        .extensions()
        .get::<super::Peer>()
        .and_then(|p| p.uid);
    let name = route_name(&path);
    let response = match route(&method, path, site.pusher.as_ref()) {
        Route::NotAllowed(allowed) => not_allowed(allowed),
        Route::NotFound => text(StatusCode::NOT_FOUND, "not a binary cache path\n"),
        Route::Prefetch => prefetch(site, request).await,
        Route::Push(pusher) => push::request(pusher, request).await,
        Route::NoPush => text(
            StatusCode::NOT_FOUND,
            "no upstream takes pushes (push = ...)\n",
        ),
        Route::PutNarInfo(pusher, hash) => push::narinfo(pusher, &hash, request).await,
        Route::PutNar(pusher, key) => push::nar(pusher, &key, request).await,
        Route::HeadUploaded(pusher, key) => push::head(pusher, &key),
        Route::Unpin => unpin(site, &request),
        Route::CacheInfo => typed(StatusCode::OK, "text/x-nix-cache-info", proxy.cache_info()),
        Route::Health => health(&(site.status)()),
        Route::Metrics => typed(
            StatusCode::OK,
            crate::metrics::CONTENT_TYPE,
            site.metrics.render(&(site.status)()),
        ),
        Route::NarInfo(hash) => narinfo(proxy.narinfo(&hash, client).await, uri.path()),
        Route::Nar(key) if request.version() < Version::HTTP_11 => {
            // Without a length or chunking, the end of an HTTP/1.0 body is the connection's
            // end, which an aborted NAR also is: a failed download would look complete.
            match proxy.nar_for_client(&key, &method, client).await {
                NarAnswer::Found(content) if content.length().is_none() => text(
                    StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                    "this NAR's length is not known in advance: ask with HTTP/1.1\n",
                ),
                answer => nar_response(site, answer, None, None, uri.path()),
            }
        }
        Route::Nar(key) => {
            let range = request
                .headers()
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok());
            let segments = request.extensions().get::<Arc<Segments>>().cloned();
            let answer = proxy.nar_for_client(&key, &method, client).await;
            nar_response(site, answer, range, segments, uri.path())
        }
        Route::Forwarded(rel) => {
            let answer = proxy.forward(&rel, &method).await;
            nar_response(site, answer, None, None, uri.path())
        }
    };
    let response = if method == Method::HEAD {
        let (parts, _) = response.into_parts();
        Response::from_parts(parts, body::empty())
    } else {
        response
    };
    site.metrics.request(name, response.status().as_u16());
    tracing::debug!(%method, path = uri.path(), status = response.status().as_u16(), "request");
    response
}

fn not_allowed(allowed: &'static str) -> Response<Body> {
    let mut r = text(
        StatusCode::METHOD_NOT_ALLOWED,
        "nix-sidecar is a read-only binary cache\n",
    );
    r.headers_mut()
        .insert(header::ALLOW, http::HeaderValue::from_static(allowed));
    r
}
