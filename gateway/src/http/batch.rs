//! `POST /v1/publish` bodies: a JSON array of items, or NDJSON (one item per line), parsed
//! and checked in full before anything is appended. Pure, no IO, total: never panics.
//!
//! ```text
//! [{"topic":"sensors/dev1/t","payload":"21.5"},
//!  {"topic":"sensors/dev1/h","payload":{"rh":40},"qos":0},
//!  {"topic":"sensors/dev1/raw","payload_b64":"AAEC","retain":true,"ts":1733240000000}]
//! ```
//!
//! # Item rules
//!
//! - Fields: `topic` (required), exactly one of `payload` / `payload_b64`,
//!   `payload_encoding` (`"plain"` default, or `"base64"`: EMQX's bulk bodies), `qos` (0 or
//!   1; any other integer is [`BatchError::BadQos`]), `retain` (a boolean), `ts` (an
//!   unsigned integer, milliseconds: checked, then ignored: the spool has no source time).
//!   Unknown and duplicate fields are refused. `qos`/`retain` absent (or `null`) take the
//!   request's defaults.
//! - `payload` as a JSON string is its UTF-8 text (escapes decoded); any other JSON value is
//!   its raw JSON text exactly as sent (`{"rh":40}`, `21.5`, `null`). With `payload_encoding:
//!   "base64"`, `payload` must be a string holding base64.
//! - Base64 is the standard alphabet with padding (RFC 4648 section 4) only; the URL-safe
//!   alphabet and unpadded text are refused.
//! - The topic is checked by `topic::validate_name`; a payload longer than
//!   [`BatchLimits::max_payload`] is [`BatchError::PayloadTooLarge`].
//!
//! # Errors and indexes
//!
//! The first error in body order wins. `index` is the position of the item (0-based,
//! blank NDJSON lines not counted); a syntax error between items takes the index of the item
//! that would come next. For NDJSON, `reason` names the 1-based line. More than
//! [`BatchLimits::max_items`] items is [`BatchError::TooManyItems`] as soon as the first
//! extra item starts (the rest is not read). An empty batch is malformed.

use std::borrow::Cow;
use std::fmt;

use base64::Engine as _;
use bytes::Bytes;
use sensorgate_bridges::message::Qos;
use sensorgate_bridges::topic;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// The batch body formats.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum BatchKind {
    /// One JSON array of items.
    Json,
    /// One JSON item per line (`\n` or `\r\n`); blank lines are skipped.
    Ndjson,
}

/// The accepted media types, for `Accept-Post` on a 415.
pub(crate) const MEDIA_TYPES: &str =
    "application/json, application/x-ndjson, application/ndjson, application/jsonl";

/// The batch kind of a `Content-Type` value (parameters such as `charset` ignored, case
/// insensitive); `None` (absent or another type) -> 415.
pub(crate) fn batch_kind(content_type: Option<&str>) -> Option<BatchKind> {
    let essence = content_type?.split(';').next()?.trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Some(BatchKind::Json)
    } else if [
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonl",
    ]
    .iter()
    .any(|t| essence.eq_ignore_ascii_case(t))
    {
        Some(BatchKind::Ndjson)
    } else {
        None
    }
}

/// One checked batch item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Item {
    /// A valid topic name.
    pub(crate) topic: String,
    /// At most [`BatchLimits::max_payload`] bytes.
    pub(crate) payload: Bytes,
    /// The item's, else the request's default.
    pub(crate) qos: Qos,
    /// The item's, else the request's default.
    pub(crate) retain: bool,
}

/// Bounds on one batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    /// Most items (`max_batch_items`).
    pub(crate) max_items: usize,
    /// Largest item payload in bytes (`max_body_size`).
    pub(crate) max_payload: usize,
}

/// Why a batch is refused (nothing of it is appended).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BatchError {
    /// Not JSON, not an item, a field of the wrong type, both or neither payload, bad base64
    /// (400 `bad_batch`).
    #[error("item {index}: {reason}")]
    Malformed { index: usize, reason: String },
    /// The item's topic is not a valid topic name (400 `bad_topic`).
    #[error("item {index}: {reason}")]
    BadTopic { index: usize, reason: String },
    /// The item's `qos` is an integer other than 0 and 1 (400 `bad_qos`).
    #[error("item {index}: qos must be 0 or 1")]
    BadQos { index: usize },
    /// More than `limit` items (413 `too_large`).
    #[error("more than {limit} items")]
    TooManyItems { limit: usize },
    /// The item's payload is longer than `limit` bytes (413 `too_large`).
    #[error("item {index}: payload longer than {limit} bytes")]
    PayloadTooLarge { index: usize, limit: usize },
}

/// Parses and checks a whole batch body; see the module docs for the rules.
///
/// # Errors
/// The first [`BatchError`] in body order.
pub(crate) fn parse(
    kind: BatchKind,
    body: &[u8],
    default_qos: Qos,
    default_retain: bool,
    limits: &BatchLimits,
) -> Result<Vec<Item>, BatchError> {
    let defaults = Defaults {
        qos: default_qos,
        retain: default_retain,
    };
    let items = match kind {
        BatchKind::Json => parse_array(body, defaults, limits)?,
        BatchKind::Ndjson => parse_lines(body, defaults, limits)?,
    };
    if items.is_empty() {
        return Err(BatchError::Malformed {
            index: 0,
            reason: "the batch holds no items".into(),
        });
    }
    Ok(items)
}

/// What an item without `qos` / `retain` gets.
#[derive(Debug, Clone, Copy)]
struct Defaults {
    qos: Qos,
    retain: bool,
}

/// An item as written (EMQX's field names).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawItem<'a> {
    #[serde(borrow)]
    topic: Cow<'a, str>,
    /// `Some` even for `null` (its text is the payload then).
    #[serde(borrow, default, deserialize_with = "some_raw")]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    payload_b64: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    payload_encoding: Option<Cow<'a, str>>,
    #[serde(default)]
    qos: Option<i64>,
    #[serde(default)]
    retain: Option<bool>,
    /// Checked (an unsigned integer), otherwise unused.
    #[serde(default)]
    #[allow(dead_code)]
    ts: Option<u64>,
}

fn some_raw<'de, D: de::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Checks one parsed item.
fn check(
    index: usize,
    raw: RawItem<'_>,
    defaults: Defaults,
    limits: &BatchLimits,
) -> Result<Item, BatchError> {
    let malformed = |reason: &str| BatchError::Malformed {
        index,
        reason: reason.to_owned(),
    };
    if let Err(error) = topic::validate_name(&raw.topic) {
        return Err(BatchError::BadTopic {
            index,
            reason: error.to_string(),
        });
    }
    let qos = match raw.qos {
        None => defaults.qos,
        Some(0) => Qos::AtMostOnce,
        Some(1) => Qos::AtLeastOnce,
        Some(_) => return Err(BatchError::BadQos { index }),
    };
    let base64 = match raw.payload_encoding.as_deref() {
        None => None,
        Some("plain") => Some(false),
        Some("base64") => Some(true),
        Some(_) => {
            return Err(malformed(
                "payload_encoding must be \"plain\" or \"base64\"",
            ));
        }
    };
    let too_large = BatchError::PayloadTooLarge {
        index,
        limit: limits.max_payload,
    };
    let payload = match (raw.payload, raw.payload_b64, base64) {
        (Some(_), Some(_), _) | (None, None, _) => {
            return Err(malformed(
                "exactly one of payload and payload_b64 is required",
            ));
        }
        (None, Some(_), Some(false)) => {
            return Err(malformed("payload_b64 with payload_encoding \"plain\""));
        }
        (None, Some(text), _) => decode_b64(&text, limits.max_payload)
            .map_err(|e| e.into_error(index, limits.max_payload))?,
        (Some(value), None, Some(true)) => {
            let text: Cow<'_, str> = serde_json::from_str(value.get()).map_err(|_| {
                malformed("payload must be a string with payload_encoding \"base64\"")
            })?;
            decode_b64(&text, limits.max_payload)
                .map_err(|e| e.into_error(index, limits.max_payload))?
        }
        (Some(value), None, _) => {
            let text = value.get();
            if text.starts_with('"') {
                // A JSON string: its text, escapes decoded (never longer than the JSON).
                let text: Cow<'_, str> =
                    serde_json::from_str(text).map_err(|e| malformed(&format!("payload: {e}")))?;
                Bytes::copy_from_slice(text.as_bytes())
            } else {
                Bytes::copy_from_slice(text.as_bytes())
            }
        }
    };
    if payload.len() > limits.max_payload {
        return Err(too_large);
    }
    Ok(Item {
        topic: raw.topic.into_owned(),
        payload,
        qos,
        retain: raw.retain.unwrap_or(defaults.retain),
    })
}

/// Why base64 text was not decoded.
enum B64Error {
    Invalid,
    TooLarge,
}

impl B64Error {
    fn into_error(self, index: usize, limit: usize) -> BatchError {
        match self {
            Self::Invalid => BatchError::Malformed {
                index,
                reason: "payload_b64 is not standard padded base64".into(),
            },
            Self::TooLarge => BatchError::PayloadTooLarge { index, limit },
        }
    }
}

/// Decodes standard padded base64, refusing before decoding when the result cannot fit.
fn decode_b64(text: &str, max: usize) -> Result<Bytes, B64Error> {
    // 4 characters carry at most 3 bytes; padding only makes the result shorter.
    let at_least = (text.len() / 4).saturating_mul(3).saturating_sub(2);
    if at_least > max {
        return Err(B64Error::TooLarge);
    }
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map(Bytes::from)
        .map_err(|_| B64Error::Invalid)
}

/// A JSON array of items, checked one by one while the array is read.
fn parse_array(
    body: &[u8],
    defaults: Defaults,
    limits: &BatchLimits,
) -> Result<Vec<Item>, BatchError> {
    let mut state = ArrayState {
        defaults,
        limits,
        items: Vec::new(),
        failure: None,
    };
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let read = de::Deserializer::deserialize_seq(&mut deserializer, ItemsVisitor(&mut state))
        .and_then(|()| deserializer.end());
    if let Some(failure) = state.failure {
        return Err(failure);
    }
    match read {
        Ok(()) => Ok(state.items),
        Err(error) => Err(BatchError::Malformed {
            index: state.items.len(),
            reason: error.to_string(),
        }),
    }
}

/// What the array visitor builds, and the typed error it stopped at (serde's error type
/// cannot carry it).
struct ArrayState<'l> {
    defaults: Defaults,
    limits: &'l BatchLimits,
    items: Vec<Item>,
    failure: Option<BatchError>,
}

struct ItemsVisitor<'s, 'l>(&'s mut ArrayState<'l>);

impl<'de> Visitor<'de> for ItemsVisitor<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array of items")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let state = self.0;
        loop {
            let index = state.items.len();
            if index == state.limits.max_items {
                // An end is fine; the start of one more element is an item too many, refused
                // before that element is read.
                let mut started = false;
                let next = seq.next_element_seed(Refuse(&mut started));
                if started {
                    state.failure = Some(BatchError::TooManyItems {
                        limit: state.limits.max_items,
                    });
                }
                return next.map(|_| ());
            }
            let Some(raw) = seq.next_element_seed(RawSeed)? else {
                return Ok(());
            };
            let checked = serde_json::from_str::<RawItem<'_>>(raw.get())
                .map_err(|e| BatchError::Malformed {
                    index,
                    reason: e.to_string(),
                })
                .and_then(|item| check(index, item, state.defaults, state.limits));
            match checked {
                Ok(item) => state.items.push(item),
                Err(error) => {
                    state.failure = Some(error);
                    return Err(de::Error::custom("item refused"));
                }
            }
        }
    }
}

/// Refuses an array element without reading it, noting that one started.
struct Refuse<'f>(&'f mut bool);

impl<'de> DeserializeSeed<'de> for Refuse<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, _: D) -> Result<(), D::Error> {
        *self.0 = true;
        Err(de::Error::custom("too many items"))
    }
}

/// Reads one array element as borrowed raw JSON.
struct RawSeed;

impl<'de> DeserializeSeed<'de> for RawSeed {
    type Value = &'de RawValue;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<&'de RawValue, D::Error> {
        <&RawValue>::deserialize(d)
    }
}

/// NDJSON: one item per non-blank line.
fn parse_lines(
    body: &[u8],
    defaults: Defaults,
    limits: &BatchLimits,
) -> Result<Vec<Item>, BatchError> {
    let mut items = Vec::new();
    for (number, line) in (1..).zip(body.split(|&b| b == b'\n')) {
        if line.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r')) {
            continue;
        }
        let index = items.len();
        if index == limits.max_items {
            return Err(BatchError::TooManyItems {
                limit: limits.max_items,
            });
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let raw =
            serde_json::from_slice::<RawItem<'_>>(line).map_err(|e| BatchError::Malformed {
                index,
                reason: format!("line {number}: {e}"),
            })?;
        let item = check(index, raw, defaults, limits).map_err(|error| match error {
            BatchError::Malformed { index, reason } => BatchError::Malformed {
                index,
                reason: format!("line {number}: {reason}"),
            },
            BatchError::BadTopic { index, reason } => BatchError::BadTopic {
                index,
                reason: format!("line {number}: {reason}"),
            },
            other => other,
        })?;
        items.push(item);
    }
    Ok(items)
}

/// For the `http_batch` fuzz target, not an API: an item as (topic, payload, qos, retain).
#[doc(hidden)]
pub type FuzzItem = (String, Vec<u8>, u8, bool);

/// For the `http_batch` fuzz target, not an API: [`parse`] with QoS 1 / no retain defaults,
/// the items as [`FuzzItem`]s, the error as its text.
///
/// # Errors
/// The batch error's text.
#[doc(hidden)]
pub fn fuzz_parse(
    ndjson: bool,
    body: &[u8],
    max_items: usize,
    max_payload: usize,
) -> Result<Vec<FuzzItem>, String> {
    let kind = if ndjson {
        BatchKind::Ndjson
    } else {
        BatchKind::Json
    };
    let limits = BatchLimits {
        max_items,
        max_payload,
    };
    parse(kind, body, Qos::AtLeastOnce, false, &limits)
        .map(|items| {
            items
                .into_iter()
                .map(|i| (i.topic, i.payload.to_vec(), qos_number(i.qos), i.retain))
                .collect()
        })
        .map_err(|e| e.to_string())
}

/// For the `http_batch` fuzz target, not an API: `items` as a JSON array batch; a UTF-8
/// payload as `payload` when `plain_text`, else as `payload_b64`, with every field written.
#[doc(hidden)]
#[must_use]
pub fn fuzz_encode(items: &[FuzzItem], plain_text: bool) -> Vec<u8> {
    let values: Vec<serde_json::Value> = items
        .iter()
        .map(|(topic, payload, qos, retain)| {
            let mut item = serde_json::Map::new();
            item.insert("topic".into(), topic.as_str().into());
            match std::str::from_utf8(payload) {
                Ok(text) if plain_text => {
                    item.insert("payload".into(), text.into());
                }
                _ => {
                    let text = base64::engine::general_purpose::STANDARD.encode(payload);
                    item.insert("payload_b64".into(), text.into());
                }
            }
            item.insert("qos".into(), (*qos).into());
            item.insert("retain".into(), (*retain).into());
            serde_json::Value::Object(item)
        })
        .collect();
    serde_json::to_vec(&values).unwrap_or_default()
}

fn qos_number(qos: Qos) -> u8 {
    match qos {
        Qos::AtMostOnce => 0,
        Qos::AtLeastOnce => 1,
        Qos::ExactlyOnce => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: BatchLimits = BatchLimits {
        max_items: 3,
        max_payload: 8,
    };

    fn json(body: &str) -> Result<Vec<Item>, BatchError> {
        parse(
            BatchKind::Json,
            body.as_bytes(),
            Qos::AtLeastOnce,
            false,
            &LIMITS,
        )
    }

    fn ndjson(body: &str) -> Result<Vec<Item>, BatchError> {
        parse(
            BatchKind::Ndjson,
            body.as_bytes(),
            Qos::AtLeastOnce,
            false,
            &LIMITS,
        )
    }

    fn item(topic: &str, payload: &[u8], qos: Qos, retain: bool) -> Item {
        Item {
            topic: topic.into(),
            payload: Bytes::copy_from_slice(payload),
            qos,
            retain,
        }
    }

    fn malformed_at(result: Result<Vec<Item>, BatchError>) -> (usize, String) {
        match result {
            Err(BatchError::Malformed { index, reason }) => (index, reason),
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn content_types_map_to_kinds() {
        assert_eq!(batch_kind(Some("application/json")), Some(BatchKind::Json));
        assert_eq!(
            batch_kind(Some("Application/JSON; charset=utf-8")),
            Some(BatchKind::Json)
        );
        for t in [
            "application/x-ndjson",
            "application/ndjson",
            "application/jsonl ",
        ] {
            assert_eq!(batch_kind(Some(t)), Some(BatchKind::Ndjson), "{t}");
        }
        assert_eq!(batch_kind(None), None);
        assert_eq!(batch_kind(Some("text/plain")), None);
        assert_eq!(batch_kind(Some("application/x-www-form-urlencoded")), None);
        assert_eq!(batch_kind(Some("")), None);
        for t in MEDIA_TYPES.split(", ") {
            assert!(batch_kind(Some(t)).is_some(), "{t}");
        }
    }

    #[test]
    fn a_json_array_gives_its_items_with_defaults() {
        let items = json(
            r#"[{"topic":"a/b","payload":"21.5"},
                {"topic":"a/c","payload":{"rh":4},"qos":0,"retain":true,"ts":1733240000000},
                {"topic":"a/d","payload_b64":"AAEC","payload_encoding":"base64","qos":null}]"#,
        )
        .unwrap();
        assert_eq!(
            items,
            vec![
                item("a/b", b"21.5", Qos::AtLeastOnce, false),
                item("a/c", br#"{"rh":4}"#, Qos::AtMostOnce, true),
                item("a/d", &[0, 1, 2], Qos::AtLeastOnce, false),
            ]
        );
        let defaults = parse(
            BatchKind::Json,
            br#"[{"topic":"x","payload":1}]"#,
            Qos::AtMostOnce,
            true,
            &LIMITS,
        )
        .unwrap();
        assert_eq!(defaults, vec![item("x", b"1", Qos::AtMostOnce, true)]);
    }

    #[test]
    fn payloads_strings_are_decoded_and_other_values_kept_verbatim() {
        let items = json(
            r#"[{"topic":"t","payload":"a\n\u00e9"},{"topic":"t","payload":[1, 2]},{"topic":"t","payload":null}]"#,
        )
        .unwrap();
        assert_eq!(items[0].payload, "a\n\u{e9}".as_bytes());
        assert_eq!(items[1].payload, b"[1, 2]".as_slice());
        assert_eq!(items[2].payload, b"null".as_slice());
        let spaced = json(
            "[ {\"topic\" : \"t\" ,\n \"payload\" :\t \"x\" } , {\"topic\":\"t\",\"payload\": [ 1 ] } ]",
        );
        let spaced = spaced.unwrap();
        assert_eq!(
            spaced[0].payload,
            b"x".as_slice(),
            "whitespace is not the value's"
        );
        assert_eq!(spaced[1].payload, b"[ 1 ]".as_slice());
        let b64 = json(r#"[{"topic":"t","payload":"AAEC","payload_encoding":"base64"}]"#);
        assert_eq!(b64.unwrap()[0].payload, [0u8, 1, 2].as_slice());
        let plain = json(r#"[{"topic":"t","payload":"AAEC","payload_encoding":"plain"}]"#);
        assert_eq!(plain.unwrap()[0].payload, b"AAEC".as_slice());
    }

    #[test]
    fn ndjson_skips_blank_lines_and_takes_crlf() {
        let items = ndjson(
            "\n{\"topic\":\"a\",\"payload\":\"1\"}\r\n  \r\n{\"topic\":\"b\",\"payload\":2,\"qos\":0}\n\n",
        )
        .unwrap();
        assert_eq!(
            items,
            vec![
                item("a", b"1", Qos::AtLeastOnce, false),
                item("b", b"2", Qos::AtMostOnce, false),
            ]
        );
    }

    #[test]
    fn malformed_json_batches_name_the_item() {
        let cases: &[(&str, usize)] = &[
            ("", 0),
            ("{}", 0),
            ("[]", 0),
            ("[", 0),
            (r#"{"topic":"a","payload":"1"}"#, 0),
            (r#"[{"topic":"a","payload":"1"},]"#, 1),
            (r#"[{"topic":"a","payload":"1"} {"topic":"a"}]"#, 1),
            (r#"[{"topic":"a","payload":"1"}] x"#, 1),
            (
                r#"[{"topic":"a","payload":"1"},{"topic":"a","payload":"1","extra":1}]"#,
                1,
            ),
            (r#"[{"topic":"a","payload":"1"},{"topic":"a"}]"#, 1),
            (r#"[{"topic":"a","payload":"1","payload_b64":"AA=="}]"#, 0),
            (r#"[{"topic":"a","payload":"1","topic":"b"}]"#, 0),
            (r#"[{"payload":"1"}]"#, 0),
            (r#"[{"topic":1,"payload":"1"}]"#, 0),
            (r#"[{"topic":"a","payload":"1","qos":"1"}]"#, 0),
            (r#"[{"topic":"a","payload":"1","qos":1.0}]"#, 0),
            (r#"[{"topic":"a","payload":"1","retain":1}]"#, 0),
            (r#"[{"topic":"a","payload":"1","ts":-1}]"#, 0),
            (r#"[{"topic":"a","payload":"1","ts":1.5}]"#, 0),
            (r#"[{"topic":"a","payload":"1","ts":"1"}]"#, 0),
            (
                r#"[{"topic":"a","payload":"1","payload_encoding":"hex"}]"#,
                0,
            ),
            (
                r#"[{"topic":"a","payload":1,"payload_encoding":"base64"}]"#,
                0,
            ),
            (
                r#"[{"topic":"a","payload":"!!","payload_encoding":"base64"}]"#,
                0,
            ),
            (
                r#"[{"topic":"a","payload_b64":"AAEC","payload_encoding":"plain"}]"#,
                0,
            ),
            (r#"[{"topic":"a","payload_b64":"AAE"}]"#, 0),
            (r#"[{"topic":"a","payload_b64":"AA-_"}]"#, 0),
            (r#"[{"topic":"a","payload_b64":1}]"#, 0),
            (r#"[1]"#, 0),
            ("[{\"topic\":\"a\",\"payload\":\"\\ud800\"}]", 0),
        ];
        for (body, index) in cases {
            let (got, reason) = malformed_at(json(body));
            assert_eq!(got, *index, "{body}: {reason}");
        }
        let (_, reason) = malformed_at(json(
            r#"[{"topic":"a","payload":"1","payload_b64":"AA=="}]"#,
        ));
        assert!(reason.contains("exactly one"), "{reason}");
        assert!(matches!(
            parse(BatchKind::Json, b"[\xff]", Qos::AtMostOnce, false, &LIMITS),
            Err(BatchError::Malformed { index: 0, .. })
        ));
    }

    #[test]
    fn malformed_ndjson_names_the_line() {
        let (index, reason) = malformed_at(ndjson(
            "{\"topic\":\"a\",\"payload\":\"1\"}\n\n{\"topic\":\"a\",\"payload\":\"1\",\"x\":1}\n",
        ));
        assert_eq!(index, 1);
        assert!(reason.starts_with("line 3: "), "{reason}");
        let (index, reason) = malformed_at(ndjson("{\"topic\":\"a\",\"payload\":\"1\"} {}\n"));
        assert_eq!(index, 0);
        assert!(reason.starts_with("line 1: "), "{reason}");
        let (index, reason) = malformed_at(ndjson("\n\n{\"topic\":\"a\",\"payload_b64\":\"A\"}"));
        assert_eq!(index, 0);
        assert!(reason.starts_with("line 3: "), "{reason}");
        let (index, _) = malformed_at(ndjson("[{\"topic\":\"a\",\"payload\":\"1\"}]"));
        assert_eq!(index, 0);
        let (index, _) = malformed_at(ndjson("\n \r\n"));
        assert_eq!(index, 0, "empty");
    }

    #[test]
    fn bad_topics_name_the_item() {
        for body in [
            r#"[{"topic":"ok","payload":"1"},{"topic":"a/+","payload":"1"}]"#,
            r#"[{"topic":"ok","payload":"1"},{"topic":"","payload":"1"}]"#,
            r#"[{"topic":"ok","payload":"1"},{"topic":"a\u0000","payload":"1"}]"#,
            r##"[{"topic":"ok","payload":"1"},{"topic":"#","payload":"1"}]"##,
        ] {
            assert!(
                matches!(json(body), Err(BatchError::BadTopic { index: 1, .. })),
                "{body}"
            );
        }
        match ndjson("{\"topic\":\"ok\",\"payload\":\"1\"}\n{\"topic\":\"a/#\",\"payload\":\"1\"}")
        {
            Err(BatchError::BadTopic { index: 1, reason }) => {
                assert!(reason.starts_with("line 2: "), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let long = format!(r#"[{{"topic":"{}","payload":"1"}}]"#, "a".repeat(70_000));
        assert!(matches!(
            json(&long),
            Err(BatchError::BadTopic { index: 0, .. })
        ));
    }

    #[test]
    fn qos_other_than_zero_or_one_is_bad_qos() {
        for qos in ["2", "3", "-1", "255"] {
            let body = format!(
                r#"[{{"topic":"a","payload":"1"}},{{"topic":"a","payload":"1","qos":{qos}}}]"#
            );
            assert_eq!(json(&body), Err(BatchError::BadQos { index: 1 }), "{qos}");
            let body = format!("{{\"topic\":\"a\",\"payload\":\"1\",\"qos\":{qos}}}");
            assert_eq!(ndjson(&body), Err(BatchError::BadQos { index: 0 }), "{qos}");
        }
    }

    #[test]
    fn too_many_items_is_refused_as_soon_as_exceeded() {
        let three =
            r#"[{"topic":"a","payload":1},{"topic":"a","payload":2},{"topic":"a","payload":3}]"#;
        assert_eq!(json(three).unwrap().len(), 3);
        // The fourth element is refused before it is read: its garbage is never seen.
        let four = r#"[{"topic":"a","payload":1},{"topic":"a","payload":2},{"topic":"a","payload":3},{"bad"#;
        assert_eq!(json(four), Err(BatchError::TooManyItems { limit: 3 }));
        let lines = "{\"topic\":\"a\",\"payload\":1}\n".repeat(3);
        assert_eq!(ndjson(&lines).unwrap().len(), 3);
        let four = format!("{lines}\n\nnot json");
        assert_eq!(ndjson(&four), Err(BatchError::TooManyItems { limit: 3 }));
    }

    #[test]
    fn an_item_payload_over_the_limit_is_too_large() {
        let cases = [
            (
                r#"[{"topic":"a","payload":"12345678"},{"topic":"a","payload":"123456789"}]"#,
                1,
            ),
            (r#"[{"topic":"a","payload":123456789}]"#, 0),
            (r#"[{"topic":"a","payload":[1,2,3,4,5]}]"#, 0),
            (r#"[{"topic":"a","payload_b64":"MTIzNDU2Nzg5"}]"#, 0),
            (
                r#"[{"topic":"a","payload":"MTIzNDU2Nzg5","payload_encoding":"base64"}]"#,
                0,
            ),
        ];
        for (body, index) in cases {
            assert_eq!(
                json(body),
                Err(BatchError::PayloadTooLarge { index, limit: 8 }),
                "{body}"
            );
        }
        // Exactly at the limit passes, and escapes count decoded.
        assert!(json(r#"[{"topic":"a","payload_b64":"MTIzNDU2Nzg="}]"#).is_ok());
        assert!(
            json(r#"[{"topic":"a","payload":"\u0031\u0032\u0033\u0034\u0035\u0036\u0037\u0038"}]"#)
                .is_ok()
        );
        // A huge base64 text is refused without decoding.
        let huge = format!(
            r#"[{{"topic":"a","payload_b64":"{}"}}]"#,
            "A".repeat(1 << 20)
        );
        assert_eq!(
            json(&huge),
            Err(BatchError::PayloadTooLarge { index: 0, limit: 8 })
        );
    }

    #[test]
    fn the_first_error_in_body_order_wins() {
        // Item 0 has a bad topic, item 1 bad qos: item 0's error.
        let body = r#"[{"topic":"+","payload":"1"},{"topic":"a","payload":"1","qos":2}]"#;
        assert!(matches!(
            json(body),
            Err(BatchError::BadTopic { index: 0, .. })
        ));
        // Within an item, the topic comes before the qos and the payload.
        let body = r#"[{"topic":"+","qos":2}]"#;
        assert!(matches!(
            json(body),
            Err(BatchError::BadTopic { index: 0, .. })
        ));
    }

    #[test]
    fn encoded_items_parse_back_equal() {
        let items: Vec<FuzzItem> = vec![
            ("a/b".into(), b"text \"q\" \n".to_vec(), 0, true),
            ("c".into(), vec![0xff, 0, 1], 1, false),
            ("d".into(), Vec::new(), 1, false),
        ];
        for plain in [true, false] {
            let body = fuzz_encode(&items, plain);
            assert_eq!(fuzz_parse(false, &body, 10, 100), Ok(items.clone()));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        use proptest::prelude::*;
        proptest!(|(body in proptest::collection::vec(any::<u8>(), 0..200), nd in any::<bool>())| {
            if let Ok(items) = fuzz_parse(nd, &body, 4, 16) {
                prop_assert!(!items.is_empty() && items.len() <= 4);
                prop_assert_eq!(fuzz_parse(false, &fuzz_encode(&items, nd), 4, 16), Ok(items));
            }
        });
    }
}
