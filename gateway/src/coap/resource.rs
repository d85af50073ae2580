//! The resource table (pure): what a decoded request asks for, with its topic, QoS and
//! identity checked, or the error response it gets. No state, no IO.
//!
//! ```text
//!  method x path                 -> Action
//!  PUT|POST /ps/{topic...}         Publish { topic, qos, retain }   (topic: a valid MQTT name)
//!  GET /ps/{filter...}             Get { filter, observe }          (a valid MQTT filter)
//!  GET /.well-known/core           WellKnown
//!  other method on those           4.05
//!  /ps (no topic), bad topic/filter, bad qos/retain/id  4.00
//!  any other path                  4.04
//! ```
//!
//! Topic = the Uri-Path segments after `ps` joined by `/` (not percent-decoded again: the
//! options already carry decoded text). QoS = the `qos` query, else CON -> 1 and NON -> 0
//! (EMQX's "coap" default). Identity = `id`, else `clientid`; `token` (a credential), and
//! `username`/`password`, are accepted and ignored; unknown queries are ignored.

use sensorgate_bridges::topic::{has_wildcards, is_valid_filter, is_valid_name};

use super::msg::{Code, Message, MessageType};
use crate::observe::model::RefusalReason;

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action<'a> {
    /// Publish the payload to `topic`.
    Publish {
        /// The MQTT topic name.
        topic: String,
        /// 0, 1 or 2.
        qos: u8,
        /// The `retain` query.
        retain: bool,
        /// The identity query, if any.
        client_id: Option<&'a str>,
    },
    /// Read (no Observe), observe (Observe 0) or stop observing (Observe 1) `filter`.
    Get {
        /// The MQTT topic filter (a name unless `observe == Some(0)`).
        filter: String,
        /// The Observe option.
        observe: Option<u32>,
        /// 0, 1 or 2 (the subscription's QoS).
        qos: u8,
        /// The identity query, if any.
        client_id: Option<&'a str>,
    },
    /// `GET /.well-known/core`.
    WellKnown,
}

/// An error response: code and a short diagnostic payload (RFC 7252 section 5.5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// 4.00, 4.04 or 4.05.
    pub(crate) code: Code,
    /// The diagnostic payload.
    pub(crate) diagnostic: &'static str,
    /// How the admin listener counts it.
    pub(crate) reason: RefusalReason,
}

impl Refusal {
    const fn new(code: Code, diagnostic: &'static str) -> Self {
        Refusal {
            code,
            diagnostic,
            reason: RefusalReason::Malformed,
        }
    }

    const fn topic(diagnostic: &'static str) -> Self {
        Refusal {
            code: Code::BAD_REQUEST,
            diagnostic,
            reason: RefusalReason::InvalidTopic,
        }
    }
}

/// The path prefix of the publish/subscribe resources.
const PS: &str = "ps";

/// Classifies `request` (a decoded request: its code is a method).
pub(crate) fn classify(request: &Message, max_client_id_len: usize) -> Result<Action<'_>, Refusal> {
    let path = &request.uri_path;
    let method = request.code;
    match path.as_slice() {
        [a, b] if a == ".well-known" && b == "core" => {
            if method == Code::GET {
                Ok(Action::WellKnown)
            } else {
                Err(Refusal::new(Code::METHOD_NOT_ALLOWED, ""))
            }
        }
        [first, rest @ ..] if first == PS => {
            let is_publish = method == Code::PUT || method == Code::POST;
            if !is_publish && method != Code::GET {
                return Err(Refusal::new(Code::METHOD_NOT_ALLOWED, ""));
            }
            if rest.is_empty() {
                return Err(Refusal::topic("no topic"));
            }
            let topic = rest.join("/");
            let queries = Queries::parse(request, max_client_id_len)?;
            let qos = queries.qos.unwrap_or(match request.ty {
                MessageType::Con => 1,
                _ => 0,
            });
            if is_publish {
                if !is_valid_name(&topic) {
                    return Err(Refusal::topic("bad topic"));
                }
                Ok(Action::Publish {
                    topic,
                    qos,
                    retain: queries.retain,
                    client_id: queries.client_id,
                })
            } else {
                let observe = request.observe;
                let valid = if observe == Some(0) {
                    is_valid_filter(&topic)
                } else {
                    // A plain read (or a cancel) names one topic; a cancel may name the
                    // registration's filter.
                    is_valid_name(&topic) || (observe == Some(1) && is_valid_filter(&topic))
                };
                if !valid {
                    return Err(Refusal::topic("bad topic filter"));
                }
                Ok(Action::Get {
                    filter: topic,
                    observe,
                    qos,
                    client_id: queries.client_id,
                })
            }
        }
        _ => Err(Refusal::new(Code::NOT_FOUND, "")),
    }
}

/// Whether `filter` has wildcards (then a plain read has no single value).
pub(crate) fn is_wild(filter: &str) -> bool {
    has_wildcards(filter)
}

/// The queries the `/ps` resources read.
struct Queries<'a> {
    qos: Option<u8>,
    retain: bool,
    client_id: Option<&'a str>,
}

impl<'a> Queries<'a> {
    fn parse(request: &'a Message, max_client_id_len: usize) -> Result<Self, Refusal> {
        let mut out = Queries {
            qos: None,
            retain: false,
            client_id: None,
        };
        let mut clientid = None;
        for q in &request.uri_query {
            let value = q.value.as_deref();
            match q.name.as_str() {
                "qos" => {
                    out.qos = Some(match value {
                        Some("0") => 0,
                        Some("1") => 1,
                        Some("2") => 2,
                        _ => return Err(Refusal::new(Code::BAD_REQUEST, "bad qos")),
                    });
                }
                "retain" => {
                    out.retain = match value {
                        Some("true") => true,
                        Some("false") => false,
                        _ => return Err(Refusal::new(Code::BAD_REQUEST, "bad retain")),
                    };
                }
                "id" if out.client_id.is_none() => out.client_id = Some(value.unwrap_or("")),
                "clientid" if clientid.is_none() => clientid = Some(value.unwrap_or("")),
                // `token`, `username`, `password`: credentials, never used nor logged here.
                _ => {}
            }
        }
        if out.client_id.is_none() {
            out.client_id = clientid;
        }
        if out
            .client_id
            .is_some_and(|id| id.is_empty() || id.len() > max_client_id_len)
        {
            return Err(Refusal::new(Code::BAD_REQUEST, "bad id"));
        }
        Ok(out)
    }
}

/// The `/.well-known/core` body (RFC 6690): the publish/subscribe resource, observable.
pub(crate) const WELL_KNOWN_CORE: &str = "</ps>;rt=\"core.ps\";ct=0;obs";

/// Content-Format of `/.well-known/core` (application/link-format).
pub(crate) const LINK_FORMAT: u16 = 40;
