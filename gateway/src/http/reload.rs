//! Live reload of the HTTP ingress: [`Reloader::apply`] puts a new `[http]` section in force
//! while connections, requests in flight and SSE streams go on.
//!
//! What a request reads per request (the auth table, limits, timeouts, the body budget) is
//! one immutable [`Settings`] snapshot behind a `RwLock<Arc<..>>`: a request takes the read
//! lock once, clones the `Arc` and drops the lock (no lock is held across an await), so a
//! reload swaps the whole snapshot and a request sees either the old settings or the new
//! ones, never a mix. What has state of its own is changed in place: the rate buckets (kept
//! per device), the SSE hub's bounds, the `/clients` table's bound, `queue_wait`, and the
//! connection permits.
//!
//! Per key (README text in the notes of issue 18):
//! - devices (ids, token hashes, grants), `allow_anonymous`, `anonymous_publish`,
//!   `anonymous_subscribe`: from the next request (a removed or changed token: 401; a device
//!   whose grants changed: the new grants). A stream already open keeps the filters it was
//!   granted.
//! - `rate_per_device`, `rate_burst`: from the next request; each device's bucket keeps what
//!   it used (cut to a lower burst); a removed device's bucket is forgotten.
//! - Body and batch limits, `require_content_length`, `request_timeout`, `retry_after`,
//!   `max_filters_per_stream`, `sse_keepalive`: from the next request (a body being read
//!   finishes under the limits it started with).
//! - `body_memory`: new requests draw from a budget of the new size; bodies being read under
//!   the old one finish under it (for that moment both budgets count).
//! - `queue_wait`: from the next request.
//! - `max_streams`, `max_streams_per_device`, `max_filters`: from the next `/v1/subscribe`;
//!   open streams are kept. `sse_queue`, `sse_queue_full`: streams opened from now on.
//!   `sse_max_event`: from the next event. The router's filter table is sized once at start
//!   from every ingress's `max_filters`: a `max_filters` above the start value is capped at
//!   it until a restart (noted).
//! - `max_connections`: raised at once; lowered, open connections are kept and new ones wait
//!   in the accept queue until the count is below the new value. `max_connections_per_ip`:
//!   from the next accepted connection.
//! - `idle_timeout`, `tls_handshake_timeout`, `header_timeout`, `max_header_size`,
//!   `max_headers`, `h2_max_streams`: connections accepted from now on (an open connection
//!   keeps the settings it was accepted with; `header_timeout` also bounds a request's head
//!   through hyper, per connection).
//! - `max_devices_tracked`: bounds the `/clients` table and the rate table; a lower one
//!   forgets the least recently seen beyond it (rate: at once; `/clients`: at the next new
//!   device).
//! - `[http.jwt]`: every SIGHUP re-reads the key file (`public_key` or `jwks`), whether or not
//!   the config changed; the keys and every `[http.jwt]` key apply from the next request (a
//!   token signed by a removed key gets 401 `unknown_kid` or `bad_signature`). A key file that
//!   does not load keeps the whole `[http]` snapshot in force and fails the reload's `[http]`
//!   part (the next SIGHUP tries again).
//! - `listen`, `tls_listen`, the TLS files and `client_cert`, `http2` (ALPN is fixed in the
//!   TLS configuration) and `worker_threads` (the runtime) need a restart: a change is
//!   noted, not applied (the snapshot keeps the running values).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::Instant;

use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::sync::Semaphore;

use super::auth::AuthTable;
use super::devices::Devices;
use super::jwt::{JwtKeyError, JwtVerifier, SharedVerifier};
use super::publish::Ingress;
use super::rate::RateTable;
use super::server;
use crate::config::HttpSection;

/// What requests and new connections read: one immutable snapshot per reload.
pub(crate) struct Settings {
    /// The section in force (restart-only keys keep their running values).
    pub(crate) section: Arc<HttpSection>,
    /// Devices by token digest and id, and the anonymous identity.
    pub(crate) auth: AuthTable,
    /// Request bodies held at once, in KiB (`body_memory`).
    pub(crate) body_memory: Arc<Semaphore>,
    /// Permits in `body_memory` (a request never asks for more).
    pub(crate) body_permits: u32,
    /// hyper-util's builder with the connection limits, for connections accepted from now on.
    pub(crate) builder: auto::Builder<TokioExecutor>,
}

impl Settings {
    fn new(
        section: Arc<HttpSection>,
        body: Option<(Arc<Semaphore>, u32)>,
        jwt: Option<SharedVerifier>,
    ) -> Self {
        let (body_memory, body_permits) = body.unwrap_or_else(|| {
            let permits = (section.body_memory / 1024)
                .clamp(1, Semaphore::MAX_PERMITS)
                .min(u32::MAX as usize);
            (
                Arc::new(Semaphore::new(permits)),
                u32::try_from(permits).unwrap_or(u32::MAX),
            )
        });
        Settings {
            auth: AuthTable::with_jwt(&section, jwt),
            builder: server::builder(&section),
            body_memory,
            body_permits,
            section,
        }
    }
}

/// The running ingress's parts with bounds of their own, once [`Live::attach`] gave them.
struct Parts {
    ingress: Arc<Ingress>,
    devices: Arc<Mutex<Devices>>,
}

/// The HTTP ingress's settings and what a reload changes in place; shared by the handlers,
/// the server adapter and the [`Reloader`].
pub(crate) struct Live {
    /// The snapshot in force (see the module doc).
    settings: RwLock<Arc<Settings>>,
    /// Token buckets per device, kept across reloads.
    pub(crate) rate: Mutex<RateTable>,
    /// `max_connections` permits over every listener, taken before `accept`.
    pub(crate) connections: Arc<Semaphore>,
    /// Permits still to retire after `max_connections` was lowered below what was taken:
    /// an accept loop that gets a permit while this is positive forgets it instead of
    /// accepting ([`Live::retire_permit`]).
    connection_debt: AtomicUsize,
    /// `max_filters` at start: what the router's filter table was sized for.
    started_max_filters: usize,
    /// The server adapter's counters (open connections), once it serves.
    conn_stats: OnceLock<Arc<server::ConnStats>>,
    /// The running ingress's hub, `queue_wait` and `/clients` table; also serialises
    /// [`Reloader::apply`] (held for its whole length).
    parts: Mutex<Option<Parts>>,
}

impl Live {
    /// The settings of `section` with the JWT keys `jwt` (loaded from `section.jwt`), nothing
    /// attached yet.
    pub(crate) fn new(section: &HttpSection, jwt: Option<SharedVerifier>) -> Arc<Self> {
        Arc::new(Live {
            settings: RwLock::new(Arc::new(Settings::new(
                Arc::new(section.clone()),
                None,
                jwt,
            ))),
            rate: Mutex::new(RateTable::new(
                section.rate_per_device,
                section.rate_burst,
                section.max_devices_tracked,
            )),
            connections: Arc::new(Semaphore::new(section.max_connections.max(1))),
            connection_debt: AtomicUsize::new(0),
            started_max_filters: section.max_filters,
            conn_stats: OnceLock::new(),
            parts: Mutex::new(None),
        })
    }

    /// The snapshot in force (a read lock and an `Arc` clone).
    pub(crate) fn settings(&self) -> Arc<Settings> {
        Arc::clone(&self.settings.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Gives the running ingress's parts to the reloads, and puts the settings in force
    /// into them (a reload may have come between [`Live::new`] and now).
    pub(crate) fn attach(&self, ingress: Arc<Ingress>, devices: Arc<Mutex<Devices>>) {
        let mut parts = lock(&self.parts);
        let section = Arc::clone(&self.settings().section);
        let attached = Parts { ingress, devices };
        configure_parts(&attached, &section);
        *parts = Some(attached);
    }

    /// The server adapter serving with these settings counts its connections in `stats`.
    pub(crate) fn serving(&self, stats: &Arc<server::ConnStats>) {
        let _ = self.conn_stats.set(Arc::clone(stats));
    }

    /// Whether a permit an accept loop just took must be retired (forgotten) instead of
    /// used: `max_connections` was lowered below the permits taken at that moment.
    pub(crate) fn retire_permit(&self) -> bool {
        self.connection_debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |debt| {
                debt.checked_sub(1)
            })
            .is_ok()
    }

    /// Moves the connection permits from `old` to `new` (each at least 1): raised, the debt
    /// is paid first, then permits are added; lowered, free permits are forgotten at once and
    /// the rest become debt, retired as connections end.
    fn set_max_connections(&self, old: usize, new: usize) {
        let (old, new) = (old.max(1), new.max(1));
        if new > old {
            let mut add = new - old;
            let _ =
                self.connection_debt
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |debt| {
                        let paid = debt.min(new - old);
                        add = new - old - paid;
                        Some(debt - paid)
                    });
            if add > 0 {
                self.connections.add_permits(add);
            }
        } else if old > new {
            let cut = old - new;
            let forgotten = self.connections.forget_permits(cut);
            self.connection_debt
                .fetch_add(cut - forgotten, Ordering::AcqRel);
        }
    }
}

/// Puts `section`'s bounds into the hub, the `/clients` table and `queue_wait`.
fn configure_parts(parts: &Parts, section: &HttpSection) {
    parts.ingress.hub().set_limits(
        section.max_streams,
        section.max_streams_per_device,
        section.max_filters,
        section.sse_queue,
        section.sse_queue_full,
        section.sse_max_event,
    );
    parts
        .ingress
        .hub()
        .set_security(Arc::clone(&section.security));
    parts.ingress.set_queue_wait(section.queue_wait);
    lock(&parts.devices).set_cap(section.max_devices_tracked);
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[allow(clippy::disallowed_methods)] // The adapter reads the clock (tokio's, like handlers).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Applies a new `[http]` section to the running HTTP ingress (SIGHUP). `Clone + Send +
/// Sync`; obtained from the wiring (`app`'s `HttpRunning`), made before the ingress runs.
#[derive(Clone)]
pub struct Reloader {
    live: Arc<Live>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").finish_non_exhaustive()
    }
}

/// The JWT keys of `section` (`None` without `[http.jwt]`), read from the key file now.
fn load_jwt(section: &HttpSection) -> Result<Option<SharedVerifier>, JwtKeyError> {
    section
        .jwt
        .as_ref()
        .map(|spec| JwtVerifier::load(spec).map(Arc::new))
        .transpose()
}

impl Reloader {
    /// A reloader for an ingress that will run with `section` ([`super::run`] takes it);
    /// reads the `[http.jwt]` key file.
    ///
    /// # Errors
    /// The key file cannot be read or holds no usable key.
    pub fn new(section: &HttpSection) -> Result<Self, JwtKeyError> {
        let jwt = load_jwt(section)?;
        Ok(Reloader {
            live: Live::new(section, jwt),
        })
    }

    /// SIGHUP with no `[http]` key changed: re-reads the `[http.jwt]` key file and, when its
    /// contents changed, puts the new keys in force from the next request. `None` when JWT is
    /// off or the file is unchanged (nothing to apply).
    ///
    /// # Errors
    /// The key file does not load; the keys in force are kept.
    pub fn reload_keys(&self) -> Option<Result<Vec<String>, JwtKeyError>> {
        let live = &self.live;
        let _parts = lock(&live.parts);
        let old = live.settings();
        let spec = old.section.jwt.as_ref()?;
        let next = match JwtVerifier::load(spec) {
            Ok(next) => next,
            Err(e) => return Some(Err(e)),
        };
        if old.auth.jwt().is_some_and(|k| k.same_keys(&next)) {
            return None;
        }
        let note = jwt_note(&next);
        let body = Some((Arc::clone(&old.body_memory), old.body_permits));
        *live
            .settings
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(Settings::new(
            Arc::clone(&old.section),
            body,
            Some(Arc::new(next)),
        ));
        Some(Ok(vec![note]))
    }

    /// The shared settings (for `run` and the tests).
    pub(crate) fn live(&self) -> &Arc<Live> {
        &self.live
    }

    /// Puts `section` (validated) in force: see the module doc for each key. Connections,
    /// requests in flight and SSE streams are kept. Returns notes for the log: what changed
    /// that clients notice (devices removed, tokens changed, ...), limits now below what is
    /// in use, and restart-only keys that changed (not applied).
    ///
    /// # Errors
    /// The `[http.jwt]` key file does not load: nothing is applied.
    pub fn apply(&self, section: &HttpSection) -> Result<Vec<String>, JwtKeyError> {
        let live = &self.live;
        let parts = lock(&live.parts);
        let old = live.settings();
        let jwt = load_jwt(section)?;
        let mut notes = notes(&old.section, section);
        match (&jwt, old.auth.jwt()) {
            (Some(new), Some(old)) if new.same_keys(old) => {
                if new.spec() != old.spec() {
                    notes
                        .push("[http.jwt] settings changed: in force from the next request".into());
                }
            }
            (Some(new), _) => notes.push(jwt_note(new)),
            (None, Some(_)) => notes.push(
                "[http.jwt] removed: JWT bearer tokens get 401 (as unknown static tokens)".into(),
            ),
            (None, None) => {}
        }
        // Restart-only keys keep their running values, so the snapshot says what runs.
        let mut next = section.clone();
        // The router's filter table was sized at start with this bound among the ingresses':
        // above it the SSE streams would take the room the other ingresses count on.
        if next.max_filters > live.started_max_filters {
            notes.push(format!(
                "max_filters {} is above the {} the router's filter table was sized for at \
                 start: capped at {} until a restart",
                next.max_filters, live.started_max_filters, live.started_max_filters
            ));
            next.max_filters = live.started_max_filters;
        }
        next.listen.clone_from(&old.section.listen);
        next.tls_listen.clone_from(&old.section.tls_listen);
        next.tls.clone_from(&old.section.tls);
        next.http2 = old.section.http2;
        next.worker_threads = old.section.worker_threads;
        let body = (next.body_memory == old.section.body_memory)
            .then(|| (Arc::clone(&old.body_memory), old.body_permits));
        let next = Arc::new(next);
        *live
            .settings
            .write()
            .unwrap_or_else(PoisonError::into_inner) =
            Arc::new(Settings::new(Arc::clone(&next), body, jwt));
        {
            let mut rate = lock(&live.rate);
            rate.set_limits(
                now(),
                next.rate_per_device,
                next.rate_burst,
                next.max_devices_tracked,
            );
            let kept: HashMap<&str, ()> =
                next.devices.iter().map(|d| (d.id.as_str(), ())).collect();
            for device in &old.section.devices {
                if !kept.contains_key(device.id.as_str()) {
                    rate.forget(&device.id);
                }
            }
        }
        let open = live.conn_stats.get().map_or(0, |stats| {
            usize::try_from(stats.connections_open.load(Ordering::Relaxed)).unwrap_or(usize::MAX)
        });
        if next.max_connections < open {
            notes.push(format!(
                "max_connections lowered to {}, below {open} connections open: kept; new \
                 connections wait until below",
                next.max_connections
            ));
        }
        live.set_max_connections(old.section.max_connections, next.max_connections);
        if let Some(parts) = parts.as_ref() {
            let streams = parts.ingress.streams.load(Ordering::Relaxed);
            if next.max_streams < streams {
                notes.push(format!(
                    "max_streams lowered to {}, below {streams} open SSE streams: kept; new \
                     streams get 503 until below",
                    next.max_streams
                ));
            }
            configure_parts(parts, &next);
        }
        Ok(notes)
    }
}

/// The reload note of newly loaded JWT keys (no key material: the file and the count).
fn jwt_note(keys: &JwtVerifier) -> String {
    format!(
        "[http.jwt] {} {} loaded: {} key(s), in force from the next request",
        keys.spec().keys.key(),
        keys.spec().keys.path().display(),
        keys.key_count()
    )
}

/// What changed from `old` to `new` that clients notice, and the restart-only keys that
/// changed.
fn notes(old: &HttpSection, new: &HttpSection) -> Vec<String> {
    let mut notes = Vec::new();
    let before: HashMap<&str, &crate::config::DeviceSpec> =
        old.devices.iter().map(|d| (d.id.as_str(), d)).collect();
    let after: HashMap<&str, &crate::config::DeviceSpec> =
        new.devices.iter().map(|d| (d.id.as_str(), d)).collect();
    let added = after.keys().filter(|id| !before.contains_key(*id)).count();
    let mut removed: Vec<&str> = before
        .keys()
        .filter(|id| !after.contains_key(*id))
        .copied()
        .collect();
    removed.sort_unstable();
    let mut new_token: Vec<&str> = after
        .iter()
        .filter(|(id, d)| {
            before
                .get(*id)
                .is_some_and(|o| o.token_hash != d.token_hash)
        })
        .map(|(id, _)| *id)
        .collect();
    new_token.sort_unstable();
    let grants = after
        .iter()
        .filter(|(id, d)| {
            before
                .get(*id)
                .is_some_and(|o| o.publish != d.publish || o.subscribe != d.subscribe)
        })
        .count();
    if added + removed.len() + new_token.len() + grants > 0 {
        notes.push(format!(
            "devices: {added} added, {} removed {removed:?} (their next request gets 401), {} \
             with a new token {new_token:?} (the old one gets 401), {grants} with new grants",
            removed.len(),
            new_token.len(),
        ));
    }
    if old.allow_anonymous && !new.allow_anonymous {
        notes.push("allow_anonymous turned off: requests without credentials get 401".into());
    }
    let restart = [
        ("listen", old.listen != new.listen),
        ("tls_listen", old.tls_listen != new.tls_listen),
        ("TLS files / client_cert", old.tls != new.tls),
        ("http2", old.http2 != new.http2),
        ("worker_threads", old.worker_threads != new.worker_threads),
    ];
    for (key, changed) in restart {
        if changed {
            notes.push(format!(
                "[http] {key} changed: needs a restart (not applied)"
            ));
        }
    }
    notes
}
