//! `[dtls]` and `[[psk]]`: the DTLS layer under MQTT-SN and CoAP (`[mqttsn] dtls_listen`,
//! `[coap] dtls_listen`), its bounds, and the pre-shared keys.
//!
//! Invariants:
//! - `[[psk]] identity` is unique and non-empty; each entry has exactly one of `key_hex` and
//!   `key_file`, and the key is not empty. `key_file` holds the key in hex, like `key_hex`
//!   (surrounding whitespace ignored): `openssl rand -hex 16 > dev1.key` makes one. A relative
//!   path is relative to the config file's folder. The file is read when the config is
//!   (start, `check-config`, SIGHUP).
//! - `client_ids` omitted: the identity itself is its only ClientId.
//! - No key byte appears in a diagnostic.
//! - A `dtls_listen` needs at least one `[[psk]]`; `required = true` refuses plain
//!   `[mqttsn] listen` / `[coap] listen` addresses that are not loopback.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::DurationText;
use super::check::{duration_in, int_in};
use super::diag::{KeyPath, Reporter};
use crate::dtls::DtlsSettings;
use crate::dtls::cert::{self, ClientCertificates, ServerCertificate};
use crate::dtls::keys::{PskEntry, PskKey};

/// CoAP over DTLS's registered port (RFC 7252 section 12.6), the default of a `[coap]
/// dtls_listen` address written without one.
pub const COAPS_PORT: u16 = 5684;

/// The longest PSK identity (RFC 4279 allows 2^16-1; RFC 7925 devices use short ones).
const MAX_IDENTITY: usize = 128;
/// The longest key, in bytes (RFC 4279: up to 64 bytes in practice; 2^16-1 on the wire).
const MAX_KEY: usize = 64;

/// `[dtls]`.
#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct RawDtls {
    required: bool,
    certificate: Option<String>,
    private_key: Option<String>,
    client_ca: Option<String>,
    client_certificates: String,
    max_handshakes: i64,
    max_sessions: i64,
    handshake_timeout: DurationText,
    idle_timeout: DurationText,
}

impl Default for RawDtls {
    fn default() -> Self {
        let d = DtlsSettings::default();
        let duration = |d: Duration| DurationText(humantime::format_duration(d).to_string());
        let int = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        RawDtls {
            required: false,
            certificate: None,
            private_key: None,
            client_ca: None,
            client_certificates: "off".into(),
            max_handshakes: int(d.max_handshakes),
            max_sessions: int(d.max_sessions),
            handshake_timeout: duration(d.handshake_timeout),
            idle_timeout: duration(d.idle_timeout),
        }
    }
}

/// `[[psk]]`.
#[derive(Default, Deserialize)]
#[serde(default)]
pub(super) struct RawPsk {
    identity: Option<String>,
    key_hex: Option<String>,
    key_file: Option<String>,
    client_ids: Option<Vec<String>>,
}

impl std::fmt::Debug for RawPsk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawPsk")
            .field("identity", &self.identity)
            .field("key_hex", &self.key_hex.as_ref().map(|_| "<redacted>"))
            .field("key_file", &self.key_file)
            .field("client_ids", &self.client_ids)
            .finish()
    }
}

/// The DTLS layer's validated config.
#[derive(Debug, Clone)]
pub struct DtlsSection {
    /// `required`: plain listeners only on loopback.
    pub required: bool,
    /// The layer's settings (shared by MQTT-SN's and CoAP's layers).
    pub settings: Arc<DtlsSettings>,
}

/// Parses a `[coap] dtls_listen` address: an IP socket address, or an IP address alone (port
/// [`COAPS_PORT`]).
pub(super) fn coaps_addr(text: &str) -> Option<SocketAddr> {
    text.parse::<SocketAddr>().ok().or_else(|| {
        let ip = text.trim_start_matches('[').trim_end_matches(']');
        ip.parse::<std::net::IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, COAPS_PORT))
    })
}

/// `[dtls]` and `[[psk]]`; `None` when something is wrong (reported). `base` is the config
/// file's folder (for `key_file`).
pub(super) fn compile_dtls(
    d: &RawDtls,
    psk: &[RawPsk],
    base: &Path,
    r: &mut Reporter<'_>,
) -> Option<DtlsSection> {
    let dt = KeyPath::root("dtls");
    let max_handshakes =
        int_in::<usize>(r, &dt.key("max_handshakes"), d.max_handshakes, 1, 1_000_000);
    let max_sessions = int_in::<usize>(r, &dt.key("max_sessions"), d.max_sessions, 1, 10_000_000);
    let handshake_timeout = duration_in(
        r,
        &dt.key("handshake_timeout"),
        &d.handshake_timeout,
        Duration::from_secs(1),
        Duration::from_secs(300),
    );
    let idle_timeout = duration_in(
        r,
        &dt.key("idle_timeout"),
        &d.idle_timeout,
        Duration::from_secs(1),
        Duration::from_secs(7 * 24 * 3600),
    );
    let entries = compile_psk(psk, base, r);
    let (certificate, client_ca, client_certificates) = compile_certificates(d, base, r)?;
    Some(DtlsSection {
        required: d.required,
        settings: Arc::new(DtlsSettings {
            psk: entries?,
            max_handshakes: max_handshakes?,
            max_sessions: max_sessions?,
            handshake_timeout: handshake_timeout?,
            idle_timeout: idle_timeout?,
            certificate,
            client_ca,
            client_certificates,
        }),
    })
}

/// `certificate`, `private_key`, `client_ca`, `client_certificates`; `None` when wrong
/// (reported). The files are read here (start, `check-config`, SIGHUP).
#[allow(clippy::type_complexity)]
fn compile_certificates(
    d: &RawDtls,
    base: &Path,
    r: &mut Reporter<'_>,
) -> Option<(
    Option<ServerCertificate>,
    Vec<rustls::pki_types::CertificateDer<'static>>,
    ClientCertificates,
)> {
    let dt = KeyPath::root("dtls");
    let mut ok = true;
    let mode = match d.client_certificates.as_str() {
        "off" => Some(ClientCertificates::Off),
        "required" => Some(ClientCertificates::Required),
        "optional" => {
            r.at_path(
                &dt.key("client_certificates"),
                "\"optional\" is not supported for DTLS: the DTLS library asks for a client \
                 certificate only when it requires one"
                    .into(),
                Some("write \"off\" or \"required\"".into()),
            );
            None
        }
        other => {
            r.at_path(
                &dt.key("client_certificates"),
                format!("`{other}` is not one of \"off\", \"required\""),
                None,
            );
            None
        }
    };
    let certificate = match (&d.certificate, &d.private_key) {
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            r.at_path(
                &dt.key(if d.certificate.is_some() {
                    "private_key"
                } else {
                    "certificate"
                }),
                "certificate and private_key go together".into(),
                None,
            );
            ok = false;
            None
        }
        (Some(c), Some(k)) => {
            let leaf = match cert::load_certificates(&base.join(c)) {
                Ok(certs) => certs.into_iter().next(),
                Err(e) => {
                    r.at_path(&dt.key("certificate"), e, None);
                    None
                }
            };
            let key = match cert::load_private_key(&base.join(k)) {
                Ok(key) => Some(key),
                Err(e) => {
                    r.at_path(&dt.key("private_key"), e, None);
                    None
                }
            };
            match (leaf, key) {
                (Some(leaf), Some(private_key)) => Some(ServerCertificate {
                    certificate: Arc::from(leaf.as_ref()),
                    private_key,
                }),
                _ => {
                    ok = false;
                    None
                }
            }
        }
    };
    let client_ca = match &d.client_ca {
        Some(ca) => match cert::load_certificates(&base.join(ca))
            .and_then(|roots| cert::verifier(&roots).map(|_| roots))
        {
            Ok(roots) => roots,
            Err(e) => {
                r.at_path(&dt.key("client_ca"), e, None);
                ok = false;
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    let mode = mode?;
    if mode == ClientCertificates::Required {
        if d.client_ca.is_none() {
            r.at_path(
                &dt.key("client_certificates"),
                "\"required\" needs client_ca (the CA client certificates are checked against)"
                    .into(),
                None,
            );
            ok = false;
        }
        if d.certificate.is_none() {
            r.at_path(
                &dt.key("client_certificates"),
                "client certificates need the server's own certificate and private_key".into(),
                None,
            );
            ok = false;
        }
    }
    ok.then_some((certificate, client_ca, mode))
}

fn compile_psk(psk: &[RawPsk], base: &Path, r: &mut Reporter<'_>) -> Option<Vec<PskEntry>> {
    let mut ok = true;
    let mut seen = HashSet::new();
    let mut entries = Vec::new();
    for (i, p) in psk.iter().enumerate() {
        let path = KeyPath::root("psk").index(i);
        let identity = match &p.identity {
            None => {
                r.at_path(&path.key("identity"), "is required".into(), None);
                None
            }
            Some(id) if id.is_empty() || id.len() > MAX_IDENTITY => {
                r.at_path(
                    &path.key("identity"),
                    format!("must be 1 to {MAX_IDENTITY} bytes long"),
                    None,
                );
                None
            }
            Some(id) if !seen.insert(id.clone()) => {
                r.at_path(
                    &path.key("identity"),
                    format!("identity `{id}` is listed twice"),
                    Some("each [[psk]] identity names one key".into()),
                );
                None
            }
            Some(id) => Some(id.clone()),
        };
        let key = match (&p.key_hex, &p.key_file) {
            (Some(_), Some(_)) => {
                r.at_path(
                    &path.key("key_file"),
                    "give either key_hex or key_file, not both".into(),
                    None,
                );
                None
            }
            (None, None) => {
                r.at_path(
                    &path.key("identity"),
                    "has no key: give key_hex or key_file".into(),
                    None,
                );
                None
            }
            (Some(hex), None) => match decode_key(hex) {
                Ok(key) => Some(key),
                Err(message) => {
                    r.at_path(&path.key("key_hex"), message, None);
                    None
                }
            },
            (None, Some(file)) => {
                let file = base.join(file);
                match std::fs::read_to_string(&file) {
                    Ok(text) => match decode_key(&text) {
                        Ok(key) => Some(key),
                        Err(message) => {
                            r.at_path(
                                &path.key("key_file"),
                                format!("{}: {message}", file.display()),
                                None,
                            );
                            None
                        }
                    },
                    Err(error) => {
                        r.at_path(
                            &path.key("key_file"),
                            format!("cannot read {}: {error}", file.display()),
                            Some(
                                "the file holds the key in hex; the service user must read it"
                                    .into(),
                            ),
                        );
                        None
                    }
                }
            }
        };
        let client_ids = match &p.client_ids {
            Some(ids) if ids.iter().any(String::is_empty) => {
                r.at_path(
                    &path.key("client_ids"),
                    "a ClientId is never empty".into(),
                    None,
                );
                None
            }
            Some(ids) => Some(ids.iter().map(|s| Arc::<str>::from(s.as_str())).collect()),
            None => identity
                .as_ref()
                .map(|id| vec![Arc::<str>::from(id.as_str())]),
        };
        match (identity, key, client_ids) {
            (Some(identity), Some(key), Some(client_ids)) => entries.push(PskEntry {
                identity: identity.into(),
                key,
                client_ids: Arc::from(client_ids),
            }),
            _ => ok = false,
        }
    }
    ok.then_some(entries)
}

/// A key written in hex (whitespace around it ignored). The message never shows the key.
fn decode_key(text: &str) -> Result<PskKey, String> {
    let hex = text.trim();
    if hex.is_empty() {
        return Err("the key is empty".into());
    }
    if !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "the key is not hex (an even number of 0-9a-f digits; {} characters given)",
            hex.len()
        ));
    }
    let bytes: Vec<u8> = hex
        .as_bytes()
        .chunks(2)
        .map(|pair| {
            let digit = |b: u8| char::from(b).to_digit(16).unwrap_or(0) as u8;
            let (hi, lo) = match pair {
                [hi, lo] => (*hi, *lo),
                _ => (b'0', b'0'),
            };
            digit(hi) << 4 | digit(lo)
        })
        .collect();
    if bytes.len() > MAX_KEY {
        return Err(format!("the key is longer than {MAX_KEY} bytes"));
    }
    Ok(PskKey::new(bytes))
}

/// The checks that join `[dtls]` with the listeners: a `dtls_listen` needs keys, and
/// `required` allows plain listeners on loopback only. `plain` are `(path, address)` of the
/// plain listeners, `secure` whether any `dtls_listen` is configured (with its path).
pub(super) fn check_listeners(
    dtls: &DtlsSection,
    plain: &[(KeyPath, SocketAddr)],
    secure: Option<&KeyPath>,
    r: &mut Reporter<'_>,
) {
    if let Some(path) = secure
        && dtls.settings.psk.is_empty()
        && dtls.settings.certificate.is_none()
    {
        r.at_path(
            path,
            "a DTLS listener needs at least one [[psk]] key or a [dtls] certificate".into(),
            Some("add [[psk]] identity = \"dev1\" key_hex = \"...\"".into()),
        );
    }
    if dtls.required {
        for (path, addr) in plain {
            if !addr.ip().is_loopback() {
                r.at_path(
                    path,
                    format!(
                        "`{addr}` is a plain (unencrypted) listener on a non-loopback address \
                         while [dtls] required = true"
                    ),
                    Some("move it to dtls_listen, or bind it to 127.0.0.1 / [::1]".into()),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use std::path::Path;

    use super::super::{Config, LoadError};

    const BASE: &str = r#"
[gateway]
id = 1
state_dir = "/tmp/sg"
[mqttsn]
listen = ["127.0.0.1:1883"]
dtls_listen = ["127.0.0.1:10000"]
[coap]
dtls_listen = ["127.0.0.1"]
[[upstream]]
name = "local"
kind = "mqtt"
url = "mqtt://127.0.0.1:1883"
"#;

    fn errors(text: &str) -> Vec<String> {
        super::super::tests::errors(text)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn psk_entries_and_listeners_compile() {
        let text = format!(
            "{BASE}[dtls]\nmax_sessions = 5\n[[psk]]\nidentity = \"dev1\"\nkey_hex = \"73336372\"\n\
             [[psk]]\nidentity = \"dev2\"\nkey_hex = \"00ff\"\nclient_ids = [\"a\", \"b\"]\n"
        );
        let c = Config::parse(Path::new("test.toml"), &text).unwrap();
        assert_eq!(
            c.mqttsn.dtls_listen,
            vec!["127.0.0.1:10000".parse().unwrap()]
        );
        let coap = c.coap.as_ref().unwrap();
        assert!(coap.listen.is_empty());
        assert_eq!(coap.dtls_listen, vec!["127.0.0.1:5684".parse().unwrap()]);
        let s = &c.dtls.settings;
        assert_eq!(s.max_sessions, 5);
        assert_eq!(s.psk.len(), 2);
        assert_eq!(
            &*s.psk[0].client_ids,
            &[std::sync::Arc::<str>::from("dev1")]
        );
        assert_eq!(s.psk[1].client_ids.len(), 2);
        assert_eq!(s.psk[1].key.len(), 2);
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("73336372") && !shown.contains("s3cr"),
            "{shown}"
        );
        assert!(c.summary().contains("MQTT-SN over DTLS on 127.0.0.1:10000"));
    }

    #[test]
    fn psk_errors_are_located_and_never_show_the_key() {
        let text = format!(
            "{BASE}[[psk]]\nidentity = \"dev1\"\nkey_hex = \"7333637\"\n\
             [[psk]]\nidentity = \"dev1\"\nkey_hex = \"zz\"\n\
             [[psk]]\nidentity = \"dev3\"\n\
             [[psk]]\nidentity = \"dev4\"\nkey_hex = \"00\"\nkey_file = \"k\"\n\
             [[psk]]\nidentity = \"dev5\"\nkey_hex = \"\"\n\
             [[psk]]\nidentity = \"dev6\"\nkey_file = \"/nonexistent/dev6.key\"\n"
        );
        let d = errors(&text);
        let all = d.join("\n");
        assert_eq!(d.len(), 7, "{all}");
        assert!(
            all.contains("test.toml:16:11") && all.contains("not hex"),
            "{all}"
        );
        assert!(all.contains("`dev1` is listed twice"), "{all}");
        assert!(all.contains("has no key"), "{all}");
        assert!(all.contains("not both"), "{all}");
        assert!(all.contains("the key is empty"), "{all}");
        assert!(all.contains("cannot read /nonexistent/dev6.key"), "{all}");
        assert!(!all.contains("7333637") && !all.contains("zz"), "{all}");
    }

    #[test]
    fn a_key_file_holds_hex() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("dev1.key"), "73336372\n").unwrap();
        let text = format!("{BASE}[[psk]]\nidentity = \"dev1\"\nkey_file = \"dev1.key\"\n");
        let c = Config::parse(&dir.path().join("sg.toml"), &text).unwrap();
        assert_eq!(c.dtls.settings.psk[0].key.len(), 4);
    }

    #[test]
    fn dtls_listeners_need_keys_and_required_refuses_public_plain_listeners() {
        let d = errors(BASE);
        assert!(
            d.iter().any(|e| e.contains("needs at least one [[psk]]")),
            "{d:?}"
        );
        let text = BASE.replace("127.0.0.1:1883", "0.0.0.0:1883")
            + "[dtls]\nrequired = true\n[[psk]]\nidentity = \"d\"\nkey_hex = \"00\"\n";
        let d = errors(&text);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(
            d[0].contains("test.toml:6:") && d[0].contains("non-loopback"),
            "{d:?}"
        );
    }

    #[test]
    fn the_reference_config_shows_every_dtls_key_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/sensorgate.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: toml::Table = text.parse().unwrap();
        let mut keys: Vec<&str> = doc["dtls"]
            .as_table()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        // Commented out: they name files.
        keys.extend(["certificate", "private_key", "client_ca"]);
        keys.sort_unstable();
        let mut fields = super::super::diag::fields_of::<super::RawDtls>().to_vec();
        fields.sort_unstable();
        assert_eq!(keys, fields);
        let c = Config::parse(&path, &text).unwrap();
        assert_eq!(*c.dtls.settings, crate::dtls::DtlsSettings::default());
        assert!(!c.dtls.required);
        // The commented [[psk]] example is valid.
        let example = "# [[psk]]\n# identity = \"dev1\"\n# key_hex = \"73336372\"\n\
                       # client_ids = [\"dev1\"]\n";
        assert!(text.contains(example), "the [[psk]] example changed");
        let on = text.replace(example, &example.replace("# ", ""));
        let c = Config::parse(&path, &on).unwrap();
        assert_eq!(c.dtls.settings.psk.len(), 1);
        // Its ClientIds are reserved to it, for every ingress's policy.
        assert!(c.security.is_reserved("dev1") && !c.security.is_reserved("dev2"));
        assert!(std::sync::Arc::ptr_eq(&c.security, &c.mqttsn.core.security));
    }

    #[test]
    fn certificate_keys_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("not.pem"), "hello").unwrap();
        let text = format!(
            "{BASE}[dtls]\ncertificate = \"not.pem\"\nprivate_key = \"absent.key\"\n\
             client_certificates = \"optional\"\n"
        );
        let d = match Config::parse(&dir.path().join("sg.toml"), &text) {
            Err(LoadError::Invalid(d)) => d.iter().map(ToString::to_string).collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        let all = d.join("\n");
        assert!(all.contains("no certificate in it"), "{all}");
        assert!(
            all.contains("absent.key") && all.contains("cannot read"),
            "{all}"
        );
        assert!(all.contains("\"optional\" is not supported"), "{all}");
        let text =
            format!("{BASE}[dtls]\nprivate_key = \"k.pem\"\nclient_certificates = \"required\"\n");
        let d = errors(&text);
        let all = d.join("\n");
        assert!(
            all.contains("certificate and private_key go together"),
            "{all}"
        );
        assert!(all.contains("needs client_ca"), "{all}");
    }

    #[test]
    fn a_dtls_port_clashing_with_a_plain_one_is_refused() {
        let text = BASE.replace("127.0.0.1:10000", "127.0.0.1:1883")
            + "[[psk]]\nidentity = \"d\"\nkey_hex = \"00\"\n";
        let d = errors(&text);
        assert!(d.iter().any(|e| e.contains("takes the UDP port")), "{d:?}");
    }
}
