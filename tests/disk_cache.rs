//! The local NAR cache: one fetch per file, verified, crash-safe, bounded, and serving while
//! upstreams and identity providers are down.

mod support;

use std::sync::OnceLock;
use std::time::Duration;

use support::http::get;
use support::issuer::Issuer;
use support::nix::{build_many, fixture, in_store, substitute, Fixture};
use support::sidecar::Sidecar;
use support::upstream::{hash_part, Fault, Target, UpstreamDouble};

/// 50 independent, uncompressed NARs of about 600 KB.
fn many() -> &'static Fixture {
    static MANY: OnceLock<Fixture> = OnceLock::new();
    MANY.get_or_init(|| build_many(50, 100_000, "none"))
}

fn anonymous(url: &str) -> String {
    format!("[[upstream]]\nname = \"up\"\nurl = \"{url}\"\n")
}

async fn nar_url(sidecar: &str, store_path: &str) -> String {
    let info = get(
        &format!("{sidecar}/{}.narinfo", hash_part(store_path)),
        "GET",
        &[],
    )
    .await;
    assert_eq!(info.status, 200);
    let url = info
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_string();
    url
}

fn cache_output(sidecar: &Sidecar, action: &str) -> (bool, String) {
    let out = sidecar.cache_command(action);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

async fn metric(sidecar: &str, name: &str) -> f64 {
    let text = get(&format!("{sidecar}/_sidecar/metrics"), "GET", &[])
        .await
        .text();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hundred_concurrent_requests_for_one_uncached_nar_cause_one_download() {
    let fx = many();
    let upstream = UpstreamDouble::start(fx.cache.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(dir.path(), &anonymous(&upstream.url), &[]);
    let url = nar_url(&sidecar.url, &fx.top).await;
    upstream.fault(Target::Nar, Fault::Slow(Duration::from_millis(10)), None);
    let expected = std::fs::read(fx.cache.join(&url)).unwrap();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let target = format!("{}/{url}", sidecar.url);
        clients.spawn(async move { get(&target, "GET", &[]).await });
    }
    let mut complete = 0;
    while let Some(got) = clients.join_next().await {
        let got = got.unwrap();
        assert_eq!(got.status, 200);
        assert!(got.body.unwrap() == expected, "identical, complete bytes");
        complete += 1;
    }
    assert_eq!(complete, 100);
    assert_eq!(upstream.count(&url), 1, "exactly one upstream request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_upstream_leaves_nothing_cached_and_real_nix_fails_the_download() {
    let fx = fixture();
    for fault in [Fault::WrongBytes, Fault::Truncate, Fault::ResetMidBody] {
        let upstream = UpstreamDouble::start(fx.cache.clone(), None).await;
        upstream.fault(Target::Nar, fault.clone(), None);
        let dir = tempfile::tempdir().unwrap();
        let mut sidecar = Sidecar::start(dir.path(), &anonymous(&upstream.url), &[]);
        let (url, pk, top, client) = (
            sidecar.url.clone(),
            fx.public_key.clone(),
            fx.top.clone(),
            dir.path().join("client"),
        );
        let c = client.clone();
        let out = tokio::task::spawn_blocking(move || substitute(&url, &pk, &[&top], &c))
            .await
            .unwrap();
        assert!(!out.status.success(), "{fault:?}: nix must not accept it");
        assert!(!in_store(&client, &fx.top));
        let metric_name = match fault {
            Fault::ResetMidBody => "nix_sidecar_upstream_body_failures_total",
            _ => "nix_sidecar_verification_failures_total",
        };
        let failures = metric(&sidecar.url, metric_name).await;
        assert!(failures >= 1.0, "{fault:?}: counted in a metric");
        sidecar.stop();
        let (_, stats) = cache_output(&sidecar, "stats");
        assert!(
            stats.contains("stored files: 0"),
            "{fault:?}: nothing stored:\n{stats}"
        );
        let (clean, report) = cache_output(&sidecar, "verify");
        assert!(clean && report.contains("corrupt: 0"), "{report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_upstream_of_unknown_length_breaks_the_response_instead_of_ending_it() {
    let fx = fixture();
    for fault in [Fault::WrongBytes, Fault::Truncate] {
        // Attic-like: no FileSize, NARs streamed without a length, so neither side can tell a
        // short body by its length: only the check can, and the response must then break.
        let upstream =
            UpstreamDouble::start_with(fx.cache.clone(), None, |s| s.strip_file_hash = true).await;
        upstream.fault(Target::Nar, fault.clone(), None);
        let dir = tempfile::tempdir().unwrap();
        let sidecar = Sidecar::start(dir.path(), &anonymous(&upstream.url), &[]);
        let url = nar_url(&sidecar.url, &fx.top).await;
        let got = get(&format!("{}/{url}", sidecar.url), "GET", &[]).await;
        assert_eq!(got.status, 200, "{fault:?}");
        assert!(!got.headers.contains_key("content-length"), "{fault:?}");
        assert!(got.body.is_err(), "{fault:?}: a complete response");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_fifty_concurrent_fills_leaves_a_consistent_cache() {
    let fx = many();
    let upstream = UpstreamDouble::start(fx.cache.clone(), None).await;
    upstream.fault(Target::Nar, Fault::Slow(Duration::from_millis(3)), None);
    let dir = tempfile::tempdir().unwrap();
    let mut sidecar = Sidecar::start(dir.path(), &anonymous(&upstream.url), &[]);
    let mut urls = Vec::new();
    for path in &fx.closure {
        urls.push(nar_url(&sidecar.url, path).await);
    }
    // Narinfo rows are made durable within 100 ms; a crash before that would lose them (and
    // the NARs would be passed through uncached), which is not what this test is about.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for round in 0..4u64 {
        let mut clients = tokio::task::JoinSet::new();
        for url in &urls {
            let target = format!("{}/{url}", sidecar.url);
            clients.spawn(async move { get(&target, "GET", &[]).await });
        }
        // Somewhere between the first bytes and the last commits.
        tokio::time::sleep(Duration::from_millis(150 + 200 * round + fastrand_ms())).await;
        sidecar.kill();
        while clients.join_next().await.is_some() {}
        let (_, report) = cache_output(&sidecar, "verify");
        assert!(
            report.contains("corrupt: 0") && report.contains("missing: 0"),
            "round {round}: {report}"
        );
        sidecar.restart();
    }
    upstream.clear_faults();
    for (url, path) in urls.iter().zip(&fx.closure) {
        let got = get(&format!("{}/{url}", sidecar.url), "GET", &[]).await;
        assert_eq!(
            got.body.unwrap(),
            std::fs::read(fx.cache.join(url)).unwrap(),
            "{path}"
        );
    }
    sidecar.stop();
    let (clean, report) = cache_output(&sidecar, "verify");
    assert!(clean, "{report}");
    assert!(report.contains("checked: 50"), "{report}");
    assert!(
        report.contains("corrupt: 0") && report.contains("leftovers removed: 0"),
        "{report}"
    );
}

fn fastrand_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        % 100
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_content_is_substituted_while_upstream_and_identity_provider_are_down() {
    let fx = fixture();
    let aud = "https://cache.test";
    let issuer = Issuer::start().await;
    let upstream = UpstreamDouble::start(fx.cache.clone(), Some((&issuer.url, aud))).await;
    upstream.grant("machine-1", &fx.closure);
    upstream.grant("machine-1", std::slice::from_ref(&fx.outside));
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, issuer.mint("machine-1", aud, 6, false)).unwrap();
    let config = format!(
        "narinfo-ttl = \"1s\"\ntrusted-public-keys = [\"{}\"]\n{}identity = \"ci\"\n[identity.ci]\nprovider = \"file\"\npath = \"{}\"\nrefresh-interval = \"1s\"\n",
        fx.public_key,
        anonymous(&upstream.url),
        token_file.display()
    );
    let sidecar = Sidecar::start(dir.path(), &config, &[]);
    let run = |client: &str| {
        let (url, pk, top, c) = (
            sidecar.url.clone(),
            fx.public_key.clone(),
            fx.top.clone(),
            dir.path().join(client),
        );
        tokio::task::spawn_blocking(move || substitute(&url, &pk, &[&top], &c))
    };
    let out = run("first").await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Everything goes down: the token expires and cannot be renewed, the upstream fails.
    std::fs::remove_file(&token_file).unwrap();
    upstream.fault(Target::Any, Fault::Status(503), None);
    tokio::time::sleep(Duration::from_secs(7)).await;
    let out = run("second").await.unwrap();
    assert!(
        out.status.success(),
        "cached content still substitutes: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for path in &fx.closure {
        assert!(in_store(&dir.path().join("second"), path));
    }
    let miss = sidecar.narinfo(&fx.outside).await;
    assert_eq!(miss.status, 503);
    assert!(
        miss.text().contains("identity `ci`") && miss.text().contains("token"),
        "{}",
        miss.text()
    );
    let health = get(&format!("{}/_sidecar/health", sidecar.url), "GET", &[]).await;
    assert_eq!(health.status, 503, "degraded");

    // The provider comes back: the next request succeeds without a restart.
    std::fs::write(&token_file, issuer.mint("machine-1", aud, 300, false)).unwrap();
    upstream.clear_faults();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let back = sidecar.narinfo(&fx.outside).await;
    assert_eq!(back.status, 200, "{:?}", back.body);
    let health = get(&format!("{}/_sidecar/health", sidecar.url), "GET", &[]).await;
    assert_eq!(health.status, 200, "{}", health.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_stays_under_max_cache_size() {
    let fx = many();
    let upstream = UpstreamDouble::start(fx.cache.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let max = 3 * 1024 * 1024;
    let mut sidecar = Sidecar::start(
        dir.path(),
        &format!("max-cache-size = \"3MiB\"\n{}", anonymous(&upstream.url)),
        &[],
    );
    let mut total = 0;
    for path in &fx.closure {
        let url = nar_url(&sidecar.url, path).await;
        let got = get(&format!("{}/{url}", sidecar.url), "GET", &[]).await;
        total += got.body.unwrap().len();
        let size = metric(&sidecar.url, "nix_sidecar_cache_size_bytes").await;
        assert!(
            size <= max as f64,
            "cache holds {size} bytes, more than {max}"
        );
    }
    assert!(
        total > 3 * max,
        "the workload ({total} bytes) is larger than the cache"
    );
    assert!(metric(&sidecar.url, "nix_sidecar_cache_evictions_total").await > 0.0);
    sidecar.stop();
    let (clean, report) = cache_output(&sidecar, "verify");
    assert!(clean, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_turns_caching_off_while_requests_still_pass_through() {
    let fx = many();
    let upstream = UpstreamDouble::start(fx.cache.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    std::fs::create_dir_all(&cache_dir).unwrap();
    // A small tmpfs nearly filled by something else; without the right to mount, ask for more
    // free space than any disk has, which is the same situation to nix-sidecar.
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&cache_dir)
        .status()
        .is_ok_and(|s| s.success());
    let min_free = if mounted {
        std::fs::write(cache_dir.join("ballast"), vec![0u8; 3 * 1024 * 1024]).unwrap();
        "1MiB"
    } else {
        eprintln!("cannot mount a tmpfs here; simulating a full disk with min-free-space");
        "1000TiB"
    };
    let mut sidecar = Sidecar::start(
        dir.path(),
        &format!(
            "min-free-space = \"{min_free}\"\n{}",
            anonymous(&upstream.url)
        ),
        &[],
    );
    for path in fx.closure.iter().take(5) {
        let url = nar_url(&sidecar.url, path).await;
        let got = get(&format!("{}/{url}", sidecar.url), "GET", &[]).await;
        assert_eq!(got.status, 200);
        assert_eq!(
            got.body.unwrap(),
            std::fs::read(fx.cache.join(&url)).unwrap()
        );
    }
    assert!(
        sidecar.logs().contains("not enough disk space"),
        "a warning says caching is off"
    );
    // Health says so too, without calling the daemon degraded (it costs speed, not
    // substitutions), and the refusals are counted.
    let health = get(&format!("{}/_sidecar/health", sidecar.url), "GET", &[]).await;
    assert_eq!(health.status, 200, "{}", health.text());
    let cache = &health.json()["cache"];
    assert_eq!(cache["caching"], false, "{cache}");
    assert!(cache["uncached_since"].as_u64().is_some(), "{cache}");
    assert!(cache["free_disk_bytes"].as_u64().is_some(), "{cache}");
    assert_eq!(cache["stored_bytes"], 0, "{cache}");
    assert!(
        metric(&sidecar.url, "nix_sidecar_cache_no_room_total").await >= 5.0,
        "each of the five downloads found no room"
    );
    if mounted {
        // Space is freed: the next download is cached, and health says caching again.
        std::fs::remove_file(cache_dir.join("ballast")).unwrap();
        let path = &fx.closure[5];
        let url = nar_url(&sidecar.url, path).await;
        let got = get(&format!("{}/{url}", sidecar.url), "GET", &[]).await;
        assert_eq!(got.status, 200);
        let mut cache = serde_json::Value::Null;
        for _ in 0..50 {
            let health = get(&format!("{}/_sidecar/health", sidecar.url), "GET", &[]).await;
            cache = health.json()["cache"].clone();
            if cache["stored_bytes"].as_u64() > Some(0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(cache["caching"], true, "{cache}");
        assert!(cache["uncached_since"].is_null(), "{cache}");
        assert!(cache["stored_bytes"].as_u64() > Some(0), "{cache}");
        assert!(sidecar.logs().contains("caching resumed"));
        sidecar.stop();
        let _ = std::process::Command::new("umount")
            .arg(&cache_dir)
            .status();
    } else {
        sidecar.stop();
        let (_, stats) = cache_output(&sidecar, "stats");
        assert!(stats.contains("stored files: 0"), "{stats}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_narinfo_misses_cause_one_upstream_lookup() {
    let fx = many();
    let upstream = UpstreamDouble::start(fx.cache.clone(), None).await;
    upstream.fault(
        Target::NarInfo,
        Fault::Delay(Duration::from_millis(300)),
        Some(1),
    );
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(dir.path(), &anonymous(&upstream.url), &[]);
    let path = format!("{}/{}.narinfo", sidecar.url, hash_part(&fx.top));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let path = path.clone();
        clients.spawn(async move { get(&path, "GET", &[]).await.status });
    }
    while let Some(status) = clients.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let asked = format!("{}.narinfo", hash_part(&fx.top));
    assert_eq!(upstream.count(&asked), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_drops_rows_whose_file_is_damaged_and_verify_finds_flipped_bytes() {
    let fx = many();
    let upstream = UpstreamDouble::start(fx.cache.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let mut sidecar = Sidecar::start(dir.path(), &anonymous(&upstream.url), &[]);
    let mut urls = Vec::new();
    for path in fx.closure.iter().take(3) {
        let url = nar_url(&sidecar.url, path).await;
        assert_eq!(
            get(&format!("{}/{url}", sidecar.url), "GET", &[])
                .await
                .status,
            200
        );
        urls.push(url);
    }
    sidecar.stop();
    let mut files: Vec<_> = std::fs::read_dir(sidecar.cache_dir().join("nars"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 3);
    // One file flipped in place (same size), one truncated.
    let mut bytes = std::fs::read(&files[0]).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&files[0], bytes).unwrap();
    let len = std::fs::metadata(&files[1]).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&files[1])
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    std::fs::write(sidecar.cache_dir().join("tmp").join("leftover"), b"partial").unwrap();

    let (clean, report) = cache_output(&sidecar, "verify");
    assert!(!clean, "verify exits 1 when it finds damage: {report}");
    assert!(
        report.contains("corrupt: 1") && report.contains("missing: 1"),
        "{report}"
    );
    assert!(report.contains("leftovers removed: 1"), "{report}");
    let (clean, report) = cache_output(&sidecar, "verify");
    assert!(clean && report.contains("checked: 1"), "{report}");

    sidecar.restart();
    for url in &urls {
        let got = get(&format!("{}/{url}", sidecar.url), "GET", &[]).await;
        assert_eq!(
            got.body.unwrap(),
            std::fs::read(fx.cache.join(url)).unwrap(),
            "refetched whole"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_requests_on_a_cached_nar_and_gc_down_to_a_size() {
    let fx = many();
    let upstream = UpstreamDouble::start(fx.cache.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let mut sidecar = Sidecar::start(dir.path(), &anonymous(&upstream.url), &[]);
    let url = nar_url(&sidecar.url, &fx.top).await;
    let whole = std::fs::read(fx.cache.join(&url)).unwrap();
    assert_eq!(
        get(&format!("{}/{url}", sidecar.url), "GET", &[])
            .await
            .status,
        200
    );
    let part = get(
        &format!("{}/{url}", sidecar.url),
        "GET",
        &[("range", "bytes=100-199")],
    )
    .await;
    assert_eq!(part.status, 206);
    assert_eq!(part.body.unwrap(), whole[100..200]);
    let tail = get(
        &format!("{}/{url}", sidecar.url),
        "GET",
        &[("range", "bytes=-10")],
    )
    .await;
    assert_eq!(tail.body.unwrap(), whole[whole.len() - 10..]);
    let bad = get(
        &format!("{}/{url}", sidecar.url),
        "GET",
        &[("range", &format!("bytes={}-", whole.len()))],
    )
    .await;
    assert_eq!(bad.status, 416);
    // No h2c: Nix speaks HTTP/1.1 here, and HTTP/2 streams could each hold a reader.
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let refused = h2
        .get(format!("{}/{url}", sidecar.url).parse().unwrap())
        .await;
    assert!(refused.is_err(), "HTTP/2 with prior knowledge is refused");
    let head = get(&format!("{}/{url}", sidecar.url), "HEAD", &[]).await;
    assert_eq!(
        head.headers["content-length"],
        whole.len().to_string().as_str()
    );
    sidecar.stop();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
        .args(["cache", "gc", "--max-size", "0", "--cache-dir"])
        .arg(sidecar.cache_dir())
        .output()
        .unwrap();
    assert!(out.status.success());
    let (_, stats) = cache_output(&sidecar, "stats");
    assert!(stats.contains("stored files: 0"), "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_identity_never_sees_another_identitys_cached_answers() {
    let fx = fixture();
    let aud = "https://cache.test";
    let issuer = Issuer::start().await;
    let upstream = UpstreamDouble::start(fx.cache.clone(), Some((&issuer.url, aud))).await;
    upstream.grant("wide", &fx.closure);
    let dir = tempfile::tempdir().unwrap();
    let config = |id: &str| {
        format!(
            "{}identity = \"{id}\"\n[identity.{id}]\nprovider = \"static\"\nvariable = \"TOKEN_{id}\"\n",
            anonymous(&upstream.url)
        )
    };
    let wide = issuer.mint("wide", aud, 300, false);
    let narrow = issuer.mint("narrow", aud, 300, false);
    let env = [
        ("TOKEN_wide", wide.as_str()),
        ("TOKEN_narrow", narrow.as_str()),
    ];
    let mut sidecar = Sidecar::start(dir.path(), &config("wide"), &env);
    let path = format!("/{}.narinfo", hash_part(&fx.top));
    assert_eq!(
        get(&format!("{}{path}", sidecar.url), "GET", &[])
            .await
            .status,
        200
    );
    sidecar.kill();
    // Same cache directory, another identity: the cached answer is not reused.
    let sidecar = Sidecar::start(dir.path(), &config("narrow"), &env);
    assert_eq!(
        get(&format!("{}{path}", sidecar.url), "GET", &[])
            .await
            .status,
        404
    );
}
