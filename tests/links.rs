//! The repository documents itself: every relative link in README.md and docs/, and every
//! file a source comment or the NixOS module points at, exists.

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn files(dir: &str, ext: &str, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(path.to_str().unwrap(), ext, out);
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
}

/// `[text](target)` targets that are not URLs or anchors.
fn markdown_links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        let Some(end) = rest.find(')') else { break };
        let target = rest[..end].split('#').next().unwrap_or("").trim();
        if !target.is_empty() && !target.contains("://") && !target.starts_with("mailto:") {
            out.push(target.to_string());
        }
        rest = &rest[end..];
    }
    out
}

/// Repository files named in text: `docs/<name>.md`, `README.md`, `SPEC.md`.
fn named_files(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for word in text.split(|c: char| c.is_whitespace() || "()[]`,;:\"'".contains(c)) {
        let word = word.trim_end_matches('.');
        if word.ends_with(".md") && (word.starts_with("docs/") || !word.contains('/')) {
            out.push(word.to_string());
        }
    }
    out
}

#[test]
fn every_relative_link_and_named_document_exists() {
    let mut missing = Vec::new();
    let mut docs = vec![std::path::PathBuf::from(format!("{ROOT}/README.md"))];
    files(&format!("{ROOT}/docs"), "md", &mut docs);
    for doc in &docs {
        let text = std::fs::read_to_string(doc).unwrap();
        let dir = doc.parent().unwrap();
        for link in markdown_links(&text) {
            if !dir.join(&link).exists() {
                missing.push(format!("{}: {link}", doc.display()));
            }
        }
    }
    let mut sources = Vec::new();
    files(&format!("{ROOT}/src"), "rs", &mut sources);
    files(&format!("{ROOT}/nixos-module"), "nix", &mut sources);
    sources.push(format!("{ROOT}/README.md").into());
    for source in &sources {
        let text = std::fs::read_to_string(source).unwrap();
        for name in named_files(&text) {
            let exists = std::path::Path::new(ROOT).join(&name).exists()
                || std::path::Path::new(ROOT).join("docs").join(&name).exists();
            if !exists {
                missing.push(format!("{}: {name}", source.display()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "links to nothing:\n{}",
        missing.join("\n")
    );
}
