//! MQTT-SN over serial lines: sensors on RS-485 or USB-serial wires, and radio modems in
//! transparent mode (XBee, LoRa) that carry many nodes through the 0xFE forwarder
//! encapsulation.
//!
//! A serial line carries a byte stream, not datagrams, so [`framing`] (sans-IO, no clock) cuts
//! it into MQTT-SN messages and puts messages back on the line. The line adapter ([`line`](mod@line):
//! one tokio-serial task per `[[serial]]` line) owns the port and hands each decoded message
//! to the same MQTT-SN core as UDP, as `Peer::serial(line)`, through
//! `io::udp::UdpDriver::with_serial`.

pub mod framing;
pub mod line;
