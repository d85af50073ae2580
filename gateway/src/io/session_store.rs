//! The durable store of persisted MQTT-SN sessions: an append-only log under
//! `<state_dir>/sessions/`, written by its own thread with group commit.
//!
//! The core decides what is stored ([`Core::take_persist_changes`], records in the
//! [`persist`] format); this adapter only makes those changes durable and releases the broker
//! acknowledgements that waited for them. It holds no lock file: the state directory is
//! locked by the spool.
//!
//! # Flow
//!
//! ```text
//!   UdpDriver --(changes, held acks) per loop round--> [bounded channel] --> store thread
//!   store thread: merge every queued batch -> append all records -> one fsync -> ack all
//! ```
//!
//! - A batch is acknowledged only after everything received up to it is written and
//!   fsync'd (group commit: one fsync per wake-up of the thread, however many batches).
//! - When a write or fsync fails (or the bound below is reached), nothing is acknowledged:
//!   the changes and the acknowledgements are kept (the changes merged, latest per ClientId)
//!   and retried every [`RETRY_INTERVAL`] and with each new batch; the failure is logged once
//!   when it starts, every [`FAILURE_LOG_INTERVAL`] while it lasts, and once when it ends.
//!   Held acknowledgements hold the upstream's unacknowledged-downlink slots, so a store that
//!   cannot write slows the broker down instead of losing what it acknowledged.
//! - When the channel is full, the driver keeps its batch, merged to the latest change per
//!   ClientId, and hands it over as soon as there is room. Nothing waits on the disk in the
//!   driver.
//! - On shutdown the driver hands over its last batch and drops its end; the thread commits
//!   what is queued, then exits.
//!
//! # Files
//!
//! ```text
//! <state_dir>/sessions/sessions.log       the log (LOG_FILE)
//! <state_dir>/sessions/sessions.log.tmp   a compaction in progress (TMP_FILE); removed at open
//! ```
//!
//! # Log format
//!
//! Version [`LOG_VERSION`]. Integers are little-endian. Do not reorder or resize fields: a
//! layout change MUST bump [`LOG_VERSION`]; an unknown version or magic refuses to open.
//!
//! ```text
//! header   magic "SGSL" (4) | version u32
//! record   len u32 | crc32 u32 (IEEE, over payload) | payload (len bytes)
//! payload  op u8 (1 upsert, 2 remove) | client_id_len u16 | client_id (UTF-8)
//!          | session record (upsert only, the `persist` format)
//! ```
//!
//! # Invariants
//!
//! - The latest record per ClientId wins; a remove deletes it.
//! - The log is only appended to, at the end of what was committed. A failed append is cut
//!   off again before the next one, so a record never follows garbage.
//! - At open: every CRC is verified. A record whose length is impossible (below the minimum,
//!   or past the end of the file) ends the log: the rest is a torn tail and is truncated. A
//!   record within bounds whose CRC or payload is wrong is skipped and counted. (So damage to
//!   a length field in the middle of the log loses the records after it.)
//! - Compaction writes the live records to [`TMP_FILE`], fsyncs it, renames it over the log
//!   and fsyncs the directory: a crash at any point leaves either the old or the new log.
//!   It runs at open when the log is over twice the live size or over the bound, and before
//!   an append that would take the log over the bound or (above [`COMPACT_MIN_BYTES`]) over
//!   twice the live size.
//! - Bounded: the log never exceeds `max_bytes` (unless the bound was lowered below what is
//!   already stored; it then only shrinks). A commit that would grow the live records past it
//!   is refused ([`StoreError::Full`]) and retried like a write error; the channel holds at
//!   most [`BATCH_CHANNEL`] batches.
//!
//! [`Core::take_persist_changes`]: crate::mqttsn::core::Core::take_persist_changes
//! [`persist`]: crate::mqttsn::persist

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use sensorgate_bridges::message::DownlinkAck;

use crate::mqttsn::core::{Core, PersistChange};

/// The sessions directory, under the gateway's `state_dir`.
pub const SESSIONS_DIR: &str = "sessions";

/// The log's file name in the sessions directory.
pub const LOG_FILE: &str = "sessions.log";

/// Where a compaction writes before it renames over [`LOG_FILE`].
pub const TMP_FILE: &str = "sessions.log.tmp";

/// The log layout version.
pub const LOG_VERSION: u32 = 1;

const MAGIC: [u8; 4] = *b"SGSL";
const HEADER_LEN: u64 = 8;
/// len u32 + crc32 u32.
const FRAME_HEADER_LEN: u64 = 8;
/// op u8 + client_id_len u16 + a client id of at least one byte.
const MIN_PAYLOAD_LEN: u32 = 4;
const OP_UPSERT: u8 = 1;
const OP_REMOVE: u8 = 2;

/// Below this size the log is not compacted for being twice its live size (a small log costs
/// less to keep than to rewrite).
pub const COMPACT_MIN_BYTES: u64 = 1 << 20;

/// Batches queued toward the store thread; beyond it the driver merges into its own batch.
pub const BATCH_CHANNEL: usize = 64;

/// How soon a failed commit is retried when no new batch arrives.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// How often a lasting failure is logged again.
pub const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Why the store cannot open or commit.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The sessions directory cannot be created or read.
    #[error("session store directory {}: {source}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The log file does not start with the session log magic.
    #[error("{} is not a sensorgate session log", path.display())]
    NotALog {
        /// The file.
        path: PathBuf,
    },
    /// The log was written by a version with another layout.
    #[error("session log version {0} is not supported (this build reads {LOG_VERSION})")]
    Version(u32),
    /// Reading, writing or syncing failed.
    #[error("session log I/O: {0}")]
    Io(#[from] io::Error),
    /// The live sessions would not fit the configured bound.
    #[error("persisted sessions need {needed} bytes, over the bound of {max} bytes")]
    Full {
        /// Bytes the log would need after compaction.
        needed: u64,
        /// The bound (`session_log_max_size`).
        max: u64,
    },
    /// A record is too large for its length field.
    #[error("session record of {0} bytes is too large")]
    TooLarge(usize),
}

impl StoreError {
    /// A snake_case tag for metrics and structured logs, stable across releases.
    pub fn error_code(&self) -> &'static str {
        match self {
            Self::Dir { .. } => "dir",
            Self::NotALog { .. } => "not_a_log",
            Self::Version(_) => "version",
            Self::Io(_) => "io",
            Self::Full { .. } => "full",
            Self::TooLarge(_) => "too_large",
        }
    }

    /// Whether retrying the commit later may succeed (the start-up errors cannot).
    pub fn is_recoverable(&self) -> bool {
        matches!(self, Self::Io(_) | Self::Full { .. } | Self::TooLarge(_))
    }
}

/// One stored session, as loaded at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    /// The ClientId.
    pub client_id: Arc<str>,
    /// Its record, for `Core::restore`.
    pub bytes: Vec<u8>,
}

/// What [`SessionStore::open`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Valid records read (upserts and removes, superseded ones included).
    pub records: usize,
    /// Records skipped for a CRC or payload error.
    pub corrupt: usize,
    /// Bytes of a torn tail cut off.
    pub truncated_bytes: u64,
    /// Whether the log was compacted.
    pub compacted: bool,
    /// Size of the log after opening.
    pub log_bytes: u64,
}

/// Where a live record sits in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    offset: u64,
    /// Frame length, header included.
    len: u64,
}

/// The changes waiting to be committed: the latest per ClientId (`None` removes).
pub type Pending = HashMap<Arc<str>, Option<Vec<u8>>>;

/// The session log. Single owner: the store thread after [`spawn`].
#[derive(Debug)]
pub struct SessionStore {
    /// The sessions directory.
    dir: PathBuf,
    /// The log, open for reading (compaction copies from it) and positional writes.
    file: File,
    /// Bytes of the log that were committed; appends go here.
    len: u64,
    /// The live records.
    index: HashMap<Arc<str>, Loc>,
    /// Header plus the live records' frames: the size of a compacted log.
    live: u64,
    /// The bound on the log's size.
    max_bytes: u64,
    /// A failed append may have left bytes after `len` that could not be cut off yet: no
    /// append until they are.
    tail_dirty: bool,
    /// Test hook: fail the next commits with an I/O error.
    #[cfg(test)]
    fail_commits: usize,
}

impl SessionStore {
    /// Opens (or creates) the log in `dir`, reads it, truncates a torn tail, compacts when
    /// due, and returns the live sessions.
    ///
    /// # Errors
    /// [`StoreError`] when the directory or the log cannot be used: the gateway must not run
    /// on a state it cannot read.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
    ) -> Result<(SessionStore, Vec<StoredSession>, OpenReport), StoreError> {
        let dir_err = |source| StoreError::Dir {
            path: dir.to_owned(),
            source,
        };
        fs::create_dir_all(dir).map_err(dir_err)?;
        match fs::remove_file(dir.join(TMP_FILE)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(dir_err(e)),
            _ => {}
        }
        let path = dir.join(LOG_FILE);
        if !path.exists() {
            write_log_file(dir, &mut std::iter::empty())?.dir_synced?;
        }
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let file_len = file.metadata()?.len();
        let mut report = OpenReport::default();
        let mut reader = BufReader::new(&file);

        let mut header = [0u8; HEADER_LEN as usize];
        let mut got = 0;
        while got < header.len() {
            match reader.read(header.get_mut(got..).unwrap_or_default())? {
                0 => break,
                n => got += n,
            }
        }
        let (magic, version) = header.split_at(4);
        if got < header.len() {
            // Creation goes through a synced rename, so this should not happen; an empty or
            // cut-short header holds no records anyway: start afresh. Anything else is not
            // ours to overwrite.
            let expected = header_bytes();
            if header.get(..got) != expected.get(..got) {
                return Err(StoreError::NotALog { path });
            }
            drop(reader);
            drop(file);
            write_log_file(dir, &mut std::iter::empty())?.dir_synced?;
            return SessionStore::open(dir, max_bytes);
        }
        if magic != MAGIC {
            return Err(StoreError::NotALog { path });
        }
        let version = u32::from_le_bytes(version.try_into().unwrap_or_default());
        if version != LOG_VERSION {
            return Err(StoreError::Version(version));
        }

        let mut latest: HashMap<Arc<str>, (Loc, Vec<u8>)> = HashMap::new();
        let mut pos = HEADER_LEN;
        while pos < file_len {
            let mut frame_header = [0u8; FRAME_HEADER_LEN as usize];
            if file_len - pos < FRAME_HEADER_LEN {
                break;
            }
            reader.read_exact(&mut frame_header)?;
            let (len, crc) = frame_header.split_at(4);
            let len = u32::from_le_bytes(len.try_into().unwrap_or_default());
            let crc = u32::from_le_bytes(crc.try_into().unwrap_or_default());
            if len < MIN_PAYLOAD_LEN || u64::from(len) > file_len - pos - FRAME_HEADER_LEN {
                break;
            }
            // Bounded by the file length (checked above).
            let mut payload = vec![0u8; len as usize];
            reader.read_exact(&mut payload)?;
            let loc = Loc {
                offset: pos,
                len: FRAME_HEADER_LEN + u64::from(len),
            };
            pos += loc.len;
            if crc32fast::hash(&payload) != crc {
                report.corrupt += 1;
                continue;
            }
            match parse_payload(&payload) {
                Some((OP_UPSERT, client_id, bytes)) => {
                    latest.insert(Arc::from(client_id), (loc, bytes.to_vec()));
                }
                Some((_, client_id, _)) => {
                    latest.remove(client_id);
                }
                None => {
                    report.corrupt += 1;
                    continue;
                }
            }
            report.records += 1;
        }
        drop(reader);
        if pos < file_len {
            report.truncated_bytes = file_len - pos;
            file.set_len(pos)?;
            file.sync_all()?;
        }

        let mut sessions = Vec::with_capacity(latest.len());
        let mut index = HashMap::with_capacity(latest.len());
        let mut live = HEADER_LEN;
        for (client_id, (loc, bytes)) in latest {
            live += loc.len;
            index.insert(client_id.clone(), loc);
            sessions.push(StoredSession { client_id, bytes });
        }
        let mut store = SessionStore {
            dir: dir.to_owned(),
            file,
            len: pos,
            index,
            live,
            max_bytes,
            tail_dirty: false,
            #[cfg(test)]
            fail_commits: 0,
        };
        if store.len > 2 * store.live || store.len > store.max_bytes {
            // Best effort: the log as read is valid, so a failed compaction (a full disk) is
            // no reason not to start; the next commit that needs one tries again.
            match store.compact(&Pending::new()) {
                Ok(()) => report.compacted = true,
                Err(error) => tracing::warn!(
                    %error,
                    code = error.error_code(),
                    log_bytes = store.len,
                    "Session log compaction at start failed; continuing with the log as is."
                ),
            }
        }
        report.log_bytes = store.len;
        Ok((store, sessions, report))
    }

    /// Size of the log in bytes.
    pub fn log_bytes(&self) -> u64 {
        self.len
    }

    /// Number of live sessions.
    pub fn sessions(&self) -> usize {
        self.index.len()
    }

    /// Makes `pending` durable: appends a record per change (removes of unknown ClientIds
    /// need none) and fsyncs once, or compacts with the changes applied when the log would
    /// grow past its bound or to over twice its live size.
    ///
    /// # Errors
    /// [`StoreError::Full`] when the live sessions would exceed the bound, or the I/O error;
    /// the committed log is unchanged then, and the same changes can be committed again.
    pub fn commit(&mut self, pending: &Pending) -> Result<(), StoreError> {
        #[cfg(test)]
        if self.fail_commits > 0 {
            self.fail_commits -= 1;
            return Err(StoreError::Io(io::Error::other("injected failure")));
        }
        let mut buf = Vec::new();
        let mut placed = Vec::with_capacity(pending.len());
        let mut live = self.live;
        for (client_id, change) in pending {
            if let Some(old) = self.index.get(client_id) {
                live = live.saturating_sub(old.len);
            }
            match change {
                Some(bytes) => {
                    let start = buf.len() as u64;
                    push_frame(&mut buf, OP_UPSERT, client_id, bytes)?;
                    let loc = Loc {
                        offset: self.len + start,
                        len: buf.len() as u64 - start,
                    };
                    live += loc.len;
                    placed.push((client_id.clone(), Some(loc)));
                }
                None if self.index.contains_key(client_id) => {
                    push_frame(&mut buf, OP_REMOVE, client_id, &[])?;
                    placed.push((client_id.clone(), None));
                }
                None => {}
            }
        }
        if buf.is_empty() {
            return Ok(());
        }
        // Growth past the bound is refused; shrinking is always allowed (the bound may have been
        // lowered below what is stored).
        if live > self.max_bytes && live > self.live {
            return Err(StoreError::Full {
                needed: live,
                max: self.max_bytes,
            });
        }
        let grown = self.len + buf.len() as u64;
        if grown > self.max_bytes || (grown > COMPACT_MIN_BYTES && grown > 2 * live) {
            return self.compact(pending);
        }
        if self.tail_dirty {
            self.file.set_len(self.len)?;
            self.tail_dirty = false;
        }
        let written = self
            .file
            .write_all_at(&buf, self.len)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Cut off whatever part made it, so the next append follows valid records (a
            // shorter append over a longer leftover would leave old records after it).
            self.tail_dirty = self.file.set_len(self.len).is_err();
            return Err(e.into());
        }
        self.len = grown;
        self.live = live;
        for (client_id, loc) in placed {
            match loc {
                Some(loc) => self.index.insert(client_id, loc),
                None => self.index.remove(&client_id),
            };
        }
        Ok(())
    }

    /// Rewrites the log as its live records with `pending` applied: to [`TMP_FILE`], fsync,
    /// rename over [`LOG_FILE`], fsync the directory.
    fn compact(&mut self, pending: &Pending) -> Result<(), StoreError> {
        let old = &self.file;
        let kept = self
            .index
            .iter()
            .filter(|(client_id, _)| !pending.contains_key(*client_id))
            .map(|(client_id, loc)| {
                // Frames are copied verbatim: their CRC does not depend on their position.
                let len = usize::try_from(loc.len).map_err(|_| StoreError::TooLarge(usize::MAX))?;
                let mut frame = vec![0u8; len];
                old.read_exact_at(&mut frame, loc.offset)?;
                Ok((client_id.clone(), frame))
            });
        let upserts = pending.iter().filter_map(|(client_id, change)| {
            let bytes = change.as_ref()?;
            let mut frame = Vec::new();
            Some(
                push_frame(&mut frame, OP_UPSERT, client_id, bytes)
                    .map(|()| (client_id.clone(), frame)),
            )
        });
        let log = write_log_file(&self.dir, &mut kept.chain(upserts))?;
        self.file = log.file;
        self.tail_dirty = false;
        self.index = log.index;
        self.len = log.len;
        self.live = log.len;
        Ok(log.dir_synced?)
    }
}

/// The log header.
fn header_bytes() -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    let (magic, version) = h.split_at_mut(4);
    magic.copy_from_slice(&MAGIC);
    version.copy_from_slice(&LOG_VERSION.to_le_bytes());
    h
}

/// A log just written by [`write_log_file`].
struct NewLog {
    file: File,
    index: HashMap<Arc<str>, Loc>,
    len: u64,
    /// Whether the rename was made durable. The new log is in place either way (and must be
    /// used: the old one is unlinked), but a failure withholds the commit's acknowledgements.
    dir_synced: io::Result<()>,
}

/// Writes a new log of `frames` (ClientId, whole frame) through [`TMP_FILE`] and a rename,
/// and returns it with its index and length.
/// Nothing is renamed when a frame cannot be produced or written.
fn write_log_file(
    dir: &Path,
    frames: &mut dyn Iterator<Item = Result<(Arc<str>, Vec<u8>), StoreError>>,
) -> Result<NewLog, StoreError> {
    let tmp = dir.join(TMP_FILE);
    let result = (|| {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let mut index = HashMap::new();
        let mut buf = header_bytes().to_vec();
        let mut len = 0u64;
        for frame in frames {
            let (client_id, frame) = frame?;
            let offset = len + buf.len() as u64;
            index.insert(
                client_id,
                Loc {
                    offset,
                    len: frame.len() as u64,
                },
            );
            buf.extend_from_slice(&frame);
            // Write in chunks so a large compaction does not hold the whole log in memory.
            if buf.len() >= 1 << 20 {
                file.write_all_at(&buf, len)?;
                len += buf.len() as u64;
                buf.clear();
            }
        }
        file.write_all_at(&buf, len)?;
        len += buf.len() as u64;
        file.sync_all()?;
        Ok::<_, StoreError>((file, index, len))
    })();
    let (file, index, len) = match result {
        Ok(written) => written,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    fs::rename(&tmp, dir.join(LOG_FILE))?;
    Ok(NewLog {
        file,
        index,
        len,
        dir_synced: File::open(dir).and_then(|d| d.sync_all()),
    })
}

/// Appends one record (frame header and payload) to `buf`.
fn push_frame(buf: &mut Vec<u8>, op: u8, client_id: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let id_len =
        u16::try_from(client_id.len()).map_err(|_| StoreError::TooLarge(client_id.len()))?;
    let payload_len = 3 + client_id.len() + bytes.len();
    let len = u32::try_from(payload_len).map_err(|_| StoreError::TooLarge(payload_len))?;
    let start = buf.len();
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.push(op);
    buf.extend_from_slice(&id_len.to_le_bytes());
    buf.extend_from_slice(client_id.as_bytes());
    buf.extend_from_slice(bytes);
    let crc = crc32fast::hash(buf.get(start + 8..).unwrap_or_default());
    if let Some(slot) = buf.get_mut(start + 4..start + 8) {
        slot.copy_from_slice(&crc.to_le_bytes());
    }
    Ok(())
}

/// (op, ClientId, session bytes) of a payload whose CRC matched; `None` when malformed.
fn parse_payload(payload: &[u8]) -> Option<(u8, &str, &[u8])> {
    let (&op, rest) = payload.split_first()?;
    let (id_len, rest) = rest.split_first_chunk::<2>()?;
    let (client_id, bytes) = rest.split_at_checked(usize::from(u16::from_le_bytes(*id_len)))?;
    let client_id = std::str::from_utf8(client_id).ok()?;
    let valid = match op {
        OP_UPSERT => !client_id.is_empty(),
        OP_REMOVE => !client_id.is_empty() && bytes.is_empty(),
        _ => false,
    };
    valid.then_some((op, client_id, bytes))
}

// ---------------------------------------------------------------------------------------------
// The store thread and the driver's end of it.

/// An acknowledgement released once its batch is durable: the broker's [`DownlinkAck`] (tests
/// use their own).
pub trait Acknowledge: Send + 'static {
    /// Sends the acknowledgement. Must not block.
    fn acknowledge(self);
}

impl Acknowledge for DownlinkAck {
    fn acknowledge(self) {
        self.ack();
    }
}

/// What the driver hands to the store thread once per loop round.
#[derive(Debug)]
pub struct Batch<A = DownlinkAck> {
    /// Changes from [`Core::take_persist_changes`], in order.
    pub changes: Vec<PersistChange>,
    /// Acknowledgements to release once `changes` (and everything before) are durable.
    pub acks: Vec<A>,
}

impl<A> Default for Batch<A> {
    fn default() -> Self {
        Batch {
            changes: Vec::new(),
            acks: Vec::new(),
        }
    }
}

impl<A> Batch<A> {
    fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.acks.is_empty()
    }

    /// Keeps only the last change per ClientId (the one that counts).
    fn coalesce(&mut self) {
        let mut seen = HashSet::new();
        let mut kept: Vec<PersistChange> = self
            .changes
            .drain(..)
            .rev()
            .filter(|c| seen.insert(client_id_of(c).clone()))
            .collect();
        kept.reverse();
        self.changes = kept;
    }
}

fn client_id_of(change: &PersistChange) -> &Arc<str> {
    match change {
        PersistChange::Upsert { client_id, .. } | PersistChange::Remove { client_id } => client_id,
    }
}

/// The driver's end of the store: collects one round's changes and held acknowledgements and
/// hands them over without ever waiting.
#[derive(Debug)]
pub struct StoreLink<A = DownlinkAck> {
    tx: mpsc::Sender<Batch<A>>,
    /// This round's batch, or earlier ones that found the channel full (merged).
    next: Batch<A>,
    /// The store thread is gone (logged once).
    closed: bool,
}

impl<A: Acknowledge> StoreLink<A> {
    /// Holds `ack` until this round's changes are durable.
    pub fn hold_ack(&mut self, ack: A) {
        self.next.acks.push(ack);
    }

    /// Takes the core's changes of this round and hands the batch over if there is room;
    /// otherwise keeps it for [`StoreLink::room`].
    pub fn end_round(&mut self, core: &mut Core) {
        core.take_persist_changes(&mut self.next.changes);
        self.try_send();
    }

    /// Whether a batch waits for room in the channel.
    pub fn has_pending(&self) -> bool {
        !self.next.is_empty()
    }

    /// A future that resolves when the channel has room for the waiting batch (pass its
    /// permit to [`StoreLink::send_with`]); `None` when nothing waits.
    pub fn room(
        &self,
    ) -> Option<
        impl Future<Output = Result<mpsc::OwnedPermit<Batch<A>>, mpsc::error::SendError<()>>> + use<A>,
    > {
        self.has_pending().then(|| self.tx.clone().reserve_owned())
    }

    /// Hands the waiting batch over through a permit from [`StoreLink::room`].
    pub fn send_with(&mut self, permit: mpsc::OwnedPermit<Batch<A>>) {
        permit.send(std::mem::take(&mut self.next));
    }

    /// Takes the core's last changes and hands everything over, waiting for room: at
    /// shutdown, before the driver drops its end.
    pub async fn finish(&mut self, core: &mut Core) {
        core.take_persist_changes(&mut self.next.changes);
        if self.next.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.next);
        if self.tx.send(batch).await.is_err() {
            self.report_closed();
        }
    }

    fn try_send(&mut self) {
        if self.next.is_empty() {
            return;
        }
        match self.tx.try_send(std::mem::take(&mut self.next)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(mut batch)) => {
                // Bounded while waiting: one change per ClientId, and the acks are bounded by
                // the upstreams' unacknowledged-downlink slots.
                batch.coalesce();
                self.next = batch;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => self.report_closed(),
        }
    }

    fn report_closed(&mut self) {
        // The acknowledgements are dropped unsent: nothing made them durable.
        if !self.closed {
            self.closed = true;
            tracing::error!("Session store thread is gone; persisted session changes are lost.");
        }
    }
}

/// The running store thread.
#[derive(Debug)]
pub struct StoreThread {
    done: oneshot::Receiver<()>,
}

impl StoreThread {
    /// Waits until the thread has committed everything queued and exited (it does once every
    /// [`StoreLink`] is dropped).
    pub async fn finished(self) {
        // An error means the thread ended without saying so (it panicked): done either way.
        let _ = self.done.await;
    }
}

/// Starts the store thread.
///
/// # Errors
/// When the OS refuses a thread.
pub fn spawn<A: Acknowledge>(store: SessionStore) -> io::Result<(StoreLink<A>, StoreThread)> {
    let (tx, rx) = mpsc::channel(BATCH_CHANNEL);
    let (done_tx, done) = oneshot::channel();
    std::thread::Builder::new()
        .name("session-store".into())
        .spawn(move || {
            run(store, rx);
            let _ = done_tx.send(());
        })?;
    Ok((
        StoreLink {
            tx,
            next: Batch::default(),
            closed: false,
        },
        StoreThread { done },
    ))
}

/// A commit failure in progress, for rate-limited logging.
#[derive(Debug)]
struct Failing {
    since: Instant,
    last_logged: Instant,
    attempts: u64,
}

#[allow(clippy::disallowed_methods)] // The store thread is an IO adapter: it reads the clock.
fn run<A: Acknowledge>(mut store: SessionStore, mut rx: mpsc::Receiver<Batch<A>>) {
    let mut pending = Pending::new();
    let mut acks: Vec<A> = Vec::new();
    let mut failing: Option<Failing> = None;
    let merge = |batch: Batch<A>, pending: &mut Pending, acks: &mut Vec<A>| {
        for change in batch.changes {
            match change {
                PersistChange::Upsert { client_id, bytes } => {
                    pending.insert(client_id, Some(bytes))
                }
                PersistChange::Remove { client_id } => pending.insert(client_id, None),
            };
        }
        acks.extend(batch.acks);
    };
    loop {
        let open = if failing.is_some() {
            // Retry on a timer too: the driver may have nothing new to send.
            match rx.try_recv() {
                Ok(batch) => {
                    merge(batch, &mut pending, &mut acks);
                    true
                }
                Err(mpsc::error::TryRecvError::Empty) => {
                    std::thread::sleep(RETRY_INTERVAL);
                    true
                }
                Err(mpsc::error::TryRecvError::Disconnected) => false,
            }
        } else {
            match rx.blocking_recv() {
                Some(batch) => {
                    merge(batch, &mut pending, &mut acks);
                    true
                }
                None => false,
            }
        };
        // Group commit: everything queued now goes with one fsync.
        while let Ok(batch) = rx.try_recv() {
            merge(batch, &mut pending, &mut acks);
        }
        if !pending.is_empty() || !acks.is_empty() {
            commit_round(&mut store, &mut pending, &mut acks, &mut failing);
        }
        if !open {
            break;
        }
    }
    if !pending.is_empty() {
        tracing::error!(
            records = pending.len(),
            "Session store stopped with changes not written; they are lost."
        );
    }
}

/// Commits `pending` and releases `acks` once it is durable; on failure keeps both for the
/// next round and logs as the module docs say.
#[allow(clippy::disallowed_methods)] // As `run`.
fn commit_round<A: Acknowledge>(
    store: &mut SessionStore,
    pending: &mut Pending,
    acks: &mut Vec<A>,
    failing: &mut Option<Failing>,
) {
    let records = pending.len();
    match store.commit(pending) {
        Ok(()) => {
            pending.clear();
            let released = acks.len();
            for ack in acks.drain(..) {
                ack.acknowledge();
            }
            tracing::debug!(
                records,
                acks = released,
                log_bytes = store.log_bytes(),
                sessions = store.sessions(),
                "Session changes durable."
            );
            if let Some(f) = failing.take() {
                tracing::info!(
                    attempts = f.attempts,
                    failed_for = ?f.since.elapsed(),
                    "Session store writes recovered."
                );
            }
        }
        Err(error) => {
            let now = Instant::now();
            match failing {
                None => {
                    tracing::error!(
                        %error,
                        code = error.error_code(),
                        records,
                        held_acks = acks.len(),
                        "Session store commit failed; broker acknowledgements held, retrying."
                    );
                    *failing = Some(Failing {
                        since: now,
                        last_logged: now,
                        attempts: 1,
                    });
                }
                Some(f) => {
                    f.attempts += 1;
                    if now.duration_since(f.last_logged) >= FAILURE_LOG_INTERVAL {
                        f.last_logged = now;
                        tracing::warn!(
                            %error,
                            code = error.error_code(),
                            attempts = f.attempts,
                            records,
                            held_acks = acks.len(),
                            "Session store still failing."
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
