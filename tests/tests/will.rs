//! The Will: the handshake (raw bytes and the PyPI mqtt-sn-12 client), an empty WILLTOPIC,
//! WILLTOPICUPD / WILLMSGUPD (and an empty WILLTOPICUPD deleting the Will), and when the Will
//! is published: keep-alive expiry (after 1.5 x Duration, not before), sleep timer expiry —
//! and never after a clean DISCONNECT. Wills are observed with the paho subscriber.
//!
//! "No Will was published" is proven with an uplink marker: another client publishes to the
//! observed filter after the moment the Will would have gone out; the marker must be the
//! first thing the observer sees. Sleeps in this file only let a timer run out, with margin.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use sensorgate_tests::sn::{self, Packet, Qos, TopicType};
use sensorgate_tests::{REPLY_TIMEOUT, Rig, Script, Subscriber};

/// Publishes `marker` on `topic` from a fresh client and requires it to be the observer's next
/// message: nothing (no Will) was published before it.
fn assert_only_marker_follows(rig: &Rig, observer: &mut Subscriber, topic: &str, why: &str) {
    let mut m = rig.connected("will-marker").unwrap();
    let id = m.register(topic).unwrap();
    m.publish_qos1_ok(TopicType::Normal, id, b"marker").unwrap();
    let got = observer.expect().unwrap();
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        (topic, &b"marker"[..]),
        "{why}: something was published before the marker"
    );
}

/// Lets a timer of `d` run out, with margin.
fn outlast(d: Duration) {
    std::thread::sleep(d + Duration::from_millis(1500));
}

#[test]
fn will_with_qos2_and_retain_is_published_after_one_and_a_half_keep_alive_periods() {
    let rig = Rig::start().unwrap();
    let mut wills = rig.subscribe(&["wl/#"]).unwrap();
    let mut c = rig.client().unwrap();
    c.connect_with_will("ka-lost", true, 2, Qos::Two, true, "wl/ka", b"ka-gone")
        .unwrap();
    let connected = Instant::now();
    let m = wills.expect().unwrap();
    let after = connected.elapsed();
    assert_eq!(
        (m.topic.as_str(), &m.payload[..], m.qos, m.retain),
        ("wl/ka", &b"ka-gone"[..], 2, true),
        "the Will with its QoS and retain flag"
    );
    // Keep-alive 2 s: lost after 3 s of silence, not after 2.
    assert!(
        after >= Duration::from_millis(2500),
        "the Will came {after:?} after CONNACK; the gateway must allow 1.5 x 2 s"
    );
    // It was retained at the broker: a later subscriber gets it.
    let mut late = rig.subscribe(&["wl/ka"]).unwrap();
    let m = late.expect().unwrap();
    assert_eq!((&m.payload[..], m.retain), (&b"ka-gone"[..], true));
    // The lost session is gone.
    c.send(&sn::pingreq()).unwrap();
    assert_eq!(c.next_packet().unwrap(), Packet::Disconnect);
}

#[test]
fn keep_alive_traffic_keeps_the_session_and_its_will_unpublished() {
    let rig = Rig::start().unwrap();
    let mut wills = rig.subscribe(&["wk/#"]).unwrap();
    let mut c = rig.client().unwrap();
    c.connect_with_will("ka-alive", true, 2, Qos::One, false, "wk/alive", b"x")
        .unwrap();
    // PINGREQ every second for 5 s (well past 1.5 x 2 s since CONNECT).
    for _ in 0..5 {
        std::thread::sleep(Duration::from_secs(1));
        c.ping().unwrap();
    }
    assert_only_marker_follows(&rig, &mut wills, "wk/marker", "a live client");
    c.disconnect().unwrap();
}

#[test]
fn empty_willtopic_means_no_will() {
    let rig = Rig::start().unwrap();
    let mut observer = rig.subscribe(&["#"]).unwrap();
    let c = rig.client().unwrap();
    c.send(&sn::connect(sn::FLAG_CLEAN | sn::FLAG_WILL, 1, b"no-will"))
        .unwrap();
    c.expect_raw("WILLTOPICREQ", &[0x02, sn::WILLTOPICREQ])
        .unwrap();
    // An empty WILLTOPIC: straight to CONNACK, no WILLMSGREQ.
    c.send(&sn::willtopic_empty()).unwrap();
    c.expect_raw("CONNACK", &[0x03, sn::CONNACK, sn::RC_ACCEPTED])
        .unwrap();
    c.ping().unwrap();
    // Keep-alive 1 s: lost after 1.5 s of silence.
    outlast(Duration::from_millis(1500));
    c.send(&sn::pingreq()).unwrap();
    assert_eq!(
        c.next_packet().unwrap(),
        Packet::Disconnect,
        "the client should have been lost"
    );
    assert_only_marker_follows(&rig, &mut observer, "nw/marker", "no Will was given");
}

#[test]
fn will_updates_change_topic_message_and_qos() {
    let rig = Rig::start().unwrap();
    let mut wills = rig.subscribe(&["wu/#"]).unwrap();
    let mut c = rig.client().unwrap();
    c.connect_with_will("upd", true, 2, Qos::Zero, false, "wu/old", b"old-msg")
        .unwrap();
    c.send(&sn::willtopicupd(Qos::One, false, "wu/new"))
        .unwrap();
    c.expect_raw("WILLTOPICRESP", &[0x03, sn::WILLTOPICRESP, 0x00])
        .unwrap();
    c.send(&sn::willmsgupd(b"new-msg")).unwrap();
    c.expect_raw("WILLMSGRESP", &[0x03, sn::WILLMSGRESP, 0x00])
        .unwrap();
    // Silent now: lost after 3 s, with the updated Will.
    let m = wills.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), &m.payload[..], m.qos, m.retain),
        ("wu/new", &b"new-msg"[..], 1, false)
    );
    assert_only_marker_follows(&rig, &mut wills, "wu/marker", "only the updated Will");
}

#[test]
fn empty_willtopicupd_deletes_the_will() {
    let rig = Rig::start().unwrap();
    let mut wills = rig.subscribe(&["wd/#"]).unwrap();
    let mut c = rig.client().unwrap();
    c.connect_with_will("del", true, 1, Qos::One, false, "wd/gone", b"never")
        .unwrap();
    c.send(&sn::willtopicupd_empty()).unwrap();
    c.expect_raw("WILLTOPICRESP", &[0x03, sn::WILLTOPICRESP, 0x00])
        .unwrap();
    outlast(Duration::from_millis(1500));
    c.send(&sn::pingreq()).unwrap();
    assert_eq!(c.next_packet().unwrap(), Packet::Disconnect, "lost");
    assert_only_marker_follows(&rig, &mut wills, "wd/marker", "the Will was deleted");
}

#[test]
fn will_is_published_when_the_sleep_timer_expires() {
    let rig = Rig::start().unwrap();
    let mut wills = rig.subscribe(&["ws/#"]).unwrap();
    let mut c = rig.client().unwrap();
    c.connect_with_will(
        "sleepy",
        true,
        60,
        Qos::One,
        false,
        "ws/sleepy",
        b"overslept",
    )
    .unwrap();
    // Asleep for 2 s: the timer allows +50% (3 s) before the client is lost.
    c.sleep(2).unwrap();
    let asleep = Instant::now();
    let m = wills.expect().unwrap();
    let after = asleep.elapsed();
    assert_eq!(
        (m.topic.as_str(), &m.payload[..], m.qos),
        ("ws/sleepy", &b"overslept"[..], 1)
    );
    assert!(
        after >= Duration::from_millis(2500),
        "lost {after:?} into a 2 s sleep; the spec allows it +50%"
    );
    c.send(&sn::pingreq_with_id(b"sleepy")).unwrap();
    assert_eq!(
        c.next_packet().unwrap(),
        Packet::Disconnect,
        "waking a lost client"
    );
}

#[test]
fn clean_disconnect_never_publishes_the_will_even_from_asleep() {
    let rig = Rig::start().unwrap();
    let mut wills = rig.subscribe(&["wc/#"]).unwrap();
    let mut awake = rig.client().unwrap();
    awake
        .connect_with_will("clean-awake", true, 1, Qos::One, false, "wc/awake", b"no")
        .unwrap();
    awake.disconnect().unwrap();
    let mut sleeper = rig.client().unwrap();
    sleeper
        .connect_with_will(
            "clean-asleep",
            true,
            60,
            Qos::One,
            false,
            "wc/asleep",
            b"no",
        )
        .unwrap();
    sleeper.sleep(1).unwrap();
    sleeper.disconnect().unwrap();
    // Past both the keep-alive (1.5 s) and the sleep timer (1.5 s).
    outlast(Duration::from_millis(1500));
    assert_only_marker_follows(&rig, &mut wills, "wc/marker", "clean DISCONNECTs");
}

fn will_ops(rig: &Rig, id: &str, keep_alive: u16, will: (&str, &str, u8, bool), ops: &[&str]) {
    let mut args: Vec<String> = vec![
        "--port".into(),
        rig.gateway.sn_addr().port().to_string(),
        "--client-id".into(),
        id.into(),
        "--keep-alive".into(),
        keep_alive.to_string(),
        "--will-topic".into(),
        will.0.into(),
        "--will-msg".into(),
        will.1.into(),
        "--will-qos".into(),
        will.2.to_string(),
    ];
    if will.3 {
        args.push("--will-retain".into());
    }
    for op in ops {
        args.push("--op".into());
        args.push((*op).into());
    }
    let mut s = Script::python("sn_will_ops.py", &args).unwrap();
    s.expect_line("CONNECTED", REPLY_TIMEOUT * 2, |l| l == "CONNECTED")
        .unwrap();
    for op in ops {
        let want = format!("OK {op}");
        s.expect_line(&want, REPLY_TIMEOUT * 2, |l| l == want)
            .unwrap();
    }
    let status = s.wait_exit(REPLY_TIMEOUT).unwrap();
    assert!(status.success(), "{status}: {}", s.stderr());
}

#[test]
fn mqtt_sn_12_will_updates_then_the_updated_retained_will_when_its_sleep_runs_out() {
    let rig = Rig::start().unwrap();
    let mut wills = rig.subscribe(&["pw/#"]).unwrap();
    will_ops(
        &rig,
        "py-sleeper",
        60,
        ("pw/first", "first", 1, true),
        &["topic:pw/updated", "msg:updated", "sleep:1"],
    );
    let m = wills.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), &m.payload[..], m.qos, m.retain),
        ("pw/updated", &b"updated"[..], 1, true)
    );
}

#[test]
fn mqtt_sn_12_clean_disconnect_publishes_no_will() {
    let rig = Rig::start().unwrap();
    let mut wills = rig.subscribe(&["pc/#"]).unwrap();
    will_ops(
        &rig,
        "py-clean",
        1,
        ("pc/will", "must-not-appear", 1, false),
        &["ping", "disconnect"],
    );
    outlast(Duration::from_millis(1500));
    assert_only_marker_follows(&rig, &mut wills, "pc/marker", "a clean DISCONNECT");
}

#[test]
fn a_will_topic_that_is_no_topic_name_is_answered_with_a_rejection() {
    // A filter is no valid Will topic. The client must still get an answer it can act on:
    // WILLTOPICRESP with a rejection (the Will unchanged), and, in the CONNECT handshake,
    // CONNACK with a rejection; silence would leave it retransmitting.
    let rig = Rig::start().unwrap();
    let mut wills = rig.subscribe(&["wb/#"]).unwrap();
    let mut c = rig.client().unwrap();
    c.connect_with_will("bad-upd", true, 2, Qos::One, false, "wb/kept", b"kept")
        .unwrap();
    c.send(&sn::willtopicupd(Qos::One, false, "wb/#")).unwrap();
    let upd = c.recv(REPLY_TIMEOUT).unwrap();
    // Silent from here: lost after 3 s; the Will must be the one given at CONNECT.
    let m = wills.expect().unwrap();
    let h = rig.client().unwrap();
    h.send(&sn::connect(sn::FLAG_CLEAN | sn::FLAG_WILL, 30, b"bad-hs"))
        .unwrap();
    h.expect_raw("WILLTOPICREQ", &[0x02, sn::WILLTOPICREQ])
        .unwrap();
    h.send(&sn::willtopic(Qos::One, false, "wb/+/x")).unwrap();
    let hs = h.recv(REPLY_TIMEOUT).unwrap();
    assert!(
        matches!(upd, Some(Packet::WillTopicResp { rc }) if rc != sn::RC_ACCEPTED)
            && matches!(hs, Some(Packet::Connack { rc }) if rc != sn::RC_ACCEPTED),
        "WILLTOPICUPD \"wb/#\" answered with {upd:?} (want WILLTOPICRESP rc != 0); \
         WILLTOPIC \"wb/+/x\" in the handshake answered with {hs:?} (want CONNACK rc != 0)"
    );
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("wb/kept", &b"kept"[..])
    );
}
