//! The drain state machine under a virtual clock: unit tests, then a model-based property test.
#![allow(
    clippy::unwrap_used,
    clippy::disallowed_methods,
    clippy::indexing_slicing
)]

use std::collections::BTreeSet;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::message::{Origin, Protocol, Qos};
use crate::route::RouteSpec;

/// Routes for upstream 0 ("model"): `t/0` unchanged, `t/1` under a prefix at QoS 1 at
/// most; nothing for `t/2`.
fn routes() -> Arc<RouteTable> {
    let specs = [
        RouteSpec {
            filter: "t/0".into(),
            upstreams: vec!["model".into()],
            ..RouteSpec::default()
        },
        RouteSpec {
            filter: "t/1".into(),
            upstreams: vec!["model".into()],
            add_prefix: Some("up/".into()),
            qos_max: Some(Qos::AtLeastOnce),
            ..RouteSpec::default()
        },
    ];
    Arc::new(RouteTable::compile(&specs, &["model", "other"], "gw").unwrap())
}

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

// ---- Scenarios, step by step. ----

fn rec(seq: u64, qos: Qos) -> Record {
    Record {
        seq,
        time_ms: 0,
        qos,
        retain: false,
        topic: "t".into(),
        payload: Bytes::from_static(b"x"),
        origin: Default::default(),
    }
}

fn unlimited(window: usize) -> DrainConfig {
    DrainConfig {
        max_backlog: BacklogLimit::default(),
        window,
        rate_msgs: None,
        rate_bytes: None,
        ack_timeout: Duration::from_secs(5),
    }
}

fn ack(seq: u64, delivery: Delivery) -> AckReport {
    AckReport {
        token: seq,
        upstream: 0,
        delivery,
    }
}

/// A drain at cursor 1 with the link up that has read `records`.
fn started(config: DrainConfig, records: Vec<Record>, t0: Instant) -> (Drain, Arc<DrainStats>) {
    let stats = Arc::new(DrainStats::default());
    let mut d = Drain::new("unit", config, Arc::clone(&stats), 1, t0);
    assert_eq!(d.waiting_for(), Some(Wait::Link));
    d.handle_link(true);
    assert_eq!(d.poll_action(t0), Some(Action::Read));
    let next = records.last().map_or(1, |r| r.seq + 1);
    d.handle_records(t0, Ok(records), next);
    (d, stats)
}

/// Polls one send, answers it with `result`, returns its sequence id.
fn send(d: &mut Drain, now: Instant, result: Result<(), FailReason>) -> u64 {
    let Some(Action::Send { seq, .. }) = d.poll_action(now) else {
        panic!("no send");
    };
    d.handle_publish(now, result);
    seq
}

#[test]
fn a_window_of_one_sends_the_next_record_when_the_ack_comes() {
    let t0 = Instant::now();
    let records = vec![rec(1, Qos::AtLeastOnce), rec(2, Qos::AtLeastOnce)];
    let (mut d, stats) = started(unlimited(1), records, t0);
    assert_eq!(send(&mut d, t0, Ok(())), 1);
    assert_eq!(d.poll_action(t0), None);
    assert_eq!(d.waiting_for(), Some(Wait::Ack));
    assert_eq!(
        d.poll_timeout(),
        Some(t0 + Duration::from_secs(5)),
        "the ack timeout"
    );
    d.handle_ack(t0, ack(1, Delivery::Acknowledged));
    assert_eq!(send(&mut d, t0, Ok(())), 2);
    // Reads ahead while the window is full.
    assert_eq!(d.poll_action(t0), Some(Action::Read));
    d.handle_records(t0, Ok(Vec::new()), 3);
    assert_eq!(d.poll_action(t0), Some(Action::SetCursor(2)));
    assert_eq!(d.poll_action(t0), None);
    d.handle_ack(t0, ack(2, Delivery::Acknowledged));
    assert_eq!(d.poll_action(t0), Some(Action::SetCursor(3)));
    assert_eq!(d.poll_action(t0), None);
    assert_eq!(d.waiting_for(), Some(Wait::Append));
    assert_eq!(d.poll_timeout(), None);
    assert_eq!(stats.forwarded.load(Relaxed), 2);
}

#[test]
fn the_ack_latency_counts_acknowledged_sends_from_send_to_report() {
    let t0 = Instant::now();
    let records = vec![
        rec(1, Qos::AtLeastOnce),
        rec(2, Qos::AtLeastOnce),
        rec(3, Qos::AtMostOnce),
        rec(4, Qos::AtLeastOnce),
    ];
    let (mut d, stats) = started(unlimited(4), records, t0);
    assert_eq!(send(&mut d, t0, Ok(())), 1);
    let t1 = t0 + Duration::from_millis(3);
    assert_eq!(send(&mut d, t1, Ok(())), 2);
    assert_eq!(send(&mut d, t1, Ok(())), 3);
    assert_eq!(send(&mut d, t1, Ok(())), 4);
    // Out of order: 2 after 7 ms, 1 after 20 ms; 4 refused for good (no latency); the
    // QoS 0 send 3 has none either.
    d.handle_ack(
        t1 + Duration::from_millis(7),
        ack(2, Delivery::Acknowledged),
    );
    d.handle_ack(
        t0 + Duration::from_millis(20),
        ack(1, Delivery::Acknowledged),
    );
    d.handle_ack(
        t0 + Duration::from_millis(30),
        ack(4, Delivery::Failed(FailReason::Rejected)),
    );
    let latency = stats.ack_latency.snapshot();
    assert_eq!(latency.count, 2, "{latency:?}");
    assert!((latency.sum_secs - 0.027).abs() < 1e-9, "{latency:?}");
    // 7 ms and 20 ms: one at or below 10 ms, both at or below 25 ms.
    assert!(latency.buckets.contains(&(0.01, 1)), "{latency:?}");
    assert!(latency.buckets.contains(&(0.025, 2)), "{latency:?}");
    assert_eq!(d.outstanding(), 0);
    assert_eq!(stats.forwarded.load(Relaxed), 3);
}

#[test]
fn qos0_records_take_no_slot_of_the_window() {
    let t0 = Instant::now();
    let records = vec![
        rec(1, Qos::AtLeastOnce),
        rec(2, Qos::AtMostOnce),
        rec(3, Qos::AtMostOnce),
    ];
    let (mut d, _) = started(unlimited(1), records, t0);
    for want in 1..=3 {
        assert_eq!(send(&mut d, t0, Ok(())), want);
    }
    // Record 1 is unacknowledged: the cursor stays below it.
    assert_eq!(d.poll_action(t0), Some(Action::Read));
    d.handle_records(t0, Ok(Vec::new()), 4);
    assert_eq!(d.poll_action(t0), None);
    assert_eq!(d.cursor(), 1);
}

#[test]
fn an_ack_timeout_resets_the_link_once_then_everything_unacknowledged_is_sent_again() {
    let t0 = Instant::now();
    let records = vec![rec(1, Qos::AtLeastOnce), rec(2, Qos::AtLeastOnce)];
    let (mut d, stats) = started(unlimited(2), records.clone(), t0);
    assert_eq!(send(&mut d, t0, Ok(())), 1);
    assert_eq!(send(&mut d, t0, Ok(())), 2);
    d.handle_ack(t0, ack(2, Delivery::Acknowledged));
    assert_eq!(d.poll_action(t0), Some(Action::Read));
    d.handle_records(t0, Ok(Vec::new()), 3);
    assert_eq!(d.poll_action(t0), None);
    let due = d.poll_timeout().unwrap();
    // Early: nothing.
    d.handle_timeout(due - Duration::from_millis(1));
    assert_eq!(d.poll_action(due - Duration::from_millis(1)), None);
    d.handle_timeout(due);
    assert_eq!(d.poll_action(due), Some(Action::ResetLink));
    assert_eq!(d.poll_action(due), None, "once");
    assert_eq!(d.waiting_for(), Some(Wait::Ack));
    d.handle_ack(t0, ack(1, Delivery::Failed(FailReason::Disconnected)));
    assert_eq!(d.poll_action(due), Some(Action::Rewind));
    d.handle_link(false);
    assert_eq!(d.poll_action(due), None);
    assert_eq!(d.waiting_for(), Some(Wait::Link));
    d.handle_link(true);
    assert_eq!(d.poll_action(due), Some(Action::Read));
    d.handle_records(due, Ok(records), 3);
    assert_eq!(send(&mut d, due, Ok(())), 1);
    assert_eq!(send(&mut d, due, Ok(())), 2);
    assert_eq!(stats.resent.load(Relaxed), 2);
    assert_eq!(stats.ack_timeouts.load(Relaxed), 1);
}

#[test]
fn a_message_the_peer_refuses_for_now_is_sent_again_after_a_pause() {
    let t0 = Instant::now();
    let records = vec![rec(1, Qos::AtLeastOnce)];
    let (mut d, stats) = started(unlimited(4), records.clone(), t0);
    assert_eq!(send(&mut d, t0, Ok(())), 1);
    d.handle_ack(t0, ack(1, Delivery::Failed(FailReason::BrokerBusy)));
    assert_eq!(d.poll_action(t0), Some(Action::Rewind), "not given up");
    assert_eq!(d.poll_action(t0), None, "not asked again at once");
    assert_eq!(d.poll_timeout(), Some(t0 + BROKER_BUSY_RETRY));
    let later = t0 + BROKER_BUSY_RETRY;
    d.handle_timeout(later);
    assert_eq!(d.poll_action(later), Some(Action::Read));
    d.handle_records(later, Ok(records), 2);
    assert_eq!(send(&mut d, later, Ok(())), 1);
    d.handle_ack(later, ack(1, Delivery::Acknowledged));
    assert_eq!(d.poll_action(later), Some(Action::Read));
    d.handle_records(later, Ok(Vec::new()), 2);
    assert_eq!(d.poll_action(later), Some(Action::SetCursor(2)));
    assert_eq!(stats.rejected.load(Relaxed), 0);
    assert_eq!(stats.resent.load(Relaxed), 1);
}

#[test]
fn a_peer_that_goes_silent_during_a_rewind_on_a_live_link_is_reset() {
    let t0 = Instant::now();
    let records = vec![rec(1, Qos::AtLeastOnce), rec(2, Qos::AtLeastOnce)];
    let (mut d, stats) = started(unlimited(4), records, t0);
    assert_eq!(send(&mut d, t0, Ok(())), 1);
    assert_eq!(send(&mut d, t0, Ok(())), 2);
    // 1 is refused for now; the rewind waits for 2's report, which never comes.
    d.handle_ack(t0, ack(1, Delivery::Failed(FailReason::BrokerBusy)));
    while d.poll_action(t0).is_some() {}
    // Follow the timers (the busy pause, then the ack timeout), a bounded number of them.
    let mut actions = Vec::new();
    for _ in 0..10 {
        let due = d.poll_timeout().expect("a timer stays armed");
        assert!(due <= t0 + unlimited(4).ack_timeout, "{due:?}");
        d.handle_timeout(due);
        while let Some(a) = d.poll_action(due) {
            actions.push(a);
        }
        if actions.contains(&Action::ResetLink) {
            break;
        }
    }
    assert!(actions.contains(&Action::ResetLink), "{actions:?}");
    assert_eq!(stats.ack_timeouts.load(Relaxed), 1);
}

#[test]
fn a_stopping_drain_sends_nothing_new_and_ends_with_the_last_report() {
    let t0 = Instant::now();
    let records = vec![rec(1, Qos::AtLeastOnce), rec(2, Qos::AtLeastOnce)];
    let (mut d, _) = started(unlimited(8), records, t0);
    assert_eq!(send(&mut d, t0, Ok(())), 1);
    d.handle_shutdown();
    assert_eq!(d.poll_action(t0), None);
    assert_eq!(d.waiting_for(), Some(Wait::Ack));
    assert_eq!(d.poll_timeout(), None);
    d.handle_ack(t0, ack(1, Delivery::Acknowledged));
    assert_eq!(d.poll_action(t0), Some(Action::SetCursor(2)));
    assert_eq!(d.poll_action(t0), Some(Action::Done));
    assert_eq!(d.poll_action(t0), None);
}

#[test]
fn a_full_request_queue_and_a_failed_read_arm_retry_timers() {
    let t0 = Instant::now();
    let (mut d, _) = started(unlimited(8), vec![rec(1, Qos::AtMostOnce)], t0);
    assert_eq!(send(&mut d, t0, Err(FailReason::QueueFull)), 1);
    assert_eq!(d.poll_action(t0), None);
    assert_eq!(d.poll_timeout(), Some(t0 + QUEUE_FULL_RETRY));
    let t1 = t0 + QUEUE_FULL_RETRY;
    d.handle_timeout(t1);
    assert_eq!(send(&mut d, t1, Ok(())), 1);
    assert_eq!(d.poll_action(t1), Some(Action::Read));
    d.handle_records(t1, Err(Vec::new()), 2);
    assert_eq!(d.poll_action(t1), Some(Action::SetCursor(2)));
    assert_eq!(d.poll_action(t1), None);
    assert_eq!(d.poll_timeout(), Some(t1 + READ_RETRY));
    d.handle_timeout(t1 + READ_RETRY);
    assert_eq!(d.poll_action(t1 + READ_RETRY), Some(Action::Read));
}

// ---- The model: a fake spool, a fake upstream and a virtual clock around one `Drain`. ----

fn rec_on(seq: u64, topic: &str) -> Record {
    Record {
        topic: topic.into(),
        ..rec(seq, Qos::AtLeastOnce)
    }
}

#[test]
fn new_settings_apply_while_running_and_the_window_stays() {
    let t0 = Instant::now();
    let records = vec![
        rec(1, Qos::AtLeastOnce),
        rec(2, Qos::AtLeastOnce),
        rec(3, Qos::AtLeastOnce),
    ];
    let (mut d, _stats) = started(unlimited(1), records, t0);
    assert_eq!(send(&mut d, t0, Ok(())), 1);
    assert_eq!(d.poll_timeout(), Some(t0 + Duration::from_secs(5)));
    let mut config = unlimited(8);
    config.ack_timeout = Duration::from_secs(2);
    config.rate_msgs = Some(1);
    d.set_config(t0, config);
    assert_eq!(
        d.poll_timeout(),
        Some(t0 + Duration::from_secs(2)),
        "the unacknowledged send follows the new ack timeout"
    );
    let drive = |d: &mut Drain, now: Instant| {
        let mut sent = Vec::new();
        while let Some(action) = d.poll_action(now) {
            if let Action::Send { seq, .. } = action {
                d.handle_publish(now, Ok(()));
                sent.push(seq);
            }
        }
        sent
    };
    assert_eq!(drive(&mut d, t0), [] as [u64; 0], "the window is still 1");
    d.handle_ack(t0, ack(1, Delivery::Acknowledged));
    // One message per second now: the bucket starts full (a one-second burst), then waits.
    assert_eq!(drive(&mut d, t0), [2]);
    d.handle_ack(t0, ack(2, Delivery::Acknowledged));
    assert_eq!(drive(&mut d, t0), [] as [u64; 0], "rate limited");
    assert!(d.poll_timeout().is_some_and(|t| t > t0));
    let later = t0 + Duration::from_secs(1);
    d.handle_timeout(later);
    assert_eq!(drive(&mut d, later), [3], "3 goes once the rate allows");
}

#[test]
fn a_route_swap_applies_from_the_next_read() {
    let t0 = Instant::now();
    let stats = Arc::new(DrainStats::default());
    let shared = SharedRoutes::new(routes());
    let mut d =
        Drain::new("unit", unlimited(4), Arc::clone(&stats), 1, t0).with_routes(0, shared.clone());
    d.handle_link(true);
    assert_eq!(d.poll_action(t0), Some(Action::Read));
    d.handle_records(t0, Ok(vec![rec_on(1, "t/2")]), 2);
    assert_eq!(stats.unrouted.load(Relaxed), 1, "no route for t/2 yet");
    // The reload: everything goes everywhere now.
    shared.store(Arc::new(RouteTable::everything()));
    assert_eq!(d.poll_action(t0), Some(Action::Read));
    d.handle_records(t0, Ok(vec![rec_on(2, "t/2")]), 3);
    let Some(Action::Send {
        seq: 2, message, ..
    }) = d.poll_action(t0)
    else {
        panic!("record 2 is sent under the new table");
    };
    assert_eq!(message.topic, "t/2");
    assert_eq!(stats.unrouted.load(Relaxed), 1);
}

#[test]
fn unrouted_records_pass_with_the_cursor_and_do_not_hold_up_the_others() {
    let t0 = Instant::now();
    let stats = Arc::new(DrainStats::default());
    let mut d =
        Drain::new("unit", unlimited(4), Arc::clone(&stats), 1, t0).with_routes(0, routes().into());
    d.handle_link(true);
    assert_eq!(d.poll_action(t0), Some(Action::Read));
    let records = vec![
        rec_on(1, "t/0"),
        rec_on(2, "t/2"),
        rec_on(3, "t/1"),
        rec_on(4, "t/2"),
    ];
    d.handle_records(t0, Ok(records.clone()), 5);
    assert_eq!(stats.unrouted.load(Relaxed), 2);
    assert_eq!(send(&mut d, t0, Ok(())), 1);
    let Some(Action::Send {
        seq: 3, message, ..
    }) = d.poll_action(t0)
    else {
        panic!("record 3 next");
    };
    let target = routes()
        .target(0, "t/1", Qos::AtLeastOnce, &Origin::default())
        .unwrap();
    assert_eq!(message.topic, target.topic);
    d.handle_publish(t0, Ok(()));
    assert_eq!(d.poll_action(t0), Some(Action::Read));
    d.handle_records(t0, Ok(vec![]), 5);
    assert_eq!(d.poll_action(t0), None, "1 is not acknowledged yet");
    // Out of order: 3 first, then 1; the cursor then passes the unrouted 4 as well.
    d.handle_ack(t0, ack(3, Delivery::Acknowledged));
    assert_eq!(d.poll_action(t0), None);
    d.handle_ack(t0, ack(1, Delivery::Acknowledged));
    assert_eq!(d.poll_action(t0), Some(Action::SetCursor(5)));
    // A lost connection before the acks: the rewind reads 2 and 4 again, counted once.
    let mut d =
        Drain::new("unit", unlimited(4), Arc::clone(&stats), 1, t0).with_routes(0, routes().into());
    d.handle_link(true);
    assert_eq!(d.poll_action(t0), Some(Action::Read));
    d.handle_records(t0, Ok(records.clone()), 5);
    send(&mut d, t0, Ok(()));
    send(&mut d, t0, Ok(()));
    d.handle_ack(t0, ack(1, Delivery::Failed(FailReason::Disconnected)));
    d.handle_ack(t0, ack(3, Delivery::Failed(FailReason::Disconnected)));
    assert_eq!(d.poll_action(t0), Some(Action::Rewind));
    assert_eq!(d.poll_action(t0), Some(Action::Read));
    d.handle_records(t0, Ok(records), 5);
    assert_eq!(stats.unrouted.load(Relaxed), 4, "2 + 2, not 2 + 4");
}

fn capped() -> DrainConfig {
    DrainConfig {
        max_backlog: BacklogLimit {
            bytes: Some(1),
            age: None,
        },
        ..unlimited(4)
    }
}

#[test]
fn the_backlog_is_checked_with_the_link_down_and_a_give_up_moves_the_cursor() {
    let t0 = Instant::now();
    let stats = Arc::new(DrainStats::default());
    let mut d = Drain::new("unit", capped(), Arc::clone(&stats), 1, t0);
    // Link down: nothing is sent, yet the backlog is checked at once, then on appends and
    // on the timer.
    assert_eq!(d.poll_action(t0), Some(Action::CheckBacklog));
    d.handle_backlog(t0, BacklogCheck::default());
    assert_eq!(d.poll_action(t0), None);
    assert_eq!(d.poll_timeout(), Some(t0 + BACKLOG_CHECK));
    d.handle_appended();
    assert_eq!(d.poll_action(t0), Some(Action::CheckBacklog));
    let give_up = BacklogCheck {
        give_up: Some(GiveUp { to: 10, records: 9 }),
        caught_up: false,
    };
    d.handle_backlog(t0, give_up);
    assert_eq!(d.poll_action(t0), Some(Action::SetCursor(10)));
    assert_eq!(stats.backlog_dropped.load(Relaxed), 9);
    assert_eq!(d.poll_action(t0), None);
    let later = t0 + BACKLOG_CHECK;
    d.handle_timeout(later);
    assert_eq!(d.poll_action(later), Some(Action::CheckBacklog));
    d.handle_backlog(later, give_up);
    assert_eq!(
        d.poll_action(later),
        None,
        "an old answer moves nothing back"
    );
    assert_eq!(stats.backlog_dropped.load(Relaxed), 9);
}

#[test]
fn sends_in_flight_that_are_given_up_only_free_their_slots() {
    let t0 = Instant::now();
    let stats = Arc::new(DrainStats::default());
    let mut d = Drain::new("unit", capped(), Arc::clone(&stats), 1, t0);
    assert_eq!(d.poll_action(t0), Some(Action::CheckBacklog));
    d.handle_backlog(t0, BacklogCheck::default());
    d.handle_link(true);
    assert_eq!(d.poll_action(t0), Some(Action::Read));
    let records: Vec<Record> = (1..=6).map(|s| rec(s, Qos::AtLeastOnce)).collect();
    d.handle_records(t0, Ok(records), 7);
    for want in 1..=4 {
        assert_eq!(send(&mut d, t0, Ok(())), want);
    }
    assert_eq!(d.poll_action(t0), None, "window of 4 full");
    // Records 1 to 5 are given up: 1-4 in flight, 5 read ahead.
    d.handle_appended();
    assert_eq!(d.poll_action(t0), Some(Action::CheckBacklog));
    d.handle_backlog(
        t0,
        BacklogCheck {
            give_up: Some(GiveUp { to: 6, records: 5 }),
            caught_up: false,
        },
    );
    assert_eq!(d.poll_action(t0), Some(Action::SetCursor(6)));
    assert_eq!(
        d.poll_action(t0),
        None,
        "the 4 reports still hold the window"
    );
    assert_eq!(d.waiting_for(), Some(Wait::Ack));
    for seq in [3, 1, 4] {
        d.handle_ack(t0, ack(seq, Delivery::Acknowledged));
    }
    // A lost connection's report for a given-up send: no rewind below the cursor.
    d.handle_ack(t0, ack(2, Delivery::Failed(FailReason::Disconnected)));
    assert_eq!(stats.forwarded.load(Relaxed), 0, "given up, not forwarded");
    assert_eq!(
        d.poll_action(t0),
        Some(Action::Send {
            seq: 6,
            tracked: true,
            message: Message::new("t", Bytes::from_static(b"x"), Qos::AtLeastOnce, false)
        })
    );
    d.handle_publish(t0, Ok(()));
    d.handle_ack(t0, ack(6, Delivery::Acknowledged));
    assert_eq!(d.poll_action(t0), Some(Action::Read));
    d.handle_records(t0, Ok(vec![]), 7);
    assert_eq!(d.poll_action(t0), Some(Action::SetCursor(7)));
    assert_eq!(stats.forwarded.load(Relaxed), 1);
    assert_eq!(stats.backlog_dropped.load(Relaxed), 5);
}

/// An event the drain task would see (in the order the task would see it).
#[derive(Debug, Clone, Copy)]
enum Event {
    Report(AckReport),
    Link(bool),
    Appended,
}

/// Everything around the machine, and what the invariants need.
struct Harness {
    drain: Drain,
    stats: Arc<DrainStats>,
    config: DrainConfig,
    t0: Instant,
    now: Instant,
    /// The spool: sequence ids from 1, in order.
    log: Vec<Record>,
    /// The read position.
    read_next: u64,
    /// The cursor as set by `SetCursor`.
    cursor: u64,
    /// The next spool read fails.
    read_fails: bool,
    /// The upstream's link.
    link_up: bool,
    /// The next publish is refused with this (one shot).
    refuse: Option<FailReason>,
    /// Tracked sends accepted on the current connection and not reported.
    in_flight: Vec<u64>,
    /// Events not yet handed to the machine.
    events: VecDeque<Event>,
    /// Sequence ids settled upstream: acknowledged, refused for good, or QoS 0 taken.
    settled: BTreeSet<u64>,
    /// Sequence ids sent at least once, and the order of first sends.
    first_sent: Vec<u64>,
    sent_once: BTreeSet<u64>,
    /// Send actions handed out (each took rate tokens), and their bytes.
    sends: u64,
    bytes: u64,
    /// The largest message appended (topic and payload bytes).
    largest: usize,
    done: bool,
    /// The route table in use (`everything` when the run does not route).
    routes: Arc<RouteTable>,
    /// Records the backlog cap may leave behind the cursor, if capped.
    cap: Option<u64>,
    /// Sequence ids the cap gave up.
    given_up: BTreeSet<u64>,
}

impl Harness {
    fn new(mut config: DrainConfig, routed: bool, cap: Option<u64>) -> Self {
        let t0 = Instant::now();
        let stats = Arc::new(DrainStats::default());
        // The machine only looks whether a limit is set; the model measures in records.
        config.max_backlog.bytes = cap;
        let routes = if routed {
            routes()
        } else {
            Arc::new(RouteTable::everything())
        };
        let mut drain = Drain::new("model", config, Arc::clone(&stats), 1, t0)
            .with_routes(0, Arc::clone(&routes).into());
        drain.handle_link(true);
        let mut h = Self {
            drain,
            stats,
            config,
            t0,
            now: t0,
            log: Vec::new(),
            read_next: 1,
            cursor: 1,
            read_fails: false,
            link_up: true,
            refuse: None,
            in_flight: Vec::new(),
            events: VecDeque::new(),
            settled: BTreeSet::new(),
            first_sent: Vec::new(),
            sent_once: BTreeSet::new(),
            sends: 0,
            bytes: 0,
            largest: 0,
            done: false,
            routes,
            cap,
            given_up: BTreeSet::new(),
        };
        h.pump();
        h
    }

    fn record(&self, seq: u64) -> &Record {
        &self.log[usize::try_from(seq - 1).unwrap()]
    }

    fn append(&mut self, qos: Qos, len: usize) {
        let seq = self.log.len() as u64 + 1;
        self.largest = self.largest.max(4 + len);
        self.log.push(Record {
            seq,
            time_ms: 0,
            qos,
            retain: false,
            topic: format!("t/{}", seq % 3),
            payload: Bytes::from(vec![0u8; len]),
            origin: Origin {
                protocol: Protocol::MqttSn,
                client_id: Some(Arc::from(format!("c{seq}"))),
                peer: None,
            },
        });
        self.events.push_back(Event::Appended);
    }

    /// The upstream loses its connection: every tracked send in flight fails.
    fn lose_link(&mut self) {
        if !self.link_up {
            return;
        }
        self.link_up = false;
        for seq in self.in_flight.drain(..) {
            self.events.push_back(Event::Report(AckReport {
                token: seq,
                upstream: 0,
                delivery: Delivery::Failed(FailReason::Disconnected),
            }));
        }
        self.events.push_back(Event::Link(false));
    }

    fn restore_link(&mut self) {
        if !self.link_up {
            self.link_up = true;
            self.events.push_back(Event::Link(true));
        }
    }

    /// The peer answers the `i`-th send in flight (any order).
    fn answer(&mut self, i: usize, delivery: Delivery) {
        if self.in_flight.is_empty() {
            return;
        }
        let seq = self.in_flight.remove(i % self.in_flight.len());
        if delivery == Delivery::Acknowledged || delivery == Delivery::Failed(FailReason::Rejected)
        {
            self.settled.insert(seq);
        }
        self.events.push_back(Event::Report(AckReport {
            token: seq,
            upstream: 0,
            delivery,
        }));
    }

    fn deliver(&mut self, n: usize) {
        for _ in 0..n {
            let Some(event) = self.events.pop_front() else {
                break;
            };
            match event {
                Event::Report(r) => self.drain.handle_ack(self.now, r),
                Event::Link(up) => self.drain.handle_link(up),
                Event::Appended => self.drain.handle_appended(),
            }
            self.pump();
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
        if self.drain.poll_timeout().is_some_and(|t| t <= self.now) {
            self.drain.handle_timeout(self.now);
        }
        self.pump();
    }

    fn shutdown(&mut self) {
        self.drain.handle_shutdown();
        self.pump();
    }

    /// What the task does after an input: every action, then the invariants.
    fn pump(&mut self) {
        let mut sends_this_turn = 0usize;
        while let Some(action) = self.drain.poll_action(self.now) {
            assert!(!self.done, "an action after Done: {action:?}");
            match action {
                Action::Send {
                    seq,
                    tracked,
                    message,
                } => {
                    self.sends += 1;
                    self.bytes += (message.topic.len() + message.payload.len()) as u64;
                    sends_this_turn += 1;
                    let rec = self.record(seq);
                    let target = self
                        .routes
                        .target(0, &rec.topic, rec.qos, &rec.origin)
                        .expect("only routed records are sent");
                    assert_eq!(tracked, target.qos.is_acknowledged());
                    assert_eq!(message.topic, target.topic);
                    assert_eq!(message.qos, target.qos);
                    assert_eq!(message.origin, rec.origin);
                    assert!(!self.given_up.contains(&seq), "{seq} was given up");
                    let result = if !self.link_up {
                        Err(FailReason::Disconnected)
                    } else if let Some(reason) = self.refuse.take() {
                        Err(reason)
                    } else {
                        Ok(())
                    };
                    if result.is_ok() || result == Err(FailReason::Rejected) {
                        if self.sent_once.insert(seq) {
                            // Order of first sends is log order.
                            assert!(self.first_sent.last().is_none_or(|&l| l < seq));
                            self.first_sent.push(seq);
                        }
                        if result.is_err() || !tracked {
                            self.settled.insert(seq);
                        } else {
                            self.in_flight.push(seq);
                        }
                    }
                    self.drain.handle_publish(self.now, result);
                }
                Action::Read => {
                    let from = usize::try_from(self.read_next - 1).unwrap();
                    let out: Vec<Record> = self
                        .log
                        .iter()
                        .skip(from)
                        .take(READ_BATCH)
                        .cloned()
                        .collect();
                    if let Some(last) = out.last() {
                        self.read_next = last.seq + 1;
                    }
                    let result = if std::mem::take(&mut self.read_fails) {
                        Err(out)
                    } else {
                        Ok(out)
                    };
                    self.drain.handle_records(self.now, result, self.read_next);
                }
                Action::SetCursor(seq) => {
                    assert!(seq > self.cursor, "the cursor moves forward only");
                    for s in self.cursor..seq {
                        assert!(
                            self.settled.contains(&s)
                                || self.given_up.contains(&s)
                                || !self.routed(s),
                            "the cursor passes {s}, not settled (cursor {seq})"
                        );
                    }
                    self.cursor = seq;
                }
                Action::Rewind => self.read_next = self.cursor,
                Action::CheckBacklog => {
                    let cap = self.cap.expect("checks only with a cap");
                    let end = self.log.len() as u64 + 1;
                    let behind = end - self.cursor;
                    let give_up = (behind > cap).then(|| GiveUp {
                        to: end - cap,
                        records: end - cap - self.cursor,
                    });
                    if let Some(g) = give_up {
                        self.given_up.extend(self.cursor..g.to);
                    }
                    let check = BacklogCheck {
                        give_up,
                        caught_up: behind <= cap,
                    };
                    self.drain.handle_backlog(self.now, check);
                }
                Action::ResetLink => {
                    self.lose_link();
                    // The upstream reconnects after its backoff.
                    self.restore_link();
                }
                Action::Done => self.done = true,
            }
        }
        self.check(sends_this_turn);
    }

    /// Whether record `seq` goes to this upstream.
    fn routed(&self, seq: u64) -> bool {
        let rec = self.record(seq);
        self.routes
            .target(0, &rec.topic, rec.qos, &rec.origin)
            .is_some()
    }

    fn check(&self, sends_this_turn: usize) {
        // Bounded work per turn.
        assert!(sends_this_turn <= SENDS_PER_BATCH + 1);
        // Window: tracked sends without a report handled by the machine.
        assert!(self.drain.outstanding() <= self.config.window);
        // The rate: a one-second burst, then the rate.
        if let Some(rate) = self.config.rate_msgs {
            let secs = self.now.duration_since(self.t0).as_secs_f64();
            let most = f64::from(rate) * (secs + 1.0) + 1.0;
            assert!(
                (self.sends as f64) <= most,
                "{} sends in {secs} s",
                self.sends
            );
        }
        if let Some(rate) = self.config.rate_bytes {
            // A message larger than the rate passes once the bucket holds all of it.
            let secs = self.now.duration_since(self.t0).as_secs_f64();
            let most = rate as f64 * (secs + 1.0) + self.largest as f64 + 1.0;
            assert!(
                (self.bytes as f64) <= most,
                "{} bytes in {secs} s",
                self.bytes
            );
        }
        // Never idle with work pending, and the named wait is true.
        if self.done {
            return;
        }
        match self.drain.waiting_for() {
            Some(Wait::Ack) => {
                let report_coming = !self.in_flight.is_empty()
                    || self.events.iter().any(|e| matches!(e, Event::Report(_)));
                assert!(self.drain.outstanding() > 0 && report_coming);
            }
            Some(Wait::Append) => {
                let append_coming = self.events.iter().any(|e| matches!(e, Event::Appended));
                assert!(self.read_next == self.log.len() as u64 + 1 || append_coming);
            }
            Some(Wait::Link) => {}
            Some(Wait::Read) => panic!("a read is always answered at once here"),
            None => assert!(
                self.drain.poll_timeout().is_some(),
                "idle with nothing to wake it"
            ),
        }
    }

    /// Lets the link stay up and the peer answer until nothing moves.
    fn settle(&mut self) {
        self.refuse = None;
        for _ in 0..100_000 {
            if !self.events.is_empty() {
                self.deliver(usize::MAX);
            } else if !self.in_flight.is_empty() {
                self.answer(0, Delivery::Acknowledged);
            } else if !self.link_up {
                self.restore_link();
            } else if self.cap.is_some()
                && self.cursor == self.log.len() as u64 + 1
                && self.drain.waiting_for() == Some(Wait::Append)
            {
                // Only the periodic backlog check is left.
                return;
            } else if let Some(at) = self.drain.poll_timeout() {
                self.now = self.now.max(at);
                self.drain.handle_timeout(self.now);
                self.pump();
            } else {
                return;
            }
        }
        panic!("the drain does not settle");
    }
}

/// One step of a random run.
#[derive(Debug, Clone)]
enum Op {
    Append {
        qos: u8,
        len: usize,
        n: usize,
    },
    Deliver(usize),
    Ack(usize),
    Reject(usize),
    /// The peer refuses a message for now (quota exceeded): it must be sent again.
    Busy(usize),
    LinkDown,
    LinkUp,
    Advance(u64),
    Refuse(u8),
    ReadFails,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3, 0usize..40, 1usize..30).prop_map(|(qos, len, n)| Op::Append { qos, len, n }),
        // More than one batch of sends: the budget.
        1 => Just(Op::Append { qos: 0, len: 1, n: SENDS_PER_BATCH + 100 }),
        4 => (1usize..20).prop_map(Op::Deliver),
        3 => any::<usize>().prop_map(Op::Ack),
        1 => any::<usize>().prop_map(Op::Reject),
        1 => any::<usize>().prop_map(Op::Busy),
        1 => Just(Op::LinkDown),
        1 => Just(Op::LinkUp),
        2 => (0u64..3000).prop_map(Op::Advance),
        1 => (0u8..2).prop_map(Op::Refuse),
        1 => Just(Op::ReadFails),
    ]
}

fn config() -> impl Strategy<Value = DrainConfig> {
    (
        1usize..8,
        prop::option::of(1u32..200),
        prop::option::of(50u64..2000),
        100u64..5000,
    )
        .prop_map(|(window, rate_msgs, rate_bytes, ack_ms)| DrainConfig {
            max_backlog: BacklogLimit::default(),
            window,
            rate_msgs,
            rate_bytes,
            ack_timeout: Duration::from_millis(ack_ms),
        })
}

fn run(config: DrainConfig, routed: bool, cap: Option<u64>, ops: &[Op], stop: bool) -> Harness {
    let mut h = Harness::new(config, routed, cap);
    for op in ops {
        match *op {
            Op::Append { qos, len, n } => {
                let qos = [Qos::AtMostOnce, Qos::AtLeastOnce, Qos::ExactlyOnce][usize::from(qos)];
                for _ in 0..n {
                    h.append(qos, len);
                }
            }
            Op::Deliver(n) => h.deliver(n),
            Op::Ack(i) => h.answer(i, Delivery::Acknowledged),
            Op::Reject(i) => h.answer(i, Delivery::Failed(FailReason::Rejected)),
            Op::Busy(i) => h.answer(i, Delivery::Failed(FailReason::BrokerBusy)),
            Op::LinkDown => h.lose_link(),
            Op::LinkUp => h.restore_link(),
            Op::Advance(ms) => h.advance(ms),
            Op::Refuse(r) => {
                h.refuse = Some([FailReason::QueueFull, FailReason::Rejected][usize::from(r)])
            }
            Op::ReadFails => h.read_fails = true,
        }
    }
    if stop {
        h.shutdown();
    }
    h.settle();
    h
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Every record is sent (in log order at first) and settled once the link stays up long
    /// enough, and the cursor ends past the log; the invariants hold after every input.
    #[test]
    fn every_record_is_settled_in_order_once_the_link_stays_up(
        config in config(),
        routed in any::<bool>(),
        ops in prop::collection::vec(op(), 0..80),
    ) {
        let h = run(config, routed, None, &ops, false);
        let all: Vec<u64> = (1..=h.log.len() as u64).filter(|&s| h.routed(s)).collect();
        prop_assert_eq!(&h.first_sent, &all);
        prop_assert!(all.iter().all(|s| h.settled.contains(s)));
        let unrouted = h.log.len() - all.len();
        prop_assert_eq!(h.stats.unrouted.load(Relaxed), unrouted as u64, "counted once each");
        prop_assert_eq!(h.cursor, h.log.len() as u64 + 1);
        prop_assert_eq!(h.drain.waiting_for(), Some(Wait::Append));
        let stats = &h.stats;
        prop_assert_eq!(
            stats.forwarded.load(Relaxed) + stats.rejected.load(Relaxed) >= all.len() as u64,
            true
        );
    }

    /// With a backlog cap (and routing): every routed record not given up is settled, first
    /// sends keep log order, nothing given up is sent afterwards, the cursor ends past the
    /// log, and the counters match what was skipped and given up.
    #[test]
    fn a_capped_backlog_gives_up_only_its_oldest_records(
        config in config(),
        routed in any::<bool>(),
        cap in 1u64..40,
        ops in prop::collection::vec(op(), 0..80),
    ) {
        let h = run(config, routed, Some(cap), &ops, false);
        let kept: Vec<u64> = (1..=h.log.len() as u64)
            .filter(|&s| h.routed(s) && !h.given_up.contains(&s))
            .collect();
        prop_assert!(kept.iter().all(|s| h.settled.contains(s)));
        prop_assert_eq!(h.cursor, h.log.len() as u64 + 1);
        prop_assert_eq!(h.stats.backlog_dropped.load(Relaxed), h.given_up.len() as u64);
    }

    /// A shutdown anywhere sends nothing new and ends once every report is in.
    #[test]
    fn a_shutdown_ends_once_every_report_is_in(
        config in config(),
        routed in any::<bool>(),
        cap in prop::option::of(1u64..40),
        ops in prop::collection::vec(op(), 0..80),
    ) {
        let h = run(config, routed, cap, &ops, true);
        prop_assert!(h.done);
        prop_assert_eq!(h.drain.outstanding(), 0);
        prop_assert!(h.in_flight.is_empty());
    }
}
