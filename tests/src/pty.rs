//! Serial lines for the tests: a socat pseudo-terminal pair stands in for the wire
//! (`shared/TEST-PEERS.md`); the gateway opens one end, a scripted sensor the other.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{poll_until, send_signal};

/// A socat pty pair `<dir>/<name>-gw` <-> `<dir>/<name>-sensor`; killed (by PID) on drop.
/// Killing it makes both ends vanish, as an unplugged USB adapter; [`PtyPair::start`] with
/// the same names brings them back.
#[derive(Debug)]
pub struct PtyPair {
    child: Option<Child>,
    gw: PathBuf,
    sensor: PathBuf,
}

impl PtyPair {
    /// Starts socat and waits until both links exist.
    ///
    /// # Errors
    /// When socat cannot be spawned (is it installed?) or makes no ptys within 10 s.
    pub fn start(dir: &Path, name: &str) -> Result<PtyPair> {
        let gw = dir.join(format!("{name}-gw"));
        let sensor = dir.join(format!("{name}-sensor"));
        // A stale link from an earlier pair would pass the wait below.
        let _ = std::fs::remove_file(&gw);
        let _ = std::fs::remove_file(&sensor);
        let child = Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", gw.display()))
            .arg(format!("pty,raw,echo=0,link={}", sensor.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn socat (apt install socat)")?;
        let pair = PtyPair {
            child: Some(child),
            gw,
            sensor,
        };
        poll_until(
            "socat's pty links",
            Duration::from_secs(10),
            Duration::from_millis(10),
            || Ok((pair.gw.exists() && pair.sensor.exists()).then_some(())),
        )?;
        Ok(pair)
    }

    /// The gateway's end (`[[serial]] device`).
    pub fn gw(&self) -> &Path {
        &self.gw
    }

    /// The sensor's end.
    pub fn sensor(&self) -> &Path {
        &self.sensor
    }

    /// Stops socat: both ends vanish. SIGTERM, so socat removes its links before it frees
    /// the ptys (a dangling link could name a pty another test's socat gets next); SIGKILL
    /// if it lingers.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = send_signal(child.id(), "TERM");
            let _ = poll_until(
                "socat to exit",
                Duration::from_secs(5),
                Duration::from_millis(10),
                || Ok(child.try_wait()?.map(|_| ())),
            );
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&self.gw);
            let _ = std::fs::remove_file(&self.sensor);
        }
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        self.kill();
    }
}
