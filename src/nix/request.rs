//! The request paths nix-sidecar answers, parsed strictly: anything that is not one of these
//! is never turned into a file name or an upstream request.

use super::base32;
use super::narinfo::is_store_basename;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CachePath {
    CacheInfo,
    /// `<hash>.narinfo`, the 32-letter store path hash.
    NarInfo(String),
    /// `nar/<file>[?query]`, kept whole: it is the key the narinfo's `URL:` named.
    Nar(String),
    /// `log/<drv basename>`, `<hash>.ls` (a NAR's file listing), `debuginfo/<build-id>`,
    /// `realisations/<id>.doi`, `build-trace-v2/...`: forwarded as is.
    Forwarded(String),
    Health,
    Metrics,
    /// `POST /_sidecar/prefetch`.
    Prefetch,
    /// `POST /_sidecar/unpin`.
    Unpin,
    /// `POST /_sidecar/push`.
    Push,
}

const MAX_PATH: usize = 1024;

/// Parses the path and optional query of a request. `None` means "not a cache path": 404.
pub fn parse(path: &str, query: Option<&str>) -> Option<CachePath> {
    if path.len() > MAX_PATH || query.is_some_and(|q| q.len() > MAX_PATH) {
        return None;
    }
    let rel = path.strip_prefix('/')?;
    let no_query = |p: CachePath| if query.is_none() { Some(p) } else { None };
    match rel {
        "nix-cache-info" => return no_query(CachePath::CacheInfo),
        "_sidecar/health" => return Some(CachePath::Health),
        "_sidecar/metrics" => return Some(CachePath::Metrics),
        "_sidecar/prefetch" => return no_query(CachePath::Prefetch),
        "_sidecar/unpin" => return no_query(CachePath::Unpin),
        "_sidecar/push" => return no_query(CachePath::Push),
        _ => {}
    }
    if let Some(hash) = rel.strip_suffix(".ls") {
        return (hash.len() == 32 && hash.bytes().all(base32::is_digit) && query.is_none())
            .then(|| CachePath::Forwarded(rel.to_string()));
    }
    if let Some(build_id) = rel.strip_prefix("debuginfo/") {
        let hex = !build_id.is_empty()
            && build_id.len() <= 128
            && build_id.bytes().all(|c| c.is_ascii_hexdigit());
        return (hex && query.is_none()).then(|| CachePath::Forwarded(rel.to_string()));
    }
    if let Some(hash) = rel.strip_suffix(".narinfo") {
        return (hash.len() == 32 && hash.bytes().all(base32::is_digit))
            .then(|| CachePath::NarInfo(hash.to_string()))
            .and_then(no_query);
    }
    if let Some(file) = rel.strip_prefix("nar/") {
        if !is_file_name(file) || !query.is_none_or(is_query) {
            return None;
        }
        return Some(CachePath::Nar(match query {
            Some(q) => format!("{rel}?{q}"),
            None => rel.to_string(),
        }));
    }
    if let Some(drv) = rel.strip_prefix("log/") {
        return (is_store_basename(drv) && query.is_none())
            .then(|| CachePath::Forwarded(rel.to_string()));
    }
    if let Some(id) = rel.strip_prefix("realisations/") {
        return (id.ends_with(".doi") && is_realisation_id(id) && query.is_none())
            .then(|| CachePath::Forwarded(rel.to_string()));
    }
    if let Some(rest) = rel.strip_prefix("build-trace-v2/") {
        let ok = !rest.is_empty()
            && rest
                .split('/')
                .all(|seg| is_realisation_id(seg) && is_file_name(seg));
        return (ok && query.is_none()).then(|| CachePath::Forwarded(rel.to_string()));
    }
    None
}

/// A single path segment that cannot climb out of a directory.
pub fn is_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._+-=".contains(&c))
}

fn is_query(query: &str) -> bool {
    !query.is_empty()
        && query
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._~-=&%+".contains(&c))
}

/// `sha256:<hash>!<output>.doi` and build-trace segments.
fn is_realisation_id(id: &str) -> bool {
    !id.is_empty()
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b":!._+-=".contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "0mdqa9w1p6cmli6976v4wi0sw9r4p5pr";

    #[test]
    fn accepts_the_paths_nix_requests() {
        assert_eq!(parse("/nix-cache-info", None), Some(CachePath::CacheInfo));
        assert_eq!(
            parse(&format!("/{H}.narinfo"), None),
            Some(CachePath::NarInfo(H.into()))
        );
        assert_eq!(
            parse("/nar/1w1f.nar.xz", None),
            Some(CachePath::Nar("nar/1w1f.nar.xz".into()))
        );
        assert_eq!(
            parse("/nar/1w1f.nar", Some("hash=abc")),
            Some(CachePath::Nar("nar/1w1f.nar?hash=abc".into()))
        );
        assert_eq!(
            parse(&format!("/log/{H}-hello.drv"), None),
            Some(CachePath::Forwarded(format!("log/{H}-hello.drv")))
        );
        assert!(parse("/realisations/sha256:abc!out.doi", None).is_some());
        assert!(parse("/build-trace-v2/abc/out", None).is_some());
        assert_eq!(
            parse(&format!("/{H}.ls"), None),
            Some(CachePath::Forwarded(format!("{H}.ls")))
        );
        assert_eq!(
            parse("/debuginfo/0a1b2c3d4e5f60718293a4b5c6d7e8f901234567", None),
            Some(CachePath::Forwarded(
                "debuginfo/0a1b2c3d4e5f60718293a4b5c6d7e8f901234567".into()
            ))
        );
        assert_eq!(parse("/_sidecar/health", None), Some(CachePath::Health));
    }

    #[test]
    fn rejects_everything_else() {
        let bad = [
            "/",
            "",
            "nix-cache-info",
            "/etc/passwd",
            "/nar/../../etc/passwd",
            "/nar/..",
            "/nar/.hidden",
            "/nar/a/b",
            "/nar/",
            "/nar/%2e%2e",
            "/0mdqa9w1p6cmli6976v4wi0sw9r4p5pe.narinfo",
            "/0mdqa9w1p6cmli6976v4wi0sw9r4p5p.narinfo",
            "/log/../x",
            "/log/notastorepath",
            "/realisations/x",
            "/build-trace-v2/../x",
            "/build-trace-v2/",
            "/abc.ls",
            "/debuginfo/../x",
            "/debuginfo/",
            "/debuginfo/xyz",
        ];
        for path in bad {
            assert_eq!(parse(path, None), None, "{path}");
        }
        assert_eq!(parse("/nix-cache-info", Some("x=1")), None);
        assert_eq!(parse("/nar/x.nar", Some("a b")), None);
        assert_eq!(parse(&format!("/nar/{}", "a".repeat(2000)), None), None);
    }
}
