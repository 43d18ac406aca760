//! Tests of `identity/mod.rs` (a sibling file, so the module itself stays short).

use super::*;

#[test]
fn refresh_happens_at_80_percent_or_a_minute_early() {
    let d = refresh_delay(Duration::from_secs(3600));
    assert!(
        d <= Duration::from_secs(2880) && d >= Duration::from_secs(2736),
        "{d:?}"
    );
    let d = refresh_delay(Duration::from_secs(300));
    assert!(d <= Duration::from_secs(240), "{d:?}");
    let d = refresh_delay(Duration::from_secs(100));
    assert!(d <= Duration::from_secs(50), "{d:?}");
}

#[test]
fn lifetime_is_exp_minus_iat_capped_by_the_clock() {
    let c = |exp, iat| jwt::Claims {
        exp: Some(exp),
        iat,
        ..Default::default()
    };
    let five_minutes = Some(Duration::from_secs(300));
    // Our clock runs 1000 s behind the issuer: exp - iat still says 300 s.
    assert_eq!(
        jwt_lifetime(&c(10_300, Some(10_000)), 9_000, true),
        five_minutes
    );
    assert_eq!(
        jwt_lifetime(&c(10_300, Some(10_000)), 9_000, false),
        five_minutes
    );
    // Our clock runs 1000 s ahead: a token minted for us now still lives 300 s ...
    assert_eq!(
        jwt_lifetime(&c(10_300, Some(10_000)), 11_000, true),
        five_minutes
    );
    assert_eq!(clock_skew(&c(10_300, Some(10_000)), 11_000), Some(1000));
    assert_eq!(clock_skew(&c(10_300, Some(10_000)), 10_030), None);
    // ... while one read from a file 200 s after issue has 100 s left.
    assert_eq!(
        jwt_lifetime(&c(10_300, Some(10_000)), 10_200, false),
        Some(Duration::from_secs(100))
    );
    assert_eq!(jwt_lifetime(&c(10_300, None), 10_000, true), five_minutes);
    assert_eq!(jwt_lifetime(&jwt::Claims::default(), 0, true), None);
}
