//! Deterministic tests of the block-wise tables: a virtual clock, exact verdicts.

use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

const LIFETIME: Duration = Duration::from_secs(247);

fn limits() -> Limits {
    Limits {
        max_transfers: 4,
        max_body_size: 1024,
        budget_bytes: 4096,
        lifetime: LIFETIME,
    }
}

#[allow(clippy::disallowed_methods)] // The virtual clock starts at an arbitrary instant.
fn start() -> Instant {
    Instant::now()
}

fn block(num: u32, more: bool, szx: u8) -> Block {
    Block::new(num, more, szx).unwrap()
}

/// `len` bytes whose values encode their offset, so misplaced appends show.
fn body(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn chunk(body: &[u8], num: u32, szx: u8) -> &[u8] {
    block2_slice(body, num, szx).unwrap().0
}

#[test]
fn a_single_block_completes_without_a_table_entry() {
    let mut table = Reassembly::new(limits());
    let verdict = table.offer(start(), 1, block(0, false, 6), b"21.5", None, 6);
    assert_eq!(
        verdict,
        Block1Verdict::Complete {
            body: Bytes::from_static(b"21.5"),
            echo: block(0, false, 6),
        }
    );
    assert!(table.is_empty());
    assert_eq!(table.bytes(), 0);
}

#[test]
fn blocks_in_order_continue_then_complete() {
    let now = start();
    let mut table = Reassembly::new(limits());
    let data = body(100);
    for num in 0..3 {
        let verdict = table.offer(now, 7, block(num, true, 1), chunk(&data, num, 1), None, 6);
        assert_eq!(
            verdict,
            Block1Verdict::Continue {
                echo: block(num, true, 1)
            }
        );
        assert_eq!(table.len(), 1);
        table.check_invariants().unwrap();
    }
    let verdict = table.offer(now, 7, block(3, false, 1), chunk(&data, 3, 1), None, 6);
    assert_eq!(
        verdict,
        Block1Verdict::Complete {
            body: Bytes::from(data),
            echo: block(3, false, 1),
        }
    );
    assert!(table.is_empty());
    assert_eq!(table.bytes(), 0);
    table.check_invariants().unwrap();
}

#[test]
fn the_echo_asks_for_the_preferred_size_and_the_client_follows_it() {
    // RFC 7959 §2.3 figure: 1:0/1/128 -> 2.31 1:0/1/32 -> 1:4/1/32 ...
    let now = start();
    let mut table = Reassembly::new(limits());
    let data = body(180);
    let verdict = table.offer(now, 1, block(0, true, 3), chunk(&data, 0, 3), None, 1);
    assert_eq!(
        verdict,
        Block1Verdict::Continue {
            echo: block(0, true, 1)
        }
    );
    // 128 bytes held = four 32-byte blocks: the client goes on at NUM 4.
    let verdict = table.offer(now, 1, block(4, true, 1), chunk(&data, 4, 1), None, 1);
    assert_eq!(
        verdict,
        Block1Verdict::Continue {
            echo: block(4, true, 1)
        }
    );
    let verdict = table.offer(now, 1, block(5, false, 1), &data[160..], None, 1);
    assert_eq!(
        verdict,
        Block1Verdict::Complete {
            body: Bytes::from(data),
            echo: block(5, false, 1),
        }
    );
}

#[test]
fn a_preferred_size_above_the_largest_acts_as_the_largest() {
    let mut table = Reassembly::new(limits());
    let verdict = table.offer(start(), 1, block(0, true, 0), &body(16), None, 200);
    assert_eq!(
        verdict,
        Block1Verdict::Continue {
            echo: block(0, true, 0)
        }
    );
}

#[test]
fn a_held_block_resent_is_a_duplicate_and_nothing_is_appended() {
    let now = start();
    let mut table = Reassembly::new(limits());
    let data = body(64);
    for num in 0..3 {
        table.offer(now, 1, block(num, true, 0), chunk(&data, num, 0), None, 6);
    }
    let verdict = table.offer(now, 1, block(1, true, 0), chunk(&data, 1, 0), None, 6);
    assert_eq!(
        verdict,
        Block1Verdict::Duplicate {
            echo: block(1, true, 0)
        }
    );
    assert_eq!(table.len(), 1);
    let verdict = table.offer(now, 1, block(3, false, 0), chunk(&data, 3, 0), None, 6);
    assert_eq!(
        verdict,
        Block1Verdict::Complete {
            body: Bytes::from(data),
            echo: block(3, false, 0),
        }
    );
}

#[test]
fn a_block_held_under_a_larger_size_is_a_duplicate() {
    // One 32-byte block held; its second half resent as a 16-byte block NUM 1.
    let now = start();
    let mut table = Reassembly::new(limits());
    let data = body(64);
    let verdict = table.offer(now, 1, block(0, true, 1), chunk(&data, 0, 1), None, 0);
    assert_eq!(
        verdict,
        Block1Verdict::Continue {
            echo: block(0, true, 0)
        }
    );
    let verdict = table.offer(now, 1, block(1, true, 0), chunk(&data, 1, 0), None, 0);
    assert_eq!(
        verdict,
        Block1Verdict::Duplicate {
            echo: block(1, true, 0)
        }
    );
    table.offer(now, 1, block(2, true, 0), chunk(&data, 2, 0), None, 0);
    let verdict = table.offer(now, 1, block(3, false, 0), chunk(&data, 3, 0), None, 0);
    assert!(matches!(verdict, Block1Verdict::Complete { body, .. } if body[..] == data[..]));
}

#[test]
fn a_duplicate_extends_the_idle_deadline() {
    let now = start();
    let mut table = Reassembly::new(limits());
    table.offer(now, 1, block(0, true, 0), &body(16), None, 6);
    table.offer(now, 1, block(1, true, 0), &body(16), None, 6);
    let later = now + Duration::from_secs(100);
    table.offer(later, 1, block(1, true, 0), &body(16), None, 6);
    assert_eq!(table.next_deadline(), Some(later + LIFETIME));
    table.check_invariants().unwrap();
}

#[test]
fn a_gap_is_incomplete_and_drops_the_transfer() {
    let now = start();
    let mut table = Reassembly::new(limits());
    table.offer(now, 1, block(0, true, 0), &body(16), None, 6);
    let verdict = table.offer(now, 1, block(2, true, 0), &body(16), None, 6);
    assert_eq!(verdict, Block1Verdict::Incomplete);
    assert!(table.is_empty());
    assert_eq!(table.bytes(), 0);
    // The transfer is gone: the missing block itself is now incomplete too.
    let verdict = table.offer(now, 1, block(1, true, 0), &body(16), None, 6);
    assert_eq!(verdict, Block1Verdict::Incomplete);
}

#[test]
fn a_block_without_a_transfer_is_incomplete() {
    let mut table = Reassembly::new(limits());
    let verdict = table.offer(start(), 1, block(1, false, 0), &body(3), None, 6);
    assert_eq!(verdict, Block1Verdict::Incomplete);
    assert!(table.is_empty());
}

#[test]
fn an_overlapping_block_is_incomplete() {
    // 48 bytes held in 16-byte blocks; a 32-byte block NUM 1 covers 32..64: half held.
    let now = start();
    let mut table = Reassembly::new(limits());
    for num in 0..3 {
        table.offer(now, 1, block(num, true, 0), &body(16), None, 6);
    }
    let verdict = table.offer(now, 1, block(1, true, 1), &body(32), None, 6);
    assert_eq!(verdict, Block1Verdict::Incomplete);
    assert!(table.is_empty());
}

#[test]
fn a_final_block_behind_the_received_bytes_is_incomplete() {
    let now = start();
    let mut table = Reassembly::new(limits());
    table.offer(now, 1, block(0, true, 0), &body(16), None, 6);
    table.offer(now, 1, block(1, true, 0), &body(16), None, 6);
    let verdict = table.offer(now, 1, block(1, false, 0), &body(4), None, 6);
    assert_eq!(verdict, Block1Verdict::Incomplete);
}

#[test]
fn a_non_final_block_of_the_wrong_length_is_a_bad_request() {
    let now = start();
    let mut table = Reassembly::new(limits());
    table.offer(now, 1, block(0, true, 0), &body(16), None, 6);
    for len in [0, 15, 17] {
        table.offer(now, 1, block(0, true, 0), &body(16), None, 6);
        let verdict = table.offer(now, 1, block(1, true, 0), &body(len), None, 6);
        assert_eq!(verdict, Block1Verdict::BadRequest, "len {len}");
        assert!(table.is_empty());
    }
    let verdict = table.offer(now, 1, block(0, true, 0), &body(15), None, 6);
    assert_eq!(verdict, Block1Verdict::BadRequest);
}

#[test]
fn a_final_block_longer_than_its_size_is_a_bad_request() {
    let mut table = Reassembly::new(limits());
    let verdict = table.offer(start(), 1, block(0, false, 0), &body(17), None, 6);
    assert_eq!(verdict, Block1Verdict::BadRequest);
}

#[test]
fn size1_beyond_the_limit_is_too_large_at_once() {
    let now = start();
    let mut table = Reassembly::new(limits());
    let verdict = table.offer(now, 1, block(0, true, 0), &body(16), Some(1025), 6);
    assert_eq!(verdict, Block1Verdict::TooLarge { limit: 1024 });
    assert!(table.is_empty());
    let verdict = table.offer(now, 1, block(0, true, 0), &body(16), Some(1024), 6);
    assert!(matches!(verdict, Block1Verdict::Continue { .. }));
    // Size1 on a later block drops the transfer too.
    let verdict = table.offer(now, 1, block(1, true, 0), &body(16), Some(u32::MAX), 6);
    assert_eq!(verdict, Block1Verdict::TooLarge { limit: 1024 });
    assert!(table.is_empty());
    assert_eq!(table.bytes(), 0);
}

#[test]
fn a_body_growing_beyond_the_limit_is_too_large() {
    let now = start();
    let mut table = Reassembly::new(limits());
    let data = body(1024);
    for num in 0..16 {
        let verdict = table.offer(now, 1, block(num, true, 2), chunk(&data, num, 2), None, 6);
        assert!(matches!(verdict, Block1Verdict::Continue { .. }));
    }
    let verdict = table.offer(now, 1, block(16, false, 2), &body(1), None, 6);
    assert_eq!(verdict, Block1Verdict::TooLarge { limit: 1024 });
    assert!(table.is_empty());
    assert_eq!(table.bytes(), 0);
    // Exactly the limit is fine.
    for num in 0..15 {
        table.offer(now, 1, block(num, true, 2), chunk(&data, num, 2), None, 6);
    }
    let verdict = table.offer(now, 1, block(15, false, 2), chunk(&data, 15, 2), None, 6);
    assert_eq!(
        verdict,
        Block1Verdict::Complete {
            body: Bytes::from(data),
            echo: block(15, false, 2)
        }
    );
}

#[test]
fn the_largest_block_number_is_too_large_without_overflow() {
    let mut table = Reassembly::new(Limits {
        max_body_size: usize::MAX,
        ..limits()
    });
    let verdict = table.offer(
        start(),
        1,
        block(Block::MAX_NUM, true, 6),
        &body(1024),
        None,
        6,
    );
    assert_eq!(verdict, Block1Verdict::Incomplete);
    let mut table = Reassembly::new(limits());
    let verdict = table.offer(
        start(),
        1,
        block(Block::MAX_NUM, true, 6),
        &body(1024),
        None,
        6,
    );
    assert_eq!(verdict, Block1Verdict::TooLarge { limit: 1024 });
}

#[test]
fn num_zero_restarts_the_transfer() {
    let now = start();
    let mut table = Reassembly::new(limits());
    table.offer(now, 1, block(0, true, 0), &[1; 16], None, 6);
    table.offer(now, 1, block(1, true, 0), &[2; 16], None, 6);
    table.offer(now, 1, block(0, true, 0), &[3; 16], None, 6);
    let verdict = table.offer(now, 1, block(1, false, 0), &[4; 2], None, 6);
    let expected: Vec<u8> = [[3u8; 16].as_slice(), &[4; 2]].concat();
    assert_eq!(
        verdict,
        Block1Verdict::Complete {
            body: Bytes::from(expected),
            echo: block(1, false, 0)
        }
    );
    // A single-block request replaces a transfer in progress.
    table.offer(now, 1, block(0, true, 0), &[1; 16], None, 6);
    let verdict = table.offer(now, 1, block(0, false, 0), &[5; 3], None, 6);
    assert!(matches!(verdict, Block1Verdict::Complete { body, .. } if body[..] == [5; 3]));
    assert!(table.is_empty());
    assert_eq!(table.bytes(), 0);
}

#[test]
fn keys_are_independent() {
    let now = start();
    let mut table = Reassembly::new(limits());
    table.offer(now, 1, block(0, true, 0), &[1; 16], None, 6);
    table.offer(now, 2, block(0, true, 0), &[2; 16], None, 6);
    let one = table.offer(now, 1, block(1, false, 0), &[1], None, 6);
    let two = table.offer(now, 2, block(1, false, 0), &[2], None, 6);
    assert!(matches!(one, Block1Verdict::Complete { body, .. } if body[..] == [1; 17]));
    assert!(matches!(two, Block1Verdict::Complete { body, .. } if body[..] == [2; 17]));
}

#[test]
fn a_new_transfer_beyond_max_transfers_is_busy() {
    let now = start();
    let mut table = Reassembly::new(limits());
    for key in 0..4 {
        let verdict = table.offer(now, key, block(0, true, 0), &body(16), None, 6);
        assert!(matches!(verdict, Block1Verdict::Continue { .. }));
    }
    let verdict = table.offer(now, 4, block(0, true, 0), &body(16), None, 6);
    assert_eq!(verdict, Block1Verdict::Busy);
    assert_eq!(table.len(), 4);
    // Restarting a held key is no new transfer; a single-block request needs no slot.
    let verdict = table.offer(now, 3, block(0, true, 0), &body(16), None, 6);
    assert!(matches!(verdict, Block1Verdict::Continue { .. }));
    let verdict = table.offer(now, 4, block(0, false, 0), &body(16), None, 6);
    assert!(matches!(verdict, Block1Verdict::Complete { .. }));
    table.check_invariants().unwrap();
}

#[test]
fn a_block_beyond_the_byte_budget_is_busy_and_frees_the_transfer() {
    let now = start();
    let mut table = Reassembly::new(Limits {
        max_transfers: 8,
        max_body_size: 1024,
        budget_bytes: 3000,
        lifetime: LIFETIME,
    });
    let data = body(1024);
    // Two full bodies held (1024 bytes each), then a third one cannot grow past 952.
    for key in 0..2 {
        for num in 0..15 {
            table.offer(now, key, block(num, true, 2), chunk(&data, num, 2), None, 6);
        }
        table.check_invariants().unwrap();
    }
    assert_eq!(
        table.bytes(),
        2048,
        "capacity doubles up to max_body_size exactly"
    );
    let mut last = None;
    for num in 0..16 {
        let verdict = table.offer(now, 2, block(num, true, 2), chunk(&data, num, 2), None, 6);
        table.check_invariants().unwrap();
        assert!(table.bytes() <= 3000);
        if verdict == Block1Verdict::Busy {
            last = Some(num);
            break;
        }
    }
    // 64-byte blocks: capacities 64, 128, 256, 512 fit; 1024 would not (2048 + 1024 > 3000).
    assert_eq!(last, Some(8));
    assert_eq!(table.len(), 2);
    assert_eq!(table.bytes(), 2048);
    // The budget is back for others: a small transfer fits again.
    let verdict = table.offer(now, 3, block(0, true, 2), chunk(&data, 0, 2), None, 6);
    assert!(matches!(verdict, Block1Verdict::Continue { .. }));
}

#[test]
fn a_first_block_beyond_the_byte_budget_is_busy() {
    let mut table = Reassembly::new(Limits {
        budget_bytes: 63,
        ..limits()
    });
    let verdict = table.offer(start(), 1, block(0, true, 2), &body(64), None, 6);
    assert_eq!(verdict, Block1Verdict::Busy);
    assert!(table.is_empty());
    assert_eq!(table.bytes(), 0);
}

#[test]
fn an_idle_transfer_expires_after_its_lifetime() {
    let now = start();
    let mut table = Reassembly::new(limits());
    assert_eq!(table.next_deadline(), None);
    table.offer(now, 1, block(0, true, 0), &body(16), None, 6);
    let second = now + Duration::from_secs(10);
    table.offer(second, 2, block(0, true, 0), &body(16), None, 6);
    assert_eq!(table.next_deadline(), Some(now + LIFETIME));
    // A block moves the deadline.
    let third = now + Duration::from_secs(20);
    table.offer(third, 1, block(1, true, 0), &body(16), None, 6);
    assert_eq!(table.next_deadline(), Some(second + LIFETIME));
    assert_eq!(table.expire(second + LIFETIME - Duration::from_nanos(1)), 0);
    assert_eq!(table.expire(second + LIFETIME), 1);
    assert_eq!(table.len(), 1);
    assert_eq!(table.next_deadline(), Some(third + LIFETIME));
    assert_eq!(table.expire(third + LIFETIME), 1);
    assert!(table.is_empty());
    assert_eq!(table.bytes(), 0);
    assert_eq!(table.next_deadline(), None);
    table.check_invariants().unwrap();
}

#[test]
fn an_idle_transfer_is_absent_even_before_expire_runs() {
    let now = start();
    let mut table = Reassembly::new(limits());
    table.offer(now, 1, block(0, true, 0), &body(16), None, 6);
    let verdict = table.offer(now + LIFETIME, 1, block(1, false, 0), &body(1), None, 6);
    assert_eq!(verdict, Block1Verdict::Incomplete);
    assert!(table.is_empty());
    assert_eq!(table.bytes(), 0);
}

#[test]
fn remove_where_drops_a_peers_transfers() {
    let now = start();
    let mut table = Reassembly::new(limits());
    for key in [(1, 'a'), (1, 'b'), (2, 'a')] {
        table.offer(now, key, block(0, true, 0), &body(16), None, 6);
    }
    assert_eq!(table.remove_where(|(peer, _)| *peer == 1), 2);
    assert_eq!(table.len(), 1);
    assert_eq!(table.bytes(), 16);
    table.check_invariants().unwrap();
    assert_eq!(table.remove_where(|_| false), 0);
}

#[test]
fn a_huge_lifetime_does_not_panic() {
    let mut table = Reassembly::new(Limits {
        lifetime: Duration::MAX,
        ..limits()
    });
    let verdict = table.offer(start(), 1, block(0, true, 0), &body(16), None, 6);
    assert!(matches!(verdict, Block1Verdict::Continue { .. }));
    assert!(table.next_deadline().is_some());
    let mut cache = Block2Cache::new(1, Duration::MAX, 0);
    cache.insert(start(), 1, Bytes::from_static(b"x"));
    assert!(cache.get(start(), &1).is_some());
}

/// One step of the random workload.
#[derive(Debug, Clone)]
enum Step {
    Offer {
        key: u8,
        num: u32,
        more: bool,
        szx: u8,
        len: usize,
        size1: Option<u32>,
        preferred: u8,
    },
    /// The block that continues the key's transfer exactly (or starts it).
    Next {
        key: u8,
        szx: u8,
        last: bool,
    },
    Advance(u64),
    Expire,
    Remove(u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (
            0u8..6,
            prop_oneof![Just(0u32), 0u32..40, Just(Block::MAX_NUM)],
            any::<bool>(),
            0u8..=6,
            prop_oneof![Just(16usize), 0usize..1100],
            proptest::option::of(prop_oneof![0u32..2000, Just(u32::MAX)]),
            0u8..=7,
        )
            .prop_map(|(key, num, more, szx, len, size1, preferred)| Step::Offer {
                key,
                num,
                more,
                szx,
                len,
                size1,
                preferred,
            }),
        (0u8..6, 0u8..=6, any::<bool>()).prop_map(|(key, szx, last)| Step::Next { key, szx, last }),
        (0u64..200).prop_map(Step::Advance),
        Just(Step::Expire),
        (0u8..6).prop_map(Step::Remove),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever arrives in whatever order, the buffers stay within the budget, the transfer
    /// count within max_transfers, and a completed body is never longer than max_body_size.
    #[test]
    fn the_byte_budget_is_never_exceeded(
        steps in proptest::collection::vec(step(), 1..120),
        budget in 0usize..6000,
        max_transfers in 0usize..5,
    ) {
        let limits = Limits {
            max_transfers,
            max_body_size: 2500,
            budget_bytes: budget,
            lifetime: Duration::from_secs(300),
        };
        let mut table = Reassembly::new(limits);
        // What the model thinks each key holds (bytes received), to build exact "next" blocks.
        let mut now = start();
        let mut received: HashMap<u8, usize> = HashMap::new();
        for step in steps {
            match step {
                Step::Offer { key, num, more, szx, len, size1, preferred } => {
                    let verdict = table.offer(
                        now, key, block(num, more, szx), &vec![7; len], size1, preferred,
                    );
                    if let Block1Verdict::Complete { body, .. } = &verdict {
                        prop_assert!(body.len() <= limits.max_body_size);
                    }
                    received.remove(&key);
                }
                Step::Next { key, szx, last } => {
                    let held = received.get(&key).copied().unwrap_or(0);
                    let size = 16usize << szx;
                    if held % size == 0 {
                        let num = u32::try_from(held / size).unwrap();
                        let len = if last { size / 2 } else { size };
                        let verdict = table.offer(
                            now, key, block(num, !last, szx), &vec![1; len], None, 6,
                        );
                        match verdict {
                            Block1Verdict::Continue { .. } => {
                                received.insert(key, held + len);
                            }
                            Block1Verdict::Complete { body, .. } => {
                                prop_assert!(num == 0 || body.len() == held + len);
                                received.remove(&key);
                            }
                            _ => {
                                received.remove(&key);
                            }
                        }
                    }
                }
                Step::Advance(secs) => now += Duration::from_secs(secs),
                Step::Expire => {
                    table.expire(now);
                }
                Step::Remove(key) => {
                    table.remove_where(|k| *k == key);
                    received.remove(&key);
                }
            }
            prop_assert!(table.bytes() <= budget);
            prop_assert!(table.len() <= max_transfers);
            if let Err(broken) = table.check_invariants() {
                return Err(TestCaseError::fail(broken));
            }
        }
    }

    /// A body cut into blocks of random, non-increasing sizes (the client following each
    /// echo) comes out whole.
    #[test]
    fn blocks_of_shrinking_sizes_reassemble_the_body(
        len in 0usize..3000,
        szxs in proptest::collection::vec(0u8..=6, 1..8),
    ) {
        let data = body(len);
        let mut table = Reassembly::new(Limits {
            max_transfers: 1,
            max_body_size: 3000,
            budget_bytes: 3000,
            lifetime: LIFETIME,
        });
        let now = start();
        let mut szxs = szxs;
        szxs.sort_unstable_by(|a, b| b.cmp(a));
        let mut offset = 0usize;
        let mut step = 0usize;
        loop {
            let szx = szxs.get(step).copied().unwrap_or(*szxs.last().unwrap());
            let preferred = szxs.get(step + 1).copied().unwrap_or(szx);
            let size = 16usize << szx;
            // After a switch down, the offset is a multiple of the new (smaller) size.
            prop_assert_eq!(offset % size, 0);
            let num = u32::try_from(offset / size).unwrap();
            let end = (offset + size).min(len);
            let more = offset + size < len;
            let verdict = table.offer(now, (), block(num, more, szx), &data[offset..end], None, preferred);
            if more {
                prop_assert_eq!(
                    verdict,
                    Block1Verdict::Continue { echo: block(num, true, szx.min(preferred)) }
                );
            } else {
                prop_assert_eq!(
                    verdict,
                    Block1Verdict::Complete { body: Bytes::from(data), echo: block(num, false, szx) }
                );
                break;
            }
            offset = end;
            step += 1;
        }
        prop_assert!(table.is_empty());
        prop_assert_eq!(table.bytes(), 0);
    }
}

#[test]
fn the_cache_serves_a_body_with_its_etag_until_its_lifetime() {
    let now = start();
    let mut cache = Block2Cache::new(4, LIFETIME, 10);
    let payload = Bytes::from(body(3000));
    let etag = cache.insert(now, "a", payload.clone());
    assert_eq!(etag, 10);
    let (got, got_etag) = cache
        .get(now + LIFETIME - Duration::from_nanos(1), &"a")
        .unwrap();
    assert_eq!(got_etag, 10);
    assert_eq!(got.as_ptr(), payload.as_ptr(), "shared, not copied");
    assert_eq!(cache.get(now, &"b"), None);
    assert_eq!(
        cache.get(now + LIFETIME, &"a"),
        None,
        "served only within the lifetime"
    );
    assert_eq!(cache.next_deadline(), Some(now + LIFETIME));
    assert_eq!(cache.expire(now + LIFETIME - Duration::from_nanos(1)), 0);
    assert_eq!(cache.expire(now + LIFETIME), 1);
    assert!(cache.is_empty());
    assert_eq!(cache.next_deadline(), None);
    cache.check_invariants().unwrap();
}

#[test]
fn a_new_body_for_a_key_replaces_the_old_one_with_a_new_etag() {
    let now = start();
    let mut cache = Block2Cache::new(4, LIFETIME, 0);
    let first = cache.insert(now, 1, Bytes::from_static(b"old"));
    let later = now + Duration::from_secs(5);
    let second = cache.insert(later, 1, Bytes::from_static(b"new"));
    assert_ne!(first, second);
    assert_eq!(cache.len(), 1);
    assert_eq!(
        cache.get(later, &1),
        Some((Bytes::from_static(b"new"), second))
    );
    assert_eq!(cache.next_deadline(), Some(later + LIFETIME));
    cache.check_invariants().unwrap();
}

#[test]
fn the_oldest_body_is_evicted_when_the_cache_is_full() {
    let now = start();
    let mut cache = Block2Cache::new(3, LIFETIME, 0);
    for key in 0..3u32 {
        cache.insert(
            now + Duration::from_secs(u64::from(key)),
            key,
            Bytes::from_static(b"x"),
        );
    }
    // Re-inserting key 0 makes it the newest: key 1 is the oldest now.
    cache.insert(now + Duration::from_secs(3), 0, Bytes::from_static(b"y"));
    let at = now + Duration::from_secs(4);
    cache.insert(at, 3, Bytes::from_static(b"z"));
    assert_eq!(cache.len(), 3);
    assert_eq!(cache.get(at, &1), None);
    for key in [0, 2, 3] {
        assert!(cache.get(at, &key).is_some(), "key {key}");
    }
    cache.insert(at, 4, Bytes::from_static(b"w"));
    assert_eq!(cache.get(at, &2), None);
    cache.check_invariants().unwrap();
}

#[test]
fn a_cache_of_size_zero_keeps_nothing_but_still_tags() {
    let now = start();
    let mut cache = Block2Cache::new(0, LIFETIME, 5);
    assert_eq!(cache.insert(now, 1, Bytes::from_static(b"x")), 5);
    assert_eq!(cache.insert(now, 1, Bytes::from_static(b"x")), 6);
    assert!(cache.is_empty());
    assert_eq!(cache.get(now, &1), None);
    cache.check_invariants().unwrap();
}

#[test]
fn etags_wrap_around() {
    let now = start();
    let mut cache = Block2Cache::new(2, LIFETIME, u32::MAX);
    assert_eq!(cache.insert(now, 1, Bytes::new()), u32::MAX);
    assert_eq!(cache.insert(now, 2, Bytes::new()), 0);
}

#[test]
fn remove_where_drops_a_peers_bodies() {
    let now = start();
    let mut cache = Block2Cache::new(8, LIFETIME, 0);
    for key in [(1, "a"), (1, "b"), (2, "a")] {
        cache.insert(now, key, Bytes::from_static(b"x"));
    }
    assert_eq!(cache.remove_where(|(peer, _)| *peer == 1), 2);
    assert_eq!(cache.len(), 1);
    assert!(cache.get(now, &(2, "a")).is_some());
    cache.check_invariants().unwrap();
}

#[test]
fn block2_slices_cover_every_body_exactly_once() {
    for len in 0..=200usize {
        let data = body(len);
        for szx in 0..=Block::MAX_SZX {
            let mut joined = Vec::new();
            let mut num = 0u32;
            loop {
                let (slice, more) = block2_slice(&data, num, szx).unwrap();
                assert!(slice.len() <= 16 << szx);
                assert!(!more || slice.len() == 16 << szx);
                joined.extend_from_slice(slice);
                num += 1;
                if !more {
                    break;
                }
            }
            assert_eq!(joined, data, "len {len} szx {szx}");
            assert_eq!(block2_slice(&data, num, szx), None, "len {len} szx {szx}");
        }
    }
}

#[test]
fn block2_slice_edges() {
    assert_eq!(block2_slice(&[], 0, 0), Some((&[][..], false)));
    assert_eq!(block2_slice(&[], 1, 0), None);
    let data = body(32);
    assert_eq!(block2_slice(&data, 1, 0), Some((&data[16..], false)));
    assert_eq!(block2_slice(&data, 2, 0), None);
    assert_eq!(block2_slice(&data, 0, 7), None);
    assert_eq!(block2_slice(&data, u32::MAX, 6), None);
    assert_eq!(block2_slice(&data, Block::MAX_NUM, 6), None);
}
