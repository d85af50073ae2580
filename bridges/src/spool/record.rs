//! The on-disk byte layout of segments and records. All integers are little-endian.
//!
//! ```text
//! segment file  = header record*
//! header        = magic "SGSPOOL\0" (8) | version u32 (= 1) | reserved u32 (= 0)     16 bytes
//! record        = len u32 | crc u32 | seq u64 | body                                16 + len
//!   len         = length of body (>= BODY_FIXED)
//!   crc         = CRC-32 (IEEE) of the seq bytes followed by the body
//!   seq         = the record's sequence id, strictly increasing through the spool
//! body          = flags u8 | time_ms u64 | topic_len u16 | topic | payload
//!   flags       = bits 0-1 QoS (0, 1, 2), bit 2 retain, other bits 0
//!   time_ms     = wall-clock time of the append, milliseconds since the Unix epoch
//!   topic       = UTF-8, topic_len bytes;  payload = the rest of the body
//! ```
//!
//! Decoding never panics: every length is checked against the bytes at hand, and anything
//! that does not parse is reported as [`Parse::Invalid`] (corruption, or a torn write).

use bytes::{Buf, BufMut, Bytes};

use crate::message::Qos;

/// The segment file magic.
pub(crate) const MAGIC: &[u8; 8] = b"SGSPOOL\0";
/// The format version written and understood.
pub(crate) const VERSION: u32 = 1;
/// Bytes of the segment header.
pub(crate) const SEGMENT_HEADER: u64 = 16;
/// Bytes of the record header (len, crc, seq).
pub const RECORD_HEADER: usize = 16;
/// Bytes of the body before the topic.
pub(crate) const BODY_FIXED: usize = 1 + 8 + 2;
/// Largest body accepted when decoding: guards against a corrupt length making a reader
/// allocate or skip gigabytes.
pub(crate) const MAX_BODY: usize = 16 * 1024 * 1024;

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
    h
}

/// Whether `bytes` start with a valid segment header.
pub(crate) fn valid_segment_header(bytes: &[u8]) -> bool {
    bytes.len() >= SEGMENT_HEADER as usize
        && bytes.get(..8) == Some(MAGIC.as_slice())
        && bytes.get(8..12) == Some(VERSION.to_le_bytes().as_slice())
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
    let start = out.len();
    out.reserve(RECORD_HEADER + body_len);
    out.put_u32_le(u32::try_from(body_len).unwrap_or(u32::MAX));
    out.put_u32_le(0); // CRC, filled in below.
    out.put_u64_le(seq);
    out.put_u8(qos_bits(qos) | if retain { 4 } else { 0 });
    out.put_u64_le(time_ms);
    out.put_u16_le(u16::try_from(topic.len()).unwrap_or(u16::MAX));
    out.put_slice(topic.as_bytes());
    out.put_slice(payload);
    let crc = crc32fast::hash(out.get(start + 8..).unwrap_or_default());
    if let Some(slot) = out.get_mut(start + 4..start + 8) {
        slot.copy_from_slice(&crc.to_le_bytes());
    }
}

/// The result of parsing the bytes at one offset.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parse {
    /// A valid record of `len` bytes.
    Record(Record, usize),
    /// The bytes end inside the record: more may follow (a reader at the written end), or the
    /// write was torn (recovery).
    Incomplete,
    /// The bytes do not form a valid record. `skip` is the record length the header claims,
    /// if it is plausible: a reader may try to resynchronise after it.
    Invalid {
        /// Bytes the (possibly corrupt) header says the record takes.
        skip: Option<usize>,
    },
}

/// Parses one record at the start of `bytes`.
pub(crate) fn parse(bytes: &[u8]) -> Parse {
    let Some(mut header) = bytes.get(..RECORD_HEADER) else {
        return Parse::Incomplete;
    };
    let len = header.get_u32_le() as usize;
    let crc = header.get_u32_le();
    let seq = header.get_u64_le();
    if !(BODY_FIXED..=MAX_BODY).contains(&len) {
        return Parse::Invalid { skip: None };
    }
    let total = RECORD_HEADER + len;
    let Some(covered) = bytes.get(8..total) else {
        return Parse::Incomplete;
    };
    if crc32fast::hash(covered) != crc {
        return Parse::Invalid { skip: Some(total) };
    }
    let Some(mut body) = bytes.get(RECORD_HEADER..total) else {
        return Parse::Incomplete;
    };
    let flags = body.get_u8();
    let time_ms = body.get_u64_le();
    let topic_len = usize::from(body.get_u16_le());
    let qos = match flags {
        f if f & !7 != 0 => return Parse::Invalid { skip: Some(total) },
        f => match f & 3 {
            0 => Qos::AtMostOnce,
            1 => Qos::AtLeastOnce,
            2 => Qos::ExactlyOnce,
            _ => return Parse::Invalid { skip: Some(total) },
        },
    };
    let (Some(topic), Some(payload)) = (body.get(..topic_len), body.get(topic_len..)) else {
        return Parse::Invalid { skip: Some(total) };
    };
    let Ok(topic) = std::str::from_utf8(topic) else {
        return Parse::Invalid { skip: Some(total) };
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_is_fixed() {
        let mut out = Vec::new();
        encode(&mut out, 0x0102, 7, Qos::AtLeastOnce, true, "a/b", b"xy");
        assert_eq!(out.len(), encoded_len("a/b", b"xy"));
        assert_eq!(&out[0..4], &(11u32 + 3 + 2).to_le_bytes());
        assert_eq!(&out[8..16], &0x0102u64.to_le_bytes());
        assert_eq!(out[16], 1 | 4);
        assert_eq!(&out[17..25], &7u64.to_le_bytes());
        assert_eq!(&out[25..27], &3u16.to_le_bytes());
        assert_eq!(&out[27..30], b"a/b");
        assert_eq!(&out[30..], b"xy");
    }

    #[test]
    fn a_flipped_bit_is_invalid_and_a_short_read_incomplete() {
        let mut out = Vec::new();
        encode(&mut out, 9, 1, Qos::AtMostOnce, false, "t", b"payload");
        for i in 8..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 0x10;
            assert!(
                matches!(parse(&bad), Parse::Invalid { .. }),
                "bit flip at {i}"
            );
        }
        for cut in 0..out.len() {
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
