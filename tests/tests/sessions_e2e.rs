//! Sessions end to end: subscriptions and downlink from a real broker, Will on loss, the sleep
//! cycle with NAT rebinding, and 1,000 sleeping clients woken together. Downlink is injected
//! with `mosquitto_pub` (an independent client); Wills are observed with the paho subscriber.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use sensorgate_tests::sn::{self, Packet};
use sensorgate_tests::{Rig, SnClient, poll_until};

const BOUND: Duration = Duration::from_secs(30);

fn mosquitto_pub(port: u16, topic: &str, payload: &str, qos: u8) {
    let status = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            topic,
            "-m",
            payload,
        ])
        .args(["-q", &qos.to_string()])
        .status()
        .expect("mosquitto_pub (Debian mosquitto-clients)");
    assert!(status.success());
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

/// A datagram as (MsgType, body), 1-octet length form only (the gateway uses it for these).
fn parts(raw: &[u8]) -> (u8, &[u8]) {
    assert_eq!(usize::from(raw[0]), raw.len(), "length field of {raw:02x?}");
    (raw[1], &raw[2..])
}

fn subscribe(c: &SnClient, msg_id: u16, flags: u8, filter: &str) -> (u16, u8) {
    let mut body = vec![flags];
    body.extend_from_slice(&msg_id.to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    c.send(&sn::frame(0x12, &body)).unwrap();
    let raw = c.recv_raw(BOUND).unwrap().expect("SUBACK");
    let (t, b) = parts(&raw);
    assert_eq!(t, 0x13, "SUBACK expected, got {raw:02x?}");
    assert_eq!(u16_at(b, 3), msg_id);
    (u16_at(b, 1), b[5])
}

/// Answers REGISTERs and collects PUBLISH payloads (acknowledging QoS 1) until `until` says
/// stop or nothing arrives for `quiet`.
fn receive(c: &SnClient, quiet: Duration, until: impl FnMut(u8, &[u8]) -> bool) -> Vec<Vec<u8>> {
    receive_dup(c, quiet, until)
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

/// As [`receive`], with each PUBLISH's DUP flag.
fn receive_dup(
    c: &SnClient,
    quiet: Duration,
    mut until: impl FnMut(u8, &[u8]) -> bool,
) -> Vec<(bool, Vec<u8>)> {
    let mut got = Vec::new();
    while let Some(raw) = c.recv_raw(quiet).unwrap() {
        let (t, b) = parts(&raw);
        match t {
            0x0A => {
                // REGISTER: TopicId, MsgId, name -> REGACK accepted.
                let mut ack = b[0..4].to_vec();
                ack.push(0);
                c.send(&sn::frame(0x0B, &ack)).unwrap();
            }
            0x0C => {
                let flags = b[0];
                got.push((flags & 0x80 != 0, b[5..].to_vec()));
                if flags & 0x60 == 0x20 {
                    let mut ack = b[1..5].to_vec();
                    ack.push(0);
                    c.send(&sn::frame(0x0D, &ack)).unwrap();
                }
            }
            _ => {}
        }
        if until(t, b) {
            break;
        }
    }
    got
}

#[test]
fn subscriptions_receive_downlink_registered_first_then_acknowledged() {
    let rig = Rig::start().unwrap();
    let c = rig.connected("sub-1").unwrap();
    // QoS 1, topic name: a wildcard filter gets topic id 0.
    assert_eq!(subscribe(&c, 1, 0x20, "dl/#"), (0, 0));
    // A concrete name gets a topic id.
    let (id, rc) = subscribe(&c, 2, 0x20, "exact/t");
    assert_eq!(rc, 0);
    assert_ne!(id, 0);
    let deadline = Instant::now() + BOUND;
    let mut got = Vec::new();
    while got.is_empty() {
        assert!(Instant::now() < deadline, "no downlink arrived");
        mosquitto_pub(rig.broker.port(), "dl/a", "hello", 1);
        got = receive(&c, Duration::from_millis(500), |t, _| t == 0x0C);
    }
    assert_eq!(got[0], b"hello");
    // The concrete subscription's id is used directly, no REGISTER.
    mosquitto_pub(rig.broker.port(), "exact/t", "direct", 1);
    let raw = c.recv_raw(BOUND).unwrap().expect("PUBLISH");
    let (t, b) = parts(&raw);
    assert_eq!((t, u16_at(b, 1), &b[5..]), (0x0C, id, &b"direct"[..]));
}

fn connect_with_will(c: &SnClient, client_id: &str, keep_alive: u16, topic: &str, msg: &str) {
    c.send(&sn::connect(
        sn::FLAG_CLEAN | sn::FLAG_WILL,
        keep_alive,
        client_id.as_bytes(),
    ))
    .unwrap();
    assert_eq!(
        c.recv_raw(BOUND).unwrap().unwrap(),
        vec![0x02, 0x06],
        "WILLTOPICREQ"
    );
    let mut body = vec![0x20]; // Will QoS 1
    body.extend_from_slice(topic.as_bytes());
    c.send(&sn::frame(0x07, &body)).unwrap();
    assert_eq!(
        c.recv_raw(BOUND).unwrap().unwrap(),
        vec![0x02, 0x08],
        "WILLMSGREQ"
    );
    c.send(&sn::frame(0x09, msg.as_bytes())).unwrap();
    assert_eq!(c.next_packet().unwrap(), Packet::Connack { rc: 0 });
}

#[test]
fn will_is_published_on_keep_alive_loss_and_never_after_a_clean_disconnect() {
    let rig = Rig::start().unwrap();
    let mut wills = rig.subscribe(&["wills/#", "marker"]).unwrap();
    let lost = rig.client().unwrap();
    let clean = rig.client().unwrap();
    connect_with_will(&clean, "clean", 2, "wills/clean", "must-not-appear");
    clean.send(&sn::disconnect()).unwrap();
    assert_eq!(clean.next_packet().unwrap(), Packet::Disconnect);
    // 2 s keep-alive: lost after 3 s of silence.
    connect_with_will(&lost, "lost", 2, "wills/lost", "gone");
    let m = wills.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("wills/lost", &b"gone"[..])
    );
    // Anything the clean client's DISCONNECT had published would be here before the marker.
    let mut marker = rig.connected("marker").unwrap();
    let id = marker.register("marker").unwrap();
    marker
        .publish_qos1_ok(sn::TopicType::Normal, id, b"m")
        .unwrap();
    let m = wills.expect().unwrap();
    assert_eq!(m.topic, "marker");
}

#[test]
fn will_updates_are_answered() {
    let rig = Rig::start().unwrap();
    let c = rig.client().unwrap();
    connect_with_will(&c, "upd", 60, "wills/upd", "first");
    let mut body = vec![0x00];
    body.extend_from_slice(b"wills/other");
    c.send(&sn::frame(0x1A, &body)).unwrap();
    assert_eq!(
        c.recv_raw(BOUND).unwrap().unwrap(),
        vec![0x03, 0x1B, 0x00],
        "WILLTOPICRESP"
    );
    c.send(&sn::frame(0x1C, b"second")).unwrap();
    assert_eq!(
        c.recv_raw(BOUND).unwrap().unwrap(),
        vec![0x03, 0x1D, 0x00],
        "WILLMSGRESP"
    );
}

/// Sends PINGREQ(ClientId) and collects the buffered messages until PINGRESP.
fn wake_dup(c: &SnClient, client_id: &str) -> Vec<(bool, Vec<u8>)> {
    c.send(&sn::frame(0x16, client_id.as_bytes())).unwrap();
    let mut pingresp = false;
    let got = receive_dup(c, BOUND, |t, _| {
        pingresp = t == 0x17;
        pingresp
    });
    assert!(
        pingresp,
        "{client_id}: no PINGRESP after {} messages",
        got.len()
    );
    got
}

fn wake(c: &SnClient, client_id: &str) -> Vec<Vec<u8>> {
    wake_dup(c, client_id).into_iter().map(|(_, p)| p).collect()
}

fn sleep_for(c: &SnClient, secs: u16) {
    c.send(&sn::frame(0x18, &secs.to_be_bytes())).unwrap();
    assert_eq!(c.next_packet().unwrap(), Packet::Disconnect);
}

#[test]
fn sleeping_client_gets_its_buffer_after_waking_from_a_new_port() {
    let rig = Rig::start().unwrap();
    let old = rig.connected("sleeper").unwrap();
    let (id, _) = subscribe(&old, 1, 0x20, "sleep/in");
    // Make sure the upstream subscription is live before sleeping.
    let deadline = Instant::now() + BOUND;
    loop {
        assert!(Instant::now() < deadline, "subscription never became live");
        mosquitto_pub(rig.broker.port(), "sleep/in", "probe", 1);
        if !receive(&old, Duration::from_millis(500), |t, _| t == 0x0C).is_empty() {
            break;
        }
    }
    sleep_for(&old, 60);
    for i in 0..3 {
        mosquitto_pub(rig.broker.port(), "sleep/in", &format!("m{i}"), 1);
    }
    // Wake from a new socket (NAT rebinding); messages may still be in flight from the broker
    // (on a loaded machine for a while), so wake again every 50 ms until all three arrived
    // (bounded by BOUND), each round ending with PINGRESP.
    let new = rig.client().unwrap();
    let mut got = Vec::new();
    poll_until(
        "the three buffered messages",
        BOUND,
        Duration::from_millis(50),
        || {
            got.extend(wake(&new, "sleeper"));
            Ok((got.len() >= 3).then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}: got {got:?}"));
    assert_eq!(got, vec![b"m0".to_vec(), b"m1".to_vec(), b"m2".to_vec()]);
    // The old port no longer speaks for the session.
    old.send(&sn::publish(0x20, id, 9, b"inject")).unwrap();
    assert_eq!(old.next_packet().unwrap(), Packet::Disconnect);
}

#[test]
fn a_thousand_sleeping_clients_each_get_ten_messages_exactly_once() {
    const CLIENTS: usize = 1000;
    const PER_CLIENT: usize = 10;
    let rig = Rig::start().unwrap();
    let threads = 4;
    let gw = rig.gateway.sn_addr();
    // Connect, subscribe and sleep, from 4 threads.
    let clients: Vec<Vec<(usize, SnClient)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t..CLIENTS)
                        .step_by(threads)
                        .map(|i| {
                            let mut c = SnClient::new(gw).unwrap();
                            c.connect_ok(&format!("sl-{i}")).unwrap();
                            assert_eq!(subscribe(&c, 1, 0x20, &format!("sl/{i}")).1, 0);
                            sleep_for(&c, 600);
                            (i, c)
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Publish 10 QoS 1 messages per client upstream with paho (one connection, all acked).
    let script = format!(
        "import paho.mqtt.client as m\n\
         c = m.Client(m.CallbackAPIVersion.VERSION2, protocol=m.MQTTv5)\n\
         c.max_inflight_messages_set(1000)\n\
         c.connect('127.0.0.1', {port})\n\
         c.loop_start()\n\
         infos = [c.publish(f'sl/{{i}}', f'{{i}}:{{k}}', qos=1) for i in range({CLIENTS}) for k in range({PER_CLIENT})]\n\
         [i.wait_for_publish(60) for i in infos]\n\
         c.disconnect()\n",
        port = rig.broker.port()
    );
    let out = Command::new(sensorgate_tests::python())
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "paho publisher: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Wake everyone; rounds until each has its 10 (the broker may still be delivering).
    let started = Instant::now();
    std::thread::scope(|s| {
        for group in &clients {
            s.spawn(move || {
                for (i, c) in group {
                    let mut seen = HashSet::new();
                    let mut rounds = 0;
                    while seen.len() < PER_CLIENT {
                        rounds += 1;
                        assert!(
                            rounds <= 50 && started.elapsed() < Duration::from_secs(120),
                            "client {i}: {seen:?}"
                        );
                        for (dup, payload) in wake_dup(c, &format!("sl-{i}")) {
                            let text = String::from_utf8(payload).unwrap();
                            assert!(text.starts_with(&format!("{i}:")), "client {i} got {text}");
                            // Exactly once to the application: a DUP retransmission of a
                            // message already received is not a second delivery.
                            assert!(
                                seen.insert(text.clone()) || dup,
                                "client {i} got {text} twice"
                            );
                        }
                    }
                }
            });
        }
    });
}

#[test]
fn mqtt_sn_12_will_handshake_and_updates_then_the_updated_will_on_loss() {
    let rig = Rig::start().unwrap();
    let mut wills = rig.subscribe(&["pywill/#"]).unwrap();
    let out = Command::new(sensorgate_tests::python())
        .arg(sensorgate_tests::py_script("sn_will.py"))
        .args([&rig.gateway.sn_addr().port().to_string(), "py-will", "2"])
        .args(["pywill/first", "first", "pywill/updated", "updated"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("UPDATED"),
        "mqtt-sn-12: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It vanished without DISCONNECT: lost after 1.5 x 2 s, with the updated Will.
    let m = wills.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), &m.payload[..], m.qos),
        ("pywill/updated", &b"updated"[..], 1)
    );
}

#[test]
fn mqtt_sn_12_subscriber_receives_downlink() {
    use std::io::BufRead;
    let rig = Rig::start().unwrap();
    let mut sub = Command::new(sensorgate_tests::venv_script("mqtt_sn_sub"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &rig.gateway.sn_addr().port().to_string(),
        ])
        .args(["-t", "pysub/#", "-q", "0", "--timeout", "60"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = sub.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Publish until the subscriber prints the message (its SUBSCRIBE is asynchronous).
    let deadline = Instant::now() + BOUND;
    let mut seen = Vec::new();
    'outer: loop {
        assert!(
            Instant::now() < deadline,
            "mqtt_sn_sub printed only {seen:?}"
        );
        mosquitto_pub(rig.broker.port(), "pysub/x", "to-the-sensor", 0);
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
            if line.contains("to-the-sensor") {
                break 'outer;
            }
            seen.push(line);
        }
    }
    let _ = sub.kill();
    let _ = sub.wait();
}

#[test]
fn advertise_goes_to_the_configured_loopback_destination() {
    let listener = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dest = listener.local_addr().unwrap();
    let rig = Rig::start_with(|c| {
        c.extra_mqttsn =
            format!("advertise_destinations = [\"{dest}\"]\nadvertise_interval = \"1s\"\n");
        Ok(())
    })
    .unwrap();
    listener.set_read_timeout(Some(BOUND)).unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = listener
        .recv_from(&mut buf)
        .expect("ADVERTISE within the bound");
    // ADVERTISE: length 5, type 0x00, GwId 7, Duration 1 s.
    assert_eq!(&buf[..n], &[0x05, 0x00, 0x07, 0x00, 0x01]);
    assert_eq!(from, rig.gateway.sn_addr());
}

#[test]
fn persistent_session_keeps_subscription_and_queued_downlink_across_reconnect() {
    let rig = Rig::start().unwrap();
    let mut first = rig.client().unwrap();
    assert_eq!(first.connect_flags("persist", 0x00).unwrap(), 0);
    assert_eq!(subscribe(&first, 1, 0x20, "ps/cmd").1, 0);
    let deadline = Instant::now() + BOUND;
    loop {
        assert!(Instant::now() < deadline, "subscription never became live");
        mosquitto_pub(rig.broker.port(), "ps/cmd", "probe", 1);
        if !receive(&first, Duration::from_millis(500), |t, _| t == 0x0C).is_empty() {
            break;
        }
    }
    first.send(&sn::disconnect()).unwrap();
    assert_eq!(first.next_packet().unwrap(), Packet::Disconnect);
    mosquitto_pub(rig.broker.port(), "ps/cmd", "while-away", 1);
    // Back from another port, CleanSession=0: CONNACK, then the gateway registers the topic
    // again (the client's table is gone) and delivers what was queued (bounded retries while
    // the message may still be on its way from the broker).
    let mut second = rig.client().unwrap();
    let mut got = Vec::new();
    for _ in 0..20 {
        assert_eq!(second.connect_flags("persist", 0x00).unwrap(), 0);
        got.extend(receive(&second, Duration::from_millis(500), |t, _| {
            t == 0x0C
        }));
        if !got.is_empty() {
            break;
        }
    }
    assert_eq!(got, vec![b"while-away".to_vec()]);
}
