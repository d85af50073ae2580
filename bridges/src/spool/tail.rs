//! The spool's tail in memory: the newest records written, kept so that a drain that has
//! caught up takes what was just appended from memory instead of reading it back from disk
//! (the fast path for live traffic). The disk stays the record of truth; this is a cache of
//! its newest part, and a reader moves between the two without a gap or a duplicate.
//!
//! Invariants (the model test `live_reads_match_disk_reads` in `tests.rs` checks them against
//! reads from disk on the same spool):
//!
//! - **Complete from `from` on**: every record written to the OS (below a segment's written
//!   end) with a sequence id `>= from` is here, in log order, with the segment and the byte
//!   offset where it ends. Records are added only once their write succeeded; ids lost to a
//!   failed write are in neither place.
//! - **Same answers as the disk**: a read served from here returns the records a read from
//!   disk at the same position would (ids, contents, expiry), and leaves the reader at the
//!   same position (segment, offset, next id), so the next read may come from either.
//! - **Bounded**: at most `max_bytes` (records' encoded size plus a fixed overhead each);
//!   the oldest go first. Records of a segment the spool deletes are dropped with it.

use std::collections::VecDeque;

use super::record::Record;

/// Memory counted per record besides its encoded size (the entry, the allocations' headers).
const ENTRY_OVERHEAD: usize = 96;

/// One record of the tail and where it ends on disk.
#[derive(Debug)]
struct Entry {
    record: Record,
    /// The first sequence id of its segment (the segment's name).
    segment: u64,
    /// The byte offset just after it in that segment.
    end: u64,
    /// Bytes counted for it.
    cost: usize,
}

/// The newest records, for readers at the written end. See the module docs.
#[derive(Debug)]
pub(crate) struct Tail {
    entries: VecDeque<Entry>,
    /// Every written record with an id at or above this is in `entries`.
    from: u64,
    bytes: usize,
    max_bytes: usize,
}

/// Where a read from the tail left its reader: the next id, and the segment, offset and id
/// of the last record passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TailPos {
    pub next_seq: u64,
    pub segment: u64,
    pub end: u64,
    pub seq: u64,
}

impl Tail {
    /// An empty tail holding at most `max_bytes`, complete from `next_seq` (the first id the
    /// spool will write); `max_bytes` 0 keeps nothing.
    pub(crate) fn new(max_bytes: u64, next_seq: u64) -> Self {
        Self {
            entries: VecDeque::new(),
            from: next_seq,
            bytes: 0,
            max_bytes: usize::try_from(max_bytes).unwrap_or(usize::MAX),
        }
    }

    /// Whether the tail keeps anything.
    pub(crate) fn enabled(&self) -> bool {
        self.max_bytes > 0
    }

    /// A record written to the OS, ending at `end` in segment `segment`, `len` bytes on
    /// disk. Ids must increase.
    pub(crate) fn push(&mut self, record: Record, segment: u64, end: u64, len: usize) {
        if !self.enabled() {
            self.from = record.seq + 1;
            return;
        }
        let cost = len + ENTRY_OVERHEAD;
        self.bytes += cost;
        self.entries.push_back(Entry {
            record,
            segment,
            end,
            cost,
        });
        while self.bytes > self.max_bytes {
            if !self.pop_front() {
                break;
            }
        }
    }

    /// Drops the oldest record; false when empty.
    fn pop_front(&mut self) -> bool {
        let Some(e) = self.entries.pop_front() else {
            return false;
        };
        self.bytes = self.bytes.saturating_sub(e.cost);
        self.from = self.from.max(e.record.seq + 1);
        true
    }

    /// The spool deleted the segments holding every id up to `last`: their records go too.
    pub(crate) fn forget_through(&mut self, last: u64) {
        while self.entries.front().is_some_and(|e| e.record.seq <= last) {
            self.pop_front();
        }
        self.from = self.from.max(last + 1);
    }

    /// Whether a reader whose next id is `next_seq` can be served from here.
    pub(crate) fn covers(&self, next_seq: u64) -> bool {
        self.enabled() && next_seq >= self.from
    }

    /// The time (wall-clock ms) of the first record at or after `seq`, if the tail holds it
    /// (call only when [`Self::covers`] `seq`).
    pub(crate) fn time_from(&self, seq: u64) -> Option<u64> {
        let start = self.entries.partition_point(|e| e.record.seq < seq);
        self.entries.get(start).map(|e| e.record.time_ms)
    }

    /// Reads up to `max` records from `next_seq` on into `out`, skipping (and counting in the
    /// result's second part) those older than `max_age_ms` at `now_ms`, as a read from disk
    /// does. Returns where the reader is after the last record passed (`None` if it passed
    /// none) and the records skipped as expired. Call only when [`Self::covers`].
    pub(crate) fn read(
        &self,
        next_seq: u64,
        max: usize,
        now_ms: u64,
        max_age_ms: Option<u64>,
        out: &mut Vec<Record>,
    ) -> (Option<TailPos>, u64) {
        let start = self.entries.partition_point(|e| e.record.seq < next_seq);
        let mut pos = None;
        let mut expired = 0;
        let mut taken = 0;
        for e in self.entries.range(start..) {
            if taken >= max {
                break;
            }
            pos = Some(TailPos {
                next_seq: e.record.seq + 1,
                segment: e.segment,
                end: e.end,
                seq: e.record.seq,
            });
            if max_age_ms.is_some_and(|m| now_ms.saturating_sub(e.record.time_ms) > m) {
                expired += 1;
                continue;
            }
            out.push(e.record.clone());
            taken += 1;
        }
        (pos, expired)
    }
}
