//! Soak: minutes of Nix-like traffic while the upstream and the identity provider misbehave at
//! random. Not part of the normal run (it is `#[ignore]`d); run it with
//!
//!     SOAK_SECS=600 cargo test --release --test soak -- --ignored --nocapture
//!
//! Loopback only; bounded by SOAK_SECS (default 60). It checks that no corrupt byte is ever
//! delivered as a complete response, that `cache verify` is clean afterwards, that memory and
//! file descriptors stay flat, and that everything is served once the faults stop.

mod support;

use support::{cache_bytes, dir_bytes, rss_kib};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::cloud::Cloud;
use support::http::get;
use support::issuer::Issuer;
use support::nix::build_many;
use support::sidecar::Sidecar;
use support::upstream::{hash_part, Fault, Target, UpstreamDouble};

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn soak_under_random_faults() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let fx = build_many(40, 30_000, "xz");
    let aud = "https://cache.test";
    let sub = "soak-machine";
    let issuer = Issuer::start().await;
    let cloud = Cloud::start(&issuer, sub, aud).await;
    cloud.set_lifetime(20); // tokens expire and are refreshed all the time
    let upstream =
        Arc::new(UpstreamDouble::start(fx.cache.clone(), Some((&issuer.url, aud))).await);
    upstream.grant(sub, &fx.closure[..36]); // 4 paths stay outside the view
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "max-cache-size = \"200KiB\"\nnarinfo-ttl = \"5s\"\nnegative-ttl = \"1s\"\ntrusted-public-keys = [\"{}\"]\n\
         [[upstream]]\nname = \"org\"\nurl = \"{}\"\nidentity = \"gh\"\n[identity.gh]\nprovider = \"github-actions\"\naudience = \"{aud}\"\n",
        fx.public_key, upstream.url
    );
    let env = cloud.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut sidecar = Sidecar::start(
        dir.path(),
        &config,
        &[&env[..], &[("NIX_SIDECAR_LOG", "info")]].concat(),
    );
    let pid = sidecar.pid();
    let expected: Arc<BTreeMap<String, Vec<u8>>> = Arc::new(
        std::fs::read_dir(fx.cache.join("nar"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    format!("nar/{}", e.file_name().to_string_lossy()),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect(),
    );

    // Warm up, then take the baseline.
    for path in &fx.closure {
        sidecar.narinfo(path).await;
    }
    let (rss_start, fds_start) = (rss_kib(pid), fds(pid));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let statuses: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let corrupt = Arc::new(AtomicU64::new(0));
    let aborted = Arc::new(AtomicU64::new(0));
    let faults = Arc::new(AtomicU64::new(0));

    let mut tasks = tokio::task::JoinSet::new();
    // The cache directory, sampled while it runs: it never holds more than max-cache-size.
    let peak_dir = Arc::new(AtomicU64::new(0));
    {
        let (peak_dir, cache) = (peak_dir.clone(), sidecar.cache_dir());
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let bytes = cache_bytes(&cache);
                peak_dir.fetch_max(bytes, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
    // The chaos monkey.
    {
        let (upstream, faults) = (upstream.clone(), faults.clone());
        let cloud = Arc::new(cloud);
        tasks.spawn(async move {
            let mut rng = fastrand::Rng::with_seed(7);
            while Instant::now() < deadline {
                let target = if rng.bool() {
                    Target::Nar
                } else {
                    Target::NarInfo
                };
                let fault = match rng.u8(0..9) {
                    0 => Fault::Status(500),
                    1 => Fault::Status(503),
                    2 => Fault::RetryAfter(1),
                    3 => Fault::ResetMidBody,
                    4 => Fault::Truncate,
                    5 => Fault::WrongBytes,
                    6 => Fault::Slow(Duration::from_millis(5)),
                    7 => Fault::Delay(Duration::from_millis(300)),
                    _ => {
                        cloud.set_down(true);
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        cloud.set_down(false);
                        faults.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                upstream.fault(target, fault, Some(rng.usize(1..3)));
                faults.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(rng.u64(50..400))).await;
            }
            upstream.clear_faults();
            cloud.set_down(false);
        });
    }
    // Clients behaving like Nix: narinfo bursts, then NARs.
    for worker in 0..8u64 {
        let (url, closure) = (sidecar.url.clone(), fx.closure.clone());
        let (expected, statuses, corrupt, aborted) = (
            expected.clone(),
            statuses.clone(),
            corrupt.clone(),
            aborted.clone(),
        );
        tasks.spawn(async move {
            let mut rng = fastrand::Rng::with_seed(worker);
            while Instant::now() < deadline {
                let path = &closure[rng.usize(..closure.len())];
                let info = get(&format!("{url}/{}.narinfo", hash_part(path)), "GET", &[]).await;
                *statuses
                    .lock()
                    .unwrap()
                    .entry(format!("narinfo {}", info.status.as_u16()))
                    .or_default() += 1;
                if info.status != 200 {
                    continue;
                }
                let Ok(body) = &info.body else { continue };
                let text = String::from_utf8_lossy(body);
                let Some(nar) = text.lines().find_map(|l| l.strip_prefix("URL: ")) else {
                    continue;
                };
                let got = get(&format!("{url}/{nar}"), "GET", &[]).await;
                *statuses
                    .lock()
                    .unwrap()
                    .entry(format!("nar {}", got.status.as_u16()))
                    .or_default() += 1;
                match (&got.body, got.status.as_u16()) {
                    (Ok(bytes), 200) if Some(&bytes.to_vec()) != expected.get(nar) => {
                        corrupt.fetch_add(1, Ordering::Relaxed);
                    }
                    (Err(_), _) => {
                        aborted.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        });
    }
    let mut samples = vec![];
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(5.min(secs))).await;
        samples.push((rss_kib(pid), fds(pid)));
    }
    while tasks.join_next().await.is_some() {}

    // The faults have stopped: everything in the view is served, correctly.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut final_errors = 0;
    for path in &fx.closure[..36] {
        let info = sidecar.narinfo(path).await;
        let nar = info
            .text()
            .lines()
            .find_map(|l| l.strip_prefix("URL: ").map(str::to_string));
        let ok = match (info.status.as_u16(), nar) {
            (200, Some(nar)) => {
                let got = get(&format!("{}/{nar}", sidecar.url), "GET", &[]).await;
                got.body.ok().map(|b| b.to_vec()) == expected.get(&nar).cloned()
            }
            _ => false,
        };
        final_errors += usize::from(!ok);
    }
    // Hits resume: a NAR asked for twice is served from the cache the second time.
    let metrics = |url: String| async move {
        get(&format!("{url}/_sidecar/metrics"), "GET", &[])
            .await
            .text()
    };
    let series = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)?
                    .trim_start_matches("{}")
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0)
    };
    let hits = "nix_sidecar_cache_hits_total{kind=\"nar\"}";
    let before = series(&metrics(sidecar.url.clone()).await, hits);
    let info = sidecar.narinfo(&fx.closure[0]).await.text();
    let nar = info
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_string();
    for _ in 0..2 {
        get(&format!("{}/{nar}", sidecar.url), "GET", &[]).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = metrics(sidecar.url.clone()).await;
    assert!(
        series(&text, hits) > before,
        "NARs are stored and hit again"
    );
    let size = series(&text, "nix_sidecar_cache_size_bytes") as u64;
    let files = dir_bytes(&sidecar.cache_dir().join("nars"));
    let peak_dir = peak_dir.load(Ordering::Relaxed);
    println!("soak: cache dir peak {peak_dir} bytes (limit 204800), cache_size_bytes {size}, files {files}");
    assert!(
        peak_dir <= 200 * 1024,
        "the cache directory reached {peak_dir} bytes"
    );
    assert!(
        size <= 200 * 1024 && size == files,
        "books {size} vs files {files}"
    );
    let (rss_end, fds_end) = (rss_kib(pid), fds(pid));
    let peak_rss = samples.iter().map(|s| s.0).max().unwrap_or(rss_end);
    sidecar.stop();
    let verify = sidecar.cache_command("verify");
    let report = String::from_utf8_lossy(&verify.stdout).replace('\n', ", ");
    let statuses = statuses.lock().unwrap().clone();
    let served: u64 = statuses.values().sum();
    println!("soak: {secs} s, {served} requests {statuses:?}");
    println!(
        "soak: faults injected {}, corrupt complete deliveries {}, aborted responses {}, errors after the faults stopped {final_errors}",
        faults.load(Ordering::Relaxed),
        corrupt.load(Ordering::Relaxed),
        aborted.load(Ordering::Relaxed)
    );
    println!("soak: RSS {rss_start} KiB at start, {rss_end} KiB at end, {peak_rss} KiB peak sampled; fds {fds_start} -> {fds_end}");
    println!("soak: cache verify: {report}");
    assert_eq!(
        corrupt.load(Ordering::Relaxed),
        0,
        "no corrupt byte delivered as complete"
    );
    assert_eq!(
        final_errors, 0,
        "everything cacheable is served once the faults stop"
    );
    assert!(verify.status.success(), "{report}");
    assert!(
        fds_end <= fds_start + 16,
        "file descriptors flat: {fds_start} -> {fds_end}"
    );
    assert!(
        rss_end < rss_start * 3 + 32 * 1024,
        "memory flat: {rss_start} -> {rss_end} KiB"
    );
}
