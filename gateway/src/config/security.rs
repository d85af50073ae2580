//! `[[acl]]` and `[limits]` (with `[[limits.identity]]`): topic ACLs and per-identity rate and
//! size limits, compiled into one [`Policy`] that every ingress shares (see
//! [`crate::security`]).

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;

use super::check::size_in;
use super::diag::{KeyPath, Reporter};
use super::{Number, SizeText};
use crate::security::Policy;
use crate::security::acl::{Acl, Pattern, Rule};
use crate::security::limit::{DEFAULT_MAX_IDENTITIES, Limits, LimitsPolicy, Rate};

/// Most `[[acl]]` entries.
pub const MAX_ACL_RULES: usize = 10_000;
/// Most patterns in one `publish` or `subscribe` list.
pub const MAX_PATTERNS_PER_RULE: usize = 1000;
/// Most `[[limits.identity]]` entries.
pub const MAX_LIMIT_OVERRIDES: usize = 100_000;
/// Largest rate in messages per second (and burst in messages).
const MAX_RATE: f64 = 1e9;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawAcl {
    identity: Option<String>,
    publish: Vec<String>,
    subscribe: Vec<String>,
}

/// The limits keys `[limits]` and each `[[limits.identity]]` share. Copied out of both raw
/// tables rather than `#[serde(flatten)]`ed into them: a flattened struct deserializes as a
/// map, which hides its field names from `fields_of` (the unknown-key hints).
#[derive(Debug, Default)]
struct RawLimitValues {
    messages_per_second: Option<Number>,
    message_burst: Option<Number>,
    bytes_per_second: Option<SizeText>,
    byte_burst: Option<SizeText>,
    max_message_size: Option<SizeText>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawLimits {
    max_identities: Option<i64>,
    messages_per_second: Option<Number>,
    message_burst: Option<Number>,
    bytes_per_second: Option<SizeText>,
    byte_burst: Option<SizeText>,
    max_message_size: Option<SizeText>,
    identity: Vec<RawLimitOverride>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawLimitOverride {
    identity: Option<String>,
    messages_per_second: Option<Number>,
    message_burst: Option<Number>,
    bytes_per_second: Option<SizeText>,
    byte_burst: Option<SizeText>,
    max_message_size: Option<SizeText>,
}

impl RawLimits {
    fn values(&self) -> RawLimitValues {
        RawLimitValues {
            messages_per_second: self.messages_per_second,
            message_burst: self.message_burst,
            bytes_per_second: self.bytes_per_second.clone(),
            byte_burst: self.byte_burst.clone(),
            max_message_size: self.max_message_size.clone(),
        }
    }
}

impl RawLimitOverride {
    fn values(&self) -> RawLimitValues {
        RawLimitValues {
            messages_per_second: self.messages_per_second,
            message_burst: self.message_burst,
            bytes_per_second: self.bytes_per_second.clone(),
            byte_burst: self.byte_burst.clone(),
            max_message_size: self.max_message_size.clone(),
        }
    }
}

/// Compiles `[[acl]]` and `[limits]`; `None` when a value is wrong (reported).
pub(super) fn compile_security(
    acl: &[RawAcl],
    limits: &RawLimits,
    r: &mut Reporter<'_>,
) -> Option<Arc<Policy>> {
    let acl = compile_acl(acl, r);
    let limits = compile_limits(limits, r);
    Some(Arc::new(Policy {
        acl: acl?,
        limits: limits?,
        // Set by `config::compile` from `[[psk]]`.
        reserved_client_ids: std::collections::HashSet::new(),
        reserved_topic_prefix: None,
    }))
}

fn compile_acl(raw: &[RawAcl], r: &mut Reporter<'_>) -> Option<Option<Acl>> {
    if raw.is_empty() {
        return Some(None);
    }
    let mut ok = true;
    if raw.len() > MAX_ACL_RULES {
        r.at_path(
            &KeyPath::root("acl"),
            format!("{} [[acl]] entries, at most {MAX_ACL_RULES}", raw.len()),
            None,
        );
        ok = false;
    }
    let mut rules = Vec::with_capacity(raw.len());
    for (i, entry) in raw.iter().enumerate() {
        let at = KeyPath::root("acl").index(i);
        let identity = match &entry.identity {
            Some(id) if id.is_empty() => {
                r.at_path(
                    &at.key("identity"),
                    "identity must not be empty (leave it out for a rule for everyone)".into(),
                    None,
                );
                ok = false;
                None
            }
            Some(id) => Some(Arc::from(id.as_str())),
            None => None,
        };
        let publish = compile_patterns(&entry.publish, &at.key("publish"), r);
        let subscribe = compile_patterns(&entry.subscribe, &at.key("subscribe"), r);
        match (publish, subscribe) {
            (Some(publish), Some(subscribe)) => rules.push(Rule {
                identity,
                publish,
                subscribe,
            }),
            _ => ok = false,
        }
    }
    ok.then(|| Some(Acl::new(rules)))
}

fn compile_patterns(raw: &[String], at: &KeyPath, r: &mut Reporter<'_>) -> Option<Vec<Pattern>> {
    if raw.len() > MAX_PATTERNS_PER_RULE {
        r.at_path(
            at,
            format!("{} patterns, at most {MAX_PATTERNS_PER_RULE}", raw.len()),
            None,
        );
        return None;
    }
    let mut ok = true;
    let mut out = Vec::with_capacity(raw.len());
    for (i, text) in raw.iter().enumerate() {
        match Pattern::new(text) {
            Ok(p) => out.push(p),
            Err(e) => {
                r.at_path(
                    &at.index(i),
                    format!("`{}`: {e}", text.escape_debug()),
                    Some("an MQTT topic filter; `{identity}` and `{client_id}` may stand for part of a level".into()),
                );
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

fn compile_limits(raw: &RawLimits, r: &mut Reporter<'_>) -> Option<LimitsPolicy> {
    let at = KeyPath::root("limits");
    let mut ok = true;
    let max_identities = match raw.max_identities {
        None => DEFAULT_MAX_IDENTITIES,
        Some(n) => {
            match super::check::int_in::<usize>(r, &at.key("max_identities"), n, 1, 10_000_000) {
                Some(n) => n,
                None => {
                    ok = false;
                    DEFAULT_MAX_IDENTITIES
                }
            }
        }
    };
    let default = compile_values(&raw.values(), &Limits::NONE, &at, r);
    let base = default.unwrap_or(Limits::NONE);
    if raw.identity.len() > MAX_LIMIT_OVERRIDES {
        r.at_path(
            &at.key("identity"),
            format!(
                "{} [[limits.identity]] entries, at most {MAX_LIMIT_OVERRIDES}",
                raw.identity.len()
            ),
            None,
        );
        ok = false;
    }
    let mut per_identity = HashMap::new();
    for (i, o) in raw.identity.iter().enumerate() {
        let at = at.key("identity").index(i);
        let Some(name) = o.identity.as_deref().filter(|n| !n.is_empty()) else {
            r.at_path(&at, "[[limits.identity]] needs an `identity`".into(), None);
            ok = false;
            continue;
        };
        match compile_values(&o.values(), &base, &at, r) {
            Some(limits) => {
                if per_identity.insert(Arc::from(name), limits).is_some() {
                    r.at_path(
                        &at.key("identity"),
                        format!("identity `{name}` has limits already"),
                        None,
                    );
                    ok = false;
                }
            }
            None => ok = false,
        }
    }
    (ok && default.is_some()).then_some(LimitsPolicy {
        default: base,
        per_identity,
        max_identities,
    })
}

/// One set of limit keys; an absent key takes its value from `base` (the `[limits]` default
/// for an override).
fn compile_values(
    raw: &RawLimitValues,
    base: &Limits,
    at: &KeyPath,
    r: &mut Reporter<'_>,
) -> Option<Limits> {
    let mut ok = true;
    let mut number = |key: &str, v: Option<Number>| -> Option<f64> {
        let v = v?;
        if !(0.0..=MAX_RATE).contains(&v.0) {
            r.at_path(
                &at.key(key),
                format!("{} is out of range 0..={MAX_RATE}", v.0),
                None,
            );
            ok = false;
            return None;
        }
        Some(v.0)
    };
    let messages_per_second = number("messages_per_second", raw.messages_per_second);
    let message_burst = number("message_burst", raw.message_burst);
    let mut size = |key: &str, v: &Option<SizeText>| -> Option<f64> {
        let v = v.as_ref()?;
        match size_in(r, &at.key(key), v, 0, 1 << 40) {
            #[allow(clippy::cast_precision_loss)] // At most 2^40.
            Some(n) => Some(n as f64),
            None => {
                ok = false;
                None
            }
        }
    };
    let bytes_per_second = size("bytes_per_second", &raw.bytes_per_second);
    let byte_burst = size("byte_burst", &raw.byte_burst);
    let max_message_size = match &raw.max_message_size {
        None => base.max_message_size,
        Some(v) => match size_in(r, &at.key("max_message_size"), v, 0, 1 << 32) {
            Some(0) => None,
            Some(n) => Some(n),
            None => {
                ok = false;
                None
            }
        },
    };
    let rate = |per: Option<f64>, burst: Option<f64>, base: Rate| -> Rate {
        let per_second = per.unwrap_or(base.per_second);
        if per_second <= 0.0 {
            return Rate::UNLIMITED;
        }
        // The default burst: one second's worth (at least 1).
        let burst = burst
            .filter(|b| *b > 0.0)
            .unwrap_or(if per.is_some() {
                per_second
            } else {
                base.burst
            })
            .max(1.0);
        Rate { per_second, burst }
    };
    let limits = Limits {
        messages: rate(messages_per_second, message_burst, base.messages),
        bytes: rate(bytes_per_second, byte_burst, base.bytes),
        max_message_size,
    };
    ok.then_some(limits)
}
