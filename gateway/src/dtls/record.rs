//! The few DTLS 1.2 bytes the layer reads itself, before any per-peer state exists: the first
//! record of a datagram when it is a whole, unfragmented ClientHello (RFC 6347 sections 4.1,
//! 4.2.2 and 4.2.1), the HelloVerifyRequest answering it, and the cookie-less copy of a
//! ClientHello that moves a fresh `dimpl` server past its own cookie step (see the module doc
//! of [`super`]).
//!
//! ```text
//! record:    type(1)=22 | version(2) | epoch(2)=0 | sequence(6) | length(2) | fragment
//! handshake: msg_type(1)=1 | length(3) | message_seq(2) | fragment_offset(3)=0
//!            | fragment_length(3)=length | body
//! body:      client_version(2) | random(32) | session_id(1+n) | cookie(1+n) | rest
//! ```
//!
//! Invariants: nothing here panics on any input (every read is checked; the `dtls_record`
//! fuzz target holds it to that), and a parsed ClientHello re-emitted by
//! [`ClientHello::without_cookie`] parses again to the same random, session id and rest.

/// DTLS content type of a handshake record.
const CONTENT_HANDSHAKE: u8 = 22;
/// Handshake type of a ClientHello.
const CLIENT_HELLO: u8 = 1;
/// Handshake type of a HelloVerifyRequest.
const HELLO_VERIFY_REQUEST: u8 = 3;
/// A record header's length.
const RECORD_HEADER: usize = 13;
/// A handshake header's length.
const HANDSHAKE_HEADER: usize = 12;
/// The version a HelloVerifyRequest carries (RFC 6347 section 4.2.1: DTLS 1.0, whatever is
/// negotiated later).
const DTLS_1_0: [u8; 2] = [0xfe, 0xff];
/// The longest cookie DTLS 1.2 allows.
const MAX_COOKIE: usize = 255;

/// Why a datagram is not a ClientHello this layer can answer statelessly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Shorter than its headers or its length fields say.
    #[error("truncated record")]
    Truncated,
    /// Not an epoch-0 handshake record.
    #[error("not a plaintext handshake record")]
    NotHandshake,
    /// A handshake message other than a ClientHello.
    #[error("not a ClientHello")]
    NotClientHello,
    /// A ClientHello in several fragments (not answered before a session exists).
    #[error("fragmented ClientHello")]
    Fragmented,
}

impl RecordError {
    /// The reason's name in counters.
    #[must_use]
    pub fn error_code(self) -> &'static str {
        match self {
            RecordError::Truncated => "truncated",
            RecordError::NotHandshake => "not_handshake",
            RecordError::NotClientHello => "not_client_hello",
            RecordError::Fragmented => "fragmented",
        }
    }
}

/// A whole ClientHello from the first record of a datagram, borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientHello<'a> {
    /// The record's version field.
    pub record_version: [u8; 2],
    /// The record's sequence number (echoed by a HelloVerifyRequest, RFC 6347 4.2.1).
    pub record_sequence: [u8; 6],
    /// The handshake message_seq (0 first, 1 with the cookie).
    pub message_seq: u16,
    /// `client_version`.
    pub client_version: [u8; 2],
    /// The client's random (the same in both ClientHellos of a handshake).
    pub random: &'a [u8; 32],
    /// The session id (without its length byte).
    pub session_id: &'a [u8],
    /// The cookie (empty in a first ClientHello).
    pub cookie: &'a [u8],
    /// Everything after the cookie: cipher suites, compression methods, extensions.
    pub rest: &'a [u8],
}

/// A checked reader over a byte slice (every read returns an error rather than panicking).
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        let (head, tail) = self
            .bytes
            .split_at_checked(n)
            .ok_or(RecordError::Truncated)?;
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RecordError> {
        let bytes = self.take(N)?;
        <[u8; N]>::try_from(bytes).map_err(|_| RecordError::Truncated)
    }

    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(u8::from_be_bytes(self.array()?))
    }

    fn u16(&mut self) -> Result<u16, RecordError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u24(&mut self) -> Result<usize, RecordError> {
        let [a, b, c] = self.array()?;
        Ok(usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c))
    }
}

/// Whether the datagram's first record is a plaintext (epoch 0) handshake record: the only
/// kind that may start a new session (anything else from an unknown address is dropped).
#[must_use]
pub fn is_epoch0_handshake(datagram: &[u8]) -> bool {
    matches!(datagram, [CONTENT_HANDSHAKE, _, _, 0, 0, ..])
}

/// Parses the first record of `datagram` as a whole ClientHello.
///
/// # Errors
/// [`RecordError`] when it is not one (or not whole).
pub fn parse_client_hello(datagram: &[u8]) -> Result<ClientHello<'_>, RecordError> {
    let mut r = Reader { bytes: datagram };
    let content_type = r.u8()?;
    let record_version = r.array()?;
    let epoch = r.u16()?;
    let record_sequence = r.array()?;
    let length = usize::from(r.u16()?);
    if content_type != CONTENT_HANDSHAKE || epoch != 0 {
        return Err(RecordError::NotHandshake);
    }
    let mut r = Reader {
        bytes: r.take(length)?,
    };
    if r.u8()? != CLIENT_HELLO {
        return Err(RecordError::NotClientHello);
    }
    let msg_length = r.u24()?;
    let message_seq = r.u16()?;
    let fragment_offset = r.u24()?;
    let fragment_length = r.u24()?;
    if fragment_offset != 0 || fragment_length != msg_length {
        return Err(RecordError::Fragmented);
    }
    let mut r = Reader {
        bytes: r.take(msg_length)?,
    };
    let client_version = r.array()?;
    let random: &[u8; 32] = r.take(32)?.try_into().map_err(|_| RecordError::Truncated)?;
    let session_id_len = usize::from(r.u8()?);
    let session_id = r.take(session_id_len)?;
    let cookie_len = usize::from(r.u8()?);
    let cookie = r.take(cookie_len)?;
    Ok(ClientHello {
        record_version,
        record_sequence,
        message_seq,
        client_version,
        random,
        session_id,
        cookie,
        rest: r.bytes,
    })
}

impl ClientHello<'_> {
    /// Whether the ClientHello offers cipher suite `suite` (its list is the start of
    /// [`Self::rest`]; a malformed list offers nothing).
    #[must_use]
    pub fn offers_suite(&self, suite: u16) -> bool {
        let mut r = Reader { bytes: self.rest };
        let Ok(len) = r.u16() else {
            return false;
        };
        let Ok(list) = r.take(usize::from(len)) else {
            return false;
        };
        list.chunks_exact(2).any(|pair| {
            u16::from_be_bytes([
                pair.first().copied().unwrap_or(0),
                pair.get(1).copied().unwrap_or(0),
            ]) == suite
        })
    }

    /// This ClientHello as the first one of its handshake would have been: message_seq 0,
    /// record sequence 0, no cookie (the rest unchanged).
    #[must_use]
    pub fn without_cookie(&self) -> Vec<u8> {
        self.emit(0, [0; 6], &[])
    }

    /// This ClientHello with `message_seq`, record sequence and cookie replaced.
    #[must_use]
    pub fn emit(&self, message_seq: u16, record_sequence: [u8; 6], cookie: &[u8]) -> Vec<u8> {
        let cookie = cookie.get(..MAX_COOKIE).unwrap_or(cookie);
        let body_len = 2 + 32 + 1 + self.session_id.len() + 1 + cookie.len() + self.rest.len();
        let mut out = Vec::with_capacity(RECORD_HEADER + HANDSHAKE_HEADER + body_len);
        out.push(CONTENT_HANDSHAKE);
        out.extend_from_slice(&self.record_version);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&record_sequence);
        push_u16(&mut out, HANDSHAKE_HEADER + body_len);
        out.push(CLIENT_HELLO);
        push_u24(&mut out, body_len);
        out.extend_from_slice(&message_seq.to_be_bytes());
        push_u24(&mut out, 0);
        push_u24(&mut out, body_len);
        out.extend_from_slice(&self.client_version);
        out.extend_from_slice(self.random);
        push_len8(&mut out, self.session_id);
        push_len8(&mut out, cookie);
        out.extend_from_slice(self.rest);
        out
    }
}

/// A HelloVerifyRequest carrying `cookie`, answering a ClientHello whose record sequence was
/// `record_sequence` (echoed, RFC 6347 section 4.2.1), written into `out` (cleared first).
pub fn hello_verify_request(record_sequence: [u8; 6], cookie: &[u8], out: &mut Vec<u8>) {
    let cookie = cookie.get(..MAX_COOKIE).unwrap_or(cookie);
    let body_len = 2 + 1 + cookie.len();
    out.clear();
    out.push(CONTENT_HANDSHAKE);
    out.extend_from_slice(&DTLS_1_0);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&record_sequence);
    push_u16(out, HANDSHAKE_HEADER + body_len);
    out.push(HELLO_VERIFY_REQUEST);
    push_u24(out, body_len);
    out.extend_from_slice(&0u16.to_be_bytes());
    push_u24(out, 0);
    push_u24(out, body_len);
    out.extend_from_slice(&DTLS_1_0);
    push_len8(out, cookie);
}

fn push_u16(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes());
}

fn push_u24(out: &mut Vec<u8>, n: usize) {
    let n = u32::try_from(n).unwrap_or(u32::MAX).min(0xff_ffff);
    out.extend_from_slice(&n.to_be_bytes()[1..]);
}

fn push_len8(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(u8::try_from(bytes.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as `openssl s_client -dtls1_2` shapes it (short rest).
    fn hello(cookie: &[u8], message_seq: u16) -> Vec<u8> {
        let ch = ClientHello {
            record_version: [0xfe, 0xfd],
            record_sequence: [0, 0, 0, 0, 0, 7],
            message_seq,
            client_version: [0xfe, 0xfd],
            random: &[9; 32],
            session_id: &[],
            cookie: &[],
            rest: &[0, 2, 0xc0, 0xa8, 1, 0],
        };
        ch.emit(message_seq, [0, 0, 0, 0, 0, 7], cookie)
    }

    #[test]
    fn a_client_hello_parses_and_re_emits_without_its_cookie() {
        let bytes = hello(&[5; 32], 1);
        let ch = parse_client_hello(&bytes).unwrap();
        assert_eq!(ch.cookie, &[5; 32]);
        assert_eq!(ch.message_seq, 1);
        assert_eq!(ch.random, &[9; 32]);
        assert_eq!(ch.rest, &[0, 2, 0xc0, 0xa8, 1, 0]);
        let bare = ch.without_cookie();
        let again = parse_client_hello(&bare).unwrap();
        assert_eq!(again.cookie, b"");
        assert_eq!(again.message_seq, 0);
        assert_eq!(again.record_sequence, [0; 6]);
        assert_eq!((again.random, again.rest), (ch.random, ch.rest));
        assert_eq!(again.emit(1, ch.record_sequence, ch.cookie), bytes);
        assert!(ch.offers_suite(0xc0a8) && !ch.offers_suite(0xc02b));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = hello(&[5; 32], 1);
        for n in 0..bytes.len() {
            assert!(parse_client_hello(&bytes[..n]).is_err(), "{n}");
        }
    }

    #[test]
    fn other_records_are_told_apart() {
        let mut bytes = hello(&[], 0);
        bytes[3] = 1; // epoch 1
        assert_eq!(parse_client_hello(&bytes), Err(RecordError::NotHandshake));
        let mut bytes = hello(&[], 0);
        bytes[13] = 2; // ServerHello
        assert_eq!(parse_client_hello(&bytes), Err(RecordError::NotClientHello));
        let mut bytes = hello(&[], 0);
        bytes[13 + 8] = 1; // fragment_offset 1
        assert_eq!(parse_client_hello(&bytes), Err(RecordError::Fragmented));
        assert!(is_epoch0_handshake(&hello(&[], 0)));
        assert!(!is_epoch0_handshake(&[23, 0xfe, 0xfd, 0, 1]));
    }

    #[test]
    fn a_hello_verify_request_has_the_rfc_layout() {
        let mut out = Vec::new();
        hello_verify_request([0, 0, 0, 0, 0, 3], &[7; 32], &mut out);
        assert_eq!(out.len(), 13 + 12 + 3 + 32);
        assert_eq!(&out[..13], &[22, 0xfe, 0xff, 0, 0, 0, 0, 0, 0, 0, 3, 0, 47]);
        assert_eq!(&out[13..25], &[3, 0, 0, 35, 0, 0, 0, 0, 0, 0, 0, 35]);
        assert_eq!(&out[25..28], &[0xfe, 0xff, 32]);
    }
}
