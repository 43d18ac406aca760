//! Racing upstreams, narinfo lookahead and NAR prefetch, against upstream doubles that count
//! and time what they are asked.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::http::{get, respond, serve};
use support::sidecar::Sidecar;
use support::upstream::UpstreamDouble;

/// A well-formed NarHash; nothing here downloads the NAR it describes.
const NAR_HASH: &str = "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";

/// The store path hash of synthetic node `i`.
fn node(i: usize) -> String {
    support::upstream::synthetic_hash(i)
}

fn narinfo(hash: &str, nar: &str, references: &[String]) -> String {
    let refs: Vec<String> = references.iter().map(|h| format!("{h}-node")).collect();
    format!(
        "StorePath: /nix/store/{hash}-node\nURL: nar/{nar}.nar\nCompression: none\nNarHash: {NAR_HASH}\nNarSize: 1\nReferences: {}\n",
        refs.join(" ")
    )
}

/// A synthetic cache: node `i` references `graph(i)`; every narinfo request is recorded
/// with when it came, and answered after `delay`, or 404 for hashes in `missing`.
struct Synthetic {
    addr: SocketAddr,
    asked: Arc<Mutex<Vec<(String, Instant)>>>,
}

impl Synthetic {
    async fn start(
        nodes: usize,
        graph: fn(usize) -> Vec<usize>,
        nar: &'static str,
        delay: Duration,
        missing: Vec<String>,
    ) -> Synthetic {
        let by_hash: Arc<HashMap<String, usize>> =
            Arc::new((0..nodes).map(|i| (node(i), i)).collect());
        let asked = Arc::new(Mutex::new(Vec::new()));
        let (log, missing) = (asked.clone(), Arc::new(missing));
        let addr = serve(move |req| {
            let (by_hash, log, missing) = (by_hash.clone(), log.clone(), missing.clone());
            async move {
                let path = req.uri().path().to_string();
                let Some(hash) = path
                    .strip_prefix('/')
                    .and_then(|p| p.strip_suffix(".narinfo"))
                else {
                    return respond(404, "");
                };
                log.lock().unwrap().push((hash.to_string(), Instant::now()));
                tokio::time::sleep(delay).await;
                match by_hash.get(hash) {
                    Some(&i) if !missing.iter().any(|m| m == hash) => {
                        let refs: Vec<String> = graph(i).into_iter().map(node).collect();
                        respond(200, narinfo(hash, nar, &refs))
                    }
                    _ => respond(404, ""),
                }
            }
        })
        .await;
        Synthetic { addr, asked }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn times_asked(&self, hash: &str) -> usize {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .filter(|(h, _)| h == hash)
            .count()
    }

    fn total(&self) -> usize {
        self.asked.lock().unwrap().len()
    }

    fn first_asked(&self, hash: &str) -> Option<Instant> {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .find(|(h, _)| h == hash)
            .map(|(_, at)| *at)
    }

    /// Waits until nothing new has been asked for half a second.
    async fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = self.total();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = self.total();
            if now == last || Instant::now() > deadline {
                return;
            }
            last = now;
        }
    }
}

fn no_references(_: usize) -> Vec<usize> {
    vec![]
}

fn binary_tree(i: usize) -> Vec<usize> {
    [2 * i + 1, 2 * i + 2]
        .into_iter()
        .filter(|&c| c < 2000)
        .collect()
}

fn fan(i: usize) -> Vec<usize> {
    if i == 0 {
        (1..2000).collect()
    } else {
        vec![]
    }
}

fn two_upstreams(
    dir: &std::path::Path,
    first: &Synthetic,
    second: &Synthetic,
    lookahead: bool,
) -> Sidecar {
    Sidecar::start(
        dir,
        &format!(
            "narinfo-lookahead = {lookahead}\n[[upstream]]\nname = \"first\"\nurl = \"{}\"\n[[upstream]]\nname = \"second\"\nurl = \"{}\"\n",
            first.url(),
            second.url()
        ),
        &[],
    )
}

async fn ask(sidecar: &Sidecar, hash: &str) -> (u16, String) {
    let got = get(&format!("{}/{hash}.narinfo", sidecar.url), "GET", &[]).await;
    (got.status.as_u16(), got.text())
}

/// A miss asks every upstream at once, so two slow upstreams cost one round trip, not two;
/// and when both have the path, the first in order wins even if the second answers first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_are_asked_at_once_and_the_first_in_order_wins() {
    let rtt = Duration::from_millis(600);
    let h = node(7);
    let slow_miss = Synthetic::start(10, no_references, "first", rtt, vec![h.clone()]).await;
    let slow_hit = Synthetic::start(10, no_references, "second", rtt, vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = two_upstreams(dir.path(), &slow_miss, &slow_hit, false);
    let started = Instant::now();
    let (status, text) = ask(&sidecar, &h).await;
    let took = started.elapsed();
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("URL: nar/second.nar"), "{text}");
    // The second upstream was asked before the first had answered.
    let first_at = slow_miss.first_asked(&h).unwrap();
    let second_at = slow_hit.first_asked(&h).unwrap();
    assert!(
        second_at < first_at + rtt,
        "asked one after the other: {:?} apart",
        second_at.saturating_duration_since(first_at)
    );
    eprintln!("two upstreams of {rtt:?} each, the first missing: answered in {took:?}");

    // Both have it; the second answers at once, the first after its round trip: the first's.
    let both = node(3);
    let dir = tempfile::tempdir().unwrap();
    let fast = Synthetic::start(10, no_references, "second", Duration::ZERO, vec![]).await;
    let sidecar = two_upstreams(dir.path(), &slow_miss, &fast, false);
    let (status, text) = ask(&sidecar, &both).await;
    assert_eq!(status, 200);
    assert!(
        text.contains("URL: nar/first.nar"),
        "the first upstream wins: {text}"
    );
    assert_eq!(fast.times_asked(&both), 1, "asked at once all the same");
}

/// After Nix asks for a narinfo fetched upstream, its references (and theirs, a few levels
/// down) are fetched in the background and then answered from the cache; one already cached is
/// never fetched again; with `narinfo-lookahead = false` nothing is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_are_looked_up_ahead_and_answered_from_the_cache() {
    let up = Synthetic::start(2000, binary_tree, "tree", Duration::from_millis(20), vec![]).await;
    let none = Synthetic::start(0, no_references, "none", Duration::ZERO, vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = two_upstreams(dir.path(), &up, &none, true);
    // Node 2 is cached before its parent is asked for.
    assert_eq!(ask(&sidecar, &node(2)).await.0, 200);
    up.settle().await;
    let after_node_2 = up.total();
    assert_eq!(ask(&sidecar, &node(0)).await.0, 200);
    up.settle().await;
    assert_eq!(up.times_asked(&node(0)), 1);
    assert_eq!(
        up.times_asked(&node(2)),
        1,
        "a cached reference is not fetched again"
    );
    assert!(
        up.times_asked(&node(1)) == 1 && up.times_asked(&node(3)) == 1,
        "looked ahead"
    );
    let looked_ahead = up.total() - after_node_2;
    // Node 0, then node 1's subtree three levels down (1 + 2 + 4 + 8 = 15 at most).
    assert!(looked_ahead <= 16, "{looked_ahead} fetched");
    // Nix's next level comes from the cache: the upstream is not asked again.
    let before = up.total();
    for i in [1, 3, 4] {
        assert_eq!(ask(&sidecar, &node(i)).await.0, 200);
    }
    assert_eq!(up.total(), before, "answered from the cache");

    let quiet = Synthetic::start(2000, binary_tree, "tree", Duration::ZERO, vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = two_upstreams(dir.path(), &quiet, &none, false);
    assert_eq!(ask(&sidecar, &node(0)).await.0, 200);
    quiet.settle().await;
    assert_eq!(quiet.total(), 1, "lookahead off");
}

/// A root with 1,999 references: the lookahead stays within its queue, and Nix's own
/// requests for the rest are answered as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookahead_stays_within_its_budget_on_a_2000_path_closure() {
    let up = Synthetic::start(2000, fan, "fan", Duration::from_millis(5), vec![]).await;
    let none = Synthetic::start(0, no_references, "none", Duration::ZERO, vec![]).await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = two_upstreams(dir.path(), &up, &none, true);
    assert_eq!(ask(&sidecar, &node(0)).await.0, 200);
    up.settle().await;
    let fetched = up.total() - 1;
    assert!(
        (1..=1024).contains(&fetched),
        "{fetched} references looked up ahead (budget 1024)"
    );
    assert_eq!(ask(&sidecar, &node(1999)).await.0, 200);
    let distinct: std::collections::HashSet<String> = up
        .asked
        .lock()
        .unwrap()
        .iter()
        .map(|(h, _)| h.clone())
        .collect();
    assert_eq!(distinct.len(), up.total(), "nothing was fetched twice");
}

/// `prefetch-nars = true`: serving the narinfo starts the NAR's download, and the NAR is then
/// served from the cache without another upstream request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_nars_starts_the_download_when_the_narinfo_is_served() {
    let fx = support::nix::fixture();
    let upstream = support::upstream::UpstreamDouble::start(fx.cache.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(
        dir.path(),
        &format!(
            "narinfo-lookahead = false\n[[upstream]]\nname = \"u\"\nurl = \"{}\"\nprefetch-nars = true\n",
            upstream.url
        ),
        &[],
    );
    let narinfo = sidecar.narinfo(&fx.top).await;
    assert_eq!(narinfo.status, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    while upstream.count("nar/") == 0 {
        assert!(Instant::now() < deadline, "no NAR download started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = narinfo
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("URL: ").map(str::to_string))
        .unwrap();
    let nar = get(&format!("{}/{url}", sidecar.url), "GET", &[]).await;
    assert_eq!(nar.status, 200);
    assert_eq!(upstream.count("nar/"), 1, "the NAR came from the prefetch");
}

/// The NAR URL of a narinfo answer.
fn nar_url(narinfo: &support::http::Got) -> String {
    narinfo
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("URL: ").map(str::to_string))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn once_nix_downloads_a_nar_the_nars_of_the_narinfos_it_asked_for_follow() {
    let fx = support::nix::fixture();
    for nar_lookahead in [true, false] {
        let upstream = support::upstream::UpstreamDouble::start(fx.cache.clone(), None).await;
        let dir = tempfile::tempdir().unwrap();
        let sidecar = Sidecar::start(
            dir.path(),
            &format!(
                "narinfo-lookahead = false\nnar-lookahead = {nar_lookahead}\n[[upstream]]\nname = \"u\"\nurl = \"{}\"\n",
                upstream.url
            ),
            &[],
        );
        // A walk of narinfos alone (what `nix path-info -r` or a dry run does) fetches no NAR.
        let mut urls = Vec::new();
        for path in &fx.closure {
            let narinfo = sidecar.narinfo(path).await;
            assert_eq!(narinfo.status, 200);
            urls.push(nar_url(&narinfo));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(upstream.count("nar/"), 0, "narinfos alone fetch no NAR");
        // Nix starts substituting: the first NAR it asks for brings the others along.
        let first = get(&format!("{}/{}", sidecar.url, urls[0]), "GET", &[]).await;
        assert_eq!(first.status, 200);
        let deadline = Instant::now() + Duration::from_secs(10);
        if nar_lookahead {
            while upstream.count("nar/") < urls.len() {
                assert!(
                    Instant::now() < deadline,
                    "the other NARs were not fetched ahead"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Nix's own requests for them are answered from the cache: no second download.
            for url in &urls[1..] {
                let nar = get(&format!("{}/{url}", sidecar.url), "GET", &[]).await;
                assert_eq!(nar.status, 200);
            }
            assert_eq!(
                upstream.count("nar/"),
                urls.len(),
                "each NAR downloaded once"
            );
        } else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(
                upstream.count("nar/"),
                1,
                "nar-lookahead = false fetches only what is asked"
            );
        }
    }
}

/// The second review's amplification: 300 narinfo requests, then a NAR that no narinfo named
/// (or one that does): the daemon fetches what the client asks for and a bounded few more,
/// never the 300.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nar_request_brings_along_a_bounded_few_of_the_askers_own_narinfos() {
    let nar_requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = nar_requests.clone();
    let addr = serve(move |req| {
        let counted = counted.clone();
        async move {
            let path = req.uri().path().to_string();
            if path.starts_with("/nar/") {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                return respond(200, "x");
            }
            match path
                .strip_prefix('/')
                .and_then(|p| p.strip_suffix(".narinfo"))
            {
                Some(hash) => respond(200, narinfo(hash, hash, &[])),
                None => respond(404, ""),
            }
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(
        dir.path(),
        &format!(
            "narinfo-lookahead = false\n[[upstream]]\nname = \"u\"\nurl = \"http://{addr}\"\n"
        ),
        &[],
    );
    let hashes: Vec<String> = (0..300).map(node).collect();
    for hash in &hashes {
        assert_eq!(ask(&sidecar, hash).await.0, 200);
    }
    let count = || nar_requests.load(std::sync::atomic::Ordering::SeqCst);
    // A NAR no narinfo named: forwarded, and nothing else follows.
    let _ = get(
        &format!("{}/nar/{}.nar", sidecar.url, "z".repeat(52)),
        "GET",
        &[],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(), 1, "only the NAR asked for");
    // One of this client's NARs: it and a bounded few of the others.
    let _ = get(
        &format!("{}/nar/{}.nar", sidecar.url, hashes[0]),
        "GET",
        &[],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after = count();
    assert!(
        (2..=2 + 64).contains(&after),
        "{after} NAR requests upstream after asking for one"
    );
}

/// A re-deploy of a known closure gone stale: asking for its root alone has every stale
/// narinfo of it asked again at once, far below what level-by-level lookahead reaches (three
/// levels) before Nix asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_known_closure_is_revalidated_at_once_from_its_root() {
    let fx = support::nix::build_chain(12);
    let upstream = UpstreamDouble::start(fx.cache.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(
        dir.path(),
        &format!(
            "narinfo-ttl = \"1s\"\nnar-lookahead = false\ntrusted-public-keys = [\"{}\"]\n\
             [[upstream]]\nname = \"u\"\nurl = \"{}\"\n",
            fx.public_key, upstream.url
        ),
        &[],
    );
    for path in &fx.closure {
        assert_eq!(sidecar.narinfo(path).await.status, 200);
    }
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let before = upstream.count(".narinfo");
    assert_eq!(sidecar.narinfo(&fx.top).await.status, 200);
    let mut asked = 0;
    for _ in 0..200 {
        asked = upstream.count(".narinfo") - before;
        if asked >= fx.closure.len() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(
        asked,
        fx.closure.len(),
        "the whole 12-deep closure, not 1 + 3 levels:\n{}",
        sidecar.logs()
    );
}
