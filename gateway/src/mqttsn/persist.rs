//! The persisted form of one MQTT-SN session: what a sleeping client or a CleanSession=0
//! session keeps across a gateway restart, as a versioned binary record.
//!
//! This module is sans-IO and knows nothing of files: [`encode`] turns a [`SessionRecord`]
//! into bytes, [`decode`] turns bytes back into a record. The core builds records from its
//! sessions and restores sessions from records (`Core::take_persist_changes`,
//! `Core::restore`); the session store (`io::session_store`) only moves the bytes.
//!
//! # Invariants
//!
//! - Decoding is total and bounded: every byte string yields `Ok` or a typed [`RecordError`],
//!   never a panic. Every read is checked; element counts are never trusted for allocation
//!   (each element consumes input, so the work is bounded by the input length).
//! - Decoding is strict, so the encoding is canonical: for every `Ok(record)` from
//!   [`decode`], [`encode`] gives back exactly the input bytes. Reserved flag bits MUST be
//!   zero, every string MUST be UTF-8, and the record MUST end where its last field ends.
//! - Decoding checks what the core relies on: topic ids strictly increasing and never
//!   0x0000 / 0xFFFF, topic names and subscription filters unique, filters valid MQTT
//!   filters, the Will topic a valid MQTT topic name, QoS at most 2. Topic names from the
//!   broker are only required to be UTF-8: the core queues whatever the broker delivers.
//! - Only state worth keeping is in a record: topic registrations (never "known" to the
//!   client after a restart, as after a CleanSession=0 reconnect), subscriptions, the Will and
//!   the queued QoS 1/2 downlink. Addresses, timers, message ids and uplink exchanges are not:
//!   a restored session is disconnected or asleep and its timers restart.
//!
//! # Format
//!
//! Version [`FORMAT_VERSION`]. All integers are little-endian. Do not reorder, resize or
//! reinterpret fields: any layout change MUST bump [`FORMAT_VERSION`], and [`decode`] refuses
//! versions it does not know.
//!
//! ```text
//! record:
//!   version         u8     FORMAT_VERSION
//!   flags           u8     bit 0 CleanSession, bit 1 asleep (else disconnected),
//!                          bit 2 a Will follows; bits 3..=7 zero
//!   keep_alive      u16    seconds, from CONNECT
//!   sleep           u16    seconds, from the last DISCONNECT(duration)
//!   client_id       str    non-empty
//!   next_topic_id   u16    where the next topic id allocation starts
//!   topics          u32 count, then count x { id u16, name str }   ids strictly increasing
//!   refused         u32 count, then count x { name str }           topics the client refused
//!   subscriptions   u32 count, then count x { qos u8, filter str }
//!   will            (only with flags bit 2) { msg_flags u8, topic str, payload blob }
//!   queue           u32 count, then count x { msg_flags u8, topic str, payload blob }
//!                   oldest first; a message that was in flight comes first, with DUP
//!
//! str        = len u16, then len bytes of UTF-8
//! blob       = len u32, then len bytes
//! msg_flags  = bits 0..=1 QoS (0..=2), bit 2 retain, bit 3 DUP (always 0 for the Will);
//!              bits 4..=7 zero
//! ```

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use sensorgate_bridges::topic::{is_valid_filter, is_valid_name};

/// The layout version written by [`encode`] and the only one [`decode`] accepts.
pub const FORMAT_VERSION: u8 = 1;

const FLAG_CLEAN_SESSION: u8 = 0x01;
const FLAG_ASLEEP: u8 = 0x02;
const FLAG_WILL: u8 = 0x04;
const SESSION_FLAGS: u8 = FLAG_CLEAN_SESSION | FLAG_ASLEEP | FLAG_WILL;

const MSG_QOS: u8 = 0x03;
const MSG_RETAIN: u8 = 0x04;
const MSG_DUP: u8 = 0x08;
const MSG_FLAGS: u8 = MSG_QOS | MSG_RETAIN | MSG_DUP;

/// Where a restored session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordState {
    /// A sleeping client: downlink is buffered until it wakes.
    Asleep,
    /// A CleanSession=0 session without a connection.
    Disconnected,
}

/// One topic registration of the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordTopic {
    /// The topic id (1..=0xFFFE).
    pub id: u16,
    /// The MQTT topic name.
    pub name: Arc<str>,
}

/// One subscription of the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordSubscription {
    /// The MQTT topic filter (predefined and short topic ids are stored resolved).
    pub filter: Arc<str>,
    /// Granted QoS, 0..=2.
    pub qos: u8,
}

/// The client's Will.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordWill {
    /// A valid MQTT topic name.
    pub topic: Arc<str>,
    /// The Will message.
    pub payload: Bytes,
    /// QoS it is published with, 0..=2.
    pub qos: u8,
    /// Whether it is published retained.
    pub retain: bool,
}

/// One downlink message waiting for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMessage {
    /// The MQTT topic it was published to.
    pub topic: Arc<str>,
    /// The payload.
    pub payload: Bytes,
    /// QoS toward the client, 0..=2 (the core stores 1 and 2 only).
    pub qos: u8,
    /// The retain flag.
    pub retain: bool,
    /// The message was sent to the client before: send it again with DUP.
    pub dup: bool,
}

/// Everything of one session that survives a restart. See the module docs for the format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// The ClientId, the key of the session.
    pub client_id: Arc<str>,
    /// The CleanSession flag of the last CONNECT.
    pub clean_session: bool,
    /// Keep-alive Duration from CONNECT, in seconds.
    pub keep_alive_secs: u16,
    /// Sleep duration from the last DISCONNECT(duration), in seconds.
    pub sleep_secs: u16,
    /// Asleep or disconnected.
    pub state: RecordState,
    /// Where the next topic id allocation starts.
    pub next_topic_id: u16,
    /// Topic registrations, by increasing id.
    pub topics: Vec<RecordTopic>,
    /// Topics the client refused (REGACK rejection): not delivered any more.
    pub refused: Vec<Arc<str>>,
    /// Subscriptions.
    pub subscriptions: Vec<RecordSubscription>,
    /// The Will, if any.
    pub will: Option<RecordWill>,
    /// Queued downlink, oldest first.
    pub queue: Vec<RecordMessage>,
}

/// Why bytes are not a valid session record, or a record cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The input ends before a field the record needs.
    #[error("record truncated")]
    Truncated,
    /// The version byte is not [`FORMAT_VERSION`].
    #[error("unsupported record version {0}")]
    Version(u8),
    /// Reserved flag bits are set.
    #[error("reserved flag bits set in {0:#04x}")]
    ReservedFlags(u8),
    /// A QoS above 2.
    #[error("invalid QoS {0}")]
    Qos(u8),
    /// A string is not UTF-8.
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    /// The ClientId is empty.
    #[error("empty client id")]
    EmptyClientId,
    /// A topic id is reserved, duplicated or out of order.
    #[error("topic id {0:#06x} is reserved or out of order")]
    TopicId(u16),
    /// A topic name is registered twice.
    #[error("topic name registered twice")]
    DuplicateTopic,
    /// A subscription filter is not a valid MQTT filter.
    #[error("invalid subscription filter")]
    InvalidFilter,
    /// A filter is subscribed twice.
    #[error("subscription filter listed twice")]
    DuplicateFilter,
    /// The Will topic is not a valid MQTT topic name.
    #[error("invalid Will topic")]
    InvalidWillTopic,
    /// The Will carries the DUP flag.
    #[error("DUP flag on the Will")]
    WillDup,
    /// Bytes follow the last field.
    #[error("trailing bytes after the record")]
    TrailingBytes,
    /// A string or payload is too long for its length field (encoding only).
    #[error("field of {0} bytes does not fit its length field")]
    TooLong(usize),
}

impl RecordError {
    /// A snake_case tag for metrics and structured logs, stable across releases.
    pub fn error_code(&self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::Version(_) => "version",
            Self::ReservedFlags(_) => "reserved_flags",
            Self::Qos(_) => "qos",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::EmptyClientId => "empty_client_id",
            Self::TopicId(_) => "topic_id",
            Self::DuplicateTopic => "duplicate_topic",
            Self::InvalidFilter => "invalid_filter",
            Self::DuplicateFilter => "duplicate_filter",
            Self::InvalidWillTopic => "invalid_will_topic",
            Self::WillDup => "will_dup",
            Self::TrailingBytes => "trailing_bytes",
            Self::TooLong(_) => "too_long",
        }
    }
}

/// Appends the encoding of `record` to `out`.
///
/// # Errors
/// [`RecordError::TooLong`] when a string is longer than 65535 bytes, a payload longer than
/// 4 GiB, or a list longer than `u32::MAX`; `out` is then left as it was.
pub fn encode(record: &SessionRecord, out: &mut Vec<u8>) -> Result<(), RecordError> {
    let start = out.len();
    let result = encode_into(record, out);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

fn encode_into(r: &SessionRecord, out: &mut Vec<u8>) -> Result<(), RecordError> {
    let mut flags = 0;
    if r.clean_session {
        flags |= FLAG_CLEAN_SESSION;
    }
    if r.state == RecordState::Asleep {
        flags |= FLAG_ASLEEP;
    }
    if r.will.is_some() {
        flags |= FLAG_WILL;
    }
    out.push(FORMAT_VERSION);
    out.push(flags);
    out.extend_from_slice(&r.keep_alive_secs.to_le_bytes());
    out.extend_from_slice(&r.sleep_secs.to_le_bytes());
    put_str(out, &r.client_id)?;
    out.extend_from_slice(&r.next_topic_id.to_le_bytes());
    put_count(out, r.topics.len())?;
    for t in &r.topics {
        out.extend_from_slice(&t.id.to_le_bytes());
        put_str(out, &t.name)?;
    }
    put_count(out, r.refused.len())?;
    for name in &r.refused {
        put_str(out, name)?;
    }
    put_count(out, r.subscriptions.len())?;
    for s in &r.subscriptions {
        out.push(s.qos);
        put_str(out, &s.filter)?;
    }
    if let Some(w) = &r.will {
        out.push(msg_flags(w.qos, w.retain, false));
        put_str(out, &w.topic)?;
        put_blob(out, &w.payload)?;
    }
    put_count(out, r.queue.len())?;
    for m in &r.queue {
        out.push(msg_flags(m.qos, m.retain, m.dup));
        put_str(out, &m.topic)?;
        put_blob(out, &m.payload)?;
    }
    Ok(())
}

fn msg_flags(qos: u8, retain: bool, dup: bool) -> u8 {
    let mut f = qos & MSG_QOS;
    if retain {
        f |= MSG_RETAIN;
    }
    if dup {
        f |= MSG_DUP;
    }
    f
}

fn put_count(out: &mut Vec<u8>, n: usize) -> Result<(), RecordError> {
    let n = u32::try_from(n).map_err(|_| RecordError::TooLong(n))?;
    out.extend_from_slice(&n.to_le_bytes());
    Ok(())
}

fn put_str(out: &mut Vec<u8>, s: &str) -> Result<(), RecordError> {
    let len = u16::try_from(s.len()).map_err(|_| RecordError::TooLong(s.len()))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn put_blob(out: &mut Vec<u8>, b: &[u8]) -> Result<(), RecordError> {
    let len = u32::try_from(b.len()).map_err(|_| RecordError::TooLong(b.len()))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(b);
    Ok(())
}

/// Decodes one record. Pure and total: suitable for fuzzing.
///
/// # Errors
/// A [`RecordError`] naming the first problem found.
pub fn decode(bytes: &[u8]) -> Result<SessionRecord, RecordError> {
    let mut r = Reader { rest: bytes };
    let version = r.u8()?;
    if version != FORMAT_VERSION {
        return Err(RecordError::Version(version));
    }
    let flags = r.u8()?;
    if flags & !SESSION_FLAGS != 0 {
        return Err(RecordError::ReservedFlags(flags));
    }
    let keep_alive_secs = r.u16()?;
    let sleep_secs = r.u16()?;
    let client_id = r.str()?;
    if client_id.is_empty() {
        return Err(RecordError::EmptyClientId);
    }
    let next_topic_id = r.u16()?;

    let mut topics: Vec<RecordTopic> = Vec::new();
    let mut names = HashSet::new();
    for _ in 0..r.u32()? {
        let id = r.u16()?;
        let name = r.str()?;
        let ordered = topics.last().is_none_or(|last| last.id < id);
        if id == 0 || id == 0xFFFF || !ordered {
            return Err(RecordError::TopicId(id));
        }
        if !names.insert(name) {
            return Err(RecordError::DuplicateTopic);
        }
        topics.push(RecordTopic {
            id,
            name: Arc::from(name),
        });
    }

    let mut refused = Vec::new();
    for _ in 0..r.u32()? {
        refused.push(Arc::from(r.str()?));
    }

    let mut subscriptions = Vec::new();
    let mut filters = HashSet::new();
    for _ in 0..r.u32()? {
        let qos = r.u8()?;
        if qos > 2 {
            return Err(RecordError::Qos(qos));
        }
        let filter = r.str()?;
        if !is_valid_filter(filter) {
            return Err(RecordError::InvalidFilter);
        }
        if !filters.insert(filter) {
            return Err(RecordError::DuplicateFilter);
        }
        subscriptions.push(RecordSubscription {
            filter: Arc::from(filter),
            qos,
        });
    }

    let will = if flags & FLAG_WILL != 0 {
        let (qos, retain, dup) = r.msg_flags()?;
        if dup {
            return Err(RecordError::WillDup);
        }
        let topic = r.str()?;
        if !is_valid_name(topic) {
            return Err(RecordError::InvalidWillTopic);
        }
        let payload = Bytes::copy_from_slice(r.blob()?);
        Some(RecordWill {
            topic: Arc::from(topic),
            payload,
            qos,
            retain,
        })
    } else {
        None
    };

    let mut queue = Vec::new();
    for _ in 0..r.u32()? {
        let (qos, retain, dup) = r.msg_flags()?;
        let topic = Arc::from(r.str()?);
        let payload = Bytes::copy_from_slice(r.blob()?);
        queue.push(RecordMessage {
            topic,
            payload,
            qos,
            retain,
            dup,
        });
    }
    if !r.rest.is_empty() {
        return Err(RecordError::TrailingBytes);
    }
    Ok(SessionRecord {
        client_id: Arc::from(client_id),
        clean_session: flags & FLAG_CLEAN_SESSION != 0,
        keep_alive_secs,
        sleep_secs,
        state: if flags & FLAG_ASLEEP != 0 {
            RecordState::Asleep
        } else {
            RecordState::Disconnected
        },
        next_topic_id,
        topics,
        refused,
        subscriptions,
        will,
        queue,
    })
}

/// A cursor over untrusted bytes; every read is checked.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        let (head, rest) = self
            .rest
            .split_at_checked(n)
            .ok_or(RecordError::Truncated)?;
        self.rest = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RecordError> {
        let (head, rest) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(RecordError::Truncated)?;
        self.rest = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, RecordError> {
        self.array::<1>().map(|[b]| b)
    }

    fn u16(&mut self) -> Result<u16, RecordError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, RecordError> {
        self.array().map(u32::from_le_bytes)
    }

    fn str(&mut self) -> Result<&'a str, RecordError> {
        let len = self.u16()?;
        let bytes = self.take(usize::from(len))?;
        std::str::from_utf8(bytes).map_err(|_| RecordError::InvalidUtf8)
    }

    fn blob(&mut self) -> Result<&'a [u8], RecordError> {
        let len = self.u32()?;
        let len = usize::try_from(len).map_err(|_| RecordError::Truncated)?;
        self.take(len)
    }

    /// (QoS, retain, DUP).
    fn msg_flags(&mut self) -> Result<(u8, bool, bool), RecordError> {
        let f = self.u8()?;
        if f & !MSG_FLAGS != 0 {
            return Err(RecordError::ReservedFlags(f));
        }
        let qos = f & MSG_QOS;
        if qos > 2 {
            return Err(RecordError::Qos(qos));
        }
        Ok((qos, f & MSG_RETAIN != 0, f & MSG_DUP != 0))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample() -> SessionRecord {
        SessionRecord {
            client_id: "sensor-1".into(),
            clean_session: false,
            keep_alive_secs: 60,
            sleep_secs: 300,
            state: RecordState::Asleep,
            next_topic_id: 3,
            topics: vec![
                RecordTopic {
                    id: 1,
                    name: "a/b".into(),
                },
                RecordTopic {
                    id: 2,
                    name: "c".into(),
                },
            ],
            refused: vec!["nope".into()],
            subscriptions: vec![RecordSubscription {
                filter: "a/+".into(),
                qos: 1,
            }],
            will: Some(RecordWill {
                topic: "will/t".into(),
                payload: Bytes::from_static(b"bye"),
                qos: 1,
                retain: true,
            }),
            queue: vec![RecordMessage {
                topic: "a/b".into(),
                payload: Bytes::from_static(b"x"),
                qos: 2,
                retain: false,
                dup: true,
            }],
        }
    }

    #[test]
    fn the_layout_is_fixed_little_endian_and_versioned() {
        let record = SessionRecord {
            client_id: "id".into(),
            clean_session: true,
            keep_alive_secs: 0x0102,
            sleep_secs: 0x0304,
            state: RecordState::Asleep,
            next_topic_id: 0x0506,
            topics: vec![RecordTopic {
                id: 0x0708,
                name: "t".into(),
            }],
            refused: Vec::new(),
            subscriptions: vec![RecordSubscription {
                filter: "f".into(),
                qos: 2,
            }],
            will: None,
            queue: vec![RecordMessage {
                topic: "t".into(),
                payload: Bytes::from_static(b"p"),
                qos: 1,
                retain: true,
                dup: true,
            }],
        };
        let mut out = Vec::new();
        encode(&record, &mut out).unwrap();
        #[rustfmt::skip]
        let expected: &[u8] = &[
            FORMAT_VERSION, 0x03, 0x02, 0x01, 0x04, 0x03,
            2, 0, b'i', b'd',
            0x06, 0x05,
            1, 0, 0, 0, 0x08, 0x07, 1, 0, b't',
            0, 0, 0, 0,
            1, 0, 0, 0, 2, 1, 0, b'f',
            1, 0, 0, 0, 0x0D, 1, 0, b't', 1, 0, 0, 0, b'p',
        ];
        assert_eq!(out, expected);
        assert_eq!(decode(&out).unwrap(), record);
    }

    #[test]
    fn every_truncation_of_a_valid_record_is_an_error() {
        let mut out = Vec::new();
        encode(&sample(), &mut out).unwrap();
        for len in 0..out.len() {
            assert!(decode(&out[..len]).is_err(), "prefix of {len} bytes");
        }
        out.push(0);
        assert_eq!(decode(&out), Err(RecordError::TrailingBytes));
    }

    #[test]
    fn unknown_versions_reserved_flags_and_bad_fields_are_refused() {
        let mut good = Vec::new();
        encode(&sample(), &mut good).unwrap();
        let mut bad = good.clone();
        bad[0] = 2;
        assert_eq!(decode(&bad), Err(RecordError::Version(2)));
        let mut bad = good.clone();
        bad[1] |= 0x80;
        assert!(matches!(decode(&bad), Err(RecordError::ReservedFlags(_))));

        let mut r = sample();
        r.topics.swap(0, 1);
        let mut out = Vec::new();
        encode(&r, &mut out).unwrap();
        assert_eq!(decode(&out), Err(RecordError::TopicId(1)));

        let mut r = sample();
        r.subscriptions[0].filter = "a/#/b".into();
        let mut out = Vec::new();
        encode(&r, &mut out).unwrap();
        assert_eq!(decode(&out), Err(RecordError::InvalidFilter));

        let mut r = sample();
        r.client_id = "".into();
        let mut out = Vec::new();
        encode(&r, &mut out).unwrap();
        assert_eq!(decode(&out), Err(RecordError::EmptyClientId));
    }

    #[test]
    fn a_huge_count_fails_on_the_input_not_on_memory() {
        // Version, flags, durations, ClientId "a", next id, then 4 billion topics announced.
        let bytes = [
            FORMAT_VERSION,
            0,
            0,
            0,
            0,
            0,
            1,
            0,
            b'a',
            1,
            0,
            0xFF,
            0xFF,
            0xFF,
            0xFF,
        ];
        assert_eq!(decode(&bytes), Err(RecordError::Truncated));
    }

    #[test]
    fn a_too_long_string_is_refused_and_leaves_the_output_unchanged() {
        let mut r = sample();
        r.client_id = "x".repeat(70_000).into();
        let mut out = vec![9];
        assert_eq!(encode(&r, &mut out), Err(RecordError::TooLong(70_000)));
        assert_eq!(out, vec![9]);
    }

    fn name() -> impl Strategy<Value = Arc<str>> {
        "[a-z/]{1,12}".prop_map(Arc::from)
    }

    fn message() -> impl Strategy<Value = RecordMessage> {
        (
            name(),
            proptest::collection::vec(any::<u8>(), 0..32),
            0u8..=2,
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(topic, payload, qos, retain, dup)| RecordMessage {
                topic,
                payload: Bytes::from(payload),
                qos,
                retain,
                dup,
            })
    }

    fn record() -> impl Strategy<Value = SessionRecord> {
        (
            (
                "[a-zA-Z0-9-]{1,23}",
                any::<bool>(),
                any::<u16>(),
                any::<u16>(),
                any::<bool>(),
                any::<u16>(),
            ),
            proptest::collection::btree_map(1u16..0xFFFF, name(), 0..6),
            proptest::collection::vec(name(), 0..3),
            proptest::collection::btree_map("[a-z]{1,6}(/[+#])?", 0u8..=2, 0..5),
            proptest::option::of((
                name(),
                proptest::collection::vec(any::<u8>(), 0..16),
                0u8..=2,
                any::<bool>(),
            )),
            proptest::collection::vec(message(), 0..6),
        )
            .prop_map(|(head, topics, refused, subs, will, queue)| {
                let (client_id, clean_session, keep_alive_secs, sleep_secs, asleep, next) = head;
                // Names must be unique: keep the first id of each.
                let mut seen = HashSet::new();
                SessionRecord {
                    client_id: client_id.into(),
                    clean_session,
                    keep_alive_secs,
                    sleep_secs,
                    state: if asleep {
                        RecordState::Asleep
                    } else {
                        RecordState::Disconnected
                    },
                    next_topic_id: next,
                    topics: topics
                        .into_iter()
                        .filter(|(_, n)| seen.insert(n.clone()))
                        .map(|(id, name)| RecordTopic { id, name })
                        .collect(),
                    refused,
                    subscriptions: subs
                        .into_iter()
                        .map(|(filter, qos)| RecordSubscription {
                            filter: filter.into(),
                            qos,
                        })
                        .collect(),
                    will: will.map(|(topic, payload, qos, retain)| RecordWill {
                        topic,
                        payload: Bytes::from(payload),
                        qos,
                        retain,
                    }),
                    queue,
                }
            })
    }

    proptest! {
        #[test]
        fn encode_then_decode_gives_the_record_back(r in record()) {
            let mut out = Vec::new();
            encode(&r, &mut out).unwrap();
            prop_assert_eq!(decode(&out), Ok(r));
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_what_decodes_encodes_to_the_same_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..256)
        ) {
            if let Ok(r) = decode(&bytes) {
                let mut out = Vec::new();
                encode(&r, &mut out).unwrap();
                prop_assert_eq!(out, bytes);
            }
        }

        #[test]
        fn flipped_bytes_of_a_valid_record_never_panic(
            r in record(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)
        ) {
            let mut out = Vec::new();
            encode(&r, &mut out).unwrap();
            for (at, value) in flips {
                let i = at.index(out.len());
                out[i] = value;
            }
            if let Ok(r) = decode(&out) {
                let mut again = Vec::new();
                encode(&r, &mut again).unwrap();
                prop_assert_eq!(again, out);
            }
        }
    }
}
