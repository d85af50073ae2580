//! A `NOTIFY_SOCKET` that records what the gateway tells "systemd" (sd_notify(3)).
//!
//! A real `AF_UNIX` datagram socket bound in a fresh temp dir, read by a thread of the test
//! process (std's `UnixDatagram`). Chosen over `socat -u UNIX-RECVFROM:...,fork -`: each
//! datagram arrives whole and apart (socat writes them all into one byte stream, where
//! `READY=1\nSTATUS=...` and two messages in a row cannot be told apart), every message is
//! time-stamped on arrival, and there is no child process to stop. The gateway's side is
//! exactly what systemd gives it: a path in `NOTIFY_SOCKET`.
//!
//! Invariants:
//! - The receiver thread stops when the [`NotifySocket`] drops (it polls a flag between
//!   reads, each read bounded by [`READ_POLL`]); the socket file goes with the temp dir.
//! - The socket and its directory are open to every user (mode 0777 / 0755), so a gateway
//!   started as another user (the `.deb` test runs it as `sensorgate`) can send to it.
//! - [`NotifySocket::expect`] consumes messages in arrival order; [`NotifySocket::history`]
//!   keeps every one.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tempfile::TempDir;

/// How long one read waits before the thread looks at its stop flag.
pub const READ_POLL: Duration = Duration::from_millis(100);

/// The largest notification kept whole (systemd's own limit is larger; ours are short).
const MAX_MESSAGE: usize = 64 * 1024;

/// One datagram received.
#[derive(Debug, Clone)]
pub struct Notification {
    /// When it arrived.
    pub at: Instant,
    /// Its text (`KEY=value` lines).
    pub text: String,
}

impl Notification {
    /// Its `KEY=value` fields, in order.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &str)> {
        self.text.lines().filter_map(|l| l.split_once('='))
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Whether it carries `key=value`.
    pub fn has(&self, key: &str, value: &str) -> bool {
        self.fields().any(|(k, v)| k == key && v == value)
    }
}

/// The receiving end of a `NOTIFY_SOCKET`; stopped on drop.
#[derive(Debug)]
pub struct NotifySocket {
    /// The socket's path.
    path: PathBuf,
    /// Messages from the receiver thread.
    rx: mpsc::Receiver<Notification>,
    /// Every message received so far.
    seen: Vec<Notification>,
    /// How many of `seen` [`NotifySocket::expect`] consumed.
    consumed: usize,
    /// Tells the thread to end.
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Holds the socket file; declared last so it outlives the thread.
    _dir: TempDir,
}

impl NotifySocket {
    /// Binds `<tmp>/notify` and starts reading it.
    ///
    /// # Errors
    /// When the temp dir, the socket or the thread cannot be made.
    pub fn start() -> Result<NotifySocket> {
        let dir = tempfile::Builder::new()
            .prefix("sensorgate-notify-")
            .tempdir()
            .context("create the notify socket's temp dir")?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let path = dir.path().join("notify");
        let socket =
            UnixDatagram::bind(&path).with_context(|| format!("bind {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))?;
        socket.set_read_timeout(Some(READ_POLL))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let thread_stop = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("notify-socket".into())
            .spawn(move || receive(&socket, &tx, &thread_stop))
            .context("start the notify socket's thread")?;
        Ok(NotifySocket {
            path,
            rx,
            seen: Vec::new(),
            consumed: 0,
            stop,
            thread: Some(thread),
            _dir: dir,
        })
    }

    /// The socket's path (the value of `NOTIFY_SOCKET`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `NOTIFY_SOCKET=<path>`, for [`crate::LaunchOptions::env`].
    pub fn env(&self) -> Vec<(String, String)> {
        vec![(
            "NOTIFY_SOCKET".into(),
            self.path.to_string_lossy().into_owned(),
        )]
    }

    /// The next message (after those consumed) for which `want` holds, waiting up to
    /// `timeout`; the messages before it are consumed too.
    ///
    /// # Errors
    /// A timeout naming `what` and listing what arrived meanwhile.
    pub fn expect(
        &mut self,
        what: &str,
        timeout: Duration,
        mut want: impl FnMut(&Notification) -> bool,
    ) -> Result<Notification> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(n) = self.seen.get(self.consumed) {
                self.consumed += 1;
                if want(n) {
                    return Ok(n.clone());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no {what} within {timeout:?}; received: {:?}",
                    self.seen.iter().map(|n| &n.text).collect::<Vec<_>>()
                );
            }
            match self.rx.recv_timeout(left) {
                Ok(n) => self.seen.push(n),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(anyhow!("the notify socket's thread ended"));
                }
            }
        }
    }

    /// Every message received so far (consumed or not).
    pub fn history(&mut self) -> &[Notification] {
        while let Ok(n) = self.rx.try_recv() {
            self.seen.push(n);
        }
        &self.seen
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The thread: reads datagrams until `stop`.
fn receive(socket: &UnixDatagram, tx: &mpsc::Sender<Notification>, stop: &AtomicBool) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(buf.get(..n).unwrap_or_default()).into_owned();
                let message = Notification {
                    at: Instant::now(),
                    text,
                };
                if tx.send(message).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_arrive_whole_and_in_order() {
        let mut socket = NotifySocket::start().unwrap();
        let client = UnixDatagram::unbound().unwrap();
        client
            .send_to(b"READY=1\nSTATUS=serving\n", socket.path())
            .unwrap();
        client.send_to(b"WATCHDOG=1\n", socket.path()).unwrap();
        let ready = socket
            .expect("READY=1", Duration::from_secs(10), |n| n.has("READY", "1"))
            .unwrap();
        assert_eq!(ready.get("STATUS"), Some("serving"));
        let ping = socket
            .expect("WATCHDOG=1", Duration::from_secs(10), |n| {
                n.has("WATCHDOG", "1")
            })
            .unwrap();
        assert!(ping.at >= ready.at);
        assert_eq!(socket.history().len(), 2);
        // Consumed: not found again.
        assert!(
            socket
                .expect("READY=1", Duration::from_millis(300), |n| n
                    .has("READY", "1"))
                .is_err()
        );
    }
}
