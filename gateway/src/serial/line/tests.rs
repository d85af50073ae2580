//! The line's arithmetic (pacing, backoff) and, over a socat pty pair, the adapter itself.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use sensorgate_tests::pty::PtyPair;

use super::*;

#[test]
fn bytes_take_their_bits_at_the_line_rate() {
    // 115200 8N1: 10 bits per byte, 11520 bytes/s.
    let p = Pacer::new(115_200, 10, Duration::ZERO);
    assert_eq!(p.duration_of(11_520), Duration::from_secs(1));
    assert_eq!(p.duration_of(0), Duration::ZERO);
    // 9600 8E2: 12 bits per byte, 800 bytes/s; one byte is 1.25 ms.
    let p = Pacer::new(9600, 12, Duration::ZERO);
    assert_eq!(p.duration_of(1), Duration::from_micros(1250));
    assert_eq!(p.duration_of(800), Duration::from_secs(1));
    // Rounded up: 1 byte at 115200 8N1 is 86805.55... ns.
    assert_eq!(
        Pacer::new(115_200, 10, Duration::ZERO).duration_of(1),
        Duration::from_nanos(86_806)
    );
}

#[test]
#[allow(clippy::disallowed_methods)] // An origin for the arithmetic; no time passes.
fn writes_never_start_before_the_line_is_free_and_idle_earns_no_credit() {
    let t0 = Instant::now();
    let mut p = Pacer::new(9600, 10, Duration::ZERO); // 960 bytes/s
    assert_eq!(p.ready_at(t0), t0);
    p.sent(t0, 96); // 100 ms on the wire
    assert_eq!(p.ready_at(t0), t0 + Duration::from_millis(100));
    assert_eq!(
        p.ready_at(t0 + Duration::from_millis(40)),
        t0 + Duration::from_millis(100)
    );
    // Back-to-back: each write starts when the previous one ends.
    let start = p.ready_at(t0);
    p.sent(start, 96);
    assert_eq!(p.ready_at(t0), t0 + Duration::from_millis(200));
    // After a silence the next write starts now, not earlier (no burst allowance).
    let later = t0 + Duration::from_secs(5);
    assert_eq!(p.ready_at(later), later);
    p.sent(later, 960);
    assert_eq!(p.ready_at(later), later + Duration::from_secs(1));
}

#[test]
#[allow(clippy::disallowed_methods)] // An origin for the arithmetic; no time passes.
fn writes_run_at_most_the_slack_ahead_of_the_wire() {
    let t0 = Instant::now();
    let slack = Duration::from_millis(20);
    let mut p = Pacer::new(9600, 10, slack); // 960 bytes/s: 20 ms is 19.2 bytes
    // 10 bytes (10.4 ms) then 10 more at once: the backlog is within the slack.
    p.sent(t0, 10);
    assert_eq!(p.ready_at(t0), t0);
    p.sent(t0, 10);
    // Now 20.8 ms are written ahead: the next waits until 20 ms are left.
    let free = t0 + p.duration_of(20);
    assert_eq!(p.ready_at(t0), free - slack);
    // A write at that moment ends after everything before it: the line time adds up.
    let start = p.ready_at(t0);
    p.sent(start, 96);
    assert_eq!(p.ready_at(start), free + Duration::from_millis(100) - slack);
    // Over a long run the bytes leave at the line's rate, the slack notwithstanding.
    let mut now = start;
    for _ in 0..1000 {
        now = p.ready_at(now);
        p.sent(now, 96);
    }
    let elapsed = now - t0;
    let expected = p.duration_of(20 + 96 * 1001) - p.duration_of(96) - slack;
    assert_eq!(elapsed, expected);
}

#[test]
fn bits_per_char_count_start_data_parity_and_stop_bits() {
    let mut line = line_config("/dev/null");
    assert_eq!(line.bits_per_char(), 10); // 8N1
    line.parity = Parity::Even;
    line.stop_bits = 2;
    assert_eq!(line.bits_per_char(), 12); // 8E2
    line.data_bits = 7;
    line.parity = Parity::None;
    line.stop_bits = 1;
    assert_eq!(line.bits_per_char(), 9); // 7N1
}

#[test]
fn the_queue_delay_is_a_full_queue_of_the_largest_frames_at_the_line_rate() {
    let mut line = line_config("/dev/null");
    line.baud = 9600;
    line.max_frame = 96;
    line.write_queue = 10;
    // 960 bytes at 960 bytes/s.
    assert_eq!(queue_delay(&line), Duration::from_secs(1));
    line.framing = Framing::Slip { crc: Crc::Crc16 };
    // Every byte escaped: (96 + 2) * 2 + 2 = 198 bytes per frame.
    assert_eq!(max_encoded_len(line.framing, 96), 198);
    assert_eq!(
        queue_delay(&line),
        Duration::from_millis(2062) + Duration::from_micros(500)
    );
}

#[test]
fn backoff_doubles_up_to_the_maximum_and_resets_on_open() {
    let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
    let waits: Vec<u64> = (0..5).map(|_| b.failed().as_secs()).collect();
    assert_eq!(waits, [1, 2, 4, 5, 5]);
    b.reset();
    assert_eq!(b.failed(), Duration::from_secs(1));
    // A maximum below the minimum is the minimum.
    let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
    assert_eq!(
        (b.failed(), b.failed()),
        (Duration::from_secs(2), Duration::from_secs(2))
    );
}

#[test]
fn encapsulation_is_told_by_the_message_type_after_either_length_form() {
    assert!(is_encapsulated(&[0x05, 0xFE, 0x01, 0xAA, 0xBB, 0x02, 0x16]));
    assert!(is_encapsulated(&[0x01, 0x00, 0x05, 0xFE, 0x01]));
    assert!(!is_encapsulated(&[0x02, 0x16])); // PINGREQ
    assert!(!is_encapsulated(&[0x01, 0x00, 0x04, 0x16]));
    assert!(!is_encapsulated(&[0xFE]));
    assert!(!is_encapsulated(&[]));
}

/// A line with the defaults of `[[serial]]` on `device`.
fn line_config(device: &str) -> SerialLine {
    SerialLine {
        device: device.to_owned(),
        baud: 115_200,
        data_bits: 8,
        parity: Parity::None,
        stop_bits: 1,
        flow_control: FlowControl::None,
        framing: Framing::Length,
        forwarder: false,
        frame_timeout: Duration::from_millis(100),
        write_queue: 32,
        reopen_min: Duration::from_millis(20),
        reopen_max: Duration::from_millis(200),
        max_frame: 256,
    }
}

/// The end-to-end tests' socat pty pair (stopped by PID with SIGTERM on drop), as
/// `<dir>/line-gw` <-> `<dir>/line-sensor`.
fn pty_pair(dir: &std::path::Path) -> PtyPair {
    PtyPair::start(dir, "line").expect("socat (apt install socat) makes a pty pair")
}

/// Waits (bounded, generously) until `cond` holds.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let bound = Duration::from_secs(20);
    let waited = tokio::time::timeout(bound, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "not within {bound:?}: {what}");
}

/// Opens the sensor's end once socat has made it.
async fn sensor_end(dir: &std::path::Path) -> tokio_serial::SerialStream {
    let path = dir.join("line-sensor");
    wait_for("socat made the sensor's pty", || path.exists()).await;
    tokio_serial::new(path.to_string_lossy(), 115_200)
        .open_native_async()
        .expect("the sensor's end opens")
}

/// Reads from the sensor's end until `want` bytes came.
async fn read_exactly(port: &mut tokio_serial::SerialStream, want: usize) -> Vec<u8> {
    let mut got = vec![0u8; want];
    tokio::time::timeout(Duration::from_secs(20), port.read_exact(&mut got))
        .await
        .expect("bytes from the gateway within 20 s")
        .expect("the sensor's end reads");
    got
}

/// Frames both ways over a live pty pair.
async fn carries_frames_both_ways(
    links: &mut SerialLinks,
    sensor: &mut tokio_serial::SerialStream,
    round: u8,
) {
    // PUBLISH-sized uplink (a length-framed message) and a PINGREQ in one write.
    let publish = [0x08, 0x0C, 0x00, 0x00, 0x01, 0x00, 0x01, round];
    let mut bytes = publish.to_vec();
    bytes.extend_from_slice(&[0x02, 0x16]);
    sensor.write_all(&bytes).await.unwrap();
    for want in [&publish[..], &[0x02, 0x16][..]] {
        let (line, frame) = tokio::time::timeout(Duration::from_secs(20), links.inbound.recv())
            .await
            .expect("a frame within 20 s")
            .expect("the lines run");
        assert_eq!((line, &frame[..]), (0, want));
    }
    // Downlink: a PINGRESP and a PUBACK, in order.
    links.lines[0].send(Bytes::from_static(&[0x02, 0x17]));
    links.lines[0].send(Bytes::copy_from_slice(&[
        0x07, 0x0D, 0x00, 0x01, 0x00, round, 0x00,
    ]));
    assert_eq!(
        read_exactly(sensor, 9).await,
        [0x02, 0x17, 0x07, 0x0D, 0x00, 0x01, 0x00, round, 0x00]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_opens_late_carries_frames_notices_the_device_vanish_and_reopens_it() {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let config = line_config(&dir.path().join("line-gw").to_string_lossy());
    // Absent at start: the line waits for it.
    let events = Arc::new(Events::new(16));
    let (mut links, tasks) = start(
        std::slice::from_ref(&config),
        &stop,
        Some(Arc::clone(&events)),
    );
    let stats = Arc::clone(links.lines[0].stats());
    wait_for("the line reports down", || {
        let s = stats.read();
        !s.up && s.since_ms > 0
    })
    .await;

    let mut socat = pty_pair(dir.path());
    wait_for("the line opens the device", || stats.read().up).await;
    let mut sensor = sensor_end(dir.path()).await;
    carries_frames_both_ways(&mut links, &mut sensor, 1).await;
    // The writer counts a frame after its write returns, which the sensor may see first.
    wait_for("the line counts both frames out", || {
        stats.read().frames_out == 2
    })
    .await;
    let s = stats.read();
    assert_eq!((s.frames_in, s.frames_out, s.reopens), (2, 2, 0));
    assert_eq!((s.bytes_in, s.bytes_out), (10, 9));

    // Unplugged.
    drop(sensor);
    socat.kill();
    wait_for("the line notices the device vanish", || !stats.read().up).await;
    // Frames for a line that is down are dropped, counted.
    links.lines[0].send(Bytes::from_static(&[0x02, 0x17]));
    wait_for("the frame for the dead line is dropped", || {
        stats.read().write_dropped == 1
    })
    .await;

    // Plugged in again under the same name.
    let _socat = pty_pair(dir.path());
    wait_for("the line reopens the device", || {
        let s = stats.read();
        s.up && s.reopens == 1
    })
    .await;
    let mut sensor = sensor_end(dir.path()).await;
    carries_frames_both_ways(&mut links, &mut sensor, 2).await;
    // Each state change once: absent, up, vanished, up again.
    let kinds: Vec<String> = events.list().into_iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        ["serial_down", "serial_up", "serial_down", "serial_up"]
    );

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), tasks.join())
        .await
        .expect("the line stops within 20 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_drops_a_partial_frame_and_encapsulated_frames_stay_off_a_plain_line() {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let _socat = pty_pair(dir.path());
    let mut sensor = sensor_end(dir.path()).await;
    let mut config = line_config(&dir.path().join("line-gw").to_string_lossy());
    config.frame_timeout = Duration::from_millis(20);
    let (mut links, tasks) = start(std::slice::from_ref(&config), &stop, None);
    let stats = Arc::clone(links.lines[0].stats());
    wait_for("the line opens the device", || stats.read().up).await;

    // Half a PUBLISH, then silence: dropped at the frame timeout.
    sensor.write_all(&[0x08, 0x0C, 0x00]).await.unwrap();
    wait_for("the partial frame is dropped", || {
        stats.read().truncated == 1
    })
    .await;
    // A forwarder encapsulation (header: Length 4, 0xFE, Ctrl, node id 0xAA; then a
    // PINGREQ): dropped on a line that is not a forwarder's.
    sensor
        .write_all(&[0x04, 0xFE, 0x01, 0xAA, 0x02, 0x16])
        .await
        .unwrap();
    wait_for("the encapsulated frame is dropped", || {
        stats.read().encapsulated_dropped == 1
    })
    .await;
    // The line still serves: the next frame is whole.
    sensor.write_all(&[0x02, 0x16]).await.unwrap();
    let (line, frame) = tokio::time::timeout(Duration::from_secs(20), links.inbound.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((line, &frame[..]), (0, &[0x02, 0x16][..]));
    assert_eq!(stats.read().frames_in, 1);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), tasks.join())
        .await
        .expect("the line stops within 20 s");
}
