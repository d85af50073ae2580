//! Store-and-forward for CoAP: ten raw devices PUT (CON, one request outstanding each:
//! NSTART 1) numbered payloads, retransmitting what got no answer and resending what got no
//! 2.04. The broker stops for 30 s mid-stream: 2.04s keep coming (the spool has the data);
//! during the outage the gateway is killed with SIGKILL and restarted on the same state dir;
//! then the broker comes back. Every payload that got a 2.04 reaches the subscriber, and per
//! device the payloads arrive in increasing order (duplicates allowed: a request whose 2.04
//! was lost to the kill is sent again). A full spool answers 5.03 with Max-Age
//! (`busy_max_age`) and PUTs are accepted again once the backlog drained.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use sensorgate_tests::coap::{ACK, CON, Msg, RawClient, codes, opts};
use sensorgate_tests::{Gateway, GatewayConfig, Mosquitto, Subscriber, poll_until};

const DEVICES: usize = 10;
const OUTAGE: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(60);
/// A request's copies are sent this often until some answer comes (loopback loses nothing,
/// but a killed gateway answers nothing).
const RETRANSMIT: Duration = Duration::from_secs(1);
/// After an empty ACK, the separate 2.04 is awaited this long before the request is sent
/// again under a new Message ID (the gateway may have died in between).
const SEPARATE_WAIT: Duration = Duration::from_secs(5);
/// A device's pause after each 2.04: a sensor's pace, and a bound on the load the test puts on
/// a shared machine (unpaced, ten devices reach thousands of requests per second).
const PACE: Duration = Duration::from_millis(50);

/// What a device saw: the sequence numbers that got a 2.04, in order.
type Acked = Arc<Mutex<Vec<u32>>>;

/// One request until it is answered; `None` when told to stop first.
fn exchange(
    c: &mut RawClient,
    seq_payload: &[u8],
    target: &str,
    stop: &AtomicBool,
) -> Result<Option<u8>> {
    let (mid, token) = (c.mid(), c.token());
    let req = Msg::request(CON, codes::PUT, mid, &token, target).with_payload(seq_payload);
    let bytes = req.encode();
    let mut next_send = Instant::now();
    let mut empty_acked_at: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if let Some(at) = empty_acked_at {
            if now.duration_since(at) > SEPARATE_WAIT {
                // Give up on this exchange; the caller sends the same payload afresh.
                return Ok(Some(codes::EMPTY));
            }
        } else if now >= next_send {
            c.send_raw(&bytes)?;
            next_send = now + RETRANSMIT;
        }
        let Some(m) = c.recv(Duration::from_millis(100))? else {
            continue;
        };
        if m.ty == CON {
            // A separate response (ours or a late one of an earlier exchange): ACK it.
            c.send(&Msg::empty(ACK, m.mid))?;
            if m.token == token {
                return Ok(Some(m.code));
            }
        } else if m.ty == ACK && m.mid == mid {
            if m.code == codes::EMPTY {
                empty_acked_at = Some(now);
            } else {
                return Ok(Some(m.code));
            }
        }
    }
    Ok(None)
}

fn device(i: usize, server: SocketAddr, stop: Arc<AtomicBool>, acked: Acked) -> Result<()> {
    let mut c = RawClient::new(server)?;
    let target = format!("ps/out/d{i}?id=out-d{i}");
    let mut seq = 0u32;
    while let Some(code) = exchange(&mut c, format!("{seq}").as_bytes(), &target, &stop)? {
        match code {
            codes::CHANGED => {
                acked
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .push(seq);
                seq += 1;
                std::thread::sleep(PACE);
            }
            // Busy, or given up after an empty ACK: the same payload again, a bit later.
            codes::SERVICE_UNAVAILABLE | codes::EMPTY => {
                std::thread::sleep(Duration::from_millis(200));
            }
            other => bail!(
                "device {i}: unexpected code {}",
                sensorgate_tests::coap::code_text(other)
            ),
        }
    }
    Ok(())
}

fn acked_counts(acked: &[Acked]) -> Vec<usize> {
    acked.iter().map(|a| a.lock().unwrap().len()).collect()
}

/// Waits until every device got at least `more` more 2.04s than in `base`.
fn await_progress(acked: &[Acked], base: &[usize], more: usize, what: &str) {
    poll_until(what, WAIT, Duration::from_millis(100), || {
        let now = acked_counts(acked);
        Ok(now
            .iter()
            .zip(base)
            .all(|(n, b)| *n >= b + more)
            .then_some(()))
    })
    .unwrap();
}

#[test]
fn every_acknowledged_put_survives_a_broker_outage_and_a_kill_9_in_order_per_device() {
    let mut broker = Mosquitto::start_persistent().unwrap();
    let mut sub = Subscriber::start_session(broker.port(), &["out/#"], "coap-outage-sub").unwrap();
    let mut cfg = GatewayConfig::new(broker.port()).unwrap();
    cfg.with_coap().unwrap();
    let mut gateway = Gateway::start(&cfg).unwrap();
    let server = gateway.coap_addr();

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Vec<Acked> = (0..DEVICES).map(|_| Acked::default()).collect();
    let threads: Vec<JoinHandle<Result<()>>> = (0..DEVICES)
        .map(|i| {
            let (stop, acked) = (stop.clone(), acked[i].clone());
            std::thread::spawn(move || device(i, server, stop, acked))
        })
        .collect();
    // Stops the devices however the test ends.
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stopper = StopOnDrop(stop.clone());

    await_progress(&acked, &[0; DEVICES], 3, "3 PUTs acknowledged per device");
    broker.stop().unwrap();
    let down_at = Instant::now();
    // 2.04s keep coming while the broker is away: the spool holds the data.
    await_progress(&acked, &acked_counts(&acked), 3, "2.04s during the outage");

    // Mid-outage: SIGKILL, then the same state dir again.
    let scenario = |d: Duration| std::thread::sleep(d.saturating_sub(down_at.elapsed()));
    scenario(OUTAGE / 2);
    gateway.kill9().unwrap();
    gateway.restart().unwrap();
    await_progress(&acked, &acked_counts(&acked), 3, "2.04s after the restart");

    scenario(OUTAGE);
    broker.restart().unwrap();
    await_progress(
        &acked,
        &acked_counts(&acked),
        3,
        "2.04s with the broker back",
    );
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap().unwrap();
    }

    // Every acknowledged payload arrives; per device, first arrivals in increasing order.
    let mut missing: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for (i, a) in acked.iter().enumerate() {
        missing.insert(
            format!("out/d{i}"),
            a.lock().unwrap().iter().copied().collect(),
        );
    }
    let total: usize = missing.values().map(BTreeSet::len).sum();
    let mut last: BTreeMap<String, u32> = BTreeMap::new();
    let mut seen: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    let (mut received, mut duplicates) = (0usize, 0usize);
    let deadline = Instant::now() + WAIT;
    while missing.values().any(|s| !s.is_empty()) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(m) = sub.next(left).unwrap() else {
            let left: BTreeMap<_, _> = missing.iter().filter(|(_, s)| !s.is_empty()).collect();
            panic!("acknowledged but never delivered: {left:?} ({received} received)");
        };
        received += 1;
        let seq: u32 = String::from_utf8_lossy(&m.payload).parse().unwrap();
        if !seen.entry(m.topic.clone()).or_default().insert(seq) {
            duplicates += 1;
            continue;
        }
        if let Some(prev) = last.insert(m.topic.clone(), seq) {
            assert!(seq > prev, "{}: {seq} arrived after {prev}", m.topic);
        }
        if let Some(s) = missing.get_mut(&m.topic) {
            s.remove(&seq);
        }
    }
    eprintln!("{total} acknowledged, {received} received, {duplicates} duplicates");
    // SIGTERM with CoAP in use ends cleanly.
    let status = gateway.stop().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn a_full_spool_answers_5_03_with_max_age_and_accepts_again_once_drained() {
    let mut broker = Mosquitto::start_persistent().unwrap();
    let mut cfg = GatewayConfig::new(broker.port()).unwrap();
    cfg.with_coap().unwrap().coap("busy_max_age = \"7s\"\n");
    cfg.extra_sections
        .push_str("\n[spool]\nmax_bytes = \"1MiB\"\nsegment_bytes = \"64KiB\"\n");
    let gateway = Gateway::start(&cfg).unwrap();
    let mut c = RawClient::new(gateway.coap_addr()).unwrap();
    broker.stop().unwrap();
    let body = vec![b'f'; 1000];
    // About a thousand 1000-byte bodies fill a 1 MiB spool; bounded well above that.
    let mut accepted = 0;
    let busy = (0..5_000)
        .find_map(|i| {
            let (mid, token) = (c.mid(), c.token());
            let req = Msg::request(CON, codes::PUT, mid, &token, &format!("ps/full/{i}"))
                .with_payload(&body);
            let r = c.request(&req, WAIT).unwrap();
            match r.code {
                codes::CHANGED => {
                    accepted += 1;
                    None
                }
                _ => Some(r),
            }
        })
        .expect("the 1 MiB spool never filled");
    assert_eq!(busy.code, codes::SERVICE_UNAVAILABLE, "{}", busy.describe());
    assert_eq!(busy.uint(opts::MAX_AGE), Some(7), "{}", busy.describe());
    assert!(
        accepted > 500,
        "only {accepted} accepted before the spool was full"
    );

    // The broker back, the backlog drains and PUTs are accepted again.
    broker.restart().unwrap();
    poll_until("a 2.04 again", WAIT, Duration::from_millis(500), || {
        let (mid, token) = (c.mid(), c.token());
        let req = Msg::request(CON, codes::PUT, mid, &token, "ps/full/again").with_payload(b"x");
        let r = c.request(&req, WAIT)?;
        Ok((r.code == codes::CHANGED).then_some(()))
    })
    .unwrap();
}
