//! Tests of `config/mod.rs` (a sibling file, so the module itself stays short).

use super::*;

fn err(text: &str) -> String {
    Config::parse_str(text).unwrap_err().to_string()
}

#[test]
fn defaults_are_those_of_the_spec() {
    let c = Config::parse_str("").unwrap();
    assert_eq!(c.listen, vec!["127.0.0.1:37515".parse().unwrap()]);
    assert_eq!(c.max_cache_size, 20 << 30);
    assert_eq!(c.min_free_space, 2 << 30);
    assert_eq!(c.narinfo_ttl, Duration::from_secs(3600));
    assert_eq!(c.negative_ttl, Duration::from_secs(30));
    assert_eq!(c.priority, 30);
    assert!(!c.require_signatures);
    assert!(c.upstreams.is_empty());
}

#[test]
fn full_example_parses() {
    let c = Config::parse_str(
        r#"
listen = ["127.0.0.1:4000", "[::1]:4000"]
max-cache-size = "1GiB"
narinfo-ttl = "10m"
trusted-public-keys = ["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="]

[[upstream]]
name = "org"
url = "https://cache.example.org/org-view"
identity = "ci"

[[upstream]]
url = "https://cache.nixos.org"

[identity.ci]
provider = "kubernetes"
audience = "https://cache.example.org"
[identity.ci.exchange]
url = "https://cache.example.org/token"
scope = "cache:read"
"#,
    )
    .unwrap();
    assert!(
        c.require_signatures,
        "keys set: signatures required by default"
    );
    assert_eq!(c.upstreams[1].name, "upstream-2");
    assert!(
        matches!(&c.identities["ci"].provider, Provider::Kubernetes { path, .. } if path == Path::new(KUBERNETES_TOKEN_PATH))
    );
    let rendered = c.render();
    assert!(rendered.contains("max-cache-size = \"1GiB\""), "{rendered}");
    Config::parse_str(&rendered).expect("rendered config parses again");
}

#[test]
fn every_error_names_its_key() {
    assert!(err("bogus = 1").contains("bogus"));
    assert!(err("listen = [\"0.0.0.0:1\"]").contains("listen[0]"));
    assert!(err("max-cache-size = \"lots\"").contains("max-cache-size"));
    assert!(err("narinfo-ttl = \"soon\"").contains("narinfo-ttl"));
    assert!(err("trusted-public-keys = [\"x\"]").contains("trusted-public-keys"));
    assert!(err("[[upstream]]\nurl = \"ftp://x\"").contains("upstream[0].url"));
    assert!(err("[[upstream]]\nurl = \"https://:hunter2@x\"").contains("upstream[0].url"));
    let e = err("[[upstream]]\nurl = \"https://x\"\nidentity = \"i\"\n[identity.i]\nprovider = \"static\"\nvariable = \"T\"\n[identity.i.exchange]\nurl = \"https://client:clientsecret@x/token\"");
    assert!(
        e.contains("exchange.url") && !e.contains("clientsecret"),
        "{e}"
    );
    let plain = "[[upstream]]\nurl = \"http://cache.example\"\nidentity = \"i\"\n[identity.i]\nprovider = \"static\"\nvariable = \"T\"\n";
    assert!(err(plain).contains("insecure-http"));
    assert!(
        Config::parse_str(&plain.replace("identity = ", "insecure-http = true\nidentity = "))
            .is_ok()
    );
    assert!(Config::parse_str(&plain.replace("cache.example", "127.0.0.1:8080")).is_ok());
    assert!(
        err("[[upstream]]\nurl = \"https://x\"\nidentity = \"nope\"")
            .contains("upstream[0].identity")
    );
    assert!(err("[[upstream]]\nurl = \"https://x\"\nfoo = 1").contains("foo"));
    assert!(err("[identity.a]\nprovider = \"magic\"").contains("identity.a.provider"));
    assert!(err("[identity.a]\nprovider = \"static\"").contains("identity.a.variable"));
    assert!(
        err("[identity.a]\nprovider = \"file\"\npath = \"/x\"\nvariable = \"V\"")
            .contains("identity.a.variable")
    );
    assert!(err("[identity.a]\nprovider = \"file\"\npath = \"/x\"\nfoo = 1").contains("foo"));
    assert!(err("[identity.a]\nprovider = \"gcp\"").contains("identity.a.audience"));
    assert!(err("[identity.a]\nprovider = \"exec\"").contains("identity.a.command"));
    assert!(
        err("[identity.a]\nprovider = \"aws\"\naudience = \"x\"\npath = \"/p\"")
            .contains("identity.a.path")
    );
}

#[test]
fn presets_fill_url_auth_and_keys_and_can_be_overridden() {
    let c =
        Config::parse_str("[[upstream]]\npreset = \"flakehub\"\n[[upstream]]\npreset = \"nixos\"")
            .unwrap();
    assert_eq!(c.upstreams[0].url.as_str(), "https://cache.flakehub.com/");
    assert_eq!(
        c.upstreams[0].auth,
        Auth::Basic {
            username: "flakehub".into()
        }
    );
    assert_eq!(c.upstreams[1].auth, Auth::Bearer);
    assert_eq!(c.upstreams[1].name, "nixos", "a preset names its upstream");
    for given in [
        "nixos",
        "https://cache.nixos.org",
        "https://cache.nixos.org/",
    ] {
        let overrides = Overrides {
            upstreams: vec![given.to_string()],
            ..Overrides::default()
        };
        let c = Config::load(None, &overrides).unwrap();
        assert_eq!(
            c.upstreams[0].url.as_str(),
            "https://cache.nixos.org/",
            "{given}"
        );
        assert!(
            c.trusted_public_keys
                .iter()
                .any(|k| k.starts_with("cache.nixos.org-1:")),
            "{given}: the preset's key"
        );
        assert!(c.require_signatures, "{given}");
    }
    assert_eq!(
        c.trusted_public_keys.len(),
        9,
        "eight FlakeHub keys and cache.nixos.org's"
    );
    assert!(c.require_signatures);
    let c = Config::parse_str(
        "[[upstream]]\npreset = \"nixos\"\nurl = \"https://mirror.test\"\ntrusted-public-keys = []",
    )
    .unwrap();
    assert_eq!(c.upstreams[0].url.as_str(), "https://mirror.test/");
    assert!(c.trusted_public_keys.is_empty());
    assert!(err("[[upstream]]\npreset = \"other\"").contains("upstream[0].preset"));
    assert!(
        err("[[upstream]]\nurl = \"https://x\"\nauth = \"basic\"").contains("upstream[0].username")
    );
    assert!(
        err("[[upstream]]\nurl = \"https://x\"\nauth = \"digest\"").contains("upstream[0].auth")
    );
    assert!(err("[[upstream]]\nname = \"x\"").contains("upstream[0].url"));
    assert!(err("[identity.a]\nprovider = \"netrc\"").contains("identity.a.machine"));
}

#[test]
fn allow_remote_unlocks_other_addresses() {
    let c = Config::parse_str("listen = [\"0.0.0.0:1\"]\nallow-remote = true").unwrap();
    assert!(!c.listen[0].ip().is_loopback());
}

/// What `check-config` prints reads back as the same configuration: rendering it again gives
/// the same text, every section included (site, push, Basic auth, a full exchange).
#[test]
fn the_rendered_configuration_reads_back_as_itself() {
    let text = r#"
listen = ["127.0.0.1:4000", "[::1]:4000"]
allowed-uids = [0, 1000]
narinfo-ttl = "10m"
trusted-public-keys = ["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="]
nar-lookahead = true

[site]
listen = ["127.0.0.1:4100"]
allow-from = ["10.0.0.0/8", "127.0.0.1"]

[[upstream]]
name = "org"
url = "https://cache.example.org/org-view"
identity = "ci"
unavailable = "miss"
auth = "basic"
username = "bot"
site = "https://site.example.org"
push = "attic"
push-cache = "main"
push-uids = [1000]
push-skip-keys = ["skip-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="]

[[upstream]]
name = "hub"
url = "https://cache.flakehub.com"
push = "flakehub"
flakehub-project = "org/proj"

[identity.ci]
provider = "kubernetes"
audience = "https://cache.example.org"
[identity.ci.exchange]
url = "https://cache.example.org/token?x=1"
audience = "cache"
scope = "cache:read"
client-id = "fleet"
subject-token-type = "urn:ietf:params:oauth:token-type:jwt"
requested-token-type = "urn:ietf:params:oauth:token-type:access_token"
"#;
    let rendered = Config::parse_str(text).unwrap().render();
    let again = Config::parse_str(&rendered)
        .unwrap_or_else(|e| panic!("{e}\n{rendered}"))
        .render();
    assert_eq!(rendered, again);
    for shown in [
        "[site]",
        "allow-from = [\"10.0.0.0/8\", \"127.0.0.1/32\"]",
        "username = \"bot\"",
        "push = \"attic\"",
        "flakehub-project = \"org/proj\"",
        "[identity.ci.exchange]",
        "client-id = \"fleet\"",
        "url = \"https://cache.example.org/token?[redacted]\"",
    ] {
        assert!(rendered.contains(shown), "{shown}\n{rendered}");
    }
}
