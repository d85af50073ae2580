//! Certificates for the DTLS layer: the server's certificate and key (ECDSA P-256 or P-384,
//! what `dimpl` signs with), and the verification of a client certificate against
//! `[dtls] client_ca` (rustls' WebPKI verifier with the ring provider, the one the process
//! uses everywhere; `dimpl` checks only that the client holds the certificate's key).
//!
//! Invariants: the private key's bytes are never printed ([`ServerCertificate`]'s `Debug`
//! shows lengths); a client certificate is accepted only when it chains to `client_ca`, is
//! valid at the wall-clock time given, and names a device (subject CN, else a DNS SAN).

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;

use crate::http::tls::device_name;
use crate::identity::{Identity, IdentitySource};

/// The largest PEM file read.
const MAX_PEM_BYTES: u64 = 16 * 1024 * 1024;

/// The server's certificate (DER, one leaf: `dimpl` sends no chain) and its private key
/// (PKCS#8 or SEC1 DER).
#[derive(Clone, PartialEq, Eq)]
pub struct ServerCertificate {
    /// The leaf certificate, DER.
    pub certificate: Arc<[u8]>,
    /// The private key, DER (never printed).
    pub private_key: Arc<[u8]>,
}

impl std::fmt::Debug for ServerCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCertificate")
            .field(
                "certificate",
                &format_args!("<{} bytes>", self.certificate.len()),
            )
            .field(
                "private_key",
                &format_args!("<redacted, {} bytes>", self.private_key.len()),
            )
            .finish()
    }
}

impl ServerCertificate {
    pub(super) fn for_dimpl(&self) -> dimpl::DtlsCertificate {
        dimpl::DtlsCertificate {
            certificate: self.certificate.to_vec(),
            private_key: self.private_key.to_vec(),
        }
    }
}

/// Whether clients must show a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientCertificates {
    /// None is asked for: a certificate-suite client is encrypted but has no proven identity.
    #[default]
    Off,
    /// A certificate signed by `client_ca` is required on the certificate suites (PSK
    /// clients authenticate by their key).
    Required,
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(format!(
            "{}: larger than {MAX_PEM_BYTES} bytes, not a PEM file",
            path.display()
        ));
    }
    Ok(bytes)
}

/// Every certificate in the PEM file at `path` (at least one).
///
/// # Errors
/// A message naming the file.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate in it (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The private key in the PEM file at `path`, checked to be one `dimpl` can sign with.
///
/// # Errors
/// A message naming the file (never the key).
pub fn load_private_key(path: &Path) -> Result<Arc<[u8]>, String> {
    let bytes = read(path)?;
    let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        format!(
            "{}: no usable private key in it ({e}; expected -----BEGIN PRIVATE KEY----- or \
             EC PRIVATE KEY)",
            path.display()
        )
    })?;
    let der = key.secret_der();
    dimpl::crypto::rust_crypto::default_provider()
        .key_provider
        .load_private_key(der)
        .map_err(|_| {
            format!(
                "{}: not an ECDSA P-256 or P-384 key (DTLS signs with ECDSA only)",
                path.display()
            )
        })?;
    Ok(Arc::from(der))
}

/// The verifier of client certificates against `roots`.
///
/// # Errors
/// When rustls refuses the CA certificates.
pub fn verifier(roots: &[CertificateDer<'static>]) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut store = RootCertStore::empty();
    for cert in roots {
        store.add(cert.clone()).map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
        .build()
        .map_err(|e| e.to_string())?;
    Ok(verifier)
}

/// Verifies the client's leaf certificate `der` at wall-clock time `now`; the identity it
/// names (subject CN, else a DNS SAN), which may use that name as its MQTT-SN ClientId.
///
/// # Errors
/// Why it is refused (expired, not signed by the CA, names no device ...).
pub fn verify(
    verifier: &dyn ClientCertVerifier,
    der: &[u8],
    now: SystemTime,
) -> Result<Arc<Identity>, String> {
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| "the clock is before 1970".to_owned())?;
    let cert = CertificateDer::from(der.to_vec());
    verifier
        .verify_client_cert(&cert, &[], UnixTime::since_unix_epoch(secs))
        .map_err(|e| e.to_string())?;
    let name = device_name(der).ok_or_else(|| "the certificate names no device".to_owned())?;
    Ok(Arc::new(Identity {
        client_ids: Some(Arc::from(vec![Arc::clone(&name)])),
        name,
        source: IdentitySource::Certificate,
    }))
}
