//! HTTPS with a test CA made by openssl in the test (P-256 CA, server certificate for
//! `IP:127.0.0.1, IP:::1`, client certificates `CN=dev1`/`dev2`/`ghost` from it and `CN=dev1`
//! from a second CA): curl and httpx over TLS with ALPN `h2` and `http/1.1`; the client
//! certificate matrix with `client_cert = "optional"` (a certificate names the device, none
//! falls back to the token, a certificate and a token of different devices are refused, an
//! unconfigured name is 403, a certificate of another CA fails the handshake) and
//! `"required"` (no certificate: handshake failure).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use sensorgate_tests::http::{
    HttpRig, HttpSetup, Pki, PyRequest, TOKEN1, TOKEN2, bearer, curl, curl_output, expect_status,
    make_ca, py_send, two_devices,
};
use sensorgate_tests::{Subscriber, free_tcp_port, temp_dir};
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(60);

fn p(path: &std::path::Path) -> &str {
    path.to_str().unwrap()
}

/// A gateway with a plain and a TLS listener, client certificates `mode`.
fn tls_rig(mode: &str) -> (HttpRig, Pki, TempDir) {
    let dir = temp_dir().unwrap();
    let pki = make_ca(dir.path()).unwrap();
    let mut http = HttpSetup::new()
        .unwrap()
        .devices(two_devices())
        .lines(&format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\nclient_ca = \"{}\"\nclient_cert = \"{mode}\"\n",
            p(&pki.server_cert),
            p(&pki.server_key),
            p(&pki.ca)
        ));
    http.tls_listen = vec![SocketAddr::from((
        Ipv4Addr::LOCALHOST,
        free_tcp_port().unwrap(),
    ))];
    let rig = HttpRig::start(&http).unwrap();
    (rig, pki, dir)
}

fn https(rig: &HttpRig, path: &str) -> String {
    format!("https://{}{path}", rig.tls_addr.unwrap())
}

#[test]
fn https_with_optional_client_certificates_follows_the_credential_matrix() {
    let (rig, pki, _dir) = tls_rig("optional");
    let mut sub = Subscriber::start(rig.rig.broker.port(), &["sensors/#"]).unwrap();
    let url = https(&rig, "/v1/publish/sensors/dev1/tls");
    let ca = p(&pki.ca);
    let a1 = bearer(TOKEN1);
    let post = |extra: &[&str]| {
        // Refusals over HTTP/1.1: over h2 an answer sent before the request body was read is
        // followed by RST_STREAM(NO_ERROR) (RFC 9113 section 8.1), which curl 7.88 now and
        // then reports as a framing error (exit 92) instead of the response.
        let mut args = vec!["--cacert", ca, "-X", "POST", "--data-binary", "x"];
        if !extra.contains(&"--http2") {
            args.push("--http1.1");
        }
        args.extend_from_slice(extra);
        args.push(&url);
        curl(&args).unwrap()
    };
    // A token over TLS, ALPN h2 and http/1.1.
    let r = post(&["-H", &a1, "--http2"]);
    assert_eq!(
        (r.status, r.version.as_str()),
        (200, "2"),
        "{}",
        r.describe()
    );
    let r = post(&["-H", &a1, "--http1.1"]);
    assert_eq!(
        (r.status, r.version.as_str()),
        (200, "1.1"),
        "{}",
        r.describe()
    );
    // dev1's certificate alone names the device.
    let cert1 = ["--cert", p(&pki.dev1_cert), "--key", p(&pki.dev1_key)];
    let r = post(&cert1);
    assert_eq!(r.status, 200, "{}", r.describe());
    // Its own token with it agrees.
    let mut with_token = cert1.to_vec();
    with_token.extend(["-H", a1.as_str()]);
    assert_eq!(post(&with_token).status, 200);
    for _ in 0..4 {
        let m = sub.expect().unwrap();
        assert_eq!(m.topic, "sensors/dev1/tls");
    }
    // No certificate, no token.
    let r = post(&[]);
    expect_status(&r, 401, Some("unauthorized")).unwrap();
    // dev2's token on dev1's certificate.
    let a2 = bearer(TOKEN2);
    let mut disagree = cert1.to_vec();
    disagree.extend(["-H", a2.as_str()]);
    let r = post(&disagree);
    expect_status(&r, 401, Some("credentials_disagree")).unwrap();
    // A valid certificate for a device nobody configured.
    let r = post(&["--cert", p(&pki.ghost_cert), "--key", p(&pki.ghost_key)]);
    expect_status(&r, 403, Some("unknown_certificate")).unwrap();
    // dev2's certificate is dev2: dev1's topic is not its own.
    let r = post(&["--cert", p(&pki.dev2_cert), "--key", p(&pki.dev2_key)]);
    expect_status(&r, 403, Some("forbidden_topic")).unwrap();
    // CN=dev1 from another CA: the handshake fails, no HTTP status at all.
    let out = curl_output(&[
        "--cacert",
        ca,
        "--cert",
        p(&pki.other_dev1_cert),
        "--key",
        p(&pki.other_dev1_key),
        "-X",
        "POST",
        "--data-binary",
        "x",
        &url,
    ])
    .unwrap();
    assert!(
        !out.status.success(),
        "another CA's certificate was accepted: {out:?}"
    );
    assert!(
        matches!(out.status.code(), Some(35 | 55 | 56 | 16 | 92)),
        "not a handshake failure: {out:?}"
    );

    // httpx over TLS with dev1's certificate, HTTP/2 by ALPN.
    let base = format!("https://{}", rig.tls_addr.unwrap());
    let replies = py_send(
        &base,
        &[PyRequest::post("/v1/publish/sensors/dev1/py", "py")],
        &[
            "--http2",
            "--cacert",
            ca,
            "--cert",
            p(&pki.dev1_cert),
            "--key",
            p(&pki.dev1_key),
        ],
    )
    .unwrap();
    assert_eq!(replies[0].status, 200, "{}", replies[0].describe());
    assert_eq!(replies[0].version, "HTTP/2");
    let m = sub.next(WAIT).unwrap().unwrap();
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("sensors/dev1/py", &b"py"[..])
    );
}

#[test]
fn required_client_certificates_fail_the_handshake_without_one() {
    let (rig, pki, _dir) = tls_rig("required");
    let url = https(&rig, "/v1/publish/sensors/dev1/tls");
    let ca = p(&pki.ca);
    let out = curl_output(&[
        "--cacert",
        ca,
        "-H",
        &bearer(TOKEN1),
        "-X",
        "POST",
        "--data-binary",
        "x",
        &url,
    ])
    .unwrap();
    assert!(
        !out.status.success(),
        "served without a client certificate: {out:?}"
    );
    assert!(
        matches!(out.status.code(), Some(35 | 55 | 56 | 16 | 92)),
        "not a handshake failure: {out:?}"
    );
    let r = curl(&[
        "--cacert",
        ca,
        "--cert",
        p(&pki.dev1_cert),
        "--key",
        p(&pki.dev1_key),
        "-X",
        "POST",
        "--data-binary",
        "x",
        &url,
    ])
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.describe());
    // The plain listener is unaffected by the TLS listener's rule.
    let r = curl(&[
        "-H",
        &bearer(TOKEN1),
        "-X",
        "POST",
        "--data-binary",
        "x",
        &rig.url("/v1/publish/sensors/dev1/plain"),
    ])
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.describe());
}
