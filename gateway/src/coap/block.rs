//! Block-wise transfer state (RFC 7959): Block1 request-body reassembly and the Block2
//! response-body cache. Sans-IO tables: time is passed in, nothing here reads a clock, sends or
//! logs; the core maps each verdict to its response and drives [`Reassembly::expire`] /
//! [`Block2Cache::expire`] from its timer at their `next_deadline()`.
//!
//! # Block1 (uploads)
//!
//! Atomic (RFC 7959 §2.5, the server's choice): the body is reassembled here and published once,
//! on the final block's exchange. Per key (the core's choice; the plan uses peer + path +
//! queries) at most one transfer; the first matching row decides:
//!
//! ```text
//! block (NUM, M, SZX), payload           verdict                          answer
//! -------------------------------------  -------------------------------  -------------------
//! Size1 or NUM*size + len > max_body     TooLarge, transfer dropped       4.13 + Size1
//! M=1 and len != size, or len > size     BadRequest, transfer dropped     4.00
//! NUM=0, M=0                             Complete (no table entry)        2.04, Block1 echo
//! NUM=0, M=1                             (re)start; Continue or Busy      2.31 / 5.03
//! NUM>0, no transfer                     Incomplete                       4.08
//! NUM*size == received                   append; Continue / Complete      2.31 / 2.04
//!                                        (or Busy: budget, dropped)       5.03
//! M=1, NUM*size + len <= received        Duplicate (nothing appended)     2.31 again
//! anything else (gap, overlap, short)    Incomplete, transfer dropped     4.08
//! ```
//!
//! "size" is the block's own SZX, so a client may switch to a smaller size mid-transfer (late
//! negotiation: the 2.31 echo carries SZX = min(client's, preferred), RFC 7959 §2.3, and the
//! client's next NUM counts in the new size). A non-final block whose payload is not exactly one
//! block breaks RFC 7959 §2.2 ("MUST match ... if the M bit is set"): the request is malformed,
//! hence 4.00 rather than 4.08 (nothing is missing; the client sent something it must not).
//!
//! Invariants:
//! - memory grows with received bytes only: a buffer is allocated when its first block arrives
//!   and grows (at most doubling, never beyond `max_body_size`) only to take a received block;
//!   Size1 never reserves anything;
//! - [`Reassembly::bytes`] (the sum of the buffers' capacities) never exceeds `budget_bytes`,
//!   and the number of transfers never exceeds `max_transfers`;
//! - a transfer idle for `lifetime` is gone: expired by [`Reassembly::expire`], and treated as
//!   absent by [`Reassembly::offer`] even before `expire` runs;
//! - no input panics: offsets are computed in `u64` (NUM < 2^20, size <= 1024).
//!
//! # Block2 (large responses)
//!
//! [`Block2Cache`] keeps a body (`Bytes`: shared with the message it came from, never copied)
//! per key for `lifetime` after insertion, at most `max_bodies` of them (inserting beyond evicts
//! the oldest), each tagged with a 4-byte ETag from a counter so a client can tell a newer body
//! from the one it started fetching. [`block2_slice`] cuts one block out of a body.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::msg::Block;

/// Bounds of a [`Reassembly`] table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Concurrent transfers (a new transfer beyond it is [`Block1Verdict::Busy`]).
    pub max_transfers: usize,
    /// Largest reassembled body (`[coap] max_body_size`).
    pub max_body_size: usize,
    /// Sum of all reassembly buffers (`[coap] reassembly_bytes`).
    pub budget_bytes: usize,
    /// Idle time after which a transfer is dropped (`[coap] block_lifetime`).
    pub lifetime: Duration,
}

/// What to answer a Block1 request block with (see the module table).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block1Verdict {
    /// More blocks expected: 2.31 Continue with Block1 `echo` (the block's NUM, M=1, SZX =
    /// min(client's, preferred)).
    Continue {
        /// The Block1 option of the 2.31.
        echo: Block,
    },
    /// The final block (M=0) completed the body: publish it, then answer (2.04) with Block1
    /// `echo` (the block's NUM and SZX, M=0). The transfer is gone.
    Complete {
        /// The whole request body.
        body: Bytes,
        /// The Block1 option of the final answer.
        echo: Block,
    },
    /// A block already held, resent under a new Message ID: 2.31 again, nothing appended.
    Duplicate {
        /// The Block1 option of the 2.31 (as for `Continue`).
        echo: Block,
    },
    /// 4.08 Request Entity Incomplete: a gap, an overlap, or NUM > 0 with no transfer (never
    /// started, expired, dropped, or already complete). Any transfer for the key is dropped.
    Incomplete,
    /// 4.00 Bad Request: a block with M=1 whose payload is not exactly its size, or a payload
    /// larger than its block size (RFC 7959 §2.2). Any transfer for the key is dropped.
    BadRequest,
    /// 4.13 Request Entity Too Large with Size1 = `limit` (RFC 7959 §2.9.3): Size1 or the body
    /// goes beyond `max_body_size`. Any transfer for the key is dropped.
    TooLarge {
        /// `max_body_size`, for the Size1 option.
        limit: usize,
    },
    /// 5.03 Service Unavailable (+ Max-Age): `max_transfers` reached by a new transfer, or this
    /// block would take the buffers beyond `budget_bytes`. The key's transfer, if any, is
    /// dropped (its memory goes back to the others; the client restarts from NUM 0).
    Busy,
}

/// One transfer in progress.
#[derive(Debug)]
struct Transfer {
    /// The body received so far; its capacity is what the budget counts.
    body: Vec<u8>,
    /// Idle deadline (last block + lifetime); also its key in the deadline index.
    deadline: Instant,
    /// Tie-breaker in the deadline index (unique per table).
    id: u64,
}

/// Block1 reassembly buffers, keyed by `K` (see the module doc).
#[derive(Debug)]
pub struct Reassembly<K> {
    /// Bounds in force ([`Reassembly::set_limits`]).
    limits: Limits,
    /// The largest of each bound ever in force: what transfers taken under an earlier, higher
    /// one may still hold ([`Reassembly::check_invariants`]).
    ceiling: Limits,
    /// Transfers in progress.
    transfers: HashMap<K, Transfer>,
    /// The same transfers ordered by deadline: expiry without a scan.
    by_deadline: BTreeMap<(Instant, u64), K>,
    /// Sum of the buffers' capacities.
    bytes: usize,
    /// Next [`Transfer::id`].
    next_id: u64,
}

impl<K: Hash + Eq + Clone> Reassembly<K> {
    /// An empty table.
    #[must_use]
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            ceiling: limits,
            transfers: HashMap::new(),
            by_deadline: BTreeMap::new(),
            bytes: 0,
            next_id: 0,
        }
    }

    /// The bounds in force.
    #[must_use]
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Puts new bounds in force (a reload). Transfers in progress are kept: a lower
    /// `max_transfers` or `budget_bytes` refuses new transfers and growth until below
    /// ([`Block1Verdict::Busy`]), a lower `max_body_size` answers the next block of a transfer
    /// that would end beyond it with [`Block1Verdict::TooLarge`] (dropping it), and a new
    /// `lifetime` applies from each transfer's next block.
    pub fn set_limits(&mut self, limits: Limits) {
        self.ceiling = Limits {
            max_transfers: self.ceiling.max_transfers.max(limits.max_transfers),
            max_body_size: self.ceiling.max_body_size.max(limits.max_body_size),
            budget_bytes: self.ceiling.budget_bytes.max(limits.budget_bytes),
            lifetime: self.ceiling.lifetime.max(limits.lifetime),
        };
        self.limits = limits;
    }

    /// Transfers in progress.
    #[must_use]
    pub fn len(&self) -> usize {
        self.transfers.len()
    }

    /// No transfer in progress.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.transfers.is_empty()
    }

    /// Bytes held by all buffers (capacities); at most `budget_bytes`.
    #[must_use]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes one request block: `block` is the request's Block1 option, `payload` its payload,
    /// `size1` its Size1 option, `preferred_szx` the gateway's block size exponent (`[coap]
    /// block_size`; values above [`Block::MAX_SZX`] act as it). Same-MID retransmissions must
    /// be absorbed by the caller's deduplication before this: a block offered twice is
    /// [`Block1Verdict::Duplicate`] at best.
    pub fn offer(
        &mut self,
        now: Instant,
        key: K,
        block: Block,
        payload: &[u8],
        size1: Option<u32>,
        preferred_szx: u8,
    ) -> Block1Verdict {
        let limit = self.limits.max_body_size;
        if self.transfers.get(&key).is_some_and(|t| t.deadline <= now) {
            self.remove(&key);
        }
        // Size1 announces the whole body (RFC 7959 §4): refuse before taking anything.
        if size1.is_some_and(|size| u64::from(size) > limit as u64) {
            self.remove(&key);
            return Block1Verdict::TooLarge { limit };
        }
        let size = block.size();
        let len = payload.len();
        if len > size || (block.more() && len != size) {
            self.remove(&key);
            return Block1Verdict::BadRequest;
        }
        // NUM < 2^20 and size <= 1024: no overflow in u64.
        let offset = u64::from(block.num()) * size as u64;
        let end = offset + len as u64;
        if end > limit as u64 {
            self.remove(&key);
            return Block1Verdict::TooLarge { limit };
        }
        let continue_echo =
            Block::new(block.num(), true, block.szx().min(preferred_szx)).unwrap_or(block);
        let final_echo = Block::new(block.num(), false, block.szx()).unwrap_or(block);
        if block.num() == 0 {
            // NUM 0 (re)starts: whatever the key held is dropped.
            self.remove(&key);
            if !block.more() {
                return Block1Verdict::Complete {
                    body: Bytes::copy_from_slice(payload),
                    echo: final_echo,
                };
            }
            if self.transfers.len() >= self.limits.max_transfers {
                return Block1Verdict::Busy;
            }
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            let deadline = deadline_after(now, self.limits.lifetime);
            self.by_deadline.insert((deadline, id), key.clone());
            self.transfers.insert(
                key.clone(),
                Transfer {
                    body: Vec::new(),
                    deadline,
                    id,
                },
            );
        } else {
            let Some(received) = self.transfers.get(&key).map(|t| t.body.len() as u64) else {
                return Block1Verdict::Incomplete;
            };
            if offset != received {
                if block.more() && offset < received && end <= received {
                    self.touch(now, &key);
                    return Block1Verdict::Duplicate {
                        echo: continue_echo,
                    };
                }
                self.remove(&key);
                return Block1Verdict::Incomplete;
            }
        }
        if !self.append(&key, payload) {
            self.remove(&key);
            return Block1Verdict::Busy;
        }
        if block.more() {
            self.touch(now, &key);
            return Block1Verdict::Continue {
                echo: continue_echo,
            };
        }
        let mut body = self.remove(&key).unwrap_or_default();
        body.shrink_to_fit();
        Block1Verdict::Complete {
            body: Bytes::from(body),
            echo: final_echo,
        }
    }

    /// Drops every transfer idle until `now` or before; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut expired = 0;
        while let Some(entry) = self.by_deadline.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            if let Some(transfer) = self.transfers.remove(&key) {
                self.bytes = self.bytes.saturating_sub(transfer.body.capacity());
            }
            expired += 1;
        }
        expired
    }

    /// The earliest idle deadline, if any transfer is in progress.
    #[must_use]
    pub fn next_deadline(&self) -> Option<Instant> {
        self.by_deadline.first_key_value().map(|((at, _), _)| *at)
    }

    /// Drops every transfer whose key matches (a peer that went away); returns how many.
    pub fn remove_where(&mut self, mut matches: impl FnMut(&K) -> bool) -> usize {
        let Self {
            transfers,
            by_deadline,
            bytes,
            ..
        } = self;
        let before = transfers.len();
        transfers.retain(|key, transfer| {
            if !matches(key) {
                return true;
            }
            by_deadline.remove(&(transfer.deadline, transfer.id));
            *bytes = bytes.saturating_sub(transfer.body.capacity());
            false
        });
        before - transfers.len()
    }

    /// Checks the table's invariants (for tests and fuzzing; O(n)).
    ///
    /// # Errors
    ///
    /// The first invariant found broken, described.
    pub fn check_invariants(&self) -> Result<(), String> {
        let sum: usize = self.transfers.values().map(|t| t.body.capacity()).sum();
        if sum != self.bytes {
            return Err(format!("bytes {} != sum of capacities {sum}", self.bytes));
        }
        if self.bytes > self.ceiling.budget_bytes {
            return Err(format!("bytes {} > budget", self.bytes));
        }
        if self.transfers.len() > self.ceiling.max_transfers {
            return Err(format!("{} transfers > max", self.transfers.len()));
        }
        if self.by_deadline.len() != self.transfers.len() {
            return Err("deadline index and table differ in length".to_owned());
        }
        for ((deadline, id), key) in &self.by_deadline {
            match self.transfers.get(key) {
                Some(t) if t.deadline == *deadline && t.id == *id => {}
                _ => return Err("deadline index entry without its transfer".to_owned()),
            }
        }
        if let Some(t) = self
            .transfers
            .values()
            .find(|t| t.body.len() > self.ceiling.max_body_size)
        {
            return Err(format!("body of {} bytes > max_body_size", t.body.len()));
        }
        Ok(())
    }

    /// Appends `payload` to the key's buffer, growing it within the budget; false (nothing
    /// appended) when the budget cannot take the growth.
    fn append(&mut self, key: &K, payload: &[u8]) -> bool {
        let Some(transfer) = self.transfers.get_mut(key) else {
            return false;
        };
        let body = &mut transfer.body;
        let needed = body.len().saturating_add(payload.len());
        let capacity = body.capacity();
        if needed > capacity {
            // Doubling keeps appends amortised O(1); never beyond max_body_size, so a body
            // that fits never holds more than that limit.
            let target = needed.max(capacity.saturating_mul(2).min(self.limits.max_body_size));
            let growth = target - capacity;
            if self.bytes.saturating_add(growth) > self.limits.budget_bytes {
                return false;
            }
            body.reserve_exact(target - body.len());
            // `reserve_exact` allocates exactly `target` (std's Vec); count what it really
            // holds so `bytes` stays the truth.
            self.bytes = self
                .bytes
                .saturating_sub(capacity)
                .saturating_add(body.capacity());
        }
        body.extend_from_slice(payload);
        true
    }

    /// Moves the key's idle deadline to `now + lifetime`.
    fn touch(&mut self, now: Instant, key: &K) {
        let Some(transfer) = self.transfers.get_mut(key) else {
            return;
        };
        let deadline = deadline_after(now, self.limits.lifetime);
        if let Some(k) = self.by_deadline.remove(&(transfer.deadline, transfer.id)) {
            self.by_deadline.insert((deadline, transfer.id), k);
        }
        transfer.deadline = deadline;
    }

    /// Drops the key's transfer; returns its body.
    fn remove(&mut self, key: &K) -> Option<Vec<u8>> {
        let transfer = self.transfers.remove(key)?;
        self.by_deadline.remove(&(transfer.deadline, transfer.id));
        self.bytes = self.bytes.saturating_sub(transfer.body.capacity());
        Some(transfer.body)
    }
}

/// One cached response body.
#[derive(Debug)]
struct Cached {
    /// The whole body (shared, not copied).
    body: Bytes,
    /// Its ETag.
    etag: u32,
    /// Insertion + lifetime; also its key in the deadline index.
    deadline: Instant,
    /// Tie-breaker in the deadline index (insertion order).
    id: u64,
}

/// Bodies of large responses served block by block (Block2), keyed by `K` (see the module doc).
#[derive(Debug)]
pub struct Block2Cache<K> {
    /// At most this many bodies (`[coap] max_block2_bodies`).
    max_bodies: usize,
    /// The largest `max_bodies` ever in force: a lowered one trims the cache at the next
    /// insert ([`Block2Cache::check_invariants`]).
    bodies_ceiling: usize,
    /// How long a body is served after insertion (`[coap] block_lifetime`).
    lifetime: Duration,
    /// The bodies.
    entries: HashMap<K, Cached>,
    /// The same entries, oldest first: expiry and eviction without a scan.
    by_deadline: BTreeMap<(Instant, u64), K>,
    /// The next ETag handed out.
    next_etag: u32,
    /// Next [`Cached::id`].
    next_id: u64,
}

impl<K: Hash + Eq + Clone> Block2Cache<K> {
    /// An empty cache. `first_etag` starts the ETag counter: a random value from the core's
    /// seeded RNG makes a restarted gateway unlikely to reuse an ETag a client still holds.
    #[must_use]
    pub fn new(max_bodies: usize, lifetime: Duration, first_etag: u32) -> Self {
        Self {
            max_bodies,
            bodies_ceiling: max_bodies,
            lifetime,
            entries: HashMap::new(),
            by_deadline: BTreeMap::new(),
            next_etag: first_etag,
            next_id: 0,
        }
    }

    /// Bodies cached.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Puts new bounds in force (a reload). Cached bodies are kept until they expire; a lower
    /// `max_bodies` evicts the oldest down to it at the next insert; a new `lifetime` applies
    /// to bodies cached from now on.
    pub fn set_limits(&mut self, max_bodies: usize, lifetime: Duration) {
        self.bodies_ceiling = self.bodies_ceiling.max(max_bodies);
        self.max_bodies = max_bodies;
        self.lifetime = lifetime;
    }

    /// No body cached.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Caches `body` under `key` until `now + lifetime` (replacing the key's previous body,
    /// evicting the oldest entry when full) and returns its new ETag. With `max_bodies = 0`
    /// nothing is kept, but an ETag is still returned for the first block.
    pub fn insert(&mut self, now: Instant, key: K, body: Bytes) -> u32 {
        let etag = self.next_etag;
        self.next_etag = self.next_etag.wrapping_add(1);
        self.remove(&key);
        if self.max_bodies == 0 {
            return etag;
        }
        while self.entries.len() >= self.max_bodies {
            let Some((_, oldest)) = self.by_deadline.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let deadline = deadline_after(now, self.lifetime);
        self.by_deadline.insert((deadline, id), key.clone());
        self.entries.insert(
            key,
            Cached {
                body,
                etag,
                deadline,
                id,
            },
        );
        etag
    }

    /// The key's body and ETag, unless absent or older than `lifetime` (expired entries are
    /// never served, even before [`Block2Cache::expire`] runs).
    #[must_use]
    pub fn get(&self, now: Instant, key: &K) -> Option<(Bytes, u32)> {
        self.entries
            .get(key)
            .filter(|cached| cached.deadline > now)
            .map(|cached| (cached.body.clone(), cached.etag))
    }

    /// Drops every body older than `lifetime` at `now`; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut expired = 0;
        while let Some(entry) = self.by_deadline.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            self.entries.remove(&key);
            expired += 1;
        }
        expired
    }

    /// The earliest expiry, if any body is cached.
    #[must_use]
    pub fn next_deadline(&self) -> Option<Instant> {
        self.by_deadline.first_key_value().map(|((at, _), _)| *at)
    }

    /// Drops every body whose key matches (a peer that went away); returns how many.
    pub fn remove_where(&mut self, mut matches: impl FnMut(&K) -> bool) -> usize {
        let Self {
            entries,
            by_deadline,
            ..
        } = self;
        let before = entries.len();
        entries.retain(|key, cached| {
            if !matches(key) {
                return true;
            }
            by_deadline.remove(&(cached.deadline, cached.id));
            false
        });
        before - entries.len()
    }

    /// Checks the cache's invariants (for tests and fuzzing; O(n)).
    ///
    /// # Errors
    ///
    /// The first invariant found broken, described.
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.entries.len() > self.bodies_ceiling {
            return Err(format!("{} bodies > max", self.entries.len()));
        }
        if self.by_deadline.len() != self.entries.len() {
            return Err("deadline index and cache differ in length".to_owned());
        }
        for ((deadline, id), key) in &self.by_deadline {
            match self.entries.get(key) {
                Some(c) if c.deadline == *deadline && c.id == *id => {}
                _ => return Err("deadline index entry without its body".to_owned()),
            }
        }
        Ok(())
    }

    /// Drops the key's body, if any.
    fn remove(&mut self, key: &K) {
        if let Some(cached) = self.entries.remove(key) {
            self.by_deadline.remove(&(cached.deadline, cached.id));
        }
    }
}

/// `now + lifetime`, or as far as `Instant` reaches (halving the span) when that overflows:
/// a misconfigured lifetime must not panic.
fn deadline_after(now: Instant, lifetime: Duration) -> Instant {
    let mut span = lifetime;
    loop {
        if let Some(at) = now.checked_add(span) {
            return at;
        }
        span /= 2;
    }
}

/// Block `num` of `body` cut at size exponent `szx`: the slice and whether more blocks follow.
///
/// `None` when `szx` is above [`Block::MAX_SZX`] or the block starts at or beyond the end of
/// the body (block 0 always exists, empty for an empty body). RFC 7959 names no code for a
/// block number beyond the representation; the core answers 4.00 Bad Request (as libcoap
/// does): the option is well-formed and understood, so 4.02 Bad Option (RFC 7252 §5.9.2.3:
/// unrecognised or malformed options) does not fit.
#[must_use]
pub fn block2_slice(body: &[u8], num: u32, szx: u8) -> Option<(&[u8], bool)> {
    if szx > Block::MAX_SZX {
        return None;
    }
    let size = 16u64 << szx;
    let len = body.len() as u64;
    let start = u64::from(num).checked_mul(size)?;
    if num != 0 && start >= len {
        return None;
    }
    let end = start.saturating_add(size).min(len);
    let slice = body.get(usize::try_from(start).ok()?..usize::try_from(end).ok()?)?;
    Some((slice, end < len))
}

#[cfg(test)]
mod tests;
