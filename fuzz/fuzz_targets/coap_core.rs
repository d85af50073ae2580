//! Fuzzes the CoAP core: any sequence of datagrams from a few peers, interleaved with time
//! steps, the spool's verdicts, the router's subscription answers and downlink, must never
//! panic; the tables stay consistent and bounded (`check_invariants`), every datagram sent
//! decodes and fits `max_message_size`, every ACK echoes a Message ID its peer sent in a CON.
//! An empty datagram with control bit 4 set reconfigures the core (a reload), alternating
//! between `config()` and `lowered()`: the invariants hold across it.

#![no_main]

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use sensorgate::coap::core::{Core, CoreConfig};
use sensorgate::coap::msg::{self, MessageType};
use sensorgate::ingress::{DatagramCore, Event, Peer, PeerAddr, PublishOutcome};
use sensorgate_bridges::message::Qos;

fn config() -> CoreConfig {
    CoreConfig {
        max_message_size: 128,
        max_body_size: 64,
        // Small blocks: bodies above 32 bytes go block-wise (Block1 and Block2 exercised).
        block_size: 32,
        reassembly_bytes: 256,
        max_peers: 3,
        dedup_per_peer: 4,
        max_exchanges_per_peer: 2,
        max_observers: 4,
        max_observers_per_peer: 2,
        max_filters: 3,
        max_queued_per_observer: 2,
        notification_check_count: 3,
        observer_ping_interval: Duration::from_secs(20),
        exchange_lifetime: Duration::from_secs(60),
        non_lifetime: Duration::from_secs(30),
        ..CoreConfig::default()
    }
}

/// `config()` with every bound at its least (the same `max_message_size`, which the loop
/// checks every datagram against).
fn lowered() -> CoreConfig {
    CoreConfig {
        max_body_size: 40,
        block_size: 16,
        reassembly_bytes: 64,
        max_peers: 1,
        dedup_per_peer: 1,
        max_exchanges_per_peer: 1,
        max_observers: 1,
        max_observers_per_peer: 1,
        max_filters: 1,
        max_queued_per_observer: 1,
        max_block2_bodies: 1,
        observer_ping_interval: Duration::ZERO,
        exchange_lifetime: Duration::from_secs(5),
        ..config()
    }
}

const STEPS_MS: [u64; 8] = [0, 10, 100, 500, 1_000, 3_000, 30_000, 300_000];

fuzz_target!(|data: &[u8]| {
    let config = config();
    let mut core = Core::new(config.clone(), 1);
    #[allow(clippy::disallowed_methods)]
    let mut now = Instant::now();
    let mut tokens: Vec<u64> = Vec::new();
    let mut con_mids: HashSet<(u16, u16)> = HashSet::new();
    let mut buf = Vec::new();
    let mut reconfigured = false;
    let mut rest = data;
    while let [control, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (datagram, next) = tail.split_at(n);
        rest = next;
        let port = 1000 + u16::from(control & 0x03);
        let peer = Peer::udp(0, SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
        if let [b0, _, hi, lo, ..] = datagram {
            if b0 >> 4 == 0x4 {
                con_mids.insert((port, u16::from_be_bytes([*hi, *lo])));
            }
        }
        if datagram.is_empty() && control & 0x10 != 0 {
            reconfigured = !reconfigured;
            let settings = if reconfigured { lowered() } else { config.clone() };
            let _ = core.reconfigure(now, settings);
            core.check_invariants();
        }
        core.handle_datagram(now, peer, datagram);
        if control & 0x20 != 0 {
            let topic = if control & 0x01 == 0 { "p" } else { "p/q" };
            let qos = if control & 0x02 == 0 {
                Qos::AtMostOnce
            } else {
                Qos::AtLeastOnce
            };
            let filters = [Arc::from("p/+")];
            let filters = (control & 0x10 != 0).then_some(&filters[..]);
            // Short, or long enough to go block-wise.
            let payload: &'static [u8] = if control & 0x08 == 0 {
                b"d"
            } else {
                &[0x55; 100]
            };
            let _ = core.handle_downlink(
                now,
                topic,
                bytes::Bytes::from_static(payload),
                qos,
                control & 0x04 != 0,
                filters,
            );
        }
        now += Duration::from_millis(STEPS_MS[usize::from((control >> 2) & 0x07)]);
        core.handle_timeout(now);
        match control >> 6 {
            0 => {}
            verdict if !tokens.is_empty() => {
                let token = tokens.remove(0);
                let outcome = match verdict {
                    1 => PublishOutcome::Accepted,
                    2 => PublishOutcome::Congestion,
                    _ => PublishOutcome::NoRoute,
                };
                core.handle_publish_result(now, token, outcome);
            }
            _ => {}
        }
        while let Some(event) = core.poll_event() {
            match event {
                Event::Publish { token, .. } => tokens.extend(token),
                Event::Subscribe { filter, .. } => {
                    core.handle_subscribe_result(now, &filter, datagram.len() % 5 != 0);
                }
                Event::Unsubscribe { .. } => {}
            }
        }
        while let Some(to) = core.poll_transmit(&mut buf) {
            assert!(buf.len() <= config.max_message_size, "datagram too large");
            let message = msg::decode(&buf).expect("the core sends valid CoAP");
            let PeerAddr::Udp { addr, .. } = to.addr else {
                panic!("UDP peers only");
            };
            if message.ty == MessageType::Ack {
                assert!(
                    con_mids.contains(&(addr.port(), message.message_id)),
                    "ACK for a MID the peer never sent"
                );
            }
        }
        core.check_invariants();
    }
});
