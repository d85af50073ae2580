//! Fuzzes the gateway core: any sequence of datagrams from a few peers, interleaved with time
//! steps and upstream verdicts, must never panic, the session maps must stay consistent, and
//! the persisted session records it emits must all restore into a fresh core. An empty
//! datagram with control bit 4 set reconfigures the core (a reload), alternating between
//! `config()` and `lowered()` (lower limits, other predefined topics).

#![no_main]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use sensorgate_bridges::message::Qos;
use sensorgate::mqttsn::core::{
    ClientSet, Core, CoreConfig, Event, Peer, PersistChange, PredefinedTopic, PublishOutcome,
};

fn config() -> CoreConfig {
    CoreConfig {
        max_clients: 4,
        max_packet_size: 256,
        max_topics_per_client: 4,
        max_inflight_per_client: 2,
        predefined: vec![PredefinedTopic { id: 1, topic: "p".into(), clients: ClientSet::All }],
        max_queued_per_client: 4,
        max_buffered_per_sleeping_client: 4,
        retry_interval: Duration::from_secs(1),
        ..CoreConfig::with_defaults(1)
    }
}

/// `config()` with lower limits and predefined topic 1 moved to id 2.
fn lowered() -> CoreConfig {
    CoreConfig {
        max_clients: 2,
        max_topics_per_client: 1,
        max_inflight_per_client: 1,
        predefined: vec![PredefinedTopic { id: 2, topic: "p".into(), clients: ClientSet::All }],
        max_queued_per_client: 1,
        max_buffered_per_sleeping_client: 1,
        max_filters: 1,
        retry_interval: Duration::from_millis(500),
        ..config()
    }
}

fuzz_target!(|data: &[u8]| {
    let mut core = Core::new(config());
    let mut persist = Vec::new();
    let mut stored: HashMap<Arc<str>, Vec<u8>> = HashMap::new();
    #[allow(clippy::disallowed_methods)]
    let mut now = Instant::now();
    let mut tokens = Vec::new();
    let mut buf = Vec::new();
    let mut reconfigured = false;
    // Input: records of [control, len, bytes...]; control picks the peer, a time step, and what
    // to answer the oldest outstanding token.
    let mut rest = data;
    while let [control, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (datagram, next) = tail.split_at(n);
        rest = next;
        let port = 1000 + u16::from(control & 0x03);
        // The fourth peer is an allow-listed forwarder: its encapsulations are decoded (from
        // the others they are refused).
        let peer = if control & 0x03 == 3 {
            Peer::forwarder(0)
        } else {
            Peer::udp(0, SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
        };
        if datagram.is_empty() && control & 0x10 != 0 {
            reconfigured = !reconfigured;
            let _ = core.reconfigure(now, if reconfigured { lowered() } else { config() });
        }
        core.handle_datagram(now, peer, datagram);
        if control & 0x20 != 0 {
            // Downlink on a topic the fuzzer's clients may have subscribed to.
            let _ = core.handle_downlink(now, "p", bytes::Bytes::from_static(b"d"), Qos::AtLeastOnce, control & 1 == 1, None);
        }
        now += Duration::from_millis(u64::from(control >> 2) * 500);
        core.handle_timeout(now);
        while let Some(event) = core.poll_event() {
            if let Event::Publish { token, .. } = event {
                tokens.extend(token);
            }
        }
        if control & 0x80 != 0 && !tokens.is_empty() {
            let token = tokens.remove(0);
            let outcome =
                if control & 0x40 != 0 { PublishOutcome::Accepted } else { PublishOutcome::Congestion };
            core.handle_publish_result(now, token, outcome);
        }
        while core.poll_transmit(&mut buf).is_some() {}
        assert!(core.session_count() <= 4);
        persist.clear();
        core.take_persist_changes(&mut persist);
        for change in persist.drain(..) {
            match change {
                PersistChange::Upsert { client_id, bytes } => stored.insert(client_id, bytes),
                PersistChange::Remove { client_id } => stored.remove(&client_id),
            };
        }
    }
    // What was stored is exactly what a restarted gateway can take back.
    let mut restarted = Core::new(config());
    for bytes in stored.values() {
        restarted.restore(now, bytes).expect("every stored record restores");
    }
    assert_eq!(restarted.session_count(), stored.len());
});
