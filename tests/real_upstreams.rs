//! In front of the caches people run: Attic (bearer or basic, path-scoped, no FileHash, NARs
//! redirected to an object store), FlakeHub (Basic `flakehub:<jwt>` from GitHub OIDC), a
//! private view and a public cache in one list, and a netrc login replaced underneath us.

mod support;

use std::time::Duration;

use serde_json::json;
use support::cloud::Cloud;
use support::http::get;
use support::issuer::{now, Issuer};
use support::nix::{build_many, in_store, substitute, Fixture};
use support::sidecar::Sidecar;
use support::upstream::{hash_part, Fault, Target, UpstreamDouble};

fn attic_fixture() -> &'static Fixture {
    static FX: std::sync::OnceLock<Fixture> = std::sync::OnceLock::new();
    FX.get_or_init(|| support::nix::build("zstd", 3_000))
}

async fn nix_pull(
    sidecar: &Sidecar,
    keys: &str,
    paths: &[String],
    client: &str,
) -> std::process::Output {
    let (url, keys, dir) = (
        sidecar.url.clone(),
        keys.to_string(),
        sidecar.dir.join(client),
    );
    let paths = paths.to_vec();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
        substitute(&url, &keys, &refs, &dir)
    })
    .await
    .unwrap()
}

fn attic_token(issuer: &Issuer, aud: &str, perms: serde_json::Value) -> String {
    issuer.mint_claims(
        json!({"iss": issuer.url, "sub": "ci", "aud": aud, "iat": now(), "exp": now() + 300,
               "https://jwt.attic.rs/v1": perms}),
        false,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attic_like_upstream_with_bearer_and_basic_and_an_object_store_redirect() {
    let fx = attic_fixture();
    let aud = "https://attic.test";
    let issuer = Issuer::start().await;
    let tweak = |s: &mut support::upstream::State| {
        s.prefix = "/main".into();
        s.strip_file_hash = true;
        s.attic_cache = Some("main".into());
        s.basic_user = Some("attic".into());
    };
    let attic = UpstreamDouble::start_with(fx.cache.clone(), Some((&issuer.url, aud)), tweak).await;
    let store = UpstreamDouble::start_with(fx.cache.clone(), None, |s| {
        s.object_store = true;
        s.prefix = "/main".into();
    })
    .await;
    attic.fault(Target::Nar, Fault::RedirectTo(store.url.clone()), None);
    let pull = attic_token(&issuer, aud, json!({"caches": {"main": {"r": 1}}}));
    for auth in [
        "auth = \"bearer\"",
        "auth = \"basic\"\nusername = \"attic\"",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "trusted-public-keys = [\"{}\"]\n[[upstream]]\nname = \"attic\"\nurl = \"{}/main\"\n{auth}\nidentity = \"ci\"\n[identity.ci]\nprovider = \"static\"\nvariable = \"T\"\n",
            fx.public_key, attic.url
        );
        let sidecar = Sidecar::start(dir.path(), &config, &[("T", &pull)]);
        let out = nix_pull(&sidecar, &fx.public_key, std::slice::from_ref(&fx.top), "c").await;
        assert!(
            out.status.success(),
            "{auth}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(fx
            .closure
            .iter()
            .all(|p| in_store(&dir.path().join("c"), p)));
    }
    assert!(
        store.requests().len() >= 3,
        "NARs came from the object store"
    );
    assert!(
        store.requests().iter().all(|r| r.authorization.is_none()),
        "no token at the object store"
    );

    // Some permission but not pull: 403 -> a miss. No claim at all: 401 -> 503.
    for (perms, status) in [
        (json!({"caches": {"main": {"w": 1}}}), 404),
        (serde_json::Value::Null, 503),
    ] {
        let token = if perms.is_null() {
            issuer.mint("ci", aud, 300, false)
        } else {
            attic_token(&issuer, aud, perms)
        };
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "[[upstream]]\nname = \"attic\"\nurl = \"{}/main/\"\nidentity = \"ci\"\n[identity.ci]\nprovider = \"static\"\nvariable = \"T\"\n",
            attic.url
        );
        let sidecar = Sidecar::start(dir.path(), &config, &[("T", &token)]);
        let answer = sidecar.narinfo(&fx.top).await;
        assert_eq!(answer.status, status);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flakehub_like_upstream_with_a_github_actions_identity_and_the_preset() {
    let fx = attic_fixture();
    let aud = "api.flakehub.com";
    let issuer = Issuer::start().await;
    let sub = "repo:org/app:ref:refs/heads/main";
    let cloud = Cloud::start(&issuer, sub, aud).await;
    let flakehub = UpstreamDouble::start_with(fx.cache.clone(), Some((&issuer.url, aud)), |s| {
        s.basic_user = Some("flakehub".into())
    })
    .await;
    flakehub.grant(sub, &fx.closure);
    let dir = tempfile::tempdir().unwrap();
    // The preset brings Basic auth as `flakehub` and FlakeHub's keys; URL and keys are overridden
    // here to point at the double.
    let config = format!(
        "[[upstream]]\npreset = \"flakehub\"\nurl = \"{}\"\ntrusted-public-keys = [\"{}\"]\nidentity = \"gh\"\n[identity.gh]\nprovider = \"github-actions\"\naudience = \"{aud}\"\n",
        flakehub.url, fx.public_key
    );
    let env = cloud.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let sidecar = Sidecar::start(dir.path(), &config, &env);
    let out = nix_pull(&sidecar, &fx.public_key, std::slice::from_ref(&fx.top), "c").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(flakehub
        .requests()
        .iter()
        .filter(|r| r.path != "/nix-cache-info")
        .all(|r| r
            .authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Basic "))));
    let checked = std::process::Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
        .args(["check-config", "--config"])
        .arg(dir.path().join("sidecar.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&checked.stdout);
    assert!(text.contains("username = \"flakehub\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_view_and_a_public_cache_in_one_ordered_list() {
    let private_fx = attic_fixture();
    let public_fx = build_many(2, 1_000, "xz");
    let aud = "https://cache.test";
    let issuer = Issuer::start().await;
    let private = UpstreamDouble::start(private_fx.cache.clone(), Some((&issuer.url, aud))).await;
    private.grant("m", &private_fx.closure);
    let public = UpstreamDouble::start(public_fx.cache.clone(), None).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = format!("{} {}", private_fx.public_key, public_fx.public_key);
    let config = format!(
        "trusted-public-keys = [\"{}\", \"{}\"]\n[[upstream]]\nname = \"view\"\nurl = \"{}\"\nidentity = \"m\"\n[[upstream]]\nname = \"public\"\nurl = \"{}\"\n[identity.m]\nprovider = \"static\"\nvariable = \"T\"\n",
        private_fx.public_key, public_fx.public_key, private.url, public.url
    );
    let token = issuer.mint("m", aud, 300, false);
    let sidecar = Sidecar::start(dir.path(), &config, &[("T", &token)]);
    let wanted = vec![private_fx.top.clone(), public_fx.top.clone()];
    let out = nix_pull(&sidecar, &keys, &wanted, "c").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(wanted.iter().all(|p| in_store(&dir.path().join("c"), p)));
    let neither = sidecar.narinfo(&private_fx.outside).await;
    assert_eq!(neither.status, 404);
    assert!(
        public.requests().iter().all(|r| r.authorization.is_none()),
        "the public cache never sees the token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_netrc_provider_picks_up_a_replaced_file_without_a_restart() {
    let fx = attic_fixture();
    let aud = "https://cache.test";
    let issuer = Issuer::start().await;
    let upstream = UpstreamDouble::start(fx.cache.clone(), Some((&issuer.url, aud))).await;
    upstream.grant("logged-in", &fx.closure);
    let dir = tempfile::tempdir().unwrap();
    let netrc = dir.path().join("netrc");
    let write = |token: &str| {
        let tmp = dir.path().join("netrc.new");
        std::fs::write(
            &tmp,
            format!("machine 127.0.0.1\n  login flakehub\n  password {token}\n"),
        )
        .unwrap();
        std::fs::rename(&tmp, &netrc).unwrap(); // atomically, as Determinate's daemon does
    };
    write(&issuer.mint("stranger", aud, 300, false));
    let config = format!(
        "negative-ttl = \"0s\"\n[[upstream]]\nname = \"fh\"\nurl = \"{}\"\nidentity = \"n\"\n[identity.n]\nprovider = \"netrc\"\npath = \"{}\"\nmachine = \"127.0.0.1\"\nrefresh-interval = \"1s\"\n",
        upstream.url,
        netrc.display()
    );
    let sidecar = Sidecar::start(dir.path(), &config, &[]);
    let url = format!("{}/{}.narinfo", sidecar.url, hash_part(&fx.top));
    assert_eq!(
        get(&url, "GET", &[]).await.status,
        404,
        "the stranger sees nothing"
    );
    write(&issuer.mint("logged-in", aud, 300, false));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        get(&url, "GET", &[]).await.status,
        200,
        "the new login is used"
    );
}
