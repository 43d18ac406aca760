//! Who may push is decided by the kernel for that exact connection (SPEC.md "Who is asking"):
//! the attack of the second outside review, run as another user, never gets a PUT accepted;
//! the cost of admission does not grow with the sockets other users hold; root still pushes.
//!
//! The attacker is this test binary itself, copied where uid 65534 can run it and started as
//! that user with `ATTACK_*` variables (the ignored test `attacker` below).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::nix::fixture;
use support::sidecar::Sidecar;
use support::upstream::hash_part;

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Run as uid 65534 by `Attacker::start`: holds `ATTACK_LISTENERS` listening sockets, says
/// "ready", then sends `ATTACK_REQUEST_FILE` `ATTACK_ATTEMPTS` times on fresh connections,
/// closing each at once, and says "done"; then waits until its stdin closes.
#[test]
#[ignore = "started by the other tests as another user"]
fn attacker() {
    let Ok(target) = std::env::var("ATTACK_TARGET") else {
        return;
    };
    support::raise_nofile();
    let count: usize = std::env::var("ATTACK_LISTENERS").unwrap().parse().unwrap();
    let held: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a listening socket"))
        .collect();
    println!("ready {}", held.len());
    let attempts: usize = std::env::var("ATTACK_ATTEMPTS").unwrap().parse().unwrap();
    let request = std::fs::read(std::env::var("ATTACK_REQUEST_FILE").unwrap()).unwrap();
    for _ in 0..attempts {
        let Ok(mut tcp) = TcpStream::connect(&target) else {
            continue;
        };
        let _ = tcp.write_all(&request);
        drop(tcp); // closed at once: the server never reads the end of the pipeline
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("done");
    let _ = std::io::stdin().read(&mut [0u8; 1]);
    drop(held);
}

struct Attacker {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    _dir: tempfile::TempDir,
}

impl Attacker {
    /// Starts the attacker as uid 65534 against `target` (host:port) and waits until it holds
    /// `listeners` sockets.
    fn start(target: &str, listeners: usize, attempts: usize, request: &[u8]) -> Attacker {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let binary = dir.path().join("attacker");
        std::fs::copy(std::env::current_exe().unwrap(), &binary).unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        let request_file = dir.path().join("request");
        std::fs::write(&request_file, request).unwrap();
        std::fs::set_permissions(&request_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        support::raise_nofile(); // inherited: the hard limit bounds what the attacker can raise
        let mut command = Command::new(&binary);
        command
            .args([
                "attacker",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("ATTACK_TARGET", target)
            .env("ATTACK_LISTENERS", listeners.to_string())
            .env("ATTACK_ATTEMPTS", attempts.to_string())
            .env("ATTACK_REQUEST_FILE", &request_file)
            .current_dir(dir.path())
            .uid(NOBODY)
            .gid(NOBODY)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child =
            support::spawn_copied(&mut command).expect("start the attacker as uid 65534");
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut attacker = Attacker {
            child,
            out,
            _dir: dir,
        };
        let ready = attacker.line_starting("ready");
        assert_eq!(ready, format!("ready {listeners}"));
        attacker
    }

    fn line_starting(&mut self, prefix: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.out.read_line(&mut line).unwrap();
            assert!(n > 0, "the attacker ended before saying {prefix}");
            // libtest's "test attacker ... " has no newline: the word may follow it.
            if let Some(at) = line.find(prefix) {
                return line[at..].trim().to_string();
            }
        }
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A sidecar that takes pushes for `http` upstream `org` (`upstream`: nothing has to arrive)
/// from root only, and trusts the fixture's key.
fn builder(dir: &Path, upstream: &str, extra: &str) -> Sidecar {
    std::fs::create_dir_all(dir).unwrap();
    let fixture = fixture();
    let config = format!(
        "{extra}\ntrusted-public-keys = [\"{}\"]\n[[upstream]]\nname = \"org\"\nurl = \"{upstream}/org\"\npush = \"http\"\npush-uids = [0]\n",
        fixture.public_key,
    );
    Sidecar::start(dir, &config, &[])
}

/// `PUT /nar/<file>` with the fixture's NAR for `store_path`, then its narinfo, pipelined,
/// then a trailing GET so the server never reads the end of the connection.
fn pipelined_push(store_path: &str) -> Vec<u8> {
    let hash = hash_part(store_path);
    let (narinfo, nar, url) = fixture().files(store_path);
    let mut out = format!(
        "PUT /{url} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n",
        nar.len()
    )
    .into_bytes();
    out.extend_from_slice(&nar);
    out.extend_from_slice(
        format!(
            "PUT /{hash}.narinfo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{narinfo}",
            narinfo.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(b"GET /nix-cache-info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
    out
}

fn staged_files(sidecar: &Sidecar) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![sidecar.cache_dir().join("push")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// Reads one whole HTTP/1.1 response with a Content-Length from `tcp`; returns its status.
fn read_status(tcp: &mut TcpStream, pending: &mut Vec<u8>) -> u16 {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if pending.len() >= end + 4 + len {
                pending.drain(..end + 4 + len);
                return head.split_whitespace().nth(1).unwrap().parse().unwrap();
            }
        }
        let n = tcp.read(&mut buf).unwrap();
        assert!(n > 0, "the connection closed mid-response");
        pending.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_racing_its_own_close_never_pushes_and_root_still_does() {
    if !is_root() {
        eprintln!("skipped: needs root to run the attacker as uid 65534");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top = fixture().top.clone();
    let request = pipelined_push(&top);
    let empty = support::http::serve(|_| async { support::http::respond(404, "") }).await;
    let upstream = format!("http://{empty}");
    for (name, extra) in [("open", ""), ("admitted", "allowed-uids = [0]")] {
        let sidecar = builder(&dir.path().join(name), &upstream, extra);
        let target = sidecar.url.trim_start_matches("http://").to_string();
        let mut attacker = Attacker::start(&target, 3000, 200, &request);
        let done = tokio::task::spawn_blocking(move || {
            attacker.line_starting("done");
            attacker
        });
        let attacker = tokio::time::timeout(Duration::from_secs(120), done)
            .await
            .expect("200 attempts within two minutes")
            .unwrap();
        // Let the last connections be served or refused.
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(attacker);
        let metrics = support::http::get(&format!("{}/_sidecar/metrics", sidecar.url), "GET", &[])
            .await
            .text();
        let accepted = metric(
            &metrics,
            "nix_sidecar_requests_total{route=\"nar\",status=\"200\"}",
        ) + metric(
            &metrics,
            "nix_sidecar_requests_total{route=\"narinfo\",status=\"200\"}",
        );
        assert_eq!(accepted, 0.0, "{name}: a PUT was accepted:\n{metrics}");
        assert_eq!(staged_files(&sidecar), Vec::<PathBuf>::new(), "{name}");
        let narinfo = sidecar.narinfo(&top).await;
        assert_eq!(narinfo.status, 404, "{name}: the pushed narinfo is served");

        // Root, on one connection with the same pipeline, reading the answers: both PUTs 200.
        let mut tcp = TcpStream::connect(&target).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        tcp.write_all(&request).unwrap();
        let mut pending = Vec::new();
        let statuses: Vec<u16> = (0..3)
            .map(|_| read_status(&mut tcp, &mut pending))
            .collect();
        assert_eq!(statuses, [200, 200, 200], "{name}: root pushes");
        assert_eq!(sidecar.narinfo(&top).await.status, 200, "{name}");
    }
}

/// Connect, `GET /nix-cache-info`, read the answer, close: the median of `n`, in microseconds.
fn admission_median(target: &str, n: usize) -> u128 {
    let request = b"GET /nix-cache-info HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    let mut times: Vec<u128> = (0..n)
        .map(|_| {
            let start = Instant::now();
            let mut tcp = TcpStream::connect(target).unwrap();
            tcp.write_all(request).unwrap();
            let mut pending = Vec::new();
            assert_eq!(read_status(&mut tcp, &mut pending), 200);
            start.elapsed().as_micros()
        })
        .collect();
    times.sort_unstable();
    times[n / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_costs_the_same_with_15000_sockets_held_by_another_user() {
    if !is_root() {
        eprintln!("skipped: needs root to hold sockets as uid 65534");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sidecar = builder(dir.path(), "http://127.0.0.1:9", "allowed-uids = [0]");
    let target = sidecar.url.trim_start_matches("http://").to_string();
    let t = target.clone();
    let before = tokio::task::spawn_blocking(move || {
        admission_median(&t, 20); // warm up
        admission_median(&t, 101)
    })
    .await
    .unwrap();
    let attacker = Attacker::start(&target, 15_000, 0, b"");
    let t = target.clone();
    let during = tokio::task::spawn_blocking(move || admission_median(&t, 101))
        .await
        .unwrap();
    drop(attacker);
    eprintln!("admission median: {before} us alone, {during} us beside 15,000 sockets");
    assert!(
        during <= 2 * before.max(200),
        "admission went from {before} us to {during} us"
    );
}
