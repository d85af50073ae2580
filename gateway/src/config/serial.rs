//! `[[serial]]`: MQTT-SN over serial lines (RS-485, USB-serial, radio modems in transparent
//! mode). Each entry is one line, served by its own task and feeding the same MQTT-SN core as
//! the `[mqttsn]` UDP listeners (serial is MQTT-SN: the core's settings, `max_packet_size`
//! included, come from `[mqttsn]`).
//!
//! Invariants:
//! - `device` is required and absolute; two entries never name the same device. Stable
//!   names are `/dev/serial/by-id/usb-<vendor>_<product>_<serial>-if00-port0` (udev's links,
//!   which survive re-plugging and re-enumeration; `/dev/ttyUSB0` may change).
//! - `crc` applies to `framing = "slip"` only (default `"crc16"` there); set with
//!   `framing = "length"` it is an error.
//! - `reopen_min <= reopen_max`.
//! - At most [`MAX_SERIAL_LINES`] lines (a line's index is its `Peer` address).
//! - A line's frames are at most `[mqttsn] max_packet_size` bytes ([`SerialLine::max_frame`]).

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;

use super::DurationText;
use super::check::{duration_in, int_in};
use super::diag::{self, KeyPath, Reporter};
use crate::serial::framing::{Crc, Framing};

/// The most `[[serial]]` entries.
pub const MAX_SERIAL_LINES: usize = 256;

/// Line parity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parity {
    /// No parity bit.
    None,
    /// Even parity.
    Even,
    /// Odd parity.
    Odd,
}

/// Line flow control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowControl {
    /// None.
    None,
    /// RTS/CTS.
    Hardware,
    /// XON/XOFF.
    Software,
}

/// One `[[serial]]` line.
#[derive(Debug, Clone, PartialEq)]
pub struct SerialLine {
    /// The device path (`/dev/serial/by-id/...` recommended).
    pub device: String,
    /// Bits per second.
    pub baud: u32,
    /// Data bits per character, 5..=8.
    pub data_bits: u8,
    /// Parity.
    pub parity: Parity,
    /// Stop bits, 1 or 2.
    pub stop_bits: u8,
    /// Flow control.
    pub flow_control: FlowControl,
    /// How messages are delimited on the line.
    pub framing: Framing,
    /// Whether the far end is a forwarder (0xFE encapsulation, many nodes); otherwise
    /// encapsulated frames are dropped (counted).
    pub forwarder: bool,
    /// Silence after which a partial frame is dropped and the decoder resynchronises.
    pub frame_timeout: Duration,
    /// Frames queued toward the line at most (beyond: dropped, counted).
    pub write_queue: usize,
    /// First wait before reopening a line that is absent or failed.
    pub reopen_min: Duration,
    /// Longest wait between reopen attempts (the wait doubles up to it).
    pub reopen_max: Duration,
    /// Longest frame (the MQTT-SN message), `[mqttsn] max_packet_size`.
    pub max_frame: usize,
}

impl SerialLine {
    /// Bits on the wire per character: 1 start bit, the data bits, the parity bit if any,
    /// the stop bits.
    pub fn bits_per_char(&self) -> u32 {
        1 + u32::from(self.data_bits)
            + u32::from(self.parity != Parity::None)
            + u32::from(self.stop_bits)
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct RawSerial {
    /// Required (reported in [`compile_serial`]).
    device: Option<String>,
    baud: i64,
    data_bits: i64,
    parity: String,
    stop_bits: i64,
    flow_control: String,
    framing: String,
    /// `None`: not written (the framing's default).
    crc: Option<String>,
    forwarder: bool,
    frame_timeout: DurationText,
    write_queue: i64,
    reopen_min: DurationText,
    reopen_max: DurationText,
}

impl Default for RawSerial {
    fn default() -> Self {
        RawSerial {
            device: None,
            baud: 115_200,
            data_bits: 8,
            parity: "none".into(),
            stop_bits: 1,
            flow_control: "none".into(),
            framing: "length".into(),
            crc: None,
            forwarder: false,
            frame_timeout: "100ms".into(),
            write_queue: 32,
            reopen_min: "1s".into(),
            reopen_max: "30s".into(),
        }
    }
}

/// One of a fixed set of names, reported with a hint when it is none of them.
fn choice<T: Copy>(
    r: &mut Reporter<'_>,
    path: &KeyPath,
    text: &str,
    options: &[(&'static str, T)],
) -> Option<T> {
    if let Some((_, v)) = options.iter().find(|(name, _)| *name == text) {
        return Some(*v);
    }
    let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
    let hint = diag::did_you_mean(text, &names).map_or_else(
        || {
            let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
            format!("use {}", quoted.join(" or "))
        },
        |b| format!("did you mean `{b}`?"),
    );
    r.at_path(path, format!("unknown value `{text}`"), Some(hint));
    None
}

/// `[[serial]]`, every entry checked; the entries with an error are left out (reported).
/// `max_frame` is `[mqttsn] max_packet_size` (`None` when that is wrong: nothing is
/// returned then, the error is reported there).
pub(super) fn compile_serial(
    raw: &[RawSerial],
    max_frame: Option<usize>,
    r: &mut Reporter<'_>,
) -> Vec<SerialLine> {
    let root = KeyPath::root("serial");
    if raw.len() > MAX_SERIAL_LINES {
        r.at_path(
            &root.index(MAX_SERIAL_LINES),
            format!("at most {MAX_SERIAL_LINES} serial lines"),
            None,
        );
    }
    let mut devices: HashMap<&str, usize> = HashMap::new();
    let mut lines = Vec::new();
    for (i, s) in raw.iter().enumerate().take(MAX_SERIAL_LINES) {
        let path = root.index(i);
        let device = match s.device.as_deref() {
            None => {
                r.at_path(
                    &path,
                    "`device` is required".into(),
                    Some("add device = \"/dev/serial/by-id/...\"".into()),
                );
                None
            }
            Some("") => {
                r.at_path(&path.key("device"), "must not be empty".into(), None);
                None
            }
            Some(d) if !d.starts_with('/') => {
                r.at_path(
                    &path.key("device"),
                    format!("`{d}` is not an absolute path"),
                    Some(
                        "write the device's path, preferably its stable name under \
                         /dev/serial/by-id/"
                            .into(),
                    ),
                );
                None
            }
            Some(d) => match devices.get(d) {
                Some(first) => {
                    r.at_path(
                        &path.key("device"),
                        format!("device `{d}` is already used by serial[{first}]"),
                        None,
                    );
                    None
                }
                None => {
                    devices.insert(d, i);
                    Some(d.to_owned())
                }
            },
        };
        let baud = int_in::<u32>(r, &path.key("baud"), s.baud, 50, 4_000_000);
        let data_bits = int_in::<u8>(r, &path.key("data_bits"), s.data_bits, 5, 8);
        let parity = choice(
            r,
            &path.key("parity"),
            &s.parity,
            &[
                ("none", Parity::None),
                ("even", Parity::Even),
                ("odd", Parity::Odd),
            ],
        );
        let stop_bits = match s.stop_bits {
            1 | 2 => u8::try_from(s.stop_bits).ok(),
            other => {
                r.at_path(
                    &path.key("stop_bits"),
                    format!("{other} stop bits: use 1 or 2"),
                    None,
                );
                None
            }
        };
        let flow_control = choice(
            r,
            &path.key("flow_control"),
            &s.flow_control,
            &[
                ("none", FlowControl::None),
                ("hardware", FlowControl::Hardware),
                ("software", FlowControl::Software),
            ],
        );
        let slip = choice(
            r,
            &path.key("framing"),
            &s.framing,
            &[("length", false), ("slip", true)],
        );
        let crc = match (slip, s.crc.as_deref()) {
            (Some(false), Some(_)) => {
                r.at_path(
                    &path.key("crc"),
                    "`crc` applies to framing = \"slip\" only".into(),
                    Some("remove it, or use framing = \"slip\"".into()),
                );
                None
            }
            (_, None) => Some(Crc::Crc16),
            (_, Some(text)) => choice(
                r,
                &path.key("crc"),
                text,
                &[
                    ("crc16", Crc::Crc16),
                    ("crc32", Crc::Crc32),
                    ("none", Crc::None),
                ],
            ),
        };
        let framing = match (slip, crc) {
            (Some(false), _) => Some(Framing::Length),
            (Some(true), Some(crc)) => Some(Framing::Slip { crc }),
            _ => None,
        };
        let frame_timeout = duration_in(
            r,
            &path.key("frame_timeout"),
            &s.frame_timeout,
            Duration::from_millis(1),
            Duration::from_secs(60),
        );
        let write_queue = int_in::<usize>(r, &path.key("write_queue"), s.write_queue, 1, 65_536);
        let reopen_min = duration_in(
            r,
            &path.key("reopen_min"),
            &s.reopen_min,
            Duration::from_millis(10),
            Duration::from_secs(3600),
        );
        let reopen_max = duration_in(
            r,
            &path.key("reopen_max"),
            &s.reopen_max,
            Duration::from_millis(10),
            Duration::from_secs(3600),
        );
        if let (Some(min), Some(max)) = (reopen_min, reopen_max)
            && max < min
        {
            r.at_path(
                &path.key("reopen_max"),
                format!(
                    "reopen_max ({}) is shorter than reopen_min ({})",
                    humantime::format_duration(max),
                    humantime::format_duration(min)
                ),
                None,
            );
            continue;
        }
        let (
            Some(device),
            Some(baud),
            Some(data_bits),
            Some(parity),
            Some(stop_bits),
            Some(flow_control),
            Some(framing),
            Some(frame_timeout),
            Some(write_queue),
            Some(reopen_min),
            Some(reopen_max),
            Some(max_frame),
        ) = (
            device,
            baud,
            data_bits,
            parity,
            stop_bits,
            flow_control,
            framing,
            frame_timeout,
            write_queue,
            reopen_min,
            reopen_max,
            max_frame,
        )
        else {
            continue;
        };
        lines.push(SerialLine {
            device,
            baud,
            data_bits,
            parity,
            stop_bits,
            flow_control,
            framing,
            forwarder: s.forwarder,
            frame_timeout,
            write_queue,
            reopen_min,
            reopen_max,
            max_frame,
        });
    }
    lines
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{Config, Diagnostic, LoadError};
    use super::*;

    const BASE: &str = r#"[gateway]
id = 1
state_dir = "/tmp/sg"
[mqttsn]
listen = ["127.0.0.1:1883"]
max_packet_size = "512B"
[[upstream]]
name = "local"
kind = "mqtt"
url = "mqtt://127.0.0.1:1883"
"#;

    fn parse(serial: &str) -> Result<Config, Vec<Diagnostic>> {
        match Config::parse(Path::new("test.toml"), &format!("{BASE}{serial}")) {
            Ok(c) => Ok(c),
            Err(LoadError::Invalid(d)) => Err(d),
            Err(e) => panic!("unexpected {e}"),
        }
    }

    /// Line of `BASE` + `serial` where the `[[serial]]` text starts (1-based).
    fn first_line() -> usize {
        BASE.lines().count() + 1
    }

    #[test]
    fn a_line_needs_only_its_device_and_gets_the_documented_defaults() {
        let c = parse("[[serial]]\ndevice = \"/dev/serial/by-id/usb-FTDI_FT232R-if00-port0\"\n")
            .unwrap();
        assert_eq!(
            c.serial,
            [SerialLine {
                device: "/dev/serial/by-id/usb-FTDI_FT232R-if00-port0".into(),
                baud: 115_200,
                data_bits: 8,
                parity: Parity::None,
                stop_bits: 1,
                flow_control: FlowControl::None,
                framing: Framing::Length,
                forwarder: false,
                frame_timeout: Duration::from_millis(100),
                write_queue: 32,
                reopen_min: Duration::from_secs(1),
                reopen_max: Duration::from_secs(30),
                max_frame: 512,
            }]
        );
        assert!(c.summary().contains(
            "listener: MQTT-SN over serial on /dev/serial/by-id/usb-FTDI_FT232R-if00-port0 \
             (115200 baud, 8N1, length framing)"
        ));
        // None configured: none served.
        assert!(parse("").unwrap().serial.is_empty());
    }

    #[test]
    fn the_reference_config_shows_every_key_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/sensorgate.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let start = text.find("\n# [[serial]]\n").unwrap() + 1;
        let end = start + text[start..].find("\n\n").unwrap();
        // Uncommented once: the example; the optional `crc` stays commented (slip only).
        let example: String = text[start..end]
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(text[start..end].contains("\n# # crc = \"crc16\"\n"));
        let doc: toml::Table = example.parse().unwrap();
        let mut keys: Vec<&str> = doc["serial"].as_array().unwrap()[0]
            .as_table()
            .unwrap()
            .keys()
            .map(String::as_str)
            .chain(["crc"])
            .collect();
        keys.sort_unstable();
        let mut fields = diag::fields_of::<RawSerial>().to_vec();
        fields.sort_unstable();
        assert_eq!(keys, fields);
        // As written, the defaults.
        let c = parse(&example).unwrap();
        let device = "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0";
        let defaults = parse(&format!("[[serial]]\ndevice = \"{device}\"\n")).unwrap();
        assert_eq!(c.serial, defaults.serial);
        assert_eq!(c.serial[0].device, device);
    }

    #[test]
    fn every_key_is_read() {
        let c = parse(
            "[[serial]]\ndevice = \"/dev/ttyUSB0\"\nbaud = 9600\ndata_bits = 7\n\
             parity = \"even\"\nstop_bits = 2\nflow_control = \"hardware\"\n\
             framing = \"slip\"\ncrc = \"crc32\"\nforwarder = true\nframe_timeout = \"250ms\"\n\
             write_queue = 8\nreopen_min = \"200ms\"\nreopen_max = \"5s\"\n\
             [[serial]]\ndevice = \"/dev/ttyUSB1\"\nframing = \"slip\"\n",
        )
        .unwrap();
        let l = &c.serial[0];
        assert_eq!(
            (l.baud, l.data_bits, l.parity, l.stop_bits, l.flow_control),
            (9600, 7, Parity::Even, 2, FlowControl::Hardware)
        );
        assert_eq!(l.framing, Framing::Slip { crc: Crc::Crc32 });
        assert!(l.forwarder);
        assert_eq!(
            (l.frame_timeout, l.write_queue, l.reopen_min, l.reopen_max),
            (
                Duration::from_millis(250),
                8,
                Duration::from_millis(200),
                Duration::from_secs(5)
            )
        );
        assert_eq!(l.bits_per_char(), 11);
        // SLIP's default trailer.
        assert_eq!(c.serial[1].framing, Framing::Slip { crc: Crc::Crc16 });
        assert!(
            c.summary()
                .contains("7E2, slip/crc32 framing, RTS/CTS, forwarder")
        );
    }

    #[test]
    fn every_bad_value_is_reported_at_its_position() {
        let at = first_line();
        let d = parse(
            "[[serial]]\ndevice = \"ttyUSB0\"\nbaud = 10\ndata_bits = 9\nparity = \"evn\"\n\
             stop_bits = 3\nflow_control = \"rts\"\nframing = \"cobs\"\nframe_timeout = \"0s\"\n\
             write_queue = 0\nreopen_min = \"5s\"\nreopen_max = \"1s\"\n",
        )
        .unwrap_err();
        let got: Vec<(usize, usize, &str)> = d
            .iter()
            .map(|d| (d.line, d.column, d.message.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    at + 1,
                    10,
                    "`serial[0].device`: `ttyUSB0` is not an absolute path"
                ),
                (
                    at + 2,
                    8,
                    "`serial[0].baud`: 10 is out of range 50..=4000000"
                ),
                (at + 3, 13, "`serial[0].data_bits`: 9 is out of range 5..=8"),
                (at + 4, 10, "`serial[0].parity`: unknown value `evn`"),
                (at + 5, 13, "`serial[0].stop_bits`: 3 stop bits: use 1 or 2"),
                (at + 6, 16, "`serial[0].flow_control`: unknown value `rts`"),
                (at + 7, 11, "`serial[0].framing`: unknown value `cobs`"),
                (
                    at + 8,
                    17,
                    "`serial[0].frame_timeout`: 0s is out of range 1ms..=1m"
                ),
                (
                    at + 9,
                    15,
                    "`serial[0].write_queue`: 0 is out of range 1..=65536"
                ),
                (
                    at + 11,
                    14,
                    "`serial[0].reopen_max`: reopen_max (1s) is shorter than reopen_min (5s)"
                ),
            ],
            "{d:#?}"
        );
        assert_eq!(d[3].hint.as_deref(), Some("did you mean `even`?"));
        assert_eq!(
            d[5].hint.as_deref(),
            Some("use \"none\" or \"hardware\" or \"software\"")
        );
        assert!(
            d[0].to_string()
                .starts_with(&format!("test.toml:{}:10: error:", at + 1))
        );
    }

    #[test]
    fn a_missing_or_shared_device_and_a_crc_without_slip_are_refused() {
        let at = first_line();
        let d = parse(
            "[[serial]]\nbaud = 9600\n\
             [[serial]]\ndevice = \"/dev/ttyS0\"\ncrc = \"crc16\"\n\
             [[serial]]\ndevice = \"/dev/ttyS0\"\n",
        )
        .unwrap_err();
        let got: Vec<(usize, &str)> = d.iter().map(|d| (d.line, d.message.as_str())).collect();
        assert_eq!(
            got,
            [
                (at, "`serial[0]`: `device` is required"),
                (
                    at + 4,
                    "`serial[1].crc`: `crc` applies to framing = \"slip\" only"
                ),
                (
                    at + 6,
                    "`serial[2].device`: device `/dev/ttyS0` is already used by serial[1]"
                ),
            ],
            "{d:#?}"
        );
        // A wrong type is named as the key expects, unknown keys get a hint.
        let d =
            parse("[[serial]]\ndevice = \"/dev/ttyS0\"\nbaud = \"fast\"\nbuad = 1\n").unwrap_err();
        assert_eq!(d.len(), 2, "{d:#?}");
        assert_eq!(d[0].line, at + 2);
        assert_eq!(d[1].message, "unknown key `buad` in `[serial]`");
        assert_eq!(d[1].hint.as_deref(), Some("did you mean `baud`?"));
    }
}
