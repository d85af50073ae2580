//! `/metrics`: a [`Snapshot`] in the Prometheus exposition formats (OpenMetrics text by
//! default, the classic text format 0.0.4 for scrapers that ask for it), via
//! `prometheus-client`.
//!
//! Names follow Prometheus conventions: `sensorgate_` prefix, base units in the name
//! (`_seconds`, `_bytes`), counters end in `_total`; labels `protocol`, `qos`, `reason`,
//! `state`, `upstream`. The README's "Observing a gateway" section lists every series: a
//! renamed series breaks dashboards, so names are added, never changed.
//!
//! Every value comes from the snapshot: nothing is registered or counted here, the registry
//! is built per scrape around one collector.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use sensorgate_bridges::telemetry::HistogramSnapshot;

use super::model::{DownlinkDropReason, RefusalReason, SessionState};
use super::process::ProcessStats;
use super::snapshot::Snapshot;

/// Which text format a scraper asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/openmetrics-text; version=1.0.0`.
    OpenMetrics,
    /// `text/plain; version=0.0.4`.
    Prometheus,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when it names it, else the
    /// classic text format (what `curl` and older scrapers get).
    #[must_use]
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    /// The response's `Content-Type`.
    #[must_use]
    pub const fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// The exposition of `snapshot` and `process`.
///
/// # Errors
/// Only if formatting fails, which writing to a `String` does not.
pub fn render(
    snapshot: Snapshot,
    process: ProcessStats,
    format: Format,
) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector { snapshot, process }));
    let mut out = String::new();
    match format {
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry)?,
        Format::Prometheus => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
        }
    }
    Ok(out)
}

#[derive(Debug)]
struct SnapshotCollector {
    snapshot: Snapshot,
    process: ProcessStats,
}

type Labels = Vec<(&'static str, String)>;

/// Writes families of samples, one descriptor each.
struct Out<'a, 'b> {
    enc: &'a mut DescriptorEncoder<'b>,
}

impl Out<'_, '_> {
    /// One family: its descriptor, then each labelled sample.
    fn family<M: EncodeMetric>(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        samples: impl IntoIterator<Item = (Labels, M)>,
    ) -> std::fmt::Result {
        let mut family = self.enc.encode_descriptor(name, help, None, kind)?;
        for (labels, metric) in samples {
            metric.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// One family of a single unlabelled sample.
    fn single<M: EncodeMetric>(&mut self, name: &str, help: &str, metric: M) -> std::fmt::Result {
        let family = self
            .enc
            .encode_descriptor(name, help, None, metric.metric_type())?;
        metric.encode(family)
    }

    fn counter(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) -> std::fmt::Result {
        let samples = samples.into_iter().map(|(l, v)| (l, ConstCounter::new(v)));
        self.family(name, help, MetricType::Counter, samples)
    }

    fn counter_f64(&mut self, name: &str, help: &str, value: f64) -> std::fmt::Result {
        self.single(name, help, ConstCounter::new(value))
    }

    fn gauge(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, i64)>,
    ) -> std::fmt::Result {
        let samples = samples.into_iter().map(|(l, v)| (l, ConstGauge::new(v)));
        self.family(name, help, MetricType::Gauge, samples)
    }

    fn gauge_f64(&mut self, name: &str, help: &str, value: f64) -> std::fmt::Result {
        self.single(name, help, ConstGauge::new(value))
    }

    fn histogram(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, HistogramSnapshot)>,
    ) -> std::fmt::Result {
        let mut family = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (labels, h) in samples {
            // The encoder takes each bucket's own count (it accumulates them itself) and the
            // `+Inf` bucket last; the snapshot's counts are cumulative.
            let mut below = 0;
            let mut buckets: Vec<(f64, u64)> = h
                .buckets
                .iter()
                .map(|&(bound, cumulative)| {
                    let own = cumulative.saturating_sub(below);
                    below = cumulative;
                    (bound, own)
                })
                .collect();
            buckets.push((f64::INFINITY, h.count.saturating_sub(below)));
            family
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(h.sum_secs, h.count, &buckets, None)?;
        }
        Ok(())
    }
}

fn no_labels() -> Labels {
    Vec::new()
}

/// A gauge value from a count (saturating: a gauge is an i64).
fn g(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        let s = &self.snapshot;
        let mut out = Out { enc: &mut enc };

        out.gauge(
            "sensorgate_build_info",
            "The running build: its version (value always 1).",
            [(
                vec![
                    ("version", env!("CARGO_PKG_VERSION").to_owned()),
                    (
                        "profile",
                        if cfg!(debug_assertions) {
                            "debug"
                        } else {
                            "release"
                        }
                        .to_owned(),
                    ),
                ],
                1,
            )],
        )?;
        out.gauge_f64(
            "sensorgate_uptime_seconds",
            "Seconds since the gateway started.",
            s.uptime.as_secs_f64(),
        )?;
        let health = s.health();
        out.gauge(
            "sensorgate_ready",
            "1 while the gateway serves (listeners bound, spool open, loops turning), else 0.",
            [(no_labels(), i64::from(health.ready))],
        )?;
        out.gauge(
            "sensorgate_degraded",
            "1 while serving with a reason (an upstream down, the spool full), else 0.",
            [(
                no_labels(),
                i64::from(health.state == super::status::Health::Degraded),
            )],
        )?;

        // Southbound, per protocol.
        let reports: Vec<_> = s
            .ingresses
            .iter()
            .filter_map(|i| i.report.as_ref().map(|r| (i.protocol, r)))
            .collect();
        let proto = |p: &'static str| vec![("protocol", p.to_owned())];
        out.gauge(
            "sensorgate_sessions",
            "Sessions by protocol and state.",
            reports.iter().flat_map(|(p, r)| {
                SessionState::ALL.into_iter().map(move |st| {
                    (
                        vec![
                            ("protocol", (*p).to_owned()),
                            ("state", st.as_str().to_owned()),
                        ],
                        g(r.sessions.get(st)),
                    )
                })
            }),
        )?;
        out.counter(
            "sensorgate_messages_in",
            "Uplink messages accepted, by protocol and QoS (-1, 0, 1, 2).",
            reports.iter().flat_map(|(p, r)| {
                ["-1", "0", "1", "2"]
                    .into_iter()
                    .zip(r.counters.messages_in)
                    .map(move |(q, n)| {
                        (
                            vec![("protocol", (*p).to_owned()), ("qos", q.to_owned())],
                            n,
                        )
                    })
            }),
        )?;
        out.counter(
            "sensorgate_packets_in",
            "Datagrams, requests or frames received, valid or not, by protocol.",
            reports
                .iter()
                .map(|(p, r)| (proto(p), r.counters.packets_in)),
        )?;
        out.counter(
            "sensorgate_acks",
            "Acknowledgements of accepted QoS 1/2 uplink (sent once durable), by protocol.",
            reports.iter().map(|(p, r)| (proto(p), r.counters.acks)),
        )?;
        out.counter(
            "sensorgate_refusals",
            "Uplink refused (a return code sent, or the packet dropped), by protocol and reason.",
            reports.iter().flat_map(|(p, r)| {
                RefusalReason::ALL
                    .into_iter()
                    .zip(r.counters.refusals)
                    .map(move |(reason, n)| {
                        (
                            vec![
                                ("protocol", (*p).to_owned()),
                                ("reason", reason.as_str().to_owned()),
                            ],
                            n,
                        )
                    })
            }),
        )?;
        out.counter(
            "sensorgate_downlink_delivered",
            "Downlink messages delivered to clients (acknowledged, or sent at QoS 0).",
            reports
                .iter()
                .map(|(p, r)| (proto(p), r.counters.downlink_delivered)),
        )?;
        out.counter(
            "sensorgate_downlink_retransmitted",
            "Downlink retransmissions to clients.",
            reports
                .iter()
                .map(|(p, r)| (proto(p), r.counters.downlink_retransmitted)),
        )?;
        out.counter(
            "sensorgate_downlink_dropped",
            "Downlink messages not delivered to a client, by protocol and reason.",
            reports.iter().flat_map(|(p, r)| {
                DownlinkDropReason::ALL
                    .into_iter()
                    .zip(r.counters.downlink_dropped)
                    .map(move |(reason, n)| {
                        (
                            vec![
                                ("protocol", (*p).to_owned()),
                                ("reason", reason.as_str().to_owned()),
                            ],
                            n,
                        )
                    })
            }),
        )?;
        out.counter(
            "sensorgate_ingress_queue_dropped",
            "QoS 0/-1 publishes a driver gave up for a full spool queue, by protocol.",
            s.ingresses
                .iter()
                .map(|i| (proto(i.protocol), i.queue_dropped)),
        )?;
        out.counter(
            "sensorgate_udp_kernel_drops",
            "Datagrams the kernel dropped on the gateway's sockets (receive buffer full).",
            s.ingresses
                .iter()
                .filter_map(|i| i.kernel_drops.map(|k| (proto(i.protocol), k))),
        )?;
        out.counter(
            "sensorgate_ingress_events",
            "An ingress's own counters, by protocol and event (HTTP: responses_<status>, \
             connections_opened, verdicts_orphaned, rate_limited ...).",
            s.ingresses.iter().flat_map(|i| {
                i.events.iter().map(move |&(event, n)| {
                    let mut labels = proto(i.protocol);
                    labels.push(("event", event.to_owned()));
                    (labels, n)
                })
            }),
        )?;
        out.gauge(
            "sensorgate_ingress_stalled",
            "1 when a protocol driver did not answer the admin in time (stuck loop).",
            s.ingresses
                .iter()
                .map(|i| (proto(i.protocol), i64::from(i.report.is_none()))),
        )?;

        // The serial lines (label `line`: the index in `[[serial]]`).
        let line = |i: usize| vec![("line", i.to_string())];
        out.gauge(
            "sensorgate_serial_up",
            "1 while a serial line's device is open, by line (index in [[serial]]) and device.",
            s.serial.iter().enumerate().map(|(i, l)| {
                let mut labels = line(i);
                labels.push(("device", l.device.clone()));
                (labels, i64::from(l.counters.up))
            }),
        )?;
        out.counter(
            "sensorgate_serial_frames",
            "Serial line frames by line and event: in, out, write_dropped (queue full or line \
             down), encapsulated_dropped (0xFE on a line that is not a forwarder's), bad_crc, \
             oversize, truncated; garbage counts bytes skipped while resynchronising.",
            s.serial.iter().enumerate().flat_map(|(i, l)| {
                l.counters
                    .counters_by_event()
                    .into_iter()
                    .map(move |(event, n)| {
                        let mut labels = line(i);
                        labels.push(("event", event.to_owned()));
                        (labels, n)
                    })
            }),
        )?;
        out.counter(
            "sensorgate_serial_bytes",
            "Bytes read (in) and written (out) on a serial line.",
            s.serial.iter().enumerate().flat_map(|(i, l)| {
                [("in", l.counters.bytes_in), ("out", l.counters.bytes_out)]
                    .into_iter()
                    .map(move |(direction, n)| {
                        let mut labels = line(i);
                        labels.push(("direction", direction.to_owned()));
                        (labels, n)
                    })
            }),
        )?;
        out.counter(
            "sensorgate_serial_reopens",
            "Times a serial line's device was opened again after it went down.",
            s.serial
                .iter()
                .enumerate()
                .map(|(i, l)| (line(i), l.counters.reopens)),
        )?;

        // The spool.
        let sp = &s.spool;
        let st = &sp.stats;
        out.gauge(
            "sensorgate_spool_records",
            "Records held for the slowest upstream.",
            [(no_labels(), g(sp.records))],
        )?;
        out.gauge(
            "sensorgate_spool_bytes",
            "Bytes of spool segment files.",
            [(no_labels(), g(st.bytes))],
        )?;
        out.gauge(
            "sensorgate_spool_max_bytes",
            "The spool's limit ([spool] max_bytes).",
            [(no_labels(), g(sp.max_bytes))],
        )?;
        out.gauge(
            "sensorgate_spool_segments",
            "Spool segment files.",
            [(no_labels(), g(st.segments))],
        )?;
        out.gauge(
            "sensorgate_spool_oldest_age_seconds",
            "Age of the oldest record held (0 when empty).",
            [(no_labels(), g(sp.oldest_age_secs))],
        )?;
        out.gauge(
            "sensorgate_spool_full",
            "1 while an append would be refused for want of room (spool or disk).",
            [(no_labels(), i64::from(sp.refusing))],
        )?;
        out.counter(
            "sensorgate_spool_appends",
            "Records appended.",
            [(no_labels(), st.appended)],
        )?;
        out.counter(
            "sensorgate_spool_refused",
            "Appends refused, by reason (full: the spool; queue_full: the writer's queue).",
            [
                (vec![("reason", "full".to_owned())], st.rejected_full),
                (vec![("reason", "queue_full".to_owned())], sp.queue_full),
            ],
        )?;
        out.counter(
            "sensorgate_spool_dropped",
            "Records given up unforwarded, by reason.",
            [
                (
                    vec![("reason", "drop_oldest".to_owned())],
                    st.dropped_oldest,
                ),
                (vec![("reason", "expired".to_owned())], st.expired),
                (vec![("reason", "corrupt".to_owned())], st.corrupt),
            ],
        )?;
        out.counter(
            "sensorgate_spool_fsyncs",
            "Successful data fsyncs.",
            [(no_labels(), st.syncs)],
        )?;
        out.histogram(
            "sensorgate_spool_fsync_duration_seconds",
            "Duration of the spool's data fsyncs.",
            [(no_labels(), sp.fsync_latency.clone())],
        )?;
        out.counter(
            "sensorgate_spool_errors",
            "Failed spool writes and fsyncs, by operation.",
            [
                (vec![("op", "write".to_owned())], st.write_errors),
                (vec![("op", "fsync".to_owned())], st.sync_errors),
            ],
        )?;
        out.counter(
            "sensorgate_spool_written_bytes",
            "Record and header bytes written.",
            [(no_labels(), st.bytes_written)],
        )?;
        out.counter(
            "sensorgate_spool_reads",
            "Records the drains read, by source (memory: the fast path; disk: backlog).",
            [
                (vec![("source", "memory".to_owned())], st.read_memory),
                (vec![("source", "disk".to_owned())], st.read_disk),
            ],
        )?;

        // Per upstream.
        let up = |u: &super::snapshot::UpstreamSnap| {
            vec![("upstream", u.name.clone()), ("kind", u.kind.to_owned())]
        };
        let ups = &s.upstreams;
        out.gauge(
            "sensorgate_upstream_connected",
            "1 while the upstream's link is up.",
            ups.iter().map(|u| (up(u), i64::from(u.link.connected))),
        )?;
        out.counter(
            "sensorgate_upstream_connects",
            "Connections established (every one after the first is a reconnect).",
            ups.iter().map(|u| (up(u), u.link.connects)),
        )?;
        out.counter(
            "sensorgate_upstream_reconnects",
            "Connections established after the first (the link was lost and made again).",
            ups.iter()
                .map(|u| (up(u), u.link.connects.saturating_sub(1))),
        )?;
        out.counter(
            "sensorgate_upstream_connect_failures",
            "Connection attempts that failed.",
            ups.iter().map(|u| (up(u), u.link.failed_attempts)),
        )?;
        out.counter(
            "sensorgate_upstream_forwarded",
            "Messages the broker acknowledged (QoS >= 1) or was handed (QoS 0).",
            ups.iter().map(|u| (up(u), u.forwarded)),
        )?;
        out.gauge(
            "sensorgate_upstream_in_flight",
            "Messages sent and not yet acknowledged.",
            ups.iter().map(|u| (up(u), g(u.in_flight))),
        )?;
        out.gauge(
            "sensorgate_upstream_backlog_records",
            "Records waiting for the upstream.",
            ups.iter().map(|u| (up(u), g(u.backlog.records))),
        )?;
        out.gauge(
            "sensorgate_upstream_backlog_bytes",
            "Bytes of the spool segments holding its backlog (an upper bound).",
            ups.iter().map(|u| (up(u), g(u.backlog.bytes))),
        )?;
        out.gauge(
            "sensorgate_upstream_backlog_age_seconds",
            "Age of the oldest record waiting for the upstream (0 when none).",
            ups.iter().map(|u| (up(u), g(u.backlog.oldest_age_secs))),
        )?;
        out.histogram(
            "sensorgate_upstream_ack_duration_seconds",
            "Time from sending a QoS >= 1 message to the broker's acknowledgement.",
            ups.iter().map(|u| (up(u), u.ack_latency.clone())),
        )?;
        out.counter(
            "sensorgate_upstream_events",
            "The upstream kind's own counters, by event (MQTT: published, acknowledged, \
             deferred, downlink_received ...; AMQP: published, acknowledged, nacked, returned ...).",
            ups.iter().flat_map(|u| {
                u.events.iter().map(move |&(event, n)| {
                    let mut labels = up(u);
                    labels.push(("event", event.to_owned()));
                    (labels, n)
                })
            }),
        )?;
        out.counter(
            "sensorgate_upstream_resent",
            "Messages sent again after a connection loss.",
            ups.iter().map(|u| (up(u), u.resent)),
        )?;
        out.counter(
            "sensorgate_upstream_rejected",
            "Messages the broker refused for good (dropped).",
            ups.iter().map(|u| (up(u), u.rejected)),
        )?;
        out.counter(
            "sensorgate_upstream_ack_timeouts",
            "Connections reset because an acknowledgement was overdue.",
            ups.iter().map(|u| (up(u), u.ack_timeouts)),
        )?;
        out.counter(
            "sensorgate_upstream_unrouted",
            "Records no route sends to this upstream (passed over).",
            ups.iter().map(|u| (up(u), u.unrouted)),
        )?;
        out.counter(
            "sensorgate_upstream_backlog_dropped",
            "Records given up for this upstream over its max_backlog.",
            ups.iter().map(|u| (up(u), u.backlog_dropped)),
        )?;

        // The router.
        let r = &s.router;
        out.counter(
            "sensorgate_router_no_route",
            "Uplink messages refused because no route takes their topic.",
            [(no_labels(), r.refused_no_route)],
        )?;
        out.counter(
            "sensorgate_router_downlink_received",
            "Downlink messages taken from the upstreams (before routing and fan-out).",
            [(no_labels(), r.downlink_received)],
        )?;
        out.counter(
            "sensorgate_router_downlink_dropped",
            "Downlink from upstreams not handed to any ingress, by reason.",
            [
                (vec![("reason", "unrouted".to_owned())], r.downlink_unrouted),
                (
                    vec![("reason", "unmatched".to_owned())],
                    r.downlink_unmatched,
                ),
                (
                    vec![("reason", "ingress_gone".to_owned())],
                    r.downlink_ingress_gone,
                ),
            ],
        )?;
        out.counter(
            "sensorgate_router_local_dropped",
            "Local copies (sensor to sensor) lost to a full ingress channel.",
            [(no_labels(), r.local_dropped)],
        )?;
        out.counter(
            "sensorgate_router_control",
            "Messages on an upstream's control topic (fleet replay requests), by outcome.",
            [
                (vec![("outcome", "taken".to_owned())], r.control),
                (vec![("outcome", "dropped".to_owned())], r.control_dropped),
            ],
        )?;

        // The fleet view (zero while `[fleet]` is off).
        let f = &s.fleet;
        let outcome = |o: &str| vec![("outcome", o.to_owned())];
        out.counter(
            "sensorgate_fleet_heartbeats",
            "Heartbeats on the upstreams: sent (trimmed: sent without detail), skipped (link down or queue full, or too large).",
            [
                (outcome("sent"), f.heartbeats_sent),
                (outcome("trimmed"), f.heartbeats_trimmed),
                (outcome("skipped"), f.heartbeats_skipped),
            ],
        )?;
        out.counter(
            "sensorgate_fleet_events",
            "Event messages on the upstreams: sent (per upstream), skipped (link down or queue full), rate_limited, lagged (the publisher fell behind).",
            [
                (outcome("sent"), f.events_sent),
                (outcome("skipped"), f.events_skipped),
                (outcome("rate_limited"), f.events_rate_limited),
                (outcome("lagged"), f.events_lagged),
            ],
        )?;
        out.counter(
            "sensorgate_fleet_replay_requests",
            "Replay requests: served (answered ok), refused (answered), unanswered (over the rate of answered refusals).",
            [
                (outcome("served"), f.replays_served),
                (outcome("refused"), f.replays_refused),
                (outcome("unanswered"), f.replays_unanswered),
            ],
        )?;
        out.counter(
            "sensorgate_fleet_replayed_records",
            "Records published again by replays, with their original sequence ids.",
            [(no_labels(), f.replayed_records)],
        )?;

        // The process (the names every client library uses).
        let p = &self.process;
        if let Some(cpu) = p.cpu_secs {
            out.counter_f64(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                cpu,
            )?;
        }
        let process_gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                p.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                p.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                p.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                p.max_fds,
            ),
            ("process_threads", "Number of OS threads.", p.threads),
        ];
        for (name, help, value) in process_gauges {
            if let Some(v) = value {
                out.gauge(name, help, [(no_labels(), g(v))])?;
            }
        }
        out.gauge_f64(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds.",
            (s.now_ms as f64 / 1000.0) - s.uptime.as_secs_f64(),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::snapshot::tests::serving;

    #[test]
    fn both_formats_name_counters_with_total_and_end_histograms_with_inf() {
        let mut s = serving();
        if let Some(i) = s.ingresses.first_mut() {
            i.events = vec![("verdicts_orphaned", 2)];
        }
        s.spool.fsync_latency = HistogramSnapshot {
            buckets: vec![(0.001, 3), (0.01, 4)],
            count: 5,
            sum_secs: 0.5,
        };
        let om = render(s.clone(), ProcessStats::default(), Format::OpenMetrics).unwrap();
        assert!(om.ends_with("# EOF\n"));
        assert!(om.contains("# TYPE sensorgate_messages_in counter\n"));
        assert!(om.contains("sensorgate_messages_in_total{protocol=\"mqtt-sn\",qos=\"1\"} 5\n"));
        assert!(om.contains("sensorgate_sessions{protocol=\"mqtt-sn\",state=\"active\"} 2\n"));
        for (le, n) in [("0.001", 3), ("0.01", 4), ("+Inf", 5)] {
            assert!(
                om.contains(&format!(
                    "sensorgate_spool_fsync_duration_seconds_bucket{{le=\"{le}\"}} {n}\n"
                )),
                "{om}"
            );
        }
        assert!(om.contains("sensorgate_upstream_connected{upstream=\"cloud\",kind=\"mqtt\"} 1\n"));
        assert!(om.contains(
            "sensorgate_upstream_events_total{upstream=\"cloud\",kind=\"mqtt\",event=\"acknowledged\"} 8\n"
        ));
        assert!(om.contains(
            "sensorgate_ingress_events_total{protocol=\"mqtt-sn\",event=\"verdicts_orphaned\"} 2\n"
        ));
        let text = render(s, ProcessStats::default(), Format::Prometheus).unwrap();
        assert!(
            text.contains("# TYPE sensorgate_messages_in_total counter\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"));
        // Values that cannot be read are left out, never invented.
        assert!(!text.contains("process_open_fds"));
    }

    #[test]
    fn serial_lines_are_listed_by_index_with_their_frames_bytes_and_state() {
        use crate::observe::snapshot::SerialSnap;
        use crate::serial::line::LineCounters;
        let mut s = serving();
        s.serial = vec![
            SerialSnap {
                device: "/dev/serial/by-id/usb-FTDI-if00-port0".into(),
                forwarder: false,
                counters: LineCounters {
                    up: true,
                    frames_in: 5,
                    frames_out: 4,
                    bytes_in: 60,
                    bytes_out: 40,
                    truncated: 1,
                    ..LineCounters::default()
                },
            },
            SerialSnap {
                device: "/dev/ttyUSB1".into(),
                forwarder: true,
                counters: LineCounters {
                    reopens: 2,
                    write_dropped: 3,
                    ..LineCounters::default()
                },
            },
        ];
        let text = render(s, ProcessStats::default(), Format::OpenMetrics).unwrap();
        for line in [
            "sensorgate_serial_up{line=\"0\",device=\"/dev/serial/by-id/usb-FTDI-if00-port0\"} 1\n",
            "sensorgate_serial_up{line=\"1\",device=\"/dev/ttyUSB1\"} 0\n",
            "sensorgate_serial_frames_total{line=\"0\",event=\"in\"} 5\n",
            "sensorgate_serial_frames_total{line=\"0\",event=\"out\"} 4\n",
            "sensorgate_serial_frames_total{line=\"0\",event=\"truncated\"} 1\n",
            "sensorgate_serial_frames_total{line=\"1\",event=\"write_dropped\"} 3\n",
            "sensorgate_serial_bytes_total{line=\"0\",direction=\"in\"} 60\n",
            "sensorgate_serial_bytes_total{line=\"0\",direction=\"out\"} 40\n",
            "sensorgate_serial_reopens_total{line=\"1\"} 2\n",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn the_accept_header_picks_the_format() {
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
        assert_eq!(Format::from_accept(None), Format::Prometheus);
    }
}
