//! The on-disk byte layout of segments and records, format version [`VERSION`]. All integers
//! are little-endian. **Do not reorder, resize or reinterpret any field**: files written by one
//! build are read by the next; a layout change needs a new [`VERSION`] (and a decision on the
//! files of the old one, see below).
//!
//! ```text
//! segment file  = header record*            named <first_seq, 20 decimal digits>.seg
//! header        = magic "SGSPOOL\0" (8) | version u32 | hcrc u32                 16 bytes
//!   hcrc        = CRC-32 (IEEE) of magic and version
//! record        = sync u32 | len u32 | seq u64 | hcrc u32 | crc u32 | body      24 + len
//!   sync        = RECORD_SYNC, the same in every record: where a record may start
//!   len         = length of body (BODY_FIXED ..= MAX_BODY)
//!   seq         = the record's sequence id; within one segment the first record has the
//!                 file name's first_seq and each next one the previous id + 1
//!   hcrc        = CRC-32 (IEEE) of sync, len and seq: a damaged length is detected before
//!                 it is used
//!   crc         = CRC-32 (IEEE) of the body
//! body          = flags u8 | time_ms u64 | topic_len u16 | topic | [origin] | payload
//!   flags       = bits 0-1 QoS (0, 1, 2), bit 2 retain, bit 3 origin present, other bits 0
//!   time_ms     = wall-clock time of the append, milliseconds since the Unix epoch
//!   topic       = UTF-8, topic_len bytes;  payload = the rest of the body
//! origin        = protocol u8 | client_id_len u8 | client_id | peer_len u8 | peer
//!   protocol    = `Protocol::code` (unknown codes read as `internal`)
//!   client_id, peer = UTF-8, at most MAX_ORIGIN_FIELD (255) bytes each; length 0 = absent
//! ```
//!
//! Version 3 (this one) added the origin: every record written by it has flags bit 3 set and
//! carries the origin. Version 2 (the same without the origin; bit 3 never set) is still
//! read: its records get `Origin::default()` (protocol `internal`, no client id, no peer).
//! A record says by itself whether it carries an origin, so decoding does not depend on the
//! segment's version: a version 2 segment is read as it is (never rewritten), new records go
//! to new version 3 segments, and a damaged segment header is rewritten as the current
//! version whatever its records are. A build that reads only version 2 refuses a version 3
//! segment at start (a different version behind a valid header), deleting nothing.
//!
//! Origin strings longer than [`MAX_ORIGIN_FIELD`] bytes are cut at the last character
//! boundary within it when written; an empty string is stored as absent.
//!
//! The record header is the framing all durable logs share, `crate::durable::frame`.
//!
//! Resynchronisation (why the record header looks like this): a reader trusts a record's
//! `len` only when the header CRC checks. A record whose header checks but whose body does not
//! is skipped by its length; a record whose header does not check is skipped by searching
//! forward, byte by byte, for the next offset with the sync word, a header CRC that checks
//! and a plausible sequence id (see `log.rs`). A false match in random bytes needs 64 bits to
//! agree by chance (sync word and header CRC), and the sequence id to fall in a narrow window.
//! So one damaged byte anywhere costs at most the record that holds it; a damaged segment
//! header costs nothing (its only field, the version, is rechecked and rewritten; the first
//! sequence id is in the file name).
//!
//! Version 1 (`len | crc | seq | body`, no sync word, a header without CRC) was never
//! released; a version 1 file (or any version but 2 and [`VERSION`] behind a valid header)
//! is refused at start with an error naming it, never deleted.
//!
//! Decoding never panics: every length is checked against the bytes at hand, and anything
//! that does not parse is reported as [`Parse::Invalid`] (corruption, or a torn write).

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};

use crate::durable::frame::{self, Frame};
use crate::message::{Message, Origin, Protocol, Qos};

/// The segment file magic.
pub(crate) const MAGIC: &[u8; 8] = b"SGSPOOL\0";
/// The format version written (and the newest understood).
pub(crate) const VERSION: u32 = 3;
/// The oldest format version still read.
pub(crate) const OLDEST_READ: u32 = 2;
/// Most bytes of an origin's client id, and of its peer, in a record (longer ones are cut
/// at a character boundary).
pub const MAX_ORIGIN_FIELD: usize = 255;
/// Flags bit: the record carries an origin (format version 3).
const HAS_ORIGIN: u8 = 8;
/// Bytes of the segment header.
pub(crate) const SEGMENT_HEADER: u64 = 16;
/// The word every record starts with ([`frame::SYNC`]).
#[cfg(test)]
pub(crate) const RECORD_SYNC: [u8; 4] = frame::SYNC;
/// Bytes of the record header (sync, len, seq, hcrc, crc): [`frame::HEADER_LEN`].
pub const RECORD_HEADER: usize = frame::HEADER_LEN;
/// Bytes of the body before the topic.
pub(crate) const BODY_FIXED: usize = 1 + 8 + 2;
/// Bytes of an origin besides its strings.
const ORIGIN_FIXED: usize = 3;
/// Largest body accepted when decoding: guards against a corrupt length making a reader
/// allocate or skip gigabytes.
pub(crate) const MAX_BODY: usize = 16 * 1024 * 1024;
/// The body lengths a record header may carry.
pub(crate) const LIMITS: frame::Limits = frame::Limits {
    min_body: BODY_FIXED,
    max_body: MAX_BODY,
};

/// A record read back from the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence id; also the message's id upstream.
    pub seq: u64,
    /// Wall-clock time of the append, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// QoS toward the upstream.
    pub qos: Qos,
    /// Retain flag.
    pub retain: bool,
    /// Topic relative to the upstream.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// Where the message came from (`Origin::default()` for a version 2 record), its strings
    /// bounded by [`MAX_ORIGIN_FIELD`].
    pub origin: Origin,
}

impl Record {
    /// Bytes this record takes when written now (format [`VERSION`]).
    #[must_use]
    pub fn disk_len(&self) -> usize {
        encoded_len(&self.topic, &self.payload, &self.origin)
    }
}

/// Bytes a record for `topic`, `payload` and `origin` takes on disk (format [`VERSION`]).
#[must_use]
pub fn encoded_len(topic: &str, payload: &[u8], origin: &Origin) -> usize {
    RECORD_HEADER
        + BODY_FIXED
        + topic.len()
        + ORIGIN_FIXED
        + bounded(origin.client_id.as_deref()).len()
        + bounded(origin.peer.as_deref()).len()
        + payload.len()
}

/// An origin string as stored: absent as empty, cut to [`MAX_ORIGIN_FIELD`] bytes at the
/// last character boundary within it.
fn bounded(s: Option<&str>) -> &str {
    let s = s.unwrap_or_default();
    let mut end = s.len().min(MAX_ORIGIN_FIELD);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// The segment header bytes.
pub(crate) fn segment_header() -> [u8; SEGMENT_HEADER as usize] {
    let mut h = [0u8; SEGMENT_HEADER as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    let crc = crc32fast::hash(&h[..12]);
    h[12..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// What a segment file's first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SegmentHeader {
    /// A valid header of a version read ([`OLDEST_READ`] to [`VERSION`]; a record says by
    /// itself which layout it has).
    Current,
    /// A valid header of another version (a version 1 header has no CRC and is recognised
    /// by its exact bytes).
    Other(u32),
    /// Not a valid header: damaged (or too short).
    Damaged,
}

/// Checks the segment header at the start of `bytes`.
pub(crate) fn segment_header_kind(bytes: &[u8]) -> SegmentHeader {
    let Some(mut h) = bytes.get(..SEGMENT_HEADER as usize) else {
        return SegmentHeader::Damaged;
    };
    if h.get(..8) != Some(MAGIC.as_slice()) {
        return SegmentHeader::Damaged;
    }
    let covered = crc32fast::hash(h.get(..12).unwrap_or_default());
    h.advance(8);
    let version = h.get_u32_le();
    let last = h.get_u32_le();
    match (version, last) {
        (OLDEST_READ..=VERSION, crc) if crc == covered => SegmentHeader::Current,
        (1, 0) => SegmentHeader::Other(1),
        (v, crc) if crc == covered => SegmentHeader::Other(v),
        _ => SegmentHeader::Damaged,
    }
}

fn qos_bits(qos: Qos) -> u8 {
    match qos {
        Qos::AtMostOnce => 0,
        Qos::AtLeastOnce => 1,
        Qos::ExactlyOnce => 2,
    }
}

/// Appends the encoding of one record of `msg` (format [`VERSION`]) to `out`. The topic must
/// be shorter than 64 KiB (MQTT topics are); longer ones are refused by the caller. The
/// origin's strings are cut to [`MAX_ORIGIN_FIELD`] bytes.
pub(crate) fn encode(out: &mut Vec<u8>, seq: u64, time_ms: u64, msg: &Message) {
    encode_as(out, seq, time_ms, msg, true);
}

/// Appends a record in format version 2 (without the origin): what older builds wrote, for
/// the tests and the fuzz target that read such records.
pub(crate) fn encode_v2(out: &mut Vec<u8>, seq: u64, time_ms: u64, msg: &Message) {
    encode_as(out, seq, time_ms, msg, false);
}

fn encode_as(out: &mut Vec<u8>, seq: u64, time_ms: u64, msg: &Message, with_origin: bool) {
    let client_id = bounded(msg.origin.client_id.as_deref());
    let peer = bounded(msg.origin.peer.as_deref());
    let origin_len = if with_origin {
        ORIGIN_FIXED + client_id.len() + peer.len()
    } else {
        0
    };
    let body_len = BODY_FIXED + msg.topic.len() + origin_len + msg.payload.len();
    out.reserve(RECORD_HEADER + body_len);
    let start = frame::begin(out, seq);
    let origin_flag = if with_origin { HAS_ORIGIN } else { 0 };
    out.put_u8(qos_bits(msg.qos) | if msg.retain { 4 } else { 0 } | origin_flag);
    out.put_u64_le(time_ms);
    out.put_u16_le(u16::try_from(msg.topic.len()).unwrap_or(u16::MAX));
    out.put_slice(msg.topic.as_bytes());
    if with_origin {
        out.put_u8(msg.origin.protocol.code());
        // In range: `bounded` cuts both to MAX_ORIGIN_FIELD (255) bytes.
        out.put_u8(u8::try_from(client_id.len()).unwrap_or(u8::MAX));
        out.put_slice(client_id.as_bytes());
        out.put_u8(u8::try_from(peer.len()).unwrap_or(u8::MAX));
        out.put_slice(peer.as_bytes());
    }
    out.put_slice(&msg.payload);
    frame::finish(out, start);
}

/// Checks the record header at the start of `bytes` ([`frame::header`]).
pub(crate) fn header(bytes: &[u8]) -> Option<frame::Header> {
    frame::header(bytes, LIMITS)
}

/// The result of parsing the bytes at one offset.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parse {
    /// A valid record of `len` bytes.
    Record(Record, usize),
    /// The bytes end inside the header, or inside a record whose header checks: more may
    /// follow (a reader at the written end), or the write was torn (recovery).
    Incomplete,
    /// The bytes do not form a valid record. `skip` is the record length when the header
    /// checks (only the body is damaged): the next record starts there. Otherwise the
    /// header is damaged and its length must not be trusted.
    Invalid {
        /// Bytes the record takes, if its header checks.
        skip: Option<usize>,
    },
}

/// Parses one record at the start of `bytes`.
pub(crate) fn parse(bytes: &[u8]) -> Parse {
    let (seq, mut body, total) = match frame::decode(bytes, LIMITS) {
        Frame::Record { seq, body, total } => (seq, body, total),
        Frame::Incomplete => return Parse::Incomplete,
        Frame::Invalid { skip } => return Parse::Invalid { skip },
    };
    let invalid = Parse::Invalid { skip: Some(total) };
    let flags = body.get_u8();
    let time_ms = body.get_u64_le();
    let topic_len = usize::from(body.get_u16_le());
    let qos = match flags {
        f if f & !(7 | HAS_ORIGIN) != 0 => return invalid,
        f => match f & 3 {
            0 => Qos::AtMostOnce,
            1 => Qos::AtLeastOnce,
            2 => Qos::ExactlyOnce,
            _ => return invalid,
        },
    };
    let Some(topic) = body.get(..topic_len) else {
        return invalid;
    };
    let Ok(topic) = std::str::from_utf8(topic) else {
        return invalid;
    };
    body.advance(topic_len);
    let origin = if flags & HAS_ORIGIN == 0 {
        Origin::default()
    } else {
        match parse_origin(&mut body) {
            Some(o) => o,
            None => return invalid,
        }
    };
    let payload = body;
    Parse::Record(
        Record {
            seq,
            time_ms,
            qos,
            retain: flags & 4 != 0,
            topic: topic.to_owned(),
            payload: Bytes::copy_from_slice(payload),
            origin,
        },
        total,
    )
}

/// Reads an origin from the front of `body`; `None` if it does not fit or is not UTF-8.
fn parse_origin(body: &mut &[u8]) -> Option<Origin> {
    let protocol = Protocol::from_code(*body.first()?);
    body.advance(1);
    let client_id = origin_string(body)?;
    let peer = origin_string(body)?;
    Some(Origin {
        protocol,
        client_id,
        peer,
    })
}

/// One length-prefixed origin string (length 0: absent).
fn origin_string(body: &mut &[u8]) -> Option<Option<Arc<str>>> {
    let len = usize::from(*body.first()?);
    let bytes = body.get(1..1 + len)?;
    let s = std::str::from_utf8(bytes).ok()?;
    body.advance(1 + len);
    Some((len > 0).then(|| Arc::from(s)))
}

/// The message a record holds.
pub(crate) fn message_of(r: &Record) -> Message {
    Message {
        topic: r.topic.clone(),
        payload: r.payload.clone(),
        qos: r.qos,
        retain: r.retain,
        origin: r.origin.clone(),
    }
}

/// For the `spool_record` fuzz target, not an API: parses one record at the start of
/// `bytes`; for a valid one returns its encoding made again and the bytes it took.
#[doc(hidden)]
#[must_use]
pub fn fuzz_round_trip(bytes: &[u8]) -> Option<(Vec<u8>, usize)> {
    let Parse::Record(r, len) = parse(bytes) else {
        return None;
    };
    // Made again in the layout it was read in (the flags say which).
    let v3 = bytes
        .get(RECORD_HEADER)
        .is_some_and(|f| f & HAS_ORIGIN != 0);
    let code_at = RECORD_HEADER + BODY_FIXED + r.topic.len();
    if v3 && bytes.get(code_at) != Some(&r.origin.protocol.code()) {
        // An unknown protocol code reads as `internal`: not the same bytes again, by design.
        return None;
    }
    let mut out = Vec::new();
    encode_as(&mut out, r.seq, r.time_ms, &message_of(&r), v3);
    Some((out, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(topic: &str, payload: &[u8], qos: Qos, retain: bool) -> Message {
        Message::new(topic, Bytes::copy_from_slice(payload), qos, retain)
    }

    fn origin(client_id: Option<&str>, peer: Option<&str>) -> Origin {
        Origin {
            protocol: Protocol::MqttSn,
            client_id: client_id.map(Arc::from),
            peer: peer.map(Arc::from),
        }
    }

    #[test]
    fn layout_is_fixed() {
        let mut m = msg("a/b", b"xy", Qos::AtLeastOnce, true);
        m.origin = origin(Some("c1"), Some("udp:p"));
        let mut out = Vec::new();
        encode(&mut out, 0x0102, 7, &m);
        assert_eq!(out.len(), encoded_len("a/b", b"xy", &m.origin));
        assert_eq!(&out[0..4], &RECORD_SYNC);
        assert_eq!(&out[4..8], &(11u32 + 3 + 3 + 2 + 5 + 2).to_le_bytes());
        assert_eq!(&out[8..16], &0x0102u64.to_le_bytes());
        assert_eq!(&out[16..20], &crc32fast::hash(&out[..16]).to_le_bytes());
        assert_eq!(&out[20..24], &crc32fast::hash(&out[24..]).to_le_bytes());
        assert_eq!(out[24], 1 | 4 | 8);
        assert_eq!(&out[25..33], &7u64.to_le_bytes());
        assert_eq!(&out[33..35], &3u16.to_le_bytes());
        assert_eq!(&out[35..38], b"a/b");
        assert_eq!(out[38], 1, "protocol code of mqttsn");
        assert_eq!(out[39], 2);
        assert_eq!(&out[40..42], b"c1");
        assert_eq!(out[42], 5);
        assert_eq!(&out[43..48], b"udp:p");
        assert_eq!(&out[48..], b"xy");
    }

    /// Version 2 bytes, written out by hand: they still read, with the default origin.
    #[test]
    fn a_version_2_record_reads_with_the_default_origin() {
        let mut body = vec![2 | 4];
        body.extend_from_slice(&9u64.to_le_bytes());
        body.extend_from_slice(&1u16.to_le_bytes());
        body.extend_from_slice(b"tpay");
        let mut out = RECORD_SYNC.to_vec();
        out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_le_bytes());
        out.extend_from_slice(&5u64.to_le_bytes());
        let hcrc = crc32fast::hash(&out);
        out.extend_from_slice(&hcrc.to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
        let mut again = Vec::new();
        encode_v2(&mut again, 5, 9, &msg("t", b"pay", Qos::ExactlyOnce, true));
        assert_eq!(again, out, "encode_v2 writes version 2");
        let want = Record {
            seq: 5,
            time_ms: 9,
            qos: Qos::ExactlyOnce,
            retain: true,
            topic: "t".into(),
            payload: Bytes::from_static(b"pay"),
            origin: Origin::default(),
        };
        assert_eq!(parse(&out), Parse::Record(want, out.len()));
        assert_eq!(fuzz_round_trip(&out), Some((out.clone(), out.len())));
    }

    #[test]
    fn long_origin_strings_are_cut_at_a_char_boundary_and_empty_ones_are_absent() {
        // 'é' is two bytes: 127 of them plus one byte make 255; one more 'é' would cross it.
        let long = format!("x{}é", "é".repeat(127));
        assert_eq!(long.len(), 257);
        let mut m = msg("t", b"", Qos::AtMostOnce, false);
        m.origin = origin(Some(&long), Some(""));
        let mut out = Vec::new();
        encode(&mut out, 1, 1, &m);
        assert_eq!(out.len(), encoded_len("t", b"", &m.origin));
        let Parse::Record(r, _) = parse(&out) else {
            panic!("did not parse")
        };
        let cut = r.origin.client_id.expect("client id");
        assert_eq!(cut.len(), 255);
        assert!(long.starts_with(&*cut));
        assert_eq!(r.origin.peer, None);
        let peer = "p".repeat(300);
        m.origin = origin(None, Some(&peer));
        out.clear();
        encode(&mut out, 1, 1, &m);
        let Parse::Record(r, _) = parse(&out) else {
            panic!("did not parse")
        };
        assert_eq!(r.origin.peer.as_deref(), Some(&peer[..255]));
        assert_eq!(r.origin.client_id, None);
    }

    /// Known answers: the CRC is CRC-32/IEEE (crc32fast), and the segment header's bytes.
    #[test]
    fn crc_and_segment_header_known_answers() {
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        let h = segment_header();
        assert_eq!(&h[..12], b"SGSPOOL\0\x03\0\0\0");
        assert_eq!(&h[12..], &crc32fast::hash(&h[..12]).to_le_bytes());
        assert_eq!(segment_header_kind(&h), SegmentHeader::Current);
        let mut v2 = *b"SGSPOOL\0\x02\0\0\0\0\0\0\0";
        let crc = crc32fast::hash(&v2[..12]);
        v2[12..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(segment_header_kind(&v2), SegmentHeader::Current);
        let mut v4 = *b"SGSPOOL\0\x04\0\0\0\0\0\0\0";
        let crc = crc32fast::hash(&v4[..12]);
        v4[12..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(segment_header_kind(&v4), SegmentHeader::Other(4));
        let v1 = *b"SGSPOOL\0\x01\0\0\0\0\0\0\0";
        assert_eq!(segment_header_kind(&v1), SegmentHeader::Other(1));
        for i in 0..h.len() {
            let mut bad = h;
            bad[i] ^= 0x04;
            assert_eq!(
                segment_header_kind(&bad),
                SegmentHeader::Damaged,
                "flip at {i}"
            );
        }
    }

    fn sample(v3: bool) -> Vec<u8> {
        let mut m = msg("t", b"payload", Qos::AtMostOnce, false);
        m.origin = origin(Some("id"), Some("peer"));
        let mut out = Vec::new();
        if v3 {
            encode(&mut out, 9, 1, &m);
        } else {
            encode_v2(&mut out, 9, 1, &m);
        }
        out
    }

    #[test]
    fn a_damaged_header_is_never_trusted_a_damaged_body_is_skipped_by_its_length() {
        for v3 in [false, true] {
            let out = sample(v3);
            for i in 0..out.len() {
                let mut bad = out.clone();
                bad[i] ^= 0x10;
                let want = if i < 20 {
                    Parse::Invalid { skip: None }
                } else {
                    Parse::Invalid {
                        skip: Some(out.len()),
                    }
                };
                assert_eq!(parse(&bad), want, "bit flip at {i}, v3 {v3}");
            }
        }
    }

    #[test]
    fn a_flipped_bit_is_invalid_and_a_short_read_incomplete() {
        for v3 in [false, true] {
            let out = sample(v3);
            for i in 0..out.len() {
                let mut bad = out.clone();
                bad[i] ^= 0x10;
                assert!(
                    matches!(parse(&bad), Parse::Invalid { .. }),
                    "bit flip at {i}"
                );
            }
            for cut in 4..out.len() {
                assert_eq!(parse(&out[..cut]), Parse::Incomplete, "cut at {cut}");
            }
        }
    }

    fn arb_text() -> impl Strategy<Value = Option<Arc<str>>> {
        proptest::option::of("[a-zé:/.0-9]{1,300}".prop_map(|s| Arc::<str>::from(s.as_str())))
    }

    proptest! {
        #[test]
        fn round_trip(seq: u64, time_ms: u64, qos in 0u8..3, retain: bool, code in 0u8..4,
                      client_id in arb_text(), peer in arb_text(),
                      topic in "[a-z/]{0,40}", payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let qos = [Qos::AtMostOnce, Qos::AtLeastOnce, Qos::ExactlyOnce][usize::from(qos)];
            let origin = Origin { protocol: Protocol::from_code(code), client_id, peer };
            let m = Message { topic: topic.clone(), payload: Bytes::from(payload.clone()), qos, retain, origin: origin.clone() };
            let mut out = Vec::new();
            encode(&mut out, seq, time_ms, &m);
            prop_assert_eq!(out.len(), encoded_len(&topic, &payload, &origin));
            let Parse::Record(r, len) = parse(&out) else { panic!("did not parse") };
            prop_assert_eq!(len, out.len());
            let cut = |s: &Option<Arc<str>>| s.as_deref().map(|s| Arc::<str>::from(bounded(Some(s))));
            let want_origin = Origin { protocol: origin.protocol, client_id: cut(&origin.client_id), peer: cut(&origin.peer) };
            prop_assert_eq!(r, Record { seq, time_ms, qos, retain, topic: topic.clone(), payload: Bytes::from(payload.clone()), origin: want_origin });
            prop_assert_eq!(fuzz_round_trip(&out), Some((out.clone(), out.len())));
            // The same message in version 2: everything but the origin.
            let mut old = Vec::new();
            encode_v2(&mut old, seq, time_ms, &m);
            let Parse::Record(r, _) = parse(&old) else { panic!("v2 did not parse") };
            prop_assert_eq!(r.origin, Origin::default());
            prop_assert_eq!(r.topic, topic);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse(&bytes);
            let _ = fuzz_round_trip(&bytes);
        }
    }
}
