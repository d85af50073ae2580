//! The route table (sans-IO): which upstreams a message goes to, under which topic and at
//! most which QoS, and the reverse for a sensor's subscription.
//!
//! Semantics (all-match):
//! - A message goes to every upstream named by at least one route whose filter matches its
//!   topic. For one upstream, the first such route in file order decides the rewrite and the
//!   QoS cap.
//! - Without any route, every message goes to every upstream unchanged ([`RouteTable::everything`]).
//! - With routes, a message no route matches is refused at the ingress
//!   ([`RouteTable::accepts`]): a QoS >= 1 sender is told, never acknowledged and dropped.
//!   A catch-all route (`filter = "#"`) is the default route.
//! - The table is applied twice: at the ingress (is the message accepted at all) and by each
//!   upstream's drain when it reads a record (does this upstream take it, under which topic).
//!   The spool stores the original topic and origin once, whatever the number of targets.
//!
//! # Rewrites (uplink, [`RouteTable::target`])
//!
//! 1. `strip_prefix` is removed when the topic starts with it and something remains after it;
//!    any other topic passes unchanged (a route's filter need not imply its prefix).
//! 2. Then either `add_prefix` is put before the result, or `template` renders it: `{topic}`
//!    is the result of step 1, `{client_id}` the sender's identity ([`MISSING_CLIENT_ID`] when
//!    it has none), `{protocol}` the ingress protocol's name (`mqttsn`, ...), `{gateway_id}`
//!    the configured gateway id (fixed at compile time). `{{` and `}}` are a literal brace.
//!    The two are exclusive.
//! 3. The QoS is the message's, capped by `qos_max`.
//!
//! Substituted `{client_id}` and `{protocol}` values never add levels or wildcards: `/`, `+`,
//! `#` and every character no topic may hold (NUL, controls) become `_`. The literal parts of
//! a template and the prefixes are checked at compile time, and a stripped topic is a valid
//! name, so the only rewrite that can fail is one longer than [`topic::MAX_TOPIC_BYTES`]:
//! [`RouteTable::target`] then returns `None` and the drain counts the message as unroutable
//! for that upstream (it cannot be refused at the ingress: client ids vary).
//!
//! # Downlink (the reverse)
//!
//! A route carries downlink only when its rewrite can be undone: no rewrite, prefixes, or a
//! template whose only placeholders are `{gateway_id}` and exactly one `{topic}`. Routes with
//! `{client_id}` or `{protocol}` (or without `{topic}`) carry none.
//! - [`RouteTable::upstream_filters`]: for each reversible route targeting the upstream whose
//!   filter overlaps the sensor's filter, the sensor's filter rewritten like a topic. Where a
//!   wildcard meets a literal part of a prefix or template inside one level, the filter is
//!   widened (`x` + `+` gives `+`; `#` swallows what follows), never narrowed: the upstream
//!   may deliver more, and the reverse mapping plus the core's own matching keep the sensors'
//!   view exact. (A topic whose stripped part starts with `$` is not delivered for a filter
//!   that became wildcard-first: brokers keep `$` topics from such filters.)
//! - [`RouteTable::downlink_topic`]: the first reversible route targeting the upstream whose
//!   literal head and tail surround the topic, whose reverse (with `strip_prefix` put back,
//!   always) is a valid name, and whose filter matches that name. A message no route maps
//!   back is not for the sensors.
//! - Without routes both are the identity.
//!
//! Bounds: at most [`MAX_ROUTES`] routes; prefixes and templates at most
//! [`MAX_REWRITE_BYTES`] bytes each.
//!
//! Users: the router asks `accepts` for every uplink message, `upstream_filters` for every
//! subscription and `downlink_topic` for every downlink message; each upstream's drain asks
//! `target` for every record it reads.
//!
//! # Live changes ([`SharedRoutes`])
//!
//! The router and every drain read the table through one [`SharedRoutes`]: a lock-free load
//! per message (or per batch of records read), so a reload swaps the table for all of them
//! at once. Only the router's `RouteReconfigurer` swaps it, under the router's lock, moving
//! the upstream subscriptions with it. A message is judged by the table current when it is
//! looked at: the ingress's `accepts` and a drain's `target` may use different tables for
//! one message across a swap (a message accepted by the old table that the new one sends
//! nowhere is counted as unroutable by the drains).

use std::borrow::Cow;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::message::{Origin, Qos};
use crate::topic;

/// Most `[[route]]` entries in one table: each message is matched against every route at the
/// ingress and by each drain, so the table stays small.
pub const MAX_ROUTES: usize = 256;

/// Longest `strip_prefix`, `add_prefix` or `template`, in bytes.
pub const MAX_REWRITE_BYTES: usize = 1024;

/// What `{client_id}` renders as for a message whose origin has no (or an empty) client id.
pub const MISSING_CLIENT_ID: &str = "unknown";

/// The live route table, shared by the router and the drains (cheap to clone; all clones
/// see the same table). See the module docs.
#[derive(Clone)]
pub struct SharedRoutes {
    current: Arc<ArcSwap<RouteTable>>,
}

impl SharedRoutes {
    /// Shares `routes` until a reload replaces it
    /// ([`RouteReconfigurer::set_routes`](crate::router::RouteReconfigurer::set_routes)).
    #[must_use]
    pub fn new(routes: Arc<RouteTable>) -> Self {
        Self {
            current: Arc::new(ArcSwap::new(routes)),
        }
    }

    /// The table in force now (kept alive by the returned `Arc` across a swap).
    #[must_use]
    pub fn load(&self) -> Arc<RouteTable> {
        self.current.load_full()
    }

    /// The table in force now, for a short read on a hot path: no reference count is taken
    /// in the common case. Do not hold it across an `.await` or a long loop.
    pub(crate) fn read(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.current.load()
    }

    /// Puts `routes` in force for every holder; returns the table it replaces. Only the
    /// router's reconfigurer calls it (under the router's lock, see `router`).
    pub(crate) fn store(&self, routes: Arc<RouteTable>) -> Arc<RouteTable> {
        self.current.swap(routes)
    }
}

impl std::fmt::Debug for SharedRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRoutes")
            .field("routes", &self.read().routes.len())
            .finish()
    }
}

impl From<Arc<RouteTable>> for SharedRoutes {
    fn from(routes: Arc<RouteTable>) -> Self {
        Self::new(routes)
    }
}

/// One `[[route]]` entry as configured, before compiling.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteSpec {
    /// Topic filter (MQTT wildcards) the message's topic must match.
    pub filter: String,
    /// Names of the target upstreams (at least one).
    pub upstreams: Vec<String>,
    /// Remove this prefix from the topic (applied before `add_prefix` and `template`).
    pub strip_prefix: Option<String>,
    /// Put this prefix before the topic.
    pub add_prefix: Option<String>,
    /// Topic template with `{topic}`, `{client_id}`, `{protocol}`, `{gateway_id}`.
    pub template: Option<String>,
    /// Highest QoS toward the targets.
    pub qos_max: Option<Qos>,
}

/// Which part of a route is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteField {
    /// `filter`
    Filter,
    /// `upstreams`
    Upstreams,
    /// `strip_prefix`
    StripPrefix,
    /// `add_prefix`
    AddPrefix,
    /// `template`
    Template,
    /// `qos_max`
    QosMax,
}

/// A route that cannot be compiled: which route (index in file order), which key, why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route {route}: {message}")]
pub struct RouteError {
    /// Index of the route in file order.
    pub route: usize,
    /// The key at fault.
    pub field: RouteField,
    /// What is wrong, for the user.
    pub message: String,
}

/// Where one message goes on one upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<'a> {
    /// The topic toward the upstream (before the upstream's own `remote_prefix`).
    pub topic: Cow<'a, str>,
    /// The QoS toward the upstream (the message's, capped by the route).
    pub qos: Qos,
}

/// One piece of a compiled template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    /// Literal text (`{gateway_id}` and escaped braces already folded in).
    Literal(String),
    /// `{topic}`: the topic after `strip_prefix`.
    Topic,
    /// `{client_id}`, sanitised.
    ClientId,
    /// `{protocol}`, sanitised.
    Protocol,
}

/// What a route does to the topic after `strip_prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rewrite {
    /// Nothing.
    None,
    /// `add_prefix`.
    Prefix(String),
    /// `template`.
    Template(Vec<Part>),
}

/// A compiled route.
#[derive(Debug, Clone)]
struct Route {
    filter: String,
    /// Indexes of the target upstreams (distinct).
    upstreams: Vec<usize>,
    strip: Option<String>,
    rewrite: Rewrite,
    qos_max: Option<Qos>,
    /// How a downlink topic maps back: `head + stripped + tail`; `None` when the rewrite
    /// cannot be undone.
    reverse: Option<Reverse>,
}

/// The literal text a reversible rewrite puts around the stripped topic.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reverse {
    head: String,
    tail: String,
}

/// The compiled table.
#[derive(Debug, Clone)]
pub struct RouteTable {
    /// Empty: everything goes everywhere.
    routes: Vec<Route>,
}

impl RouteTable {
    /// The table without routes: every message to every upstream, unchanged.
    #[must_use]
    pub const fn everything() -> Self {
        Self { routes: Vec::new() }
    }

    /// Compiles `specs` (in file order) against the configured upstream names (their
    /// indexes are the upstreams' indexes everywhere else) and the gateway's id (for
    /// `{gateway_id}`).
    ///
    /// # Errors
    /// The first route with an invalid filter, an unknown, duplicate or missing upstream, an
    /// invalid prefix, a template with an unknown placeholder, an unbalanced brace or an
    /// invalid literal part, or both `template` and `add_prefix`; more than [`MAX_ROUTES`]
    /// routes (reported on the first one too many).
    pub fn compile(
        specs: &[RouteSpec],
        upstream_names: &[&str],
        gateway_id: &str,
    ) -> Result<Self, RouteError> {
        if specs.len() > MAX_ROUTES {
            return Err(RouteError {
                route: MAX_ROUTES,
                field: RouteField::Filter,
                message: format!("at most {MAX_ROUTES} routes are allowed"),
            });
        }
        let routes = specs
            .iter()
            .enumerate()
            .map(|(i, spec)| compile_route(spec, upstream_names, gateway_id).map_err(|e| e.at(i)))
            .collect::<Result<_, _>>()?;
        Ok(Self { routes })
    }

    /// Whether there are no routes (everything goes everywhere).
    #[must_use]
    pub fn is_everything(&self) -> bool {
        self.routes.is_empty()
    }

    /// Whether a message on `topic` goes anywhere: checked at the ingress, which refuses it
    /// otherwise.
    #[must_use]
    pub fn accepts(&self, topic: &str) -> bool {
        self.routes.is_empty() || self.routes.iter().any(|r| topic::matches(&r.filter, topic))
    }

    /// Where a message (its original topic, QoS and origin as stored in the spool) goes on
    /// upstream `upstream`; `None` when no route sends it there, or when its rewrite is no
    /// valid topic name (longer than [`topic::MAX_TOPIC_BYTES`], see the module docs): the
    /// caller counts it as unroutable for that upstream.
    #[must_use]
    pub fn target<'a>(
        &self,
        upstream: usize,
        topic: &'a str,
        qos: Qos,
        origin: &Origin,
    ) -> Option<Target<'a>> {
        if self.routes.is_empty() {
            return Some(Target {
                topic: Cow::Borrowed(topic),
                qos,
            });
        }
        let route = self
            .routes
            .iter()
            .find(|r| r.upstreams.contains(&upstream) && topic::matches(&r.filter, topic))?;
        let stripped = route.strip_from(topic);
        let topic = match &route.rewrite {
            Rewrite::None => Cow::Borrowed(stripped),
            Rewrite::Prefix(prefix) => Cow::Owned(format!("{prefix}{stripped}")),
            Rewrite::Template(parts) => Cow::Owned(render(parts, stripped, origin)),
        };
        if !matches!(topic, Cow::Borrowed(_)) && !topic::is_valid_name(&topic) {
            return None;
        }
        let qos = match route.qos_max {
            Some(max) if qos_rank(max) < qos_rank(qos) => max,
            _ => qos,
        };
        Some(Target { topic, qos })
    }

    /// The filters to subscribe on upstream `upstream` for a sensor's `filter` (deduplicated,
    /// in route order; empty when no route carries downlink from that upstream for it). See
    /// the module docs for the widening rule.
    #[must_use]
    pub fn upstream_filters(&self, upstream: usize, filter: &str) -> Vec<String> {
        if self.routes.is_empty() {
            return vec![filter.to_owned()];
        }
        let mut out: Vec<String> = Vec::new();
        for route in &self.routes {
            let Some(reverse) = &route.reverse else {
                continue;
            };
            if !route.upstreams.contains(&upstream)
                || !topic::filters_overlap(&route.filter, filter)
            {
                continue;
            }
            let stripped = match &route.strip {
                Some(prefix) => match strip_filter(filter, prefix) {
                    Some(f) => Cow::Owned(f),
                    None => continue,
                },
                None => Cow::Borrowed(filter),
            };
            let upstream_filter = widen(&format!("{}{stripped}{}", reverse.head, reverse.tail));
            if topic::is_valid_filter(&upstream_filter) && !out.contains(&upstream_filter) {
                out.push(upstream_filter);
            }
        }
        out
    }

    /// The topic as the sensors see it for a downlink message that arrived on upstream
    /// `upstream` under `topic` (the reverse of the route's rewrite), or `None` when no
    /// route maps it back (see the module docs).
    #[must_use]
    pub fn downlink_topic<'a>(&self, upstream: usize, topic: &'a str) -> Option<Cow<'a, str>> {
        if self.routes.is_empty() {
            return Some(Cow::Borrowed(topic));
        }
        self.routes
            .iter()
            .filter(|r| r.upstreams.contains(&upstream))
            .find_map(|route| {
                let reverse = route.reverse.as_ref()?;
                let middle = topic
                    .strip_prefix(reverse.head.as_str())?
                    .strip_suffix(reverse.tail.as_str())?;
                let sensor_topic = match &route.strip {
                    Some(prefix) => Cow::Owned(format!("{prefix}{middle}")),
                    None => Cow::Borrowed(middle),
                };
                (topic::is_valid_name(&sensor_topic)
                    && topic::matches(&route.filter, &sensor_topic))
                .then_some(sensor_topic)
            })
    }
}

impl Route {
    /// The topic with `strip_prefix` removed, when it starts with it and something remains.
    fn strip_from<'a>(&self, topic: &'a str) -> &'a str {
        self.strip
            .as_deref()
            .and_then(|prefix| topic.strip_prefix(prefix))
            .filter(|rest| !rest.is_empty())
            .unwrap_or(topic)
    }
}

/// A compile error before the route index is known.
struct FieldError {
    field: RouteField,
    message: String,
}

impl FieldError {
    fn new(field: RouteField, message: impl Into<String>) -> Self {
        Self {
            field,
            message: message.into(),
        }
    }

    fn at(self, route: usize) -> RouteError {
        RouteError {
            route,
            field: self.field,
            message: self.message,
        }
    }
}

fn compile_route(
    spec: &RouteSpec,
    upstream_names: &[&str],
    gateway_id: &str,
) -> Result<Route, FieldError> {
    topic::validate_filter(&spec.filter)
        .map_err(|e| FieldError::new(RouteField::Filter, format!("filter: {e}")))?;
    if spec.upstreams.is_empty() {
        return Err(FieldError::new(
            RouteField::Upstreams,
            "upstreams: name at least one upstream",
        ));
    }
    let mut upstreams = Vec::with_capacity(spec.upstreams.len());
    for name in &spec.upstreams {
        let index = upstream_names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| {
                FieldError::new(
                    RouteField::Upstreams,
                    format!("upstreams: no upstream is named {name:?}"),
                )
            })?;
        if upstreams.contains(&index) {
            return Err(FieldError::new(
                RouteField::Upstreams,
                format!("upstreams: {name:?} is named twice"),
            ));
        }
        upstreams.push(index);
    }
    let strip = spec
        .strip_prefix
        .as_deref()
        .map(|p| check_prefix(p, RouteField::StripPrefix, "strip_prefix"))
        .transpose()?;
    let rewrite = match (&spec.add_prefix, &spec.template) {
        (Some(_), Some(_)) => {
            return Err(FieldError::new(
                RouteField::Template,
                "template and add_prefix exclude each other (put the prefix in the template)",
            ));
        }
        (Some(prefix), None) => {
            Rewrite::Prefix(check_prefix(prefix, RouteField::AddPrefix, "add_prefix")?)
        }
        (None, Some(template)) => Rewrite::Template(parse_template(template, gateway_id)?),
        (None, None) => Rewrite::None,
    };
    let reverse = reverse_of(&rewrite);
    Ok(Route {
        filter: spec.filter.clone(),
        upstreams,
        strip,
        rewrite,
        qos_max: spec.qos_max,
        reverse,
    })
}

/// A prefix is a non-empty piece of a topic name: no wildcards, no forbidden characters.
fn check_prefix(prefix: &str, field: RouteField, key: &str) -> Result<String, FieldError> {
    if prefix.len() > MAX_REWRITE_BYTES {
        return Err(FieldError::new(
            field,
            format!("{key}: longer than {MAX_REWRITE_BYTES} bytes"),
        ));
    }
    topic::validate_name(prefix).map_err(|e| FieldError::new(field, format!("{key}: {e}")))?;
    Ok(prefix.to_owned())
}

/// Parses a template into parts, folding `{gateway_id}` and `{{` / `}}` into literals.
fn parse_template(template: &str, gateway_id: &str) -> Result<Vec<Part>, FieldError> {
    let err = |message: String| FieldError::new(RouteField::Template, message);
    if template.is_empty() {
        return Err(err("template: must not be empty".to_owned()));
    }
    if template.len() > MAX_REWRITE_BYTES {
        return Err(err(format!(
            "template: longer than {MAX_REWRITE_BYTES} bytes"
        )));
    }
    let mut parts = Vec::new();
    let mut literal = String::new();
    let mut rest = template;
    while let Some(at) = rest.find(['{', '}']) {
        literal.push_str(&rest[..at]);
        let tail = &rest[at..];
        let offset = template.len() - tail.len();
        if let Some(after) = tail.strip_prefix("{{") {
            literal.push('{');
            rest = after;
            continue;
        }
        if let Some(after) = tail.strip_prefix("}}") {
            literal.push('}');
            rest = after;
            continue;
        }
        if tail.starts_with('}') {
            return Err(err(format!(
                "template: `}}` at byte {offset} closes no placeholder (write `}}}}` for a literal brace)"
            )));
        }
        let Some(end) = tail.find('}') else {
            return Err(err(format!(
                "template: `{{` at byte {offset} is not closed (write `{{{{` for a literal brace)"
            )));
        };
        let name = &tail[1..end];
        let part = match name {
            "topic" => Part::Topic,
            "client_id" => Part::ClientId,
            "protocol" => Part::Protocol,
            "gateway_id" => {
                literal.push_str(gateway_id);
                rest = &tail[end + 1..];
                continue;
            }
            other => {
                return Err(err(format!(
                    "template: unknown placeholder `{{{other}}}` (known: {{topic}}, \
                     {{client_id}}, {{protocol}}, {{gateway_id}})"
                )));
            }
        };
        if !literal.is_empty() {
            parts.push(Part::Literal(std::mem::take(&mut literal)));
        }
        parts.push(part);
        rest = &tail[end + 1..];
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        parts.push(Part::Literal(literal));
    }
    for part in &parts {
        if let Part::Literal(text) = part
            && (text.contains(['+', '#']) || text.chars().any(topic::is_forbidden_char))
        {
            return Err(err(format!(
                "template: the text {text:?} (with the gateway id) holds a wildcard or a \
                     control character"
            )));
        }
    }
    Ok(parts)
}

/// The literal text around the single `{topic}` of a rewrite that has no other placeholder.
fn reverse_of(rewrite: &Rewrite) -> Option<Reverse> {
    match rewrite {
        Rewrite::None => Some(Reverse {
            head: String::new(),
            tail: String::new(),
        }),
        Rewrite::Prefix(prefix) => Some(Reverse {
            head: prefix.clone(),
            tail: String::new(),
        }),
        Rewrite::Template(parts) => {
            let mut head = String::new();
            let mut tail = String::new();
            let mut seen_topic = false;
            for part in parts {
                match part {
                    Part::Literal(text) if seen_topic => tail.push_str(text),
                    Part::Literal(text) => head.push_str(text),
                    Part::Topic if !seen_topic => seen_topic = true,
                    Part::Topic | Part::ClientId | Part::Protocol => return None,
                }
            }
            seen_topic.then_some(Reverse { head, tail })
        }
    }
}

/// Renders a template for one message.
fn render(parts: &[Part], topic: &str, origin: &Origin) -> String {
    let client_id = origin
        .client_id
        .as_deref()
        .filter(|c| !c.is_empty())
        .unwrap_or(MISSING_CLIENT_ID);
    let mut out = String::with_capacity(topic.len() + 32);
    for part in parts {
        match part {
            Part::Literal(text) => out.push_str(text),
            Part::Topic => out.push_str(topic),
            Part::ClientId => push_sanitised(&mut out, client_id),
            Part::Protocol => push_sanitised(&mut out, origin.protocol.as_str()),
        }
    }
    out
}

/// Appends `value` as one piece of one level: level separators, wildcards and characters no
/// topic may hold become `_`.
fn push_sanitised(out: &mut String, value: &str) {
    out.extend(value.chars().map(|c| {
        if matches!(c, '/' | '+' | '#') || topic::is_forbidden_char(c) {
            '_'
        } else {
            c
        }
    }));
}

/// The part of the filter `filter` that matches what follows `prefix` in the names it
/// matches (a superset where a wildcard covers part of the prefix); `None` when no name it
/// matches starts with `prefix` and has more after it.
fn strip_filter(filter: &str, prefix: &str) -> Option<String> {
    let prefix_levels: Vec<&str> = prefix.split('/').collect();
    let mut filter_levels = filter.split('/');
    let last = prefix_levels.len().saturating_sub(1);
    let mut first = String::new();
    for (i, p) in prefix_levels.iter().enumerate() {
        let f = filter_levels.next()?;
        match f {
            "#" => return Some("#".to_owned()),
            "+" if i == last => first.push('+'),
            "+" => {}
            literal if i == last => first.push_str(literal.strip_prefix(p)?),
            literal if literal == *p => {}
            _ => return None,
        }
    }
    let mut out = first;
    for level in filter_levels {
        out.push('/');
        out.push_str(level);
    }
    (!out.is_empty()).then_some(out)
}

/// Turns `text` into a valid filter matching at least what it was meant to: a level that
/// holds `#` becomes `#` and ends the filter, a level that holds `+` with other text becomes
/// `+` (a prefix or template literal glued to a wildcard inside one level).
fn widen(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, level) in text.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        if level.contains('#') {
            out.push('#');
            break;
        }
        out.push_str(if level.contains('+') { "+" } else { level });
    }
    out
}

const fn qos_rank(qos: Qos) -> u8 {
    match qos {
        Qos::AtMostOnce => 0,
        Qos::AtLeastOnce => 1,
        Qos::ExactlyOnce => 2,
    }
}

#[cfg(test)]
mod tests;
