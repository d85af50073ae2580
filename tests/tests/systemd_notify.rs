//! systemd `Type=notify` without systemd: the real binary with a `NOTIFY_SOCKET` read by the
//! test ([`NotifySocket`]), real mosquitto upstream, an independent MQTT-SN client.
//!
//! - `READY=1` arrives only once the listeners are bound: one CONNECT sent right after it
//!   (no retry) is answered.
//! - `STATUS=` lines carry sessions, upstream states and backlog, and follow changes.
//! - `WATCHDOG=1` pings arrive at about half `WATCHDOG_USEC` when `WATCHDOG_PID` is ours,
//!   and never when it names another process.
//! - SIGTERM: `STOPPING=1` with `STATUS=stopping`, exit status 0.
//! - `JOURNAL_STREAM` naming the daemon's stderr selects journald (here: the fallback to
//!   stderr, no journald runs); naming another file does not.
//!
//! That a stuck loop stops the pings is shown by the unit tests of `observe::systemd` (a
//! stale beat in the snapshot): the cores cannot be stalled from outside without a test
//! hook, and SIGSTOP would stop the whole process.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sensorgate_tests::notify::{Notification, NotifySocket};
use sensorgate_tests::sn::{self, Packet};
use sensorgate_tests::{
    Gateway, GatewayConfig, LaunchOptions, Mosquitto, READY_TIMEOUT, REPLY_TIMEOUT, SnClient,
    free_tcp_port, poll_until, send_signal, sensorgate_bin, temp_dir,
};

/// How long a status line or ping the test expects may take (generous: a loaded machine).
const NOTICE_TIMEOUT: Duration = Duration::from_secs(20);

fn status_with(n: &Notification, parts: &[&str]) -> bool {
    n.get("STATUS")
        .is_some_and(|s| parts.iter().all(|p| s.contains(p)))
}

fn start(
    broker: &Mosquitto,
    notify: &NotifySocket,
    extra_env: &[(&str, &str)],
    watchdog_pid: bool,
) -> Gateway {
    let config = GatewayConfig::new(broker.port()).unwrap();
    let mut env = notify.env();
    env.extend(
        extra_env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    Gateway::start_with(
        &config,
        LaunchOptions {
            env,
            watchdog_pid,
            no_wait: true,
        },
    )
    .unwrap()
}

#[test]
fn ready_comes_once_the_listeners_are_bound_then_status_lines_follow_the_sessions() {
    let broker = Mosquitto::start().unwrap();
    let mut notify = NotifySocket::start().unwrap();
    let mut gw = start(&broker, &notify, &[], false);
    let ready = notify
        .expect("READY=1", READY_TIMEOUT, |n| n.has("READY", "1"))
        .unwrap();
    assert_eq!(ready.get("STATUS"), Some("serving"), "{}", ready.text);
    // Exactly one CONNECT, sent as soon as READY=1 is seen: a socket not yet bound would
    // lose it (or refuse it), and nothing sends it again.
    let client = SnClient::new(gw.sn_addr()).unwrap();
    client
        .send(&sn::connect(sn::FLAG_CLEAN, 60, b"after-ready"))
        .unwrap();
    let connack = client
        .expect("CONNACK", REPLY_TIMEOUT, |p| {
            matches!(p, Packet::Connack { .. })
        })
        .unwrap();
    assert_eq!(connack, Packet::Connack { rc: 0 });
    // Nothing was announced before READY=1.
    let first = notify.history()[0].clone();
    assert!(first.has("READY", "1"), "first message: {}", first.text);

    let status = notify
        .expect(
            "a STATUS= line with the session and the upstream up",
            NOTICE_TIMEOUT,
            |n| {
                status_with(
                    n,
                    &[
                        "serving: 1 session (mqtt-sn 1)",
                        "upstreams local up",
                        "backlog 0 (0 B)",
                    ],
                )
            },
        )
        .unwrap();
    assert!(!status.has("READY", "1"));
    // The upstream goes down: the line says so (the backlog part stays).
    let mut broker = broker;
    broker.stop().unwrap();
    notify
        .expect(
            "a STATUS= line with the upstream down",
            NOTICE_TIMEOUT,
            |n| status_with(n, &["upstreams local down", "; backlog "]),
        )
        .unwrap();
    client.disconnect().unwrap();
    notify
        .expect("a STATUS= line without the session", NOTICE_TIMEOUT, |n| {
            status_with(n, &["serving: 0 sessions (mqtt-sn 0)"])
        })
        .unwrap();
    // READY=1 was said once.
    let readies = notify
        .history()
        .iter()
        .filter(|n| n.has("READY", "1"))
        .count();
    assert_eq!(readies, 1);
    assert!(gw.stop().unwrap().success());
}

#[test]
fn watchdog_pings_arrive_at_about_half_the_interval_while_serving() {
    let broker = Mosquitto::start().unwrap();
    let mut notify = NotifySocket::start().unwrap();
    // 4 s: pings every 2 s or so; systemd would give up after 4 s without one.
    let interval = Duration::from_secs(4);
    let usec = interval.as_micros().to_string();
    let mut gw = start(&broker, &notify, &[("WATCHDOG_USEC", &usec)], true);
    notify
        .expect("READY=1", READY_TIMEOUT, |n| n.has("READY", "1"))
        .unwrap();
    let mut pings = Vec::new();
    for _ in 0..4 {
        let ping = notify
            .expect("WATCHDOG=1", NOTICE_TIMEOUT, |n| n.has("WATCHDOG", "1"))
            .unwrap();
        pings.push(ping.at);
    }
    // Generous bounds: not a burst (at least a quarter of the interval apart) and never so
    // late that systemd would have killed the daemon.
    for pair in pings.windows(2) {
        let gap = pair[1].duration_since(pair[0]);
        assert!(
            gap >= interval / 4 && gap < interval,
            "pings {gap:?} apart (interval {interval:?}): {pings:?}"
        );
    }
    assert!(gw.stop().unwrap().success());
}

#[test]
fn a_watchdog_pid_of_another_process_means_no_pings() {
    let broker = Mosquitto::start().unwrap();
    let mut notify = NotifySocket::start().unwrap();
    // WATCHDOG_PID=1: the watchdog is for init, not for us (sd_watchdog_enabled(3)).
    let mut gw = start(
        &broker,
        &notify,
        &[("WATCHDOG_USEC", "1000000"), ("WATCHDOG_PID", "1")],
        false,
    );
    notify
        .expect("READY=1", READY_TIMEOUT, |n| n.has("READY", "1"))
        .unwrap();
    // A status line comes within a second or so; meanwhile (and for a few seconds, several
    // times the 0.5 s a ping would take) no ping.
    notify
        .expect("a STATUS= line", NOTICE_TIMEOUT, |n| {
            n.get("STATUS").is_some_and(|s| s.starts_with("serving: "))
        })
        .unwrap();
    let ping = notify.expect("WATCHDOG=1", Duration::from_secs(3), |n| {
        n.has("WATCHDOG", "1")
    });
    assert!(ping.is_err(), "pinged a watchdog meant for PID 1");
    assert!(gw.stop().unwrap().success());
}

#[test]
fn sigterm_sends_stopping_and_exits_zero() {
    let broker = Mosquitto::start().unwrap();
    let mut notify = NotifySocket::start().unwrap();
    let mut gw = start(&broker, &notify, &[("WATCHDOG_USEC", "2000000")], true);
    notify
        .expect("READY=1", READY_TIMEOUT, |n| n.has("READY", "1"))
        .unwrap();
    notify
        .expect("WATCHDOG=1", NOTICE_TIMEOUT, |n| n.has("WATCHDOG", "1"))
        .unwrap();
    send_signal(gw.pid().unwrap(), "TERM").unwrap();
    let stopping = notify
        .expect("STOPPING=1", NOTICE_TIMEOUT, |n| n.has("STOPPING", "1"))
        .unwrap();
    assert_eq!(stopping.get("STATUS"), Some("stopping"));
    let status = gw.stop().unwrap();
    assert!(status.success(), "{status}");
    // No status line after "stopping".
    let after: Vec<String> = notify
        .history()
        .iter()
        .filter(|n| n.at > stopping.at && n.get("STATUS").is_some())
        .map(|n| n.text.clone())
        .collect();
    assert!(after.is_empty(), "{after:?}");
}

/// A `sensorgate run` with stderr into a file of the test's and `JOURNAL_STREAM` set to
/// `stream(file)`; SIGTERMed once `READY=1` came. Returns what it wrote to stderr.
fn run_with_journal_stream(stream: impl Fn(&std::fs::Metadata) -> String) -> String {
    let dir = temp_dir().unwrap();
    let config = GatewayConfig::new(free_tcp_port().unwrap()).unwrap();
    let config_path = dir.path().join("sensorgate.toml");
    std::fs::write(&config_path, config.render(&dir.path().join("state"))).unwrap();
    let log_path = dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let value = stream(&log.metadata().unwrap());
    let mut notify = NotifySocket::start().unwrap();
    let child = Command::new(sensorgate_bin())
        .arg("run")
        .arg("-c")
        .arg(&config_path)
        .env_remove("RUST_LOG")
        .env("JOURNAL_STREAM", value)
        .envs(notify.env())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    notify
        .expect("READY=1", READY_TIMEOUT, |n| n.has("READY", "1"))
        .unwrap();
    send_signal(child.0.id(), "TERM").unwrap();
    let status = poll_until(
        "the gateway to exit",
        READY_TIMEOUT,
        Duration::from_millis(20),
        || Ok(child.0.try_wait()?),
    )
    .unwrap();
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "{status}:\n{text}");
    text
}

/// Kills and reaps the child if the test ends early.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// systemd's rule for native journal logging, end to end: `JOURNAL_STREAM` naming the
/// daemon's stderr selects journald. No journald runs here, so the daemon falls back to
/// stderr and says so; on a host with a journal socket its log would go there instead (and
/// stderr stays empty of it). Either way a `JOURNAL_STREAM` naming another file changes
/// nothing. Untested against a real journald.
#[test]
fn journal_stream_naming_stderr_selects_journald_else_stderr() {
    use std::os::unix::fs::MetadataExt as _;
    const FALLBACK: &str = "Cannot open the journald socket; logging to stderr.";
    let journald_here = std::path::Path::new("/run/systemd/journal/socket").exists();
    let matching = run_with_journal_stream(|m| format!("{}:{}", m.dev(), m.ino()));
    if journald_here {
        assert!(!matching.contains("sensorgate ready."), "{matching}");
    } else {
        assert!(matching.contains(FALLBACK), "{matching}");
        assert!(matching.contains("sensorgate ready."), "{matching}");
    }
    let other = run_with_journal_stream(|m| format!("{}:{}", m.dev(), m.ino() + 1));
    assert!(!other.contains(FALLBACK), "{other}");
    assert!(other.contains("sensorgate ready."), "{other}");
}
