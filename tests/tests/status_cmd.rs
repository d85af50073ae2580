//! `sensorgate status` against a running gateway: healthy with its broker up, degraded once
//! the broker is gone, `--json` for scripts, and unreachable (exit 3) when nothing answers,
//! the admin listener is off, or the token is wrong. Exit codes: 0 healthy, 1 degraded,
//! 2 unhealthy, 3 unreachable.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use sensorgate_tests::{
    GatewayConfig, READY_TIMEOUT, Rig, free_tcp_port, poll_until, sensorgate_status, temp_dir,
};

/// How long the gateway may take to notice its broker went away.
const LINK_DOWN_TIMEOUT: Duration = Duration::from_secs(60);

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `sensorgate status` until it exits with `code` (bounded).
fn status_until(config: &Path, args: &[&str], code: i32, timeout: Duration) -> Result<Output> {
    let mut last = String::new();
    poll_until(
        &format!("`sensorgate status {args:?}` to exit {code}"),
        timeout,
        Duration::from_millis(200),
        || {
            let out = sensorgate_status(config, args)?;
            if out.status.code() == Some(code) {
                return Ok(Some(out));
            }
            last = show(&out);
            Ok(None)
        },
    )
    .with_context(|| format!("last run: {last}"))
}

#[test]
fn status_says_healthy_then_degraded_when_the_broker_stops() -> Result<()> {
    let mut rig = Rig::start_with(|c| {
        c.with_admin()?;
        Ok(())
    })?;
    let config = rig.gateway.config_path();

    let out = status_until(&config, &[], 0, READY_TIMEOUT)?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    ensure!(text.contains("HEALTHY"), "{}", show(&out));
    ensure!(
        text.contains("local (mqtt"),
        "the upstream is named: {}",
        show(&out)
    );
    ensure!(text.contains("UP since"), "{}", show(&out));
    ensure!(text.contains("backlog 0 records"), "{}", show(&out));
    // stdout is a pipe here, not a terminal: no colour.
    ensure!(!text.contains('\x1b'), "colour on a pipe: {}", show(&out));

    let out = sensorgate_status(&config, &["--json"])?;
    ensure!(out.status.code() == Some(0), "{}", show(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| show(&out))?;
    ensure!(doc["health"]["state"] == "healthy", "{doc}");
    ensure!(doc["upstreams"][0]["name"] == "local", "{doc}");
    ensure!(doc["upstreams"][0]["connected"] == true, "{doc}");

    rig.broker.stop()?;
    let out = status_until(&config, &[], 1, LINK_DOWN_TIMEOUT)?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    ensure!(text.contains("DEGRADED"), "{}", show(&out));
    ensure!(text.contains("DOWN since"), "{}", show(&out));
    let out = sensorgate_status(&config, &["--json"])?;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| show(&out))?;
    ensure!(
        out.status.code() == Some(1) && doc["health"]["state"] == "degraded",
        "{}",
        show(&out)
    );
    ensure!(doc["upstreams"][0]["connected"] == false, "{doc}");
    ensure!(
        doc["health"]["reasons"]
            .as_array()
            .is_some_and(|r| !r.is_empty()),
        "a degraded verdict gives its reason: {doc}"
    );
    Ok(())
}

/// A config whose admin listener would be at a port where nothing listens.
fn config_without_gateway(
    edit: impl FnOnce(&mut GatewayConfig),
) -> Result<(tempfile::TempDir, std::path::PathBuf)> {
    let dir = temp_dir()?;
    let mut cfg = GatewayConfig::new(free_tcp_port()?)?;
    edit(&mut cfg);
    let path = dir.path().join("sensorgate.toml");
    std::fs::write(&path, cfg.render(&dir.path().join("state")))?;
    Ok((dir, path))
}

#[test]
fn status_is_unreachable_when_nothing_listens() -> Result<()> {
    let (_dir, config) = config_without_gateway(|c| c.admin = free_tcp_port().ok())?;
    let out = sensorgate_status(&config, &[])?;
    ensure!(out.status.code() == Some(3), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("UNREACHABLE"), "{}", show(&out));
    ensure!(out.stdout.is_empty(), "{}", show(&out));
    let out = sensorgate_status(&config, &["--json"])?;
    ensure!(out.status.code() == Some(3), "{}", show(&out));
    Ok(())
}

#[test]
fn status_is_unreachable_when_the_admin_listener_is_off() -> Result<()> {
    let (_dir, config) = config_without_gateway(|c| c.admin = None)?;
    let out = sensorgate_status(&config, &[])?;
    ensure!(out.status.code() == Some(3), "{}", show(&out));
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("off"),
        "{}",
        show(&out)
    );
    Ok(())
}

#[test]
fn status_sends_the_token_and_a_wrong_one_is_unreachable() -> Result<()> {
    let rig = Rig::start_with(|c| {
        c.with_admin()?;
        c.admin_token = Some("s3cret-token-0123456789".into());
        Ok(())
    })?;
    let (code, _) = rig.gateway.admin_get("/status")?;
    ensure!(code == 200, "with the token: HTTP {code}");
    let addr = rig.gateway.admin_addr().context("admin address")?;
    let (code, _) = sensorgate_tests::admin_get(addr, "/status", None)?;
    ensure!(code == 401, "without the token: HTTP {code}");

    status_until(&rig.gateway.config_path(), &[], 0, READY_TIMEOUT)?;

    let dir = temp_dir()?;
    let wrong = dir.path().join("wrong.toml");
    let mut cfg = rig.config.clone();
    cfg.admin_token = Some("not-the-token-0123456789".into());
    std::fs::write(&wrong, cfg.render(&dir.path().join("state")))?;
    let out = sensorgate_status(&wrong, &[])?;
    ensure!(out.status.code() == Some(3), "{}", show(&out));
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("admin token missing or wrong"),
        "{}",
        show(&out)
    );
    Ok(())
}
