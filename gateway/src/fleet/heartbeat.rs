//! Heartbeats: every `[fleet] heartbeat`, one status message per upstream on
//! `<topic_prefix>/status`, QoS 0, not retained, never spooled.
//!
//! [`Beats`] is sans-IO: it turns a [`Snapshot`] (the one `/status` is built from) and the
//! spool's sequence ids ([`SeqInfo`]) into one bounded payload per upstream and remembers,
//! per upstream, what the last heartbeat *sent* on it said, so "messages since the last
//! beat" covers the gap after an outage. [`run`] is the thin task around it.
//!
//! Payload: see schemas/status.json. Sequence ids: every record with an id below an
//! upstream's `cursor` was acknowledged by it; ids from `oldest_held_seq` on are still on
//! disk (replayable); `next_seq` is the id the next record gets. A consumer that misses id
//! `n` knows: `n >= cursor`: not yet delivered (held, will come); `oldest_held_seq <= n <
//! cursor`: acknowledged by the broker but not seen by the consumer (still replayable);
//! `n < oldest_held_seq`: gone for good.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use sensorgate_bridges::message::{Message, Qos};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{FleetCounters, FleetCounts, FleetLink, Identity};
use crate::observe::model::SessionState;
use crate::observe::snapshot::{Snapshot, Sources};
use crate::observe::status::{BacklogInfo, Health};

/// What the heartbeat task needs from `[fleet]`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `heartbeat` (non-zero).
    pub period: Duration,
    /// `<topic_prefix>/status`.
    pub topic: String,
    /// `max_message_size`.
    pub max_message_size: usize,
}

/// The spool's sequence ids at the moment of the snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeqInfo {
    /// Per upstream (index): its cursor (every id below it acknowledged).
    pub cursors: Vec<Option<u64>>,
    /// The oldest id the spool may still hold; `None`: it holds nothing.
    pub oldest_held_seq: Option<u64>,
    /// The id the next record gets.
    pub next_seq: u64,
    /// Free bytes on the spool's filesystem; `None`: unknown.
    pub disk_free_bytes: Option<u64>,
}

/// One heartbeat.
#[derive(Debug, Clone, Serialize)]
pub struct StatusBeat<'a> {
    /// `[gateway] id`.
    pub gateway_id: u8,
    /// `[gateway] name`.
    pub gateway_name: &'a str,
    /// The sensorgate version.
    pub version: &'static str,
    /// The upstream this heartbeat went through.
    pub upstream: &'a str,
    /// When it was built (wall clock ms).
    pub at_ms: u64,
    /// When the previous heartbeat sent on this upstream was built (the start at first): the
    /// `messages` window.
    pub since_ms: u64,
    /// `[fleet] heartbeat`, seconds.
    pub interval_secs: u64,
    /// When the process started (wall clock ms).
    pub started_ms: u64,
    /// Seconds since the start.
    pub uptime_secs: u64,
    /// `healthy`, `degraded` or `unhealthy` (as `/status`).
    pub health: Health,
    /// Messages since `since_ms`.
    pub messages: MessagesBeat,
    /// Sessions by protocol, then by state (empty when trimmed).
    pub sessions: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    /// Every upstream (only this one when trimmed).
    pub upstreams: Vec<UpstreamBeat<'a>>,
    /// The spool.
    pub spool: SpoolBeat,
    /// Data given up or refused since the start, by reason.
    pub drops: BTreeMap<&'static str, u64>,
    /// The fleet publishers' own counters since the start.
    pub fleet: FleetCounts,
    /// Whether detail was left out to stay within `max_message_size`.
    pub trimmed: bool,
}

/// Messages in a heartbeat's window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MessagesBeat {
    /// Accepted from sensors, every ingress.
    #[serde(rename = "in")]
    pub messages_in: u64,
    /// Acknowledged by (QoS 0: handed to) this upstream.
    #[serde(rename = "out")]
    pub messages_out: u64,
}

/// One upstream in a heartbeat.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamBeat<'a> {
    /// `[[upstream]] name`.
    pub name: &'a str,
    /// `mqtt` or `amqp`.
    pub kind: &'static str,
    /// Whether its link is up.
    pub connected: bool,
    /// What waits for it.
    pub backlog: BacklogInfo,
    /// Every record with a lower id was acknowledged by it; `null`: unknown.
    pub cursor: Option<u64>,
    /// Acknowledged since the start.
    pub forwarded: u64,
    /// Sent and not yet acknowledged.
    pub in_flight: u64,
}

/// The spool in a heartbeat.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SpoolBeat {
    /// Records held for the slowest upstream.
    pub records: u64,
    /// Bytes of segment files.
    pub bytes: u64,
    /// Age of the oldest record held, seconds.
    pub oldest_age_secs: u64,
    /// The oldest sequence id still held; `null`: none.
    pub oldest_held_seq: Option<u64>,
    /// The id the next record gets.
    pub next_seq: u64,
    /// Whether appends are refused for want of room.
    pub full: bool,
    /// Free bytes on its filesystem; `null`: unknown.
    pub disk_free_bytes: Option<u64>,
}

/// What the last heartbeat sent on one upstream said.
#[derive(Debug, Clone, Copy)]
struct Last {
    at_ms: u64,
    messages_in: u64,
    forwarded: u64,
}

/// The heartbeats' memory, one entry per upstream index.
#[derive(Debug)]
pub struct Beats {
    last: Vec<Last>,
    interval_secs: u64,
    max_message_size: usize,
}

/// A built heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// The JSON payload (at most `max_message_size`).
    pub payload: Vec<u8>,
    /// Whether detail was left out.
    pub trimmed: bool,
}

impl Beats {
    /// Memory for `upstreams` upstreams, started at `started_ms`.
    #[must_use]
    pub fn new(upstreams: usize, started_ms: u64, settings: &Settings) -> Self {
        Beats {
            last: vec![
                Last {
                    at_ms: started_ms,
                    messages_in: 0,
                    forwarded: 0,
                };
                upstreams
            ],
            interval_secs: settings.period.as_secs(),
            max_message_size: settings.max_message_size,
        }
    }

    /// The heartbeat for upstream `index` (of `snap.upstreams`); `None` when even the trimmed
    /// payload exceeds `max_message_size` or the index is unknown. Call [`Self::sent`] once it
    /// went out.
    #[must_use]
    pub fn build(
        &self,
        index: usize,
        identity: &Identity,
        snap: &Snapshot,
        seqs: &SeqInfo,
        fleet: FleetCounts,
    ) -> Option<Built> {
        let own = snap.upstreams.get(index)?;
        let last = self.last.get(index)?;
        let messages_in = total_in(snap);
        let upstreams: Vec<UpstreamBeat<'_>> = snap
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| UpstreamBeat {
                name: &u.name,
                kind: u.kind,
                connected: u.link.connected,
                backlog: u.backlog,
                cursor: seqs.cursors.get(i).copied().flatten(),
                forwarded: u.forwarded,
                in_flight: u.in_flight,
            })
            .collect();
        let st = &snap.spool.stats;
        let drops: BTreeMap<&'static str, u64> = [
            ("drop_oldest", st.dropped_oldest),
            ("expired", st.expired),
            ("corrupt", st.corrupt),
            ("spool_full", st.rejected_full),
            (
                "backlog_limit",
                snap.upstreams.iter().map(|u| u.backlog_dropped).sum(),
            ),
            (
                "upstream_rejected",
                snap.upstreams.iter().map(|u| u.rejected).sum(),
            ),
            (
                "ingress_refused",
                snap.ingresses
                    .iter()
                    .filter_map(|i| i.report.as_ref())
                    .map(|r| r.counters.refusals.iter().sum::<u64>())
                    .sum(),
            ),
        ]
        .into_iter()
        .collect();
        let sessions = snap
            .ingresses
            .iter()
            .filter_map(|i| i.report.as_ref().map(|r| (i.protocol, r)))
            .map(|(protocol, r)| {
                let by_state = SessionState::ALL
                    .into_iter()
                    .map(|s| (s.as_str(), r.sessions.get(s)))
                    .chain([("total", r.sessions.total())])
                    .collect();
                (protocol, by_state)
            })
            .collect();
        let mut beat = StatusBeat {
            gateway_id: identity.gateway_id,
            gateway_name: &identity.gateway_name,
            version: env!("CARGO_PKG_VERSION"),
            upstream: &own.name,
            at_ms: snap.now_ms,
            since_ms: last.at_ms,
            interval_secs: self.interval_secs,
            started_ms: identity.started_ms,
            uptime_secs: snap.uptime.as_secs(),
            health: snap.health().state,
            messages: MessagesBeat {
                messages_in: messages_in.saturating_sub(last.messages_in),
                messages_out: own.forwarded.saturating_sub(last.forwarded),
            },
            sessions,
            upstreams,
            spool: SpoolBeat {
                records: snap.spool.records,
                bytes: st.bytes,
                oldest_age_secs: snap.spool.oldest_age_secs,
                oldest_held_seq: seqs.oldest_held_seq,
                next_seq: seqs.next_seq,
                full: snap.spool.refusing,
                disk_free_bytes: seqs.disk_free_bytes,
            },
            drops,
            fleet,
            trimmed: false,
        };
        let payload = serde_json::to_vec(&beat).ok()?;
        if payload.len() <= self.max_message_size {
            return Some(Built {
                payload,
                trimmed: false,
            });
        }
        beat.trimmed = true;
        beat.sessions.clear();
        beat.upstreams.retain(|u| u.name == own.name);
        let payload = serde_json::to_vec(&beat).ok()?;
        (payload.len() <= self.max_message_size).then_some(Built {
            payload,
            trimmed: true,
        })
    }

    /// The heartbeat built from `snap` went out on upstream `index`: the next one's window
    /// starts here.
    pub fn sent(&mut self, index: usize, snap: &Snapshot) {
        let messages_in = total_in(snap);
        if let (Some(last), Some(own)) = (self.last.get_mut(index), snap.upstreams.get(index)) {
            *last = Last {
                at_ms: snap.now_ms,
                messages_in,
                forwarded: own.forwarded,
            };
        }
    }
}

/// Messages accepted from sensors since the start, every ingress that answered.
fn total_in(snap: &Snapshot) -> u64 {
    snap.ingresses
        .iter()
        .filter_map(|i| i.report.as_ref())
        .map(|r| r.counters.messages_in_total())
        .sum()
}

/// Reads the spool's sequence ids and free disk space (one `statvfs`, under the spool lock).
fn seq_info(sources: &Sources) -> SeqInfo {
    let spool = sources.spool.lock();
    SeqInfo {
        cursors: sources
            .upstreams
            .iter()
            .map(|u| spool.cursor(u.index))
            .collect(),
        oldest_held_seq: spool.oldest_held_seq(),
        next_seq: spool.next_seq(),
        disk_free_bytes: spool.available_bytes(),
    }
}

/// Sends a heartbeat on every link each `settings.period` until `stop`.
pub async fn run(
    settings: Settings,
    identity: Identity,
    sources: Sources,
    links: Vec<FleetLink>,
    counters: Arc<FleetCounters>,
    stop: CancellationToken,
) {
    let mut beats = Beats::new(sources.upstreams.len(), identity.started_ms, &settings);
    let start = tokio::time::Instant::now() + settings.period;
    let mut tick = tokio::time::interval_at(start, settings.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snap = sources.gather().await;
        let seqs = seq_info(&sources);
        for link in &links {
            let Some(built) = beats.build(link.index, &identity, &snap, &seqs, counters.read())
            else {
                counters.heartbeats_skipped.fetch_add(1, Relaxed);
                tracing::debug!(upstream = %link.name, "Heartbeat over [fleet] max_message_size; skipped.");
                continue;
            };
            let message = Message::new(
                settings.topic.clone(),
                Bytes::from(built.payload),
                Qos::AtMostOnce,
                false,
            );
            match link.upstream.publish_with_seq(message, None, None) {
                Ok(()) => {
                    counters.heartbeats_sent.fetch_add(1, Relaxed);
                    if built.trimmed {
                        counters.heartbeats_trimmed.fetch_add(1, Relaxed);
                    }
                    beats.sent(link.index, &snap);
                }
                Err(reason) => {
                    counters.heartbeats_skipped.fetch_add(1, Relaxed);
                    tracing::debug!(upstream = %link.name, reason = reason.error_code(), "Heartbeat skipped.");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::snapshot::tests::serving;

    fn settings(max: usize) -> Settings {
        Settings {
            period: Duration::from_secs(60),
            topic: "sensorgate/1/status".into(),
            max_message_size: max,
        }
    }

    fn id() -> Identity {
        Identity {
            gateway_id: 1,
            gateway_name: "gw".into(),
            started_ms: 940_000,
        }
    }

    #[test]
    fn windows_move_with_traffic_and_restart_where_the_last_sent_beat_ended() {
        let mut beats = Beats::new(1, 940_000, &settings(16 << 10));
        let seqs = SeqInfo {
            cursors: vec![Some(9)],
            oldest_held_seq: Some(3),
            next_seq: 12,
            disk_free_bytes: Some(1 << 30),
        };
        let snap = serving();
        let first = beats
            .build(0, &id(), &snap, &seqs, FleetCounts::default())
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&first.payload).unwrap();
        assert_eq!(v["messages"]["in"], 8);
        assert_eq!(v["messages"]["out"], 8);
        assert_eq!(v["since_ms"], 940_000);
        assert_eq!(v["upstreams"][0]["cursor"], 9);
        assert_eq!(v["spool"]["oldest_held_seq"], 3);
        assert_eq!(v["spool"]["next_seq"], 12);
        assert_eq!(v["sessions"]["mqtt-sn"]["active"], 2);
        assert_eq!(v["sessions"]["mqtt-sn"]["total"], 3);
        assert_eq!(v["trimmed"], false);
        // Not sent: the next beat still covers the whole window.
        let mut later = serving();
        later.now_ms += 60_000;
        later.upstreams[0].forwarded = 20;
        let again = beats
            .build(0, &id(), &later, &seqs, FleetCounts::default())
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&again.payload).unwrap();
        assert_eq!(v["messages"]["out"], 20);
        beats.sent(0, &later);
        let after = beats
            .build(0, &id(), &later, &seqs, FleetCounts::default())
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&after.payload).unwrap();
        assert_eq!(v["messages"]["out"], 0);
        assert_eq!(v["messages"]["in"], 0);
        assert_eq!(v["since_ms"], later.now_ms);
    }

    #[test]
    fn an_oversized_beat_sheds_detail_then_is_skipped() {
        let snap = serving();
        let full = Beats::new(1, 0, &settings(1 << 20))
            .build(0, &id(), &snap, &SeqInfo::default(), FleetCounts::default())
            .unwrap();
        let max = full.payload.len() - 1;
        let trimmed = Beats::new(1, 0, &settings(max))
            .build(0, &id(), &snap, &SeqInfo::default(), FleetCounts::default())
            .unwrap();
        assert!(trimmed.trimmed && trimmed.payload.len() <= max);
        assert!(
            Beats::new(1, 0, &settings(64))
                .build(0, &id(), &snap, &SeqInfo::default(), FleetCounts::default())
                .is_none()
        );
    }
}
