//! Defects an outside review and soak found, each shown fixed against a hand-made upstream
//! that can lie in ways a real cache written by Nix never does.

mod support;

use support::dir_bytes;

use std::collections::HashMap;
use std::collections::VecDeque;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use nix_sidecar::nix::{base32, hash::Sha256};
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::http::{get, respond, serve, Body};
use support::sidecar::Sidecar;

/// A body sent in 64 KiB pieces without a Content-Length (chunked).
struct Unsized(VecDeque<Bytes>);

impl hyper::body::Body for Unsized {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

fn chunked(bytes: &Bytes) -> Body {
    let pieces = (0..bytes.len())
        .step_by(64 * 1024)
        .map(|i| bytes.slice(i..bytes.len().min(i + 64 * 1024)))
        .collect();
    Unsized(pieces).boxed()
}

#[derive(Clone)]
struct File {
    bytes: Bytes,
    /// Announce the length (Content-Length) or not (chunked).
    sized: bool,
}

/// An upstream serving exactly the files it is given, optionally misbehaving on NARs.
#[derive(Clone, Default)]
struct Upstream {
    files: Arc<Mutex<HashMap<String, File>>>,
    nar_requests: Arc<AtomicUsize>,
    /// Every few NAR answers are wrong: flipped bytes, cut short, or a 500.
    chaos: Arc<AtomicBool>,
    /// Answers every request 401 with the Authorization header it got in the body.
    echo_401: Arc<AtomicBool>,
}

impl Upstream {
    async fn start(&self) -> String {
        let this = self.clone();
        let addr = serve(move |req| {
            let this = this.clone();
            async move {
                if this.echo_401.load(Ordering::SeqCst) {
                    let auth = req.headers().get("authorization");
                    let auth = auth.map(|v| v.to_str().unwrap().to_string());
                    return respond(401, format!("bad credentials: {auth:?}"));
                }
                this.answer(req.uri().path())
            }
        })
        .await;
        format!("http://{addr}")
    }

    fn answer(&self, path: &str) -> http::Response<Body> {
        let Some(file) = self.files.lock().unwrap().get(path).cloned() else {
            return respond(404, "");
        };
        if !path.starts_with("/nar/") {
            return respond(200, file.bytes);
        }
        let n = self.nar_requests.fetch_add(1, Ordering::SeqCst);
        let mut bytes = file.bytes.to_vec();
        let middle = bytes.len() / 2;
        if self.chaos.load(Ordering::SeqCst) {
            match n % 6 {
                0 => bytes[middle] ^= 1,
                1 => bytes.truncate(middle),
                2 => return respond(500, "down"),
                _ => {}
            }
        }
        let bytes = Bytes::from(bytes);
        let body = if file.sized {
            support::http::full(bytes)
        } else {
            chunked(&bytes)
        };
        http::Response::new(body)
    }

    fn put(&self, path: &str, bytes: impl Into<Bytes>, sized: bool) {
        let file = File {
            bytes: bytes.into(),
            sized,
        };
        self.files.lock().unwrap().insert(path.to_string(), file);
    }

    /// A store path hash, its narinfo and its NAR file. `file` is the NAR as served
    /// (compressed or not); the narinfo's NarHash/NarSize are those of `nar`.
    fn add(&self, n: u8, nar: &[u8], file: (&str, &[u8]), file_size: Option<u64>) -> String {
        let hash = base32::encode(&[n; 20]);
        let (compression, served) = file;
        let ext = match compression {
            "none" => "",
            "zstd" => ".zst",
            _ => ".xz",
        };
        let url = format!("nar/{hash}.nar{ext}");
        let info = format!(
            "StorePath: /nix/store/{hash}-p{n}\nURL: {url}\nCompression: {compression}\n{}NarHash: {}\nNarSize: {}\nReferences: \n",
            file_size.map(|s| format!("FileSize: {s}\n")).unwrap_or_default(),
            Sha256(sha2::Sha256::digest(nar).into()).to_nix_string(),
            nar.len()
        );
        self.put(&format!("/{hash}.narinfo"), info, true);
        self.put(&format!("/{url}"), Bytes::copy_from_slice(served), true);
        hash
    }

    fn unsized_nar(&self, hash: &str) {
        let mut files = self.files.lock().unwrap();
        for (path, file) in files.iter_mut() {
            if path.starts_with("/nar/") && path.contains(hash) {
                file.sized = false;
            }
        }
    }
}

fn bytes_of(n: u8, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(n as u64);
    (0..len).map(|_| rng.u8(..)).collect()
}

fn sidecar(dir: &Path, upstream: &str, extra: &str) -> Sidecar {
    Sidecar::start(
        dir,
        &format!("{extra}\n[[upstream]]\nname = \"u\"\nurl = \"{upstream}\"\n"),
        &[],
    )
}

async fn nar_url(sidecar: &Sidecar, hash: &str) -> String {
    let info = get(&format!("{}/{hash}.narinfo", sidecar.url), "GET", &[]).await;
    assert_eq!(info.status, 200, "{}", sidecar.logs());
    info.text()
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_string()
}

/// One response read off a kept-alive connection.
#[derive(Debug)]
struct Reply {
    status: u16,
    length: Option<usize>,
    body: Vec<u8>,
}

impl Reply {
    fn complete(&self) -> bool {
        self.length == Some(self.body.len())
    }
}

/// Reads one response with a Content-Length (or to the end of the connection); `None` when
/// the connection ended before a response head.
async fn read_reply(tcp: &mut TcpStream, pending: &mut Vec<u8>) -> Option<Reply> {
    let head_end = loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if read_more(tcp, pending).await == 0 {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&pending[..head_end]).to_lowercase();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let length: Option<usize> = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok());
    pending.drain(..head_end);
    while length.is_none_or(|l| pending.len() < l) {
        if read_more(tcp, pending).await == 0 {
            break;
        }
    }
    let take = length.unwrap_or(pending.len()).min(pending.len());
    let body = pending.drain(..take).collect();
    Some(Reply {
        status,
        length,
        body,
    })
}

/// Appends what arrives within 20 s; 0 at the end of the connection (or on a timeout).
async fn read_more(tcp: &mut TcpStream, pending: &mut Vec<u8>) -> usize {
    let mut chunk = vec![0u8; 1 << 16];
    let n = match tokio::time::timeout(Duration::from_secs(20), tcp.read(&mut chunk)).await {
        Ok(Ok(n)) => n,
        _ => 0,
    };
    pending.extend_from_slice(&chunk[..n]);
    n
}

fn request(path: &str) -> String {
    format!("GET /{path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
}

/// Item 1: a narinfo whose FileSize is smaller than what the upstream sends (FileSize is not
/// signed). The response announced FileSize; hyper cut the overlong frame and kept the
/// connection, and the next NAR on it began with the first one's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_file_size_never_puts_one_nar_into_the_next_on_a_kept_alive_connection() {
    let upstream = Upstream::default();
    let a = bytes_of(1, 1_000_000);
    let b = bytes_of(2, 50_000);
    let mut wrong = bytes_of(3, 300_000);
    let lying = upstream.add(1, &a, ("none", &a), Some(100_000));
    let honest = upstream.add(2, &b, ("none", &b), None);
    let wrong_hash = upstream.add(3, &bytes_of(4, 300_000), ("none", &wrong), None);
    wrong[0] ^= 1;
    upstream.unsized_nar(&lying);
    let url = upstream.start().await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = sidecar(dir.path(), &url, "");
    let (nar_a, nar_b, nar_c) = (
        nar_url(&sidecar, &lying).await,
        nar_url(&sidecar, &honest).await,
        nar_url(&sidecar, &wrong_hash).await,
    );
    for first in [&nar_a, &nar_c] {
        let mut tcp = TcpStream::connect(sidecar.url.trim_start_matches("http://"))
            .await
            .unwrap();
        let pipelined = [request(first), request(&nar_b), request(&nar_b)].concat();
        tcp.write_all(pipelined.as_bytes()).await.unwrap();
        let mut pending = Vec::new();
        let reply = read_reply(&mut tcp, &mut pending).await.unwrap();
        assert!(
            reply.status != 200 || !reply.complete(),
            "{first}: a NAR that fails verification never looks complete: {} of {:?}",
            reply.body.len(),
            reply.length
        );
        let cut = reply.status == 200;
        let mut later = 0;
        while let Some(reply) = read_reply(&mut tcp, &mut pending).await {
            assert!(!cut, "{first}: a cut response ends its connection");
            assert_eq!(reply.status, 200);
            assert!(
                reply.body == b,
                "{first}: the next NAR is exactly its own bytes"
            );
            later += 1;
        }
        assert!(cut || later == 2, "{first}: {later} later replies");
    }
    let fresh = get(&format!("{}/{nar_b}", sidecar.url), "GET", &[]).await;
    assert!(fresh.body.unwrap() == b);
    assert!(
        !std::fs::read_dir(sidecar.cache_dir().join("nars"))
            .unwrap()
            .any(|e| std::fs::read(e.unwrap().path()).unwrap() == a[..]),
        "the lying NAR was not stored"
    );
}

/// Item 1, last point: HTTP/1.0 has no way to tell an aborted body from a complete one when
/// no length is announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_clients_never_get_a_nar_of_unknown_length() {
    let upstream = Upstream::default();
    let nar = bytes_of(5, 200_000);
    let xz = {
        use std::io::Write;
        let mut encoder = xz2::write::XzEncoder::new(Vec::new(), 1);
        encoder.write_all(&nar).unwrap();
        encoder.finish().unwrap()
    };
    let unknown = upstream.add(5, &nar, ("xz", &xz), None);
    upstream.unsized_nar(&unknown);
    let known = upstream.add(6, &nar, ("none", &nar), None);
    let url = upstream.start().await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = sidecar(dir.path(), &url, "");
    for (hash, status) in [(&unknown, 505), (&known, 200)] {
        let nar_path = nar_url(&sidecar, hash).await;
        let mut tcp = TcpStream::connect(sidecar.url.trim_start_matches("http://"))
            .await
            .unwrap();
        let req = format!("GET /{nar_path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let reply = read_reply(&mut tcp, &mut Vec::new()).await.unwrap();
        assert_eq!(reply.status, status, "{nar_path}");
        if status == 200 {
            assert!(reply.complete() && reply.body == nar);
        }
    }
    // HTTP/1.1 gets it, chunked.
    let nar_path = nar_url(&sidecar, &unknown).await;
    let got = get(&format!("{}/{nar_path}", sidecar.url), "GET", &[]).await;
    assert!(got.body.unwrap() == xz);
}

/// Item 7: DNS rebinding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_naming_a_foreign_host_gets_421() {
    let dir = tempfile::tempdir().unwrap();
    let sidecar = sidecar(dir.path(), "http://127.0.0.1:9", "");
    let port = sidecar.url.rsplit(':').next().unwrap().to_string();
    let path = format!("{}/nix-cache-info", sidecar.url);
    for (host, status) in [
        (format!("rebound.example:{port}"), 421),
        ("rebound.example".to_string(), 421),
        (format!("localhost:{port}"), 200),
        (format!("127.0.0.1:{port}"), 200),
    ] {
        let got = get(&path, "GET", &[("host", &host)]).await;
        assert_eq!(got.status, status, "{host}");
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let value = l.strip_prefix(name)?.trim_start_matches("{}");
            value.strip_prefix(' ')?.trim().parse().ok()
        })
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

/// Item 11: eight keep-alive clients pulling at random from a working set six times the cache,
/// with faults mixed in. Concurrent evictions subtracted the same file twice, the size wrapped
/// below zero, and the cache stopped caching for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_under_eight_clients_keeps_the_books_exact_and_the_cache_caching() {
    const LIMIT: u64 = 2 * 1024 * 1024;
    let upstream = Upstream::default();
    let mut paths = Vec::new();
    for n in 0..48u8 {
        let nar = bytes_of(n, 150_000 + n as usize * 1000);
        // Half announce their size (reserved up front), half do not (reserved as they grow).
        let file_size = (n % 2 == 0).then_some(nar.len() as u64);
        let hash = upstream.add(n, &nar, ("none", &nar), file_size);
        if n % 4 == 1 {
            upstream.unsized_nar(&hash);
        }
        paths.push((hash, nar));
    }
    upstream.chaos.store(true, Ordering::SeqCst);
    let url = upstream.start().await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = sidecar(
        dir.path(),
        &url,
        "max-cache-size = \"2MiB\"\nmin-free-space = \"0\"\nnegative-ttl = \"0s\"",
    );
    let paths = Arc::new(paths);
    let nars = sidecar.cache_dir().join("nars");
    let tmp = sidecar.cache_dir().join("tmp");
    let deadline = Instant::now() + Duration::from_secs(8);
    let peak = Arc::new(AtomicU64::new(0));
    let corrupt = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    {
        let peak = peak.clone();
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let on_disk = dir_bytes(&nars) + dir_bytes(&tmp);
                peak.fetch_max(on_disk, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }
    for worker in 0..8u64 {
        let (paths, base, corrupt) = (paths.clone(), sidecar.url.clone(), corrupt.clone());
        tasks.spawn(async move {
            let mut rng = fastrand::Rng::with_seed(worker);
            let addr = base.trim_start_matches("http://").to_string();
            let mut tcp = TcpStream::connect(&addr).await.unwrap();
            let mut pending = Vec::new();
            while Instant::now() < deadline {
                let (hash, nar) = &paths[rng.usize(..paths.len())];
                let path = format!("nar/{hash}.nar");
                // Nix asks for the narinfo first; the NAR on the same connection.
                let _ = get(&format!("{base}/{hash}.narinfo"), "GET", &[]).await;
                tcp.write_all(request(&path).as_bytes()).await.unwrap();
                match read_reply(&mut tcp, &mut pending).await {
                    Some(reply) if reply.status == 200 && reply.complete() => {
                        if reply.body != *nar {
                            corrupt.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(reply) if reply.complete() => {}
                    _ => {
                        pending.clear();
                        tcp = TcpStream::connect(&addr).await.unwrap();
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    upstream.chaos.store(false, Ordering::SeqCst);

    assert_eq!(
        corrupt.load(Ordering::Relaxed),
        0,
        "no wrong byte delivered whole"
    );
    let peak = peak.load(Ordering::Relaxed);
    assert!(peak <= LIMIT, "the cache directory reached {peak} bytes");
    let metrics = get(&format!("{}/_sidecar/metrics", sidecar.url), "GET", &[])
        .await
        .text();
    let evictions = metric(&metrics, "nix_sidecar_cache_evictions_total");
    assert!(evictions > 0.0, "the test evicted");
    // Caching goes on: a NAR asked for twice is fetched once.
    let (hash, nar) = &paths[0];
    let path = format!("{}/nar/{hash}.nar", sidecar.url);
    let _ = get(&format!("{}/{hash}.narinfo", sidecar.url), "GET", &[]).await;
    assert!(get(&path, "GET", &[]).await.body.unwrap() == *nar);
    let before = upstream.nar_requests.load(Ordering::SeqCst);
    assert!(get(&path, "GET", &[]).await.body.unwrap() == *nar);
    assert_eq!(
        upstream.nar_requests.load(Ordering::SeqCst),
        before,
        "served from the cache: {}",
        sidecar.logs()
    );
    // The books match the files.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = get(&format!("{}/_sidecar/metrics", sidecar.url), "GET", &[])
        .await
        .text();
    let size = metric(&metrics, "nix_sidecar_cache_size_bytes") as u64;
    let files = dir_bytes(&sidecar.cache_dir().join("nars"));
    assert!(size <= LIMIT, "cache_size_bytes {size}");
    assert_eq!(size, files, "cache_size_bytes follows the files");
    println!("eviction soak: {evictions} evictions, peak {peak} bytes, final {size} bytes");
}

/// A tmpfs of `size` mounted at `dir` until the guard drops; `None` (and the test skipped)
/// where mounting needs a root this is not (CI runs as root).
fn tmpfs(dir: &Path, size: &str) -> Option<Unmount> {
    std::fs::create_dir_all(dir).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        assert!(
            std::env::var("CI").is_err(),
            "CI runs as root and must mount a tmpfs"
        );
        eprintln!("skipped: mounting a tmpfs needs root");
        return None;
    }
    Some(Unmount(dir.to_path_buf()))
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Item 14: a disk that fills while a NAR of unannounced size is downloading. The cache gives
/// the file up; every client already following gets every byte, still verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_mid_download_still_serves_every_client_whole() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let Some(_unmount) = tmpfs(&cache, "16m") else {
        return;
    };
    let upstream = Upstream::default();
    let nar = bytes_of(7, 40 * 1024 * 1024);
    let zst = zstd::encode_all(&nar[..], 1).unwrap();
    let no_size = upstream.add(7, &nar, ("zstd", &zst), None);
    upstream.unsized_nar(&no_size);
    let with_size = upstream.add(8, &nar, ("zstd", &zst), Some(zst.len() as u64));
    let small = bytes_of(9, 100_000);
    let later = upstream.add(9, &small, ("none", &small), None);
    let url = upstream.start().await;
    let sidecar = sidecar(dir.path(), &url, "min-free-space = \"0\"");
    for hash in [&no_size, &with_size] {
        let path = format!("{}/{}", sidecar.url, nar_url(&sidecar, hash).await);
        let clients: Vec<_> = (0..3)
            .map(|_| {
                let path = path.clone();
                tokio::spawn(async move { get(&path, "GET", &[]).await })
            })
            .collect();
        for client in clients {
            let got = client.await.unwrap();
            assert_eq!(got.status, 200);
            let body = got.body.expect("whole");
            assert!(body == zst, "{hash}: {} bytes of {}", body.len(), zst.len());
        }
    }
    assert!(
        sidecar.logs().contains("serving it uncached"),
        "{}",
        sidecar.logs()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(dir_bytes(&cache.join("tmp")), 0, "the partial file is gone");
    // The cache still works: a small NAR is stored and then served without the upstream.
    let path = format!("{}/{}", sidecar.url, nar_url(&sidecar, &later).await);
    assert!(get(&path, "GET", &[]).await.body.unwrap() == small);
    let before = upstream.nar_requests.load(Ordering::SeqCst);
    assert!(get(&path, "GET", &[]).await.body.unwrap() == small);
    assert_eq!(upstream.nar_requests.load(Ordering::SeqCst), before);
}

/// Item 6: compressions the sidecar could not decompress passed through unverified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_and_brotli_nars_are_verified_and_unknown_compressions_refused() {
    use std::io::Write;
    let nar = bytes_of(10, 300_000);
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&nar).unwrap();
        e.finish().unwrap()
    };
    let br = {
        let mut e = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22);
        e.write_all(&nar).unwrap();
        e.into_inner()
    };
    let upstream = Upstream::default();
    let mut other = nar.clone();
    other[1000] ^= 1;
    let cases = [
        (upstream.add(10, &nar, ("gzip", &gz), None), true),
        (upstream.add(11, &other, ("gzip", &gz), None), false),
        (upstream.add(12, &nar, ("br", &br), None), true),
        (upstream.add(13, &other, ("br", &br), None), false),
        (upstream.add(14, &nar, ("lz4", &gz), None), false),
    ];
    let url = upstream.start().await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = sidecar(dir.path(), &url, "");
    for (hash, right) in &cases {
        let path = nar_url(&sidecar, hash).await;
        let got = get(&format!("{}/{path}", sidecar.url), "GET", &[]).await;
        if *right {
            assert_eq!(got.status, 200, "{path}");
            assert!(got.body.is_ok(), "{path}: whole");
        } else {
            assert!(
                got.status != 200 || got.body.is_err(),
                "{path}: a NAR that does not match never looks complete"
            );
        }
    }
    assert!(sidecar.logs().contains("cannot be verified"));
}

/// Item 5: an upstream that echoes the Authorization header in its 401 body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_basic_credential_echoed_by_the_upstream_leaks_nowhere() {
    use base64::Engine;
    let upstream = Upstream::default();
    let nar = bytes_of(20, 1000);
    let hash = upstream.add(20, &nar, ("none", &nar), None);
    upstream.echo_401.store(true, Ordering::SeqCst);
    let url = upstream.start().await;
    let token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJtYWNoaW5lIn0.c2lnbmF0dXJlLXNlY3JldA";
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[[upstream]]\nname = \"fh\"\nurl = \"{url}\"\nidentity = \"ci\"\nauth = \"basic\"\nusername = \"flakehub\"\n\
         [identity.ci]\nprovider = \"static\"\nvariable = \"TEST_TOKEN\"\n"
    );
    let sidecar = Sidecar::start(
        dir.path(),
        &config,
        &[("TEST_TOKEN", token), ("NIX_SIDECAR_LOG", "trace")],
    );
    let answer = get(&format!("{}/{hash}.narinfo", sidecar.url), "GET", &[]).await;
    assert_eq!(answer.status, 503);
    let health = get(&format!("{}/_sidecar/health", sidecar.url), "GET", &[]).await;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("flakehub:{token}"));
    let seen = [answer.text(), health.text(), sidecar.logs()].concat();
    assert!(
        seen.contains("bad credentials"),
        "the upstream's answer is logged"
    );
    for secret in [token, &basic, &basic[..basic.len() / 2], &token[10..30]] {
        assert!(!seen.contains(secret), "{secret} leaked:\n{seen}");
    }
}

/// Item 13: a validly signed narinfo whose URL, FileHash and FileSize (not signed) were
/// swapped for another path's file. FileHash matches what arrives; NarHash does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_swapped_under_a_signed_narinfo_is_removed_within_seconds() {
    use std::io::Write;
    let xz = |bytes: &[u8]| {
        let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    };
    let (nar_a, nar_b) = (bytes_of(30, 200_000), bytes_of(31, 200_000));
    let file_b = xz(&nar_b);
    let upstream = Upstream::default();
    let hash = upstream.add(30, &nar_a, ("xz", &file_b), Some(file_b.len() as u64));
    // The swapped FileHash: that of the file actually served.
    let info_path = format!("/{hash}.narinfo");
    let info =
        String::from_utf8(upstream.files.lock().unwrap()[&info_path].bytes.to_vec()).unwrap();
    let file_hash = Sha256(sha2::Sha256::digest(&file_b).into()).to_nix_string();
    upstream.put(
        &info_path,
        info.replace(
            "Compression: xz\n",
            &format!("Compression: xz\nFileHash: {file_hash}\n"),
        ),
        true,
    );
    let url = upstream.start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut sidecar = sidecar(dir.path(), &url, "");
    let path = nar_url(&sidecar, &hash).await;
    let got = get(&format!("{}/{path}", sidecar.url), "GET", &[]).await;
    assert!(got.body.unwrap() == file_b, "FileHash matched: served");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = get(&format!("{}/_sidecar/metrics", sidecar.url), "GET", &[])
            .await
            .text();
        let failures = metric(&metrics, "nix_sidecar_verification_failures_total");
        let size = metric(&metrics, "nix_sidecar_cache_size_bytes");
        if failures >= 1.0 && size == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "still stored:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dir_bytes(&sidecar.cache_dir().join("nars")), 0);
    assert!(sidecar.logs().contains("does not match its signed NarHash"));
    sidecar.stop();
    let verify = sidecar.cache_command("verify");
    assert!(verify.status.success());
}

/// Item 3: two upstreams naming their NAR files alike. The second must not re-point the
/// first narinfo's NAR to its own bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nar_names_from_two_upstreams_never_collide() {
    let (nar_a, nar_b) = (bytes_of(40, 100_000), bytes_of(41, 120_000));
    let (one, two) = (Upstream::default(), Upstream::default());
    let a = one.add(40, &nar_a, ("none", &nar_a), None);
    let b = two.add(41, &nar_b, ("none", &nar_b), None);
    // Both name their file `nar/same.nar`.
    for (up, hash) in [(&one, &a), (&two, &b)] {
        let info_path = format!("/{hash}.narinfo");
        let mut files = up.files.lock().unwrap();
        let info = String::from_utf8(files[&info_path].bytes.to_vec()).unwrap();
        let old = info
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .unwrap()
            .to_string();
        let nar = files.remove(&format!("/{old}")).unwrap();
        files.insert("/nar/same.nar".into(), nar);
        let info = info.replace(&old, "nar/same.nar");
        files.insert(
            info_path,
            File {
                bytes: info.into(),
                sized: true,
            },
        );
    }
    let (url_one, url_two) = (one.start().await, two.start().await);
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(
        dir.path(),
        &format!("[[upstream]]\nname = \"one\"\nurl = \"{url_one}\"\n[[upstream]]\nname = \"two\"\nurl = \"{url_two}\"\n"),
        &[],
    );
    let path_a = nar_url(&sidecar, &a).await;
    let path_b = nar_url(&sidecar, &b).await;
    assert_eq!(path_a, "nar/same.nar");
    assert_ne!(path_b, path_a, "the second gets a name of its own");
    for _ in 0..2 {
        for (path, nar) in [(&path_a, &nar_a), (&path_b, &nar_b)] {
            let got = get(&format!("{}/{path}", sidecar.url), "GET", &[]).await;
            assert!(got.body.unwrap() == *nar, "{path}");
        }
    }
}

/// Item 10: a narinfo `URL:` or redirect that points at link-local addresses (cloud
/// metadata) is refused; a 401 from a host that never got the token does not blame it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_local_targets_are_refused_and_a_foreign_401_does_not_blame_the_token() {
    let foreign = serve(|_req| async { respond(401, "who are you") }).await;
    let nar = bytes_of(50, 1000);
    let upstream = Upstream::default();
    let metadata = upstream.add(50, &nar, ("none", &nar), None);
    let elsewhere = upstream.add(51, &nar, ("none", &nar), None);
    for (hash, target) in [
        (
            &metadata,
            "http://169.254.169.254/latest/meta-data/x.nar".to_string(),
        ),
        (&elsewhere, format!("http://{foreign}/nar/x.nar")),
    ] {
        let path = format!("/{hash}.narinfo");
        let info = String::from_utf8(upstream.files.lock().unwrap()[&path].bytes.to_vec()).unwrap();
        let old = info
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .unwrap()
            .to_string();
        upstream.put(&path, info.replace(&old, &target), true);
    }
    let url = upstream.start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[[upstream]]\nname = \"u\"\nurl = \"{url}\"\nidentity = \"ci\"\n[identity.ci]\nprovider = \"static\"\nvariable = \"TEST_TOKEN\"\n"
    );
    let sidecar = Sidecar::start(dir.path(), &config, &[("TEST_TOKEN", "a-token-for-u")]);
    let path = nar_url(&sidecar, &metadata).await;
    let got = get(&format!("{}/{path}", sidecar.url), "GET", &[]).await;
    assert_eq!(got.status, 503);
    assert!(got.text().contains("link-local"), "{}", got.text());
    let path = nar_url(&sidecar, &elsewhere).await;
    let got = get(&format!("{}/{path}", sidecar.url), "GET", &[]).await;
    assert_eq!(got.status, 503);
    let text = got.text();
    assert!(!text.contains("rejected this machine's identity"), "{text}");
    assert!(text.contains("never got the token"), "{text}");
}

/// Item 14 with real Nix: an Attic-like upstream (no FileHash, no FileSize) and a zstd NAR
/// larger than the disk the cache is on. Nix gets the path; the cache keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_nix_substitutes_a_nar_larger_than_the_disk_left_for_the_cache() {
    let fx = support::nix::build_one(
        "sidecar-random",
        "/usr/bin/head -c 12000000 /dev/urandom > $out",
        "zstd",
    );
    let dir = tempfile::tempdir().unwrap();
    let Some(_unmount) = tmpfs(&dir.path().join("cache"), "8m") else {
        return;
    };
    let upstream = support::upstream::UpstreamDouble::start_with(fx.cache.clone(), None, |s| {
        s.strip_file_hash = true;
    })
    .await;
    let config = format!(
        "min-free-space = \"0\"\ntrusted-public-keys = [\"{}\"]\n[[upstream]]\nname = \"attic\"\nurl = \"{}\"\n",
        fx.public_key, upstream.url
    );
    let sidecar = Sidecar::start(dir.path(), &config, &[]);
    let (url, pk, top, client) = (
        sidecar.url.clone(),
        fx.public_key.clone(),
        fx.top.clone(),
        dir.path().join("client"),
    );
    let out =
        tokio::task::spawn_blocking(move || support::nix::substitute(&url, &pk, &[&top], &client))
            .await
            .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        sidecar.logs()
    );
    assert!(
        sidecar.logs().contains("serving it uncached"),
        "{}",
        sidecar.logs()
    );
    let health = get(&format!("{}/_sidecar/health", sidecar.url), "GET", &[]).await;
    assert_eq!(health.status, 200, "{}", health.text());
    let again = sidecar.narinfo(&fx.top).await;
    assert_eq!(again.status, 200, "the index still answers");
}

/// Item 14, the index: a disk filled by something else poisons redb ("Previous I/O error");
/// once there is room again, the cache caches again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_recovers_from_a_full_disk_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let Some(_unmount) = tmpfs(&cache, "4m") else {
        return;
    };
    let upstream = Upstream::default();
    let hashes: Vec<(String, Vec<u8>)> = (60..100u8)
        .map(|n| {
            let nar = bytes_of(n, 20_000);
            (upstream.add(n, &nar, ("none", &nar), None), nar)
        })
        .collect();
    let url = upstream.start().await;
    let sidecar = sidecar(dir.path(), &url, "min-free-space = \"0\"");
    nar_url(&sidecar, &hashes[0].0).await;
    // Something else fills the disk; the index's next writes fail.
    let filler = cache.join("filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![1u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
    }
    for (hash, _) in &hashes[1..30] {
        let info = get(&format!("{}/{hash}.narinfo", sidecar.url), "GET", &[]).await;
        assert_eq!(info.status, 200, "narinfos are still answered");
    }
    std::fs::remove_file(&filler).unwrap();
    // Room again: a NAR is stored and then served without the upstream.
    let (hash, nar) = &hashes[35];
    let path = format!("{}/{}", sidecar.url, nar_url(&sidecar, hash).await);
    assert!(get(&path, "GET", &[]).await.body.unwrap() == *nar);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = upstream.nar_requests.load(Ordering::SeqCst);
    assert!(get(&path, "GET", &[]).await.body.unwrap() == *nar);
    assert_eq!(
        upstream.nar_requests.load(Ordering::SeqCst),
        before,
        "stored again, no restart:\n{}",
        sidecar.logs()
    );
}
