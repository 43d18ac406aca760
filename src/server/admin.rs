//! The daemon's own routes: health, metrics' status, prefetch (with its progress stream) and
//! unpin.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::body::{self, text, typed, Body};
use super::Site;
use crate::proxy::prefetch;
use crate::status::{CacheStatus, Status};

/// `POST /_sidecar/unpin`: lets every pinned NAR go (pinners only).
pub(super) fn unpin(site: &Site, request: &Request<Incoming>) -> Response<Body> {
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
pub(super) async fn prefetch(site: &Site, request: Request<Incoming>) -> Response<Body> {
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
    body::ndjson(rx)
}

/// The cache's line of health: what it holds, its limits, and whether it is taking new files
/// (not doing so costs speed, not substitutions, so it does not make the daemon degraded).
fn cache_health(cache: &CacheStatus) -> serde_json::Value {
    serde_json::json!({
        "stored_bytes": cache.stored_bytes,
        "max_bytes": cache.max_bytes,
        "free_disk_bytes": cache.free_disk_bytes,
        "min_free_bytes": cache.min_free_bytes,
        "caching": cache.uncached_since.is_none(),
        "uncached_since": cache.uncached_since,
    })
}

pub(super) fn health(status: &Status) -> Response<Body> {
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
        "cache": cache_health(&status.cache),
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
