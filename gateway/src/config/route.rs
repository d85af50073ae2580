//! `[[route]]`: which upstreams a message goes to, under which topic and at most which QoS.
//! The semantics (all-match, the first matching route per upstream decides the rewrite, a
//! message no route matches is refused at the ingress, no route at all means everything to
//! every upstream) are [`RouteTable`]'s.
//!
//! Two passes, so that every mistake is located in the file:
//! - Here, each key of each entry is checked on its own and every error is reported at once:
//!   a required key missing, a filter that is not a valid MQTT filter, an upstream that is not
//!   configured, a prefix with wildcards, a template with an unknown placeholder, a QoS cap
//!   outside 0..=2.
//! - Then [`RouteTable::compile`] has the last word; its [`RouteError`] names the route and the
//!   key at fault, and is reported at that key ([`route_error_path`]), so a check only the
//!   table makes still comes with file, line and column.

use std::collections::HashSet;
use std::sync::Arc;

use sensorgate_bridges::message::Qos;
use sensorgate_bridges::route::{RouteError, RouteField, RouteSpec, RouteTable};
use sensorgate_bridges::topic::{self, TopicError};
use serde::Deserialize;

use super::check::int_in;
use super::diag::{self, KeyPath, Reporter};

/// Routes at most, and the longest `strip_prefix`, `add_prefix` or `template` in bytes: the
/// route table's own bounds, checked here too so that every route's errors are reported
/// together, at their keys.
pub use sensorgate_bridges::route::{MAX_REWRITE_BYTES, MAX_ROUTES};

/// The placeholders a `template` may use.
pub const PLACEHOLDERS: [&str; 4] = ["topic", "client_id", "protocol", "gateway_id"];

/// One `[[route]]`, as written. Every key is optional here so that a missing one is reported
/// with the other errors.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct RawRoute {
    filter: Option<String>,
    upstreams: Option<Vec<String>>,
    strip_prefix: Option<String>,
    add_prefix: Option<String>,
    template: Option<String>,
    qos_max: Option<i64>,
}

/// The compiled routes and the entries they came from (for summaries).
#[derive(Debug)]
pub(super) struct Routes {
    pub(super) table: Arc<RouteTable>,
    pub(super) specs: Vec<RouteSpec>,
}

/// Every `[[route]]` in file order. `known` are the upstream names as written (for the local
/// checks); `compiled` are the names of the compiled upstreams, in their order, when every
/// upstream compiled (their indexes are the table's), `None` otherwise (the table is not built:
/// the config is wrong anyway). `gw_id` is `[gateway] id`. `None` when a route is wrong
/// (reported).
pub(super) fn compile_routes(
    raw: &[RawRoute],
    known: &[&str],
    compiled: Option<&[&str]>,
    gw_id: u8,
    r: &mut Reporter<'_>,
) -> Option<Routes> {
    if raw.is_empty() {
        return Some(Routes {
            table: Arc::new(RouteTable::everything()),
            specs: Vec::new(),
        });
    }
    if raw.len() > MAX_ROUTES {
        r.at_path(
            &KeyPath::root("route").index(MAX_ROUTES),
            format!("at most {MAX_ROUTES} routes can be configured"),
            None,
        );
    }
    let specs: Vec<Option<RouteSpec>> = raw
        .iter()
        .enumerate()
        .map(|(i, route)| check_route(&KeyPath::root("route").index(i), route, known, r))
        .collect();
    let specs: Vec<RouteSpec> = specs.into_iter().collect::<Option<_>>()?;
    if raw.len() > MAX_ROUTES {
        return None;
    }
    let table = match RouteTable::compile(&specs, compiled?, &gw_id.to_string()) {
        Ok(table) => table,
        Err(error) => {
            r.at_path(&route_error_path(&error), route_error_message(&error), None);
            return None;
        }
    };
    Some(Routes {
        table: Arc::new(table),
        specs,
    })
}

/// Where a [`RouteError`] is reported: the key it names, in the route it names.
pub(super) fn route_error_path(error: &RouteError) -> KeyPath {
    let key = match error.field {
        RouteField::Filter => "filter",
        RouteField::Upstreams => "upstreams",
        RouteField::StripPrefix => "strip_prefix",
        RouteField::AddPrefix => "add_prefix",
        RouteField::Template => "template",
        RouteField::QosMax => "qos_max",
    };
    KeyPath::root("route").index(error.route).key(key)
}

/// The table's message, without the key name it may start with (the diagnostic names the key).
pub(super) fn route_error_message(error: &RouteError) -> String {
    let key = match route_error_path(error).0.last() {
        Some(diag::PathSeg::Key(key)) => format!("{key}: "),
        _ => String::new(),
    };
    error
        .message
        .strip_prefix(key.as_str())
        .unwrap_or(&error.message)
        .to_owned()
}

/// One entry's keys, each checked and reported on its own; `None` when one is wrong.
fn check_route(
    path: &KeyPath,
    route: &RawRoute,
    known: &[&str],
    r: &mut Reporter<'_>,
) -> Option<RouteSpec> {
    let filter = match &route.filter {
        None => {
            r.at_path(
                &path.key("filter"),
                "is required".into(),
                Some("write e.g. filter = \"sensors/#\" (`#` matches every topic)".into()),
            );
            None
        }
        Some(filter) => match topic::validate_filter(filter) {
            Ok(()) => Some(filter.clone()),
            Err(e) => {
                r.at_path(
                    &path.key("filter"),
                    format!(
                        "`{}` is not a valid topic filter: {e}",
                        filter.escape_debug()
                    ),
                    Some("a wildcard fills a whole level: `a/+/c`, `a/#`".into()),
                );
                None
            }
        },
    };
    let upstreams = check_upstreams(&path.key("upstreams"), route.upstreams.as_deref(), known, r);
    let strip_prefix = check_prefix(&path.key("strip_prefix"), route.strip_prefix.as_deref(), r);
    let add_prefix = check_prefix(&path.key("add_prefix"), route.add_prefix.as_deref(), r);
    let template = match &route.template {
        None => Some(None),
        Some(template) => match check_template(template) {
            Ok(()) => Some(Some(template.clone())),
            Err((message, hint)) => {
                r.at_path(&path.key("template"), message, hint);
                None
            }
        },
    };
    let both = route.template.is_some() && route.add_prefix.is_some();
    if both {
        // Which would come first is not obvious; the template can hold the prefix.
        r.at_path(
            &path.key("add_prefix"),
            "cannot be used with template".into(),
            Some("put the prefix in the template: template = \"prefix/{topic}\"".into()),
        );
    }
    let qos_max = match route.qos_max {
        None => Some(None),
        Some(q) => int_in::<u8>(r, &path.key("qos_max"), q, 0, 2).map(|q| {
            Some(match q {
                0 => Qos::AtMostOnce,
                1 => Qos::AtLeastOnce,
                _ => Qos::ExactlyOnce,
            })
        }),
    };
    if both {
        return None;
    }
    Some(RouteSpec {
        filter: filter?,
        upstreams: upstreams?,
        strip_prefix: strip_prefix?,
        add_prefix: add_prefix?,
        template: template?,
        qos_max: qos_max?,
    })
}

/// `upstreams`: at least one, each configured, none twice.
fn check_upstreams(
    path: &KeyPath,
    names: Option<&[String]>,
    known: &[&str],
    r: &mut Reporter<'_>,
) -> Option<Vec<String>> {
    let Some(names) = names else {
        r.at_path(
            path,
            "is required".into(),
            Some("name the target upstreams, e.g. upstreams = [\"local\"]".into()),
        );
        return None;
    };
    if names.is_empty() {
        r.at_path(path, "must name at least one upstream".into(), None);
        return None;
    }
    let mut ok = true;
    let mut seen = HashSet::new();
    for (i, name) in names.iter().enumerate() {
        if !known.contains(&name.as_str()) {
            let hint = diag::did_you_mean(name, known)
                .map(|best| format!("did you mean `{best}`?"))
                .or_else(|| {
                    (!known.is_empty())
                        .then(|| format!("the upstreams configured are: {}", known.join(", ")))
                });
            r.at_path(
                &path.index(i),
                format!("no upstream is named `{}`", name.escape_debug()),
                hint,
            );
            ok = false;
        } else if !seen.insert(name.as_str()) {
            r.at_path(&path.index(i), format!("`{name}` is listed twice"), None);
            ok = false;
        }
    }
    ok.then(|| names.to_vec())
}

/// `strip_prefix` / `add_prefix`: a non-empty start of a topic name, without wildcards.
/// `Some(None)` when the key is absent, `None` when it is wrong (reported).
fn check_prefix(
    path: &KeyPath,
    prefix: Option<&str>,
    r: &mut Reporter<'_>,
) -> Option<Option<String>> {
    let Some(prefix) = prefix else {
        return Some(None);
    };
    let message = match topic::validate_name(prefix) {
        Ok(()) if prefix.len() > MAX_REWRITE_BYTES => {
            format!("is longer than {MAX_REWRITE_BYTES} bytes")
        }
        Ok(()) => return Some(Some(prefix.to_owned())),
        Err(TopicError::Empty) => "must not be empty (leave the key out for no prefix)".to_owned(),
        Err(TopicError::Wildcard) => "must not contain wildcards (`+`, `#`)".to_owned(),
        Err(other) => format!("invalid: {other}"),
    };
    r.at_path(path, message, None);
    None
}

/// A template: text with placeholders in braces, each one of [`PLACEHOLDERS`] (`{{` and `}}`
/// are literal braces); outside them, what a topic name may hold (no wildcards), at most
/// [`MAX_REWRITE_BYTES`]. The error is a message and a hint.
pub(super) fn check_template(template: &str) -> Result<(), (String, Option<String>)> {
    let known = || {
        let list: Vec<String> = PLACEHOLDERS.iter().map(|p| format!("{{{p}}}")).collect();
        format!("the placeholders are {}", list.join(", "))
    };
    if template.is_empty() {
        return Err((
            "must not be empty".into(),
            Some(format!(
                "write e.g. \"site/{{gateway_id}}/{{topic}}\"; {}",
                known()
            )),
        ));
    }
    if template.len() > MAX_REWRITE_BYTES {
        return Err((format!("is longer than {MAX_REWRITE_BYTES} bytes"), None));
    }
    // The literal text, placeholders left out, must be valid in a topic name.
    let mut literal = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        literal.push_str(rest.get(..open).unwrap_or_default());
        let tail = rest.get(open..).unwrap_or_default();
        if let Some(after) = tail.strip_prefix("{{").or_else(|| tail.strip_prefix("}}")) {
            literal.push_str(tail.get(..1).unwrap_or_default());
            rest = after;
            continue;
        }
        if tail.starts_with('}') {
            return Err((
                "has a `}` that closes no placeholder".into(),
                Some("write `}}` for a literal brace".into()),
            ));
        }
        let after = tail.get(1..).unwrap_or_default();
        let Some(close) = after
            .find(['{', '}'])
            .filter(|&c| after.get(c..=c) == Some("}"))
        else {
            return Err((
                "has a `{` that is not closed by a `}`".into(),
                Some(format!("write `{{{{` for a literal brace; {}", known())),
            ));
        };
        let name = after.get(..close).unwrap_or_default();
        if !PLACEHOLDERS.contains(&name) {
            let hint = diag::did_you_mean(name, &PLACEHOLDERS)
                .map(|best| format!("did you mean `{{{best}}}`?"))
                .unwrap_or_else(known);
            return Err((
                format!("unknown placeholder `{{{}}}`", name.escape_debug()),
                Some(hint),
            ));
        }
        literal.push('x');
        rest = after.get(close + 1..).unwrap_or_default();
    }
    literal.push_str(rest);
    match topic::validate_name(&literal) {
        Ok(()) => Ok(()),
        Err(TopicError::Wildcard) => Err((
            "must not contain wildcards (`+`, `#`)".into(),
            Some("the template makes one topic name per message".into()),
        )),
        Err(other) => Err((format!("invalid: {other}"), None)),
    }
}

/// The QoS cap as written in the config.
pub(super) fn qos_number(qos: Qos) -> u8 {
    match qos {
        Qos::AtMostOnce => 0,
        Qos::AtLeastOnce => 1,
        Qos::ExactlyOnce => 2,
    }
}
