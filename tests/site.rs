//! The site tier: machines pull through a site cache that holds no identity of its own. NAR
//! bytes cross to the upstream once per site; every machine's view is still the upstream's
//! answer for its own token; a site that goes away costs no substitution.

mod support;

use support::http::get;
use support::issuer::Issuer;
use support::nix::fixture;
use support::nix::Client;
use support::sidecar::Sidecar;
use support::upstream::{Fault, Target, UpstreamDouble};
use support::world::{nix_pulls_into, nix_pulls_with};

const AUD: &str = "https://cache.test";

/// The newest Nix the tests have (2.26 under CI): some machines of a fleet run it, the others
/// Debian's 2.8.
fn current() -> Client {
    *Client::all().last().unwrap()
}

/// Lookahead off: the tests count the upstream's requests.
const QUIET: &str = "narinfo-lookahead = false\nnar-lookahead = false";

/// An issuer, an upstream that checks its JWTs (with views granted per subject), and a
/// directory for a site and its machines, the site on a port reserved for it.
struct Fleet {
    issuer: Issuer,
    upstream: UpstreamDouble,
    root: tempfile::TempDir,
    port: u16,
    site_url: String,
}

impl Fleet {
    async fn start(granted: &[&str]) -> Fleet {
        let issuer = Issuer::start().await;
        // Ranges answered, as nginx and S3 do: a NAR cut off at a dying site goes on there.
        let upstream =
            UpstreamDouble::start_with(fixture().cache.clone(), Some((&issuer.url, AUD)), |s| {
                s.ranges = true
            })
            .await;
        for sub in granted {
            upstream.grant(sub, &fixture().closure);
        }
        let port = support::reserved_port();
        Fleet {
            issuer,
            upstream,
            root: tempfile::tempdir().unwrap(),
            port,
            site_url: format!("http://127.0.0.1:{port}"),
        }
    }

    fn dir(&self, name: &str) -> std::path::PathBuf {
        let dir = self.root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The site: `top` at the file's top, `site` more keys of `[site]`.
    fn site(&self, top: &str, site: &str) -> Sidecar {
        let config = format!(
            "{top}\n[site]\nlisten = [\"127.0.0.1:{}\"]\n{site}\n[[upstream]]\nname = \"org\"\nurl = \"{}\"\n",
            self.port, self.upstream.url
        );
        Sidecar::start(&self.dir("site"), &config, &[])
    }

    /// A machine named `name`: a sidecar whose identity is a token file minted for `sub`,
    /// asking the site first.
    fn machine(&self, name: &str, sub: &str) -> Sidecar {
        self.machine_with(name, sub, &format!("site = \"{}\"", self.site_url), QUIET)
    }

    /// [`Fleet::machine`] with `site_lines` for the upstream's site keys and `top` at the
    /// file's top.
    fn machine_with(&self, name: &str, sub: &str, site_lines: &str, top: &str) -> Sidecar {
        let dir = self.dir(name);
        let token = dir.join("token");
        std::fs::write(&token, self.issuer.mint(sub, AUD, 3600, false)).unwrap();
        let config = format!(
            "{top}\ntrusted-public-keys = [\"{}\"]\n\
             [[upstream]]\nname = \"org\"\nurl = \"{}\"\nidentity = \"id\"\n{site_lines}\n\
             [identity.id]\nprovider = \"file\"\npath = \"{}\"\n",
            fixture().public_key,
            self.upstream.url,
            token.display()
        );
        Sidecar::start(&dir, &config, &[])
    }

    fn store(&self, name: &str) -> std::path::PathBuf {
        self.root.path().join(format!("{name}-store"))
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_pulls_through_the_site_once_each_view_its_own_and_the_site_may_go_away() {
    let fx = fixture();
    let fleet = Fleet::start(&["alice", "bob", "dave"]).await;
    let (issuer, upstream, site_url) = (&fleet.issuer, &fleet.upstream, &fleet.site_url);
    let mut site = fleet.site("", "");
    let n = fx.closure.len();

    // The first machine: every NAR crosses once, through the site.
    let alice = fleet.machine("alice", "alice");
    nix_pulls_into(&alice, fleet.store("alice")).await;
    assert_eq!(upstream.count("/nar/"), n, "{:?}", upstream.requests());
    let narinfos_after_alice = upstream.count(".narinfo");

    // The second: the upstream is asked each narinfo with bob's own token (his view), and
    // not one NAR byte.
    let bob = fleet.machine("bob", "bob");
    nix_pulls_with(current(), &bob, fleet.store("bob")).await;
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
    let bob_token = std::fs::read_to_string(fleet.dir("bob").join("token")).unwrap();
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
    assert!(
        site_metrics.contains("nix_sidecar_site_upstream_bytes_total{subject=\"alice\"}"),
        "the NAR bytes fetched with alice's token: {site_metrics}"
    );
    assert!(site_metrics.contains(&cached), "{site_metrics}");
    let bob_metrics = metrics(bob.url.clone()).await;
    assert!(
        bob_metrics.contains("nix_sidecar_site_route_total{upstream=\"org\",outcome=\"answered\"}"),
        "{bob_metrics}"
    );

    // Carol's view excludes the closure: nothing, though others pulled it.
    let carol = fleet.machine("carol", "carol");
    assert_eq!(carol.narinfo(&fx.top).await.status, 404);
    let carol_token = std::fs::read_to_string(fleet.dir("carol").join("token")).unwrap();
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
    let dave = fleet.machine("dave", "dave");
    nix_pulls_into(&dave, fleet.store("dave")).await;
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
    let eve = fleet.machine("eve", "alice");
    nix_pulls_with(current(), &eve, fleet.store("eve")).await;
    assert_eq!(upstream.count("/nar/"), before, "{}", site.logs());
    drop((alice, bob, carol, dave, eve));
}

/// A site on TLS, trusted through `site-ca-file`; a path taken out of a view upstream is
/// refused through the site once `narinfo-ttl` has passed, though the site holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_site_and_a_revocation_that_reaches_the_machine_within_narinfo_ttl() {
    let fx = fixture();
    let fleet = Fleet::start(&["alice"]).await;
    let upstream = &fleet.upstream;
    let site_dir = fleet.dir("site");
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (site_dir.join("site.pem"), site_dir.join("site.key"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.key_pair.serialize_pem()).unwrap();
    let tls = format!(
        "tls-cert = \"{}\"\ntls-key = \"{}\"\nallow-from = [\"127.0.0.0/8\"]",
        cert.display(),
        key.display()
    );
    let site = fleet.site("narinfo-ttl = \"1s\"", &tls);
    let site_lines = format!(
        "site = \"https://127.0.0.1:{}\"\nsite-ca-file = \"{}\"",
        fleet.port,
        cert.display()
    );
    let ttl = format!("narinfo-ttl = \"1s\"\n{QUIET}");
    let alice = fleet.machine_with("alice", "alice", &site_lines, &ttl);
    nix_pulls_into(&alice, fleet.store("alice")).await;
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
    let fleet = Fleet::start(&["alice", "bob"]).await;
    let (issuer, upstream, site_url) = (&fleet.issuer, &fleet.upstream, &fleet.site_url);
    let _site = fleet.site("", "");
    let alice = fleet.machine("alice", "alice");
    nix_pulls_into(&alice, fleet.store("alice")).await;

    // Bob asks for the root alone (lookahead off: only the hints can bring the rest). Checked
    // with the upstream's narinfos down.
    let bob = fleet.machine("bob", "bob");
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

/// The site under load as a site's machines bring it: 8 machines (each its own token) x 25
/// connections asking narinfos then NARs of 40 paths for a few seconds, one machine outside
/// every view, 4 paths in no view, and a cache a third of the closure's size (fills and
/// evictions all the time). Every NAR answered 200 is the upstream's bytes; nothing outside a
/// view is ever answered; the site's books equal its files and never exceed its limit; its
/// memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_machines_by_25_connections_keep_the_sites_books_and_views_exact() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use support::upstream::hash_part;

    let fx = support::nix::build_many(40, 30_000, "xz");
    let issuer = Issuer::start().await;
    let upstream = UpstreamDouble::start(fx.cache.clone(), Some((&issuer.url, AUD))).await;
    let machines: Vec<String> = (0..8).map(|m| format!("machine-{m}")).collect();
    for sub in &machines[..7] {
        upstream.grant(sub, &fx.closure[..36]);
    }
    let closure_bytes = support::dir_bytes(&fx.cache.join("nar"));
    let root = tempfile::tempdir().unwrap();
    let port = support::reserved_port();
    let limit = closure_bytes / 3;
    let site = Sidecar::start(
        root.path(),
        &format!(
            "max-cache-size = \"{limit}\"\n[site]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[upstream]]\nname = \"org\"\nurl = \"{}\"\n",
            upstream.url
        ),
        &[("NIX_SIDECAR_LOG", "info")],
    );
    let site_url = format!("http://127.0.0.1:{port}");
    let expected: Arc<std::collections::BTreeMap<String, Vec<u8>>> = Arc::new(
        std::fs::read_dir(fx.cache.join("nar"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let key = format!("nar/{}", e.file_name().to_string_lossy());
                (key, std::fs::read(e.path()).unwrap())
            })
            .collect(),
    );
    let granted: Arc<std::collections::HashSet<String>> = Arc::new(
        fx.closure[..36]
            .iter()
            .map(|p| hash_part(p).to_string())
            .collect(),
    );
    let (served, corrupt, leaked) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let peak_dir = Arc::new(AtomicU64::new(0));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(6);
    let mut tasks = tokio::task::JoinSet::new();
    {
        let (peak_dir, cache) = (peak_dir.clone(), site.cache_dir());
        tasks.spawn(async move {
            while std::time::Instant::now() < deadline {
                peak_dir.fetch_max(support::cache_bytes(&cache), Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        });
    }
    for (m, sub) in machines.iter().enumerate() {
        let bearer = format!("Bearer {}", issuer.mint(sub, AUD, 3600, false));
        let inside = m < 7;
        for c in 0..25u64 {
            let (url, closure, bearer) = (site_url.clone(), fx.closure.clone(), bearer.clone());
            let cache = fx.cache.clone();
            let (expected, granted) = (expected.clone(), granted.clone());
            let (served, corrupt, leaked) = (served.clone(), corrupt.clone(), leaked.clone());
            tasks.spawn(async move {
                let mut rng = fastrand::Rng::with_seed(m as u64 * 100 + c);
                let auth = [("authorization", bearer.as_str())];
                while std::time::Instant::now() < deadline {
                    let path = &closure[rng.usize(..closure.len())];
                    let may = inside && granted.contains(hash_part(path));
                    let info =
                        get(&format!("{url}/{}.narinfo", hash_part(path)), "GET", &auth).await;
                    if info.status == 200 && !may {
                        leaked.fetch_add(1, Ordering::Relaxed);
                    }
                    let Ok(body) = &info.body else { continue };
                    let text = String::from_utf8_lossy(body);
                    let nar = match text.lines().find_map(|l| l.strip_prefix("URL: ")) {
                        Some(nar) => nar.to_string(),
                        // Refused: ask its NAR anyway, by the name another machine got.
                        None => {
                            let named = cache.join(format!("{}.narinfo", hash_part(path)));
                            let named = std::fs::read_to_string(named).unwrap_or_default();
                            match named.lines().find_map(|l| l.strip_prefix("URL: ")) {
                                Some(nar) => nar.to_string(),
                                None => continue,
                            }
                        }
                    };
                    let got = get(&format!("{url}/{nar}"), "GET", &auth).await;
                    if let (Ok(bytes), 200) = (&got.body, got.status.as_u16()) {
                        let counter = if !may {
                            &leaked
                        } else if Some(&bytes.to_vec()) != expected.get(&nar) {
                            &corrupt
                        } else {
                            &served
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    }
    while tasks.join_next().await.is_some() {}
    let (served, corrupt, leaked) = (
        served.load(Ordering::Relaxed),
        corrupt.load(Ordering::Relaxed),
        leaked.load(Ordering::Relaxed),
    );
    assert!(
        served > 100,
        "too little got through to mean anything: {served}\n{}",
        site.logs()
    );
    assert_eq!(corrupt, 0, "corrupt NARs served");
    assert_eq!(leaked, 0, "answers outside a view");
    let peak = peak_dir.load(Ordering::Relaxed);
    assert!(
        peak <= limit,
        "the cache directory held {peak} bytes, over {limit}"
    );
    // Once quiet, the books equal the files.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let metrics = get(&format!("{}/_sidecar/metrics", site.url), "GET", &[]).await;
    let metrics = String::from_utf8_lossy(&metrics.body.unwrap()).into_owned();
    let books: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("nix_sidecar_cache_size_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let files = support::dir_bytes(&site.cache_dir().join("nars"));
    assert_eq!(books, files, "the site's books against its files");
    let rss_mib = support::rss_kib(site.pid()) / 1024;
    assert!(rss_mib < 100, "site RSS {rss_mib} MiB after the load");
    eprintln!("site load: {served} NARs served whole, peak dir {peak} of {limit} bytes, books {books} = files, RSS {rss_mib} MiB");
}

/// The site killed while a pull is under way (NAR requests waiting at the site for a slow
/// upstream): the machine goes straight to the upstream and Nix's substitution succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_site_killed_in_the_middle_of_a_pull_fails_no_substitution() {
    for client in Client::all() {
        site_killed_mid_pull(client).await;
    }
}

async fn site_killed_mid_pull(client: Client) {
    let fleet = Fleet::start(&["alice"]).await;
    let mut site = fleet.site("", "");
    let alice = fleet.machine("alice", "alice");
    fleet.upstream.fault(
        Target::Nar,
        Fault::Delay(std::time::Duration::from_millis(800)),
        None,
    );
    let store = fleet.store("alice");
    let pull = nix_pulls_with(client, &alice, store);
    // Killed once a NAR is being fetched through it: the site has answered the machine's
    // request (its headers are out) and waits for the upstream, so the body breaks off.
    let kill = async {
        for _ in 0..400 {
            if fleet.upstream.count("/nar/") > 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        site.kill();
    };
    tokio::join!(pull, kill);
    assert!(
        alice.logs().contains("asking the upstream for the rest"),
        "{client:?}: the kill did not land mid-body:\n{}",
        alice.logs()
    );
    let got = get(&format!("{}/_sidecar/metrics", alice.url), "GET", &[]).await;
    let metrics = String::from_utf8_lossy(&got.body.unwrap()).into_owned();
    assert!(metrics.contains("outcome=\"passed_over\""), "{metrics}");
}
