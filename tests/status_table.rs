//! The README's "What Nix is told" table, row by row, against the upstream double.

mod support;

use std::time::{Duration, Instant};

use support::http::{get, Got};
use support::issuer::Issuer;
use support::nix::fixture;
use support::sidecar::Sidecar;
use support::upstream::{hash_part, Fault, Target, UpstreamDouble};

const AUD: &str = "https://cache.test";

struct Setup {
    issuer: Issuer,
    upstream: UpstreamDouble,
    sidecar: Sidecar,
    token: String,
    _dir: tempfile::TempDir,
}

impl Setup {
    /// One view-scoped upstream, a static token for `machine-1` (or `token`), and `extra` config.
    async fn new(extra: &str, token: Option<String>) -> Setup {
        let fx = fixture();
        let issuer = Issuer::start().await;
        let upstream = UpstreamDouble::start(fx.cache.clone(), Some((&issuer.url, AUD))).await;
        upstream.grant("machine-1", &fx.closure);
        let token = token.unwrap_or_else(|| issuer.mint("machine-1", AUD, 300, false));
        let dir = tempfile::tempdir().unwrap();
        // One request, one answer: no lookahead fetching the references meanwhile.
        let config = format!(
            "narinfo-lookahead = false\n{extra}\n[[upstream]]\nname = \"org\"\nurl = \"{}\"\nidentity = \"ci\"\n\n[identity.ci]\nprovider = \"static\"\nvariable = \"TEST_TOKEN\"\n",
            upstream.url
        );
        let sidecar = Sidecar::start(dir.path(), &config, &[("TEST_TOKEN", &token)]);
        Setup {
            issuer,
            upstream,
            sidecar,
            token,
            _dir: dir,
        }
    }

    async fn get(&self, path: &str) -> Got {
        get(&format!("{}{path}", self.sidecar.url), "GET", &[]).await
    }
}

fn narinfo_path(store_path: &str) -> String {
    format!("/{}.narinfo", hash_part(store_path))
}

fn nar_url_of(narinfo: &str) -> String {
    narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn upstream_200_is_200_with_the_narinfo_unchanged_and_the_nar_intact() {
    let fx = fixture();
    let s = Setup::new("", None).await;
    let top = &fx.top;
    let answer = s.get(&narinfo_path(top)).await;
    assert_eq!(answer.status, 200);
    let original =
        std::fs::read_to_string(fx.cache.join(format!("{}.narinfo", hash_part(top)))).unwrap();
    assert_eq!(
        answer.text(),
        original,
        "narinfo text passes through byte for byte"
    );
    let head = get(
        &format!("{}{}", s.sidecar.url, narinfo_path(top)),
        "HEAD",
        &[],
    )
    .await;
    assert_eq!(head.status, 200);
    let nar_url = nar_url_of(&original);
    let nar = s.get(&format!("/{nar_url}")).await;
    assert_eq!(nar.status, 200);
    assert_eq!(
        nar.body.unwrap(),
        std::fs::read(fx.cache.join(&nar_url)).unwrap()
    );
    let info = s.get("/nix-cache-info").await;
    assert_eq!(
        info.text(),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n"
    );
}

#[tokio::test]
async fn upstream_404_410_and_403_are_a_404() {
    let fx = fixture();
    let s = Setup::new("", None).await;
    // 404: nobody has this path.
    assert_eq!(
        s.get("/00000000000000000000000000000000.narinfo")
            .await
            .status,
        404
    );
    // 403: in the cache but outside this identity's view.
    assert_eq!(s.get(&narinfo_path(&fx.outside)).await.status, 404);
    assert!(s
        .upstream
        .requests()
        .iter()
        .any(|r| r.path.contains(hash_part(&fx.outside))));
    // 410
    s.upstream
        .fault(Target::NarInfo, Fault::Status(410), Some(1));
    assert_eq!(s.get(&narinfo_path(&fx.closure[0])).await.status, 404);
}

#[tokio::test]
async fn upstream_401_gets_one_fresh_token_and_one_retry_then_a_503_never_a_loop() {
    let fx = fixture();
    let issuer = Issuer::start().await;
    let forged = issuer.forge("machine-1", AUD);
    let s = Setup::new("", Some(forged)).await;
    for round in 1..=2 {
        let answer = s.get(&narinfo_path(&fx.top)).await;
        assert_eq!(answer.status, 503);
        assert!(
            answer
                .text()
                .contains("rejected this machine's identity `ci`"),
            "{}",
            answer.text()
        );
        assert_eq!(
            s.upstream.count(".narinfo"),
            2 * round,
            "exactly one retry per request"
        );
    }
}

#[tokio::test]
async fn no_token_is_a_503_naming_the_identity_and_the_reason_and_cache_info_still_answers() {
    let fx = fixture();
    let upstream = UpstreamDouble::start(fx.cache.clone(), Some(("http://127.0.0.1:9", AUD))).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[[upstream]]\nname = \"org\"\nurl = \"{}\"\nidentity = \"ci\"\n\n[identity.ci]\nprovider = \"file\"\npath = \"{}\"\n",
        upstream.url,
        dir.path().join("missing-token").display()
    );
    let sidecar = Sidecar::start(dir.path(), &config, &[]);
    let answer = get(
        &format!("{}{}", sidecar.url, narinfo_path(&fx.top)),
        "GET",
        &[],
    )
    .await;
    assert_eq!(answer.status, 503);
    let body = answer.text();
    assert!(
        body.contains("identity `ci` could not provide a token"),
        "{body}"
    );
    assert!(
        body.contains("missing-token"),
        "the reason names the file: {body}"
    );
    assert_eq!(
        upstream.requests().len(),
        0,
        "nothing is sent without a token"
    );
    let info = get(&format!("{}/nix-cache-info", sidecar.url), "GET", &[]).await;
    assert_eq!(info.status, 200, "nix-cache-info is local and never fails");
}

#[tokio::test]
async fn upstream_5xx_is_retried_with_backoff_then_503() {
    let fx = fixture();
    let s = Setup::new("", None).await;
    s.upstream
        .fault(Target::NarInfo, Fault::Status(502), Some(1));
    assert_eq!(
        s.get(&narinfo_path(&fx.top)).await.status,
        200,
        "one 502 is retried away"
    );
    s.upstream.fault(Target::NarInfo, Fault::Status(500), None);
    let answer = s.get(&narinfo_path(&fx.closure[0])).await;
    assert_eq!(answer.status, 503);
    assert!(
        answer.text().contains("HTTP 500 after 3 attempts"),
        "{}",
        answer.text()
    );
}

#[tokio::test]
async fn upstream_429_retry_after_is_honoured() {
    let fx = fixture();
    let s = Setup::new("", None).await;
    s.upstream
        .fault(Target::NarInfo, Fault::RetryAfter(1), Some(1));
    let started = Instant::now();
    assert_eq!(s.get(&narinfo_path(&fx.top)).await.status, 200);
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "waited as told"
    );
    s.upstream
        .fault(Target::NarInfo, Fault::RetryAfter(3600), Some(1));
    let answer = s.get(&narinfo_path(&fx.closure[0])).await;
    assert_eq!(
        answer.status, 503,
        "a Retry-After beyond the budget is not waited for"
    );
}

#[tokio::test]
async fn a_cached_copy_is_served_past_its_ttl_when_the_upstream_fails() {
    let fx = fixture();
    let s = Setup::new("narinfo-ttl = \"1s\"", None).await;
    let fresh = s.get(&narinfo_path(&fx.top)).await;
    assert_eq!(fresh.status, 200);
    let nar_url = nar_url_of(&fresh.text());
    assert_eq!(s.get(&format!("/{nar_url}")).await.status, 200);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    s.upstream.fault(Target::Any, Fault::Status(503), None);
    let stale = s.get(&narinfo_path(&fx.top)).await;
    assert_eq!(stale.status, 200);
    assert_eq!(stale.text(), fresh.text());
    assert_eq!(s.get(&format!("/{nar_url}")).await.status, 200);
    assert_eq!(
        s.get(&narinfo_path(&fx.closure[0])).await.status,
        503,
        "never fetched: 503"
    );
}

#[tokio::test]
async fn several_upstreams_a_miss_is_claimed_only_when_every_upstream_said_so() {
    let fx = fixture();
    let broken = UpstreamDouble::start(fx.cache.clone(), None).await;
    broken.fault(Target::Any, Fault::Status(500), None);
    let empty_dir = tempfile::tempdir().unwrap();
    let empty = UpstreamDouble::start(empty_dir.path().to_path_buf(), None).await;
    let full = UpstreamDouble::start(fx.cache.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let up = |name: &str, url: &str| format!("[[upstream]]\nname = \"{name}\"\nurl = \"{url}\"\n");
    let one = Sidecar::start(
        dir.path(),
        &(up("broken", &broken.url) + &up("empty", &empty.url)),
        &[],
    );
    assert_eq!(
        get(&format!("{}{}", one.url, narinfo_path(&fx.top)), "GET", &[])
            .await
            .status,
        503
    );
    drop(one);
    let dir = tempfile::tempdir().unwrap();
    let two = Sidecar::start(
        dir.path(),
        &(up("broken", &broken.url) + &up("full", &full.url)),
        &[],
    );
    assert_eq!(
        get(&format!("{}{}", two.url, narinfo_path(&fx.top)), "GET", &[])
            .await
            .status,
        200
    );
    drop(two);
    let dir = tempfile::tempdir().unwrap();
    let three = Sidecar::start(
        dir.path(),
        &(up("empty", &empty.url) + &up("full", &full.url)),
        &[],
    );
    assert_eq!(
        get(
            &format!("{}/00000000000000000000000000000000.narinfo", three.url),
            "GET",
            &[]
        )
        .await
        .status,
        404
    );
    assert_eq!(
        get(
            &format!("{}{}", three.url, narinfo_path(&fx.top)),
            "GET",
            &[]
        )
        .await
        .status,
        200
    );
}

#[tokio::test]
async fn a_narinfo_without_a_valid_trusted_signature_is_a_404_with_a_warning() {
    let fx = fixture();
    // A well-formed key that did not sign the fixture.
    let other_key = "other-1:Pq7FQxuRrqZSNtvRKb1Ir8zTDAJ9l1yYa2ZIuHYTJho=";
    let s = Setup::new(&format!("trusted-public-keys = [\"{other_key}\"]"), None).await;
    let answer = s.get(&narinfo_path(&fx.top)).await;
    assert_eq!(answer.status, 404);
    let body = answer.text();
    assert!(
        body.contains("no trusted key signed it") && body.contains("trusted: other-1"),
        "the 404 says why: {body}"
    );
    let signer = fx.public_key.split(':').next().unwrap();
    assert!(body.contains(signer), "and who did sign it: {body}");
    assert!(
        s.sidecar.logs().contains("no valid signature"),
        "a warning is logged"
    );
    let s = Setup::new(
        &format!("trusted-public-keys = [\"{}\"]", fx.public_key),
        None,
    )
    .await;
    assert_eq!(s.get(&narinfo_path(&fx.top)).await.status, 200);
}

#[tokio::test]
async fn nar_bytes_that_do_not_match_abort_the_response() {
    let fx = fixture();
    for fault in [Fault::WrongBytes, Fault::Truncate, Fault::ResetMidBody] {
        let s = Setup::new("", None).await;
        let nar_url = nar_url_of(&s.get(&narinfo_path(&fx.top)).await.text());
        s.upstream.fault(Target::Nar, fault.clone(), Some(1));
        let answer = s.get(&format!("/{nar_url}")).await;
        assert!(
            answer.body.is_err() || answer.status == 503,
            "{fault:?}: the response must not look complete ({})",
            answer.status
        );
        // The next request fetches again and gets the right bytes.
        let again = s.get(&format!("/{nar_url}")).await;
        assert_eq!(
            again.body.unwrap(),
            std::fs::read(fx.cache.join(&nar_url)).unwrap(),
            "{fault:?}"
        );
    }
}

#[tokio::test]
async fn a_cross_host_redirect_never_carries_the_token() {
    let fx = fixture();
    let s = Setup::new("", None).await;
    let object_store =
        UpstreamDouble::start_with(fx.cache.clone(), None, |st| st.object_store = true).await;
    s.upstream.fault(
        Target::Nar,
        Fault::RedirectTo(object_store.url.clone()),
        None,
    );
    let nar_url = nar_url_of(&s.get(&narinfo_path(&fx.top)).await.text());
    let nar = s.get(&format!("/{nar_url}")).await;
    assert_eq!(nar.status, 200);
    assert_eq!(
        nar.body.unwrap(),
        std::fs::read(fx.cache.join(&nar_url)).unwrap()
    );
    let seen = object_store.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].authorization, None,
        "the token stayed with its upstream"
    );
    assert!(s
        .upstream
        .requests()
        .iter()
        .all(|r| r.authorization.is_some()));
}

#[tokio::test]
async fn the_token_never_appears_in_logs_at_trace_level_or_in_check_config() {
    std::env::set_var("TEST_SIDECAR_LOG", "trace");
    let fx = fixture();
    let s = Setup::new("", None).await;
    std::env::remove_var("TEST_SIDECAR_LOG");
    let nar_url = nar_url_of(&s.get(&narinfo_path(&fx.top)).await.text());
    s.get(&format!("/{nar_url}")).await;
    s.upstream.fault(Target::Any, Fault::Status(401), Some(2));
    s.get(&narinfo_path(&fx.closure[0])).await;
    let logs = s.sidecar.logs();
    assert!(logs.contains("TRACE"), "trace logging was on");
    let signature = s.token.rsplit('.').next().unwrap();
    assert!(
        !logs.contains(signature),
        "no token (or its signature) in the logs"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
        .args(["check-config", "--config"])
        .arg(s.sidecar.dir.join("sidecar.toml"))
        .env("TEST_TOKEN", &s.token)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains(signature));
    let _ = &s.issuer;
}

#[tokio::test]
async fn paths_that_do_not_parse_are_404_and_never_reach_a_file_or_the_upstream() {
    let s = Setup::new("", None).await;
    for path in [
        "/nar/..%2f..%2fetc%2fpasswd",
        "/../../etc/passwd",
        "/nar/.x",
        "/foo",
        "/index.redb",
    ] {
        assert_eq!(s.get(path).await.status, 404, "{path}");
    }
    let put = get(&format!("{}/nix-cache-info", s.sidecar.url), "PUT", &[]).await;
    assert_eq!(put.status, 405);
    assert!(s.upstream.requests().is_empty());
}

/// An upstream that answers a malformed narinfo, or one for another path, is broken: 502 (not
/// a miss, and not "try later"); a broken upstream and a down one together are a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_narinfo_is_a_502_naming_the_upstream() {
    let fx = fixture();
    let hash = hash_part(&fx.top).to_string();
    let other = hash_part(&fx.closure[0]).to_string();
    let (h, o) = (hash.clone(), other.clone());
    let broken = support::http::serve(move |req| {
        let (hash, other) = (h.clone(), o.clone());
        async move {
            let path = req.uri().path().to_string();
            if path == format!("/{hash}.narinfo") {
                support::http::respond(200, "StorePath: not a store path\nthis is not a narinfo")
            } else if path.ends_with(".narinfo") {
                // A well-formed narinfo, for another path.
                support::http::respond(
                    200,
                    format!("StorePath: /nix/store/{other}-x\nURL: nar/x.nar\nCompression: none\nNarHash: sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s\nNarSize: 1\n"),
                )
            } else {
                support::http::respond(404, "")
            }
        }
    })
    .await;
    let down_addr = support::refusing_addr();
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(
        dir.path(),
        &format!("[[upstream]]\nname = \"broken\"\nurl = \"http://{broken}\"\n"),
        &[],
    );
    let answer = get(&format!("{}/{hash}.narinfo", sidecar.url), "GET", &[]).await;
    assert_eq!(answer.status, 502, "{}", answer.text());
    assert!(
        answer.text().contains("upstream `broken`"),
        "{}",
        answer.text()
    );
    let unknown = "0000000000000000000000000000000a";
    let answer = get(&format!("{}/{unknown}.narinfo", sidecar.url), "GET", &[]).await;
    assert_eq!(answer.status, 502, "for another path: {}", answer.text());
    drop(sidecar);

    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(
        dir.path(),
        &format!("[[upstream]]\nname = \"broken\"\nurl = \"http://{broken}\"\n[[upstream]]\nname = \"down\"\nurl = \"http://{down_addr}\"\n"),
        &[],
    );
    let answer = get(&format!("{}/{hash}.narinfo", sidecar.url), "GET", &[]).await;
    assert_eq!(answer.status, 503, "{}", answer.text());
}
