//! Unit tests of the JWT checks: tokens are signed here with ring (RSA keys below, P-256 keys
//! generated per test), the clock is a number.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _, RSA_PKCS1_SHA256, RsaKeyPair,
};
use serde_json::{Value, json};

use super::*;
use crate::config::HttpSection;
use crate::http::auth::{AuthError, AuthTable};
use crate::http::token;
use crate::identity::IdentitySource;

/// Test-only RSA-2048 private keys (PKCS#8 DER, base64), made with `openssl genpkey` for
/// these tests; they protect nothing.
const RSA_A: &[&str] = &[
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCtQZUKK/wEAnKFhnPZQX4Ci4xXaTTsuSOqpFKszc",
    "mZ2iyRuTPTSQSUEb9sPUaEjeK5R7VWWuigx1GXOjJwWE/08Ia7+hicoRpHc5OFT/pGVRqSV6gTHaRwDoGAxgHDY4Q7",
    "LEjjiW/91sPxs/L9wLCvcpbEsowRs60aK0/OcPghpQkpFggyThcclBNRb3+Jnlvn18McipA/MSGDLhaR34FQrVjZ42",
    "i8wjwtUGfACWqqQdFHNf2BWz4ntA/4hBj9CwZ0qbx7U2FX2bdI3kXJOVM7b4OuwefRntlWHQVt/QWDeo5N/BOrvNET",
    "VMatpeMXrTpazdKEmbXMsxYZAY5Yg1jFAgMBAAECggEACwoyxQMoe9jsEzYOC7nwnZjmyGsbxDnH3Ae8fOZgAj20uV",
    "RjyQLOF+FJoUwGQkwINmYrV+VTDWul90zuCdqWvbTV4QR+rPxXAFaM/+GowPKLTufm/dDVuY4zElGLqzecJWkc++K2",
    "ECavNaeRxDmTCJr0oHQAGOCqFxDLdQwdw4b1o42gigVdlVd+ePLwoAFJN+FgInAe2mV04elSTKGdLtzM+W8RDfA+Pf",
    "tFhLdNkFaKRPKvo579TcHR+rOPJZSA4VF6pgquQ4weDkcAyIsBuQic6wOILAah4uqUPlW/gevW3nO/HGfMfVlvfQxj",
    "mBypIaaxQkUidXK5yPOnecyoAQKBgQDpSuymC8DL6WP5SlvquN2TMIVlfAxgv6KOmTLILb5kbG1hekQ0jQNcfA5mFt",
    "mItX4JHz05vYQAw7SM0BPTXNhGHXQyG//iLn4IwRsIwNC5dXwY6CjHyOnHXBK2MXq7NuGRpsdmQsrRV8aaT9tQ9dX4",
    "5vuhn5AVbDmK25mDaQcDJQKBgQC+HrJzVkBSY+s1ds5V3GfxWX4DJ9VmwviMk8cQO6zFkT89nK1GBnh8vHHabYzsRu",
    "dsO8Z15ErsLhr9+f/aJ1SvTze/25EGoGJzCuKu1qTImyQYKaK8/vjgWWYR4K2UX4TUyd2IIOuRkAj49w41qDNg8WE3",
    "Ng49pNDizMQ3OsHdIQKBgQCTob9qQKvMHrEOc/kA6+YEHEN+embW3s6/EMGrHg+LO3Zoplf9LXOAFl2CS1l0Au50VV",
    "mIbZ7YYQCjz5WMPwf6Lu92OnPOrX9CiPlTq7kqc+eJV3lfHIychW6t71fsm4lZg8JRu1jf630Z8AkpDblPntSEbhZf",
    "CDLN5bQbDd7LJQKBgGBzclTRDRC/YDRfcY5dot3uaN9w9fKMN0waLIMvwxb3+P1o3v8HiVi+wYPuz++OiRl/uc9VYi",
    "0vtsHicspZ6byGk+HholGaTFfQze+lNTQQgN9BQC5hrCElOYMYWPdM/jZ1ss285cWTLPohXDQcgPRNgORhqBfd5Zsq",
    "BuF+DZwBAoGAewqB24bvNk2ayzKUujXkKmvcyYeYFF++/wYAlDKt23oQsQiOdx0yoTrj3xD1/jTCkle28y5ApsJtjw",
    "ZTev+0sOkk8RnXdT2Sy72ra2Njk0GFivBpfUHerYIZ0GiBJJPJy5AYXjkHtO5kWqngTO3kYPV4l84H/eWbvITrD0NH",
    "KlA=",
];
const RSA_B: &[&str] = &[
    "MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDBZ7GB0wOYlvqWSGh/WNq0k+gKPPQrhyHunreHmy",
    "78aF+Sds1SRUFD3lB332suOUnFQf0wqYTtqkXxun644ZWtveiGp02S23p0Z7H9FMwV4l0Zvk4aypwfOZu46MSkoA7+",
    "uh6vfqxtVrXz9YFXQJM39J9AXNbkpmIl4sopHlIS6uFzaEIse0zfW4kacL8HK+YdgraT2EnVSAPkGjYKe8ka/VQFzO",
    "dOSKAgrwrtgyHwEevTWkhSghFKTadfCATPFoeCx3dPnTWgqufCyEC6E3Wg/MP4/l8bhgV6QFnfY1g+gSX43WMpM/96",
    "cneQGgTfsjoOxsQKeyJ279LN1j/LDXLVAgMBAAECggEAHMxSZ5jik7GDfaYpfTDfW/0cE44w81xLRqs2e8g1LltiQ7",
    "5R41qxlagARmErpfXc0LT7POg5BWSRxqU04lWgwn6hJY+64s+wg62/GIakvut2XnNyUNXzekjLMbTjNvooUXCoSgxs",
    "I1nCfSGE0VeptC7GGcDZNLG7spV68bV0liFF8JLH/hA0amCeSDLoFyB8qawZZjcwYJJwtD9eV7NOh4kjKFFpFTOrc1",
    "QEIBOlk+HjHUPDfjNPjtSN4A7rOKGw5tYsMkzF6uUU/Q9HuwlI4o1LyHatiMHhOqPezJR6Sw8oM90bJp+XDP+hbOvg",
    "mNWztjzvZiB3PJETPnbGBIkz/wKBgQDr9IPb039aKy3IABrhtHKI64VUITeMbRhVfBqNj7ibvrVdaFPgLWelX7+Jnt",
    "kmXYnSq/lFrGrTmeKIUbpdWvasw/6hC/yaF9IYSe8aanb2o3FqHNUBNgRT35QE1Hdh7XhNjWtSzjh1v75pT7hIC+6g",
    "rYqnNjysDGPRK9Hz1XLvqwKBgQDR1c+sb0BTivOrSAd/U9ZEC9bfMW9rGwMQW3u9ixNksO6vf0azjvzL0mhxZOqAAv",
    "uNWe8mZ/LchDLpGYiX8sGLRR/hBUi+5/TlgSg/0JaOZM7T+GcsTb9yqAKkYyamYck1haG0IBhWfi2E2ho2HMb7ZyxA",
    "N2xmrNtrltCJ1hCnfwKBgQCMQhwDlzQzuEkNgyp3klknFMF7ogcwHUWCwzPRhGZbhkCvFq4NK1BaGJF10AwK5z1fEs",
    "UpanVR9T6Yg+SBS+ooBpWcy9BLFO/ZalGMZU70C3IGfr8Laj2mUdfeCyIv/wYtK2xpm5YqQGGCnlXP1e/yaVZrUS09",
    "pFvNYfv6sp4Q4wKBgGYSpBs1Yw1AopfHSh5eIfSn7bZUzeZEFZF3bxIc/SoWB4XHXBUskTx09elzNb9ftA5mmTcNic",
    "5LYJiTmyaPKCcfUQqdD24OV8rssS+ZwCM0Vog2ZbnfeCnGIMLmmH6HQuGOR8LfefdZGbtufSGljgXtglEapNitbW9A",
    "xeDHCQLxAoGBAMfEckuDxY+B3+8480xNXQAcjS7j1/H2py95Rcz9WrPFeRoVqOFbSLWzj4+tglM6dQX/adyCnOXXzq",
    "r9VLVXxzfvywzgCqqhIRb6Z1Go8foY3vHsH2a07KL6GqfS8SiAT52CkcDjSf0MMH17G6l2GQmCsPTeqwMcp3fMkskU",
    "OHSK",
];

const NOW: u64 = 1_800_000_000;

fn rsa(key: &[&str]) -> RsaKeyPair {
    RsaKeyPair::from_pkcs8(&STANDARD.decode(key.concat()).unwrap()).unwrap()
}

fn ec() -> EcdsaKeyPair {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap()
}

fn pem(label: &str, der: &[u8]) -> Vec<u8> {
    let b64 = STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
    .into_bytes()
}

fn rsa_pem(key: &RsaKeyPair) -> Vec<u8> {
    pem("RSA PUBLIC KEY", key.public_key().as_ref())
}

/// SubjectPublicKeyInfo of a P-256 point.
fn ec_pem(key: &EcdsaKeyPair) -> Vec<u8> {
    let mut der = vec![
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    der.extend_from_slice(key.public_key().as_ref());
    pem("PUBLIC KEY", &der)
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn rsa_jwk(key: &RsaKeyPair, kid: &str) -> Value {
    let c = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(key.public());
    json!({
        "kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
        "n": b64(&c.n),
        "e": b64(&c.e),
    })
}

fn ec_jwk(key: &EcdsaKeyPair, kid: &str) -> Value {
    let point = key.public_key().as_ref();
    json!({
        "kty": "EC", "crv": "P-256", "kid": kid,
        "x": b64(&point[1..33]), "y": b64(&point[33..65]),
    })
}

enum Signer<'a> {
    Rsa(&'a RsaKeyPair),
    Ec(&'a EcdsaKeyPair),
}

fn sign(header: &Value, claims: &Value, signer: Signer<'_>) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let rng = SystemRandom::new();
    let signature = match signer {
        Signer::Rsa(key) => {
            let mut sig = vec![0; key.public().modulus_len()];
            key.sign(&RSA_PKCS1_SHA256, &rng, input.as_bytes(), &mut sig)
                .unwrap();
            sig
        }
        Signer::Ec(key) => key.sign(&rng, input.as_bytes()).unwrap().as_ref().to_vec(),
    };
    format!("{input}.{}", b64(&signature))
}

fn claims() -> Value {
    json!({
        "sub": "dev1", "aud": "sensorgate", "exp": NOW + 600, "nbf": NOW - 10,
        "sg_pub": ["sensors/dev1"], "sg_sub": ["cmd/dev1"],
    })
}

fn with(mut base: Value, changes: Value) -> Value {
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            base.as_object_mut().unwrap().remove(k);
        } else {
            base[k] = v.clone();
        }
    }
    base
}

fn pem_spec() -> JwtSpec {
    JwtSpec::with(JwtKeyFile::PublicKey("jwt.pem".into()), "sensorgate")
}

fn jwks_spec() -> JwtSpec {
    JwtSpec::with(JwtKeyFile::Jwks("jwks.json".into()), "sensorgate")
}

fn rs256() -> Value {
    json!({"alg": "RS256", "typ": "JWT"})
}

#[test]
fn an_rs256_token_maps_its_claims_to_an_identity_and_scope() {
    let a = rsa(RSA_A);
    let v = JwtVerifier::from_bytes(&pem_spec(), &rsa_pem(&a)).unwrap();
    let token = sign(&rs256(), &claims(), Signer::Rsa(&a));
    assert!(
        token.len() > token::MAX_TOKEN_LEN,
        "longer than a static token"
    );
    assert_eq!(
        v.verify(&token, NOW),
        Ok(JwtGrant {
            identity: "dev1".into(),
            publish: vec!["sensors/dev1".into()],
            subscribe: vec!["cmd/dev1".into()],
        })
    );
}

#[test]
fn an_es256_token_verifies_with_a_pem_p256_key() {
    let k = ec();
    let v = JwtVerifier::from_bytes(&pem_spec(), &ec_pem(&k)).unwrap();
    let token = sign(&json!({"alg": "ES256"}), &claims(), Signer::Ec(&k));
    assert_eq!(v.verify(&token, NOW).map(|g| g.identity), Ok("dev1".into()));
    // The same token, another P-256 key: the signature does not verify.
    let other = JwtVerifier::from_bytes(&pem_spec(), &ec_pem(&ec())).unwrap();
    assert_eq!(other.verify(&token, NOW), Err(JwtError::BadSignature));
}

#[test]
fn every_refusal_has_its_reason() {
    let a = rsa(RSA_A);
    let b = rsa(RSA_B);
    let mut spec = pem_spec();
    spec.issuer = Some("https://issuer.example".into());
    let v = JwtVerifier::from_bytes(&spec, &rsa_pem(&a)).unwrap();
    let good = with(claims(), json!({"iss": "https://issuer.example"}));
    let t = |claims: Value| sign(&rs256(), &claims, Signer::Rsa(&a));
    assert!(v.verify(&t(good.clone()), NOW).is_ok());
    let cases: Vec<(String, JwtError)> = vec![
        (
            t(with(good.clone(), json!({"exp": NOW - 60}))),
            JwtError::Expired,
        ),
        (
            t(with(good.clone(), json!({"nbf": NOW + 60}))),
            JwtError::NotYetValid,
        ),
        (
            t(with(good.clone(), json!({"aud": "other"}))),
            JwtError::WrongAudience,
        ),
        (
            t(with(good.clone(), json!({"aud": ["a", "b"]}))),
            JwtError::WrongAudience,
        ),
        (
            t(with(good.clone(), json!({"iss": "evil"}))),
            JwtError::WrongIssuer,
        ),
        (
            t(with(good.clone(), json!({"iss": null}))),
            JwtError::MissingClaim,
        ),
        (
            t(with(good.clone(), json!({"exp": null}))),
            JwtError::MissingClaim,
        ),
        (
            t(with(good.clone(), json!({"aud": null}))),
            JwtError::MissingClaim,
        ),
        (
            t(with(good.clone(), json!({"sub": null}))),
            JwtError::MissingClaim,
        ),
        (
            t(with(good.clone(), json!({"exp": "tomorrow"}))),
            JwtError::Malformed,
        ),
        (
            t(with(good.clone(), json!({"aud": 7}))),
            JwtError::Malformed,
        ),
        (t(with(good.clone(), json!({"sub": 7}))), JwtError::BadClaim),
        (
            t(with(good.clone(), json!({"sub": ""}))),
            JwtError::BadClaim,
        ),
        (
            t(with(good.clone(), json!({"sub": "anonymous"}))),
            JwtError::BadClaim,
        ),
        (
            t(with(good.clone(), json!({"sg_pub": ["a/+"]}))),
            JwtError::BadClaim,
        ),
        (
            t(with(good.clone(), json!({"sg_sub": [1]}))),
            JwtError::BadClaim,
        ),
        (
            sign(&rs256(), &good, Signer::Rsa(&b)),
            JwtError::BadSignature,
        ),
        (
            sign(
                &json!({"alg": "RS256", "crit": ["exp"]}),
                &good,
                Signer::Rsa(&a),
            ),
            JwtError::UnsupportedHeader,
        ),
        ("e30.e30.".into(), JwtError::Malformed),
        ("bm90IGpzb24.e30.c2ln".into(), JwtError::Malformed),
        ("a".repeat(9000), JwtError::TooLarge),
        (
            format!(
                "{}.e30.c2ln",
                b64(format!(r#"{{"alg":"RS256","x":"{}"}}"#, "y".repeat(2000)).as_bytes())
            ),
            JwtError::TooLarge,
        ),
    ];
    for (token, want) in cases {
        assert_eq!(
            v.verify(&token, NOW),
            Err(want),
            "{}",
            &token[..token.len().min(80)]
        );
    }
}

#[test]
fn alg_none_and_hmac_with_the_public_key_are_refused_before_any_key() {
    let a = rsa(RSA_A);
    let public = rsa_pem(&a);
    let v = JwtVerifier::from_bytes(&pem_spec(), &public).unwrap();
    // Unsigned.
    for alg in ["none", "None", "NONE"] {
        let token = format!(
            "{}.{}.",
            b64(json!({"alg": alg}).to_string().as_bytes()),
            b64(claims().to_string().as_bytes())
        );
        assert!(looks_like_jwt(&token));
        assert_eq!(
            v.verify(&token, NOW),
            Err(JwtError::AlgorithmNotAllowed),
            "{alg}"
        );
    }
    // Algorithm confusion: HS256 keyed with the public key's bytes (PEM text and DER).
    for secret in [public.clone(), a.public_key().as_ref().to_vec()] {
        let input = format!(
            "{}.{}",
            b64(json!({"alg": "HS256"}).to_string().as_bytes()),
            b64(claims().to_string().as_bytes())
        );
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
        let tag = ring::hmac::sign(&key, input.as_bytes());
        let token = format!("{input}.{}", b64(tag.as_ref()));
        assert_eq!(v.verify(&token, NOW), Err(JwtError::AlgorithmNotAllowed));
    }
    // The ring provider (installed by the first verification) has no HMAC either, whatever
    // asks it.
    assert!(ring_provider_installed());
    let hmac = DecodingKey::from_secret(&public);
    assert!(jsonwebtoken::crypto::verify("c2ln", b"x", &hmac, Algorithm::HS256).is_err());
    // Only the configured algorithms: ES256 off refuses an ES256 token before its key.
    let mut spec = pem_spec();
    spec.algorithms = vec![JwtAlgorithm::Rs256];
    let v = JwtVerifier::from_bytes(&spec, &public).unwrap();
    let token = sign(&json!({"alg": "ES256"}), &claims(), Signer::Ec(&ec()));
    assert_eq!(v.verify(&token, NOW), Err(JwtError::AlgorithmNotAllowed));
}

#[test]
fn a_key_of_another_type_than_the_algorithm_is_never_used() {
    let a = rsa(RSA_A);
    let v = JwtVerifier::from_bytes(&pem_spec(), &rsa_pem(&a)).unwrap();
    // ES256 is allowed, but the one key is RSA.
    let token = sign(&json!({"alg": "ES256"}), &claims(), Signer::Ec(&ec()));
    assert_eq!(v.verify(&token, NOW), Err(JwtError::UnknownKid));
}

#[test]
fn jwks_keys_are_chosen_by_kid() {
    let (a, b, c) = (rsa(RSA_A), rsa(RSA_B), ec());
    let set = json!({"keys": [rsa_jwk(&a, "a"), rsa_jwk(&b, "b"), ec_jwk(&c, "c")]});
    let v = JwtVerifier::from_bytes(&jwks_spec(), set.to_string().as_bytes()).unwrap();
    assert_eq!(v.key_count(), 3);
    let kid = |k: &str, alg: &str| json!({"alg": alg, "kid": k});
    let ok = |t: &str| v.verify(t, NOW).map(|g| g.identity);
    assert_eq!(
        ok(&sign(&kid("a", "RS256"), &claims(), Signer::Rsa(&a))),
        Ok("dev1".into())
    );
    assert_eq!(
        ok(&sign(&kid("b", "RS256"), &claims(), Signer::Rsa(&b))),
        Ok("dev1".into())
    );
    assert_eq!(
        ok(&sign(&kid("c", "ES256"), &claims(), Signer::Ec(&c))),
        Ok("dev1".into())
    );
    assert_eq!(
        ok(&sign(&kid("a", "RS256"), &claims(), Signer::Rsa(&b))),
        Err(JwtError::BadSignature),
        "kid a, signed by b"
    );
    assert_eq!(
        ok(&sign(&kid("z", "RS256"), &claims(), Signer::Rsa(&a))),
        Err(JwtError::UnknownKid)
    );
    assert_eq!(
        ok(&sign(&kid("c", "RS256"), &claims(), Signer::Rsa(&a))),
        Err(JwtError::UnknownKid),
        "kid c is an EC key"
    );
    assert_eq!(
        ok(&sign(&rs256(), &claims(), Signer::Rsa(&a))),
        Err(JwtError::UnknownKid),
        "no kid, two RSA keys"
    );
    // No kid, one key of the algorithm's type: that one.
    assert_eq!(
        ok(&sign(&json!({"alg": "ES256"}), &claims(), Signer::Ec(&c))),
        Ok("dev1".into())
    );
}

#[test]
fn leeway_widens_exp_and_nbf_by_its_seconds_only() {
    let a = rsa(RSA_A);
    let v = JwtVerifier::from_bytes(&pem_spec(), &rsa_pem(&a)).unwrap();
    assert_eq!(v.spec().leeway.as_secs(), 30);
    let t = |c: Value| sign(&rs256(), &with(claims(), c), Signer::Rsa(&a));
    assert!(v.verify(&t(json!({"exp": NOW - 29})), NOW).is_ok());
    assert_eq!(
        v.verify(&t(json!({"exp": NOW - 30})), NOW),
        Err(JwtError::Expired)
    );
    assert!(v.verify(&t(json!({"nbf": NOW + 30})), NOW).is_ok());
    assert_eq!(
        v.verify(&t(json!({"nbf": NOW + 31})), NOW),
        Err(JwtError::NotYetValid)
    );
    // Fractional NumericDates are cut.
    assert!(
        v.verify(&t(json!({"exp": (NOW + 5) as f64 + 0.5})), NOW)
            .is_ok()
    );
    let mut strict = pem_spec();
    strict.leeway = std::time::Duration::ZERO;
    let v = JwtVerifier::from_bytes(&strict, &rsa_pem(&a)).unwrap();
    assert_eq!(
        v.verify(&t(json!({"exp": NOW})), NOW),
        Err(JwtError::Expired)
    );
    assert!(v.verify(&t(json!({"exp": NOW + 1})), NOW).is_ok());
}

#[test]
fn claim_names_and_default_scopes_are_configurable() {
    let a = rsa(RSA_A);
    let mut spec = pem_spec();
    spec.identity_claim = "device".into();
    spec.publish_claim = "pub".into();
    spec.subscribe_claim = "sub_scope".into();
    spec.default_subscribe = vec!["cmd/all".into()];
    let v = JwtVerifier::from_bytes(&spec, &rsa_pem(&a)).unwrap();
    let token = sign(
        &rs256(),
        &json!({"device": "pump-7", "aud": ["x", "sensorgate"], "exp": NOW + 5, "pub": "plant/pump-7"}),
        Signer::Rsa(&a),
    );
    assert_eq!(
        v.verify(&token, NOW),
        Ok(JwtGrant {
            identity: "pump-7".into(),
            publish: vec!["plant/pump-7".into()],
            subscribe: vec!["cmd/all".into()],
        })
    );
    // Absent claims and no default: nothing is granted (deny by default).
    let v = JwtVerifier::from_bytes(&pem_spec(), &rsa_pem(&a)).unwrap();
    let bare = with(claims(), json!({"sg_pub": null, "sg_sub": null}));
    let grant = v
        .verify(&sign(&rs256(), &bare, Signer::Rsa(&a)), NOW)
        .unwrap();
    assert!(grant.publish.is_empty() && grant.subscribe.is_empty());
}

#[test]
fn key_files_that_cannot_be_used_are_refused_with_the_reason() {
    let a = rsa(RSA_A);
    let err = |spec: &JwtSpec, bytes: &[u8]| {
        JwtVerifier::from_bytes(spec, bytes)
            .unwrap_err()
            .to_string()
    };
    assert!(
        err(
            &pem_spec(),
            b"-----BEGIN PRIVATE KEY-----\nMII\n-----END PRIVATE KEY-----\n"
        )
        .contains("private key")
    );
    assert!(err(&pem_spec(), b"hello").contains("not a PEM"));
    let mut es_only = pem_spec();
    es_only.algorithms = vec![JwtAlgorithm::Es256];
    assert!(err(&es_only, &rsa_pem(&a)).contains("does not list RS256"));
    let e = err(
        &jwks_spec(),
        json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]})
            .to_string()
            .as_bytes(),
    );
    assert!(e.contains("symmetric"), "{e}");
    let mut two = jwks_spec();
    two.max_keys = 1;
    let set = json!({"keys": [rsa_jwk(&a, "a"), rsa_jwk(&a, "b")]});
    assert!(err(&two, set.to_string().as_bytes()).contains("max_keys"));
    let set = json!({"keys": [rsa_jwk(&a, "a"), rsa_jwk(&a, "a")]});
    assert!(err(&jwks_spec(), set.to_string().as_bytes()).contains("used twice"));
    let mut no_kid = rsa_jwk(&a, "x");
    no_kid.as_object_mut().unwrap().remove("kid");
    let set = json!({"keys": [no_kid, rsa_jwk(&a, "b")]});
    assert!(err(&jwks_spec(), set.to_string().as_bytes()).contains("no kid"));
    let mut wrong_alg = rsa_jwk(&a, "a");
    wrong_alg["alg"] = json!("PS256");
    let e = err(
        &jwks_spec(),
        json!({"keys": [wrong_alg]}).to_string().as_bytes(),
    );
    assert!(e.contains("is not RS256"), "{e}");
    let mut enc = rsa_jwk(&a, "a");
    enc["use"] = json!("enc");
    let e = err(&jwks_spec(), json!({"keys": [enc]}).to_string().as_bytes());
    assert!(e.contains("not `sig`"), "{e}");
    // The message never carries key material.
    assert!(!e.contains(&rsa_jwk(&a, "a")["n"].as_str().unwrap()[..20]));
    assert!(
        !format!(
            "{:?}",
            JwtVerifier::from_bytes(&pem_spec(), &rsa_pem(&a)).unwrap()
        )
        .contains("MII")
    );
}

fn jwt_table(verifier: JwtVerifier, anonymous: bool) -> AuthTable {
    let section = HttpSection {
        allow_anonymous: anonymous,
        devices: vec![crate::config::DeviceSpec {
            id: "static1".into(),
            token_hash: Some(token::digest(b"static-token-0123456789")),
            publish: vec!["#".into()],
            subscribe: vec![],
        }],
        ..HttpSection::default()
    };
    AuthTable::with_jwt(&section, Some(Arc::new(verifier)))
}

#[test]
fn the_auth_table_checks_jwt_shaped_tokens_as_jwts_and_never_downgrades() {
    let a = rsa(RSA_A);
    let table = jwt_table(
        JwtVerifier::from_bytes(&pem_spec(), &rsa_pem(&a)).unwrap(),
        true,
    );
    let bearer = |t: &str| format!("Bearer {t}").into_bytes();
    let token = sign(&rs256(), &claims(), Signer::Rsa(&a));
    let who = table
        .authenticate(Some(&bearer(&token)), None, NOW)
        .unwrap();
    assert_eq!(&*who.id, "dev1");
    assert_eq!(who.source, IdentitySource::Jwt);
    assert_eq!(
        who.identity(),
        crate::identity::Identity::new("dev1", IdentitySource::Jwt)
    );
    assert!(who.publish.allows_topic("sensors/dev1/t"));
    assert!(!who.publish.allows_topic("sensors/dev2/t"));
    assert!(who.subscribe.allows_filter("cmd/dev1/#"));
    // Expired: its reason, not anonymous (which is on).
    assert_eq!(
        table
            .authenticate(Some(&bearer(&token)), None, NOW + 3600)
            .map(|_| ()),
        Err(AuthError::Jwt(JwtError::Expired))
    );
    // A certificate naming another device disagrees.
    assert_eq!(
        table
            .authenticate(Some(&bearer(&token)), Some("static1"), NOW)
            .map(|_| ()),
        Err(AuthError::CredentialsDisagree)
    );
    // Static tokens still work beside JWTs.
    let who = table
        .authenticate(Some(&bearer("static-token-0123456789")), None, NOW)
        .unwrap();
    assert_eq!(
        (&*who.id, who.source),
        ("static1", IdentitySource::HttpToken)
    );
    // Without [http.jwt], a JWT is an unknown static token.
    let plain = AuthTable::new(&HttpSection::default());
    assert_eq!(
        plain
            .authenticate(Some(&bearer(&token)), None, NOW)
            .map(|_| ()),
        Err(AuthError::InvalidToken)
    );
}

#[test]
fn a_reload_reads_the_key_file_again_and_swaps_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwt.pem");
    let (a, b) = (rsa(RSA_A), rsa(RSA_B));
    std::fs::write(&path, rsa_pem(&a)).unwrap();
    let section = HttpSection {
        jwt: Some(JwtSpec::with(
            JwtKeyFile::PublicKey(path.clone()),
            "sensorgate",
        )),
        ..HttpSection::default()
    };
    let reloader = crate::http::Reloader::new(&section).unwrap();
    let bearer = |t: &str| format!("Bearer {t}").into_bytes();
    let auth = |t: &str| {
        reloader
            .live()
            .settings()
            .auth
            .authenticate(Some(&bearer(t)), None, NOW)
            .map(|w| w.id.to_string())
    };
    let old = sign(&rs256(), &claims(), Signer::Rsa(&a));
    let new = sign(&rs256(), &claims(), Signer::Rsa(&b));
    assert_eq!(auth(&old), Ok("dev1".into()));
    assert_eq!(auth(&new), Err(AuthError::Jwt(JwtError::BadSignature)));
    // The same file: nothing to apply.
    assert!(reloader.reload_keys().is_none());
    // Rotated.
    std::fs::write(&path, rsa_pem(&b)).unwrap();
    let notes = reloader.reload_keys().unwrap().unwrap();
    assert!(notes[0].contains("1 key(s)"), "{notes:?}");
    assert_eq!(auth(&old), Err(AuthError::Jwt(JwtError::BadSignature)));
    assert_eq!(auth(&new), Ok("dev1".into()));
    // A broken file: an error, and the keys in force stay.
    std::fs::write(&path, b"garbage").unwrap();
    assert!(reloader.reload_keys().unwrap().is_err());
    assert!(reloader.apply(&section).is_err());
    assert_eq!(auth(&new), Ok("dev1".into()));
    // A missing file at start is an error naming the key and the file.
    std::fs::remove_file(&path).unwrap();
    let e = crate::http::Reloader::new(&section)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[http.jwt] public_key") && e.contains("jwt.pem"),
        "{e}"
    );
}

#[test]
fn the_pre_parser_takes_only_the_jws_shape() {
    for yes in ["a.b.c", "a.b.", "A-_9.b.c"] {
        assert!(looks_like_jwt(yes), "{yes}");
    }
    for no in [
        "a.b", "a.b.c.d", ".b.c", "a..c", "a.b.c=", "a.b/.c", "sgt_abc", "",
    ] {
        assert!(!looks_like_jwt(no), "{no}");
    }
    fuzz_pre_parse(b"e30.e30.e30");
    fuzz_pre_parse(
        format!(
            "{}.{}.",
            b64(b"{\"alg\":\"none\"}"),
            b64(claims().to_string().as_bytes())
        )
        .as_bytes(),
    );
}

#[test]
fn every_reason_has_a_distinct_code_and_counter() {
    let codes: HashSet<&str> = JwtError::ALL.iter().map(|e| e.code()).collect();
    let events: HashSet<&str> = JwtError::ALL.iter().map(|e| e.event()).collect();
    assert_eq!(
        (codes.len(), events.len()),
        (JwtError::ALL.len(), JwtError::ALL.len())
    );
    for (i, e) in JwtError::ALL.iter().enumerate() {
        assert_eq!(e.index(), i);
        assert_eq!(e.event(), format!("jwt_refused_{}", e.code()));
    }
}
