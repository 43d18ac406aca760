//! `nix-sidecar prefetch` and `POST /_sidecar/prefetch`: a closure staged before a deploy is
//! there when the upstream is not.

mod support;

use std::process::Command;

use support::http::get;
use support::nix::{fixture, in_store, substitute};
use support::sidecar::Sidecar;
use support::upstream::{Fault, Target, UpstreamDouble};

/// Runs `nix-sidecar ARGS` (off the async workers: it blocks until done).
fn cli(args: &[&str]) -> std::process::Output {
    tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
            .args(args)
            .output()
            .unwrap()
    })
}

/// The fixture's cache behind an anonymous upstream double, and a daemon in front of it
/// (lookahead off: the tests count the upstream's requests) with `extra` configuration.
async fn setup(extra: &str) -> (UpstreamDouble, tempfile::TempDir, Sidecar) {
    let upstream = UpstreamDouble::start(fixture().cache.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(
        dir.path(),
        &format!(
            "{extra}\nnarinfo-lookahead = false\n[[upstream]]\nname = \"u\"\nurl = \"{}\"\n",
            upstream.url
        ),
        &[],
    );
    (upstream, dir, sidecar)
}

/// After `nix-sidecar prefetch ROOT` the upstream goes down, and real Nix still copies the
/// whole closure through the daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetched_closure_is_copied_by_nix_while_the_upstream_is_down() {
    let fx = fixture();
    let keys = format!("trusted-public-keys = [\"{}\"]", fx.public_key);
    let (upstream, dir, sidecar) = setup(&keys).await;
    let out = cli(&["prefetch", "--url", &sidecar.url, &fx.top]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}\n{}", sidecar.logs());
    let n = fx.closure.len();
    assert!(
        stdout.contains(&format!("prefetch: {n}/{n} paths")),
        "{stdout}"
    );
    assert!(
        stderr.contains("prefetch: "),
        "plain progress lines off a terminal: {stderr}"
    );
    assert_eq!(
        upstream.count("nar/"),
        n,
        "one download per NAR of the closure"
    );

    upstream.fault(Target::Any, Fault::Status(503), None);
    let (url, pk, top, client) = (
        sidecar.url.clone(),
        fx.public_key.clone(),
        fx.top.clone(),
        dir.path().join("client"),
    );
    let c = client.clone();
    let copied = tokio::task::spawn_blocking(move || substitute(&url, &pk, &[&top], &c))
        .await
        .unwrap();
    assert!(
        copied.status.success(),
        "{}",
        String::from_utf8_lossy(&copied.stderr)
    );
    assert!(fx.closure.iter().all(|p| in_store(&client, p)));
}

/// A path no upstream has makes prefetch exit 1 naming it; a malformed request is a 400 and
/// anything but POST a 405.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_path_is_named_and_exits_1() {
    let (_upstream, _dir, sidecar) = setup("").await;
    let url = sidecar.url.as_str();
    let missing = "/nix/store/00000000000000000000000000000abc-missing";
    let out = cli(&["prefetch", "--url", url, missing]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .contains("unavailable: 00000000000000000000000000000abc: not in any upstream's view"),
        "{stderr}"
    );
    let out = cli(&["prefetch", "--url", url, "not-a-store-path"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("400"), "{stderr}");
    let got = get(&format!("{}/_sidecar/prefetch", sidecar.url), "GET", &[]).await;
    assert_eq!(got.status, 405);
    assert_eq!(got.headers["allow"], "POST");
}

/// `prefetch --pin` keeps a closure through an eviction pass that removes everything else
/// (`cache gc --max-size 0`), `cache stats` shows the pinned bytes, and `unpin` lets it go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_nars_survive_an_eviction_pass_until_unpinned() {
    let fx = fixture();
    let (_upstream, _dir, mut sidecar) = setup("").await;
    let url = sidecar.url.clone();
    let out = cli(&["prefetch", "--url", &url, &fx.top]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(&["prefetch", "--pin", "--url", &url, &fx.outside]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sidecar.stop();

    let cache = sidecar.cache_dir();
    let cache = cache.to_str().unwrap();
    let gc = cli(&["cache", "gc", "--max-size", "0", "--cache-dir", cache]);
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    let stats =
        String::from_utf8_lossy(&cli(&["cache", "stats", "--cache-dir", cache]).stdout).to_string();
    let bytes = |label: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .and_then(|rest| rest.split('(').nth(1)?.split(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{label} in {stats}"))
    };
    assert!(bytes("pinned: ") > 0, "{stats}");
    assert_eq!(
        bytes("stored: "),
        bytes("pinned: "),
        "only pinned files are left: {stats}"
    );

    sidecar.restart();
    let url = sidecar.url.clone();
    let out = cli(&["unpin", "--url", &url]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("pinned NAR(s) may be evicted again"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sidecar.stop();
    cli(&["cache", "gc", "--max-size", "0", "--cache-dir", cache]);
    let stats =
        String::from_utf8_lossy(&cli(&["cache", "stats", "--cache-dir", cache]).stdout).to_string();
    assert!(stats.contains("stored: 0 B (0 bytes)"), "{stats}");
}

/// Runs `nix-sidecar ARGS` with `input` on its standard input.
fn cli_with_stdin(args: &[&str], input: &str) -> std::process::Output {
    use std::io::Write;
    tokio::task::block_in_place(|| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
}

/// `prefetch --paths-from -` takes a whole closure (as `nix path-info -r` prints it) from
/// standard input and `--paths-from FILE` from a file: every path is fetched, each narinfo
/// asked upstream exactly once (none found again through References); an empty or unreadable
/// list is a clear error, and so is a line that is not a store path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closure_list_is_prefetched_whole_from_stdin_or_a_file() {
    let fx = fixture();
    let (upstream, dir, sidecar) = setup("").await;
    let url = sidecar.url.as_str();
    let list = fx.closure.join("\n") + "\n\n";
    let out = cli_with_stdin(&["prefetch", "--url", url, "--paths-from", "-"], &list);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", sidecar.logs());
    let n = fx.closure.len();
    assert!(
        stdout.contains(&format!("prefetch: {n}/{n} paths")),
        "{stdout}"
    );
    assert_eq!(upstream.count(".narinfo"), n, "{:?}", upstream.requests());
    assert_eq!(upstream.count("/nar/"), n);

    // Again from a file, with a root on the command line too: all local now, nothing asked.
    let file = dir.path().join("closure.txt");
    std::fs::write(&file, &list).unwrap();
    let file = file.display().to_string();
    let out = cli(&["prefetch", "--url", url, "--paths-from", &file, &fx.top]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(upstream.count("/nar/"), n);

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n").unwrap();
    let out = cli(&[
        "prefetch",
        "--url",
        url,
        "--paths-from",
        &empty.display().to_string(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("no paths in it"),
        "{stderr}"
    );
    let out = cli(&[
        "prefetch",
        "--url",
        url,
        "--paths-from",
        "/nonexistent/list",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--paths-from /nonexistent/list"),
        "{stderr}"
    );
    let out = cli_with_stdin(
        &["prefetch", "--url", url, "--paths-from", "-"],
        "/nix/store/not-a-path\n",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("not-a-path"),
        "{stderr}"
    );
}

/// SIGTERM while a prefetch walks a stalled upstream: the walk is background work the daemon
/// owns, told to stop when shutdown starts, so the daemon exits at once instead of holding the
/// prefetch's answer open for the whole grace, and the client is told the walk was cut short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_prefetch_walk_at_once_and_the_client_hears_it_was_cut() {
    let fx = fixture();
    let (upstream, _dir, mut sidecar) = setup("shutdown-grace = \"30s\"").await;
    upstream.fault(
        Target::NarInfo,
        Fault::Delay(std::time::Duration::from_secs(60)),
        None,
    );
    let (url, top) = (sidecar.url.clone(), fx.top.clone());
    let prefetch = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
            .args(["prefetch", "--url", &url, &top])
            .output()
            .unwrap()
    });
    // The walk is waiting on the upstream once its narinfo was asked for.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while upstream.count(".narinfo") == 0 {
        assert!(std::time::Instant::now() < deadline, "no narinfo asked");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let took = sidecar.stop();
    assert!(
        took < std::time::Duration::from_secs(10),
        "exited after {took:?} (grace 30 s)\n{}",
        sidecar.logs()
    );
    let out = prefetch.await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("reading the daemon's answer")
            || stderr.contains("ended its answer before it was done"),
        "{stderr}"
    );
}
