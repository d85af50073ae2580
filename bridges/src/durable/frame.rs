//! The record framing every durable log uses (the spool's segments and the gateway's session
//! log): how a record is delimited and checked, how a reader finds the next record after
//! damage, and where a torn tail starts. What a record's body means is the user's business.
//! All integers are little-endian. **Do not reorder, resize or reinterpret any field**: it is
//! the spool's on-disk record header since its format version 2, and the session log's since
//! its version 2.
//!
//! ```text
//! record = sync u32 | len u32 | seq u64 | hcrc u32 | crc u32 | body        HEADER_LEN + len
//!   sync = SYNC, the same in every record: where a record may start
//!   len  = length of body, within the user's `Limits`
//!   seq  = the record's sequence id; consecutive within one file (each record the previous
//!          id + 1), which resynchronisation relies on
//!   hcrc = CRC-32 (IEEE) of sync, len and seq: a damaged length is detected before it is used
//!   crc  = CRC-32 (IEEE) of the body
//! ```
//!
//! Invariants:
//!
//! - Decoding never panics and never trusts a length whose header CRC does not check; every
//!   length is checked against the bytes at hand and against [`Limits`].
//! - A record whose header checks but whose body does not is skipped by its (trusted) length;
//!   after a header that does not check, the next record is the first offset where the sync
//!   word and the header CRC check and the id is plausible ([`plausible`]): a false match in
//!   random bytes needs 64 bits to agree by chance and the id to fall in a narrow window. So
//!   one damaged byte costs at most the record that holds it.
//! - A torn tail (a crash during an append) is what follows the last record from which no
//!   record header that checks can be found: [`scan`] reports it as [`Item::Tail`].

use bytes::{Buf, BufMut};

/// The word every record starts with. Not ASCII and not a small integer, so that it is rare
/// in topics, payloads and lengths.
pub const SYNC: [u8; 4] = [0xD3, 0x5A, 0x9C, 0xE7];

/// Bytes of the record header (sync, len, seq, hcrc, crc).
pub const HEADER_LEN: usize = 24;

/// The body lengths a log accepts: a length outside them is damage, never trusted (so a
/// corrupt length cannot make a reader allocate or skip gigabytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Fewest body bytes of a valid record.
    pub min_body: usize,
    /// Most body bytes of a valid record.
    pub max_body: usize,
}

impl Limits {
    /// Fewest bytes a whole record takes.
    #[must_use]
    pub const fn min_record(&self) -> usize {
        HEADER_LEN + self.min_body
    }
}

/// Starts a record with id `seq` at the end of `out`: writes its header with the length and
/// the CRCs left blank, and returns where the record starts. Append the body to `out`, then
/// call [`finish`] with the returned offset.
pub fn begin(out: &mut Vec<u8>, seq: u64) -> usize {
    let start = out.len();
    out.put_slice(&SYNC);
    out.put_u32_le(0); // Length, filled in by `finish`.
    out.put_u64_le(seq);
    out.put_u32_le(0); // Header CRC, filled in by `finish`.
    out.put_u32_le(0); // Body CRC, filled in by `finish`.
    start
}

/// Completes the record started at `start` by [`begin`]: everything after its header is its
/// body. A body over `u32::MAX` bytes gets a length that no [`Limits`] accepts, so it reads
/// back as damage; callers bound their bodies well below.
pub fn finish(out: &mut [u8], start: usize) {
    let body_start = start + HEADER_LEN;
    let body_len = out.len().saturating_sub(body_start);
    let crc = crc32fast::hash(out.get(body_start..).unwrap_or_default());
    if let Some(slot) = out.get_mut(start + 4..start + 8) {
        slot.copy_from_slice(&u32::try_from(body_len).unwrap_or(u32::MAX).to_le_bytes());
    }
    let hcrc = crc32fast::hash(out.get(start..start + 16).unwrap_or_default());
    if let Some(slot) = out.get_mut(start + 16..start + 20) {
        slot.copy_from_slice(&hcrc.to_le_bytes());
    }
    if let Some(slot) = out.get_mut(start + 20..body_start) {
        slot.copy_from_slice(&crc.to_le_bytes());
    }
}

/// Appends a whole record of id `seq` and `body` to `out`.
pub fn encode(out: &mut Vec<u8>, seq: u64, body: &[u8]) {
    out.reserve(HEADER_LEN + body.len());
    let start = begin(out, seq);
    out.put_slice(body);
    finish(out, start);
}

/// Bytes a record with a body of `body_len` bytes takes.
#[must_use]
pub const fn encoded_len(body_len: usize) -> usize {
    HEADER_LEN + body_len
}

/// A record header whose CRC checks: its length and sequence id can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Bytes of the whole record (header and body).
    pub total: usize,
    /// The record's sequence id.
    pub seq: u64,
}

/// Checks the record header at the start of `bytes`: `None` if the bytes are too short, the
/// sync word or the header CRC does not match, or the length is outside `limits`.
#[must_use]
pub fn header(bytes: &[u8], limits: Limits) -> Option<Header> {
    let mut h = bytes.get(..HEADER_LEN)?;
    if h.get(..4)? != SYNC.as_slice() {
        return None;
    }
    let hcrc = crc32fast::hash(h.get(..16)?);
    h.advance(4);
    let len = h.get_u32_le() as usize;
    let seq = h.get_u64_le();
    if h.get_u32_le() != hcrc || !(limits.min_body..=limits.max_body).contains(&len) {
        return None;
    }
    Some(Header {
        total: HEADER_LEN + len,
        seq,
    })
}

/// What the bytes at one offset hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A record whose header and body CRCs check.
    Record {
        /// Its sequence id.
        seq: u64,
        /// Its body.
        body: &'a [u8],
        /// Bytes the whole record takes.
        total: usize,
    },
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

/// Decodes the record at the start of `bytes`.
#[must_use]
pub fn decode(bytes: &[u8], limits: Limits) -> Frame<'_> {
    if bytes.len() < HEADER_LEN {
        // Too short to judge, unless what is there already differs from a sync word.
        let n = bytes.len().min(4);
        return if bytes.get(..n) == SYNC.get(..n) {
            Frame::Incomplete
        } else {
            Frame::Invalid { skip: None }
        };
    }
    let Some(Header { total, seq }) = header(bytes, limits) else {
        return Frame::Invalid { skip: None };
    };
    let Some(mut fixed) = bytes.get(20..HEADER_LEN) else {
        return Frame::Incomplete;
    };
    let crc = fixed.get_u32_le();
    let Some(body) = bytes.get(HEADER_LEN..total) else {
        return Frame::Incomplete;
    };
    if crc32fast::hash(body) != crc {
        return Frame::Invalid { skip: Some(total) };
    }
    Frame::Record { seq, body, total }
}

/// Whether a record header found at `offset` bytes past a damaged place, with id `seq`, can
/// be the next record of a file whose last good record before the damage had id `base`: its
/// id is above `base` and no further above it than the records that fit in the damaged bytes
/// (ids within a file are consecutive).
#[must_use]
pub fn plausible(seq: u64, base: u64, offset: u64, limits: Limits) -> bool {
    let most = base
        .saturating_add(2)
        .saturating_add(offset / limits.min_record().max(1) as u64);
    seq > base && seq <= most
}

/// Searches `bytes` (which start `distance` bytes after a damaged place) for the first offset
/// where a record header checks and its id is [`plausible`] after `base`. Returns the offset
/// within `bytes` and the id. Only offsets with a whole header within `bytes` are looked at:
/// a caller reading in chunks continues at `bytes.len() - (HEADER_LEN - 1)`.
#[must_use]
pub fn find_next(bytes: &[u8], distance: u64, base: u64, limits: Limits) -> Option<(usize, u64)> {
    let offsets = bytes.len().checked_sub(HEADER_LEN - 1)?;
    (0..offsets).find_map(|i| {
        let rest = bytes.get(i..)?;
        if rest.get(..4) != Some(SYNC.as_slice()) {
            return None;
        }
        let h = header(rest, limits)?;
        plausible(h.seq, base, distance + i as u64, limits).then_some((i, h.seq))
    })
}

/// One step of a [`scan`].
#[derive(Debug, PartialEq, Eq)]
pub enum Item<'a> {
    /// A valid record at `offset`.
    Record {
        /// Where it starts.
        offset: usize,
        /// Its sequence id.
        seq: u64,
        /// Its body.
        body: &'a [u8],
        /// Bytes it takes.
        total: usize,
    },
    /// Damaged bytes from `offset` to `next`, where a record whose header checks starts;
    /// `lost` records (at least one) were in them.
    Damaged {
        /// Where the damage starts.
        offset: usize,
        /// Where the next record starts.
        next: usize,
        /// Records lost (at least one).
        lost: u64,
    },
    /// No record header that checks from `offset` to the end: a torn or damaged tail.
    Tail {
        /// Where the tail starts.
        offset: usize,
    },
}

/// Walks the records of a whole file held in memory, from `start` (after any file header)
/// on; `first_seq` is the id the first record should have. Yields records, damaged places
/// (skipped as the module docs say) and at most one tail, which ends the scan. Work is linear
/// in the bytes (a resynchronisation search never looks at an offset twice).
#[must_use]
pub fn scan(bytes: &[u8], start: usize, first_seq: u64, limits: Limits) -> Scan<'_> {
    Scan {
        bytes,
        at: start,
        base: first_seq.saturating_sub(1),
        limits,
    }
}

/// The iterator of [`scan`].
#[derive(Debug)]
pub struct Scan<'a> {
    bytes: &'a [u8],
    at: usize,
    base: u64,
    limits: Limits,
}

impl<'a> Iterator for Scan<'a> {
    type Item = Item<'a>;

    fn next(&mut self) -> Option<Item<'a>> {
        let at = self.at;
        let rest = self.bytes.get(at..).filter(|r| !r.is_empty())?;
        match decode(rest, self.limits) {
            Frame::Record { seq, body, total } => {
                self.at = at + total;
                self.base = self.base.max(seq);
                return Some(Item::Record {
                    offset: at,
                    seq,
                    body,
                    total,
                });
            }
            Frame::Invalid { skip: Some(total) } => {
                let seq = header(rest, self.limits).map_or(self.base + 1, |h| h.seq);
                self.at = at + total;
                self.base = self.base.max(seq);
                return Some(Item::Damaged {
                    offset: at,
                    next: at + total,
                    lost: 1,
                });
            }
            Frame::Incomplete | Frame::Invalid { skip: None } => {}
        }
        let found = rest
            .get(1..)
            .and_then(|after| find_next(after, 1, self.base, self.limits));
        match found {
            Some((i, seq)) => {
                let next = at + 1 + i;
                let lost = (seq - self.base - 1).max(1);
                self.base = seq - 1;
                self.at = next;
                Some(Item::Damaged {
                    offset: at,
                    next,
                    lost,
                })
            }
            None => {
                self.at = self.bytes.len();
                Some(Item::Tail { offset: at })
            }
        }
    }
}

/// Where the torn tail of a file held in memory starts (the end of its last record or
/// damaged place from which a record can be found), or `None` when there is none.
#[must_use]
pub fn torn_tail(bytes: &[u8], start: usize, first_seq: u64, limits: Limits) -> Option<usize> {
    scan(bytes, start, first_seq, limits).find_map(|item| match item {
        Item::Tail { offset } => Some(offset),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        min_body: 1,
        max_body: 1 << 16,
    };

    #[test]
    fn layout_is_fixed() {
        let mut out = vec![0xAA];
        encode(&mut out, 0x0102, b"xyz");
        let r = &out[1..];
        assert_eq!(r.len(), encoded_len(3));
        assert_eq!(&r[0..4], &SYNC);
        assert_eq!(&r[4..8], &3u32.to_le_bytes());
        assert_eq!(&r[8..16], &0x0102u64.to_le_bytes());
        assert_eq!(&r[16..20], &crc32fast::hash(&r[..16]).to_le_bytes());
        assert_eq!(&r[20..24], &crc32fast::hash(b"xyz").to_le_bytes());
        assert_eq!(&r[24..], b"xyz");
        assert_eq!(
            decode(r, LIMITS),
            Frame::Record {
                seq: 0x0102,
                body: b"xyz",
                total: 27
            }
        );
    }

    #[test]
    fn a_damaged_header_is_never_trusted_a_damaged_body_is_skipped_by_its_length() {
        let mut out = Vec::new();
        encode(&mut out, 9, b"payload");
        for i in 0..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 0x10;
            let want = if i < 20 {
                Frame::Invalid { skip: None }
            } else {
                Frame::Invalid {
                    skip: Some(out.len()),
                }
            };
            assert_eq!(decode(&bad, LIMITS), want, "bit flip at {i}");
        }
        for cut in 4..out.len() {
            assert_eq!(
                decode(&out[..cut], LIMITS),
                Frame::Incomplete,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_length_outside_the_limits_is_damage() {
        let mut out = Vec::new();
        encode(&mut out, 1, b"abc");
        let tight = Limits {
            min_body: 4,
            max_body: 10,
        };
        assert_eq!(decode(&out, tight), Frame::Invalid { skip: None });
    }

    /// Records 1..=5; the third damaged in `how`; then a torn half record.
    fn damaged_file(flip: usize) -> (Vec<u8>, Vec<usize>) {
        let mut out = Vec::new();
        let mut starts = Vec::new();
        for seq in 1..=5u64 {
            starts.push(out.len());
            encode(&mut out, seq, &[seq as u8; 30]);
        }
        out[starts[2] + flip] ^= 0x40;
        let torn = out.len();
        encode(&mut out, 6, &[6; 30]);
        out.truncate(torn + 20);
        (out, starts)
    }

    #[test]
    fn scan_skips_the_damaged_record_and_finds_the_torn_tail() {
        for flip in [0, 5, 10, 17, 22, 40] {
            let (file, starts) = damaged_file(flip);
            let items: Vec<_> = scan(&file, 0, 1, LIMITS).collect();
            let seqs: Vec<u64> = items
                .iter()
                .filter_map(|i| match i {
                    Item::Record { seq, .. } => Some(*seq),
                    _ => None,
                })
                .collect();
            assert_eq!(seqs, [1, 2, 4, 5], "flip at {flip}");
            assert!(
                items.contains(&Item::Damaged {
                    offset: starts[2],
                    next: starts[3],
                    lost: 1
                }),
                "flip at {flip}: {items:?}"
            );
            assert_eq!(
                torn_tail(&file, 0, 1, LIMITS),
                Some(file.len() - 20),
                "flip at {flip}"
            );
        }
    }

    #[test]
    fn a_clean_file_has_no_tail() {
        let mut out = b"HDR".to_vec();
        encode(&mut out, 7, b"a");
        encode(&mut out, 8, b"b");
        assert_eq!(torn_tail(&out, 3, 7, LIMITS), None);
        assert_eq!(scan(&out, 3, 7, LIMITS).count(), 2);
    }

    proptest! {
        #[test]
        fn round_trip(seq: u64, body in proptest::collection::vec(any::<u8>(), 1..300)) {
            let mut out = Vec::new();
            encode(&mut out, seq, &body);
            prop_assert_eq!(decode(&out, LIMITS), Frame::Record { seq, body: &body, total: out.len() });
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300),
                                       start in 0usize..310, first: u64) {
            let _ = decode(&bytes, LIMITS);
            let _ = scan(&bytes, start, first, LIMITS).count();
        }
    }
}
