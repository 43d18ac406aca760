//! Push (SPEC.md "Push", docs/push.md): real Nix copies to the sidecar, `nix-sidecar push`
//! reads the local store, and the Attic-like double checks every byte it is sent.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use support::attic::{self, Attic};
use support::http::get;
use support::nix::{build_fan, fixture, in_store, nix, substitute, Client};
use support::sidecar::Sidecar;
use support::upstream::hash_part;

const CACHE: &str = "org-ci";

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

fn write_token(dir: &Path, name: &str, token: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, token).unwrap();
    path.display().to_string()
}

/// A sidecar whose upstream `org` is the double's cache `cache`, read and pushed with the
/// token in `token_file`; `extra` goes into the `[[upstream]]` table.
fn sidecar(dir: &Path, attic: &Attic, url: &str, token_file: &str, extra: &str) -> Sidecar {
    sidecar_beside(Client::Nix28, dir, attic, url, token_file, extra)
}

/// `sidecar`, run beside `client` (sharing its Nix store).
fn sidecar_beside(
    client: Client,
    dir: &Path,
    attic: &Attic,
    url: &str,
    token_file: &str,
    extra: &str,
) -> Sidecar {
    std::fs::create_dir_all(dir).unwrap();
    // A builder signs what it pushes unsigned (so that it serves its own builds locally).
    let signing = if extra.contains("push =") {
        format!(
            "push-signing-key-file = \"{}\"\n",
            signing_key(dir).0.display()
        )
    } else {
        String::new()
    };
    let config = format!(
        "{signing}trusted-public-keys = [\"{}\"]\n[[upstream]]\nname = \"org\"\nurl = \"{url}\"\nidentity = \"ci\"\n{extra}\n[identity.ci]\nprovider = \"file\"\npath = \"{token_file}\"\n",
        attic.public_key()
    );
    Sidecar::start_beside(client, dir, &config)
}

/// A fresh Nix signing key in `dir`: (secret key file, public key).
fn signing_key(dir: &Path) -> (std::path::PathBuf, String) {
    signing_key_named(dir, &format!("builder-{}-1", fastrand_name(dir)))
}

/// A fresh Nix signing key called `name` in `dir`: (secret key file, public key).
fn signing_key_named(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
    let (sk, pk) = (dir.join("push.sk"), dir.join("push.pk"));
    let made = nix(
        &[
            "nix-store",
            "--generate-binary-cache-key",
            name,
            sk.to_str().unwrap(),
            pk.to_str().unwrap(),
        ],
        dir,
    );
    assert!(made.status.success(), "{}", text(&made));
    (sk.clone(), std::fs::read_to_string(pk).unwrap())
}

/// A name from the (temporary) directory's path.
fn fastrand_name(dir: &Path) -> String {
    dir.to_string_lossy()
        .bytes()
        .filter(u8::is_ascii_alphanumeric)
        .map(char::from)
        .collect()
}

/// An Attic-like double and a builder sidecar whose upstream `org` is the double at `path`
/// (`/org-ci`: the Attic cache), read and pushed with `token`; `push` holds the upstream's
/// push keys, where `{double}` stands for the double's URL and `{uid}` for ours.
struct Setup {
    attic: Attic,
    dir: tempfile::TempDir,
    builder: Sidecar,
    token_file: String,
}

async fn setup(path: &str, token: &str, push: &str) -> Setup {
    let attic = Attic::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = write_token(dir.path(), "push.jwt", token);
    let url = format!("{}{path}", attic.url);
    let push = push
        .replace("{double}", &attic.url)
        .replace("{uid}", &euid().to_string());
    let builder = sidecar(
        &dir.path().join("builder"),
        &attic,
        &url,
        &token_file,
        &push,
    );
    Setup {
        attic,
        dir,
        builder,
        token_file,
    }
}

const ATTIC_PUSH: &str = "push = \"attic\"\npush-uids = [{uid}]";

fn rw_token() -> String {
    attic::token("ci", &[(CACHE, "rw")], 3600)
}

/// `nix-sidecar push --url <sidecar> ARGS`.
fn push_cli(sidecar: &Sidecar, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
        .args(["push", "--url", &sidecar.url])
        .args(args)
        .env_remove("OUT_PATHS")
        .output()
        .unwrap()
}

fn nix_copy_to(sidecar: &Sidecar, query: &str, paths: &[&str], home: &Path) -> Output {
    let to = format!("{}?{query}", sidecar.url);
    let mut args = vec!["nix", "copy", "--to", to.as_str()];
    args.extend_from_slice(paths);
    nix(&args, home)
}

/// Asserts that a command succeeded, showing its output and the daemon's log if not.
fn assert_ok(output: &Output, sidecar: &Sidecar) {
    assert!(
        output.status.success(),
        "{}\n{}",
        text(output),
        sidecar.logs()
    );
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn nix_copy_to_the_sidecar_then_a_pull_only_sidecar_substitutes_it_from_attic() {
    let fx = fixture();
    let s = setup("/org-ci", &rw_token(), ATTIC_PUSH).await;
    let (attic, dir, builder) = (&s.attic, s.dir.path(), &s.builder);
    let pull_token = write_token(
        dir,
        "pull.jwt",
        &attic::token("fleet", &[("org-*", "r")], 3600),
    );
    let url = format!("{}/{CACHE}", attic.url);

    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let copied = nix_copy_to(builder, "compression=xz", &[&fx.top], &home);
    assert_ok(&copied, builder);
    // The copy returned once the paths were queued; the uploads may still be running.
    let waited = push_cli(builder, &["--wait"]);
    assert_ok(&waited, builder);
    for path in &fx.closure {
        assert_eq!(attic.accepted(hash_part(path)), 1, "{path} uploaded once");
        assert!(attic.holds(CACHE, hash_part(path)));
    }
    assert!(attic.record.lock().unwrap().rejected.is_empty());

    // The builder's own pulls are local now: no narinfo or NAR request goes upstream.
    let before = attic.count("GET", ".narinfo") + attic.count("GET", "/nar/");
    let info = builder.narinfo(&fx.top).await;
    assert_eq!(info.status, 200);
    let nar_url = info
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("URL: ").map(str::to_string))
        .unwrap();
    let nar = get(&format!("{}/{nar_url}", builder.url), "GET", &[]).await;
    assert_eq!(nar.status, 200);
    assert_eq!(
        attic.count("GET", ".narinfo") + attic.count("GET", "/nar/"),
        before
    );

    // A fleet machine with a pull-only token substitutes the closure from the double.
    let fleet = sidecar(&dir.join("fleet"), attic, &url, &pull_token, "");
    let client = dir.join("client");
    let (fleet_url, key, top, d) = (
        fleet.url.clone(),
        attic.public_key(),
        fx.top.clone(),
        client.clone(),
    );
    let out = tokio::task::spawn_blocking(move || substitute(&fleet_url, &key, &[&top], &d))
        .await
        .unwrap();
    assert_ok(&out, &fleet);
    for path in &fx.closure {
        assert!(in_store(&client, path));
        let copy = client.join("dst-store").join(path.trim_start_matches('/'));
        let diff = Command::new("diff")
            .arg("-r")
            .arg(path)
            .arg(&copy)
            .output()
            .unwrap();
        assert!(diff.status.success(), "{path} differs: {}", text(&diff));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_uploads_are_refused_with_a_reason_by_the_sidecar_and_by_the_double() {
    let fx = fixture();
    let token = rw_token();
    let s = setup("/org-ci", &token, ATTIC_PUSH).await;
    let (attic, builder) = (&s.attic, &s.builder);

    // A narinfo whose NAR never came.
    let a = &fx.closure.iter().find(|p| p.ends_with("-a")).unwrap();
    let (hash, narinfo) = cached_narinfo(&fx.cache, a);
    let answer = put(
        &format!("{}/{hash}.narinfo", builder.url),
        narinfo.clone().into_bytes(),
    )
    .await;
    assert_eq!(answer.0, 400);
    assert!(
        answer.1.contains("was not uploaded before its narinfo"),
        "{}",
        answer.1
    );

    // A NAR, then a narinfo that promises other bytes.
    let nar_url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap()
        .to_string();
    let bytes = std::fs::read(fx.cache.join(&nar_url)).unwrap();
    assert_eq!(
        put_status(&format!("{}/{nar_url}", builder.url), bytes.clone()).await,
        200
    );
    let lying = narinfo.replace("NarSize: ", "NarSize: 1");
    let answer = put(
        &format!("{}/{hash}.narinfo", builder.url),
        lying.into_bytes(),
    )
    .await;
    assert_eq!(answer.0, 400);
    assert!(
        answer.1.contains("does not match this narinfo"),
        "{}",
        answer.1
    );
    // A narinfo for another path than the one it is put under.
    let answer = put(
        &format!("{}/{}.narinfo", builder.url, "0".repeat(32)),
        narinfo.clone().into_bytes(),
    )
    .await;
    assert_eq!(answer.0, 400, "{}", answer.1);
    // The real thing is taken.
    assert_eq!(
        put_status(&format!("{}/{nar_url}", builder.url), bytes).await,
        200
    );
    assert_eq!(
        put_status(
            &format!("{}/{hash}.narinfo", builder.url),
            narinfo.clone().into_bytes()
        )
        .await,
        200
    );
    let waited = push_cli(builder, &["--wait"]);
    assert!(waited.status.success(), "{}", text(&waited));
    assert_eq!(attic.accepted(&hash), 1);
    // Uploaded, the staged file is gone; the NAR is in the local cache, so HEAD says it is
    // there and a narinfo put without it is taken from the cache (and not uploaded twice).
    let head = get(&format!("{}/{nar_url}", builder.url), "HEAD", &[]).await;
    assert_eq!(head.status, 200);
    let again = put(
        &format!("{}/{hash}.narinfo", builder.url),
        narinfo.into_bytes(),
    )
    .await;
    assert_eq!(again.0, 200, "{}", again.1);
    let waited = push_cli(builder, &["--wait"]);
    assert!(waited.status.success(), "{}", text(&waited));
    assert_eq!(attic.accepted(&hash), 1, "already there: not sent again");

    // The double: a NAR that does not match nar_hash, a short one, and a token without
    // push permission are all refused; nothing of them is kept.
    let info = serde_json::json!({
        "cache": CACHE, "store_path_hash": "1".repeat(32),
        "store_path": format!("/nix/store/{}-x", "1".repeat(32)), "references": [],
        "system": null, "deriver": null, "sigs": [], "ca": null,
        "nar_hash": format!("sha256:{}", "ab".repeat(32)), "nar_size": 5,
    });
    let upload = |token: String, body: &'static [u8], info: String| {
        let url = format!("{}/_api/v1/upload-path", attic.url);
        async move {
            raw_put(
                &url,
                body.to_vec(),
                &[
                    ("authorization", format!("Bearer {token}")),
                    ("x-attic-nar-info", info),
                ],
            )
            .await
            .0
        }
    };
    assert_eq!(upload(token.clone(), b"hello", info.to_string()).await, 400);
    assert_eq!(upload(token.clone(), b"hell", info.to_string()).await, 400);
    let reader = attic::token("fleet", &[(CACHE, "r")], 3600);
    assert_eq!(upload(reader, b"hello", info.to_string()).await, 403);
    assert_eq!(
        upload("not-a-jwt".into(), b"hello", info.to_string()).await,
        401
    );
    assert!(!attic.holds(CACHE, &"1".repeat(32)));
    assert_eq!(attic.record.lock().unwrap().rejected.len(), 2);
}

/// The narinfo of `path` in a binary cache directory written by Nix.
fn cached_narinfo(cache: &Path, path: &str) -> (String, String) {
    let hash = hash_part(path).to_string();
    let text = std::fs::read_to_string(cache.join(format!("{hash}.narinfo"))).unwrap();
    (hash, text)
}

async fn raw_put(url: &str, body: Vec<u8>, headers: &[(&str, String)]) -> (u16, String) {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let mut request = http::Request::put(url);
    for (k, v) in headers {
        request = request.header(*k, v.as_str());
    }
    let response = client
        .request(request.body(Full::new(bytes::Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn put(url: &str, body: Vec<u8>) -> (u16, String) {
    raw_put(url, body, &[]).await
}

async fn put_status(url: &str, body: Vec<u8>) -> u16 {
    put(url, body).await.0
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_with_eighty_paths_queued_loses_nothing_and_uploads_each_once() {
    let Setup {
        attic,
        dir,
        mut builder,
        ..
    } = setup("/org-ci", &rw_token(), ATTIC_PUSH).await;
    *attic.upload_pause.lock().unwrap() = Duration::from_millis(15);
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let (root, leaves) = tokio::task::spawn_blocking(move || build_fan(80, 60_000, &home))
        .await
        .unwrap();

    let queued = push_cli(&builder, &[&root]);
    assert_ok(&queued, &builder);
    assert!(
        text(&queued).contains("push: 81 upload(s) queued"),
        "{}",
        text(&queued)
    );
    // Kill it once some are up and others are on the wire.
    let deadline = Instant::now() + Duration::from_secs(60);
    while attic.record.lock().unwrap().accepted.len() < 6 {
        assert!(Instant::now() < deadline, "no uploads:\n{}", builder.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    builder.kill();
    let uploaded_before = attic.record.lock().unwrap().accepted.len();
    assert!(
        uploaded_before < 81,
        "the kill came too late to mean anything"
    );

    *attic.upload_pause.lock().unwrap() = Duration::ZERO;
    builder.restart();
    let waited = push_cli(&builder, &["--wait"]);
    assert_ok(&waited, &builder);
    {
        let record = attic.record.lock().unwrap();
        for path in leaves.iter().chain([&root]) {
            let hash = hash_part(path);
            assert_eq!(
                record.accepted.get(hash),
                Some(&1),
                "{path} accepted exactly once"
            );
        }
        assert!(record.rejected.is_empty(), "{:?}", record.rejected);
        assert!(
            record.preamble_uploads >= 1,
            "the root's info (80 references) went as a preamble"
        );
        assert!(record.header_uploads >= 80);
        // The root went up last: after every one of its references.
        assert_eq!(
            record.order.last().map(String::as_str),
            Some(hash_part(&root))
        );
        eprintln!(
            "accepted before the kill: {uploaded_before}; uploads cut short by it: {}",
            record.aborted
        );
    }
    let health = get(&format!("{}/_sidecar/health", builder.url), "GET", &[]).await;
    assert!(health.text().contains("\"queued\": 0"), "{}", health.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pull_only_identity_fails_for_good_reported_everywhere_without_a_retry_storm() {
    let fx = fixture();
    let pull_only = attic::token("fleet", &[(CACHE, "r")], 3600);
    let s = setup("/org-ci", &pull_only, ATTIC_PUSH).await;
    let (attic, builder, token_file) = (&s.attic, &s.builder, &s.token_file);

    let waited = push_cli(builder, &["--wait", &fx.top]);
    assert_eq!(waited.status.code(), Some(1), "{}", text(&waited));
    assert!(text(&waited).contains("3 failed"), "{}", text(&waited));
    assert!(text(&waited).contains("may not push"), "{}", text(&waited));
    let health = get(&format!("{}/_sidecar/health", builder.url), "GET", &[]).await;
    assert_eq!(health.status, 503, "{}", health.text());
    assert!(
        health.text().contains("no push permission"),
        "{}",
        health.text()
    );
    // The upstream's own line says so too (pushes go through its one `send`), without
    // making pulls look unhealthy there.
    let json: serde_json::Value = serde_json::from_str(&health.text()).unwrap();
    let line = json["upstreams"]
        .as_object()
        .unwrap()
        .values()
        .find(|u| u.get("pushes").is_some())
        .unwrap_or_else(|| panic!("no upstream line with pushes: {json}"));
    let said = line["pushes"]["last_error"].as_str().unwrap_or_default();
    assert!(said.contains("may not push"), "{json}");
    assert!(line["pushes"]["last_failure"].as_u64().is_some(), "{json}");
    let metrics = get(&format!("{}/_sidecar/metrics", builder.url), "GET", &[])
        .await
        .text();
    assert!(
        metrics.contains("nix_sidecar_push_failures_total 3"),
        "{metrics}"
    );
    // The refused push is counted with every other request to the upstream.
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("nix_sidecar_upstream_requests_total{")
                && l.contains("status=\"403\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    // Its time is kept apart from the pulls' latency.
    assert!(
        metrics.contains(
            "nix_sidecar_upstream_request_seconds_count{upstream=\"org\",method=\"POST\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("nix_sidecar_push_uploaded_total 0"),
        "{metrics}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        attic.count("POST", "get-missing-paths"),
        1,
        "one refused check, no retries"
    );
    assert_eq!(attic.count("PUT", "upload-path"), 0);
    // The token in the log? Never.
    let token = std::fs::read_to_string(token_file).unwrap();
    assert!(!builder.logs().contains(&token));
}

#[tokio::test(flavor = "multi_thread")]
async fn paths_signed_by_a_skip_key_are_not_uploaded() {
    let fx = fixture();
    let s = setup("/org-ci", &rw_token(), ATTIC_PUSH).await;
    let (attic, dir, builder) = (&s.attic, s.dir.path(), &s.builder);
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    // Signed on the way by a key named like cache.nixos.org's (a default skip key).
    let (sk, _) = signing_key_named(&home, "cache.nixos.org-1");
    let query = format!("compression=zstd&secret-key={}", sk.display());
    let copied = nix_copy_to(builder, &query, &[&fx.top], &home);
    assert_ok(&copied, builder);
    let waited = push_cli(builder, &["--wait"]);
    assert!(waited.status.success(), "{}", text(&waited));
    assert_eq!(attic.count("PUT", "upload-path"), 0);
    assert_eq!(attic.count("POST", "get-missing-paths"), 0);
    // They are in the local cache all the same.
    assert_eq!(builder.narinfo(&fx.top).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn only_push_uids_may_push_and_pulls_are_unaffected() {
    let fx = fixture();
    let someone_else = format!("push = \"attic\"\npush-uids = [{}]", euid() + 4242);
    let s = setup("/org-ci", &rw_token(), &someone_else).await;
    let (attic, builder) = (&s.attic, &s.builder);
    let (hash, narinfo) = cached_narinfo(&fx.cache, &fx.top);
    let refused = put(
        &format!("{}/{hash}.narinfo", builder.url),
        narinfo.into_bytes(),
    )
    .await;
    assert_eq!(refused.0, 403);
    assert!(
        refused.1.contains(&format!("uid {} may not push", euid())),
        "{}",
        refused.1
    );
    let refused = put(&format!("{}/nar/x.nar", builder.url), b"x".to_vec()).await;
    assert_eq!(refused.0, 403);
    let cli = push_cli(builder, &[&fx.top]);
    assert!(!cli.status.success());
    assert!(text(&cli).contains("403"), "{}", text(&cli));
    assert_eq!(attic.count("POST", "get-missing-paths"), 0);
    // Pulls still work for everyone (the double has nothing: a miss, not a refusal).
    assert_eq!(builder.narinfo(&fx.top).await.status, 404);
    assert_eq!(
        get(&format!("{}/nix-cache-info", builder.url), "GET", &[])
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn flakehub_looks_up_the_project_then_pushes_to_its_cache() {
    let fx = fixture();
    let cache = format!("{}:{}", attic::ORG, attic::PROJECT);
    let token = attic::token("ci", &[(&cache, "rw")], 3600);
    let push = "push = \"flakehub\"\nflakehub-api = \"{double}\"\nflakehub-project = \"acme/widgets\"\npush-uids = [{uid}]";
    let s = setup("", &token, push).await;
    let (attic, builder) = (&s.attic, &s.builder);
    let waited = push_cli(builder, &["--wait", &fx.top]);
    assert_ok(&waited, builder);
    assert!(text(&waited).contains("3 uploaded"), "{}", text(&waited));
    assert_eq!(
        attic.record.lock().unwrap().project_lookups,
        ["/project/acme/widgets"]
    );
    for path in &fx.closure {
        assert!(
            attic.holds(&cache, hash_part(path)),
            "{path} in the project's cache"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_caches_get_nars_then_narinfos_from_both_ways_in() {
    let fx = fixture();
    let http_push = "push = \"http\"\npush-uids = [{uid}]";
    let s = setup("/http", &attic::token("ci", &[], 3600), http_push).await;
    let (attic, dir, builder) = (&s.attic, s.dir.path(), &s.builder);
    // From the local store: uncompressed NARs and narinfos made here.
    let waited = push_cli(builder, &["--wait", &fx.top]);
    assert_ok(&waited, builder);
    assert!(text(&waited).contains("3 uploaded"), "{}", text(&waited));
    let files = attic.record.lock().unwrap().http_files.clone();
    for path in &fx.closure {
        let text =
            String::from_utf8(files[&format!("{}.narinfo", hash_part(path))].to_vec()).unwrap();
        let info = nix_sidecar::nix::narinfo::NarInfo::parse(text.as_bytes()).unwrap();
        assert_eq!(&info.store_path, path);
        let nar = &files[&info.url];
        let sha: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(nar).into();
        assert_eq!(sha, info.nar_hash.0, "{path}: the NAR uploaded is the NAR");
    }
    // From `nix copy --to`: the files as Nix made them, passed on unchanged.
    let outside = &fx.outside;
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let copied = nix_copy_to(builder, "compression=xz", &[outside], &home);
    assert_ok(&copied, builder);
    let waited = push_cli(builder, &["--wait"]);
    assert!(waited.status.success(), "{}", text(&waited));
    let files = attic.record.lock().unwrap().http_files.clone();
    let text =
        String::from_utf8(files[&format!("{}.narinfo", hash_part(outside))].to_vec()).unwrap();
    assert!(text.contains("Compression: xz"), "{text}");
    let url = text.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap();
    assert!(files.contains_key(url));
}

#[tokio::test(flavor = "multi_thread")]
async fn pushes_use_push_identity_and_a_401_gets_one_fresh_token() {
    let fx = fixture();
    let attic = Attic::start().await;
    let dir = tempfile::tempdir().unwrap();
    let pull = write_token(
        dir.path(),
        "pull.jwt",
        &attic::token("fleet", &[(CACHE, "r")], 3600),
    );
    // The push token on disk is stale (another server's) when the daemon first reads it.
    let stale = attic::foreign_token("ci", &[(CACHE, "rw")], 3600);
    let push = write_token(dir.path(), "push.jwt", &stale);
    let url = format!("{}/{CACHE}", attic.url);
    let extra = format!(
        "push = \"attic\"\npush-identity = \"pusher\"\npush-uids = [{}]\n[identity.pusher]\nprovider = \"file\"\npath = \"{push}\"",
        euid()
    );
    let builder = sidecar(&dir.path().join("builder"), &attic, &url, &pull, &extra);
    // Once the daemon holds the stale token (it reads tokens at start) ...
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let health = get(&format!("{}/_sidecar/health", builder.url), "GET", &[]).await;
        let health: serde_json::Value = serde_json::from_str(&health.text()).unwrap();
        if health["identities"]["pusher"]["refreshes"].as_u64() >= Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the push token was never read: {health}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... which a CI system has since replaced.
    std::fs::write(&push, attic::token("ci", &[(CACHE, "rw")], 3600)).unwrap();
    let waited = push_cli(&builder, &["--wait", &fx.top]);
    assert_ok(&waited, &builder);
    let statuses: Vec<u16> = attic
        .record
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter(|(_, p, _)| p.contains("get-missing-paths"))
        .map(|(_, _, s)| *s)
        .collect();
    assert_eq!(statuses, [401, 200], "one 401, one fresh token, one retry");
    for path in &fx.closure {
        assert_eq!(attic.accepted(hash_part(path)), 1);
    }
    // Pulls kept the pull-only token: it cannot push, and was never asked to.
    assert!(!builder.logs().contains(&stale));
}

/// The daemon's peak resident memory (VmHWM), in MiB.
fn peak_rss_mib(sidecar: &Sidecar) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", sidecar.pid())).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kib / 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn parallel_uploads_keep_the_cache_consistent_and_no_nar_is_held_in_memory() {
    let s = setup("/org-ci", &rw_token(), ATTIC_PUSH).await;
    let (attic, dir) = (&s.attic, s.dir.path());
    let mut builder = s.builder;
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let h = home.clone();
    let (root, leaves, big) = tokio::task::spawn_blocking(move || {
        let (root, leaves) = build_fan(40, 5_000, &h);
        // About 110 MB of NAR: more than the daemon's whole memory should ever be.
        let expr = "builtins.derivation { name = \"sidecar-push-big\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"/usr/bin/seq 1 13000000 > $out\" ]; }";
        let big = support::nix::build_expr(&h, "big.nix", expr).trim().to_string();
        (root, leaves, big)
    })
    .await
    .unwrap();
    // Nix uploads the 42 paths over several connections at once.
    let copied = nix_copy_to(&builder, "compression=zstd", &[&root, &big], &home);
    assert_ok(&copied, &builder);
    let waited = push_cli(&builder, &["--wait"]);
    assert_ok(&waited, &builder);
    for path in leaves.iter().chain([&root, &big]) {
        assert_eq!(attic.accepted(hash_part(path)), 1, "{path}");
    }
    let nar_bytes = attic.record.lock().unwrap().caches[CACHE][hash_part(&big)]
        .nar
        .len();
    assert!(nar_bytes > 100 << 20, "the big NAR is {nar_bytes} bytes");
    let peak = peak_rss_mib(&builder);
    eprintln!("peak RSS {peak} MiB, NAR {} MiB", nar_bytes >> 20);
    assert!(
        peak < 80,
        "peak RSS {peak} MiB while moving a {} MiB NAR",
        nar_bytes >> 20
    );
    // Every NAR Nix uploaded is in the local cache, whole and accounted for.
    builder.stop();
    let verify = builder.cache_command("verify");
    let said = String::from_utf8_lossy(&verify.stdout).into_owned();
    assert!(verify.status.success(), "{said}");
    assert!(
        said.contains("checked: 42") && said.contains("corrupt: 0") && said.contains("missing: 0"),
        "{said}"
    );
    let staging: Vec<_> = std::fs::read_dir(builder.cache_dir().join("push"))
        .unwrap()
        .collect();
    assert!(
        staging.is_empty(),
        "uploaded NARs leave the staging directory"
    );
}

/// A `post-build-hook` as the README writes it, run by real Nix after real builds: the outputs
/// are queued (from `$OUT_PATHS`, or from `$DRV_PATH` where Nix 2.8 passes it empty), and with
/// the daemon gone the build still succeeds, with a warning.
#[tokio::test(flavor = "multi_thread")]
async fn the_readme_post_build_hook_queues_real_builds_and_never_fails_one() {
    for client in Client::all() {
        hook_queues_builds(client).await;
    }
}

/// The hook test with `client` building (and the daemon beside it, on its store).
async fn hook_queues_builds(client: Client) {
    eprintln!("the post-build hook with {}", client.name());
    let attic = Attic::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = write_token(dir.path(), "push.jwt", &rw_token());
    let push = ATTIC_PUSH.replace("{uid}", &euid().to_string());
    let url = format!("{}/{CACHE}", attic.url);
    let mut builder = sidecar_beside(
        client,
        &dir.path().join("builder"),
        &attic,
        &url,
        &token_file,
        &push,
    );
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    // The hook of the README, word for word, with the test's daemon and binary.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("#!/bin/sh\n# /etc/nix/post-build-hook")
        .expect("the README's hook");
    let hook_text = &readme[start..start + readme[start..].find("```").unwrap()];
    // The binary where the client's root can reach it too (under /tmp).
    let bin = home.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_nix-sidecar"), bin.join("nix-sidecar")).unwrap();
    let hook = home.join("post-build-hook");
    std::fs::write(
        &hook,
        hook_text.replacen(
            "#!/bin/sh\n",
            &format!(
                "#!/bin/sh\nexport PATH={}:$PATH NIX_SIDECAR_URL={}\n",
                bin.display(),
                builder.url
            ),
            1,
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let build = |name: &str| {
        let expr = format!(
            "builtins.derivation {{ name = \"{name}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"echo {name} > $out\" ]; }}"
        );
        let file = home.join(format!("{name}.nix"));
        std::fs::write(&file, expr).unwrap();
        client.run(
            &[
                "nix-build",
                "--no-out-link",
                "--option",
                "post-build-hook",
                hook.to_str().unwrap(),
                file.to_str().unwrap(),
            ],
            &home,
        )
    };
    let unique = format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let built = build(&format!("hooked-{unique}"));
    assert!(
        built.status.success(),
        "{}: {}",
        client.name(),
        text(&built)
    );
    let out = String::from_utf8_lossy(&built.stdout).trim().to_string();
    let waited = push_cli(&builder, &["--wait"]);
    assert_ok(&waited, &builder);
    assert_eq!(
        attic.accepted(hash_part(&out)),
        1,
        "{}: {}\n{}",
        client.name(),
        text(&built),
        builder.logs()
    );
    if client == Client::Nix226 {
        // The CLI's own path handling is the host's business: below, with Nix 2.8 only.
        builder.stop();
        let built = build(&format!("unhooked-{unique}"));
        assert!(built.status.success(), "{}", text(&built));
        assert!(text(&built).contains("warning: nix-sidecar push: nothing queued"));
        return;
    }
    // `./result` (a symlink into the store) and a file inside a store path name their path.
    let result = home.join("result");
    std::os::unix::fs::symlink(&out, &result).unwrap();
    let queued = push_cli(&builder, &["--wait", result.to_str().unwrap()]);
    assert_ok(&queued, &builder);
    let outside = home.join("hook-test.nix");
    std::fs::write(&outside, "").unwrap();
    let refused = push_cli(&builder, &[outside.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("is not in the Nix store"),
        "{}",
        text(&refused)
    );
    // The daemon gone: the build succeeds all the same, and says why nothing was queued.
    builder.stop();
    let built = build(&format!("unhooked-{unique}"));
    assert!(built.status.success(), "{}", text(&built));
    assert!(
        text(&built).contains("warning: nix-sidecar push: nothing queued"),
        "{}",
        text(&built)
    );
}

/// Unsigned local builds pushed to a plain HTTP cache with `push-signing-key-file`: signed on
/// the way, so another sidecar trusting the builder's key serves them to real Nix.
#[tokio::test(flavor = "multi_thread")]
async fn signed_pushes_to_a_plain_cache_are_pulled_by_another_sidecar_with_real_nix() {
    let fx = fixture();
    let http_push = "push = \"http\"\npush-uids = [{uid}]";
    let s = setup("/http", &attic::token("ci", &[], 3600), http_push).await;
    let (attic, dir, builder) = (&s.attic, s.dir.path(), &s.builder);
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    // The fixture's paths are in the local store unsigned: Nix uploads them as they are.
    let copied = nix_copy_to(builder, "compression=xz", &[&fx.top], &home);
    assert_ok(&copied, builder);
    assert_ok(&push_cli(builder, &["--wait"]), builder);
    let public = std::fs::read_to_string(dir.join("builder").join("push.pk")).unwrap();
    let name = public.split(':').next().unwrap().to_string();
    let files = attic.record.lock().unwrap().http_files.clone();
    for path in &fx.closure {
        let text =
            String::from_utf8(files[&format!("{}.narinfo", hash_part(path))].to_vec()).unwrap();
        assert!(text.contains(&format!("Sig: {name}:")), "{text}");
    }
    // Another machine: only the builder's key, the plain cache as its upstream.
    let fleet_dir = dir.join("fleet");
    std::fs::create_dir_all(&fleet_dir).unwrap();
    let fleet = Sidecar::start(
        &fleet_dir,
        &format!(
            "trusted-public-keys = [\"{}\"]\n[[upstream]]\nname = \"plain\"\nurl = \"{}/http\"\n",
            public.trim(),
            attic.url
        ),
        &[],
    );
    let client = dir.join("client");
    let fleet_url = fleet.url.clone();
    let (top, key) = (fx.top.clone(), public.trim().to_string());
    let client2 = client.clone();
    let pulled =
        tokio::task::spawn_blocking(move || substitute(&fleet_url, &key, &[&top], &client2))
            .await
            .unwrap();
    assert!(
        pulled.status.success(),
        "{}\n{}",
        text(&pulled),
        fleet.logs()
    );
    assert!(fx.closure.iter().all(|p| in_store(&client, p)));
}

/// `nix copy --to` the sidecar with each client: the paths are checked, queued, uploaded once,
/// and a pull-only sidecar then substitutes them for the same client.
#[tokio::test(flavor = "multi_thread")]
async fn each_client_copies_to_the_sidecar_and_pulls_back_through_another() {
    for client in Client::all() {
        let s = setup("/org-ci", &rw_token(), ATTIC_PUSH).await;
        let (attic, dir, builder) = (&s.attic, s.dir.path(), &s.builder);
        let home = dir.join("home");
        std::fs::create_dir_all(&home).unwrap();
        let unique = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!("copied-{unique}");
        let expr = home.join("copied.nix");
        std::fs::write(
            &expr,
            format!("builtins.derivation {{ name = \"{name}\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"/usr/bin/seq 1 5000 > $out\" ]; }}"),
        )
        .unwrap();
        let built = client.run(
            &["nix-build", "--no-out-link", expr.to_str().unwrap()],
            &home,
        );
        assert!(
            built.status.success(),
            "{}: {}",
            client.name(),
            text(&built)
        );
        let out = String::from_utf8_lossy(&built.stdout).trim().to_string();
        let to = format!("{}?compression=zstd", builder.url);
        let copied = client.run(&["nix", "copy", "--to", &to, &out], &home);
        assert!(
            copied.status.success(),
            "{}: {}\n{}",
            client.name(),
            text(&copied),
            builder.logs()
        );
        assert_ok(&push_cli(builder, &["--wait"]), builder);
        assert_eq!(attic.accepted(hash_part(&out)), 1, "{}", client.name());
        // Another machine pulls it through its own sidecar (Attic signs what it serves).
        let pull_token = write_token(
            dir,
            "pull.jwt",
            &attic::token("fleet", &[("org-*", "r")], 3600),
        );
        let fleet = sidecar(
            &dir.join("fleet"),
            attic,
            &format!("{}/{CACHE}", attic.url),
            &pull_token,
            "",
        );
        let client_dir = dir.join("client");
        let (url, key, path) = (fleet.url.clone(), attic.public_key(), out.clone());
        let cd = client_dir.clone();
        let pulled =
            tokio::task::spawn_blocking(move || client.substitute(&url, &key, &[&path], &cd))
                .await
                .unwrap();
        assert!(
            pulled.status.success(),
            "{}: {}\n{}",
            client.name(),
            text(&pulled),
            fleet.logs()
        );
        assert!(in_store(&client_dir, &out), "{}", client.name());
    }
}
