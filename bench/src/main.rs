//! `sg-load`: a first load generator for sensorgate.
//!
//! Emulates `--clients` MQTT-SN clients over UDP, each with its own socket (source port):
//! CONNECT, REGISTER one topic, then `--messages` PUBLISHes at `--qos` 0 or 1 (QoS 1 with a
//! window of one, as the spec allows), then DISCONNECT. A counting MQTT subscriber on the
//! upstream broker measures what arrived. Optionally samples the gateway's RSS from /proc.
//! Every phase is bounded in time; everything talks to loopback addresses given on the command
//! line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use rumqttc_v5::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use tokio::net::UdpSocket;
use tokio::time::timeout;

#[derive(Parser, Debug, Clone)]
#[command(about = "MQTT-SN load generator for sensorgate")]
struct Args {
    /// Gateway UDP address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    gateway: SocketAddr,
    /// Upstream broker (host:port) for the counting subscriber; none = don't count.
    #[arg(long)]
    broker: Option<String>,
    /// Number of emulated clients.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Messages per client.
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// QoS (0 or 1).
    #[arg(long, default_value_t = 0)]
    qos: u8,
    /// Payload bytes.
    #[arg(long, default_value_t = 32)]
    payload: usize,
    /// Gateway PID, to report its RSS and CPU time.
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// Keep the clients connected this long after publishing (to sample RSS), then disconnect.
    #[arg(long, default_value = "0")]
    hold_secs: u64,
    /// Bound on the whole run.
    #[arg(long, default_value_t = 120)]
    max_secs: u64,
}

fn frame(msg_type: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + 4);
    let len = body.len() + 2;
    if len < 256 {
        v.push(len as u8);
    } else {
        v.push(1);
        v.extend_from_slice(&((len + 2) as u16).to_be_bytes());
    }
    v.push(msg_type);
    v.extend_from_slice(body);
    v
}

async fn expect(sock: &UdpSocket, buf: &mut [u8], msg_type: u8) -> anyhow::Result<usize> {
    loop {
        let n = timeout(Duration::from_secs(10), sock.recv(buf))
            .await
            .context("timed out waiting for the gateway")??;
        let t = if buf.first() == Some(&1) {
            buf.get(3)
        } else {
            buf.get(1)
        };
        if t == Some(&msg_type) {
            return Ok(n);
        }
    }
}

struct Counters {
    acked: AtomicU64,
    rejected: AtomicU64,
    connected: AtomicU64,
}

async fn client(
    args: Args,
    index: usize,
    counters: Arc<Counters>,
    go: Arc<tokio::sync::Barrier>,
) -> anyhow::Result<()> {
    let sock = UdpSocket::bind(if args.gateway.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    })
    .await?;
    sock.connect(args.gateway).await?;
    let mut buf = vec![0u8; 2048];
    let id = format!("load-{index}");
    let mut body = vec![0x04, 0x01];
    body.extend_from_slice(&60u16.to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    sock.send(&frame(0x04, &body)).await?;
    expect(&sock, &mut buf, 0x05).await?;
    if buf.get(2) != Some(&0) {
        bail!("CONNACK rc {:?}", buf.get(2));
    }
    let mut body = vec![0, 0, 0, 1];
    body.extend_from_slice(format!("bench/{index}").as_bytes());
    sock.send(&frame(0x0A, &body)).await?;
    expect(&sock, &mut buf, 0x0B).await?;
    let topic_id = [
        buf.get(2).copied().unwrap_or(0),
        buf.get(3).copied().unwrap_or(0),
    ];
    counters.connected.fetch_add(1, Ordering::Relaxed);
    go.wait().await;
    let flags = if args.qos == 1 { 0x20 } else { 0x00 };
    let payload = vec![b'x'; args.payload];
    for seq in 0..args.messages {
        let msg_id = (seq % 65_535 + 1) as u16;
        let mut body = vec![flags, topic_id[0], topic_id[1]];
        body.extend_from_slice(&msg_id.to_be_bytes());
        body.extend_from_slice(&payload);
        let pkt = frame(0x0C, &body);
        sock.send(&pkt).await?;
        if args.qos == 1 {
            expect(&sock, &mut buf, 0x0D).await?;
            if buf.get(6) == Some(&0) {
                counters.acked.fetch_add(1, Ordering::Relaxed);
            } else {
                counters.rejected.fetch_add(1, Ordering::Relaxed);
            }
        } else if seq % 256 == 255 {
            // Yield so one client cannot starve the others on a shared runtime.
            tokio::task::yield_now().await;
        }
    }
    if args.hold_secs > 0 {
        // Publishing done; stay connected until the main task has sampled the gateway.
        go.wait().await;
        go.wait().await;
    }
    sock.send(&frame(0x18, &[])).await?;
    Ok(())
}

fn proc_stat(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((rss_kb, (utime + stime) / 100.0))
}

#[tokio::main]
#[allow(clippy::disallowed_methods)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let total = args.clients as u64 * args.messages;
    let received = Arc::new(AtomicU64::new(0));
    let first_last = Arc::new(std::sync::Mutex::new((None::<Instant>, None::<Instant>)));
    // The subscriber's client handle must outlive the run: its event loop ends when it drops.
    let mut _subscriber = None;
    if let Some(broker) = &args.broker {
        let (host, port) = broker.rsplit_once(':').context("--broker host:port")?;
        let mut opts = MqttOptions::new("sg-load-counter", (host.to_owned(), port.parse::<u16>()?));
        opts.set_keep_alive(30);
        let (client, mut eventloop) = AsyncClient::builder(opts).capacity(1000).build();
        client.subscribe("bench/#", QoS::AtMostOnce).await?;
        _subscriber = Some(client.clone());
        let received = received.clone();
        let fl = first_last.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        tokio::spawn(async move {
            loop {
                let ev = match eventloop.poll().await {
                    Ok(ev) => ev,
                    Err(e) => {
                        eprintln!("counting subscriber: {e}");
                        break;
                    }
                };
                match ev {
                    Event::Incoming(Incoming::SubAck(_)) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Event::Incoming(Incoming::Publish(_)) => {
                        let now = Instant::now();
                        received.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut g) = fl.lock() {
                            g.0.get_or_insert(now);
                            g.1 = Some(now);
                        }
                    }
                    _ => {}
                }
            }
        });
        timeout(Duration::from_secs(10), ready_rx)
            .await
            .context("subscriber SUBACK")??;
    }
    let counters = Arc::new(Counters {
        acked: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        connected: AtomicU64::new(0),
    });
    let go = Arc::new(tokio::sync::Barrier::new(args.clients + 1));
    let before = args.gateway_pid.and_then(proc_stat);
    let mut tasks = Vec::new();
    for i in 0..args.clients {
        tasks.push(tokio::spawn(client(
            args.clone(),
            i,
            counters.clone(),
            go.clone(),
        )));
    }
    let connect_start = Instant::now();
    go.wait().await;
    let connect_secs = connect_start.elapsed().as_secs_f64();
    let connected_stat = args.gateway_pid.and_then(proc_stat);
    let start = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(args.max_secs);
    let mut held_stat = None;
    if args.hold_secs > 0 {
        go.wait().await;
        tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
        held_stat = args.gateway_pid.and_then(proc_stat);
        go.wait().await;
    }
    for t in tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        timeout(left, t)
            .await
            .context("run exceeded --max-secs")???;
    }
    let send_secs = start.elapsed().as_secs_f64();
    if args.broker.is_some() {
        // Wait (bounded) for the subscriber to see everything that was sent.
        let until = Instant::now() + Duration::from_secs(10);
        while received.load(Ordering::Relaxed) < total && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let after = args.gateway_pid.and_then(proc_stat);
    let got = received.load(Ordering::Relaxed);
    println!(
        "clients={} messages/client={} qos={} payload={}B",
        args.clients, args.messages, args.qos, args.payload
    );
    println!(
        "connect+register phase: {connect_secs:.3}s ({:.0} clients/s)",
        args.clients as f64 / connect_secs
    );
    println!(
        "publish phase (sender side): {send_secs:.3}s, {:.0} msg/s offered",
        total as f64 / send_secs
    );
    if args.qos == 1 {
        let acked = counters.acked.load(Ordering::Relaxed);
        println!(
            "acknowledged: {acked} ({:.0} msg/s), rejected: {}",
            acked as f64 / send_secs,
            counters.rejected.load(Ordering::Relaxed)
        );
    }
    if args.broker.is_some() {
        let (first, last) = first_last.lock().map(|g| *g).unwrap_or((None, None));
        let span = match (first, last) {
            (Some(f), Some(l)) if l > f => (l - f).as_secs_f64(),
            _ => send_secs,
        };
        println!(
            "delivered to subscriber: {got}/{total} ({:.2}% loss), {:.0} msg/s (first to last arrival)",
            100.0 * (total.saturating_sub(got)) as f64 / total.max(1) as f64,
            got as f64 / span
        );
    }
    if let (Some((rss0, cpu0)), Some((rss1, cpu1))) = (before, after) {
        println!(
            "gateway RSS: {rss0} kB before, {} kB connected, {} kB held, {rss1} kB after",
            connected_stat.map_or(0, |s| s.0),
            held_stat.map_or(0, |s| s.0)
        );
        println!(
            "gateway CPU: {:.2}s total, {:.2} us/message",
            cpu1 - cpu0,
            (cpu1 - cpu0) * 1e6 / total.max(1) as f64
        );
    }
    Ok(())
}
