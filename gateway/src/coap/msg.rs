//! CoAP message codec: a checked decode of one datagram into an owned [`Message`], and encoders
//! for the few messages the gateway sends (empty ACK, RST, responses) into a caller's buffer.
//!
//! The reference decode, [`decode_reference`], is two steps. It first walks the header, token
//! and option headers itself (the checks `coap-lite` lacks: version 1, TKL <= 8, a payload
//! marker followed by nothing, an Empty 0.00 message carrying anything after its header,
//! reserved code classes), then lets `coap_lite::Packet::from_bytes` split options and payload,
//! and finally interprets the options it knows into typed fields. Block1/Block2 use our own
//! [`Block`] codec (20-bit NUM; coap-lite's is 12-bit and accepts SZX 7).
//!
//! [`decode`], what the core calls, first tries a one-pass borrowed walk for the common shape
//! (a well-formed message with only the options the gateway types: coap-lite's decode costs a
//! token `Vec`, a map node, a list node and a `Vec` per option, and a payload copy, per
//! request) and falls back to the reference for anything else, errors included. Invariant: on
//! every input `decode` and `decode_reference` return the same result (fuzzed, `coap_decode`).
//!
//! Invariants: no function here panics on any input (no indexing, no coap-lite call that
//! asserts: only `Packet::from_bytes` is used); encoders never fail, because every field they
//! take is already in range by type ([`Token`] <= 8 bytes, [`Block`] checked on construction);
//! options are written in ascending number order as RFC 7252 §3.1 requires.
//!
//! What a failed decode should be answered with is [`DecodeError::answer`]: a message format
//! error in a CON/NON whose header could be read gets an RST, a bad option in a CON request gets
//! a piggy-backed 4.00/4.02, everything else is dropped silently (RFC 7252 §4.2, §4.3, §5.4.1).

use std::fmt;

use thiserror::Error;

/// The only CoAP version (RFC 7252 §3); other versions are silently ignored.
pub const VERSION: u8 = 1;
/// Longest token (RFC 7252 §3; TKL 9..=15 are reserved).
pub const MAX_TOKEN_LEN: usize = 8;
/// The payload marker (RFC 7252 §3).
pub const PAYLOAD_MARKER: u8 = 0xFF;

/// Option numbers (RFC 7252 §5.10, RFC 7641, RFC 7959, RFC 7967).
pub mod option {
    /// If-Match (critical, not supported: conditional requests are refused with 4.02).
    pub const IF_MATCH: u16 = 1;
    /// Uri-Host.
    pub const URI_HOST: u16 = 3;
    /// ETag.
    pub const ETAG: u16 = 4;
    /// If-None-Match (critical, not supported).
    pub const IF_NONE_MATCH: u16 = 5;
    /// Observe (RFC 7641).
    pub const OBSERVE: u16 = 6;
    /// Uri-Port.
    pub const URI_PORT: u16 = 7;
    /// Uri-Path (one segment per occurrence).
    pub const URI_PATH: u16 = 11;
    /// Content-Format.
    pub const CONTENT_FORMAT: u16 = 12;
    /// Max-Age.
    pub const MAX_AGE: u16 = 14;
    /// Uri-Query (one `name[=value]` per occurrence).
    pub const URI_QUERY: u16 = 15;
    /// Accept.
    pub const ACCEPT: u16 = 17;
    /// Block2 (RFC 7959).
    pub const BLOCK2: u16 = 23;
    /// Block1 (RFC 7959).
    pub const BLOCK1: u16 = 27;
    /// Size2 (RFC 7959).
    pub const SIZE2: u16 = 28;
    /// Size1.
    pub const SIZE1: u16 = 60;
    /// No-Response (RFC 7967).
    pub const NO_RESPONSE: u16 = 258;
    /// Proxy-Uri (critical; the gateway is no proxy: 5.05).
    pub const PROXY_URI: u16 = 35;
    /// Proxy-Scheme (critical; 5.05).
    pub const PROXY_SCHEME: u16 = 39;
}

/// Critical options the decoder understands; any other critical (odd) option in a request is
/// answered 4.02 Bad Option (RFC 7252 §5.4.1). Uri-Host/Uri-Port are accepted and ignored: the
/// gateway is the only host on its sockets.
const KNOWN_CRITICAL: [u16; 7] = [
    option::URI_HOST,
    option::URI_PORT,
    option::URI_PATH,
    option::URI_QUERY,
    option::ACCEPT,
    option::BLOCK2,
    option::BLOCK1,
];

/// Message type (RFC 7252 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// Confirmable (0).
    Con,
    /// Non-confirmable (1).
    Non,
    /// Acknowledgement (2).
    Ack,
    /// Reset (3).
    Rst,
}

impl MessageType {
    fn from_bits(bits: u8) -> Self {
        match bits & 0b11 {
            0 => Self::Con,
            1 => Self::Non,
            2 => Self::Ack,
            _ => Self::Rst,
        }
    }

    fn bits(self) -> u8 {
        match self {
            Self::Con => 0,
            Self::Non => 1,
            Self::Ack => 2,
            Self::Rst => 3,
        }
    }
}

/// A CoAP code `c.dd` as its wire byte (class in the top 3 bits).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Code(pub u8);

impl Code {
    /// 0.00 Empty.
    pub const EMPTY: Self = Self(0x00);
    /// 0.01 GET.
    pub const GET: Self = Self(0x01);
    /// 0.02 POST.
    pub const POST: Self = Self(0x02);
    /// 0.03 PUT.
    pub const PUT: Self = Self(0x03);
    /// 0.04 DELETE.
    pub const DELETE: Self = Self(0x04);
    /// 2.01 Created.
    pub const CREATED: Self = Self(0x41);
    /// 2.03 Valid.
    pub const VALID: Self = Self(0x43);
    /// 2.04 Changed.
    pub const CHANGED: Self = Self(0x44);
    /// 2.05 Content.
    pub const CONTENT: Self = Self(0x45);
    /// 2.31 Continue (RFC 7959).
    pub const CONTINUE: Self = Self(0x5F);
    /// 4.00 Bad Request.
    pub const BAD_REQUEST: Self = Self(0x80);
    /// 4.02 Bad Option.
    pub const BAD_OPTION: Self = Self(0x82);
    /// 4.01 Unauthorized.
    pub const UNAUTHORIZED: Self = Self(0x81);
    /// 4.03 Forbidden.
    pub const FORBIDDEN: Self = Self(0x83);
    /// 4.04 Not Found.
    pub const NOT_FOUND: Self = Self(0x84);
    /// 4.05 Method Not Allowed.
    pub const METHOD_NOT_ALLOWED: Self = Self(0x85);
    /// 4.08 Request Entity Incomplete (RFC 7959).
    pub const REQUEST_ENTITY_INCOMPLETE: Self = Self(0x88);
    /// 4.13 Request Entity Too Large.
    pub const REQUEST_ENTITY_TOO_LARGE: Self = Self(0x8D);
    /// 4.29 Too Many Requests (RFC 8516).
    pub const TOO_MANY_REQUESTS: Self = Self(0x9D);
    /// 5.00 Internal Server Error.
    pub const INTERNAL_SERVER_ERROR: Self = Self(0xA0);
    /// 5.03 Service Unavailable.
    pub const SERVICE_UNAVAILABLE: Self = Self(0xA3);
    /// 5.05 Proxying Not Supported.
    pub const PROXYING_NOT_SUPPORTED: Self = Self(0xA5);

    /// The class `c` (0 request, 2 success, 4 client error, 5 server error).
    #[must_use]
    pub fn class(self) -> u8 {
        self.0 >> 5
    }

    /// The detail `dd`.
    #[must_use]
    pub fn detail(self) -> u8 {
        self.0 & 0x1F
    }

    /// Whether this is a request method (0.01..=0.31).
    #[must_use]
    pub fn is_request(self) -> bool {
        self.class() == 0 && self.detail() != 0
    }

    /// Whether this is a response code (classes 2, 3, 4, 5; class 3 is reserved but RFC 7252
    /// §12.1 leaves it unassigned rather than invalid, so it is carried as a response).
    #[must_use]
    pub fn is_response(self) -> bool {
        (2..=5).contains(&self.class())
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.class(), self.detail())
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Code({self})")
    }
}

/// A token of 0..=8 bytes, stored inline.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Token {
    len: u8,
    bytes: [u8; MAX_TOKEN_LEN],
}

impl Token {
    /// The empty token.
    pub const EMPTY: Self = Self {
        len: 0,
        bytes: [0; MAX_TOKEN_LEN],
    };

    /// A token from its bytes; `None` when longer than [`MAX_TOKEN_LEN`].
    #[must_use]
    pub fn new(token: &[u8]) -> Option<Self> {
        let mut bytes = [0; MAX_TOKEN_LEN];
        bytes.get_mut(..token.len())?.copy_from_slice(token);
        Some(Self {
            len: u8::try_from(token.len()).ok()?,
            bytes,
        })
    }

    /// The token bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or(&[])
    }

    /// Length in bytes (the TKL field).
    #[must_use]
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Whether the token is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({:02x?})", self.as_bytes())
    }
}

/// A Block1/Block2 option value (RFC 7959 §2.2): block number, more flag, size exponent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Block {
    num: u32,
    more: bool,
    szx: u8,
}

/// Why a Block option value is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum BlockError {
    /// Longer than the 3 bytes RFC 7959 §2.2 allows.
    #[error("Block option of {len} bytes (at most 3)")]
    TooLong {
        /// The value's length.
        len: usize,
    },
    /// SZX 7 is reserved (RFC 7959 §2.2).
    #[error("Block option with reserved SZX 7")]
    ReservedSzx,
}

impl Block {
    /// Largest block number (20 bits).
    pub const MAX_NUM: u32 = (1 << 20) - 1;
    /// Largest size exponent (1024-byte blocks).
    pub const MAX_SZX: u8 = 6;

    /// A block value; `None` when `num` exceeds 20 bits or `szx` exceeds 6.
    #[must_use]
    pub fn new(num: u32, more: bool, szx: u8) -> Option<Self> {
        (num <= Self::MAX_NUM && szx <= Self::MAX_SZX).then_some(Self { num, more, szx })
    }

    /// The size exponent for a block size (16..=1024, a power of two).
    #[must_use]
    pub fn szx_for_size(size: usize) -> Option<u8> {
        (0..=Self::MAX_SZX).find(|szx| Self::size_of(*szx) == size)
    }

    fn size_of(szx: u8) -> usize {
        16usize << szx
    }

    /// The block number.
    #[must_use]
    pub fn num(&self) -> u32 {
        self.num
    }

    /// The M (more) flag.
    #[must_use]
    pub fn more(&self) -> bool {
        self.more
    }

    /// The size exponent (0..=6).
    #[must_use]
    pub fn szx(&self) -> u8 {
        self.szx
    }

    /// The block size in bytes (16..=1024).
    #[must_use]
    pub fn size(&self) -> usize {
        Self::size_of(self.szx)
    }

    /// Byte offset of this block in the body (`num * size`, at most 2^30: fits in usize).
    #[must_use]
    pub fn offset(&self) -> usize {
        (self.num as usize).saturating_mul(self.size())
    }

    /// Decodes an option value of 0..=3 bytes (an empty value is NUM 0, M 0, SZX 0).
    pub fn decode(value: &[u8]) -> Result<Self, BlockError> {
        if value.len() > 3 {
            return Err(BlockError::TooLong { len: value.len() });
        }
        let raw = value
            .iter()
            .fold(0u32, |acc, byte| (acc << 8) | u32::from(*byte));
        let szx = (raw & 0x7) as u8;
        if szx == 7 {
            return Err(BlockError::ReservedSzx);
        }
        Ok(Self {
            num: raw >> 4,
            more: raw & 0x8 != 0,
            szx,
        })
    }

    /// The option value in as few bytes as possible (0..=3).
    #[must_use]
    pub fn to_uint(&self) -> u32 {
        (self.num << 4) | (u32::from(self.more) << 3) | u32::from(self.szx)
    }
}

/// One Uri-Query option split at its first `=` (`name` alone has `value: None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Text before the first `=`.
    pub name: String,
    /// Text after the first `=`, if any.
    pub value: Option<String>,
}

/// A decoded message: owned, with the options the gateway uses already typed.
///
/// Unknown elective options are skipped; repeated non-repeatable elective options keep their
/// first occurrence (RFC 7252 §5.4.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// CON / NON / ACK / RST.
    pub ty: MessageType,
    /// Method, response code, or 0.00 Empty.
    pub code: Code,
    /// Message ID.
    pub message_id: u16,
    /// Token (always empty for Empty messages).
    pub token: Token,
    /// Uri-Path segments, in order.
    pub uri_path: Vec<String>,
    /// Uri-Query options, in order.
    pub uri_query: Vec<Query>,
    /// Observe (24-bit; 0 registers, 1 deregisters in a request).
    pub observe: Option<u32>,
    /// Block1.
    pub block1: Option<Block>,
    /// Block2.
    pub block2: Option<Block>,
    /// Size1.
    pub size1: Option<u32>,
    /// Size2.
    pub size2: Option<u32>,
    /// Content-Format.
    pub content_format: Option<u16>,
    /// Accept.
    pub accept: Option<u16>,
    /// Max-Age (seconds).
    pub max_age: Option<u32>,
    /// ETag (first occurrence, 1..=8 bytes).
    pub etag: Option<Vec<u8>>,
    /// No-Response (RFC 7967) bit mask.
    pub no_response: Option<u8>,
    /// Payload (empty when there is no payload marker).
    pub payload: Vec<u8>,
}

impl Message {
    /// An empty message (0.00): an empty ACK, an RST, or a CON ping.
    #[must_use]
    pub fn empty(ty: MessageType, message_id: u16) -> Self {
        Self {
            ty,
            code: Code::EMPTY,
            message_id,
            token: Token::EMPTY,
            uri_path: Vec::new(),
            uri_query: Vec::new(),
            observe: None,
            block1: None,
            block2: None,
            size1: None,
            size2: None,
            content_format: None,
            accept: None,
            max_age: None,
            etag: None,
            no_response: None,
            payload: Vec::new(),
        }
    }

    /// Whether this is a request (a method code).
    #[must_use]
    pub fn is_request(&self) -> bool {
        self.code.is_request()
    }

    /// The value of the first query option called `name`.
    #[must_use]
    pub fn query(&self, name: &str) -> Option<Option<&str>> {
        self.uri_query
            .iter()
            .find(|q| q.name == name)
            .map(|q| q.value.as_deref())
    }
}

/// The header fields of a message whose first four bytes were readable (version 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message type.
    pub ty: MessageType,
    /// Code.
    pub code: Code,
    /// Message ID.
    pub message_id: u16,
}

/// A message format error (RFC 7252 §3, §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FormatError {
    /// TKL 9..=15 are reserved.
    #[error("token length {tkl} (at most 8)")]
    TokenLength {
        /// The TKL field.
        tkl: u8,
    },
    /// The datagram ends inside the token.
    #[error("datagram ends inside the token")]
    TokenTruncated,
    /// A 0.00 Empty message with a token, options or payload.
    #[error("Empty message with bytes after the header")]
    EmptyNotEmpty,
    /// An option delta or length nibble of 15 that is not the payload marker.
    #[error("reserved option nibble 15")]
    ReservedNibble,
    /// An option header or value runs past the datagram.
    #[error("option runs past the end of the datagram")]
    OptionTruncated,
    /// Option numbers beyond 65535.
    #[error("option number beyond 65535")]
    OptionNumber,
    /// A payload marker followed by zero bytes.
    #[error("payload marker with an empty payload")]
    EmptyPayload,
    /// Code classes 1, 6 and 7 are reserved.
    #[error("code {code} in a reserved class")]
    ReservedClass {
        /// The code.
        code: Code,
    },
    /// A request code in an ACK, or a non-Empty RST.
    #[error("code {code} not allowed in this message type")]
    TypeCode {
        /// The code.
        code: Code,
    },
    /// A bad option in a response or empty message (requests get [`RequestError`]).
    #[error("in a response: {0}")]
    Option(RequestError),
    /// coap-lite refused what the pre-check accepted (not expected; kept so it is never a panic).
    #[error("rejected by coap-lite")]
    Library,
}

/// A request error answered with a response code rather than a reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RequestError {
    /// An unrecognised critical option, a critical option repeated, or out of its length range
    /// (RFC 7252 §5.4.1, §5.4.3, §5.4.5): 4.02 Bad Option.
    #[error("unsupported critical option {number}")]
    BadOption {
        /// The option number.
        number: u16,
    },
    /// A recognised option with an invalid value (Block SZX 7, Uri-Path/Query not UTF-8,
    /// Observe beyond 3 bytes): 4.00 Bad Request.
    #[error("invalid value for option {number}")]
    InvalidOption {
        /// The option number.
        number: u16,
    },
}

impl RequestError {
    /// The response code for this error.
    #[must_use]
    pub fn code(&self) -> Code {
        match self {
            Self::BadOption { .. } => Code::BAD_OPTION,
            Self::InvalidOption { .. } => Code::BAD_REQUEST,
        }
    }
}

/// Why a datagram was not decoded; [`DecodeError::answer`] says what to send back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Shorter than the 4-byte header: dropped.
    #[error("datagram of {len} bytes is shorter than the CoAP header")]
    Short {
        /// The datagram's length.
        len: usize,
    },
    /// Version other than 1: silently ignored (RFC 7252 §3).
    #[error("CoAP version {version}")]
    Version {
        /// The version field.
        version: u8,
    },
    /// A message format error in a readable header: RST for CON/NON, dropped otherwise.
    #[error("malformed {ty:?} message {message_id}: {reason}", ty = header.ty, message_id = header.message_id)]
    Format {
        /// The header.
        header: Header,
        /// What is wrong.
        reason: FormatError,
    },
    /// A well-formed request with a bad option: a CON gets a piggy-backed 4.00/4.02, a NON is
    /// rejected with an RST.
    #[error("request {message_id}: {reason}", message_id = header.message_id)]
    Request {
        /// The header.
        header: Header,
        /// The request's token.
        token: Token,
        /// What is wrong.
        reason: RequestError,
    },
}

/// What the core should send back for a datagram that did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Nothing.
    Drop,
    /// An RST with this message ID ([`encode_rst`]).
    Reset {
        /// The offending message's ID.
        message_id: u16,
    },
    /// A piggy-backed error response in an ACK ([`encode_response`]).
    Respond {
        /// The request's message ID (the ACK's).
        message_id: u16,
        /// The request's token.
        token: Token,
        /// 4.00 or 4.02.
        code: Code,
    },
}

impl DecodeError {
    /// The answer RFC 7252 asks for (§4.2, §4.3: reject by RST; §5.4.1: 4.02 for a CON).
    #[must_use]
    pub fn answer(&self) -> Answer {
        match self {
            Self::Short { .. } | Self::Version { .. } => Answer::Drop,
            Self::Format { header, .. } => match header.ty {
                MessageType::Con | MessageType::Non => Answer::Reset {
                    message_id: header.message_id,
                },
                MessageType::Ack | MessageType::Rst => Answer::Drop,
            },
            Self::Request {
                header,
                token,
                reason,
            } => match header.ty {
                MessageType::Con => Answer::Respond {
                    message_id: header.message_id,
                    token: *token,
                    code: reason.code(),
                },
                MessageType::Non => Answer::Reset {
                    message_id: header.message_id,
                },
                // A request code in an ACK/RST is a format error and never gets here; drop anyway.
                MessageType::Ack | MessageType::Rst => Answer::Drop,
            },
        }
    }

    /// A short stable name for metrics and logs.
    #[must_use]
    pub fn error_code(&self) -> &'static str {
        match self {
            Self::Short { .. } => "short",
            Self::Version { .. } => "version",
            Self::Format { .. } => "format",
            Self::Request {
                reason: RequestError::BadOption { .. },
                ..
            } => "bad_option",
            Self::Request {
                reason: RequestError::InvalidOption { .. },
                ..
            } => "invalid_option",
        }
    }
}

/// Decodes one datagram (see the module doc for the checks).
///
/// The common shape (a well-formed message whose options are all ones the gateway types, see
/// [`FAST_OPTIONS`]) is decoded by one borrowed walk over the datagram that allocates only what
/// [`Message`] owns; anything else (errors, other options) takes [`decode_reference`], so both
/// give the same result on every input (fuzzed: `coap_decode`).
pub fn decode(datagram: &[u8]) -> Result<Message, DecodeError> {
    match decode_fast(datagram) {
        Some(message) => Ok(message),
        None => decode_reference(datagram),
    }
}

/// Options [`decode_fast`] handles itself: every option [`apply_option`] types.
const FAST_OPTIONS: [u16; 14] = [
    option::URI_HOST,
    option::ETAG,
    option::OBSERVE,
    option::URI_PORT,
    option::URI_PATH,
    option::CONTENT_FORMAT,
    option::MAX_AGE,
    option::URI_QUERY,
    option::ACCEPT,
    option::BLOCK2,
    option::BLOCK1,
    option::SIZE2,
    option::SIZE1,
    option::NO_RESPONSE,
];

/// The hot path of [`decode`]: `Some` only for a message [`decode_reference`] decodes to the
/// same [`Message`]; `None` (the reference decides) for anything it would refuse or that has
/// an option outside [`FAST_OPTIONS`]. One pass, no intermediate copies: the token is read
/// inline, option values are borrowed slices handed to [`apply_option`] as the reference
/// hands it coap-lite's copies (options arrive in ascending number order, so the occurrence
/// index is a run length), and the payload is copied once into the message.
fn decode_fast(datagram: &[u8]) -> Option<Message> {
    let [b0, code, mid_hi, mid_lo, rest @ ..] = datagram else {
        return None;
    };
    if b0 >> 6 != VERSION {
        return None;
    }
    let ty = MessageType::from_bits(b0 >> 4);
    let code = Code(*code);
    let message_id = u16::from_be_bytes([*mid_hi, *mid_lo]);
    let tkl = usize::from(b0 & 0x0F);
    if code == Code::EMPTY {
        return (tkl == 0 && rest.is_empty()).then(|| Message::empty(ty, message_id));
    }
    if matches!(code.class(), 1 | 6 | 7)
        || ty == MessageType::Rst
        || (code.is_request() && ty == MessageType::Ack)
    {
        return None;
    }
    let mut message = Message {
        code,
        token: Token::new(rest.get(..tkl)?)?,
        ..Message::empty(ty, message_id)
    };
    let mut bytes = rest.get(tkl..)?;
    let mut number: u16 = 0;
    let mut index = 0usize;
    while let Some((first, tail)) = bytes.split_first() {
        if *first == PAYLOAD_MARKER {
            if tail.is_empty() {
                return None;
            }
            message.payload = tail.to_vec();
            break;
        }
        let (delta, tail) = extended(first >> 4, tail).ok()?;
        let (len, tail) = extended(first & 0x0F, tail).ok()?;
        // Delta 0 repeats the previous number (the first option's number 0 is not in the set).
        index = if delta == 0 { index + 1 } else { 0 };
        number = u16::try_from(u32::from(number).saturating_add(delta)).ok()?;
        if !FAST_OPTIONS.contains(&number) {
            return None;
        }
        let value = tail.get(..len as usize)?;
        bytes = tail.get(len as usize..)?;
        apply_option(&mut message, number, index, value).ok()?;
    }
    Some(message)
}

/// The reference decode: the pre-checks here, then `coap_lite::Packet::from_bytes` splits the
/// options and payload. [`decode`] takes it for everything but the common shape; public so the
/// fuzz target can hold the two against each other.
pub fn decode_reference(datagram: &[u8]) -> Result<Message, DecodeError> {
    let [b0, code, mid_hi, mid_lo, rest @ ..] = datagram else {
        return Err(DecodeError::Short {
            len: datagram.len(),
        });
    };
    let version = b0 >> 6;
    if version != VERSION {
        return Err(DecodeError::Version { version });
    }
    let header = Header {
        ty: MessageType::from_bits(b0 >> 4),
        code: Code(*code),
        message_id: u16::from_be_bytes([*mid_hi, *mid_lo]),
    };
    let format = |reason| DecodeError::Format { header, reason };
    let tkl = b0 & 0x0F;
    if header.code == Code::EMPTY {
        // RFC 7252 §4.1: TKL 0 and nothing after the Message ID.
        if tkl != 0 || !rest.is_empty() {
            return Err(format(FormatError::EmptyNotEmpty));
        }
        return Ok(Message::empty(header.ty, header.message_id));
    }
    if usize::from(tkl) > MAX_TOKEN_LEN {
        return Err(format(FormatError::TokenLength { tkl }));
    }
    let token = rest
        .get(..usize::from(tkl))
        .and_then(Token::new)
        .ok_or(format(FormatError::TokenTruncated))?;
    check_options(rest.get(usize::from(tkl)..).unwrap_or(&[])).map_err(format)?;
    let class = header.code.class();
    if matches!(class, 1 | 6 | 7) {
        return Err(format(FormatError::ReservedClass { code: header.code }));
    }
    // A request travels as CON or NON only, an RST is always Empty (RFC 7252 §4.2, §4.3).
    if header.ty == MessageType::Rst || (header.code.is_request() && header.ty == MessageType::Ack)
    {
        return Err(format(FormatError::TypeCode { code: header.code }));
    }
    let mut packet =
        coap_lite::Packet::from_bytes(datagram).map_err(|_| format(FormatError::Library))?;
    let mut message = Message {
        token,
        payload: std::mem::take(&mut packet.payload),
        ..Message::empty(header.ty, header.message_id)
    };
    message.code = header.code;
    for (number, values) in packet.options() {
        for (index, value) in values.iter().enumerate() {
            apply_option(&mut message, *number, index, value).map_err(|reason| {
                if header.code.is_request() {
                    DecodeError::Request {
                        header,
                        token,
                        reason,
                    }
                } else {
                    format(FormatError::Option(reason))
                }
            })?;
        }
    }
    Ok(message)
}

/// Walks the option headers after the token: the structure checks coap-lite skips.
fn check_options(mut bytes: &[u8]) -> Result<(), FormatError> {
    let mut number: u32 = 0;
    loop {
        let Some((first, tail)) = bytes.split_first() else {
            return Ok(());
        };
        if *first == PAYLOAD_MARKER {
            return if tail.is_empty() {
                Err(FormatError::EmptyPayload)
            } else {
                Ok(())
            };
        }
        let (delta, tail) = extended(first >> 4, tail)?;
        let (len, tail) = extended(first & 0x0F, tail)?;
        number = number.saturating_add(delta);
        if number > u32::from(u16::MAX) {
            return Err(FormatError::OptionNumber);
        }
        bytes = tail
            .get(len as usize..)
            .ok_or(FormatError::OptionTruncated)?;
    }
}

/// Reads an option delta/length nibble and its extended bytes (RFC 7252 §3.1).
fn extended(nibble: u8, bytes: &[u8]) -> Result<(u32, &[u8]), FormatError> {
    match nibble {
        0..=12 => Ok((u32::from(nibble), bytes)),
        13 => match bytes {
            [ext, tail @ ..] => Ok((u32::from(*ext) + 13, tail)),
            [] => Err(FormatError::OptionTruncated),
        },
        14 => match bytes {
            [hi, lo, tail @ ..] => Ok((u32::from(u16::from_be_bytes([*hi, *lo])) + 269, tail)),
            _ => Err(FormatError::OptionTruncated),
        },
        _ => Err(FormatError::ReservedNibble),
    }
}

/// Reads an unsigned option value of at most `max_len` bytes (RFC 7252 §3.2).
fn uint(value: &[u8], max_len: usize) -> Option<u32> {
    (value.len() <= max_len && value.len() <= 4).then(|| {
        value
            .iter()
            .fold(0u32, |acc, byte| (acc << 8) | u32::from(*byte))
    })
}

/// Stores one option occurrence into `message` (`index`: its position among equal numbers).
fn apply_option(
    message: &mut Message,
    number: u16,
    index: usize,
    value: &[u8],
) -> Result<(), RequestError> {
    let critical = number & 1 == 1;
    let bad = RequestError::BadOption { number };
    let invalid = RequestError::InvalidOption { number };
    let repeatable = matches!(
        number,
        option::URI_PATH | option::URI_QUERY | option::ETAG | option::IF_MATCH
    );
    if index > 0 && !repeatable {
        // Supernumerary occurrences are unrecognised options (RFC 7252 §5.4.5).
        return if critical { Err(bad) } else { Ok(()) };
    }
    // Out-of-range lengths make an option unrecognised too (§5.4.3): critical -> 4.02.
    let short = |max| uint(value, max);
    match number {
        option::URI_PATH => {
            let segment = String::from_utf8(value.to_vec()).map_err(|_| invalid)?;
            message.uri_path.push(segment);
        }
        option::URI_QUERY => {
            let text = std::str::from_utf8(value).map_err(|_| invalid)?;
            let query = match text.split_once('=') {
                Some((name, value)) => Query {
                    name: name.to_owned(),
                    value: Some(value.to_owned()),
                },
                None => Query {
                    name: text.to_owned(),
                    value: None,
                },
            };
            message.uri_query.push(query);
        }
        option::BLOCK1 | option::BLOCK2 => {
            let block = Block::decode(value).map_err(|e| match e {
                BlockError::TooLong { .. } => bad,
                BlockError::ReservedSzx => invalid,
            })?;
            if number == option::BLOCK1 {
                message.block1 = Some(block);
            } else {
                message.block2 = Some(block);
            }
        }
        option::ACCEPT => {
            message.accept = Some(short(2).and_then(|v| u16::try_from(v).ok()).ok_or(bad)?);
        }
        option::URI_HOST | option::URI_PORT => {}
        option::OBSERVE => message.observe = short(3),
        option::SIZE1 => message.size1 = short(4),
        option::SIZE2 => message.size2 = short(4),
        option::MAX_AGE => message.max_age = short(4),
        option::CONTENT_FORMAT => {
            message.content_format = short(2).and_then(|v| u16::try_from(v).ok());
        }
        option::NO_RESPONSE => message.no_response = short(1).and_then(|v| u8::try_from(v).ok()),
        // Other occurrences or lengths: elective, ignored.
        option::ETAG if index == 0 && (1..=8).contains(&value.len()) => {
            message.etag = Some(value.to_vec());
        }
        _ if critical && !KNOWN_CRITICAL.contains(&number) => return Err(bad),
        _ => {}
    }
    Ok(())
}

/// Appends an empty ACK (`0x60 0x00 mid`) to `out`.
pub fn encode_empty_ack(out: &mut Vec<u8>, message_id: u16) {
    encode_empty(out, MessageType::Ack, message_id);
}

/// Appends an RST (`0x70 0x00 mid`) to `out`.
pub fn encode_rst(out: &mut Vec<u8>, message_id: u16) {
    encode_empty(out, MessageType::Rst, message_id);
}

/// Appends an Empty message of any type (a CON ping is `Con`) to `out`.
pub fn encode_empty(out: &mut Vec<u8>, ty: MessageType, message_id: u16) {
    let [hi, lo] = message_id.to_be_bytes();
    out.extend_from_slice(&[(VERSION << 6) | (ty.bits() << 4), 0, hi, lo]);
}

/// A response to encode with [`encode_response`]; options left `None` are not written.
#[derive(Debug, Clone)]
pub struct Response<'a> {
    /// ACK (piggy-backed), CON or NON (separate / notification); never RST (use [`encode_rst`]).
    pub ty: MessageType,
    /// Response code (class 2, 4 or 5; the encoder does not check it).
    pub code: Code,
    /// Message ID.
    pub message_id: u16,
    /// The request's token.
    pub token: Token,
    /// ETag (4 bytes, the Block2 body counter).
    pub etag: Option<u32>,
    /// Observe sequence (the low 24 bits are written).
    pub observe: Option<u32>,
    /// Content-Format.
    pub content_format: Option<u16>,
    /// Max-Age in seconds.
    pub max_age: Option<u32>,
    /// Block2.
    pub block2: Option<Block>,
    /// Block1 (echo in 2.31 / final answer).
    pub block1: Option<Block>,
    /// Size2.
    pub size2: Option<u32>,
    /// Size1 (with 4.13).
    pub size1: Option<u32>,
    /// Payload (the marker is written only when non-empty).
    pub payload: &'a [u8],
}

impl Response<'_> {
    /// A response with no options and no payload.
    #[must_use]
    pub fn new(ty: MessageType, code: Code, message_id: u16, token: Token) -> Self {
        Self {
            ty,
            code,
            message_id,
            token,
            etag: None,
            observe: None,
            content_format: None,
            max_age: None,
            block2: None,
            block1: None,
            size2: None,
            size1: None,
            payload: &[],
        }
    }
}

/// Appends `response` to `out` (header, token, options in ascending order, payload).
pub fn encode_response(out: &mut Vec<u8>, response: &Response<'_>) {
    let (ty, code) = (response.ty, response.code);
    let [hi, lo] = response.message_id.to_be_bytes();
    // Token::len() <= 8: fits the TKL nibble.
    let tkl = (response.token.len() & 0x0F) as u8;
    out.extend_from_slice(&[(VERSION << 6) | (ty.bits() << 4) | tkl, code.0, hi, lo]);
    out.extend_from_slice(response.token.as_bytes());
    let mut last = 0u16;
    let mut put = |out: &mut Vec<u8>, number: u16, value: &[u8]| {
        write_option(out, number.saturating_sub(last), value);
        last = number;
    };
    if let Some(etag) = response.etag {
        put(out, option::ETAG, &etag.to_be_bytes());
    }
    if let Some(observe) = response.observe {
        put_uint(&mut put, out, option::OBSERVE, observe & 0x00FF_FFFF);
    }
    if let Some(cf) = response.content_format {
        put_uint(&mut put, out, option::CONTENT_FORMAT, u32::from(cf));
    }
    if let Some(max_age) = response.max_age {
        put_uint(&mut put, out, option::MAX_AGE, max_age);
    }
    if let Some(block) = response.block2 {
        put_uint(&mut put, out, option::BLOCK2, block.to_uint());
    }
    if let Some(block) = response.block1 {
        put_uint(&mut put, out, option::BLOCK1, block.to_uint());
    }
    if let Some(size) = response.size2 {
        put_uint(&mut put, out, option::SIZE2, size);
    }
    if let Some(size) = response.size1 {
        put_uint(&mut put, out, option::SIZE1, size);
    }
    if !response.payload.is_empty() {
        out.push(PAYLOAD_MARKER);
        out.extend_from_slice(response.payload);
    }
}

/// Writes `value` as a minimal-length uint option through `put`.
fn put_uint(
    put: &mut impl FnMut(&mut Vec<u8>, u16, &[u8]),
    out: &mut Vec<u8>,
    number: u16,
    value: u32,
) {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    put(out, number, bytes.get(skip..).unwrap_or(&[]));
}

/// Writes one option header (delta, length, extensions) and its value.
fn write_option(out: &mut Vec<u8>, delta: u16, value: &[u8]) {
    /// The nibble and its 0..=2 extension bytes (RFC 7252 §3.1).
    fn nibble(n: u16) -> (u8, [u8; 2], usize) {
        match n {
            0..=12 => (n as u8, [0; 2], 0),
            13..=268 => (13, [(n - 13) as u8, 0], 1),
            _ => (14, (n - 269).to_be_bytes(), 2),
        }
    }
    // Option values written here are at most 8 bytes.
    let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
    let (d, d_ext, d_n) = nibble(delta);
    let (l, l_ext, l_n) = nibble(len);
    out.push((d << 4) | l);
    out.extend_from_slice(d_ext.get(..d_n).unwrap_or(&[]));
    out.extend_from_slice(l_ext.get(..l_n).unwrap_or(&[]));
    out.extend_from_slice(value);
}

#[cfg(test)]
mod tests;
