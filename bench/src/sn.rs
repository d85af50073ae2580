//! The few MQTT-SN v1.2 packets the load generator sends and reads, plus the benchmark payload.
//!
//! Encoding is written out here on purpose: the harness must not share the gateway's codec, or a
//! codec bug could hide itself in the measurements.

/// Packet types (spec 5.2.2).
pub mod kind {
    pub const GWINFO: u8 = 0x02;
    pub const SEARCHGW: u8 = 0x01;
    pub const CONNECT: u8 = 0x04;
    pub const CONNACK: u8 = 0x05;
    pub const REGISTER: u8 = 0x0A;
    pub const REGACK: u8 = 0x0B;
    pub const PUBLISH: u8 = 0x0C;
    pub const PUBACK: u8 = 0x0D;
    pub const PUBCOMP: u8 = 0x0E;
    pub const PUBREC: u8 = 0x0F;
    pub const PUBREL: u8 = 0x10;
    pub const SUBSCRIBE: u8 = 0x12;
    pub const SUBACK: u8 = 0x13;
    pub const PINGREQ: u8 = 0x16;
    pub const PINGRESP: u8 = 0x17;
    pub const DISCONNECT: u8 = 0x18;
}

/// DUP flag.
pub const DUP: u8 = 0x80;
/// Topic id type: predefined.
pub const TOPIC_PREDEFINED: u8 = 0x01;
/// Topic id type: short topic name.
pub const TOPIC_SHORT: u8 = 0x02;

/// The QoS bits of the flags byte for QoS -1, 0, 1, 2.
#[must_use]
pub const fn qos_flags(qos: i8) -> u8 {
    match qos {
        -1 => 0x60,
        1 => 0x20,
        2 => 0x40,
        _ => 0x00,
    }
}

/// Appends the length (1 or 3 octets) and type of a packet whose body has `body_len` bytes.
fn header_into(out: &mut Vec<u8>, msg_type: u8, body_len: usize) {
    let len = body_len + 2;
    if let Ok(short) = u8::try_from(len) {
        out.push(short);
    } else {
        out.push(1);
        let long = u16::try_from(len + 2).unwrap_or(u16::MAX);
        out.extend_from_slice(&long.to_be_bytes());
    }
    out.push(msg_type);
}

/// Appends one packet: length, type, body.
pub fn frame_into(out: &mut Vec<u8>, msg_type: u8, body: &[u8]) {
    header_into(out, msg_type, body.len());
    out.extend_from_slice(body);
}

fn frame(msg_type: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + 4);
    frame_into(&mut v, msg_type, body);
    v
}

/// CONNECT with CleanSession.
#[must_use]
pub fn connect(client_id: &str, duration: u16) -> Vec<u8> {
    let mut body = vec![0x04, 0x01];
    body.extend_from_slice(&duration.to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    frame(kind::CONNECT, &body)
}

/// REGISTER of `topic`.
#[must_use]
pub fn register(topic: &str, msg_id: u16) -> Vec<u8> {
    let mut body = vec![0, 0];
    body.extend_from_slice(&msg_id.to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    frame(kind::REGISTER, &body)
}

/// SUBSCRIBE to a topic name or filter.
#[must_use]
pub fn subscribe(topic: &str, qos: i8, msg_id: u16) -> Vec<u8> {
    let mut body = vec![qos_flags(qos)];
    body.extend_from_slice(&msg_id.to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    frame(kind::SUBSCRIBE, &body)
}

/// Appends a PUBLISH (`flags`: QoS, DUP and topic id type bits).
pub fn publish_into(out: &mut Vec<u8>, flags: u8, topic: [u8; 2], msg_id: u16, data: &[u8]) {
    header_into(out, kind::PUBLISH, 5 + data.len());
    out.push(flags);
    out.extend_from_slice(&topic);
    out.extend_from_slice(&msg_id.to_be_bytes());
    out.extend_from_slice(data);
}

/// PUBREL for `msg_id`.
#[must_use]
pub fn pubrel(msg_id: u16) -> Vec<u8> {
    frame(kind::PUBREL, &msg_id.to_be_bytes())
}

/// PINGREQ without ClientId.
#[must_use]
pub fn pingreq() -> Vec<u8> {
    frame(kind::PINGREQ, &[])
}

/// DISCONNECT without duration.
#[must_use]
pub fn disconnect() -> Vec<u8> {
    frame(kind::DISCONNECT, &[])
}

/// SEARCHGW with radius 0.
#[must_use]
pub fn searchgw() -> Vec<u8> {
    frame(kind::SEARCHGW, &[0])
}

/// Type and body of a datagram, if it is framed correctly.
#[must_use]
pub fn parse(d: &[u8]) -> Option<(u8, &[u8])> {
    let (len, head) = match d.first()? {
        1 => (usize::from(u16::from_be_bytes([*d.get(1)?, *d.get(2)?])), 3),
        &n => (usize::from(n), 1),
    };
    let t = *d.get(head)?;
    let body = d.get(head + 1..len)?;
    Some((t, body))
}

/// Big-endian u16 at `at` of `b`.
#[must_use]
pub fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Bytes of the benchmark payload header: client index (u32), sequence (u64), send time (u64,
/// nanoseconds since the harness epoch), big-endian. The rest is padding.
pub const STAMP_LEN: usize = 20;

/// Writes a payload of `len` bytes (at least [`STAMP_LEN`]) into `out`.
pub fn stamp_into(out: &mut Vec<u8>, client: u32, seq: u64, sent_ns: u64, len: usize) {
    out.extend_from_slice(&client.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&sent_ns.to_be_bytes());
    out.resize(out.len() + len.saturating_sub(STAMP_LEN), b'x');
}

/// (client, seq, sent_ns) of a benchmark payload.
#[must_use]
pub fn read_stamp(p: &[u8]) -> Option<(u32, u64, u64)> {
    let client = u32::from_be_bytes(p.get(0..4)?.try_into().ok()?);
    let seq = u64::from_be_bytes(p.get(4..12)?.try_into().ok()?);
    let sent = u64::from_be_bytes(p.get(12..20)?.try_into().ok()?);
    Some((client, seq, sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_in_both_length_forms() {
        let mut out = Vec::new();
        publish_into(&mut out, qos_flags(1), [0, 7], 9, &[1; 10]);
        let (t, body) = parse(&out).unwrap();
        assert_eq!((t, body.len(), be16(body, 3)), (kind::PUBLISH, 15, Some(9)));
        let mut long = Vec::new();
        publish_into(&mut long, 0, [0, 1], 1, &[2; 300]);
        assert_eq!(long.first(), Some(&1));
        assert_eq!(parse(&long).map(|(_, b)| b.len()), Some(305));
        assert_eq!(parse(&[5, 4, 0]), None, "truncated");
    }

    #[test]
    fn stamps_round_trip() {
        let mut p = Vec::new();
        stamp_into(&mut p, 3, 42, 1_000, 32);
        assert_eq!(p.len(), 32);
        assert_eq!(read_stamp(&p), Some((3, 42, 1_000)));
        assert_eq!(read_stamp(&p[..10]), None);
    }
}
