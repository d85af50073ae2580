//! Per-device request rate limiting: one token bucket per key (device id, or `anon:<ip>`),
//! in a bounded table. Pure: `now` is passed in.
//!
//! # Invariants
//!
//! - A bucket holds at most `burst` tokens (at least 1) and refills at `rate` tokens per
//!   second; a request takes one token or is refused with the wait until one is there, rounded
//!   up to whole seconds and never zero (what `Retry-After` can say).
//! - `rate == 0` (or not a positive number) turns limiting off: every `take` succeeds and
//!   nothing is stored.
//! - The table holds at most `cap` buckets (at least 1). At the cap, buckets that have refilled
//!   are forgotten first, from the least recently used end (a full bucket behaves exactly like
//!   no bucket, so forgetting it changes nothing); if none has, the least recently used
//!   bucket is evicted (its device gets a fresh burst: the price of a bounded table). Both
//!   cost O(log cap) per request.
//! - A `now` earlier than a bucket's last use (callers on several threads) refills nothing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest wait [`RateTable::take`] reports (a tiny rate would overflow a `Duration`).
pub(crate) const MAX_RETRY: Duration = Duration::from_secs(u32::MAX as u64);

/// One key's bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens at `at`, `0.0..=burst`.
    tokens: f64,
    /// When `tokens` was computed.
    at: Instant,
    /// The bucket's place in [`RateTable::order`] (its last use).
    stamp: u64,
}

/// Token buckets by key, bounded.
#[derive(Debug)]
pub(crate) struct RateTable {
    /// Tokens per second; limiting is off unless it is positive.
    rate: f64,
    /// Bucket size (>= 1).
    burst: f64,
    /// Most buckets held (>= 1).
    cap: usize,
    buckets: HashMap<Arc<str>, Bucket>,
    /// Keys by last use (stamp), oldest first: the eviction order.
    order: BTreeMap<u64, Arc<str>>,
    /// The next stamp; increases with every use.
    next_stamp: u64,
}

impl RateTable {
    /// `rate_per_sec` tokens per second (0 = off), buckets of `burst` tokens (0 is taken as
    /// 1), at most `cap` keys (0 is taken as 1).
    pub(crate) fn new(rate_per_sec: f64, burst: u32, cap: usize) -> Self {
        Self {
            rate: rate_per_sec,
            burst: f64::from(burst.max(1)),
            cap: cap.max(1),
            buckets: HashMap::new(),
            order: BTreeMap::new(),
            next_stamp: 0,
        }
    }

    /// New limits at `now` (a reload), taken as by [`RateTable::new`]. The buckets are kept
    /// (a device keeps what it has used): each is refilled to `now` at the old rate and cut to
    /// the new `burst`, then refills at the new rate. Limiting turned off forgets them; a
    /// lower `cap` forgets the least recently used beyond it at once.
    pub(crate) fn set_limits(&mut self, now: Instant, rate_per_sec: f64, burst: u32, cap: usize) {
        let (old_rate, old_burst) = (self.rate, self.burst);
        self.rate = rate_per_sec;
        self.burst = f64::from(burst.max(1));
        self.cap = cap.max(1);
        if !self.enabled() {
            self.buckets.clear();
            self.order.clear();
            return;
        }
        for bucket in self.buckets.values_mut() {
            bucket.tokens = refilled(bucket, now, old_rate, old_burst).min(self.burst);
            bucket.at = bucket.at.max(now);
        }
        while self.buckets.len() > self.cap {
            let Some((_, key)) = self.order.pop_first() else {
                break;
            };
            self.buckets.remove(&key);
        }
    }

    /// Forgets `key`'s bucket (a device no longer configured).
    pub(crate) fn forget(&mut self, key: &str) {
        if let Some(bucket) = self.buckets.remove(key) {
            self.order.remove(&bucket.stamp);
        }
    }

    /// The tokens `key`'s bucket holds at its last use, if it has one.
    #[cfg(test)]
    pub(crate) fn tokens(&self, key: &str) -> Option<f64> {
        self.buckets.get(key).map(|b| b.tokens)
    }

    /// Whether limiting is on.
    fn enabled(&self) -> bool {
        self.rate > 0.0
    }

    /// Ok, or how long until a token is there (never zero). rate 0 = always Ok.
    ///
    /// # Errors
    /// The wait, rounded up to whole seconds, at most [`MAX_RETRY`].
    pub(crate) fn take(&mut self, key: &str, now: Instant) -> Result<(), Duration> {
        if !self.enabled() {
            return Ok(());
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let (rate, burst) = (self.rate, self.burst);
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.cap {
            self.make_room(now);
        }
        let bucket = match self.buckets.get_mut(key) {
            Some(bucket) => {
                self.order.remove(&bucket.stamp);
                bucket.tokens = refilled(bucket, now, rate, burst);
                bucket.at = bucket.at.max(now);
                bucket
            }
            None => self.buckets.entry(Arc::from(key)).or_insert(Bucket {
                tokens: burst,
                at: now,
                stamp,
            }),
        };
        bucket.stamp = stamp;
        let result = if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(wait(1.0 - bucket.tokens, rate))
        };
        if let Some((key, _)) = self.buckets.get_key_value(key) {
            self.order.insert(stamp, Arc::clone(key));
        }
        result
    }

    /// How many buckets are held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Frees at least one slot: refilled buckets from the least recently used end, else the
    /// least recently used one.
    fn make_room(&mut self, now: Instant) {
        let mut freed = false;
        while let Some(entry) = self.order.first_entry() {
            let full = self
                .buckets
                .get(entry.get())
                .is_none_or(|b| refilled(b, now, self.rate, self.burst) >= self.burst);
            if !full && freed {
                break;
            }
            let key = entry.remove();
            self.buckets.remove(&key);
            freed = true;
            if !full {
                break;
            }
        }
    }
}

/// `bucket`'s tokens at `now`.
fn refilled(bucket: &Bucket, now: Instant, rate: f64, burst: f64) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
    (bucket.tokens + elapsed * rate).min(burst)
}

/// The time `missing` tokens take at `rate`, in whole seconds rounded up, >= 1 s.
fn wait(missing: f64, rate: f64) -> Duration {
    let secs = (missing / rate).ceil();
    if secs.is_finite() && secs < MAX_RETRY.as_secs_f64() {
        // Truncation is exact: `secs` is a whole number below u32::MAX.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Duration::from_secs((secs as u64).max(1))
    } else {
        MAX_RETRY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::disallowed_methods)] // The virtual clock starts at an arbitrary instant.
    fn start() -> Instant {
        Instant::now()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn new_limits_keep_each_devices_bucket_cut_to_the_new_burst() {
        let t0 = start();
        let mut table = RateTable::new(1.0, 4, 10);
        for _ in 0..3 {
            assert_eq!(table.take("busy", t0), Ok(()));
        }
        assert_eq!(table.take("idle", t0), Ok(()));
        // Half a second later at the old rate: busy has 1.5 tokens, idle 3.5 (cut to 2).
        table.set_limits(t0 + ms(500), 0.5, 2, 10);
        assert_eq!(table.tokens("busy"), Some(1.5));
        assert_eq!(table.tokens("idle"), Some(2.0));
        assert_eq!(table.take("busy", t0 + ms(500)), Ok(()));
        // 0.5 left; one token needs one more second at the new rate (0.5/s).
        assert_eq!(
            table.take("busy", t0 + ms(500)),
            Err(Duration::from_secs(1))
        );
        // A forgotten device starts with a full new burst.
        table.forget("busy");
        assert_eq!(table.len(), 1);
        assert_eq!(table.take("busy", t0 + ms(500)), Ok(()));
        assert_eq!(table.tokens("busy"), Some(1.0));
        // A lower cap forgets the least recently used at once; limiting off forgets all.
        table.set_limits(t0 + ms(500), 0.5, 2, 1);
        assert_eq!((table.len(), table.tokens("idle")), (1, None));
        table.set_limits(t0 + ms(500), 0.0, 2, 1);
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let t0 = start();
        let mut table = RateTable::new(2.0, 3, 10);
        for _ in 0..3 {
            assert_eq!(table.take("dev1", t0), Ok(()));
        }
        assert_eq!(table.take("dev1", t0), Err(Duration::from_secs(1)));
        // Half a second brings one token (2/s).
        assert_eq!(
            table.take("dev1", t0 + ms(499)),
            Err(Duration::from_secs(1))
        );
        assert_eq!(table.take("dev1", t0 + ms(500)), Ok(()));
        assert!(table.take("dev1", t0 + ms(500)).is_err());
        // Other keys have their own bucket.
        assert_eq!(table.take("dev2", t0), Ok(()));
    }

    #[test]
    fn a_long_pause_refills_only_up_to_the_burst() {
        let t0 = start();
        let mut table = RateTable::new(10.0, 2, 10);
        assert_eq!(table.take("k", t0), Ok(()));
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(table.take("k", later), Ok(()));
        assert_eq!(table.take("k", later), Ok(()));
        assert!(table.take("k", later).is_err());
    }

    #[test]
    fn the_retry_is_rounded_up_to_whole_seconds_and_never_zero() {
        let t0 = start();
        let mut table = RateTable::new(0.001, 1, 10);
        assert_eq!(table.take("k", t0), Ok(()));
        assert_eq!(table.take("k", t0), Err(Duration::from_secs(1000)));
        assert_eq!(
            table.take("k", t0 + Duration::from_millis(999_001)),
            Err(Duration::from_secs(1))
        );
        let mut fast = RateTable::new(1000.0, 1, 10);
        assert_eq!(fast.take("k", t0), Ok(()));
        assert_eq!(fast.take("k", t0), Err(Duration::from_secs(1)));
        let mut tiny = RateTable::new(1e-300, 1, 10);
        assert_eq!(tiny.take("k", t0), Ok(()));
        assert_eq!(tiny.take("k", t0), Err(MAX_RETRY));
    }

    #[test]
    fn rate_zero_is_off_and_stores_nothing() {
        let t0 = start();
        let mut table = RateTable::new(0.0, 1, 1);
        for i in 0..100 {
            assert_eq!(table.take(&format!("k{i}"), t0), Ok(()));
        }
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn a_clock_going_back_refills_nothing() {
        let t0 = start() + Duration::from_secs(10);
        let mut table = RateTable::new(1.0, 1, 10);
        assert_eq!(table.take("k", t0), Ok(()));
        assert!(table.take("k", t0 - Duration::from_secs(5)).is_err());
        assert!(table.take("k", t0 + ms(999)).is_err());
        assert_eq!(table.take("k", t0 + Duration::from_secs(1)), Ok(()));
    }

    #[test]
    fn at_the_cap_refilled_buckets_go_first() {
        let t0 = start();
        let mut table = RateTable::new(1.0, 2, 3);
        // a: used long ago (full again later); b, c: drained recently.
        assert_eq!(table.take("a", t0), Ok(()));
        let t1 = t0 + Duration::from_secs(10);
        for key in ["b", "c"] {
            assert_eq!(table.take(key, t1), Ok(()));
            assert_eq!(table.take(key, t1), Ok(()));
        }
        assert_eq!(table.take("d", t1), Ok(()));
        assert_eq!(table.len(), 3);
        // b and c kept their (empty) state; a was the one forgotten.
        assert!(table.take("b", t1).is_err());
        assert!(table.take("c", t1).is_err());
        assert!(table.buckets.contains_key("d"));
        assert!(!table.buckets.contains_key("a"));
    }

    #[test]
    fn at_the_cap_without_refilled_buckets_the_least_recently_used_goes() {
        let t0 = start();
        let mut table = RateTable::new(1.0, 1, 2);
        assert_eq!(table.take("a", t0), Ok(()));
        assert_eq!(table.take("b", t0), Ok(()));
        // a used again: b is now the least recently used.
        assert!(table.take("a", t0).is_err());
        assert_eq!(table.take("c", t0), Ok(()));
        assert_eq!(table.len(), 2);
        assert!(table.buckets.contains_key("a"));
        assert!(!table.buckets.contains_key("b"));
        assert!(table.take("a", t0).is_err(), "a kept its empty bucket");
        assert_eq!(table.order.len(), table.buckets.len());
    }

    #[test]
    fn the_table_never_exceeds_its_cap() {
        let t0 = start();
        let mut table = RateTable::new(1.0, 5, 50);
        for i in 0..1000u64 {
            let _ = table.take(&format!("k{}", i % 97), t0 + ms(i * 7));
            assert!(table.len() <= 50);
            assert_eq!(table.order.len(), table.len());
        }
    }
}
