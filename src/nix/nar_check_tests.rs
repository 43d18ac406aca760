//! Tests of `nix/nar_check.rs` (a sibling file, so the module itself stays short).

use super::*;

pub(crate) fn expected_for(
    nar: &[u8],
    file: &[u8],
    compression: &str,
    with_file_hash: bool,
) -> Expected {
    let sha = |b: &[u8]| Sha256(Hasher::digest(b).into());
    Expected {
        file_hash: with_file_hash.then(|| sha(file)),
        file_size: with_file_hash.then_some(file.len() as u64),
        nar_hash: sha(nar),
        nar_size: nar.len() as u64,
        compression: compression.into(),
    }
}

/// The check's verdict on `file`, fed in 7-byte chunks.
fn run(expected: &Expected, file: &[u8]) -> Result<Sha256, CheckError> {
    let mut check = ContentCheck::new(expected)?;
    for chunk in file.chunks(7) {
        check.update(chunk)?;
    }
    check.finish()
}

#[test]
fn accepts_matching_bytes_in_every_compression() {
    let nar: Vec<u8> = (0..100_000u32)
        .flat_map(|i| (i % 251).to_le_bytes())
        .collect();
    let xz = {
        let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
        e.write_all(&nar).unwrap();
        e.finish().unwrap()
    };
    let bz = {
        let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        e.write_all(&nar).unwrap();
        e.finish().unwrap()
    };
    let zst = zstd::encode_all(&nar[..], 1).unwrap();
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&nar).unwrap();
        e.finish().unwrap()
    };
    let br = {
        let mut e = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22);
        e.write_all(&nar).unwrap();
        e.into_inner()
    };
    for (name, file) in [
        ("none", &nar),
        ("xz", &xz),
        ("bzip2", &bz),
        ("zstd", &zst),
        ("gzip", &gz),
        ("br", &br),
    ] {
        for with_file_hash in [true, false] {
            let e = expected_for(&nar, file, name, with_file_hash);
            assert!(run(&e, file).is_ok(), "{name} {with_file_hash}");
            let mut wrong = file.clone();
            let last = wrong.len() - 1;
            wrong[last / 2] ^= 1;
            assert!(
                run(&e, &wrong).is_err(),
                "{name} {with_file_hash} flipped byte"
            );
            assert!(
                run(&e, &file[..last]).is_err(),
                "{name} {with_file_hash} truncated"
            );
        }
    }
}

#[test]
fn an_uncompressed_nar_without_file_hash_is_checked_by_nar_hash_and_size() {
    let e = expected_for(b"abc", b"abc", "none", false);
    assert!(run(&e, b"abd").unwrap_err().to_string().contains("NarHash"));
    assert!(run(&e, b"ab").unwrap_err().to_string().contains("NarSize"));
    assert!(run(&e, b"abcd")
        .unwrap_err()
        .to_string()
        .contains("NarSize"));
    let sha256 = Sha256(Hasher::digest(b"abc").into());
    assert_eq!(run(&e, b"abc").unwrap(), sha256);
}

#[test]
fn a_file_that_matches_its_file_hash_but_not_its_nar_hash_fails_the_whole_check() {
    let nar = vec![3u8; 50_000];
    let other = vec![4u8; 50_000];
    let xz_of = |bytes: &[u8]| {
        let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    };
    let (file, swapped) = (xz_of(&nar), xz_of(&other));
    let honest = expected_for(&nar, &file, "xz", true);
    assert!(check_nar(&mut &file[..], &honest).is_ok());
    let lying = expected_for(&nar, &swapped, "xz", true);
    assert!(run(&lying, &swapped).is_ok(), "FileHash alone is satisfied");
    assert!(matches!(
        check_nar(&mut &swapped[..], &lying),
        Err(CheckError::WrongNarHash)
    ));
}

#[test]
fn unverifiable_compression_is_refused() {
    let e = expected_for(b"abc", b"abc", "lz4", false);
    assert!(ContentCheck::new(&e).is_err());
}
#[test]
fn a_nar_size_caps_an_uncompressed_stream_before_its_end() {
    let e = expected_for(b"abc", b"abc", "none", false);
    let mut check = ContentCheck::new(&e).unwrap();
    assert!(check.update(b"abcd").is_err(), "NarSize caps the stream");
}
