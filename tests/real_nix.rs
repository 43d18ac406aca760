//! Real Nix substitutes through nix-sidecar from a JWT-protected, view-scoped upstream.

mod support;

use support::http::get;
use support::issuer::Issuer;
use support::nix::{fixture, in_store, substitute, Client};
use support::sidecar::Sidecar;
use support::upstream::UpstreamDouble;

const AUD: &str = "https://cache.test";

fn config(upstream: &str, token_file: &std::path::Path, key: &str) -> String {
    format!(
        r#"trusted-public-keys = ["{key}"]

[[upstream]]
name = "org"
url = "{upstream}"
identity = "ci"

[identity.ci]
provider = "file"
path = "{}"
"#,
        token_file.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nix_substitutes_a_closure_inside_the_view_and_not_a_path_outside() {
    for client in Client::all() {
        substitutes_inside_the_view_only(client).await;
    }
}

async fn substitutes_inside_the_view_only(client: Client) {
    let fx = fixture();
    let issuer = Issuer::start().await;
    let upstream = UpstreamDouble::start(fx.cache.clone(), Some((&issuer.url, AUD))).await;
    upstream.grant("machine-1", &fx.closure);
    let dir = tempfile::tempdir().unwrap();
    let token = issuer.mint("machine-1", AUD, 300, false);
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, &token).unwrap();
    let sidecar = Sidecar::start(
        dir.path(),
        &config(&upstream.url, &token_file, &fx.public_key),
        &[],
    );

    let url = sidecar.url.clone();
    let (pk, top) = (fx.public_key.clone(), fx.top.clone());
    let client_dir = dir.path().join("client");
    let cd = client_dir.clone();
    let out = tokio::task::spawn_blocking(move || client.substitute(&url, &pk, &[&top], &cd))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}: nix copy failed: {}",
        client.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    for path in &fx.closure {
        assert!(
            in_store(&client_dir, path),
            "{}: {path} was substituted",
            client.name()
        );
    }

    let url = sidecar.url.clone();
    let (pk, outside) = (fx.public_key.clone(), fx.outside.clone());
    let cd = client_dir.clone();
    let out = tokio::task::spawn_blocking(move || client.substitute(&url, &pk, &[&outside], &cd))
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{}: a path outside the view must not substitute",
        client.name()
    );
    assert!(!in_store(&client_dir, &fx.outside));
    assert!(
        stderr.contains("no substituter that can build it")
            || stderr.contains("does not exist")
            || stderr.contains("is not valid"),
        "{}: nix says it cannot substitute it: {stderr}",
        client.name()
    );
    let miss = sidecar.narinfo(&fx.outside).await;
    assert_eq!(miss.status, 404);

    let logs = sidecar.logs();
    assert!(!logs.contains(&token), "the token never reaches the log");
    assert!(
        upstream
            .requests()
            .iter()
            .all(|r| r.authorization.as_deref() == Some(&format!("Bearer {token}"))),
        "every upstream request carried the machine's token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_the_wrong_audience_gets_a_503_that_says_why() {
    let fx = fixture();
    let issuer = Issuer::start().await;
    let upstream = UpstreamDouble::start(fx.cache.clone(), Some((&issuer.url, AUD))).await;
    upstream.grant("machine-1", &fx.closure);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(
        &token_file,
        issuer.mint("machine-1", "https://someone-else.test", 300, true),
    )
    .unwrap();
    let sidecar = Sidecar::start(
        dir.path(),
        &config(&upstream.url, &token_file, &fx.public_key),
        &[],
    );

    let answer = sidecar.narinfo(&fx.top).await;
    assert_eq!(answer.status, 503);
    let body = answer.text();
    assert!(
        body.contains("rejected this machine's identity `ci`"),
        "{body}"
    );
    assert!(
        !body.contains("InvalidAudience") && sidecar.logs().contains("InvalidAudience"),
        "the upstream's reason is logged, not passed on (it may echo the credential): {body}"
    );

    let url = sidecar.url.clone();
    let (pk, top) = (fx.public_key.clone(), fx.top.clone());
    let cd = dir.path().join("client");
    let out = tokio::task::spawn_blocking(move || substitute(&url, &pk, &[&top], &cd))
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("503"), "nix reports the 503: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nix_substitutes_zstd_nars_verified_by_narhash_when_the_narinfo_has_no_filehash() {
    let fx = support::nix::build("zstd", 5_000);
    let upstream =
        UpstreamDouble::start_with(fx.cache.clone(), None, |s| s.strip_file_hash = true).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "trusted-public-keys = [\"{}\"]\n[[upstream]]\nname = \"attic-like\"\nurl = \"{}\"\n",
        fx.public_key, upstream.url
    );
    let sidecar = Sidecar::start(dir.path(), &config, &[]);
    let (url, pk, top, cd) = (
        sidecar.url.clone(),
        fx.public_key.clone(),
        fx.top.clone(),
        dir.path().join("c1"),
    );
    let out = tokio::task::spawn_blocking(move || substitute(&url, &pk, &[&top], &cd))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = sidecar.narinfo(&fx.top).await.text();
    assert!(!info.contains("FileHash"));

    // Wrong bytes behind a narinfo without FileHash are caught by NarHash.
    let other = support::nix::build("zstd", 5_001);
    let upstream =
        UpstreamDouble::start_with(other.cache.clone(), None, |s| s.strip_file_hash = true).await;
    upstream.fault(
        support::upstream::Target::Nar,
        support::upstream::Fault::WrongBytes,
        None,
    );
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "trusted-public-keys = [\"{}\"]\n[[upstream]]\nname = \"attic-like\"\nurl = \"{}\"\n",
        other.public_key, upstream.url
    );
    let sidecar = Sidecar::start(dir.path(), &config, &[]);
    let (url, pk, top, cd) = (
        sidecar.url.clone(),
        other.public_key.clone(),
        other.top.clone(),
        dir.path().join("c2"),
    );
    let out = tokio::task::spawn_blocking(move || substitute(&url, &pk, &[&top], &cd))
        .await
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test]
async fn http2_prior_knowledge_is_refused_and_http1_still_served() {
    use http_body_util::Empty;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(dir.path(), "", &[]);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<bytes::Bytes>>();
    let refused = client
        .get(format!("{}/nix-cache-info", sidecar.url).parse().unwrap())
        .await;
    assert!(refused.is_err(), "no h2c");
    // The raw preface: the connection closes without an HTTP/2 SETTINGS frame.
    let addr = sidecar.url.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tcp.read_to_end(&mut answer),
    )
    .await
    .expect("closed promptly")
    .ok();
    assert!(
        answer.is_empty() || answer.starts_with(b"HTTP/1.1 "),
        "{answer:?}"
    );
    let info = support::http::get(&format!("{}/nix-cache-info", sidecar.url), "GET", &[]).await;
    assert!(info.text().starts_with("StoreDir: /nix/store\n"));
}

/// README "When the cache is down": every upstream unreachable. With `unavailable = "miss"`
/// real Nix builds the derivation itself; with `"fail"` (the default) it gets a 503 with
/// Retry-After and the reason, and does not build.
#[tokio::test(flavor = "multi_thread")]
async fn with_every_upstream_down_miss_lets_nix_build_and_fail_stops_it_with_the_reason() {
    let dead = format!("http://{}", support::refusing_addr());
    let unique = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    for (client, setting) in Client::all()
        .into_iter()
        .flat_map(|c| [(c, "miss"), (c, "fail")])
    {
        let dir = tempfile::tempdir().unwrap();
        let sidecar = Sidecar::start(
            dir.path(),
            &format!(
                "unavailable = \"{setting}\"\n[[upstream]]\nname = \"down\"\nurl = \"{dead}\"\n"
            ),
            &[],
        );
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        let name = format!(
            "built-while-down-{setting}-{}-{unique}",
            client.name().replace([' ', '.'], "")
        );
        let expr = home.join("local.nix");
        std::fs::write(
            &expr,
            format!("builtins.derivation {{ name = \"{name}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"echo {name} > $out\" ]; }}"),
        )
        .unwrap();
        let built = client.run(
            &[
                "nix-build",
                "--no-out-link",
                "--option",
                "substituters",
                &sidecar.url,
                "--option",
                "connect-timeout",
                "5",
                expr.to_str().unwrap(),
            ],
            &home,
        );
        let said = String::from_utf8_lossy(&built.stderr).into_owned();
        // Any path's narinfo says what Nix is told.
        let hash = "0".repeat(32);
        let answer = get(&format!("{}/{hash}.narinfo", sidecar.url), "GET", &[]).await;
        if setting == "miss" {
            assert!(
                built.status.success(),
                "{}: {said}\n{}",
                client.name(),
                sidecar.logs()
            );
            assert_eq!(answer.status, 404);
            assert!(
                answer.text().contains("unavailable = \"miss\""),
                "{}",
                answer.text()
            );
        } else {
            assert!(
                !built.status.success(),
                "{} built with fail: {said}",
                client.name()
            );
            assert_eq!(answer.status, 503);
            assert!(answer.headers.contains_key("retry-after"));
            assert!(answer.text().contains("down"), "{}", answer.text());
        }
        let health = get(&format!("{}/_sidecar/health", sidecar.url), "GET", &[]).await;
        assert_eq!(health.status, 503, "health is degraded either way");
    }
}

/// nix-daemon substitutes through the sidecar for an unprivileged user (uid 65534), with the
/// sidecar admitting only the daemon (`allowed-uids = [0]`), as on a fleet machine: with each
/// client's own nix-daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nix_daemon_substitutes_for_an_unprivileged_user_through_the_sidecar() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run nix-daemon and a client as uid 65534");
        return;
    }
    let fx = fixture();
    for client in Client::all() {
        eprintln!("nix-daemon of {}", client.name());
        let upstream = UpstreamDouble::start(fx.cache.clone(), None).await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("sidecar")).unwrap();
        let sidecar = Sidecar::start(
            &dir.path().join("sidecar"),
            &format!(
                "allowed-uids = [0]\ntrusted-public-keys = [\"{}\"]\n[[upstream]]\nname = \"u\"\nurl = \"{}\"\n",
                fx.public_key, upstream.url
            ),
            &[],
        );
        let socket = dir.path().join("daemon.sock");
        let socket_var = format!("NIX_DAEMON_SOCKET_PATH={}", socket.display());
        let store = dir.path().join("client").join("dst-store");
        let home = dir.path().join("home");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let mut daemon = client
            .command(
                &[
                    &socket_var,
                    "nix-daemon",
                    "--option",
                    "store",
                    store.to_str().unwrap(),
                    "--option",
                    "substituters",
                    &sidecar.url,
                    "--option",
                    "trusted-public-keys",
                    &fx.public_key,
                ],
                &home,
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "{}: no daemon socket",
                client.name()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let top = fx.top.clone();
        let (socket_var2, home2) = (socket_var.clone(), home.clone());
        let realised = tokio::task::spawn_blocking(move || {
            client.run(
                &[
                    &socket_var2,
                    "NIX_REMOTE=daemon",
                    // The daemon's substituters, not an empty list of the client's (an
                    // untrusted client may narrow them, and none is narrowest).
                    "NIX_CONFIG=experimental-features = nix-command",
                    "setpriv",
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "nix-store",
                    "--realise",
                    &top,
                ],
                &home2,
            )
        })
        .await
        .unwrap();
        let _ = daemon.kill();
        let _ = daemon.wait();
        assert!(
            realised.status.success(),
            "{}: {}\n{}",
            client.name(),
            String::from_utf8_lossy(&realised.stderr),
            sidecar.logs()
        );
        for path in &fx.closure {
            assert!(
                in_store(&dir.path().join("client"), path),
                "{}: {path} substituted by the daemon",
                client.name()
            );
        }
        assert!(
            upstream.count("/nar/") >= fx.closure.len(),
            "{}",
            client.name()
        );
    }
}
