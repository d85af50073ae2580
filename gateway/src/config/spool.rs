//! `[spool]`: the durable log between the ingresses and the upstreams, and the drains' rates.

use std::path::Path;
use std::time::Duration;

use sensorgate_bridges::spool::{FsyncPolicy, SpoolConfig, WhenFull};
use serde::Deserialize;

use super::check::{duration_in, int_in, size_in};
use super::diag::{KeyPath, Reporter};
use super::{DurationText, SizeText};

/// `[spool]`.
#[derive(Debug, Clone)]
pub struct SpoolSection {
    /// The log's settings; `dir` is `<state_dir>/spool`.
    pub spool: SpoolConfig,
    /// Messages waiting for the spool writer at most; beyond it the MQTT-SN driver keeps what
    /// it read and pauses reading its sockets until the writer has room.
    pub queue: usize,
    /// Per upstream, messages per second forwarded at most (`None`: unlimited).
    pub drain_rate: Option<u32>,
    /// Per upstream, topic and payload bytes per second forwarded at most (`None`: unlimited).
    pub drain_bytes_rate: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct RawSpool {
    max_bytes: SizeText,
    segment_bytes: SizeText,
    min_free_bytes: SizeText,
    max_age: DurationText,
    when_full: String,
    fsync: String,
    fsync_interval: DurationText,
    queue: i64,
    drain_rate: i64,
    drain_bytes_rate: SizeText,
    memory_tail: SizeText,
}

impl Default for RawSpool {
    fn default() -> Self {
        RawSpool {
            max_bytes: "1GiB".into(),
            segment_bytes: "8MiB".into(),
            min_free_bytes: "64MiB".into(),
            max_age: "0s".into(),
            when_full: "reject_new".into(),
            fsync: "always".into(),
            fsync_interval: "1s".into(),
            queue: 65_536,
            drain_rate: 0,
            drain_bytes_rate: "0B".into(),
            memory_tail: "8MiB".into(),
        }
    }
}

pub(super) fn compile_spool(
    raw: &RawSpool,
    state_dir: &Path,
    r: &mut Reporter<'_>,
) -> Option<SpoolSection> {
    let path = KeyPath::root("spool");
    const TIB: u64 = 1 << 40;
    let max_bytes = size_in(r, &path.key("max_bytes"), &raw.max_bytes, 1 << 20, 64 * TIB);
    let segment_bytes = size_in(
        r,
        &path.key("segment_bytes"),
        &raw.segment_bytes,
        64 << 10,
        1 << 30,
    );
    let min_free_bytes = size_in(
        r,
        &path.key("min_free_bytes"),
        &raw.min_free_bytes,
        0,
        64 * TIB,
    );
    let max_age = duration_in(
        r,
        &path.key("max_age"),
        &raw.max_age,
        Duration::ZERO,
        Duration::from_secs(10 * 365 * 86_400),
    );
    let when_full = match raw.when_full.as_str() {
        "reject_new" => Some(WhenFull::RejectNew),
        "drop_oldest" => Some(WhenFull::DropOldest),
        other => {
            r.at_path(
                &path.key("when_full"),
                format!("unknown policy `{other}`"),
                Some("use \"reject_new\" or \"drop_oldest\"".into()),
            );
            None
        }
    };
    let interval = duration_in(
        r,
        &path.key("fsync_interval"),
        &raw.fsync_interval,
        Duration::from_millis(1),
        Duration::from_secs(3600),
    );
    let fsync = match raw.fsync.as_str() {
        "always" => Some(FsyncPolicy::Always),
        "interval" => interval.map(FsyncPolicy::Interval),
        other => {
            r.at_path(
                &path.key("fsync"),
                format!("unknown fsync policy `{other}`"),
                Some("use \"always\" or \"interval\"".into()),
            );
            None
        }
    };
    let queue = int_in::<usize>(r, &path.key("queue"), raw.queue, 1, 10_000_000);
    let drain_rate = int_in::<u32>(r, &path.key("drain_rate"), raw.drain_rate, 0, 100_000_000);
    let drain_bytes_rate = size_in(
        r,
        &path.key("drain_bytes_rate"),
        &raw.drain_bytes_rate,
        0,
        TIB,
    );
    let memory_tail = size_in(r, &path.key("memory_tail"), &raw.memory_tail, 0, 1 << 30);
    if let (Some(rate), Some(seg)) = (drain_bytes_rate, segment_bytes)
        && rate != 0
        && rate < 64 << 10
        && seg > 0
    {
        // A message larger than one second's budget could never be sent.
        r.at_path(
            &path.key("drain_bytes_rate"),
            "must be 0 (unlimited) or at least 64KiB".into(),
            None,
        );
    }
    Some(SpoolSection {
        spool: SpoolConfig {
            dir: state_dir.join("spool"),
            max_bytes: max_bytes? as u64,
            segment_bytes: segment_bytes? as u64,
            min_free_bytes: min_free_bytes? as u64,
            max_age: max_age.filter(|a| !a.is_zero()),
            when_full: when_full?,
            fsync: fsync?,
            memory_tail_bytes: memory_tail? as u64,
            // `[fleet.replay] keep_acknowledged`, set once `[fleet]` is compiled.
            retain_bytes: 0,
        },
        queue: queue?,
        drain_rate: drain_rate.filter(|&r| r > 0),
        drain_bytes_rate: drain_bytes_rate.map(|r| r as u64).filter(|&r| r > 0),
    })
}
