//! Tests of `store/check.rs` (a sibling file, so the module itself stays short).

use super::*;
use crate::nix::nar_check::tests::expected_for;

#[tokio::test]
async fn too_many_bytes_fail_before_the_end() {
    let e = expected_for(b"abc", b"abc", "none", true);
    let mut check = Verifier::start(&e).unwrap();
    let refused = check.update(Bytes::from_static(b"abcd")).await;
    assert!(matches!(
        refused,
        Err(CheckError::TooLong {
            field: "FileSize",
            ..
        })
    ));
}

#[tokio::test]
async fn the_background_check_reports_what_it_found() {
    let e = expected_for(b"abc", b"abc", "none", true);
    let mut check = Verifier::start(&e).unwrap();
    check.update(Bytes::from_static(b"abd")).await.unwrap();
    assert!(matches!(
        check.finish().await,
        Err(CheckError::WrongFileHash("FileHash"))
    ));
    let mut check = Verifier::start(&e).unwrap();
    check.update(Bytes::from_static(b"ab")).await.unwrap();
    check.update(Bytes::from_static(b"c")).await.unwrap();
    assert!(check.finish().await.is_ok());
}

#[tokio::test]
async fn a_check_that_fails_midway_stops_taking_bytes() {
    let nar = vec![7u8; 1000];
    let e = expected_for(&nar, b"not xz at all", "xz", false);
    let mut check = Verifier::start(&e).unwrap();
    let mut outcome = Ok(());
    for _ in 0..100 {
        outcome = check.update(Bytes::from_static(b"not xz at all")).await;
        if outcome.is_err() {
            break;
        }
    }
    assert!(matches!(outcome, Err(CheckError::Decompress(_))));
}
