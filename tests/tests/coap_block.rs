//! Block-wise uploads (RFC 7959 Block1) with independent clients: libcoap (`-b 64`) and
//! aiocoap (`--payload-initial-szx 2`, 64-byte blocks) get a 2.31 Continue per block and a
//! 2.04 at the end, and the whole body reaches the broker as one message; a body above
//! `max_body_size` gets 4.13 with Size1 and publishes nothing. Block2: a retained value larger
//! than a block is notified as its first block (M set), and libcoap reads all of it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::PathBuf;
use std::time::Duration;

use sensorgate_tests::coap::{
    ACK, CON, Msg, RawClient, aiocoap, codes, libcoap, libcoap_responses, opts,
};
use sensorgate_tests::{Rig, UpMsg, publish_upstream, temp_dir};
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

#[test]
fn a_large_retained_value_is_notified_and_read_block_wise() {
    let rig = rig("");
    let mut a = RawClient::new(rig.gateway.coap_addr()).unwrap();
    // An observation keeps cmd/big subscribed, so the gateway holds its retained value.
    let (mid, token) = (a.mid(), a.token());
    let reg = Msg::request(CON, codes::GET, mid, &token, "ps/cmd/big").with_uint(opts::OBSERVE, 0);
    let r = a.request(&reg, Duration::from_secs(10)).unwrap();
    assert_eq!(r.code, codes::CONTENT, "{}", r.describe());
    let want = body(3000);
    publish_upstream(rig.broker.port(), &[UpMsg::retained("cmd/big", &want, 1)]).unwrap();

    // The notification carries the first block and says more follow (RFC 7959 §2.6).
    let mut skipped = Vec::new();
    let n = a
        .recv_matching(Duration::from_secs(15), &mut skipped, |m| {
            m.token == token && m.option(opts::OBSERVE).is_some()
        })
        .unwrap()
        .unwrap_or_else(|| {
            panic!(
                "no notification of the 3000-byte value; got {:?}",
                skipped.iter().map(Msg::describe).collect::<Vec<_>>()
            )
        });
    if n.ty == CON {
        a.send(&Msg::empty(ACK, n.mid)).unwrap();
    }
    assert_eq!(n.code, codes::CONTENT, "{}", n.describe());
    let (num, more, szx) = n
        .block(opts::BLOCK2)
        .expect("Block2 on a large notification");
    assert_eq!((num, more), (0, true), "{}", n.describe());
    let size = 1usize << (szx + 4);
    assert_eq!(n.payload, want[..size], "block 0");

    // libcoap reads the whole value with Block2, block by block, and writes the reassembled
    // body to a file (its printed output interleaves the blocks with its log lines).
    let dir = temp_dir().unwrap();
    let file = dir.path().join("big.out");
    let file_arg = file.to_str().unwrap();
    let out = libcoap(&[
        "-m",
        "get",
        "-B",
        "10",
        "-o",
        file_arg,
        &url(&rig, "ps/cmd/big"),
    ])
    .unwrap();
    let got = libcoap_responses(&out);
    assert!(
        got.len() >= 3 && got.iter().all(|c| c == "2.05"),
        "{got:?}\n{out}"
    );
    let written = std::fs::read(&file).unwrap_or_default();
    assert!(
        written == want,
        "the whole value, {} bytes written:\n{out}",
        written.len()
    );
}
