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
//! body          = flags u8 | time_ms u64 | topic_len u16 | topic | payload
//!   flags       = bits 0-1 QoS (0, 1, 2), bit 2 retain, other bits 0
//!   time_ms     = wall-clock time of the append, milliseconds since the Unix epoch
//!   topic       = UTF-8, topic_len bytes;  payload = the rest of the body
//! ```
//!
//! The record header is the framing all durable logs share, `crate::durable::frame`.
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
//! released; a version 1 file (or any version but [`VERSION`] behind a valid header) is
//! refused at start with an error naming it, never deleted.
//!
//! Decoding never panics: every length is checked against the bytes at hand, and anything
//! that does not parse is reported as [`Parse::Invalid`] (corruption, or a torn write).

use bytes::{Buf, BufMut, Bytes};

use crate::durable::frame::{self, Frame};
use crate::message::Qos;

/// The segment file magic.
pub(crate) const MAGIC: &[u8; 8] = b"SGSPOOL\0";
/// The format version written and understood.
pub(crate) const VERSION: u32 = 2;
/// Bytes of the segment header.
pub(crate) const SEGMENT_HEADER: u64 = 16;
/// The word every record starts with ([`frame::SYNC`]).
#[cfg(test)]
pub(crate) const RECORD_SYNC: [u8; 4] = frame::SYNC;
/// Bytes of the record header (sync, len, seq, hcrc, crc): [`frame::HEADER_LEN`].
pub const RECORD_HEADER: usize = frame::HEADER_LEN;
/// Bytes of the body before the topic.
pub(crate) const BODY_FIXED: usize = 1 + 8 + 2;
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
}

impl Record {
    /// Bytes this record takes on disk.
    #[must_use]
    pub fn disk_len(&self) -> usize {
        encoded_len(&self.topic, &self.payload)
    }
}

/// Bytes a record for `topic` and `payload` takes on disk.
#[must_use]
pub fn encoded_len(topic: &str, payload: &[u8]) -> usize {
    RECORD_HEADER + BODY_FIXED + topic.len() + payload.len()
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
    /// A valid header of this [`VERSION`].
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
        (VERSION, crc) if crc == covered => SegmentHeader::Current,
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

/// Appends the encoding of one record to `out`. The topic must be shorter than 64 KiB (MQTT
/// topics are); longer ones are refused by the caller.
pub(crate) fn encode(
    out: &mut Vec<u8>,
    seq: u64,
    time_ms: u64,
    qos: Qos,
    retain: bool,
    topic: &str,
    payload: &[u8],
) {
    let body_len = BODY_FIXED + topic.len() + payload.len();
    out.reserve(RECORD_HEADER + body_len);
    let start = frame::begin(out, seq);
    out.put_u8(qos_bits(qos) | if retain { 4 } else { 0 });
    out.put_u64_le(time_ms);
    out.put_u16_le(u16::try_from(topic.len()).unwrap_or(u16::MAX));
    out.put_slice(topic.as_bytes());
    out.put_slice(payload);
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
        f if f & !7 != 0 => return invalid,
        f => match f & 3 {
            0 => Qos::AtMostOnce,
            1 => Qos::AtLeastOnce,
            2 => Qos::ExactlyOnce,
            _ => return invalid,
        },
    };
    let (Some(topic), Some(payload)) = (body.get(..topic_len), body.get(topic_len..)) else {
        return invalid;
    };
    let Ok(topic) = std::str::from_utf8(topic) else {
        return invalid;
    };
    Parse::Record(
        Record {
            seq,
            time_ms,
            qos,
            retain: flags & 4 != 0,
            topic: topic.to_owned(),
            payload: Bytes::copy_from_slice(payload),
        },
        total,
    )
}

/// For the `spool_record` fuzz target, not an API: parses one record at the start of
/// `bytes`; for a valid one returns its encoding made again and the bytes it took.
#[doc(hidden)]
#[must_use]
pub fn fuzz_round_trip(bytes: &[u8]) -> Option<(Vec<u8>, usize)> {
    let Parse::Record(r, len) = parse(bytes) else {
        return None;
    };
    let mut out = Vec::new();
    encode(
        &mut out, r.seq, r.time_ms, r.qos, r.retain, &r.topic, &r.payload,
    );
    Some((out, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_is_fixed() {
        let mut out = Vec::new();
        encode(&mut out, 0x0102, 7, Qos::AtLeastOnce, true, "a/b", b"xy");
        assert_eq!(out.len(), encoded_len("a/b", b"xy"));
        assert_eq!(&out[0..4], &RECORD_SYNC);
        assert_eq!(&out[4..8], &(11u32 + 3 + 2).to_le_bytes());
        assert_eq!(&out[8..16], &0x0102u64.to_le_bytes());
        assert_eq!(&out[16..20], &crc32fast::hash(&out[..16]).to_le_bytes());
        assert_eq!(&out[20..24], &crc32fast::hash(&out[24..]).to_le_bytes());
        assert_eq!(out[24], 1 | 4);
        assert_eq!(&out[25..33], &7u64.to_le_bytes());
        assert_eq!(&out[33..35], &3u16.to_le_bytes());
        assert_eq!(&out[35..38], b"a/b");
        assert_eq!(&out[38..], b"xy");
    }

    /// Known answers: the CRC is CRC-32/IEEE (crc32fast), and the segment header's bytes.
    #[test]
    fn crc_and_segment_header_known_answers() {
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        let h = segment_header();
        assert_eq!(&h[..12], b"SGSPOOL\0\x02\0\0\0");
        assert_eq!(&h[12..], &crc32fast::hash(&h[..12]).to_le_bytes());
        assert_eq!(segment_header_kind(&h), SegmentHeader::Current);
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

    #[test]
    fn a_damaged_header_is_never_trusted_a_damaged_body_is_skipped_by_its_length() {
        let mut out = Vec::new();
        encode(&mut out, 9, 1, Qos::AtMostOnce, false, "t", b"payload");
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
            assert_eq!(parse(&bad), want, "bit flip at {i}");
        }
    }

    #[test]
    fn a_flipped_bit_is_invalid_and_a_short_read_incomplete() {
        let mut out = Vec::new();
        encode(&mut out, 9, 1, Qos::AtMostOnce, false, "t", b"payload");
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

    proptest! {
        #[test]
        fn round_trip(seq: u64, time_ms: u64, qos in 0u8..3, retain: bool,
                      topic in "[a-z/]{0,40}", payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let qos = [Qos::AtMostOnce, Qos::AtLeastOnce, Qos::ExactlyOnce][usize::from(qos)];
            let mut out = Vec::new();
            encode(&mut out, seq, time_ms, qos, retain, &topic, &payload);
            let Parse::Record(r, len) = parse(&out) else { panic!("did not parse") };
            prop_assert_eq!(len, out.len());
            prop_assert_eq!(r, Record { seq, time_ms, qos, retain, topic, payload: Bytes::from(payload) });
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse(&bytes);
        }
    }
}
