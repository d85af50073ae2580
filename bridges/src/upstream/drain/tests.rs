//! The drain state machine under a virtual clock: unit tests, then a model-based property test.
#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::indexing_slicing)]

use super::*;

#[test]
fn the_bucket_allows_a_one_second_burst_then_the_rate() {
    let t0 = Instant::now();
    let mut b = Bucket::new(100.0, t0);
    for _ in 0..100 {
        assert!(b.take(1.0, t0).is_ok());
    }
    // Empty: the next token comes in 10 ms.
    let wait = b.take(1.0, t0).unwrap_err();
    assert!((wait.as_secs_f64() - 0.01).abs() < 1e-6, "{wait:?}");
    // Half a second refills 50, never more than one second's worth.
    let t1 = t0 + Duration::from_millis(500);
    for _ in 0..50 {
        assert!(b.take(1.0, t1).is_ok());
    }
    assert!(b.take(1.0, t1).is_err());
    let t2 = t1 + Duration::from_secs(10);
    for _ in 0..100 {
        assert!(b.take(1.0, t2).is_ok());
    }
    assert!(b.take(1.0, t2).is_err());
}

#[test]
fn the_bucket_passes_an_item_larger_than_the_rate_after_waiting() {
    // A byte budget of 100/s and a 250-byte message: it goes once 250 tokens are there,
    // not never.
    let t0 = Instant::now();
    let mut b = Bucket::new(100.0, t0);
    let wait = b.take(250.0, t0).unwrap_err();
    assert!((wait.as_secs_f64() - 1.5).abs() < 1e-6, "{wait:?}");
    assert!(b.take(250.0, t0 + wait).is_ok());
    assert!(b.take(1.0, t0 + wait).is_err());
}

#[test]
fn a_refusal_by_one_limit_takes_nothing_from_the_other() {
    let t0 = Instant::now();
    let mut msgs = Some(Bucket::new(10.0, t0));
    let mut bytes = Some(Bucket::new(100.0, t0));
    // 150 bytes: the byte limit refuses for 0.5 s; the message token stays.
    let wait = take_limits(&mut msgs, &mut bytes, 150.0, t0).unwrap_err();
    assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
    assert!((msgs.as_ref().unwrap().tokens - 10.0).abs() < 1e-9);
    take_limits(&mut msgs, &mut bytes, 150.0, t0 + wait).unwrap();
    assert!((msgs.as_ref().unwrap().tokens - 9.0).abs() < 1e-9);
    // Without limits everything passes.
    take_limits(&mut None, &mut None, 1e12, t0).unwrap();
}
