//! Reconnect delays: exponential growth with "equal jitter".
//!
//! Attempt `n` (0-based, counted since the last [`Backoff::reset`]) has the ceiling
//! `min(max, initial * 2^n)`; the delay is drawn uniformly from `[ceiling / 2, ceiling]`.
//! Keeping half of the ceiling guarantees a floor between attempts (a flapping broker is not
//! hammered), the random half spreads the reconnects of many gateways after a broker restart.
//!
//! The RNG is a type parameter so tests can seed it; the value is pure computation (no clock,
//! no sleeping), the caller sleeps.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Reconnect delay generator, reset after each successful connection.
#[derive(Debug)]
pub(crate) struct Backoff<R = SmallRng> {
    /// Ceiling of the first attempt.
    initial: Duration,
    /// Largest ceiling.
    max: Duration,
    /// Failed attempts since the last reset; the exponent.
    attempt: u32,
    /// Source of the jitter.
    rng: R,
}

impl Backoff<SmallRng> {
    /// A backoff seeded from the OS.
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self::with_rng(initial, max, SmallRng::from_os_rng())
    }
}

impl<R: Rng> Backoff<R> {
    /// A backoff drawing its jitter from `rng`.
    pub(crate) fn with_rng(initial: Duration, max: Duration, rng: R) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
            rng,
        }
    }

    /// The ceiling of the next attempt, before jitter.
    pub(crate) fn ceiling(&self) -> Duration {
        // 2^31 times any positive initial delay already saturates any sane maximum.
        let factor = 1u32 << self.attempt.min(31);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The delay before the next attempt; advances the exponent.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let floor = ceiling / 2;
        let spread = u64::try_from((ceiling - floor).as_nanos()).unwrap_or(u64::MAX);
        floor + Duration::from_nanos(self.rng.random_range(0..=spread))
    }

    /// New bounds (a reconfigure), keeping the attempt count.
    pub(crate) fn set_bounds(&mut self, initial: Duration, max: Duration) {
        self.initial = initial;
        self.max = max.max(initial);
    }

    /// Starts over at `initial`: call after a successful connection.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded(initial_ms: u64, max_ms: u64, seed: u64) -> Backoff {
        Backoff::with_rng(
            Duration::from_millis(initial_ms),
            Duration::from_millis(max_ms),
            SmallRng::seed_from_u64(seed),
        )
    }

    #[test]
    fn ceilings_double_up_to_the_maximum() {
        let mut backoff = seeded(100, 1_000, 1);
        let ceilings: Vec<u64> = (0..7)
            .map(|_| {
                let ceiling = backoff.ceiling();
                backoff.next_delay();
                u64::try_from(ceiling.as_millis()).unwrap()
            })
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1_000, 1_000, 1_000]);
    }

    #[test]
    fn every_delay_lies_between_half_the_ceiling_and_the_ceiling() {
        let mut backoff = seeded(50, 5_000, 7);
        for _ in 0..1_000 {
            let ceiling = backoff.ceiling();
            let delay = backoff.next_delay();
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "{delay:?} vs {ceiling:?}"
            );
        }
    }

    #[test]
    fn same_seed_gives_the_same_delays() {
        let mut a = seeded(100, 10_000, 42);
        let mut b = seeded(100, 10_000, 42);
        let run_a: Vec<Duration> = (0..20).map(|_| a.next_delay()).collect();
        let run_b: Vec<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert_eq!(run_a, run_b);
        let mut c = seeded(100, 10_000, 43);
        let run_c: Vec<Duration> = (0..20).map(|_| c.next_delay()).collect();
        assert_ne!(run_a, run_c, "the jitter must depend on the RNG");
    }

    #[test]
    fn reset_starts_over_at_the_initial_delay() {
        let mut backoff = seeded(100, 10_000, 3);
        for _ in 0..10 {
            backoff.next_delay();
        }
        assert_eq!(backoff.ceiling(), Duration::from_secs(10));
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(100));
        let delay = backoff.next_delay();
        assert!(delay >= Duration::from_millis(50) && delay <= Duration::from_millis(100));
    }

    #[test]
    fn many_attempts_neither_overflow_nor_exceed_the_maximum() {
        let mut backoff = seeded(1, 60_000, 9);
        for _ in 0..10_000 {
            assert!(backoff.next_delay() <= Duration::from_secs(60));
        }
        let mut huge = Backoff::with_rng(
            Duration::from_secs(u64::MAX / 4),
            Duration::MAX,
            SmallRng::seed_from_u64(1),
        );
        for _ in 0..64 {
            huge.next_delay();
        }
    }
}
