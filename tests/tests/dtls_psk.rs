//! DTLS 1.2 with pre-shared keys through the real binary, against independent peers:
//! `openssl s_client -dtls1_2 -psk` carrying MQTT-SN frames (CONNECT, REGISTER, PUBLISH QoS 1
//! answered CONNACK, REGACK, PUBACK; the message at mosquitto), `coap-client-openssl` and
//! `coap-client-gnutls` PUT to `/ps/<topic>` over `coaps://` (2.04; the message at mosquitto);
//! a wrong key and an unknown identity refused and counted; a ClientHello flood from many
//! source ports leaves no session (stateless cookies), half-open handshakes time out; plain
//! listeners keep working beside DTLS; the test keys never reach the log; a PSK identity is
//! bound to its ClientIds, fills `{identity}` in the ACLs of MQTT-SN and CoAP (an `id` query
//! does not replace it), cannot be taken over by a plain client, and `require_identity`
//! refuses plain clients once reloaded.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sensorgate_tests::coap::libcoap_responses;
use sensorgate_tests::{Message, Rig, free_udp_port, poll_until, run_bounded};

/// The key of `dev1`, as text (coap-client's `-k`) and in hex (the config, openssl).
const KEY: &str = "s3cretKey";
const KEY_HEX: &str = "7333637265744b6579";

struct Dtls {
    rig: Rig,
    sn_dtls: SocketAddr,
    coaps: SocketAddr,
}

fn start(extra_dtls: &str) -> Dtls {
    let ip = std::net::IpAddr::V4(Ipv4Addr::LOCALHOST);
    let sn_dtls = SocketAddr::new(ip, free_udp_port(ip).unwrap());
    let coaps = SocketAddr::new(ip, free_udp_port(ip).unwrap());
    let extra = extra_dtls.to_owned();
    let rig = Rig::start_with(move |c| {
        c.with_admin()?;
        c.with_coap()?;
        c.mqttsn(&format!("dtls_listen = [\"{sn_dtls}\"]"));
        c.coap(&format!("dtls_listen = [\"{coaps}\"]"));
        c.extra_sections.push_str(&format!(
            "\n[dtls]\nhandshake_timeout = \"2s\"\n{extra}\n\
             [[psk]]\nidentity = \"dev1\"\nkey_hex = \"{KEY_HEX}\"\nclient_ids = [\"dev1\"]\n"
        ));
        Ok(())
    })
    .unwrap();
    Dtls {
        rig,
        sn_dtls,
        coaps,
    }
}

/// The DTLS events of the `protocol` ingress from `/metrics`.
fn events(rig: &Rig, protocol: &str) -> HashMap<String, u64> {
    let (code, text) = rig.gateway.admin_get("/metrics").unwrap();
    assert_eq!(code, 200);
    let prefix = format!("sensorgate_ingress_events_total{{protocol=\"{protocol}\",event=\"");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| {
            let (name, value) = l.split_once("\"} ")?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// `openssl s_client` over DTLS-PSK with its stdin and stdout piped; stdout read on a thread.
struct SClient {
    child: Child,
    out: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
}

impl SClient {
    fn start(addr: SocketAddr, identity: &str, key_hex: &str) -> SClient {
        let mut child = Command::new("openssl")
            .args(["s_client", "-dtls1_2", "-quiet", "-nocommands", "-connect"])
            .arg(addr.to_string())
            .args([
                "-psk",
                key_hex,
                "-psk_identity",
                identity,
                "-cipher",
                "PSK-AES128-CCM8",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, out) = mpsc::channel();
        std::thread::spawn(move || {
            let mut b = [0u8; 2048];
            while let Ok(n) = stdout.read(&mut b) {
                if n == 0 || tx.send(b[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        SClient {
            child,
            out,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, frame: &[u8]) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(frame).unwrap();
        stdin.flush().unwrap();
    }

    /// The next MQTT-SN frame (one-byte length) within 10 s, or `None`.
    fn frame(&mut self) -> Option<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(&len) = self.buf.first()
                && len > 0
                && self.buf.len() >= usize::from(len)
            {
                return Some(self.buf.drain(..usize::from(len)).collect());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.out.recv_timeout(left) {
                Ok(bytes) => self.buf.extend(bytes),
                Err(_) => return None,
            }
        }
    }

    fn stderr(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for SClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connect(client_id: &str) -> Vec<u8> {
    let mut f = vec![0, 0x04, 0x04, 0x01, 0x00, 0x3c];
    f.extend_from_slice(client_id.as_bytes());
    f[0] = f.len() as u8;
    f
}

#[test]
fn openssl_s_client_carries_mqtt_sn_over_dtls_psk_beside_a_plain_client() {
    let d = start("");
    let mut sub = d.rig.subscribe(&["dtls/#"]).unwrap();
    let mut s = SClient::start(d.sn_dtls, "dev1", KEY_HEX);
    s.send(&connect("dev1"));
    assert_eq!(s.frame(), Some(vec![3, 0x05, 0x00]), "CONNACK");
    let topic = b"dtls/t1";
    let mut register = vec![0, 0x0a, 0, 0, 0, 1];
    register.extend_from_slice(topic);
    register[0] = register.len() as u8;
    s.send(&register);
    let regack = s.frame().expect("REGACK");
    assert_eq!(
        (regack[1], regack[4], regack[5], regack[6]),
        (0x0b, 0, 1, 0)
    );
    let topic_id = [regack[2], regack[3]];
    let mut publish = vec![0, 0x0c, 0x20, topic_id[0], topic_id[1], 0, 2];
    publish.extend_from_slice(b"21.5");
    publish[0] = publish.len() as u8;
    s.send(&publish);
    let puback = s.frame().expect("PUBACK");
    assert_eq!(puback, vec![7, 0x0d, topic_id[0], topic_id[1], 0, 2, 0]);
    assert_eq!(
        sub.expect().unwrap(),
        Message {
            topic: "dtls/t1".into(),
            payload: b"21.5".to_vec(),
            qos: 1,
            retain: false
        }
    );
    // A plain client beside it, on the plain listener.
    let plain = d.rig.connected("plain1").unwrap();
    drop(plain);
    let e = events(&d.rig, "mqtt-sn");
    assert_eq!(e["dtls_handshakes_ok"], 1, "{e:?}");
    assert_eq!(e["dtls_sessions_open"], 1, "{e:?}");
    assert!(e["dtls_hello_verify_sent"] >= 1, "{e:?}");
    let (_, status) = d.rig.gateway.admin_get("/status").unwrap();
    assert!(status.contains("\"dtls\""), "{status}");
}

#[test]
fn coap_clients_of_openssl_and_gnutls_put_over_dtls_psk() {
    let d = start("");
    let mut sub = d.rig.subscribe(&["coaps/#"]).unwrap();
    for (n, client) in ["coap-client-openssl", "coap-client-gnutls"]
        .iter()
        .enumerate()
    {
        let url = format!("coaps://{}/ps/coaps/{client}", d.coaps);
        let payload = format!("v{n}");
        let mut cmd = Command::new(format!("/usr/bin/{}", client));
        cmd.args([
            "-v", "7", "-u", "dev1", "-k", KEY, "-m", "put", "-e", &payload, "-B", "10",
        ])
        .arg(&url);
        let out = run_bounded(&mut cmd, Duration::from_secs(20)).unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let got = libcoap_responses(&text);
        assert!(got.iter().any(|c| c == "2.04"), "{client}: {got:?}\n{text}");
        assert_eq!(
            sub.expect().unwrap(),
            Message {
                topic: format!("coaps/{client}"),
                payload: payload.into_bytes(),
                qos: 1,
                retain: false
            }
        );
    }
    let e = events(&d.rig, "coap");
    assert_eq!(e["dtls_handshakes_ok"], 2, "{e:?}");
    // Plain CoAP still answers beside it.
    let plain = d.rig.gateway.coap_addr();
    let mut cmd = Command::new(format!("/usr/bin/{}", "coap-client-notls"));
    cmd.args(["-v", "7", "-m", "put", "-e", "p", "-B", "5"])
        .arg(format!("coap://{plain}/ps/coaps/plain"));
    let out = run_bounded(&mut cmd, Duration::from_secs(20)).unwrap();
    let got = libcoap_responses(&String::from_utf8_lossy(&out.stdout));
    assert!(got.iter().any(|c| c == "2.04"), "{got:?}");
}

#[test]
fn a_wrong_key_and_an_unknown_identity_are_refused_and_keys_stay_out_of_the_log() {
    let d = start("");
    let mut wrong = SClient::start(d.sn_dtls, "dev1", "00112233");
    wrong.send(&connect("dev1"));
    assert_eq!(wrong.frame(), None, "no CONNACK with a wrong key");
    let err = wrong.stderr();
    assert!(!err.is_empty(), "openssl reports the failure");
    let mut unknown = SClient::start(d.sn_dtls, "nobody", KEY_HEX);
    unknown.send(&connect("nobody"));
    assert_eq!(unknown.frame(), None, "no CONNACK for an unknown identity");
    drop(unknown);
    let e = poll_until(
        "both failures counted",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let e = events(&d.rig, "mqtt-sn");
            Ok((e["dtls_handshakes_failed_bad_key"] == 1
                && e["dtls_handshakes_failed_unknown_identity"] == 1)
                .then_some(e))
        },
    )
    .unwrap();
    assert_eq!(e["dtls_handshakes_ok"], 0, "{e:?}");
    // coap-client with a wrong key: no 2.04.
    let mut cmd = Command::new(format!("/usr/bin/{}", "coap-client-openssl"));
    cmd.args([
        "-v", "7", "-u", "dev1", "-k", "wrong", "-m", "put", "-e", "x", "-B", "3",
    ])
    .arg(format!("coaps://{}/ps/x", d.coaps));
    let out = run_bounded(&mut cmd, Duration::from_secs(20)).unwrap();
    let got = libcoap_responses(&String::from_utf8_lossy(&out.stdout));
    assert!(got.is_empty(), "{got:?}");
    // A good handshake too, so the log has seen everything once.
    let mut good = SClient::start(d.sn_dtls, "dev1", KEY_HEX);
    good.send(&connect("dev1"));
    assert!(good.frame().is_some());
    let log = d.rig.gateway.log();
    assert!(
        log.contains("DTLS"),
        "the log is at debug level and mentions DTLS"
    );
    for secret in [KEY, KEY_HEX, "00112233"] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
    let (_, text) = d.rig.gateway.admin_get("/metrics").unwrap();
    assert!(!text.contains(KEY_HEX));
}

/// A DTLS 1.2 ClientHello offering PSK_AES128_CCM_8 with extended_master_secret, with
/// `cookie`, from record sequence `seq`.
fn client_hello(random: [u8; 32], cookie: &[u8], message_seq: u16) -> Vec<u8> {
    let mut body = vec![0xfe, 0xfd];
    body.extend_from_slice(&random);
    body.push(0); // session id
    body.push(cookie.len() as u8);
    body.extend_from_slice(cookie);
    body.extend_from_slice(&[0, 2, 0xc0, 0xa8]); // cipher suites
    body.extend_from_slice(&[1, 0]); // compression: null
    body.extend_from_slice(&[0, 4, 0x00, 0x17, 0, 0]); // extensions: extended_master_secret
    let len = body.len();
    let mut hs = vec![1, 0, (len >> 8) as u8, len as u8];
    hs.extend_from_slice(&message_seq.to_be_bytes());
    hs.extend_from_slice(&[0, 0, 0, 0, (len >> 8) as u8, len as u8]);
    hs.extend_from_slice(&body);
    let mut rec = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, message_seq as u8];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

#[test]
fn a_client_hello_flood_leaves_no_state_and_half_open_handshakes_time_out() {
    let d = start("max_handshakes = 3\n");
    // 300 ClientHellos from 100 source ports: answered, nothing kept.
    let socks: Vec<UdpSocket> = (0..100)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s
        })
        .collect();
    for round in 0..3u8 {
        for (i, s) in socks.iter().enumerate() {
            s.send_to(&client_hello([i as u8 ^ round; 32], &[], 0), d.sn_dtls)
                .unwrap();
        }
    }
    let e = poll_until(
        "every ClientHello answered",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let e = events(&d.rig, "mqtt-sn");
            Ok((e["dtls_hello_verify_sent"] == 300).then_some(e))
        },
    )
    .unwrap();
    assert_eq!(e["dtls_sessions_open"], 0, "{e:?}");
    assert_eq!(e["dtls_handshakes_started"], 0, "{e:?}");
    // A HelloVerifyRequest is not larger than the ClientHello (no amplification).
    let mut b = [0u8; 512];
    let (n, _) = socks[0].recv_from(&mut b).unwrap();
    assert_eq!(b[13], 3, "HelloVerifyRequest");
    assert!(n <= client_hello([0; 32], &[], 0).len());
    // A stale or forged cookie makes no session either.
    socks[1]
        .send_to(&client_hello([1; 32], &[0xaa; 32], 1), d.sn_dtls)
        .unwrap();
    // Five clients complete the cookie round trip and stop: three half-open handshakes (the
    // bound), two refused, then all time out (handshake_timeout = 2s).
    for (i, s) in socks[10..15].iter().enumerate() {
        let random = [0x40 + i as u8; 32];
        let mut hvr = [0u8; 512];
        // Drain what the flood left for this socket, then ask afresh.
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        while s.recv_from(&mut hvr).is_ok() {}
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.send_to(&client_hello(random, &[], 0), d.sn_dtls).unwrap();
        let (n, _) = s.recv_from(&mut hvr).unwrap();
        assert_eq!(hvr[13], 3);
        let cookie = &hvr[28..n];
        assert_eq!(cookie.len(), 32);
        s.send_to(&client_hello(random, cookie, 1), d.sn_dtls)
            .unwrap();
        let (_, _) = if i < 3 {
            s.recv_from(&mut hvr).unwrap() // the ServerHello flight
        } else {
            (0, d.sn_dtls)
        };
    }
    let e = poll_until(
        "three half-open handshakes",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || {
            let e = events(&d.rig, "mqtt-sn");
            Ok((e["dtls_handshakes_failed_table_full"] == 2).then_some(e))
        },
    )
    .unwrap();
    assert_eq!(e["dtls_handshakes_failed_cookie_invalid"], 1, "{e:?}");
    assert_eq!(e["dtls_handshakes_started"], 3, "{e:?}");
    let e = poll_until(
        "the half-open handshakes time out",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || {
            let e = events(&d.rig, "mqtt-sn");
            Ok((e["dtls_handshakes_failed_timeout"] == 3).then_some(e))
        },
    )
    .unwrap();
    assert_eq!(e["dtls_sessions_open"], 0, "{e:?}");
    assert_eq!(e["dtls_handshakes_open"], 0, "{e:?}");
    // And a real client still gets through.
    let mut s = SClient::start(d.sn_dtls, "dev1", KEY_HEX);
    s.send(&connect("dev1"));
    assert_eq!(s.frame(), Some(vec![3, 0x05, 0x00]));
}

/// Sends SIGHUP and waits for reload number `count` in `/status`; returns its `reload` object.
fn reload(rig: &Rig, count: u64) -> serde_json::Value {
    sensorgate_tests::send_signal(rig.gateway.pid().unwrap(), "HUP").unwrap();
    poll_until(
        "the reload in /status",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || {
            let (code, body) = rig.gateway.admin_get("/status")?;
            if code != 200 {
                return Ok(None);
            }
            let doc: serde_json::Value = serde_json::from_str(&body)?;
            Ok(doc
                .get("reload")
                .filter(|r| r["count"].as_u64() == Some(count))
                .cloned())
        },
    )
    .unwrap()
}

#[test]
fn a_reload_changes_keys_for_new_handshakes_and_keeps_established_sessions() {
    let d = start("");
    let mut old = SClient::start(d.sn_dtls, "dev1", KEY_HEX);
    old.send(&connect("dev1"));
    assert_eq!(old.frame(), Some(vec![3, 0x05, 0x00]));
    let path = d.rig.gateway.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    let new_text = text.replace(KEY_HEX, "6e65772d6b6579")
        + "\n[[psk]]\nidentity = \"dev3\"\nkey_hex = \"0011223344\"\n";
    std::fs::write(&path, new_text).unwrap();
    let outcome = reload(&d.rig, 1);
    assert!(outcome.to_string().contains("DTLS"), "{outcome}");
    // The established session goes on (PINGREQ -> PINGRESP).
    old.send(&[2, 0x16]);
    assert_eq!(old.frame(), Some(vec![2, 0x17]));
    // New handshakes take the new keys.
    let mut stale = SClient::start(d.sn_dtls, "dev1", KEY_HEX);
    stale.send(&connect("dev1"));
    assert_eq!(stale.frame(), None, "the old key is refused");
    let mut fresh = SClient::start(d.sn_dtls, "dev1", "6e65772d6b6579");
    fresh.send(&connect("dev1"));
    assert_eq!(fresh.frame(), Some(vec![3, 0x05, 0x00]));
    let mut dev3 = SClient::start(d.sn_dtls, "dev3", "0011223344");
    dev3.send(&connect("dev3"));
    assert_eq!(dev3.frame(), Some(vec![3, 0x05, 0x00]));
    let e = events(&d.rig, "mqtt-sn");
    assert_eq!(e["dtls_psk_identities"], 2, "{e:?}");
}

/// REGISTER `topic` with message id `msg_id` over `s`; returns (topic id, return code).
fn register(s: &mut SClient, topic: &str, msg_id: u8) -> ([u8; 2], u8) {
    let mut f = vec![0, 0x0a, 0, 0, 0, msg_id];
    f.extend_from_slice(topic.as_bytes());
    f[0] = f.len() as u8;
    s.send(&f);
    let regack = s.frame().expect("REGACK");
    assert_eq!((regack[1], regack[5]), (0x0b, msg_id), "{regack:?}");
    ([regack[2], regack[3]], regack[6])
}

#[test]
fn a_dtls_identity_is_bound_to_its_client_ids_its_acl_and_its_session() {
    // Every identity publishes under its own name only (`{identity}`: the PSK identity).
    let d = start("[[acl]]\npublish = [\"sensors/{identity}/#\"]\n");
    let mut sub = d.rig.subscribe(&["sensors/#"]).unwrap();
    // dev1's key, another ClientId: refused (client_ids = ["dev1"]).
    let mut intruder = SClient::start(d.sn_dtls, "dev1", KEY_HEX);
    intruder.send(&connect("intruder"));
    assert_eq!(
        intruder.frame(),
        Some(vec![3, 0x05, 0x03]),
        "CONNACK rc 0x03"
    );
    drop(intruder);
    // Its own ClientId: accepted, and the ACL fills {identity} with the proven identity.
    let mut s = SClient::start(d.sn_dtls, "dev1", KEY_HEX);
    s.send(&connect("dev1"));
    assert_eq!(s.frame(), Some(vec![3, 0x05, 0x00]));
    let (_, rc) = register(&mut s, "sensors/dev2/t", 1);
    assert_eq!(rc, 0x03, "another identity's topic");
    let (id, rc) = register(&mut s, "sensors/dev1/t", 2);
    assert_eq!(rc, 0x00);
    let mut publish = vec![0, 0x0c, 0x20, id[0], id[1], 0, 3];
    publish.extend_from_slice(b"7");
    publish[0] = publish.len() as u8;
    s.send(&publish);
    assert_eq!(
        s.frame(),
        Some(vec![7, 0x0d, id[0], id[1], 0, 3, 0]),
        "PUBACK"
    );
    let m = sub.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("sensors/dev1/t", &b"7"[..])
    );
    // CoAP over DTLS: the same identity and ACL; an `id` query does not replace the proven
    // identity.
    let coaps = |path: &str| {
        let mut cmd = Command::new("/usr/bin/coap-client-openssl");
        cmd.args([
            "-v", "7", "-u", "dev1", "-k", KEY, "-m", "put", "-e", "c", "-B", "10",
        ])
        .arg(format!("coaps://{}/ps/{path}", d.coaps));
        let out = run_bounded(&mut cmd, Duration::from_secs(20)).unwrap();
        libcoap_responses(&String::from_utf8_lossy(&out.stdout))
    };
    assert_eq!(coaps("sensors/dev1/c"), ["2.04"]);
    assert_eq!(coaps("sensors/dev2/c?id=dev2"), ["4.03"]);
    let m = sub.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("sensors/dev1/c", &b"c"[..])
    );
    assert_eq!(events(&d.rig, "coap")["acl_denied_publish"], 1);
    // A plain client that knows the ClientId cannot take the proven session over.
    let mut plain = sensorgate_tests::SnClient::new(d.rig.gateway.sn_addr()).unwrap();
    assert_eq!(plain.connect("dev1").unwrap(), 0x03);
    // With `require_identity` (applied live), a plain client is refused whatever its
    // ClientId, and the DTLS session goes on.
    let path = d.rig.gateway.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    let listen = format!("dtls_listen = [\"{}\"]", d.sn_dtls);
    assert!(text.contains(&listen));
    std::fs::write(
        &path,
        text.replace(&listen, &format!("{listen}\nrequire_identity = true")),
    )
    .unwrap();
    let outcome = reload(&d.rig, 1);
    assert_eq!(outcome["outcome"], "applied", "{outcome}");
    assert_eq!(
        outcome["applied"],
        serde_json::json!(["[mqttsn]"]),
        "{outcome}"
    );
    assert_eq!(plain.connect("plain1").unwrap(), 0x03);
    s.send(&[2, 0x16]);
    assert_eq!(s.frame(), Some(vec![2, 0x17]), "PINGRESP");
    let e = events(&d.rig, "mqtt-sn");
    assert_eq!(e["client_id_mismatch"], 2, "{e:?}");
    assert_eq!(e["acl_denied_publish"], 1, "{e:?}");
    assert_eq!(e["identity_required"], 1, "{e:?}");
}
