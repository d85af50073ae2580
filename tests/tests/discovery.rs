//! Gateway discovery: SEARCHGW → GWINFO (raw bytes, and the PyPI mqtt-sn-12 client's
//! `send_search_gateway`), `searchgw_reply = "destinations"`, and ADVERTISE every
//! `advertise_interval` to `advertise_destinations`, only while the upstream is connected.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use sensorgate_tests::sn::{self, Packet};
use sensorgate_tests::{
    GATEWAY_ID, Gateway, GatewayConfig, Mosquitto, READY_TIMEOUT, REPLY_TIMEOUT, Rig, free_tcp_port,
};

/// A loopback UDP socket standing for an advertise destination.
struct Listener {
    sock: UdpSocket,
}

impl Listener {
    fn new() -> Listener {
        Listener {
            sock: UdpSocket::bind("127.0.0.1:0").unwrap(),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.sock.local_addr().unwrap()
    }

    /// The next datagram within `timeout`, with its sender.
    fn recv(&self, timeout: Duration) -> Option<(Vec<u8>, SocketAddr)> {
        self.sock
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 512];
        match self.sock.recv_from(&mut buf) {
            Ok((n, from)) => Some((buf[..n].to_vec(), from)),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("recv: {e}"),
        }
    }

    /// Everything that arrives within `window`.
    fn drain(&self, window: Duration) -> Vec<Vec<u8>> {
        let end = Instant::now() + window;
        let mut got = Vec::new();
        for _ in 0..1000 {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.recv(left) {
                Some((d, _)) => got.push(d),
                None => break,
            }
        }
        got
    }
}

/// ADVERTISE from GwId [`GATEWAY_ID`] with a 1 s duration: 05 00 07 00 01.
const ADVERTISE_1S: [u8; 5] = [0x05, sn::ADVERTISE, GATEWAY_ID, 0x00, 0x01];

fn advertise_config(broker_port: u16, dest: SocketAddr, extra: &str) -> GatewayConfig {
    let mut cfg = GatewayConfig::new(broker_port).unwrap();
    cfg.mqttsn(&format!(
        "advertise_destinations = [\"{dest}\"]\nadvertise_interval = \"1s\"\n{extra}"
    ));
    cfg
}

#[test]
fn searchgw_is_answered_with_gwinfo_to_the_searcher_with_any_radius() {
    let rig = Rig::start().unwrap();
    let c = rig.client().unwrap();
    for radius in [0u8, 1, 2, 0xFF] {
        c.send(&sn::searchgw(radius)).unwrap();
        assert_eq!(
            c.recv_raw(REPLY_TIMEOUT).unwrap(),
            Some(vec![0x03, sn::GWINFO, GATEWAY_ID]),
            "radius {radius}"
        );
    }
    // A connected client searching is answered the same way, its session untouched.
    let c = rig.connected("searcher").unwrap();
    c.send(&sn::searchgw(1)).unwrap();
    assert_eq!(
        c.next_packet().unwrap(),
        Packet::GwInfo { gw_id: GATEWAY_ID }
    );
    c.ping().unwrap();
}

#[test]
fn mqtt_sn_12_client_finds_the_gateway() {
    let rig = Rig::start().unwrap();
    let script = format!(
        "import logging, sys\n\
         from mqttsn12.client.MqttSnClient import MqttSnClient\n\
         logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s')\n\
         c = MqttSnClient()\n\
         c.set_timeout(10)\n\
         c.open('127.0.0.1', {port})\n\
         c.send_search_gateway(1)\n\
         c.close()\n",
        port = rig.gateway.sn_addr().port()
    );
    let out = sensorgate_tests::run_bounded(
        std::process::Command::new(sensorgate_tests::python()).args(["-c", &script]),
        Duration::from_secs(30),
    )
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("Gateway ID: {GATEWAY_ID}")),
        "mqtt-sn-12: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn advertise_goes_to_each_destination_every_interval() {
    let one = Listener::new();
    let two = Listener::new();
    let broker = Mosquitto::start().unwrap();
    let mut cfg = GatewayConfig::new(broker.port()).unwrap();
    cfg.mqttsn(&format!(
        "advertise_destinations = [\"{}\", \"{}\"]\nadvertise_interval = \"1s\"\n",
        one.addr(),
        two.addr()
    ));
    let gw = Gateway::start(&cfg).unwrap();
    let from_gw = gw.sn_addr();
    // One reader per destination, so arrival times are not distorted by the other.
    std::thread::scope(|s| {
        for dest in [&one, &two] {
            s.spawn(move || {
                let mut at = Vec::new();
                for _ in 0..3 {
                    let (d, from) = dest.recv(REPLY_TIMEOUT).expect("ADVERTISE");
                    assert_eq!(d, ADVERTISE_1S);
                    assert_eq!(from, from_gw, "sent from the MQTT-SN listener");
                    at.push(Instant::now());
                }
                // Once per interval, not a burst (generous bounds).
                for w in at.windows(2) {
                    let gap = w[1] - w[0];
                    assert!(
                        gap >= Duration::from_millis(500) && gap <= Duration::from_secs(5),
                        "ADVERTISE {gap:?} apart with a 1 s interval"
                    );
                }
            });
        }
    });
}

#[test]
fn advertise_only_while_the_upstream_is_connected() {
    let dest = Listener::new();
    // No broker yet: the gateway serves sensors but must not advertise.
    let port = free_tcp_port().unwrap();
    let cfg = advertise_config(port, dest.addr(), "");
    let _gw = Gateway::start(&cfg).unwrap();
    let early = dest.drain(Duration::from_secs(3));
    assert!(
        early.is_empty(),
        "ADVERTISE without an upstream: {early:02x?}"
    );
    // The broker comes up: ADVERTISE starts.
    let mut broker = Mosquitto::start_on(port).unwrap();
    let (d, _) = dest.recv(READY_TIMEOUT).expect("ADVERTISE once connected");
    assert_eq!(d, ADVERTISE_1S);
    // The broker goes away: after the gateway noticed (a moment), ADVERTISE stops.
    broker.stop().unwrap();
    let _ = dest.drain(Duration::from_secs(2));
    let during = dest.drain(Duration::from_secs(3));
    assert!(
        during.is_empty(),
        "ADVERTISE while the upstream is down: {during:02x?}"
    );
    // And resumes when it is back.
    broker.restart().unwrap();
    let (d, _) = dest.recv(READY_TIMEOUT).expect("ADVERTISE after reconnect");
    assert_eq!(d, ADVERTISE_1S);
}

#[test]
fn searchgw_reply_destinations_sends_gwinfo_to_the_destinations() {
    let dest = Listener::new();
    let broker = Mosquitto::start().unwrap();
    let mut cfg = GatewayConfig::new(broker.port()).unwrap();
    cfg.mqttsn(&format!(
        "advertise_destinations = [\"{}\"]\nadvertise_interval = \"15m\"\n\
         searchgw_reply = \"destinations\"\n",
        dest.addr()
    ));
    let gw = Gateway::start(&cfg).unwrap();
    let c = sensorgate_tests::SnClient::new(gw.sn_addr()).unwrap();
    c.send(&sn::searchgw(1)).unwrap();
    // The destination gets GWINFO (skipping the ADVERTISE sent once the upstream is up).
    let deadline = Instant::now() + REPLY_TIMEOUT;
    let mut seen = Vec::new();
    let mut gwinfo = false;
    for _ in 0..10 {
        let left = deadline.saturating_duration_since(Instant::now());
        match dest.recv(left) {
            Some((d, _)) if d == [0x03, sn::GWINFO, GATEWAY_ID] => {
                gwinfo = true;
                break;
            }
            Some((d, _)) => seen.push(d),
            None => break,
        }
    }
    assert!(gwinfo, "no GWINFO at the destination; got {seen:02x?}");
    assert!(
        seen.iter().all(|d| d.get(1) == Some(&sn::ADVERTISE)),
        "{seen:02x?}"
    );
    // The searcher itself gets nothing: its next datagram is the DISCONNECT for a PINGREQ
    // sent afterwards (one socket's datagrams are handled in order).
    c.send(&sn::pingreq()).unwrap();
    assert_eq!(
        c.next_packet().unwrap(),
        Packet::Disconnect,
        "GWINFO went to the searcher as well"
    );
}
