//! Runs that need more clients (one socket each) than one process may open files: the suite
//! splits them over `sg-bench worker` child processes, each driving a slice of the clients,
//! and steps them through the phases over their stdin/stdout, one line per step:
//!
//! ```text
//! worker → "ready <connected> <failed> <last CONNACK, Unix ns>"
//! parent → "go"        worker → "done <acknowledged> <retransmissions> <unanswered> <CPU µs>"
//! parent → "finish"    worker → "bye"            (then it exits)
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::timeout;

use crate::generator::{Load, LoadSpec, TopicMode, count};

/// Nanoseconds since the Unix epoch (comparable across processes on one host).
#[must_use]
pub fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// What one slice of clients does: CONNECT, REGISTER `bench/s/<index>`, one QoS 1 PUBLISH.
#[must_use]
pub fn storm_spec(
    gateway: SocketAddr,
    clients: usize,
    first_index: u32,
    payload: usize,
) -> LoadSpec {
    let mut spec = LoadSpec::new(gateway);
    spec.clients = clients;
    spec.first_index = first_index;
    spec.id_prefix = "storm-".into();
    spec.qos = 1;
    spec.messages = 1;
    spec.keep_alive = 600;
    spec.topic = TopicMode::Register("bench/s/".into());
    spec.connect_concurrency = 2048;
    spec.payload = payload;
    spec
}

async fn read_line(
    lines: &mut Lines<BufReader<ChildStdout>>,
    max: Duration,
) -> anyhow::Result<Vec<u64>> {
    let line = timeout(max, lines.next_line())
        .await
        .context("a worker did not answer in time")??
        .context("a worker exited early")?;
    Ok(line
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect())
}

/// The worker side: runs `spec`, answering the parent's steps on stdin/stdout.
///
/// # Errors
/// When the sockets cannot be bound or the parent goes away.
pub async fn worker(spec: LoadSpec) -> anyhow::Result<()> {
    let unix_at_epoch = unix_ns().saturating_sub(crate::elapsed_ns());
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    let mut load = Load::start(spec).await?;
    load.wait_ready(Duration::from_secs(120)).await;
    let c = load.counters.clone();
    let last = unix_at_epoch + count(&c.last_connack_ns);
    out.write_all(
        format!(
            "ready {} {} {last}\n",
            count(&c.connected),
            count(&c.failed)
        )
        .as_bytes(),
    )
    .await?;
    out.flush().await?;
    if stdin.next_line().await?.as_deref() != Some("go") {
        bail!("expected go");
    }
    load.start_publish();
    load.wait_published(Duration::from_secs(60)).await;
    out.write_all(
        format!(
            "done {} {} {} {}\n",
            count(&c.acked),
            count(&c.retransmits),
            count(&c.unanswered),
            (crate::sys::own_cpu_secs() * 1e6) as u64
        )
        .as_bytes(),
    )
    .await?;
    out.flush().await?;
    let _ = stdin.next_line().await?;
    load.finish().await;
    out.write_all(b"bye\n").await?;
    out.flush().await?;
    Ok(())
}

/// Totals over the workers.
#[derive(Debug, Default)]
pub struct Storm {
    pub connected: u64,
    pub failed: u64,
    /// Seconds from the start to the last CONNACK of any worker.
    pub connack_secs: f64,
    pub acknowledged: u64,
    pub retransmissions: u64,
    pub unanswered: u64,
    /// CPU seconds of all workers up to the end of publishing.
    pub worker_cpu_secs: f64,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

/// The parent side: `clients` split over workers of at most `per_worker` clients each.
/// `between` runs at each step (`"registered"`, `"published"`) for sampling.
///
/// # Errors
/// When a worker cannot be started or fails.
pub async fn run(
    exe: &Path,
    gateway: SocketAddr,
    clients: usize,
    per_worker: usize,
    payload: usize,
    mut between: impl FnMut(&str, &Storm),
) -> anyhow::Result<Storm> {
    let start = unix_ns();
    let mut workers = Vec::new();
    let mut first = 0usize;
    while first < clients {
        let n = per_worker.max(1).min(clients - first);
        let mut child = Command::new(exe)
            .args([
                "worker",
                "--gateway",
                &gateway.to_string(),
                "--clients",
                &n.to_string(),
            ])
            .args([
                "--first-index",
                &first.to_string(),
                "--payload",
                &payload.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("worker pipes");
        };
        workers.push(Worker {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        });
        first += n;
    }
    let mut total = Storm::default();
    let mut last = start;
    for w in &mut workers {
        let v = read_line(&mut w.lines, Duration::from_secs(150)).await?;
        total.connected += v.first().copied().unwrap_or(0);
        total.failed += v.get(1).copied().unwrap_or(0);
        last = last.max(v.get(2).copied().unwrap_or(0));
    }
    total.connack_secs = last.saturating_sub(start) as f64 / 1e9;
    between("registered", &total);
    for w in &mut workers {
        w.stdin.write_all(b"go\n").await?;
        w.stdin.flush().await?;
    }
    for w in &mut workers {
        let v = read_line(&mut w.lines, Duration::from_secs(90)).await?;
        total.acknowledged += v.first().copied().unwrap_or(0);
        total.retransmissions += v.get(1).copied().unwrap_or(0);
        total.unanswered += v.get(2).copied().unwrap_or(0);
        total.worker_cpu_secs += v.get(3).copied().unwrap_or(0) as f64 / 1e6;
    }
    between("published", &total);
    for w in &mut workers {
        w.stdin.write_all(b"finish\n").await?;
        w.stdin.flush().await?;
    }
    for mut w in workers {
        let _ = read_line(&mut w.lines, Duration::from_secs(40)).await;
        let _ = timeout(Duration::from_secs(5), w.child.wait()).await;
    }
    Ok(total)
}
