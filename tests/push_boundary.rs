//! What a push may and may not do to this machine (the second outside review, items 2, 3 and
//! 7 to 10 and 13): uploads exactly what was checked, trusted only as a pull would be, never
//! over an upstream's signed narinfo, bounded on disk and in time, cycles reported, evicted
//! pushes pulled back, pins only for push-uids, private files.

mod support;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;

use support::http::{get, respond, serve};
use support::nix::fixture;
use support::sidecar::Sidecar;
use support::upstream::{hash_part, UpstreamDouble};

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// A plain HTTP binary cache that takes PUTs (refusing them with 503 until `open_at`) and
/// serves what it took.
struct HttpCache {
    url: String,
    files: Arc<Mutex<HashMap<String, Bytes>>>,
}

impl HttpCache {
    async fn start(closed_for: Duration) -> HttpCache {
        let files: Arc<Mutex<HashMap<String, Bytes>>> = Arc::default();
        let open_at = Instant::now() + closed_for;
        let held = files.clone();
        let addr = serve(move |req| {
            let files = held.clone();
            async move {
                let path = req.uri().path().trim_start_matches('/').to_string();
                match *req.method() {
                    http::Method::PUT if Instant::now() < open_at => respond(503, "not yet"),
                    http::Method::PUT => {
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        files.lock().unwrap().insert(path, body);
                        respond(200, "")
                    }
                    _ => match files.lock().unwrap().get(&path) {
                        Some(bytes) => respond(200, bytes.clone()),
                        None => respond(404, ""),
                    },
                }
            }
        })
        .await;
        HttpCache {
            url: format!("http://{addr}"),
            files,
        }
    }

    fn file(&self, name: &str) -> Option<Bytes> {
        self.files.lock().unwrap().get(name).cloned()
    }
}

/// A builder pushing to `upstream` (`push = "http"`, from our uid), trusting the fixture's
/// key; `top` goes before the tables.
fn builder(dir: &Path, upstream: &str, top: &str) -> Sidecar {
    std::fs::create_dir_all(dir).unwrap();
    let config = format!(
        "{top}\ntrusted-public-keys = [\"{}\"]\n[[upstream]]\nname = \"org\"\nurl = \"{upstream}\"\npush = \"http\"\npush-uids = [{}]\n",
        fixture().public_key,
        euid()
    );
    Sidecar::start(dir, &config, &[])
}

async fn put(url: &str, body: Vec<u8>) -> (u16, String) {
    support::http::send("PUT", url, body).await
}

/// `nix-sidecar push --wait` against `sidecar`, bounded in time.
async fn push_wait(sidecar: &Sidecar) -> std::process::Output {
    let url = sidecar.url.clone();
    let waited = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
            .args(["push", "--url", &url, "--wait"])
            .env_remove("OUT_PATHS")
            .output()
            .unwrap()
    });
    match tokio::time::timeout(Duration::from_secs(60), waited).await {
        Ok(output) => output.unwrap(),
        Err(_) => panic!(
            "push --wait did not return within a minute:\n{}",
            sidecar.logs()
        ),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn what_is_uploaded_is_what_was_checked_even_if_the_name_is_put_again() {
    let fx = fixture();
    // The cache takes uploads only after a while: the second PUT comes before the upload.
    let cache = HttpCache::start(Duration::from_secs(2)).await;
    let dir = tempfile::tempdir().unwrap();
    let builder = builder(dir.path(), &cache.url, "");
    let (narinfo, nar, url) = fixture().files(&fx.top);
    let hash = hash_part(&fx.top);
    assert_eq!(
        put(&format!("{}/{url}", builder.url), nar.clone()).await.0,
        200
    );
    let put_info = put(
        &format!("{}/{hash}.narinfo", builder.url),
        narinfo.into_bytes(),
    )
    .await;
    assert_eq!(put_info.0, 200, "{}", put_info.1);
    // Another upload under the same name, after the check: it must not be what goes up.
    let mut other = nar.clone();
    let last = other.len() - 1;
    other[last] ^= 0xff;
    let _ = put(&format!("{}/{url}", builder.url), other).await;
    let waited = push_wait(&builder).await;
    assert!(
        waited.status.success(),
        "{}{}",
        String::from_utf8_lossy(&waited.stdout),
        builder.logs()
    );
    assert_eq!(
        cache.file(&url).as_deref(),
        Some(nar.as_slice()),
        "the bytes uploaded are the bytes checked"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pushed_narinfos_are_trusted_as_pulls_are_and_never_replace_an_upstreams() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let nowhere = HttpCache::start(Duration::ZERO).await;
    // 1. Unsigned, with require-signatures: queued for upload, not served to local Nix.
    let builder1 = builder(&dir.path().join("one"), &nowhere.url, "");
    let (narinfo, nar, url) = fixture().files(&fx.closure[0]);
    let hash = hash_part(&fx.closure[0]);
    let unsigned: String = narinfo
        .lines()
        .filter(|l| !l.starts_with("Sig: "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        put(&format!("{}/{url}", builder1.url), nar.clone()).await.0,
        200
    );
    let answer = put(
        &format!("{}/{hash}.narinfo", builder1.url),
        unsigned.clone().into_bytes(),
    )
    .await;
    assert_eq!(answer.0, 200, "{}", answer.1);
    let served = builder1.narinfo(&fx.closure[0]).await;
    assert_eq!(
        served.status,
        404,
        "an unsigned push is served: {}",
        served.text()
    );
    assert!(builder1.logs().contains("not served locally"));

    // 2. An upstream's signed narinfo, cached, then a push of the same path: the upstream's
    //    text stays.
    let upstream = UpstreamDouble::start(fx.cache.clone(), None).await;
    let dir2 = dir.path().join("two");
    std::fs::create_dir_all(&dir2).unwrap();
    let builder2 = Sidecar::start(
        &dir2,
        &format!(
            "trusted-public-keys = [\"{}\"]\n[[upstream]]\nname = \"org\"\nurl = \"{}\"\npush = \"http\"\npush-uids = [{}]\n",
            fx.public_key,
            upstream.url,
            euid()
        ),
        &[],
    );
    let before = builder2.narinfo(&fx.closure[0]).await;
    assert_eq!(before.status, 200);
    let original = before.text();
    // Still validly signed (the signature does not cover it), but other text.
    let tampered = format!("{narinfo}Provenance: pushed-over\n");
    assert_eq!(put(&format!("{}/{url}", builder2.url), nar).await.0, 200);
    let answer = put(
        &format!("{}/{hash}.narinfo", builder2.url),
        tampered.into_bytes(),
    )
    .await;
    assert_eq!(answer.0, 200, "{}", answer.1);
    assert_eq!(builder2.narinfo(&fx.closure[0]).await.text(), original);
}

#[tokio::test(flavor = "multi_thread")]
async fn paths_that_refer_to_each_other_fail_for_good_with_the_reason() {
    let fx = fixture();
    // Closed for a while: both are queued before either could go up.
    let cache = HttpCache::start(Duration::from_secs(3)).await;
    let dir = tempfile::tempdir().unwrap();
    let builder = builder(dir.path(), &cache.url, "require-signatures = false");
    let (narinfo, nar, url) = fixture().files(&fx.closure[0]);
    assert_eq!(put(&format!("{}/{url}", builder.url), nar).await.0, 200);
    let (x, y) = ("x".repeat(32), "y".repeat(32));
    let made = |me: &str, other: &str| -> String {
        narinfo
            .lines()
            .filter(|l| !l.starts_with("Sig: ") && !l.starts_with("Deriver: "))
            .map(|l| {
                if l.starts_with("StorePath: ") {
                    format!("StorePath: /nix/store/{me}-cyclic\n")
                } else if l.starts_with("References: ") {
                    format!("References: {other}-cyclic\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect()
    };
    for (me, other) in [(&x, &y), (&y, &x)] {
        let answer = put(
            &format!("{}/{me}.narinfo", builder.url),
            made(me, other).into_bytes(),
        )
        .await;
        assert_eq!(answer.0, 200, "{}", answer.1);
    }
    let waited = push_wait(&builder).await;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&waited.stdout),
        String::from_utf8_lossy(&waited.stderr)
    );
    assert!(!waited.status.success(), "{said}\n{}", builder.logs());
    assert!(said.contains("2 failed"), "{said}");
    assert!(said.contains("cycle"), "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn staging_is_bounded_in_size_and_time_and_private() {
    let fx = fixture();
    let cache = HttpCache::start(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let builder = builder(dir.path(), &cache.url, "max-cache-size = \"200KiB\"");
    // No length: refused before a byte is stored.
    let addr = builder.url.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(b"PUT /nar/a.nar HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 411"));
    // More than the staging cap (half of max-cache-size): 507.
    let big = vec![7u8; 150 * 1024];
    let (status, body) = put(&format!("{}/nar/big.nar", builder.url), big).await;
    assert_eq!(status, 507, "{body}");
    assert!(body.contains("staging cap"), "{body}");
    // A body that trickles: cut off at its deadline, its room given back.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"PUT /nar/slow.nar HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(75), async {
        let mut got = Vec::new();
        loop {
            let _ = slow.write_all(b"x").await;
            tokio::select! {
                n = slow.read(&mut buf) => {
                    let n = n.unwrap_or(0);
                    got.extend_from_slice(&buf[..n]);
                    return got;
                }
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    })
    .await
    .expect("the trickle is cut off");
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 408") || answer.is_empty(),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    eprintln!("trickling upload cut off after {:?}", started.elapsed());
    // The real thing, still within the cap; its files are private.
    let (narinfo, nar, url) = fixture().files(&fx.closure[0]);
    assert_eq!(put(&format!("{}/{url}", builder.url), nar).await.0, 200);
    let staged = builder
        .cache_dir()
        .join("push")
        .join(url.trim_start_matches("nar/"));
    assert_eq!(
        std::fs::metadata(&staged).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let hash = hash_part(&fx.closure[0]);
    let answer = put(
        &format!("{}/{hash}.narinfo", builder.url),
        narinfo.into_bytes(),
    )
    .await;
    assert_eq!(answer.0, 200, "{}", answer.1);
    let queue = builder.cache_dir().join("push.redb");
    assert_eq!(
        std::fs::metadata(&queue).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(push_wait(&builder).await.status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_evicted_push_is_pulled_back_from_its_upstream() {
    let fx = fixture();
    let cache = HttpCache::start(Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let mut builder = builder(dir.path(), &cache.url, "");
    let (narinfo, nar, url) = fixture().files(&fx.closure[0]);
    let hash = hash_part(&fx.closure[0]);
    assert_eq!(
        put(&format!("{}/{url}", builder.url), nar.clone()).await.0,
        200
    );
    assert_eq!(
        put(
            &format!("{}/{hash}.narinfo", builder.url),
            narinfo.into_bytes()
        )
        .await
        .0,
        200
    );
    assert!(push_wait(&builder).await.status.success());
    builder.stop();
    let gc = std::process::Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
        .args(["cache", "gc", "--max-size", "0", "--cache-dir"])
        .arg(builder.cache_dir())
        .output()
        .unwrap();
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    builder.restart();
    let again = get(&format!("{}/{url}", builder.url), "GET", &[]).await;
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.body.unwrap().as_ref(), nar.as_slice());
}

#[tokio::test(flavor = "multi_thread")]
async fn only_push_uids_pin_and_unpin() {
    let fx = fixture();
    let upstream = UpstreamDouble::start(fx.cache.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let someone_else = euid() + 4242;
    let sidecar = Sidecar::start(
        dir.path(),
        &format!(
            "trusted-public-keys = [\"{}\"]\n[[upstream]]\nname = \"org\"\nurl = \"{}\"\npush = \"http\"\npush-uids = [{someone_else}]\n",
            fx.public_key, upstream.url
        ),
        &[],
    );
    let post = |path: &str, body: String| {
        let url = format!("{}{path}", sidecar.url);
        async move { support::http::send("POST", &url, body).await }
    };
    let pinned = format!("{{\"paths\": [\"{}\"], \"pin\": \"forever\"}}", fx.top);
    let (status, body) = post("/_sidecar/prefetch", pinned).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("may not pin"), "{body}");
    let (status, body) = post("/_sidecar/unpin", String::new()).await;
    assert_eq!(status, 403, "{body}");
    // A plain prefetch is a pull: anyone who may pull may.
    let plain = format!("{{\"paths\": [\"{}\"]}}", fx.top);
    assert_eq!(post("/_sidecar/prefetch", plain).await.0, 200);
}
