//! The replay adapter: one task that takes the replay requests the router intercepted
//! ([`ControlMessage`]), asks the sans-IO gate ([`Replay`], one per upstream) what to do,
//! reads the spool by sequence id off the runtime, and publishes the records again and the
//! answer on the upstream the request came on. It makes no protocol decision.
//!
//! Replayed records go through [`Upstream::publish_with_seq`] untracked (no token: no
//! acknowledgement is awaited, no drain cursor moves, nothing counts as sensor delivery),
//! with their original sequence id (`sg-seq` / AMQP `message_id`), their QoS and topic as
//! this upstream's routes map them, as the drain sends them. A publish the upstream refuses
//! for a full queue is tried again every [`REPLAY_RETRY`] for at most [`REPLAY_PATIENCE`] in
//! all; any other refusal (link down, shutdown) ends the replay (`interrupted`). Requests
//! are served one at a time, in arrival order (the router's control channel is bounded).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use sensorgate_bridges::message::{Message, Qos};
use sensorgate_bridges::route::SharedRoutes;
use sensorgate_bridges::router::ControlMessage;
use sensorgate_bridges::spool::{Chunks, Record, SharedSpool, StdFs, wall_ms};
use sensorgate_bridges::upstream::{FailReason, Upstream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::FleetCounters;
use super::replay::{
    Answer, Held, REPLAY_PATIENCE, REPLAY_RETRY, Replay, ReplaySettings, Run, Status, Step, Verdict,
};

/// Records read from the spool per blocking read.
const READ_CHUNK: usize = 64;

/// Room in the router's control channel (requests waiting while one is served).
pub const CONTROL_CHANNEL: usize = 16;

/// What the replay task needs: the spool, each upstream (by index, as the router knows
/// them) and the routes the drains use.
pub struct Replayer {
    settings: ReplaySettings,
    spool: Arc<SharedSpool<StdFs>>,
    upstreams: Vec<Arc<dyn Upstream>>,
    routes: SharedRoutes,
    gates: Vec<Replay>,
    counters: Arc<FleetCounters>,
}

impl Replayer {
    /// A replayer for `upstreams` (index = the router's upstream index).
    #[must_use]
    pub fn new(
        settings: ReplaySettings,
        spool: Arc<SharedSpool<StdFs>>,
        upstreams: Vec<Arc<dyn Upstream>>,
        routes: SharedRoutes,
        counters: Arc<FleetCounters>,
    ) -> Self {
        let gates = upstreams.iter().map(|_| Replay::new(&settings)).collect();
        Self {
            settings,
            spool,
            upstreams,
            routes,
            gates,
            counters,
        }
    }

    /// Serves `requests` until `stop` is cancelled or the router is gone. A replay under way
    /// when `stop` fires is answered `interrupted` (if the link still takes it).
    pub async fn run(
        mut self,
        mut requests: mpsc::Receiver<ControlMessage>,
        stop: CancellationToken,
    ) {
        loop {
            let request = tokio::select! {
                () = stop.cancelled() => break,
                request = requests.recv() => match request {
                    Some(request) => request,
                    None => break,
                },
            };
            self.serve(request, &stop).await;
        }
    }

    async fn serve(&mut self, request: ControlMessage, stop: &CancellationToken) {
        let ControlMessage {
            upstream, payload, ..
        } = request;
        let (Some(gate), Some(up)) = (self.gates.get_mut(upstream), self.upstreams.get(upstream))
        else {
            return;
        };
        let up = Arc::clone(up);
        let held = {
            let spool = self.spool.lock();
            Held {
                oldest: spool.oldest_seq(),
                newest: spool.written_seq(),
            }
        };
        #[allow(clippy::disallowed_methods)] // The adapter reads the clock for the gate.
        let now = std::time::Instant::now();
        let answer = match gate.handle_request(now, &payload, held) {
            Verdict::Silent => {
                self.counters.replays_unanswered.fetch_add(1, Relaxed);
                tracing::debug!(upstream = %up.name(), "Replay request over the rate; not answered.");
                return;
            }
            Verdict::Answer(answer) => answer,
            Verdict::Replay(run) => self.replay(upstream, &up, run, stop).await,
        };
        self.counters
            .replayed_records
            .fetch_add(answer.sent, Relaxed);
        match answer.status {
            Status::Ok => self.counters.replays_served.fetch_add(1, Relaxed),
            Status::Refused => self.counters.replays_refused.fetch_add(1, Relaxed),
        };
        match answer.status {
            Status::Ok => tracing::info!(
                upstream = %up.name(),
                id = answer.id.as_deref().unwrap_or(""),
                from = answer.from,
                to = answer.to,
                sent = answer.sent,
                skipped = answer.skipped,
                missing = answer.missing,
                "Replay sent."
            ),
            // Peers trigger these; the answer tells them why.
            Status::Refused => tracing::debug!(
                upstream = %up.name(),
                id = answer.id.as_deref().unwrap_or(""),
                reason = answer.reason.as_deref().unwrap_or(""),
                sent = answer.sent,
                "Replay request refused."
            ),
        }
        let message = Message {
            topic: self.settings.result_topic(),
            payload: Bytes::from(answer.to_json()),
            qos: Qos::AtLeastOnce,
            retain: false,
            origin: Default::default(),
        };
        if let Err(reason) = up.publish_with_seq(message, None, None) {
            tracing::debug!(upstream = %up.name(), reason = reason.error_code(), "Replay answer not sent.");
        }
    }

    /// Reads the range from the spool and sends it on `up`; the answer.
    async fn replay(
        &self,
        index: usize,
        up: &Arc<dyn Upstream>,
        mut run: Run,
        stop: &CancellationToken,
    ) -> Answer {
        let (mut pos, max_age_ms) = {
            let spool = self.spool.lock();
            let max_age = spool.config().max_age;
            (
                spool.reader_at(run.from()),
                max_age.map(|a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX)),
            )
        };
        let mut chunks = Chunks::default();
        loop {
            if stop.is_cancelled() {
                return run.handle_failed(FailReason::Shutdown.error_code());
            }
            let job = {
                let spool = Arc::clone(&self.spool);
                let mut chunks = std::mem::take(&mut chunks);
                tokio::task::spawn_blocking(move || {
                    let mut out = Vec::with_capacity(READ_CHUNK);
                    // `now_ms = 0`: the reader expires nothing (and counts nothing as
                    // expired); `max_age` is judged here, so that the drain's counters stay
                    // its own.
                    let read = spool.read(&mut pos, READ_CHUNK, 0, &mut chunks, &mut out);
                    (read, pos, chunks, out)
                })
            };
            let Ok((read, p, c, records)) = job.await else {
                return run.handle_failed("read_error");
            };
            pos = p;
            chunks = c;
            if records.is_empty() {
                return match read {
                    Ok(()) => run.handle_end(),
                    Err(_) => run.handle_failed("read_error"),
                };
            }
            let now_ms = wall_ms();
            for record in records {
                let expired = max_age_ms.is_some_and(|m| now_ms.saturating_sub(record.time_ms) > m);
                match run.handle_record(record.seq, expired) {
                    Step::Skip => {}
                    Step::Done(answer) => return answer,
                    Step::Send => match self.send(index, up, record, stop).await {
                        Ok(true) => run.handle_sent(),
                        Ok(false) => run.handle_skipped(),
                        Err(reason) => return run.handle_failed(reason.error_code()),
                    },
                }
            }
            if read.is_err() {
                return run.handle_failed("read_error");
            }
        }
    }

    /// Publishes one record as the drain would (routes, sequence id), untracked; `false`
    /// when no route sends it to this upstream.
    async fn send(
        &self,
        index: usize,
        up: &Arc<dyn Upstream>,
        record: Record,
        stop: &CancellationToken,
    ) -> Result<bool, FailReason> {
        let message = {
            let routes = self.routes.load();
            let Some(target) = routes.target(index, &record.topic, record.qos, &record.origin)
            else {
                return Ok(false);
            };
            Message {
                topic: target.topic.into_owned(),
                payload: record.payload,
                qos: target.qos,
                retain: record.retain,
                origin: record.origin,
            }
        };
        let mut waited = Duration::ZERO;
        loop {
            match up.publish_with_seq(message.clone(), None, Some(record.seq)) {
                Ok(()) => return Ok(true),
                Err(FailReason::QueueFull | FailReason::BrokerBusy) if waited < REPLAY_PATIENCE => {
                    tokio::select! {
                        () = stop.cancelled() => return Err(FailReason::Shutdown),
                        () = tokio::time::sleep(REPLAY_RETRY) => {}
                    }
                    waited += REPLAY_RETRY;
                }
                Err(reason) => return Err(reason),
            }
        }
    }
}
