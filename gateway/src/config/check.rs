//! Checks shared by every section: integer, size and duration ranges, topic names. Each
//! reports at the key's path and returns `None` when the value is wrong, so that a section
//! goes on checking its other keys.

use std::time::Duration;

use sensorgate_bridges::topic::{self, TopicError};

use super::diag::{self, KeyPath, Reporter};
use super::units;
use crate::mqttsn::core::QueueFull;

/// Checks an integer range, reporting at `path`.
pub(super) fn int_in<T: TryFrom<i64>>(
    r: &mut Reporter<'_>,
    path: &KeyPath,
    value: i64,
    min: i64,
    max: i64,
) -> Option<T> {
    if value < min || value > max {
        r.at_path(path, format!("{value} is out of range {min}..={max}"), None);
        return None;
    }
    T::try_from(value).ok()
}

pub(super) fn size_in(
    r: &mut Reporter<'_>,
    path: &KeyPath,
    text: &str,
    min: u64,
    max: u64,
) -> Option<usize> {
    match units::parse_size(text) {
        Ok(v) if v < min || v > max => {
            r.at_path(
                path,
                format!(
                    "{text} is out of range {}..={}",
                    units::format_size(min),
                    units::format_size(max)
                ),
                None,
            );
            None
        }
        Ok(v) => usize::try_from(v).ok(),
        Err(e) => {
            r.at_path(path, e, None);
            None
        }
    }
}

pub(super) fn duration_in(
    r: &mut Reporter<'_>,
    path: &KeyPath,
    text: &str,
    min: Duration,
    max: Duration,
) -> Option<Duration> {
    match units::parse_duration(text) {
        Ok(v) if v < min || v > max => {
            r.at_path(
                path,
                format!(
                    "{text} is out of range {}..={}",
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ),
                None,
            );
            None
        }
        Ok(v) => Some(v),
        Err(e) => {
            r.at_path(path, e, None);
            None
        }
    }
}

/// A topic name usable for publishing ([`topic::validate_name`]).
pub(super) fn check_topic_name(name: &str) -> Result<(), String> {
    topic::validate_name(name).map_err(|error| match error {
        TopicError::Empty => "topic must not be empty".into(),
        TopicError::Wildcard => {
            format!("topic `{name}` must not contain wildcards (`+`, `#`)")
        }
        TopicError::ForbiddenChar => {
            format!(
                "topic `{}` contains control characters",
                name.escape_debug()
            )
        }
        TopicError::TooLong | TopicError::MisplacedWildcard => error.to_string(),
    })
}

/// A full downlink queue's policy (`[mqttsn]` and `[coap] queue_full`).
pub(super) fn queue_full_policy(
    r: &mut Reporter<'_>,
    path: &KeyPath,
    text: &str,
) -> Option<QueueFull> {
    const POLICIES: [&str; 2] = ["drop_oldest", "drop_new"];
    match text {
        "drop_oldest" => Some(QueueFull::DropOldest),
        "drop_new" => Some(QueueFull::DropNew),
        other => {
            let hint = diag::did_you_mean(other, &POLICIES).map_or_else(
                || "use \"drop_oldest\" or \"drop_new\"".to_owned(),
                |b| format!("did you mean `{b}`?"),
            );
            r.at_path(path, format!("unknown policy `{other}`"), Some(hint));
            None
        }
    }
}
