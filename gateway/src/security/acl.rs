//! Topic ACLs: who may publish to and subscribe to which MQTT topics, with mosquitto's
//! `acl_file` semantics, compiled once from the config and checked with no IO.
//!
//! # Semantics
//!
//! - An [`Acl`] is a list of [`Rule`]s. A rule with an `identity` applies to that identity
//!   only (mosquitto's `user` rules); a rule without one applies to every identity
//!   (mosquitto's `pattern` rules). Rules add up: a topic is allowed when any applicable rule
//!   allows it. There are no deny rules.
//! - Deny by default: once any `[[acl]]` is configured, what no rule allows is refused. With no
//!   `[[acl]]` at all there is no [`Acl`] (the policy holds `None`) and everything is allowed,
//!   as before ACLs existed.
//! - A publish to topic name `t` is allowed when a publish pattern matches `t` (MQTT matching,
//!   [`topic::matches`]: `+` one level, `#` the rest, `$` topics only by a pattern starting
//!   with `$`).
//! - A subscription to filter `f` is allowed when a single subscribe pattern covers `f`: every
//!   topic name `f` can match is matched by the pattern ([`filter_within`]). So with the pattern
//!   `cmd/dev1/#`, `cmd/dev1/+` is allowed and `cmd/+/x` or `#` are not.
//! - Placeholders `{identity}` and `{client_id}` in a pattern are replaced by the requester's
//!   identity name and ClientId. A pattern whose placeholder has no value (no identity, no
//!   ClientId, an anonymous HTTP client) or whose value is unsafe ([`safe_value`]: empty, holds
//!   `+`, `#`, `/`, starts with `$`, or holds a control character) does not apply: a value can
//!   never widen a rule beyond one literal level of the requester's own (mosquitto refuses
//!   such ClientIds for patterns; here the rule simply does not match).
//! - A rule with `identity = "x"` matches an identity named `x` whatever proved it (DTLS, an
//!   HTTP token) or claimed it (a plain MQTT-SN ClientId, a CoAP `id` query, where the config
//!   allows claimed identities). It never matches an anonymous client.

use std::sync::Arc;

use sensorgate_bridges::topic::{self, is_forbidden_char};

use crate::identity::{Identity, IdentitySource};

/// The placeholder for the identity's name.
pub const IDENTITY_PLACEHOLDER: &str = "{identity}";
/// The placeholder for the MQTT-SN ClientId (CoAP: the `id` query; HTTP: the device id).
pub const CLIENT_ID_PLACEHOLDER: &str = "{client_id}";

/// A topic pattern of a rule: an MQTT topic filter, possibly with placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: Arc<str>,
    placeholders: bool,
}

/// Why a pattern is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    /// Not a valid MQTT topic filter once the placeholders are replaced by a plain value.
    #[error("not a valid MQTT topic filter: {0}")]
    Filter(topic::TopicError),
    /// A `{` that does not start `{identity}` or `{client_id}`.
    #[error("unknown placeholder (only {{identity}} and {{client_id}} are known)")]
    UnknownPlaceholder,
}

impl Pattern {
    /// Compiles `text`: a valid topic filter, in which `{identity}` and `{client_id}` may stand
    /// for (part of) a level.
    ///
    /// # Errors
    /// [`PatternError`] when `text` is not a filter or has another `{...}`.
    pub fn new(text: &str) -> Result<Pattern, PatternError> {
        let plain = text
            .replace(IDENTITY_PLACEHOLDER, "x")
            .replace(CLIENT_ID_PLACEHOLDER, "x");
        if plain.contains(['{', '}']) {
            return Err(PatternError::UnknownPlaceholder);
        }
        topic::validate_filter(&plain).map_err(PatternError::Filter)?;
        Ok(Pattern {
            placeholders: plain != text,
            text: Arc::from(text),
        })
    }

    /// The pattern as written.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The filter this pattern stands for, for `who`; `None` when a placeholder has no safe
    /// value (the pattern does not apply).
    fn resolve<'a>(&'a self, who: &Requester<'_>) -> Option<std::borrow::Cow<'a, str>> {
        if !self.placeholders {
            return Some(std::borrow::Cow::Borrowed(&self.text));
        }
        let mut out = self.text.to_string();
        if out.contains(IDENTITY_PLACEHOLDER) {
            let name = who.identity_name().filter(|v| safe_value(v))?;
            out = out.replace(IDENTITY_PLACEHOLDER, name);
        }
        if out.contains(CLIENT_ID_PLACEHOLDER) {
            let id = who.client_id.filter(|v| safe_value(v))?;
            out = out.replace(CLIENT_ID_PLACEHOLDER, id);
        }
        Some(std::borrow::Cow::Owned(out))
    }
}

/// Whether `value` may replace a placeholder: non-empty, no `+`, `#` or `/`, no leading `$`,
/// no character a topic may not hold. Anything else could make a pattern match more than the
/// requester's own level.
#[must_use]
pub fn safe_value(value: &str) -> bool {
    !value.is_empty()
        && !value.starts_with('$')
        && !value
            .chars()
            .any(|c| matches!(c, '+' | '#' | '/' | '{' | '}') || is_forbidden_char(c))
}

/// One `[[acl]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The identity it applies to; `None`: every identity (a mosquitto `pattern` rule).
    pub identity: Option<Arc<str>>,
    /// Patterns of topic names it may publish to.
    pub publish: Vec<Pattern>,
    /// Patterns of topic filters it may subscribe to.
    pub subscribe: Vec<Pattern>,
}

/// Who asks: an identity (proven or claimed), and the ClientId it uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct Requester<'a> {
    /// The identity, if any.
    pub identity: Option<&'a Identity>,
    /// The ClientId (MQTT-SN), the `id` query (CoAP), the device id (HTTP).
    pub client_id: Option<&'a str>,
}

impl<'a> Requester<'a> {
    /// A requester with `identity` and `client_id`.
    #[must_use]
    pub fn new(identity: Option<&'a Identity>, client_id: Option<&'a str>) -> Self {
        Requester {
            identity,
            client_id,
        }
    }

    /// The identity's name, unless there is none or it is anonymous.
    fn identity_name(&self) -> Option<&'a str> {
        self.identity
            .filter(|i| i.source != IdentitySource::Anonymous)
            .map(|i| &*i.name)
    }
}

/// The compiled ACL (present only when at least one `[[acl]]` is configured).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    rules: Vec<Rule>,
}

impl Acl {
    /// The ACL of `rules` (in file order).
    #[must_use]
    pub fn new(rules: Vec<Rule>) -> Acl {
        Acl { rules }
    }

    /// The rules.
    #[must_use]
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    fn applicable<'s>(&'s self, who: &Requester<'s>) -> impl Iterator<Item = &'s Rule> + 's {
        let name = who.identity_name();
        self.rules
            .iter()
            .filter(move |r| r.identity.as_deref().is_none_or(|id| Some(id) == name))
    }

    /// Whether `who` may publish to the topic name `topic`.
    #[must_use]
    pub fn may_publish(&self, who: &Requester<'_>, topic: &str) -> bool {
        self.applicable(who).any(|r| {
            r.publish
                .iter()
                .any(|p| p.resolve(who).is_some_and(|f| topic::matches(&f, topic)))
        })
    }

    /// Whether `who` may subscribe to the topic filter `filter` (every name it can match is
    /// within one subscribe pattern).
    #[must_use]
    pub fn may_subscribe(&self, who: &Requester<'_>, filter: &str) -> bool {
        self.applicable(who).any(|r| {
            r.subscribe
                .iter()
                .any(|p| p.resolve(who).is_some_and(|f| filter_within(filter, &f)))
        })
    }

    /// Whether `who` may receive a message on the topic name `topic` (a subscribe pattern
    /// matches it): the check at delivery, for subscriptions made under an earlier ACL.
    #[must_use]
    pub fn may_receive(&self, who: &Requester<'_>, topic: &str) -> bool {
        self.applicable(who).any(|r| {
            r.subscribe
                .iter()
                .any(|p| p.resolve(who).is_some_and(|f| topic::matches(&f, topic)))
        })
    }
}

/// Whether every topic name the filter `inner` matches is matched by the filter `outer` (the
/// names of `inner` are a subset of those of `outer`). Meaningful for valid filters; never
/// panics on others.
#[must_use]
pub fn filter_within(inner: &str, outer: &str) -> bool {
    // `outer` starting with a wildcard matches no `$` name: an `inner` that can match one
    // (its first level starts with `$`) is not within it.
    if outer.starts_with(['+', '#']) && inner.starts_with('$') {
        return false;
    }
    let mut i = inner.split('/');
    let mut o = outer.split('/');
    loop {
        match (i.next(), o.next()) {
            // `#` covers the rest, including the parent level.
            (_, Some("#")) => return true,
            (None, None) => return true,
            // One ended before the other (an `outer` `x/#` covering `x` is the first arm).
            (None, Some(_)) | (Some(_), None) => return false,
            // `inner`'s `#` matches names of any depth: only an `outer` `#` covers it.
            (Some("#"), Some(_)) => return false,
            (Some("+"), Some("+")) => {}
            (Some("+"), Some(_)) => return false,
            (Some(_), Some("+")) => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
#[path = "acl_tests.rs"]
mod tests;
