//! An MQTT-SN forwarder (spec 5.5) for the end-to-end tests: one UDP socket that carries the
//! messages of many wireless nodes, each wrapped in a 0xFE encapsulation with the node's
//! Wireless Node Id, and sorts what the gateway sends back by node id.
//!
//! Invariants:
//! - The encapsulation is written and read here from the spec (Length, 0xFE, Ctrl, Wireless
//!   Node Id, message; Length covers the header only, in its 1- or 3-octet form), sharing
//!   nothing with the gateway's codec.
//! - A datagram for one node that arrives while the test waits for another's is kept, per
//!   node, in arrival order: nothing is lost by waiting on the nodes in any order.
//! - Every wait is bounded by a timeout given by the caller; nothing sleeps to pass.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::sn;

/// A datagram from the gateway, unwrapped: (radius, node id, the message).
///
/// # Errors
/// When it is not a well-formed encapsulation (the gateway must only send those to a
/// forwarder).
pub fn decapsulate(raw: &[u8]) -> Result<(u8, Vec<u8>, Vec<u8>)> {
    let (len, hdr) = match raw.first() {
        Some(0x01) => match (raw.get(1), raw.get(2)) {
            (Some(&a), Some(&b)) => (usize::from(u16::from_be_bytes([a, b])), 3),
            _ => bail!("truncated 3-octet length in {raw:02x?}"),
        },
        Some(&l) => (usize::from(l), 1),
        None => bail!("empty datagram from the gateway"),
    };
    ensure!(
        raw.get(hdr) == Some(&sn::ENCAPSULATED),
        "not an encapsulation: {raw:02x?}"
    );
    let ctrl = raw
        .get(hdr + 1)
        .copied()
        .with_context(|| format!("no Ctrl octet: {raw:02x?}"))?;
    let node = raw
        .get(hdr + 2..len)
        .with_context(|| format!("Length {len} beyond the datagram: {raw:02x?}"))?;
    let inner = raw.get(len..).unwrap_or_default();
    Ok((ctrl & 0x03, node.to_vec(), inner.to_vec()))
}

/// A forwarder on a UDP socket of its own.
#[derive(Debug)]
pub struct Forwarder {
    sock: UdpSocket,
    /// The gateway.
    gw: SocketAddr,
    /// Packets received for each node, not yet taken.
    inbox: HashMap<Vec<u8>, VecDeque<sn::Packet>>,
    /// The next MsgId per node (never 0).
    msg_ids: HashMap<Vec<u8>, u16>,
}

impl Forwarder {
    /// A forwarder on a fresh socket bound to `local` (any port), sending to `gw`.
    ///
    /// # Errors
    /// When the socket cannot be bound.
    pub fn bind(gw: SocketAddr, local: IpAddr) -> Result<Forwarder> {
        Ok(Forwarder {
            sock: bind(local)?,
            gw,
            inbox: HashMap::new(),
            msg_ids: HashMap::new(),
        })
    }

    /// Its local address.
    ///
    /// # Errors
    /// When the OS cannot say.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.sock.local_addr()?)
    }

    /// Restarts on a new socket of the same address with another port, as a forwarder
    /// process restarting would; what was received and not taken is forgotten with the old
    /// socket.
    ///
    /// # Errors
    /// When no other port can be bound.
    pub fn restart(&mut self) -> Result<()> {
        let old = self.local_addr()?;
        // Bound before the old one closes: the new port cannot be the old one.
        let sock = bind(old.ip())?;
        ensure!(sock.local_addr()?.port() != old.port(), "same port again");
        self.sock = sock;
        self.inbox.clear();
        Ok(())
    }

    /// A fresh MsgId for `node`.
    pub fn msg_id(&mut self, node: &[u8]) -> u16 {
        let next = self.msg_ids.entry(node.to_vec()).or_insert(1);
        let id = *next;
        *next = next.checked_add(1).unwrap_or(1);
        id
    }

    /// Sends `inner` for `node`, encapsulated.
    ///
    /// # Errors
    /// When sending fails.
    pub fn send(&self, node: &[u8], inner: &[u8]) -> Result<()> {
        let d = sn::encapsulate(0, node, inner);
        let n = self.sock.send_to(&d, self.gw)?;
        ensure!(n == d.len(), "short send: {n} of {}", d.len());
        Ok(())
    }

    /// Receives one datagram within `timeout` into its node's inbox; false when none came.
    fn pump(&mut self, timeout: Duration) -> Result<bool> {
        self.sock
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut buf = vec![0u8; 65536];
        let n = match self.sock.recv_from(&mut buf) {
            Ok((n, _)) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
        let raw = buf.get(..n).unwrap_or_default();
        let (_, node, inner) = decapsulate(raw)?;
        let packet = sn::decode(&inner)?;
        self.inbox.entry(node).or_default().push_back(packet);
        Ok(true)
    }

    /// Waits up to `timeout` for a packet for `node` matching `want`; the node's packets
    /// before it are dropped (returned in the error when none matches).
    ///
    /// # Errors
    /// On timeout.
    pub fn expect(
        &mut self,
        node: &[u8],
        what: &str,
        timeout: Duration,
        mut want: impl FnMut(&sn::Packet) -> bool,
    ) -> Result<sn::Packet> {
        let deadline = Instant::now() + timeout;
        let mut skipped = Vec::new();
        loop {
            while let Some(p) = self.inbox.get_mut(node).and_then(VecDeque::pop_front) {
                if want(&p) {
                    return Ok(p);
                }
                skipped.push(p);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.pump(left)? {
                bail!("node {node:02x?}: no {what} within {timeout:?}; skipped: {skipped:?}");
            }
        }
    }

    /// Takes every packet received so far, by node, after receiving whatever arrives until
    /// `settle` passes in silence.
    ///
    /// # Errors
    /// When receiving fails.
    pub fn drain(&mut self, settle: Duration) -> Result<HashMap<Vec<u8>, Vec<sn::Packet>>> {
        while self.pump(settle)? {}
        Ok(self
            .inbox
            .drain()
            .map(|(node, q)| (node, q.into_iter().collect()))
            .collect())
    }

    /// CONNECT (CleanSession) `client_id` for `node`; returns the CONNACK's return code.
    ///
    /// # Errors
    /// When no CONNACK arrives within `timeout`.
    pub fn connect(&mut self, node: &[u8], client_id: &str, timeout: Duration) -> Result<u8> {
        self.send(node, &sn::connect(sn::FLAG_CLEAN, 60, client_id.as_bytes()))?;
        self.connack(node, timeout)
    }

    /// The next CONNACK's return code for `node`.
    ///
    /// # Errors
    /// When none arrives within `timeout`.
    pub fn connack(&mut self, node: &[u8], timeout: Duration) -> Result<u8> {
        match self.expect(node, "CONNACK", timeout, |p| {
            matches!(p, sn::Packet::Connack { .. })
        })? {
            sn::Packet::Connack { rc } => Ok(rc),
            p => bail!("unreachable: {p:?}"),
        }
    }

    /// Sends REGISTER `topic` for `node`; returns its MsgId (see [`Forwarder::regack`]).
    ///
    /// # Errors
    /// When sending fails.
    pub fn send_register(&mut self, node: &[u8], topic: &str) -> Result<u16> {
        let msg_id = self.msg_id(node);
        self.send(node, &sn::register(msg_id, topic.as_bytes()))?;
        Ok(msg_id)
    }

    /// The topic id of the REGACK rc 0 for `msg_id` to `node`.
    ///
    /// # Errors
    /// When it does not come within `timeout` or is a rejection.
    pub fn regack(&mut self, node: &[u8], msg_id: u16, timeout: Duration) -> Result<u16> {
        match self.expect(
            node,
            "REGACK",
            timeout,
            |p| matches!(p, sn::Packet::Regack { msg_id: m, .. } if *m == msg_id),
        )? {
            sn::Packet::Regack {
                topic_id,
                rc: sn::RC_ACCEPTED,
                ..
            } => Ok(topic_id),
            p => bail!("node {node:02x?}: REGISTER refused: {p:?}"),
        }
    }

    /// Sends a QoS 1 PUBLISH of `data` to the normal topic id `topic_id` for `node`; returns
    /// its MsgId (see [`Forwarder::puback`]).
    ///
    /// # Errors
    /// When sending fails.
    pub fn send_publish_qos1(&mut self, node: &[u8], topic_id: u16, data: &[u8]) -> Result<u16> {
        let msg_id = self.msg_id(node);
        let flags = sn::flags(sn::Qos::One, false, sn::TopicType::Normal);
        self.send(node, &sn::publish(flags, topic_id, msg_id, data))?;
        Ok(msg_id)
    }

    /// The return code of the PUBACK for `msg_id` to `node`.
    ///
    /// # Errors
    /// When it does not come within `timeout`.
    pub fn puback(&mut self, node: &[u8], msg_id: u16, timeout: Duration) -> Result<u8> {
        match self.expect(
            node,
            "PUBACK",
            timeout,
            |p| matches!(p, sn::Packet::Puback { msg_id: m, .. } if *m == msg_id),
        )? {
            sn::Packet::Puback { rc, .. } => Ok(rc),
            p => bail!("unreachable: {p:?}"),
        }
    }

    /// Sends SUBSCRIBE to the topic name `topic` at `qos` for `node`; returns its MsgId (see
    /// [`Forwarder::suback`]).
    ///
    /// # Errors
    /// When sending fails.
    pub fn send_subscribe(&mut self, node: &[u8], topic: &str, qos: sn::Qos) -> Result<u16> {
        let msg_id = self.msg_id(node);
        self.send(
            node,
            &sn::subscribe(qos, msg_id, &sn::SubTopic::Name(topic)),
        )?;
        Ok(msg_id)
    }

    /// The topic id of the SUBACK rc 0 for `msg_id` to `node`.
    ///
    /// # Errors
    /// When it does not come within `timeout` or is a rejection.
    pub fn suback(&mut self, node: &[u8], msg_id: u16, timeout: Duration) -> Result<u16> {
        match self.expect(
            node,
            "SUBACK",
            timeout,
            |p| matches!(p, sn::Packet::Suback { msg_id: m, .. } if *m == msg_id),
        )? {
            sn::Packet::Suback {
                topic_id,
                rc: sn::RC_ACCEPTED,
                ..
            } => Ok(topic_id),
            p => bail!("node {node:02x?}: SUBSCRIBE refused: {p:?}"),
        }
    }

    /// The next downlink PUBLISH for `node` (acknowledged with PUBACK rc 0 when QoS 1):
    /// (topic id, data).
    ///
    /// # Errors
    /// When none comes within `timeout`.
    pub fn downlink(&mut self, node: &[u8], timeout: Duration) -> Result<(u16, Vec<u8>)> {
        match self.expect(node, "PUBLISH", timeout, |p| {
            matches!(p, sn::Packet::Publish { .. })
        })? {
            sn::Packet::Publish {
                flags,
                topic_id,
                msg_id,
                data,
            } => {
                if sn::Qos::from_flags(flags) == sn::Qos::One {
                    self.send(node, &sn::puback(topic_id, msg_id, sn::RC_ACCEPTED))?;
                }
                Ok((topic_id, data))
            }
            p => bail!("unreachable: {p:?}"),
        }
    }

    /// PINGREQ for `node`, PINGRESP required.
    ///
    /// # Errors
    /// When none comes within `timeout`.
    pub fn ping(&mut self, node: &[u8], timeout: Duration) -> Result<()> {
        self.send(node, &sn::pingreq())?;
        self.expect(node, "PINGRESP", timeout, |p| {
            matches!(p, sn::Packet::Pingresp)
        })
        .map(drop)
    }
}

fn bind(local: IpAddr) -> Result<UdpSocket> {
    UdpSocket::bind(SocketAddr::new(local, 0))
        .with_context(|| format!("bind a forwarder to {local}"))
}
