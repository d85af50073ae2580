//! The harness shared by the integration tests against a real broker: mosquitto as a child
//! process on a free 127.0.0.1 port (killed by PID on drop), an independent MQTT 5 observer,
//! fast-retrying upstream settings.
//!
//! Every wait here is bounded and polls a condition; no fixed sleep decides a test. mosquitto
//! (Debian package `mosquitto`) is required: without it these tests fail, they do not skip.

// Every test crate compiles its own copy of this module and uses only part of it.
#![allow(dead_code)]

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc_v5 as v5;
use sensorgate_bridges::mqtt::{MqttUpstreamConfig, MqttVersion, SEQ_PROPERTY};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

pub(crate) const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// Bound for reconnects and anything that waits for one.
pub(crate) const RECONNECT_BOUND: Duration = Duration::from_secs(30);
/// Bound for any single expected event (a report, a delivery, broker readiness).
pub(crate) const EVENT_BOUND: Duration = Duration::from_secs(10);

/// The persistence file mosquitto writes into its directory.
const PERSISTENCE_FILE: &str = "mosquitto.db";

// ---------------------------------------------------------------------------------------------
// Broker
// ---------------------------------------------------------------------------------------------

/// A mosquitto child process on 127.0.0.1; killed (by PID) on drop.
pub(crate) struct Broker {
    /// Holds the config, the log and (with persistence) the database.
    dir: tempfile::TempDir,
    pub(crate) port: u16,
    /// Extra lines for `mosquitto.conf`.
    extra_conf: String,
    /// Sessions and queued messages are saved in `dir` on SIGUSR1 and on a clean exit, and
    /// restored at start.
    persistent: bool,
    child: Option<Child>,
}

impl Broker {
    /// A broker with the default settings.
    pub(crate) fn start() -> Self {
        Self::start_with("")
    }

    /// A broker with `extra_conf` appended to its config.
    pub(crate) fn start_with(extra_conf: &str) -> Self {
        Self::start_in(tempfile::tempdir().expect("temp dir"), extra_conf)
    }

    /// A broker whose files live in `dir` (which may hold files the config names).
    pub(crate) fn start_in(dir: tempfile::TempDir, extra_conf: &str) -> Self {
        Self::new(dir, extra_conf, false)
    }

    /// A broker with persistence: see [`Self::save`]; [`Self::restart`] keeps what was saved.
    pub(crate) fn start_persistent(extra_conf: &str) -> Self {
        Self::new(tempfile::tempdir().expect("temp dir"), extra_conf, true)
    }

    fn new(dir: tempfile::TempDir, extra_conf: &str, persistent: bool) -> Self {
        assert!(
            Path::new(MOSQUITTO).exists(),
            "mosquitto is required for these tests but {MOSQUITTO} does not exist; \
             install the Debian package `mosquitto`"
        );
        let mut broker = Self {
            dir,
            port: free_port(),
            extra_conf: extra_conf.to_owned(),
            persistent,
            child: None,
        };
        broker.launch();
        broker
    }

    /// Starts mosquitto on `self.port` and waits until it accepts TCP connections.
    pub(crate) fn launch(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let conf = self.dir.path().join("mosquitto.conf");
        let persistence = if self.persistent {
            // Started as root, mosquitto would drop to the `mosquitto` user, which cannot write
            // to this private temporary directory; `user` is ignored when not started as root.
            format!(
                "persistence true\npersistence_location {}/\nuser root\n",
                self.dir.path().display()
            )
        } else {
            "persistence false\n".to_owned()
        };
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\n{persistence}\
                 log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n{extra}",
                port = self.port,
                extra = self.extra_conf
            ),
        )
        .expect("write mosquitto.conf");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open mosquitto log");
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {MOSQUITTO}: {e}"));
        self.child = Some(child);

        let deadline = Instant::now() + EVENT_BOUND;
        loop {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok() {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "mosquitto exited with {status} before listening on {}:\n{}",
                    self.port,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto not listening on 127.0.0.1:{} after {EVENT_BOUND:?}:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.log")
    }

    /// What mosquitto logged so far (for failure messages).
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("broker running").id()
    }

    /// Kills the broker (SIGKILL, like a crash: nothing is saved) and reaps it.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the broker and starts it again on the same port (a persistent broker restores
    /// what it saved last).
    pub(crate) fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// Freezes the broker (SIGSTOP) and returns once it is stopped: connections stay open,
    /// nothing more is read, acknowledged or delivered.
    pub(crate) fn pause(&self) {
        let pid = self.pid();
        signal(pid, "-STOP");
        let deadline = Instant::now() + EVENT_BOUND;
        while process_state(pid) != Some('T') {
            assert!(Instant::now() < deadline, "mosquitto {pid} not stopped");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Thaws a paused broker (SIGCONT).
    pub(crate) fn resume(&self) {
        signal(self.pid(), "-CONT");
    }

    /// Makes a persistent broker write its database (SIGUSR1) and waits until it is there:
    /// sessions, their subscriptions and queued messages then survive [`Self::restart`].
    pub(crate) fn save(&self) {
        assert!(self.persistent, "save() needs a persistent broker");
        let db = self.dir.path().join(PERSISTENCE_FILE);
        let _ = std::fs::remove_file(&db);
        signal(self.pid(), "-USR1");
        // mosquitto writes a temporary file and renames it: once the name exists it is whole.
        let deadline = Instant::now() + EVENT_BOUND;
        while !db.exists() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not write {}:\n{}",
                db.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends `signal` (as the `kill` command spells it, e.g. `-STOP`) to `pid`.
pub(crate) fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(signal)
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid} failed");
}

/// The state letter of `/proc/<pid>/stat` (`T`: stopped), if the process exists.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ...": the command may contain spaces and parentheses, the state follows
    // the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.trim_start().chars().next()
}

/// A port that was free a moment ago (bound to 127.0.0.1:0, then released).
pub(crate) fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

pub(crate) fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "sensorgate_bridges=debug".into()),
        )
        .try_init();
}

static CLIENT_SEQ: AtomicU32 = AtomicU32::new(0);

/// A client id no other test of this process uses.
pub(crate) fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        CLIENT_SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// An upstream named `name` that reconnects fast: short timeouts and backoff.
pub(crate) fn fast_config(name: &str, url: &str, version: MqttVersion) -> MqttUpstreamConfig {
    let mut config = MqttUpstreamConfig::new(name, url).expect("valid url");
    config.version = version;
    config.client_id = unique("upstream");
    config.keep_alive = Duration::from_secs(5);
    config.connect_timeout = Duration::from_secs(1);
    config.backoff_initial = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(500);
    config
}

// ---------------------------------------------------------------------------------------------
// Observer
// ---------------------------------------------------------------------------------------------

/// One message the observer received.
#[derive(Debug, Clone)]
pub(crate) struct Observed {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    /// The user property [`SEQ_PROPERTY`], if the message carried one (as a number).
    pub(crate) seq: Option<u64>,
    /// When the observer's event loop read it.
    pub(crate) at: Instant,
}

/// How the observer's broker session lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Session {
    /// Clean start, keep-alive 5 s; the observer stops at its first connection error.
    Clean,
    /// No clean start, a session expiry of [`OBSERVER_SESSION_EXPIRY_SECS`], keep-alive 60 s
    /// (a frozen broker does not cost the connection); the observer reconnects after errors.
    /// The broker queues messages for the session while the observer is away, and a
    /// persistent broker keeps the session across a restart (see [`Broker::save`]).
    Persistent,
}

/// Session expiry of a [`Session::Persistent`] observer: longer than any test.
pub(crate) const OBSERVER_SESSION_EXPIRY_SECS: u32 = 600;

/// An independent MQTT 5 client subscribed to `#`. Its SUBACK is awaited, so nothing published
/// afterwards can be missed.
pub(crate) struct Observer {
    received: mpsc::UnboundedReceiver<Observed>,
    task: JoinHandle<()>,
    /// Dropping the last client handle would end the event loop.
    _client: v5::AsyncClient,
}

impl Observer {
    /// A [`Session::Clean`] observer.
    pub(crate) async fn connect(port: u16) -> Self {
        Self::connect_with(port, Session::Clean).await
    }

    /// A [`Session::Persistent`] observer.
    pub(crate) async fn persistent(port: u16) -> Self {
        Self::connect_with(port, Session::Persistent).await
    }

    pub(crate) async fn connect_with(port: u16, session: Session) -> Self {
        let mut options = v5::MqttOptions::new(unique("observer"), ("127.0.0.1", port));
        match session {
            Session::Clean => {
                options.set_keep_alive(5);
            }
            Session::Persistent => {
                options
                    .set_keep_alive(60)
                    .set_clean_start(false)
                    .set_session_expiry_interval(Some(OBSERVER_SESSION_EXPIRY_SECS));
            }
        }
        let (client, mut eventloop) = v5::AsyncClient::builder(options).capacity(64).build();
        let (tx, received) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(v5::Event::Incoming(v5::Packet::Publish(publish))) => {
                        let seq = publish.properties.as_ref().and_then(|p| {
                            p.user_properties
                                .iter()
                                .find(|(key, _)| key == SEQ_PROPERTY)
                                .and_then(|(_, value)| value.parse().ok())
                        });
                        let _ = tx.send(Observed {
                            topic: String::from_utf8_lossy(&publish.topic).into_owned(),
                            payload: publish.payload,
                            seq,
                            at: Instant::now(),
                        });
                    }
                    Ok(_) => {}
                    Err(_) if session == Session::Persistent => {
                        // The next poll reconnects and resumes the session.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Err(_) => break,
                }
            }
        });
        let notice = client
            .subscribe_tracked("#", v5::QoS::ExactlyOnce)
            .await
            .expect("queue subscribe");
        timeout(EVENT_BOUND, notice.wait_completion_async())
            .await
            .expect("SUBACK in time")
            .expect("subscription accepted");
        Self {
            received,
            task,
            _client: client,
        }
    }

    /// The next message, waiting at most `bound`.
    pub(crate) async fn next_within(&mut self, bound: Duration) -> Option<Observed> {
        timeout(bound, self.received.recv())
            .await
            .ok()
            .map(|item| item.expect("observer running"))
    }

    /// A message that has already arrived, without waiting.
    pub(crate) fn try_next(&mut self) -> Option<Observed> {
        self.received.try_recv().ok()
    }

    /// The next `n` messages, sorted by topic.
    pub(crate) async fn expect(&mut self, n: usize) -> Vec<(String, Bytes)> {
        let mut got = Vec::new();
        while got.len() < n {
            let Some(item) = self.next_within(EVENT_BOUND).await else {
                panic!("observer got only {got:?}, expected {n}");
            };
            got.push((item.topic, item.payload));
        }
        got.sort();
        got
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
