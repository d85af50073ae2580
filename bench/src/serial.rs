//! The serial load generator (scenarios 16-17): one sensor on the far end of a socat pty pair
//! whose other end is the gateway's `[[serial]]` line. It CONNECTs and publishes QoS 1
//! messages to the predefined topic in length framing (raw MQTT-SN messages), with up to
//! `window` unacknowledged at once, optionally pacing its writes at a line rate (a pty
//! ignores the baud rate: unpaced, it is an upper bound, not a wire figure).
//!
//! The pty pair is the end-to-end tests' (`sensorgate_tests::pty::PtyPair`: socat stopped
//! by PID with SIGTERM when it drops). Invariant: every wait is bounded.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sensorgate::serial::line::Pacer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::procs::PREDEFINED;
use crate::{elapsed_ns, sn};

/// One serial load.
#[derive(Debug, Clone)]
pub struct SerialSpec {
    /// The sensor's end of the line.
    pub device: PathBuf,
    /// QoS 1 messages to publish.
    pub messages: u64,
    /// Unacknowledged messages at most.
    pub window: usize,
    /// Payload bytes (with the stamp).
    pub payload: usize,
    /// Stamp client index.
    pub client: u32,
    /// Pace writes at this many bits/s with `bits_per_char` bits per byte; `None`: unpaced.
    pub pace: Option<(u32, u32)>,
    /// Bound on the whole run.
    pub max: Duration,
}

/// What a serial load did.
#[derive(Debug, Clone, Copy, Default)]
pub struct SerialResult {
    /// PUBLISHes written.
    pub sent: u64,
    /// PUBACKs with rc 0.
    pub acked: u64,
    /// Bytes written (uplink, on the wire).
    pub bytes_up: u64,
    /// Bytes read (downlink, on the wire).
    pub bytes_down: u64,
    /// From the first PUBLISH to the last PUBACK, seconds.
    pub secs: f64,
}

/// Extracts complete length-framed messages from `buf` (type, whole message), leaving a
/// partial one.
fn take_frames(buf: &mut Vec<u8>, out: &mut Vec<(u8, Vec<u8>)>) {
    loop {
        let (len, header) = match buf.as_slice() {
            [0x01, hi, lo, ..] => (usize::from(u16::from_be_bytes([*hi, *lo])), 3),
            [0x01, ..] | [] => return,
            [len, ..] => (usize::from(*len), 1),
        };
        if len <= header {
            // Not MQTT-SN: resynchronise a byte later.
            buf.remove(0);
            continue;
        }
        if buf.len() < len {
            return;
        }
        let msg: Vec<u8> = buf.drain(..len).collect();
        if let Some(&t) = msg.get(header) {
            out.push((t, msg));
        }
    }
}

/// Connects as `client_id` and runs `spec`.
///
/// # Errors
/// When the device cannot be opened, the CONNACK does not come within 10 s, or the run
/// exceeds `spec.max`.
pub async fn run(spec: &SerialSpec, client_id: &str) -> anyhow::Result<SerialResult> {
    let port = tokio_serial::SerialStream::open(&tokio_serial::new(
        spec.device.to_string_lossy(),
        115_200,
    ))
    .with_context(|| format!("opening {}", spec.device.display()))?;
    let (mut rx, mut tx) = tokio::io::split(port);
    let bytes_down = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));

    // CONNECT, then wait for CONNACK; again each second (the gateway may open its end of
    // the pty only after the first one was written, and opening can flush it).
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    let mut chunk = vec![0u8; 4096];
    let mut connected = false;
    for _ in 0..10 {
        tx.write_all(&sn::connect(client_id, 600)).await?;
        let answer = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                let n = rx.read(&mut chunk).await?;
                if n == 0 {
                    bail!("the line closed");
                }
                bytes_down.fetch_add(n as u64, Relaxed);
                buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
                take_frames(&mut buf, &mut frames);
                if frames.iter().any(|(t, _)| *t == sn::kind::CONNACK) {
                    frames.clear();
                    return Ok(());
                }
            }
        })
        .await;
        match answer {
            Ok(result) => {
                result?;
                connected = true;
                break;
            }
            Err(_) => continue,
        }
    }
    if !connected {
        bail!("no CONNACK within 10 s");
    }

    let window = Arc::new(Semaphore::new(spec.window.max(1)));
    let reader = {
        let window = Arc::clone(&window);
        let acked = Arc::clone(&acked);
        let bytes_down = Arc::clone(&bytes_down);
        let expected = spec.messages;
        tokio::spawn(async move {
            let mut last = Instant::now();
            while acked.load(Relaxed) < expected {
                let n = match rx.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                bytes_down.fetch_add(n as u64, Relaxed);
                buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
                take_frames(&mut buf, &mut frames);
                for (t, msg) in frames.drain(..) {
                    // PUBACK: length 7, rc last.
                    if t == sn::kind::PUBACK {
                        if msg.last() == Some(&0) {
                            acked.fetch_add(1, Relaxed);
                        }
                        window.add_permits(1);
                        last = Instant::now();
                    }
                }
            }
            last
        })
    };

    let started = Instant::now();
    let mut pacer = spec
        .pace
        .map(|(baud, bits)| Pacer::new(baud, bits, Duration::ZERO));
    let mut out = Vec::with_capacity(spec.payload + 8);
    let mut data = Vec::with_capacity(spec.payload);
    let mut bytes_up = 0u64;
    let mut sent = 0u64;
    let deadline = started + spec.max;
    let topic = PREDEFINED.0.to_be_bytes();
    for seq in 0..spec.messages {
        let permit = tokio::time::timeout_at(deadline.into(), window.acquire()).await;
        match permit {
            Ok(Ok(p)) => p.forget(),
            _ => break,
        }
        data.clear();
        sn::stamp_into(&mut data, spec.client, seq, elapsed_ns(), spec.payload);
        out.clear();
        let msg_id = u16::try_from(seq % 65_535 + 1).unwrap_or(1);
        sn::publish_into(
            &mut out,
            sn::qos_flags(1) | sn::TOPIC_PREDEFINED,
            topic,
            msg_id,
            &data,
        );
        if let Some(p) = pacer.as_mut() {
            let start = p.ready_at(Instant::now());
            tokio::time::sleep_until(start.into()).await;
            p.sent(start, out.len());
        }
        tx.write_all(&out).await?;
        bytes_up += out.len() as u64;
        sent += 1;
    }
    let last = tokio::time::timeout_at(deadline.into(), reader).await;
    let secs = match last {
        Ok(Ok(last)) => last.saturating_duration_since(started).as_secs_f64(),
        _ => started.elapsed().as_secs_f64(),
    };
    let _ = tx.write_all(&sn::disconnect()).await;
    Ok(SerialResult {
        sent,
        acked: acked.load(Relaxed),
        bytes_up,
        bytes_down: bytes_down.load(Relaxed),
        secs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_taken_whole_in_both_length_forms_and_partial_ones_wait() {
        let mut buf = vec![
            0x07, 0x0D, 0, 1, 0, 9, 0, 0x01, 0x00, 0x05, 0x18, 0x00, 0x03,
        ];
        let mut out = Vec::new();
        take_frames(&mut buf, &mut out);
        assert_eq!(
            out.iter().map(|(t, m)| (*t, m.len())).collect::<Vec<_>>(),
            [(0x0D, 7), (0x18, 5)]
        );
        assert_eq!(buf, [0x03]);
        buf.extend_from_slice(&[0x05]);
        take_frames(&mut buf, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(buf, [0x03, 0x05]);
        // Garbage (a length below the header) is skipped a byte at a time.
        let mut junk = vec![0x00, 0x00, 0x02, 0x17];
        out.clear();
        take_frames(&mut junk, &mut out);
        assert_eq!(out, [(0x17, vec![0x02, 0x17])]);
    }
}
