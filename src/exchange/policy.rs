//! Who gets what: allow-only rules matched against a verified identity, their grants
//! united, then narrowed by what the request asks for (never widened). Pure: no I/O.

use std::collections::BTreeMap;

use serde_json::Value;

/// A pattern where `*` matches any run of characters (none included); everything else is
/// literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

#[derive(Debug, thiserror::Error)]
#[error("an empty pattern matches nothing; use `*` for anything")]
pub struct EmptyPattern;

impl Glob {
    pub fn new(pattern: &str) -> Result<Glob, EmptyPattern> {
        if pattern.is_empty() {
            return Err(EmptyPattern);
        }
        Ok(Glob(pattern.to_string()))
    }

    /// Whether it matches everything (`*`, `**`, ...).
    pub fn is_anything(&self) -> bool {
        self.0.chars().all(|c| c == '*')
    }

    pub fn matches(&self, text: &str) -> bool {
        let mut parts = self.0.split('*');
        let first = parts.next().unwrap_or_default();
        let Some(mut rest) = text.strip_prefix(first) else {
            return false;
        };
        let parts: Vec<&str> = parts.collect();
        let Some((last, middle)) = parts.split_last() else {
            return rest.is_empty(); // no `*` at all
        };
        for part in middle {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        rest.len() >= last.len() && rest.ends_with(last)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Rights {
    pub pull: bool,
    pub push: bool,
}

impl Rights {
    fn union(self, other: Rights) -> Rights {
        Rights {
            pull: self.pull || other.pull,
            push: self.push || other.push,
        }
    }

    fn any(self) -> bool {
        self.pull || self.push
    }
}

/// Cache pattern (a name, or a prefix ending in `*`) -> rights.
pub type Grant = BTreeMap<String, Rights>;

#[derive(Debug, Clone)]
pub struct Rule {
    pub who: Who,
    pub grant: Grant,
}

#[derive(Debug, Clone)]
pub enum Who {
    /// Tokens of this issuer whose claims (dotted paths) are strings matching the globs.
    Issuer {
        issuer: String,
        claims: Vec<(Vec<String>, Glob)>,
    },
    /// AWS identities whose ARN and account match (an absent one matches any).
    Aws {
        arn: Option<Glob>,
        account: Option<Glob>,
    },
}

/// A verified identity.
#[derive(Debug, Clone)]
pub enum Subject {
    Oidc { issuer: String, claims: Value },
    Aws { arn: String, account: String },
}

impl Subject {
    /// How minted tokens and the audit log name it: `<issuer>|<sub>`, or `aws|<arn>`.
    pub fn name(&self) -> String {
        match self {
            Subject::Oidc { issuer, claims } => {
                format!("{issuer}|{}", claims["sub"].as_str().unwrap_or_default())
            }
            Subject::Aws { arn, .. } => format!("aws|{arn}"),
        }
    }
}

/// The string at a dotted path (`kubernetes.io.namespace` also finds the key
/// `kubernetes.io` holding `namespace`); anything else (absent, a list, an object, a
/// number) is no string, so no match.
fn claim<'a>(claims: &'a Value, path: &[String]) -> Option<&'a str> {
    if path.is_empty() {
        return claims.as_str();
    }
    let object = claims.as_object()?;
    // Longest key first: claim names themselves may hold dots.
    (1..=path.len()).rev().find_map(|n| {
        let key = path[..n].join(".");
        object.get(&key).and_then(|v| claim(v, &path[n..]))
    })
}

impl Rule {
    pub fn matches(&self, subject: &Subject) -> bool {
        match (&self.who, subject) {
            (
                Who::Issuer { issuer, claims },
                Subject::Oidc {
                    issuer: iss,
                    claims: values,
                },
            ) => {
                issuer == iss
                    && claims
                        .iter()
                        .all(|(path, glob)| claim(values, path).is_some_and(|v| glob.matches(v)))
            }
            (Who::Aws { arn, account }, Subject::Aws { arn: a, account: c }) => {
                arn.as_ref().is_none_or(|g| g.matches(a))
                    && account.as_ref().is_none_or(|g| g.matches(c))
            }
            _ => false,
        }
    }
}

/// The union of the grants of every rule `subject` matches, and which rules (by index).
pub fn grant(rules: &[Rule], subject: &Subject) -> (Grant, Vec<usize>) {
    let mut grant = Grant::new();
    let mut matched = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        if rule.matches(subject) {
            matched.push(i);
            for (pattern, rights) in &rule.grant {
                let entry = grant.entry(pattern.clone()).or_default();
                *entry = entry.union(*rights);
            }
        }
    }
    (grant, matched)
}

/// The rights `grant` gives on the cache `name` (or, for a pattern, on every cache it
/// names: a prefix pattern is covered by a shorter prefix), as Attic matches patterns.
fn held_by(grant: &Grant, name: &str) -> Rights {
    let mut held = Rights::default();
    for (pattern, rights) in grant {
        let covers = match pattern.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => pattern == name,
        };
        if covers {
            held = held.union(*rights);
        }
    }
    held
}

#[derive(Debug, PartialEq, Eq)]
pub enum Narrowing {
    /// `scope` holds a word that is not `pull` or `push`.
    UnknownScope(String),
    /// `scope` asks for a right no pattern of the grant has.
    Wider(&'static str),
    /// `audience` names a cache no pattern of the grant covers.
    NoSuchCache(String),
}

/// `grant` cut down to the rights in `scope` (space-separated `pull`/`push`; none: all) and,
/// when `cache` is given, to that one cache.
pub fn narrow(grant: &Grant, scope: Option<&str>, cache: Option<&str>) -> Result<Grant, Narrowing> {
    let wanted = match scope.map(str::trim).filter(|s| !s.is_empty()) {
        None => Rights {
            pull: true,
            push: true,
        },
        Some(scope) => {
            let mut wanted = Rights::default();
            for word in scope.split_whitespace() {
                match word {
                    "pull" => wanted.pull = true,
                    "push" => wanted.push = true,
                    other => return Err(Narrowing::UnknownScope(other.to_string())),
                }
            }
            if wanted.pull && !grant.values().any(|r| r.pull) {
                return Err(Narrowing::Wider("pull"));
            }
            if wanted.push && !grant.values().any(|r| r.push) {
                return Err(Narrowing::Wider("push"));
            }
            wanted
        }
    };
    let mut out = Grant::new();
    match cache {
        None => {
            for (pattern, rights) in grant {
                let cut = Rights {
                    pull: rights.pull && wanted.pull,
                    push: rights.push && wanted.push,
                };
                if cut.any() {
                    out.insert(pattern.clone(), cut);
                }
            }
        }
        Some(cache) => {
            let rights = held_by(grant, cache);
            let cut = Rights {
                pull: rights.pull && wanted.pull,
                push: rights.push && wanted.push,
            };
            if !cut.any() {
                return Err(Narrowing::NoSuchCache(cache.to_string()));
            }
            out.insert(cache.to_string(), cut);
        }
    }
    Ok(out)
}

/// Pull on every `org-` cache, push on `org-ci` (the fuzz target's and the tests' grant).
pub fn example_grant() -> Grant {
    let (pull, both) = (
        Rights {
            pull: true,
            push: false,
        },
        Rights {
            pull: true,
            push: true,
        },
    );
    [("org-*".to_string(), pull), ("org-ci".to_string(), both)].into()
}

/// The fuzz target's body (`fuzz/fuzz_targets/exchange_policy.rs`, replayed by
/// `tests/fuzz_corpus.rs`): lines of a claim glob, a scope and a cache, then claims JSON.
/// Panics if a narrowed grant is ever wider than the rule's.
pub fn fuzz_one(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(4, '\n');
    let (pattern, scope, cache, claims) = (
        lines.next().unwrap_or_default(),
        lines.next(),
        lines.next().filter(|c| !c.is_empty()),
        lines.next().unwrap_or_default(),
    );
    let Ok(glob) = Glob::new(pattern) else { return };
    let claims = serde_json::from_str(claims).unwrap_or(Value::Null);
    let rule = Rule {
        who: Who::Issuer {
            issuer: "i".into(),
            claims: vec![(vec!["a".into(), "b".into()], glob)],
        },
        grant: example_grant(),
    };
    let subject = Subject::Oidc {
        issuer: "i".into(),
        claims,
    };
    let (granted, matched) = grant(std::slice::from_ref(&rule), &subject);
    if let Ok(narrowed) = narrow(&granted, scope, cache) {
        assert!(is_within(&narrowed, &granted));
        assert!(narrowed.is_empty() || !matched.is_empty());
    }
}

/// Whether every right of `narrowed` is held, for its cache or pattern, by `grant`.
pub fn is_within(narrowed: &Grant, grant: &Grant) -> bool {
    narrowed.iter().all(|(name, rights)| {
        let held = held_by(grant, name);
        (!rights.pull || held.pull) && (!rights.push || held.push)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn globs() {
        let g = |p: &str| Glob::new(p).unwrap();
        assert!(g("org/*").matches("org/repo"));
        assert!(g("org/*").matches("org/"));
        assert!(!g("org/*").matches("org"));
        assert!(g("refs/heads/main").matches("refs/heads/main"));
        assert!(!g("refs/heads/main").matches("refs/heads/mainx"));
        assert!(g("a*b*c").matches("abc"));
        assert!(g("a*b*c").matches("a-b-b-c"));
        assert!(!g("a*b*c").matches("a-c-b"));
        assert!(g("*").matches(""));
        assert!(!g("ab*ba").matches("aba"), "the ends may not overlap");
    }

    fn gh_rule() -> Rule {
        Rule {
            who: Who::Issuer {
                issuer: "https://gh".into(),
                claims: vec![
                    (vec!["repository".into()], Glob::new("org/*").unwrap()),
                    (
                        vec!["kubernetes".into(), "io".into(), "namespace".into()],
                        Glob::new("ci").unwrap(),
                    ),
                ],
            },
            grant: [(
                "org-*".to_string(),
                Rights {
                    pull: true,
                    push: false,
                },
            )]
            .into(),
        }
    }

    #[test]
    fn claims_by_dotted_path_strings_only() {
        let rule = gh_rule();
        let subject = |claims| Subject::Oidc {
            issuer: "https://gh".into(),
            claims,
        };
        assert!(rule.matches(&subject(
            json!({"repository": "org/a", "kubernetes.io": {"namespace": "ci"}})
        )));
        assert!(rule.matches(&subject(
            json!({"repository": "org/a", "kubernetes": {"io": {"namespace": "ci"}}})
        )));
        assert!(!rule.matches(&subject(
            json!({"repository": ["org/a"], "kubernetes.io": {"namespace": "ci"}})
        )));
        assert!(!rule.matches(&subject(
            json!({"repository": {"x": 1}, "kubernetes.io": {"namespace": "ci"}})
        )));
        assert!(!rule.matches(&subject(json!({"repository": "org/a"}))));
        assert!(!rule.matches(&Subject::Oidc {
            issuer: "https://other".into(),
            claims: json!({"repository": "org/a", "kubernetes.io": {"namespace": "ci"}})
        }));
    }

    #[test]
    fn scope_and_cache_narrow_never_widen() {
        let grant = example_grant();
        let pull_only = narrow(&grant, Some("pull"), None).unwrap();
        assert!(pull_only.values().all(|r| r.pull && !r.push));
        assert_eq!(narrow(&grant, None, None).unwrap(), grant);
        assert_eq!(
            narrow(&grant, Some("push"), Some("org-ci")).unwrap(),
            [(
                "org-ci".to_string(),
                Rights {
                    pull: false,
                    push: true
                }
            )]
            .into()
        );
        assert_eq!(
            narrow(&grant, Some("push"), Some("org-web")),
            Err(Narrowing::NoSuchCache("org-web".into()))
        );
        assert_eq!(
            narrow(&grant, Some("delete"), None),
            Err(Narrowing::UnknownScope("delete".into()))
        );
        let pull_grant: Grant = [(
            "org-*".to_string(),
            Rights {
                pull: true,
                push: false,
            },
        )]
        .into();
        assert_eq!(
            narrow(&pull_grant, Some("pull push"), None),
            Err(Narrowing::Wider("push"))
        );
    }
}
