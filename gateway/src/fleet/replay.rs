//! Replay on request, sans-IO: a backend asks the gateway, on the gateway's own upstream
//! connection, to send again a range of sequence ids the spool still holds.
//!
//! ```text
//!  <prefix>/replay  {"from": 120, "to": 180, "id": "r-7"}
//!        │  (DownlinkRouter hands it to the control channel, never to sensors)
//!        v
//!  Replay::handle_request(now, payload, held) ── Verdict::Answer ──> <prefix>/replay/result
//!        │ Verdict::Replay(Run)                    (refused: rate, size, syntax, range, gone)
//!        v
//!  adapter reads the spool from `from` (a reader by sequence id; no cursor moves)
//!    └─ for each record: Run::handle_record(seq, expired) ── Step::Send ──> publish with its
//!       original seq (sg-seq / message_id), its topic as this upstream's routes map it
//!    └─ Run::handle_end / Step::Done ── Answer ──> <prefix>/replay/result
//! ```
//!
//! Call order: one [`Replay`] per upstream (the rate limit is per upstream connection).
//! [`Replay::handle_request`] for each request, then, for a [`Verdict::Replay`], the records
//! read from the spool from `run.from()` on, in order, to [`Run::handle_record`] until it
//! returns [`Step::Done`], or [`Run::handle_end`] when the spool has no more; a publish that
//! fails for good ends it with [`Run::handle_failed`]. The answer of every request is one
//! JSON object (see [`Answer`] and `schemas/replay-result.json`).
//!
//! Rules:
//! - **Bounded**: a request is at most [`MAX_REQUEST_BYTES`] bytes with an id of at most
//!   [`MAX_ID_CHARS`] characters; a range is at most `max_records` ids long (longer:
//!   refused, the backend splits it); at most `max_requests_per_minute` requests are taken
//!   per upstream (a token bucket of that size, refilled at that rate), and at most as many
//!   refusals for the rate are answered (the rest are counted, not answered).
//! - **Gone means refused**: when the first id asked for is no longer on disk (acknowledged
//!   segments deleted, `drop_oldest`, `max_age`), the request is refused with reason `gone`
//!   and the oldest id still held (`first_held`), before anything is sent. Ids missing in
//!   the middle of a range (a damaged record, skipped and counted by the spool) are counted
//!   in `missing` of an `ok` answer.
//! - Replays are best effort: nothing is tracked, no cursor moves, nothing counts as sensor
//!   delivery.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Largest request payload taken (bytes); a larger one is refused (`too_large`).
pub const MAX_REQUEST_BYTES: usize = 1024;

/// Longest request id (characters) taken; a longer one is refused (`malformed`).
pub const MAX_ID_CHARS: usize = 128;

/// Topic of the requests, under the fleet topic prefix.
pub const REQUEST_SUFFIX: &str = "replay";

/// Topic of the answers, under the fleet topic prefix.
pub const RESULT_SUFFIX: &str = "replay/result";

/// The replay settings (`[fleet.replay]`, with `[fleet] topic_prefix`); the defaults are
/// those of the reference configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplaySettings {
    /// Whether the request topic is subscribed and requests are served.
    pub enabled: bool,
    /// Most sequence ids one request may cover (`to - from + 1`).
    pub max_records: u64,
    /// Requests taken per minute and upstream (token bucket of this size); 0 takes none.
    pub max_requests_per_minute: u32,
    /// `[fleet] topic_prefix` with `{gateway_id}` replaced (the upstream's `remote_prefix`
    /// applies on top, as for sensor data).
    pub topic_prefix: String,
}

impl ReplaySettings {
    /// The defaults (`enabled = true`, `max_records = 10000`, `max_requests_per_minute =
    /// 6`) under the default topic prefix `sensorgate/{gateway_id}`.
    #[must_use]
    pub fn for_gateway(gateway_id: u8) -> Self {
        Self {
            enabled: true,
            max_records: 10_000,
            max_requests_per_minute: 6,
            topic_prefix: format!("sensorgate/{gateway_id}"),
        }
    }

    /// The settings `[fleet]` gives: replay is on when both `[fleet] enabled` and
    /// `[fleet.replay] enabled` are.
    #[must_use]
    pub fn of(fleet: &crate::config::FleetSection) -> Self {
        Self {
            enabled: fleet.enabled && fleet.replay.enabled,
            max_records: fleet.replay.max_records,
            max_requests_per_minute: fleet.replay.max_requests_per_minute,
            topic_prefix: fleet.topic_prefix.clone(),
        }
    }

    /// The topic requests come in on (relative to the upstream).
    #[must_use]
    pub fn request_topic(&self) -> String {
        format!("{}/{REQUEST_SUFFIX}", self.topic_prefix)
    }

    /// The topic answers go out on (relative to the upstream).
    #[must_use]
    pub fn result_topic(&self) -> String {
        format!("{}/{RESULT_SUFFIX}", self.topic_prefix)
    }
}

/// A request as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// First sequence id wanted.
    pub from: u64,
    /// Last sequence id wanted (inclusive).
    pub to: u64,
    /// The requester's id, echoed in the answer.
    pub id: String,
}

/// The JSON form (unknown keys are ignored, so that a backend may add its own).
#[derive(Deserialize)]
struct RawRequest {
    from: u64,
    to: u64,
    id: String,
}

/// Why a request was refused (the answer's `reason`, see [`Self::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// More than `max_requests_per_minute` requests on this upstream.
    #[error("more than max_requests_per_minute requests")]
    RateLimited,
    /// Over [`MAX_REQUEST_BYTES`].
    #[error("request over {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
    /// Not a request object (the parser's message, bounded).
    #[error("malformed request: {0}")]
    Malformed(String),
    /// `from` after `to`.
    #[error("from is after to")]
    InvalidRange,
    /// More ids than `max_records`.
    #[error("range longer than max_records ({max})")]
    TooLong {
        /// `max_records`.
        max: u64,
    },
    /// The range, or its start, is no longer on disk.
    #[error("range no longer held")]
    Gone,
    /// The range ends after the newest record written.
    #[error("range ends after the newest record ({newest})")]
    NotWritten {
        /// The newest sequence id written (0: none).
        newest: u64,
    },
    /// The upstream refused the replayed messages (link down, shutting down) midway.
    #[error("interrupted: {0}")]
    Interrupted(&'static str),
}

impl Refusal {
    /// The stable code sent as the answer's `reason`.
    #[must_use]
    pub const fn code(&self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::TooLarge => "too_large",
            Self::Malformed(_) => "malformed",
            Self::InvalidRange => "invalid_range",
            Self::TooLong { .. } => "too_long",
            Self::Gone => "gone",
            Self::NotWritten { .. } => "not_written",
            Self::Interrupted(_) => "interrupted",
        }
    }
}

/// Parses a request payload: a JSON object `{"from": u64, "to": u64, "id": string}` of at
/// most [`MAX_REQUEST_BYTES`] bytes and an id of at most [`MAX_ID_CHARS`] characters.
///
/// # Errors
/// [`Refusal::TooLarge`] or [`Refusal::Malformed`] (with the parser's message).
pub fn parse_request(payload: &[u8]) -> Result<Request, Refusal> {
    if payload.len() > MAX_REQUEST_BYTES {
        return Err(Refusal::TooLarge);
    }
    let raw: RawRequest =
        serde_json::from_slice(payload).map_err(|e| Refusal::Malformed(bounded(&e.to_string())))?;
    if raw.id.chars().count() > MAX_ID_CHARS {
        return Err(Refusal::Malformed(format!(
            "id longer than {MAX_ID_CHARS} characters"
        )));
    }
    Ok(Request {
        from: raw.from,
        to: raw.to,
        id: raw.id,
    })
}

/// A parser message cut to a bounded length (it may quote the payload).
fn bounded(message: &str) -> String {
    message.chars().take(160).collect()
}

/// The id of a request that did not parse, when it has a usable one (so the backend can
/// match the refusal): a string `id` at the top level of a JSON object, bounded.
fn salvage_id(payload: &[u8]) -> Option<String> {
    if payload.len() > MAX_REQUEST_BYTES {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let id = value.get("id")?.as_str()?;
    (id.chars().count() <= MAX_ID_CHARS).then(|| id.to_owned())
}

/// What the spool holds when a request comes: the oldest sequence id on disk (`None`: no
/// record) and the newest written (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// [`Spool::oldest_seq`](sensorgate_bridges::spool::Spool::oldest_seq).
    pub oldest: Option<u64>,
    /// [`Spool::written_seq`](sensorgate_bridges::spool::Spool::written_seq).
    pub newest: u64,
}

/// The answer to one request, published as JSON on the result topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// The request's id (`null` when it had none usable).
    pub id: Option<String>,
    /// `"ok"` (the range was sent) or `"refused"`.
    pub status: Status,
    /// Why it was refused (a stable code, see [`Refusal::code`]); `null` when ok.
    pub reason: Option<String>,
    /// A human explanation of `reason`; `null` when ok.
    pub detail: Option<String>,
    /// The range asked for (`null` when the request did not parse).
    pub from: Option<u64>,
    /// See `from`.
    pub to: Option<u64>,
    /// Records sent again.
    pub sent: u64,
    /// Ids in the range that no route sends to this upstream (never sent on it).
    pub skipped: u64,
    /// Ids in the range missing on disk after its start (damaged records, `max_age`).
    pub missing: u64,
    /// The oldest sequence id still held, when known (always given with `gone`).
    pub first_held: Option<u64>,
}

/// An answer's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The range was sent.
    Ok,
    /// Nothing (or, when interrupted, only `sent` records) was sent.
    Refused,
}

impl Answer {
    /// A refusal of `request` (or of a payload with id `id` that did not parse).
    fn refused(
        id: Option<String>,
        range: Option<(u64, u64)>,
        refusal: &Refusal,
        first_held: Option<u64>,
    ) -> Self {
        Self {
            id,
            status: Status::Refused,
            reason: Some(refusal.code().to_owned()),
            detail: Some(refusal.to_string()),
            from: range.map(|r| r.0),
            to: range.map(|r| r.1),
            sent: 0,
            skipped: 0,
            missing: 0,
            first_held,
        }
    }

    /// The JSON payload.
    #[must_use]
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain fields cannot fail; an empty object is the safe fallback.
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }
}

/// What to do with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Publish this answer (a refusal); nothing is sent.
    Answer(Answer),
    /// Read the spool and send the range (see [`Run`]).
    Replay(Run),
    /// Refused for the rate, beyond the answers budget: counted, not answered.
    Silent,
}

/// A token bucket: `capacity` tokens, refilled at `capacity` per minute.
#[derive(Debug)]
struct Bucket {
    capacity: f64,
    tokens: f64,
    at: Option<Instant>,
}

impl Bucket {
    fn new(per_minute: u32) -> Self {
        let capacity = f64::from(per_minute);
        Self {
            capacity,
            tokens: capacity,
            at: None,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        if let Some(at) = self.at {
            let elapsed = now.saturating_duration_since(at).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.capacity / 60.0).min(self.capacity);
        }
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Counters of one upstream's replays since start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplayStats {
    /// Requests received.
    pub requests: u64,
    /// Requests refused (any reason, answered or not).
    pub refused: u64,
    /// Requests refused for the rate and not answered.
    pub silenced: u64,
}

/// One upstream's replay gate: parses, bounds and rate-limits its requests. See the module
/// docs for the call order.
#[derive(Debug)]
pub struct Replay {
    max_records: u64,
    requests: Bucket,
    refusals: Bucket,
    stats: ReplayStats,
}

impl Replay {
    /// A gate with `settings`' bounds.
    #[must_use]
    pub fn new(settings: &ReplaySettings) -> Self {
        Self {
            max_records: settings.max_records,
            requests: Bucket::new(settings.max_requests_per_minute),
            refusals: Bucket::new(settings.max_requests_per_minute),
            stats: ReplayStats::default(),
        }
    }

    /// The counters.
    #[must_use]
    pub const fn stats(&self) -> ReplayStats {
        self.stats
    }

    /// Judges one request that arrived at `now` with what the spool holds.
    pub fn handle_request(&mut self, now: Instant, payload: &[u8], held: Held) -> Verdict {
        self.stats.requests += 1;
        if !self.requests.take(now) {
            self.stats.refused += 1;
            if !self.refusals.take(now) {
                self.stats.silenced += 1;
                return Verdict::Silent;
            }
            let answer = Answer::refused(salvage_id(payload), None, &Refusal::RateLimited, None);
            return Verdict::Answer(answer);
        }
        match self.judge(payload, held) {
            Ok(run) => Verdict::Replay(run),
            Err(answer) => {
                self.stats.refused += 1;
                Verdict::Answer(*answer)
            }
        }
    }

    fn judge(&self, payload: &[u8], held: Held) -> Result<Run, Box<Answer>> {
        let request = parse_request(payload).map_err(|refusal| {
            Box::new(Answer::refused(salvage_id(payload), None, &refusal, None))
        })?;
        let Request { from, to, id } = request;
        let refuse = |refusal: Refusal| {
            Box::new(Answer::refused(
                Some(id.clone()),
                Some((from, to)),
                &refusal,
                held.oldest,
            ))
        };
        if from > to {
            return Err(refuse(Refusal::InvalidRange));
        }
        if to - from >= self.max_records {
            return Err(refuse(Refusal::TooLong {
                max: self.max_records,
            }));
        }
        // Ids never written cannot be gone: "not written" is judged first (an empty spool
        // that never had a record answers not_written, not gone).
        if to > held.newest {
            return Err(refuse(Refusal::NotWritten {
                newest: held.newest,
            }));
        }
        if held.oldest.is_none_or(|oldest| from < oldest) {
            return Err(refuse(Refusal::Gone));
        }
        Ok(Run {
            id,
            from,
            to,
            started: false,
            gone: false,
            expected: from,
            sent: 0,
            skipped: 0,
            missing: 0,
        })
    }
}

/// One replay in progress: takes the records read from `from` on and says which to send.
#[derive(Debug, PartialEq, Eq)]
pub struct Run {
    id: String,
    from: u64,
    to: u64,
    /// The first record in the range was met (and was the one asked for).
    started: bool,
    /// Records at the start were expired: the start is gone.
    gone: bool,
    /// The id the next record should have.
    expected: u64,
    sent: u64,
    skipped: u64,
    missing: u64,
}

/// What to do with one record of a [`Run`].
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send it (with its own sequence id), then report with [`Run::handle_sent`] or
    /// [`Run::handle_skipped`] (no route to this upstream).
    Send,
    /// Not sent: read on.
    Skip,
    /// The run is over: publish the answer, read no more.
    Done(Answer),
}

impl Run {
    /// Where to start reading (the spool reader's position).
    #[must_use]
    pub const fn from(&self) -> u64 {
        self.from
    }

    /// The last id of the range.
    #[must_use]
    pub const fn to(&self) -> u64 {
        self.to
    }

    /// The request's id.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The next record read, in spool order: its sequence id, and whether it is older than
    /// the spool's `max_age` (gone, as the drain would not send it either).
    pub fn handle_record(&mut self, seq: u64, expired: bool) -> Step {
        if seq < self.expected {
            return Step::Skip;
        }
        if seq > self.to && self.started {
            return Step::Done(self.finish());
        }
        if !self.started {
            if expired {
                self.gone = true;
                return Step::Skip;
            }
            if self.gone || seq > self.from {
                // The start is no longer on disk: nothing was sent, refuse.
                return Step::Done(self.refuse(&Refusal::Gone, Some(seq)));
            }
            self.started = true;
        }
        if expired {
            self.missing += 1;
            self.expected = seq + 1;
            return Step::Skip;
        }
        self.missing += seq - self.expected;
        self.expected = seq + 1;
        Step::Send
    }

    /// The record of the last [`Step::Send`] was published.
    pub fn handle_sent(&mut self) {
        self.sent += 1;
    }

    /// The record of the last [`Step::Send`] goes to no route of this upstream.
    pub fn handle_skipped(&mut self) {
        self.skipped += 1;
    }

    /// The spool has nothing more to read: the answer.
    #[must_use]
    pub fn handle_end(&mut self) -> Answer {
        if !self.started {
            return self.refuse(&Refusal::Gone, None);
        }
        self.finish()
    }

    /// A publish failed for good (`why`: the upstream's error code): the answer, with what
    /// was sent before.
    #[must_use]
    pub fn handle_failed(&mut self, why: &'static str) -> Answer {
        let mut answer = self.refuse(&Refusal::Interrupted(why), None);
        answer.sent = self.sent;
        answer.skipped = self.skipped;
        answer.missing = self.missing;
        answer
    }

    fn refuse(&self, refusal: &Refusal, first_held: Option<u64>) -> Answer {
        Answer::refused(
            Some(self.id.clone()),
            Some((self.from, self.to)),
            refusal,
            first_held,
        )
    }

    fn finish(&mut self) -> Answer {
        // Ids after the last one read, up to `to`, are missing too (read to the end).
        if self.expected <= self.to {
            self.missing += self.to + 1 - self.expected;
            self.expected = self.to + 1;
        }
        Answer {
            id: Some(self.id.clone()),
            status: Status::Ok,
            reason: None,
            detail: None,
            from: Some(self.from),
            to: Some(self.to),
            sent: self.sent,
            skipped: self.skipped,
            missing: self.missing,
            first_held: None,
        }
    }
}

/// Longest a replay waits, in total, for room in the upstream's queue before it gives up
/// (`interrupted`); between two tries it waits [`REPLAY_RETRY`].
pub const REPLAY_PATIENCE: Duration = Duration::from_secs(30);

/// Wait between two tries of a publish the upstream's full queue refused.
pub const REPLAY_RETRY: Duration = Duration::from_millis(20);

/// For the fuzz target: parsing and judging any payload never panics, and an accepted
/// request is within the bounds.
#[doc(hidden)]
pub fn fuzz_request(payload: &[u8]) {
    let settings = ReplaySettings::for_gateway(1);
    let mut gate = Replay::new(&settings);
    #[allow(clippy::disallowed_methods)] // The fuzz target has no clock of its own.
    let now = Instant::now();
    let held = Held {
        oldest: Some(1),
        newest: u64::MAX,
    };
    match gate.handle_request(now, payload, held) {
        Verdict::Replay(run) => {
            assert!(payload.len() <= MAX_REQUEST_BYTES);
            assert!(run.from() <= run.to());
            assert!(run.to() - run.from() < settings.max_records);
            assert!(run.id().chars().count() <= MAX_ID_CHARS);
        }
        Verdict::Answer(answer) => {
            assert_eq!(answer.status, Status::Refused);
            assert!(!answer.to_json().is_empty());
        }
        Verdict::Silent => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
// The tests start their clock anywhere: the gate takes `now` as an argument.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn held(oldest: u64, newest: u64) -> Held {
        Held {
            oldest: Some(oldest),
            newest,
        }
    }

    fn gate() -> Replay {
        Replay::new(&ReplaySettings::for_gateway(7))
    }

    fn refused(verdict: Verdict) -> Answer {
        match verdict {
            Verdict::Answer(a) => {
                assert_eq!(a.status, Status::Refused);
                a
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn answers_have_the_keys_and_reasons_of_the_schema() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/replay-result.json");
        let schema: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut required: Vec<&str> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap())
            .collect();
        required.sort_unstable();
        let answer = Answer::refused(None, None, &Refusal::Gone, Some(3));
        let json: serde_json::Value = serde_json::from_slice(&answer.to_json()).unwrap();
        let mut keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, required);
        let reasons = schema["properties"]["reason"]["enum"].as_array().unwrap();
        for refusal in [
            Refusal::RateLimited,
            Refusal::TooLarge,
            Refusal::Malformed(String::new()),
            Refusal::InvalidRange,
            Refusal::TooLong { max: 1 },
            Refusal::Gone,
            Refusal::NotWritten { newest: 1 },
            Refusal::Interrupted("x"),
        ] {
            assert!(
                reasons.contains(&refusal.code().into()),
                "{}",
                refusal.code()
            );
        }
    }

    #[test]
    fn topics_follow_the_prefix() {
        let s = ReplaySettings::for_gateway(7);
        assert_eq!(s.request_topic(), "sensorgate/7/replay");
        assert_eq!(s.result_topic(), "sensorgate/7/replay/result");
    }

    #[test]
    fn a_range_still_held_is_replayed_with_its_ids() {
        let now = Instant::now();
        let Verdict::Replay(mut run) =
            gate().handle_request(now, br#"{"from": 10, "to": 12, "id": "r1"}"#, held(5, 20))
        else {
            panic!("accepted")
        };
        assert_eq!((run.from(), run.to(), run.id()), (10, 12, "r1"));
        for seq in 10..=12 {
            assert_eq!(run.handle_record(seq, false), Step::Send);
            run.handle_sent();
        }
        let Step::Done(answer) = run.handle_record(13, false) else {
            panic!("done after the range")
        };
        assert_eq!(answer.status, Status::Ok);
        assert_eq!((answer.sent, answer.missing, answer.skipped), (3, 0, 0));
        let json: serde_json::Value = serde_json::from_slice(&answer.to_json()).unwrap();
        assert_eq!(json["status"], "ok");
        assert_eq!(json["id"], "r1");
        assert_eq!(json["sent"], 3);
    }

    #[test]
    fn a_dropped_start_is_refused_with_the_oldest_id_held() {
        let now = Instant::now();
        let a = refused(gate().handle_request(
            now,
            br#"{"from": 1, "to": 12, "id": "r2"}"#,
            held(5, 20),
        ));
        assert_eq!(a.reason.as_deref(), Some("gone"));
        assert_eq!(a.first_held, Some(5));
        assert_eq!((a.from, a.to, a.sent), (Some(1), Some(12), 0));
        // Found gone while reading (the oldest segment's first records damaged or expired).
        let Verdict::Replay(mut run) =
            gate().handle_request(now, br#"{"from": 5, "to": 12, "id": "r3"}"#, held(5, 20))
        else {
            panic!("accepted")
        };
        assert_eq!(run.handle_record(5, true), Step::Skip);
        let Step::Done(a) = run.handle_record(6, false) else {
            panic!("gone")
        };
        assert_eq!(a.reason.as_deref(), Some("gone"));
        assert_eq!(a.first_held, Some(6));
    }

    #[test]
    fn holes_after_the_start_are_counted_missing() {
        let now = Instant::now();
        let Verdict::Replay(mut run) =
            gate().handle_request(now, br#"{"from": 5, "to": 10, "id": "r"}"#, held(1, 20))
        else {
            panic!("accepted")
        };
        assert_eq!(run.handle_record(5, false), Step::Send);
        run.handle_sent();
        assert_eq!(run.handle_record(8, false), Step::Send);
        run.handle_skipped();
        let a = run.handle_end();
        assert_eq!(a.status, Status::Ok);
        assert_eq!((a.sent, a.skipped, a.missing), (1, 1, 4));
    }

    #[test]
    fn malformed_and_out_of_bounds_requests_are_refused_with_a_reason() {
        let now = Instant::now();
        let mut g = Replay::new(&ReplaySettings {
            max_requests_per_minute: 100,
            ..ReplaySettings::for_gateway(1)
        });
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "malformed"),
            (br#"{"from": -1, "to": 3, "id": "x"}"#, "malformed"),
            (br#"{"from": 1, "id": "x"}"#, "malformed"),
            (br#"{"from": 9, "to": 3, "id": "x"}"#, "invalid_range"),
            (br#"{"from": 1, "to": 10001, "id": "x"}"#, "too_long"),
            (br#"{"from": 1, "to": 30, "id": "x"}"#, "not_written"),
        ];
        for (payload, reason) in cases {
            let a = refused(g.handle_request(now, payload, held(1, 20)));
            assert_eq!(a.reason.as_deref(), Some(*reason), "{payload:?}");
        }
        let big = vec![b' '; MAX_REQUEST_BYTES + 1];
        let a = refused(g.handle_request(now, &big, held(1, 20)));
        assert_eq!(a.reason.as_deref(), Some("too_large"));
        let long_id = format!(r#"{{"from": 1, "to": 2, "id": "{}"}}"#, "i".repeat(200));
        let a = refused(g.handle_request(now, long_id.as_bytes(), held(1, 20)));
        assert_eq!(a.reason.as_deref(), Some("malformed"));
        // A refusal names the request's id when it can be read.
        let a = refused(g.handle_request(now, br#"{"from": "x", "id": "q"}"#, held(1, 20)));
        assert_eq!(a.id.as_deref(), Some("q"));
        // Ids never written are not gone: a spool that never held a record, and a range
        // that starts below the oldest id held but ends beyond the newest.
        let never = Held {
            oldest: None,
            newest: 0,
        };
        let a = refused(g.handle_request(now, br#"{"from": 1, "to": 5, "id": "e"}"#, never));
        assert_eq!(a.reason.as_deref(), Some("not_written"));
        let a = refused(g.handle_request(now, br#"{"from": 1, "to": 30, "id": "e"}"#, held(5, 20)));
        assert_eq!(a.reason.as_deref(), Some("not_written"));
        // Exactly max_records ids are taken.
        assert!(matches!(
            g.handle_request(
                now,
                br#"{"from": 1, "to": 10000, "id": "x"}"#,
                held(1, 20_000)
            ),
            Verdict::Replay(_)
        ));
    }

    #[test]
    fn the_rate_is_bounded_per_minute_and_refusals_for_it_too() {
        let start = Instant::now();
        let mut g = gate();
        let ok = br#"{"from": 1, "to": 1, "id": "r"}"#;
        for _ in 0..6 {
            assert!(matches!(
                g.handle_request(start, ok, held(1, 5)),
                Verdict::Replay(_)
            ));
        }
        for _ in 0..6 {
            let a = refused(g.handle_request(start, ok, held(1, 5)));
            assert_eq!(a.reason.as_deref(), Some("rate_limited"));
            assert_eq!(a.id.as_deref(), Some("r"));
        }
        assert_eq!(g.handle_request(start, ok, held(1, 5)), Verdict::Silent);
        // Ten seconds give one token back (six per minute).
        let later = start + Duration::from_secs(10);
        assert!(matches!(
            g.handle_request(later, ok, held(1, 5)),
            Verdict::Replay(_)
        ));
        let s = g.stats();
        assert_eq!((s.requests, s.refused, s.silenced), (14, 7, 1));
    }
}
