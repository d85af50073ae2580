//! End-to-end test harness: the real `sensorgate` binary between real MQTT-SN clients and a real
//! mosquitto broker, all as child processes on free loopback ports.
//!
//! Invariants:
//! - Every test owns its peers: its own temp dir, broker, gateway and ports. Nothing is shared.
//! - Every wait is bounded in time and in iterations, and waits on an event (a reply, a line, a
//!   successful connect), never on a fixed sleep used as a pass condition.
//! - Every child process is killed and reaped when its guard drops; if the test is panicking,
//!   the child's captured output is printed for diagnosis.
//! - The MQTT-SN encoder and decoder in [`sn`] are written from the v1.2 specification and share
//!   nothing with the gateway's codec, so a codec bug cannot hide itself.
//! - Missing peers (the binary, python, the PyPI packages, mosquitto) fail the test with a
//!   message saying what to install; nothing is skipped.
//!
//! Environment:
//! - `SENSORGATE_BIN`: the binary (default `<workspace>/target/debug/sensorgate`).
//! - `SENSORGATE_PYTHON`: a python with `mqtt-sn-12` and `paho-mqtt` (default
//!   `<workspace>/.venv/bin/python3`); the `mqtt_sn_pub` CLI is taken from the same directory.
//! - `SENSORGATE_MOSQUITTO`: the broker (default `/usr/sbin/mosquitto`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use tempfile::TempDir;

/// How long a peer may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a reply the test expects may take.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a message may take from the gateway to the observing subscriber.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Locating the peers.

/// The workspace root (the parent of this crate).
pub fn workspace_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map_or_else(|| manifest.to_path_buf(), Path::to_path_buf)
}

fn env_or(var: &str, default: PathBuf) -> PathBuf {
    std::env::var_os(var).map_or(default, PathBuf::from)
}

/// The `sensorgate` binary.
///
/// # Panics
/// When it does not exist: the tests never build it themselves.
pub fn sensorgate_bin() -> PathBuf {
    let path = env_or(
        "SENSORGATE_BIN",
        workspace_dir().join("target/debug/sensorgate"),
    );
    if !path.is_file() {
        panic!(
            "sensorgate binary not found at {}: build it first: cargo build --bin sensorgate \
             (or set SENSORGATE_BIN)",
            path.display()
        );
    }
    path
}

/// The python interpreter of the test venv.
///
/// # Panics
/// When it does not exist.
pub fn python() -> PathBuf {
    let path = env_or(
        "SENSORGATE_PYTHON",
        workspace_dir().join(".venv/bin/python3"),
    );
    if !path.exists() {
        panic!(
            "python not found at {}: create the venv (python3 -m venv .venv && \
             .venv/bin/pip install mqtt-sn-12 paho-mqtt) or set SENSORGATE_PYTHON",
            path.display()
        );
    }
    path
}

/// A console script installed in the test venv (next to [`python`]).
///
/// # Panics
/// When it does not exist.
pub fn venv_script(name: &str) -> PathBuf {
    let py = python();
    let path = py
        .parent()
        .map_or_else(|| PathBuf::from(name), |dir| dir.join(name));
    if !path.is_file() {
        panic!(
            "{name} not found at {}: install the PyPI package mqtt-sn-12 into the venv of {}",
            path.display(),
            py.display()
        );
    }
    path
}

/// The mosquitto broker binary.
///
/// # Panics
/// When it does not exist.
pub fn mosquitto_bin() -> PathBuf {
    let path = env_or("SENSORGATE_MOSQUITTO", PathBuf::from("/usr/sbin/mosquitto"));
    if !path.is_file() {
        panic!(
            "mosquitto not found at {}: apt-get install mosquitto mosquitto-clients \
             (or set SENSORGATE_MOSQUITTO)",
            path.display()
        );
    }
    path
}

/// A helper script of this crate (`tests/py/<name>`).
pub fn py_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

// ---------------------------------------------------------------------------------------------
// Ports, temp dirs, processes.

/// A UDP port that was free on `ip` a moment ago.
///
/// # Errors
/// When `ip` cannot be bound at all.
pub fn free_udp_port(ip: IpAddr) -> Result<u16> {
    let sock = UdpSocket::bind(SocketAddr::new(ip, 0)).with_context(|| format!("bind {ip}:0"))?;
    Ok(sock.local_addr()?.port())
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// # Errors
/// When 127.0.0.1 cannot be bound.
pub fn free_tcp_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A fresh temporary directory, removed on drop.
///
/// # Errors
/// When it cannot be created.
pub fn temp_dir() -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix("sensorgate-e2e-")
        .tempdir()
        .context("create temp dir")
}

/// Sends `signal` (a `kill` name such as `TERM`, `STOP`) to `pid`.
///
/// # Errors
/// When `kill` fails.
pub fn send_signal(pid: u32, signal: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .context("run kill")?;
    ensure!(status.success(), "kill -{signal} {pid} failed: {status}");
    Ok(())
}

/// A child process that is killed and reaped on drop, with its output captured in a file.
#[derive(Debug)]
struct Proc {
    /// For messages.
    name: String,
    /// The child; `None` once reaped.
    child: Option<Child>,
    /// Where its stderr (and for some, stdout) goes.
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: &Path, stdout_to_log: bool) -> Result<Proc> {
        // Append: a restarted process keeps its predecessor's output in front of its own.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        cmd.stdin(Stdio::null()).stderr(file.try_clone()?);
        if stdout_to_log {
            cmd.stdout(file);
        } else {
            cmd.stdout(Stdio::piped());
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {name}: {cmd:?}"))?;
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
        })
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` once it exited.
    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            None => bail!("{} was already reaped", self.name),
            Some(child) => Ok(child.try_wait()?),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log.display()))
    }

    /// SIGTERM, then wait up to `grace`, then SIGKILL. Returns the exit status.
    fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("{} is not running", self.name)
        };
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        send_signal(child.id(), "TERM")?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let status = child.wait()?;
        bail!(
            "{} ignored SIGTERM for {grace:?}; killed ({status})",
            self.name
        )
    }

    fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut().and_then(|c| c.stdout.take())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("----- {} output ({}) -----", self.name, self.log.display());
            let text = self.log_text();
            // The tail is what matters; a debug log of a load test is long.
            let tail: String = {
                let lines: Vec<&str> = text.lines().collect();
                let skip = lines.len().saturating_sub(60);
                lines.into_iter().skip(skip).collect::<Vec<_>>().join("\n")
            };
            eprintln!("{tail}\n----- end of {} output -----", self.name);
        }
    }
}

/// Runs a command to completion with a time bound, capturing stdout and stderr.
///
/// # Errors
/// When it cannot be spawned or does not finish within `timeout` (it is then killed).
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let out_reader = spawn_reader(child.stdout.take());
    let err_reader = spawn_reader(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out_reader.join().unwrap_or_default();
            let stderr = err_reader.join().unwrap_or_default();
            bail!(
                "{cmd:?} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_reader
        .join()
        .map_err(|_| anyhow!("stdout reader panicked"))?;
    let stderr = err_reader
        .join()
        .map_err(|_| anyhow!("stderr reader panicked"))?;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

fn spawn_reader<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        buf
    })
}

/// Polls `f` every `every` until it returns `Some`, at most until `timeout`.
///
/// # Errors
/// The last error of `f`, or a timeout naming `what`.
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    // The count bound backs up the time bound should `f` itself block for long.
    let max_rounds = (timeout.as_millis() / every.as_millis().max(1)).saturating_add(2);
    for _ in 0..max_rounds {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(every);
    }
    match last_err {
        Some(e) => Err(e.context(format!("timed out after {timeout:?} waiting for {what}"))),
        None => bail!("timed out after {timeout:?} waiting for {what}"),
    }
}

// ---------------------------------------------------------------------------------------------
// mosquitto.

/// A mosquitto broker on 127.0.0.1 with a generated config; killed on drop.
#[derive(Debug)]
pub struct Mosquitto {
    /// Fixed for the broker's life so `restart` comes back where the gateway expects it.
    port: u16,
    /// `None` while stopped.
    proc: Option<Proc>,
    /// Number of launches, to keep each launch's log.
    launches: u32,
    /// Holds the config and the logs; declared last so it outlives the process.
    dir: TempDir,
}

impl Mosquitto {
    /// Starts a broker on a free port and waits until it answers an MQTT CONNECT.
    ///
    /// # Errors
    /// When it does not come up within [`READY_TIMEOUT`].
    pub fn start() -> Result<Mosquitto> {
        Mosquitto::start_on(free_tcp_port()?)
    }

    /// Starts a broker on `port`.
    ///
    /// # Errors
    /// When it does not come up within [`READY_TIMEOUT`].
    pub fn start_on(port: u16) -> Result<Mosquitto> {
        let mut m = Mosquitto {
            port,
            proc: None,
            launches: 0,
            dir: temp_dir()?,
        };
        m.launch()?;
        Ok(m)
    }

    /// Its TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Its PID while running.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }

    /// Stops it (SIGTERM, then SIGKILL after 10 s) and waits for it to exit.
    ///
    /// # Errors
    /// When it was not running.
    pub fn stop(&mut self) -> Result<()> {
        let mut proc = self
            .proc
            .take()
            .ok_or_else(|| anyhow!("mosquitto is not running"))?;
        proc.terminate(Duration::from_secs(10))?;
        Ok(())
    }

    /// Starts it again on the same port (stopping it first if it runs).
    ///
    /// # Errors
    /// When it does not come up within [`READY_TIMEOUT`].
    pub fn restart(&mut self) -> Result<()> {
        if self.proc.is_some() {
            self.stop()?;
        }
        self.launch()
    }

    /// Freezes it with SIGSTOP: connections stay open but nothing is answered.
    ///
    /// # Errors
    /// When it is not running.
    pub fn pause(&self) -> Result<()> {
        send_signal(
            self.pid()
                .ok_or_else(|| anyhow!("mosquitto is not running"))?,
            "STOP",
        )
    }

    /// Undoes [`Mosquitto::pause`].
    ///
    /// # Errors
    /// When it is not running.
    pub fn resume(&self) -> Result<()> {
        send_signal(
            self.pid()
                .ok_or_else(|| anyhow!("mosquitto is not running"))?,
            "CONT",
        )
    }

    fn launch(&mut self) -> Result<()> {
        let conf = self.dir.path().join("mosquitto.conf");
        // max_queued_messages: the load test fans 1,000 QoS 1 messages into one subscriber.
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n\
                 max_queued_messages 100000\nmax_inflight_messages 0\n",
                self.port
            ),
        )?;
        // A restart right after a stop may briefly find the port still held: retry a few times.
        let mut last_err = None;
        for _ in 0..5 {
            self.launches += 1;
            let log = self
                .dir
                .path()
                .join(format!("mosquitto-{}.log", self.launches));
            let mut cmd = Command::new(mosquitto_bin());
            cmd.arg("-c").arg(&conf);
            let mut proc = Proc::spawn("mosquitto", &mut cmd, &log, true)?;
            match wait_broker_ready(&mut proc, self.port) {
                Ok(()) => {
                    self.proc = Some(proc);
                    return Ok(());
                }
                Err(e) => last_err = Some(e),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(last_err.unwrap_or_else(|| anyhow!("mosquitto did not start")))
    }
}

fn wait_broker_ready(proc: &mut Proc, port: u16) -> Result<()> {
    poll_until(
        "mosquitto to accept MQTT",
        READY_TIMEOUT,
        Duration::from_millis(50),
        || {
            if let Some(status) = proc.exited()? {
                bail!("mosquitto exited early ({status}):\n{}", proc.log_text());
            }
            Ok(mqtt_ping(port).ok())
        },
    )
}

/// Connects to an MQTT broker on 127.0.0.1:`port`, sends an MQTT 3.1.1 CONNECT and waits for a
/// successful CONNACK.
///
/// # Errors
/// When anything but a successful CONNACK comes back.
pub fn mqtt_ping(port: u16) -> Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    // CONNECT: remaining length 12, "MQTT", level 4, clean session, keepalive 60, empty id.
    s.write_all(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 0])?;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack)?;
    ensure!(
        connack == [0x20, 0x02, 0x00, 0x00],
        "unexpected CONNACK {connack:02x?}"
    );
    s.write_all(&[0xE0, 0x00])?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The gateway.

/// A predefined topic for the generated config.
#[derive(Debug, Clone)]
pub struct Predefined {
    /// Its id.
    pub id: u16,
    /// The MQTT topic.
    pub topic: String,
    /// ClientIds allowed, or `["*"]`.
    pub clients: Vec<String>,
}

/// The settings a test varies; [`GatewayConfig::render`] writes the TOML.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// `[gateway] id`.
    pub gateway_id: u8,
    /// `[log] level`.
    pub log_level: String,
    /// `[mqttsn] listen`; the first one is probed for readiness.
    pub listen: Vec<SocketAddr>,
    /// `[mqttsn] max_packet_size`.
    pub max_packet_size: String,
    /// `[mqttsn] max_inflight_per_client`.
    pub max_inflight_per_client: u32,
    /// `[mqttsn] qos_minus_one`.
    pub qos_minus_one: bool,
    /// `[[mqttsn.predefined_topic]]`.
    pub predefined: Vec<Predefined>,
    /// The broker port of the one `[[upstream]]`.
    pub broker_port: u16,
    /// `protocol`: `"5"` or `"3.1.1"`.
    pub protocol: String,
    /// `remote_prefix`.
    pub remote_prefix: String,
    /// Extra `key = value` lines for `[mqttsn]`.
    pub extra_mqttsn: String,
}

/// The predefined topic every default config has.
pub const PREDEFINED_ID: u16 = 1;
/// Its MQTT topic.
pub const PREDEFINED_TOPIC: &str = "sensors/predefined/1";
/// The GwId of every default config.
pub const GATEWAY_ID: u8 = 7;

impl GatewayConfig {
    /// The default test config: one listener on a free 127.0.0.1 UDP port, gateway id
    /// [`GATEWAY_ID`], predefined topic [`PREDEFINED_ID`] → [`PREDEFINED_TOPIC`] for everyone,
    /// MQTT 5 upstream to 127.0.0.1:`broker_port`.
    ///
    /// # Errors
    /// When no UDP port can be found.
    pub fn new(broker_port: u16) -> Result<GatewayConfig> {
        let port = free_udp_port(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
        Ok(GatewayConfig {
            gateway_id: GATEWAY_ID,
            log_level: "debug".into(),
            listen: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, port))],
            max_packet_size: "4KiB".into(),
            max_inflight_per_client: 16,
            qos_minus_one: true,
            predefined: vec![Predefined {
                id: PREDEFINED_ID,
                topic: PREDEFINED_TOPIC.into(),
                clients: vec!["*".into()],
            }],
            broker_port,
            protocol: "5".into(),
            remote_prefix: String::new(),
            extra_mqttsn: String::new(),
        })
    }

    /// Replaces the listeners with one on a free UDP port of `ip`.
    ///
    /// # Errors
    /// When `ip` cannot be bound.
    pub fn listen_on(&mut self, ip: IpAddr) -> Result<()> {
        self.listen = vec![SocketAddr::new(ip, free_udp_port(ip)?)];
        Ok(())
    }

    /// The address clients send to (the first listener).
    ///
    /// # Panics
    /// When `listen` is empty, which no test does.
    pub fn sn_addr(&self) -> SocketAddr {
        match self.listen.first() {
            Some(a) => *a,
            None => panic!("GatewayConfig::listen is empty"),
        }
    }

    /// The TOML text, with `state_dir` as the state directory.
    pub fn render(&self, state_dir: &Path) -> String {
        let listen: Vec<String> = self.listen.iter().map(|a| format!("\"{a}\"")).collect();
        let mut s = format!(
            "[gateway]\nid = {}\nstate_dir = \"{}\"\n\n[log]\nlevel = \"{}\"\n\n\
             [mqttsn]\nlisten = [{}]\nmax_packet_size = \"{}\"\nmax_clients = 100000\n\
             max_topics_per_client = 64\nmax_inflight_per_client = {}\nmax_client_id_len = 23\n\
             qos_minus_one = {}\n",
            self.gateway_id,
            state_dir.display(),
            self.log_level,
            listen.join(", "),
            self.max_packet_size,
            self.max_inflight_per_client,
            self.qos_minus_one,
        );
        s.push_str(&self.extra_mqttsn);
        for p in &self.predefined {
            let clients: Vec<String> = p.clients.iter().map(|c| format!("\"{c}\"")).collect();
            s.push_str(&format!(
                "\n[[mqttsn.predefined_topic]]\nid = {}\ntopic = \"{}\"\nclients = [{}]\n",
                p.id,
                p.topic,
                clients.join(", ")
            ));
        }
        s.push_str(&format!(
            "\n[[upstream]]\nname = \"local\"\nkind = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{}\"\n\
             remote_prefix = \"{}\"\nprotocol = \"{}\"\nbackoff_initial = \"100ms\"\n\
             backoff_max = \"1s\"\n",
            self.broker_port, self.remote_prefix, self.protocol
        ));
        s
    }
}

/// A running `sensorgate run`; killed on drop.
#[derive(Debug)]
pub struct Gateway {
    /// `None` once stopped.
    proc: Option<Proc>,
    /// Where clients send datagrams.
    sn_addr: SocketAddr,
    /// Holds the config, the state dir and the log; declared last so it outlives the process.
    dir: TempDir,
}

impl Gateway {
    /// Writes `cfg` into a fresh temp dir, starts the gateway and waits until it answers an
    /// MQTT-SN CONNECT on its first listener.
    ///
    /// # Errors
    /// When it exits or does not answer within [`READY_TIMEOUT`].
    pub fn start(cfg: &GatewayConfig) -> Result<Gateway> {
        let dir = temp_dir()?;
        let text = cfg.render(&dir.path().join("state"));
        Gateway::start_in(dir, &text, cfg.sn_addr())
    }

    /// Starts the gateway on config `text` (written into `dir`), probing `sn_addr`.
    ///
    /// # Errors
    /// When it exits or does not answer within [`READY_TIMEOUT`].
    pub fn start_in(dir: TempDir, text: &str, sn_addr: SocketAddr) -> Result<Gateway> {
        std::fs::write(dir.path().join("sensorgate.toml"), text)?;
        let mut gw = Gateway {
            proc: None,
            sn_addr,
            dir,
        };
        gw.launch()
            .with_context(|| format!("gateway config:\n{text}"))?;
        Ok(gw)
    }

    fn launch(&mut self) -> Result<()> {
        let config = self.dir.path().join("sensorgate.toml");
        let log = self.dir.path().join("sensorgate.log");
        let mut cmd = Command::new(sensorgate_bin());
        cmd.arg("run").arg("-c").arg(&config).env_remove("RUST_LOG");
        self.proc = Some(Proc::spawn("sensorgate", &mut cmd, &log, true)?);
        self.wait_ready()
    }

    /// SIGKILL: no shutdown path runs at all.
    ///
    /// # Errors
    /// When it was not running.
    pub fn kill9(&mut self) -> Result<ExitStatus> {
        let mut proc = self
            .proc
            .take()
            .ok_or_else(|| anyhow!("gateway is not running"))?;
        let mut child = proc
            .child
            .take()
            .ok_or_else(|| anyhow!("gateway was reaped"))?;
        send_signal(child.id(), "KILL")?;
        Ok(child.wait()?)
    }

    /// Starts it again on the same config, state dir and ports (after [`Gateway::stop`] or
    /// [`Gateway::kill9`]) and waits until it is ready.
    ///
    /// # Errors
    /// When it still runs, or does not come up within [`READY_TIMEOUT`].
    pub fn restart(&mut self) -> Result<()> {
        if let Some(proc) = self.proc.as_mut() {
            // A stopped gateway keeps its reaped guard (for the log); only a live child counts.
            ensure!(
                !matches!(proc.exited(), Ok(None)),
                "gateway still runs; stop it first"
            );
        }
        self.proc = None;
        self.launch()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let probe = SnClient::new(self.sn_addr)?;
        let connect = sn::connect(sn::FLAG_CLEAN, 60, b"ready-probe");
        poll_until(
            "the gateway to answer CONNECT",
            READY_TIMEOUT,
            Duration::ZERO,
            || {
                if let Some(status) = self.exited()? {
                    bail!("sensorgate exited early ({status}):\n{}", self.log());
                }
                probe.send(&connect)?;
                match probe.recv(Duration::from_millis(200))? {
                    Some(sn::Packet::Connack { rc: 0 }) => Ok(Some(())),
                    Some(sn::Packet::Connack { rc }) => {
                        bail!("readiness probe got CONNACK rc {rc}")
                    }
                    _ => Ok(None),
                }
            },
        )?;
        probe.send(&sn::disconnect())?;
        // The reply is not needed; the probe socket closes when it drops.
        Ok(())
    }

    /// Where clients send datagrams.
    pub fn sn_addr(&self) -> SocketAddr {
        self.sn_addr
    }

    /// Its PID while running.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }

    /// The temp dir holding its config, state and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `Some(status)` once it exited.
    ///
    /// # Errors
    /// When it was already stopped.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        self.proc
            .as_mut()
            .ok_or_else(|| anyhow!("gateway was stopped"))?
            .exited()
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.exited(), Ok(None))
    }

    /// Its output so far.
    pub fn log(&self) -> String {
        std::fs::read(self.dir.path().join("sensorgate.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// SIGTERM, then waits up to 15 s for it to exit; returns the exit status.
    ///
    /// # Errors
    /// When it was not running or had to be killed.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let mut proc = self
            .proc
            .take()
            .ok_or_else(|| anyhow!("gateway is not running"))?;
        let r = proc.terminate(Duration::from_secs(15));
        // Keep the guard so a panicking test still prints the log.
        self.proc = Some(proc);
        r
    }
}

// ---------------------------------------------------------------------------------------------
// The broker observer.

/// A message as the broker delivered it to the observer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// MQTT topic.
    pub topic: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Delivered QoS (the publish QoS capped by the subscription's, which is 2 by default).
    pub qos: u8,
    /// The retain flag as delivered.
    pub retain: bool,
}

enum SubLine {
    Ready,
    Msg(Message),
    Other(String),
}

/// A paho-mqtt subscriber (`tests/py/sub.py`) on 127.0.0.1; ready (SUBACK received) once
/// [`Subscriber::start`] returns.
pub struct Subscriber {
    /// The python process.
    proc: Proc,
    /// Lines from its stdout.
    rx: mpsc::Receiver<SubLine>,
    /// Keeps its log.
    _dir: TempDir,
}

impl Subscriber {
    /// Subscribes with MQTT 5 (retain-as-published) to `filters` on 127.0.0.1:`port`.
    ///
    /// # Errors
    /// When the subscriber does not print READY within [`READY_TIMEOUT`].
    pub fn start(port: u16, filters: &[&str]) -> Result<Subscriber> {
        Subscriber::start_with(port, filters, "5")
    }

    /// As [`Subscriber::start`] with MQTT `protocol` `"5"` or `"3.1.1"`.
    ///
    /// # Errors
    /// When the subscriber does not print READY within [`READY_TIMEOUT`].
    pub fn start_with(port: u16, filters: &[&str], protocol: &str) -> Result<Subscriber> {
        Subscriber::start_full(port, filters, protocol, 2)
    }

    /// As [`Subscriber::start_with`], subscribing with QoS `qos` instead of 2.
    ///
    /// A QoS 2 subscription hands a message to the observer only when the broker's PUBREL
    /// arrives, so a later QoS 1 message can overtake it; order-sensitive checks subscribe with
    /// QoS 1, where delivery follows the broker's sending order.
    ///
    /// # Errors
    /// When the subscriber does not print READY within [`READY_TIMEOUT`].
    pub fn start_full(port: u16, filters: &[&str], protocol: &str, qos: u8) -> Result<Subscriber> {
        let dir = temp_dir()?;
        let log = dir.path().join("sub.log");
        let mut cmd = Command::new(python());
        cmd.arg("-u")
            .arg(py_script("sub.py"))
            .arg("--port")
            .arg(port.to_string())
            .arg("--protocol")
            .arg(protocol)
            .arg("--qos")
            .arg(qos.to_string());
        for f in filters {
            cmd.arg("--topic").arg(f);
        }
        let mut proc = Proc::spawn("sub.py", &mut cmd, &log, false)?;
        let stdout = proc
            .take_stdout()
            .ok_or_else(|| anyhow!("sub.py has no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(parse_sub_line(&line)).is_err() {
                    break;
                }
            }
        });
        let sub = Subscriber {
            proc,
            rx,
            _dir: dir,
        };
        match sub.rx.recv_timeout(READY_TIMEOUT) {
            Ok(SubLine::Ready) => Ok(sub),
            Ok(SubLine::Msg(_)) => bail!("sub.py sent a message before READY"),
            Ok(SubLine::Other(l)) => bail!("sub.py: {l}\n{}", sub.proc.log_text()),
            Err(e) => bail!(
                "sub.py did not subscribe within {READY_TIMEOUT:?} ({e}); is paho-mqtt \
                 installed for {}?\n{}",
                python().display(),
                sub.proc.log_text()
            ),
        }
    }

    /// The next message, or `None` after `timeout`.
    ///
    /// # Errors
    /// When the subscriber died or printed something unexpected.
    pub fn next(&mut self, timeout: Duration) -> Result<Option<Message>> {
        match self.rx.recv_timeout(timeout) {
            Ok(SubLine::Msg(m)) => Ok(Some(m)),
            Ok(SubLine::Ready) => bail!("sub.py printed READY twice"),
            Ok(SubLine::Other(l)) => bail!("sub.py: {l}\n{}", self.proc.log_text()),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("sub.py exited:\n{}", self.proc.log_text())
            }
        }
    }

    /// The next message within [`DELIVERY_TIMEOUT`].
    ///
    /// # Errors
    /// When none arrives.
    pub fn expect(&mut self) -> Result<Message> {
        self.next(DELIVERY_TIMEOUT)?
            .ok_or_else(|| anyhow!("no message reached the broker within {DELIVERY_TIMEOUT:?}"))
    }

    /// `n` messages within `timeout`.
    ///
    /// # Errors
    /// When fewer arrive; the error says how many did.
    pub fn collect(&mut self, n: usize, timeout: Duration) -> Result<Vec<Message>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left)? {
                Some(m) => out.push(m),
                None => bail!(
                    "only {} of {n} messages arrived within {timeout:?}",
                    out.len()
                ),
            }
        }
        Ok(out)
    }
}

fn parse_sub_line(line: &str) -> SubLine {
    if line == "READY" {
        return SubLine::Ready;
    }
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        return SubLine::Other(line.to_owned());
    };
    let topic = v.get("topic").and_then(|t| t.as_str());
    let payload = v
        .get("payload_hex")
        .and_then(|p| p.as_str())
        .and_then(from_hex);
    let qos = v.get("qos").and_then(serde_json::Value::as_u64);
    let retain = v.get("retain").and_then(serde_json::Value::as_bool);
    match (topic, payload, qos, retain) {
        (Some(topic), Some(payload), Some(qos), Some(retain)) => SubLine::Msg(Message {
            topic: topic.to_owned(),
            payload,
            qos: u8::try_from(qos).unwrap_or(u8::MAX),
            retain,
        }),
        _ => SubLine::Other(line.to_owned()),
    }
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The mqtt_sn_pub CLI.

/// Runs the PyPI `mqtt_sn_pub` CLI with `args` against `gw`, bounded to 30 s.
///
/// # Errors
/// When it cannot run or does not finish.
pub fn mqtt_sn_pub(gw: SocketAddr, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(python());
    cmd.arg(venv_script("mqtt_sn_pub"))
        .arg("-h")
        .arg(gw.ip().to_string())
        .arg("-p")
        .arg(gw.port().to_string())
        .arg("--timeout")
        .arg("10")
        .args(args);
    run_bounded(&mut cmd, Duration::from_secs(30))
}

// ---------------------------------------------------------------------------------------------
// MQTT-SN wire format.

/// A tiny MQTT-SN v1.2 encoder and decoder, written from the specification.
pub mod sn {
    use anyhow::{Result, bail};

    /// ADVERTISE.
    pub const ADVERTISE: u8 = 0x00;
    /// SEARCHGW.
    pub const SEARCHGW: u8 = 0x01;
    /// GWINFO.
    pub const GWINFO: u8 = 0x02;
    /// CONNECT.
    pub const CONNECT: u8 = 0x04;
    /// CONNACK.
    pub const CONNACK: u8 = 0x05;
    /// WILLTOPICREQ.
    pub const WILLTOPICREQ: u8 = 0x06;
    /// REGISTER.
    pub const REGISTER: u8 = 0x0A;
    /// REGACK.
    pub const REGACK: u8 = 0x0B;
    /// PUBLISH.
    pub const PUBLISH: u8 = 0x0C;
    /// PUBACK.
    pub const PUBACK: u8 = 0x0D;
    /// PUBCOMP.
    pub const PUBCOMP: u8 = 0x0E;
    /// PUBREC.
    pub const PUBREC: u8 = 0x0F;
    /// PUBREL.
    pub const PUBREL: u8 = 0x10;
    /// PINGREQ.
    pub const PINGREQ: u8 = 0x16;
    /// PINGRESP.
    pub const PINGRESP: u8 = 0x17;
    /// DISCONNECT.
    pub const DISCONNECT: u8 = 0x18;
    /// Forwarder encapsulation.
    pub const ENCAPSULATED: u8 = 0xFE;

    /// DUP flag.
    pub const FLAG_DUP: u8 = 0x80;
    /// Retain flag.
    pub const FLAG_RETAIN: u8 = 0x10;
    /// Will flag.
    pub const FLAG_WILL: u8 = 0x08;
    /// CleanSession flag.
    pub const FLAG_CLEAN: u8 = 0x04;

    /// Return code: accepted.
    pub const RC_ACCEPTED: u8 = 0x00;
    /// Return code: rejected, congestion.
    pub const RC_CONGESTION: u8 = 0x01;
    /// Return code: rejected, invalid topic id.
    pub const RC_INVALID_TOPIC: u8 = 0x02;
    /// Return code: rejected, not supported.
    pub const RC_NOT_SUPPORTED: u8 = 0x03;

    /// QoS as the flags encode it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Qos {
        /// 0b00.
        Zero,
        /// 0b01.
        One,
        /// 0b10.
        Two,
        /// 0b11, QoS -1.
        MinusOne,
    }

    impl Qos {
        fn bits(self) -> u8 {
            match self {
                Qos::Zero => 0x00,
                Qos::One => 0x20,
                Qos::Two => 0x40,
                Qos::MinusOne => 0x60,
            }
        }
    }

    /// TopicIdType.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum TopicType {
        /// 0b00: a registered id.
        Normal,
        /// 0b01: a predefined id.
        Predefined,
        /// 0b10: a two-character short name.
        Short,
        /// 0b11: reserved.
        Reserved,
    }

    impl TopicType {
        fn bits(self) -> u8 {
            match self {
                TopicType::Normal => 0,
                TopicType::Predefined => 1,
                TopicType::Short => 2,
                TopicType::Reserved => 3,
            }
        }
    }

    /// A flags octet.
    pub fn flags(qos: Qos, retain: bool, topic_type: TopicType) -> u8 {
        qos.bits() | if retain { FLAG_RETAIN } else { 0 } | topic_type.bits()
    }

    /// The topic id of a two-character short topic name.
    pub fn short_id(name: &[u8; 2]) -> u16 {
        u16::from_be_bytes(*name)
    }

    /// Frames `body` as message `msg_type`, with the 1-octet length when it fits.
    pub fn frame(msg_type: u8, body: &[u8]) -> Vec<u8> {
        let total = body.len() + 2;
        if total <= 255 {
            let mut v = Vec::with_capacity(total);
            v.push(total as u8);
            v.push(msg_type);
            v.extend_from_slice(body);
            v
        } else {
            frame_long(msg_type, body)
        }
    }

    /// Frames `body` with the 3-octet length form (`0x01`, u16), whatever its size.
    ///
    /// # Panics
    /// When the message exceeds 65535 octets.
    pub fn frame_long(msg_type: u8, body: &[u8]) -> Vec<u8> {
        let total = body.len() + 4;
        let Ok(len) = u16::try_from(total) else {
            panic!("an MQTT-SN message is at most 65535 octets, not {total}")
        };
        let mut v = Vec::with_capacity(total);
        v.push(0x01);
        v.extend_from_slice(&len.to_be_bytes());
        v.push(msg_type);
        v.extend_from_slice(body);
        v
    }

    /// CONNECT with protocol id 0x01.
    pub fn connect(flags: u8, duration_secs: u16, client_id: &[u8]) -> Vec<u8> {
        connect_with_protocol(flags, 0x01, duration_secs, client_id)
    }

    /// CONNECT with any protocol id.
    pub fn connect_with_protocol(
        flags: u8,
        protocol_id: u8,
        duration_secs: u16,
        client_id: &[u8],
    ) -> Vec<u8> {
        let mut b = vec![flags, protocol_id];
        b.extend_from_slice(&duration_secs.to_be_bytes());
        b.extend_from_slice(client_id);
        frame(CONNECT, &b)
    }

    /// REGISTER from a client (TopicId 0).
    pub fn register(msg_id: u16, topic: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0];
        b.extend_from_slice(&msg_id.to_be_bytes());
        b.extend_from_slice(topic);
        frame(REGISTER, &b)
    }

    /// PUBLISH body (flags, topic id, msg id, data), unframed.
    pub fn publish_body(flags: u8, topic_id: u16, msg_id: u16, data: &[u8]) -> Vec<u8> {
        let mut b = vec![flags];
        b.extend_from_slice(&topic_id.to_be_bytes());
        b.extend_from_slice(&msg_id.to_be_bytes());
        b.extend_from_slice(data);
        b
    }

    /// PUBLISH.
    pub fn publish(flags: u8, topic_id: u16, msg_id: u16, data: &[u8]) -> Vec<u8> {
        frame(PUBLISH, &publish_body(flags, topic_id, msg_id, data))
    }

    /// PUBREL.
    pub fn pubrel(msg_id: u16) -> Vec<u8> {
        frame(PUBREL, &msg_id.to_be_bytes())
    }

    /// PINGREQ without ClientId.
    pub fn pingreq() -> Vec<u8> {
        frame(PINGREQ, &[])
    }

    /// DISCONNECT without duration.
    pub fn disconnect() -> Vec<u8> {
        frame(DISCONNECT, &[])
    }

    /// SEARCHGW.
    pub fn searchgw(radius: u8) -> Vec<u8> {
        frame(SEARCHGW, &[radius])
    }

    /// Forwarder encapsulation of `inner` (5.5): Length, 0xFE, Ctrl, Wireless Node Id, message.
    pub fn encapsulate(radius: u8, node_id: &[u8], inner: &[u8]) -> Vec<u8> {
        let mut v = vec![(3 + node_id.len()) as u8, ENCAPSULATED, radius & 0x03];
        v.extend_from_slice(node_id);
        v.extend_from_slice(inner);
        v
    }

    /// A message from the gateway.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Packet {
        /// GWINFO.
        GwInfo {
            /// GwId.
            gw_id: u8,
        },
        /// CONNACK.
        Connack {
            /// ReturnCode.
            rc: u8,
        },
        /// REGACK.
        Regack {
            /// TopicId.
            topic_id: u16,
            /// MsgId.
            msg_id: u16,
            /// ReturnCode.
            rc: u8,
        },
        /// PUBACK.
        Puback {
            /// TopicId.
            topic_id: u16,
            /// MsgId.
            msg_id: u16,
            /// ReturnCode.
            rc: u8,
        },
        /// PUBREC.
        Pubrec {
            /// MsgId.
            msg_id: u16,
        },
        /// PUBCOMP.
        Pubcomp {
            /// MsgId.
            msg_id: u16,
        },
        /// PINGRESP.
        Pingresp,
        /// DISCONNECT (with or without duration).
        Disconnect,
        /// Anything else, raw.
        Other {
            /// The whole datagram.
            raw: Vec<u8>,
        },
    }

    fn u16_at(b: &[u8], i: usize) -> Option<u16> {
        Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))
    }

    /// Decodes one datagram from the gateway.
    ///
    /// # Errors
    /// When the length field does not match the datagram (the gateway must never send that).
    pub fn decode(raw: &[u8]) -> Result<Packet> {
        let (len, hdr) = match raw.first() {
            Some(0x01) => match u16_at(raw, 1) {
                Some(l) => (usize::from(l), 3),
                None => bail!("truncated 3-octet length in {raw:02x?}"),
            },
            Some(&l) => (usize::from(l), 1),
            None => bail!("empty datagram from the gateway"),
        };
        if len != raw.len() || len < hdr + 1 {
            bail!(
                "length field {len} does not match datagram of {} octets: {raw:02x?}",
                raw.len()
            );
        }
        let Some((&msg_type, body)) = raw.get(hdr..).and_then(<[u8]>::split_first) else {
            bail!("no MsgType in {raw:02x?}")
        };
        let other = || Packet::Other { raw: raw.to_vec() };
        let p = match (msg_type, body.len()) {
            (GWINFO, n) if n >= 1 => Packet::GwInfo {
                gw_id: body.first().copied().unwrap_or(0),
            },
            (CONNACK, 1) => Packet::Connack {
                rc: body.first().copied().unwrap_or(0),
            },
            (REGACK, 5) | (PUBACK, 5) => {
                let (Some(topic_id), Some(msg_id), Some(&rc)) =
                    (u16_at(body, 0), u16_at(body, 2), body.get(4))
                else {
                    return Ok(other());
                };
                if msg_type == REGACK {
                    Packet::Regack {
                        topic_id,
                        msg_id,
                        rc,
                    }
                } else {
                    Packet::Puback {
                        topic_id,
                        msg_id,
                        rc,
                    }
                }
            }
            (PUBREC, 2) => Packet::Pubrec {
                msg_id: u16_at(body, 0).unwrap_or(0),
            },
            (PUBCOMP, 2) => Packet::Pubcomp {
                msg_id: u16_at(body, 0).unwrap_or(0),
            },
            (PINGRESP, 0) => Packet::Pingresp,
            (DISCONNECT, 0) | (DISCONNECT, 2) => Packet::Disconnect,
            _ => other(),
        };
        Ok(p)
    }
}

// ---------------------------------------------------------------------------------------------
// A raw MQTT-SN client.

/// A raw MQTT-SN client on its own UDP socket (so its own source port).
#[derive(Debug)]
pub struct SnClient {
    /// Bound to the loopback of the gateway's address family.
    sock: UdpSocket,
    /// The gateway.
    gw: SocketAddr,
    /// The next MsgId (never 0).
    next_msg_id: u16,
}

impl SnClient {
    /// A client on a fresh loopback socket.
    ///
    /// # Errors
    /// When the socket cannot be bound.
    pub fn new(gw: SocketAddr) -> Result<SnClient> {
        let local: IpAddr = match gw {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        };
        let sock = UdpSocket::bind(SocketAddr::new(local, 0))?;
        Ok(SnClient {
            sock,
            gw,
            next_msg_id: 1,
        })
    }

    /// Its local address.
    ///
    /// # Errors
    /// When the OS cannot say.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.sock.local_addr()?)
    }

    /// A fresh MsgId.
    pub fn msg_id(&mut self) -> u16 {
        let id = self.next_msg_id;
        self.next_msg_id = self.next_msg_id.checked_add(1).unwrap_or(1);
        id
    }

    /// Sends raw bytes.
    ///
    /// # Errors
    /// When sending fails.
    pub fn send(&self, bytes: &[u8]) -> Result<()> {
        let n = self.sock.send_to(bytes, self.gw)?;
        ensure!(n == bytes.len(), "short send: {n} of {}", bytes.len());
        Ok(())
    }

    /// The next datagram, raw, or `None` after `timeout`.
    ///
    /// # Errors
    /// When receiving fails.
    pub fn recv_raw(&self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        self.sock
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut buf = vec![0u8; 65536];
        match self.sock.recv_from(&mut buf) {
            Ok((n, _)) => {
                buf.truncate(n);
                Ok(Some(buf))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The next packet, or `None` after `timeout`.
    ///
    /// # Errors
    /// When receiving fails or the gateway sent a malformed datagram.
    pub fn recv(&self, timeout: Duration) -> Result<Option<sn::Packet>> {
        match self.recv_raw(timeout)? {
            Some(raw) => Ok(Some(sn::decode(&raw)?)),
            None => Ok(None),
        }
    }

    /// Waits up to `timeout` for a packet matching `want`, skipping others.
    ///
    /// # Errors
    /// On timeout; the error lists what was skipped.
    pub fn expect(
        &self,
        what: &str,
        timeout: Duration,
        mut want: impl FnMut(&sn::Packet) -> bool,
    ) -> Result<sn::Packet> {
        let deadline = Instant::now() + timeout;
        let mut skipped = Vec::new();
        // Bounded by count too: a flood of unrelated packets cannot keep us here forever.
        for _ in 0..10_000 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.recv(left)? {
                Some(p) if want(&p) => return Ok(p),
                Some(p) => skipped.push(p),
                None => break,
            }
        }
        bail!("no {what} within {timeout:?}; received instead: {skipped:?}")
    }

    /// The very next packet, within [`REPLY_TIMEOUT`].
    ///
    /// # Errors
    /// When nothing arrives.
    pub fn next_packet(&self) -> Result<sn::Packet> {
        self.recv(REPLY_TIMEOUT)?
            .ok_or_else(|| anyhow!("no reply within {REPLY_TIMEOUT:?}"))
    }

    /// Proves the gateway sent this client nothing since the last receive: sends SEARCHGW and
    /// requires GWINFO to be the very next packet. The gateway handles one socket's datagrams
    /// in order, so a reply to anything sent earlier would arrive first.
    ///
    /// # Errors
    /// When anything else arrives first, or nothing.
    pub fn assert_no_reply(&self) -> Result<()> {
        self.send(&sn::searchgw(0))?;
        match self.next_packet()? {
            sn::Packet::GwInfo { .. } => Ok(()),
            p => bail!("expected no reply (then GWINFO for the SEARCHGW probe), got {p:?}"),
        }
    }

    /// CONNECT with CleanSession; returns the CONNACK return code.
    ///
    /// # Errors
    /// When no CONNACK arrives.
    pub fn connect(&mut self, client_id: &str) -> Result<u8> {
        self.connect_flags(client_id, sn::FLAG_CLEAN)
    }

    /// CONNECT with `flags`; returns the CONNACK return code.
    ///
    /// # Errors
    /// When no CONNACK arrives.
    pub fn connect_flags(&mut self, client_id: &str, flags: u8) -> Result<u8> {
        self.send(&sn::connect(flags, 60, client_id.as_bytes()))?;
        match self.expect("CONNACK", REPLY_TIMEOUT, |p| {
            matches!(p, sn::Packet::Connack { .. })
        })? {
            sn::Packet::Connack { rc } => Ok(rc),
            p => bail!("unreachable: {p:?}"),
        }
    }

    /// CONNECT and require rc 0.
    ///
    /// # Errors
    /// When rejected or unanswered.
    pub fn connect_ok(&mut self, client_id: &str) -> Result<()> {
        let rc = self.connect(client_id)?;
        ensure!(
            rc == sn::RC_ACCEPTED,
            "CONNECT {client_id:?} got CONNACK rc {rc:#04x}"
        );
        Ok(())
    }

    /// REGISTER; returns (topic id, rc) of the matching REGACK.
    ///
    /// # Errors
    /// When no matching REGACK arrives.
    pub fn register_rc(&mut self, topic: &str) -> Result<(u16, u8)> {
        let msg_id = self.msg_id();
        self.send(&sn::register(msg_id, topic.as_bytes()))?;
        match self.expect(
            "REGACK",
            REPLY_TIMEOUT,
            |p| matches!(p, sn::Packet::Regack { msg_id: m, .. } if *m == msg_id),
        )? {
            sn::Packet::Regack { topic_id, rc, .. } => Ok((topic_id, rc)),
            p => bail!("unreachable: {p:?}"),
        }
    }

    /// REGISTER and require rc 0; returns the topic id.
    ///
    /// # Errors
    /// When rejected or unanswered.
    pub fn register(&mut self, topic: &str) -> Result<u16> {
        let (id, rc) = self.register_rc(topic)?;
        ensure!(
            rc == sn::RC_ACCEPTED,
            "REGISTER {topic:?} got REGACK rc {rc:#04x}"
        );
        Ok(id)
    }

    /// Sends a PUBLISH (MsgId allocated for QoS 1/2, 0 otherwise); returns the MsgId.
    ///
    /// # Errors
    /// When sending fails.
    pub fn publish(
        &mut self,
        qos: sn::Qos,
        topic_type: sn::TopicType,
        topic_id: u16,
        retain: bool,
        data: &[u8],
    ) -> Result<u16> {
        let msg_id = match qos {
            sn::Qos::One | sn::Qos::Two => self.msg_id(),
            sn::Qos::Zero | sn::Qos::MinusOne => 0,
        };
        self.send(&sn::publish(
            sn::flags(qos, retain, topic_type),
            topic_id,
            msg_id,
            data,
        ))?;
        Ok(msg_id)
    }

    /// Waits for the PUBACK of `msg_id`; returns (topic id, rc).
    ///
    /// # Errors
    /// When none arrives within `timeout`.
    pub fn puback(&self, msg_id: u16, timeout: Duration) -> Result<(u16, u8)> {
        match self.expect(
            "PUBACK",
            timeout,
            |p| matches!(p, sn::Packet::Puback { msg_id: m, .. } if *m == msg_id),
        )? {
            sn::Packet::Puback { topic_id, rc, .. } => Ok((topic_id, rc)),
            p => bail!("unreachable: {p:?}"),
        }
    }

    /// QoS 1 PUBLISH; returns the PUBACK return code (after checking its topic id).
    ///
    /// # Errors
    /// When no PUBACK arrives.
    pub fn publish_qos1(
        &mut self,
        topic_type: sn::TopicType,
        topic_id: u16,
        retain: bool,
        data: &[u8],
    ) -> Result<u8> {
        let msg_id = self.publish(sn::Qos::One, topic_type, topic_id, retain, data)?;
        let (tid, rc) = self.puback(msg_id, REPLY_TIMEOUT)?;
        ensure!(
            tid == topic_id,
            "PUBACK topic id {tid:#06x}, published to {topic_id:#06x}"
        );
        Ok(rc)
    }

    /// QoS 1 PUBLISH that must be accepted.
    ///
    /// # Errors
    /// When rejected or unanswered.
    pub fn publish_qos1_ok(
        &mut self,
        topic_type: sn::TopicType,
        topic_id: u16,
        data: &[u8],
    ) -> Result<()> {
        let rc = self.publish_qos1(topic_type, topic_id, false, data)?;
        ensure!(
            rc == sn::RC_ACCEPTED,
            "QoS 1 PUBLISH got PUBACK rc {rc:#04x}"
        );
        Ok(())
    }

    /// The whole QoS 2 exchange: PUBLISH → PUBREC, PUBREL → PUBCOMP.
    ///
    /// # Errors
    /// When a step is rejected (PUBACK) or unanswered.
    pub fn publish_qos2_ok(
        &mut self,
        topic_type: sn::TopicType,
        topic_id: u16,
        retain: bool,
        data: &[u8],
    ) -> Result<()> {
        let msg_id = self.publish(sn::Qos::Two, topic_type, topic_id, retain, data)?;
        match self.expect("PUBREC", REPLY_TIMEOUT, |p| match p {
            sn::Packet::Pubrec { msg_id: m } | sn::Packet::Puback { msg_id: m, .. } => *m == msg_id,
            _ => false,
        })? {
            sn::Packet::Pubrec { .. } => {}
            p => bail!("QoS 2 PUBLISH msg id {msg_id} answered with {p:?} instead of PUBREC"),
        }
        self.pubrel_ok(msg_id)
    }

    /// PUBREL and wait for the PUBCOMP.
    ///
    /// # Errors
    /// When no PUBCOMP arrives.
    pub fn pubrel_ok(&self, msg_id: u16) -> Result<()> {
        self.send(&sn::pubrel(msg_id))?;
        self.expect(
            "PUBCOMP",
            REPLY_TIMEOUT,
            |p| matches!(p, sn::Packet::Pubcomp { msg_id: m } if *m == msg_id),
        )?;
        Ok(())
    }

    /// PINGREQ → PINGRESP.
    ///
    /// # Errors
    /// When the next packet is not PINGRESP.
    pub fn ping(&self) -> Result<()> {
        self.send(&sn::pingreq())?;
        match self.next_packet()? {
            sn::Packet::Pingresp => Ok(()),
            p => bail!("PINGREQ answered with {p:?}"),
        }
    }

    /// DISCONNECT → DISCONNECT.
    ///
    /// # Errors
    /// When the next packet is not DISCONNECT.
    pub fn disconnect(&self) -> Result<()> {
        self.send(&sn::disconnect())?;
        match self.next_packet()? {
            sn::Packet::Disconnect => Ok(()),
            p => bail!("DISCONNECT answered with {p:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Test rigs and small helpers.

/// A broker and a gateway connected to it. The gateway is declared first so it stops first.
#[derive(Debug)]
pub struct Rig {
    /// The gateway.
    pub gateway: Gateway,
    /// The broker.
    pub broker: Mosquitto,
    /// The config the gateway runs with.
    pub config: GatewayConfig,
}

impl Rig {
    /// A broker and a gateway with the default [`GatewayConfig`].
    ///
    /// # Errors
    /// When either does not come up.
    pub fn start() -> Result<Rig> {
        Rig::start_with(|_| Ok(()))
    }

    /// As [`Rig::start`], letting `edit` change the config first.
    ///
    /// # Errors
    /// When either does not come up or `edit` fails.
    pub fn start_with(edit: impl FnOnce(&mut GatewayConfig) -> Result<()>) -> Result<Rig> {
        let broker = Mosquitto::start()?;
        let mut config = GatewayConfig::new(broker.port())?;
        edit(&mut config)?;
        let gateway = Gateway::start(&config)?;
        Ok(Rig {
            gateway,
            broker,
            config,
        })
    }

    /// A subscriber on this rig's broker.
    ///
    /// # Errors
    /// When it does not become ready.
    pub fn subscribe(&self, filters: &[&str]) -> Result<Subscriber> {
        Subscriber::start(self.broker.port(), filters)
    }

    /// A fresh, unconnected client of this rig's gateway.
    ///
    /// # Errors
    /// When the socket cannot be bound.
    pub fn client(&self) -> Result<SnClient> {
        SnClient::new(self.gateway.sn_addr())
    }

    /// A client connected (CleanSession) as `client_id`.
    ///
    /// # Errors
    /// When CONNECT is not accepted.
    pub fn connected(&self, client_id: &str) -> Result<SnClient> {
        let mut c = self.client()?;
        c.connect_ok(client_id)?;
        Ok(c)
    }
}

/// A seeded xorshift64 generator: reproducible garbage without a dependency.
#[derive(Debug, Clone)]
pub struct XorShift64(u64);

impl XorShift64 {
    /// Seeded; a zero seed is replaced (xorshift would stay at zero).
    pub fn new(seed: u64) -> XorShift64 {
        XorShift64(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// `len` random octets.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| (self.next_u64() >> 24) as u8).collect()
    }
}
