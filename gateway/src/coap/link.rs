//! The `GET /.well-known/core` answer: the gateway's resources in the CoRE Link Format
//! (RFC 6690), filtered by the request's Uri-Query options (RFC 6690 §4.1).
//!
//! The gateway serves one resource family, `/ps/{topic...}` (EMQX's publish/subscribe path),
//! listed as one link:
//!
//! ```text
//! </ps>;rt="core.ps";obs
//! ```
//!
//! - `rt="core.ps"`: the resource type the CoAP publish-subscribe drafts
//!   (draft-ietf-core-coap-pubsub) register for a broker's collection of topics;
//! - `obs`: topics below it can be observed (RFC 7641 §6: `GET` with Observe subscribes);
//! - no `ct`: topic payloads are opaque bytes in whatever format the publisher chose, so
//!   advertising one Content-Format would mislead a client filtering on `ct`.
//!
//! Filtering (RFC 6690 §4.1): each query `name=pattern` keeps the links whose attribute `name`
//! (or, for `href`, the link target) matches `pattern`: exactly, or as a prefix when `pattern`
//! ends with `*`; attribute values are space-separated lists and one matching item suffices.
//! RFC 6690 defines a single filter; several are ANDed, as the CoRE Resource Directory does
//! (RFC 9176 §7). A query without `=` keeps the links that carry that attribute at all. No link
//! left is an empty body: the core still answers 2.05 (unicast; RFC 6690 §4.1 only asks
//! multicast servers to stay silent).
//!
//! Invariants: the body is built from the fixed table below, so it is small (bounded by the
//! table, whatever the queries); no input panics.

use super::msg::Query;

/// Content-Format of the body: `application/link-format` (RFC 6690 §7.2).
pub const CONTENT_FORMAT: u16 = 40;

/// One link: its target and its attributes (`None`: an attribute without value, like `obs`).
struct Link {
    href: &'static str,
    attributes: &'static [(&'static str, Option<&'static str>)],
}

/// The gateway's resources, in the order they are listed.
const LINKS: &[Link] = &[Link {
    href: "/ps",
    attributes: &[("rt", Some("core.ps")), ("obs", None)],
}];

/// The link-format body for `/.well-known/core` with the request's Uri-Query options as
/// filters (see the module doc).
#[must_use]
pub fn well_known_core(queries: &[Query]) -> String {
    let mut body = String::new();
    for link in LINKS
        .iter()
        .filter(|link| queries.iter().all(|query| link.matches(query)))
    {
        if !body.is_empty() {
            body.push(',');
        }
        link.write(&mut body);
    }
    body
}

impl Link {
    fn matches(&self, query: &Query) -> bool {
        let name = query.name.as_str();
        let value = if name == "href" {
            Some(Some(self.href))
        } else {
            self.attributes
                .iter()
                .find(|(attribute, _)| *attribute == name)
                .map(|(_, value)| *value)
        };
        match (value, query.value.as_deref()) {
            (None, _) => false,
            (Some(_), None) => true,
            // A valueless attribute (`obs`) matches an empty pattern or `*` only.
            (Some(value), Some(pattern)) => value
                .unwrap_or("")
                .split(' ')
                .any(|item| pattern_matches(pattern, item)),
        }
    }

    fn write(&self, out: &mut String) {
        out.push('<');
        out.push_str(self.href);
        out.push('>');
        for (name, value) in self.attributes {
            out.push(';');
            out.push_str(name);
            if let Some(value) = value {
                out.push_str("=\"");
                out.push_str(value);
                out.push('"');
            }
        }
    }
}

/// RFC 6690 §4.1 query-pattern: a trailing `*` makes it a prefix match.
fn pattern_matches(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => value == pattern,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, value: Option<&str>) -> Query {
        Query {
            name: name.to_owned(),
            value: value.map(str::to_owned),
        }
    }

    const ALL: &str = r#"</ps>;rt="core.ps";obs"#;

    #[test]
    fn without_filters_every_resource_is_listed() {
        assert_eq!(well_known_core(&[]), ALL);
    }

    #[test]
    fn filters_match_exactly_or_by_prefix() {
        for (name, value) in [
            ("rt", "core.ps"),
            ("rt", "core.*"),
            ("rt", "*"),
            ("href", "/ps"),
            ("href", "/p*"),
            ("obs", ""),
            ("obs", "*"),
        ] {
            assert_eq!(
                well_known_core(&[query(name, Some(value))]),
                ALL,
                "{name}={value}"
            );
        }
    }

    #[test]
    fn filters_that_match_nothing_leave_an_empty_body() {
        for (name, value) in [
            ("rt", "core.p"),
            ("rt", "core.ps.conf"),
            ("rt", ""),
            ("href", "ps"),
            ("href", "/ps/"),
            ("ct", "0"),
            ("ct", "*"),
            ("obs", "1"),
            ("if", "*"),
        ] {
            assert_eq!(
                well_known_core(&[query(name, Some(value))]),
                "",
                "{name}={value}"
            );
        }
    }

    #[test]
    fn several_filters_must_all_match() {
        let rt = query("rt", Some("core.ps"));
        assert_eq!(
            well_known_core(&[rt.clone(), query("href", Some("/ps"))]),
            ALL
        );
        assert_eq!(well_known_core(&[rt, query("href", Some("/x*"))]), "");
    }

    #[test]
    fn a_query_without_value_asks_for_the_attribute() {
        assert_eq!(well_known_core(&[query("obs", None)]), ALL);
        assert_eq!(well_known_core(&[query("rt", None)]), ALL);
        assert_eq!(well_known_core(&[query("ct", None)]), "");
    }

    #[test]
    fn items_of_a_space_separated_value_match_one_by_one() {
        assert!(pattern_matches("core.ps", "core.ps"));
        let link = Link {
            href: "/x",
            attributes: &[("rt", Some("a.b core.ps"))],
        };
        assert!(link.matches(&query("rt", Some("core.ps"))));
        assert!(link.matches(&query("rt", Some("a.*"))));
        assert!(!link.matches(&query("rt", Some("a.b core.ps"))));
    }

    #[test]
    fn the_body_parses_as_link_format() {
        // RFC 6690 §2: link-value = "<" URI-Reference ">" *( ";" link-param ).
        let body = well_known_core(&[]);
        for link in body.split(',') {
            let (target, params) = link.strip_prefix("</").unwrap().split_once('>').unwrap();
            assert!(!target.contains(['<', '>', ',', ';']));
            for param in params.split(';').skip(1) {
                let (name, value) = param.split_once('=').unwrap_or((param, "\"\""));
                assert!(name.bytes().all(|b| b.is_ascii_alphanumeric()), "{param}");
                assert!(value.starts_with('"') && value.ends_with('"'), "{param}");
            }
        }
    }
}
