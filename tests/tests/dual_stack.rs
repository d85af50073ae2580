//! A dual-stack gateway (`127.0.0.1:P` and `[::1]:P`, as the default config listens on both
//! families) serving IPv4 and IPv6 clients interleaved: every client must be served at its
//! own address. Both listeners share one receive batch in the gateway, so an IPv6 datagram
//! often lands in a slot that last held an IPv4 source: a stale address length there once bound
//! IPv6 sessions to `[::]` or to another IPv6 host.
//!
//! The first test mixes `127.0.0.x` and `::1` clients and runs anywhere. Distinct IPv6 source
//! addresses need root: the second test creates a network namespace of its own (only `lo`, with
//! a few extra IPv6 addresses), reruns itself inside it with the broker and the gateway, and
//! removes the namespace when done.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use sensorgate_tests::sn::{self, Packet, Qos, TopicType};
use sensorgate_tests::{
    DELIVERY_TIMEOUT, Gateway, GatewayConfig, Mosquitto, REPLY_TIMEOUT, SnClient, Subscriber,
    free_udp_port, require_root, run_bounded, send_signal,
};

/// Set in the rerun inside the namespace, to the namespace's name.
const IN_NETNS: &str = "SENSORGATE_TEST_NETNS";

/// The namespace test's own name, for the rerun's filter.
const NETNS_TEST: &str =
    "ipv4_and_several_ipv6_hosts_in_a_namespace_are_each_served_at_their_own_address";

/// The prefix of the extra IPv6 addresses on the namespace's `lo` (a unique local prefix).
const EXTRA_V6: &str = "fd00:5347:";

/// A UDP port free on both 127.0.0.1 and ::1 a moment ago.
fn dual_stack_port() -> Result<u16> {
    for _ in 0..50 {
        let port = free_udp_port(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
        if UdpSocket::bind((Ipv6Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no UDP port free on both 127.0.0.1 and ::1")
}

/// One client per source address (in this order) of one dual-stack gateway: each one CONNECTs,
/// REGISTERs and PUBLISHes at QoS 1, first one client after the other (so the gateway's reads
/// alternate between the families), then all at once per step (so batches hold several
/// sources). Every reply must reach its own client, nothing else may reach any client, and
/// the broker must get every message.
fn every_client_is_served_at_its_own_address(sources: &[IpAddr]) -> Result<()> {
    let broker = Mosquitto::start()?;
    let mut config = GatewayConfig::new(broker.port())?;
    let port = dual_stack_port()?;
    let gw4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let gw6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    config.listen = vec![gw4, gw6];
    let gateway = Gateway::start(&config)?;
    let mut observer = Subscriber::start(broker.port(), &["dual/#"])?;

    let mut clients = Vec::new();
    for (i, &ip) in sources.iter().enumerate() {
        let gw = if ip.is_ipv4() { gw4 } else { gw6 };
        let client = SnClient::bind(gw, ip)?;
        let at = client.local_addr()?;
        clients.push((format!("dual-{i}"), at, client));
    }
    let mut want = BTreeSet::new();

    // One client at a time: CONNECT from IPv4, then CONNECT and REGISTER from IPv6, ...
    for (id, at, c) in &mut clients {
        c.connect_ok(id)
            .with_context(|| format!("{id} at {at}: CONNECT"))?;
        let topic = format!("dual/{id}/one");
        let topic_id = c
            .register(&topic)
            .with_context(|| format!("{id} at {at}: REGISTER"))?;
        c.publish_qos1_ok(TopicType::Normal, topic_id, at.to_string().as_bytes())
            .with_context(|| format!("{id} at {at}: PUBLISH"))?;
        want.insert((topic, at.to_string()));
    }

    // All at once per step: every client sends, then every client reads its own reply.
    for (id, _, c) in &clients {
        c.send(&sn::connect(sn::FLAG_CLEAN, 60, id.as_bytes()))?;
    }
    for (id, at, c) in &clients {
        match c
            .next_packet()
            .with_context(|| format!("{id} at {at}: CONNACK"))?
        {
            Packet::Connack {
                rc: sn::RC_ACCEPTED,
            } => {}
            p => bail!("{id} at {at}: expected CONNACK rc 0, got {p:?}"),
        }
    }
    let mut registers = Vec::new();
    for (id, _, c) in &mut clients {
        let msg_id = c.msg_id();
        c.send(&sn::register(msg_id, format!("dual/{id}/all").as_bytes()))?;
        registers.push(msg_id);
    }
    let mut topic_ids = Vec::new();
    for ((id, at, c), &msg_id) in clients.iter().zip(&registers) {
        match c
            .next_packet()
            .with_context(|| format!("{id} at {at}: REGACK"))?
        {
            Packet::Regack {
                topic_id,
                msg_id: m,
                rc: sn::RC_ACCEPTED,
            } if m == msg_id => topic_ids.push(topic_id),
            p => bail!("{id} at {at}: expected REGACK of {msg_id} rc 0, got {p:?}"),
        }
    }
    let mut publishes = Vec::new();
    for ((id, at, c), &topic_id) in clients.iter_mut().zip(&topic_ids) {
        let payload = at.to_string();
        publishes.push(c.publish(
            Qos::One,
            TopicType::Normal,
            topic_id,
            false,
            payload.as_bytes(),
        )?);
        want.insert((format!("dual/{id}/all"), payload));
    }
    for (((id, at, c), &msg_id), &topic_id) in clients.iter().zip(&publishes).zip(&topic_ids) {
        let (tid, rc) = c
            .puback(msg_id, REPLY_TIMEOUT)
            .with_context(|| format!("{id} at {at}: PUBACK"))?;
        ensure!(
            (tid, rc) == (topic_id, sn::RC_ACCEPTED),
            "{id} at {at}: PUBACK topic {tid:#06x} rc {rc:#04x}"
        );
    }

    // Nobody got anything meant for someone else.
    for (id, at, c) in &clients {
        c.assert_no_reply()
            .with_context(|| format!("{id} at {at}: a stray packet"))?;
    }
    let got: BTreeSet<_> = observer
        .collect(want.len(), DELIVERY_TIMEOUT)?
        .into_iter()
        .map(|m| (m.topic, String::from_utf8_lossy(&m.payload).into_owned()))
        .collect();
    ensure!(got == want, "the broker got {got:?}, expected {want:?}");
    drop(gateway);
    Ok(())
}

#[test]
fn ipv4_and_ipv6_loopback_clients_interleaved_are_each_served_at_their_own_address() {
    let v4 = |last: u8| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
    let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    every_client_is_served_at_its_own_address(&[v4(1), v6, v4(2), v6, v6, v4(3), v6, v4(1)])
        .unwrap();
}

/// A named network namespace (`ip netns`), removed on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn add() -> Netns {
        let name = format!("sg-dual-{}", std::process::id());
        let out = run_bounded(
            Command::new("ip").args(["netns", "add", &name]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns { name }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // The rerun stops its own peers; whatever survived it (a rerun killed at its time
        // bound) is killed here, by PID, before the namespace goes.
        if let Ok(out) = run_bounded(
            Command::new("ip").args(["netns", "pids", &self.name]),
            Duration::from_secs(10),
        ) {
            for pid in String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.trim().parse::<u32>().ok())
            {
                let _ = send_signal(pid, "KILL");
            }
        }
        let deleted = run_bounded(
            Command::new("ip").args(["netns", "del", &self.name]),
            Duration::from_secs(10),
        );
        if !deleted.is_ok_and(|o| o.status.success()) {
            eprintln!("cannot delete network namespace {}", self.name);
        }
    }
}

/// Inside the namespace: brings `lo` up with `count` extra IPv6 addresses; returns them.
fn extra_addresses(count: u16) -> Result<Vec<IpAddr>> {
    let ip = |args: &[&str]| -> Result<()> {
        let out = run_bounded(Command::new("ip").args(args), Duration::from_secs(10))?;
        ensure!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    ip(&["link", "set", "lo", "up"])?;
    let mut addrs = Vec::new();
    for n in 1..=count {
        let addr = format!("{EXTRA_V6}:{n:x}");
        // nodad: usable at once, not tentative (nothing else can hold it in this namespace).
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{addr}/128"),
            "dev",
            "lo",
            "nodad",
        ])?;
        addrs.push(addr.parse()?);
    }
    Ok(addrs)
}

#[test]
#[ignore = "needs root: creates a network namespace to give clients several IPv6 addresses"]
fn ipv4_and_several_ipv6_hosts_in_a_namespace_are_each_served_at_their_own_address() {
    if std::env::var_os(IN_NETNS).is_some() {
        // The rerun, inside the namespace: IPv6 hosts follow IPv4 ones and each other, so a
        // stale address in a receive slot would name another host.
        let v6 = extra_addresses(4).unwrap();
        let v4 = |last: u8| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
        let sources = [
            v4(1),
            v6[0],
            v6[1],
            v4(2),
            v6[2],
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            v6[3],
            v4(3),
            v6[0],
        ];
        every_client_is_served_at_its_own_address(&sources).unwrap();
        return;
    }
    require_root("creates a network namespace and adds addresses to its lo");
    let netns = Netns::add();
    let exe = std::env::current_exe().unwrap();
    let out = run_bounded(
        Command::new("ip")
            .args(["netns", "exec", &netns.name])
            .arg(&exe)
            .args([NETNS_TEST, "--exact", "--include-ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(IN_NETNS, &netns.name),
        Duration::from_secs(180),
    )
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // "1 passed" also proves the filter matched: a rerun that ran nothing must not pass.
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "the rerun in namespace {} failed ({}):\n{stdout}\n{stderr}",
        netns.name,
        out.status
    );
}
