//! Every identity source against its double, the token cache's refresh rules, and secrets.

mod support;

use std::time::Duration;

use support::cloud::{AWS_SESSION, GITHUB_REQUEST_TOKEN, IMDS_SESSION_TOKEN};
use support::http::get;
use support::issuer::Issuer;
use support::nix::fixture;
use support::sidecar::Sidecar;
use support::upstream::hash_part;
use support::world::{nix_pulls_the_view, world, AUD};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_actions_oidc() {
    let w = world("repo:org/app:ref:refs/heads/main").await;
    let sidecar = w.sidecar(
        &format!("provider = \"github-actions\"\naudience = \"{AUD}\"\n"),
        &[("NIX_SIDECAR_LOG", "trace")],
    );
    nix_pulls_the_view(&sidecar, "gh").await;
    assert_eq!(
        w.cloud.calls("github"),
        1,
        "one token serves the whole pull"
    );
    let logs = sidecar.logs();
    assert!(logs.contains("TRACE"), "trace logging was on");
    assert!(
        !logs.contains(GITHUB_REQUEST_TOKEN),
        "the request token never reaches the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcp_metadata_identity_token_with_format_full_fallback() {
    let w = world("107318236417519048").await;
    w.cloud.gcp_rejects_format_full();
    let sidecar = w.sidecar(&format!("provider = \"gcp\"\naudience = \"{AUD}\"\n"), &[]);
    nix_pulls_the_view(&sidecar, "gcp").await;
    assert_eq!(
        w.cloud.calls("gcp"),
        2,
        "format=full answered 400, retried without it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_managed_identity_with_string_expiry() {
    let w = world("azure-vm-object-id").await;
    let sidecar = w.sidecar(
        &format!("provider = \"azure\"\naudience = \"{AUD}\"\n"),
        &[],
    );
    nix_pulls_the_view(&sidecar, "azure").await;
    let health = get(&format!("{}/_sidecar/health", sidecar.url), "GET", &[])
        .await
        .text();
    let left: serde_json::Value = serde_json::from_str(&health).unwrap();
    let secs = left["identities"]["id"]["token_seconds_left"]
        .as_u64()
        .unwrap();
    assert!(
        secs > 250 && secs <= 300,
        "expires_in \"300\" was read: {secs}"
    );
}

/// EKS IRSA: with a web-identity token file and a role in the environment, the pod's role is
/// assumed (AssumeRoleWithWebIdentity), never the node's through IMDS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_irsa_assumes_the_pods_role_not_the_nodes() {
    let w = world(support::cloud::AWS_ARN).await;
    let table = format!(
        "provider = \"aws\"\naudience = \"{AUD}\"\nregion = \"eu-west-1\"\n\n[identity.id.exchange]\nurl = \"{}/exchange\"\naudience = \"{AUD}\"\n",
        w.cloud.url
    );
    let token_file = w.dir.path().join("irsa-token");
    std::fs::write(
        &token_file,
        w.issuer.mint(
            "system:serviceaccount:ci:builder",
            "sts.amazonaws.com",
            3600,
            false,
        ),
    )
    .unwrap();
    let sts = format!("{}/sts-web", w.cloud.url);
    std::env::remove_var("AWS_ACCESS_KEY_ID");
    let sidecar = w.sidecar(
        &table,
        &[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", token_file.to_str().unwrap()),
            ("AWS_ROLE_ARN", support::cloud::IRSA_ROLE),
            ("AWS_ENDPOINT_URL_STS", &sts),
        ],
    );
    nix_pulls_the_view(&sidecar, "aws").await;
    assert_eq!(w.cloud.calls("sts-web"), 1, "{}", sidecar.logs());
    assert_eq!(
        w.cloud.calls("imds-session"),
        0,
        "the node's role was not used"
    );
    assert_eq!(w.cloud.calls("imds-credentials"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_imdsv2_credentials_presigned_sts_token_through_an_exchange() {
    let w = world(support::cloud::AWS_ARN).await;
    let table = format!(
        "provider = \"aws\"\naudience = \"{AUD}\"\nregion = \"eu-west-1\"\n\n[identity.id.exchange]\nurl = \"{}/exchange\"\naudience = \"{AUD}\"\n",
        w.cloud.url
    );
    std::env::remove_var("AWS_ACCESS_KEY_ID");
    let sidecar = w.sidecar(&table, &[("NIX_SIDECAR_LOG", "trace")]);
    nix_pulls_the_view(&sidecar, "aws").await;
    assert_eq!(
        w.cloud.calls("sts"),
        1,
        "the exchange verified the token with STS"
    );
    assert_eq!(w.cloud.calls("imds-session"), 1);
    let logs = sidecar.logs();
    for secret in [
        IMDS_SESSION_TOKEN,
        AWS_SESSION,
        support::cloud::AWS_SECRET,
        "X-Amz-Signature",
        "nix-sidecar-aws-v1.",
    ] {
        if let Some(line) = logs.lines().find(|l| l.contains(secret)) {
            panic!(
                "{secret} leaked into the trace log: {}",
                &line[..line.len().min(300)]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_token_rotated_by_symlink_swap_is_picked_up() {
    let w = world("system:serviceaccount:ci:builder").await;
    let other_sub = "system:serviceaccount:ci:other";
    let dir = w.dir.path();
    let rotate = |name: &str, token: &str| {
        let target = dir.join(name);
        std::fs::create_dir_all(&target).unwrap();
        std::fs::write(target.join("token"), token).unwrap();
        let tmp = dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(name, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
    };
    rotate(
        "..2026_11_26_a",
        &w.issuer
            .mint("system:serviceaccount:ci:builder", AUD, 3600, false),
    );
    std::os::unix::fs::symlink("..data/token", dir.join("token")).unwrap();
    w.upstream
        .grant(other_sub, std::slice::from_ref(&fixture().outside));
    let sidecar = w.sidecar_with(
        "negative-ttl = \"0s\"",
        &format!(
            "provider = \"kubernetes\"\npath = \"{}\"\nrefresh-interval = \"1s\"\n",
            dir.join("token").display()
        ),
        &[],
    );
    nix_pulls_the_view(&sidecar, "k8s").await;
    // The kubelet swaps in a token for another service account, whose view is empty.
    rotate(
        "..2026_11_26_b",
        &w.issuer.mint(other_sub, AUD, 3600, false),
    );
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let fx = fixture();
    let answer = sidecar.narinfo(&fx.outside).await;
    assert_eq!(answer.status, 200, "the new token (another view) is in use");
    let subs: Vec<_> = w
        .upstream
        .requests()
        .into_iter()
        .filter_map(|r| r.authorization)
        .collect();
    assert!(subs.len() >= 2 && subs.first() != subs.last());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_misses_while_the_token_expires_cause_one_provider_call() {
    let fx = fixture();
    let w = world("repo:org/app:ref:refs/heads/main").await;
    w.cloud.set_lifetime(3);
    let sidecar = w.sidecar(
        &format!("provider = \"github-actions\"\naudience = \"{AUD}\"\n"),
        &[],
    );
    assert_eq!(sidecar.narinfo(&fx.top).await.status, 200);
    assert_eq!(w.cloud.calls("github"), 1);
    w.cloud.set_lifetime(300);
    tokio::time::sleep(Duration::from_millis(3200)).await; // the token has expired
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..50 {
        // Distinct misses: 50 hashes nobody has.
        let url = format!("{}/{:0>32}.narinfo", sidecar.url, format!("{i}"));
        clients.spawn(async move { get(&url, "GET", &[]).await.status });
    }
    while let Some(status) = clients.join_next().await {
        assert_eq!(status.unwrap(), 404);
    }
    assert_eq!(w.cloud.calls("github"), 2, "one refresh for all 50");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_outage_gives_503_naming_the_identity_and_recovery_needs_no_restart() {
    let fx = fixture();
    let w = world("repo:org/app:ref:refs/heads/main").await;
    w.cloud.set_down(true);
    let sidecar = w.sidecar(
        &format!("provider = \"github-actions\"\naudience = \"{AUD}\"\n"),
        &[],
    );
    let url = format!("{}/{}.narinfo", sidecar.url, hash_part(&fx.top));
    let answer = get(&url, "GET", &[]).await;
    assert_eq!(answer.status, 503);
    assert!(
        answer.text().contains("identity `id`") && answer.text().contains("503"),
        "{}",
        answer.text()
    );
    w.cloud.set_down(false);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        get(&url, "GET", &[]).await.status,
        200,
        "the provider is back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gitlab_token_near_expiry_is_warned_about() {
    let fx = fixture();
    let w = world("project_path:group/app:ref_type:branch:ref:main").await;
    let token = w.issuer.mint(
        "project_path:group/app:ref_type:branch:ref:main",
        AUD,
        120,
        false,
    );
    let sidecar = w.sidecar(
        "provider = \"gitlab\"\nvariable = \"CI_JOB_ID_TOKEN\"\n",
        &[("CI_JOB_ID_TOKEN", &token)],
    );
    let answer = sidecar.narinfo(&fx.top).await;
    assert_eq!(answer.status, 200);
    let logs = sidecar.logs();
    assert!(
        logs.contains("expires soon and cannot be refreshed"),
        "{logs}"
    );
    assert!(!logs.contains(&token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_or_empty_token_file_keeps_the_previous_token() {
    let fx = fixture();
    let w = world("machine-1").await;
    let token_file = w.dir.path().join("token");
    std::fs::write(&token_file, w.issuer.mint("machine-1", AUD, 3600, false)).unwrap();
    let sidecar = w.sidecar(
        &format!(
            "provider = \"file\"\npath = \"{}\"\nrefresh-interval = \"1s\"\n",
            token_file.display()
        ),
        &[],
    );
    w.upstream
        .grant("machine-1", std::slice::from_ref(&fx.outside));
    let paths = [&fx.closure[0], &fx.closure[1], &fx.closure[2], &fx.outside];
    let get_path = |i: usize| format!("{}/{}.narinfo", sidecar.url, hash_part(paths[i]));
    assert_eq!(get(&get_path(0), "GET", &[]).await.status, 200);
    for (i, garbage) in ["eyJhbGciOiJSUzI1NiJ9.eyJzdWIi", "", "not a jwt at all"]
        .into_iter()
        .enumerate()
    {
        std::fs::write(&token_file, garbage).unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        // Each lookup is a new path, so it really goes upstream with the kept token.
        assert_eq!(
            get(&get_path(1 + i), "GET", &[]).await.status,
            200,
            "previous token kept after {garbage:?}"
        );
    }
    assert!(sidecar.logs().contains("token refresh failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_provider_reads_json_from_stdout_and_logs_only_stderr() {
    let fx = fixture();
    let w = world("machine-exec").await;
    let token = w.issuer.mint("machine-exec", AUD, 600, false);
    let script = w.dir.path().join("get-token.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho 'fetching a token' >&2\nprintf '{{\"token\": \"%s\", \"expires_in\": 600}}' '{token}'\n"),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let sidecar = w.sidecar(
        &format!(
            "provider = \"exec\"\ncommand = [\"{}\"]\n",
            script.display()
        ),
        &[],
    );
    let answer = sidecar.narinfo(&fx.top).await;
    assert_eq!(answer.status, 200);
    let logs = sidecar.logs();
    assert!(logs.contains("fetching a token"), "stderr is logged");
    assert!(!logs.contains(&token), "stdout is not");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_command_prints_claims_but_the_token_only_with_raw() {
    let w = world("machine-1").await;
    let token = w.issuer.mint("machine-1", AUD, 300, true);
    let dir = w.dir.path();
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        format!("[[upstream]]\nname = \"org\"\nurl = \"{}\"\nidentity = \"id\"\n[identity.id]\nprovider = \"static\"\nvariable = \"T\"\n", w.upstream.url),
    )
    .unwrap();
    let run = |raw: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_nix-sidecar"));
        cmd.args(["token", "--config"])
            .arg(&config)
            .env("T", &token);
        if raw {
            cmd.arg("--raw");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let plain = run(false);
    assert!(
        plain.contains("sub: machine-1") && plain.contains(&format!("aud: {AUD}")),
        "{plain}"
    );
    assert!(plain.contains("seconds left: "));
    assert!(!plain.contains(&token));
    assert!(run(true).contains(&token));
}

/// A GCP metadata server that answers 503 once (they do, under load) does not fail the token;
/// `GCE_METADATA_ROOT` is honoured as google-auth does; provider calls carry a User-Agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metadata_server_that_fails_once_is_retried() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let issuer = Issuer::start().await;
    let jwt = issuer.mint("gce-vm", AUD, 600, false);
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let agents = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (c, a) = (calls.clone(), agents.clone());
    let addr = support::http::serve(move |req| {
        let (calls, agents, jwt) = (c.clone(), a.clone(), jwt.clone());
        async move {
            let agent = req
                .headers()
                .get("user-agent")
                .and_then(|v| v.to_str().ok());
            agents.lock().unwrap().push(agent.unwrap_or("").to_string());
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                return support::http::respond(503, "busy");
            }
            support::http::respond(200, jwt)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!("[[upstream]]\nurl = \"https://cache.test\"\nidentity = \"vm\"\n[identity.vm]\nprovider = \"gcp\"\naudience = \"{AUD}\"\n"),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
        .args(["token", "--config"])
        .arg(&config)
        .env_remove("GCE_METADATA_HOST")
        .env("GCE_METADATA_ROOT", addr.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("sub: gce-vm"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one retry");
    assert!(agents
        .lock()
        .unwrap()
        .iter()
        .all(|a| a.starts_with("nix-sidecar/")));
}

/// `AWS_EC2_METADATA_DISABLED=true`: IMDS is never asked, and the error says why.
#[test]
fn aws_imds_can_be_disabled_as_in_the_sdks() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!("[[upstream]]\nurl = \"https://cache.test\"\nidentity = \"a\"\n[identity.a]\nprovider = \"aws\"\naudience = \"{AUD}\"\n"),
    )
    .unwrap();
    let endpoint = format!("http://{}", support::refusing_addr());
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_nix-sidecar"));
    command.args(["token", "--config"]).arg(&config);
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ] {
        command.env_remove(var);
    }
    let out = command
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &endpoint)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("AWS_EC2_METADATA_DISABLED"), "{stderr}");
}

/// RFC 8693 client: client authentication by HTTP Basic with a secret from a file (RFC 6749
/// 2.3.1), settable token types, `expires_in` as a string; the secret never in an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exchange_client_authenticates_and_sends_the_configured_token_types() {
    use base64::Engine;
    let issuer = Issuer::start().await;
    let exchanged = issuer.mint("exchanged", "https://cache.test", 600, false);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let addr = support::http::serve(move |req: http::Request<hyper::body::Incoming>| {
        let (seen, exchanged) = (s.clone(), exchanged.clone());
        async move {
            use http_body_util::BodyExt;
            let auth = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let form = String::from_utf8_lossy(&body).to_string();
            seen.lock().unwrap().push((auth.clone(), form));
            let expected = base64::engine::general_purpose::STANDARD.encode("ci%3Aclient:s3cret%2F1");
            if auth != format!("Basic {expected}") {
                return support::http::respond(401, r#"{"error":"invalid_client"}"#);
            }
            support::http::respond(
                200,
                format!(r#"{{"access_token":"{exchanged}","issued_token_type":"urn:ietf:params:oauth:token-type:jwt","token_type":"Bearer","expires_in":"300"}}"#),
            )
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client-secret");
    std::fs::write(&secret, "s3cret/1\n").unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[[upstream]]\nurl = \"https://cache.test\"\nidentity = \"i\"\n[identity.i]\nprovider = \"static\"\nvariable = \"T\"\n\
             [identity.i.exchange]\nurl = \"http://{addr}/token\"\nclient-id = \"ci:client\"\nclient-secret-file = \"{}\"\n\
             subject-token-type = \"urn:ietf:params:oauth:token-type:id_token\"\nrequested-token-type = \"urn:ietf:params:oauth:token-type:access_token\"\n",
            secret.display()
        ),
    )
    .unwrap();
    let token = |secret_text: &str| {
        std::fs::write(&secret, secret_text).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
            .args(["token", "--config"])
            .arg(&config)
            .env(
                "T",
                issuer.mint("subject", "https://exchange.test", 600, false),
            )
            .output()
            .unwrap()
    };
    let out = token("s3cret/1\n");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("sub: exchanged"), "{stdout}");
    let left: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("seconds left: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        left > 250 && left <= 300,
        "expires_in \"300\" as a string: {left}"
    );
    let (_, form) = seen.lock().unwrap()[0].clone();
    assert!(
        form.contains("subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aid_token"),
        "{form}"
    );
    assert!(
        form.contains(
            "requested_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aaccess_token"
        ),
        "{form}"
    );
    // A wrong secret: refused, and neither secret nor credential in the error.
    let out = token("wrong-secret\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("invalid_client"), "{stderr}");
    assert!(!stderr.contains("wrong-secret"), "{stderr}");
}

/// A file identity re-read every second, exchanged for a token that lives 15 minutes: the
/// exchange is asked once, not once per re-read (the README's fleet load estimate rests on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchanged_token_is_refreshed_on_its_own_lifetime_not_the_files() {
    let issuer = Issuer::start().await;
    let exchanged = issuer.mint("exchanged", "https://cache.test", 900, false);
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = asked.clone();
    let addr = support::http::serve(move |_req: http::Request<hyper::body::Incoming>| {
        let (counter, exchanged) = (counter.clone(), exchanged.clone());
        async move {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            support::http::respond(
                200,
                format!(r#"{{"access_token":"{exchanged}","issued_token_type":"urn:ietf:params:oauth:token-type:jwt","token_type":"Bearer","expires_in":900}}"#),
            )
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("subject.jwt");
    std::fs::write(
        &token_file,
        issuer.mint("subject", "https://exchange.test", 3600, false),
    )
    .unwrap();
    let sidecar = Sidecar::start(
        dir.path(),
        &format!(
            "[[upstream]]\nname = \"u\"\nurl = \"http://127.0.0.1:9/\"\nidentity = \"i\"\n[identity.i]\nprovider = \"file\"\npath = \"{}\"\nrefresh-interval = \"1s\"\n[identity.i.exchange]\nurl = \"http://{addr}/token\"\n",
            token_file.display()
        ),
        &[],
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        asked.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "{}",
        sidecar.logs()
    );
}

#[test]
fn check_config_warns_about_a_token_file_that_is_not_there() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[[upstream]]\nname = \"u\"\nurl = \"https://cache.test\"\nidentity = \"i\"\n[identity.i]\nprovider = \"file\"\npath = \"/nonexistent/token\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("cannot read its token file /nonexistent/token"),
        "{said}"
    );
}
