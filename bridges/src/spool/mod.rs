//! Store-and-forward: every uplink message is appended to a durable log on disk and each
//! upstream forwards it from there, in order, at its own pace.
//!
//! ```text
//!  sensors ─> ingress ─ IngressAppender::append(msg, token) ─> writer thread ────────────┐
//!  (one per core) <─ AppendReply, on that ingress's  ─  group: append all, one write,    │
//!                    own channel, after the fsync       one fsync, answer each ingress   v
//!                                        segment files 00000000000000000001.seg ... (disk)
//!                                                                                        │
//!  broker <─    Upstream::publish_with_seq <─ drain task (one per upstream) <── read ───┘
//!         ──> AckReport ──────────────────────> cursor moves over the acknowledged prefix;
//!                                               fully acknowledged segments are deleted
//! ```
//!
//! Invariants (MUST hold; the property tests in `tests.rs` check them against a model, with
//! crashes, torn writes, failing fsyncs and ENOSPC injected):
//!
//! - **Acknowledged means durable.** With `fsync = always` an [`AppendReply`] says
//!   `accepted` only after the fsync covering the record succeeded. A failed write or fsync
//!   answers every record of its group `accepted: false`.
//! - **Each ingress gets its own verdicts, and only those**: every append carries its
//!   ingress's reply route ([`Appender::for_ingress`]); the writer sends the verdicts of one
//!   group commit as one batch per ingress on that ingress's channel. Tokens need to be
//!   unique within one ingress only. One fsync covers the whole group, whatever the number of
//!   ingresses in it. An ingress whose receiver is gone loses only its own verdicts: the
//!   writer skips its channel and goes on (`writer_tests.rs`).
//! - **Nothing acknowledged is lost**: a record is deleted only when every upstream's cursor
//!   has passed it (or by the configured `drop_oldest` / `max_age`, counted). Recovery keeps
//!   every record that was durable; it cuts only the torn tail of the last segment.
//! - **Damage costs only the damaged records**: a record whose bytes rotted is skipped and
//!   counted (`corrupt`, once per damaged place, whether recovery or a reader meets it first);
//!   recovery and readers resynchronise on the next record whose header CRC checks (see
//!   `record.rs`), so every intact record after it is kept. A damaged segment header is
//!   rewritten, never a reason to drop the segment. Damage that runs to the end of a closed
//!   segment is counted as one record (at least), as nothing tells how many it held.
//! - **Order**: sequence ids increase through the log; each upstream receives its records in
//!   that order; after a connection loss it resends from its first unacknowledged record.
//! - **Unique ids**: a sequence id is never reused, across crashes too: ids are reserved on
//!   disk in blocks before use, and recovery continues above the reservation. The id travels
//!   with the message (MQTT 5 user property [`crate::mqtt::SEQ_PROPERTY`]) so consumers can
//!   drop the duplicates a resend can cause.
//! - **Bounded**: `max_bytes` of segment files, the free-disk watermark, the writer's queue,
//!   each upstream's in-flight window (QoS >= 1) and its client's request queue (QoS 0).
//! - **A drain never sleeps with work pending**: see the wake sources in `service.rs` and the
//!   state machine in `upstream/drain.rs`.
//! - **Disk errors do not corrupt**: a failed write or fsync seals its segment at its last
//!   good end and the next group starts a new segment; writes resume by themselves once the
//!   disk accepts them.
//! - One process per directory: the `LOCK` file is held while the spool is open.

mod fs;
mod log;
// A test double: it panics on misuse (a model of a disk, not production code).
#[cfg(any(test, feature = "test-util"))]
#[allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod memfs;
mod record;
mod service;
mod tail;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tail_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod writer_tests;

pub use fs::{Fs, SpoolFile, StdFs};
#[doc(hidden)]
pub use log::fuzz_resync;
pub use log::{
    AppendError, BacklogInfo, Chunks, FsyncPolicy, LOCK_FILE, OpenError, Pending, ReadPos,
    Recovery, SMALL_RECORD, Spool, SpoolConfig, SpoolStats, WhenFull,
};
#[doc(hidden)]
pub use record::fuzz_round_trip;
pub use record::{MAX_ORIGIN_FIELD, RECORD_HEADER, Record, encoded_len};
pub use service::{
    AppendReply, Appender, IngressAppender, SharedSpool, drain, drain_with_control, start_writer,
    wall_ms,
};

pub use crate::upstream::drain::{BacklogCheck, BacklogLimit, DrainConfig, DrainStats, GiveUp};
