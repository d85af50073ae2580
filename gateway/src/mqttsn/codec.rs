//! MQTT-SN v1.2 wire codec: datagram bytes to typed [`Packet`]s and back.
//!
//! The codec is sans-IO and allocation-free on the decode path. [`decode`] turns one datagram
//! into a [`Frame`] (a plain packet or a forwarder encapsulation); [`Packet::encode`] and
//! [`encode_encapsulated`] append the wire form to a `Vec<u8>`.
//!
//! # Invariants
//!
//! - Decoding is total: every byte string yields `Ok` or a typed [`DecodeError`]. No input can
//!   panic the decoder; every read goes through a `Reader` whose reads return `Result`.
//! - Decoding is strict: the Length field MUST equal the datagram length, every fixed-size
//!   packet MUST end exactly where its last field ends ([`DecodeError::TrailingBytes`]), and
//!   every string MUST be valid UTF-8.
//! - Decoded packets borrow from the input (`&'a str`, `&'a [u8]`); nothing is copied.
//! - Round trip: for every `Ok(frame)` from [`decode`], decoding the encoding of `frame` gives
//!   `frame` again. The bytes may differ: the encoder picks the shortest Length form and writes
//!   zero into flag bits that the packet type does not use, while the decoder accepts either
//!   Length form and ignores those bits.
//! - Encoding never panics. A packet whose Length does not fit the 16-bit field is refused with
//!   [`EncodeError::TooLong`] and nothing is appended.
//! - The encoder does not validate what the decoder checks (ClientId length, empty topics,
//!   wildcards): it writes what it is given. Callers build packets from validated data.
//!
//! # What decode leaves to the core
//!
//! These are well-formed on the wire and have a protocol answer, so they decode `Ok`:
//! a CONNECT ClientId that is empty or longer than the configured limit (up to
//! [`MAX_CLIENT_ID_LEN_DECODE`]; the core answers CONNACK rc=not supported),
//! QoS -1 with topic id type normal (the core answers PUBACK rc=invalid topic id), reserved
//! topic ids 0x0000 and 0xFFFF, MsgId 0 on a QoS 1/2 PUBLISH, QoS -1 in SUBSCRIBE/SUBACK, and
//! the syntax of topic filters in SUBSCRIBE/UNSUBSCRIBE (where `+` and `#` are allowed).
//!
//! Flag bits that are meaningless for a packet type (e.g. Will in PUBLISH, DUP in UNSUBSCRIBE,
//! the topic id type of WILLTOPIC) are ignored, not rejected. The topic id type 0b11 is always
//! rejected where the type is used ([`DecodeError::ReservedTopicIdType`]).
//!
//! # Wire layout (spec 5.2, 5.3, 5.5)
//!
//! ```text
//! Header, short form (total length < 256):
//!   +--------+---------+----------------------+
//!   | Length | MsgType | variable part ...    |    Length = 1 + 1 + variable part
//!   +--------+---------+----------------------+
//! Header, long form:
//!   +------+-------------+---------+----------+
//!   | 0x01 | Length (BE) | MsgType | variable |    Length = 3 + 1 + variable part
//!   +------+-------------+---------+----------+
//!
//! Flags octet:
//!   bit   7     6   5     4       3      2          1   0
//!       | DUP | QoS     | Retain | Will | CleanSess | TopicIdType |
//!   QoS: 0b00 = 0, 0b01 = 1, 0b10 = 2, 0b11 = -1
//!   TopicIdType: 0b00 normal id (a topic name in SUBSCRIBE/UNSUBSCRIBE), 0b01 predefined id,
//!                0b10 short name (2 octets), 0b11 reserved
//!
//! Variable parts (u16 fields are big-endian; "..." runs to the end of the packet):
//!   ADVERTISE     GwId(1) Duration(2)
//!   SEARCHGW      Radius(1)
//!   GWINFO        GwId(1) GwAdd(...)                 GwAdd empty when sent by a gateway
//!   CONNECT       Flags(1) ProtocolId(1) Duration(2) ClientId(...)
//!   CONNACK       ReturnCode(1)
//!   WILLTOPICREQ  -
//!   WILLTOPIC     [Flags(1) WillTopic(...)]          empty variable part: delete the Will
//!   WILLMSGREQ    -
//!   WILLMSG       WillMsg(...)
//!   REGISTER      TopicId(2) MsgId(2) TopicName(...)
//!   REGACK        TopicId(2) MsgId(2) ReturnCode(1)
//!   PUBLISH       Flags(1) TopicId(2) MsgId(2) Data(...)
//!   PUBACK        TopicId(2) MsgId(2) ReturnCode(1)
//!   PUBREC, PUBREL, PUBCOMP, UNSUBACK   MsgId(2)
//!   SUBSCRIBE     Flags(1) MsgId(2) TopicName(...) | TopicId(2)
//!   SUBACK        Flags(1) TopicId(2) MsgId(2) ReturnCode(1)
//!   UNSUBSCRIBE   Flags(1) MsgId(2) TopicName(...) | TopicId(2)
//!   PINGREQ       [ClientId(...)]
//!   PINGRESP      -
//!   DISCONNECT    [Duration(2)]
//!   WILLTOPICUPD  [Flags(1) WillTopic(...)]          empty variable part: delete the Will
//!   WILLTOPICRESP ReturnCode(1)
//!   WILLMSGUPD    WillMsg(...)
//!   WILLMSGRESP   ReturnCode(1)
//!
//! Forwarder encapsulation (MsgType 0xFE); Length covers only the encapsulation header:
//!   +--------+------+------+------------------+--------------------------------+
//!   | Length | 0xFE | Ctrl | Wireless Node Id | MQTT-SN message (to the end)   |
//!   +--------+------+------+------------------+--------------------------------+
//!   Ctrl: bits 1..0 = radius; other bits are reserved, ignored on decode, sent as zero.
//! ```

use std::str;

/// The only ProtocolId that CONNECT may carry (spec 5.3.8).
pub const PROTOCOL_ID: u8 = 0x01;

/// The longest ClientId the specification allows, in octets (spec 5.3.1).
pub const MAX_CLIENT_ID_LEN_SPEC: usize = 23;

/// The longest ClientId a CONNECT may carry and still decode, in octets: a hard cap on the
/// work spent on one. Shorter ones decode whatever their length (also empty), so the core can
/// answer a ClientId it does not accept with CONNACK; no configured limit may exceed this.
pub const MAX_CLIENT_ID_LEN_DECODE: usize = 1024;

/// First octet that announces the 3-octet Length form.
const LONG_LENGTH_MARKER: u8 = 0x01;

/// The MsgType codes of spec Table 3.
///
/// Note the order of [`PUBCOMP`] and [`PUBREC`].
pub mod msg_type {
    /// ADVERTISE.
    pub const ADVERTISE: u8 = 0x00;
    /// SEARCHGW.
    pub const SEARCHGW: u8 = 0x01;
    /// GWINFO.
    pub const GWINFO: u8 = 0x02;
    /// CONNECT.
    pub const CONNECT: u8 = 0x04;
    /// CONNACK.
    pub const CONNACK: u8 = 0x05;
    /// WILLTOPICREQ.
    pub const WILLTOPICREQ: u8 = 0x06;
    /// WILLTOPIC.
    pub const WILLTOPIC: u8 = 0x07;
    /// WILLMSGREQ.
    pub const WILLMSGREQ: u8 = 0x08;
    /// WILLMSG.
    pub const WILLMSG: u8 = 0x09;
    /// REGISTER.
    pub const REGISTER: u8 = 0x0A;
    /// REGACK.
    pub const REGACK: u8 = 0x0B;
    /// PUBLISH.
    pub const PUBLISH: u8 = 0x0C;
    /// PUBACK.
    pub const PUBACK: u8 = 0x0D;
    /// PUBCOMP.
    pub const PUBCOMP: u8 = 0x0E;
    /// PUBREC.
    pub const PUBREC: u8 = 0x0F;
    /// PUBREL.
    pub const PUBREL: u8 = 0x10;
    /// SUBSCRIBE.
    pub const SUBSCRIBE: u8 = 0x12;
    /// SUBACK.
    pub const SUBACK: u8 = 0x13;
    /// UNSUBSCRIBE.
    pub const UNSUBSCRIBE: u8 = 0x14;
    /// UNSUBACK.
    pub const UNSUBACK: u8 = 0x15;
    /// PINGREQ.
    pub const PINGREQ: u8 = 0x16;
    /// PINGRESP.
    pub const PINGRESP: u8 = 0x17;
    /// DISCONNECT.
    pub const DISCONNECT: u8 = 0x18;
    /// WILLTOPICUPD.
    pub const WILLTOPICUPD: u8 = 0x1A;
    /// WILLTOPICRESP.
    pub const WILLTOPICRESP: u8 = 0x1B;
    /// WILLMSGUPD.
    pub const WILLMSGUPD: u8 = 0x1C;
    /// WILLMSGRESP.
    pub const WILLMSGRESP: u8 = 0x1D;
    /// Forwarder encapsulation (spec 5.5).
    pub const ENCAPSULATED: u8 = 0xFE;
}

use msg_type::*;

/// Flags octet bits (spec Table 4).
const FLAG_DUP: u8 = 0b1000_0000;
const FLAG_RETAIN: u8 = 0b0001_0000;
const FLAG_WILL: u8 = 0b0000_1000;
const FLAG_CLEAN_SESSION: u8 = 0b0000_0100;
const QOS_SHIFT: u8 = 5;
const TWO_BITS: u8 = 0b11;

/// TopicIdType values (spec Table 4, bits 1..0).
const TOPIC_ID_TYPE_NORMAL: u8 = 0b00;
const TOPIC_ID_TYPE_PREDEFINED: u8 = 0b01;
const TOPIC_ID_TYPE_SHORT: u8 = 0b10;

/// Quality of service of a PUBLISH, a subscription or a Will (spec Table 4, bits 6..5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QoS {
    /// QoS 0, wire 0b00.
    AtMostOnce,
    /// QoS 1, wire 0b01.
    AtLeastOnce,
    /// QoS 2, wire 0b10.
    ExactlyOnce,
    /// QoS -1, wire 0b11: publish without a connection (spec 6.8).
    MinusOne,
}

impl QoS {
    /// The numeric level as the specification writes it: -1, 0, 1 or 2.
    pub fn level(self) -> i8 {
        match self {
            Self::AtMostOnce => 0,
            Self::AtLeastOnce => 1,
            Self::ExactlyOnce => 2,
            Self::MinusOne => -1,
        }
    }

    /// Reads bits 6..5 of a flags octet; every value is defined.
    fn from_flags(flags: u8) -> Self {
        match (flags >> QOS_SHIFT) & TWO_BITS {
            0b00 => Self::AtMostOnce,
            0b01 => Self::AtLeastOnce,
            0b10 => Self::ExactlyOnce,
            _ => Self::MinusOne,
        }
    }

    /// The QoS bits in flags-octet position.
    fn to_flags(self) -> u8 {
        let bits = match self {
            Self::AtMostOnce => 0b00,
            Self::AtLeastOnce => 0b01,
            Self::ExactlyOnce => 0b10,
            Self::MinusOne => 0b11,
        };
        bits << QOS_SHIFT
    }
}

/// A ReturnCode (spec Table 5). Codes 0x04..=0xFF are reserved and do not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnCode {
    /// 0x00: accepted.
    Accepted,
    /// 0x01: rejected, congestion; the sender waits before retrying.
    Congestion,
    /// 0x02: rejected, invalid topic id.
    InvalidTopicId,
    /// 0x03: rejected, not supported.
    NotSupported,
}

impl ReturnCode {
    fn from_u8(code: u8) -> Result<Self, DecodeError> {
        match code {
            0x00 => Ok(Self::Accepted),
            0x01 => Ok(Self::Congestion),
            0x02 => Ok(Self::InvalidTopicId),
            0x03 => Ok(Self::NotSupported),
            other => Err(DecodeError::ReservedReturnCode(other)),
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Self::Accepted => 0x00,
            Self::Congestion => 0x01,
            Self::InvalidTopicId => 0x02,
            Self::NotSupported => 0x03,
        }
    }
}

/// The topic a PUBLISH refers to (wire TopicIdType 0b00/0b01/0b10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicRef {
    /// A topic id assigned by REGISTER/REGACK (type 0b00).
    Normal(u16),
    /// A predefined topic id (type 0b01).
    Predefined(u16),
    /// A two-octet short topic name carried in the TopicId field (type 0b10).
    Short([u8; 2]),
}

impl TopicRef {
    fn id_type(self) -> u8 {
        match self {
            Self::Normal(_) => TOPIC_ID_TYPE_NORMAL,
            Self::Predefined(_) => TOPIC_ID_TYPE_PREDEFINED,
            Self::Short(_) => TOPIC_ID_TYPE_SHORT,
        }
    }

    /// The two octets of the TopicId field.
    fn to_bytes(self) -> [u8; 2] {
        match self {
            Self::Normal(id) | Self::Predefined(id) => id.to_be_bytes(),
            Self::Short(name) => name,
        }
    }
}

/// The topic of a SUBSCRIBE/UNSUBSCRIBE: a topic name (type 0b00; may hold wildcards), a
/// predefined id, or a short name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeTopic<'a> {
    /// A topic name or filter (type 0b00): non-empty UTF-8, `+` and `#` allowed.
    Name(&'a str),
    /// A predefined topic id (type 0b01).
    Predefined(u16),
    /// A two-octet short topic name (type 0b10).
    Short([u8; 2]),
}

impl SubscribeTopic<'_> {
    fn id_type(&self) -> u8 {
        match self {
            Self::Name(_) => TOPIC_ID_TYPE_NORMAL,
            Self::Predefined(_) => TOPIC_ID_TYPE_PREDEFINED,
            Self::Short(_) => TOPIC_ID_TYPE_SHORT,
        }
    }

    fn wire_len(&self) -> usize {
        match self {
            Self::Name(name) => name.len(),
            Self::Predefined(_) | Self::Short(_) => 2,
        }
    }

    fn emit(&self, out: &mut Vec<u8>) {
        match self {
            Self::Name(name) => out.extend_from_slice(name.as_bytes()),
            Self::Predefined(id) => out.extend_from_slice(&id.to_be_bytes()),
            Self::Short(name) => out.extend_from_slice(name),
        }
    }
}

/// The QoS and Retain flags of a Will (WILLTOPIC, WILLTOPICUPD).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WillFlags {
    /// QoS the Will is published with.
    pub qos: QoS,
    /// Whether the Will is published retained.
    pub retain: bool,
}

impl WillFlags {
    fn from_flags(flags: u8) -> Self {
        Self {
            qos: QoS::from_flags(flags),
            retain: flags & FLAG_RETAIN != 0,
        }
    }

    fn to_flags(self) -> u8 {
        self.qos.to_flags() | if self.retain { FLAG_RETAIN } else { 0 }
    }
}

/// One MQTT-SN message, borrowing its variable-length fields from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// ADVERTISE: a gateway announces itself.
    Advertise {
        /// Id of the advertising gateway.
        gw_id: u8,
        /// Seconds until the next ADVERTISE.
        duration: u16,
    },
    /// SEARCHGW: a client looks for a gateway.
    SearchGw {
        /// Broadcast radius in hops; 0 means all.
        radius: u8,
    },
    /// GWINFO: answer to SEARCHGW.
    GwInfo {
        /// Id of the gateway.
        gw_id: u8,
        /// Gateway address; empty when sent by a gateway, present when a client answers.
        gw_addr: &'a [u8],
    },
    /// CONNECT.
    Connect {
        /// The client wants to send WILLTOPIC/WILLMSG.
        will: bool,
        /// Start a new session (also covers the Will data, spec 6.3).
        clean_session: bool,
        /// Keep-alive period in seconds.
        duration: u16,
        /// ClientId, 0..=[`MAX_CLIENT_ID_LEN_DECODE`] octets; the core refuses an empty one
        /// or one longer than its limit with CONNACK.
        client_id: &'a str,
    },
    /// CONNACK.
    ConnAck {
        /// Outcome of the CONNECT.
        rc: ReturnCode,
    },
    /// WILLTOPICREQ: the gateway asks for the Will topic.
    WillTopicReq,
    /// WILLTOPIC. An empty WILLTOPIC (no flags, no topic) deletes the Will and is represented
    /// as `will: None, topic: ""`; with `will: None` the encoder ignores `topic`.
    WillTopic {
        /// QoS and Retain of the Will, `None` for the empty (delete) form.
        will: Option<WillFlags>,
        /// The Will topic; no wildcards.
        topic: &'a str,
    },
    /// WILLMSGREQ: the gateway asks for the Will message.
    WillMsgReq,
    /// WILLMSG.
    WillMsg {
        /// The Will payload.
        msg: &'a [u8],
    },
    /// REGISTER: ask for (client) or announce (gateway) a topic id.
    Register {
        /// 0 when sent by a client; the assigned id when sent by a gateway.
        topic_id: u16,
        /// Message id matched by the REGACK.
        msg_id: u16,
        /// Non-empty topic name without wildcards.
        topic_name: &'a str,
    },
    /// REGACK.
    RegAck {
        /// The assigned topic id.
        topic_id: u16,
        /// Message id of the REGISTER.
        msg_id: u16,
        /// Outcome of the REGISTER.
        rc: ReturnCode,
    },
    /// PUBLISH.
    Publish {
        /// Retransmission flag (QoS 1/2).
        dup: bool,
        /// Delivery QoS.
        qos: QoS,
        /// Retained message.
        retain: bool,
        /// The topic, by id type.
        topic: TopicRef,
        /// Message id; 0 for QoS 0 and -1.
        msg_id: u16,
        /// Payload.
        data: &'a [u8],
    },
    /// PUBACK.
    PubAck {
        /// Topic id of the PUBLISH.
        topic_id: u16,
        /// Message id of the PUBLISH.
        msg_id: u16,
        /// Outcome of the PUBLISH.
        rc: ReturnCode,
    },
    /// PUBREC (QoS 2, step 1).
    PubRec {
        /// Message id of the PUBLISH.
        msg_id: u16,
    },
    /// PUBREL (QoS 2, step 2).
    PubRel {
        /// Message id of the PUBLISH.
        msg_id: u16,
    },
    /// PUBCOMP (QoS 2, step 3).
    PubComp {
        /// Message id of the PUBLISH.
        msg_id: u16,
    },
    /// SUBSCRIBE.
    Subscribe {
        /// Retransmission flag.
        dup: bool,
        /// Requested QoS.
        qos: QoS,
        /// Message id matched by the SUBACK.
        msg_id: u16,
        /// What to subscribe to.
        topic: SubscribeTopic<'a>,
    },
    /// SUBACK.
    SubAck {
        /// Granted QoS.
        qos: QoS,
        /// Assigned topic id; 0x0000 for wildcard subscriptions.
        topic_id: u16,
        /// Message id of the SUBSCRIBE.
        msg_id: u16,
        /// Outcome of the SUBSCRIBE.
        rc: ReturnCode,
    },
    /// UNSUBSCRIBE.
    Unsubscribe {
        /// Message id matched by the UNSUBACK.
        msg_id: u16,
        /// What to unsubscribe from.
        topic: SubscribeTopic<'a>,
    },
    /// UNSUBACK.
    UnsubAck {
        /// Message id of the UNSUBSCRIBE.
        msg_id: u16,
    },
    /// PINGREQ; with a ClientId it wakes a sleeping client (spec 6.14).
    PingReq {
        /// ClientId of a sleeping client, validated as in CONNECT.
        client_id: Option<&'a str>,
    },
    /// PINGRESP.
    PingResp,
    /// DISCONNECT; with a duration the client goes to sleep (spec 6.14).
    Disconnect {
        /// Sleep duration in seconds.
        duration: Option<u16>,
    },
    /// WILLTOPICUPD. The empty form deletes the Will, represented as `will: None, topic: ""`.
    WillTopicUpd {
        /// QoS and Retain of the Will, `None` for the empty (delete) form.
        will: Option<WillFlags>,
        /// The new Will topic; no wildcards.
        topic: &'a str,
    },
    /// WILLTOPICRESP.
    WillTopicResp {
        /// Outcome of the WILLTOPICUPD.
        rc: ReturnCode,
    },
    /// WILLMSGUPD.
    WillMsgUpd {
        /// The new Will payload.
        msg: &'a [u8],
    },
    /// WILLMSGRESP.
    WillMsgResp {
        /// Outcome of the WILLMSGUPD.
        rc: ReturnCode,
    },
}

/// A datagram: a plain packet, or one wrapped by a forwarder (0xFE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A packet sent directly by a client or gateway.
    Plain(Packet<'a>),
    /// A packet relayed by a forwarder (spec 5.5).
    Encapsulated {
        /// Broadcast radius from the Ctrl octet, 0..=3.
        radius: u8,
        /// Forwarder-specific address of the wireless node; may be empty.
        node_id: &'a [u8],
        /// The relayed packet.
        packet: Packet<'a>,
    },
}

impl<'a> Frame<'a> {
    /// The MQTT-SN packet, whether plain or encapsulated.
    pub fn packet(&self) -> &Packet<'a> {
        match self {
            Self::Plain(packet) | Self::Encapsulated { packet, .. } => packet,
        }
    }

    /// Appends the wire form of this frame to `out`.
    ///
    /// # Errors
    ///
    /// [`EncodeError::TooLong`] as for [`Packet::encode`] and [`encode_encapsulated`]; `out`
    /// is then unchanged.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            Self::Plain(packet) => packet.encode(out),
            Self::Encapsulated {
                radius,
                node_id,
                packet,
            } => encode_encapsulated(*radius, node_id, packet, out),
        }
    }
}

/// Limits applied while decoding, set from the gateway configuration.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Longest ClientId accepted in PINGREQ, in octets. The default is
    /// [`MAX_CLIENT_ID_LEN_SPEC`]; some clients need longer ids. (CONNECT decodes ClientIds
    /// up to [`MAX_CLIENT_ID_LEN_DECODE`] so that the core can refuse them with CONNACK.)
    pub max_client_id_len: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_client_id_len: MAX_CLIENT_ID_LEN_SPEC,
        }
    }
}

/// Why a datagram is not a valid MQTT-SN message. All of these are the peer's fault: drop
/// the datagram and count it by [`DecodeError::error_code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ends before a field that the packet needs.
    #[error("message truncated")]
    Truncated,
    /// The Length field disagrees with the datagram length.
    #[error("length field says {declared} octets, datagram has {actual}")]
    LengthMismatch {
        /// Value of the Length field.
        declared: usize,
        /// Octets actually received.
        actual: usize,
    },
    /// The MsgType is reserved (spec Table 3).
    #[error("reserved message type {0:#04x}")]
    ReservedMsgType(u8),
    /// The TopicIdType is the reserved 0b11.
    #[error("reserved topic id type")]
    ReservedTopicIdType,
    /// The ReturnCode is reserved (0x04..=0xFF).
    #[error("reserved return code {0:#04x}")]
    ReservedReturnCode(u8),
    /// CONNECT carries a ProtocolId other than [`PROTOCOL_ID`].
    #[error("unsupported protocol id {0:#04x}")]
    BadProtocolId(u8),
    /// A PINGREQ's ClientId is empty or longer than [`DecodeLimits::max_client_id_len`], or
    /// a CONNECT's is longer than [`MAX_CLIENT_ID_LEN_DECODE`].
    #[error("client id of {0} octets")]
    ClientIdLength(usize),
    /// A string field is not valid UTF-8.
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    /// A topic name that must be concrete (PUBLISH target, REGISTER, Will) holds `+` or `#`.
    #[error("wildcard in topic name")]
    WildcardInTopic,
    /// A topic name that must not be empty (REGISTER, SUBSCRIBE, UNSUBSCRIBE) is empty.
    #[error("empty topic name")]
    EmptyTopic,
    /// Octets follow the last field of a fixed-size packet.
    #[error("trailing octets after the message")]
    TrailingBytes,
    /// A forwarder encapsulation where only a plain packet may appear: inside another
    /// encapsulation, or given to [`decode_packet`].
    #[error("nested encapsulation")]
    NestedEncapsulation,
}

impl DecodeError {
    /// A snake_case tag for metrics, stable across releases.
    pub fn error_code(&self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::LengthMismatch { .. } => "length_mismatch",
            Self::ReservedMsgType(_) => "reserved_msg_type",
            Self::ReservedTopicIdType => "reserved_topic_id_type",
            Self::ReservedReturnCode(_) => "reserved_return_code",
            Self::BadProtocolId(_) => "bad_protocol_id",
            Self::ClientIdLength(_) => "client_id_length",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::WildcardInTopic => "wildcard_in_topic",
            Self::EmptyTopic => "empty_topic",
            Self::TrailingBytes => "trailing_bytes",
            Self::NestedEncapsulation => "nested_encapsulation",
        }
    }
}

/// Why a packet cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The message (or encapsulation header) would be this many octets, more than the 16-bit
    /// Length field can express.
    #[error("message of {0} octets does not fit the length field")]
    TooLong(usize),
}

/// A cursor over untrusted bytes; every read is checked and returns `Result`.
#[derive(Debug)]
struct Reader<'a> {
    /// The octets not read yet.
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn peek(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&first, rest) = self.rest.split_first().ok_or(DecodeError::Truncated)?;
        self.rest = rest;
        Ok(first)
    }

    fn array2(&mut self) -> Result<[u8; 2], DecodeError> {
        let (head, rest) = self
            .rest
            .split_first_chunk::<2>()
            .ok_or(DecodeError::Truncated)?;
        self.rest = rest;
        Ok(*head)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array2().map(u16::from_be_bytes)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let (head, rest) = self
            .rest
            .split_at_checked(n)
            .ok_or(DecodeError::Truncated)?;
        self.rest = rest;
        Ok(head)
    }

    /// Everything left; cannot fail.
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// Succeeds only if every octet was consumed.
    fn finish(&self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes)
        }
    }
}

/// Reads a Length field in either form, returning the declared length and the size of the
/// Length field itself.
fn read_length(r: &mut Reader<'_>) -> Result<(usize, usize), DecodeError> {
    match r.u8()? {
        LONG_LENGTH_MARKER => Ok((usize::from(r.u16()?), 3)),
        short => Ok((usize::from(short), 1)),
    }
}

/// Decodes one datagram: a plain MQTT-SN message or a forwarder encapsulation.
///
/// # Errors
///
/// Any [`DecodeError`]; an empty datagram is [`DecodeError::Truncated`].
pub fn decode<'a>(datagram: &'a [u8], limits: &DecodeLimits) -> Result<Frame<'a>, DecodeError> {
    let mut r = Reader::new(datagram);
    let (declared, length_field_len) = read_length(&mut r)?;
    if r.peek() != Some(ENCAPSULATED) {
        return decode_packet(datagram, limits).map(Frame::Plain);
    }
    // The Length of an encapsulation covers Length | 0xFE | Ctrl | Wireless Node Id only.
    let node_id_len = declared
        .checked_sub(length_field_len + 2)
        .ok_or(DecodeError::Truncated)?;
    let _msg_type = r.u8()?;
    // Reserved Ctrl bits are ignored so that future forwarders still get through.
    let radius = r.u8()? & TWO_BITS;
    let node_id = r.take(node_id_len)?;
    let packet = decode_packet(r.rest(), limits)?;
    Ok(Frame::Encapsulated {
        radius,
        node_id,
        packet,
    })
}

/// Decodes exactly one plain MQTT-SN message that fills all of `bytes`.
///
/// # Errors
///
/// Any [`DecodeError`]; MsgType 0xFE is [`DecodeError::NestedEncapsulation`].
pub fn decode_packet<'a>(
    bytes: &'a [u8],
    limits: &DecodeLimits,
) -> Result<Packet<'a>, DecodeError> {
    let mut r = Reader::new(bytes);
    let (declared, _) = read_length(&mut r)?;
    // An encapsulation's Length covers only its own header, so report it before the length
    // check would call it a mismatch.
    if r.peek() == Some(ENCAPSULATED) {
        return Err(DecodeError::NestedEncapsulation);
    }
    if declared != bytes.len() {
        return Err(DecodeError::LengthMismatch {
            declared,
            actual: bytes.len(),
        });
    }
    let msg_type = r.u8()?;
    let packet = parse_body(msg_type, &mut r, limits)?;
    r.finish()?;
    Ok(packet)
}

/// Parses the variable part of a message of type `msg_type`. The caller checks that nothing
/// is left over.
fn parse_body<'a>(
    msg_type: u8,
    r: &mut Reader<'a>,
    limits: &DecodeLimits,
) -> Result<Packet<'a>, DecodeError> {
    let packet = match msg_type {
        ADVERTISE => Packet::Advertise {
            gw_id: r.u8()?,
            duration: r.u16()?,
        },
        SEARCHGW => Packet::SearchGw { radius: r.u8()? },
        GWINFO => Packet::GwInfo {
            gw_id: r.u8()?,
            gw_addr: r.rest(),
        },
        CONNECT => {
            let flags = r.u8()?;
            let protocol_id = r.u8()?;
            if protocol_id != PROTOCOL_ID {
                return Err(DecodeError::BadProtocolId(protocol_id));
            }
            Packet::Connect {
                will: flags & FLAG_WILL != 0,
                clean_session: flags & FLAG_CLEAN_SESSION != 0,
                duration: r.u16()?,
                client_id: connect_client_id(r.rest())?,
            }
        }
        CONNACK => Packet::ConnAck {
            rc: return_code(r)?,
        },
        WILLTOPICREQ => Packet::WillTopicReq,
        WILLTOPIC => {
            let (will, topic) = will_topic(r)?;
            Packet::WillTopic { will, topic }
        }
        WILLMSGREQ => Packet::WillMsgReq,
        WILLMSG => Packet::WillMsg { msg: r.rest() },
        REGISTER => Packet::Register {
            topic_id: r.u16()?,
            msg_id: r.u16()?,
            topic_name: topic_name(r.rest())?,
        },
        REGACK => Packet::RegAck {
            topic_id: r.u16()?,
            msg_id: r.u16()?,
            rc: return_code(r)?,
        },
        PUBLISH => {
            let flags = r.u8()?;
            let id_type = topic_id_type(flags)?;
            let raw = r.array2()?;
            let topic = match id_type {
                TOPIC_ID_TYPE_NORMAL => TopicRef::Normal(u16::from_be_bytes(raw)),
                TOPIC_ID_TYPE_PREDEFINED => TopicRef::Predefined(u16::from_be_bytes(raw)),
                // A short topic name is a topic, not a filter (spec 6.7).
                _ if raw.iter().any(|b| matches!(b, b'+' | b'#')) => {
                    return Err(DecodeError::WildcardInTopic);
                }
                _ => TopicRef::Short(raw),
            };
            Packet::Publish {
                dup: flags & FLAG_DUP != 0,
                qos: QoS::from_flags(flags),
                retain: flags & FLAG_RETAIN != 0,
                topic,
                msg_id: r.u16()?,
                data: r.rest(),
            }
        }
        PUBACK => Packet::PubAck {
            topic_id: r.u16()?,
            msg_id: r.u16()?,
            rc: return_code(r)?,
        },
        PUBCOMP => Packet::PubComp { msg_id: r.u16()? },
        PUBREC => Packet::PubRec { msg_id: r.u16()? },
        PUBREL => Packet::PubRel { msg_id: r.u16()? },
        SUBSCRIBE => {
            let flags = r.u8()?;
            let id_type = topic_id_type(flags)?;
            Packet::Subscribe {
                dup: flags & FLAG_DUP != 0,
                qos: QoS::from_flags(flags),
                msg_id: r.u16()?,
                topic: subscribe_topic(id_type, r)?,
            }
        }
        SUBACK => Packet::SubAck {
            qos: QoS::from_flags(r.u8()?),
            topic_id: r.u16()?,
            msg_id: r.u16()?,
            rc: return_code(r)?,
        },
        UNSUBSCRIBE => {
            let id_type = topic_id_type(r.u8()?)?;
            Packet::Unsubscribe {
                msg_id: r.u16()?,
                topic: subscribe_topic(id_type, r)?,
            }
        }
        UNSUBACK => Packet::UnsubAck { msg_id: r.u16()? },
        PINGREQ => Packet::PingReq {
            client_id: if r.is_empty() {
                None
            } else {
                Some(client_id(r.rest(), limits)?)
            },
        },
        PINGRESP => Packet::PingResp,
        DISCONNECT => Packet::Disconnect {
            duration: if r.is_empty() { None } else { Some(r.u16()?) },
        },
        WILLTOPICUPD => {
            let (will, topic) = will_topic(r)?;
            Packet::WillTopicUpd { will, topic }
        }
        WILLTOPICRESP => Packet::WillTopicResp {
            rc: return_code(r)?,
        },
        WILLMSGUPD => Packet::WillMsgUpd { msg: r.rest() },
        WILLMSGRESP => Packet::WillMsgResp {
            rc: return_code(r)?,
        },
        ENCAPSULATED => return Err(DecodeError::NestedEncapsulation),
        reserved => return Err(DecodeError::ReservedMsgType(reserved)),
    };
    Ok(packet)
}

fn return_code(r: &mut Reader<'_>) -> Result<ReturnCode, DecodeError> {
    ReturnCode::from_u8(r.u8()?)
}

/// Bits 1..0 of a flags octet, refusing the reserved 0b11.
fn topic_id_type(flags: u8) -> Result<u8, DecodeError> {
    match flags & TWO_BITS {
        TWO_BITS => Err(DecodeError::ReservedTopicIdType),
        id_type => Ok(id_type),
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, DecodeError> {
    str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8)
}

/// A CONNECT's ClientId: any length up to [`MAX_CLIENT_ID_LEN_DECODE`]; the core judges it.
fn connect_client_id(bytes: &[u8]) -> Result<&str, DecodeError> {
    if bytes.len() > MAX_CLIENT_ID_LEN_DECODE {
        return Err(DecodeError::ClientIdLength(bytes.len()));
    }
    utf8(bytes)
}

/// A PINGREQ's ClientId: it names an existing session, so one the core would not accept for
/// a session is malformed here.
fn client_id<'a>(bytes: &'a [u8], limits: &DecodeLimits) -> Result<&'a str, DecodeError> {
    if bytes.is_empty() || bytes.len() > limits.max_client_id_len {
        return Err(DecodeError::ClientIdLength(bytes.len()));
    }
    utf8(bytes)
}

/// A REGISTER topic name: non-empty UTF-8. Wildcards are left to the core, which answers them
/// with REGACK rc 0x02 (a decode error would leave the sender without an answer).
fn topic_name(bytes: &[u8]) -> Result<&str, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::EmptyTopic);
    }
    utf8(bytes)
}

/// The Will part of WILLTOPIC/WILLTOPICUPD; an empty variable part deletes the Will. The topic
/// is only checked for UTF-8: an empty or wildcard topic is left to the core, which answers it
/// (CONNACK / WILLTOPICRESP rc 0x02) where a decode error would leave the client waiting.
fn will_topic<'a>(r: &mut Reader<'a>) -> Result<(Option<WillFlags>, &'a str), DecodeError> {
    if r.is_empty() {
        return Ok((None, ""));
    }
    let flags = WillFlags::from_flags(r.u8()?);
    Ok((Some(flags), utf8(r.rest())?))
}

/// The topic of SUBSCRIBE/UNSUBSCRIBE by its (non-reserved) id type.
fn subscribe_topic<'a>(id_type: u8, r: &mut Reader<'a>) -> Result<SubscribeTopic<'a>, DecodeError> {
    match id_type {
        TOPIC_ID_TYPE_NORMAL => {
            let name = r.rest();
            if name.is_empty() {
                return Err(DecodeError::EmptyTopic);
            }
            // A filter: wildcards are legal here and their syntax is the core's business.
            Ok(SubscribeTopic::Name(utf8(name)?))
        }
        TOPIC_ID_TYPE_PREDEFINED => Ok(SubscribeTopic::Predefined(r.u16()?)),
        // A short name is exactly two octets; more is `TrailingBytes`, fewer `Truncated`.
        _ => Ok(SubscribeTopic::Short(r.array2()?)),
    }
}

/// Total length of a message with a variable part of `body_len` octets, header included,
/// using the shortest Length form.
fn framed_len(body_len: usize) -> usize {
    // Length(1) + MsgType(1), or 0x01 + Length(2) + MsgType(1).
    let short = body_len.saturating_add(2);
    if short < 256 {
        short
    } else {
        body_len.saturating_add(4)
    }
}

/// Appends a Length field for a message (or encapsulation header) of `total` octets.
fn emit_length(total: usize, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    // A total of 1 cannot occur (the header alone is 2 octets) and would read as the marker.
    match u8::try_from(total) {
        Ok(short) if short != LONG_LENGTH_MARKER => {
            out.push(short);
            return Ok(());
        }
        _ => {}
    }
    let long = u16::try_from(total).map_err(|_| EncodeError::TooLong(total))?;
    out.push(LONG_LENGTH_MARKER);
    out.extend_from_slice(&long.to_be_bytes());
    Ok(())
}

fn flag(set: bool, bit: u8) -> u8 {
    if set { bit } else { 0 }
}

impl Packet<'_> {
    /// Octets [`Packet::encode`] appends, Length field included. May exceed `u16::MAX`, in
    /// which case `encode` fails.
    pub fn encoded_len(&self) -> usize {
        framed_len(self.body_len())
    }

    /// Appends the wire form of this packet to `out`, using the 1-octet Length form when the
    /// message is shorter than 256 octets.
    ///
    /// # Errors
    ///
    /// [`EncodeError::TooLong`] when [`Packet::encoded_len`] exceeds `u16::MAX`; `out` is then
    /// unchanged.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let total = self.encoded_len();
        if total > usize::from(u16::MAX) {
            return Err(EncodeError::TooLong(total));
        }
        out.reserve(total);
        emit_length(total, out)?;
        out.push(self.msg_type());
        self.emit_body(out);
        Ok(())
    }

    /// The MsgType code (see [`msg_type`]).
    pub fn msg_type(&self) -> u8 {
        match self {
            Self::Advertise { .. } => ADVERTISE,
            Self::SearchGw { .. } => SEARCHGW,
            Self::GwInfo { .. } => GWINFO,
            Self::Connect { .. } => CONNECT,
            Self::ConnAck { .. } => CONNACK,
            Self::WillTopicReq => WILLTOPICREQ,
            Self::WillTopic { .. } => WILLTOPIC,
            Self::WillMsgReq => WILLMSGREQ,
            Self::WillMsg { .. } => WILLMSG,
            Self::Register { .. } => REGISTER,
            Self::RegAck { .. } => REGACK,
            Self::Publish { .. } => PUBLISH,
            Self::PubAck { .. } => PUBACK,
            Self::PubRec { .. } => PUBREC,
            Self::PubRel { .. } => PUBREL,
            Self::PubComp { .. } => PUBCOMP,
            Self::Subscribe { .. } => SUBSCRIBE,
            Self::SubAck { .. } => SUBACK,
            Self::Unsubscribe { .. } => UNSUBSCRIBE,
            Self::UnsubAck { .. } => UNSUBACK,
            Self::PingReq { .. } => PINGREQ,
            Self::PingResp => PINGRESP,
            Self::Disconnect { .. } => DISCONNECT,
            Self::WillTopicUpd { .. } => WILLTOPICUPD,
            Self::WillTopicResp { .. } => WILLTOPICRESP,
            Self::WillMsgUpd { .. } => WILLMSGUPD,
            Self::WillMsgResp { .. } => WILLMSGRESP,
        }
    }

    /// The specification's name of the packet type, e.g. `"PUBLISH"`, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Advertise { .. } => "ADVERTISE",
            Self::SearchGw { .. } => "SEARCHGW",
            Self::GwInfo { .. } => "GWINFO",
            Self::Connect { .. } => "CONNECT",
            Self::ConnAck { .. } => "CONNACK",
            Self::WillTopicReq => "WILLTOPICREQ",
            Self::WillTopic { .. } => "WILLTOPIC",
            Self::WillMsgReq => "WILLMSGREQ",
            Self::WillMsg { .. } => "WILLMSG",
            Self::Register { .. } => "REGISTER",
            Self::RegAck { .. } => "REGACK",
            Self::Publish { .. } => "PUBLISH",
            Self::PubAck { .. } => "PUBACK",
            Self::PubRec { .. } => "PUBREC",
            Self::PubRel { .. } => "PUBREL",
            Self::PubComp { .. } => "PUBCOMP",
            Self::Subscribe { .. } => "SUBSCRIBE",
            Self::SubAck { .. } => "SUBACK",
            Self::Unsubscribe { .. } => "UNSUBSCRIBE",
            Self::UnsubAck { .. } => "UNSUBACK",
            Self::PingReq { .. } => "PINGREQ",
            Self::PingResp => "PINGRESP",
            Self::Disconnect { .. } => "DISCONNECT",
            Self::WillTopicUpd { .. } => "WILLTOPICUPD",
            Self::WillTopicResp { .. } => "WILLTOPICRESP",
            Self::WillMsgUpd { .. } => "WILLMSGUPD",
            Self::WillMsgResp { .. } => "WILLMSGRESP",
        }
    }

    /// Octets of the variable part (after MsgType). Must match [`Packet::emit_body`].
    fn body_len(&self) -> usize {
        match self {
            Self::WillTopicReq | Self::WillMsgReq | Self::PingResp => 0,
            Self::SearchGw { .. }
            | Self::ConnAck { .. }
            | Self::WillTopicResp { .. }
            | Self::WillMsgResp { .. } => 1,
            Self::PubRec { .. }
            | Self::PubRel { .. }
            | Self::PubComp { .. }
            | Self::UnsubAck { .. } => 2,
            Self::Advertise { .. } => 3,
            Self::RegAck { .. } | Self::PubAck { .. } => 5,
            Self::SubAck { .. } => 6,
            Self::GwInfo { gw_addr, .. } => 1 + gw_addr.len(),
            Self::Connect { client_id, .. } => 4 + client_id.len(),
            Self::WillTopic { will, topic } | Self::WillTopicUpd { will, topic } => {
                will.map_or(0, |_| 1 + topic.len())
            }
            Self::WillMsg { msg } | Self::WillMsgUpd { msg } => msg.len(),
            Self::Register { topic_name, .. } => 4 + topic_name.len(),
            Self::Publish { data, .. } => 5 + data.len(),
            Self::Subscribe { topic, .. } | Self::Unsubscribe { topic, .. } => 3 + topic.wire_len(),
            Self::PingReq { client_id } => client_id.map_or(0, str::len),
            Self::Disconnect { duration } => duration.map_or(0, |_| 2),
        }
    }

    /// Appends the variable part (after MsgType).
    fn emit_body(&self, out: &mut Vec<u8>) {
        match *self {
            Self::WillTopicReq | Self::WillMsgReq | Self::PingResp => {}
            Self::Advertise { gw_id, duration } => {
                out.push(gw_id);
                out.extend_from_slice(&duration.to_be_bytes());
            }
            Self::SearchGw { radius } => out.push(radius),
            Self::GwInfo { gw_id, gw_addr } => {
                out.push(gw_id);
                out.extend_from_slice(gw_addr);
            }
            Self::Connect {
                will,
                clean_session,
                duration,
                client_id,
            } => {
                out.push(flag(will, FLAG_WILL) | flag(clean_session, FLAG_CLEAN_SESSION));
                out.push(PROTOCOL_ID);
                out.extend_from_slice(&duration.to_be_bytes());
                out.extend_from_slice(client_id.as_bytes());
            }
            Self::ConnAck { rc } | Self::WillTopicResp { rc } | Self::WillMsgResp { rc } => {
                out.push(rc.to_u8());
            }
            Self::WillTopic { will, topic } | Self::WillTopicUpd { will, topic } => {
                if let Some(will) = will {
                    out.push(will.to_flags());
                    out.extend_from_slice(topic.as_bytes());
                }
            }
            Self::WillMsg { msg } | Self::WillMsgUpd { msg } => out.extend_from_slice(msg),
            Self::Register {
                topic_id,
                msg_id,
                topic_name,
            } => {
                out.extend_from_slice(&topic_id.to_be_bytes());
                out.extend_from_slice(&msg_id.to_be_bytes());
                out.extend_from_slice(topic_name.as_bytes());
            }
            Self::RegAck {
                topic_id,
                msg_id,
                rc,
            }
            | Self::PubAck {
                topic_id,
                msg_id,
                rc,
            } => {
                out.extend_from_slice(&topic_id.to_be_bytes());
                out.extend_from_slice(&msg_id.to_be_bytes());
                out.push(rc.to_u8());
            }
            Self::Publish {
                dup,
                qos,
                retain,
                topic,
                msg_id,
                data,
            } => {
                out.push(
                    flag(dup, FLAG_DUP)
                        | qos.to_flags()
                        | flag(retain, FLAG_RETAIN)
                        | topic.id_type(),
                );
                out.extend_from_slice(&topic.to_bytes());
                out.extend_from_slice(&msg_id.to_be_bytes());
                out.extend_from_slice(data);
            }
            Self::PubRec { msg_id }
            | Self::PubRel { msg_id }
            | Self::PubComp { msg_id }
            | Self::UnsubAck { msg_id } => out.extend_from_slice(&msg_id.to_be_bytes()),
            Self::Subscribe {
                dup,
                qos,
                msg_id,
                topic,
            } => {
                out.push(flag(dup, FLAG_DUP) | qos.to_flags() | topic.id_type());
                out.extend_from_slice(&msg_id.to_be_bytes());
                topic.emit(out);
            }
            Self::SubAck {
                qos,
                topic_id,
                msg_id,
                rc,
            } => {
                out.push(qos.to_flags());
                out.extend_from_slice(&topic_id.to_be_bytes());
                out.extend_from_slice(&msg_id.to_be_bytes());
                out.push(rc.to_u8());
            }
            Self::Unsubscribe { msg_id, topic } => {
                out.push(topic.id_type());
                out.extend_from_slice(&msg_id.to_be_bytes());
                topic.emit(out);
            }
            Self::PingReq { client_id } => {
                if let Some(client_id) = client_id {
                    out.extend_from_slice(client_id.as_bytes());
                }
            }
            Self::Disconnect { duration } => {
                if let Some(duration) = duration {
                    out.extend_from_slice(&duration.to_be_bytes());
                }
            }
        }
    }
}

/// Appends a forwarder encapsulation of `packet` (spec 5.5) to `out`. Only the low two bits of
/// `radius` are sent; the other Ctrl bits are zero.
///
/// # Errors
///
/// [`EncodeError::TooLong`] when the encapsulation header (with `node_id`) or `packet` does
/// not fit its 16-bit Length field; `out` is then unchanged.
pub fn encode_encapsulated(
    radius: u8,
    node_id: &[u8],
    packet: &Packet<'_>,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    // The header is Length | 0xFE | Ctrl | Node Id, and its Length counts only itself.
    let header_len = framed_len(node_id.len().saturating_add(1));
    if header_len > usize::from(u16::MAX) {
        return Err(EncodeError::TooLong(header_len));
    }
    let packet_len = packet.encoded_len();
    if packet_len > usize::from(u16::MAX) {
        return Err(EncodeError::TooLong(packet_len));
    }
    out.reserve(header_len.saturating_add(packet_len));
    emit_length(header_len, out)?;
    out.push(ENCAPSULATED);
    out.push(radius & TWO_BITS);
    out.extend_from_slice(node_id);
    packet.encode(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const LIMITS: DecodeLimits = DecodeLimits {
        max_client_id_len: MAX_CLIENT_ID_LEN_SPEC,
    };

    fn encode(packet: &Packet<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        packet.encode(&mut out).unwrap();
        assert_eq!(out.len(), packet.encoded_len(), "encoded_len of {packet:?}");
        out
    }

    /// Decodes `bytes` to `expected` and encodes `expected` back to `bytes`.
    #[track_caller]
    fn known_answer(bytes: &[u8], expected: Packet<'_>) {
        assert_eq!(decode(bytes, &LIMITS), Ok(Frame::Plain(expected)));
        assert_eq!(decode_packet(bytes, &LIMITS), Ok(expected));
        assert_eq!(encode(&expected), bytes, "{}", expected.name());
    }

    #[track_caller]
    fn rejects(bytes: &[u8], expected: DecodeError) {
        assert_eq!(decode(bytes, &LIMITS), Err(expected));
    }

    #[test]
    fn advertise_searchgw_gwinfo() {
        known_answer(
            &[0x05, 0x00, 0x07, 0x03, 0x84],
            Packet::Advertise {
                gw_id: 7,
                duration: 900,
            },
        );
        known_answer(&[0x03, 0x01, 0x02], Packet::SearchGw { radius: 2 });
        known_answer(
            &[0x03, 0x02, 0x07],
            Packet::GwInfo {
                gw_id: 7,
                gw_addr: &[],
            },
        );
        known_answer(
            &[0x07, 0x02, 0x07, 10, 0, 0, 1],
            Packet::GwInfo {
                gw_id: 7,
                gw_addr: &[10, 0, 0, 1],
            },
        );
    }

    #[test]
    fn connect_and_connack() {
        known_answer(
            b"\x0a\x04\x0c\x01\x00\x3cdev1",
            Packet::Connect {
                will: true,
                clean_session: true,
                duration: 60,
                client_id: "dev1",
            },
        );
        known_answer(
            b"\x07\x04\x00\x01\xff\xffx",
            Packet::Connect {
                will: false,
                clean_session: false,
                duration: 0xFFFF,
                client_id: "x",
            },
        );
        known_answer(
            &[0x03, 0x05, 0x00],
            Packet::ConnAck {
                rc: ReturnCode::Accepted,
            },
        );
        known_answer(
            &[0x03, 0x05, 0x03],
            Packet::ConnAck {
                rc: ReturnCode::NotSupported,
            },
        );
    }

    #[test]
    fn will_packets() {
        known_answer(&[0x02, 0x06], Packet::WillTopicReq);
        known_answer(
            b"\x07\x07\x30dead",
            Packet::WillTopic {
                will: Some(WillFlags {
                    qos: QoS::AtLeastOnce,
                    retain: true,
                }),
                topic: "dead",
            },
        );
        known_answer(
            &[0x02, 0x07],
            Packet::WillTopic {
                will: None,
                topic: "",
            },
        );
        known_answer(
            &[0x03, 0x07, 0x40],
            Packet::WillTopic {
                will: Some(WillFlags {
                    qos: QoS::ExactlyOnce,
                    retain: false,
                }),
                topic: "",
            },
        );
        known_answer(&[0x02, 0x08], Packet::WillMsgReq);
        known_answer(b"\x05\x09bye", Packet::WillMsg { msg: b"bye" });
        known_answer(&[0x02, 0x09], Packet::WillMsg { msg: &[] });
        known_answer(
            b"\x04\x1a\x60t",
            Packet::WillTopicUpd {
                will: Some(WillFlags {
                    qos: QoS::MinusOne,
                    retain: false,
                }),
                topic: "t",
            },
        );
        known_answer(
            &[0x02, 0x1A],
            Packet::WillTopicUpd {
                will: None,
                topic: "",
            },
        );
        known_answer(
            &[0x03, 0x1B, 0x01],
            Packet::WillTopicResp {
                rc: ReturnCode::Congestion,
            },
        );
        known_answer(b"\x04\x1c\x00\xff", Packet::WillMsgUpd { msg: &[0, 0xFF] });
        known_answer(
            &[0x03, 0x1D, 0x00],
            Packet::WillMsgResp {
                rc: ReturnCode::Accepted,
            },
        );
    }

    #[test]
    fn register_and_regack() {
        known_answer(
            b"\x0b\x0a\x00\x00\x00\x01a/b/c",
            Packet::Register {
                topic_id: 0,
                msg_id: 1,
                topic_name: "a/b/c",
            },
        );
        known_answer(
            &[0x07, 0x0B, 0x00, 0x2A, 0x00, 0x01, 0x02],
            Packet::RegAck {
                topic_id: 42,
                msg_id: 1,
                rc: ReturnCode::InvalidTopicId,
            },
        );
    }

    #[test]
    fn publish_topic_id_types() {
        known_answer(
            &[0x09, 0x0C, 0b1011_0000, 0x00, 0x2A, 0x12, 0x34, 0xAB, 0xCD],
            Packet::Publish {
                dup: true,
                qos: QoS::AtLeastOnce,
                retain: true,
                topic: TopicRef::Normal(42),
                msg_id: 0x1234,
                data: &[0xAB, 0xCD],
            },
        );
        known_answer(
            &[0x07, 0x0C, 0b0110_0001, 0x00, 0x05, 0x00, 0x00],
            Packet::Publish {
                dup: false,
                qos: QoS::MinusOne,
                retain: false,
                topic: TopicRef::Predefined(5),
                msg_id: 0,
                data: &[],
            },
        );
        known_answer(
            b"\x08\x0c\x42ab\x00\x07z",
            Packet::Publish {
                dup: false,
                qos: QoS::ExactlyOnce,
                retain: false,
                topic: TopicRef::Short(*b"ab"),
                msg_id: 7,
                data: b"z",
            },
        );
        // QoS -1 with a normal topic id is for the core to answer, not a decode error.
        known_answer(
            &[0x07, 0x0C, 0b0110_0000, 0x00, 0x01, 0x00, 0x00],
            Packet::Publish {
                dup: false,
                qos: QoS::MinusOne,
                retain: false,
                topic: TopicRef::Normal(1),
                msg_id: 0,
                data: &[],
            },
        );
    }

    #[test]
    fn publish_with_300_byte_payload_uses_the_long_length_form() {
        let data = [0x5A_u8; 300];
        let mut bytes = vec![0x01, 0x01, 0x35, 0x0C, 0x00, 0x00, 0x01, 0x00, 0x00];
        bytes.extend_from_slice(&data);
        assert_eq!(bytes.len(), 0x0135);
        known_answer(
            &bytes,
            Packet::Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: TopicRef::Normal(1),
                msg_id: 0,
                data: &data,
            },
        );
    }

    #[test]
    fn length_form_boundary() {
        // A PUBLISH is 7 octets plus its payload in the short form, 9 plus it in the long one.
        for (payload, total, long) in [(248, 255, false), (249, 258, true), (0, 7, false)] {
            let data = vec![1_u8; payload];
            let packet = Packet::Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: TopicRef::Normal(1),
                msg_id: 0,
                data: &data,
            };
            let bytes = encode(&packet);
            assert_eq!(bytes.len(), total);
            assert_eq!(bytes[0] == LONG_LENGTH_MARKER, long);
            assert_eq!(decode_packet(&bytes, &LIMITS), Ok(packet));
        }
    }

    #[test]
    fn long_length_form_is_accepted_for_short_messages() {
        assert_eq!(
            decode(&[0x01, 0x00, 0x04, 0x17], &LIMITS),
            Ok(Frame::Plain(Packet::PingResp))
        );
        assert_eq!(
            decode(&[0x01, 0x00, 0x06, 0x0E, 0x00, 0x09], &LIMITS),
            Ok(Frame::Plain(Packet::PubComp { msg_id: 9 }))
        );
    }

    #[test]
    fn puback_and_qos2_flow() {
        known_answer(
            &[0x07, 0x0D, 0x00, 0x2A, 0x00, 0x05, 0x00],
            Packet::PubAck {
                topic_id: 42,
                msg_id: 5,
                rc: ReturnCode::Accepted,
            },
        );
        known_answer(&[0x04, 0x0F, 0x00, 0x05], Packet::PubRec { msg_id: 5 });
        known_answer(&[0x04, 0x10, 0x00, 0x05], Packet::PubRel { msg_id: 5 });
        known_answer(&[0x04, 0x0E, 0x00, 0x05], Packet::PubComp { msg_id: 5 });
    }

    #[test]
    fn subscribe_topic_kinds() {
        known_answer(
            b"\x08\x12\xa0\x00\x03a/#",
            Packet::Subscribe {
                dup: true,
                qos: QoS::AtLeastOnce,
                msg_id: 3,
                topic: SubscribeTopic::Name("a/#"),
            },
        );
        known_answer(
            &[0x07, 0x12, 0b0010_0001, 0x00, 0x03, 0x00, 0x09],
            Packet::Subscribe {
                dup: false,
                qos: QoS::AtLeastOnce,
                msg_id: 3,
                topic: SubscribeTopic::Predefined(9),
            },
        );
        known_answer(
            b"\x07\x12\x02\x00\x03zz",
            Packet::Subscribe {
                dup: false,
                qos: QoS::AtMostOnce,
                msg_id: 3,
                topic: SubscribeTopic::Short(*b"zz"),
            },
        );
        known_answer(
            &[0x08, 0x13, 0b0010_0000, 0x00, 0x00, 0x00, 0x03, 0x00],
            Packet::SubAck {
                qos: QoS::AtLeastOnce,
                topic_id: 0,
                msg_id: 3,
                rc: ReturnCode::Accepted,
            },
        );
        known_answer(
            b"\x08\x14\x00\x00\x04+/x",
            Packet::Unsubscribe {
                msg_id: 4,
                topic: SubscribeTopic::Name("+/x"),
            },
        );
        known_answer(
            &[0x07, 0x14, 0x01, 0x00, 0x04, 0x12, 0x34],
            Packet::Unsubscribe {
                msg_id: 4,
                topic: SubscribeTopic::Predefined(0x1234),
            },
        );
        known_answer(
            b"\x07\x14\x02\x00\x04ab",
            Packet::Unsubscribe {
                msg_id: 4,
                topic: SubscribeTopic::Short(*b"ab"),
            },
        );
        known_answer(&[0x04, 0x15, 0x00, 0x04], Packet::UnsubAck { msg_id: 4 });
    }

    #[test]
    fn ping_and_disconnect() {
        known_answer(&[0x02, 0x16], Packet::PingReq { client_id: None });
        known_answer(
            b"\x06\x16dev1",
            Packet::PingReq {
                client_id: Some("dev1"),
            },
        );
        known_answer(&[0x02, 0x17], Packet::PingResp);
        known_answer(&[0x02, 0x18], Packet::Disconnect { duration: None });
        known_answer(
            &[0x04, 0x18, 0x0E, 0x10],
            Packet::Disconnect {
                duration: Some(3600),
            },
        );
    }

    #[test]
    fn encapsulated_frame() {
        let bytes = [
            0x05, 0xFE, 0x02, 0xAA, 0xBB, // header: Length 5, radius 2, node id AA BB
            0x04, 0x0F, 0x00, 0x05, // PUBREC msg id 5
        ];
        let frame = Frame::Encapsulated {
            radius: 2,
            node_id: &[0xAA, 0xBB],
            packet: Packet::PubRec { msg_id: 5 },
        };
        assert_eq!(decode(&bytes, &LIMITS), Ok(frame));
        let mut out = Vec::new();
        frame.encode(&mut out).unwrap();
        assert_eq!(out, bytes);
        assert_eq!(frame.packet(), &Packet::PubRec { msg_id: 5 });
    }

    #[test]
    fn encapsulation_ignores_reserved_ctrl_bits_and_allows_an_empty_node_id() {
        assert_eq!(
            decode(&[0x03, 0xFE, 0xFD, 0x02, 0x17], &LIMITS),
            Ok(Frame::Encapsulated {
                radius: 1,
                node_id: &[],
                packet: Packet::PingResp,
            })
        );
    }

    #[test]
    fn encapsulation_with_a_long_node_id_uses_the_long_length_form() {
        let node_id = [7_u8; 300];
        let mut out = Vec::new();
        encode_encapsulated(1, &node_id, &Packet::PingResp, &mut out).unwrap();
        assert_eq!(out[..5], [0x01, 0x01, 0x31, 0xFE, 0x01]);
        assert_eq!(
            decode(&out, &LIMITS),
            Ok(Frame::Encapsulated {
                radius: 1,
                node_id: &node_id,
                packet: Packet::PingResp,
            })
        );
    }

    #[test]
    fn truncated_inputs() {
        rejects(&[], DecodeError::Truncated);
        rejects(&[0x01], DecodeError::Truncated);
        rejects(&[0x01, 0x00], DecodeError::Truncated);
        rejects(&[0x01, 0x00, 0x03], DecodeError::Truncated);
        rejects(&[0x03, 0x0F, 0x00], DecodeError::Truncated);
        rejects(&[0x04, 0x04, 0x00, 0x01], DecodeError::Truncated);
        rejects(&[0x03, 0x18, 0x00], DecodeError::Truncated);
        // SUBSCRIBE with a short name of one octet.
        rejects(
            &[0x06, 0x12, 0x02, 0x00, 0x01, b'a'],
            DecodeError::Truncated,
        );
        // Encapsulation whose Length claims more node id than there is.
        rejects(&[0x09, 0xFE, 0x00, 0xAA], DecodeError::Truncated);
        // Encapsulation whose Length does not even cover Ctrl.
        rejects(&[0x02, 0xFE, 0x00, 0x02, 0x17], DecodeError::Truncated);
        // Encapsulation with no inner message.
        rejects(&[0x03, 0xFE, 0x00], DecodeError::Truncated);
    }

    #[test]
    fn length_mismatch() {
        rejects(
            &[0x05, 0x17],
            DecodeError::LengthMismatch {
                declared: 5,
                actual: 2,
            },
        );
        rejects(
            &[0x02, 0x17, 0x00],
            DecodeError::LengthMismatch {
                declared: 2,
                actual: 3,
            },
        );
        rejects(
            &[0x00],
            DecodeError::LengthMismatch {
                declared: 0,
                actual: 1,
            },
        );
        rejects(
            &[0x01, 0x01, 0x00, 0x17],
            DecodeError::LengthMismatch {
                declared: 256,
                actual: 4,
            },
        );
        // The inner message of an encapsulation is checked on its own.
        rejects(
            &[0x03, 0xFE, 0x00, 0x03, 0x17],
            DecodeError::LengthMismatch {
                declared: 3,
                actual: 2,
            },
        );
    }

    #[test]
    fn reserved_codes() {
        for t in [0x03, 0x11, 0x19, 0x1E, 0x80, 0xFD, 0xFF] {
            rejects(&[0x02, t], DecodeError::ReservedMsgType(t));
        }
        rejects(
            &[0x07, 0x0C, 0x03, 0x00, 0x01, 0x00, 0x00],
            DecodeError::ReservedTopicIdType,
        );
        rejects(
            &[0x06, 0x12, 0x03, 0x00, 0x01, b'a'],
            DecodeError::ReservedTopicIdType,
        );
        rejects(
            &[0x06, 0x14, 0x03, 0x00, 0x01, b'a'],
            DecodeError::ReservedTopicIdType,
        );
        rejects(&[0x03, 0x05, 0x04], DecodeError::ReservedReturnCode(4));
        rejects(
            &[0x07, 0x0D, 0x00, 0x01, 0x00, 0x01, 0xFF],
            DecodeError::ReservedReturnCode(0xFF),
        );
    }

    #[test]
    fn connect_errors() {
        rejects(b"\x07\x04\x00\x02\x00\x3cx", DecodeError::BadProtocolId(2));
        // Empty and over-limit ClientIds decode: the core answers them with CONNACK.
        assert!(matches!(
            decode(b"\x06\x04\x00\x01\x00\x3c", &LIMITS),
            Ok(Frame::Plain(Packet::Connect { client_id: "", .. }))
        ));
        let mut long = b"\x1e\x04\x00\x01\x00\x3c".to_vec();
        long.extend_from_slice(&[b'c'; 24]);
        assert!(matches!(
            decode(&long, &LIMITS),
            Ok(Frame::Plain(Packet::Connect { client_id, .. })) if client_id.len() == 24
        ));
        // Up to the hard cap, not beyond.
        let capped = |n: usize| {
            let mut d = vec![0x01, 0, 0, 0x04, 0x00, 0x01, 0x00, 0x3c];
            d.extend(std::iter::repeat_n(b'c', n));
            let len = u16::try_from(d.len()).unwrap().to_be_bytes();
            d[1] = len[0];
            d[2] = len[1];
            d
        };
        assert!(decode(&capped(MAX_CLIENT_ID_LEN_DECODE), &LIMITS).is_ok());
        rejects(
            &capped(MAX_CLIENT_ID_LEN_DECODE + 1),
            DecodeError::ClientIdLength(MAX_CLIENT_ID_LEN_DECODE + 1),
        );
        rejects(b"\x07\x04\x00\x01\x00\x3c\xff", DecodeError::InvalidUtf8);
        let mut long_ping = vec![0x1A, 0x16];
        long_ping.extend_from_slice(&[b'c'; 24]);
        rejects(&long_ping, DecodeError::ClientIdLength(24));
    }

    #[test]
    fn topic_errors() {
        rejects(b"\x07\x0a\x00\x00\x00\x01\xc3", DecodeError::InvalidUtf8);
        // Wildcards in REGISTER decode; the core answers REGACK rc 0x02.
        assert!(decode(b"\x09\x0a\x00\x00\x00\x01a/+", &DecodeLimits::default()).is_ok());
        rejects(b"\x07\x0c\x02a#\x00\x00", DecodeError::WildcardInTopic);
        rejects(b"\x07\x0c\x62+b\x00\x00", DecodeError::WildcardInTopic);
        rejects(b"\x06\x0a\x00\x00\x00\x01", DecodeError::EmptyTopic);
        rejects(b"\x05\x12\x00\x00\x01", DecodeError::EmptyTopic);
        rejects(b"\x05\x14\x00\x00\x01", DecodeError::EmptyTopic);
        rejects(b"\x06\x12\x00\x00\x01\xff", DecodeError::InvalidUtf8);
        // A wildcard Will topic decodes; the core answers CONNACK / WILLTOPICRESP rc 0x02.
        assert!(decode(b"\x05\x07\x00a#", &DecodeLimits::default()).is_ok());
        assert!(decode(b"\x05\x1a\x00a+", &DecodeLimits::default()).is_ok());
        rejects(b"\x04\x1a\x00\xfe", DecodeError::InvalidUtf8);
    }

    #[test]
    fn trailing_and_nested() {
        rejects(&[0x04, 0x05, 0x00, 0x00], DecodeError::TrailingBytes);
        rejects(&[0x03, 0x17, 0x00], DecodeError::TrailingBytes);
        rejects(&[0x05, 0x18, 0x00, 0x01, 0x02], DecodeError::TrailingBytes);
        rejects(
            &[0x08, 0x12, 0x02, 0x00, 0x01, b'a', b'b', b'c'],
            DecodeError::TrailingBytes,
        );
        rejects(
            &[0x08, 0x14, 0x01, 0x00, 0x01, 0x00, 0x02, 0x03],
            DecodeError::TrailingBytes,
        );
        rejects(
            &[0x03, 0xFE, 0x00, 0x03, 0xFE, 0x00, 0x02, 0x17],
            DecodeError::NestedEncapsulation,
        );
        assert_eq!(
            decode_packet(&[0x03, 0xFE, 0x00], &LIMITS),
            Err(DecodeError::NestedEncapsulation)
        );
    }

    #[test]
    fn ignored_flag_bits_decode_and_reencode_canonically() {
        // PUBLISH with Will and CleanSession set; they mean nothing there.
        let bytes = [0x07, 0x0C, 0b0000_1100, 0x00, 0x01, 0x00, 0x00];
        let packet = decode_packet(&bytes, &LIMITS).unwrap();
        assert_eq!(encode(&packet)[2], 0);
    }

    #[test]
    fn too_long_packets_are_refused() {
        let data = vec![0_u8; usize::from(u16::MAX)];
        let packet = Packet::WillMsg { msg: &data };
        let mut out = vec![0xAA];
        assert_eq!(
            packet.encode(&mut out),
            Err(EncodeError::TooLong(usize::from(u16::MAX) + 4))
        );
        assert_eq!(
            encode_encapsulated(0, &data, &Packet::PingResp, &mut out),
            Err(EncodeError::TooLong(usize::from(u16::MAX) + 5))
        );
        assert_eq!(
            encode_encapsulated(0, &[], &packet, &mut out),
            Err(EncodeError::TooLong(usize::from(u16::MAX) + 4))
        );
        assert_eq!(out, [0xAA]);
        // The largest encodable message.
        let max = Packet::WillMsg {
            msg: &data[..usize::from(u16::MAX) - 4],
        };
        assert_eq!(decode_packet(&encode(&max), &LIMITS), Ok(max));
    }

    #[test]
    fn names_match_types_and_error_codes_are_distinct() {
        assert_eq!(Packet::PingResp.name(), "PINGRESP");
        assert_eq!(Packet::PubComp { msg_id: 0 }.msg_type(), 0x0E);
        assert_eq!(QoS::MinusOne.level(), -1);
        assert_eq!(QoS::ExactlyOnce.level(), 2);
        let errors = [
            DecodeError::Truncated,
            DecodeError::LengthMismatch {
                declared: 0,
                actual: 0,
            },
            DecodeError::ReservedMsgType(0),
            DecodeError::ReservedTopicIdType,
            DecodeError::ReservedReturnCode(0),
            DecodeError::BadProtocolId(0),
            DecodeError::ClientIdLength(0),
            DecodeError::InvalidUtf8,
            DecodeError::WildcardInTopic,
            DecodeError::EmptyTopic,
            DecodeError::TrailingBytes,
            DecodeError::NestedEncapsulation,
        ];
        let codes: std::collections::HashSet<_> = errors.iter().map(|e| e.error_code()).collect();
        assert_eq!(codes.len(), errors.len());
    }

    /// Owned ingredients from which [`build`] borrows a valid packet of any type.
    #[derive(Debug, Clone)]
    struct Ingredients {
        kind: u8,
        byte: u8,
        a: u16,
        b: u16,
        flags: [bool; 3],
        qos: QoS,
        rc: ReturnCode,
        topic_kind: u8,
        short: [u8; 2],
        client_id: String,
        topic: String,
        will_topic: String,
        filter: String,
        data: Vec<u8>,
    }

    const KINDS: u8 = 27;

    fn qos() -> impl Strategy<Value = QoS> {
        prop_oneof![
            Just(QoS::AtMostOnce),
            Just(QoS::AtLeastOnce),
            Just(QoS::ExactlyOnce),
            Just(QoS::MinusOne),
        ]
    }

    fn return_code() -> impl Strategy<Value = ReturnCode> {
        prop_oneof![
            Just(ReturnCode::Accepted),
            Just(ReturnCode::Congestion),
            Just(ReturnCode::InvalidTopicId),
            Just(ReturnCode::NotSupported),
        ]
    }

    prop_compose! {
        fn ingredients()(
            (kind, byte, a, b) in (0..KINDS, any::<u8>(), any::<u16>(), any::<u16>()),
            (flags, qos, rc) in (any::<[bool; 3]>(), qos(), return_code()),
            (topic_kind, short) in (0..3_u8, any::<[u8; 2]>()),
            client_id in "\\PC{1,23}".prop_filter("at most 23 octets", |s| s.len() <= 23),
            topic in "[^+#]{1,40}",
            will_topic in "[^+#]{0,40}",
            filter in "[a-z/+#]{1,20}|\\PC{1,20}",
            data in prop::collection::vec(any::<u8>(), 0..400),
        ) -> Ingredients {
            Ingredients {
                kind, byte, a, b, flags, qos, rc, topic_kind, short, client_id, topic,
                will_topic, filter, data,
            }
        }
    }

    fn build(i: &Ingredients) -> Packet<'_> {
        let [f0, f1, f2] = i.flags;
        let will = f0.then_some(WillFlags {
            qos: i.qos,
            retain: f1,
        });
        let will_topic = if will.is_some() {
            i.will_topic.as_str()
        } else {
            ""
        };
        let sub_topic = match i.topic_kind {
            0 => SubscribeTopic::Name(&i.filter),
            1 => SubscribeTopic::Predefined(i.a),
            _ => SubscribeTopic::Short(i.short),
        };
        let topic_ref = match i.topic_kind {
            0 => TopicRef::Normal(i.a),
            1 => TopicRef::Predefined(i.a),
            _ => TopicRef::Short(
                i.short
                    .map(|b| if matches!(b, b'+' | b'#') { b'x' } else { b }),
            ),
        };
        match i.kind {
            0 => Packet::Advertise {
                gw_id: i.byte,
                duration: i.a,
            },
            1 => Packet::SearchGw { radius: i.byte },
            2 => Packet::GwInfo {
                gw_id: i.byte,
                gw_addr: &i.data,
            },
            3 => Packet::Connect {
                will: f0,
                clean_session: f1,
                duration: i.a,
                client_id: &i.client_id,
            },
            4 => Packet::ConnAck { rc: i.rc },
            5 => Packet::WillTopicReq,
            6 => Packet::WillTopic {
                will,
                topic: will_topic,
            },
            7 => Packet::WillMsgReq,
            8 => Packet::WillMsg { msg: &i.data },
            9 => Packet::Register {
                topic_id: i.a,
                msg_id: i.b,
                topic_name: &i.topic,
            },
            10 => Packet::RegAck {
                topic_id: i.a,
                msg_id: i.b,
                rc: i.rc,
            },
            11 => Packet::Publish {
                dup: f0,
                qos: i.qos,
                retain: f1,
                topic: topic_ref,
                msg_id: i.b,
                data: &i.data,
            },
            12 => Packet::PubAck {
                topic_id: i.a,
                msg_id: i.b,
                rc: i.rc,
            },
            13 => Packet::PubRec { msg_id: i.b },
            14 => Packet::PubRel { msg_id: i.b },
            15 => Packet::PubComp { msg_id: i.b },
            16 => Packet::Subscribe {
                dup: f2,
                qos: i.qos,
                msg_id: i.b,
                topic: sub_topic,
            },
            17 => Packet::SubAck {
                qos: i.qos,
                topic_id: i.a,
                msg_id: i.b,
                rc: i.rc,
            },
            18 => Packet::Unsubscribe {
                msg_id: i.b,
                topic: sub_topic,
            },
            19 => Packet::UnsubAck { msg_id: i.b },
            20 => Packet::PingReq {
                client_id: f2.then_some(i.client_id.as_str()),
            },
            21 => Packet::PingResp,
            22 => Packet::Disconnect {
                duration: f2.then_some(i.a),
            },
            23 => Packet::WillTopicUpd {
                will,
                topic: will_topic,
            },
            24 => Packet::WillTopicResp { rc: i.rc },
            25 => Packet::WillMsgUpd { msg: &i.data },
            _ => Packet::WillMsgResp { rc: i.rc },
        }
    }

    /// Decodes `bytes`; when that succeeds, the re-encoded frame must decode to the same frame.
    fn assert_reencodes(bytes: &[u8], limits: &DecodeLimits) -> Result<(), TestCaseError> {
        if let Ok(frame) = decode(bytes, limits) {
            let mut out = Vec::new();
            frame
                .encode(&mut out)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(decode(&out, limits), Ok(frame));
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn encode_then_decode_is_identity(i in ingredients()) {
            let packet = build(&i);
            let bytes = encode(&packet);
            prop_assert_eq!(decode(&bytes, &LIMITS), Ok(Frame::Plain(packet)));
        }

        #[test]
        fn encapsulated_round_trip(
            i in ingredients(),
            radius in 0..4_u8,
            node_id in prop::collection::vec(any::<u8>(), 0..300),
        ) {
            let frame = Frame::Encapsulated { radius, node_id: &node_id, packet: build(&i) };
            let mut out = Vec::new();
            frame.encode(&mut out).unwrap();
            prop_assert_eq!(decode(&out, &LIMITS), Ok(frame));
        }

        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..600),
            max_client_id_len in 0..40_usize,
        ) {
            assert_reencodes(&bytes, &DecodeLimits { max_client_id_len })?;
        }

        /// Arbitrary bodies behind a correct header reach the per-type parsers far more often.
        #[test]
        fn well_framed_arbitrary_bodies_never_panic(
            msg_type in prop_oneof![0..0x20_u8, Just(ENCAPSULATED), any::<u8>()],
            body in prop::collection::vec(any::<u8>(), 0..300),
        ) {
            let total = framed_len(body.len());
            let mut bytes = Vec::new();
            emit_length(total, &mut bytes).unwrap();
            bytes.push(msg_type);
            bytes.extend_from_slice(&body);
            assert_reencodes(&bytes, &LIMITS)?;
        }

        #[test]
        fn mutated_valid_packets_never_panic(
            i in ingredients(),
            index in any::<prop::sample::Index>(),
            value in any::<u8>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = encode(&build(&i));
            let at = index.index(bytes.len());
            bytes[at] = value;
            assert_reencodes(&bytes, &LIMITS)?;
            bytes.truncate(cut.index(bytes.len()));
            assert_reencodes(&bytes, &LIMITS)?;
        }
    }
}
