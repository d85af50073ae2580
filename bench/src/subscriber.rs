//! The counting subscriber on the upstream broker: how many benchmark messages arrived, which
//! were lost, duplicated or out of order per client, and the end-to-end latency (the payload's
//! send stamp against this process's clock; generator and subscriber share the epoch).
//!
//! It runs on its own thread and runtime so the generator's load does not delay it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use rumqttc_v5::{AsyncClient, Event, Incoming, MqttOptions, QoS};

use crate::{elapsed_ns, new_histogram, sn};

/// Sequence numbers seen from one client.
#[derive(Debug, Default, Clone)]
struct Seen {
    /// One bit per sequence number.
    bits: Vec<u64>,
    /// Highest sequence number so far.
    max: Option<u64>,
}

/// What arrived since the last reset.
#[derive(Debug, Clone)]
pub struct Tally {
    /// Benchmark messages received (with duplicates).
    pub received: u64,
    /// Distinct (client, sequence) pairs.
    pub unique: u64,
    /// Copies of a pair already seen.
    pub duplicates: u64,
    /// Messages that arrived after a higher sequence number of the same client.
    pub reordered: u64,
    /// Payloads without a benchmark stamp.
    pub malformed: u64,
    /// First and last arrival, ns since the epoch.
    pub first_ns: u64,
    pub last_ns: u64,
    /// Send stamp → first arrival of each distinct message, µs (a QoS 1 message's stamp is
    /// its first transmission's: retransmissions resend the same bytes; a duplicate's later
    /// arrival is not a delivery latency).
    pub latency: Histogram<u64>,
    per_client: HashMap<u32, Seen>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            received: 0,
            unique: 0,
            duplicates: 0,
            reordered: 0,
            malformed: 0,
            first_ns: 0,
            last_ns: 0,
            latency: new_histogram(),
            per_client: HashMap::new(),
        }
    }
}

/// Bound on the sequence numbers tracked per client (16 MiB of bits over all clients is far
/// more than any scenario sends).
const MAX_SEQ: u64 = 1 << 27;

impl Tally {
    /// Counts one payload that arrived at `now` (ns since the epoch).
    pub(crate) fn record(&mut self, payload: &[u8], now: u64) {
        let Some((client, seq, sent)) = sn::read_stamp(payload) else {
            self.malformed += 1;
            return;
        };
        self.received += 1;
        if self.first_ns == 0 {
            self.first_ns = now;
        }
        self.last_ns = now;
        if seq >= MAX_SEQ {
            self.malformed += 1;
            return;
        }
        let seen = self.per_client.entry(client).or_default();
        let (word, bit) = (usize::try_from(seq / 64).unwrap_or(0), seq % 64);
        if seen.bits.len() <= word {
            seen.bits.resize(word + 1, 0);
        }
        if let Some(w) = seen.bits.get_mut(word) {
            if *w & (1 << bit) != 0 {
                self.duplicates += 1;
                return;
            }
            *w |= 1 << bit;
        }
        self.unique += 1;
        let _ = self.latency.record(now.saturating_sub(sent) / 1000);
        match seen.max {
            Some(max) if seq < max => self.reordered += 1,
            _ => seen.max = Some(seq),
        }
    }

    /// Distinct clients heard from.
    #[must_use]
    pub fn clients(&self) -> usize {
        self.per_client.len()
    }

    /// Messages per second between the first and the last arrival.
    #[must_use]
    pub fn rate(&self) -> f64 {
        let span = self.last_ns.saturating_sub(self.first_ns) as f64 / 1e9;
        if span > 0.0 {
            self.received as f64 / span
        } else {
            0.0
        }
    }
}

/// A subscriber counting benchmark messages.
#[derive(Debug)]
pub struct Counter {
    tally: Arc<Mutex<Tally>>,
    client: AsyncClient,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Counter {
    /// Connects to the broker on 127.0.0.1:`port`, subscribes to `filters` at `qos` (0 or 1)
    /// and waits for the SUBACK.
    ///
    /// # Errors
    /// When the broker does not answer within 10 s.
    pub fn start(port: u16, filters: &[&str], qos: u8) -> anyhow::Result<Counter> {
        Self::start_as("sg-bench-counter", port, filters, qos)
    }

    /// [`Counter::start`] with another MQTT client id (several counters on one broker).
    ///
    /// # Errors
    /// When the broker does not answer within 10 s.
    pub fn start_as(
        client_id: &str,
        port: u16,
        filters: &[&str],
        qos: u8,
    ) -> anyhow::Result<Counter> {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let mut opts = MqttOptions::new(client_id, ("127.0.0.1", port));
        opts.set_keep_alive(30);
        let (client, mut eventloop) = AsyncClient::builder(opts).capacity(1000).build();
        let qos = if qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let t = tally.clone();
        let sub = client.clone();
        let filters: Vec<String> = filters.iter().map(|f| (*f).to_owned()).collect();
        let thread = std::thread::Builder::new()
            .name("counter".into())
            .spawn(move || {
                runtime.block_on(async move {
                    for f in &filters {
                        if sub.subscribe(f.clone(), qos).await.is_err() {
                            return;
                        }
                    }
                    let mut pending = filters.len();
                    loop {
                        match eventloop.poll().await {
                            Ok(Event::Incoming(Incoming::Publish(p))) => {
                                let now = elapsed_ns();
                                if let Ok(mut t) = t.lock() {
                                    t.record(&p.payload, now);
                                }
                            }
                            Ok(Event::Incoming(Incoming::SubAck(_))) => {
                                pending = pending.saturating_sub(1);
                                if pending == 0 {
                                    let _ = ready_tx.send(());
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                eprintln!("counting subscriber: {e}");
                                return;
                            }
                        }
                    }
                });
            })?;
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the counting subscriber got no SUBACK within 10 s")?;
        Ok(Counter {
            tally,
            client,
            thread: Some(thread),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Tally> {
        self.tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets everything counted so far.
    pub fn reset(&self) {
        *self.lock() = Tally::default();
    }

    /// Benchmark messages received so far (with duplicates); cheaper than a snapshot.
    #[must_use]
    pub fn received(&self) -> u64 {
        self.lock().received
    }

    /// What was counted so far.
    #[must_use]
    pub fn snapshot(&self) -> Tally {
        self.lock().clone()
    }

    /// Waits until `unique` distinct messages arrived, nothing new came for `idle`, or `max`
    /// passed; returns the tally.
    ///
    /// # Errors
    /// When the subscriber's thread ended.
    pub fn wait_for(&self, unique: u64, idle: Duration, max: Duration) -> anyhow::Result<Tally> {
        let alive = || self.thread.as_ref().is_some_and(|t| !t.is_finished());
        wait_tally(&self.tally, &alive, unique, idle, max)
            .context("the counting subscriber stopped")
    }
}

/// Waits until `tally` holds `unique` distinct messages, nothing new came for `idle`, or
/// `max` passed; returns a snapshot. `None` when `alive` says the counting thread ended.
pub(crate) fn wait_tally(
    tally: &Mutex<Tally>,
    alive: &dyn Fn() -> bool,
    unique: u64,
    idle: Duration,
    max: Duration,
) -> Option<Tally> {
    let lock = || {
        tally
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let until = Instant::now() + max;
    let mut last = (u64::MAX, Instant::now());
    loop {
        let (got, distinct) = {
            let t = lock();
            (t.received, t.unique)
        };
        if distinct >= unique || Instant::now() > until {
            break;
        }
        if got != last.0 {
            last = (got, Instant::now());
        } else if last.1.elapsed() > idle {
            break;
        }
        if !alive() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(lock().clone())
}

impl Drop for Counter {
    fn drop(&mut self) {
        let _ = self.client.try_disconnect();
        if let Some(t) = self.thread.take() {
            let until = Instant::now() + Duration::from_secs(2);
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(client: u32, seq: u64) -> Vec<u8> {
        let mut p = Vec::new();
        sn::stamp_into(&mut p, client, seq, 0, 24);
        p
    }

    #[test]
    fn counts_duplicates_and_reordering_per_client() {
        let mut t = Tally::default();
        for (c, s) in [(1, 0), (1, 2), (1, 1), (1, 2), (2, 0), (2, 1)] {
            t.record(&stamp(c, s), 5_000);
        }
        t.record(b"short", 5_000);
        assert_eq!(t.latency.len(), 5, "one latency per distinct message");
        assert_eq!(
            (
                t.received,
                t.unique,
                t.duplicates,
                t.reordered,
                t.malformed,
                t.clients()
            ),
            (6, 5, 1, 1, 1, 2)
        );
    }
}
