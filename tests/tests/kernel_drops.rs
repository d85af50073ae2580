//! `kernel_drops`: datagrams the kernel dropped on the gateway's MQTT-SN sockets (receive
//! buffer full) are counted in the `Spool status.` line, apart from what the gateway dropped.
//! Provoked for real: the gateway is stopped (SIGSTOP) with the smallest receive buffer while
//! a client floods it over loopback, then resumed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use sensorgate_tests::{Rig, poll_until, send_signal};

/// Bytes waiting in the receive queue of the IPv4 UDP socket bound to `addr`, from
/// `/proc/net/udp` (`local_address` and `rx_queue` are hex); `None` when no such socket.
fn rx_queue(addr: SocketAddr) -> Option<u64> {
    let want = format!(":{:04X}", addr.port());
    let table = std::fs::read_to_string("/proc/net/udp").ok()?;
    table.lines().skip(1).find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        if !cols.get(1)?.ends_with(&want) {
            return None;
        }
        let (_, rx) = cols.get(4)?.split_once(':')?;
        u64::from_str_radix(rx, 16).ok()
    })
}

/// The value of ` name=<digits>` in a log line.
fn field(line: &str, name: &str) -> u64 {
    let at = line
        .find(&format!(" {name}="))
        .unwrap_or_else(|| panic!("no {name} in {line}"));
    let rest = &line[at + name.len() + 2..];
    rest[..rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len())]
        .parse()
        .unwrap()
}

#[test]
fn datagrams_the_kernel_dropped_while_the_gateway_stood_still_are_counted() {
    let mut rig = Rig::start_with(|c| {
        c.mqttsn("recv_buffer = \"4KiB\"");
        Ok(())
    })
    .unwrap();
    let pid = rig.gateway.pid().unwrap();
    let flood = UdpSocket::bind("127.0.0.1:0").unwrap();
    send_signal(pid, "STOP").unwrap();
    // PINGREQ: short and harmless. Each takes far more than its two bytes of buffer
    // accounting, so a 4 KiB buffer holds a few dozen at most.
    const SENT: usize = 2_000;
    for _ in 0..SENT {
        flood.send_to(&[0x02, 0x16], rig.gateway.sn_addr()).unwrap();
    }
    send_signal(pid, "CONT").unwrap();
    // Once the resumed gateway has read what the kernel kept (a CONNECT sent before that
    // would meet a still full buffer and be dropped too), it serves again.
    let addr = rig.gateway.sn_addr();
    poll_until(
        "receive queue read",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || Ok((rx_queue(addr) == Some(0)).then_some(())),
    )
    .unwrap();
    rig.connected("after-flood").unwrap();

    rig.gateway.stop().unwrap();
    let log = rig.gateway.log();
    let spool = log
        .lines()
        .rfind(|l| l.contains("Spool status."))
        .expect("spool status logged");
    let dropped = field(spool, "kernel_drops");
    assert!(
        dropped > 0 && dropped < SENT as u64,
        "kernel_drops={dropped} of {SENT}: {spool}"
    );
    // The gateway itself dropped nothing (its queue never even filled).
    assert_eq!(field(spool, "queue_dropped"), 0, "{spool}");
    assert_eq!(field(spool, "queue_full"), 0, "{spool}");
}
