//! Store-and-forward over HTTP: twenty httpx clients (threads of `tests/py/http_client.py`,
//! keep-alive) POST QoS 1 payloads `dev<i>:<seq>` one request at a time, resending the same
//! seq after any non-2xx answer or connection error. The broker stops mid-stream (200s keep
//! coming: the spool has the data), the gateway is killed with SIGKILL and restarted on the
//! same state dir during the outage, then the broker comes back. Every (device, seq) that got
//! a 200 reaches the subscriber, and per device the first arrivals come in increasing seq
//! order (duplicates allowed and counted: a request whose 200 was lost to the kill is sent
//! again). The same with batches of 100 readings per request.
//!
//! The phases advance on progress (every device got more 200s), not on time.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use sensorgate_tests::http::{HttpSetup, py_client, wait_http_ready};
use sensorgate_tests::{Gateway, GatewayConfig, Mosquitto, Script, Subscriber, temp_dir};

const DEVICES: usize = 20;
const WAIT: Duration = Duration::from_secs(90);

/// The seqs each device got a 200 for, from the client's `ACK <i> <first> <last>` lines.
struct Acks {
    per_device: Vec<BTreeSet<u32>>,
    retries: usize,
}

impl Acks {
    fn read(&mut self, client: &Script, timeout: Duration) {
        let Some(line) = client.line(timeout).unwrap() else {
            return;
        };
        let t: Vec<&str> = line.split_whitespace().collect();
        match t.as_slice() {
            ["ACK", i, first, last] => {
                let i: usize = i.parse().unwrap();
                let (first, last): (u32, u32) = (first.parse().unwrap(), last.parse().unwrap());
                self.per_device[i].extend(first..=last);
            }
            ["RETRY", ..] => self.retries += 1,
            ["ERROR", ..] => panic!("http_client.py: {line}\n{}", client.stderr()),
            _ => {}
        }
    }

    fn counts(&self) -> Vec<usize> {
        self.per_device.iter().map(BTreeSet::len).collect()
    }

    /// Reads until every device has `more` more acknowledged seqs than now.
    fn progress(&mut self, client: &Script, more: usize, what: &str) {
        let base = self.counts();
        let deadline = Instant::now() + WAIT;
        while !self.counts().iter().zip(&base).all(|(n, b)| *n >= b + more) {
            assert!(
                Instant::now() < deadline,
                "{what}: no progress within {WAIT:?}: {:?} (base {base:?}, {} retries)\n{}",
                self.counts(),
                self.retries,
                client.stderr()
            );
            self.read(client, Duration::from_millis(200));
        }
    }
}

fn run(batch: usize) {
    let mut broker = Mosquitto::start_persistent().unwrap();
    let sub_id = format!("http-outage-sub-{batch}");
    let mut sub = Subscriber::start_session(broker.port(), &["out/#"], &sub_id).unwrap();
    let mut cfg = GatewayConfig::new(broker.port()).unwrap();
    // Anonymous on loopback; no rate limit (twenty devices share one anonymous address).
    let http = HttpSetup::new()
        .unwrap()
        .anonymous()
        .lines("rate_per_device = 0\n");
    cfg.extra_sections.push_str(&http.render().unwrap());
    let mut gateway = Gateway::start(&cfg).unwrap();
    let addr = http.addr();
    wait_http_ready(addr).unwrap();

    let dir = temp_dir().unwrap();
    let stop_file = dir.path().join("stop");
    let mut args: Vec<String> = vec![
        "outage".into(),
        "--base".into(),
        format!("http://{addr}"),
        "--devices".into(),
        DEVICES.to_string(),
        "--stop-file".into(),
        stop_file.to_str().unwrap().into(),
        "--timeout".into(),
        "300".into(),
    ];
    if batch > 0 {
        args.extend(["--batch".into(), batch.to_string()]);
    }
    let client = py_client(&args).unwrap();
    // Stops the client however the test ends.
    struct StopOnDrop(std::path::PathBuf);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::write(&self.0, b"stop");
        }
    }
    let _stopper = StopOnDrop(stop_file.clone());
    let step = if batch > 0 { batch } else { 3 };
    let mut acks = Acks {
        per_device: vec![BTreeSet::new(); DEVICES],
        retries: 0,
    };

    acks.progress(&client, step, "200s before the outage");
    broker.stop().unwrap();
    acks.progress(&client, step, "200s during the outage");
    gateway.kill9().unwrap();
    gateway.restart().unwrap();
    wait_http_ready(addr).unwrap();
    acks.progress(&client, step, "200s after the restart");
    broker.restart().unwrap();
    acks.progress(&client, step, "200s with the broker back");
    std::fs::write(&stop_file, b"stop").unwrap();
    loop {
        let line = client.line(WAIT).unwrap().expect("the client did not stop");
        if line == "DONE" {
            break;
        }
        let t: Vec<&str> = line.split_whitespace().collect();
        if let ["ACK", i, first, last] = t.as_slice() {
            let i: usize = i.parse().unwrap();
            acks.per_device[i].extend(first.parse::<u32>().unwrap()..=last.parse().unwrap());
        } else if t.first() == Some(&"RETRY") {
            acks.retries += 1;
        }
    }

    // Every acknowledged (device, seq) arrives; per device, first arrivals in order.
    let mut missing: BTreeMap<String, BTreeSet<u32>> = acks
        .per_device
        .iter()
        .enumerate()
        .map(|(i, s)| (format!("dev{i}"), s.clone()))
        .collect();
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
        let text = String::from_utf8(m.payload.clone()).unwrap();
        let (device, seq) = text.split_once(':').unwrap();
        assert_eq!(m.topic, format!("out/{device}"), "{text}");
        let seq: u32 = seq.parse().unwrap();
        if !seen.entry(device.to_owned()).or_default().insert(seq) {
            duplicates += 1;
            continue;
        }
        if let Some(prev) = last.insert(device.to_owned(), seq) {
            assert!(seq > prev, "{device}: {seq} arrived after {prev}");
        }
        if let Some(s) = missing.get_mut(device) {
            s.remove(&seq);
        }
    }
    eprintln!(
        "{total} acknowledged, {received} received, {duplicates} duplicates, {} retries",
        acks.retries
    );
    let status = gateway.stop().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn every_200_survives_a_broker_outage_and_a_kill_9_in_order_per_device() {
    run(0);
}

#[test]
fn every_200_batch_of_100_survives_a_broker_outage_and_a_kill_9_in_order_per_device() {
    run(100);
}
