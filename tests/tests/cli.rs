//! The command line: `--version`, `--help`, `check-config` on good and bad files and on the
//! shipped configs, `run` refusing a bad config before binding, and SIGTERM shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use sensorgate_tests::{
    Gateway, GatewayConfig, SnClient, free_tcp_port, run_bounded, sensorgate_bin, temp_dir,
    workspace_dir,
};

const EX_CONFIG: i32 = 78;

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
