//! The standard scenario set and its report. The nineteen scenarios: 1 QoS 0 from one client
//! (unpaced flood beside a native MQTT baseline, then paced steps with their latency); 2, 10
//! and 3 QoS 1 with window 1 from 1, 100 and 1,000 clients (10 was added after 9, hence its
//! number); 4 connect storm; 5 idle clients beside active publishers; 6 downlink fan-out;
//! 7 spool drain after a backlog; 8 QoS 1 uplink to RabbitMQ; 9 uplink fan-out to two
//! upstreams (disk bytes); CoAP (issue 15, [`crate::coap`]'s devices): 11 CON PUT from 1,000
//! devices with fsync before 2.04, beside scenario 3; 12 NON PUT paced at 100,000 msg/s from
//! one device, with and without 2.04 answers (No-Response); 13 Observe fan-out to 10,000
//! observations of one topic; HTTP (issue 16, [`crate::http`]'s clients): 14 QoS 1 publishes
//! from 100 keep-alive connections with bearer tokens, 200 after the fsync, beside scenarios
//! 3 and 10; 15 batches of 1,000 QoS 1 readings from 10 connections; serial (issue 17,
//! [`crate::serial`]'s sensor on a socat pty pair): 16 QoS 1 length-framed, unthrottled (a pty
//! ignores the baud rate: an upper bound), 17 the same paced at 115200 8N1 by the sensor;
//! DTLS (issue 19, [`crate::dtls`]'s `dimpl` client): 18 MQTT-SN QoS 1 (window 1, 100
//! clients, unpaced and paced) and QoS 0 (paced) over DTLS-PSK beside plain UDP, 19 10,000
//! DTLS-PSK handshakes with CONNECT/CONNACK, 64 in flight, beside plain CONNECTs.
//! `targets` checks the issues' targets (issues 13, 15, 16 and 19 among them).
//!
//! Each scenario runs against a fresh sensorgate (clean CPU and memory figures) and the same
//! mosquitto; the counting subscriber is reset between runs. Scenario 7 (spool drain) starts
//! its own mosquitto, after the backlog is spooled. Scenario 8 starts its own RabbitMQ node
//! (stopped when the scenario ends) with a counting AMQP consumer; scenario 9 runs two
//! gateways on the shared mosquitto, with one counting subscriber per upstream. Scenarios
//! 11-13 turn the gateway's `[coap]` listener on, 14-15 its `[http]` listener, 18-19 its
//! `[mqttsn] dtls_listen` (one `[[psk]]` per client) on gateways of their own beside plain
//! ones. Sizes are the issue's; `quick` shrinks them for a smoke run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use sensorgate_bridges::spool::{RECORD_HEADER, encoded_len};
use serde::Serialize;
use tempfile::TempDir;

use crate::amqp::{self, AmqpCounter, NativeAmqp};
use crate::baseline::{self, Native};
use crate::coap::{ConLoad, ConSpec, NonSpec, ObserveSpec, Observers, non_put};
use crate::generator::{Load, LoadSpec, TopicMode, count};
use crate::http::{self, Device, HttpLoad, HttpSpec};
use crate::procs::{self, BENCH_UPSTREAM, Broker, Gateway, GatewayConfig, Rabbit};
use crate::serial::SerialSpec;
use crate::subscriber::{Counter, Tally};
use crate::sys::{self, ProcSample};
use sensorgate_tests::pty::PtyPair;

/// Options of one suite run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The sensorgate binary.
    pub gateway_bin: PathBuf,
    /// Scenario numbers to run (1-19), in this order.
    pub only: Vec<u8>,
    /// Smaller sizes.
    pub quick: bool,
    /// Payload bytes.
    pub payload: usize,
    /// `[http] worker_threads` of scenarios 14-15's gateways; `None`: the gateway's default.
    pub http_workers: Option<usize>,
}

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
}

/// One scenario's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub id: u8,
    pub name: String,
    pub metrics: Vec<Metric>,
    pub notes: Vec<String>,
    /// It could not run (the error is in `notes`).
    pub failed: bool,
}

impl Scenario {
    fn new(id: u8, name: &str) -> Scenario {
        Scenario {
            id,
            name: name.to_owned(),
            metrics: Vec::new(),
            notes: Vec::new(),
            failed: false,
        }
    }

    fn put(&mut self, name: &str, value: f64, unit: &'static str) {
        self.metrics.push(Metric {
            name: name.to_owned(),
            value,
            unit,
        });
    }

    fn get(&self, name: &str) -> Option<f64> {
        self.metrics
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.value)
    }
}

/// A target of the benchmark issue and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub scenario: u8,
    pub target: String,
    pub measured: String,
    pub met: bool,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: std::collections::BTreeMap<&'static str, String>,
    pub sensorgate: String,
    pub mosquitto: String,
    pub quick: bool,
    pub payload_bytes: usize,
    pub scenarios: Vec<Scenario>,
    pub targets: Vec<Target>,
}

/// Fields drop in order: the subscriber leaves before the broker stops, the directory goes last.
struct Env {
    opts: Options,
    counter: Counter,
    broker: Broker,
    dir: TempDir,
    runs: u32,
}

impl Env {
    /// A fresh gateway for the shared broker, `extra` appended to `[mqttsn]`.
    fn gateway(&mut self, max_clients: usize, extra: &str) -> anyhow::Result<Gateway> {
        let port = self.broker.port;
        self.gateway_with(port, &GatewayConfig::new(max_clients, extra))
    }

    /// A fresh gateway for the broker on `broker_port` (which need not run yet).
    fn gateway_with(&mut self, broker_port: u16, cfg: &GatewayConfig) -> anyhow::Result<Gateway> {
        self.runs += 1;
        let dir = self.dir.path().join(format!("gw-{}", self.runs));
        std::fs::create_dir_all(&dir)?;
        Gateway::start(&self.opts.gateway_bin, &dir, broker_port, cfg)
    }

    fn spec(&self, gw: &Gateway) -> LoadSpec {
        let mut spec = LoadSpec::new(gw.addr);
        spec.payload = self.opts.payload;
        spec.id_prefix = format!("r{}-", self.runs);
        spec
    }
}

fn sample(pid: u32) -> ProcSample {
    sys::sample(pid).unwrap_or_default()
}

/// CPU seconds of gateway, broker (if one runs) and harness over a phase.
struct Cpu {
    gw: (u32, f64),
    broker: Option<(u32, f64)>,
    own: f64,
    wall: Instant,
}

impl Cpu {
    fn start(gw: u32, broker: u32) -> Cpu {
        Cpu {
            broker: Some((broker, sample(broker).cpu_secs)),
            ..Cpu::gateway_only(gw)
        }
    }

    /// Gateway and harness only: no broker runs.
    fn gateway_only(gw: u32) -> Cpu {
        Cpu {
            gw: (gw, sample(gw).cpu_secs),
            broker: None,
            own: sys::own_cpu_secs(),
            wall: Instant::now(),
        }
    }

    /// Puts gateway CPU seconds, µs per `per` message, and each process's CPU share.
    fn put(&self, s: &mut Scenario, per: u64, per_name: &str) {
        let gw = sample(self.gw.0).cpu_secs - self.gw.1;
        let own = sys::own_cpu_secs() - self.own;
        let wall = self.wall.elapsed().as_secs_f64().max(1e-9);
        s.put("gateway CPU", gw, "s");
        if per > 0 {
            s.put(
                &format!("gateway CPU per {per_name}"),
                gw * 1e6 / per as f64,
                "us",
            );
        }
        s.put("gateway CPU share", 100.0 * gw / wall, "% of a core");
        if let Some((pid, before)) = self.broker {
            let broker = sample(pid).cpu_secs - before;
            s.put("broker CPU share", 100.0 * broker / wall, "% of a core");
        }
        s.put("harness CPU share", 100.0 * own / wall, "% of a core");
    }
}

fn put_latency(s: &mut Scenario, prefix: &str, h: &hdrhistogram::Histogram<u64>) {
    if h.is_empty() {
        return;
    }
    for (label, q) in [("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)] {
        s.put(
            &format!("{prefix} {label}"),
            h.value_at_quantile(q) as f64 / 1000.0,
            "ms",
        );
    }
    s.put(&format!("{prefix} max"), h.max() as f64 / 1000.0, "ms");
}

fn put_tally(s: &mut Scenario, t: &Tally, expected: u64) {
    put_delivery(s, t, expected);
    s.put("delivered rate", t.rate(), "msg/s");
}

/// What arrived of `expected` messages: delivered, loss, duplicates, reordering.
fn put_delivery(s: &mut Scenario, t: &Tally, expected: u64) {
    s.put("delivered", t.unique as f64, "msgs");
    s.put(
        "loss",
        100.0 * expected.saturating_sub(t.unique) as f64 / expected.max(1) as f64,
        "%",
    );
    s.put("duplicates", t.duplicates as f64, "msgs");
    s.put("reordered", t.reordered as f64, "msgs");
}

const IDLE: Duration = Duration::from_secs(2);

/// Runs the scenarios in `opts.only` and returns the report.
///
/// # Errors
/// When mosquitto, sensorgate or the subscriber cannot be started.
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    let _ = crate::elapsed_ns();
    let dir = tempfile::Builder::new().prefix("sg-bench-").tempdir()?;
    let broker = Broker::start(dir.path())?;
    let counter = Counter::start(broker.port, &["bench/#"], 1)?;
    let mut env = Env {
        opts: opts.clone(),
        counter,
        broker,
        dir,
        runs: 0,
    };
    let mut scenarios = Vec::new();
    for id in opts.only.clone() {
        let result = match id {
            1 => qos0_one_client(&mut env).await,
            2 => qos1(&mut env, 2, 1).await,
            3 => qos1(&mut env, 3, 1000).await,
            10 => qos1(&mut env, 10, 100).await,
            4 => connect_storm(&mut env).await,
            5 => idle_and_active(&mut env).await,
            6 => fan_out(&mut env).await,
            7 => spool_drain(&mut env).await,
            8 => amqp_uplink(&mut env, &scenarios).await,
            9 => fan_out_disk(&mut env).await,
            11 => coap_con_put(&mut env, &scenarios).await,
            12 => coap_non_paced(&mut env).await,
            13 => coap_observers(&mut env).await,
            14 => http_qos1(&mut env, &scenarios).await,
            15 => http_batches(&mut env).await,
            16 => serial_qos1(&mut env, 16, false).await,
            17 => serial_qos1(&mut env, 17, true).await,
            18 => dtls_vs_plain(&mut env).await,
            19 => dtls_handshakes(&mut env).await,
            20 => fleet_replay(&mut env).await,
            _ => continue,
        };
        match result {
            Ok(s) => {
                print_scenario(&s);
                scenarios.push(s);
            }
            Err(e) => {
                let mut s = Scenario::new(id, "could not run");
                s.failed = true;
                s.notes.push(format!("{e:#}"));
                print_scenario(&s);
                scenarios.push(s);
            }
        }
    }
    let targets = targets(&scenarios);
    Ok(Report {
        machine: sys::machine(),
        sensorgate: sys::version_of(&opts.gateway_bin.to_string_lossy(), &["--version"]),
        mosquitto: sys::version_of("/usr/sbin/mosquitto", &["-h"]),
        quick: opts.quick,
        payload_bytes: opts.payload,
        scenarios,
        targets,
    })
}

/// One uplink run: sets the clients up, publishes, waits for the subscriber. Returns the
/// messages sent, the publish phase's seconds, the tally and the CPU meter started when
/// publishing began.
async fn uplink(
    env: &Env,
    gw: &Gateway,
    spec: LoadSpec,
    publish_max: Duration,
) -> anyhow::Result<(u64, f64, Tally, Cpu)> {
    env.counter.reset();
    let mut load = Load::start(spec).await?;
    load.wait_ready(Duration::from_secs(10)).await;
    let cpu = Cpu::start(gw.pid(), env.broker.pid());
    load.start_publish();
    let secs = load.wait_published(publish_max).await.as_secs_f64();
    let sent = count(&load.counters.sent);
    let tally = env.counter.wait_for(sent, IDLE, Duration::from_secs(30))?;
    load.finish().await;
    Ok((sent, secs, tally, cpu))
}

/// A paced step of scenario 1 counts as offered at its rate when the generator sent at least
/// this share of it (on a busy machine it can fall behind).
const PACED_OFFERED_SHARE: f64 = 0.95;

/// Paced steps of scenario 1 up to this rate run even after a loss at a lower one: their
/// latency is a target (issue 13: p99 at 10k and at 100k msg/s).
const PACED_LATENCY_STEPS_UP_TO: f64 = 100_000.0;

/// The native MQTT baseline: `messages` QoS 0 messages straight into the broker (paced at
/// `rate` if given, for at most `max`), counted by the same subscriber. Returns what was
/// sent, in how many seconds, and what arrived.
async fn native_qos0(
    env: &mut Env,
    messages: u64,
    rate: Option<f64>,
    max: Duration,
) -> anyhow::Result<(u64, f64, Tally)> {
    env.counter.reset();
    let (sent, secs) = baseline::publish(&Native {
        port: env.broker.port,
        topic: "bench/native".into(),
        client: u32::MAX,
        messages,
        qos: 0,
        payload: env.opts.payload,
        rate,
        max,
        window: None,
        seq_property: false,
    })
    .await?;
    let tally = env
        .counter
        .wait_for(sent, IDLE, max + Duration::from_secs(10))?;
    Ok((sent, secs, tally))
}

/// Scenario 1: QoS 0 from one client, unpaced (with the kernel's drops at the gateway's
/// socket), the native baseline, then paced steps up to the highest rate without loss, with
/// the end-to-end latency of each.
#[allow(clippy::too_many_lines)]
async fn qos0_one_client(env: &mut Env) -> anyhow::Result<Scenario> {
    let mut s = Scenario::new(
        1,
        "QoS 0, one client: unpaced, native baseline, paced steps",
    );
    let n: u64 = if env.opts.quick { 100_000 } else { 300_000 };
    let gw = env.gateway(1000, "")?;

    // Unpaced.
    let mut spec = env.spec(&gw);
    spec.messages = n;
    spec.publish_for = Duration::from_secs(20);
    let drops_before = sys::udp_drops(gw.addr);
    let (sent, secs, tally, cpu) = uplink(env, &gw, spec, Duration::from_secs(25)).await?;
    let drops_after = sys::udp_drops(gw.addr);
    s.put(
        "unpaced offered rate",
        sent as f64 / secs.max(1e-9),
        "msg/s",
    );
    put_tally(&mut s, &tally, sent);
    put_latency(&mut s, "unpaced: latency", &tally.latency);
    cpu.put(&mut s, tally.unique, "delivered msg");
    // Where the unpaced loss happened: datagrams the kernel dropped at the gateway's socket
    // (receive buffer full while the gateway does not read: its backpressure) are counted by
    // the kernel; the rest was lost inside the gateway. This assumes the broker and the
    // counting subscriber lose nothing: the baseline's loss below, through the same broker and
    // subscriber, shows when they do (then "lost inside the gateway" is overstated by it).
    if let (Some(before), Some(after)) = (drops_before, drops_after) {
        let kernel = after.saturating_sub(before);
        s.put("kernel drops at the gateway socket", kernel as f64, "msgs");
        s.put(
            "lost inside the gateway",
            sent.saturating_sub(tally.unique).saturating_sub(kernel) as f64,
            "msgs",
        );
    } else {
        s.notes.push(format!(
            "no kernel drop count: /proc/net/udp{{,6}} lists no socket bound to {}",
            gw.addr
        ));
    }

    // Native MQTT baseline: the same messages straight into the broker.
    let (bsent, bsecs, base) = native_qos0(env, n, None, Duration::from_secs(20)).await?;
    s.put(
        "baseline offered rate",
        bsent as f64 / bsecs.max(1e-9),
        "msg/s",
    );
    s.put("baseline delivered rate", base.rate(), "msg/s");
    s.put(
        "baseline loss",
        100.0 * bsent.saturating_sub(base.unique) as f64 / bsent.max(1) as f64,
        "%",
    );
    let ratio = if base.rate() > 0.0 {
        100.0 * s.get("delivered rate").unwrap_or(0.0) / base.rate()
    } else {
        0.0
    };
    s.put("gateway / baseline delivered rate", ratio, "%");

    // Paced steps: the highest offered rate with zero loss, and each step's latency.
    let steps: &[f64] = if env.opts.quick {
        &[10_000.0, 50_000.0, 100_000.0, 150_000.0]
    } else {
        &[
            10_000.0, 25_000.0, 50_000.0, 75_000.0, 100_000.0, 125_000.0, 150_000.0, 200_000.0,
        ]
    };
    let (mut best, mut best_offered) = (0.0, 0.0);
    let mut first_loss = None;
    for &rate in steps {
        if first_loss.is_some() && rate > PACED_LATENCY_STEPS_UP_TO {
            break;
        }
        let secs = 2.0;
        let mut spec = env.spec(&gw);
        spec.id_prefix = format!("p{rate}-");
        spec.messages = (rate * secs) as u64;
        spec.rate = Some(rate);
        spec.publish_for = Duration::from_secs(10);
        let (sent, took, t, cpu) = uplink(env, &gw, spec, Duration::from_secs(15)).await?;
        let lost = sent.saturating_sub(t.unique);
        let k = format!("{}k", rate / 1000.0);
        let offered = sent as f64 / took.max(1e-9);
        s.put(&format!("paced {k}: offered"), offered, "msg/s");
        if offered < PACED_OFFERED_SHARE * rate {
            s.notes.push(format!(
                "paced {k}: the generator offered only {offered:.0} msg/s (it fell behind)"
            ));
        }
        s.put(&format!("paced {k}: lost"), lost as f64, "msgs");
        let mut step = Scenario::new(0, "");
        cpu.put(&mut step, t.unique, "delivered msg");
        if let Some(us) = step.get("gateway CPU per delivered msg") {
            s.put(&format!("paced {k}: gateway CPU per msg"), us, "us");
        }
        put_latency(&mut s, &format!("paced {k}: latency"), &t.latency);
        if (rate - 100_000.0).abs() < 1.0 {
            s.put("paced 100k lost", lost as f64, "msgs");
            // The yardstick for the latency at this rate: the same paced messages straight
            // into the broker, through the same subscriber. Whatever latency the broker and
            // the subscriber add at this rate, the gateway cannot remove.
            let (nsent, nsecs, native) = native_qos0(
                env,
                (rate * secs) as u64,
                Some(rate),
                Duration::from_secs(10),
            )
            .await?;
            s.put(
                "paced 100k native: offered",
                nsent as f64 / nsecs.max(1e-9),
                "msg/s",
            );
            put_latency(&mut s, "paced 100k native: latency", &native.latency);
        }
        if lost > 0 && first_loss.is_none() {
            s.notes.push(format!("first loss at {rate} msg/s offered"));
            first_loss = Some(rate);
        }
        if first_loss.is_none() {
            (best, best_offered) = (rate, offered);
        }
    }
    s.put("highest paced rate without loss", best, "msg/s");
    s.put(
        "highest paced rate without loss: offered",
        best_offered,
        "msg/s",
    );
    Ok(s)
}

/// Scenarios 2, 10 and 3: QoS 1, window 1, from 1, 100 and 1,000 clients; acknowledged rate
/// and the end-to-end latency to the counting subscriber.
async fn qos1(env: &mut Env, id: u8, clients: usize) -> anyhow::Result<Scenario> {
    let mut s = Scenario::new(id, &format!("QoS 1, {clients} client(s), window 1"));
    // Full runs take some 5-20 s of publishing, quick ones one to a few seconds.
    let per_client: u64 = match (clients, env.opts.quick) {
        (1, false) => 20_000,
        (1, true) => 5_000,
        (100, false) => 2_500,
        (100, true) => 500,
        (_, false) => 100,
        (_, true) => 30,
    };
    let gw = env.gateway(clients + 100, "")?;
    let mut spec = env.spec(&gw);
    spec.clients = clients;
    spec.qos = 1;
    spec.messages = per_client;
    spec.publish_for = Duration::from_secs(30);
    env.counter.reset();
    let mut load = Load::start(spec).await?;
    load.wait_ready(Duration::from_secs(30)).await;
    let cpu = Cpu::start(gw.pid(), env.broker.pid());
    load.start_publish();
    let secs = load
        .wait_published(Duration::from_secs(40))
        .await
        .as_secs_f64();
    let c = &load.counters;
    let (sent, acked) = (count(&c.sent), count(&c.acked));
    s.put("acknowledged", acked as f64, "msgs");
    s.put("acknowledged rate", acked as f64 / secs.max(1e-9), "msg/s");
    s.put("rejected", count(&c.rejected) as f64, "msgs");
    s.put("retransmissions", count(&c.retransmits) as f64, "pkts");
    s.put("unanswered", count(&c.unanswered) as f64, "msgs");
    if let Ok(h) = load.ack_latency.lock() {
        put_latency(&mut s, "PUBLISH to PUBACK", &h);
    }
    let tally = env.counter.wait_for(acked, IDLE, Duration::from_secs(30))?;
    load.finish().await;
    put_tally(&mut s, &tally, sent);
    s.put(
        "acknowledged but not delivered",
        acked.saturating_sub(tally.unique) as f64,
        "msgs",
    );
    // From the first transmission's send stamp to the subscriber (same clock).
    put_latency(&mut s, "end-to-end latency", &tally.latency);
    cpu.put(&mut s, acked, "acknowledged msg");
    Ok(s)
}

/// Scenario 4: connect storm; each client CONNECTs, REGISTERs and publishes one QoS 1 message.
/// The clients (one socket each) are split over worker processes when they exceed the
/// open-file limit.
async fn connect_storm(env: &mut Env) -> anyhow::Result<Scenario> {
    let mut s = Scenario::new(
        4,
        "Connect storm: CONNECT, REGISTER, one QoS 1 PUBLISH each",
    );
    let clients: usize = if env.opts.quick { 20_000 } else { 100_000 };
    let limit = sys::raise_nofile(clients as u64 + 2000);
    let per_worker = usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .saturating_sub(500)
        .clamp(1, 20_000);
    let workers = clients.div_ceil(per_worker);
    s.notes.push(format!(
        "{workers} generator process(es) of up to {per_worker} clients (open-file limit {limit})"
    ));
    let gw = env.gateway(clients + 100, "")?;
    let before = sample(gw.pid());
    env.counter.reset();
    let cpu = Cpu::start(gw.pid(), env.broker.pid());
    let exe = std::env::current_exe()?;
    let gpid = gw.pid();
    let mut registered = ProcSample::default();
    let mut during = ProcSample::default();
    let storm = crate::storm::run(
        &exe,
        gw.addr,
        clients,
        per_worker,
        env.opts.payload,
        |step, _| match step {
            "registered" => registered = sample(gpid),
            _ => during = sample(gpid),
        },
    )
    .await?;
    let tally = env
        .counter
        .wait_for(storm.acknowledged, IDLE, Duration::from_secs(30))?;
    s.put("clients", clients as f64, "");
    s.put("connected", storm.connected as f64, "");
    s.put("failed set-up", storm.failed as f64, "");
    s.put(
        "CONNACK rate",
        storm.connected as f64 / storm.connack_secs.max(1e-9),
        "CONNACK/s",
    );
    s.put("start to last CONNACK", storm.connack_secs, "s");
    s.put("retransmissions", storm.retransmissions as f64, "pkts");
    s.put("acknowledged", storm.acknowledged as f64, "msgs");
    s.put("unanswered", storm.unanswered as f64, "msgs");
    s.put("delivered", tally.unique as f64, "msgs");
    s.put("RSS before", before.rss_kb as f64 / 1024.0, "MiB");
    s.put(
        "RSS all connected + registered",
        registered.rss_kb as f64 / 1024.0,
        "MiB",
    );
    s.put("RSS after publishing", during.rss_kb as f64 / 1024.0, "MiB");
    s.put(
        "RSS per connected client",
        (during.rss_kb.saturating_sub(before.rss_kb) as f64 * 1024.0)
            / (storm.connected.max(1) as f64),
        "bytes",
    );
    // Sessions are freed as the DISCONNECTs arrive; sample once they had time to.
    let mut after = sample(gpid);
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = sample(gpid);
    }
    s.put("RSS after DISCONNECT", after.rss_kb as f64 / 1024.0, "MiB");
    s.put("peak RSS", after.peak_rss_kb as f64 / 1024.0, "MiB");
    cpu.put(&mut s, storm.connected, "client (set-up + 1 msg)");
    Ok(s)
}

/// Scenario 5: idle connected clients pinging, plus active QoS 1 publishers.
async fn idle_and_active(env: &mut Env) -> anyhow::Result<Scenario> {
    let (idle_n, active_n, secs) = if env.opts.quick {
        (2_000, 100, 5)
    } else {
        (10_000, 100, 10)
    };
    let mut s = Scenario::new(
        5,
        &format!("{idle_n} idle clients (keep-alive 10 s) + {active_n} QoS 1 publishers"),
    );
    let _ = sys::raise_nofile((idle_n + active_n) as u64 + 2000);
    let gw = env.gateway(idle_n + active_n + 100, "")?;
    let before = sample(gw.pid());
    let mut idle_spec = env.spec(&gw);
    idle_spec.clients = idle_n;
    idle_spec.id_prefix = "idle-".into();
    idle_spec.keep_alive = 10;
    let mut idle = Load::start(idle_spec).await?;
    idle.wait_ready(Duration::from_secs(60)).await;
    let mut spec = env.spec(&gw);
    spec.clients = active_n;
    spec.id_prefix = "act-".into();
    spec.topic = TopicMode::Register("bench/a/".into());
    spec.qos = 1;
    spec.messages = u64::MAX;
    spec.publish_for = Duration::from_secs(secs);
    env.counter.reset();
    let mut active = Load::start(spec).await?;
    active.wait_ready(Duration::from_secs(30)).await;
    let cpu = Cpu::start(gw.pid(), env.broker.pid());
    idle.start_publish();
    active.start_publish();
    let took = active
        .wait_published(Duration::from_secs(secs + 10))
        .await
        .as_secs_f64();
    let during = sample(gw.pid());
    let acked = count(&active.counters.acked);
    s.put(
        "active acknowledged rate",
        acked as f64 / took.max(1e-9),
        "msg/s",
    );
    if let Ok(h) = active.ack_latency.lock() {
        put_latency(&mut s, "PUBLISH to PUBACK", &h);
    }
    let tally = env.counter.wait_for(acked, IDLE, Duration::from_secs(30))?;
    s.put(
        "acknowledged but not delivered",
        acked.saturating_sub(tally.unique) as f64,
        "msgs",
    );
    s.put("idle connected", count(&idle.counters.ready) as f64, "");
    s.put(
        "PINGRESP received",
        count(&idle.counters.pingresp) as f64,
        "",
    );
    s.put(
        "sessions lost",
        (count(&idle.counters.lost) + count(&active.counters.lost)) as f64,
        "",
    );
    s.put("RSS before", before.rss_kb as f64 / 1024.0, "MiB");
    s.put("RSS with all clients", during.rss_kb as f64 / 1024.0, "MiB");
    cpu.put(&mut s, acked, "acknowledged msg");
    active.finish().await;
    idle.finish().await;
    Ok(s)
}

/// Scenario 6: downlink fan-out to subscribed clients.
async fn fan_out(env: &mut Env) -> anyhow::Result<Scenario> {
    let (clients, messages): (usize, u64) = if env.opts.quick {
        (2_000, 50)
    } else {
        (10_000, 100)
    };
    let mut s = Scenario::new(
        6,
        &format!("Downlink fan-out: {clients} subscribed clients, {messages} QoS 0 messages"),
    );
    let _ = sys::raise_nofile(clients as u64 + 2000);
    let gw = env.gateway(clients + 100, "max_queued_per_client = 1000\n")?;
    let mut spec = env.spec(&gw);
    spec.clients = clients;
    spec.subscribe = Some("fan/t".into());
    spec.keep_alive = 600;
    let mut load = Load::start(spec).await?;
    load.wait_ready(Duration::from_secs(60)).await;
    load.start_publish();
    load.wait_published(Duration::from_secs(10)).await;
    // Warm-up messages until one arrives: then the upstream subscription is in place.
    let native = |client: u32, messages: u64| Native {
        port: env.broker.port,
        topic: "fan/t".into(),
        client,
        messages,
        qos: 0,
        payload: env.opts.payload,
        rate: None,
        max: Duration::from_secs(20),
        window: None,
        seq_property: false,
    };
    for _ in 0..20 {
        baseline::publish(&native(0, 1)).await?;
        load.wait_downlink(1, Duration::from_millis(500), Duration::from_millis(500))
            .await;
        if count(&load.counters.downlink) > 0 {
            break;
        }
    }
    let mut seen = 0;
    loop {
        load.wait_downlink(seen + 1, Duration::from_millis(500), Duration::from_secs(5))
            .await;
        let now = count(&load.counters.downlink);
        if now == seen {
            break;
        }
        seen = now;
    }
    let warm = count(&load.counters.downlink);
    if let Ok(mut h) = load.downlink_latency.lock() {
        h.reset();
    }
    let cpu = Cpu::start(gw.pid(), env.broker.pid());
    let start_ns = crate::elapsed_ns();
    baseline::publish(&native(1, messages)).await?;
    let expected = clients as u64 * messages;
    load.wait_downlink(warm + expected, IDLE, Duration::from_secs(60))
        .await;
    let got = count(&load.counters.downlink).saturating_sub(warm);
    let last = count(&load.counters.last_downlink_ns);
    let secs = last.saturating_sub(start_ns) as f64 / 1e9;
    s.put("subscribed clients", count(&load.counters.ready) as f64, "");
    s.put("deliveries", got as f64, "msgs");
    s.put(
        "loss",
        100.0 * expected.saturating_sub(got) as f64 / expected.max(1) as f64,
        "%",
    );
    s.put("delivery rate", got as f64 / secs.max(1e-9), "deliveries/s");
    if let Ok(h) = load.downlink_latency.lock() {
        put_latency(&mut s, "publish to delivery", &h);
    }
    cpu.put(&mut s, got, "delivery");
    load.finish().await;
    Ok(s)
}

/// Scenario 7's spool segment size: the gateway's default, written out because "near zero"
/// ([`SPOOL_NEAR_ZERO_BYTES`]) follows from it.
const DRAIN_SEGMENT_BYTES: u64 = 8 << 20;

/// Scenario 7's upstream `max_inflight` (the drain window): the gateway's default. The native
/// client measuring the broker's limit uses the same window.
const DRAIN_WINDOW: u16 = 1000;

/// Native runs measuring the broker's limit in scenario 7, each as long as the drain (the
/// broker slows down as its queue toward the subscriber grows, so a shorter run would flatter
/// it). The best one counts: the machine is shared, and anything else running slows a run down.
const BROKER_LIMIT_RUNS: u32 = 2;

/// "Near zero" for the spool directory once everything is acknowledged: a consumed active
/// segment is kept until it passes an eighth of its size, plus a block or two each for the
/// lock, the cursor and sequence files (two slots each) and the segment's last page. Counted
/// in allocated blocks: the active segment is preallocated sparse.
const SPOOL_NEAR_ZERO_BYTES: u64 = DRAIN_SEGMENT_BYTES / 8 + 8 * 4096;

/// The size of one spooled message, averaged over the clients' topics.
struct RecordSize {
    /// Payload + topic + [`RECORD_HEADER`]: the issue's yardstick for bytes per message.
    yardstick: f64,
    /// The whole record as the spool encodes it ([`encoded_len`]).
    encoded: f64,
}

impl RecordSize {
    fn of(spec: &LoadSpec) -> RecordSize {
        let payload = vec![0u8; spec.payload];
        let topics: Vec<String> = match &spec.topic {
            TopicMode::Register(prefix) => (0..spec.clients)
                .map(|i| format!("{prefix}{}", spec.first_index as usize + i))
                .collect(),
            TopicMode::Predefined(_) => vec![procs::PREDEFINED.1.to_owned()],
        };
        let n = topics.len().max(1) as f64;
        let topic = topics.iter().map(String::len).sum::<usize>() as f64 / n;
        let encoded = topics
            .iter()
            .map(|t| encoded_len(t, &payload, &Default::default()))
            .sum::<usize>() as f64
            / n;
        RecordSize {
            yardstick: (spec.payload + RECORD_HEADER) as f64 + topic,
            encoded,
        }
    }
}

/// Copies `from`'s metrics named in `names` into `s`, prefixed.
fn put_prefixed(s: &mut Scenario, prefix: &str, from: &Scenario, names: &[&str]) {
    for m in from
        .metrics
        .iter()
        .filter(|m| names.contains(&m.name.as_str()))
    {
        s.put(&format!("{prefix}{}", m.name), m.value, m.unit);
    }
}

/// Scenario 7: QoS 1 messages spooled while no broker runs, then drained into a broker started
/// afterwards; disk bytes per message, disk space after the drain, and the broker's own limit
/// (one native QoS 1 connection with the gateway's window) for comparison.
#[allow(clippy::too_many_lines)]
async fn spool_drain(env: &mut Env) -> anyhow::Result<Scenario> {
    let messages: u64 = if env.opts.quick { 100_000 } else { 1_000_000 };
    let clients: usize = 1000;
    let mut s = Scenario::new(
        7,
        &format!("Spool: drain after a {messages}-message QoS 1 backlog ({clients} clients)"),
    );
    // No broker listens there until the backlog is in.
    let port = procs::free_port_below_ephemeral()?;
    let _ = sys::raise_nofile(clients as u64 + 2000);
    let gw = env.gateway_with(
        port,
        &GatewayConfig {
            // The default upstream, with a short reconnect backoff so that the first connection
            // follows the broker's start closely (the drain rate is measured from the first
            // delivery on, whatever the backoff).
            upstream: format!("max_inflight = {DRAIN_WINDOW}\nbackoff_max = \"1s\"\n"),
            // The default spool (fsync always), with room for the whole backlog.
            spool: format!("max_bytes = \"2GiB\"\nsegment_bytes = \"{DRAIN_SEGMENT_BYTES}B\"\n"),
            ..GatewayConfig::new(clients + 100, "")
        },
    )?;
    let spool_dir = gw.state_dir.join("spool");
    let sessions_dir = gw.state_dir.join("sessions");

    // 1. The backlog: the gateway acknowledges each message after the fsync covering it.
    let mut spec = env.spec(&gw);
    spec.clients = clients;
    spec.qos = 1;
    spec.messages = messages / clients as u64;
    spec.publish_for = Duration::from_secs(if env.opts.quick { 40 } else { 150 });
    let publish_max = spec.publish_for + Duration::from_secs(15);
    let record = RecordSize::of(&spec);
    let mut load = Load::start(spec).await?;
    load.wait_ready(Duration::from_secs(30)).await;
    let sessions_before = sys::dir_bytes(&sessions_dir);
    let io_before = sys::io(gw.pid());
    let cpu = Cpu::gateway_only(gw.pid());
    load.start_publish();
    let secs = load.wait_published(publish_max).await.as_secs_f64();
    let c = &load.counters;
    let acked = count(&c.acked);
    s.put("acknowledged (spooled)", acked as f64, "msgs");
    s.put("acknowledged rate", acked as f64 / secs.max(1e-9), "msg/s");
    s.put("rejected", count(&c.rejected) as f64, "msgs");
    s.put("unanswered", count(&c.unanswered) as f64, "msgs");
    if let Ok(h) = load.ack_latency.lock() {
        put_latency(&mut s, "PUBLISH to PUBACK", &h);
    }
    let mut step = Scenario::new(0, "");
    cpu.put(&mut step, acked, "acknowledged msg");
    put_prefixed(
        &mut s,
        "spooling: ",
        &step,
        &[
            "gateway CPU per acknowledged msg",
            "gateway CPU share",
            "harness CPU share",
        ],
    );
    load.finish().await;
    let io_after = sys::io(gw.pid());
    let sessions_after = sys::dir_bytes(&sessions_dir);
    s.put(
        "record size (payload + topic + record header)",
        record.yardstick,
        "bytes",
    );
    s.put("encoded record (all fields)", record.encoded, "bytes");
    if let (Some(before), Some(after), true) = (io_before, io_after, acked > 0) {
        let io = after.since(&before);
        let per_msg = |bytes: u64| bytes as f64 / acked as f64;
        s.put(
            "disk bytes written per message (write_bytes)",
            per_msg(io.write_bytes),
            "bytes",
        );
        s.put(
            "disk bytes per message / record size",
            per_msg(io.write_bytes) / record.yardstick,
            "x",
        );
        s.put(
            "bytes handed to write() per message (wchar)",
            per_msg(io.wchar),
            "bytes",
        );
        s.put(
            "wchar per message / record size",
            per_msg(io.wchar) / record.yardstick,
            "x",
        );
        s.notes.push(
            "disk bytes: the gateway's write_bytes (/proc/<pid>/io), counted per page cache \
             page turning dirty; the filesystem journal is not included"
                .into(),
        );
    } else {
        s.notes
            .push("no disk bytes: /proc/<pid>/io unreadable, or nothing acknowledged".into());
    }
    let spooled = sys::dir_bytes(&spool_dir);
    s.put(
        "spool dir after the load",
        spooled.len as f64 / 1_048_576.0,
        "MiB",
    );
    s.put("spool files after the load", spooled.files as f64, "");
    let grown = sessions_after.len.saturating_sub(sessions_before.len);
    s.put("sessions dir growth during the load", grown as f64, "bytes");
    if grown > 0 {
        s.notes.push(format!(
            "the session store grew by {grown} bytes with clean-session clients"
        ));
    }

    // 2. The drain. Mosquitto and the counting subscriber start while the gateway is paused,
    // so that the subscription is in place before the gateway's first message.
    let broker_dir = env.dir.path().join(format!("broker-{}", env.runs));
    std::fs::create_dir_all(&broker_dir)?;
    gw.pause()?;
    let broker = Broker::start_on(&broker_dir, port)?;
    let counter = Counter::start(port, &["bench/#"], 1)?;
    let started_ns = crate::elapsed_ns();
    gw.resume()?;
    let first_until = Instant::now() + Duration::from_secs(30);
    while counter.received() == 0 && Instant::now() < first_until {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let cpu = Cpu::start(gw.pid(), broker.pid());
    let io_before = sys::io(gw.pid());
    let drain_max = Duration::from_secs(if env.opts.quick { 40 } else { 180 });
    let tally = counter.wait_for(acked, Duration::from_secs(10), drain_max)?;
    let mut step = Scenario::new(0, "");
    cpu.put(&mut step, tally.unique, "delivered msg");
    let io_after = sys::io(gw.pid());
    let since_start = |ns: u64| ns.saturating_sub(started_ns) as f64 / 1e9;
    put_delivery(&mut s, &tally, acked);
    s.put(
        "acknowledged but not delivered",
        acked.saturating_sub(tally.unique) as f64,
        "msgs",
    );
    s.put(
        "first delivery after the broker started",
        since_start(tally.first_ns),
        "s",
    );
    s.put(
        "drain time (broker start to last delivery)",
        since_start(tally.last_ns),
        "s",
    );
    s.put("drain rate (first to last delivery)", tally.rate(), "msg/s");
    put_prefixed(
        &mut s,
        "drain: ",
        &step,
        &[
            "gateway CPU per delivered msg",
            "gateway CPU share",
            "broker CPU share",
            "harness CPU share",
        ],
    );
    // What the drain reads: the spool (from the page cache, most likely) and the broker's
    // acknowledgements.
    if let (Some(before), Some(after), true) = (io_before, io_after, tally.unique > 0) {
        s.put(
            "drain: bytes read per delivered msg (rchar)",
            after.since(&before).rchar as f64 / tally.unique as f64,
            "bytes",
        );
    }

    // 3. Disk space once everything is acknowledged: segments go as the cursor passes them.
    let drained = Instant::now();
    let settle_until = drained + Duration::from_secs(10);
    let mut left = sys::dir_bytes(&spool_dir);
    // Allocated blocks (what `du` shows): the active segment is preallocated sparse to the
    // segment size, so its apparent length says nothing about the disk space it takes.
    while left.allocated > SPOOL_NEAR_ZERO_BYTES && Instant::now() < settle_until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = sys::dir_bytes(&spool_dir);
    }
    s.put(
        "spool dir near zero after the last delivery",
        drained.elapsed().as_secs_f64(),
        "s",
    );
    s.put("spool dir after the drain", left.len as f64, "bytes");
    s.put(
        "spool dir after the drain (allocated)",
        left.allocated as f64,
        "bytes",
    );
    s.put("spool files after the drain", left.files as f64, "");

    // 4. The broker's own limit: one native QoS 1 connection with the gateway's default
    // window, counted by the same subscriber; the same number of messages as the drain; the
    // best of a few runs.
    let per_run = messages;
    let (mut sent, mut lost) = (0u64, 0u64);
    let mut best: Option<(f64, Scenario)> = None;
    for run in 1..=BROKER_LIMIT_RUNS {
        counter.reset();
        let cpu = Cpu::start(gw.pid(), broker.pid());
        let (bsent, _) = baseline::publish(&Native {
            port,
            topic: "bench/native".into(),
            client: u32::MAX,
            messages: per_run,
            qos: 1,
            payload: env.opts.payload,
            rate: None,
            max: Duration::from_secs(60),
            window: Some(DRAIN_WINDOW),
            seq_property: true,
        })
        .await?;
        let base = counter.wait_for(bsent, IDLE, Duration::from_secs(60))?;
        let mut step = Scenario::new(0, "");
        cpu.put(&mut step, base.unique, "delivered msg");
        s.put(&format!("broker limit run {run}"), base.rate(), "msg/s");
        sent += bsent;
        lost += bsent.saturating_sub(base.unique);
        if best.as_ref().is_none_or(|(rate, _)| base.rate() > *rate) {
            best = Some((base.rate(), step));
        }
    }
    let (limit, step) = best.unwrap_or_else(|| (0.0, Scenario::new(0, "")));
    s.put(
        "broker limit (native QoS 1 with sg-seq, one connection)",
        limit,
        "msg/s",
    );
    s.put(
        "broker limit: loss",
        100.0 * lost as f64 / sent.max(1) as f64,
        "%",
    );
    put_prefixed(
        &mut s,
        "broker limit (best run): ",
        &step,
        &["broker CPU share", "harness CPU share"],
    );
    if limit > 0.0 {
        s.put("drain / broker limit", 100.0 * tally.rate() / limit, "%");
    }
    // Some seconds later (nothing was spooled meanwhile).
    s.put(
        "spool dir at the end",
        sys::dir_bytes(&spool_dir).len as f64,
        "bytes",
    );
    Ok(s)
}

/// Scenario 8's upstream `max_inflight` (the confirm window): the config's default. The
/// native AMQP publisher uses the same window.
const AMQP_WINDOW: u16 = 1000;

/// Scenario 8's queue, bound to [`amqp::EXCHANGE`] with `bench.#`.
const AMQP_QUEUE: &str = "sg-bench";

/// Scenario 8: QoS 1 uplink from 1,000 clients (as scenario 3) through one `kind = "amqp"`
/// upstream to a RabbitMQ node started for the scenario, counted by a consumer on a durable
/// queue bound to `amq.topic`; then a native AMQP publisher (publisher confirms, the gateway's
/// window, the same messages, topics, properties and headers) straight into the same node,
/// counted by the same consumer. Scenario 3's MQTT figure, when it ran before in this run, is
/// printed beside it.
#[allow(clippy::too_many_lines)]
async fn amqp_uplink(env: &mut Env, earlier: &[Scenario]) -> anyhow::Result<Scenario> {
    let clients: usize = 1000;
    let per_client: u64 = if env.opts.quick { 20 } else { 100 };
    let mut s = Scenario::new(
        8,
        &format!(
            "QoS 1 uplink to RabbitMQ with publisher confirms, {clients} clients, window 1 \
             (AMQP max_inflight {AMQP_WINDOW})"
        ),
    );
    let _ = sys::raise_nofile(clients as u64 + 2000);
    let rabbit_dir = env.dir.path().join(format!("rabbit-{}", env.runs));
    std::fs::create_dir_all(&rabbit_dir)?;
    let boot = Instant::now();
    let rabbit = Rabbit::start(&rabbit_dir)?;
    s.put("RabbitMQ boot", boot.elapsed().as_secs_f64(), "s");
    // Bound before the gateway publishes: a message no queue takes is returned (refused).
    let counter = AmqpCounter::start(&rabbit.url(), AMQP_QUEUE, &["bench.#"])?;
    let upstreams = format!(
        "[[upstream]]\nname = \"rabbit\"\nkind = \"amqp\"\nurl = \"{}\"\nexchange = \"{}\"\n\
         max_inflight = {AMQP_WINDOW}\nbackoff_max = \"1s\"\n",
        rabbit.url(),
        amqp::EXCHANGE
    );
    let gw = env.gateway_with(
        rabbit.port,
        &GatewayConfig {
            upstreams: Some(upstreams),
            ..GatewayConfig::new(clients + 100, "")
        },
    )?;
    let vm = rabbit.vm_pid();
    let meter = |gw: u32| match vm {
        Some(vm) => Cpu::start(gw, vm),
        None => Cpu::gateway_only(gw),
    };

    // 1. Through the gateway.
    let mut spec = env.spec(&gw);
    spec.clients = clients;
    spec.qos = 1;
    spec.messages = per_client;
    spec.publish_for = Duration::from_secs(30);
    let topic_prefix = match &spec.topic {
        TopicMode::Register(prefix) => prefix.clone(),
        TopicMode::Predefined(_) => procs::PREDEFINED.1.to_owned(),
    };
    counter.reset();
    let mut load = Load::start(spec).await?;
    load.wait_ready(Duration::from_secs(30)).await;
    let cpu = meter(gw.pid());
    load.start_publish();
    let secs = load
        .wait_published(Duration::from_secs(40))
        .await
        .as_secs_f64();
    let c = &load.counters;
    let (sent, acked) = (count(&c.sent), count(&c.acked));
    s.put("acknowledged", acked as f64, "msgs");
    s.put("acknowledged rate", acked as f64 / secs.max(1e-9), "msg/s");
    s.put("rejected", count(&c.rejected) as f64, "msgs");
    s.put("unanswered", count(&c.unanswered) as f64, "msgs");
    if let Ok(h) = load.ack_latency.lock() {
        put_latency(&mut s, "PUBLISH to PUBACK", &h);
    }
    let tally = counter.wait_for(acked, DRAIN_IDLE, Duration::from_secs(90))?;
    load.finish().await;
    put_tally(&mut s, &tally, sent);
    s.put(
        "acknowledged but not delivered",
        acked.saturating_sub(tally.unique) as f64,
        "msgs",
    );
    cpu.put(&mut s, acked, "acknowledged msg");

    // 2. Native: the same number of messages straight into RabbitMQ.
    counter.reset();
    let cpu = meter(gw.pid());
    let native = amqp::publish_native(&NativeAmqp {
        url: rabbit.url(),
        topic_prefix,
        clients: u32::try_from(clients).unwrap_or(u32::MAX),
        messages: sent,
        payload: env.opts.payload,
        window: AMQP_WINDOW,
        max: Duration::from_secs(90),
    })
    .await?;
    let base = counter.wait_for(native.acked, IDLE, Duration::from_secs(60))?;
    let mut step = Scenario::new(0, "");
    cpu.put(&mut step, base.unique, "delivered msg");
    s.put(
        "native confirmed rate (first publish to last confirm)",
        native.acked as f64 / native.secs.max(1e-9),
        "msg/s",
    );
    s.put("native not confirmed", native.failed as f64, "msgs");
    s.put("native delivered rate", base.rate(), "msg/s");
    s.put(
        "native loss",
        100.0 * native.sent.saturating_sub(base.unique) as f64 / native.sent.max(1) as f64,
        "%",
    );
    s.put("native duplicates", base.duplicates as f64, "msgs");
    s.put("native reordered", base.reordered as f64, "msgs");
    put_prefixed(
        &mut s,
        "native: ",
        &step,
        &["broker CPU share", "harness CPU share"],
    );
    if base.rate() > 0.0 {
        s.put(
            "gateway / native delivered rate",
            100.0 * tally.rate() / base.rate(),
            "%",
        );
    }

    // 3. Beside it, the MQTT upstream's figure of this run.
    match earlier.iter().find(|e| e.id == 3 && !e.failed) {
        Some(mqtt) => {
            put_prefixed(
                &mut s,
                "MQTT upstream (scenario 3): ",
                mqtt,
                &["acknowledged rate", "delivered rate"],
            );
            if let Some(m) = mqtt.get("acknowledged rate").filter(|m| *m > 0.0) {
                s.put(
                    "AMQP / MQTT acknowledged rate",
                    100.0 * s.get("acknowledged rate").unwrap_or(0.0) / m,
                    "%",
                );
            }
        }
        None => s
            .notes
            .push("scenario 3 (the MQTT figure) did not run before this one".into()),
    }
    s.notes.push(format!(
        "delivered rates: first to last arrival at one auto-ack consumer of a durable queue; \
         persistent messages, {}-byte payloads, headers and message_id as the gateway sends",
        env.opts.payload
    ));
    note_warnings(&mut s, "gateway", &gw);
    drop(gw);
    drop(counter);
    drop(rabbit);
    Ok(s)
}

/// Scenario 9: the same QoS 1 uplink through a gateway with one upstream, then through one
/// with two (both MQTT, to the shared mosquitto, with their own client ids and
/// `remote_prefix`es, each counted by its own subscriber): the gateway's disk bytes per
/// acknowledged message, from the first publish until both upstreams have everything and
/// its writes settled (cursor saves included).
async fn fan_out_disk(env: &mut Env) -> anyhow::Result<Scenario> {
    let clients: usize = 1000;
    let per_client: u64 = if env.opts.quick { 20 } else { 100 };
    let mut s = Scenario::new(
        9,
        &format!(
            "Uplink fan-out to one and to two upstreams: disk bytes per message \
             ({} QoS 1 messages, {clients} clients)",
            clients as u64 * per_client
        ),
    );
    let _ = sys::raise_nofile(clients as u64 + 2000);
    let mut per_msg = Vec::new();
    for targets in [1u8, 2] {
        per_msg.push(fan_out_disk_run(env, &mut s, targets, clients, per_client).await?);
    }
    if let [Some(one), Some(two)] = per_msg[..] {
        if one.0 > 0.0 {
            s.put(
                "disk bytes per message: two upstreams / one",
                two.0 / one.0,
                "x",
            );
        }
        if one.1 > 0.0 {
            s.put("wchar per message: two upstreams / one", two.1 / one.1, "x");
        }
    }
    s.notes.push(
        "disk bytes: the gateway's write_bytes (/proc/<pid>/io) from the first publish until \
         every upstream has every message and the writes settled; wchar also counts socket \
         bytes sent with write(2)"
            .into(),
    );
    Ok(s)
}

/// Waiting for a draining gateway's last messages ends after this long without a new one (a
/// link reset under load waits for `ack_timeout` and a reconnect).
const DRAIN_IDLE: Duration = Duration::from_secs(10);

/// Notes the warnings in `gw`'s log (link resets explain duplicates and reordering).
fn note_warnings(s: &mut Scenario, label: &str, gw: &Gateway) {
    if let (n @ 1.., Some(last)) = gw.log_warnings() {
        s.notes.push(format!(
            "{label}: the gateway logged {n} warning(s); the last: {last}"
        ));
    }
}

/// Settled: the gateway's `write_bytes` unchanged for this long (the spool saves its cursors
/// every 100 ms while they change).
const IO_SETTLED: Duration = Duration::from_millis(500);

/// One run of scenario 9 with `targets` upstreams; returns write_bytes and wchar per
/// acknowledged message.
async fn fan_out_disk_run(
    env: &mut Env,
    s: &mut Scenario,
    targets: u8,
    clients: usize,
    per_client: u64,
) -> anyhow::Result<Option<(f64, f64)>> {
    let label = if targets == 1 {
        "one upstream"
    } else {
        "two upstreams"
    };
    let port = env.broker.port;
    let mut counters = Vec::new();
    let mut upstreams = String::new();
    for k in 1..=targets {
        counters.push(Counter::start_as(
            &format!("sg-bench-fan{targets}-{k}"),
            port,
            &[&format!("fan{k}/bench/#")],
            1,
        )?);
        upstreams.push_str(&format!(
            "[[upstream]]\nname = \"up{k}\"\nkind = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{port}\"\n\
             client_id = \"sg-bench-gw-fan{targets}-{k}\"\nremote_prefix = \"fan{k}/\"\n\
             backoff_max = \"1s\"\n{BENCH_UPSTREAM}\n"
        ));
    }
    let gw = env.gateway_with(
        port,
        &GatewayConfig {
            upstreams: Some(upstreams),
            ..GatewayConfig::new(clients + 100, "")
        },
    )?;
    let mut spec = env.spec(&gw);
    spec.clients = clients;
    spec.qos = 1;
    spec.messages = per_client;
    spec.publish_for = Duration::from_secs(30);
    let record = RecordSize::of(&spec);
    if targets == 1 {
        s.put(
            "record size (payload + topic + record header)",
            record.yardstick,
            "bytes",
        );
    }
    let mut load = Load::start(spec).await?;
    load.wait_ready(Duration::from_secs(30)).await;
    let io_before = sys::io(gw.pid());
    let cpu = Cpu::start(gw.pid(), env.broker.pid());
    load.start_publish();
    let secs = load
        .wait_published(Duration::from_secs(40))
        .await
        .as_secs_f64();
    let acked = count(&load.counters.acked);
    s.put(&format!("{label}: acknowledged"), acked as f64, "msgs");
    s.put(
        &format!("{label}: acknowledged rate"),
        acked as f64 / secs.max(1e-9),
        "msg/s",
    );
    let mut fewest = u64::MAX;
    let (mut duplicates, mut reordered) = (0, 0);
    for counter in &counters {
        let t = counter.wait_for(acked, DRAIN_IDLE, Duration::from_secs(60))?;
        fewest = fewest.min(t.unique);
        duplicates += t.duplicates;
        reordered += t.reordered;
    }
    load.finish().await;
    s.put(
        &format!("{label}: acknowledged but not delivered (worst upstream)"),
        acked.saturating_sub(fewest) as f64,
        "msgs",
    );
    s.put(
        &format!("{label}: duplicates (all upstreams)"),
        duplicates as f64,
        "msgs",
    );
    s.put(
        &format!("{label}: reordered (all upstreams)"),
        reordered as f64,
        "msgs",
    );
    let mut step = Scenario::new(0, "");
    cpu.put(&mut step, acked, "acknowledged msg");
    put_prefixed(
        s,
        &format!("{label}: "),
        &step,
        &["gateway CPU per acknowledged msg"],
    );
    // Until the cursor saves and segment removals are done.
    let settle_until = Instant::now() + Duration::from_secs(5);
    let mut io_after = sys::io(gw.pid());
    let mut since = Instant::now();
    while Instant::now() < settle_until && since.elapsed() < IO_SETTLED {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = sys::io(gw.pid());
        if now.map(|n| n.write_bytes) != io_after.map(|n| n.write_bytes) {
            since = Instant::now();
        }
        io_after = now;
    }
    note_warnings(s, label, &gw);
    drop(gw);
    drop(counters);
    let (Some(before), Some(after), true) = (io_before, io_after, acked > 0) else {
        s.notes.push(format!(
            "{label}: no disk bytes: /proc/<pid>/io unreadable, or nothing acknowledged"
        ));
        return Ok(None);
    };
    let io = after.since(&before);
    let per = |bytes: u64| bytes as f64 / acked as f64;
    s.put(
        &format!("{label}: disk bytes written per message (write_bytes)"),
        per(io.write_bytes),
        "bytes",
    );
    s.put(
        &format!("{label}: disk bytes per message / record size"),
        per(io.write_bytes) / record.yardstick,
        "x",
    );
    s.put(
        &format!("{label}: wchar per message"),
        per(io.wchar),
        "bytes",
    );
    Ok(Some((per(io.write_bytes), per(io.wchar))))
}

/// Scenarios 11-13's `[spool]`: fsync before every acknowledgement (the default, written out
/// because the issue's CON figure is for it).
const FSYNC_ALWAYS: &str = "fsync = \"always\"\n";

/// A fresh gateway with CoAP on (`coap`: lines after `listen` in `[coap]`) and room for
/// `max_clients` MQTT-SN sessions; returns it and its CoAP address.
fn coap_gateway(
    env: &mut Env,
    max_clients: usize,
    coap: &str,
) -> anyhow::Result<(Gateway, SocketAddr)> {
    let port = env.broker.port;
    let gw = env.gateway_with(
        port,
        &GatewayConfig {
            coap: Some(coap.to_owned()),
            spool: FSYNC_ALWAYS.to_owned(),
            ..GatewayConfig::new(max_clients, "")
        },
    )?;
    let addr = gw.coap.context("the gateway has no CoAP listener")?;
    Ok((gw, addr))
}

/// Copies every metric of `from` into `s`, prefixed.
fn put_all_prefixed(s: &mut Scenario, prefix: &str, from: &Scenario) {
    for m in &from.metrics {
        s.put(&format!("{prefix}{}", m.name), m.value, m.unit);
    }
}

/// Scenario 11: CoAP CON `PUT /ps/bench/<i>` from 1,000 devices, one outstanding request each
/// (NSTART = 1), each answered 2.04 only once its fsync landed (piggy-backed, or an empty
/// ACK and a separate response); scenario 3's MQTT-SN QoS 1 figures of this run beside it.
#[allow(clippy::too_many_lines)]
async fn coap_con_put(env: &mut Env, earlier: &[Scenario]) -> anyhow::Result<Scenario> {
    let devices: usize = 1000;
    // As scenario 3.
    let per_device: u64 = if env.opts.quick { 30 } else { 100 };
    let mut s = Scenario::new(
        11,
        &format!("CoAP CON PUT, {devices} devices, NSTART 1, fsync always"),
    );
    let _ = sys::raise_nofile(devices as u64 + 2000);
    let (gw, addr) = coap_gateway(env, 100, "")?;
    let mut spec = ConSpec::new(addr);
    spec.devices = devices;
    spec.messages = per_device;
    spec.payload = env.opts.payload;
    spec.publish_for = Duration::from_secs(30);
    env.counter.reset();
    let mut load = ConLoad::start(spec).await?;
    let cpu = Cpu::start(gw.pid(), env.broker.pid());
    load.go();
    let secs = load.wait_done(Duration::from_secs(40)).await.as_secs_f64();
    let c = load.counters.clone();
    let (sent, acked) = (count(&c.sent), count(&c.success));
    s.put("acknowledged", acked as f64, "reqs");
    s.put("acknowledged rate", acked as f64 / secs.max(1e-9), "req/s");
    s.put("5.03 answers", count(&c.unavailable) as f64, "reqs");
    s.put("other answer codes", count(&c.other_code) as f64, "reqs");
    s.put(
        "empty ACKs (separate response)",
        count(&c.empty_acks) as f64,
        "reqs",
    );
    s.put("separate responses", count(&c.separate) as f64, "reqs");
    s.put("retransmissions", count(&c.retransmits) as f64, "pkts");
    s.put("RSTs", count(&c.resets) as f64, "reqs");
    s.put("unanswered", count(&c.unanswered) as f64, "reqs");
    if let Ok(h) = load.latency.lock() {
        put_latency(&mut s, "PUT to 2.04", &h);
    }
    let tally = env.counter.wait_for(acked, IDLE, Duration::from_secs(30))?;
    load.finish().await;
    put_tally(&mut s, &tally, sent);
    s.put(
        "acknowledged but not delivered",
        acked.saturating_sub(tally.unique) as f64,
        "reqs",
    );
    put_latency(&mut s, "end-to-end latency", &tally.latency);
    // Measured as scenario 3 does: from the first request until everything is upstream.
    cpu.put(&mut s, acked, "acknowledged request");
    match earlier.iter().find(|e| e.id == 3 && !e.failed) {
        Some(sn) => {
            put_prefixed(
                &mut s,
                "MQTT-SN QoS 1 (scenario 3): ",
                sn,
                &[
                    "acknowledged rate",
                    "PUBLISH to PUBACK p50",
                    "PUBLISH to PUBACK p99",
                    "gateway CPU per acknowledged msg",
                ],
            );
            if let Some(rate) = sn.get("acknowledged rate").filter(|r| *r > 0.0) {
                s.put(
                    "CoAP / MQTT-SN acknowledged rate",
                    100.0 * s.get("acknowledged rate").unwrap_or(0.0) / rate,
                    "%",
                );
            }
            if let (Some(theirs), Some(ours)) = (
                sn.get("gateway CPU per acknowledged msg")
                    .filter(|c| *c > 0.0),
                s.get("gateway CPU per acknowledged request"),
            ) {
                s.put(
                    "CoAP / MQTT-SN gateway CPU per message",
                    100.0 * ours / theirs,
                    "%",
                );
            }
        }
        None => s.notes.push(
            "scenario 3 (MQTT-SN QoS 1, 1,000 clients) did not run before this one: no \
             comparison (run e.g. --only 3,11)"
                .into(),
        ),
    }
    note_warnings(&mut s, "gateway", &gw);
    Ok(s)
}

/// Scenario 12's offered rate.
const COAP_NON_RATE: f64 = 100_000.0;

/// Scenario 12: NON `PUT /ps/bench/<d>` paced at [`COAP_NON_RATE`] from one device, first
/// answered (a NON 2.04 per request, as libcoap's `-N` expects), then with No-Response = 2
/// (RFC 7967: no 2.xx answers). Loss upstream, with the kernel's drops at the gateway's socket
/// apart (as scenario 1).
async fn coap_non_paced(env: &mut Env) -> anyhow::Result<Scenario> {
    let secs = if env.opts.quick { 2.0 } else { 5.0 };
    let messages = (COAP_NON_RATE * secs) as u64;
    let mut s = Scenario::new(
        12,
        &format!(
            "CoAP NON PUT paced at {COAP_NON_RATE:.0} msg/s from one device ({messages} msgs), \
             answered and with No-Response"
        ),
    );
    let (gw, addr) = coap_gateway(env, 100, "")?;
    for (label, no_response, device) in [("answered", false, 0u32), ("No-Response", true, 1)] {
        let mut spec = NonSpec::new(addr);
        spec.device = device;
        spec.messages = messages;
        spec.rate = COAP_NON_RATE;
        spec.publish_for = Duration::from_secs_f64(secs + 10.0);
        spec.payload = env.opts.payload;
        spec.no_response = no_response;
        env.counter.reset();
        let drops_before = sys::udp_drops(addr);
        let cpu = Cpu::start(gw.pid(), env.broker.pid());
        let r = non_put(&spec).await?;
        let tally = env
            .counter
            .wait_for(r.sent, IDLE, Duration::from_secs(30))?;
        let drops_after = sys::udp_drops(addr);
        let mut step = Scenario::new(0, "");
        let offered = r.sent as f64 / r.secs.max(1e-9);
        step.put("offered", offered, "msg/s");
        if offered < PACED_OFFERED_SHARE * COAP_NON_RATE {
            s.notes.push(format!(
                "{label}: the generator offered only {offered:.0} msg/s (it fell behind)"
            ));
        }
        step.put("sent", r.sent as f64, "msgs");
        put_tally(&mut step, &tally, r.sent);
        step.put("lost", r.sent.saturating_sub(tally.unique) as f64, "msgs");
        if let (Some(before), Some(after)) = (drops_before, drops_after) {
            let kernel = after.saturating_sub(before);
            step.put("kernel drops at the gateway socket", kernel as f64, "msgs");
            step.put(
                "lost inside the gateway",
                r.sent.saturating_sub(tally.unique).saturating_sub(kernel) as f64,
                "msgs",
            );
        }
        if !no_response {
            step.put("2.xx answers", r.answered as f64, "msgs");
            step.put(
                "requests without an answer",
                r.sent.saturating_sub(r.answered + r.other) as f64,
                "msgs",
            );
        }
        step.put("other answers", r.other as f64, "msgs");
        if let Some(drops) = r.device_drops {
            step.put("kernel drops at the device socket", drops as f64, "msgs");
        }
        put_latency(&mut step, "latency", &tally.latency);
        cpu.put(&mut step, tally.unique, "delivered msg");
        put_all_prefixed(&mut s, &format!("{label}: "), &step);
    }
    note_warnings(&mut s, "gateway", &gw);
    Ok(s)
}

/// Scenario 13's observations per observer socket: within the gateway's default
/// `max_observers_per_peer` (32).
const OBSERVER_TOKENS: usize = 20;

/// Scenario 13: `sockets` × [`OBSERVER_TOKENS`] CoAP observations of `/ps/bench/fan` (QoS 0:
/// NON notifications, but for the periodic CON check, which the observers ACK), then QoS 0
/// messages from a native MQTT publisher to `bench/fan`: notifications/s and gateway CPU per
/// notification.
#[allow(clippy::too_many_lines)]
async fn coap_observers(env: &mut Env) -> anyhow::Result<Scenario> {
    let (sockets, messages): (usize, u64) = if env.opts.quick {
        (100, 50)
    } else {
        (500, 100)
    };
    let observers = sockets * OBSERVER_TOKENS;
    let mut s = Scenario::new(
        13,
        &format!(
            "CoAP Observe fan-out: {observers} observations ({sockets} peers x \
             {OBSERVER_TOKENS} tokens) of one topic, {messages} QoS 0 messages"
        ),
    );
    let _ = sys::raise_nofile(sockets as u64 + 2000);
    let (gw, addr) = coap_gateway(env, 100, "")?;
    let mut spec = ObserveSpec::new(addr);
    spec.sockets = sockets;
    spec.tokens = OBSERVER_TOKENS;
    spec.latency_client = Some(1);
    let obs = Observers::start(spec).await?;
    let registered = obs.wait_registered(Duration::from_secs(60)).await;
    let c = obs.counters.clone();
    s.put("observations registered", registered as f64, "");
    s.put(
        "registrations refused",
        (count(&c.exchanges.unavailable) + count(&c.exchanges.other_code)) as f64,
        "",
    );
    s.put(
        "registrations unanswered",
        (count(&c.exchanges.unanswered) + count(&c.exchanges.resets)) as f64,
        "",
    );
    s.put(
        "registration retransmissions",
        count(&c.exchanges.retransmits) as f64,
        "pkts",
    );
    let native = |client: u32, messages: u64| Native {
        port: env.broker.port,
        topic: "bench/fan".into(),
        client,
        messages,
        qos: 0,
        payload: env.opts.payload,
        rate: None,
        max: Duration::from_secs(20),
        window: None,
        seq_property: false,
    };
    // Warm-up messages until one is notified: then the upstream subscription is in place.
    for _ in 0..20 {
        baseline::publish(&native(0, 1)).await?;
        obs.wait_notifications(1, Duration::from_millis(500), Duration::from_millis(500))
            .await;
        if obs.notifications() > 0 {
            break;
        }
    }
    let mut seen = 0;
    loop {
        obs.wait_notifications(seen + 1, Duration::from_millis(500), Duration::from_secs(5))
            .await;
        let now = obs.notifications();
        if now == seen {
            break;
        }
        seen = now;
    }
    let warm = obs.notifications();
    let con_warm = count(&c.con_notifications);
    let drops_before = obs.kernel_drops();
    let cpu = Cpu::start(gw.pid(), env.broker.pid());
    let start_ns = crate::elapsed_ns();
    baseline::publish(&native(1, messages)).await?;
    let expected = registered * messages;
    obs.wait_notifications(warm + expected, IDLE, Duration::from_secs(60))
        .await;
    let got = obs.notifications().saturating_sub(warm);
    let last = count(&c.last_ns);
    let secs = last.saturating_sub(start_ns) as f64 / 1e9;
    let mut step = Scenario::new(0, "");
    cpu.put(&mut step, got, "notification");
    s.put("notifications", got as f64, "msgs");
    s.put(
        "loss",
        100.0 * expected.saturating_sub(got) as f64 / expected.max(1) as f64,
        "%",
    );
    s.put(
        "notification rate",
        got as f64 / secs.max(1e-9),
        "notifications/s",
    );
    s.put(
        "CON notifications (ACKed)",
        count(&c.con_notifications).saturating_sub(con_warm) as f64,
        "msgs",
    );
    if let (Some(before), Some(after)) = (drops_before, obs.kernel_drops()) {
        s.put(
            "kernel drops at the observer sockets",
            after.saturating_sub(before) as f64,
            "msgs",
        );
    }
    let latency = obs.latency.clone();
    obs.finish().await;
    if let Ok(h) = latency.lock() {
        put_latency(&mut s, "publish to notification", &h);
    }
    put_all_prefixed(&mut s, "", &step);
    note_warnings(&mut s, "gateway", &gw);
    Ok(s)
}

/// Scenarios 14-15's `[http]` lines after `listen`: the per-device rate limit far above any
/// bench load (checked on every request, never refusing); the rest is the defaults.
const HTTP_RATE: &str = "rate_per_device = 1000000.0\n";

/// A fresh gateway with HTTP on (`devices` as `[[http.device]]` bearer-token devices,
/// [`HTTP_RATE`], `--http-workers` if given) and `[spool] fsync = "always"`; returns it and its HTTP address.
fn http_gateway(env: &mut Env, devices: &[Device]) -> anyhow::Result<(Gateway, SocketAddr)> {
    let port = env.broker.port;
    let workers = env
        .opts
        .http_workers
        .map_or_else(String::new, |n| format!("worker_threads = {n}\n"));
    let gw = env.gateway_with(
        port,
        &GatewayConfig {
            http: Some(format!(
                "{HTTP_RATE}{workers}\n{}",
                http::device_tables(devices)
            )),
            spool: FSYNC_ALWAYS.to_owned(),
            ..GatewayConfig::new(100, "")
        },
    )?;
    let addr = gw.http.context("the gateway has no HTTP listener")?;
    Ok((gw, addr))
}

/// The counters of an HTTP load's answers, its first problem and the HTTP runtime's threads
/// as notes.
fn put_http_answers(s: &mut Scenario, load: &HttpLoad, workers: Option<usize>) {
    s.notes.push(match workers {
        Some(n) => format!("[http] worker_threads = {n} (--http-workers)"),
        None => "[http] worker_threads: the gateway's default".into(),
    });
    let c = &load.counters;
    s.put("requests sent", count(&c.sent) as f64, "reqs");
    s.put("200 answers", count(&c.ok) as f64, "reqs");
    s.put("202 answers", count(&c.accepted) as f64, "reqs");
    s.put("429 answers", count(&c.rate_limited) as f64, "reqs");
    s.put("503 answers", count(&c.unavailable) as f64, "reqs");
    s.put("other answers", count(&c.other_status) as f64, "reqs");
    s.put("unanswered", count(&c.unanswered) as f64, "reqs");
    s.put("reconnections", count(&c.reconnects) as f64, "");
    if count(&c.failed) > 0 {
        s.put("connections failed", count(&c.failed) as f64, "");
    }
    if let Some(p) = load.problem() {
        s.notes
            .push(format!("first problem seen by the HTTP clients: {p}"));
    }
}

/// Scenario 14: HTTP QoS 1 `POST /v1/publish/bench/h/<i>` from 100 keep-alive connections,
/// each its own device with its own bearer token, one request outstanding each, answered 200
/// only once the fsync covering it landed; the MQTT-SN QoS 1 figures of this run (scenario
/// 3, and 10 with the same concurrency) beside it.
#[allow(clippy::too_many_lines)]
async fn http_qos1(env: &mut Env, earlier: &[Scenario]) -> anyhow::Result<Scenario> {
    let connections: usize = 100;
    let per_connection: u64 = if env.opts.quick { 200 } else { 1000 };
    let mut s = Scenario::new(
        14,
        &format!(
            "HTTP QoS 1 publish, {connections} keep-alive connections x {per_connection} \
             requests, window 1, bearer tokens, fsync always"
        ),
    );
    let _ = sys::raise_nofile(connections as u64 + 2000);
    let devices = http::devices(connections);
    let (gw, addr) = http_gateway(env, &devices)?;
    let mut spec = HttpSpec::new(addr);
    spec.connections = connections;
    spec.requests = per_connection;
    spec.tokens = devices.into_iter().map(|d| d.token).collect();
    spec.payload = env.opts.payload;
    spec.publish_for = Duration::from_secs(60);
    env.counter.reset();
    let mut load = HttpLoad::start(spec)?;
    let connected = load.wait_ready(Duration::from_secs(30)).await;
    s.put("connections", connected as f64, "");
    let cpu = Cpu::start(gw.pid(), env.broker.pid());
    load.go();
    let secs = load.wait_done(Duration::from_secs(70)).await.as_secs_f64();
    let c = load.counters.clone();
    let (sent, durable) = (count(&c.sent), count(&c.durable));
    s.put("durable (200)", durable as f64, "reqs");
    s.put("durable rate", durable as f64 / secs.max(1e-9), "req/s");
    put_http_answers(&mut s, &load, env.opts.http_workers);
    if let Ok(h) = load.latency.lock() {
        put_latency(&mut s, "request to 200", &h);
    }
    let tally = env
        .counter
        .wait_for(durable, IDLE, Duration::from_secs(30))?;
    load.finish().await;
    put_tally(&mut s, &tally, sent);
    s.put(
        "durable but not delivered",
        durable.saturating_sub(tally.unique) as f64,
        "reqs",
    );
    put_latency(&mut s, "end-to-end latency", &tally.latency);
    // Measured as scenario 3 does: from the first request until everything is upstream.
    cpu.put(&mut s, durable, "durable request");
    let mut beside = false;
    for (id, label) in [
        (3u8, "scenario 3, 1,000 clients"),
        (10, "scenario 10, 100 clients"),
    ] {
        let Some(sn) = earlier.iter().find(|e| e.id == id && !e.failed) else {
            continue;
        };
        beside = true;
        let prefix = format!("MQTT-SN QoS 1 ({label}): ");
        put_prefixed(
            &mut s,
            &prefix,
            sn,
            &[
                "acknowledged rate",
                "PUBLISH to PUBACK p50",
                "PUBLISH to PUBACK p99",
                "gateway CPU per acknowledged msg",
            ],
        );
        if let Some(rate) = sn.get("acknowledged rate").filter(|r| *r > 0.0) {
            s.put(
                &format!("HTTP / MQTT-SN ({label}) acknowledged rate"),
                100.0 * s.get("durable rate").unwrap_or(0.0) / rate,
                "%",
            );
        }
        if let (Some(theirs), Some(ours)) = (
            sn.get("gateway CPU per acknowledged msg")
                .filter(|c| *c > 0.0),
            s.get("gateway CPU per durable request"),
        ) {
            s.put(
                &format!("HTTP / MQTT-SN ({label}) gateway CPU per message"),
                100.0 * ours / theirs,
                "%",
            );
        }
    }
    if !beside {
        s.notes.push(
            "neither scenario 3 nor 10 (MQTT-SN QoS 1) ran before this one: no comparison \
             (run e.g. --only 3,10,14)"
                .into(),
        );
    }
    note_warnings(&mut s, "gateway", &gw);
    Ok(s)
}

/// Scenario 15's readings per request: the gateway's default `max_batch_items`.
const HTTP_BATCH: usize = 1000;

/// Scenario 15: batches of [`HTTP_BATCH`] QoS 1 readings (`POST /v1/publish`, a JSON array,
/// payloads in `payload_b64`) from 10 keep-alive connections, one request outstanding each,
/// answered 200 once every reading is durable: readings/s durable and the request latency.
async fn http_batches(env: &mut Env) -> anyhow::Result<Scenario> {
    let connections: usize = 10;
    let per_connection: u64 = if env.opts.quick { 20 } else { 100 };
    let readings = connections as u64 * per_connection * HTTP_BATCH as u64;
    let mut s = Scenario::new(
        15,
        &format!(
            "HTTP QoS 1 batches of {HTTP_BATCH} readings, {connections} keep-alive connections \
             x {per_connection} requests ({readings} readings), window 1, fsync always"
        ),
    );
    let devices = http::devices(connections);
    let (gw, addr) = http_gateway(env, &devices)?;
    let mut spec = HttpSpec::new(addr);
    spec.connections = connections;
    spec.requests = per_connection;
    spec.batch = Some(HTTP_BATCH);
    spec.topic_prefix = "bench/b/".into();
    spec.tokens = devices.into_iter().map(|d| d.token).collect();
    spec.payload = env.opts.payload;
    spec.publish_for = Duration::from_secs(90);
    spec.answer_timeout = Duration::from_secs(30);
    env.counter.reset();
    let mut load = HttpLoad::start(spec)?;
    let connected = load.wait_ready(Duration::from_secs(30)).await;
    s.put("connections", connected as f64, "");
    let cpu = Cpu::start(gw.pid(), env.broker.pid());
    load.go();
    let secs = load.wait_done(Duration::from_secs(100)).await.as_secs_f64();
    let c = load.counters.clone();
    let durable = count(&c.durable);
    let sent_readings = count(&c.sent) * HTTP_BATCH as u64;
    s.put("readings durable", durable as f64, "msgs");
    s.put("durable rate", durable as f64 / secs.max(1e-9), "msg/s");
    put_http_answers(&mut s, &load, env.opts.http_workers);
    if let Ok(h) = load.latency.lock() {
        put_latency(&mut s, "request to 200", &h);
    }
    let tally = env
        .counter
        .wait_for(durable, DRAIN_IDLE, Duration::from_secs(120))?;
    load.finish().await;
    put_tally(&mut s, &tally, sent_readings);
    s.put(
        "durable but not delivered",
        durable.saturating_sub(tally.unique) as f64,
        "msgs",
    );
    put_latency(&mut s, "end-to-end latency", &tally.latency);
    cpu.put(&mut s, durable, "durable reading");
    s.notes.push(
        "delivered rate: first to last arrival at the counting subscriber (the upstream \
         drains the spool behind the acknowledgements)"
            .into(),
    );
    note_warnings(&mut s, "gateway", &gw);
    Ok(s)
}

/// Scenarios 16-17's line: 115200 baud, 8N1 (10 bits on the wire per byte).
const SERIAL_BAUD: u32 = 115_200;
/// Scenario 16's configured line rate: `[[serial]] baud`'s maximum, so the gateway's own pacing
/// of its writes (PUBACKs) does not cap the unthrottled run at 115200 baud.
const SERIAL_BAUD_UNPACED: u32 = 4_000_000;
/// Bits per byte on an 8N1 line: start, 8 data, stop.
const SERIAL_BITS_PER_CHAR: u32 = 10;
/// QoS 1 messages the serial sensor keeps unacknowledged: `[mqttsn]
/// max_inflight_per_client`'s default.
const SERIAL_WINDOW: usize = 16;

/// Scenarios 16 (unthrottled) and 17 (paced at 115200 8N1): one sensor on a pty pair
/// publishes QoS 1 in length framing through the gateway's `[[serial]]` line; messages/s,
/// the share of a 115200-baud line the bytes would take (bytes on the wire / (baud / 10 per
/// s)), gateway CPU per message.
async fn serial_qos1(env: &mut Env, id: u8, paced: bool) -> anyhow::Result<Scenario> {
    let messages: u64 = match (paced, env.opts.quick) {
        (false, true) => 2_000,
        (false, false) => 50_000,
        (true, true) => 300,
        (true, false) => 5_000,
    };
    let mut s = Scenario::new(
        id,
        &format!(
            "serial QoS 1, length framing, one sensor on a pty pair, window {SERIAL_WINDOW}, \
             {messages} msgs, {}",
            if paced {
                "paced at 115200 8N1"
            } else {
                "unthrottled (pty: an upper bound)"
            }
        ),
    );
    let pty_dir = env.dir.path().join(format!("pty-{}", env.runs + 1));
    std::fs::create_dir_all(&pty_dir)?;
    let pty = PtyPair::start(&pty_dir, "line")?;
    let port = env.broker.port;
    let gw = env.gateway_with(
        port,
        &GatewayConfig {
            serial: format!(
                "[[serial]]\ndevice = \"{}\"\nbaud = {}\nframing = \"length\"\n",
                pty.gw().display(),
                if paced {
                    SERIAL_BAUD
                } else {
                    SERIAL_BAUD_UNPACED
                }
            ),
            ..GatewayConfig::new(100, "")
        },
    )?;
    let spec = SerialSpec {
        device: pty.sensor().to_path_buf(),
        messages,
        window: SERIAL_WINDOW,
        payload: env.opts.payload,
        client: 1_000_000 + u32::from(id),
        pace: paced.then_some((SERIAL_BAUD, SERIAL_BITS_PER_CHAR)),
        max: Duration::from_secs(if env.opts.quick { 30 } else { 120 }),
    };
    env.counter.reset();
    let cpu = Cpu::start(gw.pid(), env.broker.pid());
    let r = crate::serial::run(&spec, &format!("serial-bench-{}", env.runs)).await?;
    let secs = r.secs.max(1e-9);
    s.put("sent", r.sent as f64, "msgs");
    s.put("acknowledged", r.acked as f64, "msgs");
    s.put("acknowledged rate", r.acked as f64 / secs, "msg/s");
    let line_bytes_per_s = f64::from(SERIAL_BAUD) / f64::from(SERIAL_BITS_PER_CHAR);
    s.put("uplink bytes on the wire", r.bytes_up as f64 / secs, "B/s");
    s.put(
        "line share up (of 115200 8N1)",
        100.0 * r.bytes_up as f64 / secs / line_bytes_per_s,
        "%",
    );
    s.put(
        "line share down (of 115200 8N1)",
        100.0 * r.bytes_down as f64 / secs / line_bytes_per_s,
        "%",
    );
    cpu.put(&mut s, r.acked, "acknowledged msg");
    let tally = env
        .counter
        .wait_for(r.acked, IDLE, Duration::from_secs(30))?;
    put_tally(&mut s, &tally, r.sent);
    put_latency(&mut s, "end-to-end latency", &tally.latency);
    if !paced {
        s.notes.push(
            "a pty ignores the baud rate: the line shares say how many 115200-baud lines' \
             worth of bytes the gateway carried (its [[serial]] baud is 4000000, so its own \
             pacing does not cap the run)"
                .into(),
        );
    }
    note_warnings(&mut s, "gateway", &gw);
    drop(gw);
    drop(pty);
    Ok(s)
}

/// Scenario 18's clients: scenario 10's hundred, window 1 at QoS 1.
const DTLS_CLIENTS: usize = 100;

/// Scenario 18's paced QoS 0 rate over all clients (quick: a quarter), well below what plain
/// UDP and DTLS carry here without loss, so that CPU per message and latency compare at equal
/// load.
const DTLS_QOS0_RATE: f64 = 20_000.0;

/// Scenario 18's paced QoS 1 rate over all clients (quick: a quarter): below what the
/// upstream broker and the counting subscriber take, so that neither run builds a backlog
/// (unpaced, plain UDP outruns them and its drain reads the spool back from disk, DTLS does
/// not: their CPU per message would not compare).
const DTLS_QOS1_RATE: f64 = 10_000.0;

/// A fresh gateway for one run of scenario 18 or 19: room for `clients` MQTT-SN sessions and,
/// with `dtls_ids`, `[mqttsn] dtls_listen` with one `[[psk]]` per ClientId (each its own
/// identity, the bench key) and `[dtls] max_sessions` above their number (the default
/// `max_handshakes`, 1,000, is above any concurrency used here).
fn dtls_gateway(
    env: &mut Env,
    clients: usize,
    dtls_ids: Option<Vec<String>>,
) -> anyhow::Result<Gateway> {
    let port = env.broker.port;
    let dtls = dtls_ids.map(|ids| {
        format!(
            "[dtls]\nmax_sessions = {}\n\n{}",
            ids.len() + 100,
            crate::dtls::psk_tables(ids)
        )
    });
    env.gateway_with(
        port,
        &GatewayConfig {
            dtls,
            ..GatewayConfig::new(clients + 100, "")
        },
    )
}

/// One run of scenario 18: `DTLS_CLIENTS` clients over plain UDP or DTLS, at `qos` (1: window
/// 1, `per_client` messages each; 0: paced at `rate` in all for `secs`), each on a fresh
/// gateway. Figures: rate, delivery, latency, gateway CPU per message (the clients' DTLS work
/// is the harness's, another process).
async fn sn_run(
    env: &mut Env,
    dtls: bool,
    qos: i8,
    per_client: u64,
    rate: Option<f64>,
) -> anyhow::Result<Scenario> {
    let clients = DTLS_CLIENTS;
    let prefix = format!("{}{qos}-", if dtls { "dq" } else { "pq" });
    let ids = dtls.then(|| (0..clients).map(|i| format!("{prefix}{i}")).collect());
    let gw = dtls_gateway(env, clients, ids)?;
    let mut spec = env.spec(&gw);
    spec.id_prefix = prefix;
    spec.clients = clients;
    spec.qos = qos;
    spec.messages = per_client;
    spec.rate = rate;
    spec.publish_for = Duration::from_secs(30);
    if dtls {
        spec.gateway = gw.dtls.context("the gateway has no DTLS listener")?;
        spec.dtls = true;
    }
    let mut sub = Scenario::new(0, "");
    env.counter.reset();
    let mut load = Load::start(spec).await?;
    let setup = load.wait_ready(Duration::from_secs(60)).await;
    let c = &load.counters;
    sub.put("clients ready", count(&c.ready) as f64, "");
    if dtls {
        sub.put("handshakes failed", count(&c.handshakes_failed) as f64, "");
    }
    sub.put("set-up time", setup.as_secs_f64(), "s");
    let cpu = Cpu::start(gw.pid(), env.broker.pid());
    load.start_publish();
    let secs = load
        .wait_published(Duration::from_secs(40))
        .await
        .as_secs_f64();
    let c = &load.counters;
    let (sent, acked) = (count(&c.sent), count(&c.acked));
    if qos >= 1 {
        sub.put("acknowledged", acked as f64, "msgs");
        sub.put("acknowledged rate", acked as f64 / secs.max(1e-9), "msg/s");
        sub.put("rejected", count(&c.rejected) as f64, "msgs");
        sub.put("retransmissions", count(&c.retransmits) as f64, "pkts");
        sub.put("unanswered", count(&c.unanswered) as f64, "msgs");
        if let Ok(h) = load.ack_latency.lock() {
            put_latency(&mut sub, "PUBLISH to PUBACK", &h);
        }
    } else {
        sub.put("offered rate", sent as f64 / secs.max(1e-9), "msg/s");
    }
    let expect = if qos >= 1 { acked } else { sent };
    let tally = env
        .counter
        .wait_for(expect, IDLE, Duration::from_secs(30))?;
    put_tally(&mut sub, &tally, sent);
    put_latency(&mut sub, "end-to-end latency", &tally.latency);
    let per = if qos >= 1 { acked } else { tally.unique };
    cpu.put(&mut sub, per, "msg");
    load.finish().await;
    let (warnings, last) = gw.log_warnings();
    if warnings > 0 {
        sub.notes.push(format!(
            "{} gateway: {warnings} warning(s) in its log, the last: {}",
            if dtls { "DTLS" } else { "plain" },
            last.unwrap_or_default()
        ));
    }
    Ok(sub)
}

/// Scenario 18: MQTT-SN over DTLS 1.2 (PSK_AES128_CCM_8) beside plain UDP, the same load
/// over each on a fresh gateway, [`DTLS_CLIENTS`] clients: QoS 1 window 1 unpaced (scenario
/// 10's load: the acknowledged rate), QoS 1 window 1 paced at [`DTLS_QOS1_RATE`] and QoS 0
/// paced at [`DTLS_QOS0_RATE`] (CPU per message and latency at equal load); the DTLS / plain
/// ratios. The handshakes happen during set-up, before the measured phase.
async fn dtls_vs_plain(env: &mut Env) -> anyhow::Result<Scenario> {
    // Paced runs of 10 s: CPU time comes in 10 ms ticks, and this machine's speed drifts.
    let (per_client, scale, secs) = if env.opts.quick {
        (200, 0.25, 2.0)
    } else {
        (2_500, 1.0, 10.0)
    };
    let (q1_rate, q0_rate) = (DTLS_QOS1_RATE * scale, DTLS_QOS0_RATE * scale);
    let mut s = Scenario::new(
        18,
        &format!(
            "MQTT-SN over DTLS 1.2 PSK (PSK_AES128_CCM_8) beside plain UDP, {DTLS_CLIENTS} \
             clients: QoS 1 window 1 unpaced ({per_client} msgs each) and paced at \
             {q1_rate:.0} msg/s, QoS 0 paced at {q0_rate:.0} msg/s, {secs:.0} s each"
        ),
    );
    let _ = sys::raise_nofile(DTLS_CLIENTS as u64 + 2000);
    let paced = |rate: f64| (rate * secs / DTLS_CLIENTS as f64) as u64;
    for (label, qos, per, rate) in [
        ("QoS 1 unpaced", 1i8, per_client, None),
        ("QoS 1 paced", 1, paced(q1_rate), Some(q1_rate)),
        ("QoS 0 paced", 0, paced(q0_rate), Some(q0_rate)),
    ] {
        let plain = sn_run(env, false, qos, per, rate).await?;
        let dtls = sn_run(env, true, qos, per, rate).await?;
        put_all_prefixed(&mut s, &format!("{label} plain: "), &plain);
        put_all_prefixed(&mut s, &format!("{label} DTLS: "), &dtls);
        s.notes
            .extend(plain.notes.iter().chain(&dtls.notes).cloned());
        let ratio = |m: &str| match (dtls.get(m), plain.get(m)) {
            (Some(d), Some(p)) if p > 0.0 => Some(d / p),
            _ => None,
        };
        let rate_name = if qos >= 1 {
            "acknowledged rate"
        } else {
            "delivered rate"
        };
        for (name, m) in [
            ("gateway CPU per msg", "gateway CPU per msg"),
            (rate_name, rate_name),
            ("PUBLISH to PUBACK p50", "PUBLISH to PUBACK p50"),
            ("PUBLISH to PUBACK p99", "PUBLISH to PUBACK p99"),
            ("end-to-end p50", "end-to-end latency p50"),
            ("end-to-end p99", "end-to-end latency p99"),
        ] {
            if let Some(r) = ratio(m) {
                s.put(&format!("{label}: DTLS / plain {name}"), r, "x");
            }
        }
    }
    s.notes.push(
        "each run on a fresh gateway (plain: no DTLS listener); the clients' DTLS work is \
         the harness's CPU, not the gateway's; unpaced QoS 1 over plain UDP can outrun the \
         broker (then its end-to-end latency and CPU include a backlog drained from disk)"
            .into(),
    );
    Ok(s)
}

/// Scenario 19's handshakes in flight at once.
const HANDSHAKES_IN_FLIGHT: usize = 64;

/// Scenario 19's bound on one device's handshake and CONNECT.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(20);

/// One part of scenario 19: `n` devices open their sessions (over DTLS: cookie round trip,
/// full PSK handshake; then CONNECT/CONNACK), [`HANDSHAKES_IN_FLIGHT`] at a time, each from
/// its own source port, against a fresh gateway; all stay open while the gateway's memory is
/// sampled, then close (DISCONNECT, close_notify).
#[allow(clippy::too_many_lines)]
async fn open_sessions(env: &mut Env, n: usize, dtls: bool) -> anyhow::Result<Scenario> {
    use crate::dtls::{OpenFailure, Opened, open_session};
    let prefix = if dtls { "hs-" } else { "hp-" };
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let gw = dtls_gateway(env, n, dtls.then(|| ids.clone()))?;
    let at = if dtls {
        gw.dtls.context("the gateway has no DTLS listener")?
    } else {
        gw.addr
    };
    let mut sub = Scenario::new(0, "");
    let before = sample(gw.pid());
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_IN_FLIGHT));
    // Bound on the whole part: every device's own bound, the in-flight limit, a margin.
    let overall = Instant::now()
        + HANDSHAKE_DEADLINE
            * u32::try_from(n.div_ceil(HANDSHAKES_IN_FLIGHT))
                .unwrap_or(1)
                .min(15)
        + Duration::from_secs(30);
    let cpu = Cpu::gateway_only(gw.pid());
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for (i, id) in ids.into_iter().enumerate() {
        let gate = gate.clone();
        let bind = SocketAddr::new(crate::generator::source_ip(i), 0);
        tasks.push(tokio::spawn(async move {
            let Ok(_permit) = gate.acquire_owned().await else {
                return Err(OpenFailure::NotStarted);
            };
            let now = Instant::now();
            if now >= overall {
                return Err(OpenFailure::NotStarted);
            }
            let deadline = (now + HANDSHAKE_DEADLINE).min(overall);
            let opened =
                open_session(bind, at, dtls, &id, 600, Duration::from_secs(1), deadline).await;
            opened.map(|o| (o, Instant::now()))
        }));
    }
    let mut open: Vec<Opened> = Vec::with_capacity(n);
    let mut failures: std::collections::BTreeMap<OpenFailure, u64> = Default::default();
    let (mut handshake_h, mut connack_h) = (crate::new_histogram(), crate::new_histogram());
    let (mut timer_fired, mut connect_retries, mut last_done) = (0u64, 0u64, start);
    for t in tasks {
        let left = overall.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
        match tokio::time::timeout(left, t).await {
            Ok(Ok(Ok((o, done)))) => {
                if let Some(h) = o.handshake {
                    let _ = handshake_h
                        .record(u64::try_from(h.took.as_micros()).unwrap_or(u64::MAX).max(1));
                    timer_fired += u64::from(h.timer_fired);
                }
                let _ = connack_h.record(
                    u64::try_from(o.connack.as_micros())
                        .unwrap_or(u64::MAX)
                        .max(1),
                );
                connect_retries += u64::from(o.connect_retries);
                last_done = last_done.max(done);
                open.push(o);
            }
            Ok(Ok(Err(f))) => *failures.entry(f).or_default() += 1,
            // A panicked task or one past the bound (aborted when its handle drops).
            Ok(Err(_)) | Err(_) => *failures.entry(OpenFailure::NotStarted).or_default() += 1,
        }
    }
    let wall = last_done.duration_since(start).as_secs_f64().max(1e-9);
    let ok = open.len() as u64;
    let what = if dtls {
        "handshake + CONNECT"
    } else {
        "CONNECT"
    };
    sub.put("sessions opened", ok as f64, "");
    sub.put("failed", failures.values().sum::<u64>() as f64, "");
    for (f, k) in &failures {
        sub.notes.push(format!(
            "{}: {k} failed: {}",
            if dtls { "DTLS" } else { "plain" },
            f.label()
        ));
    }
    sub.put("sessions/s", ok as f64 / wall, "sessions/s");
    if dtls {
        put_latency(&mut sub, "handshake time", &handshake_h);
        sub.put("handshake flights resent", timer_fired as f64, "");
    }
    put_latency(&mut sub, "CONNECT to CONNACK", &connack_h);
    sub.put("CONNECTs resent", connect_retries as f64, "");
    cpu.put(&mut sub, ok, what);
    let all_open = sample(gw.pid());
    // The gateway's own account: every handshake came through the cookie round trip.
    let events_open = if dtls {
        gw.ingress_events("mqtt-sn").unwrap_or_default()
    } else {
        Default::default()
    };
    for name in [
        "dtls_hello_verify_sent",
        "dtls_handshakes_started",
        "dtls_handshakes_ok",
        "dtls_sessions_open",
    ] {
        if let Some(v) = events_open.get(name) {
            sub.put(&format!("gateway {name}"), *v as f64, "");
        }
    }
    let failed_at_gateway: u64 = events_open
        .iter()
        .filter(|(k, _)| k.starts_with("dtls_handshakes_failed_"))
        .map(|(_, v)| *v)
        .sum();
    if dtls && !events_open.is_empty() {
        sub.put(
            "gateway dtls_handshakes_failed_*",
            failed_at_gateway as f64,
            "",
        );
    }
    sub.put("RSS before", before.rss_kb as f64 / 1024.0, "MiB");
    sub.put(
        "RSS with all sessions open",
        all_open.rss_kb as f64 / 1024.0,
        "MiB",
    );
    sub.put(
        "RSS per open session",
        all_open.rss_kb.saturating_sub(before.rss_kb) as f64 * 1024.0 / ok.max(1) as f64,
        "bytes",
    );
    // Closed in steps of the in-flight bound (DISCONNECT and close_notify are not resent: a
    // burst of 20,000 datagrams could overrun the gateway's receive buffer).
    for chunk in open.chunks_mut(HANDSHAKES_IN_FLIGHT) {
        for o in chunk {
            o.close().await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Sessions are freed as the DISCONNECTs (and close_notify) arrive; sample once they had
    // time to (over DTLS: until the gateway counts none open, at most 5 s).
    let mut after = sample(gw.pid());
    let mut events = Default::default();
    for k in 0..250 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = sample(gw.pid());
        if dtls && k % 10 == 9 {
            events = gw.ingress_events("mqtt-sn").unwrap_or_default();
            if events.get("dtls_sessions_open") == Some(&0) {
                break;
            }
        } else if !dtls && k >= 50 {
            break;
        }
    }
    drop(open);
    sub.put("RSS after closing", after.rss_kb as f64 / 1024.0, "MiB");
    for name in ["dtls_sessions_close_notify", "dtls_sessions_open"] {
        if let Some(v) = events.get(name) {
            sub.put(&format!("gateway {name} after closing"), *v as f64, "");
        }
    }
    let (warnings, last) = gw.log_warnings();
    if warnings > 0 {
        sub.notes.push(format!(
            "{} gateway: {warnings} warning(s) in its log, the last: {}",
            if dtls { "DTLS" } else { "plain" },
            last.unwrap_or_default()
        ));
    }
    Ok(sub)
}

/// Scenario 19: `n` DTLS 1.2 PSK handshakes (cookie round trip and full handshake, no
/// resumption: `dimpl` has none) from distinct source ports, [`HANDSHAKES_IN_FLIGHT`] at a
/// time, each followed by CONNECT/CONNACK; sessions kept open for the gateway's memory
/// (`[dtls] max_sessions` is set above `n`). Beside it the same devices' plain CONNECT/CONNACK,
/// so that the handshake's own cost shows.
async fn dtls_handshakes(env: &mut Env) -> anyhow::Result<Scenario> {
    let n: usize = if env.opts.quick { 300 } else { 10_000 };
    let mut s = Scenario::new(
        19,
        &format!(
            "{n} DTLS 1.2 PSK handshakes (cookie, full handshake) + CONNECT/CONNACK, \
             {HANDSHAKES_IN_FLIGHT} in flight, sessions kept open; beside plain CONNECT/CONNACK"
        ),
    );
    let _ = sys::raise_nofile(n as u64 + 2000);
    let plain = open_sessions(env, n, false).await?;
    let dtls = open_sessions(env, n, true).await?;
    put_all_prefixed(&mut s, "plain: ", &plain);
    put_all_prefixed(&mut s, "DTLS: ", &dtls);
    s.notes
        .extend(plain.notes.iter().chain(&dtls.notes).cloned());
    if let (Some(d), Some(p)) = (
        dtls.get("gateway CPU per handshake + CONNECT"),
        plain.get("gateway CPU per CONNECT"),
    ) {
        s.put("gateway CPU per handshake (DTLS - plain)", d - p, "us");
    }
    if let (Some(d), Some(p)) = (
        dtls.get("RSS per open session"),
        plain.get("RSS per open session"),
    ) {
        s.put("RSS per DTLS session (DTLS - plain)", d - p, "bytes");
    }
    s.notes.push(format!(
        "handshake time: first ClientHello to Finished at the client, which runs in this \
         harness beside {HANDSHAKES_IN_FLIGHT} others (its CPU is the harness's)"
    ));
    Ok(s)
}

/// Scenario 20: fleet replay. 100 clients publish N QoS 1 records (the gateway has `[fleet]`
/// on, heartbeats off, a replay bucket of 600 requests a minute); then a backend asks for
/// all of them again in requests of 10,000 ids (`max_records`) on `sensorgate/1/replay`, and
/// the counting subscriber waits for every record a second time (same payloads, original
/// sequence ids). Replay rate from the first request to the last record, and the gateway's
/// CPU per replayed record.
async fn fleet_replay(env: &mut Env) -> anyhow::Result<Scenario> {
    const CLIENTS: usize = 100;
    const PER_REQUEST: u64 = 10_000;
    let mut s = Scenario::new(20, "Fleet replay: N held QoS 1 records asked for again");
    let per_client: u64 = if env.opts.quick { 50 } else { 500 };
    let mut cfg = GatewayConfig::new(CLIENTS + 100, "");
    cfg.fleet = Some("heartbeat = \"0s\"\n[fleet.replay]\nmax_requests_per_minute = 600\n".into());
    let port = env.broker.port;
    let gw = env.gateway_with(port, &cfg)?;
    let mut spec = env.spec(&gw);
    spec.clients = CLIENTS;
    spec.qos = 1;
    spec.messages = per_client;
    spec.publish_for = Duration::from_secs(30);
    let (sent, _, tally, _) = uplink(env, &gw, spec, Duration::from_secs(40)).await?;
    anyhow::ensure!(
        tally.unique == sent,
        "{} of {sent} records arrived before the replay",
        tally.unique
    );
    s.put("records held", sent as f64, "msgs");
    env.counter.reset();
    let requests: Vec<Vec<u8>> = (0..sent.div_ceil(PER_REQUEST))
        .map(|k| {
            let from = k * PER_REQUEST + 1;
            let to = ((k + 1) * PER_REQUEST).min(sent);
            format!(r#"{{"from": {from}, "to": {to}, "id": "bench-{k}"}}"#).into_bytes()
        })
        .collect();
    s.put("requests", requests.len() as f64, "");
    let cpu = Cpu::start(gw.pid(), env.broker.pid());
    let start = Instant::now();
    baseline::publish_qos1(port, "sg-bench-backend", "sensorgate/1/replay", requests).await?;
    let again = env
        .counter
        .wait_for(sent, Duration::from_secs(10), Duration::from_secs(120))?;
    // The last arrival, not the idle wait after it.
    let secs = (again.last_ns.saturating_sub(again.first_ns) as f64 / 1e9).max(1e-9);
    let wall = start.elapsed().as_secs_f64();
    s.put("replayed", again.unique as f64, "msgs");
    s.put(
        "replay rate (first to last record)",
        again.unique as f64 / secs,
        "msg/s",
    );
    s.put("request to last record", wall, "s");
    s.put("duplicates", again.duplicates as f64, "msgs");
    s.put("reordered", again.reordered as f64, "msgs");
    cpu.put(&mut s, again.unique, "replayed record");
    Ok(s)
}

fn targets(scenarios: &[Scenario]) -> Vec<Target> {
    let find = |id: u8, m: &str| scenarios.iter().find(|s| s.id == id).and_then(|s| s.get(m));
    // A cell: `add` and the targets with their own wording push to it in turn.
    let out = std::cell::RefCell::new(Vec::new());
    let add =
        |scenario: u8, target: &str, value: Option<f64>, unit: &str, met: &dyn Fn(f64) -> bool| {
            if let Some(v) = value {
                out.borrow_mut().push(Target {
                    scenario,
                    target: target.to_owned(),
                    measured: format!("{v:.2} {unit}"),
                    met: met(v),
                });
            }
        };
    add(
        1,
        "QoS 0: gateway CPU <= 3 us per forwarded message (unpaced)",
        find(1, "gateway CPU per delivered msg"),
        "us",
        &|v| v <= 3.0,
    );
    add(
        1,
        "QoS 0: zero loss at 100,000 msg/s offered",
        find(1, "paced 100k lost"),
        "msgs lost",
        &|v| v == 0.0,
    );
    if let Some(best) = find(1, "highest paced rate without loss") {
        let offered = find(1, "highest paced rate without loss: offered").unwrap_or(0.0);
        out.borrow_mut().push(Target {
            scenario: 1,
            target: format!(
                "QoS 0: zero loss up to 150,000 msg/s paced (the generator offering >= {:.0}% \
                 of it)",
                100.0 * PACED_OFFERED_SHARE
            ),
            measured: format!(
                "no loss up to the {best:.0} msg/s step (offered {offered:.0} msg/s)"
            ),
            met: best >= 150_000.0 && offered >= PACED_OFFERED_SHARE * 150_000.0,
        });
    }
    add(
        1,
        "QoS 0 unpaced flood: delivered rate >= 90% of the native baseline",
        find(1, "gateway / baseline delivered rate"),
        "%",
        &|v| v >= 90.0,
    );
    if let Some(inside) = find(1, "lost inside the gateway") {
        let kernel = find(1, "kernel drops at the gateway socket").unwrap_or(0.0);
        let baseline = find(1, "baseline loss").unwrap_or(0.0);
        out.borrow_mut().push(Target {
            scenario: 1,
            target: "QoS 0 unpaced flood: no message dropped inside the gateway \
                     (kernel drops at its socket counted separately)"
                .into(),
            measured: format!(
                "{inside:.0} msgs lost inside (kernel drops {kernel:.0}; \
                 baseline loss {baseline:.2}%)"
            ),
            met: inside == 0.0,
        });
    }
    add(
        1,
        "QoS 0 paced at 10,000 msg/s: p99 latency <= 2 ms",
        find(1, "paced 10k: latency p99"),
        "ms",
        &|v| v <= 2.0,
    );
    let native_100k = find(1, "paced 100k native: latency p99")
        .map(|v| format!(" (native publisher, same rate, same broker: p99 {v:.2} ms)"))
        .unwrap_or_default();
    add(
        1,
        &format!("QoS 0 paced at 100,000 msg/s: p99 latency <= 5 ms{native_100k}"),
        find(1, "paced 100k: latency p99"),
        "ms",
        &|v| v <= 5.0,
    );
    add(
        2,
        "QoS 1, one client, window 1: >= 4,000 msg/s acknowledged",
        find(2, "acknowledged rate"),
        "msg/s",
        &|v| v >= 4_000.0,
    );
    add(
        2,
        "QoS 1, one client, window 1: <= 100 us gateway CPU per acknowledged msg",
        find(2, "gateway CPU per acknowledged msg"),
        "us",
        &|v| v <= 100.0,
    );
    add(
        10,
        "QoS 1, 100 clients, window 1: end-to-end p99 to the subscriber <= 20 ms",
        find(10, "end-to-end latency p99"),
        "ms",
        &|v| v <= 20.0,
    );
    add(
        3,
        "QoS 1, 1,000 clients, window 1: end-to-end p99 to the subscriber <= 20 ms",
        find(3, "end-to-end latency p99"),
        "ms",
        &|v| v <= 20.0,
    );
    add(
        3,
        "QoS 1, 1,000 clients, window 1: >= 50,000 msg/s acknowledged",
        find(3, "acknowledged rate"),
        "msg/s",
        &|v| v >= 50_000.0,
    );
    add(
        4,
        "100,000 clients: RSS <= 150 MB",
        find(4, "RSS after publishing"),
        "MiB",
        &|v| v * 1.048_576 <= 150.0,
    );
    add(
        4,
        "Connect storm: >= 20,000 CONNACK/s",
        find(4, "CONNACK rate"),
        "CONNACK/s",
        &|v| v >= 20_000.0,
    );
    add(
        6,
        "Downlink fan-out: >= 100,000 deliveries/s",
        find(6, "delivery rate"),
        "deliveries/s",
        &|v| v >= 100_000.0,
    );
    add(
        7,
        "Spool: disk bytes written per message <= 2.5 x (payload + topic + record header)",
        find(7, "disk bytes per message / record size"),
        "x",
        &|v| v <= 2.5,
    );
    add(
        7,
        &format!(
            "Spool: disk space near zero once everything is acknowledged \
             (<= {SPOOL_NEAR_ZERO_BYTES} bytes)"
        ),
        find(7, "spool dir after the drain (allocated)"),
        "bytes",
        &|v| v <= SPOOL_NEAR_ZERO_BYTES as f64,
    );
    add(
        9,
        "Fan-out: disk bytes written per message with two upstreams <= 1.2 x with one \
         (one write per message; two writes would be 2.0)",
        find(9, "disk bytes per message: two upstreams / one"),
        "x",
        &|v| v <= 1.2,
    );
    add(
        12,
        "CoAP NON PUT paced at 100,000 msg/s, one device, 2.04 answers on: zero loss",
        find(12, "answered: lost"),
        "msgs lost",
        &|v| v == 0.0,
    );
    add(
        12,
        "CoAP NON PUT paced at 100,000 msg/s, one device, No-Response: zero loss",
        find(12, "No-Response: lost"),
        "msgs lost",
        &|v| v == 0.0,
    );
    add(
        13,
        "CoAP Observe fan-out: >= 100,000 notifications/s",
        find(13, "notification rate"),
        "notifications/s",
        &|v| v >= 100_000.0,
    );
    // At equal (paced) load: unpaced, the plain run may drain a backlog from disk.
    for label in ["QoS 1 paced", "QoS 0 paced"] {
        if let Some(ratio) = find(18, &format!("{label}: DTLS / plain gateway CPU per msg")) {
            out.borrow_mut().push(Target {
                scenario: 18,
                target: format!(
                    "MQTT-SN {label} over DTLS-PSK: gateway CPU per message <= 2x plain UDP's \
                     (issue 19)"
                ),
                measured: format!(
                    "{:.1} us DTLS, {:.1} us plain: {ratio:.2}x",
                    find(18, &format!("{label} DTLS: gateway CPU per msg")).unwrap_or(0.0),
                    find(18, &format!("{label} plain: gateway CPU per msg")).unwrap_or(0.0)
                ),
                met: ratio <= 2.0,
            });
        }
    }
    let mut out = out.into_inner();
    if let Some(share) = find(11, "CoAP / MQTT-SN acknowledged rate") {
        out.push(Target {
            scenario: 11,
            target: "CoAP CON PUT, 1,000 devices, fsync always: acknowledged rate >= 80% of \
                     MQTT-SN QoS 1 (scenario 3, same run)"
                .into(),
            measured: format!(
                "{:.0} req/s = {share:.1}% of {:.0} msg/s",
                find(11, "acknowledged rate").unwrap_or(0.0),
                find(11, "MQTT-SN QoS 1 (scenario 3): acknowledged rate").unwrap_or(0.0)
            ),
            met: share >= 80.0,
        });
    }
    if let Some(share) = find(11, "CoAP / MQTT-SN gateway CPU per message") {
        out.push(Target {
            scenario: 11,
            target: "CoAP CON PUT, 1,000 devices: gateway CPU per request <= 120% of MQTT-SN \
                     QoS 1's per message (scenario 3, same run)"
                .into(),
            measured: format!(
                "{:.1} us = {share:.1}% of {:.1} us",
                find(11, "gateway CPU per acknowledged request").unwrap_or(0.0),
                find(
                    11,
                    "MQTT-SN QoS 1 (scenario 3): gateway CPU per acknowledged msg"
                )
                .unwrap_or(0.0)
            ),
            met: share <= 120.0,
        });
    }
    if let Some(rate) = find(14, "durable rate") {
        let beside = [
            (
                "scenario 3",
                "MQTT-SN QoS 1 (scenario 3, 1,000 clients): acknowledged rate",
            ),
            (
                "scenario 10",
                "MQTT-SN QoS 1 (scenario 10, 100 clients): acknowledged rate",
            ),
        ]
        .iter()
        .filter_map(|(label, m)| find(14, m).map(|v| format!("{label}: {v:.0} msg/s")))
        .collect::<Vec<_>>();
        let beside = if beside.is_empty() {
            String::new()
        } else {
            format!(" (MQTT-SN QoS 1 {})", beside.join(", "))
        };
        out.push(Target {
            scenario: 14,
            target: "HTTP QoS 1 publish, 100 keep-alive connections, window 1, fsync always: \
                     >= 20,000 durable publishes/s"
                .into(),
            measured: format!(
                "{rate:.0} req/s, {:.1} us gateway CPU per request{beside}",
                find(14, "gateway CPU per durable request").unwrap_or(0.0)
            ),
            met: rate >= 20_000.0,
        });
    }
    if let Some(drain) = find(7, "drain rate (first to last delivery)") {
        let limit =
            find(7, "broker limit (native QoS 1 with sg-seq, one connection)").unwrap_or(0.0);
        let share = find(7, "drain / broker limit").unwrap_or(0.0);
        // The issue's target is for 1,000,000 messages; `--quick` drains fewer.
        let backlog = find(7, "acknowledged (spooled)").unwrap_or(0.0);
        out.push(Target {
            scenario: 7,
            target: format!(
                "Spool: drain after a {backlog:.0}-message backlog >= 90% of the broker's \
                 limit measured in the same run (native QoS 1 with sg-seq, one connection)"
            ),
            measured: format!(
                "{drain:.0} msg/s = {share:.1}% of the broker limit ({limit:.0} msg/s)"
            ),
            met: share >= 90.0,
        });
    }
    if let Some(share) = find(8, "gateway / native delivered rate") {
        let gw = find(8, "delivered rate").unwrap_or(0.0);
        let native = find(8, "native delivered rate").unwrap_or(0.0);
        let mqtt = find(8, "MQTT upstream (scenario 3): acknowledged rate")
            .map(|m| {
                format!(
                    "; acknowledged {:.0} msg/s, MQTT upstream {m:.0}",
                    find(8, "acknowledged rate").unwrap_or(0.0)
                )
            })
            .unwrap_or_default();
        out.push(Target {
            scenario: 8,
            target: format!(
                "QoS 1 to RabbitMQ with confirms, 1,000 clients: delivered rate >= 80% of a \
                 native AMQP publisher with the same confirm window ({AMQP_WINDOW})"
            ),
            measured: format!("{gw:.0} msg/s = {share:.1}% of native ({native:.0} msg/s){mqtt}"),
            met: share >= 80.0,
        });
    }
    out
}

fn print_scenario(s: &Scenario) {
    println!("\n## {}. {}", s.id, s.name);
    for m in &s.metrics {
        let v = if m.value.abs() >= 100.0 {
            format!("{:.0}", m.value)
        } else {
            format!("{:.3}", m.value)
        };
        println!("  {:<48} {:>14} {}", m.name, v, m.unit);
    }
    for n in &s.notes {
        println!("  note: {n}");
    }
}

/// Prints the targets table.
pub fn print_targets(report: &Report) {
    println!("\n## Targets");
    println!("| # | target | measured | met |\n|---|---|---|---|");
    for t in &report.targets {
        println!(
            "| {} | {} | {} | {} |",
            t.scenario,
            t.target,
            t.measured,
            if t.met { "yes" } else { "NO" }
        );
    }
}
