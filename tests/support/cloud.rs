//! Identity provider doubles on one loopback server, each following its wire contract:
//! GitHub Actions OIDC, the GCP metadata server, Azure IMDS, AWS IMDSv2 and STS, and an
//! RFC 8693 token exchange that verifies JWTs against the issuer's JWKS and AWS tokens by
//! replaying them to the STS double (which re-signs with the same keys and compares).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use nix_sidecar::identity::aws::{presign, AwsCredentials};
use nix_sidecar::secret::Secret;
use serde_json::json;

use super::http::{get, respond, serve, Body};
use super::issuer::Issuer;

pub const GITHUB_REQUEST_TOKEN: &str = "ghs_request-token-SECRET-1234";
pub const IMDS_SESSION_TOKEN: &str = "imds-session-SECRET-5678";
pub const AWS_KEY_ID: &str = "AKIDNIXSIDECARTEST";
pub const AWS_SECRET: &str = "nix-sidecar/test+secret/KEY";
pub const AWS_SESSION: &str = "aws-session-token-SECRET-9999";
pub const AWS_ARN: &str = "arn:aws:sts::123456789012:assumed-role/builder/i-0abc";
/// App Service's per-process secret header value.
pub const APP_SERVICE_HEADER: &str = "app-service-identity-header-SECRET";
/// The object (principal) id of the user-assigned identity the doubles know.
pub const AZURE_OBJECT_ID: &str = "0f2b8c1e-object";
/// The AKS workload identity's client id and tenant.
pub const AZURE_WI_CLIENT: &str = "4a1c-wi-client";
pub const AZURE_TENANT: &str = "72f988bf-tenant";

pub struct Cloud {
    pub addr: SocketAddr,
    pub url: String,
    state: Arc<State>,
}

struct State {
    issuer: Issuer,
    /// The `sub` of tokens minted for each source.
    sub: String,
    audience_for_exchange: String,
    lifetime: AtomicI64,
    down: AtomicBool,
    gcp_rejects_format_full: AtomicBool,
    /// Routes whose next call answers this status instead.
    fail_next: Mutex<HashMap<&'static str, u16>>,
    /// The key file Azure Arc's challenge names.
    arc_key_file: Mutex<Option<std::path::PathBuf>>,
    calls: Mutex<HashMap<&'static str, usize>>,
    port: std::sync::OnceLock<u16>,
}

impl Cloud {
    pub async fn start(issuer: &Issuer, sub: &str, exchange_audience: &str) -> Cloud {
        let state = Arc::new(State {
            issuer: issuer.clone(),
            sub: sub.into(),
            audience_for_exchange: exchange_audience.into(),
            lifetime: AtomicI64::new(300),
            down: AtomicBool::new(false),
            gcp_rejects_format_full: AtomicBool::new(false),
            fail_next: Mutex::default(),
            arc_key_file: Mutex::default(),
            calls: Mutex::default(),
            port: std::sync::OnceLock::new(),
        });
        let s = state.clone();
        let addr = serve(move |req| handle(s.clone(), req)).await;
        state.port.set(addr.port()).unwrap();
        Cloud {
            addr,
            url: format!("http://{addr}"),
            state,
        }
    }

    pub fn set_lifetime(&self, secs: i64) {
        self.state.lifetime.store(secs, Ordering::SeqCst);
    }

    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    pub fn gcp_rejects_format_full(&self) {
        self.state
            .gcp_rejects_format_full
            .store(true, Ordering::SeqCst);
    }

    /// The next call of `route` (a name as counted by `calls`) answers `status`.
    pub fn fail_next(&self, route: &'static str, status: u16) {
        self.state.fail_next.lock().unwrap().insert(route, status);
    }

    /// Azure Arc's challenge names this key file (whose contents are the expected key).
    pub fn set_arc_key_file(&self, path: &std::path::Path) {
        *self.state.arc_key_file.lock().unwrap() = Some(path.to_path_buf());
    }

    pub fn calls(&self, route: &str) -> usize {
        *self.state.calls.lock().unwrap().get(route).unwrap_or(&0)
    }

    /// The environment the real SDKs read, pointed at this double.
    pub fn env(&self) -> Vec<(String, String)> {
        let a = self.addr;
        vec![
            (
                "ACTIONS_ID_TOKEN_REQUEST_URL".into(),
                format!("http://{a}/_github/token?api-version=2.0"),
            ),
            (
                "ACTIONS_ID_TOKEN_REQUEST_TOKEN".into(),
                GITHUB_REQUEST_TOKEN.into(),
            ),
            ("GCE_METADATA_HOST".into(), a.to_string()),
            (
                "AZURE_POD_IDENTITY_AUTHORITY_HOST".into(),
                format!("http://{a}"),
            ),
            (
                "AWS_EC2_METADATA_SERVICE_ENDPOINT".into(),
                format!("http://{a}"),
            ),
        ]
    }
}

/// Counts a call of `route`; a status to answer instead if one was queued for it.
fn count(state: &State, route: &'static str) -> Option<Response<Body>> {
    *state.calls.lock().unwrap().entry(route).or_default() += 1;
    let status = state.fail_next.lock().unwrap().remove(route)?;
    Some(respond(status, "injected failure"))
}

/// An Azure token answer; App Service's has only `expires_on` (unix seconds, a string).
fn azure_token(state: &State, resource: &str, with_expires_in: bool) -> Response<Body> {
    let lifetime = state.lifetime.load(Ordering::SeqCst);
    let jwt = state.issuer.mint(&state.sub, resource, lifetime, false);
    let now = super::issuer::now();
    let mut answer = json!({"access_token": jwt, "expires_on": (now + lifetime).to_string(),
                            "resource": resource, "token_type": "Bearer"});
    if with_expires_in {
        answer["expires_in"] = json!(lifetime.to_string());
    }
    respond(200, answer.to_string())
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if state.down.load(Ordering::SeqCst) && !path.starts_with("/sts") {
        return respond(503, "provider is down");
    }
    let q = query(&req);
    let lifetime = state.lifetime.load(Ordering::SeqCst);
    match path.as_str() {
        // The GCP metadata server's root, which google-auth's detection asks.
        "/" => Response::builder()
            .status(200)
            .header("metadata-flavor", "Google")
            .body(super::http::full("computeMetadata/\n"))
            .unwrap(),
        "/appservice/token" => {
            if let Some(injected) = count(&state, "appservice") {
                return injected;
            }
            if header(&req, "x-identity-header") != Some(APP_SERVICE_HEADER) {
                return respond(401, "bad X-IDENTITY-HEADER");
            }
            if q.get("api-version").map(String::as_str) != Some("2019-08-01") {
                return respond(400, "bad api-version");
            }
            if q.get("principal_id")
                .is_some_and(|id| id != AZURE_OBJECT_ID)
            {
                return respond(400, "no such identity");
            }
            let Some(resource) = q.get("resource") else {
                return respond(400, "resource required");
            };
            azure_token(&state, resource, false)
        }
        "/cloudshell/token" => {
            if let Some(injected) = count(&state, "cloudshell") {
                return injected;
            }
            if req.method() != http::Method::POST || header(&req, "metadata") != Some("true") {
                return respond(400, "POST with Metadata: true");
            }
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let form: HashMap<String, String> =
                url::form_urlencoded::parse(&body).into_owned().collect();
            let Some(resource) = form.get("resource") else {
                return respond(400, "resource required");
            };
            azure_token(&state, resource, true)
        }
        "/arc/token" => {
            if let Some(injected) = count(&state, "arc") {
                return injected;
            }
            let key_file = state.arc_key_file.lock().unwrap().clone().unwrap();
            let expected = format!(
                "Basic {}",
                std::fs::read_to_string(&key_file).unwrap().trim()
            );
            match header(&req, "authorization") {
                None => Response::builder()
                    .status(401)
                    .header(
                        "www-authenticate",
                        format!("Basic realm={}", key_file.display()),
                    )
                    .body(super::http::full(""))
                    .unwrap(),
                Some(a) if a == expected => azure_token(
                    &state,
                    q.get("resource").map(String::as_str).unwrap_or(""),
                    true,
                ),
                Some(_) => respond(401, "wrong key"),
            }
        }
        p if p.starts_with("/aad/") => {
            if let Some(injected) = count(&state, "aad") {
                return injected;
            }
            azure_workload_identity(&state, req).await
        }
        "/_github/token" => {
            if let Some(injected) = count(&state, "github") {
                return injected;
            }
            if header(&req, "authorization") != Some(&format!("Bearer {GITHUB_REQUEST_TOKEN}")) {
                return respond(401, "bad request token");
            }
            if q.get("api-version").map(String::as_str) != Some("2.0") {
                return respond(400, "api-version lost");
            }
            let aud = q
                .get("audience")
                .cloned()
                .unwrap_or_else(|| "https://github.com/org".into());
            let jwt = state.issuer.mint(&state.sub, &aud, lifetime, false);
            respond(200, json!({"value": jwt, "count": 1}).to_string())
        }
        "/computeMetadata/v1/instance/service-accounts/default/identity" => {
            if let Some(injected) = count(&state, "gcp") {
                return injected;
            }
            if header(&req, "metadata-flavor") != Some("Google") {
                return respond(403, "Missing Metadata-Flavor:Google header");
            }
            if q.contains_key("format") && state.gcp_rejects_format_full.load(Ordering::SeqCst) {
                return respond(400, "non-empty format is not supported");
            }
            let Some(aud) = q.get("audience") else {
                return respond(400, "audience required");
            };
            respond(
                200,
                state.issuer.mint(&state.sub, aud, lifetime.min(3600), true),
            )
        }
        "/metadata/identity/oauth2/token" => {
            if let Some(injected) = count(&state, "azure") {
                return injected;
            }
            if header(&req, "metadata") != Some("true") {
                return respond(400, json!({"error": "invalid_request", "error_description": "Required metadata header not specified"}).to_string());
            }
            if q.get("api-version").map(String::as_str) != Some("2018-02-01") {
                return respond(400, "bad api-version");
            }
            let Some(resource) = q.get("resource") else {
                return respond(400, "resource required");
            };
            if q.get("object_id").is_some_and(|id| id != AZURE_OBJECT_ID) {
                return respond(
                    400,
                    json!({"error": "invalid_request", "error_description": "Identity not found"})
                        .to_string(),
                );
            }
            azure_token(&state, resource, true)
        }
        "/latest/api/token" => {
            if let Some(injected) = count(&state, "imds-session") {
                return injected;
            }
            if req.method() != http::Method::PUT {
                return respond(405, "");
            }
            let Some(ttl) =
                header(&req, "x-aws-ec2-metadata-token-ttl-seconds").map(str::to_string)
            else {
                return respond(400, "ttl header required");
            };
            Response::builder()
                .status(200)
                .header("x-aws-ec2-metadata-token-ttl-seconds", ttl)
                .body(super::http::full(IMDS_SESSION_TOKEN))
                .unwrap()
        }
        p if p.starts_with("/latest/meta-data/iam/security-credentials/") => {
            if let Some(injected) = count(&state, "imds-credentials") {
                return injected;
            }
            if header(&req, "x-aws-ec2-metadata-token") != Some(IMDS_SESSION_TOKEN) {
                return respond(401, "");
            }
            let role = p.trim_start_matches("/latest/meta-data/iam/security-credentials/");
            if role.is_empty() {
                return respond(200, "builder\n");
            }
            let expiration =
                humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600))
                    .to_string();
            respond(
                200,
                json!({"Code": "Success", "Type": "AWS-HMAC", "AccessKeyId": AWS_KEY_ID, "SecretAccessKey": AWS_SECRET,
                       "Token": AWS_SESSION, "Expiration": expiration})
                .to_string(),
            )
        }
        "/sts/" => {
            if let Some(injected) = count(&state, "sts") {
                return injected;
            }
            sts(&req, &q)
        }
        "/sts-web" => {
            if let Some(injected) = count(&state, "sts-web") {
                return injected;
            }
            assume_role_with_web_identity(req).await
        }
        "/exchange" => {
            if let Some(injected) = count(&state, "exchange") {
                return injected;
            }
            exchange(&state, req).await
        }
        _ => respond(404, ""),
    }
}

/// Entra ID's token endpoint for AKS workload identity: a client-credentials grant whose
/// client assertion is the pod's projected token, verified against the issuer's JWKS.
async fn azure_workload_identity(state: &State, req: Request<Incoming>) -> Response<Body> {
    let error = |why: &str| {
        respond(
            400,
            json!({"error": "invalid_client", "error_description": why}).to_string(),
        )
    };
    if req.uri().path() != format!("/aad/{AZURE_TENANT}/oauth2/v2.0/token")
        || req.method() != http::Method::POST
    {
        return respond(404, "");
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    if field("grant_type") != "client_credentials"
        || field("client_id") != AZURE_WI_CLIENT
        || field("client_assertion_type")
            != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    {
        return error("AADSTS700016: bad client or grant");
    }
    if let Err(why) = verify_jwt(state, field("client_assertion")).await {
        return error(&format!("AADSTS700024: client assertion: {why}"));
    }
    let Some(resource) = field("scope").strip_suffix("/.default") else {
        return error("AADSTS70011: scope must end with /.default");
    };
    let lifetime = state.lifetime.load(Ordering::SeqCst);
    let jwt = state.issuer.mint(&state.sub, resource, lifetime, false);
    respond(200, json!({"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": jwt}).to_string())
}

/// STS AssumeRoleWithWebIdentity (EKS IRSA): an unsigned form POST carrying the pod's
/// projected token; answers the role's credentials in STS's XML.
async fn assume_role_with_web_identity(req: Request<Incoming>) -> Response<Body> {
    if req.method() != http::Method::POST || req.headers().contains_key("authorization") {
        return respond(
            400,
            "<ErrorResponse><Error><Code>InvalidAction</Code></Error></ErrorResponse>",
        );
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    if field("Action") != "AssumeRoleWithWebIdentity"
        || field("Version") != "2011-06-15"
        || field("RoleArn") != IRSA_ROLE
        || field("RoleSessionName").is_empty()
        || field("WebIdentityToken").split('.').count() != 3
    {
        return respond(
            400,
            "<ErrorResponse><Error><Code>InvalidIdentityToken</Code></Error></ErrorResponse>",
        );
    }
    let expiration =
        humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600));
    respond(
        200,
        format!(
            "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials>\
             <AccessKeyId>{AWS_KEY_ID}</AccessKeyId><SecretAccessKey>{AWS_SECRET}</SecretAccessKey>\
             <SessionToken>{AWS_SESSION}</SessionToken><Expiration>{expiration}</Expiration>\
             </Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"
        ),
    )
}

/// The role an IRSA pod assumes.
pub const IRSA_ROLE: &str = "arn:aws:iam::123456789012:role/irsa-builder";

/// STS GetCallerIdentity for presigned requests: re-sign with the known keys and compare.
fn sts(req: &Request<Incoming>, q: &HashMap<String, String>) -> Response<Body> {
    let deny = |why: &str| {
        respond(
            403,
            json!({"Error": {"Code": "SignatureDoesNotMatch", "Message": why}}).to_string(),
        )
    };
    let Some(audience) = header(req, "x-nix-sidecar-audience") else {
        return deny("audience header missing");
    };
    let credential = q.get("X-Amz-Credential").cloned().unwrap_or_default();
    let scope: Vec<&str> = credential.split('/').collect();
    if scope.len() != 5 || scope[0] != AWS_KEY_ID || scope[3] != "sts" {
        return deny("unknown access key");
    }
    if q.get("X-Amz-Security-Token").map(String::as_str) != Some(AWS_SESSION) {
        return deny("bad session token");
    }
    let Some(date) = q.get("X-Amz-Date") else {
        return deny("no date");
    };
    let Ok(time) = humantime::parse_rfc3339(&format!(
        "{}-{}-{}T{}:{}:{}Z",
        &date[0..4],
        &date[4..6],
        &date[6..8],
        &date[9..11],
        &date[11..13],
        &date[13..15]
    )) else {
        return deny("bad date");
    };
    if SystemTime::now().duration_since(time).unwrap_or_default() > Duration::from_secs(900) {
        return deny("expired");
    }
    let creds = AwsCredentials {
        access_key_id: AWS_KEY_ID.into(),
        secret_access_key: Secret::new(AWS_SECRET),
        session_token: Some(Secret::new(AWS_SESSION)),
        expiration: None,
    };
    let expected = presign(&creds, scope[2], audience, time).unwrap();
    let expected_sig = url::Url::parse(expected.expose())
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "X-Amz-Signature")
        .map(|(_, v)| v.into_owned());
    if q.get("X-Amz-Signature") != expected_sig.as_ref() {
        return deny("signature does not match");
    }
    respond(
        200,
        json!({"GetCallerIdentityResponse": {"GetCallerIdentityResult": {"Account": "123456789012", "Arn": AWS_ARN, "UserId": "AROAEXAMPLE:i-0abc"}}})
            .to_string(),
    )
}

async fn exchange(state: &State, req: Request<Incoming>) -> Response<Body> {
    let error = |code: &str, why: &str| {
        respond(
            400,
            json!({"error": code, "error_description": why}).to_string(),
        )
    };
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:token-exchange")
    {
        return error("invalid_request", "grant_type");
    }
    let Some(subject) = form.get("subject_token") else {
        return error("invalid_request", "no subject_token");
    };
    let sub = match form.get("subject_token_type").map(String::as_str) {
        Some("urn:ietf:params:oauth:token-type:jwt") => match verify_jwt(state, subject).await {
            Ok(sub) => sub,
            Err(why) => return error("invalid_request", &why),
        },
        Some("urn:nix-sidecar:token-type:aws-sts-presigned-url") => {
            match verify_aws(state, subject).await {
                Ok(arn) => arn,
                Err(why) => return error("invalid_request", &why),
            }
        }
        _ => return error("invalid_request", "unsupported subject_token_type"),
    };
    let lifetime = state.lifetime.load(Ordering::SeqCst);
    let token = state
        .issuer
        .mint(&sub, &state.audience_for_exchange, lifetime, false);
    respond(
        200,
        json!({"access_token": token, "issued_token_type": "urn:ietf:params:oauth:token-type:jwt", "token_type": "Bearer", "expires_in": lifetime})
            .to_string(),
    )
}

async fn verify_jwt(state: &State, token: &str) -> Result<String, String> {
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(super::issuer::JWKS).unwrap();
    let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
    let jwk = jwks
        .find(header.kid.as_deref().unwrap_or(""))
        .ok_or("unknown kid")?;
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.validate_aud = false;
    validation.set_issuer(&[&state.issuer.url]);
    let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation)
        .map_err(|e| e.to_string())?;
    Ok(data.claims["sub"].as_str().unwrap_or_default().to_string())
}

/// The verifier side of the AWS token: the exchange's own checks (src/exchange/aws.rs), then
/// a replay to (our) STS, which re-signs independently and compares.
async fn verify_aws(state: &State, token: &str) -> Result<String, String> {
    if token.len() > 8192 {
        return Err("token too long".into());
    }
    let now = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let url = nix_sidecar::exchange::aws::check(token, now).map_err(|e| e.to_string())?;
    // The replay: the real verifier calls `url` itself; the double's STS stands in for AWS.
    let replay = format!(
        "http://127.0.0.1:{}/sts/?{}",
        state.port.get().unwrap(),
        url.query().unwrap_or("")
    );
    let answer = get(
        &replay,
        "GET",
        &[
            ("x-nix-sidecar-audience", &state.audience_for_exchange),
            ("accept", "application/json"),
        ],
    )
    .await;
    if answer.status != 200 {
        return Err(format!("STS rejected it: {}", answer.text()));
    }
    let v: serde_json::Value = serde_json::from_str(&answer.text()).map_err(|e| e.to_string())?;
    Ok(
        v["GetCallerIdentityResponse"]["GetCallerIdentityResult"]["Arn"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}
