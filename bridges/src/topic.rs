//! MQTT topic names and topic filters: the one validator and the one matcher every part of
//! sensorgate uses (the MQTT-SN core, its session records, the config and the MQTT upstream).
//!
//! This module is protocol-neutral: it names no upstream, so protocol cores may import it.
//!
//! # Rules
//!
//! A topic is a `&str`, so it is well-formed UTF-8 by construction (MQTT 3.1.1 section 1.5.3,
//! MQTT 5 section 1.5.4). On top of that:
//!
//! - A **topic name** (what is published) is 1 to [`MAX_TOPIC_BYTES`] bytes long (the length
//!   prefix of an MQTT UTF-8 string is a `u16`, MQTT 3.1.1 section 1.5.3; empty names are
//!   forbidden, section 4.7.3) and holds no wildcard character `+` or `#` (section 4.7.1).
//! - A **topic filter** (what is subscribed) is 1 to [`MAX_TOPIC_BYTES`] bytes long; `+` only
//!   as a whole level (section 4.7.1.3); `#` only as the whole last level (section 4.7.1.2),
//!   alone or after a `/`.
//! - Neither holds U+0000 (a MUST NOT in both versions), nor any other C0 or C1 control
//!   character (U+0001..=U+001F, U+007F..=U+009F) nor the non-characters U+FFFE and U+FFFF (the
//!   SHOULD NOTs of MQTT 5 section 1.5.4 that brokers enforce: one that gets such a topic drops
//!   the whole connection, which would cost every sensor its upstream). The other
//!   non-characters (U+FDD0..=U+FDEF and the last two of each plane) are accepted.
//! - Levels are separated by `/`; a level may be empty (`a//b`, `/a`, `a/` are three
//!   distinct valid names), and every character other than the above is an ordinary character.
//!   A leading `$` is allowed in names and filters.
//!
//! # Matching
//!
//! [`matches()`] compares a filter with a name level by level (MQTT 3.1.1 section 4.7): `+`
//! matches exactly one level (possibly empty), `#` matches the parent level and any number of
//! levels below it (`sport/#` matches `sport`), any other level matches only itself. A name
//! whose first level starts with `$` (`$SYS/...`) is never matched by a filter whose first
//! level is a wildcard (section 4.7.2): `#` and `+/x` do not match `$SYS/x`, `$SYS/#` does.

use thiserror::Error;

/// The longest topic name or filter, in bytes: the range of an MQTT string's `u16` length.
pub const MAX_TOPIC_BYTES: usize = u16::MAX as usize;

/// Why a string is not a valid topic name or topic filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TopicError {
    /// The topic is empty.
    #[error("topic must not be empty")]
    Empty,
    /// The topic is longer than [`MAX_TOPIC_BYTES`].
    #[error("topic is longer than {MAX_TOPIC_BYTES} bytes")]
    TooLong,
    /// The topic holds a control character, U+FFFE or U+FFFF.
    #[error("topic contains control characters")]
    ForbiddenChar,
    /// A topic name holds `+` or `#`.
    #[error("topic name must not contain wildcards (`+`, `#`)")]
    Wildcard,
    /// A filter has `+` or `#` inside a level, or `#` before the last level.
    #[error("wildcards must be whole levels, `#` only the last one")]
    MisplacedWildcard,
}

impl TopicError {
    /// A short tag for metrics and logs.
    #[must_use]
    pub const fn error_code(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::TooLong => "too_long",
            Self::ForbiddenChar => "forbidden_char",
            Self::Wildcard => "wildcard",
            Self::MisplacedWildcard => "misplaced_wildcard",
        }
    }
}

/// Checks a topic name (see the module docs for the rules).
///
/// # Errors
///
/// The first rule `name` breaks, checked in the order empty, too long, forbidden character,
/// wildcard.
pub fn validate_name(name: &str) -> Result<(), TopicError> {
    check_common(name)?;
    if has_wildcards(name) {
        return Err(TopicError::Wildcard);
    }
    Ok(())
}

/// Checks a topic filter (see the module docs for the rules).
///
/// # Errors
///
/// The first rule `filter` breaks, checked in the order empty, too long, forbidden character,
/// wildcard placement.
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    check_common(filter)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        match level {
            "+" => {}
            "#" if last => {}
            l if has_wildcards(l) => return Err(TopicError::MisplacedWildcard),
            _ => {}
        }
    }
    Ok(())
}

/// Whether `name` is a valid topic name: [`validate_name`] as a `bool`.
#[must_use]
pub fn is_valid_name(name: &str) -> bool {
    validate_name(name).is_ok()
}

/// Whether `filter` is a valid topic filter: [`validate_filter`] as a `bool`.
#[must_use]
pub fn is_valid_filter(filter: &str) -> bool {
    validate_filter(filter).is_ok()
}

/// Whether `topic` holds a wildcard character. For a valid filter: whether it can match more
/// than one name (an MQTT-SN SUBACK then carries topic id 0).
#[must_use]
pub fn has_wildcards(topic: &str) -> bool {
    topic.contains(['+', '#'])
}

/// Whether the topic name `name` matches the topic filter `filter` (see "Matching" in the
/// module docs).
///
/// The result is meaningful for a valid filter and a valid name; for other strings it is some
/// `bool` (never a panic). A filter without wildcards matches exactly the name equal to it.
#[must_use]
pub fn matches(filter: &str, name: &str) -> bool {
    if name.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut n = name.split('/');
    loop {
        match (f.next(), n.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether some topic name matches both filters `a` and `b` (see "Matching" in the module
/// docs): level by level, `#` overlaps everything below it (and its parent level), `+`
/// overlaps any one level, other levels only an equal one. A first level that is a wildcard
/// in one filter and starts with `$` in the other never overlaps (no name matches both).
///
/// The result is meaningful for valid filters; for other strings it is some `bool` (never a
/// panic). Symmetric.
#[must_use]
pub fn filters_overlap(a: &str, b: &str) -> bool {
    let wild_first = |f: &str| f.starts_with(['+', '#']);
    if (wild_first(a) && b.starts_with('$')) || (wild_first(b) && a.starts_with('$')) {
        return false;
    }
    let mut x = a.split('/');
    let mut y = b.split('/');
    // Whether the levels so far only admit the empty name, which is no topic: `+` against
    // `/#` (whose `#` stands for the parent level there) has no witness.
    let mut only_empty = false;
    let mut first = true;
    loop {
        match (x.next(), y.next()) {
            (None, Some("#")) | (Some("#"), None) => return !only_empty,
            (Some("#"), _) | (_, Some("#")) | (None, None) => return true,
            (Some("+"), Some(level)) | (Some(level), Some("+")) => {
                only_empty = first && level.is_empty();
            }
            (Some(l), Some(r)) if l == r => only_empty = first && l.is_empty(),
            _ => return false,
        }
        first = false;
    }
}

/// Whether no topic may hold `c`: C0 and C1 controls (NUL included), U+FFFE and U+FFFF (see
/// the module docs).
#[must_use]
pub fn is_forbidden_char(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{1F}' | '\u{7F}'..='\u{9F}' | '\u{FFFE}' | '\u{FFFF}')
}

/// The rules names and filters share: length and characters.
fn check_common(topic: &str) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return Err(TopicError::TooLong);
    }
    if topic.chars().any(is_forbidden_char) {
        return Err(TopicError::ForbiddenChar);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn names_are_validated_by_the_table() {
        let long = "x".repeat(MAX_TOPIC_BYTES);
        let too_long = "x".repeat(MAX_TOPIC_BYTES + 1);
        let table: &[(&str, Result<(), TopicError>)] = &[
            ("a", Ok(())),
            ("a/b/c", Ok(())),
            ("a//b", Ok(())),
            ("/", Ok(())),
            ("/a", Ok(())),
            ("a/", Ok(())),
            ("$SYS/broker", Ok(())),
            ("sport/tennis player", Ok(())),
            ("caf\u{e9}/\u{1F321}", Ok(())),
            ("a\u{FDD0}", Ok(())),
            (&long, Ok(())),
            ("", Err(TopicError::Empty)),
            (&too_long, Err(TopicError::TooLong)),
            ("a\0b", Err(TopicError::ForbiddenChar)),
            ("a\u{1}", Err(TopicError::ForbiddenChar)),
            ("a\n", Err(TopicError::ForbiddenChar)),
            ("a\u{7F}", Err(TopicError::ForbiddenChar)),
            ("a\u{9F}", Err(TopicError::ForbiddenChar)),
            ("a\u{FFFE}", Err(TopicError::ForbiddenChar)),
            ("a\u{FFFF}", Err(TopicError::ForbiddenChar)),
            ("a/+", Err(TopicError::Wildcard)),
            ("#", Err(TopicError::Wildcard)),
            ("a#b", Err(TopicError::Wildcard)),
            ("+\0", Err(TopicError::ForbiddenChar)),
        ];
        for (name, expected) in table {
            assert_eq!(validate_name(name), *expected, "{:.20?}", name);
            assert_eq!(is_valid_name(name), expected.is_ok(), "{:.20?}", name);
        }
    }

    #[test]
    fn filters_are_validated_by_the_table() {
        let long = "x/".repeat(MAX_TOPIC_BYTES / 2) + "#";
        let too_long = "x/".repeat(MAX_TOPIC_BYTES / 2) + "+/#";
        let table: &[(&str, Result<(), TopicError>)] = &[
            ("a", Ok(())),
            ("a/b", Ok(())),
            ("a//b", Ok(())),
            ("#", Ok(())),
            ("+", Ok(())),
            ("+/+", Ok(())),
            ("/+", Ok(())),
            ("/#", Ok(())),
            ("a/+/c/#", Ok(())),
            ("sport/+", Ok(())),
            ("+/tennis/#", Ok(())),
            ("$SYS/#", Ok(())),
            (&long, Ok(())),
            ("", Err(TopicError::Empty)),
            (&too_long, Err(TopicError::TooLong)),
            ("a/#/c", Err(TopicError::MisplacedWildcard)),
            ("#/a", Err(TopicError::MisplacedWildcard)),
            ("a/b#", Err(TopicError::MisplacedWildcard)),
            ("a#", Err(TopicError::MisplacedWildcard)),
            ("##", Err(TopicError::MisplacedWildcard)),
            ("a+/b", Err(TopicError::MisplacedWildcard)),
            ("a/+b", Err(TopicError::MisplacedWildcard)),
            ("++", Err(TopicError::MisplacedWildcard)),
            ("+#", Err(TopicError::MisplacedWildcard)),
            ("a\0", Err(TopicError::ForbiddenChar)),
            ("a/\u{1F}/#", Err(TopicError::ForbiddenChar)),
            ("\u{85}", Err(TopicError::ForbiddenChar)),
        ];
        for (filter, expected) in table {
            assert_eq!(validate_filter(filter), *expected, "{:.20?}", filter);
            assert_eq!(is_valid_filter(filter), expected.is_ok(), "{:.20?}", filter);
        }
    }

    #[test]
    fn filters_match_names_by_the_table() {
        let table = [
            ("a/b", "a/b", true),
            ("a/b", "a/b/c", false),
            ("a/b", "a", false),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+", "a/", true),
            ("a/#", "a", true),
            ("a/#", "a/", true),
            ("a/#", "a/b/c", true),
            ("a/#", "ab", false),
            ("#", "x/y", true),
            ("#", "/", true),
            ("+", "a", true),
            ("+", "/a", false),
            ("+/+", "/x", true),
            ("+/+", "x/", true),
            ("+/+", "x", false),
            ("+/+", "x/y/z", false),
            ("/+", "/x", true),
            ("/+", "x", false),
            ("a//b", "a//b", true),
            ("a//b", "a/b", false),
            ("a/+/b", "a//b", true),
            ("sport/+", "sport", false),
            ("sport/+", "sport/", true),
            ("sport/#", "sport", true),
            ("sport/tennis/+", "sport/tennis/player1", true),
            ("sport/tennis/+", "sport/tennis/player1/ranking", false),
            ("#", "$SYS", false),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("+", "$SYS", false),
            ("$SYS/#", "$SYS/x", true),
            ("$SYS/#", "$SYS", true),
            ("$SYS/+", "$SYS/x", true),
            ("a/#", "a/$SYS", true),
            ("a/+", "a/$x", true),
            ("A/b", "a/b", false),
        ];
        for (filter, name, expected) in table {
            assert!(is_valid_filter(filter), "{filter}");
            assert!(is_valid_name(name), "{name}");
            assert_eq!(matches(filter, name), expected, "{filter} vs {name}");
        }
    }

    #[test]
    fn wildcards_are_detected() {
        assert!(has_wildcards("a/+"));
        assert!(has_wildcards("#"));
        assert!(!has_wildcards("a/b"));
        assert!(!has_wildcards("$SYS"));
    }

    /// A reference matcher written differently from [`matches`]: compares level counts first,
    /// then the levels pairwise.
    fn model_matches(filter: &[String], name: &[String]) -> bool {
        let first_is_wildcard = filter.first().is_some_and(|f| f == "+" || f == "#");
        if first_is_wildcard && name.first().is_some_and(|n| n.starts_with('$')) {
            return false;
        }
        let (prefix, multi) = match filter.split_last() {
            Some((last, prefix)) if last == "#" => (prefix, true),
            _ => (filter, false),
        };
        let count_ok = if multi {
            name.len() >= prefix.len()
        } else {
            name.len() == prefix.len()
        };
        count_ok && prefix.iter().zip(name).all(|(f, n)| f == "+" || f == n)
    }

    fn filter_levels() -> impl Strategy<Value = Vec<String>> {
        let level = prop_oneof![Just(""), Just("a"), Just("b"), Just("$s"), Just("+")];
        (
            prop::collection::vec(level.prop_map(String::from), 0..5),
            any::<bool>(),
        )
            .prop_filter_map("a filter has a level", |(mut levels, hash)| {
                if hash {
                    levels.push("#".into());
                }
                (!levels.is_empty()).then_some(levels)
            })
    }

    fn name_levels() -> impl Strategy<Value = Vec<String>> {
        let level = prop_oneof![Just(""), Just("a"), Just("b"), Just("$s")];
        prop::collection::vec(level.prop_map(String::from), 1..6)
    }

    #[test]
    fn filters_overlap_by_the_table() {
        let table = [
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/+", "a/b", true),
            ("a/+", "+/b", true),
            ("a/+", "a/b/c", false),
            ("a/#", "a", true),
            ("a/#", "+/x/y", true),
            ("a/#", "b/#", false),
            ("#", "x/y", true),
            ("#", "$SYS/#", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/+", true),
            ("+", "+", true),
            ("+", "+/+", false),
            ("+/#", "x", true),
            ("a//b", "a/+/b", true),
            ("a//b", "a/b", false),
            ("+", "/#", false),
            ("+", "+/#", true),
            ("/", "+/#", true),
        ];
        for (a, b, expected) in table {
            assert!(is_valid_filter(a) && is_valid_filter(b), "{a} {b}");
            assert_eq!(filters_overlap(a, b), expected, "{a} vs {b}");
            assert_eq!(filters_overlap(b, a), expected, "{b} vs {a}");
        }
    }

    /// Every name of up to six levels over the levels the strategies use.
    fn all_names() -> Vec<String> {
        let levels = ["", "a", "b", "$s"];
        let mut names: Vec<String> = levels.iter().map(|l| (*l).to_owned()).collect();
        let mut last = names.clone();
        for _ in 1..6 {
            last = last
                .iter()
                .flat_map(|n| levels.iter().map(move |l| format!("{n}/{l}")))
                .collect();
            names.extend(last.iter().cloned());
        }
        names.retain(|n| !n.is_empty());
        names
    }

    proptest! {
        #[test]
        fn filters_overlap_iff_some_name_matches_both(a in filter_levels(), b in filter_levels()) {
            let (a, b) = (a.join("/"), b.join("/"));
            prop_assume!(!a.is_empty() && !b.is_empty());
            let witness = all_names().into_iter().find(|n| matches(&a, n) && matches(&b, n));
            prop_assert_eq!(filters_overlap(&a, &b), witness.is_some(), "{} {} {:?}", a, b, witness);
        }

        #[test]
        fn the_matcher_agrees_with_the_model(filter in filter_levels(), name in name_levels()) {
            let filter_str = filter.join("/");
            let name_str = name.join("/");
            // `[""]` joins to the empty string, which is no topic.
            prop_assume!(!filter_str.is_empty() && !name_str.is_empty());
            prop_assert!(is_valid_filter(&filter_str), "{filter_str}");
            prop_assert!(is_valid_name(&name_str), "{name_str}");
            prop_assert_eq!(
                matches(&filter_str, &name_str),
                model_matches(&filter, &name),
                "{} vs {}", filter_str, name_str
            );
        }

        #[test]
        fn a_filter_without_wildcards_matches_only_itself(a in name_levels(), b in name_levels()) {
            let (a, b) = (a.join("/"), b.join("/"));
            prop_assume!(!a.is_empty() && !b.is_empty());
            prop_assert!(is_valid_filter(&a));
            prop_assert_eq!(matches(&a, &b), a == b);
        }
    }
}
