//! The site tier: machines pull through a site cache that holds no identity of its own. NAR
//! bytes cross to the upstream once per site; every machine's view is still the upstream's
//! answer for its own token; a site that goes away costs no substitution.

mod support;

use support::http::get;
use support::issuer::Issuer;
use support::nix::{fixture, in_store, substitute};
use support::sidecar::Sidecar;
use support::upstream::{Fault, Target, UpstreamDouble};

const AUD: &str = "https://cache.test";

/// A port free on loopback a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A machine: a sidecar whose identity is a token file minted for `sub`, asking `site` first.
fn machine(
    dir: &std::path::Path,
    issuer: &Issuer,
    upstream: &str,
    site: &str,
    sub: &str,
) -> Sidecar {
    machine_with(
        dir,
        issuer,
        upstream,
        &format!("site = \"{site}\""),
        sub,
        QUIET,
    )
}

/// Lookahead off: the tests count the upstream's requests.
const QUIET: &str = "narinfo-lookahead = false\nnar-lookahead = false";

/// [`machine`] with `site_lines` for the upstream's site keys and `top` at the file's top.
fn machine_with(
    dir: &std::path::Path,
    issuer: &Issuer,
    upstream: &str,
    site_lines: &str,
    sub: &str,
    top: &str,
) -> Sidecar {
    std::fs::create_dir_all(dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, issuer.mint(sub, AUD, 3600, false)).unwrap();
    let config = format!(
        "{top}\ntrusted-public-keys = [\"{}\"]\n\
         [[upstream]]\nname = \"org\"\nurl = \"{upstream}\"\nidentity = \"id\"\n{site_lines}\n\
         [identity.id]\nprovider = \"file\"\npath = \"{}\"\n",
        fixture().public_key,
        token.display()
    );
    Sidecar::start(dir, &config, &[])
}

/// The `URL:` of a store path's narinfo in the binary cache `cache`.
fn nar_url_of(cache: &std::path::Path, path: &str) -> String {
    let hash = &path["/nix/store/".len()..][..32];
    let text = std::fs::read_to_string(cache.join(format!("{hash}.narinfo"))).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_string()
}

/// Nix substitutes the fixture's closure through `sidecar` into a store under `dir`.
async fn nix_pulls(sidecar: &Sidecar, dir: std::path::PathBuf) {
    let fx = fixture();
    let (url, pk, top, d) = (
        sidecar.url.clone(),
        fx.public_key.clone(),
        fx.top.clone(),
        dir.clone(),
    );
    let out = tokio::task::spawn_blocking(move || substitute(&url, &pk, &[&top], &d))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        sidecar.logs()
    );
    assert!(fx.closure.iter().all(|p| in_store(&dir, p)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_pulls_through_the_site_once_each_view_its_own_and_the_site_may_go_away() {
    let fx = fixture();
    let issuer = Issuer::start().await;
    let upstream = UpstreamDouble::start(fx.cache.clone(), Some((&issuer.url, AUD))).await;
    for sub in ["alice", "bob", "dave"] {
        upstream.grant(sub, &fx.closure);
    }
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let site_url = format!("http://127.0.0.1:{port}");
    std::fs::create_dir_all(root.path().join("site")).unwrap();
    let mut site = Sidecar::start(
        &root.path().join("site"),
        &format!(
            "[site]\nlisten = [\"127.0.0.1:{port}\"]\n[[upstream]]\nname = \"org\"\nurl = \"{}\"\n",
            upstream.url
        ),
        &[],
    );
    let n = fx.closure.len();

    // The first machine: every NAR crosses once, through the site.
    let alice = machine(
        &root.path().join("alice"),
        &issuer,
        &upstream.url,
        &site_url,
        "alice",
    );
    nix_pulls(&alice, root.path().join("alice-store")).await;
    assert_eq!(upstream.count("/nar/"), n, "{:?}", upstream.requests());
    let narinfos_after_alice = upstream.count(".narinfo");

    // The second: the upstream is asked each narinfo with bob's own token (his view), and
    // not one NAR byte.
    let bob = machine(
        &root.path().join("bob"),
        &issuer,
        &upstream.url,
        &site_url,
        "bob",
    );
    nix_pulls(&bob, root.path().join("bob-store")).await;
    assert_eq!(
        upstream.count("/nar/"),
        n,
        "NARs crossed again: {:?}",
        upstream.requests()
    );
    let bob_asked: Vec<_> = upstream.requests()[..]
        .iter()
        .filter(|r| r.path.ends_with(".narinfo"))
        .skip(narinfos_after_alice)
        .map(|r| r.authorization.clone().unwrap_or_default())
        .collect();
    assert!(!bob_asked.is_empty());
    let bob_token = std::fs::read_to_string(root.path().join("bob/token")).unwrap();
    assert!(
        bob_asked.iter().all(|a| a.contains(bob_token.trim())),
        "asked with bob's own token"
    );

    let metrics = |url: String| async move {
        let got = get(&format!("{url}/_sidecar/metrics"), "GET", &[]).await;
        String::from_utf8_lossy(&got.body.unwrap()).into_owned()
    };
    let site_metrics = metrics(site.url.clone()).await;
    let cached = format!("nix_sidecar_site_answers_total{{kind=\"nar\",outcome=\"cached\"}} {n}");
    assert!(site_metrics.contains(&cached), "{site_metrics}");
    let bob_metrics = metrics(bob.url.clone()).await;
    assert!(
        bob_metrics.contains("nix_sidecar_site_route_total{upstream=\"org\",outcome=\"answered\"}"),
        "{bob_metrics}"
    );

    // Carol's view excludes the closure: nothing, though others pulled it.
    let carol = machine(
        &root.path().join("carol"),
        &issuer,
        &upstream.url,
        &site_url,
        "carol",
    );
    assert_eq!(carol.narinfo(&fx.top).await.status, 404);
    let carol_token = std::fs::read_to_string(root.path().join("carol/token")).unwrap();
    let nar_url = nar_url_of(&fx.cache, &fx.top);
    let bearer = format!("Bearer {}", carol_token.trim());
    let got = get(
        &format!("{site_url}/{nar_url}"),
        "GET",
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(
        got.status, 404,
        "a NAR outside carol's view, asked of the site directly"
    );
    assert!(!got
        .body
        .unwrap_or_default()
        .starts_with(b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive"));
    let top_hash = &fx.top["/nix/store/".len()..][..32];
    let got = get(
        &format!("{site_url}/{top_hash}.narinfo"),
        "GET",
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(got.status, 404);
    // No credential, or a forged one naming alice: nothing from the cache.
    let got = get(&format!("{site_url}/{top_hash}.narinfo"), "GET", &[]).await;
    assert_eq!(got.status, 401);
    let forged = format!("Bearer {}", issuer.forge("alice", AUD));
    let got = get(
        &format!("{site_url}/{top_hash}.narinfo"),
        "GET",
        &[("authorization", &forged)],
    )
    .await;
    assert_ne!(got.status, 200, "a forged token naming alice gets nothing");

    // The site goes away: a new machine still substitutes, straight from the upstream.
    site.kill();
    let before = upstream.count("/nar/");
    let dave = machine(
        &root.path().join("dave"),
        &issuer,
        &upstream.url,
        &site_url,
        "dave",
    );
    nix_pulls(&dave, root.path().join("dave-store")).await;
    assert_eq!(upstream.count("/nar/"), before + n);
    let health = get(&format!("{}/_sidecar/health", dave.url), "GET", &[]).await;
    assert_eq!(health.status, 200, "a site down leaves the machine healthy");
    let health: serde_json::Value = serde_json::from_slice(&health.body.unwrap()).unwrap();
    assert_eq!(
        health["upstreams"]["org"]["site"]["answering"], false,
        "{health}"
    );
    let dave_metrics = metrics(dave.url.clone()).await;
    assert!(
        dave_metrics.contains("outcome=\"passed_over\""),
        "{dave_metrics}"
    );

    // The site back (its disk cache kept): used again, no NAR crosses for the next machine.
    site.restart();
    let before = upstream.count("/nar/");
    let eve = machine(
        &root.path().join("eve"),
        &issuer,
        &upstream.url,
        &site_url,
        "alice",
    );
    nix_pulls(&eve, root.path().join("eve-store")).await;
    assert_eq!(upstream.count("/nar/"), before, "{}", site.logs());
    drop((alice, bob, carol, dave, eve));
}

/// A site on TLS, trusted through `site-ca-file`; a path taken out of a view upstream is
/// refused through the site once `narinfo-ttl` has passed, though the site holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_site_and_a_revocation_that_reaches_the_machine_within_narinfo_ttl() {
    let fx = fixture();
    let issuer = Issuer::start().await;
    let upstream = UpstreamDouble::start(fx.cache.clone(), Some((&issuer.url, AUD))).await;
    upstream.grant("alice", &fx.closure);
    let root = tempfile::tempdir().unwrap();
    let site_dir = root.path().join("site");
    std::fs::create_dir_all(&site_dir).unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (site_dir.join("site.pem"), site_dir.join("site.key"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    let port = free_port();
    let site = Sidecar::start(
        &site_dir,
        &format!(
            "narinfo-ttl = \"1s\"\n[site]\nlisten = [\"127.0.0.1:{port}\"]\ntls-cert = \"{}\"\ntls-key = \"{}\"\nallow-from = [\"127.0.0.0/8\"]\n\
             [[upstream]]\nname = \"org\"\nurl = \"{}\"\n",
            cert.display(),
            key.display(),
            upstream.url
        ),
        &[],
    );
    let site_lines = format!(
        "site = \"https://127.0.0.1:{port}\"\nsite-ca-file = \"{}\"",
        cert.display()
    );
    let alice = machine_with(
        &root.path().join("alice"),
        &issuer,
        &upstream.url,
        &site_lines,
        "alice",
        &format!("narinfo-ttl = \"1s\"\n{QUIET}"),
    );
    nix_pulls(&alice, root.path().join("alice-store")).await;
    let n = fx.closure.len();
    assert_eq!(upstream.count("/nar/"), n);
    assert!(
        site.logs().contains("site open to other sidecars"),
        "{}",
        site.logs()
    );

    upstream.state.views.lock().unwrap().remove("alice");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(alice.narinfo(&fx.top).await.status, 404, "{}", alice.logs());
    // Through the site, not around it: the site is up, and the machine never said otherwise.
    assert!(
        !alice.logs().contains("site unavailable"),
        "{}",
        alice.logs()
    );
}

/// `[site]` off loopback needs TLS; a machine's `site` over plain http to another host is
/// refused; each error names its key.
#[test]
fn site_settings_that_would_send_tokens_in_clear_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let check = |config: &str| {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, config).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout),
        )
    };
    let (ok, said) = check("[site]\nlisten = [\"0.0.0.0:37516\"]\n");
    assert!(!ok && said.contains("site.tls-cert"), "{said}");
    let (ok, said) =
        check("[site]\nlisten = [\"127.0.0.1:37516\"]\nallow-from = [\"10.0.0.0/33\"]\n");
    assert!(!ok && said.contains("site.allow-from[0]"), "{said}");
    let (ok, said) = check("[[upstream]]\nurl = \"https://cache.example.org\"\nsite = \"http://site.example.org:37516\"\n");
    assert!(!ok && said.contains("upstream[0].site"), "{said}");
    let (ok, said) = check("[site]\nlisten = [\"127.0.0.1:37516\"]\n[[upstream]]\nurl = \"https://cache.example.org\"\nsite = \"https://site.example.org:37516\"\n");
    assert!(ok, "{said}");
    assert!(
        said.contains("[site]") && said.contains("site = \"https://site.example.org:37516/\""),
        "{said}"
    );
}

/// Closure hints: once the site knows a closure, a machine that asks for its root gets every
/// narinfo of it from the site at once (each checked upstream with that machine's own token)
/// and answers the rest of Nix's walk locally, even with the upstream's narinfos down; a
/// caller outside the view gets none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closure_hints_answer_a_machines_whole_walk_locally_within_its_view() {
    let fx = fixture();
    let issuer = Issuer::start().await;
    let upstream = UpstreamDouble::start(fx.cache.clone(), Some((&issuer.url, AUD))).await;
    upstream.grant("alice", &fx.closure);
    upstream.grant("bob", &fx.closure);
    let root = tempfile::tempdir().unwrap();
    let port = free_port();
    let site_url = format!("http://127.0.0.1:{port}");
    std::fs::create_dir_all(root.path().join("site")).unwrap();
    let _site = Sidecar::start(
        &root.path().join("site"),
        &format!(
            "[site]\nlisten = [\"127.0.0.1:{port}\"]\n[[upstream]]\nname = \"org\"\nurl = \"{}\"\n",
            upstream.url
        ),
        &[],
    );
    let alice = machine(
        &root.path().join("alice"),
        &issuer,
        &upstream.url,
        &site_url,
        "alice",
    );
    nix_pulls(&alice, root.path().join("alice-store")).await;

    // Bob asks for the root alone (lookahead off: only the hints can bring the rest). Checked
    // with the upstream's narinfos down.
    let site_lines = format!("site = \"{site_url}\"");
    let bob_dir = root.path().join("bob");
    let bob = machine_with(&bob_dir, &issuer, &upstream.url, &site_lines, "bob", QUIET);
    assert_eq!(bob.narinfo(&fx.top).await.status, 200);
    // The hints are in once the machine says so (its debug log), not before: a fault set
    // earlier would fail the site's checks of them.
    for _ in 0..200 {
        if bob.logs().contains("closure hints from the site") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    upstream.fault(Target::NarInfo, Fault::Status(503), None);
    for path in &fx.closure {
        let got = bob.narinfo(path).await;
        assert_eq!(
            got.status,
            200,
            "{path} not answered locally:\n{}",
            bob.logs()
        );
    }
    upstream.clear_faults();

    let top_hash = &fx.top["/nix/store/".len()..][..32];
    let hints_for = |token: String| {
        let url = format!("{site_url}/_sidecar/closure/{top_hash}");
        async move {
            let bearer = format!("Bearer {token}");
            let got = get(&url, "GET", &[("authorization", &bearer)]).await;
            assert_eq!(got.status, 200);
            let v: serde_json::Value = serde_json::from_slice(&got.body.unwrap()).unwrap();
            v["narinfos"].as_array().unwrap().len()
        }
    };
    assert_eq!(
        hints_for(issuer.mint("bob", AUD, 300, false)).await,
        fx.closure.len()
    );
    assert_eq!(
        hints_for(issuer.mint("carol", AUD, 300, false)).await,
        0,
        "outside carol's view"
    );
    let bad = get(
        &format!("{site_url}/_sidecar/closure/not-a-hash"),
        "GET",
        &[],
    )
    .await;
    assert_eq!(bad.status, 404);
    drop((alice, bob));
}
