//! `[admin]`: the admin listener (metrics, health, status, clients, the field console).

use std::net::SocketAddr;

use serde::Deserialize;

use super::check::int_in;
use super::diag::{KeyPath, Reporter};
use crate::http::token::{self, MAX_TOKEN_LEN};

/// The default admin address: loopback only, so nothing is exposed unless the config says so.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9180";

/// The shortest admin token accepted (a guessable token is no protection).
pub const MIN_TOKEN_LEN: usize = 16;

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSection {
    /// Where the admin listener binds; `None` when switched off (`listen = ""`).
    pub listen: Option<SocketAddr>,
    /// The bearer token every endpoint but `/` and `/healthz` wants; `None`: no token.
    pub token: Option<String>,
    /// Notable events kept for `/status` (a ring: the oldest goes first).
    pub event_history: usize,
    /// Admin connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct RawAdmin {
    listen: String,
    token: String,
    event_history: i64,
    max_connections: i64,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: DEFAULT_ADMIN_LISTEN.into(),
            token: String::new(),
            event_history: 100,
            max_connections: 16,
        }
    }
}

impl RawAdmin {
    /// The listen address if it parses and the listener is on (for other sections' port
    /// checks; [`compile_admin`] reports a bad one).
    pub(super) fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }
}

/// `[admin]`; `None` when a key is wrong (reported).
pub(super) fn compile_admin(raw: &RawAdmin, r: &mut Reporter<'_>) -> Option<AdminSection> {
    let path = KeyPath::root("admin");
    let mut ok = true;
    let listen = if raw.listen.is_empty() {
        None
    } else {
        match raw.listen.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                r.at_path(
                    &path.key("listen"),
                    format!("`{}` is not an IP socket address", raw.listen),
                    Some(format!(
                        "write `{DEFAULT_ADMIN_LISTEN}`, or \"\" to switch the admin listener off"
                    )),
                );
                ok = false;
                None
            }
        }
    };
    let token = (!raw.token.is_empty()).then(|| raw.token.clone());
    if let Some(t) = &token {
        // RFC 6750 b64token characters (what an Authorization header carries unquoted), the
        // same rule as the HTTP ingress's tokens.
        if !token::valid_chars(t) || t.len() < MIN_TOKEN_LEN {
            r.at_path(
                &path.key("token"),
                format!(
                    "must be at least {MIN_TOKEN_LEN} characters of A-Z a-z 0-9 - . _ ~ + / = \
                     (at most {MAX_TOKEN_LEN})"
                ),
                Some("generate one with `openssl rand -hex 24`".into()),
            );
            ok = false;
        }
    }
    if let Some(addr) = listen.filter(|a| !a.ip().is_loopback())
        && token.is_none()
    {
        r.at_path(
            &path.key("listen"),
            format!("`{addr}` is reachable from other hosts, but no [admin] token is set"),
            Some(
                "set [admin] token (the status, clients and metrics would be open to the \
                     network), or listen on 127.0.0.1"
                    .into(),
            ),
        );
        ok = false;
    }
    let event_history =
        int_in::<usize>(r, &path.key("event_history"), raw.event_history, 1, 10_000);
    let max_connections = int_in::<usize>(
        r,
        &path.key("max_connections"),
        raw.max_connections,
        1,
        1024,
    );
    let section = AdminSection {
        listen,
        token,
        event_history: event_history?,
        max_connections: max_connections?,
    };
    ok.then_some(section)
}
