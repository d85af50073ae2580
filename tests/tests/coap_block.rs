//! Block-wise uploads (RFC 7959 Block1) with independent clients: libcoap (`-b 64`) and
//! aiocoap (`--payload-initial-szx 2`, 64-byte blocks) get a 2.31 Continue per block and a
//! 2.04 at the end, and the whole body reaches the broker as one message; a body above
//! `max_body_size` gets 4.13 with Size1 and publishes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::PathBuf;
use std::time::Duration;

use sensorgate_tests::coap::{
    CON, Msg, RawClient, aiocoap, codes, libcoap, libcoap_responses, opts,
};
use sensorgate_tests::{Rig, temp_dir};
use tempfile::TempDir;

fn rig(extra: &str) -> Rig {
    Rig::start_with(|c| {
        c.with_coap()?.coap(extra);
        Ok(())
    })
    .unwrap()
}

fn url(rig: &Rig, target: &str) -> String {
    format!("coap://{}/{target}", rig.gateway.coap_addr())
}

/// Printable, non-repeating text of `len` bytes (a wrong block order would show).
fn body(len: usize) -> Vec<u8> {
    let mut s = String::new();
    let mut i = 0;
    while s.len() < len {
        s.push_str(&format!("<{i:05}>"));
        i += 1;
    }
    s.truncate(len);
    s.into_bytes()
}

fn file(len: usize) -> (TempDir, PathBuf, Vec<u8>) {
    let dir = temp_dir().unwrap();
    let path = dir.path().join("big.bin");
    let b = body(len);
    std::fs::write(&path, &b).unwrap();
    (dir, path, b)
}

#[test]
fn libcoap_block1_upload_arrives_upstream_as_one_message() {
    let rig = rig("");
    let mut sub = rig.subscribe(&["big/#"]).unwrap();
    let (_dir, path, want) = file(1000);
    let out = libcoap(&[
        "-m",
        "post",
        "-b",
        "64",
        "-f",
        path.to_str().unwrap(),
        "-B",
        "10",
        &url(&rig, "ps/big/lib?id=blk"),
    ])
    .unwrap();
    let got = libcoap_responses(&out);
    // 1000 bytes in 64-byte blocks: 15 blocks continued, the 16th answered 2.04.
    assert_eq!(got.last().map(String::as_str), Some("2.04"), "{out}");
    let continued = got.iter().filter(|c| *c == "2.31").count();
    assert!(continued >= 15, "{got:?}\n{out}");
    assert!(
        got[..got.len() - 1].iter().all(|c| c == "2.31"),
        "{got:?}\n{out}"
    );
    let m = sub.expect().unwrap();
    assert_eq!(m.topic, "big/lib");
    assert_eq!(m.payload, want, "the whole body, in order, as one message");
}

#[test]
fn aiocoap_block1_upload_arrives_upstream_as_one_message() {
    let rig = rig("");
    let mut sub = rig.subscribe(&["big/#"]).unwrap();
    let (_dir, path, want) = file(700);
    let (_, out) = aiocoap(&[
        "-v",
        "-m",
        "PUT",
        "--payload",
        &format!("@{}", path.display()),
        "--payload-initial-szx",
        "2",
        &url(&rig, "ps/big/aio"),
    ])
    .unwrap();
    assert!(out.contains("2.04 Changed"), "{out}");
    let m = sub.expect().unwrap();
    assert_eq!(m.topic, "big/aio");
    assert_eq!(m.payload, want);
}

#[test]
fn a_body_above_max_body_size_gets_4_13_with_size1_and_publishes_nothing() {
    let rig = rig("max_body_size = \"1KiB\"\n");
    let mut sub = rig.subscribe(&["big/#"]).unwrap();

    // libcoap announces Size1 = 2000 with block 0; the answer, at block 0 or later, is 4.13.
    let (_dir, path, _) = file(2000);
    let out = libcoap(&[
        "-m",
        "put",
        "-b",
        "64",
        "-f",
        path.to_str().unwrap(),
        "-B",
        "10",
        &url(&rig, "ps/big/over"),
    ])
    .unwrap();
    let got = libcoap_responses(&out);
    assert_eq!(got.last().map(String::as_str), Some("4.13"), "{out}");
    assert!(!got.iter().any(|c| c == "2.04"), "{out}");

    // One datagram whose body is above the limit (it still fits max_message_size).
    let mut c = RawClient::new(rig.gateway.coap_addr()).unwrap();
    let (mid, token) = (c.mid(), c.token());
    let req = Msg::request(CON, codes::PUT, mid, &token, "ps/big/single").with_payload(&body(1100));
    let resp = c.request(&req, Duration::from_secs(10)).unwrap();
    assert_eq!(
        resp.code,
        codes::REQUEST_ENTITY_TOO_LARGE,
        "{}",
        resp.describe()
    );
    assert_eq!(resp.uint(opts::SIZE1), Some(1024), "{}", resp.describe());

    // Nothing of either reached the broker: the next message there is this marker.
    let (mid, token) = (c.mid(), c.token());
    let marker = Msg::request(CON, codes::PUT, mid, &token, "ps/big/marker").with_payload(b"m");
    let resp = c.request(&marker, Duration::from_secs(10)).unwrap();
    assert_eq!(resp.code, codes::CHANGED, "{}", resp.describe());
    let m = sub.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("big/marker", &b"m"[..])
    );
}
