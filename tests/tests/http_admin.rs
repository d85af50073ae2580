//! The HTTP ingress as the operator sees it: `/status` lists the `http` listeners and the
//! protocol's counters, `/metrics` has the `protocol="http"` samples and the ingress's own
//! events, `/clients` lists a device with its stream's filter, `sensorgate status` prints the
//! listener; `check-config` refuses anonymous access on a non-loopback listener at the key's
//! line (exit 78) and accepts it on loopback; `sensorgate hash-token` hashes a token read
//! from stdin (known answer), generates one with `--generate`, and refuses a short or
//! malformed token with exit 64.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::process::Command;
use std::time::Duration;

use sensorgate_tests::http::{
    CurlSse, HttpRig, HttpSetup, TOKEN1, bearer, curl, hash_token, hash_token_cli, metric,
    parse_hash_line, two_devices,
};
use sensorgate_tests::{
    GatewayConfig, free_tcp_port, poll_until, run_bounded, sensorgate_bin, sensorgate_status,
    temp_dir,
};
use serde_json::Value;

const EX_USAGE: i32 = 64;
const EX_CONFIG: i32 = 78;
const WAIT: Duration = Duration::from_secs(30);

/// SHA-256 of [`KNOWN_TOKEN`] (computed with `sha256sum`).
const KNOWN_TOKEN: &str = "sensorgate-known-answer-token";
const KNOWN_HASH: &str = "sha256:75c8ece6116bba332eecd1d46dd819da6db06eca617512115f3f9013409c2735";

#[test]
fn status_metrics_and_clients_show_the_http_ingress() {
    let http = HttpSetup::new().unwrap().devices(two_devices());
    let rig = HttpRig::start(&http).unwrap();
    let gw = &rig.rig.gateway;
    let port = rig.addr().port();
    for body in ["1", "2"] {
        let r = curl(&[
            "-X",
            "POST",
            "-H",
            &bearer(TOKEN1),
            "--data-binary",
            body,
            &rig.url("/v1/publish/sensors/dev1/t?qos=1"),
        ])
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.describe());
    }
    let r = curl(&[
        "-X",
        "POST",
        "--data-binary",
        "x",
        &rig.url("/v1/publish/sensors/dev1/t"),
    ])
    .unwrap();
    assert_eq!(r.status, 401, "{}", r.describe());
    let mut stream = CurlSse::start(
        &rig.url("/v1/subscribe?filter=cmd/dev1/%23"),
        &["-H", &bearer(TOKEN1)],
    )
    .unwrap();
    stream.ready().unwrap();

    // /status: the listener and the protocol's counters.
    let (code, body) = gw.admin_get("/status").unwrap();
    assert_eq!(code, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    let listeners: Vec<&Value> = doc["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["protocol"] == "http")
        .collect();
    assert_eq!(listeners.len(), 1, "{body}");
    assert_eq!(listeners[0]["transport"], "tcp", "{body}");
    assert_eq!(
        listeners[0]["address"],
        format!("127.0.0.1:{port}"),
        "{body}"
    );
    poll_until(
        "http messages_in >= 2 in /status",
        WAIT,
        Duration::from_millis(100),
        || {
            let (_, body) = gw.admin_get("/status")?;
            let doc: Value = serde_json::from_str(&body)?;
            let p = doc["protocols"]
                .as_array()
                .and_then(|ps| ps.iter().find(|p| p["protocol"] == "http"))
                .cloned();
            Ok(p.filter(|p| p["messages_in"].as_u64() >= Some(2)))
        },
    )
    .unwrap();

    // /metrics: the shared per-protocol names and the ingress's own events.
    let (code, text) = gw.admin_get("/metrics").unwrap();
    assert_eq!(code, 200, "{text}");
    let qos1 = metric(
        &text,
        "sensorgate_messages_in_total",
        &[("protocol", "http"), ("qos", "1")],
    );
    assert!(qos1 >= Some(2.0), "no http QoS 1 sample:\n{text}");
    assert!(
        metric(&text, "sensorgate_acks_total", &[("protocol", "http")]) >= Some(2.0),
        "{text}"
    );
    assert!(
        metric(&text, "sensorgate_refusals_total", &[("protocol", "http")]) >= Some(1.0),
        "the 401 is a refusal:\n{text}"
    );
    for event in ["verdicts_orphaned", "connections_opened", "rate_limited"] {
        assert!(
            metric(
                &text,
                "sensorgate_ingress_events_total",
                &[("protocol", "http"), ("event", event)]
            )
            .is_some(),
            "no ingress event {event}:\n{text}"
        );
    }

    // /clients: dev1, with its stream's filter.
    let (code, body) = gw.admin_get("/clients?prefix=dev").unwrap();
    assert_eq!(code, 200, "{body}");
    let page: Value = serde_json::from_str(&body).unwrap();
    let dev1 = page["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client_id"] == "dev1")
        .cloned()
        .unwrap_or_else(|| panic!("dev1 not in /clients: {body}"));
    assert_eq!(dev1["protocol"], "http", "{body}");
    assert!(dev1.to_string().contains("cmd/dev1/#"), "{body}");

    // `sensorgate status` prints the listener.
    let out = sensorgate_status(&gw.config_path(), &[]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("http tcp 127.0.0.1:{port}")),
        "{text}"
    );
}

fn check_config(text: &str) -> (std::process::Output, String) {
    let dir = temp_dir().unwrap();
    let path = dir.path().join("http.toml");
    std::fs::write(&path, text).unwrap();
    let mut cmd = Command::new(sensorgate_bin());
    cmd.args(["check-config", "-c", path.to_str().unwrap()])
        .env_remove("RUST_LOG");
    let out = run_bounded(&mut cmd, Duration::from_secs(20)).unwrap();
    (out, path.to_str().unwrap().to_owned())
}

#[test]
fn check_config_refuses_anonymous_access_on_a_non_loopback_listener_at_its_line() {
    let dir = temp_dir().unwrap();
    let cfg = GatewayConfig::new(free_tcp_port().unwrap()).unwrap();
    let base = cfg.render(&dir.path().join("state"));
    let port = free_tcp_port().unwrap();
    let bad = format!("{base}\n[http]\nlisten = [\"0.0.0.0:{port}\"]\nallow_anonymous = true\n");
    let (out, file) = check_config(&bad);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(EX_CONFIG), "{all}");
    let line = bad
        .lines()
        .position(|l| l.starts_with("allow_anonymous"))
        .unwrap()
        + 1;
    let error = all
        .lines()
        .find(|l| l.starts_with(&format!("{file}:{line}:")) && l.contains(": error: "))
        .unwrap_or_else(|| panic!("no error at {file}:{line}:\n{all}"));
    assert!(
        error.contains("0.0.0.0"),
        "the offending address is named: {error}"
    );

    // The same on loopback is fine.
    let good = format!(
        "{base}\n[http]\nlisten = [\"127.0.0.1:{port}\", \"[::1]:{port}\"]\nallow_anonymous = true\n"
    );
    let (out, _) = check_config(&good);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hash_token_hashes_stdin_generates_tokens_and_refuses_short_ones() {
    // Known answer, with and without the newline `echo` adds.
    assert_eq!(hash_token(KNOWN_TOKEN).unwrap(), KNOWN_HASH);
    let out = hash_token_cli(&[], format!("{KNOWN_TOKEN}\n").as_bytes()).unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        parse_hash_line(&String::from_utf8_lossy(&out.stdout)).as_deref(),
        Some(KNOWN_HASH)
    );

    // --generate: the token, then its hash line; two runs differ.
    let mut tokens = Vec::new();
    for _ in 0..2 {
        let out = hash_token_cli(&["--generate"], b"").unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.lines();
        let token = lines.next().unwrap().trim().to_owned();
        assert!(token.starts_with("sgt_") && token.len() >= 40, "{text}");
        assert!(
            token[4..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "base64url: {text}"
        );
        let hash = parse_hash_line(lines.next().unwrap_or_default())
            .unwrap_or_else(|| panic!("no token_hash line: {text}"));
        assert_eq!(hash, hash_token(&token).unwrap(), "{text}");
        tokens.push(token);
    }
    assert_ne!(tokens[0], tokens[1]);

    // Refused: shorter than 16 characters, characters a bearer token cannot carry, nothing.
    for bad in [
        "short-token",
        "has spaces in the token",
        "quote\"in-the-token-xx",
        "",
    ] {
        let out = hash_token_cli(&[], bad.as_bytes()).unwrap();
        assert_eq!(out.status.code(), Some(EX_USAGE), "{bad:?}: {out:?}");
        assert!(
            parse_hash_line(&String::from_utf8_lossy(&out.stdout)).is_none(),
            "{bad:?} was hashed: {out:?}"
        );
    }
}
