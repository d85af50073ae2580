//! `kernel_drops`: datagrams the kernel dropped on the gateway's MQTT-SN sockets (receive
//! buffer full) are counted in the `Spool status.` line, apart from what the gateway dropped.
//! Provoked for real: the gateway is stopped (SIGSTOP) with the smallest receive buffer while
//! a client floods it over loopback, then resumed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::UdpSocket;

use sensorgate_tests::{Rig, send_signal};

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
    // It serves again after the burst.
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
    // The gateway itself dropped nothing.
    assert_eq!(field(spool, "queue_full"), 0, "{spool}");
}
