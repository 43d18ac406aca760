//! Fills a nix-sidecar cache with synthetic narinfos and small stored NARs, through the same
//! store API the daemon uses, for the start-up and lookup benchmark (`bench/run.py`, scenario
//! 7):
//!
//!     cargo run --release --example fill_index -- CONFIG NARINFOS STORED > hashes.txt
//!
//! Narinfos go to the first upstream's partition, in batches; the first STORED of them also
//! get a verified, fsynced file. Prints every 100th store path hash.

use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use nix_sidecar::config::{Config, Overrides};
use nix_sidecar::nix::{base32, hash::Sha256 as NixSha256};
use nix_sidecar::store::{ChunkSink, Expected, Limits, NarSource, NewNarInfo, Slot, Store};
use sha2::{Digest, Sha256};

const BATCH: usize = 10_000;
const STORED_AT_ONCE: usize = 32;

fn digest(seed: &str) -> [u8; 32] {
    Sha256::digest(seed.as_bytes()).into()
}

/// What narinfo `i` promises: a small uncompressed NAR whose bytes derive from `i`.
fn nar_bytes(i: usize) -> Bytes {
    Bytes::from(format!("nar {i} ").repeat(64))
}

fn expected(i: usize) -> Expected {
    let bytes = nar_bytes(i);
    let sha = NixSha256(Sha256::digest(&bytes).into());
    Expected {
        file_hash: Some(sha),
        file_size: Some(bytes.len() as u64),
        nar_hash: sha,
        nar_size: bytes.len() as u64,
        compression: "none".into(),
    }
}

fn narinfo(i: usize, hash: &str, nar_key: &str, e: &Expected) -> String {
    let reference = base32::encode(&digest(&format!("ref {i}"))[..20]);
    let signature = base64_of(&[digest(&format!("sig {i}")), digest("sig")].concat());
    format!(
        "StorePath: /nix/store/{hash}-synthetic-{i}\nURL: {nar_key}\nCompression: none\n\
         FileHash: {}\nFileSize: {}\nNarHash: {}\nNarSize: {}\n\
         References: {hash}-synthetic-{i} {reference}-dependency\n\
         Deriver: {reference}-synthetic-{i}.drv\nSig: bench.example.org-1:{signature}\n",
        e.file_hash.unwrap().to_nix_string(),
        e.file_size.unwrap(),
        e.nar_hash.to_nix_string(),
        e.nar_size,
    )
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, count, stored] = args.as_slice() else {
        eprintln!("usage: fill_index CONFIG NARINFOS STORED");
        return ExitCode::FAILURE;
    };
    let (Ok(count), Ok(stored)) = (count.parse::<usize>(), stored.parse::<usize>()) else {
        eprintln!("NARINFOS and STORED are numbers");
        return ExitCode::FAILURE;
    };
    let config = match Config::load(Some(&PathBuf::from(config)), &Overrides::default()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(upstream) = config.upstreams.first() else {
        eprintln!("the config names no upstream");
        return ExitCode::FAILURE;
    };
    let partition = nix_sidecar::proxy::partition(upstream);
    let limits = Limits {
        max_size: config.max_cache_size,
        min_free: 0,
    };
    let store = Store::open(&config.cache_dir, limits).expect("cache opens");

    let hash_of = |i: usize| base32::encode(&digest(&format!("path {i}"))[..20]);
    let nar_key_of = |i: usize| format!("nar/{}.nar", base32::encode(&digest(&format!("nar {i}"))));
    for start in (0..count).step_by(BATCH) {
        let batch: Vec<NewNarInfo> = (start..count.min(start + BATCH))
            .map(|i| {
                let (hash, nar_key, e) = (hash_of(i), nar_key_of(i), expected(i));
                let text = narinfo(i, &hash, &nar_key, &e);
                let source = NarSource {
                    upstream: upstream.name.clone(),
                    url: upstream.url.join(&nar_key).unwrap().to_string(),
                    expected: e,
                };
                NewNarInfo::new(&partition, &hash, &text, &nar_key, source)
            })
            .collect();
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.put_narinfos(&batch))
            .await
            .unwrap();
    }

    let mut fills = tokio::task::JoinSet::new();
    for i in 0..stored.min(count) {
        if fills.len() == STORED_AT_ONCE {
            fills.join_next().await;
        }
        let store = store.clone();
        fills.spawn(async move {
            let Slot::Lead(mut writer, _reader) = store.fill(&nar_key_of(i), &expected(i)) else {
                panic!("NAR {i} could not be stored");
            };
            let bytes = nar_bytes(i);
            writer.start(Some(bytes.len() as u64)).unwrap();
            writer.write(bytes).await.expect("verified");
            writer.finish().await;
        });
    }
    while fills.join_next().await.is_some() {}

    let stats = store.stats();
    eprintln!(
        "narinfos: {} stored files: {}",
        stats.narinfos, stats.stored_files
    );
    for i in (0..count).step_by(100) {
        println!("{}", hash_of(i));
    }
    ExitCode::SUCCESS
}
