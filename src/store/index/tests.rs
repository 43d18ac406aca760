//! Tests of `store/index/mod.rs` (a sibling file, so the module itself stays short).

use super::*;

fn source(nar_hash: &str) -> NarSource {
    NarSource {
        upstream: "up".into(),
        url: "http://up/nar/x.nar".into(),
        expected: Expected {
            file_hash: None,
            file_size: None,
            // A distinct hash per name: the tests only compare them.
            nar_hash: crate::nix::hash::Sha256([nar_hash.as_bytes()[0]; 32]),
            nar_size: 5,
            compression: "none".into(),
        },
    }
}

#[test]
fn stored_files_survive_a_narinfo_that_promises_the_same_bytes_and_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.redb");
    let index = Index::open(&path).unwrap();
    let text = "StorePath: x\nURL: nar/x.nar\n";
    let put = |hash: &str, source: NarSource| {
        index.put_narinfos(&[NewNarInfo::new("p", hash, text, "nar/x.nar", source)])
    };
    assert_eq!(put("h", source("aa")).unwrap(), [text]);
    let blob = Blob {
        size: 5,
        sha256: "aa".into(),
        last_access: 7,
    };
    index
        .set_blob("nar/x.nar", &source("aa").expected, &blob)
        .unwrap();
    assert_eq!(
        put("h", source("aa")).unwrap(),
        [text],
        "same bytes: same name"
    );
    index.touch(&[("nar/x.nar".into(), 9)]).unwrap();
    drop(index);

    let index = Index::open(&path).unwrap();
    let row = index.nar("nar/x.nar").unwrap().unwrap();
    assert_eq!(row.source, source("aa"));
    assert_eq!(row.blob.as_ref().map(|b| b.last_access), Some(9));
    assert_eq!(index.counts().unwrap(), (1, 1, 1));
    // Another upstream (or a changed narinfo) naming its file alike gets a name of its own.
    let mut elsewhere = source("bb");
    elsewhere.upstream = "two".into();
    let texts = index
        .put_narinfos(&[NewNarInfo::new(
            "q",
            "h2",
            text,
            "nar/x.nar",
            elsewhere.clone(),
        )])
        .unwrap();
    let renamed = texts[0]
        .lines()
        .nth(1)
        .unwrap()
        .strip_prefix("URL: ")
        .unwrap();
    assert!(
        renamed.starts_with("nar/") && renamed.ends_with("-x.nar"),
        "{renamed}"
    );
    assert_eq!(index.nar(renamed).unwrap().unwrap().source, elsewhere);
    let first = index.nar("nar/x.nar").unwrap().unwrap();
    assert_eq!(
        first.source,
        source("aa"),
        "the first narinfo still leads to its bytes"
    );
    assert!(first.blob.is_some());
    assert_eq!(
        index
            .narinfo(&narinfo_key("q", "h2"))
            .unwrap()
            .unwrap()
            .text,
        texts[0]
    );
}

#[test]
fn a_blob_for_a_nar_nobody_named_or_promising_other_bytes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let index = Index::open(&dir.path().join("index.redb")).unwrap();
    let blob = Blob {
        size: 1,
        sha256: "aa".into(),
        last_access: 0,
    };
    assert!(index
        .set_blob("nar/unknown.nar", &source("aa").expected, &blob)
        .is_err());
    index
        .put_narinfos(&[NewNarInfo::new("p", "h", "t", "nar/x.nar", source("bb"))])
        .unwrap();
    assert!(
        index
            .set_blob("nar/x.nar", &source("aa").expected, &blob)
            .is_err(),
        "bytes verified against a promise the row no longer makes are refused"
    );
}

#[test]
fn an_unreadable_index_is_moved_aside_and_an_unwritable_one_kept_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.redb");
    std::fs::write(&path, vec![0xA5u8; 64 * 1024]).unwrap();
    let index = Index::open(&path).unwrap();
    assert!(dir.path().join("index.redb.broken").exists());
    assert!(index
        .put_narinfos(&[NewNarInfo::new("p", "h", "t", "nar/x.nar", source("aa"))])
        .is_ok());

    let unwritable = dir.path().join("index.redb.broken").join("index.redb");
    let index = Index::open(&unwritable).expect("falls back to memory");
    assert!(index
        .put_narinfos(&[NewNarInfo::new("p", "h", "t", "nar/x.nar", source("aa"))])
        .is_ok());
    assert_eq!(index.counts().unwrap(), (1, 1, 0));
}

#[test]
fn a_second_opener_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.redb");
    let _first = Index::open(&path).unwrap();
    assert!(Index::open(&path).is_err());
}

#[test]
fn a_flush_makes_lazy_commits_durable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.redb");
    let index = Index::open(&path).unwrap();
    index
        .put_narinfos(&[NewNarInfo::new("p", "h", "t", "nar/x.nar", source("aa"))])
        .unwrap();
    let blob = Blob {
        size: 5,
        sha256: "aa".into(),
        last_access: 7,
    };
    index
        .set_blob("nar/x.nar", &source("aa").expected, &blob)
        .unwrap();
    index.flush();
    // What a crash right now would leave: the file as it is on disk.
    let copy = dir.path().join("copy.redb");
    std::fs::copy(&path, &copy).unwrap();
    let reopened = Index::open(&copy).unwrap();
    assert_eq!(reopened.counts().unwrap(), (1, 1, 1));
    drop(index);
}
