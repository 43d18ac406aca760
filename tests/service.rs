//! Running as a system service: the unit, the Nix files, readiness and watchdog over
//! NOTIFY_SOCKET, metrics, health, and graceful shutdown.

mod support;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use support::http::get;
use support::issuer::Issuer;
use support::nix::fixture;
use support::sidecar::Sidecar;
use support::upstream::{hash_part, Fault, Target, UpstreamDouble};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn the_units_verify_and_are_rated_at_most_2_0_by_systemd_analyze_security() {
    for name in ["nix-sidecar.service", "nix-sidecar-exchange.service"] {
        let dir = tempfile::tempdir().unwrap();
        let unit = std::fs::read_to_string(format!("{ROOT}/systemd/{name}")).unwrap();
        // verify checks that ExecStart exists: point it at the binary under test.
        let unit = unit.replace("/usr/bin/nix-sidecar", env!("CARGO_BIN_EXE_nix-sidecar"));
        let path = dir.path().join(name);
        std::fs::write(&path, unit).unwrap();
        let verify = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            verify.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&verify.stderr)
        );
        let security = std::process::Command::new("systemd-analyze")
            .args(["security", "--offline=yes"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&security.stdout);
        let level: f64 = text
            .lines()
            .find_map(|l| {
                l.split(&format!("Overall exposure level for {name}: "))
                    .nth(1)
            })
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
        assert!(level <= 2.0, "{name}: exposure {level}");
        if name == "nix-sidecar.service" {
            // The README quotes the figure: it must be the one the command gives.
            let readme = std::fs::read_to_string(format!("{ROOT}/README.md")).unwrap();
            assert!(
                readme.contains(&format!("rates the unit **{level:.1} OK**")),
                "the README's exposure figure is not {level:.1}"
            );
        }
    }
}

/// The module's `nix.settings.trusted-public-keys`, evaluated with real Nix on `settings`.
fn module_keys(settings: &str) -> Vec<String> {
    let expr = format!("import {ROOT}/nixos-module/keys.nix ({settings})");
    let out = std::process::Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json", "--expr", &expr])
        .env(
            "NIX_STATE_DIR",
            std::env::temp_dir().join("nix-sidecar-eval"),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_module_gives_nix_every_key_of_the_readme_example_and_of_presets() {
    // The README's own NixOS example, as written there.
    let readme = std::fs::read_to_string(format!("{ROOT}/README.md")).unwrap();
    let start = readme
        .find("            settings = {")
        .expect("the NixOS example");
    let end = start + readme[start..].find("\n            };").unwrap();
    let settings = &readme[start + "            settings = ".len()..end + "\n            }".len()];
    let keys = module_keys(settings);
    assert!(
        keys.iter().any(|k| k.starts_with("cache.nixos.org-1:")),
        "the nixos preset's key: {keys:?}"
    );
    assert_eq!(keys.len(), 2, "and the org upstream's own key: {keys:?}");

    let keys = module_keys(
        r#"{ trusted-public-keys = [ "global-1:AAAA" ];
             upstream = [ { preset = "flakehub"; } { preset = "nixos"; trusted-public-keys = [ "mirror-1:BBBB" ]; } { url = "https://x"; } ]; }"#,
    );
    assert_eq!(keys[0], "global-1:AAAA");
    assert!(keys.iter().any(|k| k.starts_with("cache.flakehub.com-")));
    assert!(keys.contains(&"mirror-1:BBBB".to_string()));
    assert!(
        !keys.iter().any(|k| k.starts_with("cache.nixos.org")),
        "an upstream's own list replaces its preset's, as in the daemon"
    );
}

#[test]
fn every_nix_file_parses() {
    for file in [
        "flake.nix",
        "nixos-module/default.nix",
        "nixos-module/keys.nix",
        "nixos-module/exchange.nix",
        "nixos-module/hardening.nix",
    ] {
        let out = std::process::Command::new("nix-instantiate")
            .args(["--parse", &format!("{ROOT}/{file}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_watchdog_metrics_and_health_as_a_service_manager_sees_them() {
    let fx = fixture();
    let aud = "https://cache.test";
    let issuer = Issuer::start().await;
    let upstream = UpstreamDouble::start(fx.cache.clone(), Some((&issuer.url, aud))).await;
    upstream.grant("m", &fx.closure);
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, issuer.mint("m", aud, 3600, false)).unwrap();
    let config = format!(
        "[[upstream]]\nname = \"org\"\nurl = \"{}\"\nidentity = \"ci\"\n[identity.ci]\nprovider = \"file\"\npath = \"{}\"\nrefresh-interval = \"1s\"\n",
        upstream.url,
        token_file.display()
    );
    let sidecar = Sidecar::start(
        dir.path(),
        &config,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut seen = Vec::new();
    while !(seen.iter().any(|m: &String| m.contains("READY=1"))
        && seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2)
    {
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).expect("a notification within 10 s");
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        seen[0].contains("READY=1"),
        "readiness comes first: {seen:?}"
    );

    let metrics = |text: &str, series: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    };
    let scrape = || async {
        get(&format!("{}/_sidecar/metrics", sidecar.url), "GET", &[])
            .await
            .text()
    };
    let before = scrape().await;
    let url = format!("{}/{}.narinfo", sidecar.url, hash_part(&fx.top));
    assert_eq!(get(&url, "GET", &[]).await.status, 200);
    assert_eq!(get(&url, "GET", &[]).await.status, 200);
    let after = scrape().await;
    let ok = "nix_sidecar_requests_total{route=\"narinfo\",status=\"200\"}";
    assert_eq!(metrics(&after, ok) - metrics(&before, ok), 2.0, "{after}");
    let hit = "nix_sidecar_cache_hits_total{kind=\"narinfo\"}";
    assert_eq!(metrics(&after, hit) - metrics(&before, hit), 1.0);
    assert!(after.contains("nix_sidecar_upstream_request_seconds_bucket{upstream=\"org\""));
    assert!(metrics(&after, "nix_sidecar_token_refreshes_total{identity=\"ci\"}") >= 1.0);

    let health = get(&format!("{}/_sidecar/health", sidecar.url), "GET", &[]).await;
    assert_eq!(health.status, 200, "{}", health.text());
    // The identity provider fails: garbage in the file and an expired token behind it.
    std::fs::write(&token_file, "garbage").unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    sidecar.narinfo(&fx.closure[0]).await;
    let health = get(&format!("{}/_sidecar/health", sidecar.url), "GET", &[]).await;
    assert_eq!(health.status, 503, "{}", health.text());
    assert!(health.text().contains("not a JWT"));
    std::fs::write(&token_file, issuer.mint("m", aud, 3600, false)).unwrap();
    tokio::time::sleep(Duration::from_millis(6000)).await; // past the refresh back-off
    sidecar.narinfo(&fx.closure[1]).await;
    let health = get(&format!("{}/_sidecar/health", sidecar.url), "GET", &[]).await;
    assert_eq!(health.status, 200, "{}", health.text());
    let json: serde_json::Value = serde_json::from_str(&health.text()).unwrap();
    assert!(
        json["identities"]["ci"]["token_seconds_left"]
            .as_u64()
            .unwrap()
            > 3000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_twenty_downloads_exits_within_the_grace_and_leaves_a_clean_cache() {
    let fx = support::nix::build_many(20, 100_000, "none");
    let upstream = UpstreamDouble::start(fx.cache.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let mut sidecar = Sidecar::start(
        dir.path(),
        &format!(
            "shutdown-grace = \"2s\"\n[[upstream]]\nname = \"up\"\nurl = \"{}\"\n",
            upstream.url
        ),
        &[],
    );
    let mut urls = Vec::new();
    for path in &fx.closure {
        let info = sidecar.narinfo(path).await.text();
        urls.push(
            info.lines()
                .find_map(|l| l.strip_prefix("URL: "))
                .unwrap()
                .to_string(),
        );
    }
    // Slow enough that none can finish before the grace period ends.
    upstream.fault(Target::Nar, Fault::Slow(Duration::from_millis(200)), None);
    let mut clients = tokio::task::JoinSet::new();
    for url in &urls {
        let target = format!("{}/{url}", sidecar.url);
        clients.spawn(async move { get(&target, "GET", &[]).await });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let took = sidecar.stop();
    assert!(took < Duration::from_secs(5), "exited after {took:?}");
    while let Some(got) = clients.join_next().await {
        let got = got.unwrap();
        assert!(
            got.body.is_err(),
            "an interrupted download must not look complete"
        );
    }
    assert!(sidecar.logs().contains("shutting down"));
    let out = sidecar.cache_command("verify");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    assert!(
        report.contains("corrupt: 0") && report.contains("leftovers removed: 0"),
        "{report}"
    );
}

/// Health follows the identity without any request: a token file missing at start-up, then
/// there, then gone again, each seen within about one refresh interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_a_token_file_without_any_request() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    let config = format!(
        "[[upstream]]\nname = \"u\"\nurl = \"http://127.0.0.1:9\"\nidentity = \"k8s\"\n\
         [identity.k8s]\nprovider = \"file\"\npath = \"{}\"\nrefresh-interval = \"1s\"\n",
        token.display()
    );
    let sidecar = Sidecar::start(dir.path(), &config, &[]);
    let health = || async {
        support::http::get(&format!("{}/_sidecar/health", sidecar.url), "GET", &[])
            .await
            .status
    };
    let wait_for = |want: u16, what: &'static str| {
        let health = &health;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while health().await != want {
                assert!(std::time::Instant::now() < deadline, "{what}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for(
        503,
        "a missing token file makes health 503 before any request",
    )
    .await;
    let issuer = Issuer::start().await;
    std::fs::write(
        &token,
        issuer.mint("machine", "https://cache.test", 3600, false),
    )
    .unwrap();
    wait_for(200, "the file appears: healthy again").await;
    std::fs::remove_file(&token).unwrap();
    wait_for(503, "the file goes: 503 within a refresh").await;
    let logs = sidecar.logs();
    assert!(
        logs.contains("obtained a token"),
        "the first success is logged"
    );
    assert!(
        logs.contains("token refresh failed"),
        "every failure is logged"
    );
}

/// Small things an operator meets in the first hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_hour_metrics_at_zero_a_missing_cache_dir_and_a_closed_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(
        dir.path(),
        "[[upstream]]\nname = \"u\"\nurl = \"http://127.0.0.1:9\"\n",
        &[],
    );
    let metrics = get(&format!("{}/_sidecar/metrics", sidecar.url), "GET", &[])
        .await
        .text();
    for series in [
        "nix_sidecar_signature_failures_total{upstream=\"u\"} 0",
        "nix_sidecar_upstream_body_failures_total 0",
        "nix_sidecar_cache_hits_total{kind=\"nar\"} 0",
        "nix_sidecar_cache_misses_total{kind=\"narinfo\"} 0",
    ] {
        assert!(
            metrics.contains(series),
            "{series} from start-up:\n{metrics}"
        );
    }

    let typo = dir.path().join("no-such-cache");
    for action in ["stats", "verify"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
            .args(["cache", action, "--cache-dir"])
            .arg(&typo)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{action} on a missing cache dir");
        assert!(String::from_utf8_lossy(&out.stderr).contains("no nix-sidecar cache"));
        assert!(!typo.exists(), "{action} created nothing");
    }

    // `nix-sidecar token | head -1`: the pipe closes early; no panic.
    let config = dir.path().join("token.toml");
    let token = Issuer::start()
        .await
        .mint("m", "https://cache.test", 600, false);
    std::fs::write(
        &config,
        "[[upstream]]\nurl = \"https://cache.test\"\nidentity = \"i\"\n[identity.i]\nprovider = \"static\"\nvariable = \"T\"\n",
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
        .args(["token", "--config"])
        .arg(&config)
        .env("T", &token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
}

/// A Kubernetes token made for the API server, not for the cache: `check-config`, `token` and
/// the daemon say so instead of sending it silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_another_audience_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    let issuer = Issuer::start().await;
    std::fs::write(
        &token,
        issuer.mint(
            "system:serviceaccount:ci:builder",
            "https://kubernetes.default.svc",
            600,
            false,
        ),
    )
    .unwrap();
    let config_text = format!(
        "[[upstream]]\nname = \"u\"\nurl = \"http://127.0.0.1:9\"\nidentity = \"k8s\"\n\
         [identity.k8s]\nprovider = \"kubernetes\"\npath = \"{}\"\naudience = \"https://cache.test\"\n",
        token.display()
    );
    let config = dir.path().join("c.toml");
    std::fs::write(&config, &config_text).unwrap();
    for command in ["check-config", "token"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
            .args([command, "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{command}: {stderr}");
        assert!(
            stderr.contains("does not contain the configured audience `https://cache.test`"),
            "{command}: {stderr}"
        );
    }
    let sidecar = Sidecar::start(dir.path(), &config_text, &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !sidecar
        .logs()
        .contains("does not contain the configured audience")
    {
        assert!(std::time::Instant::now() < deadline, "{}", sidecar.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `check-config` shows what a `serve` command line would run; `cache` help and errors say
/// what they take.
#[test]
fn check_config_takes_the_serve_flags_and_sizes_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
            .args(args)
            .env_remove("NIX_SIDECAR_CONFIG")
            .output()
            .unwrap()
    };
    let cache = dir.path().join("c");
    let out = run(&[
        "check-config",
        "--upstream",
        "https://cache.nixos.org",
        "--cache-dir",
        cache.to_str().unwrap(),
        "--allowed-uid",
        "0",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("url = \"https://cache.nixos.org/\""),
        "{text}"
    );
    assert!(
        text.contains(&format!("cache-dir = \"{}\"", cache.display())),
        "{text}"
    );
    assert!(text.contains("allowed-uids = [0]"), "{text}");
    let help = String::from_utf8_lossy(&run(&["cache", "gc", "--help"]).stdout).to_string();
    assert!(
        help.contains("default: max-cache-size")
            && help.contains("default: the config's cache-dir"),
        "{help}"
    );
}
