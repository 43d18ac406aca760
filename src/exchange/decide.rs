//! One exchange, from the form to the answer: the request checked, the subject token
//! verified, deny list and rate limit consulted, the rules applied, a token minted, and one
//! audit line written whatever the outcome (never with a token in it).

use prometheus_client::metrics::gauge::Gauge;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use super::aws::{self, Aws};
use super::config::ServiceConfig;
use super::issuers::{Issuers, Refused};
use super::mint::Minter;
use super::policy::{self, Narrowing, Subject};
use super::SetupError;

pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
const ID_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id_token";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// The largest subject token taken (real ones are 1-2 KiB; AWS ones about 1.5 KiB).
pub const MAX_TOKEN: usize = 16 * 1024;

/// The RFC 6749 error answer: status, `error`, `error_description`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub error: &'static str,
    pub description: String,
}

impl Refusal {
    fn new(status: u16, error: &'static str, description: impl Into<String>) -> Refusal {
        Refusal {
            status,
            error,
            description: description.into(),
        }
    }

    pub fn body(&self) -> String {
        json!({"error": self.error, "error_description": self.description}).to_string()
    }

    /// The label under which metrics count it.
    pub fn result(&self) -> &'static str {
        match self.status {
            429 => "rate_limited",
            503 => "temporarily_unavailable",
            _ => self.error,
        }
    }
}

pub struct Granted {
    pub body: String,
}

/// What a `POST /token` form asks.
#[derive(Debug)]
pub struct Form {
    pub subject_token: String,
    pub subject_token_type: String,
    pub scope: Option<String>,
    pub audience: Option<String>,
}

/// Reads and checks a form (RFC 8693 2.1): no repeated field, the token-exchange grant
/// type, a subject token of sane size, a requested token type we can issue.
pub fn parse_form(form: &[u8]) -> Result<Form, Refusal> {
    let mut fields: HashMap<String, String> = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(form) {
        if fields.insert(k.to_string(), v.into_owned()).is_some() {
            return Err(Refusal::new(
                400,
                "invalid_request",
                format!("`{k}` is repeated"),
            ));
        }
    }
    if fields.get("grant_type").map(String::as_str) != Some(GRANT_TYPE) {
        return Err(Refusal::new(
            400,
            "invalid_request",
            format!("grant_type must be {GRANT_TYPE}"),
        ));
    }
    let subject_token = fields
        .remove("subject_token")
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Refusal::new(400, "invalid_request", "subject_token is missing"))?;
    if subject_token.len() > MAX_TOKEN {
        return Err(Refusal::new(
            400,
            "invalid_request",
            format!("subject_token is longer than {MAX_TOKEN} bytes"),
        ));
    }
    let subject_token_type = fields
        .remove("subject_token_type")
        .ok_or_else(|| Refusal::new(400, "invalid_request", "subject_token_type is missing"))?;
    if let Some(asked) = fields.get("requested_token_type") {
        if asked != JWT_TYPE && asked != ACCESS_TOKEN_TYPE {
            return Err(Refusal::new(
                400,
                "invalid_request",
                format!("requested_token_type {asked} cannot be issued (only {JWT_TYPE})"),
            ));
        }
    }
    Ok(Form {
        subject_token,
        subject_token_type,
        scope: fields.remove("scope"),
        audience: fields.remove("audience"),
    })
}

pub struct Decider {
    issuers: Issuers,
    aws: Option<Aws>,
    rules: Vec<policy::Rule>,
    minter: Minter,
    /// An `audience` equal to this (the minted tokens' own) narrows nothing.
    minted_audience: Option<String>,
    deny: DenyList,
    limiter: RateLimiter,
    audit: Audit,
}

impl Decider {
    pub fn new(config: &ServiceConfig) -> Result<Decider, SetupError> {
        let client = crate::http::client(None)?;
        let issuers = config
            .issuers
            .iter()
            .map(|c| super::issuers::Issuer::new(c.clone(), &client).map(std::sync::Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Decider {
            issuers: Issuers(issuers),
            aws: config.aws.clone().map(|c| Aws::new(c, client.clone())),
            rules: config.rules.clone(),
            minter: Minter::load(
                &config.signing_key_file,
                config.minted_issuer.clone(),
                config.minted_audience.clone(),
                config.ttl,
            )?,
            minted_audience: config.minted_audience.clone(),
            deny: DenyList::open(config.deny_file.clone())?,
            limiter: RateLimiter::new(config.rate_limit),
            audit: Audit::open(config.audit_log.as_ref())?,
        })
    }

    pub fn issuers(&self) -> &Issuers {
        &self.issuers
    }

    /// See [`DenyList::readable_gauge`].
    pub fn deny_file_readable(&self) -> Gauge {
        self.deny.readable_gauge()
    }

    /// Answers one `POST /token` form.
    pub async fn exchange(&self, form: &[u8]) -> Result<Granted, Refusal> {
        let form = parse_form(form).map_err(|r| self.refuse(None, r))?;
        let token = form.subject_token.as_str();
        let subject = self
            .verify(token, &form.subject_token_type)
            .await
            .map_err(|r| self.refuse(None, r))?;
        let name = subject.name();
        self.admit(&subject, &name)
            .map_err(|r| self.refuse(Some(&name), r))?;
        let (grant, matched) = policy::grant(&self.rules, &subject);
        if matched.is_empty() {
            return Err(self.refuse(
                Some(&name),
                Refusal::new(
                    403,
                    "unauthorized_client",
                    "no rule grants this identity anything",
                ),
            ));
        }
        let cache = form
            .audience
            .as_deref()
            .filter(|a| Some(*a) != self.minted_audience.as_deref());
        let grant = policy::narrow(&grant, form.scope.as_deref(), cache)
            .map_err(|n| self.refuse(Some(&name), narrowing_refused(n)))?;
        let minted = self.minter.mint(&name, &grant).map_err(|e| {
            let why = format!("cannot sign: {e}");
            self.refuse(Some(&name), Refusal::new(500, "server_error", why))
        })?;
        self.audit.write(json!({
            "result": "granted", "subject": name, "rules": matched, "grant": grant,
            "jti": minted.jti, "exp": minted.exp,
        }));
        let body = json!({
            "access_token": minted.token.expose(),
            "issued_token_type": JWT_TYPE,
            "token_type": "Bearer",
            "expires_in": self.minter.ttl().as_secs(),
        })
        .to_string();
        Ok(Granted { body })
    }

    /// Whether `subject` may exchange now: not on the deny list (which must be readable),
    /// and within its rate limit.
    fn admit(&self, subject: &Subject, name: &str) -> Result<(), Refusal> {
        let jti = match subject {
            Subject::Oidc { claims, .. } => claims["jti"].as_str().map(str::to_string),
            Subject::Aws { .. } => None,
        };
        match self.deny.denies(subject, jti.as_deref()) {
            Ok(None) => {}
            Ok(Some(denied)) => {
                let why = format!("{denied} is denied");
                return Err(Refusal::new(403, "unauthorized_client", why));
            }
            Err(why) => {
                return Err(Refusal::new(
                    503,
                    "temporarily_unavailable",
                    format!("the deny list cannot be read ({why}); try again later"),
                ))
            }
        }
        if !self.limiter.allow(name) {
            return Err(Refusal::new(
                429,
                "invalid_request",
                "too many exchanges for this subject; try again in a minute",
            ));
        }
        Ok(())
    }

    async fn verify(&self, token: &str, kind: &str) -> Result<Subject, Refusal> {
        let refused = |r: Refused| match r {
            Refused::Token(why) => Refusal::new(401, "invalid_grant", why),
            Refused::KeysUnavailable(why) => Refusal::new(503, "temporarily_unavailable", why),
        };
        match kind {
            aws::TOKEN_TYPE => match &self.aws {
                Some(aws) => aws.verify(token).await.map_err(refused),
                None => Err(Refusal::new(
                    400,
                    "invalid_request",
                    "AWS identities are not accepted here",
                )),
            },
            JWT_TYPE | ID_TOKEN_TYPE => {
                let Some(issuer) = self.issuers.find(token) else {
                    return Err(Refusal::new(
                        401,
                        "invalid_grant",
                        "the token is not a JWT from a trusted issuer",
                    ));
                };
                let claims = issuer.verify(token).await.map_err(refused)?;
                Ok(Subject::Oidc {
                    issuer: issuer.config.url.clone(),
                    claims,
                })
            }
            other => Err(Refusal::new(
                400,
                "invalid_request",
                format!("subject_token_type {other} is not supported"),
            )),
        }
    }

    fn refuse(&self, subject: Option<&str>, refusal: Refusal) -> Refusal {
        self.audit.write(json!({
            "result": refusal.result(), "subject": subject, "reason": refusal.description,
        }));
        refusal
    }
}

/// Subjects (`<issuer>|<sub>`, a bare `sub`, an AWS ARN) and token `jti`s refused, one a
/// line, `#` comments; the file is looked at again at most every 200 ms and re-read when it
/// changed.
struct DenyList {
    path: Option<PathBuf>,
    state: Mutex<DenyState>,
    readable: Gauge,
}

#[derive(Default)]
struct DenyState {
    entries: HashSet<String>,
    seen: Option<(SystemTime, u64)>,
    checked: Option<Instant>,
    /// Why the file cannot be read now.
    unreadable: Option<String>,
}

impl DenyList {
    /// The list at `path`, which must be readable now: an exchange that cannot tell who is
    /// denied does not start.
    fn open(path: Option<PathBuf>) -> Result<DenyList, SetupError> {
        let list = DenyList {
            path,
            state: Mutex::default(),
            readable: Gauge::default(),
        };
        list.readable.set(1);
        if let Some(path) = &list.path {
            let mut state = list.state.lock().unwrap();
            list.reload(path, &mut state);
            if let Some(why) = &state.unreadable {
                return Err(SetupError::DenyFile(why.clone()));
            }
        }
        Ok(list)
    }

    /// 1 while the deny file can be read (or none is configured), 0 while exchanges are
    /// refused because it cannot.
    pub fn readable_gauge(&self) -> Gauge {
        self.readable.clone()
    }

    fn reload(&self, path: &std::path::Path, state: &mut DenyState) {
        let read = std::fs::metadata(path)
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
            .and_then(|meta| {
                if Some(meta) == state.seen && state.unreadable.is_none() {
                    return Ok(None);
                }
                std::fs::read_to_string(path).map(|text| Some((meta, text)))
            });
        match read {
            Ok(None) => {}
            Ok(Some((meta, text))) => {
                state.seen = Some(meta);
                state.entries = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_string)
                    .collect();
                if state.unreadable.take().is_some() {
                    tracing::warn!("deny file readable again: exchanges resume");
                }
                self.readable.set(1);
                tracing::info!(entries = state.entries.len(), "deny file read");
            }
            Err(e) => {
                let why = format!("cannot read {}: {e}", path.display());
                if state.unreadable.is_none() {
                    tracing::error!(reason = %why, "deny file unreadable: every exchange is refused until it can be read");
                }
                self.readable.set(0);
                state.unreadable = Some(why);
            }
        }
    }

    /// Which entry denies this subject or token, if one does; `Err` while the list cannot
    /// be read (a deny list that fails open would let a revoked subject in).
    fn denies(&self, subject: &Subject, jti: Option<&str>) -> Result<Option<String>, Unreadable> {
        let Some(path) = self.path.as_ref() else {
            return Ok(None);
        };
        let mut state = self.state.lock().unwrap();
        if state
            .checked
            .is_none_or(|at| at.elapsed() >= Duration::from_millis(200))
        {
            state.checked = Some(Instant::now());
            self.reload(path, &mut state);
        }
        if let Some(why) = &state.unreadable {
            return Err(Unreadable(why.clone()));
        }
        let mut names = vec![subject.name()];
        match subject {
            Subject::Oidc { claims, .. } => {
                names.extend(claims["sub"].as_str().map(str::to_string))
            }
            Subject::Aws { arn, .. } => names.push(arn.clone()),
        }
        names.extend(jti.map(str::to_string));
        Ok(names.into_iter().find(|n| state.entries.contains(n)))
    }
}

/// The deny file cannot be read now: why, with its path.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Unreadable(String);

/// A token bucket per subject: `per_minute` exchanges, refilled evenly.
struct RateLimiter {
    per_minute: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    fn new(per_minute: u32) -> RateLimiter {
        RateLimiter {
            per_minute: f64::from(per_minute),
            buckets: Mutex::default(),
        }
    }

    fn allow(&self, subject: &str) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap();
        if buckets.len() > 100_000 {
            // Subjects whose buckets have refilled carry no state worth keeping.
            let full = self.per_minute;
            buckets.retain(|_, (tokens, at)| {
                *tokens + at.elapsed().as_secs_f64() * full / 60.0 < full
            });
        }
        let (tokens, at) = buckets
            .entry(subject.to_string())
            .or_insert((self.per_minute, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_minute / 60.0)
            .min(self.per_minute);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One JSON line per decision, to a file or (without one) the log.
struct Audit(Option<Mutex<std::fs::File>>);

impl Audit {
    fn open(path: Option<&PathBuf>) -> Result<Audit, SetupError> {
        let file = path
            .map(|p| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| SetupError::AuditLog {
                        path: p.clone(),
                        source,
                    })
            })
            .transpose()?;
        Ok(Audit(file.map(Mutex::new)))
    }

    fn write(&self, mut line: serde_json::Value) {
        line["time"] = json!(crate::clock::unix_now());
        match &self.0 {
            Some(file) => {
                let mut text = line.to_string();
                text.push('\n');
                if let Err(e) = file.lock().unwrap().write_all(text.as_bytes()) {
                    tracing::warn!(error = %e, "cannot write the audit log");
                }
            }
            None => tracing::info!(target: "audit", "{line}"),
        }
    }
}
/// The answer to a scope or audience that asks for more than the rules grant.
fn narrowing_refused(narrowing: Narrowing) -> Refusal {
    match narrowing {
        Narrowing::UnknownScope(word) => Refusal::new(
            400,
            "invalid_scope",
            format!("scope `{word}` is not pull or push"),
        ),
        Narrowing::Wider(right) => Refusal::new(
            400,
            "invalid_scope",
            format!("scope asks for {right}, which no matching rule grants"),
        ),
        Narrowing::NoSuchCache(cache) => Refusal::new(
            400,
            "invalid_target",
            format!("no matching rule grants anything on cache `{cache}`"),
        ),
    }
}
