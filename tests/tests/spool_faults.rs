//! Store-and-forward under faults that do not announce themselves, end to end: a broker frozen
//! with SIGSTOP (the TCP connection stays open, nothing is acknowledged) and a real full disk
//! (ENOSPC on a small tmpfs). Sensors publish QoS 1 throughout; every message the gateway
//! acknowledged with rc 0 reaches the broker, first copies in order per sensor. Duplicates are
//! allowed (at least once) and reported.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sensorgate_tests::sn::{self, TopicType};
use sensorgate_tests::{
    Gateway, GatewayConfig, Mosquitto, SnClient, Subscriber, require_root, run_bounded, temp_dir,
};
use tempfile::TempDir;

use common::{Fleet, Ledger, payload};

/// The upstream's `ack_timeout` in the frozen-broker test.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// What the drain logs when it gives up on an unacknowledged message.
const ACK_TIMEOUT_LOG: &str = "Upstream did not acknowledge in time; reconnecting.";
/// What the spool writer logs at the start of a disk-error episode.
const WRITE_FAILED_LOG: &str = "Spool write failed";
/// What it logs at the end of one.
const WRITES_OK_LOG: &str = "Spool writes succeed again.";

/// How many lines of `log` contain `needle`.
fn count_lines(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// Runs `fleet` in slices of `slice` until `done` holds after a slice, at most for `timeout`;
/// returns how long it took.
///
/// # Panics
/// On timeout, naming `what`.
fn run_until(
    fleet: &mut Fleet,
    what: &str,
    timeout: Duration,
    slice: Duration,
    mut done: impl FnMut(&Fleet) -> bool,
) -> Duration {
    let start = Instant::now();
    // Each slice takes at least `slice`: the count bounds the loop even if the clock does not.
    let max_slices = timeout.as_millis() / slice.as_millis().max(1) + 1;
    for _ in 0..max_slices {
        fleet.run(slice);
        if done(fleet) {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            break;
        }
    }
    panic!(
        "no {what} within {timeout:?}; fleet: {} acknowledged, {} congestion, {} timeouts",
        fleet.acked_count(),
        fleet.tally.congestion,
        fleet.tally.timeouts
    );
}

// ---------------------------------------------------------------------------------------------
// A frozen broker.

#[test]
fn a_frozen_broker_is_detected_by_the_ack_timeout_and_loses_nothing_acknowledged() {
    let broker = Mosquitto::start().unwrap();
    // The frozen broker delivers nothing to the observer either. Its keep-alive (30 s, sub.py)
    // does not run out: the freeze lasts at most the detection bound plus 3 s. Should the
    // broker still drop it after the freeze, the persistent session reconnects by itself and
    // gets what was queued meanwhile.
    let mut sub =
        Subscriber::start_session(broker.port(), &["fleet/#"], "frozen-observer").unwrap();
    let mut cfg = GatewayConfig::new(broker.port()).unwrap();
    cfg.log_level = "info".into();
    // These lines land in the `[[upstream]]` table (extra sections follow it directly).
    // keep_alive is long on purpose: a broker that misses PINGRESPs is noticed only after
    // about twice the keep-alive, so with 60 s only the ack timeout can notice this freeze
    // within the bound below, and the test checks that path and no other.
    cfg.extra_sections.push_str(&format!(
        "ack_timeout = \"{}s\"\nkeep_alive = \"60s\"\n",
        ACK_TIMEOUT.as_secs()
    ));
    let gw = Gateway::start(&cfg).unwrap();
    let mut fleet = Fleet::new(gw.sn_addr(), 20, 500);
    fleet.run(Duration::from_secs(2));
    assert!(
        fleet.acked_count() > 100,
        "only {} acknowledged",
        fleet.acked_count()
    );
    let before_freeze = fleet.acked_count();
    let per_sensor_before: Vec<usize> = fleet.tally.acked.values().map(Vec::len).collect();
    let resets_before = count_lines(&gw.log(), ACK_TIMEOUT_LOG);

    broker.pause().unwrap();
    let frozen_at = Instant::now();
    // The spool keeps accepting while the drain writes into a socket nobody reads.
    let detected = run_until(
        &mut fleet,
        "ack-timeout reset in the gateway log",
        ACK_TIMEOUT + Duration::from_secs(8),
        Duration::from_millis(250),
        |_| count_lines(&gw.log(), ACK_TIMEOUT_LOG) > resets_before,
    );
    // Frozen a while longer: reconnect attempts reach a broker that accepts TCP (the kernel
    // does) and never answers CONNECT.
    fleet.run(Duration::from_secs(3));
    let during = fleet.acked_count() - before_freeze;
    let frozen_for = frozen_at.elapsed();
    broker.resume().unwrap();

    assert_eq!(
        fleet.tally.congestion, 0,
        "the spool refused messages while the broker was frozen"
    );
    let per_sensor: Vec<usize> = fleet.tally.acked.values().map(Vec::len).collect();
    for (sensor, (now, before)) in per_sensor.iter().zip(&per_sensor_before).enumerate() {
        assert!(
            now > before,
            "sensor {sensor} got no PUBACK rc 0 while the broker was frozen"
        );
    }
    assert!(
        during >= 20 * 3,
        "only {during} messages acknowledged in {frozen_for:?} of freeze"
    );

    // Everything acknowledged arrives. What the drain wrote into the dead connection must have
    // been sent again: on resume, mosquitto lets the gateway's new connection take over the
    // client id and discards the old connection's unread bytes (observed: about a thousand
    // messages written into it, a handful of duplicates at most), so a gateway that counted those
    // writes as sent would lose them here.
    fleet.run(Duration::from_secs(2));
    let mut ledger = Ledger::default();
    let duplicates = ledger.verify(&mut sub, &fleet.tally, Duration::from_secs(60));
    eprintln!(
        "ack-timeout reset {detected:?} after the freeze (ack_timeout {ACK_TIMEOUT:?}); frozen \
         {frozen_for:?}; acknowledged {} ({during} while frozen); duplicates {duplicates}; \
         sensor timeouts {}; resets logged {}",
        fleet.acked_count(),
        fleet.tally.timeouts,
        count_lines(&gw.log(), ACK_TIMEOUT_LOG) - resets_before,
    );
}

// ---------------------------------------------------------------------------------------------
// A full disk.

/// A tmpfs mounted on a fresh temp dir; unmounted on drop (lazily if it is busy).
struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (a `mount -o size=` value); `Err` says why it cannot.
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = temp_dir().map_err(|e| e.to_string())?;
        let out = run_bounded(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size},mode=0700"))
                .arg("tmpfs")
                .arg(dir.path()),
            Duration::from_secs(10),
        )
        .map_err(|e| format!("{e:#}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut cmd = Command::new("umount");
            if lazy {
                cmd.arg("-l");
            }
            cmd.arg(self.dir.path());
            run_bounded(&mut cmd, Duration::from_secs(10)).is_ok_and(|o| o.status.success())
        };
        if !umount(false) && !umount(true) {
            eprintln!("cannot unmount the tmpfs on {}", self.dir.path().display());
        }
    }
}

/// Mounts a tmpfs, or fails the test: a test that could not run must not pass. It is
/// `#[ignore]`d for that reason, and `scripts/test` runs it only as root or with `CI=true`.
fn tmpfs_or_fail(size: &str) -> Tmpfs {
    require_root("mounts a tmpfs to fill a real file system");
    match Tmpfs::mount(size) {
        Ok(t) => t,
        Err(reason) => panic!(
            "cannot mount a tmpfs ({reason}); this test needs root with CAP_SYS_ADMIN: it did \
             not test anything"
        ),
    }
}

/// Appends to `path` until the filesystem is full (ENOSPC), bounded by `max_bytes`; returns
/// the file's size.
fn fill(path: &Path, max_bytes: u64) -> u64 {
    let mut file: File = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let chunk = vec![0xA5u8; 64 * 1024];
    let mut written = file.metadata().unwrap().len();
    for _ in 0..=max_bytes / chunk.len() as u64 {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == ErrorKind::StorageFull => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    written
}

/// A client outside the fleet that publishes QoS 1 as sensor `index` of the fleet's payload
/// format, so that its accepted messages are verified with the fleet's.
struct Probe {
    client: SnClient,
    topic_id: u16,
    index: usize,
    next: u64,
}

impl Probe {
    fn new(gw: &Gateway, index: usize) -> Probe {
        let mut client = SnClient::new(gw.sn_addr()).unwrap();
        client.connect_ok(&format!("probe-{index}")).unwrap();
        let topic_id = client.register(&format!("fleet/{index}")).unwrap();
        Probe {
            client,
            topic_id,
            index,
            next: 1,
        }
    }

    /// Publishes the next message; returns the PUBACK rc, recording an accepted message in
    /// `fleet`'s tally.
    fn publish(&mut self, fleet: &mut Fleet) -> u8 {
        let rc = self
            .client
            .publish_qos1(
                TopicType::Normal,
                self.topic_id,
                false,
                payload(self.index, self.next, 0).as_bytes(),
            )
            .unwrap();
        if rc == sn::RC_ACCEPTED {
            fleet.tally.acked(self.index, self.next);
            self.next += 1;
        }
        rc
    }
}

/// `line` without ANSI escape sequences (the log colours its `key=value` fields).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC '[' parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The line of the last "Spool opened." in `log`, without colours.
fn last_spool_opened(log: &str) -> String {
    log.lines()
        .rev()
        .find(|l| l.contains("Spool opened."))
        .map(strip_ansi)
        .unwrap_or_else(|| panic!("no \"Spool opened.\" in the log:\n{log}"))
}

/// The gateway with its state dir on a tmpfs. The gateway is declared first so that it is
/// killed before the unmount (an open spool file would keep the tmpfs busy).
struct DiskRig {
    gateway: Gateway,
    tmpfs: Tmpfs,
}

#[test]
#[ignore = "needs root: mounts a tmpfs to hit a real ENOSPC"]
fn a_full_disk_gives_congestion_and_service_resumes_by_itself() {
    /// Size of the tmpfs.
    const TMPFS_BYTES: u64 = 8 << 20;
    /// Room left by the first filler file for the spool to fill by itself.
    const ROOM: u64 = 512 << 10;

    let tmpfs = tmpfs_or_fail("8m");
    let mut broker = Mosquitto::start_persistent().unwrap();
    let mut sub =
        Subscriber::start_session(broker.port(), &["fleet/#"], "enospc-observer").unwrap();
    let mut cfg = GatewayConfig::new(broker.port()).unwrap();
    cfg.log_level = "info".into();
    // min_free_bytes = 0: no watermark refuses first, the writes themselves hit ENOSPC.
    // max_bytes is far above the tmpfs, so the spool's own limit never refuses either.
    cfg.extra_sections.push_str(
        "\n[spool]\nmax_bytes = \"64MiB\"\nsegment_bytes = \"64KiB\"\nmin_free_bytes = \"0B\"\n",
    );
    let state_dir = tmpfs.path().join("state");
    let text = cfg.render(&state_dir);
    let mut rig = DiskRig {
        gateway: Gateway::start_in(temp_dir().unwrap(), &text, cfg.sn_addr()).unwrap(),
        tmpfs,
    };
    let filler: PathBuf = rig.tmpfs.path().join("filler");
    let top_up: PathBuf = rig.tmpfs.path().join("top-up");

    let mut fleet = Fleet::new(rig.gateway.sn_addr(), 10, 1000);
    fleet.pad = 200;
    fleet.run(Duration::from_secs(1));
    assert!(
        fleet.acked_count() > 100,
        "only {} acknowledged",
        fleet.acked_count()
    );

    // Nothing drains while the broker is down: the spool fills the room left by the filler.
    broker.stop().unwrap();
    let full = fill(&filler, TMPFS_BYTES);
    File::options()
        .write(true)
        .open(&filler)
        .unwrap()
        .set_len(full.saturating_sub(ROOM))
        .unwrap();
    let accepted_before_full = fleet.acked_count();
    let timeouts_before = fleet.tally.timeouts;
    let took = run_until(
        &mut fleet,
        "ENOSPC (congestion and a logged write failure)",
        Duration::from_secs(30),
        Duration::from_millis(250),
        |f| f.tally.congestion > 0 && rig.gateway.log().contains(WRITE_FAILED_LOG),
    );
    let accepted_into_room = fleet.acked_count() - accepted_before_full;
    assert!(
        accepted_into_room > 100,
        "only {accepted_into_room} messages fitted into {ROOM} bytes"
    );
    // The spool keeps failing while the disk is full: senders are told (congestion) instead of
    // being left to time out.
    fleet.run(Duration::from_secs(1));
    assert_eq!(
        fleet.tally.timeouts, timeouts_before,
        "sensors timed out instead of getting congestion"
    );

    // Take the last free pages too (a failed write gives back what it had taken), then a
    // QoS 1 publish must be refused. A record or two may still fit into the last page of the
    // active segment, hence the bounded retries.
    fill(&top_up, TMPFS_BYTES);
    let mut probe = Probe::new(&rig.gateway, 1000);
    let mut refused = false;
    for _ in 0..200 {
        match probe.publish(&mut fleet) {
            sn::RC_ACCEPTED => {}
            sn::RC_CONGESTION => {
                refused = true;
                break;
            }
            rc => panic!("QoS 1 publish on a full disk got rc {rc:#04x}"),
        }
    }
    assert!(refused, "QoS 1 publishes accepted on a full disk");
    // The gateway still serves: the same client pings, a new client connects.
    probe.client.ping().unwrap();
    SnClient::new(rig.gateway.sn_addr())
        .unwrap()
        .connect_ok("enospc-newcomer")
        .unwrap();
    assert!(rig.gateway.is_running(), "the gateway exited on ENOSPC");

    // Free the space, broker still down: publishing is accepted again by itself.
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&top_up).unwrap();
    let pid = rig.gateway.pid();
    let acked_while_full = fleet.acked_count();
    let recovered = run_until(
        &mut fleet,
        "acceptance after freeing space",
        Duration::from_secs(20),
        Duration::from_millis(250),
        |f| {
            let log = rig.gateway.log();
            // The last word of the disk-error episode is "succeed again".
            let last_health = log
                .lines()
                .rev()
                .find(|l| l.contains(WRITE_FAILED_LOG) || l.contains(WRITES_OK_LOG));
            f.acked_count() > acked_while_full + 100
                && last_health.is_some_and(|l| l.contains(WRITES_OK_LOG))
        },
    );
    assert_eq!(probe.publish(&mut fleet), sn::RC_ACCEPTED);
    assert_eq!(rig.gateway.pid(), pid, "the gateway restarted");
    let episodes = count_lines(&rig.gateway.log(), WRITE_FAILED_LOG);

    // The broker comes back: everything accepted during the whole test arrives.
    broker.restart().unwrap();
    fleet.run(Duration::from_secs(2));
    let mut ledger = Ledger::default();
    let duplicates = ledger.verify(&mut sub, &fleet.tally, Duration::from_secs(90));

    // A restart on the same tmpfs after the episode: the spool opens clean, and nothing
    // forwarded before is forwarded again. The spool is FIFO, so a message resent from it
    // would arrive before the new ones the check waits for.
    let status = rig.gateway.stop().unwrap();
    assert!(status.success(), "gateway exit status {status}");
    rig.gateway.restart().unwrap();
    let opened = last_spool_opened(&rig.gateway.log());
    assert!(
        opened.contains("corrupt=0") && opened.contains("truncated_bytes=0"),
        "spool damaged after the ENOSPC episode: {opened}"
    );
    fleet.run(Duration::from_secs(2));
    let resent = ledger.verify(&mut sub, &fleet.tally, Duration::from_secs(60));
    assert_eq!(
        resent, 0,
        "messages forwarded before the restart were forwarded again"
    );
    eprintln!(
        "ENOSPC after {took:?} ({accepted_into_room} accepted into {ROOM} bytes); recovered \
         {recovered:?} after freeing space; failure episodes {episodes}; acknowledged {}; \
         congestion answers {}; duplicates {duplicates}; after restart: {opened}",
        fleet.acked_count(),
        fleet.tally.congestion,
    );
}
