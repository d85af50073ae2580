//! Serial line framing: cutting a byte stream into MQTT-SN messages and back. Sans-IO, no
//! clock: the line adapter feeds received bytes to [`Decoder::push`] and calls
//! [`Decoder::idle`] when the line was silent for its frame timeout.
//!
//! # Framings
//!
//! ```text
//! Length: raw MQTT-SN messages back to back, delimited by their own Length field (what
//! mqtt-sn-tools' serial bridge and common Arduino clients send):
//!   | Length (1: 2..=255) | MsgType | ... |   or   | 0x01 | Length (2, BE) | MsgType | ... |
//!   A forwarder encapsulation is its header (whose Length covers only the header) followed
//!   by one plain message with its own Length:
//!   | Length | 0xFE | Ctrl | Wireless Node Id | Length | MsgType | ... |
//!
//! Slip (RFC 1055) with an optional CRC trailer over the message, little-endian, appended
//! before escaping:
//!   | END | escaped( message | CRC ) | END |
//!   END = 0xC0, ESC = 0xDB; in the body 0xC0 -> ESC ESC_END (0xDC), 0xDB -> ESC ESC_ESC (0xDD)
//!   CRC: none, CRC-16/X-25 (the RFC 1662 FCS-16, 2 octets) or CRC-32/ISO-HDLC (4 octets)
//! ```
//!
//! # Invariants
//!
//! - The decoder never holds more than `max_frame` octets, whatever arrives: a frame longer
//!   than `max_frame` is skipped (counted [`DecoderStats::oversize`]) by counting its octets
//!   down (Length) or dropping octets until the next END (Slip), never buffered whole.
//! - Every frame handed out is at most `max_frame` octets and non-empty. In Length framing it
//!   is exactly one message whose Length field(s) it fills and whose MsgType is a known MQTT-SN
//!   type ([`msg_type`]); the decoder does not check the body (the codec does). In Slip
//!   framing it is the unescaped body with a correct CRC.
//! - Resynchronisation: Length framing skips one octet (counted
//!   [`DecoderStats::garbage_bytes`]) whenever the octets at the start cannot begin a message
//!   (impossible Length, unknown MsgType, nested encapsulation) and tries again at the next
//!   octet; Slip resynchronises at every END. A partial frame is dropped by [`Decoder::idle`]
//!   (counted [`DecoderStats::truncated`]) so the next octet starts a frame. Nothing stalls:
//!   every octet pushed is consumed.
//! - Length framing cannot tell a truncated frame from the start of the next one; the line's
//!   frame timeout ([`Decoder::idle`]) is what separates them. Slip with a CRC detects both.
//! - [`encode`] then [`Decoder::push`] gives the message back, for every message that is a
//!   well-framed MQTT-SN message of at most `max_frame` octets (Length), or any non-empty
//!   message of at most `max_frame` octets (Slip).

use crate::mqttsn::codec::msg_type;

/// SLIP frame delimiter (RFC 1055).
const END: u8 = 0xC0;
/// SLIP escape octet.
const ESC: u8 = 0xDB;
/// After [`ESC`]: a data octet [`END`].
const ESC_END: u8 = 0xDC;
/// After [`ESC`]: a data octet [`ESC`].
const ESC_ESC: u8 = 0xDD;

/// First octet of the 3-octet Length form (MQTT-SN 5.2.1).
const LONG_LENGTH_MARKER: u8 = 0x01;

/// The smallest `max_frame` a [`Decoder`] uses (a smaller one is raised to it): the octets it
/// must hold to read a long-form Length and the MsgType that follows.
pub const MIN_MAX_FRAME: usize = 4;

/// CRC-16/X-25 (the PPP FCS-16 of RFC 1662).
static CRC16: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_IBM_SDLC);
/// CRC-32/ISO-HDLC (Ethernet, zlib).
static CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// How MQTT-SN messages are delimited on a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Messages back to back, delimited by their own Length field.
    Length,
    /// SLIP (RFC 1055) with a CRC trailer.
    Slip {
        /// The trailer appended to each message.
        crc: Crc,
    },
}

/// The CRC trailer of a SLIP frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crc {
    /// No trailer.
    None,
    /// CRC-16/X-25, 2 octets little-endian.
    Crc16,
    /// CRC-32/ISO-HDLC, 4 octets little-endian.
    Crc32,
}

impl Crc {
    /// Octets of the trailer.
    fn len(self) -> usize {
        match self {
            Self::None => 0,
            Self::Crc16 => 2,
            Self::Crc32 => 4,
        }
    }

    /// Appends the trailer of `message` (unescaped) to `out`.
    fn append(self, message: &[u8], out: &mut Vec<u8>) {
        match self {
            Self::None => {}
            Self::Crc16 => out.extend_from_slice(&CRC16.checksum(message).to_le_bytes()),
            Self::Crc32 => out.extend_from_slice(&CRC32.checksum(message).to_le_bytes()),
        }
    }

    /// Whether `trailer` is the trailer of `message`.
    fn matches(self, message: &[u8], trailer: &[u8]) -> bool {
        match self {
            Self::None => trailer.is_empty(),
            Self::Crc16 => trailer == CRC16.checksum(message).to_le_bytes(),
            Self::Crc32 => trailer == CRC32.checksum(message).to_le_bytes(),
        }
    }
}

/// What a [`Decoder`] dropped and delivered since it was created.
#[derive(Debug, Default, Clone)]
pub struct DecoderStats {
    /// Frames handed out.
    pub frames: u64,
    /// Slip frames dropped because their CRC trailer was wrong.
    pub bad_crc: u64,
    /// Frames longer than `max_frame`, skipped.
    pub oversize: u64,
    /// Partial frames dropped by [`Decoder::idle`].
    pub truncated: u64,
    /// Octets dropped because they could not start a message (Length), or belonged to a Slip
    /// frame with a bad escape or too short for its CRC trailer.
    pub garbage_bytes: u64,
}

/// Cuts the octets received on one serial line into MQTT-SN messages.
///
/// Call order: [`push`](Self::push) with whatever arrived, any number of times;
/// [`idle`](Self::idle) when the line was silent for the frame timeout. Bounded: never buffers
/// more than `max_frame` octets.
#[derive(Debug)]
pub struct Decoder {
    /// The longest frame handed out; also the buffer's bound.
    max_frame: usize,
    /// The octets of the frame being received: a Length candidate from its first octet, or
    /// the unescaped body of a Slip frame without its last (possible trailer) octets.
    buf: Vec<u8>,
    state: State,
    stats: DecoderStats,
}

#[derive(Debug)]
enum State {
    Length(LengthState),
    Slip(SlipState),
}

#[derive(Debug)]
struct LengthState {
    /// Octets `buf` must hold before the candidate can be looked at again.
    need: usize,
    /// Octets of an oversize frame still to skip.
    discard: usize,
    /// The next message is the inner message of an encapsulation that was oversize: skip it.
    skip_next: bool,
}

#[derive(Debug)]
struct SlipState {
    crc: Crc,
    /// The last `crc.len()` unescaped octets, held back from `buf`: they are the trailer if
    /// the next octet is END.
    tail: [u8; 4],
    tail_len: usize,
    /// The previous octet was ESC.
    escaped: bool,
    /// Octets received on the line for this frame (escapes included, END excluded).
    raw: u64,
    /// Dropping octets until the next END, and why.
    discard: Option<SlipDiscard>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlipDiscard {
    /// Already counted oversize.
    Oversize,
    /// Counted as garbage (`raw` octets) at the END.
    BadEscape,
}

/// What the octets at the start of the Length buffer are.
enum Verdict {
    /// The buffer must hold this many octets before anything can be decided.
    Need(usize),
    /// They cannot begin a message.
    Garbage,
    /// A message of this many octets (not yet all buffered perhaps).
    Frame(usize),
    /// An encapsulation header of this many octets leaves no room for its inner message
    /// within `max_frame`.
    HeaderOversize(usize),
}

/// A message header at the start of a buffer.
enum Header {
    Need(usize),
    Garbage,
    Found { total: usize, msg_type: u8 },
}

/// Reads the Length and MsgType at the start of `bytes` (which may be incomplete).
fn header(bytes: &[u8]) -> Header {
    let Some(&first) = bytes.first() else {
        return Header::Need(1);
    };
    let (total, length_len) = if first == LONG_LENGTH_MARKER {
        let Some(&[hi, lo]) = bytes.get(1..3) else {
            return Header::Need(3);
        };
        // The spec allows the long form for any length, but it cannot count fewer octets
        // than its own three plus the MsgType.
        let total = usize::from(u16::from_be_bytes([hi, lo]));
        if total < 4 {
            return Header::Garbage;
        }
        (total, 3)
    } else {
        // 0 is impossible; 1 is the long-form marker handled above.
        if first < 2 {
            return Header::Garbage;
        }
        (usize::from(first), 1)
    };
    let Some(&msg_type) = bytes.get(length_len) else {
        return Header::Need(length_len + 1);
    };
    if !is_known_msg_type(msg_type) {
        return Header::Garbage;
    }
    if msg_type == msg_type::ENCAPSULATED && total < length_len + 2 {
        // The header covers at least Length, 0xFE and Ctrl.
        return Header::Garbage;
    }
    Header::Found { total, msg_type }
}

/// The MsgType codes of MQTT-SN v1.2 (spec Table 3), the encapsulation included.
fn is_known_msg_type(code: u8) -> bool {
    use msg_type::*;
    matches!(
        code,
        ADVERTISE
            | SEARCHGW
            | GWINFO
            | CONNECT
            | CONNACK
            | WILLTOPICREQ
            | WILLTOPIC
            | WILLMSGREQ
            | WILLMSG
            | REGISTER
            | REGACK
            | PUBLISH
            | PUBACK
            | PUBCOMP
            | PUBREC
            | PUBREL
            | SUBSCRIBE
            | SUBACK
            | UNSUBSCRIBE
            | UNSUBACK
            | PINGREQ
            | PINGRESP
            | DISCONNECT
            | WILLTOPICUPD
            | WILLTOPICRESP
            | WILLMSGUPD
            | WILLMSGRESP
            | ENCAPSULATED
    )
}

/// Looks at the Length candidate at the start of `buf`.
fn examine(buf: &[u8], max_frame: usize) -> Verdict {
    match header(buf) {
        Header::Need(n) => Verdict::Need(n),
        Header::Garbage => Verdict::Garbage,
        Header::Found { total, msg_type } if msg_type != msg_type::ENCAPSULATED => {
            Verdict::Frame(total)
        }
        Header::Found {
            total: header_len, ..
        } => {
            // The smallest inner message is 2 octets.
            if header_len.saturating_add(2) > max_frame {
                return Verdict::HeaderOversize(header_len);
            }
            match header(buf.get(header_len..).unwrap_or_default()) {
                Header::Need(n) if header_len + n > max_frame => {
                    Verdict::HeaderOversize(header_len)
                }
                Header::Need(n) => Verdict::Need(header_len + n),
                Header::Garbage => Verdict::Garbage,
                // Forwarders do not nest (spec 5.5); the codec refuses it too.
                Header::Found { msg_type, .. } if msg_type == msg_type::ENCAPSULATED => {
                    Verdict::Garbage
                }
                Header::Found { total, .. } => Verdict::Frame(header_len + total),
            }
        }
    }
}

impl Decoder {
    /// A decoder for `framing` handing out frames of at most `max_frame` octets (at least
    /// [`MIN_MAX_FRAME`]).
    pub fn new(framing: Framing, max_frame: usize) -> Self {
        let state = match framing {
            Framing::Length => State::Length(LengthState {
                need: 1,
                discard: 0,
                skip_next: false,
            }),
            Framing::Slip { crc } => State::Slip(SlipState {
                crc,
                tail: [0; 4],
                tail_len: 0,
                escaped: false,
                raw: 0,
                discard: None,
            }),
        };
        Self {
            max_frame: max_frame.max(MIN_MAX_FRAME),
            buf: Vec::new(),
            state,
            stats: DecoderStats::default(),
        }
    }

    /// Feeds received bytes; calls `frame` with each good frame (the MQTT-SN message,
    /// without SLIP escaping / CRC trailer).
    pub fn push(&mut self, bytes: &[u8], frame: &mut dyn FnMut(&[u8])) {
        match &mut self.state {
            State::Length(state) => push_length(
                state,
                &mut self.buf,
                &mut self.stats,
                self.max_frame,
                bytes,
                frame,
            ),
            State::Slip(state) => {
                for &octet in bytes {
                    slip_octet(
                        state,
                        &mut self.buf,
                        &mut self.stats,
                        self.max_frame,
                        octet,
                        frame,
                    );
                }
            }
        }
    }

    /// The line was silent for the frame timeout: a partial frame is dropped (counted
    /// truncated) and the decoder resynchronises at the next byte.
    pub fn idle(&mut self) {
        let partial = match &mut self.state {
            State::Length(state) => {
                let partial = !self.buf.is_empty() || state.discard > 0;
                state.need = 1;
                state.discard = 0;
                state.skip_next = false;
                partial
            }
            State::Slip(state) => {
                let partial = state.raw > 0;
                state.reset();
                partial
            }
        };
        self.buf.clear();
        if partial {
            self.stats.truncated += 1;
        }
    }

    /// What was delivered and dropped so far.
    pub fn stats(&self) -> &DecoderStats {
        &self.stats
    }

    /// Octets held for the frame being received (never more than `max_frame`).
    #[cfg(any(test, feature = "invariants"))]
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Panics if an invariant of the module doc does not hold.
    #[cfg(any(test, feature = "invariants"))]
    pub fn check_invariants(&self) {
        assert!(
            self.buf.len() <= self.max_frame,
            "{} octets buffered, max_frame {}",
            self.buf.len(),
            self.max_frame
        );
        if let State::Length(state) = &self.state {
            assert!(state.need <= self.max_frame, "need {}", state.need);
            assert!(state.discard == 0 || self.buf.is_empty());
        }
    }
}

/// Length framing: consumes all of `input`.
fn push_length(
    state: &mut LengthState,
    buf: &mut Vec<u8>,
    stats: &mut DecoderStats,
    max_frame: usize,
    mut input: &[u8],
    frame: &mut dyn FnMut(&[u8]),
) {
    while !input.is_empty() {
        if state.discard > 0 {
            let n = state.discard.min(input.len());
            state.discard -= n;
            input = input.get(n..).unwrap_or_default();
            continue;
        }
        // Copy only what the candidate needs, so that `buf` stays within `need`.
        let n = state.need.saturating_sub(buf.len()).max(1).min(input.len());
        let (head, rest) = input.split_at_checked(n).unwrap_or((input, &[]));
        buf.extend_from_slice(head);
        input = rest;
        if buf.len() >= state.need {
            scan_length(state, buf, stats, max_frame, frame);
        }
    }
}

/// Decides about the candidate(s) in `buf` until more octets are needed.
fn scan_length(
    state: &mut LengthState,
    buf: &mut Vec<u8>,
    stats: &mut DecoderStats,
    max_frame: usize,
    frame: &mut dyn FnMut(&[u8]),
) {
    loop {
        match examine(buf, max_frame) {
            Verdict::Need(n) => {
                state.need = n;
                return;
            }
            Verdict::Garbage => {
                buf.remove(0);
                stats.garbage_bytes += 1;
                state.skip_next = false;
            }
            Verdict::HeaderOversize(header_len) => {
                stats.oversize += 1;
                let held = header_len.min(buf.len());
                buf.drain(..held);
                state.discard = header_len - held;
                state.skip_next = true;
            }
            Verdict::Frame(total) if total > max_frame => {
                if !std::mem::take(&mut state.skip_next) {
                    stats.oversize += 1;
                }
                let held = total.min(buf.len());
                buf.drain(..held);
                state.discard = total - held;
            }
            Verdict::Frame(total) if total > buf.len() => {
                state.need = total;
                return;
            }
            Verdict::Frame(total) => {
                if !std::mem::take(&mut state.skip_next)
                    && let Some(message) = buf.get(..total)
                {
                    stats.frames += 1;
                    frame(message);
                }
                buf.drain(..total);
            }
        }
        if state.discard > 0 {
            state.need = 1;
            return;
        }
    }
}

impl SlipState {
    /// Forgets the frame being received (the caller clears the buffer).
    fn reset(&mut self) {
        self.tail_len = 0;
        self.escaped = false;
        self.raw = 0;
        self.discard = None;
    }
}

/// Slip framing: one octet from the line.
fn slip_octet(
    state: &mut SlipState,
    buf: &mut Vec<u8>,
    stats: &mut DecoderStats,
    max_frame: usize,
    octet: u8,
    frame: &mut dyn FnMut(&[u8]),
) {
    if octet == END {
        end_of_slip_frame(state, buf, stats, frame);
        buf.clear();
        state.reset();
        return;
    }
    state.raw += 1;
    if state.discard.is_some() {
        return;
    }
    let data = if std::mem::take(&mut state.escaped) {
        match octet {
            ESC_END => END,
            ESC_ESC => ESC,
            _ => {
                buf.clear();
                state.discard = Some(SlipDiscard::BadEscape);
                return;
            }
        }
    } else if octet == ESC {
        state.escaped = true;
        return;
    } else {
        octet
    };
    // Hold the last trailer-length octets back: they are the CRC if END comes next.
    let trailer_len = state.crc.len();
    let released = if state.tail_len < trailer_len {
        if let Some(slot) = state.tail.get_mut(state.tail_len) {
            *slot = data;
        }
        state.tail_len += 1;
        None
    } else if let Some(tail) = state.tail.get_mut(..trailer_len) {
        match tail.first().copied() {
            Some(oldest) => {
                tail.rotate_left(1);
                if let Some(last) = tail.last_mut() {
                    *last = data;
                }
                Some(oldest)
            }
            None => Some(data),
        }
    } else {
        Some(data)
    };
    if let Some(message_octet) = released {
        if buf.len() >= max_frame {
            stats.oversize += 1;
            buf.clear();
            state.discard = Some(SlipDiscard::Oversize);
            return;
        }
        buf.push(message_octet);
    }
}

/// An END arrived: hands out, or drops and counts, the frame before it.
fn end_of_slip_frame(
    state: &SlipState,
    buf: &[u8],
    stats: &mut DecoderStats,
    frame: &mut dyn FnMut(&[u8]),
) {
    match state.discard {
        Some(SlipDiscard::Oversize) => return,
        Some(SlipDiscard::BadEscape) => {
            stats.garbage_bytes += state.raw;
            return;
        }
        None => {}
    }
    if state.raw == 0 {
        // END END: empty frames flush line noise; nothing to count.
        return;
    }
    let trailer_len = state.crc.len();
    if state.escaped || state.tail_len < trailer_len {
        // A dangling ESC, or too short to carry its trailer.
        stats.garbage_bytes += state.raw;
        return;
    }
    let trailer = state.tail.get(..trailer_len).unwrap_or_default();
    if !state.crc.matches(buf, trailer) {
        stats.bad_crc += 1;
        return;
    }
    // A correct trailer over nothing is an empty frame too.
    if !buf.is_empty() {
        stats.frames += 1;
        frame(buf);
    }
}

/// Appends the line form of one MQTT-SN message.
///
/// In [`Framing::Length`] the message is written as it is: it must be a complete MQTT-SN
/// message (or encapsulation) whose Length field(s) it fills, as the codec encodes them.
pub fn encode(framing: Framing, message: &[u8], out: &mut Vec<u8>) {
    match framing {
        Framing::Length => out.extend_from_slice(message),
        Framing::Slip { crc } => {
            // A leading END ends whatever line noise the receiver has collected.
            out.reserve(message.len() + crc.len() + 4);
            out.push(END);
            escape(message, out);
            let mut trailer = Vec::with_capacity(4);
            crc.append(message, &mut trailer);
            escape(&trailer, out);
            out.push(END);
        }
    }
}

/// Appends `bytes` SLIP-escaped.
fn escape(bytes: &[u8], out: &mut Vec<u8>) {
    for &octet in bytes {
        match octet {
            END => out.extend_from_slice(&[ESC, ESC_END]),
            ESC => out.extend_from_slice(&[ESC, ESC_ESC]),
            _ => out.push(octet),
        }
    }
}

#[cfg(test)]
mod tests;
