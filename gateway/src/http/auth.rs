//! Who is asking, and what they may touch: the device table built from `[[http.device]]`, the
//! request's credentials resolved to an [`Identity`], and topic/filter [`Grants`].
//!
//! Pure: no IO, no clock. The handlers pass the raw `Authorization` header and the
//! connection's verified client-certificate name.
//!
//! # Invariants
//!
//! - Resolution order: a bearer token if an `Authorization` header is present, else the client
//!   certificate, else the anonymous identity when allowed, else [`AuthError::Missing`].
//!   Wrong credentials are never downgraded: a bad or unknown token, a token that names
//!   another device than the certificate, or a certificate naming no device is an error even
//!   when anonymous access is on.
//! - Tokens are looked up by their SHA-256 digest ([`crate::http::token::digest`]); the table
//!   holds no plain token. A header that is not `Bearer <b64token>` is refused unhashed.
//! - With `[http.jwt]` on, a bearer token with the shape of a JWT (three base64url parts,
//!   [`jwt::looks_like_jwt`]) is checked as a JWT only ([`jwt::JwtVerifier::verify`]), never
//!   looked up as a static token; a refused JWT is [`AuthError::Jwt`] with its reason, never
//!   anonymous. Without `[http.jwt]` every token is a static one.
//! - Grants compare whole levels: prefix `sensors/dev1` allows `sensors/dev1` and
//!   `sensors/dev1/x`, never `sensors/dev10`. `#` alone allows everything. A filter is allowed
//!   only when every topic it can match is inside one prefix (its first levels equal the
//!   prefix's, with no wildcard among them). A prefix holding `+` or `#` (other than `#`
//!   alone) allows nothing: the config refuses such prefixes, and failing closed is the safe
//!   reading of one that got through.

use std::collections::HashMap;
use std::sync::Arc;

use crate::http::jwt::{self, JwtError, SharedVerifier};
use crate::http::token::{self, TokenDigest};
use crate::identity::IdentitySource;

#[cfg(test)]
use crate::config::DeviceSpec;
use crate::config::HttpSection;

/// The identity id of a request without credentials when anonymous access is on.
pub(crate) const ANONYMOUS_ID: &str = "anonymous";

/// The topics (or filters) an identity may publish (or subscribe to): topic-level prefixes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Grants {
    /// `#` was among the prefixes: everything is allowed.
    all: bool,
    /// The prefixes without wildcards (the others allow nothing, see the module docs).
    prefixes: Vec<Box<str>>,
}

impl Grants {
    /// Grants of `prefixes` (`["#"]` = everything, `[]` = nothing).
    pub(crate) fn new(prefixes: &[String]) -> Self {
        let all = prefixes.iter().any(|p| p == "#");
        let prefixes = if all {
            Vec::new()
        } else {
            prefixes
                .iter()
                .filter(|p| !sensorgate_bridges::topic::has_wildcards(p))
                .map(|p| Box::from(p.as_str()))
                .collect()
        };
        Self { all, prefixes }
    }

    /// Whether the topic name `topic` is inside one of the prefixes.
    pub(crate) fn allows_topic(&self, topic: &str) -> bool {
        self.all || self.prefixes.iter().any(|p| within(topic, p))
    }

    /// Whether every topic the filter `filter` can match is inside one of the prefixes. As
    /// the prefixes hold no wildcards, that is the same level test as for a topic: a
    /// wildcard level of `filter` inside a prefix's levels makes the texts differ there.
    pub(crate) fn allows_filter(&self, filter: &str) -> bool {
        self.allows_topic(filter)
    }
}

/// Whether `topic` equals `prefix` or continues it with a `/` (whole levels).
fn within(topic: &str, prefix: &str) -> bool {
    topic
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// An authenticated (or anonymous) requester.
#[derive(Debug)]
pub(crate) struct Identity {
    /// The device id (`[[http.device]] id`), or [`ANONYMOUS_ID`].
    pub(crate) id: Arc<str>,
    /// What it may publish.
    pub(crate) publish: Grants,
    /// What it may subscribe to.
    pub(crate) subscribe: Grants,
    /// Whether this is the anonymous identity (no credentials given).
    pub(crate) anonymous: bool,
    /// What proved it (a static token, a client certificate, a JWT, nothing).
    pub(crate) source: IdentitySource,
}

impl Identity {
    /// The gateway-wide identity ([`crate::identity::Identity`]) of this requester, for the
    /// authorisation shared with the other protocols (`[[acl]]`, `[limits]`).
    #[must_use]
    pub(crate) fn identity(&self) -> crate::identity::Identity {
        crate::identity::Identity::new(Arc::clone(&self.id), self.source)
    }
}

/// Why a request is not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthError {
    /// No credentials, and anonymous access is off (401 `unauthorized`).
    #[error("credentials are required")]
    Missing,
    /// An `Authorization` header that is not `Bearer <b64token>`, or an unknown token (401
    /// `unauthorized`, `error="invalid_token"`).
    #[error("the bearer token is malformed or unknown")]
    InvalidToken,
    /// The token names one device, the client certificate another (401
    /// `credentials_disagree`).
    #[error("the token and the client certificate name different devices")]
    CredentialsDisagree,
    /// A verified client certificate names no configured device (403 `unknown_certificate`).
    #[error("the client certificate names no configured device")]
    UnknownCertificate,
    /// A JWT-shaped bearer token refused by `[http.jwt]` (401, `error="invalid_token"`, the
    /// reason in `token_error`).
    #[error("the JWT is refused: {0}")]
    Jwt(JwtError),
}

/// The configured devices, by token digest and by id, and the anonymous identity.
#[derive(Debug)]
pub(crate) struct AuthTable {
    /// Devices with a `token_hash`, by that digest.
    by_token: HashMap<TokenDigest, Arc<Identity>>,
    /// Every device, by id (client certificates name devices by id).
    by_id: HashMap<Arc<str>, Arc<Identity>>,
    /// `Some` when `allow_anonymous` is on.
    anonymous: Option<Arc<Identity>>,
    /// `Some` when `[http.jwt]` is on: the keys loaded at start or by the last reload.
    jwt: Option<SharedVerifier>,
}

impl AuthTable {
    /// The table of `section`'s devices. Duplicate ids or digests are refused by the config
    /// check; here the last one wins.
    #[cfg(test)]
    pub(crate) fn new(section: &HttpSection) -> Self {
        Self::with_jwt(section, None)
    }

    /// As [`Self::new`], with the JWT keys of `[http.jwt]` (loaded by the caller:
    /// [`jwt::JwtVerifier::load`]).
    pub(crate) fn with_jwt(section: &HttpSection, jwt: Option<SharedVerifier>) -> Self {
        let mut by_token = HashMap::new();
        let mut by_id = HashMap::new();
        for device in &section.devices {
            let id: Arc<str> = Arc::from(device.id.as_str());
            let identity = |source| {
                Arc::new(Identity {
                    id: Arc::clone(&id),
                    publish: Grants::new(&device.publish),
                    subscribe: Grants::new(&device.subscribe),
                    anonymous: false,
                    source,
                })
            };
            if let Some(digest) = device.token_hash {
                by_token.insert(digest, identity(IdentitySource::HttpToken));
            }
            by_id.insert(Arc::clone(&id), identity(IdentitySource::HttpCertificate));
        }
        let anonymous = section.allow_anonymous.then(|| {
            Arc::new(Identity {
                id: Arc::from(ANONYMOUS_ID),
                publish: Grants::new(&section.anonymous_publish),
                subscribe: Grants::new(&section.anonymous_subscribe),
                anonymous: true,
                source: IdentitySource::Anonymous,
            })
        });
        Self {
            by_token,
            by_id,
            anonymous,
            jwt,
        }
    }

    /// The JWT keys in force, if `[http.jwt]` is on.
    pub(crate) fn jwt(&self) -> Option<&SharedVerifier> {
        self.jwt.as_ref()
    }

    /// `authorization`: the raw `Authorization` header value, if any; `cert_device`: the
    /// connection's verified client-certificate name; `now_secs`: the Unix time (JWT `exp`
    /// and `nbf`). Order: token, else certificate, else anonymous when allowed, else Missing.
    /// Wrong credentials are never downgraded.
    ///
    /// The header must be `Bearer` (any case), one or more spaces, and one RFC 6750
    /// `b64token`; anything else (another scheme, several tokens, non-ASCII bytes) is
    /// [`AuthError::InvalidToken`], without hashing. A JWT-shaped token with `[http.jwt]` on
    /// is checked as a JWT (bounded by `max_token_size`); any other token is a static one
    /// (at most [`token::MAX_TOKEN_LEN`] long).
    pub(crate) fn authenticate(
        &self,
        authorization: Option<&[u8]>,
        cert_device: Option<&str>,
        now_secs: u64,
    ) -> Result<Arc<Identity>, AuthError> {
        if let Some(header) = authorization {
            let token = bearer_token(header).ok_or(AuthError::InvalidToken)?;
            let identity = match &self.jwt {
                Some(verifier) if jwt::looks_like_jwt(token) => {
                    let grant = verifier.verify(token, now_secs).map_err(AuthError::Jwt)?;
                    Arc::new(Identity {
                        id: Arc::from(grant.identity),
                        publish: Grants::new(&grant.publish),
                        subscribe: Grants::new(&grant.subscribe),
                        anonymous: false,
                        source: IdentitySource::Jwt,
                    })
                }
                _ => {
                    if !token::valid_chars(token) {
                        return Err(AuthError::InvalidToken);
                    }
                    Arc::clone(
                        self.by_token
                            .get(&token::digest(token.as_bytes()))
                            .ok_or(AuthError::InvalidToken)?,
                    )
                }
            };
            if cert_device.is_some_and(|name| name != &*identity.id) {
                return Err(AuthError::CredentialsDisagree);
            }
            return Ok(identity);
        }
        if let Some(name) = cert_device {
            return self
                .by_id
                .get(name)
                .cloned()
                .ok_or(AuthError::UnknownCertificate);
        }
        self.anonymous.clone().ok_or(AuthError::Missing)
    }
}

/// The token of an `Authorization: Bearer <token>` value (RFC 6750 section 2.1; the scheme
/// is case-insensitive, RFC 9110 section 11.1), if it is one: non-empty `b64token`
/// characters (the length is checked by the kind of token: static or JWT).
fn bearer_token(header: &[u8]) -> Option<&str> {
    let header = std::str::from_utf8(header).ok()?;
    let (scheme, rest) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_start_matches(' ');
    b64token(token).then_some(token)
}

/// RFC 6750 `b64token`: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`,
/// checked as [`token::valid_chars`] does, without its length bound.
fn b64token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b))
}

/// For the fuzz targets: [`bearer_token`] takes only `b64token`s, and a static token it
/// would look up is what [`token::valid_chars`] allows.
pub(crate) fn fuzz_bearer(header: &[u8]) {
    if let Some(token) = bearer_token(header) {
        assert!(b64token(token), "{token:?}");
        assert_eq!(
            token::valid_chars(token),
            token.len() <= token::MAX_TOKEN_LEN,
            "{token:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    const TOKEN1: &str = "token-of-device-1-0123456789";
    const TOKEN2: &str = "token-of-device-2-0123456789";

    fn section(allow_anonymous: bool) -> HttpSection {
        HttpSection {
            allow_anonymous,
            anonymous_publish: strings(&["public"]),
            anonymous_subscribe: strings(&[]),
            devices: vec![
                DeviceSpec {
                    id: "dev1".into(),
                    token_hash: Some(token::digest(TOKEN1.as_bytes())),
                    publish: strings(&["sensors/dev1"]),
                    subscribe: strings(&["cmd/dev1"]),
                },
                DeviceSpec {
                    id: "dev2".into(),
                    token_hash: Some(token::digest(TOKEN2.as_bytes())),
                    publish: strings(&["#"]),
                    subscribe: strings(&["#"]),
                },
                DeviceSpec {
                    id: "certonly".into(),
                    token_hash: None,
                    publish: strings(&["sensors/certonly"]),
                    subscribe: strings(&[]),
                },
            ],
            ..HttpSection::default()
        }
    }

    fn bearer(token: &str) -> Vec<u8> {
        format!("Bearer {token}").into_bytes()
    }

    fn id(result: Result<Arc<Identity>, AuthError>) -> Result<String, AuthError> {
        result.map(|identity| identity.id.to_string())
    }

    #[test]
    fn a_known_token_names_its_device_with_its_grants() {
        let table = AuthTable::new(&section(false));
        let who = table.authenticate(Some(&bearer(TOKEN1)), None, 0).unwrap();
        assert_eq!(&*who.id, "dev1");
        assert!(!who.anonymous);
        assert!(who.publish.allows_topic("sensors/dev1/temp"));
        assert!(!who.publish.allows_topic("sensors/dev2/temp"));
        assert!(who.subscribe.allows_filter("cmd/dev1/#"));
        assert!(!who.subscribe.allows_filter("cmd/#"));
    }

    #[test]
    fn the_scheme_is_case_insensitive_and_spaces_may_repeat() {
        let table = AuthTable::new(&section(false));
        for header in [
            format!("bearer {TOKEN1}"),
            format!("BEARER {TOKEN1}"),
            format!("BeArEr   {TOKEN1}"),
        ] {
            assert_eq!(
                id(table.authenticate(Some(header.as_bytes()), None, 0)),
                Ok("dev1".into()),
                "{header}"
            );
        }
    }

    #[test]
    fn malformed_headers_and_unknown_tokens_are_invalid_even_with_anonymous_on() {
        let table = AuthTable::new(&section(true));
        let too_long = format!("Bearer {}", "a".repeat(token::MAX_TOKEN_LEN + 1));
        let headers: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"Bearer".to_vec(),
            b"Bearer ".to_vec(),
            format!("Basic {TOKEN1}").into_bytes(),
            format!("Bearer {TOKEN1} extra").into_bytes(),
            format!("Bearer {TOKEN1} ").into_bytes(),
            format!("Bearer\t{TOKEN1}").into_bytes(),
            TOKEN1.as_bytes().to_vec(),
            format!("Bearer \"{TOKEN1}\"").into_bytes(),
            b"Bearer \xff\xfe".to_vec(),
            too_long.into_bytes(),
            bearer("an-unknown-token-0123456789"),
        ];
        for header in headers {
            assert_eq!(
                id(table.authenticate(Some(&header), None, 0)),
                Err(AuthError::InvalidToken),
                "{}",
                String::from_utf8_lossy(&header)
            );
            assert_eq!(
                id(table.authenticate(Some(&header), Some("dev1"), 0)),
                Err(AuthError::InvalidToken),
                "a certificate does not rescue a bad token"
            );
        }
    }

    #[test]
    fn a_token_and_a_certificate_must_name_the_same_device() {
        let table = AuthTable::new(&section(false));
        assert_eq!(
            id(table.authenticate(Some(&bearer(TOKEN1)), Some("dev1"), 0)),
            Ok("dev1".into())
        );
        assert_eq!(
            id(table.authenticate(Some(&bearer(TOKEN2)), Some("dev1"), 0)),
            Err(AuthError::CredentialsDisagree)
        );
        assert_eq!(
            id(table.authenticate(Some(&bearer(TOKEN1)), Some("stranger"), 0)),
            Err(AuthError::CredentialsDisagree)
        );
    }

    #[test]
    fn a_certificate_alone_names_a_configured_device() {
        let table = AuthTable::new(&section(true));
        assert_eq!(
            id(table.authenticate(None, Some("certonly"), 0)),
            Ok("certonly".into())
        );
        assert_eq!(
            id(table.authenticate(None, Some("dev2"), 0)),
            Ok("dev2".into())
        );
        assert_eq!(
            id(table.authenticate(None, Some("stranger"), 0)),
            Err(AuthError::UnknownCertificate),
            "never downgraded to anonymous"
        );
    }

    #[test]
    fn no_credentials_are_anonymous_only_when_allowed() {
        let closed = AuthTable::new(&section(false));
        assert_eq!(
            id(closed.authenticate(None, None, 0)),
            Err(AuthError::Missing)
        );
        let open = AuthTable::new(&section(true));
        let who = open.authenticate(None, None, 0).unwrap();
        assert_eq!(&*who.id, ANONYMOUS_ID);
        assert!(who.anonymous);
        assert!(who.publish.allows_topic("public/x"));
        assert!(!who.publish.allows_topic("sensors/dev1"));
        assert!(!who.subscribe.allows_filter("public/#"));
    }

    #[test]
    fn anonymous_grants_default_to_everything() {
        let table = AuthTable::new(&HttpSection {
            allow_anonymous: true,
            ..HttpSection::default()
        });
        let who = table.authenticate(None, None, 0).unwrap();
        assert!(who.publish.allows_topic("any/thing"));
        assert!(who.subscribe.allows_filter("#"));
    }

    #[test]
    fn grants_compare_whole_levels() {
        let g = Grants::new(&strings(&["sensors/dev1", "cmd/dev1"]));
        assert!(g.allows_topic("sensors/dev1"));
        assert!(g.allows_topic("sensors/dev1/x"));
        assert!(g.allows_topic("sensors/dev1/x/y"));
        assert!(g.allows_topic("sensors/dev1/"));
        assert!(!g.allows_topic("sensors/dev10"));
        assert!(!g.allows_topic("sensors"));
        assert!(!g.allows_topic("sensors/"));
        assert!(!g.allows_topic("other"));
        assert!(g.allows_filter("cmd/dev1/#"));
        assert!(g.allows_filter("cmd/dev1/+"));
        assert!(g.allows_filter("cmd/dev1"));
        assert!(g.allows_filter("cmd/dev1/+/x"));
        assert!(!g.allows_filter("cmd/+"));
        assert!(!g.allows_filter("cmd/#"));
        assert!(!g.allows_filter("cmd/+/x"));
        assert!(!g.allows_filter("#"));
        assert!(!g.allows_filter("+/dev1"));
        assert!(!g.allows_filter("cmd/dev1+"));
        assert!(!g.allows_filter("cmd/dev10/#"));
    }

    #[test]
    fn hash_alone_allows_everything_and_no_prefix_nothing() {
        let all = Grants::new(&strings(&["x", "#"]));
        assert!(all.allows_topic("$SYS/x"));
        assert!(all.allows_filter("#"));
        assert!(all.allows_filter("+/+"));
        let none = Grants::new(&[]);
        assert!(!none.allows_topic("x"));
        assert!(!none.allows_filter("x"));
    }

    #[test]
    fn a_prefix_with_wildcards_allows_nothing() {
        let g = Grants::new(&strings(&["cmd/+", "sensors/#", "a#"]));
        for t in ["cmd/+", "cmd/x", "sensors/#", "sensors/x", "sensors", "a#"] {
            assert!(!g.allows_topic(t), "{t}");
            assert!(!g.allows_filter(t), "{t}");
        }
    }

    // The naive model: level lists; a filter is allowed iff every topic in a witness set it
    // matches is inside a prefix. The witnesses substitute every wildcard with each level of
    // the alphabet and a fresh level no prefix holds (so a wildcard inside a prefix's levels
    // always finds an escaping topic), and `#` also with nothing (it matches the parent).
    const ALPHABET: &[&str] = &["a", "b", ""];
    const FRESH: &str = "zz";

    fn model_topic(prefixes: &[String], topic: &[String]) -> bool {
        prefixes.iter().any(|p| {
            if p == "#" {
                return true;
            }
            let p: Vec<&str> = p.split('/').collect();
            p.iter().all(|l| !l.contains(['+', '#']))
                && topic.len() >= p.len()
                && topic.iter().zip(&p).all(|(t, p)| t == p)
        })
    }

    fn witnesses(filter: &[String]) -> Vec<Vec<String>> {
        let mut out: Vec<Vec<String>> = vec![Vec::new()];
        for level in filter {
            let choices: Vec<Option<&str>> = match level.as_str() {
                "+" => ALPHABET.iter().copied().chain([FRESH]).map(Some).collect(),
                "#" => ALPHABET
                    .iter()
                    .copied()
                    .chain([FRESH])
                    .map(Some)
                    .chain([None])
                    .collect(),
                other => vec![Some(other)],
            };
            out = out
                .into_iter()
                .flat_map(|w| {
                    choices.iter().map(move |c| {
                        let mut w = w.clone();
                        if let Some(level) = c {
                            w.push((*level).to_owned());
                        }
                        w
                    })
                })
                .collect();
        }
        // `#` and `+` first never match a `$` topic; the witnesses hold none, so no filter.
        out.retain(|w| !w.is_empty());
        out
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just(String::new()),
            Just("ab".to_owned())
        ]
    }

    fn prefix() -> impl Strategy<Value = String> {
        prop_oneof![
            1 => Just("#".to_owned()),
            1 => Just("a/+".to_owned()),
            8 => proptest::collection::vec(level(), 1..4).prop_map(|l| l.join("/")),
        ]
    }

    fn filter() -> impl Strategy<Value = Vec<String>> {
        (
            proptest::collection::vec(prop_oneof![3 => level(), 1 => Just("+".to_owned())], 0..4),
            any::<bool>(),
        )
            .prop_map(|(mut levels, hash)| {
                if hash || levels.is_empty() {
                    levels.push("#".to_owned());
                }
                levels
            })
    }

    proptest! {
        #[test]
        fn grants_agree_with_the_level_model(
            prefixes in proptest::collection::vec(prefix(), 0..4),
            topic in proptest::collection::vec(level(), 1..5),
            filter in filter(),
        ) {
            let grants = Grants::new(&prefixes);
            prop_assert_eq!(
                grants.allows_topic(&topic.join("/")),
                model_topic(&prefixes, &topic)
            );
            let allowed = witnesses(&filter).iter().all(|w| model_topic(&prefixes, w));
            prop_assert_eq!(grants.allows_filter(&filter.join("/")), allowed);
            // A wildcard-free filter is a topic.
            prop_assert_eq!(
                grants.allows_filter(&topic.join("/")),
                model_topic(&prefixes, &topic)
            );
        }
    }
}
