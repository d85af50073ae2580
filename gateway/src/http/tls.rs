//! HTTPS for the HTTP ingress: the rustls server configuration and the device name a client
//! certificate carries.
//!
//! Invariants:
//! - One crypto provider in the process: ring, passed explicitly (never the process default,
//!   which another crate could install differently), with rustls' safe default protocol
//!   versions (TLS 1.2 and 1.3).
//! - ALPN offers `h2` then `http/1.1`, or only `http/1.1` when `[http] http2 = false`; the
//!   server adapter serves whichever the client picked (hyper-util's auto builder sees the
//!   HTTP/2 preface).
//! - Client certificates: `off` asks for none; `optional` verifies one when sent (against
//!   `client_ca`) and lets the connection through without; `required` fails the handshake
//!   without a certificate signed by `client_ca`.
//! - Files are read once, at start (and by `check-config`); every error names the config key
//!   and the file, and what is wrong with it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::config::{ClientCertMode, TlsFiles};

/// The largest PEM file read (a certificate chain, a key or a CA bundle; the system bundle
/// of a distribution is about 200 KiB).
pub const MAX_PEM_BYTES: u64 = 16 * 1024 * 1024;

/// The longest client-certificate device name taken (`[[http.device]] id` is shorter).
pub const MAX_DEVICE_NAME: usize = 256;

/// What is wrong with the TLS files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("{key} file {}: cannot read it: {error}", path.display())]
    Unreadable {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// The file is larger than [`MAX_PEM_BYTES`].
    #[error("{key} file {}: larger than {MAX_PEM_BYTES} bytes, not a PEM file", path.display())]
    TooLarge {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The file is not valid PEM.
    #[error("{key} file {}: not valid PEM: {reason}", path.display())]
    Pem {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        reason: String,
    },
    /// No `CERTIFICATE` block in the file.
    #[error("{key} file {}: no certificate in it (expected -----BEGIN CERTIFICATE-----)", path.display())]
    NoCertificate {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// No private key block in the file.
    #[error(
        "{key} file {}: no private key in it (expected -----BEGIN PRIVATE KEY-----, \
         RSA PRIVATE KEY or EC PRIVATE KEY)",
        path.display()
    )]
    NoKey {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// rustls refused what the file holds (an unsupported key, a key that does not match the
    /// certificate, a CA certificate it cannot use).
    #[error("{key} file {}: rejected by rustls: {reason}", path.display())]
    Rejected {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// rustls' reason.
        reason: String,
    },
    /// Client certificates are asked for without `client_ca` (the config check refuses this;
    /// kept so the function never assumes it).
    #[error("[http] client_cert = \"{0}\" needs [http] client_ca")]
    NoClientCa(&'static str),
}

impl TlsError {
    /// The file the error is about, if any.
    #[must_use]
    pub fn path(&self) -> Option<&Path> {
        match self {
            TlsError::Unreadable { path, .. }
            | TlsError::TooLarge { path, .. }
            | TlsError::Pem { path, .. }
            | TlsError::NoCertificate { path, .. }
            | TlsError::NoKey { path, .. }
            | TlsError::Rejected { path, .. } => Some(path),
            TlsError::NoClientCa(_) => None,
        }
    }
}

/// The config keys, as errors name them.
const CERT_KEY: &str = "[http] tls_cert";
const KEY_KEY: &str = "[http] tls_key";
const CA_KEY: &str = "[http] client_ca";

/// The ring provider, the one every TLS user in the process names.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the HTTPS server configuration from `files`; `http2` adds `h2` to ALPN.
///
/// # Errors
/// A [`TlsError`] naming the file and what is wrong with it.
pub fn server_config(files: &TlsFiles, http2: bool) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(CERT_KEY, &files.cert)?;
    let key = private_key(&files.key)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rejected {
            key: CERT_KEY,
            path: files.cert.clone(),
            reason: e.to_string(),
        })?;
    let builder = match (files.client_cert, &files.client_ca) {
        (ClientCertMode::Off, _) => builder.with_no_client_auth(),
        (ClientCertMode::Optional, None) => return Err(TlsError::NoClientCa("optional")),
        (ClientCertMode::Required, None) => return Err(TlsError::NoClientCa("required")),
        (mode, Some(ca)) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(CA_KEY, ca)? {
                roots.add(cert).map_err(|e| TlsError::Rejected {
                    key: CA_KEY,
                    path: ca.clone(),
                    reason: e.to_string(),
                })?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider));
            let verifier = if mode == ClientCertMode::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier.build().map_err(|e| TlsError::Rejected {
                key: CA_KEY,
                path: ca.clone(),
                reason: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    // rustls checks here that the key belongs to the chain's first certificate.
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Rejected {
            key: KEY_KEY,
            path: files.key.clone(),
            reason: e.to_string(),
        })?;
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(config))
}

/// The device a client certificate names: its subject's CN, else its first DNS
/// subjectAltName. `None` when it has neither, either is empty, longer than
/// [`MAX_DEVICE_NAME`] or holds control characters, or the DER does not parse (rustls
/// verified it already, so that does not happen for a connection's certificate).
#[must_use]
pub fn device_name(cert_der: &[u8]) -> Option<Arc<str>> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok());
    let name = match cn {
        Some(cn) => cn,
        None => cert
            .subject_alternative_name()
            .ok()
            .flatten()?
            .value
            .general_names
            .iter()
            .find_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(dns) => Some(*dns),
                _ => None,
            })?,
    };
    let usable =
        !name.is_empty() && name.len() <= MAX_DEVICE_NAME && !name.chars().any(char::is_control);
    usable.then(|| Arc::from(name))
}

/// Reads `path` (at most [`MAX_PEM_BYTES`]).
fn read_pem(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read as _;
    let unreadable = |error| TlsError::Unreadable {
        key,
        path: path.to_owned(),
        error,
    };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::TooLarge {
            key,
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

/// Every certificate in the PEM file at `path`, at least one.
fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_pem(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            key,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            key,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in the PEM file at `path`.
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_pem(KEY_KEY, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            key: KEY_KEY,
            path: path.to_owned(),
        },
        other => TlsError::Pem {
            key: KEY_KEY,
            path: path.to_owned(),
            reason: other.to_string(),
        },
    })
}

/// A test PKI made by the `openssl` CLI (P-256): a CA, a server certificate for
/// `IP:127.0.0.1`, a client certificate with `CN=dev1` from the CA and one from a second CA.
#[cfg(test)]
pub(crate) mod test_pki {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// The files of [`make`].
    pub(crate) struct Pki {
        pub(crate) ca: PathBuf,
        pub(crate) server_cert: PathBuf,
        pub(crate) server_key: PathBuf,
        pub(crate) client_cert: PathBuf,
        pub(crate) client_key: PathBuf,
        /// CN=dev1 signed by another CA.
        pub(crate) stranger_cert: PathBuf,
        pub(crate) stranger_key: PathBuf,
    }

    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
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
                name,
            ],
        );
    }

    fn ca(dir: &Path, name: &str) {
        key(dir, &format!("{name}.key"));
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
    }

    fn leaf(dir: &Path, name: &str, subject: &str, ca: &str, ext: &str, serial: &str) {
        key(dir, &format!("{name}.key"));
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-subj",
                subject,
                "-out",
                &format!("{name}.csr"),
            ],
        );
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-set_serial",
                serial,
                "-days",
                "30",
                "-sha256",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }

    /// Makes the PKI in `dir`.
    pub(crate) fn make(dir: &Path) -> Pki {
        ca(dir, "ca");
        ca(dir, "other-ca");
        leaf(
            dir,
            "server",
            "/CN=sensorgate-test",
            "ca",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n",
            "10",
        );
        let client_ext = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                          extendedKeyUsage=clientAuth\n";
        leaf(dir, "client", "/CN=dev1", "ca", client_ext, "11");
        leaf(dir, "stranger", "/CN=dev1", "other-ca", client_ext, "12");
        Pki {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            stranger_cert: dir.join("stranger.pem"),
            stranger_key: dir.join("stranger.key"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(pki: &test_pki::Pki, mode: ClientCertMode) -> TlsFiles {
        TlsFiles {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            client_ca: (mode != ClientCertMode::Off).then(|| pki.ca.clone()),
            client_cert: mode,
        }
    }

    #[test]
    fn a_config_is_built_for_every_client_cert_mode_with_the_alpn_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let pki = test_pki::make(dir.path());
        for mode in [
            ClientCertMode::Off,
            ClientCertMode::Optional,
            ClientCertMode::Required,
        ] {
            let config = server_config(&files(&pki, mode), true).unwrap();
            assert_eq!(
                config.alpn_protocols,
                [b"h2".to_vec(), b"http/1.1".to_vec()]
            );
        }
        let config = server_config(&files(&pki, ClientCertMode::Off), false).unwrap();
        assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]);
    }

    #[test]
    fn a_missing_file_is_named_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let pki = test_pki::make(dir.path());
        let mut f = files(&pki, ClientCertMode::Off);
        f.cert = dir.path().join("absent.pem");
        let error = server_config(&f, true).unwrap_err();
        assert!(matches!(error, TlsError::Unreadable { .. }), "{error}");
        let text = error.to_string();
        assert!(text.contains("[http] tls_cert"), "{text}");
        assert!(text.contains("absent.pem"), "{text}");
        assert_eq!(error.path(), Some(f.cert.as_path()));
    }

    #[test]
    fn a_key_file_without_a_key_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let pki = test_pki::make(dir.path());
        let mut f = files(&pki, ClientCertMode::Off);
        f.key = pki.server_cert.clone();
        let error = server_config(&f, true).unwrap_err();
        assert!(matches!(error, TlsError::NoKey { .. }), "{error}");
        let text = error.to_string();
        assert!(text.contains("[http] tls_key"), "{text}");
        assert!(text.contains("no private key"), "{text}");
    }

    #[test]
    fn a_cert_file_without_a_certificate_and_a_mismatched_key_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pki = test_pki::make(dir.path());
        let mut f = files(&pki, ClientCertMode::Off);
        f.cert = pki.server_key.clone();
        let error = server_config(&f, true).unwrap_err();
        assert!(matches!(error, TlsError::NoCertificate { .. }), "{error}");
        assert!(error.to_string().contains("no certificate"), "{error}");

        let mut f = files(&pki, ClientCertMode::Off);
        f.key = pki.client_key.clone();
        let error = server_config(&f, true).unwrap_err();
        assert!(matches!(error, TlsError::Rejected { .. }), "{error}");
        assert!(error.to_string().contains("rejected by rustls"), "{error}");
    }

    #[test]
    fn client_certs_without_a_ca_are_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let pki = test_pki::make(dir.path());
        let mut f = files(&pki, ClientCertMode::Required);
        f.client_ca = None;
        let error = server_config(&f, true).unwrap_err();
        assert!(matches!(error, TlsError::NoClientCa("required")), "{error}");
    }

    #[test]
    fn the_device_name_is_the_cn_else_the_first_dns_san() {
        let dir = tempfile::tempdir().unwrap();
        let pki = test_pki::make(dir.path());
        let der = |path: &Path| CertificateDer::from_pem_file(path).unwrap();
        assert_eq!(device_name(&der(&pki.client_cert)).as_deref(), Some("dev1"));
        // No CN: the first DNS SAN.
        std::fs::write(
            dir.path().join("san.ext"),
            "subjectAltName=IP:10.0.0.1,DNS:dev7.example,DNS:dev8.example\n",
        )
        .unwrap();
        let run = |args: &[&str]| {
            let ok = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap()
                .status
                .success();
            assert!(ok, "{args:?}");
        };
        run(&[
            "req",
            "-new",
            "-key",
            "client.key",
            "-subj",
            "/O=fleet",
            "-out",
            "san.csr",
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            "san.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "20",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            "-out",
            "san.pem",
        ]);
        assert_eq!(
            device_name(&der(&dir.path().join("san.pem"))).as_deref(),
            Some("dev7.example")
        );
        // Neither: no name.
        std::fs::write(dir.path().join("none.ext"), "basicConstraints=CA:FALSE\n").unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "san.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "21",
            "-days",
            "1",
            "-extfile",
            "none.ext",
            "-out",
            "none.pem",
        ]);
        assert_eq!(device_name(&der(&dir.path().join("none.pem"))), None);
        assert_eq!(device_name(b"not a certificate"), None);
    }
}
