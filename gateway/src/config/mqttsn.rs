//! `[mqttsn]`: the UDP listeners and the protocol core's settings, predefined topics included.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sensorgate_bridges::mqtt::MAX_SUBSCRIPTIONS;
use serde::Deserialize;

use super::check::{check_topic_name, duration_in, int_in, queue_full_policy, size_in};
use super::coap::same_udp_port;
use super::diag::{KeyPath, Reporter};
use super::{DurationText, SizeText};
use crate::io::udp::{ForwarderEntry, ForwarderList, MAX_FORWARDERS};
use crate::mqttsn::codec::MAX_CLIENT_ID_LEN_DECODE;
use crate::mqttsn::core::{ClientSet, CoreConfig, Peer, PredefinedTopic};

/// `[mqttsn]`.
#[derive(Debug, Clone)]
pub struct MqttSnSection {
    /// UDP listen addresses (plain).
    pub listen: Vec<SocketAddr>,
    /// DTLS listen addresses (`dtls_listen`; the driver binds them after `listen`).
    pub dtls_listen: Vec<SocketAddr>,
    /// `SO_RCVBUF` request for each socket, in bytes.
    pub recv_buffer: usize,
    /// `SO_SNDBUF` request for each socket, in bytes.
    pub send_buffer: usize,
    /// Datagrams read per wake-up before the core's output is flushed.
    pub recv_batch: usize,
    /// Bound on the log of persisted sessions (`<state_dir>/sessions`), in bytes.
    pub session_log_max_size: u64,
    /// The UDP forwarders allowed to send encapsulated (0xFE) messages; empty: nobody.
    pub forwarders: ForwarderList,
    /// The protocol core's settings.
    pub core: CoreConfig,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct RawMqttSn {
    listen: Vec<String>,
    dtls_listen: Vec<String>,
    max_clients: i64,
    max_packet_size: SizeText,
    recv_buffer: SizeText,
    send_buffer: SizeText,
    recv_batch: i64,
    session_log_max_size: SizeText,
    max_client_id_len: i64,
    max_topics_per_client: i64,
    max_inflight_per_client: i64,
    qos_minus_one: bool,
    require_identity: bool,
    max_subscriptions_per_client: i64,
    max_filters: i64,
    max_queued_per_client: i64,
    max_buffered_per_sleeping_client: i64,
    queue_full: String,
    retry_interval: DurationText,
    max_retries: i64,
    session_expiry: DurationText,
    max_retained: i64,
    advertise_interval: DurationText,
    advertise_destinations: Vec<String>,
    searchgw_reply: String,
    forwarders: Vec<String>,
    predefined_topic: Vec<RawPredefined>,
}

impl Default for RawMqttSn {
    fn default() -> Self {
        RawMqttSn {
            listen: vec!["0.0.0.0:1883".into(), "[::]:1883".into()],
            dtls_listen: Vec::new(),
            max_clients: 100_000,
            max_packet_size: "4KiB".into(),
            recv_buffer: "8MiB".into(),
            send_buffer: "4MiB".into(),
            recv_batch: 64,
            session_log_max_size: "256MiB".into(),
            max_client_id_len: 23,
            max_topics_per_client: 64,
            max_inflight_per_client: 16,
            qos_minus_one: true,
            require_identity: false,
            max_subscriptions_per_client: 32,
            max_filters: 65_536,
            max_queued_per_client: 100,
            max_buffered_per_sleeping_client: 1000,
            queue_full: "drop_oldest".into(),
            retry_interval: "10s".into(),
            max_retries: 3,
            session_expiry: "1h".into(),
            max_retained: 10_000,
            advertise_interval: "15m".into(),
            advertise_destinations: Vec::new(),
            searchgw_reply: "searcher".into(),
            forwarders: Vec::new(),
            predefined_topic: Vec::new(),
        }
    }
}

impl RawMqttSn {
    /// The listen addresses that parse (the others are reported by [`compile_mqttsn`]).
    pub(super) fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.listen.iter().filter_map(|a| a.parse().ok()).collect()
    }

    /// The `dtls_listen` addresses that parse.
    pub(super) fn dtls_listen_addrs(&self) -> Vec<SocketAddr> {
        self.dtls_listen
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct RawPredefined {
    /// Required (reported in [`compile_mqttsn`], with the other errors).
    #[serde(default)]
    id: Option<i64>,
    /// Required.
    #[serde(default)]
    topic: Option<String>,
    #[serde(default = "all_clients")]
    clients: Vec<String>,
}

fn all_clients() -> Vec<String> {
    vec!["*".into()]
}

/// `[mqttsn]`; `None` when a key is wrong (reported). `gw_id` is `[gateway] id`, `None` when
/// that is wrong.
pub(super) fn compile_mqttsn(
    m: &RawMqttSn,
    gw_id: Option<u8>,
    r: &mut Reporter<'_>,
) -> Option<MqttSnSection> {
    let sn = KeyPath::root("mqttsn");
    let mut listen = Vec::new();
    if m.listen.is_empty() && m.dtls_listen.is_empty() {
        r.at_path(
            &sn.key("listen"),
            "at least one listen (or dtls_listen) address is required".into(),
            None,
        );
    }
    let mut seen = HashSet::new();
    for (i, addr) in m.listen.iter().enumerate() {
        match addr.parse::<SocketAddr>() {
            Ok(a) if !seen.insert(a) => r.at_path(
                &sn.key("listen").index(i),
                format!("`{addr}` is listed twice"),
                None,
            ),
            Ok(a) => listen.push(a),
            Err(_) => r.at_path(
                &sn.key("listen").index(i),
                format!("`{addr}` is not an IP socket address"),
                Some("write `127.0.0.1:1883` or `[::1]:1883`".into()),
            ),
        }
    }
    let mut dtls_listen = Vec::new();
    for (i, addr) in m.dtls_listen.iter().enumerate() {
        let path = sn.key("dtls_listen").index(i);
        match addr.parse::<SocketAddr>() {
            Ok(a) => match listen
                .iter()
                .chain(&dtls_listen)
                .find(|l| same_udp_port(a, **l))
            {
                Some(other) => r.at_path(
                    &path,
                    format!("`{addr}` takes the UDP port of `{other}`, listed before it"),
                    Some("DTLS and plain MQTT-SN need a port each".into()),
                ),
                None => dtls_listen.push(a),
            },
            Err(_) => r.at_path(
                &path,
                format!("`{addr}` is not an IP socket address"),
                Some("write `127.0.0.1:10000` or `[::1]:10000`".into()),
            ),
        }
    }
    let max_clients = int_in::<usize>(r, &sn.key("max_clients"), m.max_clients, 1, 10_000_000);
    let max_packet_size = size_in(
        r,
        &sn.key("max_packet_size"),
        &m.max_packet_size,
        16,
        65_535,
    );
    let recv_buffer = size_in(r, &sn.key("recv_buffer"), &m.recv_buffer, 4096, 1 << 30);
    let send_buffer = size_in(r, &sn.key("send_buffer"), &m.send_buffer, 4096, 1 << 30);
    let recv_batch = int_in::<usize>(r, &sn.key("recv_batch"), m.recv_batch, 1, 1024);
    let session_log_max_size = size_in(
        r,
        &sn.key("session_log_max_size"),
        &m.session_log_max_size,
        1 << 20,
        64 << 30,
    );
    let max_client_id_len = int_in::<usize>(
        r,
        &sn.key("max_client_id_len"),
        m.max_client_id_len,
        1,
        MAX_CLIENT_ID_LEN_DECODE as i64,
    );
    let max_topics = int_in::<usize>(
        r,
        &sn.key("max_topics_per_client"),
        m.max_topics_per_client,
        1,
        65_000,
    );
    let max_inflight = int_in::<usize>(
        r,
        &sn.key("max_inflight_per_client"),
        m.max_inflight_per_client,
        1,
        1024,
    );

    let max_subs = int_in::<usize>(
        r,
        &sn.key("max_subscriptions_per_client"),
        m.max_subscriptions_per_client,
        1,
        10_000,
    );
    // The upstreams' subscription tables are sized from it (see `compile`).
    let max_filters = int_in::<usize>(
        r,
        &sn.key("max_filters"),
        m.max_filters,
        1,
        MAX_SUBSCRIPTIONS as i64,
    );
    let max_queued = int_in::<usize>(
        r,
        &sn.key("max_queued_per_client"),
        m.max_queued_per_client,
        1,
        1_000_000,
    );
    let max_buffered = int_in::<usize>(
        r,
        &sn.key("max_buffered_per_sleeping_client"),
        m.max_buffered_per_sleeping_client,
        1,
        1_000_000,
    );
    let queue_full = queue_full_policy(r, &sn.key("queue_full"), &m.queue_full);
    let retry_interval = duration_in(
        r,
        &sn.key("retry_interval"),
        &m.retry_interval,
        Duration::from_millis(100),
        Duration::from_secs(3600),
    );
    let max_retries = int_in::<u32>(r, &sn.key("max_retries"), m.max_retries, 0, 100);
    let session_expiry = duration_in(
        r,
        &sn.key("session_expiry"),
        &m.session_expiry,
        Duration::from_secs(1),
        Duration::from_secs(30 * 24 * 3600),
    );
    let max_retained = int_in::<usize>(r, &sn.key("max_retained"), m.max_retained, 0, 10_000_000);
    let advertise_interval = duration_in(
        r,
        &sn.key("advertise_interval"),
        &m.advertise_interval,
        Duration::from_secs(1),
        Duration::from_secs(65_535),
    );
    let mut advertise_to = Vec::new();
    for (i, dest) in m.advertise_destinations.iter().enumerate() {
        let path = sn.key("advertise_destinations").index(i);
        match dest.parse::<SocketAddr>() {
            Ok(addr) => match listen.iter().position(|l| l.is_ipv4() == addr.is_ipv4()) {
                Some(listener) => advertise_to.push(Peer::udp(listener as u16, addr)),
                None => r.at_path(
                    &path,
                    format!("no listener of the address family of `{dest}` to send from"),
                    None,
                ),
            },
            Err(_) => r.at_path(&path, format!("`{dest}` is not an IP socket address"), None),
        }
    }
    let gwinfo_to_destinations = match m.searchgw_reply.as_str() {
        "searcher" => false,
        "destinations" => true,
        other => {
            r.at_path(
                &sn.key("searchgw_reply"),
                format!("unknown value `{other}`"),
                Some("use \"searcher\" or \"destinations\"".into()),
            );
            false
        }
    };
    if gwinfo_to_destinations && advertise_to.is_empty() {
        r.at_path(
            &sn.key("searchgw_reply"),
            "\"destinations\" needs advertise_destinations".into(),
            None,
        );
    }

    let forwarders = compile_forwarders(&m.forwarders, &listen, &sn, r);

    let mut predefined = Vec::new();
    // (id, client or "*") -> index of the first definition, to refuse ambiguous ids.
    let mut defined: BTreeMap<(u16, String), usize> = BTreeMap::new();
    for (i, p) in m.predefined_topic.iter().enumerate() {
        let path = sn.key("predefined_topic").index(i);
        let id = match p.id {
            Some(id) => int_in::<u16>(r, &path.key("id"), id, 1, 65_534),
            None => {
                r.at_path(&path.key("id"), "is required".into(), None);
                None
            }
        };
        let topic = match &p.topic {
            Some(topic) => {
                if let Err(e) = check_topic_name(topic) {
                    r.at_path(&path.key("topic"), e, None);
                }
                topic.clone()
            }
            None => {
                r.at_path(&path.key("topic"), "is required".into(), None);
                String::new()
            }
        };
        if p.clients.is_empty() {
            r.at_path(
                &path.key("clients"),
                "must name at least one ClientId, or `*` for all".into(),
                None,
            );
        }
        let all = p.clients.iter().any(|c| c == "*");
        if all && p.clients.len() > 1 {
            r.at_path(
                &path.key("clients"),
                "`*` already covers every client".into(),
                None,
            );
        }
        let Some(id) = id else { continue };
        for c in &p.clients {
            for key in [(id, c.clone()), (id, "*".to_owned())] {
                if let Some(first) = defined.get(&key)
                    && *first != i
                {
                    r.at_path(
                        &path.key("id"),
                        format!(
                            "predefined topic id {id} is already defined for {} \
                                 (mqttsn.predefined_topic[{first}])",
                            if key.1 == "*" {
                                "all clients".to_owned()
                            } else {
                                format!("client `{c}`")
                            }
                        ),
                        None,
                    );
                }
            }
            if c == "*"
                && let Some((_, first)) = defined.iter().find(|((k, _), _)| *k == id)
                && *first != i
            {
                r.at_path(
                    &path.key("id"),
                    format!(
                        "predefined topic id {id} is already defined for some clients \
                                 (mqttsn.predefined_topic[{first}])"
                    ),
                    None,
                );
            }
            defined.entry((id, c.clone())).or_insert(i);
        }
        predefined.push(PredefinedTopic {
            id,
            topic,
            clients: if all {
                ClientSet::All
            } else {
                ClientSet::Only(p.clients.clone())
            },
        });
    }

    Some(MqttSnSection {
        listen,
        dtls_listen,
        forwarders,
        recv_buffer: recv_buffer?,
        send_buffer: send_buffer?,
        recv_batch: recv_batch?,
        session_log_max_size: session_log_max_size? as u64,
        core: CoreConfig {
            gw_id: gw_id?,
            max_clients: max_clients?,
            max_packet_size: max_packet_size?,
            max_client_id_len: max_client_id_len?,
            max_topics_per_client: max_topics?,
            max_inflight_per_client: max_inflight?,
            qos_minus_one: m.qos_minus_one,
            require_identity: m.require_identity,
            // Set by `config::compile` from `[[acl]]` and `[limits]`.
            security: Arc::default(),
            predefined,
            max_subscriptions_per_client: max_subs?,
            max_filters: max_filters?,
            max_queued_per_client: max_queued?,
            max_buffered_per_sleeping_client: max_buffered?,
            queue_full: queue_full?,
            retry_interval: retry_interval?,
            max_retries: max_retries?,
            session_expiry: session_expiry?,
            max_retained: max_retained?,
            advertise_to,
            advertise_interval: advertise_interval?,
            gwinfo_to_destinations,
        },
    })
}

/// `[mqttsn] forwarders`: each entry parses, is reachable (a listener of its address family)
/// and can match (no earlier entry covers it: the first match wins); at most
/// [`MAX_FORWARDERS`]. Wrong entries are reported and left out.
fn compile_forwarders(
    raw: &[String],
    listen: &[SocketAddr],
    sn: &KeyPath,
    r: &mut Reporter<'_>,
) -> ForwarderList {
    let key = sn.key("forwarders");
    if raw.len() > MAX_FORWARDERS {
        r.at_path(
            &key,
            format!(
                "{} entries, at most {MAX_FORWARDERS} are allowed",
                raw.len()
            ),
            Some("list ranges (CIDR) instead of single addresses".into()),
        );
    }
    let mut entries: Vec<(usize, ForwarderEntry)> = Vec::new();
    for (i, text) in raw.iter().enumerate().take(MAX_FORWARDERS) {
        let path = key.index(i);
        let entry = match text.parse::<ForwarderEntry>() {
            Ok(entry) => entry,
            Err(e) => {
                r.at_path(&path, e.to_string(), Some(e.hint()));
                continue;
            }
        };
        if !listen.iter().any(|l| l.is_ipv4() == entry.is_ipv4()) {
            r.at_path(
                &path,
                format!("no listener of the address family of `{text}` to receive from"),
                None,
            );
            continue;
        }
        if let Some((first, earlier)) = entries.iter().find(|(_, e)| e.covers(&entry)) {
            r.at_path(
                &path,
                format!(
                    "`{text}` never matches: `{earlier}` (mqttsn.forwarders[{first}]) covers it \
                     and the first matching entry wins"
                ),
                Some("remove it, or list it before the wider entry".into()),
            );
            continue;
        }
        entries.push((i, entry));
    }
    ForwarderList::new(entries.into_iter().map(|(_, e)| e).collect())
}
