//! `[coap]`: the CoAP ingress's UDP listeners and its core's settings (RFC 7252 transmission
//! parameters, the acknowledgement wait, and every bound).
//!
//! Invariants:
//! - The defaults are [`CoreConfig::default`]'s (RFC 7252's where the RFC names the
//!   parameter); the raw section's defaults are written from it, so the two cannot drift.
//! - `listen = []` (the default) or no `[coap]` table: CoAP is off ([`super::Config::coap`]
//!   is `None`); the other keys are still checked.
//! - A `[coap] listen` address never takes the UDP port of an `[mqttsn] listen` address
//!   (same port and family, same address or either one a wildcard): one port, one protocol.
//!   Port 0 (a port the kernel picks) never clashes.

use std::net::SocketAddr;
use std::time::Duration;

use sensorgate_bridges::mqtt::MAX_SUBSCRIPTIONS;
use serde::Deserialize;

use super::check::{duration_in, int_in, queue_full_policy, size_in};
use super::diag::{KeyPath, Reporter};
use super::units;
use super::{DurationText, Number, SizeText};
use crate::coap::core::CoreConfig;
use crate::mqttsn::core::QueueFull;

/// CoAP's registered UDP port (RFC 7252 section 12.6), for hints.
pub const COAP_PORT: u16 = 5683;

/// The most `max_message_size` may be: `coap-lite` refuses to encode a larger message.
const MAX_MESSAGE_SIZE: u64 = 1280;

/// `[coap]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CoapSection {
    /// UDP listen addresses (plain). With `dtls_listen`, never both empty: that switches CoAP
    /// off.
    pub listen: Vec<SocketAddr>,
    /// DTLS listen addresses (`dtls_listen`, default port 5684; bound after `listen`).
    pub dtls_listen: Vec<SocketAddr>,
    /// `SO_RCVBUF` request for each socket, in bytes.
    pub recv_buffer: usize,
    /// `SO_SNDBUF` request for each socket, in bytes.
    pub send_buffer: usize,
    /// Datagrams read per wake-up before the core's output is flushed.
    pub recv_batch: usize,
    /// The protocol core's settings.
    pub core: CoreConfig,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct RawCoap {
    listen: Vec<String>,
    dtls_listen: Vec<String>,
    recv_buffer: SizeText,
    send_buffer: SizeText,
    recv_batch: i64,
    max_message_size: SizeText,
    max_body_size: SizeText,
    block_size: SizeText,
    ack_timeout: DurationText,
    ack_random_factor: Number,
    max_retransmit: i64,
    nstart: i64,
    probing_rate: i64,
    exchange_lifetime: DurationText,
    non_lifetime: DurationText,
    ack_wait: DurationText,
    busy_max_age: DurationText,
    max_peers: i64,
    dedup_per_peer: i64,
    max_exchanges_per_peer: i64,
    max_observers: i64,
    max_observers_per_peer: i64,
    max_filters: i64,
    max_queued_per_observer: i64,
    queue_full: String,
    notification_check_count: i64,
    notification_check_interval: DurationText,
    observer_ping_interval: DurationText,
    block_lifetime: DurationText,
    reassembly_bytes: SizeText,
    max_block2_bodies: i64,
    max_retained: i64,
    max_client_id_len: i64,
    require_identity: bool,
}

impl Default for RawCoap {
    fn default() -> Self {
        let d = CoreConfig::default();
        let size = |bytes: usize| SizeText(units::format_size(bytes as u64));
        let duration = |d: Duration| DurationText(humantime::format_duration(d).to_string());
        let int = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        RawCoap {
            listen: Vec::new(),
            dtls_listen: Vec::new(),
            recv_buffer: "8MiB".into(),
            send_buffer: "4MiB".into(),
            recv_batch: 64,
            max_message_size: size(d.max_message_size),
            max_body_size: size(d.max_body_size),
            block_size: size(d.block_size),
            ack_timeout: duration(d.ack_timeout),
            ack_random_factor: Number(d.ack_random_factor),
            max_retransmit: i64::from(d.max_retransmit),
            nstart: int(d.nstart),
            probing_rate: i64::from(d.probing_rate),
            exchange_lifetime: duration(d.exchange_lifetime),
            non_lifetime: duration(d.non_lifetime),
            ack_wait: duration(d.ack_wait),
            busy_max_age: duration(Duration::from_secs(u64::from(d.busy_max_age))),
            max_peers: int(d.max_peers),
            dedup_per_peer: int(d.dedup_per_peer),
            max_exchanges_per_peer: int(d.max_exchanges_per_peer),
            max_observers: int(d.max_observers),
            max_observers_per_peer: int(d.max_observers_per_peer),
            max_filters: int(d.max_filters),
            max_queued_per_observer: int(d.max_queued_per_observer),
            queue_full: match d.queue_full {
                QueueFull::DropOldest => "drop_oldest".into(),
                QueueFull::DropNew => "drop_new".into(),
            },
            notification_check_count: i64::from(d.notification_check_count),
            notification_check_interval: duration(d.notification_check_interval),
            observer_ping_interval: duration(d.observer_ping_interval),
            block_lifetime: duration(d.block_lifetime),
            reassembly_bytes: size(d.reassembly_bytes),
            max_block2_bodies: int(d.max_block2_bodies),
            max_retained: int(d.max_retained),
            max_client_id_len: int(d.max_client_id_len),
            require_identity: d.require_identity,
        }
    }
}

/// Whether two UDP listen addresses would take the same port: same port (not 0) and family,
/// and the same address or either one the family's wildcard. IPv6 sockets are v6-only, so
/// `0.0.0.0:P` and `[::]:P` do not clash.
pub(super) fn same_udp_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// MAX_TRANSMIT_SPAN + PROCESSING_DELAY (RFC 7252 section 4.8.2) for these transmission
/// parameters: how long after its first transmission a request may still be retransmitted
/// and processed, so the least a Message ID must be remembered to never publish one request
/// twice. (The RFC's EXCHANGE_LIFETIME adds 2 * MAX_LATENCY, 200 s, for slow networks.)
fn min_exchange_lifetime(ack_timeout: Duration, factor: f64, max_retransmit: u8) -> Duration {
    let retransmits = (1u64 << max_retransmit.min(16)) - 1;
    let span = ack_timeout.as_secs_f64() * retransmits as f64 * factor;
    // Whole milliseconds, rounded up, so the message prints plainly.
    let span_ms = (span * 1000.0).ceil();
    let span = if span_ms.is_finite() && span_ms >= 0.0 {
        Duration::from_millis(span_ms as u64)
    } else {
        Duration::MAX
    };
    span.saturating_add(ack_timeout)
}

/// `[coap]`; `None` when a key is wrong (reported). `mqttsn_listen` are the `[mqttsn]`
/// listen addresses that parsed (for the port clash check).
pub(super) fn compile_coap(
    c: &RawCoap,
    mqttsn_listen: &[SocketAddr],
    r: &mut Reporter<'_>,
) -> Option<CoapSection> {
    let co = KeyPath::root("coap");
    let mut ok = true;
    let mut listen: Vec<SocketAddr> = Vec::new();
    for (i, addr) in c.listen.iter().enumerate() {
        let path = co.key("listen").index(i);
        match addr.parse::<SocketAddr>() {
            Ok(a) if listen.contains(&a) => {
                r.at_path(&path, format!("`{addr}` is listed twice"), None);
                ok = false;
            }
            Ok(a) if listen.iter().any(|l| same_udp_port(a, *l)) => {
                r.at_path(
                    &path,
                    format!("`{addr}` takes the UDP port of an address listed before it"),
                    Some("a wildcard (0.0.0.0, [::]) takes the port on every address".into()),
                );
                ok = false;
            }
            Ok(a) => match mqttsn_listen.iter().find(|m| same_udp_port(a, **m)) {
                Some(other) => {
                    r.at_path(
                        &path,
                        format!(
                            "`{addr}` takes the UDP port of [mqttsn] listen `{other}`: a port \
                             serves one protocol"
                        ),
                        Some(format!(
                            "CoAP's port is {COAP_PORT}: write `{}`",
                            SocketAddr::new(a.ip(), COAP_PORT)
                        )),
                    );
                    ok = false;
                }
                None => listen.push(a),
            },
            Err(_) => {
                r.at_path(
                    &path,
                    format!("`{addr}` is not an IP socket address"),
                    Some(format!(
                        "write `127.0.0.1:{COAP_PORT}` or `[::1]:{COAP_PORT}`"
                    )),
                );
                ok = false;
            }
        }
    }
    let mut dtls_listen: Vec<SocketAddr> = Vec::new();
    for (i, addr) in c.dtls_listen.iter().enumerate() {
        let path = co.key("dtls_listen").index(i);
        match super::dtls::coaps_addr(addr) {
            Some(a) => match listen
                .iter()
                .chain(&dtls_listen)
                .chain(mqttsn_listen)
                .find(|l| same_udp_port(a, **l))
            {
                Some(other) => {
                    r.at_path(
                        &path,
                        format!("`{addr}` takes the UDP port of `{other}`, listed before it"),
                        Some(format!(
                            "CoAP over DTLS's port is {}",
                            super::dtls::COAPS_PORT
                        )),
                    );
                    ok = false;
                }
                None => dtls_listen.push(a),
            },
            None => {
                r.at_path(
                    &path,
                    format!("`{addr}` is not an IP address"),
                    Some("write `127.0.0.1` (port 5684) or `[::1]:5684`".into()),
                );
                ok = false;
            }
        }
    }
    let recv_buffer = size_in(r, &co.key("recv_buffer"), &c.recv_buffer, 4096, 1 << 30);
    let send_buffer = size_in(r, &co.key("send_buffer"), &c.send_buffer, 4096, 1 << 30);
    let recv_batch = int_in::<usize>(r, &co.key("recv_batch"), c.recv_batch, 1, 1024);
    let max_message_size = size_in(
        r,
        &co.key("max_message_size"),
        &c.max_message_size,
        64,
        MAX_MESSAGE_SIZE,
    );
    let max_body_size = size_in(r, &co.key("max_body_size"), &c.max_body_size, 16, 1 << 20);
    let block_size = size_in(r, &co.key("block_size"), &c.block_size, 16, 1024).and_then(|b| {
        if b.is_power_of_two() {
            Some(b)
        } else {
            r.at_path(
                &co.key("block_size"),
                format!(
                    "{} is not a power of two (block sizes are 16B, 32B, ... 512B, 1KiB)",
                    c.block_size.trim()
                ),
                None,
            );
            None
        }
    });
    let ack_timeout = duration_in(
        r,
        &co.key("ack_timeout"),
        &c.ack_timeout,
        Duration::from_millis(100),
        Duration::from_secs(300),
    );
    let ack_random_factor =
        if c.ack_random_factor.0.is_finite() && (1.0..=4.0).contains(&c.ack_random_factor.0) {
            Some(c.ack_random_factor.0)
        } else {
            r.at_path(
                &co.key("ack_random_factor"),
                format!("{} is out of range 1.0..=4.0", c.ack_random_factor.0),
                None,
            );
            None
        };
    let max_retransmit = int_in::<u8>(r, &co.key("max_retransmit"), c.max_retransmit, 0, 10);
    let nstart = int_in::<usize>(r, &co.key("nstart"), c.nstart, 1, 64);
    let probing_rate = int_in::<u32>(r, &co.key("probing_rate"), c.probing_rate, 1, 1_000_000_000);
    let day = Duration::from_secs(24 * 3600);
    let exchange_lifetime = duration_in(
        r,
        &co.key("exchange_lifetime"),
        &c.exchange_lifetime,
        Duration::from_secs(1),
        day,
    );
    if let (Some(lifetime), Some(timeout), Some(factor), Some(retransmit)) = (
        exchange_lifetime,
        ack_timeout,
        ack_random_factor,
        max_retransmit,
    ) {
        let least = min_exchange_lifetime(timeout, factor, retransmit);
        if lifetime < least {
            r.at_path(
                &co.key("exchange_lifetime"),
                format!(
                    "{} is shorter than a client may still retransmit a request ({}: \
                     MAX_TRANSMIT_SPAN + PROCESSING_DELAY of ack_timeout, ack_random_factor and \
                     max_retransmit); a late retransmission would be published twice",
                    c.exchange_lifetime.trim(),
                    humantime::format_duration(least)
                ),
                Some("RFC 7252's EXCHANGE_LIFETIME is 247s".into()),
            );
            ok = false;
        }
    }
    let non_lifetime = duration_in(
        r,
        &co.key("non_lifetime"),
        &c.non_lifetime,
        Duration::from_secs(1),
        day,
    );
    let ack_wait = duration_in(
        r,
        &co.key("ack_wait"),
        &c.ack_wait,
        Duration::ZERO,
        Duration::from_secs(300),
    );
    if let (Some(wait), Some(timeout)) = (ack_wait, ack_timeout)
        && wait >= timeout
    {
        r.at_path(
            &co.key("ack_wait"),
            format!(
                "{} must be shorter than ack_timeout ({}): a client retransmits after about \
                     ack_timeout, so the empty ACK must go out before",
                c.ack_wait.trim(),
                c.ack_timeout.trim()
            ),
            None,
        );
        ok = false;
    }
    let busy_max_age = duration_in(
        r,
        &co.key("busy_max_age"),
        &c.busy_max_age,
        Duration::from_secs(1),
        day,
    )
    .and_then(|age| {
        if age.subsec_nanos() == 0 {
            u32::try_from(age.as_secs()).ok()
        } else {
            r.at_path(
                &co.key("busy_max_age"),
                format!(
                    "{} is not whole seconds (Max-Age counts seconds)",
                    c.busy_max_age.trim()
                ),
                None,
            );
            None
        }
    });
    let max_peers = int_in::<usize>(r, &co.key("max_peers"), c.max_peers, 1, 10_000_000);
    let dedup_per_peer = int_in::<usize>(r, &co.key("dedup_per_peer"), c.dedup_per_peer, 1, 1024);
    let max_exchanges_per_peer = int_in::<usize>(
        r,
        &co.key("max_exchanges_per_peer"),
        c.max_exchanges_per_peer,
        1,
        1024,
    );
    let max_observers =
        int_in::<usize>(r, &co.key("max_observers"), c.max_observers, 1, 10_000_000);
    let max_observers_per_peer = int_in::<usize>(
        r,
        &co.key("max_observers_per_peer"),
        c.max_observers_per_peer,
        1,
        65_536,
    );
    let max_filters = int_in::<usize>(
        r,
        &co.key("max_filters"),
        c.max_filters,
        1,
        MAX_SUBSCRIPTIONS as i64,
    );
    let max_queued_per_observer = int_in::<usize>(
        r,
        &co.key("max_queued_per_observer"),
        c.max_queued_per_observer,
        1,
        1_000_000,
    );
    let queue_full = queue_full_policy(r, &co.key("queue_full"), &c.queue_full);
    let notification_check_count = int_in::<u32>(
        r,
        &co.key("notification_check_count"),
        c.notification_check_count,
        1,
        1_000_000,
    );
    let month = Duration::from_secs(30 * 24 * 3600);
    let notification_check_interval = duration_in(
        r,
        &co.key("notification_check_interval"),
        &c.notification_check_interval,
        Duration::from_secs(1),
        month,
    );
    let observer_ping_interval = duration_in(
        r,
        &co.key("observer_ping_interval"),
        &c.observer_ping_interval,
        Duration::ZERO,
        month,
    )
    .and_then(|d| {
        if d.is_zero() || d >= Duration::from_secs(1) {
            Some(d)
        } else {
            r.at_path(
                &co.key("observer_ping_interval"),
                format!(
                    "{} is too short: write \"0s\" (off) or at least \"1s\"",
                    c.observer_ping_interval.trim()
                ),
                None,
            );
            None
        }
    });
    let block_lifetime = duration_in(
        r,
        &co.key("block_lifetime"),
        &c.block_lifetime,
        Duration::from_secs(1),
        day,
    );
    let reassembly_bytes = size_in(
        r,
        &co.key("reassembly_bytes"),
        &c.reassembly_bytes,
        1 << 10,
        4 << 30,
    );
    if let (Some(body), Some(budget)) = (max_body_size, reassembly_bytes)
        && body > budget
    {
        r.at_path(
            &co.key("max_body_size"),
            format!(
                "{} is larger than reassembly_bytes ({}): a Block1 upload that large could \
                     never be reassembled",
                c.max_body_size.trim(),
                c.reassembly_bytes.trim()
            ),
            None,
        );
        ok = false;
    }
    let max_block2_bodies = int_in::<usize>(
        r,
        &co.key("max_block2_bodies"),
        c.max_block2_bodies,
        1,
        1_000_000,
    );
    let max_retained = int_in::<usize>(r, &co.key("max_retained"), c.max_retained, 0, 10_000_000);
    let max_client_id_len =
        int_in::<usize>(r, &co.key("max_client_id_len"), c.max_client_id_len, 1, 255);

    let core = CoreConfig {
        max_message_size: max_message_size?,
        max_body_size: max_body_size?,
        block_size: block_size?,
        ack_timeout: ack_timeout?,
        ack_random_factor: ack_random_factor?,
        max_retransmit: max_retransmit?,
        nstart: nstart?,
        probing_rate: probing_rate?,
        exchange_lifetime: exchange_lifetime?,
        non_lifetime: non_lifetime?,
        ack_wait: ack_wait?,
        busy_max_age: busy_max_age?,
        max_peers: max_peers?,
        dedup_per_peer: dedup_per_peer?,
        max_exchanges_per_peer: max_exchanges_per_peer?,
        max_observers: max_observers?,
        max_observers_per_peer: max_observers_per_peer?,
        max_filters: max_filters?,
        max_queued_per_observer: max_queued_per_observer?,
        queue_full: queue_full?,
        notification_check_count: notification_check_count?,
        notification_check_interval: notification_check_interval?,
        observer_ping_interval: observer_ping_interval?,
        block_lifetime: block_lifetime?,
        reassembly_bytes: reassembly_bytes?,
        max_block2_bodies: max_block2_bodies?,
        max_retained: max_retained?,
        max_client_id_len: max_client_id_len?,
        require_identity: c.require_identity,
        // Set by `config::compile` from `[[acl]]` and `[limits]`.
        security: std::sync::Arc::default(),
    };
    ok.then_some(CoapSection {
        listen,
        dtls_listen,
        recv_buffer: recv_buffer?,
        send_buffer: send_buffer?,
        recv_batch: recv_batch?,
        core,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_clash_on_the_same_address_or_a_wildcard_of_the_family() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(same_udp_port(a("127.0.0.1:1883"), a("127.0.0.1:1883")));
        assert!(same_udp_port(a("127.0.0.1:1883"), a("0.0.0.0:1883")));
        assert!(same_udp_port(a("[::]:1883"), a("[::1]:1883")));
        assert!(!same_udp_port(a("0.0.0.0:1883"), a("[::]:1883")));
        assert!(!same_udp_port(a("127.0.0.1:1883"), a("127.0.0.2:1883")));
        assert!(!same_udp_port(a("127.0.0.1:5683"), a("127.0.0.1:1883")));
        assert!(!same_udp_port(a("127.0.0.1:0"), a("127.0.0.1:0")));
    }

    #[test]
    fn the_rfc_defaults_give_47_seconds_of_retransmission() {
        // RFC 7252 section 4.8.2: MAX_TRANSMIT_SPAN 45 s, PROCESSING_DELAY 2 s.
        assert_eq!(
            min_exchange_lifetime(Duration::from_secs(2), 1.5, 4),
            Duration::from_secs(47)
        );
        assert_eq!(
            min_exchange_lifetime(Duration::from_secs(1), 1.0, 0),
            Duration::from_secs(1)
        );
    }
}
