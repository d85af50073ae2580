//! Serial-line harness: a socat pseudo-terminal pair stands in for the wire, the gateway opens
//! one end (`[[serial]] device`), the scripted sensor `tests/py/serial_peer.py` (pyserial) the
//! other.
//!
//! Invariants:
//! - Each [`PtyPair`] owns its temp dir (the two link names live there) and its socat
//!   ([`pty::PtyPair`], started and stopped by PID); [`PtyPair::vanish`] and
//!   [`PtyPair::reappear`] make the device disappear and come back under the same names.
//! - A [`SerialPeer`] is driven one JSON step at a time through its stdin; every wait for its
//!   answer is bounded; it is killed and reaped on drop (its stderr printed if the test panics).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::{
    Gateway, GatewayConfig, PROBE_PREFIX, READY_TIMEOUT, UpMsg, poll_until, pty, publish_upstream,
    py_script, python, temp_dir,
};

/// How long a peer's step may take beyond its own timeout.
const STEP_SLACK: Duration = Duration::from_secs(10);

/// A [`pty::PtyPair`] in its own temp dir that can vanish and reappear under the same link
/// names: `gw` for the gateway, `sensor` for the peer.
pub struct PtyPair {
    /// socat; `None` while the pair is gone.
    pair: Option<pty::PtyPair>,
    /// Holds the links; declared last so it outlives socat.
    dir: TempDir,
}

/// The link names' stem in [`PtyPair`]'s dir.
const LINK_NAME: &str = "line";

impl PtyPair {
    /// Starts socat and waits until both links exist.
    ///
    /// # Errors
    /// When socat cannot be started or its links do not appear.
    pub fn start() -> Result<PtyPair> {
        let dir = temp_dir()?;
        let pair = pty::PtyPair::start(dir.path(), LINK_NAME)?;
        Ok(PtyPair {
            pair: Some(pair),
            dir,
        })
    }

    /// The gateway's end (a symlink to a `/dev/pts/N`).
    pub fn gw(&self) -> PathBuf {
        self.dir.path().join(format!("{LINK_NAME}-gw"))
    }

    /// The sensor's end.
    pub fn sensor(&self) -> PathBuf {
        self.dir.path().join(format!("{LINK_NAME}-sensor"))
    }

    /// Stops socat (by PID): both ptys close and the links go away, as when a USB adapter is
    /// unplugged.
    ///
    /// # Errors
    /// When the pair is already gone.
    pub fn vanish(&mut self) -> Result<()> {
        let mut pair = self
            .pair
            .take()
            .ok_or_else(|| anyhow!("the pty pair is already gone"))?;
        pair.kill();
        Ok(())
    }

    /// Starts socat again with the same link names and waits for them.
    ///
    /// # Errors
    /// When the pair is there already, or socat does not come up.
    pub fn reappear(&mut self) -> Result<()> {
        if self.pair.is_some() {
            bail!("the pty pair is there already");
        }
        self.pair = Some(pty::PtyPair::start(self.dir.path(), LINK_NAME)?);
        Ok(())
    }
}

/// A `[[serial]]` entry for `device` with `framing` (`"length"` or `"slip"`) and extra
/// `key = value` lines, appended to `cfg`'s sections.
pub fn add_line(cfg: &mut GatewayConfig, device: &Path, framing: &str, extra: &str) {
    cfg.extra_sections.push_str(&format!(
        "\n[[serial]]\ndevice = \"{}\"\nbaud = 115200\nframing = \"{framing}\"\n\
         reopen_min = \"50ms\"\nreopen_max = \"200ms\"\n{extra}\n",
        device.display()
    ));
}

/// Waits until the gateway's log says its line `line` is up `n` times in all (1: opened at
/// start; 2: reopened once).
///
/// # Errors
/// When it does not within [`READY_TIMEOUT`].
pub fn wait_line_up(gw: &Gateway, line: u16, n: usize) -> Result<()> {
    let needle = format!("line={line}");
    poll_until(
        "the serial line to come up",
        READY_TIMEOUT,
        Duration::from_millis(20),
        || {
            let up = gw
                .log()
                .lines()
                .filter(|l| l.contains("Serial line up.") && l.contains(&needle))
                .count();
            Ok((up >= n).then_some(()))
        },
    )
}

/// `tests/py/serial_peer.py` on one end of a line, driven step by step.
pub struct SerialPeer {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    rx: mpsc::Receiver<Value>,
    /// Every `recv` event so far, in order.
    received: Vec<Value>,
    /// Holds its stderr log.
    dir: TempDir,
}

impl SerialPeer {
    /// Starts the peer on `device` with `args` (`--framing slip`, `--forwarder`, ...).
    ///
    /// # Errors
    /// When python cannot be started.
    pub fn start(device: &Path, args: &[&str]) -> Result<SerialPeer> {
        let dir = temp_dir()?;
        let log = std::fs::File::create(dir.path().join("peer.log"))?;
        let mut child = Command::new(python())
            .arg("-u")
            .arg(py_script("serial_peer.py"))
            .arg("--device")
            .arg(device)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("spawn serial_peer.py")?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("serial_peer.py has no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| json!({"event": "text", "text": line}));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        Ok(SerialPeer {
            child: Some(child),
            stdin,
            rx,
            received: Vec::new(),
            dir,
        })
    }

    /// Runs one step (see the script's doc) and returns its result event.
    ///
    /// # Errors
    /// When the step fails (an `error` event), the peer exits, or no result comes in time.
    pub fn step(&mut self, step: Value) -> Result<Value> {
        let timeout = step
            .get("timeout")
            .and_then(Value::as_f64)
            .map_or(Duration::from_secs(10), Duration::from_secs_f64)
            + STEP_SLACK;
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("serial_peer.py stdin is closed"))?;
        writeln!(stdin, "{step}").context("write a step to serial_peer.py")?;
        stdin.flush()?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = match self.rx.recv_timeout(left) {
                Ok(event) => event,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!(
                        "serial_peer.py: no result for {step} within {timeout:?}{}",
                        self.tail()
                    )
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("serial_peer.py exited during {step}{}", self.tail())
                }
            };
            match event.get("event").and_then(Value::as_str) {
                Some("result") => return Ok(event),
                Some("error") => bail!("serial_peer.py: {event} during {step}{}", self.tail()),
                Some("recv" | "bad") => self.received.push(event),
                _ => {}
            }
        }
    }

    /// Every packet received so far (`recv` events, and `bad` ones for frames it could not
    /// parse), in order.
    pub fn received(&self) -> &[Value] {
        &self.received
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("peer.log")).unwrap_or_default();
        if text.is_empty() {
            String::new()
        } else {
            format!("\n----- serial_peer.py stderr -----\n{text}")
        }
    }
}

impl Drop for SerialPeer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.tail());
        }
    }
}

/// The `rc` of a step's result (`-1` when absent).
pub fn rc(result: &Value) -> i64 {
    result.get("rc").and_then(Value::as_i64).unwrap_or(-1)
}

/// Waits until the gateway's upstream subscription for `topic` (subscribed by `peer`'s node
/// `node`) is live: publishes QoS 1 probes upstream until the peer receives one, a bounded
/// number of times (the gateway subscribes upstream after its SUBACK).
///
/// # Errors
/// When no probe arrives within [`READY_TIMEOUT`].
pub fn await_downlink(
    peer: &mut SerialPeer,
    broker_port: u16,
    topic: &str,
    node: Option<&str>,
) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    for round in 0..30 {
        if Instant::now() >= deadline {
            break;
        }
        let payload = format!("{PROBE_PREFIX}{round}");
        publish_upstream(broker_port, &[UpMsg::new(topic, &payload, 1)])?;
        let step = json!({"op": "expect_publish", "optional": true, "timeout": 2, "node": node});
        let result = peer.step(step)?;
        if payloads(&result)
            .iter()
            .any(|p| p.starts_with(PROBE_PREFIX))
        {
            return Ok(());
        }
    }
    bail!("the subscription to {topic} never went live")
}

/// The payloads of an `expect_publish` result.
pub fn payloads(result: &Value) -> Vec<String> {
    result
        .get("publishes")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p.get("payload").and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Line `line`'s `sensorgate_serial_frames_total{event}` from the gateway's /metrics (0 when
/// absent).
///
/// # Errors
/// When /metrics cannot be fetched.
pub fn frames_counter(gw: &Gateway, line: u16, event: &str) -> Result<u64> {
    let (code, body) = gw.admin_get("/metrics")?;
    if code != 200 {
        bail!("/metrics answered {code}: {body}");
    }
    let prefix = format!("sensorgate_serial_frames_total{{line=\"{line}\",event=\"{event}\"}} ");
    Ok(body
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64))
}

/// Waits until `frames_counter(gw, line, event)` is at least `n`; returns it.
///
/// # Errors
/// When it is not within [`READY_TIMEOUT`].
pub fn await_counter(gw: &Gateway, line: u16, event: &str, n: u64) -> Result<u64> {
    poll_until(
        &format!("serial frames_total{{event={event}}} >= {n}"),
        READY_TIMEOUT,
        Duration::from_millis(50),
        || Ok(Some(frames_counter(gw, line, event)?).filter(|v| *v >= n)),
    )
}
