//! Property tests for everything that parses outside input: no input panics, and what is
//! accepted is safe to use.

use nix_sidecar::config::Config;
use nix_sidecar::identity::{jwt, netrc};
use nix_sidecar::nix::narinfo::{NarInfo, TrustedKeys};
use nix_sidecar::nix::request::{self, CachePath};
use nix_sidecar::nix::{base32, hash::Sha256};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn request_paths_never_escape(path in "(/|[a-z0-9./%_-]){0,80}", query in proptest::option::of("[a-z0-9=&%.-]{0,20}")) {
        if let Some(CachePath::Nar(key) | CachePath::Forwarded(key)) = request::parse(&path, query.as_deref()) {
            prop_assert!(!key.contains(".."));
            prop_assert!(!key.starts_with('/'));
            prop_assert!(key.split('/').all(|seg| !seg.is_empty() && !seg.starts_with('.')));
        }
    }

    #[test]
    fn narinfo_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = NarInfo::parse(&bytes);
    }

    #[test]
    fn narinfo_like_text_never_panics(lines in proptest::collection::vec(
        ("(StorePath|URL|Compression|FileHash|FileSize|NarHash|NarSize|References|Sig|Deriver|CA|X)", "[ -~]{0,80}"), 0..12)) {
        let text: String = lines.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
        if let Ok(info) = NarInfo::parse(text.as_bytes()) {
            let _ = info.fingerprint();
            let _ = TrustedKeys::default().verify(&info);
        }
    }

    #[test]
    fn jwt_claims_never_panic(token in "[A-Za-z0-9_.=-]{0,300}") {
        let _ = jwt::claims(&token);
    }

    #[test]
    fn netrc_never_panics(text in "(machine|login|password|default|macdef|[a-z0-9.]{1,8}| |\n){0,40}") {
        let _ = netrc::password_for(&text, "a.b");
    }

    #[test]
    fn hashes_and_base32_never_panic(text in "[ -~]{0,100}", len in 0usize..64) {
        let _ = Sha256::parse(&text);
        let _ = base32::decode(&text, len);
    }

    #[test]
    fn base32_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        prop_assert_eq!(base32::decode(&base32::encode(&bytes), bytes.len()), Some(bytes));
    }

    #[test]
    fn config_parsing_never_panics(text in "([a-z-]{1,20} = (\"[ -~]{0,20}\"|[0-9]{1,5}|true|\\[\\])\n|\\[\\[upstream\\]\\]\n|\\[identity\\.a\\]\n){0,8}") {
        let _ = Config::parse_str(&text);
    }
}

mod exchange_grants {
    use nix_sidecar::exchange::policy::{self, Glob, Grant, Rights, Rule, Subject, Who};
    use proptest::prelude::*;

    fn rights() -> impl Strategy<Value = Rights> {
        (any::<bool>(), any::<bool>()).prop_map(|(pull, push)| Rights { pull, push })
    }

    fn rule() -> impl Strategy<Value = Rule> {
        let claim = ("(repo|ref|ns)", "(org|org/\\*|\\*|main|o\\*g)");
        let grant =
            proptest::collection::btree_map("(org-\\*|org-ci|org-web|\\*|o\\*)", rights(), 1..4);
        (proptest::collection::vec(claim, 0..3), grant).prop_map(|(claims, grant)| Rule {
            who: Who::Issuer {
                issuer: "https://issuer".into(),
                claims: claims
                    .into_iter()
                    .map(|(k, g)| (vec![k], Glob::new(&g).unwrap()))
                    .collect(),
            },
            grant,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// A minted grant is always within the union of the grants of the rules that matched,
        /// whatever the scope and audience ask.
        #[test]
        fn a_minted_grant_is_within_the_rules_that_matched(
            rules in proptest::collection::vec(rule(), 0..4),
            repo in "(org|org/x|x)", git_ref in "(main|dev)", ns in "(org|ns)",
            scope in proptest::option::of("(pull|push|pull push|admin|)"),
            cache in proptest::option::of("(org-ci|org-web|other)"),
        ) {
            let subject = Subject::Oidc {
                issuer: "https://issuer".into(),
                claims: serde_json::json!({"repo": repo, "ref": git_ref, "ns": ns}),
            };
            let (granted, matched) = policy::grant(&rules, &subject);
            let mut union = Grant::new();
            for i in &matched {
                prop_assert!(rules[*i].matches(&subject));
                for (pattern, r) in &rules[*i].grant {
                    let e = union.entry(pattern.clone()).or_default();
                    e.pull |= r.pull;
                    e.push |= r.push;
                }
            }
            for (i, rule) in rules.iter().enumerate() {
                prop_assert_eq!(rule.matches(&subject), matched.contains(&i));
            }
            if let Ok(narrowed) = policy::narrow(&granted, scope.as_deref(), cache.as_deref()) {
                prop_assert!(policy::is_within(&narrowed, &union), "{:?} not within {:?}", narrowed, union);
            }
        }
    }
}
