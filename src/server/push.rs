//! The listener's push routes: `PUT /nar/<file>` and `PUT /<hash>.narinfo` (`nix copy --to`)
//! and `POST /_sidecar/push` (`nix-sidecar push`). Only peers whose uid is in an upstream's
//! `push-uids` get through; they push to those upstreams.

use std::sync::Arc;
use std::time::Duration;

use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::body::{self, text, typed, Body};
use super::Peer;
use crate::nix::narinfo::MAX_NARINFO_BYTES;
use crate::push::queue::Origin;
use crate::push::target::Target;
use crate::push::{Pusher, Refusal};

/// The status Nix hears for each refusal, in one place.
fn status_of(refusal: &Refusal) -> StatusCode {
    match refusal {
        Refusal::NotAllowed(_) => StatusCode::FORBIDDEN,
        Refusal::Invalid(_) => StatusCode::BAD_REQUEST,
        Refusal::NoLength => StatusCode::LENGTH_REQUIRED,
        Refusal::TooSlow(_) => StatusCode::REQUEST_TIMEOUT,
        Refusal::NoRoom(_) => StatusCode::INSUFFICIENT_STORAGE,
        Refusal::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn refused(refusal: Refusal) -> Response<Body> {
    text(status_of(&refusal), format!("{refusal}\n"))
}

/// The upstreams this request's peer may push to, or the 403 that says why none.
async fn allowed(
    pusher: &Pusher,
    request: &Request<Incoming>,
) -> Result<Vec<Arc<Target>>, Response<Body>> {
    let uid = request.extensions().get::<Peer>().and_then(|peer| peer.uid);
    pusher.targets_for(uid).map_err(|reason| {
        tracing::warn!(?uid, "push refused: {reason}");
        refused(reason.into())
    })
}

/// `HEAD /nar/<file>` before an upload: only a NAR Nix gave us, or one in the local cache
/// (which its narinfo's PUT then takes from there), counts as there.
pub fn head(pusher: &Pusher, key: &str) -> Response<Body> {
    if key.strip_prefix("nar/").is_some_and(|f| pusher.has_nar(f)) {
        text(StatusCode::OK, "")
    } else {
        text(StatusCode::NOT_FOUND, "not uploaded\n")
    }
}

pub async fn nar(pusher: &Pusher, key: &str, request: Request<Incoming>) -> Response<Body> {
    if let Err(refusal) = allowed(pusher, &request).await {
        return refusal;
    }
    let Some(file) = key.strip_prefix("nar/").filter(|f| !f.contains('?')) else {
        return refused(Refusal::Invalid("PUT /nar/<file> takes no query".into()));
    };
    let length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    match pusher.put_nar(file, length, request.into_body()).await {
        Ok(()) => text(StatusCode::OK, ""),
        Err(refusal) => refused(refusal),
    }
}

pub async fn narinfo(pusher: &Pusher, hash: &str, request: Request<Incoming>) -> Response<Body> {
    let targets = match allowed(pusher, &request).await {
        Ok(targets) => targets,
        Err(refusal) => return refusal,
    };
    let body = crate::http::read_limited(
        request.into_body(),
        MAX_NARINFO_BYTES,
        Duration::from_secs(30),
    );
    let put = match body.await {
        Ok(text) => pusher.put_narinfo(hash, text, &targets).await,
        Err(e) => Err(Refusal::Invalid(e.to_string())),
    };
    match put {
        Ok(()) => text(StatusCode::OK, ""),
        Err(refusal) => refused(refusal),
    }
}

/// `POST /_sidecar/push` with `{"paths": [...], "wait": bool}`: queues the closures of the
/// paths (read from the local Nix store). Without `wait`, answers at once how many entries
/// were queued. With it, answers a line of JSON every few seconds while they upload (so
/// the connection never looks idle) and a last one with `"done": true` and the summary;
/// with `wait` and no paths, waits for everything queued.
pub async fn request(pusher: &Arc<Pusher>, request: Request<Incoming>) -> Response<Body> {
    let targets = match allowed(pusher, &request).await {
        Ok(targets) => targets,
        Err(refusal) => return refusal,
    };
    let ask = match read_ask(request.into_body()).await {
        Ok(ask) => ask,
        Err(refusal) => return refused(refusal),
    };
    let keys = if ask.paths.is_empty() {
        None
    } else {
        let infos = match crate::push::local::closure(&ask.paths).await {
            Ok(infos) => infos,
            Err(e) => return refused(Refusal::Invalid(e.to_string())),
        };
        let paths = infos.into_iter().map(|i| (i, Origin::Store)).collect();
        match pusher.enqueue(&targets, paths).await {
            Ok(keys) => Some(keys),
            Err(e) => return refused(Refusal::Failed(e.to_string())),
        }
    };
    if !ask.wait {
        let queued = keys.map_or(0, |k| k.len());
        return typed(
            StatusCode::ACCEPTED,
            "application/json",
            format!("{{\"queued\": {queued}}}\n"),
        );
    }
    progress(pusher.clone(), keys)
}

#[derive(serde::Deserialize)]
struct Ask {
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    wait: bool,
}

/// The request's JSON: store paths, or none with `wait` (the whole queue).
async fn read_ask(body: Incoming) -> Result<Ask, Refusal> {
    let usage = "expected a JSON body {\"paths\": [\"/nix/store/...\"], \"wait\": false}";
    let body = crate::http::read_limited(body, 1 << 20, Duration::from_secs(30))
        .await
        .map_err(|e| Refusal::Invalid(e.to_string()))?;
    let ask: Ask = serde_json::from_slice(&body).map_err(|_| Refusal::Invalid(usage.into()))?;
    let bad: Vec<&str> = ask
        .paths
        .iter()
        .filter(|p| !crate::nix::narinfo::is_store_path(p))
        .map(String::as_str)
        .collect();
    if !bad.is_empty() || (ask.paths.is_empty() && !ask.wait) {
        let reason = format!("not store paths: {}\n{usage}", bad.join(", "));
        return Err(Refusal::Invalid(reason));
    }
    Ok(ask)
}

/// A line of JSON every few seconds while `keys` (or the whole queue) upload, so the
/// connection never looks idle, and a last one with `"done": true` and the summary.
fn progress(pusher: Arc<Pusher>, keys: Option<Vec<String>>) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let waiting = pusher.wait(keys);
        tokio::pin!(waiting);
        loop {
            let tick = tokio::time::sleep(Duration::from_secs(5));
            let line = tokio::select! {
                summary = &mut waiting => {
                    let line = serde_json::json!({"done": true, "summary": summary});
                    let _ = tx.send(Ok(bytes::Bytes::from(format!("{line}\n")))).await;
                    return;
                }
                _ = tick => serde_json::json!({"done": false, "queued": pusher.status().queued}),
            };
            if tx
                .send(Ok(bytes::Bytes::from(format!("{line}\n"))))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    body::ndjson(rx)
}
