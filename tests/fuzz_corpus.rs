//! Every input the fuzzers kept (fuzz/corpus/<target>/*) and every crash they found
//! (fuzz/regressions/<target>/*) replayed through the same code as the fuzz targets.

use nix_sidecar::config::Config;
use nix_sidecar::identity::{jwt, netrc};
use nix_sidecar::nix::hash::Sha256;
use nix_sidecar::nix::narinfo::{replace_url, NarInfo, TrustedKeys};
use nix_sidecar::nix::request::{parse, CachePath};

fn inputs(target: &str) -> Vec<Vec<u8>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for kind in ["corpus", "regressions"] {
        if let Ok(entries) = std::fs::read_dir(root.join(kind).join(target)) {
            out.extend(entries.flatten().map(|e| std::fs::read(e.path()).unwrap()));
        }
    }
    out
}

#[test]
fn narinfo_corpus() {
    let inputs = inputs("narinfo");
    assert!(!inputs.is_empty());
    for data in inputs {
        if let Ok(info) = NarInfo::parse(&data) {
            let _ = info.fingerprint();
            let _ = TrustedKeys::default().verify(&info);
            let _ = replace_url(std::str::from_utf8(&data).unwrap(), "nar/x.nar");
        }
    }
}

#[test]
fn request_path_corpus() {
    for data in inputs("request_path") {
        let Ok(text) = std::str::from_utf8(&data) else {
            continue;
        };
        let (path, query) = match text.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (text, None),
        };
        if let Some(CachePath::Nar(key) | CachePath::Forwarded(key)) = parse(path, query) {
            let path_part = key.split('?').next().unwrap();
            assert!(!path_part
                .split('/')
                .any(|s| s.is_empty() || s == ".." || s.starts_with('.')));
        }
    }
}

#[test]
fn token_text_corpus() {
    for data in inputs("token_text") {
        let Ok(text) = std::str::from_utf8(&data) else {
            continue;
        };
        let _ = jwt::claims(text);
        let _ = netrc::password_for(text, "cache.flakehub.com");
        let _ = Sha256::parse(text);
        if let Ok(response) = http::Response::builder()
            .header("retry-after", text)
            .body(())
        {
            let _ = nix_sidecar::upstream::parse_retry_after(&response);
        }
    }
}

#[test]
fn config_corpus() {
    for data in inputs("config") {
        if let Ok(text) = std::str::from_utf8(&data) {
            if let Ok(config) = Config::parse_str(text) {
                Config::parse_str(&config.render()).expect("rendered config parses");
            }
        }
    }
}

#[test]
fn exchange_request_corpus() {
    let inputs = inputs("exchange_request");
    assert!(!inputs.is_empty());
    for data in inputs {
        if let Ok(form) = nix_sidecar::exchange::decide::parse_form(&data) {
            let _ = nix_sidecar::exchange::aws::check(&form.subject_token, 1_700_000_000);
        }
    }
}

#[test]
fn exchange_policy_corpus() {
    let inputs = inputs("exchange_policy");
    assert!(!inputs.is_empty());
    for data in inputs {
        nix_sidecar::exchange::policy::fuzz_one(&data);
    }
}

#[test]
fn closure_corpus() {
    let inputs = inputs("closure");
    assert!(!inputs.is_empty());
    let mut roots = 0;
    for data in inputs {
        if let Ok(text) = std::str::from_utf8(&data) {
            if let Some(root) = nix_sidecar::site::closure_root(text) {
                assert_eq!(root.len(), 32);
                assert!(!root.contains('/') && !root.contains('.'));
                roots += 1;
            }
        }
        for hint in nix_sidecar::upstream::parse_hints(&data) {
            let _ = NarInfo::parse(hint.as_bytes());
        }
    }
    assert_eq!(roots, 1, "only the bare hash is a root");
}
