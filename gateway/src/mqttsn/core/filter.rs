//! MQTT topic names and filters: validation and matching (MQTT 3.1.1 section 4.7).

/// Whether `topic` may be published to an MQTT broker: non-empty, no wildcards, and no
/// character MQTT forbids (U+0000) or brokers refuse (other C0/C1 controls, U+FFFE/U+FFFF).
/// A broker that gets one of these drops the whole connection, which would cost every sensor
/// its upstream: such topics are refused at the sensor that sent them.
pub fn is_mqtt_topic_name(topic: &str) -> bool {
    !topic.is_empty()
        && !topic
            .chars()
            .any(|c| c == '+' || c == '#' || is_forbidden_char(c))
}

/// Whether `filter` is a valid subscription filter: non-empty, `#` only as the whole last
/// level, `+` only as a whole level, no forbidden characters.
pub fn is_mqtt_topic_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.chars().any(is_forbidden_char) {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        match level {
            "#" if last => {}
            "+" => {}
            l if l.contains(['+', '#']) => return false,
            _ => {}
        }
    }
    true
}

/// Whether a filter contains wildcards (SUBACK then carries topic id 0).
pub fn has_wildcards(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

fn is_forbidden_char(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{1F}' | '\u{7F}'..='\u{9F}' | '\u{FFFE}' | '\u{FFFF}')
}

/// Whether `topic` matches `filter`. Topics starting with `$` are not matched by a leading
/// wildcard (MQTT 4.7.2).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_like_mqtt() {
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(matches("a/+", "a/b"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "x/y"));
        assert!(matches("+/+", "/x"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/x", "$SYS/x"));
        assert!(matches("$SYS/#", "$SYS/x"));
    }

    #[test]
    fn filter_and_name_validation() {
        assert!(is_mqtt_topic_filter("a/+/c/#"));
        assert!(is_mqtt_topic_filter("#"));
        assert!(!is_mqtt_topic_filter("a/#/c"));
        assert!(!is_mqtt_topic_filter("a+/b"));
        assert!(!is_mqtt_topic_filter(""));
        assert!(!is_mqtt_topic_filter("a\0"));
        assert!(is_mqtt_topic_name("a/b"));
        assert!(!is_mqtt_topic_name("a/+"));
        assert!(!is_mqtt_topic_name("a\u{1}"));
        assert!(!is_mqtt_topic_name(""));
    }
}
