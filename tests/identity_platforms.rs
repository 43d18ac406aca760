//! Identity as the real platforms run it: `provider = "auto"` in each environment the doubles
//! simulate, SPIFFE's Workload API, every Azure managed-identity host, the AWS shared files.
//! Every endpoint variable points at a loopback double of the test's own, or at a closed
//! loopback port for "not here", and the daemon runs in an environment holding only those.

mod support;

use std::time::{Duration, Instant};

use support::cloud::{
    APP_SERVICE_HEADER, AWS_ARN, AZURE_OBJECT_ID, AZURE_TENANT, AZURE_WI_CLIENT,
    GITHUB_REQUEST_TOKEN, IRSA_ROLE,
};
use support::http::get;
use support::nix::fixture;
use support::sidecar::Sidecar;
use support::spiffe::WorkloadApi;
use support::world::{nix_pulls_the_view, world, World, AUD};

/// Environment variables of one simulated platform.
type Env<'a> = Vec<(&'a str, String)>;

/// A loopback address that refuses connections.
fn closed_port() -> String {
    support::refusing_addr().to_string()
}

/// Every metadata variable pointing at a closed port: the machine offers nothing.
fn nothing_here() -> Vec<(String, String)> {
    vec![
        ("GCE_METADATA_HOST".into(), closed_port()),
        (
            "AZURE_POD_IDENTITY_AUTHORITY_HOST".into(),
            format!("http://{}", closed_port()),
        ),
        (
            "AWS_EC2_METADATA_SERVICE_ENDPOINT".into(),
            format!("http://{}", closed_port()),
        ),
    ]
}

/// `env` over `nothing_here()`.
fn environment(env: &[(&str, String)]) -> Vec<(String, String)> {
    let mut all = nothing_here();
    for (k, v) in env {
        all.retain(|(name, _)| name != k);
        all.push((k.to_string(), v.clone()));
    }
    all
}

async fn health(sidecar: &Sidecar) -> serde_json::Value {
    let text = get(&format!("{}/_sidecar/health", sidecar.url), "GET", &[])
        .await
        .text();
    serde_json::from_str(&text).unwrap()
}

fn auto_table(w: &World, k8s_path: &std::path::Path) -> String {
    format!(
        "provider = \"auto\"\naudience = \"{AUD}\"\nvariable = \"NIX_CACHE_ID_TOKEN\"\npath = \"{}\"\nregion = \"eu-west-1\"\n\n[identity.id.exchange]\nurl = \"{}/exchange\"\naudience = \"{AUD}\"\n",
        k8s_path.display(),
        w.cloud.url
    )
}

fn config(w: &World, identity_table: &str) -> String {
    format!(
        "trusted-public-keys = [\"{}\"]\n[[upstream]]\nname = \"org\"\nurl = \"{}\"\nidentity = \"id\"\n\n[identity.id]\n{identity_table}",
        fixture().public_key,
        w.upstream.url
    )
}

/// In each simulated environment `auto` picks that platform's source, says so in health, and
/// real Nix substitutes through it (behind the exchange, which verifies what it got).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_picks_the_source_each_platform_offers_and_nix_pulls_through_it() {
    let sub = "platform-workload";
    let w = world(sub).await;
    w.upstream.grant(AWS_ARN, &fixture().closure);
    let cloud = w.cloud.addr.to_string();
    let url = w.cloud.url.clone();
    let minted = w.issuer.mint(sub, AUD, 3600, false);
    let k8s_token = w.dir.path().join("k8s-token");
    let irsa_token = w.dir.path().join("irsa-token");
    std::fs::write(
        &irsa_token,
        w.issuer.mint(sub, "sts.amazonaws.com", 3600, false),
    )
    .unwrap();
    let api = WorkloadApi::start(w.dir.path(), &w.issuer, sub).await;

    let cases: Vec<(&str, Env, &str)> = vec![
        (
            "github",
            vec![
                (
                    "ACTIONS_ID_TOKEN_REQUEST_URL",
                    format!("{url}/_github/token?api-version=2.0"),
                ),
                (
                    "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
                    GITHUB_REQUEST_TOKEN.into(),
                ),
            ],
            "github-actions",
        ),
        (
            "gitlab",
            vec![("NIX_CACHE_ID_TOKEN", minted.clone())],
            "gitlab",
        ),
        ("kubernetes", vec![], "kubernetes"),
        (
            "spiffe",
            vec![("SPIFFE_ENDPOINT_SOCKET", api.endpoint())],
            "spiffe",
        ),
        ("gcp", vec![("GCE_METADATA_HOST", cloud.clone())], "gcp"),
        (
            "azure-vm",
            vec![("AZURE_POD_IDENTITY_AUTHORITY_HOST", url.clone())],
            "azure",
        ),
        (
            "app-service",
            vec![
                ("IDENTITY_ENDPOINT", format!("{url}/appservice/token")),
                ("IDENTITY_HEADER", APP_SERVICE_HEADER.into()),
            ],
            "azure",
        ),
        (
            "aws-irsa",
            vec![
                (
                    "AWS_WEB_IDENTITY_TOKEN_FILE",
                    irsa_token.display().to_string(),
                ),
                ("AWS_ROLE_ARN", IRSA_ROLE.into()),
                ("AWS_ENDPOINT_URL_STS", format!("{url}/sts-web")),
            ],
            "aws",
        ),
        (
            "aws-imds",
            vec![("AWS_EC2_METADATA_SERVICE_ENDPOINT", url.clone())],
            "aws",
        ),
    ];
    for (name, env, expected) in cases {
        // Only the Kubernetes case has the token file.
        if name == "kubernetes" {
            std::fs::write(&k8s_token, &minted).unwrap();
        } else {
            let _ = std::fs::remove_file(&k8s_token);
        }
        let dir = w.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let env = environment(&env);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let sidecar = Sidecar::start_clean(&dir, &config(&w, &auto_table(&w, &k8s_token)), &env);
        nix_pulls_the_view(&sidecar, name).await;
        let h = health(&sidecar).await;
        assert_eq!(
            h["identities"]["id"]["provider"],
            format!("auto: {expected}"),
            "{name}: {h}\n{}",
            sidecar.logs()
        );
        assert!(
            sidecar.logs().contains("provider `auto` chose its source"),
            "{name}: the choice is logged"
        );
    }
    assert!(w.cloud.calls("appservice") > 0 && w.cloud.calls("sts-web") > 0);
    assert!(w.cloud.calls("imds-credentials") > 0 && w.cloud.calls("github") > 0);
    assert_eq!(api.refused(), 0);
}

/// With nothing available the daemon serves at once, its 503s list what it looked for, and a
/// token file that appears later is picked up without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_with_nothing_available_says_what_it_tried_and_picks_up_a_later_token() {
    let sub = "late-workload";
    let w = world(sub).await;
    let k8s_token = w.dir.path().join("k8s-token");
    let env = nothing_here();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let started = Instant::now();
    let sidecar =
        Sidecar::start_clean(w.dir.path(), &config(&w, &auto_table(&w, &k8s_token)), &env);
    let top = fixture().top.clone();
    let first = sidecar.narinfo(&top).await;
    let waited = started.elapsed();
    let body = first.text();
    assert_eq!(first.status, 503, "{body}");
    for looked_for in [
        "GitHub Actions",
        "GitLab",
        "Kubernetes",
        "SPIFFE",
        "GCP",
        "Azure",
        "AWS",
    ] {
        assert!(
            body.contains(looked_for),
            "{looked_for} missing from: {body}"
        );
    }
    assert!(
        waited < Duration::from_secs(5),
        "the first answer took {waited:?}"
    );
    eprintln!("nothing available: first answer after {waited:?}");

    std::fs::write(&k8s_token, w.issuer.mint(sub, AUD, 3600, false)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if sidecar.narinfo(&top).await.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", sidecar.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        health(&sidecar).await["identities"]["id"]["provider"],
        "auto: kubernetes"
    );
}

/// `serve --upstream URL --identity auto --audience AUD` works with no config file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_identity_auto_needs_no_config_file() {
    let sub = "repo:org/app:ref:refs/heads/main";
    let w = world(sub).await;
    let mut env = nothing_here();
    env.push((
        "ACTIONS_ID_TOKEN_REQUEST_URL".into(),
        format!("{}/_github/token?api-version=2.0", w.cloud.url),
    ));
    env.push((
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN".into(),
        GITHUB_REQUEST_TOKEN.into(),
    ));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let upstream = w.upstream.url.clone();
    let sidecar = Sidecar::start_cli(
        w.dir.path(),
        &[
            "--upstream",
            &upstream,
            "--identity",
            "auto",
            "--audience",
            AUD,
        ],
        &env,
    );
    nix_pulls_the_view(&sidecar, "cli").await;
    assert_eq!(
        health(&sidecar).await["identities"]["cli"]["provider"],
        "auto: github-actions"
    );
}

/// SPIFFE: JWT-SVIDs refreshed ahead of expiry (a new one each time), the last good one kept
/// while the agent is away, a clear 503 once it has expired, recovery when the agent is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_svids_are_refreshed_rotated_and_survive_the_agent_going_away() {
    let sub = "spiffe://example.org/ns/ci/sa/builder";
    let w = world(sub).await;
    let api = WorkloadApi::start(w.dir.path(), &w.issuer, sub).await;
    api.set_lifetime(4);
    let endpoint = api.endpoint();
    let sidecar = Sidecar::start_clean(
        w.dir.path(),
        &config(
            &w,
            &format!("provider = \"spiffe\"\naudience = \"{AUD}\"\n"),
        ),
        &[("SPIFFE_ENDPOINT_SOCKET", &endpoint)],
    );
    nix_pulls_the_view(&sidecar, "spiffe").await;
    // Refresh ahead: a 4 s SVID is replaced after about 2 s, by a different one.
    let deadline = Instant::now() + Duration::from_secs(15);
    while api.issued().len() < 3 {
        assert!(Instant::now() < deadline, "{}", sidecar.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let issued = api.issued();
    assert_ne!(issued[0], issued[1], "each refresh is a new SVID");
    assert_eq!(api.refused(), 0, "every call carried workload.spiffe.io");
    // The upstream saw a rotated SVID (asked for a path nobody has, so nothing is cached).
    let unknown = |n: u32| {
        let url = format!("{}/{:032}.narinfo", sidecar.url, n);
        async move { get(&url, "GET", &[]).await }
    };
    assert_eq!(unknown(1).await.status, 404);
    let last_sent = w
        .upstream
        .requests()
        .last()
        .and_then(|r| r.authorization.clone())
        .unwrap();
    assert_ne!(last_sent, format!("Bearer {}", issued[0]));

    api.stop();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let away = unknown(2).await;
    assert_eq!(away.status, 503, "{}", away.text());
    assert!(
        away.text().contains("SPIFFE Workload API"),
        "{}",
        away.text()
    );
    assert_eq!(health(&sidecar).await["identities"]["id"]["healthy"], false);

    api.resume();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if unknown(3).await.status == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "{}", sidecar.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !sidecar.logs().contains(&issued[0]),
        "an SVID never reaches the log"
    );
}

/// The double refuses a call without the security header, as a SPIRE agent does, and says so
/// in grpc-status 3: the product's calls (above) are therefore known to carry it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workload_api_double_refuses_calls_without_the_security_header() {
    use http_body_util::BodyExt;
    let issuer = support::issuer::Issuer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let api = WorkloadApi::start(dir.path(), &issuer, "spiffe://example.org/x").await;
    let stream = tokio::net::UnixStream::connect(&api.socket).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    // JWTSVIDRequest { audience: ["a"] }, framed.
    let body = bytes::Bytes::from_static(&[0, 0, 0, 0, 3, 0x0a, 1, b'a']);
    let request = http::Request::post("http://localhost/SpiffeWorkloadAPI/FetchJWTSVID")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(body))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().unwrap();
    assert_eq!(trailers["grpc-status"], "3");
    assert_eq!(api.refused(), 1);
}

/// Runs `nix-sidecar token` in an environment of only `env` (and PATH).
fn token_command(
    dir: &std::path::Path,
    identity_table: &str,
    env: &[(&str, &str)],
) -> (bool, String) {
    let config = dir.join("token.toml");
    std::fs::write(
        &config,
        format!("[[upstream]]\nurl = \"https://cache.test\"\nidentity = \"id\"\n[identity.id]\n{identity_table}"),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
        .args(["token", "--config"])
        .arg(&config)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Azure beyond VMs: App Service (with an object id), Cloud Shell, AKS workload identity (a
/// `/.default` scope), and IMDS answering 410 while it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_works_on_every_managed_identity_host() {
    let sub = "azure-workload";
    let w = world(sub).await;
    let url = w.cloud.url.clone();
    let dir = w.dir.path();
    let table = format!("provider = \"azure\"\naudience = \"{AUD}\"\n");
    let closed = format!("http://{}", closed_port());

    let app_service = format!("{url}/appservice/token");
    let (ok, out) = token_command(
        dir,
        &format!("{table}object-id = \"{AZURE_OBJECT_ID}\"\n"),
        &[
            ("IDENTITY_ENDPOINT", &app_service),
            ("IDENTITY_HEADER", APP_SERVICE_HEADER),
            ("AZURE_POD_IDENTITY_AUTHORITY_HOST", &closed),
        ],
    );
    assert!(ok && out.contains(&format!("sub: {sub}")), "{out}");
    assert!(!out.contains(APP_SERVICE_HEADER), "{out}");
    assert_eq!(w.cloud.calls("appservice"), 1);
    let (ok, out) = token_command(
        dir,
        &format!("{table}object-id = \"someone-else\"\n"),
        &[
            ("IDENTITY_ENDPOINT", &app_service),
            ("IDENTITY_HEADER", APP_SERVICE_HEADER),
        ],
    );
    assert!(!ok && out.contains("App Service answered 400"), "{out}");

    let cloud_shell = format!("{url}/cloudshell/token");
    let (ok, out) = token_command(dir, &table, &[("MSI_ENDPOINT", &cloud_shell)]);
    assert!(ok && out.contains(&format!("sub: {sub}")), "{out}");
    assert_eq!(w.cloud.calls("cloudshell"), 1);

    let projected = dir.join("azure-federated-token");
    std::fs::write(
        &projected,
        w.issuer.mint(
            "system:serviceaccount:ci:builder",
            "api://AzureADTokenExchange",
            3600,
            false,
        ),
    )
    .unwrap();
    let authority = format!("{url}/aad");
    let (ok, out) = token_command(
        dir,
        "provider = \"azure\"\naudience = \"https://cache.test/.default\"\n",
        &[
            ("AZURE_FEDERATED_TOKEN_FILE", projected.to_str().unwrap()),
            ("AZURE_TENANT_ID", AZURE_TENANT),
            ("AZURE_CLIENT_ID", AZURE_WI_CLIENT),
            ("AZURE_AUTHORITY_HOST", &authority),
        ],
    );
    assert!(
        ok && out.contains(&format!("sub: {sub}")) && out.contains(&format!("aud: {AUD}")),
        "{out}"
    );
    assert_eq!(w.cloud.calls("aad"), 1);

    w.cloud.fail_next("azure", 410);
    let (ok, out) = token_command(
        dir,
        &format!("{table}object-id = \"{AZURE_OBJECT_ID}\"\n"),
        &[("AZURE_POD_IDENTITY_AUTHORITY_HOST", &url)],
    );
    assert!(ok && out.contains(&format!("sub: {sub}")), "{out}");
    assert_eq!(
        w.cloud.calls("azure"),
        2,
        "410 while IMDS starts is retried"
    );
}

/// Azure Arc's challenge: the key file named by the 401 is read only inside the agent's key
/// directory, and its contents answer the challenge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_arc_answers_the_challenge_with_the_key_file_only_from_its_directory() {
    let w = world("arc-machine").await;
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("0123.key");
    std::fs::write(&key, "arc-key-SECRET\n").unwrap();
    w.cloud.set_arc_key_file(&key);
    let client = nix_sidecar::http::client(None).unwrap();
    let endpoint = format!("{}/arc/token", w.cloud.url);
    let answer = nix_sidecar::identity::azure::arc(&client, &endpoint, AUD, keys.path())
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert!(String::from_utf8_lossy(answer.body()).contains("access_token"));
    let elsewhere = tempfile::tempdir().unwrap();
    let e = nix_sidecar::identity::azure::arc(&client, &endpoint, AUD, elsewhere.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a .key file"), "{e}");
    assert!(!e.contains("arc-key-SECRET"));
}

/// The AWS shared files: a `credential_process` profile (selected by AWS_PROFILE) signs the
/// token, before IMDS is ever asked; static keys in the credentials file likewise; a named
/// profile that does not exist is an error, not a fall-through to the instance's role.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_profiles_with_credential_process_or_static_keys_sign_the_token() {
    use support::cloud::{AWS_KEY_ID, AWS_SECRET, AWS_SESSION};
    let w = world(AWS_ARN).await;
    let dir = w.dir.path();
    let table = format!(
        "provider = \"aws\"\naudience = \"{AUD}\"\nregion = \"eu-west-1\"\n\n[identity.id.exchange]\nurl = \"{}/exchange\"\naudience = \"{AUD}\"\n",
        w.cloud.url
    );
    let helper = dir.join("creds.sh");
    std::fs::write(
        &helper,
        format!("#!/bin/sh\necho 'helper says hi' >&2\nprintf '{{\"Version\": 1, \"AccessKeyId\": \"{AWS_KEY_ID}\", \"SecretAccessKey\": \"{AWS_SECRET}\", \"SessionToken\": \"{AWS_SESSION}\", \"Expiration\": \"2099-01-01T00:00:00Z\"}}'\n"),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config_file = dir.join("aws-config");
    std::fs::write(
        &config_file,
        format!(
            "[default]\nregion = us-west-2\n\n[profile ci]\ncredential_process = {}\n",
            helper.display()
        ),
    )
    .unwrap();
    let imds = w.cloud.url.clone();
    let base = [
        ("AWS_CONFIG_FILE", config_file.to_str().unwrap()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials"),
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.as_str()),
    ];
    let mut env = base.to_vec();
    env.push(("AWS_PROFILE", "ci"));
    let (ok, out) = token_command(dir, &table, &env);
    assert!(ok && out.contains(&format!("sub: {AWS_ARN}")), "{out}");
    assert_eq!(w.cloud.calls("sts"), 1, "the exchange verified it with STS");
    assert_eq!(w.cloud.calls("imds-session"), 0, "IMDS was not asked");
    assert!(
        !out.contains(AWS_SECRET) && !out.contains(AWS_SESSION),
        "{out}"
    );

    let credentials = dir.join("aws-credentials");
    std::fs::write(
        &credentials,
        format!("[deploy]\naws_access_key_id = {AWS_KEY_ID}\naws_secret_access_key = {AWS_SECRET}\naws_session_token = {AWS_SESSION}\n"),
    )
    .unwrap();
    let env = [
        ("AWS_CONFIG_FILE", config_file.to_str().unwrap()),
        ("AWS_SHARED_CREDENTIALS_FILE", credentials.to_str().unwrap()),
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.as_str()),
        ("AWS_PROFILE", "deploy"),
    ];
    let (ok, out) = token_command(dir, &table, &env);
    assert!(ok && out.contains(&format!("sub: {AWS_ARN}")), "{out}");
    assert_eq!(w.cloud.calls("imds-session"), 0);

    let mut env = base.to_vec();
    env.push(("AWS_PROFILE", "missing"));
    let (ok, out) = token_command(dir, &table, &env);
    assert!(!ok && out.contains("AWS_PROFILE is `missing`"), "{out}");
    assert_eq!(
        w.cloud.calls("imds-session"),
        0,
        "no fall-through to the instance"
    );
}

/// Behind an egress proxy (HTTPS_PROXY/HTTP_PROXY with credentials): the upstream is reached
/// through a CONNECT tunnel (TLS still ends at the upstream, verified against `ca-file`), the
/// GitHub token endpoint in absolute form; a metadata server is reached directly even though
/// NO_PROXY does not name it; the proxy's password never reaches the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_goes_through_the_proxy_and_metadata_never_does() {
    use support::proxy::ProxyDouble;
    use support::tls::TlsFront;
    let sub = "repo:org/app:ref:refs/heads/main";
    let w = world(sub).await;
    let front = TlsFront::start(w.upstream.addr, w.dir.path()).await;
    let proxy = ProxyDouble::start(Some("builder:proxy-SECRET-pw")).await;
    let proxy_url = format!("http://builder:proxy-SECRET-pw@{}", proxy.addr);
    let metadata = support::cloud::Cloud::start(&w.issuer, sub, AUD).await;
    let config = format!(
        "trusted-public-keys = [\"{}\"]\n[[upstream]]\nname = \"org\"\nurl = \"https://{}\"\nca-file = \"{}\"\nidentity = \"id\"\n\n[identity.id]\nprovider = \"github-actions\"\naudience = \"{AUD}\"\n",
        fixture().public_key,
        front.addr,
        front.ca_file.display()
    );
    let github = format!("{}/_github/token?api-version=2.0", w.cloud.url);
    let env = [
        ("HTTPS_PROXY", proxy_url.as_str()),
        ("http_proxy", proxy_url.as_str()),
        ("NO_PROXY", "unrelated.example"),
        ("ACTIONS_ID_TOKEN_REQUEST_URL", github.as_str()),
        ("ACTIONS_ID_TOKEN_REQUEST_TOKEN", GITHUB_REQUEST_TOKEN),
    ];
    let sidecar = Sidecar::start_clean(w.dir.path(), &config, &env);
    nix_pulls_the_view(&sidecar, "proxied").await;
    let seen = proxy.seen();
    assert!(
        seen.contains(&format!("CONNECT {} (authorised)", front.addr)),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|l| l.starts_with(&format!("GET {}/_github/token", w.cloud.url))),
        "{seen:?}"
    );
    assert!(!sidecar.logs().contains("proxy-SECRET-pw"));

    // The same proxy settings, a GCP identity: its metadata server is not proxied.
    let before = proxy.seen().len();
    let metadata_host = metadata.addr.to_string();
    let (ok, out) = token_command(
        w.dir.path(),
        &format!("provider = \"gcp\"\naudience = \"{AUD}\"\n"),
        &[
            ("HTTPS_PROXY", &proxy_url),
            ("HTTP_PROXY", &proxy_url),
            ("GCE_METADATA_HOST", &metadata_host),
        ],
    );
    assert!(ok && out.contains(&format!("sub: {sub}")), "{out}");
    assert_eq!(metadata.calls("gcp"), 1);
    assert_eq!(proxy.seen().len(), before, "{:?}", proxy.seen());
}
