//! The processes under test: mosquitto and sensorgate, started on free loopback ports in a
//! temporary directory and killed when dropped.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::sn;

/// A free TCP port on 127.0.0.1 (also free for UDP at the moment of asking, most likely).
///
/// # Errors
/// When nothing can be bound.
pub fn free_port() -> anyhow::Result<u16> {
    let tcp = TcpListener::bind("127.0.0.1:0")?;
    let port = tcp.local_addr()?.port();
    // Also check UDP: the gateway listens on UDP.
    UdpSocket::bind(("127.0.0.1", port))?;
    Ok(port)
}

/// Lowest port tried by [`free_port_below_ephemeral`].
const FIXED_PORTS_FROM: u16 = 10_000;

/// A free TCP port on 127.0.0.1 below the ephemeral range, for a listener that starts only
/// later: no outgoing connection takes it meanwhile, and repeated connection attempts to it
/// cannot connect to themselves (a loopback connect from a port equal to its destination
/// succeeds without a listener). Falls back to [`free_port`].
///
/// # Errors
/// When nothing can be bound.
pub fn free_port_below_ephemeral() -> anyhow::Result<u16> {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(FIXED_PORTS_FROM);
    if span > 0 {
        // Start at a different place per process, so that parallel runs rarely collide.
        let start = std::process::id() % u32::from(span);
        for k in 0..u32::from(span) {
            let offset = u16::try_from((start + k) % u32::from(span)).unwrap_or(0);
            let port = FIXED_PORTS_FROM + offset;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    free_port()
}

/// A child process killed (and reaped) on drop.
#[derive(Debug)]
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running mosquitto on 127.0.0.1.
#[derive(Debug)]
pub struct Broker {
    child: Guard,
    /// Its MQTT port.
    pub port: u16,
}

impl Broker {
    /// Starts `mosquitto` (path from `SENSORGATE_MOSQUITTO`, default `/usr/sbin/mosquitto`)
    /// with in-memory state, large queues and a 1,000-message in-flight window, and waits
    /// until it accepts connections.
    ///
    /// # Errors
    /// When it cannot be started or does not listen within 10 s.
    pub fn start(dir: &Path) -> anyhow::Result<Broker> {
        Self::start_on(dir, free_port()?)
    }

    /// [`Broker::start`] on a given port.
    ///
    /// # Errors
    /// When it cannot be started or does not listen within 10 s.
    pub fn start_on(dir: &Path, port: u16) -> anyhow::Result<Broker> {
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_queued_messages 1000000\nmax_inflight_messages 1000\n\
                 log_dest stderr\nlog_type error\nlog_type warning\n"
            ),
        )?;
        let bin =
            std::env::var("SENSORGATE_MOSQUITTO").unwrap_or_else(|_| "/usr/sbin/mosquitto".into());
        let log = std::fs::File::create(dir.join("mosquitto.log"))?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        let child = Guard(child);
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > until {
                bail!("mosquitto did not listen on {port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Broker { child, port })
    }

    /// Its process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }
}

/// A running `sensorgate run` listening on 127.0.0.1.
#[derive(Debug)]
pub struct Gateway {
    child: Guard,
    /// Where clients send.
    pub addr: SocketAddr,
    /// Its config file.
    pub config: PathBuf,
    /// Its `state_dir` (the spool is in `spool/`, persistent sessions in `sessions/`).
    pub state_dir: PathBuf,
    /// Where CoAP devices send, when [`GatewayConfig::coap`] turned CoAP on.
    pub coap: Option<SocketAddr>,
    /// Where HTTP clients connect, when [`GatewayConfig::http`] turned HTTP on.
    pub http: Option<SocketAddr>,
    /// Where MQTT-SN clients handshake DTLS, when [`GatewayConfig::dtls`] turned it on.
    pub dtls: Option<SocketAddr>,
    /// Its admin listener (`None` with `SG_BENCH_NO_ADMIN`).
    pub admin: Option<SocketAddr>,
}

/// Predefined topic id every benchmark gateway has (for QoS -1), and its topic.
pub const PREDEFINED: (u16, &str) = (1, "bench/predefined");

/// The `[[upstream]]` tuning of the benchmark gateways: room for the uplink scenarios' bursts.
pub const BENCH_UPSTREAM: &str = "max_inflight = 10000\nqueue = 100000\n";

/// What a benchmark gateway's config has besides the common part (loopback listener, the
/// predefined topic, one upstream to the broker).
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Sessions the gateway admits.
    pub max_clients: usize,
    /// Lines appended to `[mqttsn]`.
    pub mqttsn: String,
    /// Lines appended to `[[upstream]]` after its name, kind and url.
    pub upstream: String,
    /// Lines of `[spool]`; empty for the defaults.
    pub spool: String,
    /// The whole upstream part (one or more `[[upstream]]` tables) in place of the default
    /// MQTT upstream to the broker's port (then `upstream` is not used).
    pub upstreams: Option<String>,
    /// CoAP on: `[coap]` with `listen = ["127.0.0.1:<free port>"]` and these lines after it.
    /// `None`: no `[coap]` section (CoAP off).
    pub coap: Option<String>,
    /// HTTP on: `[http]` with `listen = ["127.0.0.1:<free port>"]` and these lines after it
    /// (keys of `[http]` first, then any `[[http.device]]` tables). `None`: HTTP off.
    pub http: Option<String>,
    /// `[[serial]]` tables, appended after the upstreams; empty: no serial line.
    pub serial: String,
    /// MQTT-SN over DTLS on: `[mqttsn] dtls_listen = ["127.0.0.1:<free port>"]`, and this text
    /// (the `[dtls]` table and the `[[psk]]` tables) appended last. `None`: no DTLS.
    pub dtls: Option<String>,
    /// `[fleet]` on, with these lines after `enabled = true` (they may open
    /// `[fleet.replay]`). `None`: `[fleet] enabled = false`.
    pub fleet: Option<String>,
}

impl GatewayConfig {
    /// Room for `max_clients`, `mqttsn` appended to `[mqttsn]`, the upstream tuned with
    /// [`BENCH_UPSTREAM`], a default spool.
    #[must_use]
    pub fn new(max_clients: usize, mqttsn: &str) -> GatewayConfig {
        GatewayConfig {
            max_clients,
            mqttsn: mqttsn.to_owned(),
            upstream: BENCH_UPSTREAM.to_owned(),
            spool: String::new(),
            upstreams: None,
            coap: None,
            http: None,
            serial: String::new(),
            dtls: None,
            fleet: None,
        }
    }
}

impl Gateway {
    /// Starts `bin` with a benchmark config (`cfg`, upstream to `broker_port`, state in
    /// `dir/state`) and waits until it answers SEARCHGW (and, with CoAP on, a CoAP ping: an
    /// empty CON, answered with RST by RFC 7252 §4.3; with HTTP on, `GET /v1/nope` answered
    /// 404; with DTLS on, a ClientHello answered with a HelloVerifyRequest). Nothing needs to listen on
    /// `broker_port` yet: the gateway spools until the broker is there.
    ///
    /// # Errors
    /// When it cannot be started or does not answer within 10 s.
    #[allow(clippy::too_many_lines)]
    pub fn start(
        bin: &Path,
        dir: &Path,
        broker_port: u16,
        cfg: &GatewayConfig,
    ) -> anyhow::Result<Gateway> {
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let config = dir.join("sensorgate.toml");
        let state = dir.join("state");
        let upstreams = cfg.upstreams.clone().unwrap_or_else(|| {
            format!(
                "[[upstream]]\nname = \"bench\"\nkind = \"mqtt\"\n\
                 url = \"mqtt://127.0.0.1:{broker_port}\"\n{}",
                cfg.upstream
            )
        });
        // The admin listener runs as in production (its counters are what the bench must not
        // notice), on a free port; `SG_BENCH_NO_ADMIN=1` leaves the section out for a gateway
        // built before it existed (before/after comparisons).
        let admin_at = if std::env::var_os("SG_BENCH_NO_ADMIN").is_some() {
            None
        } else {
            Some(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
        };
        let admin =
            admin_at.map_or_else(String::new, |at| format!("[admin]\nlisten = \"{at}\"\n\n"));
        let coap = match &cfg.coap {
            Some(extra) => Some((SocketAddr::from(([127, 0, 0, 1], free_port()?)), extra)),
            None => None,
        };
        let coap_section = coap.map_or_else(String::new, |(at, extra)| {
            format!("[coap]\nlisten = [\"{at}\"]\n{extra}\n")
        });
        let http = match &cfg.http {
            Some(extra) => Some((SocketAddr::from(([127, 0, 0, 1], free_port()?)), extra)),
            None => None,
        };
        // Last but the upstreams: its `[[http.device]]` tables end the `[http]` table.
        let http_section = http.map_or_else(String::new, |(at, extra)| {
            format!("[http]\nlisten = [\"{at}\"]\n{extra}\n")
        });
        let dtls = match &cfg.dtls {
            Some(extra) => Some((SocketAddr::from(([127, 0, 0, 1], free_port()?)), extra)),
            None => None,
        };
        let dtls_listen =
            dtls.map_or_else(String::new, |(at, _)| format!("dtls_listen = [\"{at}\"]\n"));
        let dtls_tables = dtls.map_or_else(String::new, |(_, extra)| format!("\n{extra}\n"));
        // `[fleet]` off unless asked for: the scenarios count every message their brokers
        // carry, and measure the sensor pipeline alone.
        let fleet = cfg.fleet.as_ref().map_or_else(
            || "[fleet]\nenabled = false\n\n".to_owned(),
            |lines| format!("[fleet]\nenabled = true\n{lines}\n"),
        );
        let mut f = std::fs::File::create(&config)?;
        write!(
            f,
            "[gateway]\nid = 1\nstate_dir = \"{}\"\n\n[log]\nlevel = \"warn\"\n\n\
             {fleet}{admin}[spool]\n{}\n\
             [mqttsn]\nlisten = [\"{addr}\"]\nmax_clients = {}\n{dtls_listen}{}\n\
             [[mqttsn.predefined_topic]]\nid = {}\ntopic = \"{}\"\nclients = [\"*\"]\n\n\
             {coap_section}{http_section}{upstreams}\n{}{dtls_tables}",
            state.display(),
            cfg.spool,
            cfg.max_clients,
            cfg.mqttsn,
            PREDEFINED.0,
            PREDEFINED.1,
            cfg.serial,
        )?;
        drop(f);
        let log = std::fs::File::create(dir.join("sensorgate.log"))?;
        let child = Command::new(bin)
            .arg("run")
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let child = Guard(child);
        let probe = UdpSocket::bind("127.0.0.1:0")?;
        probe.set_read_timeout(Some(Duration::from_millis(100)))?;
        let until = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 64];
        loop {
            if Instant::now() > until {
                bail!(
                    "sensorgate did not answer SEARCHGW within 10 s (see {})",
                    dir.display()
                );
            }
            probe.send_to(&sn::searchgw(), addr)?;
            if let Ok(n) = probe.recv(&mut buf)
                && sn::parse(buf.get(..n).unwrap_or_default()).map(|(t, _)| t)
                    == Some(sn::kind::GWINFO)
            {
                break;
            }
        }
        let coap = coap.map(|(at, _)| at);
        if let Some(at) = coap {
            coap_ping(&probe, at, until)
                .with_context(|| format!("sensorgate's CoAP listener (see {})", dir.display()))?;
        }
        let http = http.map(|(at, _)| at);
        if let Some(at) = http {
            http_probe(at, until)
                .with_context(|| format!("sensorgate's HTTP listener (see {})", dir.display()))?;
        }
        let dtls = dtls.map(|(at, _)| at);
        if let Some(at) = dtls {
            dtls_probe(&probe, at, until)
                .with_context(|| format!("sensorgate's DTLS listener (see {})", dir.display()))?;
        }
        Ok(Gateway {
            child,
            addr,
            config,
            state_dir: state,
            coap,
            http,
            dtls,
            admin: admin_at,
        })
    }

    /// Its process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// The warnings and errors in its log so far, but the start-up one about socket buffers
    /// smaller than configured (capped by the host's sysctls): how many, and the last one.
    #[must_use]
    pub fn log_warnings(&self) -> (usize, Option<String>) {
        let Some(log) = self.config.parent().map(|d| d.join("sensorgate.log")) else {
            return (0, None);
        };
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let warnings: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .filter(|l| !l.contains("smaller socket buffers"))
            .collect();
        (warnings.len(), warnings.last().map(|l| (*l).to_owned()))
    }

    /// The `sensorgate_ingress_events_total` counters of `protocol` (`"mqtt-sn"`, `"coap"`)
    /// from the admin listener's `/metrics`, by event name.
    ///
    /// # Errors
    /// Without an admin listener, or when `/metrics` does not answer within 5 s.
    pub fn ingress_events(
        &self,
        protocol: &str,
    ) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
        use std::io::Read;
        let at = self.admin.context("the gateway has no admin listener")?;
        let mut s = TcpStream::connect_timeout(&at, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {at}\r\nConnection: close\r\n\r\n").as_bytes(),
        )?;
        let mut text = String::new();
        // Bounded: the listener closes the connection after its answer.
        s.take(16 << 20).read_to_string(&mut text)?;
        let prefix = format!("sensorgate_ingress_events_total{{protocol=\"{protocol}\",event=\"");
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|l| {
                let (name, value) = l.split_once("\"} ")?;
                Some((name.to_owned(), value.trim().parse().ok()?))
            })
            .collect())
    }

    /// Stops the process (`SIGSTOP`) until [`Gateway::resume`]: it keeps its sockets and
    /// state but does nothing, e.g. does not connect to a broker that is being set up.
    ///
    /// # Errors
    /// When the signal cannot be sent.
    pub fn pause(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// Lets a paused process run again (`SIGCONT`).
    ///
    /// # Errors
    /// When the signal cannot be sent.
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal(Signal::SIGCONT)
    }

    fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = i32::try_from(self.pid()).context("process id out of range")?;
        kill(Pid::from_raw(pid), signal).with_context(|| format!("sending {signal} to sensorgate"))
    }
}

/// Sends CoAP pings (empty CON) to `at` from `probe` until an RST (or ACK) with the ping's
/// Message ID comes back, or `until`.
fn coap_ping(probe: &UdpSocket, at: SocketAddr, until: Instant) -> anyhow::Result<()> {
    use crate::coap::wire::{self, Type};
    let mut buf = [0u8; 64];
    let mut mid = 0u16;
    loop {
        if Instant::now() > until {
            bail!("no answer to a CoAP ping (empty CON) at {at} within 10 s");
        }
        mid = mid.wrapping_add(1);
        probe.send_to(&wire::empty(Type::Con, mid), at)?;
        while let Ok((n, from)) = probe.recv_from(&mut buf) {
            if from == at
                && let Some(m) = wire::decode(buf.get(..n).unwrap_or_default())
                && matches!(m.ty, Type::Rst | Type::Ack)
                && m.mid == mid
            {
                return Ok(());
            }
        }
    }
}

/// Sends a DTLS ClientHello to `at` from `probe` until a handshake record (the stateless
/// HelloVerifyRequest: the gateway keeps nothing for it) comes back, or `until`.
fn dtls_probe(probe: &UdpSocket, at: SocketAddr, until: Instant) -> anyhow::Result<()> {
    /// DTLS record content type `handshake` (RFC 6347 4.1).
    const HANDSHAKE: u8 = 22;
    let config = crate::dtls::client_config("probe", &crate::dtls::BENCH_KEY)?;
    let mut buf = vec![0u8; 2048];
    loop {
        if Instant::now() > until {
            bail!("no answer to a DTLS ClientHello at {at} within 10 s");
        }
        let now = Instant::now();
        let mut client = dimpl::Dtls::new_12_psk(std::sync::Arc::clone(&config), now);
        client.set_active(true);
        client
            .handle_timeout(now)
            .map_err(|e| anyhow::anyhow!("dimpl: {e}"))?;
        let mut hello = None;
        loop {
            match client.poll_output(&mut buf) {
                dimpl::Output::Packet(p) => hello = Some(p.to_vec()),
                dimpl::Output::Timeout(_) | dimpl::Output::BufferTooSmall { .. } => break,
                _ => {}
            }
        }
        let hello = hello.context("dimpl made no ClientHello")?;
        probe.send_to(&hello, at)?;
        while let Ok((n, from)) = probe.recv_from(&mut buf) {
            if from == at && n > 0 && buf.first() == Some(&HANDSHAKE) {
                return Ok(());
            }
        }
    }
}

/// Sends `GET /v1/nope` to `at` on fresh connections until the answer is a 404 (the HTTP
/// ingress serves, and answers an unknown path without credentials), or `until`.
fn http_probe(at: SocketAddr, until: Instant) -> anyhow::Result<()> {
    use std::io::Read;
    let mut last = String::from("nothing");
    loop {
        if Instant::now() > until {
            bail!("no 404 to GET /v1/nope at {at} within 10 s (last: {last})");
        }
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&at, Duration::from_millis(200))?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            s.write_all(
                format!("GET /v1/nope HTTP/1.1\r\nHost: {at}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )?;
            let mut head = [0u8; 64];
            let n = s.read(&mut head)?;
            Ok(String::from_utf8_lossy(head.get(..n).unwrap_or_default()).into_owned())
        })();
        match attempt {
            Ok(head) if head.starts_with("HTTP/1.1 404") => return Ok(()),
            Ok(head) => last = head.lines().next().unwrap_or_default().to_owned(),
            Err(e) => last = e.to_string(),
        }
        // Not listening yet (the HTTP thread starts after the datagram listeners): try again
        // shortly.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Bound on a RabbitMQ node's boot (it takes several seconds, more on a busy machine).
const RABBITMQ_READY: Duration = Duration::from_secs(90);

/// Bound on a RabbitMQ node's orderly stop before it is killed.
const RABBITMQ_STOP: Duration = Duration::from_secs(30);

/// A private RabbitMQ node on 127.0.0.1 (scenario 8): its own node name, AMQP, distribution
/// and epmd ports, and its data, logs and config under the given directory. Stopped on drop:
/// SIGTERM to the start script (which stops the VM), then SIGKILL to the VM by the PID it
/// wrote if it outlived the grace period, then its private epmd.
#[derive(Debug)]
pub struct Rabbit {
    /// The start script; `None` once stopped.
    script: Option<Child>,
    /// Where the VM writes its PID.
    pid_file: PathBuf,
    epmd_port: u16,
    /// Its AMQP port.
    pub port: u16,
}

/// The RabbitMQ start script, run directly: the `/usr/sbin` wrapper switches to the
/// `rabbitmq` user and drops the environment that keeps the node on loopback.
fn rabbitmq_server_bin() -> anyhow::Result<PathBuf> {
    let lib = Path::new("/usr/lib/rabbitmq/lib");
    std::fs::read_dir(lib)
        .ok()
        .and_then(|dir| {
            dir.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("rabbitmq_server-"))
                })
                .max()
        })
        .map(|d| d.join("sbin/rabbitmq-server"))
        .with_context(|| {
            format!(
                "rabbitmq-server not found under {}: apt-get install rabbitmq-server",
                lib.display()
            )
        })
}

impl Rabbit {
    /// Starts a node with its state in `dir` and waits until its AMQP listener accepts a
    /// connection.
    ///
    /// # Errors
    /// When it is not installed, exits, or does not listen within 90 s.
    pub fn start(dir: &Path) -> anyhow::Result<Rabbit> {
        let bin = rabbitmq_server_bin()?;
        let port = free_port()?;
        let dist_port = free_port()?;
        let epmd_port = free_port()?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        std::fs::write(
            dir.join("rabbitmq.conf"),
            "loopback_users.guest = true\nlog.console = false\nlog.file.level = warning\n",
        )?;
        let pid_file = dir.join("pid");
        let log = std::fs::File::create(dir.join("server.log"))?;
        let child = Command::new(&bin)
            .env("HOME", dir)
            .env(
                "RABBITMQ_NODENAME",
                format!("sgbench-{}-{port}@localhost", std::process::id()),
            )
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("ERL_EPMD_PORT", epmd_port.to_string())
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", &pid_file)
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut rabbit = Rabbit {
            script: Some(child),
            pid_file,
            epmd_port,
            port,
        };
        let until = Instant::now() + RABBITMQ_READY;
        // The AMQP listener opens last in the boot; it then serves connections.
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = rabbit.script.as_mut().and_then(|c| c.try_wait().ok()?) {
                bail!(
                    "rabbitmq-server exited ({status}); see {}",
                    dir.join("server.log").display()
                );
            }
            if Instant::now() > until {
                bail!("rabbitmq did not listen on {port} within {RABBITMQ_READY:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(rabbit)
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The Erlang VM's process id (for its CPU), from the PID file it wrote.
    #[must_use]
    pub fn vm_pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        let vm = self.vm_pid();
        let mut stopped = true;
        if let Some(mut script) = self.script.take() {
            if let Ok(pid) = i32::try_from(script.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let until = Instant::now() + RABBITMQ_STOP;
            while matches!(script.try_wait(), Ok(None)) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            stopped = matches!(script.try_wait(), Ok(Some(_)));
            let _ = script.kill();
            let _ = script.wait();
        }
        // After an orderly stop the VM is gone (the script waits for it); otherwise kill it,
        // checking first that the PID is still an Erlang VM.
        if !stopped
            && let Some(pid) = vm
            && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim().starts_with("beam"))
            && let Ok(pid) = i32::try_from(pid)
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        // The node started its own epmd on the private port.
        let _ = Command::new("epmd")
            .args(["-port", &self.epmd_port.to_string(), "-kill"])
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
