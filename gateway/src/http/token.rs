//! Bearer tokens: their SHA-256 digests (what the config stores, never the token) and the
//! character rule (RFC 6750 `b64token`), shared by `[[http.device]] token_hash`, the request
//! path and `sensorgate hash-token`.
//!
//! SHA-256, not a slow password hash: tokens are high-entropy secrets (`hash-token
//! --generate` makes 256 bits), so the digest cannot be brute-forced, and a slow KDF would
//! only cost CPU on every request. ring is already the TLS provider: no second crypto crate.

/// A token's SHA-256 digest.
pub type TokenDigest = [u8; 32];

/// The prefix of a digest as written in the config.
pub const HASH_PREFIX: &str = "sha256:";

/// Longest token the gateway hashes; a longer `Authorization` is refused unhashed.
pub const MAX_TOKEN_LEN: usize = 512;

/// Shortest token `hash-token` accepts (16 characters: >= 96 bits when random).
pub const MIN_TOKEN_LEN: usize = 16;

/// SHA-256 of `token`'s bytes.
#[must_use]
pub fn digest(token: &[u8]) -> TokenDigest {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token).as_ref());
    out
}

/// Whether `token` is made of RFC 6750 `b64token` characters (what an `Authorization:
/// Bearer` header carries unquoted) and is at most [`MAX_TOKEN_LEN`] long.
#[must_use]
pub fn valid_chars(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b))
}

/// `sha256:` + 64 lowercase hex digits.
#[must_use]
pub fn format_hash(digest: &TokenDigest) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(HASH_PREFIX.len() + 64);
    out.push_str(HASH_PREFIX);
    for b in digest {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Parses [`format_hash`]'s output (hex digits in either case); `None` otherwise.
#[must_use]
pub fn parse_hash(text: &str) -> Option<TokenDigest> {
    let hex = text.strip_prefix(HASH_PREFIX)?.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let mut value = 0u8;
        for &c in pair {
            value = value.checked_mul(16)? + char::from(c).to_digit(16)? as u8;
        }
        *byte = value;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_known_answer_and_round_trip() {
        let d = digest(b"abc");
        let text = format_hash(&d);
        assert_eq!(
            text,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(parse_hash(&text), Some(d));
        assert_eq!(
            parse_hash(&text.to_uppercase().replace("SHA256", "sha256")),
            Some(d)
        );
    }

    #[test]
    fn malformed_hashes_and_tokens_are_refused() {
        assert_eq!(parse_hash("ba7816bf"), None);
        assert_eq!(parse_hash("sha256:zz"), None);
        assert_eq!(parse_hash(&format!("sha256:{}", "g".repeat(64))), None);
        assert_eq!(parse_hash(&format!("md5:{}", "0".repeat(64))), None);
        assert!(valid_chars("sgt_abc-._~+/="));
        assert!(!valid_chars(""));
        assert!(!valid_chars("a b"));
        assert!(!valid_chars(&"a".repeat(MAX_TOKEN_LEN + 1)));
    }
}
