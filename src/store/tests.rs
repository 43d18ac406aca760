//! Tests of `store/mod.rs` (a sibling file, so the module itself stays short).

use super::*;
use crate::nix::hash::Sha256 as NixSha256;
use bytes::Bytes;
use fill::ChunkSink;

fn expected_for(bytes: &[u8]) -> Expected {
    let sha = NixSha256(Sha256::digest(bytes).into());
    Expected {
        file_hash: Some(sha),
        file_size: Some(bytes.len() as u64),
        nar_hash: sha,
        nar_size: bytes.len() as u64,
        compression: "none".into(),
    }
}

fn source(expected: Expected) -> NarSource {
    NarSource {
        upstream: "up".into(),
        url: "http://up/nar/x.nar".into(),
        expected,
    }
}

#[tokio::test]
async fn the_cache_is_private_whatever_the_umask_and_follows_no_symlink() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let victim = dir.path().join("victim");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("precious"), b"keep me").unwrap();
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(&victim, cache.join("tmp")).unwrap();
    let limits = Limits {
        max_size: 1 << 30,
        min_free: 0,
    };
    let store = Store::open(&cache, limits).unwrap();
    assert!(
        victim.join("precious").exists(),
        "the link's target is untouched"
    );
    for sub in ["", "nars", "tmp"] {
        let meta = std::fs::symlink_metadata(cache.join(sub)).unwrap();
        assert!(meta.is_dir(), "{sub}");
        assert_eq!(meta.permissions().mode() & 0o777, 0o700, "{sub}");
    }
    let index = std::fs::metadata(cache.join("index.redb")).unwrap();
    assert_eq!(index.permissions().mode() & 0o077, 0);
    let expected = expected_for(b"hello");
    store.put_narinfos(&[NewNarInfo::new(
        "p",
        "h",
        "text",
        "nar/x.nar",
        source(expected.clone()),
    )]);
    let Slot::Lead(mut writer, _reader) = store.fill("nar/x.nar", &expected) else {
        panic!("first fill leads");
    };
    writer.start(Some(5)).unwrap();
    writer.write(Bytes::from_static(b"hello")).await.unwrap();
    writer.finish().await;
    for file in std::fs::read_dir(cache.join("nars")).unwrap() {
        let mode = file.unwrap().metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "stored NARs are private");
    }
}

/// Stores `bytes` under `key` through a fill, as a download would.
async fn store_file(store: &Store, key: &str, bytes: &'static [u8]) {
    let expected = expected_for(bytes);
    store.put_narinfos(&[NewNarInfo::new(
        "p",
        key,
        "text",
        key,
        source(expected.clone()),
    )]);
    let Slot::Lead(mut writer, _reader) = store.fill(key, &expected) else {
        panic!("first fill leads");
    };
    writer.start(Some(bytes.len() as u64)).unwrap();
    writer.write(Bytes::from_static(bytes)).await.unwrap();
    writer.finish().await;
}

/// A store in `dir` with room to spare (1 GiB, no disk floor).
fn open_roomy(dir: &std::path::Path) -> Store {
    let limits = Limits {
        max_size: 1 << 30,
        min_free: 0,
    };
    Store::open(&dir.join("cache"), limits).unwrap()
}

/// Drops `store` once the background work a fill leaves behind (the eviction pass after a
/// commit) has let go of it, so the directory can be opened again at once.
async fn close(store: Store) {
    for _ in 0..500 {
        if Arc::strong_count(&store.0) == 1 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the store is still held by a background task");
}

/// A pinned file outlives an eviction pass that takes every other file, except when the
/// disk is below `min-free-space`; an expired pin is no pin; unpin lets it go.
#[tokio::test]
async fn pins_keep_files_over_max_size_but_not_below_the_disk_floor() {
    let dir = tempfile::tempdir().unwrap();
    let roomy = Limits {
        max_size: 1 << 30,
        min_free: 0,
    };
    let store = Store::open(dir.path(), roomy).unwrap();
    store_file(&store, "nar/a.nar", b"pinned").await;
    store_file(&store, "nar/b.nar", b"loose").await;
    store_file(&store, "nar/c.nar", b"expired").await;
    store.pin(&["nar/a.nar".into()], u64::MAX).unwrap();
    store.pin(&["nar/c.nar".into()], 1).unwrap();
    assert_eq!(store.stats().pinned_bytes, 6);
    close(store).await;

    let none = Limits {
        max_size: 0,
        min_free: 0,
    };
    let store = Store::open(dir.path(), none).unwrap();
    store.enforce_limits(0);
    assert_eq!(store.size(), 6, "only the pinned file is left");
    assert!(store.stored("nar/a.nar").is_some());
    close(store).await;

    let floor = Limits {
        max_size: 0,
        min_free: u64::MAX / 2,
    };
    let store = Store::open(dir.path(), floor).unwrap();
    store.enforce_limits(0);
    assert_eq!(store.size(), 0, "below the floor, pins give way");
    close(store).await;

    let store = Store::open(dir.path(), roomy).unwrap();
    store_file(&store, "nar/d.nar", b"again").await;
    store.pin(&["nar/d.nar".into()], u64::MAX).unwrap();
    assert_eq!(store.unpin(None).unwrap(), 3, "a, c and d were pinned");
    close(store).await;
    let store = Store::open(dir.path(), none).unwrap();
    store.enforce_limits(0);
    assert_eq!(store.size(), 0);
}

#[tokio::test]
async fn a_narinfo_promising_other_bytes_under_a_stored_name_leaves_the_stored_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_size: 1 << 30,
        min_free: 0,
    };
    let store = Store::open(dir.path(), limits).unwrap();
    let old = expected_for(b"hello");
    let put = |expected| {
        store.put_narinfos(&[NewNarInfo::new(
            "p",
            "h",
            "text",
            "nar/x.nar",
            source(expected),
        )])
    };
    put(old.clone());
    let Slot::Lead(mut writer, _reader) = store.fill("nar/x.nar", &old) else {
        panic!("first fill leads");
    };
    writer.start(Some(5)).unwrap();
    writer.write(Bytes::from_static(b"hello")).await.unwrap();
    writer.finish().await;
    assert_eq!(store.size(), 5);
    let row = store.nar("nar/x.nar").unwrap();
    assert!(store.open_stored("nar/x.nar", &row).is_some());
    assert!(
        matches!(store.fill("nar/x.nar", &old), Slot::Stored(_, 5)),
        "a request that missed the file a moment ago gets it instead of a second download"
    );

    let texts = put(expected_for(b"other"));
    assert_eq!(texts[0], "text", "no URL line to rename");
    assert_eq!(store.size(), 5, "the first file still counts");
    assert!(store.nar("nar/x.nar").unwrap().blob.is_some());
    assert_eq!(store.nar("nar/x.nar").unwrap().source.expected, old);
}

/// A file on this machine joins the cache through a fill: checked like a download (a file
/// that does not match stores nothing and leaves no reservation), counted once when right,
/// and a second import of a stored key changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn an_imported_file_is_checked_counted_once_and_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_roomy(dir.path());
    let good: &[u8] = b"the NAR as pushed";
    let expected = expected_for(good);
    store.put_narinfos(&[NewNarInfo::new(
        "p",
        "h",
        "text",
        "nar/x.nar",
        source(expected.clone()),
    )]);
    let file_of = |bytes: &[u8]| {
        let path = dir.path().join(format!("staged-{}", fastrand::u64(..)));
        std::fs::write(&path, bytes).unwrap();
        File::open(path).unwrap()
    };
    for wrong in [&b"the NAR as pushed, and more"[..], b"the NAR as PUSHED"] {
        store.import("nar/x.nar", &expected, file_of(wrong)).await;
        assert!(
            store.stored("nar/x.nar").is_none(),
            "a wrong file is not stored"
        );
        assert_eq!(store.0.ledger.lock().unwrap().reserved, 0);
        assert_eq!(store.size(), 0);
    }
    store.import("nar/x.nar", &expected, file_of(good)).await;
    let (mut file, len) = store.stored("nar/x.nar").expect("stored");
    let mut kept = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut kept).unwrap();
    assert_eq!((kept.as_slice(), len), (good, good.len() as u64));
    store.import("nar/x.nar", &expected, file_of(good)).await;
    assert_eq!(store.size(), good.len() as u64, "counted once");
    assert_eq!(store.0.ledger.lock().unwrap().reserved, 0);
}

/// A fill wakes its readers in steps, not per chunk, but never holds bytes back for long: a
/// slow upstream's small chunks still reach a reader while the download goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_reader_gets_a_slow_fills_bytes_before_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_roomy(dir.path());
    let bytes: &'static [u8] = &[7u8; 4096];
    let expected = expected_for(bytes);
    store.put_narinfos(&[NewNarInfo::new(
        "p",
        "h",
        "text",
        "nar/x.nar",
        source(expected.clone()),
    )]);
    let Slot::Lead(mut writer, reader) = store.fill("nar/x.nar", &expected) else {
        panic!("first fill leads");
    };
    writer.start(Some(bytes.len() as u64)).unwrap();
    let mut stream = reader.stream();
    // The reader has looked, seen nothing yet, and waits to be woken.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    for chunk in bytes[..2048].chunks(512) {
        writer.write(Bytes::from_static(chunk)).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    let first = tokio::time::timeout(std::time::Duration::from_secs(2), stream.recv())
        .await
        .expect("bytes reach the reader while the fill goes on")
        .unwrap()
        .unwrap();
    assert!(!first.is_empty() && first.len() < 2048, "{}", first.len());
    writer
        .write(Bytes::from_static(&bytes[2048..]))
        .await
        .unwrap();
    writer.finish().await;
    let mut got = first.len();
    while let Some(chunk) = stream.recv().await {
        got += chunk.unwrap().len();
    }
    assert_eq!(got, bytes.len());
}

/// A NAR check waits while downloads run (it would compete with them for the CPU) and runs as
/// soon as the last one ends, well before its deadline: the thread is told, it does not poll.
#[tokio::test(flavor = "multi_thread")]
async fn a_nar_check_waits_for_downloads_and_runs_when_the_last_one_ends() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_roomy(dir.path());
    store_file(&store, "nar/a.nar", b"stored bytes").await;
    let mut lying = expected_for(b"stored bytes");
    lying.nar_hash = NixSha256(Sha256::digest(b"other bytes").into());

    let in_flight = expected_for(b"in flight");
    let Slot::Lead(mut writer, _reader) = store.fill("nar/b.nar", &in_flight) else {
        panic!("first fill leads");
    };
    writer.start(Some(9)).unwrap();
    store.check_nar_later("nar/a.nar", &lying);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        store.blob_path("nar/a.nar").exists(),
        "the check waits while a download runs"
    );

    writer
        .write(Bytes::from_static(b"in flight"))
        .await
        .unwrap();
    writer.finish().await;
    tokio::time::timeout(std::time::Duration::from_secs(5), store.nar_checks_done())
        .await
        .expect("the check runs when the download ends, not at its 10 s deadline");
    assert!(
        !store.blob_path("nar/a.nar").exists(),
        "a file whose NarHash does not match is removed"
    );
}
