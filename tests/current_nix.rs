//! What current Nix (2.2x) does that Nix 2.8 did not, each answered as it expects: narinfo
//! bursts over 25 keep-alive connections, fields it does not know yet (`Provenance:`), the
//! `.ls` listings and `debuginfo/` index it asks for, and `Retry-After` on a 503.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::BodyExt;

use support::http::{get, respond, serve};
use support::nix::fixture;
use support::sidecar::Sidecar;
use support::upstream::hash_part;

fn node(i: usize) -> String {
    support::upstream::synthetic_hash(i)
}

/// 25 keep-alive clients walk the same 1,000-path closure at once, each in its own order,
/// against a cold sidecar: every narinfo costs exactly one upstream request, and the
/// sidecar's counters add up to the requests made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_five_keep_alive_walkers_cost_one_upstream_request_per_narinfo() {
    const PATHS: usize = 1000;
    const CLIENTS: usize = 25;
    let asked: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let log = asked.clone();
    let addr = serve(move |req| {
        let log = log.clone();
        async move {
            let path = req.uri().path().trim_start_matches('/').to_string();
            let Some(hash) = path.strip_suffix(".narinfo") else {
                return respond(404, "");
            };
            *log.lock().unwrap().entry(hash.to_string()).or_default() += 1;
            // A little latency, so walkers overlap on the same paths.
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            respond(
                200,
                format!("StorePath: /nix/store/{hash}-node\nURL: nar/{hash}.nar\nCompression: none\nNarHash: sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s\nNarSize: 1\nReferences: \n"),
            )
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(
        dir.path(),
        &format!("[[upstream]]\nname = \"u\"\nurl = \"http://{addr}\"\n"),
        &[],
    );
    let hashes: Arc<Vec<String>> = Arc::new((0..PATHS).map(node).collect());
    let mut walkers = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let (hashes, url) = (hashes.clone(), sidecar.url.clone());
        walkers.spawn(async move {
            // One keep-alive connection per walker, as each of Nix's curl handles keeps one.
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .pool_max_idle_per_host(1)
                    .build_http::<http_body_util::Empty<Bytes>>();
            let mut ok = 0;
            for k in 0..PATHS {
                let hash = &hashes[(k * 7 + c * 40) % PATHS];
                let uri: http::Uri = format!("{url}/{hash}.narinfo").parse().unwrap();
                let response = client.get(uri).await.unwrap();
                let status = response.status();
                let _ = response.into_body().collect().await.unwrap();
                if status == 200 {
                    ok += 1;
                }
            }
            ok
        });
    }
    let mut served = 0;
    while let Some(ok) = walkers.join_next().await {
        served += ok.unwrap();
    }
    assert_eq!(served, PATHS * CLIENTS, "every walker got every narinfo");
    let asked = asked.lock().unwrap().clone();
    assert_eq!(asked.len(), PATHS);
    let repeated: Vec<_> = asked.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        repeated.is_empty(),
        "asked upstream more than once: {repeated:?}"
    );
    let metrics = get(&format!("{}/_sidecar/metrics", sidecar.url), "GET", &[])
        .await
        .text();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0.0)
    };
    assert_eq!(
        value("nix_sidecar_requests_total{route=\"narinfo\",status=\"200\"}"),
        (PATHS * CLIENTS) as f64,
        "{metrics}"
    );
}

/// A field Nix 2.8 never wrote (`Provenance:`) passes through byte for byte, and the
/// signature (which does not cover it) still verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_narinfo_fields_pass_through_byte_for_byte_with_signatures_valid() {
    let fx = fixture();
    let (narinfo, _, _) = fx.files(&fx.top);
    let newer = format!(
        "{narinfo}Provenance: {{\"type\":\"build\",\"drv\":\"x.drv\",\"next\":{{\"flake\":\"github:o/r\"}}}}\n"
    );
    let hash = hash_part(&fx.top).to_string();
    let served = newer.clone();
    let wanted = format!("/{hash}.narinfo");
    let addr = serve(move |req| {
        let (served, wanted) = (served.clone(), wanted.clone());
        async move {
            if req.uri().path() == wanted {
                respond(200, served)
            } else {
                respond(404, "")
            }
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(
        dir.path(),
        &format!(
            "trusted-public-keys = [\"{}\"]\n[[upstream]]\nname = \"u\"\nurl = \"http://{addr}\"\n",
            fx.public_key
        ),
        &[],
    );
    for _ in 0..2 {
        // Fetched, then from the cache.
        let got = sidecar.narinfo(&fx.top).await;
        assert_eq!(got.status, 200, "{}", got.text());
        assert_eq!(got.text(), newer);
    }
    let parsed = nix_sidecar::nix::narinfo::NarInfo::parse(newer.as_bytes()).unwrap();
    let keys = nix_sidecar::nix::narinfo::TrustedKeys::parse(&[fx.public_key.as_str()]).unwrap();
    assert!(keys.verify(&parsed));
}

/// `<hash>.ls` (a NAR's listing) and `debuginfo/<build-id>` are forwarded with the token, as
/// `log/` is; a 503 tells Nix when to come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_and_debuginfo_are_forwarded_and_503s_carry_retry_after() {
    // (path, Authorization) of each request the upstream saw.
    type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let addr = serve(move |req| {
        let log = log.clone();
        async move {
            let path = req.uri().path().to_string();
            let auth = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            log.lock().unwrap().push((path.clone(), auth));
            if path.ends_with(".ls") {
                respond(
                    200,
                    "{\"version\":1,\"root\":{\"type\":\"regular\",\"size\":1}}",
                )
            } else if path.starts_with("/debuginfo/") {
                respond(
                    200,
                    "{\"archive\":\"../nar/x.nar.xz\",\"member\":\"lib/x.debug\"}",
                )
            } else if path.ends_with(".narinfo") {
                respond(500, "down")
            } else {
                respond(404, "")
            }
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let issuer = support::issuer::Issuer::start().await;
    let jwt = issuer.mint("machine", "https://cache.test", 600, false);
    let token = dir.path().join("token");
    std::fs::write(&token, &jwt).unwrap();
    let sidecar = Sidecar::start(
        dir.path(),
        &format!(
            "[[upstream]]\nname = \"u\"\nurl = \"http://{addr}\"\nidentity = \"i\"\n[identity.i]\nprovider = \"file\"\npath = \"{}\"\n",
            token.display()
        ),
        &[],
    );
    let hash = node(7);
    let listing = get(&format!("{}/{hash}.ls", sidecar.url), "GET", &[]).await;
    assert_eq!(listing.status, 200, "{}", listing.text());
    assert!(listing.text().contains("\"version\":1"));
    let build_id = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567";
    let debug = get(&format!("{}/debuginfo/{build_id}", sidecar.url), "GET", &[]).await;
    assert_eq!(debug.status, 200);
    assert!(debug.text().contains("\"member\""));
    let seen = seen.lock().unwrap().clone();
    for path in [format!("/{hash}.ls"), format!("/debuginfo/{build_id}")] {
        let auth = seen
            .iter()
            .find(|(p, _)| *p == path)
            .map(|(_, a)| a.clone());
        assert_eq!(auth, Some(Some(format!("Bearer {jwt}"))), "{path}");
    }
    let down = get(&format!("{}/{hash}.narinfo", sidecar.url), "GET", &[]).await;
    assert_eq!(down.status, 503);
    assert!(
        down.headers.get("retry-after").is_some(),
        "{:?}",
        down.headers
    );
}

/// README "What Nix is told": a `Range` request for a NAR still being downloaded gets the whole
/// NAR (200), verified; once it is stored, the range (206).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_on_a_nar_being_filled_gets_the_whole_nar_then_206_once_stored() {
    let fx = fixture();
    let (narinfo, nar, url) = fx.files(&fx.top);
    let hash = hash_part(&fx.top).to_string();
    let nar = Bytes::from(nar);
    let (served_info, served_nar, nar_path) = (narinfo.clone(), nar.clone(), format!("/{url}"));
    let addr = serve(move |req| {
        let (info, nar, nar_path) = (served_info.clone(), served_nar.clone(), nar_path.clone());
        async move {
            let path = req.uri().path().to_string();
            if path.ends_with(".narinfo") {
                return respond(200, info);
            }
            if path != nar_path {
                return respond(404, "");
            }
            // Half at once, the rest a second later: the fill is in progress meanwhile.
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            let half = nar.len() / 2;
            tokio::spawn(async move {
                let _ = tx.send(Ok(nar.slice(..half))).await;
                tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
                let _ = tx.send(Ok(nar.slice(half..))).await;
            });
            let len = served_len(&info);
            http::Response::builder()
                .status(200)
                .header("content-length", len)
                .body(nix_sidecar::http::ChannelBody::new(rx).boxed())
                .unwrap()
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(
        dir.path(),
        &format!(
            "nar-lookahead = false\ntrusted-public-keys = [\"{}\"]\n[[upstream]]\nname = \"u\"\nurl = \"http://{addr}\"\n",
            fx.public_key
        ),
        &[],
    );
    assert_eq!(sidecar.narinfo(&fx.top).await.status, 200, "{hash}");
    let nar_url = format!("{}/{url}", sidecar.url);
    let first = tokio::spawn({
        let nar_url = nar_url.clone();
        async move { get(&nar_url, "GET", &[]).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let ranged = get(&nar_url, "GET", &[("range", "bytes=0-9")]).await;
    assert_eq!(ranged.status, 200, "the whole NAR while it is being filled");
    assert_eq!(ranged.body.unwrap(), nar);
    assert_eq!(first.await.unwrap().body.unwrap(), nar);
    // Stored now: the range itself.
    let mut stored = get(&nar_url, "GET", &[("range", "bytes=0-9")]).await;
    for _ in 0..50 {
        if stored.status == 206 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        stored = get(&nar_url, "GET", &[("range", "bytes=0-9")]).await;
    }
    assert_eq!(stored.status, 206);
    assert_eq!(stored.body.unwrap(), nar.slice(..10));
}

/// The NAR file's length from a narinfo (FileSize).
fn served_len(narinfo: &str) -> String {
    narinfo
        .lines()
        .find_map(|l| l.strip_prefix("FileSize: "))
        .unwrap()
        .to_string()
}
