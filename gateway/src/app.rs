//! Wiring: binds the listeners, starts the upstreams and the ingresses (the MQTT-SN driver and,
//! with `[coap] listen`, the CoAP driver: both the one UDP driver over their own core; with
//! `[http] listen` or `tls_listen`, the HTTP ingress on its own thread and runtime), and stops
//! them in order on shutdown.
//!
//! Shutdown order (each step waits for the one before, under [`SHUTDOWN_GRACE`]): the
//! ingresses stop (all on the same token; the one that fails first stops the others; the HTTP
//! thread drains its connections and answers the verdicts it waits for, then drops its
//! runtime), so no appender is left; the downlink router; the session store; the spool writer (it ends once
//! every appender is gone); the drains and upstreams; the cursors are saved last.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use sensorgate_bridges::amqp::{AmqpConfigError, AmqpUpstream};
use sensorgate_bridges::mqtt::{MqttUpstream, SetupError};
use sensorgate_bridges::route::SharedRoutes;
use sensorgate_bridges::router::{DownlinkStats, RoutedUpstream, Router};
use sensorgate_bridges::spool::{
    DrainConfig, DrainStats, OpenError, SharedSpool, Spool, SpoolStats, StdFs, drain_with_control,
    start_writer, wall_ms,
};
use sensorgate_bridges::telemetry::{Beat, LinkInfo};
use sensorgate_bridges::upstream::{AckReport, Reconfigured, Subscriber, Upstream};

use crate::coap;
use crate::config::{CoapSection, Config, HttpSection, UpstreamKind};
use crate::dtls::{self, Dtls};
use crate::fleet;
use crate::fleet::replay::ReplaySettings;
use crate::fleet::replayer::{self, Replayer};
use crate::http;
use crate::ingress::{DatagramCore, PeerAddr, Reconfigure};
use crate::io::kernel_drops::KernelDrops;
use crate::io::session_store::{self, SessionStore, StoreError, StoreLink, StoreThread};
use crate::io::udp::{self, SocketOptions, UdpDriver, UdpStats};
use crate::live;
use crate::mqttsn::core::{self, Core};
use crate::observe::admin::{self, AdminOptions};
use crate::observe::events::{Events, Level};
use crate::observe::model::QUERY_CHANNEL;
use crate::observe::monitor;
use crate::observe::snapshot::{
    IngressSource, KindCounters, Listener, Phase, PhaseCell, SerialSource, Sources, UpstreamSource,
};
use crate::observe::systemd::{self, Notifier};
use crate::preflight::{ErrorClass, class_of_io};
use crate::reload::ReloadCell;
use crate::serial::line as serial_line;

/// The CoAP ingress's name in logs and errors.
const COAP: &str = <coap::core::Core as DatagramCore>::NAME;

/// The HTTP ingress's name in logs and errors.
const HTTP: &str = "HTTP";

/// The MQTT-SN ingress's name in logs and errors.
const MQTT_SN: &str = <Core as DatagramCore>::NAME;

/// How long stopping tasks may take before they are abandoned.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Bound of the channel carrying the spool's verdicts (batches) to the core.
const REPLY_CHANNEL: usize = 1024;

/// How often the spool's counters are logged (only when they changed).
const STATUS_INTERVAL: Duration = Duration::from_secs(60);

/// Bound of the channel carrying downlink messages from the upstreams to the router, and of
/// each ingress's downlink channel from the router; when full, the router or the upstream
/// connections wait (backpressure toward the brokers).
const DOWNLINK_CHANNEL: usize = 4096;

/// Why the gateway could not run.
///
/// Each message says what failed, names the path or address and, where it helps, what to do;
/// a wrapped error's own text is part of the message only once.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A listener could not be bound.
    #[error("cannot bind {protocol} listener {addr}: {error}{hint}", hint = bind_hint(.error, .key))]
    Bind {
        /// The protocol (`MQTT-SN`, `CoAP`).
        protocol: &'static str,
        /// The config key naming the address (`[mqttsn] listen`), for the hint.
        key: &'static str,
        /// The configured address.
        addr: SocketAddr,
        /// The OS error (not a `source`: the message already says it).
        error: std::io::Error,
    },
    /// The admin listener could not be bound.
    #[error("cannot bind the admin listener {addr}: {error}{hint}", hint = admin_bind_hint(.error))]
    AdminBind {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        error: std::io::Error,
    },
    /// An upstream could not be set up (TLS files and the like).
    #[error("upstream `{name}`: {source}")]
    Upstream {
        /// The upstream's name.
        name: String,
        /// What went wrong.
        source: SetupError,
    },
    /// An AMQP upstream's settings were refused.
    #[error("upstream `{name}`: {source}")]
    AmqpUpstream {
        /// The upstream's name.
        name: String,
        /// What went wrong.
        source: AmqpConfigError,
    },
    /// The spool could not be opened (locked by another process, unreadable).
    #[error(transparent)]
    Spool(#[from] OpenError),
    /// The spool writer thread could not start.
    #[error("cannot start the spool writer: {0}")]
    SpoolWriter(std::io::Error),
    /// An ingress's transport failed (the gateway stopped).
    #[error("{protocol} transport failed: {error}")]
    Transport {
        /// The protocol (`MQTT-SN`, `CoAP`).
        protocol: &'static str,
        /// The socket error.
        error: std::io::Error,
    },
    /// The session store could not be opened or started.
    #[error(transparent)]
    SessionStore(#[from] StoreError),
    /// The HTTPS listener's certificate, key or client CA could not be loaded.
    #[error(transparent)]
    HttpTls(#[from] http::tls::TlsError),
    /// The `[http.jwt]` key file could not be loaded.
    #[error(transparent)]
    HttpJwt(#[from] http::jwt::JwtKeyError),
    /// The HTTP ingress's thread could not start.
    #[error("cannot start the HTTP ingress thread: {0}")]
    HttpThread(std::io::Error),
    /// The DTLS layer could not be set up.
    #[error(transparent)]
    Dtls(#[from] dtls::SetupError),
}

impl RunError {
    /// The class of this failure (the binary's exit status).
    pub fn class(&self) -> ErrorClass {
        match self {
            RunError::Bind { error, .. } | RunError::AdminBind { error, .. } => {
                match class_of_io(error) {
                    ErrorClass::CantCreate | ErrorClass::Other => ErrorClass::Unavailable,
                    class => class,
                }
            }
            RunError::Upstream { .. }
            | RunError::AmqpUpstream { .. }
            | RunError::HttpTls(_)
            | RunError::Dtls(_)
            | RunError::HttpJwt(_) => ErrorClass::Config,
            RunError::Spool(OpenError::Locked { .. }) => ErrorClass::Unavailable,
            RunError::Spool(OpenError::Format { .. }) => ErrorClass::Data,
            RunError::Spool(OpenError::Io { source, .. }) => class_of_io(source),
            RunError::SessionStore(StoreError::Dir { source, .. }) => class_of_io(source),
            RunError::SpoolWriter(_)
            | RunError::Transport { .. }
            | RunError::SessionStore(_)
            | RunError::HttpThread(_) => ErrorClass::Other,
        }
    }
}

/// What to do about a bind error of the address at config key `key`, when it is clear.
fn bind_hint(error: &std::io::Error, key: &str) -> String {
    match error.kind() {
        std::io::ErrorKind::AddrInUse => {
            format!("; another program (another sensorgate?) uses it: stop it or change {key}")
        }
        std::io::ErrorKind::AddrNotAvailable => {
            format!("; no interface of this host has that address: change {key}")
        }
        std::io::ErrorKind::PermissionDenied => {
            "; ports below 1024 need root or CAP_NET_BIND_SERVICE: grant it or use another port"
                .to_owned()
        }
        _ => String::new(),
    }
}

/// What to do about an admin listener's bind error, when it is clear.
fn admin_bind_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::AddrInUse => {
            "; another program (another sensorgate?) uses it: stop it, change [admin] listen, \
             or switch the admin listener off with listen = \"\""
        }
        std::io::ErrorKind::AddrNotAvailable => {
            "; no interface of this host has that address: change [admin] listen"
        }
        std::io::ErrorKind::PermissionDenied => {
            "; ports below 1024 need root or CAP_NET_BIND_SERVICE: use another port"
        }
        _ => "",
    }
}

/// Runs the gateway until `shutdown` is cancelled.
///
/// # Errors
/// [`RunError`] when start-up fails or a listener dies.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    run_with(config, shutdown, Control::default()).await
}

/// What the binary hands the wiring besides the config: the edges it owns (signals, the log
/// subscriber).
#[derive(Default)]
pub struct Control {
    /// Reload requests (SIGHUP): each re-reads the config file (see [`crate::live`]).
    pub reload: Option<mpsc::Receiver<()>>,
    /// Sets the log filter on a reload that changes `[log] level`.
    pub set_log_level: Option<live::SetLogLevel>,
}

/// [`run`] with the binary's [`Control`].
///
/// # Errors
/// [`RunError`] when start-up fails or a listener dies.
pub async fn run_with(
    config: Config,
    shutdown: CancellationToken,
    control: Control,
) -> Result<(), RunError> {
    // The UDP drivers are not `Send` (their `recvmmsg` buffers hold raw pointers): the
    // MQTT-SN driver runs in this future, every further one as a local task of this set (its
    // own waker, so one driver's wake-ups do not poll the other).
    tokio::task::LocalSet::new()
        .run_until(serve(config, shutdown, control))
        .await
}

/// [`run`], inside its [`tokio::task::LocalSet`].
async fn serve(
    config: Config,
    shutdown: CancellationToken,
    control: Control,
) -> Result<(), RunError> {
    // Restart-only keys of a reloaded config compare with this.
    let started_config = Arc::new(config.clone());
    #[allow(clippy::disallowed_methods)] // Uptime counts from here.
    let started = std::time::Instant::now();
    let started_ms = wall_ms();
    let events = Arc::new(Events::new(config.admin.event_history));
    let identity = fleet::Identity::of(&config.gateway, started_ms);
    // Heartbeats and events go through each upstream's handle (untracked publishes).
    let mut fleet_links = Vec::new();
    // Bumped by the heartbeat, event and replay tasks; read by heartbeats and /metrics.
    let fleet_counters = Arc::new(fleet::FleetCounters::default());
    let reload_cell = Arc::new(ReloadCell::default());
    let phase = Arc::new(PhaseCell::default());
    let names: Vec<String> = config.upstreams.iter().map(|u| u.name.clone()).collect();
    let (spool, recovery) = Spool::open(StdFs, config.spool.spool.clone(), &names)?;
    tracing::info!(
        dir = %config.spool.spool.dir.display(),
        segments = recovery.segments,
        records = recovery.records,
        corrupt = recovery.corrupt,
        truncated_bytes = recovery.truncated_bytes,
        next_seq = recovery.next_seq,
        "Spool opened."
    );
    let spool = SharedSpool::new(spool);
    for (index, name) in names.iter().enumerate() {
        let backlog = spool.lock().backlog(index);
        if backlog > 0 {
            tracing::info!(upstream = %name, backlog, "Spooled messages to forward.");
        }
    }
    let (entrance, writer) =
        start_writer(Arc::clone(&spool), config.spool.queue).map_err(RunError::SpoolWriter)?;
    // Each ingress takes its own reply channel and `Router::ingress` (CoAP's in `start_coap`).
    let (reply_tx, reply_rx) = mpsc::channel(REPLY_CHANNEL);
    // Stops every ingress; the one whose transport fails cancels it, so the others stop too.
    // Cancelled when `run` returns for any reason (an ingress started before a later start-up
    // step failed stops with it).
    let ingress_stop = shutdown.child_token();
    let _ingress_guard = ingress_stop.clone().drop_guard();

    let upstream_stop = CancellationToken::new();
    let drain_stop = CancellationToken::new();
    let (downlink_tx, downlink_rx) = mpsc::channel(DOWNLINK_CHANNEL);
    let mut upstreams = Vec::new();
    let mut tasks = Vec::new();
    let mut drains = Vec::new();
    let mut drain_stats = Vec::new();
    let mut upstream_sources = Vec::new();
    let mut amqp_upstreams = Vec::new();
    // By index, for reloads of their settings (the upstream's, its drain's).
    let mut upstream_controls = Vec::new();
    let mut drain_controls = Vec::new();
    // `[[route]]`, or everything to every upstream when there is none.
    let routes = SharedRoutes::new(Arc::clone(&config.routes));
    let wiring = DrainWiring {
        spool: &spool,
        routes: &routes,
        stop: &drain_stop,
    };
    for (index, upstream) in config.upstreams.iter().enumerate() {
        let drain_config = |window: usize| DrainConfig {
            max_backlog: upstream.max_backlog,
            window,
            rate_msgs: config.spool.drain_rate,
            rate_bytes: config.spool.drain_bytes_rate,
            ack_timeout: upstream.ack_timeout,
        };
        let stats = Arc::new(DrainStats::default());
        drain_stats.push((upstream.name.clone(), Arc::clone(&stats)));
        // Birth, Will and death on this upstream (`[fleet]`; restart-only, so a reload keeps
        // these).
        let presence = fleet::presence::build(&config.fleet, &identity, &upstream.name);
        let source = |link: Arc<LinkInfo>, events: KindCounters| UpstreamSource {
            name: upstream.name.clone(),
            kind: match upstream.kind {
                UpstreamKind::Mqtt(_) => "mqtt",
                UpstreamKind::Amqp(_) => "amqp",
            },
            url: without_credentials(&upstream.url),
            index,
            link,
            drain: Arc::clone(&stats),
            events,
        };
        match &upstream.kind {
            UpstreamKind::Mqtt(mqtt) => {
                let window = usize::from(mqtt.max_inflight);
                let (ack_tx, ack_rx) = mpsc::channel(window + 16);
                let mut mqtt = mqtt.clone();
                mqtt.presence = presence.clone();
                let spawned = MqttUpstream::spawn_with_downlink(
                    index,
                    mqtt,
                    ack_tx,
                    Some(downlink_tx.clone()),
                    upstream_stop.clone(),
                );
                let (handle, task) = match spawned {
                    Ok(spawned) => spawned,
                    Err(source) => {
                        upstream_stop.cancel();
                        return Err(RunError::Upstream {
                            name: upstream.name.clone(),
                            source,
                        });
                    }
                };
                upstream_controls.push((UpstreamControl::Mqtt(handle.clone()), presence));
                fleet_links.push(fleet::FleetLink {
                    name: upstream.name.clone(),
                    index,
                    upstream: Arc::new(handle.clone()),
                });
                let counters = handle.clone();
                upstream_sources.push(source(
                    handle.link_info(),
                    Arc::new(move || {
                        let s = counters.stats();
                        vec![
                            ("published", s.published),
                            ("acknowledged", s.acknowledged),
                            ("failed", s.failed),
                            ("dropped_qos0", s.dropped_qos0),
                            ("deferred", s.deferred),
                            ("downlink_received", s.downlink_received),
                            ("downlink_dropped", s.downlink_dropped),
                            ("downlink_acknowledged", s.downlink_acknowledged),
                            ("downlink_acks_stale", s.downlink_acks_stale),
                            ("downlink_echoes_dropped", s.downlink_echoes_dropped),
                            ("echo_records_expired", s.echo_records_expired),
                            ("subscribe_granted", s.subscribe_granted),
                            ("subscribe_refused", s.subscribe_refused),
                        ]
                    }),
                ));
                let (drain_task, routed, control) =
                    wiring.start(index, handle, ack_rx, drain_config(window), stats);
                drain_controls.push(control);
                drains.push(drain_task);
                upstreams.push(routed);
                tasks.push(task);
            }
            // Like an MQTT upstream: the drain sends through it, the router gives it the
            // subscriptions (queue bindings), and its deliveries join the same downlink channel.
            UpstreamKind::Amqp(amqp) => {
                let window = usize::from(amqp.max_inflight);
                let (ack_tx, ack_rx) = mpsc::channel(window + 16);
                let mut amqp = amqp.clone();
                amqp.presence = presence.clone();
                let spawned = AmqpUpstream::spawn_with_downlink(
                    index,
                    amqp,
                    ack_tx,
                    Some(downlink_tx.clone()),
                    upstream_stop.clone(),
                );
                let (handle, task) = match spawned {
                    Ok(spawned) => spawned,
                    Err(source) => {
                        upstream_stop.cancel();
                        return Err(RunError::AmqpUpstream {
                            name: upstream.name.clone(),
                            source,
                        });
                    }
                };
                amqp_upstreams.push(handle.clone());
                upstream_controls.push((UpstreamControl::Amqp(handle.clone()), presence));
                fleet_links.push(fleet::FleetLink {
                    name: upstream.name.clone(),
                    index,
                    upstream: Arc::new(handle.clone()),
                });
                let counters = handle.clone();
                upstream_sources.push(source(
                    handle.link_info(),
                    Arc::new(move || {
                        use std::sync::atomic::Ordering::Relaxed;
                        let s = counters.stats();
                        vec![
                            ("published", s.published.load(Relaxed)),
                            ("acknowledged", s.acknowledged.load(Relaxed)),
                            ("nacked", s.nacked.load(Relaxed)),
                            ("returned", s.returned.load(Relaxed)),
                            ("downlink_received", s.downlink_delivered.load(Relaxed)),
                            ("downlink_acknowledged", s.downlink_acked.load(Relaxed)),
                            ("downlink_dropped", s.downlink_dropped.load(Relaxed)),
                            (
                                "downlink_echoes_dropped",
                                s.downlink_echoes_dropped.load(Relaxed),
                            ),
                        ]
                    }),
                ));
                let (drain_task, routed, control) =
                    wiring.start(index, handle, ack_rx, drain_config(window), stats);
                drain_controls.push(control);
                drains.push(drain_task);
                upstreams.push(routed);
                tasks.push(task);
            }
        }
    }
    drop(downlink_tx);
    // The router takes every upstream's subscriptions and link state; the drivers see none.
    // Its filter bound covers every ingress (`Config::max_filters`).
    let router = Router::new(entrance, upstreams, config.max_filters(), routes.clone());
    // Upstreams start first (their setup errors come before any port is taken); a bind failure
    // stops them again.
    let options = SocketOptions {
        recv_buffer: config.mqttsn.recv_buffer,
        send_buffer: config.mqttsn.send_buffer,
    };
    let mut sockets = Vec::new();
    // The plain listeners first, the DTLS ones after them (the DTLS layer knows them by index).
    let sn_keys = config
        .mqttsn
        .listen
        .iter()
        .map(|a| ("[mqttsn] listen", a))
        .chain(
            config
                .mqttsn
                .dtls_listen
                .iter()
                .map(|a| ("[mqttsn] dtls_listen", a)),
        );
    for (key, &addr) in sn_keys {
        match udp::bind(addr, options, MQTT_SN) {
            Ok(socket) => sockets.push(socket),
            Err(error) => {
                upstream_stop.cancel();
                return Err(RunError::Bind {
                    protocol: MQTT_SN,
                    key,
                    addr,
                    error,
                });
            }
        }
    }
    let sn_first_dtls = first_dtls(&config.mqttsn.listen, &config.mqttsn.dtls_listen);
    // What `/status` lists: the bound addresses (a configured port 0 shows the kernel's pick).
    let mut listeners: Vec<Listener> = sockets
        .iter()
        .zip(
            config
                .mqttsn
                .listen
                .iter()
                .chain(&config.mqttsn.dtls_listen),
        )
        .enumerate()
        .map(|(i, (socket, &configured))| Listener {
            protocol: core::PROTOCOL,
            transport: transport_of(i, sn_first_dtls),
            address: socket.local_addr().unwrap_or(configured),
        })
        .collect();
    let coap = match &config.coap {
        Some(section) => match start_coap(section, &config.dtls.settings, &router, &ingress_stop) {
            Ok(coap) => Some(coap),
            Err(error) => {
                upstream_stop.cancel();
                return Err(error);
            }
        },
        None => None,
    };
    let http = match &config.http {
        Some(section) => match start_http(section, &router, &ingress_stop) {
            Ok(http) => Some(http),
            Err(error) => {
                upstream_stop.cancel();
                return Err(error);
            }
        },
        None => None,
    };
    let admin_listener = match config.admin.listen {
        Some(addr) => match admin::bind(addr).await {
            Ok(listener) => Some(listener),
            Err(error) => {
                upstream_stop.cancel();
                return Err(RunError::AdminBind { addr, error });
            }
        },
        None => None,
    };
    // Counted from here: what the kernel dropped on these sockets before is none of ours.
    let kernel_drops = Arc::new(KernelDrops::new(&sockets));
    let udp_stats = Arc::new(UdpStats::default());
    // Every UDP ingress's counters, summed in the status line.
    let mut udp_counters = vec![UdpCounters {
        stats: Arc::clone(&udp_stats),
        kernel_drops: Arc::clone(&kernel_drops),
    }];
    if let Some(coap) = &coap {
        udp_counters.push(coap.counters.clone());
    }
    let status = tokio::spawn(report_status(
        Arc::clone(&spool),
        drain_stats.clone(),
        amqp_upstreams.clone(),
        router.downlink_stats(),
        udp_counters.clone(),
        http.as_ref().map(|h| Arc::clone(&h.stats)),
        drain_stop.clone(),
    ));

    let mut core = Core::new(config.mqttsn.core.clone());
    let sn_security = core.security_counters();
    let (store, store_thread) = match restore_sessions(&config, &mut core) {
        Ok(store) => store,
        Err(e) => {
            upstream_stop.cancel();
            return Err(e);
        }
    };
    // The upstreams' downlink goes to the router's task, which hands each ingress its share
    // on the ingress's own channel.
    let (ingress_downlink_tx, ingress_downlink_rx) = mpsc::channel(DOWNLINK_CHANNEL);
    let ingress = router.ingress(reply_tx).with_downlink(ingress_downlink_tx);
    let downlink_stop = shutdown.child_token();
    let replayer = start_replay(
        ReplaySettings::of(&config.fleet),
        &router,
        &spool,
        &fleet_counters,
        // One link per upstream, by index: where the replays are sent.
        fleet_links
            .iter()
            .map(|link| Arc::clone(&link.upstream))
            .collect(),
        &routes,
        &downlink_stop,
    );
    let downlink_router = tokio::spawn(
        router
            .downlink_router()
            .run(downlink_rx, downlink_stop.clone()),
    );
    // The writer stops once every appender is gone: only the ingresses' keep it running.
    let router_stats = router.downlink_stats();
    let route_reconfigurer = router.reconfigurer();
    drop(router);
    // The serial lines (one task each) feed the same core; they stop with the ingresses.
    // A line's retransmissions wait for its write queue to drain at the line's rate.
    let serial_stop = ingress_stop.child_token();
    let (serial_links, serial_tasks) =
        serial_line::start(&config.serial, &serial_stop, Some(Arc::clone(&events)));
    for (line, link) in (0u16..).zip(&serial_links.lines) {
        core.set_link_delay(PeerAddr::Serial { line }, link.delay());
    }
    let serial_sources: Vec<_> = serial_links
        .lines
        .iter()
        .map(|l| Arc::clone(l.stats()))
        .collect();
    // DTLS on the `dtls_listen` sockets (a pass-through when there is none).
    #[allow(clippy::disallowed_methods)] // Wiring: the layer's cookie secrets start now.
    let core = match Dtls::new(
        core,
        sn_first_dtls,
        Arc::clone(&config.dtls.settings),
        std::time::Instant::now(),
    ) {
        Ok(core) => core,
        Err(e) => {
            upstream_stop.cancel();
            return Err(e.into());
        }
    };
    let sn_dtls_stats = sn_first_dtls.map(|_| core.stats());
    let sn_max_datagram = core.max_datagram_size();
    let driver = UdpDriver::new(
        core,
        sockets,
        ingress,
        reply_rx,
        ingress_downlink_rx,
        config.mqttsn.recv_batch,
        sn_max_datagram,
    )
    .with_session_store(store)
    .with_stats(Arc::clone(&udp_stats))
    .with_serial(serial_links)
    .with_forwarders(config.mqttsn.forwarders.clone());
    // The admin asks the driver through its own bounded channel; the driver beats each turn.
    let (query_tx, query_rx) = mpsc::channel(QUERY_CHANNEL);
    let sn_beat = Arc::new(Beat::new());
    let (sn_reconfigure, sn_reconfigure_rx) = mpsc::channel(1);
    let driver = driver
        .with_queries(query_rx)
        .with_beat(Arc::clone(&sn_beat))
        .with_reconfigure(sn_reconfigure_rx);
    let mut ingresses = vec![IngressSource {
        protocol: core::PROTOCOL,
        queries: query_tx,
        beat: sn_beat,
        udp: Some(Arc::clone(&udp_stats)),
        kernel_drops: Some(Arc::clone(&kernel_drops)),
        extra: Some(datagram_extra(sn_security, sn_dtls_stats)),
    }];
    let mut coap_reconfigure = None;
    let coap_task = coap.map(|coap| {
        listeners.extend(coap.listeners);
        ingresses.push(coap.source);
        coap_reconfigure = Some(coap.reconfigure);
        coap.task
    });
    let http = http.map(|mut http| {
        listeners.append(&mut http.listeners);
        ingresses.push(http.source.clone());
        http
    });
    if let Some(l) = &admin_listener
        && let Ok(address) = l.local_addr()
    {
        listeners.push(Listener {
            protocol: "admin",
            transport: "tcp",
            address,
        });
    }
    let sources = Sources {
        gateway_id: config.gateway.id,
        gateway_name: config.gateway.name.clone(),
        config_file: config.file.display().to_string(),
        started_ms,
        started,
        listeners,
        ingresses,
        serial: config
            .serial
            .iter()
            .zip(&serial_sources)
            .map(|(line, stats)| SerialSource {
                device: line.device.clone(),
                forwarder: line.forwarder,
                stats: Arc::clone(stats),
            })
            .collect(),
        upstreams: upstream_sources,
        spool: Arc::clone(&spool),
        router: Arc::clone(&router_stats),
        events: Arc::clone(&events),
        phase: Arc::clone(&phase),
        last_disk_error_ms: Arc::default(),
        reload: Arc::clone(&reload_cell),
        fleet: Arc::clone(&fleet_counters),
        fleet_settings: config
            .fleet
            .enabled
            .then(|| crate::observe::fleet::FleetSettings {
                topic_prefix: config.fleet.topic_prefix.clone(),
                heartbeat_secs: config.fleet.heartbeat.map_or(0, |h| h.as_secs()),
                replay: config.fleet.replay.enabled,
            }),
    };
    // The admin and the monitor outlive the driver: `/readyz` says "stopping" meanwhile.
    let admin_stop = CancellationToken::new();
    let monitor = tokio::spawn(monitor::run(sources.clone(), admin_stop.clone()));
    // Heartbeats and events upstream (`[fleet]`), stopped with the admin.
    let fleet_tasks = fleet::start(&config.fleet, &identity, &sources, fleet_links, &admin_stop);
    // systemd (NOTIFY_SOCKET): STATUS= lines and watchdog pings beside the monitor, from the
    // same snapshot as /healthz; stopped with the admin (pings go on while stopping).
    let notifier = Notifier::from_env();
    let supervisor = notifier.clone().map(|notifier| {
        tokio::spawn(systemd::supervise(
            sources.clone(),
            notifier,
            systemd::watchdog_interval(),
            admin_stop.clone(),
        ))
    });
    let admin_task = admin_listener.map(|listener| {
        tokio::spawn(admin::serve(
            listener,
            sources,
            AdminOptions {
                token: config.admin.token.clone(),
                max_connections: config.admin.max_connections,
            },
            admin_stop.clone(),
        ))
    });
    // Reloads (SIGHUP): each live part registers here.
    let mut live_parts: Vec<live::Part> = Vec::new();
    if let Some(set) = control.set_log_level {
        live_parts.push(live::log_part(set));
    }
    live_parts.push(live::routes_part(route_reconfigurer));
    live_parts.push(live::core_part("[mqttsn]", sn_reconfigure, |plan| {
        dtls_settings(plan.mqttsn.clone(), plan)
    }));
    for (index, (control, presence)) in upstream_controls.into_iter().enumerate() {
        live_parts.push(upstream_part(index, control, presence));
    }
    for (index, control) in drain_controls.into_iter().enumerate() {
        live_parts.push(drain_part(index, control));
    }
    if let Some(reloader) = http.as_ref().map(|h| h.reloader.clone()) {
        live_parts.push(live::http_part(reloader));
    }
    if let Some(requests) = coap_reconfigure {
        live_parts.push(live::core_part("[coap]", requests, |plan| {
            dtls_settings(plan.coap.clone(), plan)
        }));
    }
    let reload_task = control.reload.map(|requests| {
        let reloader = live::Reloader {
            file: config.file.clone(),
            started: Arc::clone(&started_config),
            parts: live_parts,
            cell: Arc::clone(&reload_cell),
            events: Arc::clone(&events),
            // systemd: RELOADING=1 first, READY=1 with the outcome after (the supervisor's
            // next STATUS= line says it too).
            on_start: notifier
                .clone()
                .map(|n| -> Box<dyn FnMut()> { Box::new(move || n.reloading()) }),
            on_outcome: notifier.clone().map(|n| -> live::OnOutcome {
                Box::new(move |outcome: &crate::reload::Outcome| n.ready(&outcome.summary()))
            }),
        };
        tokio::task::spawn_local(reloader.run(requests, ingress_stop.clone()))
    });
    phase.set(Phase::Serving);
    events.push(
        wall_ms(),
        "started",
        Level::Info,
        format!(
            "sensorgate {} started ({} spooled records recovered).",
            env!("CARGO_PKG_VERSION"),
            recovery.records
        ),
    );
    tracing::info!(
        listeners = config.mqttsn.listen.len(),
        serial_lines = config.serial.len(),
        coap_listeners = config.coap.as_ref().map_or(0, |c| c.listen.len()),
        http_listeners = config
            .http
            .as_ref()
            .map_or(0, |h| h.listen.len() + h.tls_listen.len()),
        admin = ?config.admin.listen,
        "sensorgate ready."
    );
    // Config validated, spool recovered, sessions restored, every listener bound.
    if let Some(notifier) = &notifier {
        notifier.ready("serving");
    }
    let result = driver
        .run(ingress_stop.clone())
        .await
        .map_err(|error| RunError::Transport {
            protocol: MQTT_SN,
            error,
        });
    phase.set(Phase::Stopping);
    if let Some(notifier) = &notifier {
        notifier.stopping();
    }
    events.push(wall_ms(), "stopping", Level::Info, "Stopping.".into());
    // No reload from here on (a part's channel may be gone).
    ingress_stop.cancel();
    if let Some(mut task) = reload_task {
        // A part still applying (an upstream reconnecting) is abandoned after the grace.
        if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
            .await
            .is_err()
        {
            task.abort();
            tracing::warn!("A reload did not finish within the grace period; abandoned.");
        }
    }
    // The other ingresses stop too (also when this one failed) and drop their appenders
    // before the writer is joined below; the first failure is the run's.
    ingress_stop.cancel();
    let result = match coap_task {
        Some(task) => result.and(stop_coap(task).await),
        None => result,
    };
    let http_stats = http.as_ref().map(|h| Arc::clone(&h.stats));
    let result = match http {
        Some(http) => result.and(stop_http(http).await),
        None => result,
    };
    // The serial lines stopped with the ingresses' token (their tasks hold no appender).
    serial_stop.cancel();
    if tokio::time::timeout(SHUTDOWN_GRACE, serial_tasks.join())
        .await
        .is_err()
    {
        tracing::warn!("Serial lines did not stop within the grace period.");
    }
    // Also when the driver failed; what it still held is not acknowledged to the brokers.
    downlink_stop.cancel();
    let _ = downlink_router.await;
    if let Some(replayer) = replayer {
        let _ = replayer.await;
    }

    // The driver handed its last changes over and dropped its end: the store commits what is
    // queued (releasing the acknowledgements that waited) before the upstreams stop.
    if tokio::time::timeout(SHUTDOWN_GRACE, store_thread.finished())
        .await
        .is_err()
    {
        tracing::warn!("Session store did not finish within the grace period.");
    }

    // The drivers have stopped and dropped their appenders: the writer writes, syncs and ends.
    // Then the drains stop sending and the upstreams settle what is in flight; the cursors
    // are saved last, so a restart resends as little as possible.
    let writer_done = tokio::task::spawn_blocking(move || writer.join());
    if tokio::time::timeout(SHUTDOWN_GRACE, writer_done)
        .await
        .is_err()
    {
        tracing::warn!("Spool writer did not stop within the grace period.");
    }
    drain_stop.cancel();
    upstream_stop.cancel();
    let stop_all = async {
        for task in drains {
            let _ = task.await;
        }
        for task in tasks {
            let _ = task.await;
        }
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, stop_all)
        .await
        .is_err()
    {
        tracing::warn!("Upstreams did not stop within the grace period.");
    }
    if let Err(error) = spool.lock().save_cursors() {
        tracing::warn!(%error, "Cannot save the spool cursors.");
    }
    let _ = status.await;
    admin_stop.cancel();
    let _ = monitor.await;
    for task in fleet_tasks {
        let _ = task.await;
    }
    if let Some(task) = supervisor {
        let _ = task.await;
    }
    if let Some(task) = admin_task
        && tokio::time::timeout(SHUTDOWN_GRACE, task).await.is_err()
    {
        tracing::warn!("Admin listener did not stop within the grace period.");
    }
    log_status(
        &Status::take(
            &spool,
            &drain_stats,
            &amqp_upstreams,
            &router_stats,
            &udp_counters,
            http_stats.as_deref(),
        ),
        None,
    );
    result
}

/// Upstream `index`'s drain part: `ack_timeout`, `max_backlog`, `max_backlog_age` and the
/// `[spool]` drain rates, from the next message on (the window is the upstream's
/// `max_inflight`, fixed at start).
fn drain_part(index: usize, control: watch::Sender<DrainConfig>) -> live::Part {
    Box::new(move |plan, new| {
        if !plan.same_upstreams {
            return None;
        }
        let upstream = new.upstreams.get(index)?;
        let now = *control.borrow();
        let next = DrainConfig {
            window: now.window,
            rate_msgs: new.spool.drain_rate,
            rate_bytes: new.spool.drain_bytes_rate,
            ack_timeout: upstream.ack_timeout,
            max_backlog: upstream.max_backlog,
        };
        if format!("{next:?}") == format!("{now:?}") {
            return None;
        }
        let name = format!("[[upstream]] {}: drain", upstream.name);
        let result = match control.send(next) {
            Ok(()) => live::PartResult::default(),
            Err(_) => live::PartResult {
                notes: Vec::new(),
                error: Some(format!("{name}: the drain is gone (stopping)")),
            },
        };
        let work: live::PartFuture = Box::pin(std::future::ready(result));
        Some((name, work))
    })
}

/// A running upstream, by kind, for reloads of its settings.
enum UpstreamControl {
    Mqtt(MqttUpstream),
    Amqp(AmqpUpstream),
}

/// Upstream `index`'s reload part: its new connection settings, when the plan lists it,
/// with the presence it started with (`[fleet]` is restart-only).
fn upstream_part(
    index: usize,
    control: UpstreamControl,
    presence: Option<sensorgate_bridges::upstream::Presence>,
) -> live::Part {
    Box::new(move |plan, new| {
        if !plan.upstreams.contains(&index) {
            return None;
        }
        let upstream = new.upstreams.get(index)?;
        let name = format!("[[upstream]] {}", upstream.name);
        let result = match (&control, &upstream.kind) {
            (UpstreamControl::Mqtt(u), UpstreamKind::Mqtt(c)) => {
                let mut c = c.clone();
                c.presence.clone_from(&presence);
                u.reconfigure(c).map_err(|e| e.to_string())
            }
            (UpstreamControl::Amqp(u), UpstreamKind::Amqp(c)) => {
                let mut c = c.clone();
                c.presence.clone_from(&presence);
                u.reconfigure(c).map_err(|e| e.to_string())
            }
            // The plan lists only upstreams of the same kind (a kind change is restart-only).
            _ => Err("its kind changed (restart to change it)".to_owned()),
        };
        let result = match result {
            Ok(Reconfigured::Reconnecting) => live::PartResult {
                notes: vec![format!("{name}: reconnecting with the new settings")],
                error: None,
            },
            Ok(Reconfigured::Applied | Reconfigured::Unchanged) => live::PartResult::default(),
            Err(e) => live::PartResult {
                notes: Vec::new(),
                error: Some(format!("{name}: {e}")),
            },
        };
        let work: live::PartFuture = Box::pin(std::future::ready(result));
        Some((name, work))
    })
}

/// A started CoAP ingress: its driver's task and what the admin and the status line read.
struct CoapRunning {
    /// The driver; ends when the ingresses' stop token is cancelled, or on a socket error
    /// (after cancelling that token itself).
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// For the admin listener (protocol [`coap::core::PROTOCOL`]).
    source: IngressSource,
    /// One per bound socket.
    listeners: Vec<Listener>,
    /// For the status line.
    counters: UdpCounters,
    /// Reloads of `[coap]`'s live settings.
    reconfigure: mpsc::Sender<Reconfigure<dtls::Settings<coap::core::CoreConfig>>>,
}

/// The index of the first DTLS listener when the plain ones (`plain`) are bound first and
/// `dtls` after them; `None` when there is no DTLS listener.
fn first_dtls(plain: &[SocketAddr], dtls: &[SocketAddr]) -> Option<u16> {
    (!dtls.is_empty()).then(|| u16::try_from(plain.len()).unwrap_or(u16::MAX))
}

/// `/status`'s transport of listener `index`.
fn transport_of(index: usize, first_dtls: Option<u16>) -> &'static str {
    match first_dtls {
        Some(first) if index >= usize::from(first) => "dtls",
        _ => "udp",
    }
}

/// A datagram ingress's extra counters: its security refusals, and its DTLS layer's when it has one.
fn datagram_extra(
    security: Arc<crate::security::Counters>,
    dtls: Option<Arc<dtls::DtlsStats>>,
) -> KindCounters {
    Arc::new(move || {
        let mut events = security.events();
        if let Some(dtls) = &dtls {
            events.extend(dtls.events());
        }
        events
    })
}

/// A datagram core's reload: its own settings and the DTLS settings, each when changed.
fn dtls_settings<S>(inner: Option<S>, plan: &crate::reload::Plan) -> Option<dtls::Settings<S>> {
    (inner.is_some() || plan.dtls.is_some()).then(|| dtls::Settings {
        inner,
        dtls: plan.dtls.clone(),
    })
}

/// Registers the CoAP ingress: binds every `[coap] listen` address (a failure is a
/// [`RunError::Bind`] naming CoAP; nothing is left running), registers it with the router
/// (its own verdict and downlink channels) and spawns its UDP driver, stopped by `stop`. A
/// transport failure cancels `stop`, so the other ingresses stop and the run ends. Must be
/// called inside [`run`]'s `LocalSet`.
fn start_coap(
    section: &CoapSection,
    dtls_settings: &Arc<dtls::DtlsSettings>,
    router: &Router,
    stop: &CancellationToken,
) -> Result<CoapRunning, RunError> {
    let options = SocketOptions {
        recv_buffer: section.recv_buffer,
        send_buffer: section.send_buffer,
    };
    let mut sockets = Vec::new();
    let keys = section.listen.iter().map(|a| ("[coap] listen", a)).chain(
        section
            .dtls_listen
            .iter()
            .map(|a| ("[coap] dtls_listen", a)),
    );
    for (key, &addr) in keys {
        match udp::bind(addr, options, COAP) {
            Ok(socket) => sockets.push(socket),
            Err(error) => {
                return Err(RunError::Bind {
                    protocol: COAP,
                    key,
                    addr,
                    error,
                });
            }
        }
    }
    let first = first_dtls(&section.listen, &section.dtls_listen);
    let listeners = sockets
        .iter()
        .zip(section.listen.iter().chain(&section.dtls_listen))
        .enumerate()
        .map(|(i, (socket, &configured))| Listener {
            protocol: coap::core::PROTOCOL,
            transport: transport_of(i, first),
            address: socket.local_addr().unwrap_or(configured),
        })
        .collect();
    // Counted from here: what the kernel dropped on these sockets before is none of ours.
    let counters = UdpCounters {
        stats: Arc::new(UdpStats::default()),
        kernel_drops: Arc::new(KernelDrops::new(&sockets)),
    };
    let (reply_tx, reply_rx) = mpsc::channel(REPLY_CHANNEL);
    let (downlink_tx, downlink_rx) = mpsc::channel(DOWNLINK_CHANNEL);
    let ingress = router.ingress(reply_tx).with_downlink(downlink_tx);
    let (query_tx, query_rx) = mpsc::channel(QUERY_CHANNEL);
    let beat = Arc::new(Beat::new());
    let (reconfigure, reconfigure_rx) = mpsc::channel(1);
    let coap_core = coap::core::Core::new(section.core.clone(), core_seed());
    let coap_security = coap_core.security_counters();
    #[allow(clippy::disallowed_methods)] // Wiring: the layer's cookie secrets start now.
    let core = Dtls::new(
        coap_core,
        first,
        Arc::clone(dtls_settings),
        std::time::Instant::now(),
    )?;
    let dtls_stats = first.map(|_| core.stats());
    let max_datagram = core.max_datagram_size();
    let driver = UdpDriver::new(
        core,
        sockets,
        ingress,
        reply_rx,
        downlink_rx,
        section.recv_batch,
        max_datagram,
    )
    .with_stats(Arc::clone(&counters.stats))
    .with_queries(query_rx)
    .with_beat(Arc::clone(&beat))
    .with_reconfigure(reconfigure_rx);
    let stop = stop.clone();
    let task = tokio::task::spawn_local(async move {
        let result = driver.run(stop.clone()).await;
        if let Err(error) = &result {
            tracing::error!(%error, "CoAP transport failed; stopping.");
            stop.cancel();
        }
        result
    });
    Ok(CoapRunning {
        task,
        source: IngressSource {
            protocol: coap::core::PROTOCOL,
            queries: query_tx,
            beat,
            udp: Some(Arc::clone(&counters.stats)),
            kernel_drops: Some(Arc::clone(&counters.kernel_drops)),
            extra: Some(datagram_extra(coap_security, dtls_stats)),
        },
        listeners,
        counters,
        reconfigure,
    })
}

/// Waits for the CoAP driver (its stop token is cancelled) under [`SHUTDOWN_GRACE`]; one that
/// does not end in time is aborted, which drops its appender all the same.
async fn stop_coap(mut task: tokio::task::JoinHandle<std::io::Result<()>>) -> Result<(), RunError> {
    match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(error))) => Err(RunError::Transport {
            protocol: COAP,
            error,
        }),
        Ok(Err(join)) => {
            tracing::warn!(error = %join, "CoAP driver task ended abnormally.");
            Ok(())
        }
        Err(_) => {
            tracing::warn!("CoAP driver did not stop within the grace period; aborted.");
            task.abort();
            Ok(())
        }
    }
}

/// A started HTTP ingress: its thread and what the admin reads.
struct HttpRunning {
    /// The thread's result, sent once its runtime is dropped (every handler, and with them
    /// every appender of the HTTP ingress, gone).
    done: tokio::sync::oneshot::Receiver<std::io::Result<()>>,
    /// The `sensorgate-http` thread.
    thread: std::thread::JoinHandle<()>,
    /// For the admin listener (protocol [`http::PROTOCOL`]).
    source: IngressSource,
    /// One per bound listener (`tcp` or `tls`).
    listeners: Vec<Listener>,
    /// Its counters, for the status line.
    stats: Arc<http::stats::HttpStats>,
    /// Applies a reloaded `[http]` section to the running ingress (issue 18, SIGHUP).
    reloader: http::Reloader,
}

/// Registers the HTTP ingress: loads the TLS files, binds every `[http] listen` and
/// `tls_listen` address (a failure names the key; nothing is left running), registers it with
/// the router (its own verdict and downlink channels) and starts the `sensorgate-http` thread
/// with its own runtime, so HTTP parsing, TLS handshakes and JSON batches never run on the
/// thread that drives the UDP protocols. A failure of the thread cancels `stop`.
fn start_http(
    section: &HttpSection,
    router: &Router,
    stop: &CancellationToken,
) -> Result<HttpRunning, RunError> {
    let tls = match &section.tls {
        Some(files) => Some(http::tls::server_config(files, section.http2)?),
        None => None,
    };
    let bound = http::server::bind(section).map_err(|(key, addr, error)| RunError::Bind {
        protocol: HTTP,
        key,
        addr,
        error,
    })?;
    let listeners = bound
        .plain
        .iter()
        .map(|l| (l, "tcp"))
        .chain(bound.tls.iter().map(|l| (l, "tls")))
        .filter_map(|(l, transport)| {
            Some(Listener {
                protocol: http::PROTOCOL,
                transport,
                address: l.local_addr().ok()?,
            })
        })
        .collect();
    if let Some(warning) = section.plaintext_token_warning() {
        tracing::warn!("{warning}");
    }
    let (reply_tx, reply_rx) = mpsc::channel(REPLY_CHANNEL);
    let (downlink_tx, downlink_rx) = mpsc::channel(DOWNLINK_CHANNEL);
    let handle = router.ingress(reply_tx).with_downlink(downlink_tx);
    let (query_tx, query_rx) = mpsc::channel(QUERY_CHANNEL);
    let beat = Arc::new(Beat::new());
    let stats = Arc::new(http::stats::HttpStats::default());
    let wiring = http::Wiring {
        handle,
        replies: reply_rx,
        downlink: downlink_rx,
        queries: query_rx,
        beat: Arc::clone(&beat),
    };
    let reloader = http::Reloader::new(section)?;
    let thread_reloader = reloader.clone();
    let workers = section.worker_threads;
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let thread_stop = stop.clone();
    let thread_stats = Arc::clone(&stats);
    let thread = std::thread::Builder::new()
        .name("sensorgate-http".into())
        .spawn(move || {
            let runtime = if workers <= 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(workers)
                    .thread_name("sensorgate-http")
                    .enable_all()
                    .build()
            };
            let result = runtime.and_then(|runtime| {
                let result = runtime.block_on(http::run(
                    thread_reloader,
                    bound,
                    tls,
                    wiring,
                    thread_stats,
                    thread_stop.clone(),
                ));
                // Dropping the runtime drops what is left (handlers past the grace period),
                // and with them the ingress's appenders: only then is `done` sent.
                drop(runtime);
                result
            });
            if let Err(error) = &result {
                tracing::error!(%error, "HTTP ingress failed; stopping.");
                thread_stop.cancel();
            }
            let _ = done_tx.send(result);
        })
        .map_err(RunError::HttpThread)?;
    let counters = Arc::clone(&stats);
    Ok(HttpRunning {
        done,
        thread,
        source: IngressSource {
            protocol: http::PROTOCOL,
            queries: query_tx,
            beat,
            udp: None,
            kernel_drops: None,
            extra: Some(Arc::new(move || counters.events())),
        },
        listeners,
        stats,
        reloader,
    })
}

/// Waits for the HTTP thread (its stop token is cancelled) under [`SHUTDOWN_GRACE`]; it
/// drains itself within a shorter grace, so a thread that does not end in time is stuck and
/// left behind (its appender then keeps the writer alive until the writer's own grace).
async fn stop_http(running: HttpRunning) -> Result<(), RunError> {
    match tokio::time::timeout(SHUTDOWN_GRACE, running.done).await {
        Ok(Ok(result)) => {
            let _ = tokio::task::spawn_blocking(move || running.thread.join()).await;
            result.map_err(|error| RunError::Transport {
                protocol: HTTP,
                error,
            })
        }
        Ok(Err(_)) => {
            tracing::warn!("HTTP ingress thread ended abnormally.");
            Ok(())
        }
        Err(_) => {
            tracing::warn!("HTTP ingress did not stop within the grace period.");
            Ok(())
        }
    }
}

/// The seed of a core's random choices (Message IDs, tokens, retransmission jitter): from
/// the OS, so that they are hard to guess (RFC 7252 section 5.3.1); from the clock and the
/// process id if the OS has none to give.
fn core_seed() -> u64 {
    use rand::TryRngCore;
    match rand::rngs::OsRng.try_next_u64() {
        Ok(seed) => seed,
        Err(_) => {
            #[allow(clippy::disallowed_methods)] // The adapter may read the clock; cores do not.
            let now = std::time::SystemTime::now();
            let nanos = now
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            nanos ^ (u64::from(std::process::id()) << 32)
        }
    }
}

/// One UDP ingress's counters, for the status line.
#[derive(Clone)]
struct UdpCounters {
    /// The driver's.
    stats: Arc<UdpStats>,
    /// The kernel's drops on its sockets.
    kernel_drops: Arc<KernelDrops>,
}

/// `url` without a `user:password@` part (the status document is not for secrets).
fn without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest.get(..authority_end).and_then(|a| a.rfind('@')) {
        Some(at) => format!("{scheme}://{}", rest.get(at + 1..).unwrap_or("")),
        None => url.to_owned(),
    }
}

/// Starts the fleet view's replay on request when `settings` enable it: each upstream's
/// request topic goes to the router as its control topic, the requests to the replay task
/// (stopped by `stop`, with the downlink). `settings` are the `[fleet.replay]` keys.
fn start_replay(
    settings: ReplaySettings,
    router: &Router,
    spool: &Arc<SharedSpool<StdFs>>,
    counters: &Arc<fleet::FleetCounters>,
    upstreams: Vec<Arc<dyn Upstream>>,
    routes: &SharedRoutes,
    stop: &CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    if !settings.enabled {
        return None;
    }
    let (control_tx, control_rx) = mpsc::channel(replayer::CONTROL_CHANNEL);
    let topics = vec![Some(settings.request_topic()); upstreams.len()];
    #[allow(clippy::disallowed_methods)] // Only rate-limits the router's warning.
    let now = std::time::Instant::now();
    if let Err(refused) = router.control(now, topics, control_tx) {
        for (index, reason) in refused {
            let name = upstreams.get(index).map_or("?", |u| u.name());
            tracing::warn!(
                upstream = %name,
                topic = %settings.request_topic(),
                reason = reason.error_code(),
                "Replay request topic not subscribed; replay requests on this upstream are not served."
            );
        }
    }
    let replayer = Replayer::new(
        settings,
        Arc::clone(spool),
        upstreams,
        routes.clone(),
        Arc::clone(counters),
    );
    Some(tokio::spawn(replayer.run(control_rx, stop.clone())))
}

/// What every upstream's drain shares, whatever the upstream's kind.
struct DrainWiring<'a> {
    spool: &'a Arc<SharedSpool<StdFs>>,
    routes: &'a SharedRoutes,
    stop: &'a CancellationToken,
}

impl DrainWiring<'_> {
    /// Starts the drain of a spawned upstream (any kind) and returns it with the upstream as
    /// the router takes it (subscriptions, link state): the one step every kind shares.
    fn start<U: Upstream + Subscriber + Clone>(
        &self,
        index: usize,
        handle: U,
        acks: mpsc::Receiver<AckReport>,
        config: DrainConfig,
        stats: Arc<DrainStats>,
    ) -> (
        tokio::task::JoinHandle<()>,
        RoutedUpstream,
        watch::Sender<DrainConfig>,
    ) {
        // A reload sends new settings here (`drain_part`).
        let (control, settings) = watch::channel(config);
        let task = tokio::spawn(drain_with_control(
            Arc::clone(self.spool),
            index,
            handle.clone(),
            acks,
            settings,
            self.routes.clone(),
            stats,
            self.stop.clone(),
        ));
        let routed = RoutedUpstream {
            link: handle.watch_link(),
            subscriber: Box::new(handle),
        };
        (task, routed, control)
    }
}

/// A snapshot of the spool's and the drains' counters.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Status {
    spool: SpoolStats,
    /// Appends refused for a full writer queue (each retry of a held publish counts again).
    queue_full: u64,
    /// Publishes without a token the UDP drivers (every ingress) gave up for a full writer
    /// queue.
    queue_dropped: u64,
    /// Datagrams the kernel dropped on every ingress's sockets since bind (receive buffer
    /// full); per protocol in `/metrics`.
    kernel_drops: u64,
    upstreams: Vec<UpstreamStatus>,
    amqp: Vec<AmqpStatus>,
    router: RouterStatus,
    /// The HTTP ingress's counters that say something went wrong for a client, when it runs.
    http: Option<HttpStatus>,
}

/// The HTTP ingress's counters in the status line (see [`http::stats::HttpStats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HttpStatus {
    /// QoS 1 messages made durable after their client had gone (it may resend: duplicates).
    verdicts_orphaned: u64,
    /// Requests answered 429.
    rate_limited: u64,
}

/// The router's counters (see [`DownlinkStats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RouterStatus {
    refused_no_route: u64,
    downlink_received: u64,
    downlink_unrouted: u64,
    downlink_unmatched: u64,
    downlink_ingress_gone: u64,
    local_dropped: u64,
}

/// One AMQP upstream's counters (see [`AmqpStats`](sensorgate_bridges::amqp::AmqpStats)).
#[derive(Debug, Clone, PartialEq, Eq)]
struct AmqpStatus {
    name: String,
    published: u64,
    confirmed: u64,
    nacked: u64,
    returned: u64,
    downlink_delivered: u64,
    downlink_acked: u64,
    downlink_dropped: u64,
    downlink_echoes_dropped: u64,
}

/// One upstream's drain counters (see [`DrainStats`]) and its backlog (at most).
#[derive(Debug, Clone, PartialEq, Eq)]
struct UpstreamStatus {
    name: String,
    backlog: u64,
    forwarded: u64,
    rejected: u64,
    ack_timeouts: u64,
    resent: u64,
    unrouted: u64,
    backlog_dropped: u64,
}

impl Status {
    fn take(
        spool: &SharedSpool<StdFs>,
        drains: &[(String, Arc<DrainStats>)],
        amqp: &[AmqpUpstream],
        router: &DownlinkStats,
        udp: &[UdpCounters],
        http: Option<&http::stats::HttpStats>,
    ) -> Status {
        use std::sync::atomic::Ordering::Relaxed;
        let locked = spool.lock();
        let upstreams = drains
            .iter()
            .enumerate()
            .map(|(i, (name, d))| UpstreamStatus {
                name: name.clone(),
                backlog: locked.backlog(i),
                forwarded: d.forwarded.load(Relaxed),
                rejected: d.rejected.load(Relaxed),
                ack_timeouts: d.ack_timeouts.load(Relaxed),
                resent: d.resent.load(Relaxed),
                unrouted: d.unrouted.load(Relaxed),
                backlog_dropped: d.backlog_dropped.load(Relaxed),
            })
            .collect();
        let amqp = amqp
            .iter()
            .map(|up| {
                let a = up.stats();
                AmqpStatus {
                    name: up.name().to_owned(),
                    published: a.published.load(Relaxed),
                    confirmed: a.acknowledged.load(Relaxed),
                    nacked: a.nacked.load(Relaxed),
                    returned: a.returned.load(Relaxed),
                    downlink_delivered: a.downlink_delivered.load(Relaxed),
                    downlink_acked: a.downlink_acked.load(Relaxed),
                    downlink_dropped: a.downlink_dropped.load(Relaxed),
                    downlink_echoes_dropped: a.downlink_echoes_dropped.load(Relaxed),
                }
            })
            .collect();
        Status {
            spool: locked.stats(),
            queue_full: spool.queue_full(),
            queue_dropped: udp.iter().map(|u| u.stats.queue_dropped()).sum(),
            kernel_drops: udp.iter().map(|u| u.kernel_drops.read()).sum(),
            upstreams,
            amqp,
            router: RouterStatus {
                refused_no_route: router.refused_no_route.load(Relaxed),
                downlink_received: router.received.load(Relaxed),
                downlink_unrouted: router.unrouted.load(Relaxed),
                downlink_unmatched: router.unmatched.load(Relaxed),
                downlink_ingress_gone: router.ingress_gone.load(Relaxed),
                local_dropped: router.local_dropped.load(Relaxed),
            },
            http: http.map(|h| HttpStatus {
                verdicts_orphaned: h.verdicts_orphaned(),
                rate_limited: h.rate_limited_total(),
            }),
        }
    }

    /// Counters of data given up (not merely refused to a sender who retries).
    fn losses(&self) -> u64 {
        self.spool.dropped_oldest
            + self.queue_dropped
            + self.spool.expired
            + self.spool.corrupt
            + self
                .upstreams
                .iter()
                .map(|u| u.rejected + u.backlog_dropped)
                .sum::<u64>()
    }
}

/// Logs the spool's counters every [`STATUS_INTERVAL`] when they changed, until `stop`.
async fn report_status(
    spool: Arc<SharedSpool<StdFs>>,
    drains: Vec<(String, Arc<DrainStats>)>,
    amqp: Vec<AmqpUpstream>,
    router: Arc<DownlinkStats>,
    udp: Vec<UdpCounters>,
    http: Option<Arc<http::stats::HttpStats>>,
    stop: CancellationToken,
) {
    let http = http.as_deref();
    let mut last = Status::take(&spool, &drains, &amqp, &router, &udp, http);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(STATUS_INTERVAL) => {}
        }
        let now = Status::take(&spool, &drains, &amqp, &router, &udp, http);
        if now != last {
            log_status(&now, Some(&last));
            last = now;
        }
    }
}

/// One line for the spool, one per upstream; a warning when data was given up since `last`.
fn log_status(now: &Status, last: Option<&Status>) {
    let s = &now.spool;
    let lost = last.is_some_and(|l| now.losses() > l.losses());
    macro_rules! spool_line {
        ($level:ident, $msg:literal) => {
            tracing::$level!(
                appended = s.appended,
                bytes = s.bytes,
                segments = s.segments,
                rejected_full = s.rejected_full,
                queue_full = now.queue_full,
                queue_dropped = now.queue_dropped,
                kernel_drops = now.kernel_drops,
                dropped_oldest = s.dropped_oldest,
                expired = s.expired,
                corrupt = s.corrupt,
                write_errors = s.write_errors,
                sync_errors = s.sync_errors,
                syncs = s.syncs,
                bytes_written = s.bytes_written,
                read_memory = s.read_memory,
                read_disk = s.read_disk,
                $msg
            )
        };
    }
    if lost {
        spool_line!(
            warn,
            "Spool status: messages were dropped (dropped_oldest, queue_dropped, expired, corrupt, refused upstream or backlog_dropped)."
        );
    } else {
        spool_line!(info, "Spool status.");
    }
    for u in &now.upstreams {
        tracing::info!(
            upstream = %u.name,
            backlog = u.backlog,
            forwarded = u.forwarded,
            rejected = u.rejected,
            ack_timeouts = u.ack_timeouts,
            resent = u.resent,
            unrouted = u.unrouted,
            backlog_dropped = u.backlog_dropped,
            "Upstream drain status."
        );
    }
    let r = &now.router;
    tracing::info!(
        refused_no_route = r.refused_no_route,
        downlink_received = r.downlink_received,
        downlink_unrouted = r.downlink_unrouted,
        downlink_unmatched = r.downlink_unmatched,
        downlink_ingress_gone = r.downlink_ingress_gone,
        local_dropped = r.local_dropped,
        "Router status."
    );
    for a in &now.amqp {
        tracing::info!(
            upstream = %a.name,
            published = a.published,
            confirmed = a.confirmed,
            nacked = a.nacked,
            returned = a.returned,
            downlink_delivered = a.downlink_delivered,
            downlink_acked = a.downlink_acked,
            downlink_dropped = a.downlink_dropped,
            downlink_echoes_dropped = a.downlink_echoes_dropped,
            "AMQP upstream status."
        );
    }
    if let Some(h) = &now.http {
        tracing::info!(
            verdicts_orphaned = h.verdicts_orphaned,
            rate_limited = h.rate_limited,
            "HTTP ingress status."
        );
    }
}

/// Opens the session store, restores every stored session into `core`, and starts the store
/// thread. A record the core refuses is logged and removed from the store.
fn restore_sessions(
    config: &Config,
    core: &mut Core,
) -> Result<(StoreLink, StoreThread), RunError> {
    let dir = config.gateway.state_dir.join(session_store::SESSIONS_DIR);
    let (mut store, stored, report) = SessionStore::open(&dir, config.mqttsn.session_log_max_size)?;
    if report.corrupt > 0 || report.truncated_bytes > 0 {
        tracing::warn!(
            corrupt_records = report.corrupt,
            truncated_bytes = report.truncated_bytes,
            dir = %dir.display(),
            "Session log damaged; the readable records were kept."
        );
    }
    #[allow(clippy::disallowed_methods)] // Timers of restored sessions start now.
    let now = std::time::Instant::now();
    let mut refused = session_store::Pending::new();
    for session in &stored {
        if let Err(error) = core.restore(now, &session.bytes) {
            tracing::warn!(client_id = %session.client_id, %error, code = error.error_code(), "Stored session not restored; removed.");
            refused.insert(session.client_id.clone(), None);
        }
    }
    if !refused.is_empty() {
        store.commit(&refused)?;
    }
    tracing::info!(
        restored = stored.len() - refused.len(),
        refused = refused.len(),
        log_bytes = report.log_bytes,
        compacted = report.compacted,
        dir = %dir.display(),
        "Persisted sessions restored."
    );
    session_store::spawn(store).map_err(|e| RunError::SessionStore(StoreError::Io(e)))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::{RunError, run, without_credentials};
    use crate::config::Config;
    use crate::observe::cli::fetch_status;
    use crate::observe::status::StatusDoc;

    /// A loopback TCP port nothing listens on now.
    fn free_tcp_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    /// A config in `dir` with MQTT-SN on a port the kernel picks, `coap_listen` as the
    /// `[coap] listen` array's items, the admin on `admin_port` and an upstream nobody
    /// answers (the gateway serves without it).
    fn config(dir: &Path, admin_port: u16, coap_listen: &str) -> Config {
        let text = format!(
            "[gateway]\nid = 1\nstate_dir = \"{}\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\
             [mqttsn]\nlisten = [\"127.0.0.1:0\"]\n\
             [coap]\nlisten = [{coap_listen}]\n\
             [[upstream]]\nname = \"local\"\nkind = \"mqtt\"\n\
             url = \"mqtt://127.0.0.1:{}\"\n",
            dir.display(),
            free_tcp_port()
        );
        Config::parse(&dir.join("sensorgate.toml"), &text).unwrap()
    }

    /// `/status` once it lists what `ready` wants, within a generous bound.
    async fn status_when(
        admin: std::net::SocketAddr,
        ready: impl Fn(&StatusDoc) -> bool,
    ) -> StatusDoc {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(doc) = fetch_status(admin, None, Duration::from_secs(5)).await
                && ready(&doc)
            {
                return doc;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the gateway did not come up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_coap_section_binds_its_sockets_and_the_admin_lists_them() {
        let dir = tempfile::tempdir().unwrap();
        let admin_port = free_tcp_port();
        let config = config(dir.path(), admin_port, "\"127.0.0.1:0\", \"[::1]:0\"");
        let shutdown = CancellationToken::new();
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));
        let check = async {
            // Live and ready: both drivers answered the admin's query.
            let doc = status_when(admin, |d| d.health.live && d.health.ready).await;
            shutdown.cancel();
            doc
        };
        let (ran, doc) = tokio::join!(run(config, shutdown.clone()), check);
        ran.unwrap();
        let coap: Vec<std::net::SocketAddr> = doc
            .listeners
            .iter()
            .filter(|l| l.protocol == "coap")
            .map(|l| {
                assert_eq!(l.transport, "udp");
                l.address.parse().unwrap()
            })
            .collect();
        assert_eq!(coap.len(), 2, "{:?}", doc.listeners);
        assert!(coap[0].ip().is_loopback() && coap[0].is_ipv4() && coap[0].port() != 0);
        assert!(coap[1].ip().is_loopback() && coap[1].is_ipv6() && coap[1].port() != 0);
        assert!(
            doc.listeners
                .iter()
                .any(|l| l.protocol == "mqtt-sn" && !l.address.ends_with(":0")),
            "{:?}",
            doc.listeners
        );
        let protocols: Vec<&str> = doc.protocols.iter().map(|p| p.protocol.as_str()).collect();
        assert_eq!(protocols, ["mqtt-sn", "coap"]);
    }

    #[tokio::test]
    async fn a_coap_address_in_use_stops_the_start_and_names_coap() {
        let dir = tempfile::tempdir().unwrap();
        let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let config = config(dir.path(), free_tcp_port(), &format!("\"{addr}\""));
        let error = run(config, CancellationToken::new()).await.unwrap_err();
        assert!(
            matches!(
                error,
                RunError::Bind {
                    protocol: "CoAP",
                    ..
                }
            ),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("cannot bind CoAP listener {addr}: "))
                && message.ends_with("change [coap] listen"),
            "{message}"
        );
        assert_eq!(error.class(), crate::preflight::ErrorClass::Unavailable);
    }

    #[test]
    fn credentials_are_removed_from_upstream_urls() {
        assert_eq!(
            without_credentials("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://127.0.0.1:5672/%2f"
        );
        assert_eq!(
            without_credentials("mqtts://u@broker:8883"),
            "mqtts://broker:8883"
        );
        assert_eq!(
            without_credentials("mqtt://127.0.0.1:1883/a@b"),
            "mqtt://127.0.0.1:1883/a@b"
        );
        assert_eq!(without_credentials("not a url"), "not a url");
    }
}
