//! The Debian package, installed with dpkg on this machine (root; no systemd runs here, so the
//! daemon is started by hand as the `sensorgate` user, as its unit would):
//!
//! 1. lintian: no error, no warning or info tag that packaging/lintian-overrides does not
//!    override (an override only the release build needs may go unused here).
//! 2. `dpkg -i`: the user and group `sensorgate` (in `dialout`), `/var/lib/sensorgate` owned
//!    by it (0750), the config readable by its group only, the man pages, the unit enabled
//!    (its `multi-user.target.wants` link) and clean under `systemd-analyze verify` with its
//!    man pages; `sensorgate check-config` accepts the packaged config, as root and as the user.
//! 3. A local edit of the conffile (the test's own config: loopback ports, a test mosquitto,
//!    state_dir /var/lib/sensorgate), then the installed binary as the `sensorgate` user with a
//!    `NOTIFY_SOCKET` and `WATCHDOG_USEC` (tests/src/notify.rs): READY=1 with STATUS=, then
//!    WATCHDOG=1 pings; a QoS 1 publish reaches the broker. The broker stops; QoS 1 publishes are acknowledged
//!    (spooled); SIGTERM.
//! 4. `dpkg -i` of the upgrade package (same conffile, bumped version): no prompt (stdin is
//!    closed), the edited conffile kept as it is; the new version started on it (READY=1,
//!    pings) drains the spooled backlog to the broker once the broker is back.
//! 5. `dpkg -r`: the binary is gone, the config and /var/lib/sensorgate (with the spool) kept.
//!    `dpkg --purge`: both gone, the enable link too. The user and group stay (Debian's usual
//!    practice for system users: files they owned may remain).
//!
//! The packages come from `SENSORGATE_DEB` and `SENSORGATE_DEB_UPGRADE` (scripts/test builds
//! them). The test refuses to run when a sensorgate package is installed already (it would
//! purge it), and purges its own even when it fails (a drop guard).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sensorgate_tests::notify::NotifySocket;
use sensorgate_tests::{
    DELIVERY_TIMEOUT, GatewayConfig, Mosquitto, READY_TIMEOUT, SnClient, Subscriber, poll_until,
    require_root, run_bounded, send_signal, sn,
};

const CONFIG: &str = "/etc/sensorgate/sensorgate.toml";
const STATE_DIR: &str = "/var/lib/sensorgate";
const BIN: &str = "/usr/bin/sensorgate";
const ENABLE_LINK: &str = "/etc/systemd/system/multi-user.target.wants/sensorgate.service";
/// Messages spooled while the broker is down, drained by the upgraded version.
const BACKLOG: usize = 20;
/// The watchdog interval given to the daemon (systemd's WATCHDOG_USEC).
const WATCHDOG_USEC: &str = "2000000";
/// How long a notification may take (the watchdog pings every second).
const NOTICE_TIMEOUT: Duration = Duration::from_secs(15);
/// dpkg, lintian and the daemon's own shutdown.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// A package path from the environment.
fn deb_from_env(var: &str) -> PathBuf {
    let Some(path) = std::env::var_os(var) else {
        panic!(
            "{var} is not set: this test installs the packages scripts/test builds. Build them \
             with\n  cargo deb -p sensorgate\n  cargo deb -p sensorgate --no-build \
             --deb-version 0.1.0-2 -o target/debian/upgrade/\nand set SENSORGATE_DEB and \
             SENSORGATE_DEB_UPGRADE to the two .deb files."
        )
    };
    let path = PathBuf::from(path);
    assert!(path.is_file(), "{var}={} is not a file", path.display());
    path
}

/// Runs `cmd` (bounded) and returns its stdout; fails with its output unless it succeeds.
fn run(cmd: &mut Command) -> Result<String> {
    let out = run_bounded(
        cmd.env("DEBIAN_FRONTEND", "noninteractive"),
        COMMAND_TIMEOUT,
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

fn installed_version() -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Status} ${Version}", "sensorgate"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, version) = text.split_once(' ')?;
    (out.status.success() && status != "not-installed").then(|| version.to_owned())
}

/// Purges the package when the test ends, passed or failed.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", "sensorgate"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status();
    }
}

/// The installed daemon, run as the `sensorgate` user; killed on drop.
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// `sensorgate run` on the packaged config path, as the unit starts it: user and group
    /// sensorgate with its supplementary groups (dialout), no capabilities.
    fn start(log: &Path, sn_addr: std::net::SocketAddr, notify: &NotifySocket) -> Result<Daemon> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        // As systemd would run it: NOTIFY_SOCKET (the harness's socket is open to every user)
        // and WATCHDOG_USEC (2 s: pings every second). setpriv execs the daemon, so its PID
        // is the child's; WATCHDOG_PID is left unset as systemd allows.
        let child = Command::new("setpriv")
            .args([
                "--reuid=sensorgate",
                "--regid=sensorgate",
                "--init-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--no-new-privs",
                "--",
                BIN,
                "run",
                "--config",
                CONFIG,
            ])
            .env_remove("RUST_LOG")
            .env("NOTIFY_SOCKET", notify.path())
            .env("WATCHDOG_USEC", WATCHDOG_USEC)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("spawn setpriv (util-linux)")?;
        let mut daemon = Daemon {
            child: Some(child),
            log: log.to_owned(),
        };
        daemon.wait_ready(sn_addr)?;
        Ok(daemon)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self, sn_addr: std::net::SocketAddr) -> Result<()> {
        let probe = SnClient::new(sn_addr)?;
        let connect = sn::connect(sn::FLAG_CLEAN, 60, b"deb-probe");
        poll_until(
            "the installed gateway to answer CONNECT",
            READY_TIMEOUT,
            Duration::ZERO,
            || {
                if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                    bail!("sensorgate exited early ({status}):\n{}", self.log());
                }
                probe.send(&connect)?;
                match probe.recv(Duration::from_millis(200))? {
                    Some(sn::Packet::Connack { rc: 0 }) => Ok(Some(())),
                    Some(p) => bail!("readiness probe got {p:?}"),
                    None => Ok(None),
                }
            },
        )?;
        probe.send(&sn::disconnect())?;
        Ok(())
    }

    /// SIGTERM; the exit status must be success within the unit's stop timeout.
    fn stop(&mut self) -> Result<()> {
        let mut child = self.child.take().context("not running")?;
        send_signal(child.id(), "TERM")?;
        let status = poll_until(
            "sensorgate to exit after SIGTERM",
            Duration::from_secs(45),
            Duration::from_millis(20),
            || Ok(child.try_wait()?),
        )?;
        if !status.success() {
            bail!("sensorgate exited with {status}:\n{}", self.log());
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("----- installed sensorgate output -----\n{}", self.log());
        }
    }
}

/// Overrides that only the release (fat LTO) package uses: the CI package (profile `debci`)
/// reports them as `unused-override`, which is expected.
const RELEASE_ONLY_OVERRIDES: &[&str] = &["binary-has-unneeded-section .comment"];

/// Tags lintian printed that are errors, or warnings and infos left un-overridden.
fn lintian_findings(deb: &Path) -> Result<Vec<String>> {
    // Exit status 1 with findings of any level; the output is what is judged.
    let out = run_bounded(
        Command::new("lintian")
            .args(["--info", "--display-info"])
            .arg(deb),
        COMMAND_TIMEOUT,
    )
    .context("lintian (apt install lintian)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let findings: Vec<String> = stdout
        .lines()
        .filter(|l| l.starts_with("E: ") || l.starts_with("W: ") || l.starts_with("I: "))
        .filter(|l| {
            !(l.contains(" unused-override ")
                && RELEASE_ONLY_OVERRIDES.iter().any(|o| l.contains(o)))
        })
        .map(str::to_owned)
        .collect();
    if findings.is_empty() && !out.status.success() {
        bail!(
            "lintian failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(findings)
}

/// READY=1 (with a STATUS=), then WATCHDOG=1 pings: what systemd needs from a Type=notify
/// unit with WatchdogSec=.
fn expect_ready_and_pings(notify: &mut NotifySocket) {
    let ready = notify
        .expect("READY=1", READY_TIMEOUT, |n| n.has("READY", "1"))
        .unwrap();
    assert!(
        ready.get("STATUS").is_some(),
        "READY=1 without STATUS=: {}",
        ready.text
    );
    for _ in 0..2 {
        notify
            .expect("WATCHDOG=1", NOTICE_TIMEOUT, |n| n.has("WATCHDOG", "1"))
            .unwrap();
    }
}

fn uid_of(user: &str) -> u32 {
    run(Command::new("id").args(["-u", user]))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
#[ignore = "needs root: installs the .deb with dpkg"]
fn install_upgrade_remove_and_purge() {
    require_root("installs the .deb with dpkg, runs the daemon as the sensorgate user");
    let deb = deb_from_env("SENSORGATE_DEB");
    let upgrade = deb_from_env("SENSORGATE_DEB_UPGRADE");
    if let Some(version) = installed_version() {
        panic!(
            "sensorgate {version} is installed on this machine; this test installs and purges \
             the package: remove it first (dpkg --purge sensorgate)"
        );
    }

    // 1. lintian.
    let findings = lintian_findings(&deb).unwrap();
    assert!(
        findings.is_empty(),
        "lintian findings that packaging/lintian-overrides does not justify:\n{}",
        findings.join("\n")
    );

    // 2. Install.
    let _purge = Purge;
    run(Command::new("dpkg").arg("-i").arg(&deb)).unwrap();
    let version = installed_version().expect("installed");
    run(Command::new(BIN).args(["check-config", "--config", CONFIG])).unwrap();
    run(Command::new("setpriv").args([
        "--reuid=sensorgate",
        "--regid=sensorgate",
        "--init-groups",
        "--",
        BIN,
        "check-config",
    ]))
    .unwrap();
    let groups = run(Command::new("id").args(["-nG", "sensorgate"])).unwrap();
    assert!(
        groups.split_whitespace().any(|g| g == "sensorgate")
            && groups.split_whitespace().any(|g| g == "dialout"),
        "groups of sensorgate: {groups}"
    );
    let passwd = run(Command::new("getent").args(["passwd", "sensorgate"])).unwrap();
    assert!(
        passwd
            .trim_end()
            .ends_with(":/var/lib/sensorgate:/usr/sbin/nologin"),
        "{passwd}"
    );
    let uid = uid_of("sensorgate");
    let state = std::fs::metadata(STATE_DIR).unwrap();
    assert_eq!(state.uid(), uid, "{STATE_DIR} owner");
    assert_eq!(
        state.permissions().mode() & 0o7777,
        0o750,
        "{STATE_DIR} mode"
    );
    let config = std::fs::metadata(CONFIG).unwrap();
    assert_eq!(config.uid(), 0, "{CONFIG} owner");
    assert_eq!(config.permissions().mode() & 0o7777, 0o640, "{CONFIG} mode");
    for page in [
        "/usr/share/man/man8/sensorgate.8.gz",
        "/usr/share/man/man5/sensorgate.toml.5.gz",
    ] {
        assert!(Path::new(page).is_file(), "{page} missing");
    }
    assert!(
        std::fs::symlink_metadata(ENABLE_LINK).is_ok(),
        "the unit is not enabled ({ENABLE_LINK})"
    );
    let verify = run_bounded(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg("/usr/lib/systemd/system/sensorgate.service"),
        COMMAND_TIMEOUT,
    )
    .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        verify.status.success() && said.trim().is_empty(),
        "verify of the installed unit: {said}"
    );

    // 3. The conffile edited (the test's config), the daemon as the sensorgate user.
    let mut broker = Mosquitto::start().unwrap();
    let cfg = GatewayConfig::new(broker.port()).unwrap();
    let edited = cfg.render(Path::new(STATE_DIR));
    std::fs::write(CONFIG, &edited).unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::start().unwrap();
    let mut daemon = Daemon::start(&logs.path().join("run-1.log"), cfg.sn_addr(), &notify).unwrap();
    expect_ready_and_pings(&mut notify);
    let mut sub = Subscriber::start(broker.port(), &["deb/#"]).unwrap();
    let mut client = SnClient::new(cfg.sn_addr()).unwrap();
    client.connect_ok("deb-sensor").unwrap();
    let topic = client.register("deb/t").unwrap();
    client
        .publish_qos1_ok(sn::TopicType::Normal, topic, b"installed")
        .unwrap();
    let got = sub.expect().unwrap();
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("deb/t", &b"installed"[..])
    );
    drop(sub);
    broker.stop().unwrap();
    for i in 0..BACKLOG {
        // Acknowledged once durable in the spool; the broker is down.
        client
            .publish_qos1_ok(sn::TopicType::Normal, topic, format!("b{i}").as_bytes())
            .unwrap();
    }
    client.disconnect().unwrap();
    daemon.stop().unwrap();
    notify
        .expect("STOPPING=1", NOTICE_TIMEOUT, |n| n.has("STOPPING", "1"))
        .unwrap();
    let spool = Path::new(STATE_DIR).join("spool");
    assert!(spool.is_dir(), "{} missing", spool.display());

    // 4. Upgrade: no prompt (stdin is closed), the edited conffile kept.
    run(Command::new("dpkg").arg("-i").arg(&upgrade)).unwrap();
    let upgraded = installed_version().expect("installed");
    assert_ne!(
        upgraded, version,
        "the upgrade package has the same version"
    );
    assert_eq!(
        std::fs::read_to_string(CONFIG).unwrap(),
        edited,
        "the edited conffile was not kept"
    );
    broker.restart().unwrap();
    let mut sub = Subscriber::start(broker.port(), &["deb/#"]).unwrap();
    let mut notify = NotifySocket::start().unwrap();
    let mut daemon = Daemon::start(&logs.path().join("run-2.log"), cfg.sn_addr(), &notify).unwrap();
    expect_ready_and_pings(&mut notify);
    let drained = sub.collect(BACKLOG, DELIVERY_TIMEOUT).unwrap();
    let mut payloads: Vec<String> = drained
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    payloads.sort();
    payloads.dedup();
    let mut want: Vec<String> = (0..BACKLOG).map(|i| format!("b{i}")).collect();
    want.sort();
    assert_eq!(payloads, want, "the backlog spooled before the upgrade");
    daemon.stop().unwrap();

    // 5. Remove keeps config and state; purge removes both.
    run(Command::new("dpkg").args(["-r", "sensorgate"])).unwrap();
    assert!(!Path::new(BIN).exists(), "{BIN} still there after remove");
    assert!(Path::new(CONFIG).is_file(), "remove deleted the config");
    assert!(spool.is_dir(), "remove deleted the state");
    run(Command::new("dpkg").args(["--purge", "sensorgate"])).unwrap();
    assert!(
        !Path::new("/etc/sensorgate").exists(),
        "purge left /etc/sensorgate"
    );
    assert!(!Path::new(STATE_DIR).exists(), "purge left {STATE_DIR}");
    assert!(
        std::fs::symlink_metadata(ENABLE_LINK).is_err(),
        "purge left {ENABLE_LINK}"
    );
    // Kept on purge, as Debian packages keep their system users.
    run(Command::new("getent").args(["passwd", "sensorgate"])).unwrap();
    assert_eq!(installed_version(), None);
}
