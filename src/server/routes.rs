//! Request -> answer, per the README's "What Nix is told" table.

use std::sync::Arc;

use http::{header, Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::body::{self, text, typed, Body};
use super::sendfile::{self, FileBody, FollowBody, Segments};
use super::{push, Site};
use crate::nix::request::{self, CachePath};
use crate::proxy::{prefetch, Content, Failure, NarAnswer, NarInfoAnswer};
use crate::push::Pusher;
use crate::status::Status;
use crate::store::stream_file;

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

fn narinfo(answer: NarInfoAnswer, path: &str) -> Response<Body> {
    match answer {
        NarInfoAnswer::Found(text) => typed(StatusCode::OK, "text/x-nix-narinfo", text),
        NarInfoAnswer::Missing => text(StatusCode::NOT_FOUND, "not in any upstream's view\n"),
        NarInfoAnswer::Untrusted(reason) | NarInfoAnswer::Unknown(reason) => {
            text(StatusCode::NOT_FOUND, format!("{reason}\n"))
        }
        NarInfoAnswer::Failed(failure) => failed(path, &failure),
    }
}

/// `POST /_sidecar/unpin`: lets every pinned NAR go (pinners only).
fn unpin(site: &Site, request: &Request<Incoming>) -> Response<Body> {
    match site.may_pin(request).map(|()| site.answers.unpin_all()) {
        Err(why) => text(StatusCode::FORBIDDEN, why.to_string()),
        Ok(Ok(n)) => typed(
            StatusCode::OK,
            "application/json",
            format!("{{\"unpinned\": {n}}}\n"),
        ),
        Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// `POST /_sidecar/prefetch` with `{"paths": [...]}`: starts prefetching their closures and
/// answers with their progress, one JSON object per line (at least every half second), the
/// last with `"done": true`. A client that goes away does not stop the prefetch.
async fn prefetch(site: &Site, request: Request<Incoming>) -> Response<Body> {
    #[derive(serde::Deserialize)]
    struct Ask {
        paths: Vec<String>,
        /// `"forever"` (until unpinned) or a duration such as `"2h"`.
        pin: Option<String>,
    }
    let usage = "expected a JSON body {\"paths\": [\"/nix/store/...\"]}\n";
    let may_pin = site.may_pin(&request);
    let body = match crate::http::read_limited(
        request.into_body(),
        1 << 20,
        std::time::Duration::from_secs(30),
    )
    .await
    {
        Ok(body) => body,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    let Ok(ask) = serde_json::from_slice::<Ask>(&body) else {
        return text(StatusCode::BAD_REQUEST, usage);
    };
    let (hashes, bad): (Vec<_>, Vec<_>) = ask
        .paths
        .iter()
        .map(|p| (p, prefetch::hash_of(p)))
        .partition(|(_, h)| h.is_some());
    if ask.paths.is_empty() || !bad.is_empty() {
        let bad: Vec<&str> = bad.iter().map(|(p, _)| p.as_str()).collect();
        return text(
            StatusCode::BAD_REQUEST,
            format!("not store paths: {}\n{usage}", bad.join(", ")),
        );
    }
    if let (Some(_), Err(why)) = (&ask.pin, may_pin) {
        return text(StatusCode::FORBIDDEN, why.to_string());
    }
    let pin_until = match ask.pin.as_deref() {
        None => None,
        Some("forever") => Some(u64::MAX),
        Some(spec) => match crate::config::parse_duration(spec) {
            Some(d) => Some(crate::clock::unix_now().saturating_add(d.as_secs())),
            None => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("pin: `{spec}` is not \"forever\" or a duration such as \"2h\"\n"),
                )
            }
        },
    };
    let hashes = hashes.into_iter().filter_map(|(_, h)| h).collect();
    let mut progress = prefetch::start(site.answers.clone(), hashes, pin_until);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let now = progress.borrow_and_update().clone();
            let mut line = serde_json::to_vec(&now).unwrap_or_default();
            line.push(b'\n');
            if tx.send(Ok(bytes::Bytes::from(line))).await.is_err() || now.done {
                return;
            }
            let half_a_second = std::time::Duration::from_millis(500);
            let done = tokio::time::timeout(half_a_second, progress.wait_for(|p| p.done));
            let walk_gone = matches!(done.await, Ok(Err(_)));
            if walk_gone {
                // The walk was stopped (shutdown) before it was done: cut the answer, so the
                // client does not take it for a whole one.
                let stopped = std::io::Error::other("the daemon is shutting down");
                let _ = tx.send(Err(stopped)).await;
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(body::stream(rx, Default::default()))
        .unwrap()
}

/// The status of a failure: the one place it is decided (README, "What Nix is told").
fn status_of(failure: &Failure) -> StatusCode {
    match failure {
        Failure::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        Failure::Broken(_) => StatusCode::BAD_GATEWAY,
    }
}

/// How long Nix is asked to wait before asking again after a 503 (current Nix honours it).
const RETRY_AFTER_SECS: u32 = 5;

fn failed(path: &str, failure: &Failure) -> Response<Body> {
    let mut response = text(
        status_of(failure),
        format!(
            "nix-sidecar cannot answer {path} now:\n{}\n",
            failure.reason()
        ),
    );
    if response.status() == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, RETRY_AFTER_SECS.into());
    }
    response
}

fn nar_response(
    site: &Site,
    answer: NarAnswer,
    range: Option<&str>,
    segments: Option<Arc<Segments>>,
    path: &str,
) -> Response<Body> {
    let content = match answer {
        NarAnswer::Found(content) => content,
        NarAnswer::Missing => return text(StatusCode::NOT_FOUND, "not in any upstream's view\n"),
        NarAnswer::Failed(failure) => return failed(path, &failure),
    };
    let builder = Response::builder()
        .header(header::CONTENT_TYPE, "application/x-nix-nar")
        .header(header::ACCEPT_RANGES, "bytes");
    match content {
        Content::Head(len) => with_length(builder, len).body(body::empty()).unwrap(),
        Content::Stream(len, rx) => with_length(builder, len)
            .body(body::stream(rx, site.metrics.served()))
            .unwrap(),
        // From the page cache straight to the socket where the connection can (HTTP/1), read
        // through our buffers otherwise.
        Content::Filling(len, reader) => {
            let body = match (segments, reader.file()) {
                (Some(segments), Ok(file)) => {
                    let pieces = reader.pieces(sendfile::CHUNK);
                    FollowBody::new(file, pieces, len, segments, site.metrics.served()).boxed()
                }
                _ => body::stream(reader.stream(), site.metrics.served()),
            };
            with_length(builder, len).body(body).unwrap()
        }
        Content::File(file, size) => {
            let file_body = |start, end| match segments {
                Some(segments) => {
                    FileBody::new(file, (start, end), segments, site.metrics.served()).boxed()
                }
                None => body::stream(stream_file(file, start, end), site.metrics.served()),
            };
            match parse_range(range, size) {
                Ok(None) => builder
                    .header(header::CONTENT_LENGTH, size)
                    .body(file_body(0, size))
                    .unwrap(),
                Ok(Some((start, end))) => builder
                    .status(StatusCode::PARTIAL_CONTENT)
                    .header(header::CONTENT_LENGTH, end - start)
                    .header(
                        header::CONTENT_RANGE,
                        format!("bytes {start}-{}/{size}", end - 1),
                    )
                    .body(file_body(start, end))
                    .unwrap(),
                Err(Unsatisfiable) => Response::builder()
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                    .body(body::empty())
                    .unwrap(),
            }
        }
    }
}

fn with_length(builder: http::response::Builder, len: Option<u64>) -> http::response::Builder {
    match len {
        Some(len) => builder.header(header::CONTENT_LENGTH, len),
        None => builder,
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Unsatisfiable;

/// One `bytes=` range as `[start, end)`. `Ok(None)`: no or an ignorable header (multiple
/// ranges are answered with the whole file, which RFC 9110 allows).
pub fn parse_range(header: Option<&str>, size: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(Unsatisfiable)?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let suffix: u64 = b.parse().map_err(|_| Unsatisfiable)?;
        if suffix == 0 {
            return Err(Unsatisfiable);
        }
        (size.saturating_sub(suffix), size)
    } else {
        let start: u64 = a.parse().map_err(|_| Unsatisfiable)?;
        let end = if b.is_empty() {
            size
        } else {
            b.parse::<u64>()
                .map_err(|_| Unsatisfiable)?
                .saturating_add(1)
                .min(size)
        };
        (start, end)
    };
    if range.0 >= range.1 {
        return Err(Unsatisfiable);
    }
    Ok(Some(range))
}

fn health(status: &Status) -> Response<Body> {
    let upstreams: serde_json::Map<String, serde_json::Value> = status
        .upstreams
        .iter()
        .map(|(name, h)| (name.clone(), serde_json::to_value(h).unwrap()))
        .collect();
    let identities: serde_json::Map<String, serde_json::Value> = status
        .identities
        .iter()
        .map(|(name, h)| (name.clone(), serde_json::to_value(h).unwrap()))
        .collect();
    let healthy = status.healthy();
    let mut stats = serde_json::json!({
        "status": if healthy { "ok" } else { "degraded" },
        "upstreams": upstreams,
        "identities": identities,
        "cache": { "stored_bytes": status.cache.stored_bytes },
    });
    if let Some(push) = &status.push {
        stats["push"] = serde_json::to_value(push).unwrap_or_default();
    }
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    typed(code, "application/json", format!("{stats:#}\n"))
}

#[cfg(test)]
mod tests {
    use super::{parse_range, Unsatisfiable};

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-4"), 10), Ok(Some((0, 5))));
        assert_eq!(parse_range(Some("bytes=5-"), 10), Ok(Some((5, 10))));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Ok(Some((7, 10))));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), Ok(Some((8, 10))));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=x-1"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), Ok(None));
        assert_eq!(parse_range(Some("items=0-1"), 10), Ok(None));
    }
}
