//! sensorgate's benchmark harness: starts mosquitto (and for scenario 8 RabbitMQ) and a
//! release sensorgate on loopback, drives them with emulated MQTT-SN clients ([`generator`];
//! over DTLS with [`dtls`]'s client), CoAP devices ([`coap`]) and HTTP clients ([`http`]),
//! counts what reaches the broker ([`subscriber`]; AMQP: [`amqp`]), compares with a native
//! MQTT publisher ([`baseline`]; AMQP: [`amqp`]), samples the gateway's CPU, memory and disk
//! I/O from `/proc` ([`sys`]) and reports the standard scenarios ([`suite`]) as a table and
//! JSON.
//!
//! Invariants: everything binds to 127.0.0.0/8 on free ports; every phase is bounded in time
//! and count; every process started is killed when its handle drops.

pub mod amqp;
pub mod baseline;
pub mod coap;
pub mod dtls;
pub mod generator;
pub mod http;
pub mod procs;
pub mod serial;
pub mod sn;
pub mod storm;
pub mod subscriber;
pub mod suite;
pub mod sys;

use std::sync::OnceLock;
use std::time::Instant;

use hdrhistogram::Histogram;

/// The instant all send stamps and arrival times are measured from.
pub static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since [`EPOCH`].
#[must_use]
pub fn elapsed_ns() -> u64 {
    u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A latency histogram in µs, 1 µs to 100 s, 3 significant digits.
#[must_use]
#[allow(clippy::expect_used)]
pub fn new_histogram() -> Histogram<u64> {
    // Constant bounds that hdrhistogram accepts: this cannot fail.
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds")
}
