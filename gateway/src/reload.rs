//! Live reload (SIGHUP, `systemctl reload`): what a re-read config changes, sorted into what the
//! running gateway applies in place and what only a restart can change.
//!
//! Pure: [`plan`] compares loaded configs; the wiring (`app`) applies the plan to the running
//! parts and records the outcome ([`ReloadCell`], shown in `/status`, `STATUS=` and the events).
//!
//! Invariants:
//! - A config that does not load (any error) changes nothing; the caller never gets a plan for
//!   it.
//! - Live parts are compared with what was last applied; restart-only keys with what the
//!   process started with, so a restart-only change stays reported on every later reload until
//!   the restart (or until it is reverted in the file).
//! - A restart-only value is never applied live, also where it sits inside a part that is
//!   otherwise live (`[mqttsn] max_packet_size` also bounds the serial lines' framers, sized
//!   at start; `max_filters` is the router's bound): the plan carries the running value for
//!   those.
//! - Routes name upstreams by index: when the set of upstreams changed (restart-only), routes
//!   are not applied either, and say so.

use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use crate::coap::core::CoreConfig as CoapCoreConfig;
use crate::config::{Config, HttpSection};
use crate::dtls::DtlsSettings;
use crate::mqttsn::core::CoreConfig;
use crate::security::Policy;

/// What a new config changes in the running gateway.
#[derive(Debug, Default)]
pub struct Plan {
    /// `[log] level`, when it changed.
    pub log_level: Option<String>,
    /// `[[route]]` changed (the new table is `new.routes`).
    pub routes: bool,
    /// The MQTT-SN core's new settings, when any live one changed.
    pub mqttsn: Option<CoreConfig>,
    /// The CoAP core's new settings, when any live one changed.
    pub coap: Option<CoapCoreConfig>,
    /// The new `[dtls]` / `[[psk]]` settings, when they changed (both DTLS layers take them;
    /// new handshakes use them, established sessions keep their keys).
    pub dtls: Option<Arc<DtlsSettings>>,
    /// The new `[http]` section, when any live key changed (its restart-only keys are the
    /// running ones).
    pub http: Option<HttpSection>,
    /// Indexes of the upstreams whose connection settings changed.
    pub upstreams: Vec<usize>,
    /// Changed keys only a restart applies (`[mqttsn] listen`, ...), in file order of sections.
    pub restart_required: Vec<String>,
    /// The upstreams are the ones running (same names and kinds, same order): per-upstream
    /// settings (connection, drain) may be applied by index.
    pub same_upstreams: bool,
}

/// Whether two values differ. The config types of both crates derive `Debug` (not all derive
/// `PartialEq`: the upstreams' settings hold TLS and URL types), and their `Debug` output shows
/// every field, so equal output means equal settings.
fn differs<T: Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") != format!("{b:?}")
}

/// What `new` changes, given the config the process `started` with and the one last
/// `applied` (the same until a reload applied something).
#[must_use]
pub fn plan(started: &Config, applied: &Config, new: &Config) -> Plan {
    let restart_required = restart_only(started, new);
    let same_upstreams = same_upstream_set(started, new);
    let mut plan = Plan {
        restart_required,
        same_upstreams,
        ..Plan::default()
    };
    if applied.log.level != new.log.level {
        plan.log_level = Some(new.log.level.clone());
    }
    if same_upstreams && differs(&applied.route_specs, &new.route_specs) {
        plan.routes = true;
    }
    let mut core = new.mqttsn.core.clone();
    keep_mqttsn_restart_only(&mut core, &started.mqttsn.core);
    if differs(&core, &applied.mqttsn.core) {
        plan.mqttsn = Some(core);
    }
    if let (Some(running), Some(next), Some(first)) = (&applied.coap, &new.coap, &started.coap) {
        let mut core = next.core.clone();
        keep_coap_restart_only(&mut core, &first.core);
        if differs(&core, &running.core) {
            plan.coap = Some(core);
        }
    }
    if applied.dtls.settings != new.dtls.settings {
        plan.dtls = Some(Arc::clone(&new.dtls.settings));
    }
    if let (Some(running), Some(next), Some(first)) = (&applied.http, &new.http, &started.http) {
        let mut section = next.clone();
        keep_http_restart_only(&mut section, first);
        if section != *running {
            plan.http = Some(section);
        }
    }
    if same_upstreams {
        for (i, (old, next)) in applied.upstreams.iter().zip(&new.upstreams).enumerate() {
            if differs(&old.kind, &next.kind) {
                plan.upstreams.push(i);
            }
        }
    }
    plan
}

/// The settings the running core keeps from the start: the driver's receive buffers are sized
/// by `max_packet_size`, the router's filter bound includes `max_filters`, and the GwId is
/// `[gateway] id`.
fn keep_mqttsn_restart_only(core: &mut CoreConfig, started: &CoreConfig) {
    core.max_packet_size = started.max_packet_size;
    core.max_filters = started.max_filters;
    core.gw_id = started.gw_id;
    keep_reserved_prefix(&mut core.security, &started.security);
}

/// The fleet prefix reserved in the policy is the running fleet view's (`[fleet]` and
/// `[gateway] id` are restart-only): the rest of the policy (ACL, limits) is live.
fn keep_reserved_prefix(policy: &mut Arc<Policy>, started: &Policy) {
    if policy.reserved_topic_prefix != started.reserved_topic_prefix {
        Arc::make_mut(policy)
            .reserved_topic_prefix
            .clone_from(&started.reserved_topic_prefix);
    }
}

/// As [`keep_mqttsn_restart_only`], for CoAP (its driver resizes its buffers for a new
/// `max_message_size`).
fn keep_coap_restart_only(core: &mut CoapCoreConfig, started: &CoapCoreConfig) {
    core.max_filters = started.max_filters;
    keep_reserved_prefix(&mut core.security, &started.security);
}

/// The `[http]` keys fixed at start: the listeners, TLS, the runtime and the router's filter
/// bound.
fn keep_http_restart_only(section: &mut HttpSection, started: &HttpSection) {
    section.listen.clone_from(&started.listen);
    section.tls_listen.clone_from(&started.tls_listen);
    section.tls.clone_from(&started.tls);
    section.http2 = started.http2;
    section.worker_threads = started.worker_threads;
    section.max_filters = started.max_filters;
    keep_reserved_prefix(&mut section.security, &started.security);
}

/// The upstreams are the same ones, in the same order (names and kinds): the spool's cursors,
/// the drains and the route table's indexes refer to them.
fn same_upstream_set(a: &Config, b: &Config) -> bool {
    a.upstreams.len() == b.upstreams.len()
        && a.upstreams.iter().zip(&b.upstreams).all(|(x, y)| {
            x.name == y.name && std::mem::discriminant(&x.kind) == std::mem::discriminant(&y.kind)
        })
}

/// Every changed key that only a restart applies.
fn restart_only(started: &Config, new: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    let mut check = |key: &str, changed: bool| {
        if changed {
            keys.push(key.to_owned());
        }
    };
    let (a, b) = (started, new);
    check("[gateway] id", a.gateway.id != b.gateway.id);
    // Presence payloads, topics and the publishers are set up once, at start.
    // As written: a new `[gateway] id` changes the prefix too, and is reported as that.
    let as_written = |f: &crate::config::FleetSection| crate::config::FleetSection {
        topic_prefix: String::new(),
        ..f.clone()
    };
    check("[fleet]", as_written(&a.fleet) != as_written(&b.fleet));
    check("[gateway] name", a.gateway.name != b.gateway.name);
    check(
        "[gateway] state_dir",
        a.gateway.state_dir != b.gateway.state_dir,
    );

    let (m, n) = (&a.mqttsn, &b.mqttsn);
    check("[mqttsn] listen", m.listen != n.listen);
    check("[mqttsn] dtls_listen", m.dtls_listen != n.dtls_listen);
    check("[mqttsn] recv_buffer", m.recv_buffer != n.recv_buffer);
    check("[mqttsn] send_buffer", m.send_buffer != n.send_buffer);
    check("[mqttsn] recv_batch", m.recv_batch != n.recv_batch);
    check(
        "[mqttsn] session_log_max_size",
        m.session_log_max_size != n.session_log_max_size,
    );
    check("[mqttsn] forwarders", differs(&m.forwarders, &n.forwarders));
    check(
        "[mqttsn] max_packet_size",
        m.core.max_packet_size != n.core.max_packet_size,
    );
    check(
        "[mqttsn] max_filters",
        m.core.max_filters != n.core.max_filters,
    );

    match (&a.coap, &b.coap) {
        (None, None) => {}
        (Some(c), Some(d)) => {
            check("[coap] listen", c.listen != d.listen);
            check("[coap] dtls_listen", c.dtls_listen != d.dtls_listen);
            check("[coap] recv_buffer", c.recv_buffer != d.recv_buffer);
            check("[coap] send_buffer", c.send_buffer != d.send_buffer);
            check("[coap] recv_batch", c.recv_batch != d.recv_batch);
            check(
                "[coap] max_filters",
                c.core.max_filters != d.core.max_filters,
            );
        }
        _ => check("[coap] listen (CoAP switched on or off)", true),
    }

    match (&a.http, &b.http) {
        (None, None) => {}
        (Some(h), Some(i)) => {
            check("[http] listen", h.listen != i.listen);
            check("[http] tls_listen", h.tls_listen != i.tls_listen);
            check(
                "[http] tls_cert, tls_key, client_ca, client_cert",
                h.tls != i.tls,
            );
            check("[http] http2", h.http2 != i.http2);
            check(
                "[http] worker_threads",
                h.worker_threads != i.worker_threads,
            );
            check("[http] max_filters", h.max_filters != i.max_filters);
        }
        _ => check("[http] listen (HTTP switched on or off)", true),
    }

    // The drain rates are live (each upstream's drain takes them); the rest sizes the spool.
    let mut spool = b.spool.clone();
    spool.drain_rate = a.spool.drain_rate;
    spool.drain_bytes_rate = a.spool.drain_bytes_rate;
    check("[spool]", differs(&a.spool, &spool));
    check("[admin]", a.admin != b.admin);
    check("[[serial]]", a.serial != b.serial);

    if !same_upstream_set(a, b) {
        check(
            "[[upstream]] (upstreams added, removed, renamed or reordered)",
            true,
        );
        check(
            "[[route]] (they name upstreams, which changed)",
            differs(&a.route_specs, &b.route_specs),
        );
    }
    keys
}

/// The outcome of the last reload, for `/status` and `STATUS=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// When (wall clock ms).
    pub at_ms: u64,
    /// Reloads requested since the start (this one included).
    pub count: u64,
    /// `false`: the new config had errors and was not applied.
    pub ok: bool,
    /// The live parts that changed.
    pub applied: Vec<String>,
    /// Changed keys that wait for a restart.
    pub restart_required: Vec<String>,
    /// The config's errors (file:line:column: message), when not `ok`; or what a part could
    /// not apply.
    pub errors: Vec<String>,
    /// What the parts said about applying (limits below current use and the like).
    pub notes: Vec<String>,
}

impl Outcome {
    /// One line for `STATUS=` and logs.
    #[must_use]
    pub fn summary(&self) -> String {
        if !self.ok {
            return format!(
                "reload #{} refused: {} error(s) in the config, running config kept",
                self.count,
                self.errors.len()
            );
        }
        let mut s = if self.applied.is_empty() {
            format!("reload #{}: nothing to change", self.count)
        } else {
            format!(
                "reload #{}: applied {}",
                self.count,
                self.applied.join(", ")
            )
        };
        if !self.errors.is_empty() {
            s.push_str(&format!("; {} part(s) failed", self.errors.len()));
        }
        if !self.restart_required.is_empty() {
            s.push_str(&format!(
                "; restart needed for {}",
                self.restart_required.join(", ")
            ));
        }
        s
    }
}

/// The last reload's outcome, shared between the wiring (writer) and the admin (reader).
#[derive(Debug, Default)]
pub struct ReloadCell(Mutex<Option<Outcome>>);

impl ReloadCell {
    /// Records `outcome`.
    pub fn set(&self, outcome: Outcome) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(outcome);
    }

    /// The last outcome; `None` before the first reload.
    pub fn get(&self) -> Option<Outcome> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const BASE: &str = r#"
[gateway]
id = 7
state_dir = "STATE"

[mqttsn]
listen = ["127.0.0.1:0"]

[[upstream]]
name = "main"
kind = "mqtt"
url = "mqtt://127.0.0.1:1883"
"#;

    fn load(text: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sensorgate.toml");
        let text = text.replace("STATE", &dir.path().join("state").display().to_string());
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let mut cfg = Config::load(&path).unwrap();
        // The state dir is the temp dir's: make both configs' equal for the comparisons.
        cfg.gateway.state_dir = "/state".into();
        cfg.spool.spool.dir = "/state/spool".into();
        cfg
    }

    fn plan_of(old: &str, new: &str) -> Plan {
        let (a, b) = (load(old), load(new));
        plan(&a, &a, &b)
    }

    #[test]
    fn the_same_config_changes_nothing() {
        let p = plan_of(BASE, BASE);
        assert!(
            p.log_level.is_none()
                && !p.routes
                && p.mqttsn.is_none()
                && p.coap.is_none()
                && p.http.is_none()
                && p.upstreams.is_empty(),
            "{p:?}"
        );
        assert!(p.restart_required.is_empty(), "{p:?}");
    }

    #[test]
    fn log_level_routes_limits_and_predefined_topics_are_live() {
        let new = format!(
            "{BASE}\n[log]\nlevel = \"debug\"\n\n[[route]]\nfilter = \"a/#\"\nupstreams = [\"main\"]\n\n[[mqttsn.predefined_topic]]\nid = 5\ntopic = \"x/y\"\nclients = [\"*\"]\n"
        )
        .replace(
            "listen = [\"127.0.0.1:0\"]",
            "listen = [\"127.0.0.1:0\"]\nmax_clients = 10",
        );
        let p = plan_of(BASE, &new);
        assert_eq!(p.log_level.as_deref(), Some("debug"));
        assert!(p.routes);
        let core = p.mqttsn.as_ref().unwrap();
        assert_eq!(core.max_clients, 10);
        assert_eq!(core.predefined.len(), 1);
        assert!(p.restart_required.is_empty(), "{:?}", p.restart_required);
        assert!(p.coap.is_none() && p.http.is_none() && p.upstreams.is_empty());
    }

    #[test]
    fn listeners_spool_and_the_upstream_set_need_a_restart() {
        let new = BASE
            .replace("127.0.0.1:0", "127.0.0.1:1")
            .replace("id = 7", "id = 8")
            .replace("name = \"main\"", "name = \"other\"")
            + "\n[spool]\nmax_bytes = \"10MiB\"\n";
        let p = plan_of(BASE, &new);
        assert_eq!(
            p.restart_required,
            [
                "[gateway] id",
                "[mqttsn] listen",
                "[spool]",
                "[[upstream]] (upstreams added, removed, renamed or reordered)"
            ]
            .map(String::from),
        );
        // The GwId is not applied through the core either, nor is anything of the renamed
        // upstream.
        assert!(p.mqttsn.is_none(), "{:?}", p.mqttsn);
        assert!(p.upstreams.is_empty());
    }

    #[test]
    fn fleet_changes_need_a_restart_and_leave_the_upstreams_alone() {
        let new = format!("{BASE}\n[fleet]\nheartbeat = \"5s\"\n");
        let p = plan_of(BASE, &new);
        assert_eq!(p.restart_required, ["[fleet]"].map(String::from));
        assert!(p.upstreams.is_empty(), "{:?}", p.upstreams);
    }

    #[test]
    fn restart_only_fields_inside_live_parts_keep_their_running_value() {
        let new = BASE.replace(
            "listen = [\"127.0.0.1:0\"]",
            "listen = [\"127.0.0.1:0\"]\nmax_packet_size = \"512B\"\nmax_clients = 9",
        );
        let (a, b) = (load(BASE), load(&new));
        let p = plan(&a, &a, &b);
        assert_eq!(p.restart_required, ["[mqttsn] max_packet_size"]);
        let core = p.mqttsn.unwrap();
        assert_eq!(core.max_clients, 9);
        assert_eq!(core.max_packet_size, a.mqttsn.core.max_packet_size);
    }

    #[test]
    fn drain_settings_are_live_the_rest_of_the_spool_is_not() {
        let new = BASE.replace(
            "url = \"mqtt://127.0.0.1:1883\"",
            "url = \"mqtt://127.0.0.1:1883\"\nack_timeout = \"7s\"\nmax_backlog = \"1GiB\"",
        ) + "\n[spool]\ndrain_rate = 100\n";
        let p = plan_of(BASE, &new);
        assert!(p.restart_required.is_empty(), "{:?}", p.restart_required);
        assert!(p.same_upstreams);
        let p = plan_of(BASE, &(new + "segment_bytes = \"4MiB\"\n"));
        assert_eq!(p.restart_required, ["[spool]"]);
    }

    #[test]
    fn upstream_connection_settings_are_live() {
        let new = BASE.replace(
            "url = \"mqtt://127.0.0.1:1883\"",
            "url = \"mqtt://127.0.0.1:1884\"\nusername = \"u\"\npassword = \"p\"",
        );
        let p = plan_of(BASE, &new);
        assert_eq!(p.upstreams, [0]);
        assert!(p.restart_required.is_empty(), "{:?}", p.restart_required);
    }

    #[test]
    fn live_parts_compare_with_the_last_applied_config_restart_keys_with_the_start() {
        let started = load(BASE);
        let applied = load(&format!("{BASE}\n[log]\nlevel = \"debug\"\n"));
        let new = load(
            &format!("{BASE}\n[log]\nlevel = \"debug\"\n").replace("127.0.0.1:0", "127.0.0.1:1"),
        );
        let p = plan(&started, &applied, &new);
        assert!(p.log_level.is_none(), "already applied");
        assert_eq!(p.restart_required, ["[mqttsn] listen"]);
    }

    #[test]
    fn outcome_summaries_say_what_happened() {
        let mut o = Outcome {
            at_ms: 1,
            count: 2,
            ok: true,
            applied: vec!["[[route]]".into()],
            restart_required: vec!["[mqttsn] listen".into()],
            errors: vec![],
            notes: vec![],
        };
        assert_eq!(
            o.summary(),
            "reload #2: applied [[route]]; restart needed for [mqttsn] listen"
        );
        o.ok = false;
        o.errors = vec!["f:1:1: bad".into()];
        assert_eq!(
            o.summary(),
            "reload #2 refused: 1 error(s) in the config, running config kept"
        );
        let cell = ReloadCell::default();
        assert_eq!(cell.get(), None);
        cell.set(o.clone());
        assert_eq!(cell.get(), Some(o));
    }
}
