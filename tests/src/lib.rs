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

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use tempfile::TempDir;

pub mod coap;
pub mod fanout;
pub mod forwarder;
pub mod http;
pub mod notify;
pub mod pty;
pub mod serial;

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

/// Fails the calling test unless it runs as root (effective uid 0), naming what needs root.
///
/// Tests that need root are `#[ignore = "needs root: ..."]`, so a run without root reports
/// them as skipped; `scripts/test` runs them as root or with `CI=true`. A root-only test that
/// runs anyway without root must fail, never pass without having tested anything.
///
/// # Panics
/// When not root, or when the effective uid cannot be read.
pub fn require_root(why: &str) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    // "Uid:\t<real>\t<effective>\t<saved>\t<fs>"
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse::<u32>().ok());
    match euid {
        Some(0) => {}
        Some(uid) => panic!(
            "this test needs root ({why}) and runs as uid {uid}: it did not test anything. \
             Run it as root (scripts/test does, as root or with CI=true), or leave it ignored."
        ),
        None => panic!("this test needs root ({why}); cannot read the effective uid"),
    }
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

/// Validates `docs` against the JSON Schema `schemas/<schema>` with `tests/py/validate_schema.py`
/// (the `jsonschema` package): whether every document passed, and the validator's output
/// (`OK <doc>` / `INVALID <doc>: <first error>` per document).
///
/// # Errors
/// When the validator cannot run within a minute.
pub fn validate_json_schema(schema: &str, docs: &[&[u8]]) -> Result<(bool, String)> {
    let dir = temp_dir()?;
    let mut cmd = Command::new(python());
    cmd.arg(py_script("validate_schema.py"))
        .arg(workspace_dir().join("schemas").join(schema));
    for (i, doc) in docs.iter().enumerate() {
        let path = dir.path().join(format!("doc{i}.json"));
        std::fs::write(&path, doc)?;
        cmd.arg(path);
    }
    let out = run_bounded(&mut cmd, Duration::from_secs(60))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
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
    /// Keeps sessions and queued messages across restarts (`persistence true`).
    persistent: bool,
    /// Holds the config and the logs; declared last so it outlives the process.
    dir: TempDir,
}

impl Mosquitto {
    /// A broker on a free port that saves its sessions and queued messages on stop and loads
    /// them on restart, so a persistent-session subscriber misses nothing across an outage.
    ///
    /// # Errors
    /// When it does not come up within [`READY_TIMEOUT`].
    pub fn start_persistent() -> Result<Mosquitto> {
        let mut m = Mosquitto {
            port: free_tcp_port()?,
            proc: None,
            launches: 0,
            persistent: true,
            dir: temp_dir()?,
        };
        m.launch()?;
        Ok(m)
    }

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
            persistent: false,
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

    /// Everything it logged so far, every launch in order. With `log_type subscribe` and
    /// `unsubscribe`, a SUBSCRIBE is logged as `<time>: <client id> <qos> <filter>` and an
    /// UNSUBSCRIBE as `<time>: <client id> <filter>`.
    pub fn log(&self) -> String {
        let mut text = String::new();
        for launch in 1..=self.launches {
            let path = self.dir.path().join(format!("mosquitto-{launch}.log"));
            if let Ok(bytes) = std::fs::read(&path) {
                text.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
        text
    }

    /// Waits up to `timeout` until a line of [`Mosquitto::log`] satisfies `want`; returns it.
    ///
    /// # Errors
    /// On timeout, with the log.
    pub fn wait_log(
        &self,
        what: &str,
        timeout: Duration,
        want: impl Fn(&str) -> bool,
    ) -> Result<String> {
        poll_until(what, timeout, Duration::from_millis(50), || {
            Ok(self.log().lines().find(|l| want(l)).map(str::to_owned))
        })
        .with_context(|| format!("mosquitto log:\n{}", self.log()))
    }

    fn launch(&mut self) -> Result<()> {
        let conf = self.dir.path().join("mosquitto.conf");
        let persistence = if self.persistent {
            // Started as root, mosquitto drops to its own user: it must be able to write here.
            let store = self.dir.path().join("persist");
            std::fs::create_dir_all(&store)?;
            std::fs::set_permissions(&store, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
            format!(
                "persistence true\npersistence_location {}/\n",
                store.display()
            )
        } else {
            "persistence false\n".to_owned()
        };
        // max_queued_messages: the load test fans 1,000 QoS 1 messages into one subscriber.
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\n{persistence}\
                 log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n\
                 log_type subscribe\nlog_type unsubscribe\n\
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
    /// Extra sections (e.g. `[spool]`), appended at the end.
    pub extra_sections: String,
    /// `[admin] listen` on 127.0.0.1 at this TCP port; `None` switches the admin listener off
    /// (`listen = ""`: its default port is shared by every test on the machine).
    pub admin: Option<u16>,
    /// `[admin] token`.
    pub admin_token: Option<String>,
    /// The `[coap]` section; `None` leaves CoAP off.
    pub coap: Option<CoapSection>,
    /// `[fleet]`: `None` writes `enabled = false` (presence, heartbeats and events off, so a
    /// test sees only sensor data); `Some(lines)` switches it on with these extra
    /// `key = value` lines (see [`GatewayConfig::with_fleet`]).
    pub fleet: Option<String>,
}

/// The `[coap]` section of a [`GatewayConfig`].
#[derive(Debug, Clone)]
pub struct CoapSection {
    /// `listen`; the first one is probed for readiness and is [`GatewayConfig::coap_addr`].
    pub listen: Vec<SocketAddr>,
    /// Extra `key = value` lines for `[coap]`.
    pub extra: String,
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
            extra_sections: String::new(),
            admin: None,
            admin_token: None,
            coap: None,
            fleet: None,
        })
    }

    /// Switches `[fleet]` on (birth, Will, death, heartbeats, events on the upstream) with
    /// extra `key = value` lines (`heartbeat = "1s"` ...); may be called again to add lines.
    pub fn with_fleet(&mut self, lines: &str) -> &mut GatewayConfig {
        let fleet = self.fleet.get_or_insert_with(String::new);
        fleet.push_str(lines);
        if !lines.is_empty() && !lines.ends_with('\n') {
            fleet.push('\n');
        }
        self
    }

    /// Switches CoAP on: one listener on a free 127.0.0.1 UDP port.
    ///
    /// # Errors
    /// When no port can be found.
    pub fn with_coap(&mut self) -> Result<&mut GatewayConfig> {
        let port = free_udp_port(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
        self.coap = Some(CoapSection {
            listen: vec![SocketAddr::from((Ipv4Addr::LOCALHOST, port))],
            extra: String::new(),
        });
        Ok(self)
    }

    /// Switches CoAP on with listeners on 127.0.0.1 and [::1], on one port free on both.
    ///
    /// # Errors
    /// When no such port is found in a few tries.
    pub fn with_coap_dual_stack(&mut self) -> Result<&mut GatewayConfig> {
        for _ in 0..50 {
            let port = free_udp_port(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
            if UdpSocket::bind((Ipv6Addr::LOCALHOST, port)).is_ok() {
                self.coap = Some(CoapSection {
                    listen: vec![
                        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
                    ],
                    extra: String::new(),
                });
                return Ok(self);
            }
        }
        bail!("no UDP port free on both 127.0.0.1 and [::1]")
    }

    /// Appends `key = value` lines to `[coap]` (after [`GatewayConfig::with_coap`]).
    ///
    /// # Panics
    /// When CoAP is off.
    pub fn coap(&mut self, lines: &str) -> &mut GatewayConfig {
        let Some(c) = self.coap.as_mut() else {
            panic!("GatewayConfig::coap before with_coap")
        };
        c.extra.push_str(lines);
        if !lines.ends_with('\n') {
            c.extra.push('\n');
        }
        self
    }

    /// The first CoAP listener, when CoAP is on.
    pub fn coap_addr(&self) -> Option<SocketAddr> {
        self.coap.as_ref().and_then(|c| c.listen.first().copied())
    }

    /// Switches the admin listener on, on a free 127.0.0.1 TCP port.
    ///
    /// # Errors
    /// When no port can be found.
    pub fn with_admin(&mut self) -> Result<&mut GatewayConfig> {
        self.admin = Some(free_tcp_port()?);
        Ok(self)
    }

    /// The admin listener's address, when on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
            .map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    }

    /// Appends `key = value` lines to `[mqttsn]` (see [`GatewayConfig::extra_mqttsn`]).
    pub fn mqttsn(&mut self, lines: &str) -> &mut GatewayConfig {
        self.extra_mqttsn.push_str(lines);
        if !lines.ends_with('\n') {
            self.extra_mqttsn.push('\n');
        }
        self
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
        // Before `[[upstream]]`: tests append that table's keys through `extra_sections`.
        match self.admin_addr() {
            Some(addr) => s.push_str(&format!("\n[admin]\nlisten = \"{addr}\"\n")),
            None => s.push_str("\n[admin]\nlisten = \"\"\n"),
        }
        if let Some(token) = &self.admin_token {
            s.push_str(&format!("token = \"{token}\"\n"));
        }
        match &self.fleet {
            Some(lines) => s.push_str(&format!("\n[fleet]\nenabled = true\n{lines}")),
            None => s.push_str("\n[fleet]\nenabled = false\n"),
        }
        if let Some(coap) = &self.coap {
            let listen: Vec<String> = coap.listen.iter().map(|a| format!("\"{a}\"")).collect();
            s.push_str(&format!("\n[coap]\nlisten = [{}]\n", listen.join(", ")));
            s.push_str(&coap.extra);
        }
        s.push_str(&format!(
            "\n[[upstream]]\nname = \"local\"\nkind = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{}\"\n\
             remote_prefix = \"{}\"\nprotocol = \"{}\"\nbackoff_initial = \"100ms\"\n\
             backoff_max = \"1s\"\n",
            self.broker_port, self.remote_prefix, self.protocol
        ));
        s.push_str(&self.extra_sections);
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
    /// The admin listener (`[admin] listen`), when on.
    admin_addr: Option<SocketAddr>,
    /// `[admin] token`.
    admin_token: Option<String>,
    /// The first `[coap] listen` address, probed for readiness when set.
    coap_addr: Option<SocketAddr>,
    /// How its process is started (every launch, restarts included).
    launch: LaunchOptions,
    /// Holds the config, the state dir and the log; declared last so it outlives the process.
    dir: TempDir,
}

/// How [`Gateway::start_with`] starts the process (the defaults: as [`Gateway::start`]).
#[derive(Debug, Clone, Default)]
pub struct LaunchOptions {
    /// Extra environment variables (e.g. [`notify::NotifySocket::env`]).
    pub env: Vec<(String, String)>,
    /// Sets `WATCHDOG_PID` to the gateway's own PID, as systemd does: the process is started
    /// as `sh -c 'WATCHDOG_PID=$$ ... exec sensorgate ...'`, so the PID is the shell's, which
    /// `exec` hands to sensorgate.
    pub watchdog_pid: bool,
    /// Returns once the process is spawned, without waiting for it to answer a CONNECT (the
    /// test waits for something else, e.g. `READY=1`).
    pub no_wait: bool,
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
        std::fs::write(dir.path().join("sensorgate.toml"), &text)?;
        let mut gw = Gateway {
            proc: None,
            sn_addr: cfg.sn_addr(),
            admin_addr: cfg.admin_addr(),
            admin_token: cfg.admin_token.clone(),
            coap_addr: cfg.coap_addr(),
            launch: LaunchOptions::default(),
            dir,
        };
        gw.launch()
            .with_context(|| format!("gateway config:\n{text}"))?;
        Ok(gw)
    }

    /// [`Gateway::start`] with `options` (environment, `WATCHDOG_PID`, no readiness wait).
    ///
    /// # Errors
    /// When it cannot be spawned; unless `no_wait`, when it exits or does not answer within
    /// [`READY_TIMEOUT`].
    pub fn start_with(cfg: &GatewayConfig, options: LaunchOptions) -> Result<Gateway> {
        let dir = temp_dir()?;
        let text = cfg.render(&dir.path().join("state"));
        std::fs::write(dir.path().join("sensorgate.toml"), &text)?;
        let mut gw = Gateway {
            proc: None,
            sn_addr: cfg.sn_addr(),
            admin_addr: cfg.admin_addr(),
            admin_token: cfg.admin_token.clone(),
            coap_addr: cfg.coap_addr(),
            launch: options,
            dir,
        };
        gw.launch()
            .with_context(|| format!("gateway config:\n{text}"))?;
        Ok(gw)
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
            admin_addr: None,
            admin_token: None,
            coap_addr: None,
            launch: LaunchOptions::default(),
            dir,
        };
        gw.launch()
            .with_context(|| format!("gateway config:\n{text}"))?;
        Ok(gw)
    }

    fn launch(&mut self) -> Result<()> {
        let config = self.dir.path().join("sensorgate.toml");
        let log = self.dir.path().join("sensorgate.log");
        let mut cmd = if self.launch.watchdog_pid {
            let mut sh = Command::new("sh");
            sh.arg("-c")
                .arg("WATCHDOG_PID=$$; export WATCHDOG_PID; exec \"$0\" \"$@\"")
                .arg(sensorgate_bin());
            sh
        } else {
            Command::new(sensorgate_bin())
        };
        cmd.arg("run").arg("-c").arg(&config).env_remove("RUST_LOG");
        cmd.envs(self.launch.env.iter().map(|(k, v)| (k, v)));
        self.proc = Some(Proc::spawn("sensorgate", &mut cmd, &log, true)?);
        if self.launch.no_wait {
            return Ok(());
        }
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
        if let Some(addr) = self.coap_addr {
            // A CoAP ping (empty CON) is answered with an RST (RFC 7252 §4.3).
            let probe = coap::RawClient::new(addr)?;
            poll_until(
                "the CoAP listener to answer a ping",
                READY_TIMEOUT,
                Duration::ZERO,
                || {
                    if let Some(status) = self.exited()? {
                        bail!("sensorgate exited early ({status}):\n{}", self.log());
                    }
                    let ping = coap::Msg::new(coap::CON, coap::codes::EMPTY, 0x5047);
                    probe.send(&ping)?;
                    match probe.recv(Duration::from_millis(200))? {
                        Some(m) if m.ty == coap::RST && m.mid == ping.mid => Ok(Some(())),
                        Some(m) => bail!("CoAP ping answered with {}", m.describe()),
                        None => Ok(None),
                    }
                },
            )?;
        }
        if let Some(addr) = self.admin_addr {
            poll_until(
                "the admin listener to answer /healthz",
                READY_TIMEOUT,
                Duration::from_millis(50),
                || {
                    if let Some(status) = self.exited()? {
                        bail!("sensorgate exited early ({status}):\n{}", self.log());
                    }
                    Ok(admin_get(addr, "/healthz", None)
                        .ok()
                        .filter(|(code, _)| *code == 200))
                },
            )?;
        }
        Ok(())
    }

    /// The admin listener's address, when `[admin]` is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// `GET path` from its admin listener with its token (see [`admin_get`]).
    ///
    /// # Errors
    /// When the admin listener is off, or as [`admin_get`].
    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        let addr = self
            .admin_addr
            .ok_or_else(|| anyhow!("this gateway has no admin listener"))?;
        admin_get(addr, path, self.admin_token.as_deref())
    }

    /// Waits until the `/metrics` sample `name{labels}` equals `want` (polled every 50 ms
    /// for a minute: the admin reads the counters at scrape time).
    ///
    /// # Errors
    /// When it does not within the bound; the error lists the samples of `name` seen last.
    pub fn await_metric(&self, name: &str, labels: &[(&str, &str)], want: f64) -> Result<()> {
        let mut last = String::new();
        poll_until(
            &format!("{name}{labels:?} = {want}"),
            Duration::from_secs(60),
            Duration::from_millis(50),
            || {
                let (code, body) = self.admin_get("/metrics")?;
                let v = http::metric(&body, name, labels);
                last = body;
                Ok((code == 200 && v == Some(want)).then_some(()))
            },
        )
        .map_err(|e| {
            let seen: Vec<&str> = last.lines().filter(|l| l.starts_with(name)).collect();
            anyhow!("{e:#}; last seen:\n{}", seen.join("\n"))
        })
    }

    /// [`Self::await_metric`] of `sensorgate_ingress_events_total{protocol, event}`.
    ///
    /// # Errors
    /// As [`Self::await_metric`].
    pub fn await_ingress_event(&self, protocol: &str, event: &str, want: f64) -> Result<()> {
        self.await_metric(
            "sensorgate_ingress_events_total",
            &[("protocol", protocol), ("event", event)],
            want,
        )
    }

    /// Its config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("sensorgate.toml")
    }

    /// Where clients send datagrams.
    pub fn sn_addr(&self) -> SocketAddr {
        self.sn_addr
    }

    /// Where CoAP clients send datagrams (the first `[coap] listen`).
    ///
    /// # Panics
    /// When CoAP is off in its config.
    pub fn coap_addr(&self) -> SocketAddr {
        match self.coap_addr {
            Some(a) => a,
            None => panic!("this gateway has no [coap] listener"),
        }
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
        Subscriber::launch(port, filters, protocol, qos, None)
    }

    /// A QoS 1 MQTT 5 subscriber with a persistent session `client_id` that reconnects by
    /// itself: with [`Mosquitto::start_persistent`] it misses nothing across broker restarts.
    ///
    /// # Errors
    /// As [`Subscriber::start`].
    pub fn start_session(port: u16, filters: &[&str], client_id: &str) -> Result<Subscriber> {
        Subscriber::launch(port, filters, "5", 1, Some(client_id))
    }

    fn launch(
        port: u16,
        filters: &[&str],
        protocol: &str,
        qos: u8,
        session: Option<&str>,
    ) -> Result<Subscriber> {
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
        if let Some(id) = session {
            cmd.arg("--session").arg(id);
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
        let deadline = Instant::now() + timeout;
        let mut line = self.rx.recv_timeout(timeout);
        // A persistent-session subscriber says READY again after it subscribed again.
        while matches!(line, Ok(SubLine::Ready)) {
            line = self
                .rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()));
        }
        match line {
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
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// A long-running client script whose stdout is read line by line.

/// A child process (a python client script or CLI) whose stdout lines are read as they come;
/// killed on drop, its stderr kept for diagnosis.
pub struct Script {
    /// The process.
    proc: Proc,
    /// Lines from its stdout.
    rx: mpsc::Receiver<String>,
    /// Keeps its log.
    _dir: TempDir,
}

impl Script {
    /// Spawns `cmd` (stdin closed, stdout piped, stderr to a log), with `PYTHONUNBUFFERED=1`.
    ///
    /// # Errors
    /// When it cannot be spawned.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Script> {
        let dir = temp_dir()?;
        let log = dir.path().join(format!("{name}.log"));
        cmd.env("PYTHONUNBUFFERED", "1");
        let mut proc = Proc::spawn(name, cmd, &log, false)?;
        let stdout = proc
            .take_stdout()
            .ok_or_else(|| anyhow!("{name} has no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Script {
            proc,
            rx,
            _dir: dir,
        })
    }

    /// Runs `tests/py/<script>` with the venv python and `args`.
    ///
    /// # Errors
    /// When it cannot be spawned.
    pub fn python(script: &str, args: &[String]) -> Result<Script> {
        let mut cmd = Command::new(python());
        cmd.arg("-u").arg(py_script(script)).args(args);
        Script::spawn(script, &mut cmd)
    }

    /// The next stdout line, or `None` after `timeout`.
    ///
    /// # Errors
    /// When the process exited and every line was read (the error carries its stderr).
    pub fn line(&self, timeout: Duration) -> Result<Option<String>> {
        match self.rx.recv_timeout(timeout) {
            Ok(l) => Ok(Some(l)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("{} exited:\n{}", self.proc.name, self.proc.log_text())
            }
        }
    }

    /// Waits up to `timeout` for a line satisfying `want`, skipping others; a line starting
    /// with `ERROR` fails at once.
    ///
    /// # Errors
    /// On timeout, exit, or an `ERROR` line.
    pub fn expect_line(
        &self,
        what: &str,
        timeout: Duration,
        mut want: impl FnMut(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut skipped = Vec::new();
        for _ in 0..100_000 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.line(left)? {
                Some(l) if l.starts_with("ERROR") => {
                    bail!("{}: {l}\n{}", self.proc.name, self.proc.log_text())
                }
                Some(l) if want(&l) => return Ok(l),
                Some(l) => skipped.push(l),
                None => break,
            }
        }
        bail!(
            "{}: no {what} within {timeout:?}; printed {skipped:?}\n{}",
            self.proc.name,
            self.proc.log_text()
        )
    }

    /// Waits up to `timeout` for it to exit; returns the status.
    ///
    /// # Errors
    /// When it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let name = self.proc.name.clone();
        poll_until(
            &format!("{name} to exit"),
            timeout,
            Duration::from_millis(20),
            || self.proc.exited(),
        )
    }

    /// Its stderr so far.
    pub fn stderr(&self) -> String {
        self.proc.log_text()
    }

    /// Its PID while running (e.g. to send it SIGINT).
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }
}

// ---------------------------------------------------------------------------------------------
// The admin listener, through curl (an independent HTTP client).

/// How long one admin request may take.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET http://<addr><path>` with curl, with `Authorization: Bearer <token>` when given;
/// returns the HTTP status and the body.
///
/// # Errors
/// When curl cannot connect or fails otherwise (its stderr says why), or exceeds
/// [`ADMIN_TIMEOUT`].
pub fn admin_get(addr: SocketAddr, path: &str, token: Option<&str>) -> Result<(u16, String)> {
    // The status goes on a line of its own after the body.
    const MARK: &str = "\n--sensorgate-http-status:";
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--noproxy", "*", "--max-time", "5", "-w"])
        .arg(format!("{MARK}%{{http_code}}"));
    if let Some(token) = token {
        cmd.arg("-H").arg(format!("Authorization: Bearer {token}"));
    }
    cmd.arg(format!("http://{addr}{path}"));
    let out = run_bounded(&mut cmd, ADMIN_TIMEOUT)?;
    ensure!(
        out.status.success(),
        "curl http://{addr}{path} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text
        .rsplit_once(MARK)
        .ok_or_else(|| anyhow!("curl printed no status: {text}"))?;
    let code = code
        .trim()
        .parse::<u16>()
        .with_context(|| format!("curl status {code:?}"))?;
    Ok((code, body.to_owned()))
}

/// Runs `sensorgate status -c <config> [args]` (bounded to 30 s).
///
/// # Errors
/// When it cannot run or does not finish.
pub fn sensorgate_status(config: &Path, args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(sensorgate_bin());
    cmd.arg("status")
        .arg("-c")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG");
    run_bounded(&mut cmd, Duration::from_secs(30))
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
// Downlink injection: an independent MQTT publisher (paho-mqtt, `tests/py/pub.py`).

/// A message for [`publish_upstream`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpMsg {
    /// MQTT topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// QoS 0, 1 or 2.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// A barrier instead of a message: everything before it is acknowledged by the broker
    /// before anything after it is sent.
    pub barrier: bool,
}

impl UpMsg {
    /// A message that is not retained.
    pub fn new(topic: &str, payload: impl AsRef<[u8]>, qos: u8) -> UpMsg {
        UpMsg {
            topic: topic.to_owned(),
            payload: payload.as_ref().to_vec(),
            qos,
            retain: false,
            barrier: false,
        }
    }

    /// A retained message.
    pub fn retained(topic: &str, payload: impl AsRef<[u8]>, qos: u8) -> UpMsg {
        UpMsg {
            retain: true,
            ..UpMsg::new(topic, payload, qos)
        }
    }

    /// A barrier (see [`UpMsg::barrier`]).
    pub fn barrier() -> UpMsg {
        UpMsg {
            barrier: true,
            ..UpMsg::new("", b"", 0)
        }
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Publishes `msgs` in order over one MQTT 5 connection to the broker on 127.0.0.1:`port`
/// with paho-mqtt, and returns once the broker acknowledged every QoS 1/2 message.
///
/// The broker forwards a QoS 1 message to its subscribers before it acknowledges it, so once
/// this returns, every QoS 1 message is queued toward the gateway's connection, in order.
///
/// # Errors
/// When the publisher fails or does not finish in time.
pub fn publish_upstream(port: u16, msgs: &[UpMsg]) -> Result<()> {
    let dir = temp_dir()?;
    let file = dir.path().join("messages.jsonl");
    let mut text = String::new();
    for m in msgs {
        let line = if m.barrier {
            serde_json::json!({ "barrier": true })
        } else {
            serde_json::json!({
                "topic": m.topic,
                "payload_hex": to_hex(&m.payload),
                "qos": m.qos,
                "retain": m.retain,
            })
        };
        text.push_str(&line.to_string());
        text.push('\n');
    }
    std::fs::write(&file, text)?;
    let mut cmd = Command::new(python());
    cmd.arg("-u")
        .arg(py_script("pub.py"))
        .arg("--port")
        .arg(port.to_string())
        .arg("--file")
        .arg(&file);
    let bound = Duration::from_secs(60 + (msgs.len() / 100) as u64);
    let out = run_bounded(&mut cmd, bound)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && stdout.contains("DONE"),
        "pub.py failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Payload prefix of the messages [`await_live`] publishes.
pub const PROBE_PREFIX: &str = "probe-";

/// Whether a delivery is one of [`await_live`]'s probes (a late one may still arrive).
pub fn is_probe(d: &Delivery) -> bool {
    d.payload.starts_with(PROBE_PREFIX.as_bytes())
}

/// Waits until the gateway's upstream subscription covering `topic` is in place: publishes a
/// QoS 1 probe on `topic` and waits for `client` (subscribed, active) to receive it, a bounded
/// number of times. The gateway subscribes upstream after its SUBACK, so a message published
/// right after SUBACK may otherwise find no subscription at the broker. Probes are answered
/// as [`SnClient::accept`] does.
///
/// # Errors
/// When no probe arrives within [`READY_TIMEOUT`].
pub fn await_live(client: &mut SnClient, broker_port: u16, topic: &str) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    for round in 0..20 {
        let payload = format!("{PROBE_PREFIX}{round}");
        publish_upstream(broker_port, &[UpMsg::new(topic, &payload, 1)])?;
        let wait = Duration::from_secs(3).min(deadline.saturating_duration_since(Instant::now()));
        let got = match client.downlink(1, wait) {
            Ok(got) => got,
            Err(_) if Instant::now() < deadline => continue,
            Err(e) => return Err(e.context(format!("subscription to {topic} never went live"))),
        };
        if got.iter().any(is_probe) {
            return Ok(());
        }
        bail!("waiting for a probe on {topic}, got {got:?}");
    }
    bail!("subscription to {topic} never went live")
}

/// A synchronisation point through the upstream: an active client subscribed (QoS 1) to its
/// own topic. [`Marker::publish`] publishes messages and then, after a barrier, a marker on
/// that topic through the same broker connection; once the marker client has the marker, the
/// gateway has handled every message published before it (the broker forwards one
/// connection's QoS 1/2 messages to the gateway in order, and the gateway handles them in
/// order). So "nothing arrived for client X before the marker" proves nothing was sent.
#[derive(Debug)]
pub struct Marker {
    client: SnClient,
    topic: String,
    broker_port: u16,
    seq: u32,
}

impl Marker {
    /// Connects a marker client (`mk-<name>`, keep-alive one hour) and waits until its
    /// subscription is live.
    ///
    /// # Errors
    /// When it cannot connect or subscribe.
    pub fn new(gw: SocketAddr, broker_port: u16, name: &str) -> Result<Marker> {
        let mut client = SnClient::new(gw)?;
        let rc = client.connect_full(&format!("mk-{name}"), sn::FLAG_CLEAN, 3600)?;
        ensure!(rc == sn::RC_ACCEPTED, "marker CONNECT got rc {rc:#04x}");
        let topic = format!("marker/{name}");
        client.subscribe_ok(sn::Qos::One, sn::SubTopic::Name(&topic))?;
        await_live(&mut client, broker_port, &topic)?;
        Ok(Marker {
            client,
            topic,
            broker_port,
            seq: 0,
        })
    }

    /// A marker for `rig`.
    ///
    /// # Errors
    /// As [`Marker::new`].
    pub fn for_rig(rig: &Rig, name: &str) -> Result<Marker> {
        Marker::new(rig.gateway.sn_addr(), rig.broker.port(), name)
    }

    /// Publishes `msgs`, a barrier and a marker; returns once the marker arrived, i.e. the
    /// gateway has handled `msgs`.
    ///
    /// # Errors
    /// When publishing fails or the marker does not arrive within [`DELIVERY_TIMEOUT`].
    pub fn publish(&mut self, msgs: &[UpMsg]) -> Result<()> {
        self.seq += 1;
        let payload = format!("mark-{}", self.seq);
        let mut all = msgs.to_vec();
        all.push(UpMsg::barrier());
        all.push(UpMsg::new(&self.topic, &payload, 1));
        publish_upstream(self.broker_port, &all)?;
        let deadline = Instant::now() + DELIVERY_TIMEOUT;
        for _ in 0..1000 {
            let left = deadline.saturating_duration_since(Instant::now());
            let got = self.client.downlink(1, left)?;
            if got.iter().any(|d| d.payload == payload.as_bytes()) {
                return Ok(());
            }
        }
        bail!("marker {payload} did not arrive")
    }

    /// A marker alone: the gateway has handled everything published before this call.
    ///
    /// # Errors
    /// As [`Marker::publish`].
    pub fn sync(&mut self) -> Result<()> {
        self.publish(&[])
    }
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
    /// WILLTOPIC.
    pub const WILLTOPIC: u8 = 0x07;
    /// WILLMSGREQ.
    pub const WILLMSGREQ: u8 = 0x08;
    /// WILLMSG.
    pub const WILLMSG: u8 = 0x09;
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
    /// SUBSCRIBE.
    pub const SUBSCRIBE: u8 = 0x12;
    /// SUBACK.
    pub const SUBACK: u8 = 0x13;
    /// UNSUBSCRIBE.
    pub const UNSUBSCRIBE: u8 = 0x14;
    /// UNSUBACK.
    pub const UNSUBACK: u8 = 0x15;
    /// PINGREQ.
    pub const PINGREQ: u8 = 0x16;
    /// PINGRESP.
    pub const PINGRESP: u8 = 0x17;
    /// DISCONNECT.
    pub const DISCONNECT: u8 = 0x18;
    /// WILLTOPICUPD.
    pub const WILLTOPICUPD: u8 = 0x1A;
    /// WILLTOPICRESP.
    pub const WILLTOPICRESP: u8 = 0x1B;
    /// WILLMSGUPD.
    pub const WILLMSGUPD: u8 = 0x1C;
    /// WILLMSGRESP.
    pub const WILLMSGRESP: u8 = 0x1D;
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
        /// Its bits in a flags octet.
        pub fn bits(self) -> u8 {
            match self {
                Qos::Zero => 0x00,
                Qos::One => 0x20,
                Qos::Two => 0x40,
                Qos::MinusOne => 0x60,
            }
        }

        /// The QoS a flags octet carries.
        pub fn from_flags(flags: u8) -> Qos {
            match flags & 0x60 {
                0x00 => Qos::Zero,
                0x20 => Qos::One,
                0x40 => Qos::Two,
                _ => Qos::MinusOne,
            }
        }

        /// The QoS from a level 0, 1 or 2 (anything else is -1).
        pub fn from_level(level: u8) -> Qos {
            match level {
                0 => Qos::Zero,
                1 => Qos::One,
                2 => Qos::Two,
                _ => Qos::MinusOne,
            }
        }

        /// The level 0, 1 or 2; QoS -1 counts as 0 (at most once, no session).
        pub fn level(self) -> u8 {
            match self {
                Qos::Zero | Qos::MinusOne => 0,
                Qos::One => 1,
                Qos::Two => 2,
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
        /// Its bits in a flags octet.
        pub fn bits(self) -> u8 {
            match self {
                TopicType::Normal => 0,
                TopicType::Predefined => 1,
                TopicType::Short => 2,
                TopicType::Reserved => 3,
            }
        }

        /// The TopicIdType a flags octet carries.
        pub fn from_flags(flags: u8) -> TopicType {
            match flags & 0x03 {
                0 => TopicType::Normal,
                1 => TopicType::Predefined,
                2 => TopicType::Short,
                _ => TopicType::Reserved,
            }
        }
    }

    /// How a SUBSCRIBE or UNSUBSCRIBE names its topic.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum SubTopic<'a> {
        /// 0b00: a topic name or filter (wildcards allowed).
        Name(&'a str),
        /// 0b01: a predefined topic id.
        Predefined(u16),
        /// 0b10: a two-character short topic name.
        Short([u8; 2]),
    }

    impl SubTopic<'_> {
        /// The TopicIdType bits.
        pub fn type_bits(&self) -> u8 {
            match self {
                SubTopic::Name(_) => TopicType::Normal.bits(),
                SubTopic::Predefined(_) => TopicType::Predefined.bits(),
                SubTopic::Short(_) => TopicType::Short.bits(),
            }
        }

        /// The TopicName or TopicId field.
        pub fn field(&self) -> Vec<u8> {
            match self {
                SubTopic::Name(n) => n.as_bytes().to_vec(),
                SubTopic::Predefined(id) => id.to_be_bytes().to_vec(),
                SubTopic::Short(s) => s.to_vec(),
            }
        }
    }

    /// Whether the DUP flag is set.
    pub fn is_dup(flags: u8) -> bool {
        flags & FLAG_DUP != 0
    }

    /// Whether the Retain flag is set.
    pub fn is_retain(flags: u8) -> bool {
        flags & FLAG_RETAIN != 0
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

    /// SUBSCRIBE with `qos` (DUP clear).
    pub fn subscribe(qos: Qos, msg_id: u16, topic: &SubTopic<'_>) -> Vec<u8> {
        subscribe_flags(qos.bits() | topic.type_bits(), msg_id, topic)
    }

    /// SUBSCRIBE with a raw flags octet.
    pub fn subscribe_flags(flags: u8, msg_id: u16, topic: &SubTopic<'_>) -> Vec<u8> {
        let mut b = vec![flags];
        b.extend_from_slice(&msg_id.to_be_bytes());
        b.extend_from_slice(&topic.field());
        frame(SUBSCRIBE, &b)
    }

    /// UNSUBSCRIBE.
    pub fn unsubscribe(msg_id: u16, topic: &SubTopic<'_>) -> Vec<u8> {
        let mut b = vec![topic.type_bits()];
        b.extend_from_slice(&msg_id.to_be_bytes());
        b.extend_from_slice(&topic.field());
        frame(UNSUBSCRIBE, &b)
    }

    /// WILLTOPIC with QoS and retain flags.
    pub fn willtopic(qos: Qos, retain: bool, topic: &str) -> Vec<u8> {
        let mut b = vec![qos.bits() | if retain { FLAG_RETAIN } else { 0 }];
        b.extend_from_slice(topic.as_bytes());
        frame(WILLTOPIC, &b)
    }

    /// The empty WILLTOPIC (no flags, no topic): 02 07, "no Will after all".
    pub fn willtopic_empty() -> Vec<u8> {
        frame(WILLTOPIC, &[])
    }

    /// WILLMSG.
    pub fn willmsg(msg: &[u8]) -> Vec<u8> {
        frame(WILLMSG, msg)
    }

    /// WILLTOPICUPD with QoS and retain flags.
    pub fn willtopicupd(qos: Qos, retain: bool, topic: &str) -> Vec<u8> {
        let mut b = vec![qos.bits() | if retain { FLAG_RETAIN } else { 0 }];
        b.extend_from_slice(topic.as_bytes());
        frame(WILLTOPICUPD, &b)
    }

    /// The empty WILLTOPICUPD: 02 1A, which deletes the Will.
    pub fn willtopicupd_empty() -> Vec<u8> {
        frame(WILLTOPICUPD, &[])
    }

    /// WILLMSGUPD.
    pub fn willmsgupd(msg: &[u8]) -> Vec<u8> {
        frame(WILLMSGUPD, msg)
    }

    /// REGACK from a client.
    pub fn regack(topic_id: u16, msg_id: u16, rc: u8) -> Vec<u8> {
        let mut b = topic_id.to_be_bytes().to_vec();
        b.extend_from_slice(&msg_id.to_be_bytes());
        b.push(rc);
        frame(REGACK, &b)
    }

    /// PUBACK from a client.
    pub fn puback(topic_id: u16, msg_id: u16, rc: u8) -> Vec<u8> {
        let mut b = topic_id.to_be_bytes().to_vec();
        b.extend_from_slice(&msg_id.to_be_bytes());
        b.push(rc);
        frame(PUBACK, &b)
    }

    /// PUBREC.
    pub fn pubrec(msg_id: u16) -> Vec<u8> {
        frame(PUBREC, &msg_id.to_be_bytes())
    }

    /// PUBCOMP.
    pub fn pubcomp(msg_id: u16) -> Vec<u8> {
        frame(PUBCOMP, &msg_id.to_be_bytes())
    }

    /// PINGREQ carrying a ClientId (a sleeping client waking up).
    pub fn pingreq_with_id(client_id: &[u8]) -> Vec<u8> {
        frame(PINGREQ, client_id)
    }

    /// DISCONNECT with a sleep duration in seconds.
    pub fn disconnect_sleep(duration_secs: u16) -> Vec<u8> {
        frame(DISCONNECT, &duration_secs.to_be_bytes())
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
        /// ADVERTISE.
        Advertise {
            /// GwId.
            gw_id: u8,
            /// Duration in seconds.
            duration: u16,
        },
        /// WILLTOPICREQ.
        WillTopicReq,
        /// WILLMSGREQ.
        WillMsgReq,
        /// REGISTER from the gateway.
        Register {
            /// TopicId.
            topic_id: u16,
            /// MsgId.
            msg_id: u16,
            /// TopicName.
            name: String,
        },
        /// PUBLISH from the gateway.
        Publish {
            /// Flags (DUP, QoS, Retain, TopicIdType).
            flags: u8,
            /// TopicId.
            topic_id: u16,
            /// MsgId.
            msg_id: u16,
            /// Data.
            data: Vec<u8>,
        },
        /// PUBREL.
        Pubrel {
            /// MsgId.
            msg_id: u16,
        },
        /// SUBACK.
        Suback {
            /// Flags (the granted QoS).
            flags: u8,
            /// TopicId.
            topic_id: u16,
            /// MsgId.
            msg_id: u16,
            /// ReturnCode.
            rc: u8,
        },
        /// UNSUBACK.
        Unsuback {
            /// MsgId.
            msg_id: u16,
        },
        /// WILLTOPICRESP.
        WillTopicResp {
            /// ReturnCode.
            rc: u8,
        },
        /// WILLMSGRESP.
        WillMsgResp {
            /// ReturnCode.
            rc: u8,
        },
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
            (ADVERTISE, 3) => Packet::Advertise {
                gw_id: body.first().copied().unwrap_or(0),
                duration: u16_at(body, 1).unwrap_or(0),
            },
            (WILLTOPICREQ, 0) => Packet::WillTopicReq,
            (WILLMSGREQ, 0) => Packet::WillMsgReq,
            (REGISTER, n) if n >= 4 => {
                let (Some(topic_id), Some(msg_id), Some(name)) =
                    (u16_at(body, 0), u16_at(body, 2), body.get(4..))
                else {
                    return Ok(other());
                };
                let Ok(name) = String::from_utf8(name.to_vec()) else {
                    return Ok(other());
                };
                Packet::Register {
                    topic_id,
                    msg_id,
                    name,
                }
            }
            (PUBLISH, n) if n >= 5 => {
                let (Some(&flags), Some(topic_id), Some(msg_id), Some(data)) = (
                    body.first(),
                    u16_at(body, 1),
                    u16_at(body, 3),
                    body.get(5..),
                ) else {
                    return Ok(other());
                };
                Packet::Publish {
                    flags,
                    topic_id,
                    msg_id,
                    data: data.to_vec(),
                }
            }
            (PUBREL, 2) => Packet::Pubrel {
                msg_id: u16_at(body, 0).unwrap_or(0),
            },
            (SUBACK, 6) => {
                let (Some(&flags), Some(topic_id), Some(msg_id), Some(&rc)) =
                    (body.first(), u16_at(body, 1), u16_at(body, 3), body.get(5))
                else {
                    return Ok(other());
                };
                Packet::Suback {
                    flags,
                    topic_id,
                    msg_id,
                    rc,
                }
            }
            (UNSUBACK, 2) => Packet::Unsuback {
                msg_id: u16_at(body, 0).unwrap_or(0),
            },
            (WILLTOPICRESP, 1) => Packet::WillTopicResp {
                rc: body.first().copied().unwrap_or(0),
            },
            (WILLMSGRESP, 1) => Packet::WillMsgResp {
                rc: body.first().copied().unwrap_or(0),
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
    /// Topic names this client knows by id: from its REGACKs, SUBACKs of concrete names, and
    /// the gateway's REGISTERs.
    names: HashMap<u16, String>,
}

/// A SUBACK's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubAck {
    /// The granted QoS (from the flags).
    pub qos: sn::Qos,
    /// TopicId.
    pub topic_id: u16,
    /// ReturnCode.
    pub rc: u8,
}

/// A downlink PUBLISH as the client received (and, by [`SnClient::downlink`], acknowledged) it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// TopicIdType of the PUBLISH.
    pub topic_type: sn::TopicType,
    /// TopicId of the PUBLISH.
    pub topic_id: u16,
    /// The topic name, when the client knows it: a registered id, or a short topic name.
    pub topic: Option<String>,
    /// QoS of the PUBLISH.
    pub qos: sn::Qos,
    /// Retain flag.
    pub retain: bool,
    /// DUP flag.
    pub dup: bool,
    /// MsgId.
    pub msg_id: u16,
    /// Data.
    pub payload: Vec<u8>,
}

impl Delivery {
    /// The payload as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// How [`SnClient::downlink`] answers what the gateway sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// REGACK rc 0 to REGISTER, PUBACK rc 0 to QoS 1, PUBREC / PUBCOMP to QoS 2.
    Accept,
    /// Nothing at all (the test answers itself).
    Silent,
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
        SnClient::bind(gw, local)
    }

    /// A client on a fresh socket bound to `local` (its source address: a test that needs
    /// several hosts binds each client to another loopback address).
    ///
    /// # Errors
    /// When the socket cannot be bound.
    pub fn bind(gw: SocketAddr, local: IpAddr) -> Result<SnClient> {
        let sock = UdpSocket::bind(SocketAddr::new(local, 0))
            .with_context(|| format!("bind an MQTT-SN client to {local}"))?;
        Ok(SnClient {
            sock,
            gw,
            next_msg_id: 1,
            names: HashMap::new(),
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
        self.names.insert(id, topic.to_owned());
        Ok(id)
    }

    /// The topic name this client knows for a registered id.
    pub fn topic_name(&self, topic_id: u16) -> Option<&str> {
        self.names.get(&topic_id).map(String::as_str)
    }

    /// Forgets every registered id (as a device does when it reboots).
    pub fn forget_topics(&mut self) {
        self.names.clear();
    }

    /// Switches the socket between blocking (with the per-call timeouts) and non-blocking
    /// (every receive returns at once).
    ///
    /// # Errors
    /// When the OS refuses.
    pub fn set_nonblocking(&self, on: bool) -> Result<()> {
        Ok(self.sock.set_nonblocking(on)?)
    }

    /// CONNECT with `flags` and keep-alive `duration_secs`; returns the CONNACK return code.
    /// Without the Will flag only.
    ///
    /// # Errors
    /// When no CONNACK arrives.
    pub fn connect_full(&mut self, client_id: &str, flags: u8, duration_secs: u16) -> Result<u8> {
        self.send(&sn::connect(flags, duration_secs, client_id.as_bytes()))?;
        match self.expect("CONNACK", REPLY_TIMEOUT, |p| {
            matches!(p, sn::Packet::Connack { .. })
        })? {
            sn::Packet::Connack { rc } => Ok(rc),
            p => bail!("unreachable: {p:?}"),
        }
    }

    /// The CONNECT + Will handshake, checking every step's exact bytes: CONNECT (Will flag)
    /// → WILLTOPICREQ `02 06`, WILLTOPIC → WILLMSGREQ `02 08`, WILLMSG → CONNACK `03 05 00`.
    ///
    /// # Errors
    /// When a step is answered differently.
    #[allow(clippy::too_many_arguments)]
    pub fn connect_with_will(
        &mut self,
        client_id: &str,
        clean: bool,
        duration_secs: u16,
        will_qos: sn::Qos,
        will_retain: bool,
        will_topic: &str,
        will_msg: &[u8],
    ) -> Result<()> {
        let flags = sn::FLAG_WILL | if clean { sn::FLAG_CLEAN } else { 0 };
        self.send(&sn::connect(flags, duration_secs, client_id.as_bytes()))?;
        self.expect_raw("WILLTOPICREQ", &[0x02, sn::WILLTOPICREQ])?;
        self.send(&sn::willtopic(will_qos, will_retain, will_topic))?;
        self.expect_raw("WILLMSGREQ", &[0x02, sn::WILLMSGREQ])?;
        self.send(&sn::willmsg(will_msg))?;
        self.expect_raw("CONNACK", &[0x03, sn::CONNACK, sn::RC_ACCEPTED])
    }

    /// Requires the very next datagram (within [`REPLY_TIMEOUT`]) to be exactly `bytes`.
    ///
    /// # Errors
    /// When something else or nothing arrives.
    pub fn expect_raw(&self, what: &str, bytes: &[u8]) -> Result<()> {
        match self.recv_raw(REPLY_TIMEOUT)? {
            Some(raw) if raw == bytes => Ok(()),
            Some(raw) => bail!("expected {what} {bytes:02x?}, got {raw:02x?}"),
            None => bail!("expected {what} {bytes:02x?}, got nothing within {REPLY_TIMEOUT:?}"),
        }
    }

    /// SUBSCRIBE; returns the SUBACK (whose MsgId must match). A concrete topic name's id is
    /// remembered.
    ///
    /// # Errors
    /// When the next packet is not the SUBACK.
    pub fn subscribe(&mut self, qos: sn::Qos, topic: sn::SubTopic<'_>) -> Result<SubAck> {
        let msg_id = self.msg_id();
        self.send(&sn::subscribe(qos, msg_id, &topic))?;
        match self.next_packet()? {
            sn::Packet::Suback {
                flags,
                topic_id,
                msg_id: m,
                rc,
            } if m == msg_id => {
                if let (sn::SubTopic::Name(name), true) = (topic, rc == sn::RC_ACCEPTED)
                    && topic_id != 0
                    && !name.contains(['+', '#'])
                {
                    self.names.insert(topic_id, name.to_owned());
                }
                Ok(SubAck {
                    qos: sn::Qos::from_flags(flags),
                    topic_id,
                    rc,
                })
            }
            p => bail!("SUBSCRIBE {topic:?} (msg id {msg_id}) answered with {p:?}"),
        }
    }

    /// SUBSCRIBE that must be accepted with the QoS asked for; returns the topic id.
    ///
    /// # Errors
    /// When rejected, granted another QoS, or unanswered.
    pub fn subscribe_ok(&mut self, qos: sn::Qos, topic: sn::SubTopic<'_>) -> Result<u16> {
        let ack = self.subscribe(qos, topic)?;
        ensure!(
            ack.rc == sn::RC_ACCEPTED && ack.qos == qos,
            "SUBSCRIBE {topic:?} at {qos:?} got {ack:?}"
        );
        Ok(ack.topic_id)
    }

    /// UNSUBSCRIBE; requires the UNSUBACK with the same MsgId as the next packet.
    ///
    /// # Errors
    /// When something else or nothing arrives.
    pub fn unsubscribe(&mut self, topic: sn::SubTopic<'_>) -> Result<()> {
        let msg_id = self.msg_id();
        self.send(&sn::unsubscribe(msg_id, &topic))?;
        match self.next_packet()? {
            sn::Packet::Unsuback { msg_id: m } if m == msg_id => Ok(()),
            p => bail!("UNSUBSCRIBE {topic:?} (msg id {msg_id}) answered with {p:?}"),
        }
    }

    /// DISCONNECT with a sleep duration; requires the gateway's DISCONNECT `02 18`.
    ///
    /// # Errors
    /// When something else or nothing arrives.
    pub fn sleep(&self, duration_secs: u16) -> Result<()> {
        self.send(&sn::disconnect_sleep(duration_secs))?;
        self.expect_raw("DISCONNECT", &[0x02, sn::DISCONNECT])
    }

    /// Turns a PUBLISH from the gateway into a [`Delivery`], without answering it.
    pub fn delivery(&self, p: &sn::Packet) -> Option<Delivery> {
        let sn::Packet::Publish {
            flags,
            topic_id,
            msg_id,
            data,
        } = p
        else {
            return None;
        };
        let topic_type = sn::TopicType::from_flags(*flags);
        let topic = match topic_type {
            sn::TopicType::Normal => self.names.get(topic_id).cloned(),
            sn::TopicType::Short => String::from_utf8(topic_id.to_be_bytes().to_vec()).ok(),
            sn::TopicType::Predefined | sn::TopicType::Reserved => None,
        };
        Some(Delivery {
            topic_type,
            topic_id: *topic_id,
            topic,
            qos: sn::Qos::from_flags(*flags),
            retain: sn::is_retain(*flags),
            dup: sn::is_dup(*flags),
            msg_id: *msg_id,
            payload: data.clone(),
        })
    }

    /// Answers one packet from the gateway as a well-behaved client: REGACK rc 0 to a REGISTER
    /// (remembering the name), PUBACK rc 0 to a QoS 1 PUBLISH, PUBREC to a QoS 2 PUBLISH and
    /// then, as the next packet, PUBREL → PUBCOMP. Returns the delivery for a PUBLISH; `Ok(None)`
    /// for a REGISTER.
    ///
    /// # Errors
    /// For any other packet, or when the PUBREL does not follow.
    pub fn accept(&mut self, p: &sn::Packet) -> Result<Option<Delivery>> {
        match p {
            sn::Packet::Register {
                topic_id,
                msg_id,
                name,
            } => {
                self.names.insert(*topic_id, name.clone());
                self.send(&sn::regack(*topic_id, *msg_id, sn::RC_ACCEPTED))?;
                Ok(None)
            }
            sn::Packet::Publish { .. } => {
                let d = self
                    .delivery(p)
                    .ok_or_else(|| anyhow!("unreachable: {p:?}"))?;
                match d.qos {
                    sn::Qos::One => {
                        self.send(&sn::puback(d.topic_id, d.msg_id, sn::RC_ACCEPTED))?;
                    }
                    sn::Qos::Two => {
                        self.send(&sn::pubrec(d.msg_id))?;
                        match self.next_packet()? {
                            sn::Packet::Pubrel { msg_id } if msg_id == d.msg_id => {}
                            other => bail!(
                                "PUBREC for msg id {} answered with {other:?} instead of PUBREL",
                                d.msg_id
                            ),
                        }
                        self.send(&sn::pubcomp(d.msg_id))?;
                    }
                    sn::Qos::Zero | sn::Qos::MinusOne => {}
                }
                Ok(Some(d))
            }
            other => bail!("expected REGISTER or PUBLISH from the gateway, got {other:?}"),
        }
    }

    /// Receives `n` downlink PUBLISHes within `timeout`, answering as [`SnClient::accept`]
    /// does. Anything but REGISTER and PUBLISH is an error.
    ///
    /// # Errors
    /// On timeout (saying what arrived) or an unexpected packet.
    pub fn downlink(&mut self, n: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::with_capacity(n);
        for _ in 0..(4 * n + 16) {
            if got.len() >= n {
                return Ok(got);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left)? {
                Some(p) => {
                    if let Some(d) = self
                        .accept(&p)
                        .with_context(|| format!("after {} deliveries: {got:?}", got.len()))?
                    {
                        got.push(d);
                    }
                }
                None => break,
            }
        }
        ensure!(
            got.len() >= n,
            "only {} of {n} downlink messages within {timeout:?}: {got:?}",
            got.len()
        );
        Ok(got)
    }

    /// Receives downlink (answered as [`SnClient::accept`] does) until a packet for which
    /// `stop` is true; returns the deliveries and that packet.
    ///
    /// # Errors
    /// On timeout, or a packet that is neither downlink nor `stop`.
    pub fn downlink_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut stop: impl FnMut(&sn::Packet) -> bool,
    ) -> Result<(Vec<Delivery>, sn::Packet)> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        for _ in 0..100_000 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left)? {
                Some(p) if stop(&p) => return Ok((got, p)),
                Some(p) => {
                    if let Some(d) = self
                        .accept(&p)
                        .with_context(|| format!("waiting for {what} after {got:?}"))?
                    {
                        got.push(d);
                    }
                }
                None => break,
            }
        }
        bail!("no {what} within {timeout:?}; downlink received: {got:?}")
    }

    /// Collects everything the gateway has pending for this client, answering it as
    /// [`SnClient::accept`] does, without waiting for silence: sends SEARCHGW and takes
    /// downlink until the GWINFO (one socket's datagrams are handled in order, so whatever an
    /// acknowledgement released comes before it), until a round brings nothing.
    ///
    /// # Errors
    /// When GWINFO does not come, or on anything but downlink and GWINFO.
    pub fn drain_pending(&mut self) -> Result<Vec<Delivery>> {
        let mut all = Vec::new();
        for _ in 0..1000 {
            self.send(&sn::searchgw(0))?;
            let mut quiet = true;
            let mut answered = false;
            for _ in 0..10_000 {
                let p = self
                    .recv(REPLY_TIMEOUT)?
                    .ok_or_else(|| anyhow!("no GWINFO within {REPLY_TIMEOUT:?} after {all:?}"))?;
                if matches!(p, sn::Packet::GwInfo { .. }) {
                    answered = true;
                    break;
                }
                // A REGISTER is progress too: its REGACK releases the PUBLISH.
                quiet = false;
                all.extend(self.accept(&p)?);
            }
            ensure!(answered, "downlink never stopped: {} messages", all.len());
            if quiet {
                return Ok(all);
            }
        }
        bail!("downlink never stopped: {} messages", all.len())
    }

    /// Wakes a sleeping client: PINGREQ with `client_id`, then the buffered downlink (each
    /// answered), until PINGRESP.
    ///
    /// # Errors
    /// When PINGRESP does not come within [`DELIVERY_TIMEOUT`].
    pub fn wake(&mut self, client_id: &str) -> Result<Vec<Delivery>> {
        self.send(&sn::pingreq_with_id(client_id.as_bytes()))?;
        let (got, _) =
            self.downlink_until("PINGRESP", DELIVERY_TIMEOUT, |p| *p == sn::Packet::Pingresp)?;
        Ok(got)
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

// ---------------------------------------------------------------------------------------------
// RabbitMQ (AMQP upstream tests)

/// The RabbitMQ server start script run directly (the `/usr/sbin` wrapper switches to the
/// `rabbitmq` user and drops the environment).
pub fn rabbitmq_server_bin() -> PathBuf {
    let lib = Path::new("/usr/lib/rabbitmq/lib");
    let found = std::fs::read_dir(lib).ok().and_then(|dir| {
        dir.filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("rabbitmq_server-"))
            })
            .max()
    });
    match found {
        Some(dir) => dir.join("sbin/rabbitmq-server"),
        None => panic!(
            "rabbitmq-server not found under {}: apt-get install rabbitmq-server",
            lib.display()
        ),
    }
}

/// A private RabbitMQ node bound to loopback only: its own node name, AMQP port, distribution
/// port, epmd port, and its data, log and config in its own temp dir. Stopped on drop.
pub struct RabbitMq {
    /// The AMQP port (fixed for the node's life, so `start` again comes back there).
    port: u16,
    /// Erlang distribution port.
    dist_port: u16,
    /// Its private epmd's port.
    epmd_port: u16,
    /// Unique per node: `sgtest-<pid>-<port>@localhost`.
    node: String,
    /// The start script while running.
    proc: Option<Proc>,
    /// The AMQPS port, when started with [`RabbitMq::start_tls`].
    tls_port: Option<u16>,
    /// Holds mnesia, logs, config and the Erlang cookie; declared last.
    dir: TempDir,
}

/// PEM files for a TLS listener that requires a client certificate (`verify_peer`).
pub struct RabbitTls {
    /// The CA that signed the server's and the client's certificates.
    pub ca_file: PathBuf,
    /// The server's certificate (SAN IP 127.0.0.1) and key.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

/// A RabbitMQ node takes several seconds to boot; bounded anyway.
pub const RABBITMQ_READY_TIMEOUT: Duration = Duration::from_secs(90);

impl RabbitMq {
    /// Starts a node and waits (at most [`RABBITMQ_READY_TIMEOUT`]) until its AMQP listener
    /// accepts a connection.
    ///
    /// # Errors
    /// When it exits or does not come up in time.
    pub fn start() -> Result<RabbitMq> {
        Self::start_inner(None, &[])
    }

    /// As [`RabbitMq::start`] with `plugins` enabled (e.g. `rabbitmq_event_exchange`).
    ///
    /// # Errors
    /// When it exits or does not come up in time.
    pub fn start_with_plugins(plugins: &[&str]) -> Result<RabbitMq> {
        Self::start_inner(None, plugins)
    }

    /// As [`RabbitMq::start`], plus an AMQPS listener on 127.0.0.1 with `tls`'s files that
    /// requires a client certificate signed by its CA (`verify_peer`,
    /// `fail_if_no_peer_cert`).
    ///
    /// # Errors
    /// When it exits or does not come up in time.
    pub fn start_tls(tls: &RabbitTls) -> Result<RabbitMq> {
        Self::start_inner(Some(tls), &[])
    }

    fn start_inner(tls: Option<&RabbitTls>, plugins: &[&str]) -> Result<RabbitMq> {
        let port = free_tcp_port()?;
        let mut r = RabbitMq {
            port,
            dist_port: free_tcp_port()?,
            epmd_port: free_tcp_port()?,
            node: format!("sgtest-{}-{port}@localhost", std::process::id()),
            proc: None,
            tls_port: None,
            dir: temp_dir()?,
        };
        std::fs::write(
            r.dir.path().join("enabled_plugins"),
            format!("[{}].\n", plugins.join(",")),
        )?;
        let mut conf =
            "loopback_users.guest = true\nlog.console = false\nlog.file.level = info\n".to_owned();
        if let Some(tls) = tls {
            let tls_port = free_tcp_port()?;
            r.tls_port = Some(tls_port);
            conf.push_str(&format!(
                "listeners.ssl.default = 127.0.0.1:{tls_port}\n\
                 ssl_options.cacertfile = {}\nssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\nssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = true\n",
                tls.ca_file.display(),
                tls.server_cert.display(),
                tls.server_key.display()
            ));
        }
        std::fs::write(r.dir.path().join("rabbitmq.conf"), conf)?;
        r.launch()?;
        Ok(r)
    }

    /// The AMQPS port (after [`RabbitMq::start_tls`]).
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// Runs `rabbitmqctl <args>` against this node (bounded) and returns its stdout.
    ///
    /// # Errors
    /// When it fails or times out.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        let d = self.dir.path();
        // The node's own CLI, not Debian's /usr/sbin wrapper (which switches to the
        // `rabbitmq` user and its home, so its Erlang cookie differs from this node's).
        let mut cmd = Command::new(rabbitmq_server_bin().with_file_name("rabbitmqctl"));
        cmd.args(["-q", "-n", &self.node])
            .args(args)
            .env("HOME", d)
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .current_dir(d);
        let out = run_bounded(&mut cmd, Duration::from_secs(60))?;
        if !out.status.success() {
            bail!(
                "rabbitmqctl {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `(messages_ready, messages_unacknowledged)` of `queue`, `None` when it does not exist.
    ///
    /// # Errors
    /// When `rabbitmqctl` fails.
    pub fn queue_counts(&self, queue: &str) -> Result<Option<(u64, u64)>> {
        let out = self.ctl(&[
            "list_queues",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ])?;
        for line in out.lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if let [name, ready, unacked] = cols.as_slice()
                && *name == queue
            {
                return Ok(Some((ready.parse()?, unacked.parse()?)));
            }
        }
        Ok(None)
    }

    /// Its AMQP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn launch(&mut self) -> Result<()> {
        let d = self.dir.path();
        let mut cmd = Command::new(rabbitmq_server_bin());
        cmd.env("HOME", d)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .current_dir(d);
        let mut proc = Proc::spawn("rabbitmq", &mut cmd, &d.join("server.log"), true)?;
        let deadline = Instant::now() + RABBITMQ_READY_TIMEOUT;
        loop {
            if let Some(status) = proc.exited()? {
                bail!("rabbitmq exited ({status}):\n{}", proc.log_text());
            }
            // The AMQP listener opens last in the boot; it then serves connections.
            if TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "rabbitmq did not listen on {} within {RABBITMQ_READY_TIMEOUT:?}:\n{}",
                    self.port,
                    proc.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.proc = Some(proc);
        Ok(())
    }

    /// Stops the node (SIGTERM to the start script, which stops the VM), waits for it, and
    /// kills a VM that outlives the grace period by the PID it wrote.
    ///
    /// # Errors
    /// When it was not running.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut proc) = self.proc.take() else {
            bail!("rabbitmq is not running")
        };
        let result = proc.terminate(Duration::from_secs(30));
        let pid_file = self.dir.path().join("pid");
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
        {
            // Already gone after a clean stop: the signal then fails, which is fine.
            let _ = send_signal(pid, "KILL");
        }
        let _ = std::fs::remove_file(pid_file);
        result.map(|_| ())
    }

    /// Starts it again on the same ports with the same data (durable queues and persistent
    /// messages survive).
    ///
    /// # Errors
    /// When it does not come up.
    pub fn restart(&mut self) -> Result<()> {
        if self.proc.is_some() {
            self.stop()?;
        }
        self.launch()
    }
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        if self.proc.is_some() {
            let _ = self.stop();
        }
        // The node started its own epmd on the private port; stop it.
        let _ = Command::new("epmd")
            .args(["-port", &self.epmd_port.to_string(), "-kill"])
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
