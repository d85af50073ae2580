//! Pre-shared keys and what `dimpl` is given to find them, and the hooks that let the layer
//! see what `dimpl` does not report: which PSK identity a client used, and the cookie the
//! layer already checked.
//!
//! Invariants: key bytes never reach a log or a `Debug` output ([`PskKey`] prints its length
//! only); the identity a client presented is recorded for the one `dimpl` call the layer makes
//! on that client's session, and cleared after it (`Capture`).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;

use dimpl::CryptoError;
use dimpl::crypto::{HashAlgorithm, HmacProvider};

use crate::identity::{Identity, IdentitySource};

/// Pre-shared key bytes. `Debug` shows the length only; nothing else prints them.
#[derive(Clone, PartialEq, Eq)]
pub struct PskKey(Arc<[u8]>);

impl PskKey {
    /// Key bytes (never empty: the config refuses an empty key).
    #[must_use]
    pub fn new(bytes: Vec<u8>) -> Self {
        PskKey(Arc::from(bytes))
    }

    /// The key's length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the key is empty (the config never makes one).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for PskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PskKey(<redacted, {} bytes>)", self.0.len())
    }
}

/// One `[[psk]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PskEntry {
    /// The PSK identity the client sends (`identity`).
    pub identity: Arc<str>,
    /// The key (`key_hex` or `key_file`).
    pub key: PskKey,
    /// The MQTT-SN ClientIds the identity may use (`client_ids`).
    pub client_ids: Arc<[Arc<str>]>,
}

/// The identities by their bytes, each with the [`Identity`] a session proven with it gets.
#[derive(Debug, Default)]
pub(super) struct PskTable {
    by_identity: HashMap<Box<[u8]>, (PskKey, Arc<Identity>)>,
}

impl PskTable {
    pub(super) fn new(entries: &[PskEntry]) -> Self {
        let by_identity = entries
            .iter()
            .map(|e| {
                let identity = Identity {
                    name: Arc::clone(&e.identity),
                    source: IdentitySource::Psk,
                    client_ids: Some(Arc::clone(&e.client_ids)),
                };
                (
                    Box::from(e.identity.as_bytes()),
                    (e.key.clone(), Arc::new(identity)),
                )
            })
            .collect();
        PskTable { by_identity }
    }
}

/// What a client presented in its ClientKeyExchange: its identity if the table knows it.
#[derive(Debug, Clone)]
pub(super) enum Presented {
    /// A configured identity (the handshake may still fail on the key).
    Known(Arc<Identity>),
    /// An identity no `[[psk]]` names (`dimpl` goes on with a random key, so it fails).
    Unknown,
    /// A client certificate that verified against `client_ca`.
    Certificate(Arc<Identity>),
}

thread_local! {
    /// The identity the last [`Resolver::resolve`] call saw on this thread (the driver's).
    static PRESENTED: RefCell<Option<Presented>> = const { RefCell::new(None) };
    /// The cookie [`CookieHmac`] answers with while the layer hands a session its verified
    /// ClientHello (`None`: a plain HMAC).
    static COOKIE: Cell<Option<[u8; 32]>> = const { Cell::new(None) };
}

/// `dimpl`'s way to the PSK table; records what each client presented (see [`Capture`]).
pub(super) struct Resolver(pub(super) Arc<PskTable>);

impl dimpl::PskResolver for Resolver {
    fn resolve(&self, identity: &[u8]) -> Option<Vec<u8>> {
        let found = self.0.by_identity.get(identity);
        let presented = match found {
            Some((_, id)) => Presented::Known(Arc::clone(id)),
            None => Presented::Unknown,
        };
        PRESENTED.with(|p| *p.borrow_mut() = Some(presented));
        found.map(|(key, _)| key.0.to_vec())
    }
}

/// Scope of one call into a session: what the client presented during it is returned by
/// [`Capture::presented`]; the cookie, when given, is what `dimpl`'s cookie check computes
/// (the layer has checked it already). Both are cleared when it is dropped.
pub(super) struct Capture;

impl Capture {
    pub(super) fn begin(cookie: Option<[u8; 32]>) -> Self {
        PRESENTED.with(|p| *p.borrow_mut() = None);
        COOKIE.with(|c| c.set(cookie));
        Capture
    }

    pub(super) fn presented(&self) -> Option<Presented> {
        PRESENTED.with(|p| p.borrow_mut().take())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        PRESENTED.with(|p| *p.borrow_mut() = None);
        COOKIE.with(|c| c.set(None));
    }
}

/// The HMAC provider given to `dimpl`: RustCrypto's, except that `hmac_sha256` returns the
/// cookie the layer verified while a [`Capture`] with one is alive. DTLS 1.2 in `dimpl`
/// 0.9 calls `hmac_sha256` for its HelloVerifyRequest cookie only (its PRF and record MACs
/// use the hash and cipher providers), so a session created for a ClientHello whose cookie
/// the layer checked accepts that cookie, and no session exists before it. Checked by the
/// unit tests (a full handshake through the layer).
#[derive(Debug)]
pub(super) struct CookieHmac;

pub(super) static COOKIE_HMAC: CookieHmac = CookieHmac;

impl HmacProvider for CookieHmac {
    fn hmac_sha256(&self, key: &[u8], data: &[u8]) -> Result<[u8; 32], CryptoError> {
        if let Some(cookie) = COOKIE.with(Cell::get) {
            return Ok(cookie);
        }
        let mut out = [0u8; 32];
        self.hmac(HashAlgorithm::SHA256, key, data, &mut out)?;
        Ok(out)
    }

    fn hmac(
        &self,
        hash: HashAlgorithm,
        key: &[u8],
        data: &[u8],
        out: &mut [u8],
    ) -> Result<usize, CryptoError> {
        dimpl::crypto::rust_crypto::default_provider()
            .hmac_provider
            .hmac(hash, key, data, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dimpl::PskResolver;

    #[test]
    fn a_key_never_shows_in_debug() {
        let entry = PskEntry {
            identity: "dev1".into(),
            key: PskKey::new(b"s3cret".to_vec()),
            client_ids: Arc::from(vec![Arc::<str>::from("dev1")]),
        };
        let shown = format!(
            "{entry:?} {:?}",
            PskTable::new(std::slice::from_ref(&entry))
        );
        assert!(
            !shown.contains("s3cret") && !shown.contains("115, 51"),
            "{shown}"
        );
        assert!(shown.contains("redacted, 6 bytes"), "{shown}");
    }

    #[test]
    fn the_resolver_records_what_was_presented() {
        let entry = PskEntry {
            identity: "dev1".into(),
            key: PskKey::new(b"k".to_vec()),
            client_ids: Arc::from(vec![]),
        };
        let resolver = Resolver(Arc::new(PskTable::new(&[entry])));
        let capture = Capture::begin(None);
        assert_eq!(resolver.resolve(b"dev1"), Some(b"k".to_vec()));
        assert!(matches!(capture.presented(), Some(Presented::Known(id)) if &*id.name == "dev1"));
        assert_eq!(resolver.resolve(b"nobody"), None);
        assert!(matches!(capture.presented(), Some(Presented::Unknown)));
        assert!(capture.presented().is_none());
    }

    #[test]
    fn the_cookie_hook_is_a_plain_hmac_outside_a_capture() {
        let plain = COOKIE_HMAC.hmac_sha256(b"key", b"data").unwrap();
        {
            let _capture = Capture::begin(Some([7; 32]));
            assert_eq!(COOKIE_HMAC.hmac_sha256(b"key", b"data").unwrap(), [7; 32]);
        }
        assert_eq!(COOKIE_HMAC.hmac_sha256(b"key", b"data").unwrap(), plain);
        assert_ne!(plain, [7; 32]);
    }
}
