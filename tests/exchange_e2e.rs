//! The self-hosting story end to end, with real Nix: a sidecar's workload identity (GitHub
//! Actions OIDC, AWS) goes through `nix-sidecar exchange` and comes out as an Attic token
//! that the Attic-like double checks on every request.

mod support;

use std::path::Path;
use std::process::Command;

use support::attic::{self, Attic};
use support::cloud::{Cloud, AWS_ARN};
use support::issuer::Issuer;
use support::nix::{fixture, in_store, substitute};
use support::sidecar::Sidecar;

const AUD: &str = "https://cache.test";
const SUB: &str = "repo:org/app:ref:refs/heads/main";

struct World {
    attic: Attic,
    cloud: Cloud,
    exchange: Sidecar,
    dir: tempfile::TempDir,
    _issuer: Issuer,
}

/// The Attic double holding the fixture's closure in `org-main` and its outside path in
/// `secret`; an exchange trusting the issuer (GitHub-style rule) and AWS (via the cloud
/// double's STS), minting for the double.
async fn world() -> World {
    let fx = fixture();
    let issuer = Issuer::start().await;
    let cloud = Cloud::start(&issuer, SUB, AUD).await;
    let attic = Attic::start().await;
    attic
        .put_local("org-main", std::slice::from_ref(&fx.top))
        .await;
    attic
        .put_local("secret", std::slice::from_ref(&fx.outside))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let key = attic::write_secret(dir.path());
    let audit = dir.path().join("audit.jsonl");
    let config = format!(
        "signing-key-file = \"{key}\"\naudit-log = \"{audit}\"\n\
         [[issuer]]\nurl = \"{iss}\"\naudience = \"{AUD}\"\n\
         [aws]\naudience = \"{AUD}\"\nsts-endpoint = \"{cloud}/sts/\"\n\
         [[rule]]\nissuer = \"{iss}\"\nclaims = {{ sub = \"repo:org/*\" }}\ngrant = {{ \"org-*\" = [\"pull\"], \"org-ci\" = [\"pull\", \"push\"] }}\n\
         [[rule]]\naws-arn = \"arn:aws:sts::123456789012:assumed-role/builder/*\"\ngrant = {{ \"org-main\" = [\"pull\"] }}\n",
        key = key.display(),
        audit = audit.display(),
        iss = issuer.url,
        cloud = cloud.url,
    );
    let exchange_dir = dir.path().join("exchange");
    std::fs::create_dir_all(&exchange_dir).unwrap();
    let exchange = Sidecar::start_exchange(&exchange_dir, &config);
    World {
        attic,
        cloud,
        exchange,
        dir,
        _issuer: issuer,
    }
}

impl World {
    /// A sidecar in `name` with `upstreams` (TOML) and `identities` (TOML), the cloud
    /// doubles in its environment.
    fn sidecar(&self, name: &str, upstreams: &str, identities: &str) -> Sidecar {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "trusted-public-keys = [\"{}\"]\n{}\n{}",
            self.attic.public_key(),
            upstreams.replace("{attic}", &self.attic.url),
            identities.replace("{exchange}", &self.exchange.url),
        );
        let env = self.cloud.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Sidecar::start(&dir, &config, &env)
    }
}

fn nix_substitutes(sidecar: &Sidecar, client: &Path, key: &str) {
    let fx = fixture();
    let out = substitute(&sidecar.url, key, &[&fx.top], client);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        sidecar.logs()
    );
    assert!(fx.closure.iter().all(|p| in_store(client, p)));
}

const GH_IDENTITY: &str = "[identity.gh]\nprovider = \"github-actions\"\naudience = \"https://cache.test\"\n[identity.gh.exchange]\nurl = \"{exchange}/token\"\nscope = \"pull\"\n";

#[tokio::test(flavor = "multi_thread")]
async fn github_oidc_through_the_exchange_pulls_what_the_grant_covers_and_nothing_else() {
    let w = world().await;
    let fx = fixture();
    let upstreams = "[[upstream]]\nname = \"main\"\nurl = \"{attic}/org-main\"\nidentity = \"gh\"\n[[upstream]]\nname = \"secret\"\nurl = \"{attic}/secret\"\nidentity = \"gh\"\n";
    let fleet = w.sidecar("fleet", upstreams, GH_IDENTITY);
    let (client, key) = (w.dir.path().join("client"), w.attic.public_key());
    let fleet = tokio::task::spawn_blocking(move || {
        nix_substitutes(&fleet, &client, &key);
        fleet
    })
    .await
    .unwrap();
    // The cache outside the grant looks absent to this identity: a miss.
    assert_eq!(fleet.narinfo(&fx.outside).await.status, 404);
    let audit = std::fs::read_to_string(w.dir.path().join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"result\":\"granted\""), "{audit}");
    assert!(!audit.contains("eyJ"), "no token in the audit log");
}

#[tokio::test(flavor = "multi_thread")]
async fn pushes_need_a_push_grant() {
    let w = world().await;
    let fx = fixture();
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let upstreams = format!(
        "[[upstream]]\nname = \"ci\"\nurl = \"{{attic}}/org-ci\"\nidentity = \"gh\"\npush = \"attic\"\npush-identity = \"gh-push\"\npush-uids = [{uid}]\n\
         [[upstream]]\nname = \"main\"\nurl = \"{{attic}}/org-main\"\nidentity = \"gh\"\npush = \"attic\"\npush-identity = \"gh-push\"\npush-uids = [{uid}]\n"
    );
    let identities = format!(
        "{GH_IDENTITY}[identity.gh-push]\nprovider = \"github-actions\"\naudience = \"https://cache.test\"\n[identity.gh-push.exchange]\nurl = \"{{exchange}}/token\"\nscope = \"push\"\n"
    );
    let builder = w.sidecar("builder", &upstreams, &identities);
    let pushed = Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
        .args(["push", "--url", &builder.url, "--wait", &fx.top])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&pushed.stdout),
        String::from_utf8_lossy(&pushed.stderr)
    );
    assert_eq!(pushed.status.code(), Some(1), "{said}\n{}", builder.logs());
    assert!(
        said.contains("3 uploaded") && said.contains("3 failed"),
        "{said}"
    );
    for path in &fx.closure {
        assert!(
            w.attic.holds("org-ci", support::upstream::hash_part(path)),
            "pushed to org-ci"
        );
    }
    assert!(said.contains("may not push to upstream `main`"), "{said}");
}

const AWS_UPSTREAM: &str =
    "[[upstream]]\nname = \"main\"\nurl = \"{attic}/org-main\"\nidentity = \"aws\"\n";

#[tokio::test(flavor = "multi_thread")]
async fn aws_identity_is_verified_by_sts_for_the_exchanges_own_audience() {
    let w = world().await;
    let aws = "[identity.aws]\nprovider = \"aws\"\naudience = \"https://cache.test\"\nregion = \"eu-west-1\"\n[identity.aws.exchange]\nurl = \"{exchange}/token\"\n";
    let fleet = w.sidecar("aws-fleet", AWS_UPSTREAM, aws);
    let (client, key) = (w.dir.path().join("aws-client"), w.attic.public_key());
    tokio::task::spawn_blocking(move || nix_substitutes(&fleet, &client, &key))
        .await
        .unwrap();
    assert!(w.cloud.calls("sts") >= 1, "the exchange asked STS");
    let audit = std::fs::read_to_string(w.dir.path().join("audit.jsonl")).unwrap();
    assert!(audit.contains(&format!("aws|{AWS_ARN}")), "{audit}");

    // Made for another audience: STS refuses the replay with ours, the exchange refuses it,
    // and the sidecar says the identity cannot be had.
    let elsewhere = aws.replace(
        "audience = \"https://cache.test\"\nregion",
        "audience = \"https://other.example\"\nregion",
    );
    let other = w.sidecar("aws-other", AWS_UPSTREAM, &elsewhere);
    let answer = other.narinfo(&fixture().top).await;
    assert_eq!(answer.status, 503, "{}", answer.text());
    let audit = std::fs::read_to_string(w.dir.path().join("audit.jsonl")).unwrap();
    assert!(audit.contains("another audience"), "{audit}");
}

/// The README's GitHub Actions job, its sidecar.toml as written there: the job pushes what it
/// built with its push identity and pulls from its own cache with its pull identity.
#[tokio::test(flavor = "multi_thread")]
async fn the_readme_github_actions_example_pushes_and_pulls_its_own_cache() {
    let w = world().await;
    let fx = fixture();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("cat > sidecar.toml <<'EOF'\n")
        .expect("the README's GitHub Actions example")
        + "cat > sidecar.toml <<'EOF'\n".len();
    let end = start + readme[start..].find("      EOF").unwrap();
    let config: String = readme[start..end]
        .lines()
        .map(|l| format!("{}\n", l.strip_prefix("      ").unwrap_or(l)))
        .collect();
    let config = config
        .replace("https://attic.example.org/org-ci", "{attic}/org-ci")
        .replace(
            "https://attic.example.org/token",
            &format!("{}/token", w.exchange.url),
        )
        .replace("\"https://attic.example.org\"", &format!("\"{AUD}\""));
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let config = config.replace(
        "push-uids = [0, 1001]",
        &format!("push-uids = [0, 1001, {uid}]"),
    );
    let builder = w.sidecar("readme-job", &config, "");
    let pushed = Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
        .args(["push", "--url", &builder.url, "--wait", &fx.top])
        .output()
        .unwrap();
    assert!(
        pushed.status.success(),
        "{}{}\n{}",
        String::from_utf8_lossy(&pushed.stdout),
        String::from_utf8_lossy(&pushed.stderr),
        builder.logs()
    );
    for path in &fx.closure {
        assert!(w.attic.holds("org-ci", support::upstream::hash_part(path)));
    }
    // Its pulls from its own cache hit (a push-only token would see nothing there).
    let (client, key) = (w.dir.path().join("readme-client"), w.attic.public_key());
    tokio::task::spawn_blocking(move || nix_substitutes(&builder, &client, &key))
        .await
        .unwrap();
}

/// `nix-sidecar token` after an exchange says which caches were granted, and a warning about
/// the audience comes at most once.
#[tokio::test(flavor = "multi_thread")]
async fn token_shows_the_granted_caches() {
    let w = world().await;
    let upstreams =
        "[[upstream]]\nname = \"main\"\nurl = \"{attic}/org-main\"\nidentity = \"gh\"\n";
    let fleet = w.sidecar("token-fleet", upstreams, GH_IDENTITY);
    let env = w.cloud.env();
    let out = Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
        .args(["token", "--config"])
        .arg(fleet.dir.join("sidecar.toml"))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("granted: org-*: pull"), "{stdout}");
    assert!(stderr.matches("warning").count() <= 1, "{stderr}");
}
