//! The field console in a real browser: headless Chromium (via chromedriver, driven by
//! `tests/py/console.py` with selenium) loads `/` from a running gateway whose admin listener
//! wants a token, with a sensor connected and publishing and a fleet of 60 clients (more than
//! one page of the clients table), and checks what the page shows against `/status`. Screenshots land in `target/test-artifacts/` (git-ignored).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use sensorgate_tests::{
    PREDEFINED_ID, READY_TIMEOUT, Rig, mqtt_sn_pub, poll_until, py_script, python, run_bounded, sn,
    workspace_dir,
};

const TOKEN: &str = "console-test-token";
const SENSOR: &str = "sensor-17";
/// Clients besides the sensor: the console's table pages by 50.
const FLEET: usize = 59;
/// The whole browser session, every wait inside it bounded by its own --timeout.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(180);

#[test]
fn the_console_shows_the_gateway_with_a_sensor_publishing() -> Result<()> {
    for bin in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        ensure!(
            Path::new(bin).is_file(),
            "{bin} not found: apt-get install chromium chromium-driver (scripts/test installs them)"
        );
    }
    let rig = Rig::start_with(|c| {
        c.with_admin()?;
        c.admin_token = Some(TOKEN.into());
        Ok(())
    })?;
    let admin = rig.gateway.admin_addr().context("admin address")?;

    // A sensor that stays connected (keep-alive 60 s, longer than the browser needs) and
    // publishes, plus an independent client's publish.
    let mut sensor = rig.connected(SENSOR)?;
    for i in 0..5 {
        sensor.publish_qos1_ok(
            sn::TopicType::Predefined,
            PREDEFINED_ID,
            format!("reading {i}").as_bytes(),
        )?;
    }
    // More clients than one page of the table, ordered after the sensor.
    let mut fleet = Vec::with_capacity(FLEET);
    for i in 0..FLEET {
        fleet.push(rig.connected(&format!("zz-node-{i:02}"))?);
    }
    let out = mqtt_sn_pub(
        rig.gateway.sn_addr(),
        &[
            "-q",
            "1",
            "-T",
            &PREDEFINED_ID.to_string(),
            "-m",
            "cli",
            "-i",
            "sensor-cli",
        ],
    )?;
    ensure!(out.status.success(), "mqtt_sn_pub failed: {out:?}");

    // Everything forwarded and the upstream up before the browser looks, so the page and
    // /status can agree on still values.
    poll_until(
        "/status to show the messages forwarded",
        READY_TIMEOUT,
        Duration::from_millis(100),
        || {
            let (code, body) = rig.gateway.admin_get("/status")?;
            ensure!(code == 200, "/status: HTTP {code}: {body}");
            let doc: serde_json::Value = serde_json::from_str(&body)?;
            let up = &doc["upstreams"][0];
            Ok((up["connected"] == true
                && up["forwarded"].as_u64().is_some_and(|n| n >= 6)
                && up["backlog"]["records"] == 0)
                .then_some(()))
        },
    )?;

    let artifacts = workspace_dir().join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts)
        .with_context(|| format!("create {}", artifacts.display()))?;
    let mut cmd = Command::new(python());
    cmd.arg(py_script("console.py"))
        .arg("--url")
        .arg(format!("http://{admin}"))
        .args([
            "--token",
            TOKEN,
            "--upstream",
            "local",
            "--client-id",
            SENSOR,
        ])
        .args([
            "--min-sessions",
            &(FLEET + 1).to_string(),
            "--timeout",
            "30",
        ])
        .args(["--total-clients", &(FLEET + 1).to_string()])
        .arg("--artifacts")
        .arg(&artifacts);
    let out = run_bounded(&mut cmd, BROWSER_TIMEOUT)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "console.py failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    ensure!(stdout.lines().any(|l| l == "ok"), "stdout:\n{stdout}");
    for name in ["console.png", "console-phone.png"] {
        let path = artifacts.join(name);
        let png = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        ensure!(
            png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000,
            "{} is not a screenshot",
            path.display()
        );
        println!("screenshot: {}", path.display());
    }

    // The sensor is still there: the page was looked at while it was connected.
    sensor.ping()?;
    drop(fleet);
    Ok(())
}
