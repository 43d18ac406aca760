//! Hostile local clients: each case shows that the others are still served.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::http::get;
use support::nix::{build_many, Fixture};
use support::sidecar::Sidecar;
use support::upstream::{hash_part, UpstreamDouble};

fn big() -> &'static Fixture {
    static FX: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    FX.get_or_init(|| build_many(1, 1_000_000, "none")) // one NAR of about 6.9 MB
}

async fn started(extra: &str) -> (UpstreamDouble, Sidecar, tempfile::TempDir) {
    let upstream = UpstreamDouble::start(big().cache.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(
        dir.path(),
        &format!(
            "{extra}\n[[upstream]]\nname = \"u\"\nurl = \"{}\"\n",
            upstream.url
        ),
        &[],
    );
    (upstream, sidecar, dir)
}

fn addr(sidecar: &Sidecar) -> String {
    sidecar.url.trim_start_matches("http://").to_string()
}

/// The big NAR's path as the sidecar names it.
async fn big_nar_url(sidecar: &Sidecar) -> String {
    let info = sidecar.narinfo(&big().top).await.text();
    info.lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_string()
}

/// A well-behaved client gets a whole answer quickly.
async fn still_served(sidecar: &Sidecar) {
    let started = Instant::now();
    let answer = sidecar.narinfo(&big().top).await;
    assert_eq!(answer.status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "served in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_do_not_starve_other_clients() {
    let (_u, sidecar, _d) = started("").await;
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut s = TcpStream::connect(addr(&sidecar)).unwrap();
        s.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            .unwrap();
        slow.push(s);
    }
    still_served(&sidecar).await;
    drop(slow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_headers_and_paths_are_refused_and_others_served() {
    let (_u, sidecar, _d) = started("").await;
    let mut s = TcpStream::connect(addr(&sidecar)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let huge = "a".repeat(200 * 1024);
    let _ = s.write_all(
        format!("GET /nix-cache-info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {huge}\r\n\r\n")
            .as_bytes(),
    );
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{}",
        &answer[..answer.len().min(100)]
    );
    let long_path = get(
        &format!("{}/nar/{}", sidecar.url, "x".repeat(8000)),
        "GET",
        &[],
    )
    .await;
    assert_eq!(long_path.status, 404);
    still_served(&sidecar).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_connections_do_not_block_others() {
    // The test process needs the descriptors too (nix-sidecar raises its own limit).
    let limit = support::raise_nofile();
    let count = 2000.min(limit.saturating_sub(200) as usize);
    let (_u, sidecar, _d) = started("").await;
    let idle: Vec<TcpStream> = (0..count)
        .map(|_| TcpStream::connect(addr(&sidecar)).unwrap())
        .collect();
    assert!(
        idle.len() >= 1000,
        "only {} descriptors available",
        idle.len()
    );
    still_served(&sidecar).await;
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_garbage_gets_a_400_and_others_are_served() {
    let (u, sidecar, _d) = started("").await;
    let mut s = TcpStream::connect(addr(&sidecar)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"GET /nix-cache-info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n\x00\x01GARBAGE \xff\r\n\r\nMORE\r\n\r\n",
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "the good request first: {text}"
    );
    assert!(
        text.contains("HTTP/1.1 400"),
        "then a 400 for the garbage: {text}"
    );
    still_served(&sidecar).await;
    assert!(u.requests().iter().all(|r| !r.path.contains("GARBAGE")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_mid_nar_does_not_hold_up_others() {
    let (_u, sidecar, _d) = started("").await;
    let nar = big_nar_url(&sidecar).await;
    let mut stalled = TcpStream::connect(addr(&sidecar)).unwrap();
    stalled
        .write_all(format!("GET /{nar} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .unwrap();
    let mut first = [0u8; 1024];
    let _ = stalled.read(&mut first).unwrap(); // then never read again
    let expected = std::fs::read(big().cache.join(&nar)).unwrap();
    for _ in 0..3 {
        let started = Instant::now();
        let got = get(&format!("{}/{nar}", sidecar.url), "GET", &[]).await;
        assert_eq!(got.body.unwrap(), expected);
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_uids_admit_only_the_listed_owners() {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let (_u, sidecar, _d) = started(&format!("allowed-uids = [{}]", me + 1)).await;
    let mut s = TcpStream::connect(addr(&sidecar)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(answer.is_empty(), "refused without an answer");
    assert!(sidecar.logs().contains("not in allowed-uids"));
    let (_u, sidecar, _d) = started(&format!("allowed-uids = [{me}]")).await;
    still_served(&sidecar).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_new_clients_wait_instead_of_taking_resources() {
    let (_u, sidecar, _d) = started("max-connections = 20").await;
    let idle: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(addr(&sidecar)).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let url = format!("{}/{}.narinfo", sidecar.url, hash_part(&big().top));
    let waiting = tokio::time::timeout(Duration::from_secs(1), get(&url, "GET", &[])).await;
    assert!(
        waiting.is_err(),
        "the 21st connection waits while 20 are held"
    );
    drop(idle);
    still_served(&sidecar).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_after_the_header_read_timeout() {
    let (_u, sidecar, _d) = started("").await;
    let mut idle = TcpStream::connect(addr(&sidecar)).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(40)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::task::spawn_blocking(move || idle.read(&mut buf).unwrap_or(0))
        .await
        .unwrap();
    assert_eq!(n, 0, "closed without an answer");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(25) && waited < Duration::from_secs(39),
        "closed after {waited:?}"
    );
}

fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Readers waiting on clients that never read hold no thread: 512 stalled requests for a
/// stored NAR (the HTTP/2 version of this held a blocking thread and 3 MiB each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_stalled_readers_hold_no_threads_and_others_are_served_at_once() {
    let (_u, sidecar, _d) = started("").await;
    let nar = big_nar_url(&sidecar).await;
    let expected = std::fs::read(big().cache.join(&nar)).unwrap();
    let url = format!("{}/{nar}", sidecar.url);
    assert!(get(&url, "GET", &[]).await.body.unwrap() == expected); // now stored
    let pid = sidecar.pid();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (rss_before, threads_before) = (proc_status(pid, "VmRSS:"), proc_status(pid, "Threads:"));
    let stalled: Vec<TcpStream> = (0..512)
        .map(|_| {
            let s = TcpStream::connect(addr(&sidecar)).unwrap();
            // A small receive buffer: the sidecar's writes stall at once.
            let size: libc::c_int = 4096;
            // SAFETY: a valid socket and a properly sized option value.
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUF,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            let mut s = s;
            s.write_all(format!("GET /{nar} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
                .unwrap();
            s
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss, threads) = (proc_status(pid, "VmRSS:"), proc_status(pid, "Threads:"));
    let started = Instant::now();
    let miss = get(
        &format!("{}/{}.narinfo", sidecar.url, "0".repeat(32)),
        "GET",
        &[],
    )
    .await;
    assert_eq!(miss.status, 404, "a cold narinfo goes upstream and back");
    assert!(get(&url, "GET", &[]).await.body.unwrap() == expected);
    let took = started.elapsed();
    println!(
        "512 stalled readers: threads {threads_before} -> {threads}, RSS {rss_before} -> {rss} KiB; another client served in {took:?}"
    );
    assert!(
        threads <= threads_before + 4,
        "threads {threads_before} -> {threads}"
    );
    assert!(
        rss < rss_before + 64 * 1024,
        "RSS {rss_before} -> {rss} KiB"
    );
    assert!(took < Duration::from_secs(1), "served in {took:?}");
    drop(stalled);
}

/// The shipped unit sets `ProcSubset=pid`, which hides `/proc/net`: the socket table must be
/// read where that procfs still shows it, or every client (root included) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_uids_work_under_a_procfs_mounted_with_subset_pid() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        assert!(std::env::var("CI").is_err(), "CI runs as root");
        eprintln!("skipped: an unshared mount namespace needs root");
        return;
    }
    let upstream = UpstreamDouble::start(big().cache.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "allowed-uids = [0]\n[[upstream]]\nname = \"u\"\nurl = \"{}\"\n",
        upstream.url
    );
    let sidecar = Sidecar::start_wrapped(
        dir.path(),
        &config,
        &[],
        &[
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount -t proc -o subset=pid proc /proc && test ! -e /proc/net/tcp && exec \"$@\"",
            "sh",
        ],
    );
    still_served(&sidecar).await;
    assert!(!sidecar.logs().contains("not in allowed-uids"));
}
