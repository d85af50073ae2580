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
//! header   magic "SGSL" (4) | version u32 (2)
//! record   the shared durable framing (sensorgate_bridges::durable::frame):
//!          sync u32 | len u32 | seq u64 | hcrc u32 | crc u32 | payload (len bytes)
//!          seq = the record's number in this file: 1, 2, 3, ... (restarts at a compaction)
//! payload  op u8 (1 upsert, 2 remove) | client_id_len u16 | client_id (UTF-8)
//!          | session record (upsert only, the `persist` format)
//! ```
//!
//! Version 1 (`header` with version 1, then `len u32 | crc32 u32 | payload` records) is still
//! read: a version 1 log is rewritten in version 2 at open (a compaction); until that
//! succeeds (a full disk), every commit compacts, so a version 1 file never gets a version 2
//! record appended. Files of version 2 are not readable by builds that only know version 1
//! (they refuse to open them, naming the version).
//!
//! # Invariants
//!
//! - The latest record per ClientId wins; a remove deletes it.
//! - The log is only appended to, at the end of what was committed. A failed append is cut
//!   off again before the next one, so a record never follows garbage.
//! - At open: every CRC is verified. A record whose header checks but whose payload does not
//!   is skipped and counted; after a damaged header the next record is found again by its
//!   sync word, header CRC and number (see the framing), and the records lost in between
//!   are counted: damage costs only the records it touches. From where no record can be
//!   found again to the end is a torn tail: it is truncated. (Version 1 logs: a record whose
//!   length is impossible ends the log, so damage to a length loses the records after it.)
//! - The log is read whole at open: its size is bounded by `max_bytes` (a log over it, from a
//!   lowered bound, is read once and compacted).
//! - Compaction writes the live records to [`TMP_FILE`], fsyncs it, renames it over the log
//!   and fsyncs the directory: a crash at any point leaves either the old or the new log.
//!   It runs at open when the log is over twice the live size or over the bound (or of an
//!   older version), and before an append that would take the log over the bound or (above
//!   [`COMPACT_MIN_BYTES`]) over twice the live size.
//! - Bounded: the log never exceeds `max_bytes` (unless the bound was lowered below what is
//!   already stored; it then only shrinks). A commit that would grow the live records past it
//!   is refused ([`StoreError::Full`]) and retried like a write error; the channel holds at
//!   most [`BATCH_CHANNEL`] batches.
//! - All file access goes through the [`Fs`] seam, so tests inject torn writes, failing
//!   fsyncs and ENOSPC with `MemFs`.
//!
//! [`Core::take_persist_changes`]: crate::mqttsn::core::Core::take_persist_changes
//! [`persist`]: crate::mqttsn::persist

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use sensorgate_bridges::durable::frame::{self, Item};
use sensorgate_bridges::durable::{Fs, SpoolFile, StdFs};
use sensorgate_bridges::message::DownlinkAck;

use crate::ingress::{DatagramCore, PersistChange};

/// The sessions directory, under the gateway's `state_dir`.
pub const SESSIONS_DIR: &str = "sessions";

/// The log's file name in the sessions directory.
pub const LOG_FILE: &str = "sessions.log";

/// Where a compaction writes before it renames over [`LOG_FILE`].
pub const TMP_FILE: &str = "sessions.log.tmp";

/// The log layout version written.
pub const LOG_VERSION: u32 = 2;

/// The older layout still read (and rewritten at open).
const LEGACY_VERSION: u32 = 1;

const MAGIC: [u8; 4] = *b"SGSL";
const HEADER_LEN: u64 = 8;
/// Version 1: len u32 + crc32 u32.
const LEGACY_FRAME_HEADER_LEN: u64 = 8;
/// op u8 + client_id_len u16 + a client id of at least one byte.
const MIN_PAYLOAD_LEN: u32 = 4;
/// Largest payload accepted when reading: a ClientId (u16 length) and a session record are
/// far smaller; a larger length is damage.
const MAX_PAYLOAD_LEN: usize = 16 * 1024 * 1024;
/// The payload lengths a record header may carry.
const LIMITS: frame::Limits = frame::Limits {
    min_body: MIN_PAYLOAD_LEN as usize,
    max_body: MAX_PAYLOAD_LEN,
};
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
    #[error(
        "session log version {0} is not supported (this build reads {LEGACY_VERSION} and {LOG_VERSION})"
    )]
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
    /// Records skipped for a CRC or payload error (or lost in damage).
    pub corrupt: usize,
    /// Bytes of a torn tail cut off.
    pub truncated_bytes: u64,
    /// Whether the log was compacted.
    pub compacted: bool,
    /// The format version the log had when opened (an older one is rewritten).
    pub version: u32,
    /// Size of the log after opening.
    pub log_bytes: u64,
}

/// Where a live record's payload sits in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    /// Offset of the payload.
    offset: u64,
    /// Length of the payload.
    len: usize,
}

impl Loc {
    /// Bytes its record takes in a version 2 log (what a compaction writes).
    fn frame_len(&self) -> u64 {
        frame::encoded_len(self.len) as u64
    }
}

/// The changes waiting to be committed: the latest per ClientId (`None` removes).
pub type Pending = HashMap<Arc<str>, Option<Vec<u8>>>;

/// The session log. Single owner: the store thread after [`spawn`].
#[derive(Debug)]
pub struct SessionStore<F: Fs = StdFs> {
    fs: F,
    /// The sessions directory.
    dir: PathBuf,
    /// The log, open for reading (compaction copies from it) and positional writes.
    file: F::File,
    /// Bytes of the log that were committed; appends go here.
    len: u64,
    /// The number of the next record appended.
    next_seq: u64,
    /// The log is still of version 1: it is compacted (into version 2) before anything is
    /// added, never appended to.
    legacy: bool,
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

/// What reading a log's records found: the latest record per ClientId, where reading
/// stopped (the rest is a torn tail), and the next record number.
struct Read {
    latest: HashMap<Arc<str>, (Loc, Vec<u8>)>,
    end: u64,
    next_seq: u64,
}

impl SessionStore<StdFs> {
    /// Opens (or creates) the log in `dir` on the real filesystem: see
    /// [`SessionStore::open_with`].
    ///
    /// # Errors
    /// As [`SessionStore::open_with`].
    pub fn open(
        dir: &Path,
        max_bytes: u64,
    ) -> Result<(SessionStore, Vec<StoredSession>, OpenReport), StoreError> {
        Self::open_with(StdFs, dir, max_bytes)
    }
}

impl<F: Fs> SessionStore<F> {
    /// Opens (or creates) the log in `dir`, reads it, truncates a torn tail, compacts when
    /// due (an older version always), and returns the live sessions.
    ///
    /// # Errors
    /// [`StoreError`] when the directory or the log cannot be used: the gateway must not run
    /// on a state it cannot read.
    #[allow(clippy::type_complexity)]
    pub fn open_with(
        fs: F,
        dir: &Path,
        max_bytes: u64,
    ) -> Result<(SessionStore<F>, Vec<StoredSession>, OpenReport), StoreError> {
        let dir_err = |source| StoreError::Dir {
            path: dir.to_owned(),
            source,
        };
        fs.create_dir_all(dir).map_err(dir_err)?;
        match fs.remove(&dir.join(TMP_FILE)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(dir_err(e)),
            _ => {}
        }
        let path = dir.join(LOG_FILE);
        let file = match fs.open(&path, false) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let log = write_log_file(&fs, dir, &mut std::iter::empty())?;
                log.dir_synced?;
                log.file
            }
            other => other?,
        };
        let bytes = read_all(&file)?;
        let mut report = OpenReport::default();

        let Some((magic, version)) = bytes
            .get(..HEADER_LEN as usize)
            .and_then(|h| h.split_first_chunk::<4>())
        else {
            // Creation goes through a synced rename, so this should not happen; an empty or
            // cut-short header holds no records anyway: start afresh. Anything else is not
            // ours to overwrite.
            let expected = header_bytes();
            if expected.get(..bytes.len()) != Some(bytes.as_slice()) {
                return Err(StoreError::NotALog { path });
            }
            drop(file);
            write_log_file(&fs, dir, &mut std::iter::empty())?.dir_synced?;
            return SessionStore::open_with(fs, dir, max_bytes);
        };
        if *magic != MAGIC {
            return Err(StoreError::NotALog { path });
        }
        let version = u32::from_le_bytes(version.try_into().unwrap_or_default());
        report.version = version;
        let read = match version {
            LOG_VERSION => read_records(&bytes, &mut report),
            LEGACY_VERSION => read_legacy_records(&bytes, &mut report),
            v => return Err(StoreError::Version(v)),
        };
        drop(bytes);
        let file_len = file.len()?;
        if read.end < file_len {
            report.truncated_bytes = file_len - read.end;
            file.set_len(read.end)?;
            file.sync_data()?;
        }

        let mut sessions = Vec::with_capacity(read.latest.len());
        let mut index = HashMap::with_capacity(read.latest.len());
        let mut live = HEADER_LEN;
        for (client_id, (loc, bytes)) in read.latest {
            live += loc.frame_len();
            index.insert(client_id.clone(), loc);
            sessions.push(StoredSession { client_id, bytes });
        }
        let mut store = SessionStore {
            fs,
            dir: dir.to_owned(),
            file,
            len: read.end,
            next_seq: read.next_seq,
            legacy: version != LOG_VERSION,
            index,
            live,
            max_bytes,
            tail_dirty: false,
            #[cfg(test)]
            fail_commits: 0,
        };
        if store.legacy || store.len > 2 * store.live || store.len > store.max_bytes {
            // Best effort: the log as read is valid, so a failed compaction (a full disk) is
            // no reason not to start; the next commit that needs one tries again (a legacy
            // log: every commit).
            match store.compact(&Pending::new()) {
                Ok(()) => report.compacted = true,
                Err(error) => tracing::warn!(
                    %error,
                    code = error.error_code(),
                    log_bytes = store.len,
                    version,
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
    /// grow past its bound or to over twice its live size (or is still of version 1).
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
        let mut seq = self.next_seq;
        for (client_id, change) in pending {
            if let Some(old) = self.index.get(client_id) {
                live = live.saturating_sub(old.frame_len());
            }
            match change {
                Some(bytes) => {
                    let start = buf.len();
                    push_frame(&mut buf, seq, OP_UPSERT, client_id, bytes)?;
                    seq += 1;
                    let loc = Loc {
                        offset: self.len + (start + frame::HEADER_LEN) as u64,
                        len: buf.len() - start - frame::HEADER_LEN,
                    };
                    live += loc.frame_len();
                    placed.push((client_id.clone(), Some(loc)));
                }
                None if self.index.contains_key(client_id) => {
                    push_frame(&mut buf, seq, OP_REMOVE, client_id, &[])?;
                    seq += 1;
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
        if self.legacy || grown > self.max_bytes || (grown > COMPACT_MIN_BYTES && grown > 2 * live)
        {
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
        self.next_seq = seq;
        for (client_id, loc) in placed {
            match loc {
                Some(loc) => self.index.insert(client_id, loc),
                None => self.index.remove(&client_id),
            };
        }
        Ok(())
    }

    /// Rewrites the log (in the current version) as its live records with `pending`
    /// applied: to [`TMP_FILE`], fsync, rename over [`LOG_FILE`], fsync the directory.
    fn compact(&mut self, pending: &Pending) -> Result<(), StoreError> {
        let old = &self.file;
        let kept = self
            .index
            .iter()
            .filter(|(client_id, _)| !pending.contains_key(*client_id))
            .map(|(client_id, loc)| {
                // Payloads are copied and framed again: record numbers restart in the new log.
                let mut payload = vec![0u8; loc.len];
                if read_full(old, &mut payload, loc.offset)? < loc.len {
                    return Err(StoreError::Io(io::ErrorKind::UnexpectedEof.into()));
                }
                Ok((client_id.clone(), payload))
            });
        let upserts = pending.iter().filter_map(|(client_id, change)| {
            let bytes = change.as_ref()?;
            let mut payload = Vec::new();
            Some(
                push_payload(&mut payload, OP_UPSERT, client_id, bytes)
                    .map(|()| (client_id.clone(), payload)),
            )
        });
        let log = write_log_file(&self.fs, &self.dir, &mut kept.chain(upserts))?;
        self.file = log.file;
        self.tail_dirty = false;
        self.legacy = false;
        self.index = log.index;
        self.len = log.len;
        self.live = log.len;
        self.next_seq = log.next_seq;
        Ok(log.dir_synced?)
    }
}

/// Reads all of `file`.
fn read_all(file: &impl SpoolFile) -> io::Result<Vec<u8>> {
    let len =
        usize::try_from(file.len()?).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
    let mut bytes = vec![0u8; len];
    let n = read_full(file, &mut bytes, 0)?;
    bytes.truncate(n);
    Ok(bytes)
}

/// Reads into `buf` at `offset` until it is full or the file ends; returns the bytes read.
fn read_full(file: &impl SpoolFile, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut n = 0;
    while let Some(rest) = buf.get_mut(n..).filter(|r| !r.is_empty()) {
        match file.read_at(rest, offset + n as u64) {
            Ok(0) => break,
            Ok(m) => n += m,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Applies one valid payload at `offset` to `latest`; false when the payload is malformed.
fn apply_payload(
    latest: &mut HashMap<Arc<str>, (Loc, Vec<u8>)>,
    payload: &[u8],
    offset: u64,
) -> bool {
    match parse_payload(payload) {
        Some((OP_UPSERT, client_id, bytes)) => {
            let loc = Loc {
                offset,
                len: payload.len(),
            };
            latest.insert(Arc::from(client_id), (loc, bytes.to_vec()));
            true
        }
        Some((_, client_id, _)) => {
            latest.remove(client_id);
            true
        }
        None => false,
    }
}

/// Reads the records of a version 2 log (`bytes` is the whole file).
fn read_records(bytes: &[u8], report: &mut OpenReport) -> Read {
    let mut read = Read {
        latest: HashMap::new(),
        end: bytes.len() as u64,
        next_seq: 1,
    };
    for item in frame::scan(bytes, HEADER_LEN as usize, 1, LIMITS) {
        match item {
            Item::Record {
                offset, seq, body, ..
            } => {
                read.next_seq = read.next_seq.max(seq.saturating_add(1));
                let at = (offset + frame::HEADER_LEN) as u64;
                if apply_payload(&mut read.latest, body, at) {
                    report.records += 1;
                } else {
                    report.corrupt += 1;
                }
            }
            Item::Damaged { lost, .. } => {
                report.corrupt += usize::try_from(lost).unwrap_or(usize::MAX);
            }
            Item::Tail { offset } => read.end = offset as u64,
        }
    }
    read
}

/// Reads the records of a version 1 log (`bytes` is the whole file): a length that is
/// impossible ends it.
fn read_legacy_records(bytes: &[u8], report: &mut OpenReport) -> Read {
    let mut latest = HashMap::new();
    let mut pos = HEADER_LEN as usize;
    while let Some((len, rest)) = bytes.get(pos..).and_then(|r| r.split_first_chunk::<4>()) {
        let Some((crc, rest)) = rest.split_first_chunk::<4>() else {
            break;
        };
        let len = u32::from_le_bytes(*len);
        let Some(payload) = rest.get(..len as usize).filter(|_| len >= MIN_PAYLOAD_LEN) else {
            break;
        };
        let at = (pos + LEGACY_FRAME_HEADER_LEN as usize) as u64;
        pos += LEGACY_FRAME_HEADER_LEN as usize + payload.len();
        if crc32fast::hash(payload) != u32::from_le_bytes(*crc)
            || !apply_payload(&mut latest, payload, at)
        {
            report.corrupt += 1;
            continue;
        }
        report.records += 1;
    }
    Read {
        latest,
        end: pos as u64,
        next_seq: 1,
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
struct NewLog<Fi> {
    file: Fi,
    index: HashMap<Arc<str>, Loc>,
    len: u64,
    next_seq: u64,
    /// Whether the rename was made durable. The new log is in place either way (and must be
    /// used: the old one is unlinked), but a failure withholds the commit's acknowledgements.
    dir_synced: io::Result<()>,
}

/// Writes a new log of `payloads` (ClientId, record payload) through [`TMP_FILE`] and a
/// rename, and returns it with its index and length.
/// Nothing is renamed when a payload cannot be produced or written.
fn write_log_file<F: Fs>(
    fs: &F,
    dir: &Path,
    payloads: &mut dyn Iterator<Item = Result<(Arc<str>, Vec<u8>), StoreError>>,
) -> Result<NewLog<F::File>, StoreError> {
    let tmp = dir.join(TMP_FILE);
    let result = (|| {
        let file = fs.open(&tmp, true)?;
        file.set_len(0)?;
        let mut index = HashMap::new();
        let mut buf = header_bytes().to_vec();
        let mut len = 0u64;
        let mut seq = 1;
        for payload in payloads {
            let (client_id, payload) = payload?;
            let offset = len + (buf.len() + frame::HEADER_LEN) as u64;
            index.insert(
                client_id,
                Loc {
                    offset,
                    len: payload.len(),
                },
            );
            frame::encode(&mut buf, seq, &payload);
            seq += 1;
            // Write in chunks so a large compaction does not hold the whole log in memory.
            if buf.len() >= 1 << 20 {
                file.write_all_at(&buf, len)?;
                len += buf.len() as u64;
                buf.clear();
            }
        }
        file.write_all_at(&buf, len)?;
        len += buf.len() as u64;
        file.sync_data()?;
        Ok::<_, StoreError>((file, index, len, seq))
    })();
    let (file, index, len, next_seq) = match result {
        Ok(written) => written,
        Err(e) => {
            let _ = fs.remove(&tmp);
            return Err(e);
        }
    };
    fs.rename(&tmp, &dir.join(LOG_FILE))?;
    Ok(NewLog {
        file,
        index,
        len,
        next_seq,
        dir_synced: fs.sync_dir(dir),
    })
}

/// Appends one record payload (op, ClientId, session bytes) to `buf`.
fn push_payload(
    buf: &mut Vec<u8>,
    op: u8,
    client_id: &str,
    bytes: &[u8],
) -> Result<(), StoreError> {
    let id_len =
        u16::try_from(client_id.len()).map_err(|_| StoreError::TooLarge(client_id.len()))?;
    let payload_len = 3 + client_id.len() + bytes.len();
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(StoreError::TooLarge(payload_len));
    }
    buf.push(op);
    buf.extend_from_slice(&id_len.to_le_bytes());
    buf.extend_from_slice(client_id.as_bytes());
    buf.extend_from_slice(bytes);
    Ok(())
}

/// Appends one whole record (the shared framing, number `seq`) to `buf`.
fn push_frame(
    buf: &mut Vec<u8>,
    seq: u64,
    op: u8,
    client_id: &str,
    bytes: &[u8],
) -> Result<(), StoreError> {
    let start = frame::begin(buf, seq);
    if let Err(e) = push_payload(buf, op, client_id, bytes) {
        buf.truncate(start);
        return Err(e);
    }
    frame::finish(buf, start);
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

/// Sessions as the fuzz target sees them: (ClientId, session bytes).
#[doc(hidden)]
pub type FuzzSessions = Vec<(String, Vec<u8>)>;

/// For the `session_log` fuzz target, not an API: reads `bytes` as a whole session log file
/// and returns the live sessions (ClientId, session bytes), sorted, and the end of the valid
/// part (the rest is a torn tail). Never panics.
#[doc(hidden)]
#[must_use]
pub fn fuzz_read_log(bytes: &[u8]) -> Option<(FuzzSessions, u64)> {
    let (magic, version) = bytes.get(..HEADER_LEN as usize)?.split_first_chunk::<4>()?;
    if *magic != MAGIC {
        return None;
    }
    let mut report = OpenReport::default();
    let read = match u32::from_le_bytes(version.try_into().ok()?) {
        LOG_VERSION => read_records(bytes, &mut report),
        LEGACY_VERSION => read_legacy_records(bytes, &mut report),
        _ => return None,
    };
    let mut live: Vec<_> = read
        .latest
        .into_iter()
        .map(|(id, (_, b))| (id.to_string(), b))
        .collect();
    live.sort();
    Some((live, read.end))
}

/// For the fuzz target: a version 2 log of `sessions`, as a compaction writes it.
#[doc(hidden)]
#[must_use]
pub fn fuzz_write_log(sessions: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = header_bytes().to_vec();
    for (seq, (id, bytes)) in (1..).zip(sessions) {
        let _ = push_frame(&mut out, seq, OP_UPSERT, id, bytes);
    }
    out
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
    pub fn end_round(&mut self, core: &mut impl DatagramCore) {
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
    pub async fn finish(&mut self, core: &mut impl DatagramCore) {
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
pub fn spawn<A: Acknowledge, F: Fs>(
    store: SessionStore<F>,
) -> io::Result<(StoreLink<A>, StoreThread)> {
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
fn run<A: Acknowledge, F: Fs>(mut store: SessionStore<F>, mut rx: mpsc::Receiver<Batch<A>>) {
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
fn commit_round<A: Acknowledge, F: Fs>(
    store: &mut SessionStore<F>,
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
