//! The systemd unit `systemd/sensorgate.service`, checked with systemd's own tools (no systemd
//! needs to run):
//!
//! - `systemd-analyze security --offline=yes` rates its exposure at most 2.0 ("OK"); the score
//!   is parsed from the last line and asserted, so a weakened directive fails the test.
//! - `systemd-analyze verify` prints nothing: no unknown or misspelt directive, no value
//!   systemd 252 refuses (a `DeviceAllow=` class it does not know, say). verify also checks
//!   that `ExecStart=`'s program exists, so it runs on a copy of the unit whose `ExecStart=`
//!   names the binary under test; `--man=no`, because the man pages of `Documentation=` are
//!   installed only by the package (tests/tests/deb_package.rs verifies the installed unit with
//!   them).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use sensorgate_tests::{run_bounded, sensorgate_bin, temp_dir, workspace_dir};

/// The highest exposure the unit may have (`systemd-analyze security`'s "OK" band ends at 3.9;
/// issue 18 asks for 2.0).
const MAX_EXPOSURE: f64 = 2.0;

/// The installed path of the binary, as the unit names it.
const INSTALLED_BIN: &str = "/usr/bin/sensorgate";

fn unit_path() -> PathBuf {
    workspace_dir().join("systemd/sensorgate.service")
}

/// The score in `→ Overall exposure level for sensorgate.service: 1.5 OK 🙂`.
fn exposure(output: &str) -> Option<f64> {
    let line = output
        .lines()
        .find(|l| l.contains("Overall exposure level for"))?;
    let (_, rest) = line.split_once(".service: ")?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn exposure_is_parsed_from_the_summary_line() {
    let out = "✗ UMask= ...  0.1\n\n→ Overall exposure level for sensorgate.service: 1.5 OK 🙂\n";
    assert_eq!(exposure(out), Some(1.5));
    assert_eq!(exposure("nothing here"), None);
}

#[test]
fn the_unit_has_an_exposure_of_at_most_2() {
    let out = run_bounded(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(unit_path()),
        Duration::from_secs(60),
    )
    .expect("systemd-analyze (package systemd) must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let score = exposure(&stdout)
        .unwrap_or_else(|| panic!("no exposure score in:\n{stdout}\nstderr:\n{stderr}"));
    println!("exposure {score}");
    assert!(
        score <= MAX_EXPOSURE,
        "exposure {score} > {MAX_EXPOSURE}:\n{stdout}"
    );
}

#[test]
fn the_unit_verifies_without_a_warning() {
    let unit = std::fs::read_to_string(unit_path()).unwrap();
    assert!(
        unit.contains(&format!("ExecStart={INSTALLED_BIN} run ")),
        "the unit starts {INSTALLED_BIN}"
    );
    let bin = sensorgate_bin();
    assert!(
        bin.is_file(),
        "{} is missing: cargo build --bin sensorgate",
        bin.display()
    );
    let copy = unit.replace(
        &format!("ExecStart={INSTALLED_BIN} "),
        &format!("ExecStart={} ", bin.display()),
    );
    // The same file name: verify checks the unit under the name it is given.
    let dir = temp_dir().unwrap();
    let path = dir.path().join("sensorgate.service");
    std::fs::write(&path, copy).unwrap();
    let out = run_bounded(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path),
        Duration::from_secs(60),
    )
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim().is_empty() && stderr.trim().is_empty(),
        "systemd-analyze verify ({}):\n{stdout}{stderr}",
        out.status
    );
}

#[test]
fn a_misspelt_directive_is_reported_by_verify() {
    // The check above can fail: verify reports an unknown key on stderr and still exits 0.
    let dir = temp_dir().unwrap();
    let path = dir.path().join("sensorgate.service");
    std::fs::write(
        &path,
        "[Service]\nExecStart=/bin/true\nProtectSytem=strict\n",
    )
    .unwrap();
    let out = run_bounded(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path),
        Duration::from_secs(60),
    )
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Unknown key 'ProtectSytem'"), "{stderr}");
}
