//! The command line: `--version`, `--help`, `check-config` on good and bad files and on the
//! shipped configs, `run` refusing a bad config before binding, start-up failures with their
//! exit status by class (said once), output into a closed pipe, and SIGTERM shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use sensorgate_tests::{
    Gateway, GatewayConfig, SnClient, free_tcp_port, python, run_bounded, sensorgate_bin, temp_dir,
    workspace_dir,
};

const EX_CONFIG: i32 = 78;
const EX_NOPERM: i32 = 77;
const EX_CANTCREAT: i32 = 73;
const EX_UNAVAILABLE: i32 = 69;
const EX_DATAERR: i32 = 65;

fn sensorgate(args: &[&str]) -> Output {
    run_bounded(
        Command::new(sensorgate_bin()).args(args),
        Duration::from_secs(20),
    )
    .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn check_config(path: &Path) -> Output {
    sensorgate(&["check-config", "-c", path.to_str().unwrap()])
}

#[test]
fn version_prints_the_version() {
    let out = sensorgate(&["--version"]);
    assert!(out.status.success(), "{}", text(&out));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("sensorgate"), "{s}");
    assert!(s.contains(env!("CARGO_PKG_VERSION")), "{s}");
}

#[test]
fn help_lists_the_subcommands() {
    let out = sensorgate(&["--help"]);
    assert!(out.status.success(), "{}", text(&out));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("run"), "{s}");
    assert!(s.contains("check-config"), "{s}");
}

#[test]
fn check_config_accepts_a_valid_config() {
    let dir = temp_dir().unwrap();
    let cfg = GatewayConfig::new(free_tcp_port().unwrap()).unwrap();
    let path = dir.path().join("ok.toml");
    std::fs::write(&path, cfg.render(&dir.path().join("state"))).unwrap();
    let out = check_config(&path);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("config OK"),
        "{}",
        text(&out)
    );
}

/// 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).expect(needle) + 1
}

#[test]
fn check_config_reports_every_error_with_file_line_and_column() {
    let dir = temp_dir().unwrap();
    let mut cfg = GatewayConfig::new(free_tcp_port().unwrap()).unwrap();
    cfg.gateway_id = 7;
    let good = cfg.render(&dir.path().join("state"));
    let bad = good
        .replace("id = 7\n", "id = 300\n")
        .replace(
            "max_clients = 100000\n",
            "max_clients = 100000\nmax_client = 5\n",
        )
        .replace("backoff_max = \"1s\"", "backoff_max = \"abc\"");
    assert_ne!(good, bad);
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, &bad).unwrap();
    let out = check_config(&path);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(EX_CONFIG), "{all}");

    let file = path.to_str().unwrap();
    let errors: Vec<&str> = all.lines().filter(|l| l.contains(": error: ")).collect();
    for (needle, what) in [
        ("max_client = 5", "max_client"),
        ("id = 300", "300"),
        ("backoff_max", "abc"),
    ] {
        let line = line_of(&bad, needle);
        let prefix = format!("{file}:{line}:");
        let hit = errors
            .iter()
            .find(|e| e.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no error at {prefix} for {what}; output:\n{all}"));
        // file:line:col: error: …, col a positive number.
        let col = hit[prefix.len()..].split(':').next().unwrap();
        assert!(
            col.parse::<usize>().is_ok_and(|c| c >= 1),
            "column in {hit:?}"
        );
    }
    assert!(all.contains("did you mean `max_clients`?"), "{all}");
    // The hint follows its error, indented.
    let hint = all
        .lines()
        .find(|l| l.contains("did you mean `max_clients`?"))
        .unwrap();
    assert!(hint.starts_with("    hint: "), "{hint:?}");
    // Nothing is reported without a location.
    for e in &errors {
        assert!(e.starts_with(file), "error without file:line:col: {e:?}");
    }
}

#[test]
fn check_config_reports_four_mistakes_of_different_kinds_at_once() {
    let dir = temp_dir().unwrap();
    let cfg = GatewayConfig::new(free_tcp_port().unwrap()).unwrap();
    let good = cfg.render(&dir.path().join("state"));
    // A string for an integer, an integer for a duration, an unknown key, a value out of range.
    let bad = good
        .replace(
            "max_clients = 100000\n",
            "max_clients = \"5\"\nretry_interval = 10\n",
        )
        .replace(
            "max_topics_per_client = 64\n",
            "max_topics_per_clint = 64\n",
        )
        .replace("max_client_id_len = 23\n", "max_client_id_len = 0\n");
    let path = dir.path().join("four.toml");
    std::fs::write(&path, &bad).unwrap();
    let out = check_config(&path);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(EX_CONFIG), "{all}");
    let errors: Vec<&str> = all.lines().filter(|l| l.contains(": error: ")).collect();
    assert_eq!(errors.len(), 4, "{all}");
    let file = path.to_str().unwrap();
    for (needle, value_at, message) in [
        (
            "max_clients = ",
            true,
            "expected an integer, found the string \"5\"",
        ),
        (
            "retry_interval = ",
            true,
            "expected a duration such as \"10s\", found the integer 10",
        ),
        (
            "max_topics_per_clint",
            false,
            "unknown key `max_topics_per_clint`",
        ),
        ("max_client_id_len = ", true, "0 is out of range"),
    ] {
        let line = line_of(&bad, needle);
        let column = if value_at { needle.len() + 1 } else { 1 };
        let prefix = format!("{file}:{line}:{column}: error: ");
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with(&prefix) && e.contains(message)),
            "no `{prefix}...{message}` in:\n{all}"
        );
    }
    assert!(!all.contains("i64"), "{all}");
}

/// Routes to a second upstream, a backlog cap on the first.
const ROUTED: &str = "max_backlog = \"2GiB\"\nmax_backlog_age = \"7d\"\n\n\
    [[upstream]]\nname = \"cloud\"\nkind = \"amqp\"\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n\n\
    [[route]]\nfilter = \"#\"\nupstreams = [\"local\"]\n\n\
    [[route]]\nfilter = \"sensors/#\"\nupstreams = [\"local\", \"cloud\"]\n\
    template = \"plants/{gateway_id}/{topic}\"\nqos_max = 1\n";

#[test]
fn check_config_accepts_routes_and_backlog_caps() {
    let dir = temp_dir().unwrap();
    let mut cfg = GatewayConfig::new(free_tcp_port().unwrap()).unwrap();
    cfg.extra_sections = ROUTED.to_owned();
    let path = dir.path().join("routes.toml");
    std::fs::write(&path, cfg.render(&dir.path().join("state"))).unwrap();
    let out = check_config(&path);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("route 0: `#` to local\n"), "{all}");
    assert!(
        all.contains("route 1: `sensors/#` to local, cloud, as `plants/{gateway_id}/{topic}`"),
        "{all}"
    );
    assert!(
        all.contains("upstream local: backlog at most 2GiB and 7days"),
        "{all}"
    );
}

#[test]
fn check_config_rejects_bad_routes_with_file_line_and_column() {
    let dir = temp_dir().unwrap();
    let mut cfg = GatewayConfig::new(free_tcp_port().unwrap()).unwrap();
    cfg.extra_sections = ROUTED
        .replace("[\"local\"]", "[\"clod\"]")
        .replace("\"sensors/#\"", "\"sensors/#/t\"")
        .replace("{gateway_id}", "{gw}");
    let bad = cfg.render(&dir.path().join("state"));
    let path = dir.path().join("bad-routes.toml");
    std::fs::write(&path, &bad).unwrap();
    let out = check_config(&path);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(EX_CONFIG), "{all}");
    let errors: Vec<&str> = all.lines().filter(|l| l.contains(": error: ")).collect();
    assert_eq!(errors.len(), 3, "{all}");
    let file = path.to_str().unwrap();
    for (needle, value, message) in [
        (
            "upstreams = [\"clod\"]",
            "\"clod\"",
            "`route[0].upstreams[0]`: no upstream is named `clod`",
        ),
        (
            "filter = \"sensors/#/t\"",
            "\"sensors/#/t\"",
            "`route[1].filter`: `sensors/#/t` is not a valid topic filter",
        ),
        (
            "template = ",
            "\"plants/",
            "`route[1].template`: unknown placeholder `{gw}`",
        ),
    ] {
        let line = line_of(&bad, needle);
        let column = bad.lines().nth(line - 1).unwrap().find(value).unwrap() + 1;
        let prefix = format!("{file}:{line}:{column}: error: {message}");
        assert!(
            errors.iter().any(|e| e.starts_with(&prefix)),
            "no `{prefix}` in:\n{all}"
        );
    }
    assert!(all.contains("hint: did you mean `cloud`?"), "{all}");
    assert!(
        all.contains("hint: the placeholders are {topic}, {client_id}, {protocol}, {gateway_id}"),
        "{all}"
    );
}

#[test]
fn check_config_on_a_missing_file_fails() {
    let dir = temp_dir().unwrap();
    let path = dir.path().join("nope.toml");
    let out = check_config(&path);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("nope.toml"), "{}", text(&out));
}

#[test]
fn shipped_configs_pass_check_config() {
    for name in ["sensorgate.toml", "local.toml"] {
        let path = workspace_dir().join("config").join(name);
        assert!(path.is_file(), "{} is missing", path.display());
        let out = check_config(&path);
        // The packaged config keeps its state in /var/lib/sensorgate, which only the service's
        // user (or root) may create: for anyone else check-config says so, and that is all it
        // may say.
        let host_refuses = name == "sensorgate.toml"
            && matches!(out.status.code(), Some(EX_NOPERM | EX_CANTCREAT))
            && String::from_utf8_lossy(&out.stderr).contains("state_dir: /var/lib");
        if host_refuses {
            continue;
        }
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}:\n{}",
            path.display(),
            text(&out)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("config OK"));
    }
}

#[test]
fn run_with_an_invalid_config_exits_78_before_binding() {
    // We hold the UDP port: a gateway that bound before validating would fail with "address
    // in use" (not 78), and one that validates first never notices.
    let held = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = held.local_addr().unwrap().port();
    let dir = temp_dir().unwrap();
    let mut cfg = GatewayConfig::new(free_tcp_port().unwrap()).unwrap();
    cfg.listen = vec![SocketAddr::from((Ipv4Addr::LOCALHOST, port))];
    let text_ok = cfg.render(&dir.path().join("state"));
    let bad = text_ok.replace(
        "max_clients = 100000\n",
        "max_clients = 100000\nmax_client = 5\n",
    );
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, bad).unwrap();
    let out = sensorgate(&["run", "-c", path.to_str().unwrap()]);
    let all = text(&out);
    assert_eq!(out.status.code(), Some(EX_CONFIG), "{all}");
    assert!(all.contains("max_client"), "{all}");
    assert!(
        !all.to_lowercase().contains("in use"),
        "it tried to bind: {all}"
    );
    drop(held);
    // And the port is free afterwards.
    UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
}

#[test]
fn sigterm_stops_the_gateway_cleanly_and_frees_the_port() {
    let cfg = GatewayConfig::new(free_tcp_port().unwrap()).unwrap();
    let mut gw = Gateway::start(&cfg).unwrap();
    let mut c = SnClient::new(gw.sn_addr()).unwrap();
    c.connect_ok("before-term").unwrap();
    let status = gw.stop().unwrap();
    assert!(
        status.success(),
        "exit status after SIGTERM: {status}\n{}",
        gw.log()
    );
    UdpSocket::bind(cfg.sn_addr()).unwrap();
}

#[test]
fn kill_9_then_restart_on_the_same_config_serves_again() {
    let mut rig = sensorgate_tests::Rig::start().unwrap();
    let mut sub = rig.subscribe(&["restart/#"]).unwrap();
    let mut c = rig.connected("survivor").unwrap();
    let id = c.register("restart/t").unwrap();
    c.publish_qos1_ok(sensorgate_tests::sn::TopicType::Normal, id, b"before")
        .unwrap();
    assert_eq!(sub.expect().unwrap().payload, b"before");

    let status = rig.gateway.kill9().unwrap();
    assert!(!status.success());
    // Same config, same state dir, same UDP port.
    rig.gateway.restart().unwrap();

    // The old session is gone (no persistent sessions): the sensor learns it and reconnects.
    c.send(&sensorgate_tests::sn::pingreq()).unwrap();
    assert_eq!(
        c.next_packet().unwrap(),
        sensorgate_tests::sn::Packet::Disconnect
    );
    c.connect_ok("survivor").unwrap();
    let id = c.register("restart/t").unwrap();
    c.publish_qos1_ok(sensorgate_tests::sn::TopicType::Normal, id, b"after")
        .unwrap();
    // "before" may come again: its broker acknowledgement may not have reached the spool's
    // cursor file before the kill (at least once).
    let mut m = sub.expect().unwrap();
    while m.payload == b"before" {
        m = sub.expect().unwrap();
    }
    assert_eq!(m.payload, b"after");
    // And a clean stop still works after a crash restart.
    assert!(rig.gateway.stop().unwrap().success());
}

/// A config on a free port with `state_dir`, written to `dir/name`.
fn write_config(dir: &Path, name: &str, state_dir: &Path, extra: &str) -> std::path::PathBuf {
    let cfg = GatewayConfig::new(free_tcp_port().unwrap()).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, cfg.render(state_dir) + extra).unwrap();
    path
}

/// Asserts the exit status, that stderr holds one `sensorgate:` line containing every needle,
/// and that no part of the message repeats (`X: X`).
fn assert_fails_once(out: &Output, code: i32, needles: &[&str]) {
    let all = text(out);
    assert_eq!(out.status.code(), Some(code), "{all}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("sensorgate: "))
        .collect();
    assert_eq!(lines.len(), 1, "one fatal line expected:\n{all}");
    let line = lines[0];
    for needle in needles {
        assert!(line.contains(needle), "{needle:?} missing in {line:?}");
    }
    // No clause is said twice (the old `X (os error 98): X (os error 98)`).
    let parts: Vec<&str> = line.split(": ").collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(!parts[i + 1..].contains(p), "{p:?} is repeated in {line:?}");
    }
    assert!(!all.contains("panicked"), "{all}");
}

#[test]
fn run_on_an_address_in_use_exits_69_naming_the_address_once() {
    let held = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = held.local_addr().unwrap();
    let dir = temp_dir().unwrap();
    let mut cfg = GatewayConfig::new(free_tcp_port().unwrap()).unwrap();
    cfg.listen = vec![addr];
    let path = dir.path().join("inuse.toml");
    std::fs::write(&path, cfg.render(&dir.path().join("state"))).unwrap();
    let out = sensorgate(&["run", "-c", path.to_str().unwrap()]);
    assert_fails_once(
        &out,
        EX_UNAVAILABLE,
        &[&addr.to_string(), "in use", "[mqttsn] listen"],
    );
    assert_eq!(text(&out).matches("Address already in use").count(), 1);
    drop(held);
}

#[test]
fn run_on_a_state_dir_locked_by_another_instance_exits_69() {
    let cfg = GatewayConfig::new(free_tcp_port().unwrap()).unwrap();
    let gw = Gateway::start(&cfg).unwrap();
    let state = gw.dir().join("state");
    // Same state_dir, another port: the lock, not the port, stops it.
    let dir = temp_dir().unwrap();
    let path = write_config(dir.path(), "second.toml", &state, "");
    let out = sensorgate(&["run", "-c", path.to_str().unwrap()]);
    assert_fails_once(
        &out,
        EX_UNAVAILABLE,
        &[
            &state.join("spool").display().to_string(),
            "another sensorgate",
        ],
    );
    drop(gw);
}

#[test]
fn a_state_dir_that_is_a_file_fails_check_config_and_run_with_73() {
    let dir = temp_dir().unwrap();
    let state = dir.path().join("state");
    std::fs::write(&state, b"not a directory").unwrap();
    let path = write_config(dir.path(), "file.toml", &state, "");
    let out = check_config(&path);
    assert!(!text(&out).contains("config OK"), "{}", text(&out));
    assert_fails_once(
        &out,
        EX_CANTCREAT,
        &[&state.display().to_string(), "not a directory"],
    );
    let out = sensorgate(&["run", "-c", path.to_str().unwrap()]);
    assert_fails_once(
        &out,
        EX_CANTCREAT,
        &[&state.display().to_string(), "not a directory"],
    );
}

#[test]
fn a_spool_segment_of_another_format_version_exits_65_and_is_left_as_it_was() {
    let dir = temp_dir().unwrap();
    let state = dir.path().join("state");
    let spool = state.join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    // A version 1 segment header (magic, version 1, 4 reserved bytes) and one byte of a record.
    let segment = spool.join(format!("{:020}.seg", 1));
    let mut bytes = b"SGSPOOL\0\x01\0\0\0\0\0\0\0".to_vec();
    bytes.push(0x2a);
    std::fs::write(&segment, &bytes).unwrap();
    let path = write_config(dir.path(), "v1.toml", &state, "");
    let out = sensorgate(&["run", "-c", path.to_str().unwrap()]);
    assert_fails_once(
        &out,
        EX_DATAERR,
        &[&segment.display().to_string(), "format version 1"],
    );
    assert_eq!(std::fs::read(&segment).unwrap(), bytes, "left as it was");
}

/// Runs sensorgate without the capabilities that let root ignore file modes (when root), so
/// a mode-0555 directory is as unwritable as it is for any other user.
fn sensorgate_without_dac_override(args: &[&str]) -> Output {
    let is_root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    let mut cmd = if is_root {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--bounding-set", "-dac_override,-dac_read_search", "--"])
            .arg(sensorgate_bin());
        cmd
    } else {
        Command::new(sensorgate_bin())
    };
    run_bounded(cmd.args(args), Duration::from_secs(20)).unwrap()
}

#[test]
fn a_state_dir_the_user_cannot_write_fails_check_config_and_run_with_77() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir().unwrap();
    let parent = dir.path().join("locked");
    std::fs::create_dir(&parent).unwrap();
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o555)).unwrap();
    // The state dir does not exist yet: its parent is where it would be created.
    let state = parent.join("state");
    let path = write_config(dir.path(), "perm.toml", &state, "");
    let p = path.to_str().unwrap();
    for cmd in ["check-config", "run"] {
        let out = sensorgate_without_dac_override(&[cmd, "-c", p]);
        assert_fails_once(
            &out,
            EX_NOPERM,
            &[&parent.display().to_string(), "not writable"],
        );
    }
    assert!(
        !state.exists(),
        "check-config or run created {}",
        state.display()
    );
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
#[ignore = "needs root: mounts a read-only tmpfs"]
fn a_state_dir_on_a_read_only_file_system_fails_with_73() {
    let dir = temp_dir().unwrap();
    let mnt = dir.path().join("ro");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount -o ro tmpfs failed (not root?)");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&mnt);
    let state = mnt.join("state");
    let path = write_config(dir.path(), "ro.toml", &state, "");
    let p = path.to_str().unwrap();
    for cmd in ["check-config", "run"] {
        let out = sensorgate(&[cmd, "-c", p]);
        assert_fails_once(
            &out,
            EX_CANTCREAT,
            &[&mnt.display().to_string(), "read-only file system"],
        );
    }
}

#[test]
fn min_free_bytes_larger_than_the_file_system_fails_with_78() {
    let dir = temp_dir().unwrap();
    // 64TiB is the largest value the config takes, larger than any test machine's disk.
    let path = write_config(
        dir.path(),
        "minfree.toml",
        &dir.path().join("state"),
        "\n[spool]\nmin_free_bytes = \"64TiB\"\n",
    );
    let p = path.to_str().unwrap();
    for cmd in ["check-config", "run"] {
        let out = sensorgate(&[cmd, "-c", p]);
        assert_fails_once(&out, EX_CONFIG, &["min_free_bytes", "refuse every message"]);
    }
}

/// The file system holding `dir`, from `stat -f`: (blocks, free blocks, blocks available to
/// unprivileged users, fragment size).
fn statfs(dir: &Path) -> (u64, u64, u64, u64) {
    let out = Command::new("stat")
        .args(["-f", "-c", "%b %f %a %S"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "stat -f: {out:?}");
    let v: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    (v[0], v[1], v[2], v[3])
}

#[test]
fn min_free_bytes_within_the_blocks_reserved_for_root_fails_with_78() {
    let dir = temp_dir().unwrap();
    let (blocks, free, available, fragment) = statfs(dir.path());
    let reserved = free - available;
    assert!(
        reserved >= 2,
        "this test needs a temp dir on a file system with blocks reserved for root (ext4's \
         default 5%); {} has none",
        dir.path().display()
    );
    // Less than the whole file system, more than the spool can ever see available.
    let min_free = (blocks - reserved / 2) * fragment;
    let path = write_config(
        dir.path(),
        "reserve.toml",
        &dir.path().join("state"),
        &format!("\n[spool]\nmin_free_bytes = \"{min_free}B\"\n"),
    );
    let out = check_config(&path);
    assert_fails_once(&out, EX_CONFIG, &["min_free_bytes", "refuse every message"]);
}

/// Runs sensorgate with stdout or stderr on a pipe whose reader is already gone (every write
/// gets EPIPE), through Python, which can close a pipe's read end before the child starts.
fn sensorgate_into_closed_pipe(fd: &str, args: &[&str]) -> Output {
    let script = "import os, subprocess, sys\n\
        r, w = os.pipe()\n\
        os.close(r)\n\
        target = {'stdout': w} if sys.argv[1] == 'stdout' else {'stderr': w}\n\
        p = subprocess.run(sys.argv[2:], **target)\n\
        sys.exit(p.returncode if p.returncode >= 0 else 128 - p.returncode)\n";
    run_bounded(
        Command::new(python())
            .args(["-c", script, fd])
            .arg(sensorgate_bin())
            .args(args),
        Duration::from_secs(20),
    )
    .unwrap()
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let dir = temp_dir().unwrap();
    let good = write_config(dir.path(), "ok.toml", &dir.path().join("state"), "");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[gateway]\nid = 300\n").unwrap();
    for (fd, args, code) in [
        (
            "stdout",
            vec!["check-config", "-c", good.to_str().unwrap()],
            0,
        ),
        (
            "stderr",
            vec!["check-config", "-c", bad.to_str().unwrap()],
            EX_CONFIG,
        ),
        ("stdout", vec!["--help"], 0),
        ("stdout", vec!["--version"], 0),
    ] {
        let out = sensorgate_into_closed_pipe(fd, &args);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(code), "{fd} {args:?}: {all}");
        assert!(!all.contains("panicked"), "{fd} {args:?}: {all}");
        assert!(!all.contains("Broken pipe"), "{fd} {args:?}: {all}");
    }
}
