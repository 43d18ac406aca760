//! Real Nix substitutes through nix-sidecar from a JWT-protected, view-scoped upstream.

mod support;

use support::http::get;
use support::issuer::Issuer;
use support::nix::{fixture, in_store, substitute};
use support::sidecar::Sidecar;
use support::upstream::{hash_part, UpstreamDouble};

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
    let out = tokio::task::spawn_blocking(move || substitute(&url, &pk, &[&top], &cd))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "nix copy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for path in &fx.closure {
        assert!(in_store(&client_dir, path), "{path} was substituted");
    }

    let url = sidecar.url.clone();
    let (pk, outside) = (fx.public_key.clone(), fx.outside.clone());
    let cd = client_dir.clone();
    let out = tokio::task::spawn_blocking(move || substitute(&url, &pk, &[&outside], &cd))
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a path outside the view must not substitute"
    );
    assert!(!in_store(&client_dir, &fx.outside));
    assert!(
        stderr.contains("no substituter that can build it") || stderr.contains("does not exist"),
        "nix says it cannot substitute it: {stderr}"
    );
    let miss = get(
        &format!("{}/{}.narinfo", sidecar.url, hash_part(&fx.outside)),
        "GET",
        &[],
    )
    .await;
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

    let answer = get(
        &format!("{}/{}.narinfo", sidecar.url, hash_part(&fx.top)),
        "GET",
        &[],
    )
    .await;
    assert_eq!(answer.status, 503);
    let body = answer.text();
    assert!(
        body.contains("rejected this machine's identity `ci`"),
        "{body}"
    );
    assert!(
        body.contains("InvalidAudience"),
        "the upstream's reason is passed on: {body}"
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
