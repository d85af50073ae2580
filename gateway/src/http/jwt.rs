//! JWT bearer tokens (`[http.jwt]`): the verification keys (one PEM public key or a local JWK
//! Set), the token pre-parser, and the check of a token into a device identity and its topic
//! scope.
//!
//! Pure: no clock (the caller passes the Unix time), no IO except [`JwtVerifier::load`], which
//! reads the key file (at preflight, at start and on SIGHUP, never per request).
//!
//! Check order (each step's failure is its own [`JwtError`], the 401's `token_error`):
//!
//! ```text
//! length <= max_token_size -> three base64url parts -> JOSE header (<= max_token_header_size,
//! JSON object) -> alg in `algorithms` (never none / HS*) -> no `crit` -> key by kid (and alg's
//! key type) -> signature (ring) -> claims JSON object -> exp (required) and nbf with leeway ->
//! aud contains `audience` -> iss (when configured) -> identity claim -> scope claims
//! ```
//!
//! Invariants:
//! - No `alg` but the configured ones reaches a key: `none` and the HMAC algorithms are refused
//!   before a key is chosen, and the key's type must fit the algorithm (an RSA public key is
//!   never used as an HMAC secret: algorithm confusion is impossible by construction, and the
//!   ring provider below implements no HMAC at all).
//! - Claims are decoded only after the signature checked out; the header is decoded before
//!   (it chooses the key) and is bounded.
//! - Tokens, keys and claims are never logged nor Debug-printed.
//!
//! Crypto: `jsonwebtoken` 10 parses the PEM and JWK keys and dispatches the JWS verification
//! to a process-wide `CryptoProvider`. It is built without its `aws_lc_rs` and `rust_crypto`
//! features; [`RING_PROVIDER`] implements RS256 and ES256 verification with ring, the crate the
//! gateway's TLS already uses (one crypto library, no C toolchain, no RustCrypto `rsa`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::crypto::{CryptoProvider, JwkUtils, JwtSigner, JwtVerifier as JwsVerifier};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse, ThumbprintHash,
};
use jsonwebtoken::signature::{self, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::{JwtAlgorithm, JwtKeyFile, JwtSpec, MAX_DEVICE_ID_LEN};

/// Largest key file read (a PEM key or a JWK Set), in bytes.
pub const MAX_KEY_FILE_SIZE: u64 = 1 << 20;

/// Most prefixes one scope claim may hold.
pub const MAX_SCOPE_PREFIXES: usize = 64;

/// The identity no token may claim (requests without credentials).
const ANONYMOUS_ID: &str = crate::config::ANONYMOUS_ID;

// ---------------------------------------------------------------------------------------------
// Errors.

/// Why a JWT is refused (the 401's `token_error`, and a counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts, a header or claims part that is not a JSON object, a
    /// registered claim of the wrong type.
    #[error("the token is not a well-formed JWT")]
    Malformed,
    /// Longer than `max_token_size`, or a header beyond `max_token_header_size`.
    #[error("the token is larger than the limit")]
    TooLarge,
    /// `alg` is `none`, an HMAC algorithm, or any other not in `algorithms`.
    #[error("the token's algorithm is not allowed")]
    AlgorithmNotAllowed,
    /// The header has `crit` extensions (none is understood, RFC 7515 section 4.1.11).
    #[error("the token has critical header extensions this gateway does not understand")]
    UnsupportedHeader,
    /// No key has the token's `kid` (or, without one, no single key fits its algorithm).
    #[error("no configured key has the token's kid and algorithm")]
    UnknownKid,
    /// The signature does not verify with the chosen key.
    #[error("the token's signature does not verify")]
    BadSignature,
    /// `exp` (with the leeway) is past.
    #[error("the token has expired")]
    Expired,
    /// `nbf` (with the leeway) is in the future.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `aud` does not hold the configured audience.
    #[error("the token is for another audience")]
    WrongAudience,
    /// `iss` is not the configured issuer.
    #[error("the token is from another issuer")]
    WrongIssuer,
    /// `exp`, `aud`, `iss` (when configured) or the identity claim is absent.
    #[error("the token lacks a required claim")]
    MissingClaim,
    /// The identity claim is not a usable device id, or a scope claim is not a list of topic
    /// prefixes.
    #[error("a claim of the token has an unusable value")]
    BadClaim,
}

impl JwtError {
    /// Every reason, in counter order.
    pub const ALL: [JwtError; 12] = [
        JwtError::Malformed,
        JwtError::TooLarge,
        JwtError::AlgorithmNotAllowed,
        JwtError::UnsupportedHeader,
        JwtError::UnknownKid,
        JwtError::BadSignature,
        JwtError::Expired,
        JwtError::NotYetValid,
        JwtError::WrongAudience,
        JwtError::WrongIssuer,
        JwtError::MissingClaim,
        JwtError::BadClaim,
    ];

    /// The stable code (`token_error` in the 401 body, `error_description` of
    /// `WWW-Authenticate`).
    #[must_use]
    pub fn code(self) -> &'static str {
        match self {
            JwtError::Malformed => "malformed",
            JwtError::TooLarge => "too_large",
            JwtError::AlgorithmNotAllowed => "algorithm_not_allowed",
            JwtError::UnsupportedHeader => "unsupported_header",
            JwtError::UnknownKid => "unknown_kid",
            JwtError::BadSignature => "bad_signature",
            JwtError::Expired => "expired",
            JwtError::NotYetValid => "not_yet_valid",
            JwtError::WrongAudience => "wrong_audience",
            JwtError::WrongIssuer => "wrong_issuer",
            JwtError::MissingClaim => "missing_claim",
            JwtError::BadClaim => "bad_claim",
        }
    }

    /// The counter name (`sensorgate_ingress_events_total{protocol="http",event=..}`).
    #[must_use]
    pub fn event(self) -> &'static str {
        match self {
            JwtError::Malformed => "jwt_refused_malformed",
            JwtError::TooLarge => "jwt_refused_too_large",
            JwtError::AlgorithmNotAllowed => "jwt_refused_algorithm_not_allowed",
            JwtError::UnsupportedHeader => "jwt_refused_unsupported_header",
            JwtError::UnknownKid => "jwt_refused_unknown_kid",
            JwtError::BadSignature => "jwt_refused_bad_signature",
            JwtError::Expired => "jwt_refused_expired",
            JwtError::NotYetValid => "jwt_refused_not_yet_valid",
            JwtError::WrongAudience => "jwt_refused_wrong_audience",
            JwtError::WrongIssuer => "jwt_refused_wrong_issuer",
            JwtError::MissingClaim => "jwt_refused_missing_claim",
            JwtError::BadClaim => "jwt_refused_bad_claim",
        }
    }

    /// Its position in [`Self::ALL`].
    #[must_use]
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|e| *e == self).unwrap_or(0)
    }
}

/// Why the key file cannot be used (preflight, start, SIGHUP). Names the config key and the
/// file; never prints key material.
#[derive(Debug, thiserror::Error)]
pub enum JwtKeyError {
    /// The file cannot be read.
    #[error("[http.jwt] {key}: cannot read {}: {error}", path.display())]
    Read {
        /// `public_key` or `jwks`.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// The file is larger than [`MAX_KEY_FILE_SIZE`].
    #[error("[http.jwt] {key}: {} is larger than {MAX_KEY_FILE_SIZE} bytes", path.display())]
    TooLarge {
        /// `public_key` or `jwks`.
        key: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The file does not hold what the key says (the reason names what is wrong).
    #[error("[http.jwt] {key}: {}: {reason}", path.display())]
    Invalid {
        /// `public_key` or `jwks`.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

// ---------------------------------------------------------------------------------------------
// The ring provider.

/// The `jsonwebtoken` crypto provider of the gateway: RS256 and ES256 verification with ring.
/// Signing and every other algorithm are errors (never panics).
pub static RING_PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: no_signer,
    verifier_factory: ring_verifier,
    jwk_utils: JwkUtils {
        extract_rsa_public_key_components: |_| Err(ErrorKind::InvalidKeyFormat.into()),
        extract_ec_public_key_coordinates: |_, _| Err(ErrorKind::InvalidKeyFormat.into()),
        compute_digest: |data, hash| {
            let algorithm = match hash {
                ThumbprintHash::SHA256 => &ring::digest::SHA256,
                ThumbprintHash::SHA384 => &ring::digest::SHA384,
                ThumbprintHash::SHA512 => &ring::digest::SHA512,
            };
            ring::digest::digest(algorithm, data).as_ref().to_vec()
        },
    },
};

/// Installs [`RING_PROVIDER`] as `jsonwebtoken`'s process default (once). Returns whether it
/// is the one in force (`false`: another provider was installed first; verification then
/// refuses every token rather than trusting an unknown provider).
fn ring_provider_installed() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| RING_PROVIDER.install_default().is_ok())
}

fn no_signer(_: &Algorithm, _: &EncodingKey) -> jsonwebtoken::errors::Result<Box<dyn JwtSigner>> {
    Err(ErrorKind::InvalidAlgorithm.into())
}

fn ring_verifier(
    algorithm: &Algorithm,
    key: &DecodingKey,
) -> jsonwebtoken::errors::Result<Box<dyn JwsVerifier>> {
    match (algorithm, key.family()) {
        (Algorithm::RS256, AlgorithmFamily::Rsa) => Ok(Box::new(RingRs256(key.clone()))),
        (Algorithm::ES256, AlgorithmFamily::Ec) => Ok(Box::new(RingEs256(key.clone()))),
        _ => Err(ErrorKind::InvalidAlgorithm.into()),
    }
}

/// RS256 with ring (RSA keys of 2048..=8192 bits).
struct RingRs256(DecodingKey);

impl Verifier<Vec<u8>> for RingRs256 {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        use ring::signature::{RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents};
        let ok = match self.0.kind() {
            DecodingKeyKind::SecretOrDer(der) => {
                ring::signature::UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, der)
                    .verify(msg, signature)
            }
            DecodingKeyKind::RsaModulusExponent { n, e } => {
                RsaPublicKeyComponents { n, e }.verify(&RSA_PKCS1_2048_8192_SHA256, msg, signature)
            }
        };
        ok.map_err(|_| signature::Error::new())
    }
}

impl JwsVerifier for RingRs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::RS256
    }
}

/// ES256 with ring (the uncompressed P-256 point; the JWS signature is `r || s`).
struct RingEs256(DecodingKey);

impl Verifier<Vec<u8>> for RingEs256 {
    fn verify(&self, msg: &[u8], signature: &Vec<u8>) -> Result<(), signature::Error> {
        match self.0.kind() {
            DecodingKeyKind::SecretOrDer(point) => ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P256_SHA256_FIXED,
                point,
            )
            .verify(msg, signature)
            .map_err(|_| signature::Error::new()),
            DecodingKeyKind::RsaModulusExponent { .. } => Err(signature::Error::new()),
        }
    }
}

impl JwsVerifier for RingEs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::ES256
    }
}

// ---------------------------------------------------------------------------------------------
// Keys.

/// One verification key.
struct Key {
    /// The JWK's `kid`; `None` for the PEM key (and JWKs without one).
    kid: Option<String>,
    /// The algorithm the key is for (from its type, and its JWK `alg` when given).
    alg: JwtAlgorithm,
    /// The key, in the form `jsonwebtoken` hands to the provider.
    key: DecodingKey,
}

/// The keys and rules of `[http.jwt]`, ready to check tokens. Made by [`Self::load`] (reads
/// the key file) at start and on every SIGHUP; immutable afterwards (a reload makes a new one).
pub struct JwtVerifier {
    spec: JwtSpec,
    keys: Vec<Key>,
    /// SHA-256 of the key file, to tell a rotated file from the same one in reload notes.
    file_digest: [u8; 32],
}

impl std::fmt::Debug for JwtVerifier {
    /// Key material is never printed: the file and the number of keys only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("file", &self.spec.keys.path())
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

/// What a verified token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtGrant {
    /// The device identity (the identity claim).
    pub identity: String,
    /// Topic prefixes it may publish to.
    pub publish: Vec<String>,
    /// Filter prefixes it may subscribe to.
    pub subscribe: Vec<String>,
}

impl JwtVerifier {
    /// Reads and checks the key file of `spec`.
    ///
    /// # Errors
    /// [`JwtKeyError`] naming the key and the file: unreadable, too large, not a PEM public
    /// key of an allowed algorithm's type, not a JWK Set, too many keys, a symmetric key, a
    /// duplicate `kid`, no usable key.
    pub fn load(spec: &JwtSpec) -> Result<Self, JwtKeyError> {
        let bytes = read_bounded(spec.keys.key(), spec.keys.path())?;
        Self::from_bytes(spec, &bytes)
    }

    /// [`Self::load`] from the file's bytes.
    ///
    /// # Errors
    /// As [`Self::load`].
    pub fn from_bytes(spec: &JwtSpec, bytes: &[u8]) -> Result<Self, JwtKeyError> {
        let invalid = |reason: String| JwtKeyError::Invalid {
            key: spec.keys.key(),
            path: spec.keys.path().to_owned(),
            reason,
        };
        let keys = match &spec.keys {
            JwtKeyFile::PublicKey(_) => vec![pem_key(spec, bytes).map_err(invalid)?],
            JwtKeyFile::Jwks(_) => jwks_keys(spec, bytes).map_err(invalid)?,
        };
        let mut file_digest = [0u8; 32];
        file_digest.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
        Ok(JwtVerifier {
            spec: spec.clone(),
            keys,
            file_digest,
        })
    }

    /// The rules it checks with.
    #[must_use]
    pub fn spec(&self) -> &JwtSpec {
        &self.spec
    }

    /// Number of keys.
    #[must_use]
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Whether `other` was loaded from the same file contents.
    #[must_use]
    pub fn same_keys(&self, other: &JwtVerifier) -> bool {
        self.file_digest == other.file_digest
    }

    /// Checks `token` at Unix time `now_secs`; see the module doc for the order.
    ///
    /// # Errors
    /// The first check that fails.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<JwtGrant, JwtError> {
        let parsed = pre_parse(
            token,
            self.spec.max_token_size,
            self.spec.max_token_header_size,
        )?;
        let alg = match parsed.header.alg.as_str() {
            "RS256" => JwtAlgorithm::Rs256,
            "ES256" => JwtAlgorithm::Es256,
            _ => return Err(JwtError::AlgorithmNotAllowed),
        };
        if !self.spec.algorithms.contains(&alg) {
            return Err(JwtError::AlgorithmNotAllowed);
        }
        if parsed.header.crit.is_some() {
            return Err(JwtError::UnsupportedHeader);
        }
        let key = self.key_for(parsed.header.kid.as_deref(), alg)?;
        if !ring_provider_installed() {
            return Err(JwtError::BadSignature);
        }
        let algorithm = match alg {
            JwtAlgorithm::Rs256 => Algorithm::RS256,
            JwtAlgorithm::Es256 => Algorithm::ES256,
        };
        match jsonwebtoken::crypto::verify(
            parsed.signature,
            parsed.signing_input.as_bytes(),
            &key.key,
            algorithm,
        ) {
            Ok(true) => {}
            Ok(false) | Err(_) => return Err(JwtError::BadSignature),
        }
        let claims = decode_object(parsed.claims)?;
        self.check_claims(&claims, now_secs)
    }

    /// The key for `kid` and `alg`: by `kid` when the token names one (a PEM key has none and
    /// takes any); without a `kid`, the only key of `alg`'s type.
    fn key_for(&self, kid: Option<&str>, alg: JwtAlgorithm) -> Result<&Key, JwtError> {
        let fits = |k: &&Key| k.alg == alg;
        let mut candidates = self
            .keys
            .iter()
            .filter(fits)
            .filter(|k| match (kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                (Some(_), None) => matches!(self.spec.keys, JwtKeyFile::PublicKey(_)),
                (None, _) => true,
            });
        let first = candidates.next().ok_or(JwtError::UnknownKid)?;
        if kid.is_none() && candidates.next().is_some() {
            // Several keys could be meant: the token must say which.
            return Err(JwtError::UnknownKid);
        }
        Ok(first)
    }

    /// The registered claims, then the identity and scope claims.
    fn check_claims(&self, claims: &Map<String, Value>, now: u64) -> Result<JwtGrant, JwtError> {
        let leeway = self.spec.leeway.as_secs();
        let exp = numeric_date(claims.get("exp"))?.ok_or(JwtError::MissingClaim)?;
        if exp.saturating_add(leeway) <= now {
            return Err(JwtError::Expired);
        }
        if let Some(nbf) = numeric_date(claims.get("nbf"))?
            && nbf > now.saturating_add(leeway)
        {
            return Err(JwtError::NotYetValid);
        }
        match claims.get("aud") {
            None => return Err(JwtError::MissingClaim),
            Some(Value::String(aud)) => {
                if *aud != self.spec.audience {
                    return Err(JwtError::WrongAudience);
                }
            }
            Some(Value::Array(list)) => {
                if !list.iter().all(Value::is_string) {
                    return Err(JwtError::Malformed);
                }
                if !list.iter().any(|a| a.as_str() == Some(&self.spec.audience)) {
                    return Err(JwtError::WrongAudience);
                }
            }
            Some(_) => return Err(JwtError::Malformed),
        }
        if let Some(issuer) = &self.spec.issuer {
            match claims.get("iss") {
                None => return Err(JwtError::MissingClaim),
                Some(Value::String(iss)) if iss == issuer => {}
                Some(Value::String(_)) => return Err(JwtError::WrongIssuer),
                Some(_) => return Err(JwtError::Malformed),
            }
        }
        let identity = match claims.get(&self.spec.identity_claim) {
            None => return Err(JwtError::MissingClaim),
            Some(Value::String(id))
                if !id.is_empty()
                    && id.len() <= MAX_DEVICE_ID_LEN
                    && !id.chars().any(char::is_control)
                    && id != ANONYMOUS_ID =>
            {
                id.clone()
            }
            Some(_) => return Err(JwtError::BadClaim),
        };
        let publish = scope(
            claims.get(&self.spec.publish_claim),
            &self.spec.default_publish,
        )?;
        let subscribe = scope(
            claims.get(&self.spec.subscribe_claim),
            &self.spec.default_subscribe,
        )?;
        Ok(JwtGrant {
            identity,
            publish,
            subscribe,
        })
    }
}

/// Reads at most [`MAX_KEY_FILE_SIZE`] bytes of `path`.
fn read_bounded(key: &'static str, path: &Path) -> Result<Vec<u8>, JwtKeyError> {
    use std::io::Read as _;
    let read = |error| JwtKeyError::Read {
        key,
        path: path.to_owned(),
        error,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let mut bytes = Vec::new();
    file.take(MAX_KEY_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_KEY_FILE_SIZE {
        return Err(JwtKeyError::TooLarge {
            key,
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

/// The PEM public key: RSA (`PUBLIC KEY` or `RSA PUBLIC KEY`) for RS256, EC P-256 for ES256.
fn pem_key(spec: &JwtSpec, bytes: &[u8]) -> Result<Key, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "is not a PEM text file".to_owned())?;
    if text.contains("PRIVATE KEY") {
        return Err(
            "holds a private key: give the gateway the public key only (openssl \
                    pkey -in key.pem -pubout)"
                .into(),
        );
    }
    let allows = |a: JwtAlgorithm| spec.algorithms.contains(&a);
    if let Ok(key) = DecodingKey::from_rsa_pem(bytes) {
        if !rsa_key_usable(&key) {
            return Err("is an RSA key ring does not accept (2048..=8192 bits)".into());
        }
        if !allows(JwtAlgorithm::Rs256) {
            return Err("is an RSA key, but algorithms does not list RS256".into());
        }
        return Ok(Key {
            kid: None,
            alg: JwtAlgorithm::Rs256,
            key,
        });
    }
    if let Ok(key) = DecodingKey::from_ec_pem(bytes) {
        if !p256_point_usable(&key) {
            return Err("is an EC key, but not on P-256 (ES256 needs P-256)".into());
        }
        if !allows(JwtAlgorithm::Es256) {
            return Err("is an EC key, but algorithms does not list ES256".into());
        }
        return Ok(Key {
            kid: None,
            alg: JwtAlgorithm::Es256,
            key,
        });
    }
    Err("is not a PEM RSA or EC public key (-----BEGIN PUBLIC KEY-----)".into())
}

/// Whether ring takes the RSA key (checked with a dummy verification: a bad signature is
/// fine, a rejected key is not distinguishable here, so the modulus size is checked).
fn rsa_key_usable(key: &DecodingKey) -> bool {
    let bits = match key.kind() {
        DecodingKeyKind::RsaModulusExponent { n, .. } => {
            n.iter().skip_while(|b| **b == 0).count() * 8
        }
        DecodingKeyKind::SecretOrDer(der) => rsa_der_modulus_bits(der).unwrap_or(0),
    };
    (2048..=8192).contains(&bits)
}

/// The modulus size of a PKCS#1 `RSAPublicKey` DER (SEQUENCE { INTEGER n, INTEGER e }).
fn rsa_der_modulus_bits(der: &[u8]) -> Option<usize> {
    fn header(bytes: &[u8], tag: u8) -> Option<(usize, &[u8])> {
        let (&t, rest) = bytes.split_first()?;
        if t != tag {
            return None;
        }
        let (&first, rest) = rest.split_first()?;
        if first < 0x80 {
            return Some((usize::from(first), rest));
        }
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (len_bytes, rest) = rest.split_at(n);
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        Some((len, rest))
    }
    let (_, seq) = header(der, 0x30)?;
    let (len, rest) = header(seq, 0x02)?;
    let n = rest.get(..len)?;
    Some(n.iter().skip_while(|b| **b == 0).count() * 8)
}

/// Whether the EC key is an uncompressed P-256 point (65 bytes, `04 || x || y`).
fn p256_point_usable(key: &DecodingKey) -> bool {
    match key.kind() {
        DecodingKeyKind::SecretOrDer(point) => point.len() == 65 && point.first() == Some(&4),
        DecodingKeyKind::RsaModulusExponent { .. } => false,
    }
}

/// The keys of a JWK Set (`{"keys": [...]}`): RSA for RS256, EC P-256 for ES256; each with a
/// distinct `kid` when there are several. Keys of other types or for other algorithms are
/// refused (a set for this gateway holds what it verifies with).
fn jwks_keys(spec: &JwtSpec, bytes: &[u8]) -> Result<Vec<Key>, String> {
    #[derive(Deserialize)]
    struct Set {
        keys: Vec<Value>,
    }
    let set: Set = serde_json::from_slice(bytes)
        .map_err(|e| format!("is not a JWK Set ({{\"keys\": [...]}}): {e}"))?;
    if set.keys.is_empty() {
        return Err("holds no key".into());
    }
    if set.keys.len() > spec.max_keys {
        return Err(format!(
            "holds {} keys, more than max_keys = {}",
            set.keys.len(),
            spec.max_keys
        ));
    }
    let several = set.keys.len() > 1;
    let mut kids = HashSet::new();
    let mut out = Vec::new();
    for (i, value) in set.keys.into_iter().enumerate() {
        let at = |m: &str| format!("keys[{i}]: {m}");
        if value.get("d").is_some() {
            return Err(at(
                "holds a private key (`d`): publish the public keys only",
            ));
        }
        let jwk: Jwk = serde_json::from_value(value).map_err(|e| at(&format!("{e}")))?;
        let (alg, key) = match &jwk.algorithm {
            AlgorithmParameters::RSA(rsa) => {
                let key = DecodingKey::from_rsa_components(&rsa.n, &rsa.e)
                    .map_err(|_| at("n or e is not base64url"))?;
                if !rsa_key_usable(&key) {
                    return Err(at("an RSA key ring does not accept (2048..=8192 bits)"));
                }
                (JwtAlgorithm::Rs256, key)
            }
            AlgorithmParameters::EllipticCurve(ec) => {
                if ec.curve != EllipticCurve::P256 {
                    return Err(at("an EC key not on P-256 (ES256 needs P-256)"));
                }
                let key = DecodingKey::from_ec_components(&ec.x, &ec.y)
                    .map_err(|_| at("x or y is not base64url"))?;
                if !p256_point_usable(&key) {
                    return Err(at("x and y are not 32 bytes each"));
                }
                (JwtAlgorithm::Es256, key)
            }
            AlgorithmParameters::OctetKey(_) => {
                return Err(at(
                    "a symmetric (`oct`) key: HMAC tokens are never accepted",
                ));
            }
            AlgorithmParameters::OctetKeyPair(_) => {
                return Err(at("an `OKP` key: EdDSA is not supported"));
            }
        };
        if !matches!(
            jwk.common.public_key_use,
            None | Some(PublicKeyUse::Signature)
        ) {
            return Err(at("its `use` is not `sig`: not a signature key"));
        }
        let declared = jwk.common.key_algorithm;
        let fits = matches!(
            (declared, alg),
            (None, _)
                | (Some(KeyAlgorithm::RS256), JwtAlgorithm::Rs256)
                | (Some(KeyAlgorithm::ES256), JwtAlgorithm::Es256)
        );
        if !fits {
            return Err(at(&format!(
                "its alg {declared:?} is not {} (the only algorithm of its key type here)",
                alg.as_str()
            )));
        }
        if !spec.algorithms.contains(&alg) {
            return Err(at(&format!(
                "a key for {}, which algorithms does not list",
                alg.as_str()
            )));
        }
        let kid = jwk.common.key_id.clone();
        match &kid {
            None if several => {
                return Err(at("has no kid: in a set of several keys each needs one"));
            }
            Some(k) if !kids.insert(k.clone()) => {
                return Err(at(&format!("kid `{}` is used twice", k.escape_debug())));
            }
            _ => {}
        }
        out.push(Key { kid, alg, key });
    }
    Ok(out)
}

/// A NumericDate claim (RFC 7519 section 2): a non-negative number of seconds; fractions are
/// cut. `Ok(None)` when absent; a value of another type is [`JwtError::Malformed`].
fn numeric_date(value: Option<&Value>) -> Result<Option<u64>, JwtError> {
    let Some(value) = value else {
        return Ok(None);
    };
    if let Some(n) = value.as_u64() {
        return Ok(Some(n));
    }
    match value.as_f64() {
        // Far-future values saturate (a float of 2^64 or more is a date past any clock).
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Some(f) if f.is_finite() && f >= 0.0 => Ok(Some(f as u64)),
        _ => Err(JwtError::Malformed),
    }
}

/// A scope claim: a list of grant prefixes (or one string); absent, `default`. Each prefix
/// must be what `[[http.device]] publish` accepts.
fn scope(value: Option<&Value>, default: &[String]) -> Result<Vec<String>, JwtError> {
    let list: Vec<String> = match value {
        None => return Ok(default.to_vec()),
        Some(Value::String(one)) => vec![one.clone()],
        Some(Value::Array(items)) => {
            if items.len() > MAX_SCOPE_PREFIXES {
                return Err(JwtError::BadClaim);
            }
            items
                .iter()
                .map(|v| v.as_str().map(str::to_owned).ok_or(JwtError::BadClaim))
                .collect::<Result<_, _>>()?
        }
        Some(_) => return Err(JwtError::BadClaim),
    };
    if list
        .iter()
        .any(|p| crate::config::http_check_prefix(p).is_err())
    {
        return Err(JwtError::BadClaim);
    }
    Ok(list)
}

// ---------------------------------------------------------------------------------------------
// The pre-parser (network bytes: fuzzed).

/// The JOSE header fields the gateway reads; the others are ignored.
#[derive(Debug, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
}

/// A token split and its header decoded; the claims and the signature are still base64url.
#[derive(Debug)]
struct PreParsed<'a> {
    header: Header,
    /// `header.claims`, what the signature covers.
    signing_input: &'a str,
    /// The claims part (base64url).
    claims: &'a str,
    /// The signature part (base64url).
    signature: &'a str,
}

/// Whether `token` has the shape of a compact JWS: three parts separated by `.`, the first
/// two non-empty, every character base64url (`A-Z a-z 0-9 - _`). The signature may be empty
/// (an `alg: none` token), so that such a token is refused as a JWT, with its reason.
#[must_use]
pub fn looks_like_jwt(token: &str) -> bool {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let b64url = |p: &str| {
        p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    !h.is_empty() && !c.is_empty() && b64url(h) && b64url(c) && b64url(s)
}

/// Splits `token` and decodes its header, within the bounds.
fn pre_parse(token: &str, max_token: usize, max_header: usize) -> Result<PreParsed<'_>, JwtError> {
    if token.len() > max_token {
        return Err(JwtError::TooLarge);
    }
    if !looks_like_jwt(token) {
        return Err(JwtError::Malformed);
    }
    let (signing_input, signature) = token.rsplit_once('.').ok_or(JwtError::Malformed)?;
    let (header_b64, claims) = signing_input.split_once('.').ok_or(JwtError::Malformed)?;
    // base64url without padding: 4 characters per 3 bytes.
    if header_b64.len() / 4 * 3 > max_header {
        return Err(JwtError::TooLarge);
    }
    let header_json = URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|_| JwtError::Malformed)?;
    let header: Header = serde_json::from_slice(&header_json).map_err(|_| JwtError::Malformed)?;
    Ok(PreParsed {
        header,
        signing_input,
        claims,
        signature,
    })
}

/// A base64url JSON object (the claims).
fn decode_object(part: &str) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)
}

/// For the fuzz target: the pre-parser and the claim checks on arbitrary bytes never panic,
/// and what the pre-parser accepts has the JWS shape within the bounds.
pub fn fuzz_pre_parse(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let (max_token, max_header) = (4096, 256);
    if let Ok(parsed) = pre_parse(token, max_token, max_header) {
        assert!(token.len() <= max_token);
        assert!(looks_like_jwt(token));
        assert_eq!(
            parsed.signing_input.len() + 1 + parsed.signature.len(),
            token.len()
        );
        // The claim checks on the claims part, as after a good signature.
        if let Ok(claims) = decode_object(parsed.claims) {
            let spec = JwtSpec::with(JwtKeyFile::Jwks(PathBuf::new()), "fuzz");
            let verifier = JwtVerifier {
                spec,
                keys: Vec::new(),
                file_digest: [0; 32],
            };
            if let Ok(grant) = verifier.check_claims(&claims, 1_700_000_000) {
                assert!(!grant.identity.is_empty());
                assert!(grant.identity.len() <= MAX_DEVICE_ID_LEN);
            }
        }
    }
}

/// Shared by the auth table and the reloads.
pub(crate) type SharedVerifier = Arc<JwtVerifier>;

#[cfg(test)]
mod tests;
