//! Fan-out rig: the real gateway with two upstreams at once, `local` (MQTT 5 to a mosquitto)
//! and `cloud` (AMQP 0-9-1 to a private RabbitMQ node, exchange `amq.topic`), no `[[route]]`
//! (so every message goes to both); observers on each broker (paho-mqtt and pika, both through
//! `tests/py/amqp_obs.py`) that record every copy with the instant it reached the test; and
//! MQTT-SN sensors publishing numbered QoS 1 sequences on their own threads.
//!
//! Invariants:
//! - A sensor's payload names the message: `<sensor>:<index>` with the index counting from 0,
//!   so a copy on either broker says who sent it and where it stands in that sender's order.
//! - The durable queue [`QUEUE`] is bound to `sensors.#` before the gateway starts: nothing
//!   the gateway sends to RabbitMQ is unroutable, and copies wait there while no consumer runs.
//! - Every wait is bounded (time and count); every process and thread started here is stopped
//!   when its guard drops (observers kill their script by its guard, sensors stop on a flag).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail, ensure};

use crate::{Gateway, GatewayConfig, Mosquitto, RabbitMq, SnClient, sn};

/// The durable RabbitMQ queue the AMQP observer reads, bound to `sensors.#` on `amq.topic`.
pub const QUEUE: &str = "sg-fanout";
/// The MQTT-SN topic every sensor publishes to (`sensors.fanout` on RabbitMQ).
pub const TOPIC: &str = "sensors/fanout";
/// How long one observer script may take to connect and subscribe.
const OBSERVER_READY: Duration = Duration::from_secs(60);
/// Upper bound on the copies one observer keeps: far above what any test sends.
const MAX_COPIES: usize = 200_000;

/// The `[[upstream]]` section of the AMQP upstream for `rabbit`.
pub fn amqp_section(rabbit: &RabbitMq) -> String {
    format!(
        "\n[[upstream]]\nname = \"cloud\"\nkind = \"amqp\"\nurl = \"{}\"\n\
         exchange = \"amq.topic\"\nheartbeat = \"5s\"\nbackoff_initial = \"100ms\"\n\
         backoff_max = \"1s\"\n",
        rabbit.url()
    )
}

/// The gateway and both brokers. The gateway is declared first so it stops first.
pub struct FanoutRig {
    /// The gateway (upstreams `local` and `cloud`).
    pub gateway: Gateway,
    /// The `local` upstream's broker.
    pub broker: Mosquitto,
    /// The `cloud` upstream's node.
    pub rabbit: RabbitMq,
    /// The config the gateway runs with.
    pub config: GatewayConfig,
}

impl FanoutRig {
    /// Starts RabbitMQ (binding [`QUEUE`]), mosquitto, then the gateway with both upstreams.
    ///
    /// # Errors
    /// When a peer does not come up.
    pub fn start() -> Result<FanoutRig> {
        let rabbit = RabbitMq::start()?;
        let port = rabbit.port().to_string();
        let declare = crate::Script::python(
            "amqp_obs.py",
            &args(&["declare", "--port", &port, "--queue", QUEUE]),
        )?;
        declare.expect_line("READY", OBSERVER_READY, |l| l == "READY")?;
        let broker = Mosquitto::start()?;
        let mut config = GatewayConfig::new(broker.port())?;
        config.extra_sections.push_str(&amqp_section(&rabbit));
        let gateway = Gateway::start(&config)?;
        Ok(FanoutRig {
            gateway,
            broker,
            rabbit,
            config,
        })
    }

    /// An MQTT 5 QoS 1 subscriber to `sensors/#` on mosquitto, subscribed once this returns.
    ///
    /// # Errors
    /// When it does not subscribe in time.
    pub fn mqtt_observer(&self) -> Result<Observer> {
        let port = self.broker.port().to_string();
        let script = crate::Script::python(
            "amqp_obs.py",
            &args(&["mqtt", "--port", &port, "--timeout", "900"]),
        )?;
        script.expect_line("READY", OBSERVER_READY, |l| l == "READY")?;
        Ok(Observer::spawn("mqtt observer", script))
    }

    /// A pika consumer of [`QUEUE`] (acking each copy once printed). It ends by itself when
    /// the node goes away; start another after a restart.
    ///
    /// # Errors
    /// When the script cannot be started.
    pub fn amqp_observer(&self) -> Result<Observer> {
        let port = self.rabbit.port().to_string();
        let count = MAX_COPIES.to_string();
        let script = crate::Script::python(
            "amqp_obs.py",
            &args(&[
                "get",
                "--port",
                &port,
                "--queue",
                QUEUE,
                "--count",
                &count,
                "--timeout",
                "900",
            ]),
        )?;
        Ok(Observer::spawn("amqp observer", script))
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

// ---------------------------------------------------------------------------------------------
// Observers.

/// One copy of a message as a broker delivered it.
#[derive(Debug, Clone)]
pub struct Received {
    /// When the observer's line reached the test.
    pub at: Instant,
    /// The payload as text (`<sensor>:<index>` for [`Sensor`] messages).
    pub payload: String,
    /// The gateway's sequence id: MQTT 5 user property `sg-seq`, or AMQP `message_id`.
    pub seq: Option<String>,
    /// MQTT topic, or AMQP routing key.
    pub topic: String,
}

impl Received {
    /// (sensor, index) parsed from a [`Sensor`] payload.
    pub fn sender_index(&self) -> Option<(&str, usize)> {
        let (sender, index) = self.payload.rsplit_once(':')?;
        Some((sender, index.parse().ok()?))
    }
}

#[derive(Debug, Default)]
struct Seen {
    copies: Vec<Received>,
    /// Why the script stopped, once it did.
    ended: Option<String>,
}

fn lock(m: &Mutex<Seen>) -> MutexGuard<'_, Seen> {
    // A panic elsewhere must not hide what was seen.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An observer script read on its own thread, so every copy is timestamped as it arrives
/// whatever the test thread is doing (stopping a broker, say). Stops the script on drop.
pub struct Observer {
    name: &'static str,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Observer {
    fn spawn(name: &'static str, script: crate::Script) -> Observer {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
            std::thread::spawn(move || read_copies(&script, &seen, &stop))
        };
        Observer {
            name,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// Every copy so far, in arrival order.
    pub fn copies(&self) -> Vec<Received> {
        lock(&self.seen).copies.clone()
    }

    /// Why the script stopped, if it did.
    pub fn ended(&self) -> Option<String> {
        lock(&self.seen).ended.clone()
    }

    /// Waits (polling, at most `timeout`) until `done` holds for the copies so far; returns
    /// them.
    ///
    /// # Errors
    /// On timeout, or when the script stopped before `done` held.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[Received]) -> bool,
    ) -> Result<Vec<Received>> {
        let deadline = Instant::now() + timeout;
        let every = Duration::from_millis(50);
        let rounds = timeout.as_millis() / every.as_millis() + 2;
        for _ in 0..rounds {
            {
                let seen = lock(&self.seen);
                if done(&seen.copies) {
                    return Ok(seen.copies.clone());
                }
                if let Some(why) = &seen.ended {
                    bail!(
                        "{}: stopped after {} copies before {what}: {why}",
                        self.name,
                        seen.copies.len()
                    );
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(every);
        }
        let n = lock(&self.seen).copies.len();
        bail!("{}: no {what} within {timeout:?} ({n} copies)", self.name)
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_copies(script: &crate::Script, seen: &Mutex<Seen>, stop: &AtomicBool) {
    let ended = loop {
        if stop.load(Ordering::Relaxed) {
            break "stopped by the test".to_owned();
        }
        match script.line(Duration::from_millis(100)) {
            Ok(None) => {}
            Ok(Some(l)) if l == "DONE" || l == "READY" => {}
            Ok(Some(l)) => match parse_copy(&l) {
                Some(c) => {
                    let mut s = lock(seen);
                    if s.copies.len() >= MAX_COPIES {
                        break format!("more than {MAX_COPIES} copies");
                    }
                    s.copies.push(c);
                }
                None => break format!("unexpected line {l:?}\n{}", script.stderr()),
            },
            Err(e) => break format!("{e:#}"),
        }
    };
    lock(seen).ended = Some(ended);
}

/// A JSON line of `amqp_obs.py` (`mqtt` or `get` mode).
fn parse_copy(line: &str) -> Option<Received> {
    let at = Instant::now();
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let field = |k: &str| v.get(k).and_then(serde_json::Value::as_str);
    let hex = field("payload_hex").or_else(|| field("body_hex"))?;
    let topic = field("topic").or_else(|| field("routing_key"))?;
    let seq = field("seq").or_else(|| field("message_id"));
    let bytes = crate::from_hex(hex)?;
    Some(Received {
        at,
        payload: String::from_utf8_lossy(&bytes).into_owned(),
        seq: seq.map(str::to_owned),
        topic: topic.to_owned(),
    })
}

// ---------------------------------------------------------------------------------------------
// Sensors.

/// How a [`Sensor`] publishes.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// At most this many messages.
    pub count: usize,
    /// Pause after each acknowledged message (0: back to back).
    pub pace: Duration,
    /// How long one PUBACK may take; past it the sensor stops, the message unacknowledged.
    pub ack_timeout: Duration,
}

/// What a sensor did.
#[derive(Debug, Clone, Default)]
pub struct SensorRun {
    /// Its client id, the payload prefix.
    pub name: String,
    /// Payloads PUBACKed with rc 0, in order, with when the PUBACK arrived.
    pub acked: Vec<(Instant, String)>,
    /// The payload published last without a PUBACK, if any.
    pub unacked: Option<String>,
    /// Why it stopped before `count` (other than the stop flag), if it did.
    pub error: Option<String>,
}

/// An MQTT-SN client on its own thread publishing `<name>:0`, `<name>:1`, … at QoS 1 to
/// [`TOPIC`], one at a time (the next only after the PUBACK).
pub struct Sensor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<SensorRun>>,
}

impl Sensor {
    /// Connects (CleanSession) as `name`, registers [`TOPIC`] and starts publishing.
    ///
    /// # Errors
    /// When CONNECT or REGISTER fails.
    pub fn start(gw: SocketAddr, name: &str, plan: Plan) -> Result<Sensor> {
        Sensor::start_at(gw, name, 0, plan)
    }

    /// As [`Sensor::start`], numbering from `first` (a sensor that comes back after a gateway
    /// restart continues its sequence).
    ///
    /// # Errors
    /// When CONNECT or REGISTER fails.
    pub fn start_at(gw: SocketAddr, name: &str, first: usize, plan: Plan) -> Result<Sensor> {
        let mut c = SnClient::new(gw)?;
        c.connect_ok(name)?;
        let topic_id = c.register(TOPIC)?;
        let stop = Arc::new(AtomicBool::new(false));
        let run = SensorRun {
            name: name.to_owned(),
            ..SensorRun::default()
        };
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || publish_loop(c, topic_id, first, plan, run, &stop))
        };
        Ok(Sensor {
            stop,
            thread: Some(thread),
        })
    }

    /// Asks it to stop after the exchange in progress.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Whether it has stopped publishing.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits (at most `timeout`) until it has published its whole plan; returns what it did.
    ///
    /// # Errors
    /// When it is still publishing after `timeout` (it is then stopped) or its thread
    /// panicked.
    pub fn wait(self, timeout: Duration) -> Result<SensorRun> {
        let deadline = Instant::now() + timeout;
        while !self.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let finished = self.is_finished();
        let run = self.finish()?;
        ensure!(
            finished,
            "{} still publishing after {timeout:?} ({} acknowledged)",
            run.name,
            run.acked.len()
        );
        Ok(run)
    }

    /// Stops it (after the exchange in progress) and returns what it did.
    ///
    /// # Errors
    /// When its thread panicked.
    pub fn finish(mut self) -> Result<SensorRun> {
        self.request_stop();
        let t = self
            .thread
            .take()
            .ok_or_else(|| anyhow!("sensor already finished"))?;
        t.join().map_err(|_| anyhow!("sensor thread panicked"))
    }
}

impl Drop for Sensor {
    fn drop(&mut self) {
        self.request_stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn publish_loop(
    mut c: SnClient,
    topic_id: u16,
    first: usize,
    plan: Plan,
    mut run: SensorRun,
    stop: &AtomicBool,
) -> SensorRun {
    for i in first..first.saturating_add(plan.count) {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let payload = format!("{}:{i}", run.name);
        let sent = c.publish(
            sn::Qos::One,
            sn::TopicType::Normal,
            topic_id,
            false,
            payload.as_bytes(),
        );
        let answer = sent.and_then(|msg_id| c.puback(msg_id, plan.ack_timeout));
        match answer {
            Ok((tid, sn::RC_ACCEPTED)) if tid == topic_id => {
                run.acked.push((Instant::now(), payload));
            }
            Ok((tid, rc)) => {
                run.error = Some(format!(
                    "{payload}: PUBACK rc {rc:#04x} topic id {tid:#06x}"
                ));
                break;
            }
            Err(e) => {
                run.error = Some(format!("{payload}: {e:#}"));
                run.unacked = Some(payload);
                break;
            }
        }
        if !plan.pace.is_zero() {
            // Pacing the sender, not waiting for a result.
            std::thread::sleep(plan.pace);
        }
    }
    run
}

// ---------------------------------------------------------------------------------------------
// Checks.

/// Per sender, the indices of `copies` in arrival order.
pub fn by_sender(copies: &[Received]) -> std::collections::BTreeMap<String, Vec<usize>> {
    let mut out = std::collections::BTreeMap::<String, Vec<usize>>::new();
    for c in copies {
        if let Some((s, i)) = c.sender_index() {
            out.entry(s.to_owned()).or_default().push(i);
        }
    }
    out
}

/// `copies` without repeats (by payload; the first copy of each kept), and how many repeats
/// were dropped.
pub fn dedup(copies: &[Received]) -> (Vec<Received>, usize) {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(copies.len());
    for c in copies {
        if seen.insert(c.payload.clone()) {
            out.push(c.clone());
        }
    }
    let repeats = copies.len() - out.len();
    (out, repeats)
}

/// Whether every payload in `want` is among `copies`.
pub fn has_all(copies: &[Received], want: &std::collections::HashSet<String>) -> bool {
    let got: std::collections::HashSet<&str> = copies.iter().map(|c| c.payload.as_str()).collect();
    want.iter().all(|w| got.contains(w.as_str()))
}

/// Checks that each sender's copies come in its sending order with no gap: `0, 1, …`.
///
/// # Errors
/// Names the first sender out of order.
pub fn ensure_in_order(what: &str, copies: &[Received]) -> Result<()> {
    for (sender, idx) in by_sender(copies) {
        let want: Vec<usize> = (0..idx.len()).collect();
        ensure!(
            idx == want,
            "{what}: {sender}'s copies out of order or with gaps: {idx:?}"
        );
    }
    Ok(())
}
