//! The one task of the HTTP ingress that owns its channels from the rest of the gateway: the
//! spool's verdicts, the router's downlink, the admin listener's queries and the beat.
//!
//! One `select! { biased; .. }` loop, in this order: verdicts first (the spool writer
//! blocks on a full reply channel, for every protocol), then downlink (into the SSE hub, then
//! `ack()`: QoS 0 semantics, drops are counted, never left unacknowledged, so a slow SSE
//! client cannot stall the broker's window), then admin queries, then a [`BEAT_IDLE`] tick.
//! Each input is handled without awaiting anything else, so the loop is back at the reply
//! channel quickly. It runs until told to stop, which [`super::run`] does only once no
//! handler can wait for a verdict any more.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use sensorgate_bridges::message::Downlink;
use sensorgate_bridges::spool::AppendReply;
use sensorgate_bridges::telemetry::{BEAT_IDLE, Beat};

use super::devices::Devices;
use super::publish::Ingress;
use crate::observe::model::{DownlinkDropReason, IngressQuery, SessionCounts, SessionState};

/// Downlink messages taken per turn beyond the first, before the loop looks at the verdicts
/// again.
const DOWNLINK_BATCH: usize = 64;

/// The driver's inputs.
pub(crate) struct Driver {
    pub ingress: Arc<Ingress>,
    pub devices: Arc<Mutex<Devices>>,
    pub replies: mpsc::Receiver<Vec<AppendReply>>,
    pub downlink: mpsc::Receiver<Downlink>,
    pub queries: mpsc::Receiver<IngressQuery>,
    pub beat: Arc<Beat>,
}

impl Driver {
    /// Runs until `stop` is cancelled. Verdicts that are already queued are answered first.
    #[allow(clippy::disallowed_methods)] // The adapter is where the clock is read.
    pub(crate) async fn run(mut self, stop: CancellationToken) {
        let mut idle = tokio::time::interval(BEAT_IDLE);
        idle.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                Some(replies) = self.replies.recv() => {
                    self.ingress.verdicts.deliver(&replies, &self.ingress);
                }
                Some(message) = self.downlink.recv() => {
                    self.on_downlink(message);
                    for _ in 0..DOWNLINK_BATCH {
                        let Ok(message) = self.downlink.try_recv() else { break };
                        self.on_downlink(message);
                    }
                }
                Some(query) = self.queries.recv() => self.answer(query),
                _ = idle.tick() => {}
                () = stop.cancelled() => break,
            }
            self.beat.beat(tokio::time::Instant::now().into_std());
        }
        // Verdicts already sent are answered (the writer may have answered the last appends).
        while let Ok(replies) = self.replies.try_recv() {
            self.ingress.verdicts.deliver(&replies, &self.ingress);
        }
    }

    /// A message for the SSE streams: into every matching queue, then acknowledged.
    fn on_downlink(&self, message: Downlink) {
        let Downlink {
            topic,
            payload,
            qos,
            retain,
            filters,
            ack,
            ..
        } = message;
        let delivered =
            self.ingress
                .hub()
                .deliver(&topic, &payload, qos, retain, filters.as_deref());
        let stats = &self.ingress.stats;
        stats.dropped(DownlinkDropReason::QueueFull, delivered.dropped_full);
        stats.dropped(DownlinkDropReason::TooLarge, delivered.dropped_large);
        stats
            .security
            .add(crate::security::Denial::AclDeniedDelivery, delivered.denied);
        ack.ack();
    }

    /// Answers one of the admin listener's questions (the asker may have gone: ignored).
    #[allow(clippy::disallowed_methods)] // Dates the devices' last requests.
    fn answer(&self, query: IngressQuery) {
        match query {
            IngressQuery::Report(reply) => {
                let mut sessions = SessionCounts::default();
                let hub = self.ingress.hub();
                let mut devices: Vec<&Arc<str>> = hub.streams().map(|(d, _, _)| d).collect();
                devices.sort_unstable();
                devices.dedup();
                for _ in devices {
                    sessions.add(SessionState::Active);
                }
                drop(hub);
                let _ = reply.send(self.ingress.stats.report(sessions));
            }
            IngressQuery::Clients(query, reply) => {
                let now: Instant = tokio::time::Instant::now().into_std();
                let page = {
                    let hub = self.ingress.hub();
                    let devices = self.devices.lock().unwrap_or_else(PoisonError::into_inner);
                    devices.clients(now, &query, hub.streams())
                };
                let _ = reply.send(page);
            }
        }
    }
}
