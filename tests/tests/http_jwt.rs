//! JWT bearer tokens on the HTTP ingress (`[http.jwt]`): keys made by openssl in the test
//! (RSA-2048 and P-256), tokens signed with `openssl dgst` (RS256 as is, ES256 converted from
//! DER to `r || s`), published with curl; the message arrives at mosquitto. Every refusal is a
//! 401 with its `token_error` and `WWW-Authenticate: Bearer error="invalid_token"`; a topic
//! outside the token's scope is 403; the counters are in /metrics. SIGHUP with a rotated key
//! file: the old token is refused, the new one accepted, same process.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use sensorgate_tests::http::{HttpRig, HttpSetup, Reply, b64_encode, curl, metric};
use sensorgate_tests::{Subscriber, poll_until, send_signal, temp_dir};

const WAIT: Duration = Duration::from_secs(60);

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A private key of `kind` ("rsa" or "ec") and its public key (PEM), in `dir`.
fn keypair(dir: &Path, name: &str, kind: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub.pem"));
    match kind {
        "rsa" => openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            p(&key),
        ]),
        _ => openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            p(&key),
        ]),
    };
    openssl(&["pkey", "-in", p(&key), "-pubout", "-out", p(&public)]);
    (key, public)
}

fn b64url(bytes: &[u8]) -> String {
    b64_encode(bytes)
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_")
}

fn hex(text: &str) -> Vec<u8> {
    let text = text.trim();
    let text = if text.len() % 2 == 1 {
        format!("0{text}")
    } else {
        text.to_owned()
    };
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

/// The JWK of an RSA public key (n from `openssl rsa -modulus`; e is 65537).
fn rsa_jwk(public: &Path, kid: &str) -> Value {
    let out = String::from_utf8(openssl(&[
        "rsa",
        "-pubin",
        "-in",
        p(public),
        "-modulus",
        "-noout",
    ]))
    .unwrap();
    let n = hex(out.trim().strip_prefix("Modulus=").unwrap());
    json!({"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig", "n": b64url(&n), "e": "AQAB"})
}

/// An ECDSA DER signature (SEQUENCE { INTEGER r, INTEGER s }) as JWS `r || s` (32 bytes each).
fn ecdsa_fixed(der: &[u8]) -> Vec<u8> {
    let mut at = 2; // SEQUENCE, short length (at most 72 bytes)
    let mut out = Vec::new();
    for _ in 0..2 {
        assert_eq!(der[at], 0x02, "INTEGER");
        let len = usize::from(der[at + 1]);
        let int = &der[at + 2..at + 2 + len];
        let int: Vec<u8> = int.iter().copied().skip_while(|b| *b == 0).collect();
        out.extend(std::iter::repeat_n(0, 32 - int.len()));
        out.extend(int);
        at += 2 + len;
    }
    out
}

/// A compact JWS of `header` and `claims` signed with the private key `key` (RS256 or ES256
/// from the header's alg; "none": no signature).
fn token(dir: &Path, key: &Path, header: &Value, claims: &Value) -> String {
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let alg = header["alg"].as_str().unwrap();
    if alg == "none" {
        return format!("{input}.");
    }
    let file = dir.join("input");
    std::fs::write(&file, &input).unwrap();
    let sig = openssl(&["dgst", "-sha256", "-sign", p(key), p(&file)]);
    let sig = if alg == "ES256" {
        ecdsa_fixed(&sig)
    } else {
        sig
    };
    format!("{input}.{}", b64url(&sig))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(changes: Value) -> Value {
    let mut c = json!({
        "sub": "dev1", "aud": "sensorgate", "iss": "test-issuer",
        "exp": now() + 600, "nbf": now() - 5,
        "sg_pub": ["sensors/dev1"], "sg_sub": ["cmd/dev1"],
    });
    for (k, v) in changes.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn publish(rig: &HttpRig, topic: &str, token: &str, body: &str) -> Reply {
    let auth = format!("Authorization: Bearer {token}");
    let url = rig.url(&format!("/v1/publish/{topic}"));
    curl(&["-X", "POST", "--data-binary", body, "-H", &auth, &url]).unwrap()
}

fn assert_refused(reply: &Reply, reason: &str) {
    assert_eq!(reply.status, 401, "{}", reply.describe());
    let body = reply.json().unwrap();
    assert_eq!(body["error"], "unauthorized", "{}", reply.describe());
    assert_eq!(body["token_error"], reason, "{}", reply.describe());
    let www = reply.header("www-authenticate").unwrap_or_default();
    assert!(
        www.starts_with("Bearer ") && www.contains(r#"error="invalid_token""#),
        "{www}"
    );
    assert!(
        www.contains(&format!(r#"error_description="{reason}""#)),
        "{www}"
    );
}

fn jwt_lines(keys: &str) -> String {
    format!(
        "[http.jwt]\n{keys}\naudience = \"sensorgate\"\nissuer = \"test-issuer\"\nleeway = \"5s\"\n"
    )
}

#[test]
fn jwks_tokens_publish_within_their_scope_and_each_refusal_says_why() {
    let dir = temp_dir().unwrap();
    let d = dir.path();
    let (k1, k1_pub) = keypair(d, "k1", "rsa");
    let (k2, _) = keypair(d, "k2", "rsa");
    let jwks = d.join("jwks.json");
    std::fs::write(&jwks, json!({"keys": [rsa_jwk(&k1_pub, "k1")]}).to_string()).unwrap();
    let http = HttpSetup::new()
        .unwrap()
        .lines(&jwt_lines(&format!("jwks = \"{}\"", p(&jwks))));
    let rig = HttpRig::start(&http).unwrap();
    let mut sub = Subscriber::start(rig.rig.broker.port(), &["sensors/#"]).unwrap();

    let rs = |kid: &str| json!({"alg": "RS256", "typ": "JWT", "kid": kid});
    let good = token(d, &k1, &rs("k1"), &claims(json!({})));
    let r = publish(&rig, "sensors/dev1/temp", &good, "21.5");
    assert_eq!(r.status, 200, "{}", r.describe());
    let m = sub.expect().unwrap();
    assert_eq!(
        (m.topic.as_str(), m.payload.as_slice()),
        ("sensors/dev1/temp", &b"21.5"[..])
    );

    // Outside the token's publish scope: 403.
    let r = publish(&rig, "sensors/dev2/temp", &good, "1");
    assert_eq!(r.status, 403, "{}", r.describe());
    assert_eq!(r.error_code().as_deref(), Some("forbidden_topic"));
    // And outside its subscribe scope.
    let auth = format!("Authorization: Bearer {good}");
    let r = curl(&["-H", &auth, &rig.url("/v1/subscribe?filter=cmd/dev2/%23")]).unwrap();
    assert_eq!(r.status, 403, "{}", r.describe());
    assert_eq!(r.error_code().as_deref(), Some("forbidden_filter"));

    let cases = [
        (
            token(d, &k1, &rs("k1"), &claims(json!({"exp": now() - 60}))),
            "expired",
        ),
        (
            token(d, &k1, &rs("k1"), &claims(json!({"nbf": now() + 600}))),
            "not_yet_valid",
        ),
        (
            token(
                d,
                &k1,
                &rs("k1"),
                &claims(json!({"aud": "another-gateway"})),
            ),
            "wrong_audience",
        ),
        (
            token(d, &k1, &rs("k1"), &claims(json!({"iss": "someone-else"}))),
            "wrong_issuer",
        ),
        (
            token(d, &k2, &rs("k1"), &claims(json!({}))),
            "bad_signature",
        ),
        (token(d, &k1, &rs("k9"), &claims(json!({}))), "unknown_kid"),
        (
            token(d, &k1, &json!({"alg": "none"}), &claims(json!({}))),
            "algorithm_not_allowed",
        ),
    ];
    for (t, reason) in &cases {
        assert_refused(&publish(&rig, "sensors/dev1/temp", t, "x"), reason);
    }
    // Nothing refused reached the broker.
    assert!(sub.next(Duration::from_millis(300)).unwrap().is_none());

    let (code, text) = rig.rig.gateway.admin_get("/metrics").unwrap();
    assert_eq!(code, 200);
    let event = |name: &str| {
        metric(
            &text,
            "sensorgate_ingress_events_total",
            &[("protocol", "http"), ("event", name)],
        )
    };
    assert_eq!(event("jwt_accepted"), Some(3.0), "the 200 and the two 403s");
    for (_, reason) in &cases {
        assert_eq!(
            event(&format!("jwt_refused_{reason}")),
            Some(1.0),
            "{reason}"
        );
    }
    // No token in the log.
    let log = rig.rig.gateway.log();
    assert!(!log.contains(&good[..40]), "a token is in the log");
}

#[test]
fn sighup_with_a_rotated_key_refuses_the_old_token_and_accepts_the_new_one() {
    let dir = temp_dir().unwrap();
    let d = dir.path();
    let (old_key, old_pub) = keypair(d, "old", "ec");
    let (new_key, new_pub) = keypair(d, "new", "ec");
    let pem = d.join("jwt.pem");
    std::fs::copy(&old_pub, &pem).unwrap();
    let http = HttpSetup::new()
        .unwrap()
        .lines(&jwt_lines(&format!("public_key = \"{}\"", p(&pem))));
    let rig = HttpRig::start(&http).unwrap();
    let mut sub = Subscriber::start(rig.rig.broker.port(), &["sensors/#"]).unwrap();
    let pid = rig.rig.gateway.pid().unwrap();

    let es = json!({"alg": "ES256", "typ": "JWT"});
    let old = token(d, &old_key, &es, &claims(json!({})));
    let new = token(d, &new_key, &es, &claims(json!({})));
    assert_eq!(publish(&rig, "sensors/dev1/a", &old, "1").status, 200);
    assert_refused(&publish(&rig, "sensors/dev1/a", &new, "2"), "bad_signature");
    assert_eq!(sub.expect().unwrap().payload, b"1");

    std::fs::copy(&new_pub, &pem).unwrap();
    send_signal(pid, "HUP").unwrap();
    poll_until(
        "the new key in force",
        WAIT,
        Duration::from_millis(50),
        || Ok((publish(&rig, "sensors/dev1/b", &new, "3").status == 200).then_some(())),
    )
    .unwrap();
    assert_refused(&publish(&rig, "sensors/dev1/a", &old, "4"), "bad_signature");
    assert_eq!(sub.expect().unwrap().payload, b"3");
    assert_eq!(rig.rig.gateway.pid(), Some(pid), "no restart");

    // A key file that does not load: the reload fails, the keys in force stay.
    std::fs::write(&pem, "not a key").unwrap();
    send_signal(pid, "HUP").unwrap();
    poll_until(
        "the failed reload in the log",
        WAIT,
        Duration::from_millis(50),
        || {
            Ok(rig
                .rig
                .gateway
                .log()
                .contains("settings in force are kept")
                .then_some(()))
        },
    )
    .unwrap();
    assert_eq!(publish(&rig, "sensors/dev1/c", &new, "5").status, 200);
}

fn check_config(path: &Path) -> (Option<i32>, String) {
    let out = sensorgate_tests::run_bounded(
        Command::new(sensorgate_tests::sensorgate_bin()).args(["check-config", "-c", p(path)]),
        Duration::from_secs(20),
    )
    .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn check_config_reads_the_key_file_and_locates_jwt_mistakes() {
    let dir = temp_dir().unwrap();
    let d = dir.path();
    let (private, public) = keypair(d, "k", "rsa");
    let port = sensorgate_tests::free_tcp_port().unwrap();
    let config = |jwt: &str| {
        let mut cfg =
            sensorgate_tests::GatewayConfig::new(sensorgate_tests::free_tcp_port().unwrap())
                .unwrap();
        cfg.extra_sections.push_str(&format!(
            "\n[http]\nlisten = [\"127.0.0.1:{port}\"]\n[http.jwt]\n{jwt}audience = \"gw\"\n"
        ));
        let text = cfg.render(&d.join("state"));
        let path = d.join("t.toml");
        std::fs::write(&path, &text).unwrap();
        (path, text)
    };
    let (path, _) = config(&format!("public_key = \"{}\"\n", p(&public)));
    let (code, out) = check_config(&path);
    assert_eq!(code, Some(0), "{out}");

    // The private key instead of the public one: 78, the key and the file named, no key bytes.
    let (path, _) = config(&format!("public_key = \"{}\"\n", p(&private)));
    let (code, out) = check_config(&path);
    assert_eq!(code, Some(78), "{out}");
    assert!(
        out.contains("[http.jwt] public_key") && out.contains(p(&private)),
        "{out}"
    );
    assert!(out.contains("private key"), "{out}");
    let secret = std::fs::read_to_string(&private).unwrap();
    let secret_line = secret.lines().nth(1).unwrap();
    assert!(!out.contains(secret_line), "key material in the output");

    // A missing file.
    let (path, _) = config("public_key = \"/nonexistent/jwt.pem\"\n");
    let (code, out) = check_config(&path);
    assert_eq!(code, Some(78), "{out}");
    assert!(out.contains("/nonexistent/jwt.pem"), "{out}");

    // HS256 is refused at its line and column.
    let (path, text) = config(&format!(
        "public_key = \"{}\"\nalgorithms = [\"RS256\", \"HS256\"]\n",
        p(&public)
    ));
    let (code, out) = check_config(&path);
    assert_eq!(code, Some(78), "{out}");
    let line = text
        .lines()
        .position(|l| l.starts_with("algorithms"))
        .unwrap()
        + 1;
    let at = format!("{}:{line}:", p(&path));
    assert!(
        out.lines()
            .any(|l| l.starts_with(&at) && l.contains("algorithm confusion")),
        "{out}"
    );
}
