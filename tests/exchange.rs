//! `nix-sidecar exchange` as a client sees it: RFC 8693 forms in, Attic tokens or RFC 6749
//! errors out. Every refusal of issue "token exchange" is its own test.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use support::attic;
use support::issuer::{now, Issuer, JWKS};
use support::sidecar::Sidecar;

const AUD: &str = "https://cache.test";
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

pub struct Exchange {
    pub service: Sidecar,
    pub issuer: Issuer,
    pub dir: tempfile::TempDir,
}

/// An issuer double and an exchange trusting it, with `rules` (TOML `[[rule]]` tables,
/// `{issuer}` standing for the issuer's URL) and `extra` top-level keys.
async fn exchange(rules: &str, extra: &str) -> Exchange {
    let issuer = Issuer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = attic::write_secret(dir.path());
    let config = format!(
        "signing-key-file = \"{}\"\nttl = \"10m\"\n{extra}\n[[issuer]]\nurl = \"{}\"\naudience = \"{AUD}\"\n{}",
        key.display(),
        issuer.url,
        rules.replace("{issuer}", &issuer.url)
    );
    let service = Sidecar::start_exchange(dir.path(), &config);
    Exchange {
        service,
        issuer,
        dir,
    }
}

const GH_RULE: &str = "[[rule]]\nissuer = \"{issuer}\"\nclaims = { repository = \"org/*\" }\ngrant = { \"org-*\" = [\"pull\"], \"org-ci\" = [\"pull\", \"push\"] }\n";

impl Exchange {
    /// A GitHub-like token for the exchange's audience with these extra claims.
    fn token(&self, claims: Value) -> String {
        let mut all = json!({"iss": self.issuer.url, "sub": "repo:org/app:ref:refs/heads/main", "aud": AUD, "iat": now(), "nbf": now() - 5, "exp": now() + 300, "repository": "org/app"});
        for (k, v) in claims.as_object().unwrap() {
            all[k] = v.clone();
        }
        self.issuer.mint_claims(all, false)
    }

    async fn post(&self, pairs: &[(&str, &str)]) -> (u16, Value) {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish();
        self.post_raw("application/x-www-form-urlencoded", body.into_bytes())
            .await
    }

    async fn post_raw(&self, content_type: &str, body: Vec<u8>) -> (u16, Value) {
        use http_body_util::{BodyExt, Full};
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<bytes::Bytes>>();
        let request = http::Request::post(format!("{}/token", self.service.url))
            .header("content-type", content_type)
            .body(Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let response = client.request(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    async fn exchange(&self, token: &str, scope: Option<&str>) -> (u16, Value) {
        let mut pairs = vec![
            ("grant_type", GRANT_TYPE),
            ("subject_token", token),
            ("subject_token_type", JWT_TYPE),
        ];
        if let Some(scope) = scope {
            pairs.push(("scope", scope));
        }
        self.post(&pairs).await
    }

    /// Exchanges `token` and expects the refusal `error` with `status`.
    async fn refused(&self, token: &str, status: u16, error: &str) -> String {
        let (got, body) = self.exchange(token, None).await;
        assert_eq!(
            (got, body["error"].as_str()),
            (status, Some(error)),
            "{body}"
        );
        assert!(!self.service.logs().contains(token), "a token in the log");
        body["error_description"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn a_valid_token_gets_an_attic_token_scoped_to_its_grant() {
    let ex = exchange(GH_RULE, "").await;
    let (status, body) = ex.exchange(&ex.token(json!({})), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["issued_token_type"], JWT_TYPE);
    assert_eq!(body["expires_in"], 600);
    let minted = claims_of(body["access_token"].as_str().unwrap());
    assert_eq!(
        minted["sub"],
        format!("{}|repo:org/app:ref:refs/heads/main", ex.issuer.url)
    );
    assert_eq!(
        minted["https://jwt.attic.rs/v1"]["caches"],
        json!({"org-*": {"r": 1}, "org-ci": {"r": 1, "w": 1}})
    );
    assert!(minted["exp"].as_i64().unwrap() <= now() + 600);
    assert!(minted["jti"].as_str().is_some_and(|j| j.len() >= 16));
    // The Attic double takes it: it is signed with atticd's secret.
    let token = body["access_token"].as_str().unwrap();
    assert_eq!(
        attic::rights_of(token, "org-ci"),
        Some((true, true)),
        "push on org-ci"
    );
    assert_eq!(attic::rights_of(token, "org-web"), Some((true, false)));
    // A pull scope narrows the grant.
    let (_, body) = ex.exchange(&ex.token(json!({})), Some("pull")).await;
    let minted = claims_of(body["access_token"].as_str().unwrap());
    assert_eq!(
        minted["https://jwt.attic.rs/v1"]["caches"],
        json!({"org-*": {"r": 1}, "org-ci": {"r": 1}})
    );
    // ES256 tokens too.
    let mut claims = claims_of(&ex.token(json!({})));
    claims["exp"] = json!(now() + 300);
    let es256 = ex.issuer.mint_claims(claims, true);
    assert_eq!(ex.exchange(&es256, None).await.0, 200);
    // Audit: one line per decision, never a token.
    let log = ex.service.logs();
    assert!(log.contains("\"result\":\"granted\""), "{log}");
}

#[tokio::test]
async fn alg_none_is_refused() {
    let ex = exchange(GH_RULE, "").await;
    let encode = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let claims = claims_of(&ex.token(json!({})));
    let unsigned = format!(
        "{}.{}.",
        encode(&json!({"alg": "none", "typ": "JWT", "kid": "test-rsa"})),
        encode(&claims)
    );
    ex.refused(&unsigned, 401, "invalid_grant").await;
}

#[tokio::test]
async fn hs256_signed_with_the_issuers_public_key_is_refused() {
    let ex = exchange(GH_RULE, "").await;
    let claims = claims_of(&ex.token(json!({})));
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("test-rsa".into());
    let forged =
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(JWKS.as_bytes())).unwrap();
    let why = ex.refused(&forged, 401, "invalid_grant").await;
    assert!(why.contains("HS256") || why.contains("algorithm"), "{why}");
}

#[tokio::test]
async fn an_unknown_issuer_is_refused() {
    let ex = exchange(GH_RULE, "").await;
    let other = Issuer::start().await;
    let token = other.mint("repo:org/app", AUD, 300, false);
    ex.refused(&token, 401, "invalid_grant").await;
}

#[tokio::test]
async fn a_wrong_audience_is_refused() {
    let ex = exchange(GH_RULE, "").await;
    let why = ex
        .refused(
            &ex.token(json!({"aud": "https://elsewhere"})),
            401,
            "invalid_grant",
        )
        .await;
    assert!(why.contains("audience"), "{why}");
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let ex = exchange(GH_RULE, "").await;
    let why = ex
        .refused(&ex.token(json!({"exp": now() - 120})), 401, "invalid_grant")
        .await;
    assert!(why.contains("expired"), "{why}");
}

#[tokio::test]
async fn a_token_not_valid_yet_is_refused() {
    let ex = exchange(GH_RULE, "").await;
    let why = ex
        .refused(&ex.token(json!({"nbf": now() + 600})), 401, "invalid_grant")
        .await;
    assert!(why.contains("nbf"), "{why}");
}

#[tokio::test]
async fn a_tampered_payload_is_refused() {
    let ex = exchange(GH_RULE, "").await;
    let token = ex.token(json!({"repository": "stranger/app"}));
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    let mut claims = claims_of(&token);
    claims["repository"] = json!("org/app");
    parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string());
    let why = ex.refused(&parts.join("."), 401, "invalid_grant").await;
    assert!(why.contains("signature"), "{why}");
}

#[tokio::test]
async fn an_unknown_kid_refetches_once_then_refuses_without_a_storm() {
    let ex = exchange(GH_RULE, "").await;
    assert_eq!(ex.exchange(&ex.token(json!({})), None).await.0, 200);
    assert_eq!(ex.issuer.jwks_requests.load(Ordering::SeqCst), 1);
    let claims = claims_of(&ex.token(json!({})));
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rotated-away".into());
    let key = EncodingKey::from_rsa_pem(include_bytes!("support/keys/rsa.pem")).unwrap();
    let unknown = jsonwebtoken::encode(&header, &claims, &key).unwrap();
    let why = ex.refused(&unknown, 401, "invalid_grant").await;
    assert!(why.contains("rotated-away"), "{why}");
    assert_eq!(
        ex.issuer.jwks_requests.load(Ordering::SeqCst),
        2,
        "one refetch"
    );
    let ex = std::sync::Arc::new(ex);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (ex, unknown) = (ex.clone(), unknown.clone());
        tasks.spawn(async move {
            for _ in 0..63 {
                assert_eq!(ex.exchange(&unknown, None).await.0, 401);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!(
        ex.issuer.jwks_requests.load(Ordering::SeqCst),
        2,
        "1,008 unknown kids, no more fetches"
    );
}

#[tokio::test]
async fn an_issuer_that_is_down_is_not_asked_once_per_request() {
    let ex = exchange(GH_RULE, "").await;
    let token = ex.token(json!({}));
    // Its keys live behind a port nothing listens on.
    let config = std::fs::read_to_string(ex.dir.path().join("exchange.toml")).unwrap();
    let dead = format!("http://{}/jwks", support::refusing_addr());
    let config = config.replace("listen = \"127.0.0.1:0\"\n", "").replace(
        &format!("audience = \"{AUD}\"\n"),
        &format!("audience = \"{AUD}\"\njwks-url = \"{dead}\"\n"),
    );
    let down_dir = tempfile::tempdir().unwrap();
    let down = Sidecar::start_exchange(down_dir.path(), &config);
    let down = Exchange {
        service: down,
        issuer: ex.issuer.clone(),
        dir: down_dir,
    };
    for _ in 0..50 {
        let (status, body) = down.exchange(&token, None).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (503, Some("temporarily_unavailable")),
            "{body}"
        );
    }
    let health = support::http::get(&format!("{}/healthz", down.service.url), "GET", &[]).await;
    assert!(
        health.text().contains("\"jwks_fetches\":1"),
        "{}",
        health.text()
    );
}

#[tokio::test]
async fn a_list_or_object_where_a_glob_expects_a_string_is_no_match() {
    let ex = exchange(GH_RULE, "").await;
    ex.refused(
        &ex.token(json!({"repository": ["org/app"]})),
        403,
        "unauthorized_client",
    )
    .await;
    ex.refused(
        &ex.token(json!({"repository": {"name": "org/app"}})),
        403,
        "unauthorized_client",
    )
    .await;
    ex.refused(
        &ex.token(json!({"repository": 7})),
        403,
        "unauthorized_client",
    )
    .await;
}

#[tokio::test]
async fn oversized_tokens_and_bodies_are_refused() {
    let ex = exchange(GH_RULE, "").await;
    let huge = ex.token(json!({"padding": "x".repeat(20_000)}));
    let why = ex.refused(&huge, 400, "invalid_request").await;
    assert!(why.contains("longer"), "{why}");
    let (status, body) = ex
        .post_raw("application/x-www-form-urlencoded", vec![b'a'; 100_000])
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (413, Some("invalid_request"))
    );
    let (status, body) = ex.post_raw("application/json", b"{}".to_vec()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let (status, body) = ex.post(&[("grant_type", "password")]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );
    let token = ex.token(json!({}));
    let untyped = [
        ("grant_type", GRANT_TYPE),
        ("subject_token", token.as_str()),
    ];
    let (status, body) = ex.post(&untyped).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "RFC 8693: the type is required"
    );
}

#[tokio::test]
async fn a_denied_subject_is_refused_within_a_second_of_the_deny_file_changing() {
    let deny = tempfile::NamedTempFile::new().unwrap();
    let extra = format!("deny-file = \"{}\"", deny.path().display());
    let ex = exchange(GH_RULE, &extra).await;
    assert_eq!(ex.exchange(&ex.token(json!({})), None).await.0, 200);
    std::fs::write(
        deny.path(),
        "# leaked on 2026-11-29\nrepo:org/app:ref:refs/heads/main\n",
    )
    .unwrap();
    let changed = Instant::now();
    let token = ex.token(json!({}));
    loop {
        let (status, body) = ex.exchange(&token, None).await;
        if status == 403 {
            assert_eq!(body["error"], "unauthorized_client");
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "still granted after a second"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A denied jti, too.
    std::fs::write(deny.path(), "stolen-jti-1\n").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ex.exchange(&ex.token(json!({})), None).await.0, 200);
    ex.refused(
        &ex.token(json!({"jti": "stolen-jti-1"})),
        403,
        "unauthorized_client",
    )
    .await;
}

#[tokio::test]
async fn no_matching_rule_is_refused() {
    let ex = exchange(GH_RULE, "").await;
    let why = ex
        .refused(
            &ex.token(json!({"repository": "stranger/app"})),
            403,
            "unauthorized_client",
        )
        .await;
    assert!(why.contains("no rule"), "{why}");
}

#[tokio::test]
async fn a_scope_wider_than_the_grant_is_refused() {
    let pull_only = "[[rule]]\nissuer = \"{issuer}\"\ngrant = { \"org-*\" = [\"pull\"] }\n";
    let ex = exchange(pull_only, "").await;
    let (status, body) = ex.exchange(&ex.token(json!({})), Some("pull push")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_scope")),
        "{body}"
    );
    let (status, body) = ex.exchange(&ex.token(json!({})), Some("admin")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_scope")),
        "{body}"
    );
    let (status, _) = ex.exchange(&ex.token(json!({})), Some("pull")).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn health_metrics_check_config_and_sigterm() {
    let mut ex = exchange(GH_RULE, "").await;
    let _ = ex.exchange(&ex.token(json!({})), None).await;
    let _ = ex.exchange("garbage", None).await;
    let health = support::http::get(&format!("{}/healthz", ex.service.url), "GET", &[]).await;
    assert_eq!(health.status, 200);
    let metrics = support::http::get(&format!("{}/metrics", ex.service.url), "GET", &[])
        .await
        .text();
    assert!(
        metrics.contains("nix_sidecar_exchange_exchanges_total{result=\"granted\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nix_sidecar_exchange_exchanges_total{result=\"invalid_grant\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nix_sidecar_exchange_jwks_fetches_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nix_sidecar_exchange_seconds_count 2"),
        "{metrics}"
    );
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
        .args(["check-config", "--config"])
        .arg(ex.dir.path().join("exchange.toml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        text.contains("# 1 rule(s)")
            && !text.contains(&base64::engine::general_purpose::STANDARD.encode(attic::SECRET)),
        "{text}"
    );
    // A broken one names its key.
    let broken = ex.dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        "signing-key-file = \"/nonexistent\"\n[[rule]]\nissuer = \"x\"\ngrant = {}\n",
    )
    .unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
        .args(["check-config", "--config"])
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!check.status.success());
    assert!(String::from_utf8_lossy(&check.stderr).contains("signing-key-file"));
    // SIGTERM: a clean exit (stop() asserts the status).
    ex.service.stop();
}

#[tokio::test]
async fn each_subject_gets_its_rate_limit() {
    let ex = exchange(GH_RULE, "rate-limit = 3").await;
    for _ in 0..3 {
        assert_eq!(ex.exchange(&ex.token(json!({})), None).await.0, 200);
    }
    let (status, body) = ex.exchange(&ex.token(json!({})), None).await;
    assert_eq!(status, 429, "{body}");
    // Another subject is not held up by the first.
    let other = ex.token(json!({"sub": "repo:org/other:ref:refs/heads/main"}));
    assert_eq!(ex.exchange(&other, None).await.0, 200);
}

/// A self-signed certificate for 127.0.0.1 written to `dir/cert.pem` and `dir/key.pem`;
/// its PEM.
fn write_certificate(dir: &std::path::Path) -> String {
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    // Written whole, then renamed: a reader never sees half a file.
    for (name, text) in [
        ("cert.pem", made.cert.pem()),
        ("key.pem", made.key_pair.serialize_pem()),
    ] {
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
    made.cert.pem()
}

/// GET /healthz over HTTPS trusting only `ca_pem`: the status, or the error.
async fn health_over_tls(url: &str, ca_pem: &str, dir: &std::path::Path) -> Result<u16, String> {
    let ca = dir.join(format!("ca-{}.pem", fastrand::u32(..)));
    std::fs::write(&ca, ca_pem).unwrap();
    let client = nix_sidecar::http::client(Some(&ca)).unwrap();
    let request = http::Request::get(format!("{url}/healthz"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    client
        .request(request)
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test]
async fn tls_from_files_reloaded_when_they_change() {
    let tls_dir = tempfile::tempdir().unwrap();
    let first = write_certificate(tls_dir.path());
    let extra = format!(
        "tls-cert = \"{0}/cert.pem\"\ntls-key = \"{0}/key.pem\"",
        tls_dir.path().display()
    );
    let ex = exchange(GH_RULE, &extra).await;
    let url = ex.service.url.replace("http://", "https://");
    assert_eq!(health_over_tls(&url, &first, tls_dir.path()).await, Ok(200));
    let second = write_certificate(tls_dir.path());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The first handshake after the change may still see the old pair; the next ones not.
    let _ = health_over_tls(&url, &second, tls_dir.path()).await;
    assert_eq!(
        health_over_tls(&url, &second, tls_dir.path()).await,
        Ok(200)
    );
    assert!(
        health_over_tls(&url, &first, tls_dir.path()).await.is_err(),
        "the old certificate is gone"
    );
}

/// An exchange whose issuer's keys come from a file this test writes (`jwks-file`).
async fn exchange_with_jwks_file(jwks: &str) -> (Exchange, std::path::PathBuf) {
    let ex = exchange(GH_RULE, "").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks).unwrap();
    let config = std::fs::read_to_string(ex.dir.path().join("exchange.toml")).unwrap();
    let config = config.replace("listen = \"127.0.0.1:0\"\n", "").replace(
        &format!("audience = \"{AUD}\"\n"),
        &format!("audience = \"{AUD}\"\njwks-file = \"{}\"\n", file.display()),
    );
    let service = Sidecar::start_exchange(dir.path(), &config);
    (
        Exchange {
            service,
            issuer: ex.issuer.clone(),
            dir,
        },
        file,
    )
}

fn token_with_kid(ex: &Exchange, kid: &str) -> String {
    let claims = claims_of(&ex.token(json!({})));
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    let key = EncodingKey::from_rsa_pem(include_bytes!("support/keys/rsa.pem")).unwrap();
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

#[tokio::test]
async fn made_up_kids_do_not_keep_a_freshly_rotated_key_out() {
    let mut rsa_only: Value = serde_json::from_str(JWKS).unwrap();
    rsa_only["keys"]
        .as_array_mut()
        .unwrap()
        .retain(|k| k["kid"] == "test-rsa");
    let (ex, file) = exchange_with_jwks_file(&rsa_only.to_string()).await;
    let first = ex.exchange(&ex.token(json!({})), None).await;
    assert_eq!(first.0, 200, "{}\n{}", first.1, ex.service.logs());
    // An attacker spends the refetch clock with a kid nobody has...
    ex.refused(&token_with_kid(&ex, "made-up-1"), 401, "invalid_grant")
        .await;
    // ... and the issuer rotates to its EC key at that moment.
    std::fs::write(&file, JWKS).unwrap();
    let mut claims = claims_of(&ex.token(json!({})));
    claims["exp"] = json!(now() + 300);
    let rotated = ex.issuer.mint_claims(claims, true);
    let rotated_at = Instant::now();
    loop {
        // The attacker keeps at it, with a new kid each time.
        let made_up = token_with_kid(&ex, &format!("made-up-{}", fastrand_kid()));
        let _ = ex.exchange(&made_up, None).await;
        let (status, body) = ex.exchange(&rotated, None).await;
        if status == 200 {
            break;
        }
        assert!(
            rotated_at.elapsed() < Duration::from_secs(6),
            "the rotated key is still refused: {body}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("rotated key accepted after {:?}", rotated_at.elapsed());
}

fn fastrand_kid() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[tokio::test]
async fn times_that_are_not_numbers_are_refused() {
    let ex = exchange(GH_RULE, "").await;
    let far = (now() + 10 * 365 * 86400).to_string();
    for (claim, value) in [
        ("nbf", json!(far)),
        ("exp", json!(far)),
        ("iat", json!("yesterday")),
        ("nbf", json!({"t": 1})),
        ("exp", json!(-5)),
    ] {
        let why = ex
            .refused(&ex.token(json!({ claim: value })), 401, "invalid_grant")
            .await;
        assert!(why.contains(claim), "{claim}: {why}");
    }
    // A fractional time is a time.
    let t = now() as f64 - 1.5;
    assert_eq!(ex.exchange(&ex.token(json!({"nbf": t})), None).await.0, 200);
}

#[tokio::test]
async fn a_missing_deny_file_stops_the_start_and_an_unreadable_one_refuses_exchanges() {
    let issuer = Issuer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = attic::write_secret(dir.path());
    let deny = dir.path().join("deny");
    let config = format!(
        "listen = \"127.0.0.1:0\"\nsigning-key-file = \"{}\"\ndeny-file = \"{}\"\n[[issuer]]\nurl = \"{}\"\naudience = \"{AUD}\"\n{}",
        key.display(),
        deny.display(),
        issuer.url,
        GH_RULE.replace("{issuer}", &issuer.url)
    );
    let path = dir.path().join("exchange.toml");
    std::fs::write(&path, &config).unwrap();
    let started = std::process::Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
        .args(["exchange", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!started.status.success(), "started without its deny file");
    let said = String::from_utf8_lossy(&started.stderr);
    assert!(said.contains("deny-file"), "{said}");
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&check.stderr).contains("deny-file: cannot read"),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Readable at the start; then unreadable (a directory now stands there): refused, 503.
    std::fs::write(&deny, "").unwrap();
    let ex = Exchange {
        service: Sidecar::start_exchange(
            dir.path(),
            &config.replace("listen = \"127.0.0.1:0\"\n", ""),
        ),
        issuer,
        dir,
    };
    assert_eq!(ex.exchange(&ex.token(json!({})), None).await.0, 200);
    std::fs::remove_file(&deny).unwrap();
    std::fs::create_dir(&deny).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = ex.exchange(&ex.token(json!({})), None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("temporarily_unavailable")),
        "{body}"
    );
    assert!(ex.service.logs().contains("ERROR"), "{}", ex.service.logs());
    let metrics = support::http::get(&format!("{}/metrics", ex.service.url), "GET", &[])
        .await
        .text();
    assert!(
        metrics.contains("nix_sidecar_exchange_deny_file_readable 0"),
        "{metrics}"
    );
    // Readable again: exchanges resume.
    std::fs::remove_dir(&deny).unwrap();
    std::fs::write(&deny, "someone-else\n").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ex.exchange(&ex.token(json!({})), None).await.0, 200);
}

#[tokio::test]
async fn every_result_series_is_exported_from_the_start() {
    let ex = exchange(GH_RULE, "").await;
    let metrics = support::http::get(&format!("{}/metrics", ex.service.url), "GET", &[])
        .await
        .text();
    for result in [
        "invalid_target",
        "rate_limited",
        "temporarily_unavailable",
        "granted",
    ] {
        assert!(
            metrics.contains(&format!(
                "nix_sidecar_exchange_exchanges_total{{result=\"{result}\"}} 0"
            )),
            "{result}: {metrics}"
        );
    }
}

#[tokio::test]
async fn check_config_names_the_risky_settings() {
    let dir = tempfile::tempdir().unwrap();
    let key = attic::write_secret(dir.path());
    let config = format!(
        "signing-key-file = \"{}\"\n[[issuer]]\nurl = \"https://token.actions.githubusercontent.com\"\naudience = \"{AUD}\"\njwks-url = \"http://keys.example.org/jwks\"\n[aws]\naudience = \"{AUD}\"\nsts-endpoint = \"http://sts.example.org/\"\n[[rule]]\nissuer = \"https://token.actions.githubusercontent.com\"\ngrant = {{ \"org-*\" = [\"pull\"] }}\n[[rule]]\naws-account = \"*\"\ngrant = {{ \"org-*\" = [\"pull\"] }}\n",
        key.display()
    );
    let path = dir.path().join("exchange.toml");
    std::fs::write(&path, config).unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_nix-sidecar"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(check.status.success());
    let said = String::from_utf8_lossy(&check.stderr);
    for expected in [
        "rule[0]: no claims narrow it, so every GitHub Actions job of every repository on GitHub",
        "rule[1]: aws-arn and aws-account match anything",
        "issuer[0].jwks-url: plain http://",
        "aws.sts-endpoint: plain http://",
        "deny-file is not set",
    ] {
        assert!(said.contains(expected), "{expected}:\n{said}");
    }
}

/// Opens `n` TCP connections to `addr` that never send a byte.
fn idle_connections(addr: &str, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect()
}

#[tokio::test]
async fn eleven_hundred_idle_connections_under_a_1024_fd_limit_leave_health_and_exchanges_answered()
{
    let issuer = Issuer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let key = attic::write_secret(dir.path());
    let config = format!(
        "signing-key-file = \"{}\"\n[[issuer]]\nurl = \"{}\"\naudience = \"{AUD}\"\n{}",
        key.display(),
        issuer.url,
        GH_RULE.replace("{issuer}", &issuer.url)
    );
    // systemd's default: a soft limit of 1024, a higher hard one.
    let ex = Exchange {
        service: Sidecar::start_exchange_wrapped(
            dir.path(),
            &config,
            &["prlimit", "--nofile=1024:", "--"],
        ),
        issuer,
        dir,
    };
    // This test's own side needs 1,100 descriptors too.
    support::raise_nofile();
    let addr = ex.service.url.trim_start_matches("http://").to_string();
    let addr2 = addr.clone();
    let held = tokio::task::spawn_blocking(move || idle_connections(&addr2, 1100))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let health = tokio::time::timeout(
        Duration::from_secs(5),
        support::http::get(&format!("{}/healthz", ex.service.url), "GET", &[]),
    )
    .await
    .expect("/healthz within 5 s");
    assert_eq!(health.status, 200);
    let (status, _) = tokio::time::timeout(
        Duration::from_secs(5),
        ex.exchange(&ex.token(json!({})), None),
    )
    .await
    .expect("an exchange within 5 s");
    assert_eq!(status, 200);
    assert!(!ex.service.logs().contains("Too many open files"));
    drop(held);
}
