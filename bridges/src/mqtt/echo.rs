//! Recognising the broker's echo of the gateway's own publishes on an MQTT 3.1.1 upstream.
//!
//! MQTT 3.1.1 has no No Local: a broker sends every message to every matching subscription,
//! the publisher's own included. The gateway publishes for all its sensors on one connection
//! and subscribes for all of them on the same connection, so each sensor message on a
//! subscribed topic comes back. The gateway core already delivered it to its own subscribers
//! (local delivery, which works while the broker is down too); passing the echo on would
//! deliver it twice. MQTT 5 subscribes with No Local and needs none of this.
//!
//! The filter is a bounded multiset of fingerprints (a keyed hash of broker topic and payload):
//!
//! - [`EchoFilter::record`] adds one when a publish is handed to the client;
//! - [`EchoFilter::take_echo`] consumes one for an incoming non-retained PUBLISH with the same
//!   topic and payload (the oldest), and says the message is an echo;
//! - a record older than the age bound, or the oldest one when the count bound is reached,
//!   goes unconsumed (counted);
//! - [`EchoFilter::clear`] forgets everything when the connection ends: with clean sessions
//!   an echo only ever comes on the connection the publish went out on.
//!
//! Caveat: the broker message carries nothing that tells the gateway's own publish from
//! another client's. A message from another client with the same topic and payload, arriving
//! while a record of it is open (within the age bound), is taken for the echo and dropped,
//! and the real echo, arriving later, is passed on instead: the subscribers still get that
//! topic and payload as many times as it was published. Only when no echo comes at all (the
//! subscription went away meanwhile, or the record was evicted) can such an identical
//! message of another client be lost.
//!
//! One echo is expected per publish, as mosquitto sends a 3.1.1 client one copy however many
//! of its subscriptions match. A broker sending one copy per matching subscription lets the
//! extra copies through: the duplicates any 3.1.1 downlink has with overlapping filters.
//!
//! Retained messages are never taken for echoes: the broker sends the live echo with
//! retain = 0 (MQTT 3.1.1), and retain = 1 only for a retained message sent because of a new
//! subscription, which the gateway's subscribers must get.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use super::config::DEFAULT_KEEP_ALIVE;

/// Records kept per unit of `request_queue + max_inflight`: see [`EchoFilter::capacity_for`].
const CAPACITY_FACTOR: usize = 4;

/// Age bound in units of the keep-alive interval: see [`EchoFilter::max_age_for`].
const AGE_KEEP_ALIVES: u32 = 2;

/// A bounded multiset of fingerprints of recent publishes; see the module docs.
#[derive(Debug)]
pub(crate) struct EchoFilter {
    /// Keys the fingerprint hash (per process), so nobody can craft collisions.
    hasher: RandomState,
    /// Most records kept, consumed ones included until they leave `order`.
    capacity: usize,
    /// Records older than this go unconsumed.
    max_age: Duration,
    /// Fingerprint -> sequence numbers of its unconsumed records, oldest first.
    open: HashMap<u64, VecDeque<u64>>,
    /// Every record still kept, oldest first: (fingerprint, sequence number, recorded at).
    order: VecDeque<(u64, u64, Instant)>,
    next_seq: u64,
    /// Records that left unconsumed (aged, evicted, or cleared with the connection).
    expired: u64,
}

impl EchoFilter {
    /// A filter holding at most `capacity` records, each at most `max_age`.
    pub(crate) fn new(capacity: usize, max_age: Duration) -> Self {
        Self {
            hasher: RandomState::new(),
            capacity: capacity.max(1),
            max_age,
            open: HashMap::new(),
            order: VecDeque::new(),
            next_seq: 0,
            expired: 0,
        }
    }

    /// The count bound for an upstream: [`CAPACITY_FACTOR`] times the publishes it can have
    /// queued in the client (`request_queue`) plus awaiting the broker (`max_inflight`). An
    /// echo returns within about a round trip of the publish being written, so the open
    /// records are those publishes plus what one round trip adds; the factor leaves room for
    /// the QoS 0 ones, which hold no in-flight slot.
    pub(crate) fn capacity_for(request_queue: usize, max_inflight: u16) -> usize {
        request_queue
            .saturating_add(usize::from(max_inflight))
            .saturating_mul(CAPACITY_FACTOR)
    }

    /// The age bound for an upstream: [`AGE_KEEP_ALIVES`] keep-alive intervals. A publish
    /// waits in the client's queue and its echo in the broker's socket only while the link is
    /// not polled, and a link not polled for longer than the broker's keep-alive tolerance
    /// (1.5 intervals) loses its connection, which clears the filter.
    /// Without keep-alive (0) the broker never drops a stalled link, and the default
    /// interval stands in.
    pub(crate) fn max_age_for(keep_alive: Duration) -> Duration {
        let keep_alive = if keep_alive.is_zero() {
            DEFAULT_KEEP_ALIVE
        } else {
            keep_alive
        };
        keep_alive.saturating_mul(AGE_KEEP_ALIVES)
    }

    /// The fingerprint of a broker topic and payload.
    pub(crate) fn fingerprint(&self, topic: &[u8], payload: &[u8]) -> u64 {
        // Length-prefixed, so topic/payload boundaries cannot be shifted.
        self.hasher.hash_one((topic, payload))
    }

    /// Records a publish about to be handed to the client; returns its sequence number for
    /// [`Self::cancel`].
    pub(crate) fn record(&mut self, now: Instant, fingerprint: u64) -> u64 {
        self.expire(now);
        while self.order.len() >= self.capacity {
            self.pop_oldest();
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.order.push_back((fingerprint, seq, now));
        self.open.entry(fingerprint).or_default().push_back(seq);
        seq
    }

    /// Takes back the record `seq` of a publish the client refused (nothing was sent).
    pub(crate) fn cancel(&mut self, fingerprint: u64, seq: u64) {
        if let Some(seqs) = self.open.get_mut(&fingerprint) {
            seqs.retain(|&s| s != seq);
            if seqs.is_empty() {
                self.open.remove(&fingerprint);
            }
        }
        // Its entry in `order` stays until it leaves; it is no longer open.
    }

    /// Whether an incoming message is the echo of a recorded publish; if so, its record is
    /// consumed. Retained messages never are (see the module docs).
    pub(crate) fn take_echo(
        &mut self,
        now: Instant,
        topic: &[u8],
        payload: &[u8],
        retain: bool,
    ) -> bool {
        if retain || self.open.is_empty() {
            return false;
        }
        self.expire(now);
        let fingerprint = self.fingerprint(topic, payload);
        let Some(seqs) = self.open.get_mut(&fingerprint) else {
            return false;
        };
        let taken = seqs.pop_front().is_some();
        if seqs.is_empty() {
            self.open.remove(&fingerprint);
        }
        taken
    }

    /// The connection ended: no echo of what was recorded can come any more.
    pub(crate) fn clear(&mut self) {
        let open: usize = self.open.values().map(VecDeque::len).sum();
        self.expired = self.expired.saturating_add(open as u64);
        self.open.clear();
        self.order.clear();
    }

    /// Records that left without their echo.
    pub(crate) fn expired(&self) -> u64 {
        self.expired
    }

    /// Drops records older than `max_age`.
    fn expire(&mut self, now: Instant) {
        while let Some(&(_, _, at)) = self.order.front() {
            if now.saturating_duration_since(at) <= self.max_age {
                break;
            }
            self.pop_oldest();
        }
    }

    /// Drops the oldest record, counting it if it was still open.
    fn pop_oldest(&mut self) {
        let Some((fingerprint, seq, _)) = self.order.pop_front() else {
            return;
        };
        // Open sequence numbers of a fingerprint are in recording order and a take removes the
        // oldest, so the oldest record overall is open iff it heads its fingerprint's list.
        if let Some(seqs) = self.open.get_mut(&fingerprint) {
            if seqs.front() == Some(&seq) {
                seqs.pop_front();
                self.expired = self.expired.saturating_add(1);
            }
            if seqs.is_empty() {
                self.open.remove(&fingerprint);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(capacity: usize) -> (EchoFilter, Instant) {
        #[allow(clippy::disallowed_methods)] // An arbitrary start for the virtual clock.
        let now = Instant::now();
        (EchoFilter::new(capacity, Duration::from_secs(60)), now)
    }

    fn record(f: &mut EchoFilter, now: Instant, topic: &str, payload: &str) -> u64 {
        let fp = f.fingerprint(topic.as_bytes(), payload.as_bytes());
        f.record(now, fp)
    }

    #[test]
    fn each_record_takes_exactly_one_echo() {
        let (mut f, now) = filter(16);
        record(&mut f, now, "room/1", "21");
        record(&mut f, now, "room/1", "21");
        assert!(f.take_echo(now, b"room/1", b"21", false));
        assert!(f.take_echo(now, b"room/1", b"21", false));
        assert!(
            !f.take_echo(now, b"room/1", b"21", false),
            "a third copy is another client's"
        );
        assert_eq!(f.expired(), 0);
    }

    #[test]
    fn topic_and_payload_must_both_match_and_retained_messages_never_do() {
        let (mut f, now) = filter(16);
        record(&mut f, now, "room/1", "21");
        assert!(!f.take_echo(now, b"room/2", b"21", false));
        assert!(!f.take_echo(now, b"room/1", b"22", false));
        assert!(
            !f.take_echo(now, b"room/12", b"1", false),
            "no boundary shift"
        );
        assert!(!f.take_echo(now, b"room/1", b"21", true), "retained");
        assert!(f.take_echo(now, b"room/1", b"21", false));
    }

    #[test]
    fn records_expire_by_age() {
        let (mut f, now) = filter(16);
        record(&mut f, now, "t", "a");
        let later = now + Duration::from_secs(61);
        assert!(!f.take_echo(later, b"t", b"a", false));
        assert_eq!(f.expired(), 1);
    }

    #[test]
    fn the_count_is_bounded_by_evicting_the_oldest() {
        let (mut f, now) = filter(2);
        record(&mut f, now, "t", "1");
        record(&mut f, now, "t", "2");
        record(&mut f, now, "t", "3");
        assert_eq!(f.order.len(), 2);
        assert_eq!(f.expired(), 1);
        assert!(!f.take_echo(now, b"t", b"1", false));
        assert!(f.take_echo(now, b"t", b"2", false));
        assert!(f.take_echo(now, b"t", b"3", false));
        // Consumed records leave without being counted.
        record(&mut f, now, "t", "4");
        record(&mut f, now, "t", "5");
        assert_eq!(f.expired(), 1);
    }

    #[test]
    fn a_cancelled_record_takes_no_echo_and_clear_forgets_all() {
        let (mut f, now) = filter(16);
        let fp = f.fingerprint(b"t", b"x");
        let seq = f.record(now, fp);
        f.cancel(fp, seq);
        assert!(!f.take_echo(now, b"t", b"x", false));
        record(&mut f, now, "t", "y");
        f.clear();
        assert!(!f.take_echo(now, b"t", b"y", false));
        assert_eq!(f.expired(), 1);
    }

    #[test]
    fn the_bounds_derive_from_the_upstream_settings() {
        assert_eq!(EchoFilter::capacity_for(1024, 100), 4 * 1124);
        assert_eq!(
            EchoFilter::max_age_for(Duration::from_secs(30)),
            Duration::from_secs(60)
        );
        assert_eq!(
            EchoFilter::max_age_for(Duration::ZERO),
            DEFAULT_KEEP_ALIVE * 2
        );
    }
}
