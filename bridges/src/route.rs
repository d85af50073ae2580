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
//! STATUS: interface only (filled in by the routing work of issue 12): `compile` accepts
//! filters and targets; rewrites, QoS caps and the reverse mapping are not applied yet.

use std::borrow::Cow;

use crate::message::{Origin, Qos};
use crate::topic;

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

/// A compiled route.
#[derive(Debug, Clone)]
struct Route {
    filter: String,
    /// Indexes of the target upstreams.
    upstreams: Vec<usize>,
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
    /// The first route with an invalid filter, an unknown or missing upstream, an invalid
    /// prefix, or a template with an unknown placeholder.
    pub fn compile(
        specs: &[RouteSpec],
        upstream_names: &[&str],
        gateway_id: &str,
    ) -> Result<Self, RouteError> {
        let _ = gateway_id;
        let mut routes = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            topic::validate_filter(&spec.filter).map_err(|e| RouteError {
                route: i,
                field: RouteField::Filter,
                message: e.to_string(),
            })?;
            let mut upstreams = Vec::with_capacity(spec.upstreams.len());
            for name in &spec.upstreams {
                let index = upstream_names
                    .iter()
                    .position(|n| n == name)
                    .ok_or_else(|| RouteError {
                        route: i,
                        field: RouteField::Upstreams,
                        message: format!("no upstream is named {name:?}"),
                    })?;
                upstreams.push(index);
            }
            routes.push(Route {
                filter: spec.filter.clone(),
                upstreams,
            });
        }
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
    /// upstream `upstream`; `None` when no route sends it there.
    #[must_use]
    pub fn target<'a>(
        &self,
        upstream: usize,
        topic: &'a str,
        qos: Qos,
        origin: &Origin,
    ) -> Option<Target<'a>> {
        let _ = origin;
        if self.routes.is_empty() {
            return Some(Target {
                topic: Cow::Borrowed(topic),
                qos,
            });
        }
        self.routes
            .iter()
            .find(|r| r.upstreams.contains(&upstream) && topic::matches(&r.filter, topic))
            .map(|_| Target {
                topic: Cow::Borrowed(topic),
                qos,
            })
    }

    /// The filters to subscribe on upstream `upstream` for a sensor's `filter` (deduplicated;
    /// empty when no route carries downlink from that upstream for it).
    #[must_use]
    pub fn upstream_filters(&self, upstream: usize, filter: &str) -> Vec<String> {
        if self.routes.is_empty() || self.routes.iter().any(|r| r.upstreams.contains(&upstream)) {
            return vec![filter.to_owned()];
        }
        Vec::new()
    }

    /// The topic as the sensors see it for a downlink message that arrived on upstream
    /// `upstream` under `topic` (the reverse of the route's rewrite), or `None` when no
    /// route maps it back.
    #[must_use]
    pub fn downlink_topic<'a>(&self, upstream: usize, topic: &'a str) -> Option<Cow<'a, str>> {
        let _ = upstream;
        Some(Cow::Borrowed(topic))
    }
}
