//! DTLS 1.2 with certificates through the real binary: a CA made here with openssl (EC P-256
//! keys), the gateway's server certificate and `client_certificates = "required"`.
//! `coap-client-openssl`, `coap-client-gnutls` and `openssl s_client` with a client certificate
//! of the CA get in (the device is the certificate's CN); an expired client certificate and one
//! signed by another CA are refused and counted; a PSK client still gets in beside them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sensorgate_tests::coap::libcoap_responses;
use sensorgate_tests::{Message, Rig, free_udp_port, poll_until, run_bounded};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn key(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &format!("{name}.key"),
        ],
    );
}

fn ca(dir: &Path, name: &str) {
    key(dir, name);
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-sha256",
            "-days",
            "30",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
            "-out",
            &format!("{name}.pem"),
        ],
    );
    std::fs::write(dir.join(format!("{name}.index")), "").unwrap();
    std::fs::write(dir.join(format!("{name}.serial")), "10\n").unwrap();
    std::fs::write(
        dir.join(format!("{name}.cnf")),
        format!(
            "[ca]\ndefault_ca = d\n[d]\ndatabase = {name}.index\nnew_certs_dir = .\n\
             serial = {name}.serial\ndefault_md = sha256\npolicy = p\nunique_subject = no\n\
             [p]\ncommonName = supplied\n\
             [client]\nbasicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\n\
             extendedKeyUsage = clientAuth\n\
             [server]\nbasicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\n\
             extendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1\n"
        ),
    )
    .unwrap();
}

/// A leaf `name` with CN `cn` from `ca`, valid `from`..`to` (openssl `YYYYMMDDHHMMSSZ`, or
/// `None`: 30 days from now), with the `[client]` or `[server]` extensions.
fn leaf(dir: &Path, name: &str, cn: &str, ca: &str, ext: &str, dates: Option<(&str, &str)>) {
    key(dir, name);
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-subj",
            &format!("/CN={cn}"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    let mut args = vec![
        "ca".to_owned(),
        "-batch".into(),
        "-notext".into(),
        "-config".into(),
        format!("{ca}.cnf"),
        "-cert".into(),
        format!("{ca}.pem"),
        "-keyfile".into(),
        format!("{ca}.key"),
        "-in".into(),
        format!("{name}.csr"),
        "-out".into(),
        format!("{name}.pem"),
        "-extensions".into(),
        ext.into(),
    ];
    match dates {
        Some((from, to)) => args.extend([
            "-startdate".into(),
            from.into(),
            "-enddate".into(),
            to.into(),
        ]),
        None => args.extend(["-days".into(), "30".into()]),
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    openssl(dir, &args);
}

const KEY_HEX: &str = "6b65792d6f662d64657632";

struct Setup {
    rig: Rig,
    dir: tempfile::TempDir,
    coaps: SocketAddr,
    sn_dtls: SocketAddr,
}

fn start() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ca(d, "ca");
    ca(d, "other");
    leaf(d, "server", "sensorgate-test", "ca", "server", None);
    leaf(d, "dev9", "dev9", "ca", "client", None);
    leaf(d, "stranger", "dev9", "other", "client", None);
    leaf(
        d,
        "expired",
        "dev9",
        "ca",
        "client",
        Some(("20200101000000Z", "20210101000000Z")),
    );
    let ip = std::net::IpAddr::V4(Ipv4Addr::LOCALHOST);
    let coaps = SocketAddr::new(ip, free_udp_port(ip).unwrap());
    let sn_dtls = SocketAddr::new(ip, free_udp_port(ip).unwrap());
    let p = d.to_path_buf();
    let rig = Rig::start_with(move |c| {
        c.with_admin()?;
        c.with_coap()?;
        c.coap(&format!("dtls_listen = [\"{coaps}\"]"));
        c.mqttsn(&format!("dtls_listen = [\"{sn_dtls}\"]"));
        c.extra_sections.push_str(&format!(
            "\n[dtls]\ncertificate = \"{0}/server.pem\"\nprivate_key = \"{0}/server.key\"\n\
             client_ca = \"{0}/ca.pem\"\nclient_certificates = \"required\"\n\
             [[psk]]\nidentity = \"dev2\"\nkey_hex = \"{KEY_HEX}\"\n",
            p.display()
        ));
        Ok(())
    })
    .unwrap();
    Setup {
        rig,
        dir,
        coaps,
        sn_dtls,
    }
}

fn events(rig: &Rig, protocol: &str) -> HashMap<String, u64> {
    let (code, text) = rig.gateway.admin_get("/metrics").unwrap();
    assert_eq!(code, 200);
    let prefix = format!("sensorgate_ingress_events_total{{protocol=\"{protocol}\",event=\"");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| {
            let (name, value) = l.split_once("\"} ")?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// `coap-client-openssl` PUT with the client certificate `name`; the response codes.
fn coap_put(s: &Setup, name: &str, topic: &str) -> Vec<String> {
    coap_put_with(s, "coap-client-openssl", name, topic)
}

/// As [`coap_put`] with libcoap's `client` build.
fn coap_put_with(s: &Setup, client: &str, name: &str, topic: &str) -> Vec<String> {
    let d = s.dir.path();
    let mut cmd = Command::new(format!("/usr/bin/{client}"));
    cmd.args(["-v", "7", "-m", "put", "-e", name, "-B", "5"])
        .arg("-c")
        .arg(d.join(format!("{name}.pem")))
        .arg("-j")
        .arg(d.join(format!("{name}.key")))
        .arg("-C")
        .arg(d.join("ca.pem"))
        .arg(format!("coaps://{}/ps/{topic}", s.coaps));
    let out = run_bounded(&mut cmd, Duration::from_secs(20)).unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let got = libcoap_responses(&text);
    eprintln!("{name}: {got:?}\n{text}");
    got
}

#[test]
fn coap_client_with_a_ca_certificate_gets_in_and_bad_ones_are_refused() {
    let s = start();
    let mut sub = s.rig.subscribe(&["certs/#"]).unwrap();
    let got = coap_put(&s, "dev9", "certs/dev9");
    assert!(got.iter().any(|c| c == "2.04"), "{got:?}");
    assert_eq!(
        sub.expect().unwrap(),
        Message {
            topic: "certs/dev9".into(),
            payload: b"dev9".to_vec(),
            qos: 1,
            retain: false
        }
    );
    let got = coap_put_with(&s, "coap-client-gnutls", "dev9", "certs/gnutls");
    assert!(got.iter().any(|c| c == "2.04"), "{got:?}");
    assert_eq!(sub.expect().unwrap().topic, "certs/gnutls");
    assert!(coap_put(&s, "stranger", "certs/stranger").is_empty());
    assert!(coap_put(&s, "expired", "certs/expired").is_empty());
    let e = poll_until(
        "both refusals counted",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let e = events(&s.rig, "coap");
            Ok((e["dtls_handshakes_failed_certificate_invalid"] == 2).then_some(e))
        },
    )
    .unwrap();
    assert_eq!(e["dtls_handshakes_ok"], 2, "{e:?}");
    // PSK beside certificates on the same listener.
    let mut cmd = Command::new("/usr/bin/coap-client-openssl");
    cmd.args([
        "-v",
        "7",
        "-u",
        "dev2",
        "-k",
        "key-of-dev2",
        "-m",
        "put",
        "-e",
        "psk",
        "-B",
        "5",
    ])
    .arg(format!("coaps://{}/ps/certs/psk", s.coaps));
    let out = run_bounded(&mut cmd, Duration::from_secs(20)).unwrap();
    let got = libcoap_responses(&String::from_utf8_lossy(&out.stdout));
    assert!(got.iter().any(|c| c == "2.04"), "{got:?}");
    assert_eq!(sub.expect().unwrap().topic, "certs/psk");
}

#[test]
fn openssl_s_client_with_a_client_certificate_carries_mqtt_sn() {
    let s = start();
    let d = s.dir.path();
    let mut child = Command::new("openssl")
        .args(["s_client", "-dtls1_2", "-quiet", "-nocommands", "-connect"])
        .arg(s.sn_dtls.to_string())
        .arg("-cert")
        .arg(d.join("dev9.pem"))
        .arg("-key")
        .arg(d.join("dev9.key"))
        .arg("-CAfile")
        .arg(d.join("ca.pem"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut connect = vec![0, 0x04, 0x04, 0x01, 0x00, 0x3c];
    connect.extend_from_slice(b"dev9");
    connect[0] = connect.len() as u8;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&connect).unwrap();
    stdin.flush().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut b = [0u8; 64];
        if let Ok(n) = stdout.read(&mut b) {
            let _ = tx.send(b[..n].to_vec());
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = rx.recv_timeout(deadline - Instant::now());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(got.unwrap(), vec![3, 0x05, 0x00], "CONNACK");
    let e = events(&s.rig, "mqtt-sn");
    assert_eq!(e["dtls_handshakes_ok"], 1, "{e:?}");
    let log = s.rig.gateway.log();
    // The device is the certificate's CN.
    let done = log
        .lines()
        .find(|l| l.contains("DTLS handshake done."))
        .unwrap_or_default();
    assert!(
        done.contains("identity=dev9") && done.contains("certificate"),
        "{log}"
    );
}
