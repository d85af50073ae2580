//! The allow-list of UDP forwarders (`[mqttsn] forwarders`) and where each one was last heard
//! from.
//!
//! A datagram whose source matches entry `i` (the first entry that matches wins) comes from
//! the forwarder [`PeerAddr::Forwarder`]` { entry: i }`, wherever in the entry it was sent
//! from; the driver remembers the entry's latest source and sends everything for that peer
//! there. So a forwarder that restarts on another port, or gets another address within its
//! entry's range, keeps its nodes' sessions: their peer address did not change.
//!
//! Invariants:
//! - One entry is one radio network: one forwarder at a time, whose node ids are unique within
//!   it. Two forwarders sharing an entry would share its node ids and its return address.
//! - An entry is an IP address, a CIDR range or an IP socket address (`IP:port`, `[IPv6]:port`);
//!   the list holds at most [`MAX_FORWARDERS`] entries (an entry's index is a `u16`, and every
//!   datagram is matched against the list, in order).
//! - IPv4 and IPv6 never match each other (the listeners are IPv6-only: no IPv4-mapped
//!   addresses arrive).
//!
//! [`PeerAddr::Forwarder`]: crate::ingress::PeerAddr::Forwarder

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

/// Most entries in `[mqttsn] forwarders`.
pub const MAX_FORWARDERS: usize = 256;

/// One allow-list entry: an address range, and optionally a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwarderEntry {
    /// The network address (host bits zero).
    net: IpAddr,
    /// Its prefix length (32 / 128: one address).
    prefix_len: u8,
    /// The only source port accepted; `None`: any.
    port: Option<u16>,
}

/// Why an allow-list entry does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwarderEntryError {
    /// Neither an IP address, a CIDR range nor an IP socket address.
    #[error("`{0}` is not an IP address, a CIDR range or an IP:port")]
    Syntax(String),
    /// The prefix length exceeds the address's bits.
    #[error("prefix length {prefix_len} is too long for `{net}` (at most {max})")]
    PrefixTooLong {
        /// The address.
        net: IpAddr,
        /// The prefix length given.
        prefix_len: u8,
        /// 32 or 128.
        max: u8,
    },
    /// The range's address has bits set beyond the prefix.
    #[error("`{given}` has host bits set")]
    HostBits {
        /// The entry as written.
        given: String,
        /// The range it probably means.
        network: String,
    },
}

impl ForwarderEntryError {
    /// What to write instead.
    pub fn hint(&self) -> String {
        match self {
            Self::Syntax(_) | Self::PrefixTooLong { .. } => {
                "write `192.0.2.7`, `10.0.0.0/24`, `[2001:db8::7]:47000` or `fd00::/64`".into()
            }
            Self::HostBits { network, .. } => format!("write `{network}`"),
        }
    }
}

impl ForwarderEntry {
    /// Whether a datagram from `source` comes from this entry.
    #[must_use]
    pub fn matches(&self, source: SocketAddr) -> bool {
        self.port.is_none_or(|p| p == source.port())
            && masked(source.ip(), self.prefix_len) == Some(self.net)
    }

    /// Whether every source this entry matches is matched by `self` (so, listed after it, the
    /// other entry would never match).
    #[must_use]
    pub fn covers(&self, other: &ForwarderEntry) -> bool {
        self.prefix_len <= other.prefix_len
            && masked(other.net, self.prefix_len) == Some(self.net)
            && (self.port.is_none() || self.port == other.port)
    }

    /// Whether the entry is IPv4.
    #[must_use]
    pub fn is_ipv4(&self) -> bool {
        self.net.is_ipv4()
    }
}

impl FromStr for ForwarderEntry {
    type Err = ForwarderEntryError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || ForwarderEntryError::Syntax(text.to_owned());
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(ForwarderEntry {
                net: ip,
                prefix_len: bits(ip),
                port: None,
            });
        }
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(ForwarderEntry {
                net: addr.ip(),
                prefix_len: bits(addr.ip()),
                port: Some(addr.port()),
            });
        }
        let (ip, len) = text.split_once('/').ok_or_else(syntax)?;
        let ip: IpAddr = ip.parse().map_err(|_| syntax())?;
        // Digits only: `u8::from_str` takes a leading `+`.
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let prefix_len: u8 = len.parse().map_err(|_| syntax())?;
        let Some(net) = masked(ip, prefix_len) else {
            return Err(ForwarderEntryError::PrefixTooLong {
                net: ip,
                prefix_len,
                max: bits(ip),
            });
        };
        if net != ip {
            return Err(ForwarderEntryError::HostBits {
                given: text.to_owned(),
                network: format!("{net}/{prefix_len}"),
            });
        }
        Ok(ForwarderEntry {
            net,
            prefix_len,
            port: None,
        })
    }
}

impl fmt::Display for ForwarderEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.port, self.prefix_len == bits(self.net)) {
            (Some(port), _) => write!(f, "{}", SocketAddr::new(self.net, port)),
            (None, true) => write!(f, "{}", self.net),
            (None, false) => write!(f, "{}/{}", self.net, self.prefix_len),
        }
    }
}

/// The allow-list, in configuration order (an entry's index is its
/// [`PeerAddr::Forwarder`](crate::ingress::PeerAddr::Forwarder) `entry`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwarderList {
    entries: Vec<ForwarderEntry>,
}

impl ForwarderList {
    /// The list of `entries`, at most [`MAX_FORWARDERS`] (the rest are ignored; the config
    /// check refuses more).
    #[must_use]
    pub fn new(mut entries: Vec<ForwarderEntry>) -> Self {
        entries.truncate(MAX_FORWARDERS);
        ForwarderList { entries }
    }

    /// The entry a datagram from `source` comes from: the first that matches.
    #[must_use]
    pub fn matching(&self, source: SocketAddr) -> Option<u16> {
        let i = self.entries.iter().position(|e| e.matches(source))?;
        // At most MAX_FORWARDERS entries: an index fits.
        u16::try_from(i).ok()
    }

    /// The entries.
    #[must_use]
    pub fn entries(&self) -> &[ForwarderEntry] {
        &self.entries
    }

    /// Whether the list is empty (encapsulated UDP traffic is refused from everyone).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many entries it has.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The allow-list with each entry's latest source, as the driver keeps it.
#[derive(Debug, Default)]
pub(crate) struct Forwarders {
    list: ForwarderList,
    /// Per entry: the listener and source of its latest datagram, where its peer's datagrams
    /// go; `None` until it sent one.
    last: Vec<Option<(u16, SocketAddr)>>,
}

impl Forwarders {
    pub(crate) fn new(list: ForwarderList) -> Self {
        let last = vec![None; list.len()];
        Forwarders { list, last }
    }

    /// The entry of a datagram from `source` on `listener`, remembered as the entry's latest
    /// source; `None` when no entry matches (a direct client).
    pub(crate) fn heard(&mut self, listener: u16, source: SocketAddr) -> Option<u16> {
        if self.list.is_empty() {
            return None;
        }
        let entry = self.list.matching(source)?;
        if let Some(last) = self.last.get_mut(usize::from(entry)) {
            *last = Some((listener, source));
        }
        Some(entry)
    }

    /// Where datagrams for entry `entry` go: its latest source, and the listener it came in
    /// on; `None` before it sent anything.
    pub(crate) fn route(&self, entry: u16) -> Option<(u16, SocketAddr)> {
        self.last.get(usize::from(entry)).copied().flatten()
    }
}

/// The number of bits of `ip`'s family.
fn bits(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// `ip` with every bit past `prefix_len` cleared; `None` when `prefix_len` is longer than the
/// address.
fn masked(ip: IpAddr, prefix_len: u8) -> Option<IpAddr> {
    match ip {
        IpAddr::V4(v4) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix_len.min(32)))
                .unwrap_or(0);
            (prefix_len <= 32).then(|| IpAddr::from((u32::from(v4) & mask).to_be_bytes()))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix_len.min(128)))
                .unwrap_or(0);
            (prefix_len <= 128).then(|| IpAddr::from((u128::from(v6) & mask).to_be_bytes()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(s: &str) -> ForwarderEntry {
        s.parse().unwrap()
    }

    fn src(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_ranges_and_ports_parse_in_both_families() {
        for (text, shown) in [
            ("127.0.0.1", "127.0.0.1"),
            ("10.0.0.0/24", "10.0.0.0/24"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("10.0.0.7:47000", "10.0.0.7:47000"),
            ("::1", "::1"),
            ("fd00::/64", "fd00::/64"),
            ("[::1]:47000", "[::1]:47000"),
        ] {
            assert_eq!(entry(text).to_string(), shown);
        }
        assert!(entry("10.0.0.0/8").is_ipv4());
        assert!(!entry("[::1]:1").is_ipv4());
    }

    #[test]
    fn bad_entries_say_why() {
        for bad in [
            "",
            "host",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/x",
            "10.0.0/8",
            "[::1]",
            "1.2.3.4:",
        ] {
            assert!(
                matches!(
                    bad.parse::<ForwarderEntry>(),
                    Err(ForwarderEntryError::Syntax(_))
                ),
                "{bad:?}"
            );
        }
        assert_eq!(
            "10.0.0.0/33".parse::<ForwarderEntry>(),
            Err(ForwarderEntryError::PrefixTooLong {
                net: "10.0.0.0".parse().unwrap(),
                prefix_len: 33,
                max: 32
            })
        );
        assert!(matches!(
            "fd00::/129".parse::<ForwarderEntry>(),
            Err(ForwarderEntryError::PrefixTooLong { max: 128, .. })
        ));
        let e = "10.0.0.1/24".parse::<ForwarderEntry>().unwrap_err();
        assert_eq!(e.hint(), "write `10.0.0.0/24`");
    }

    #[test]
    fn an_entry_matches_its_range_and_port_only() {
        let net = entry("10.1.0.0/16");
        assert!(net.matches(src("10.1.200.3:1")));
        assert!(!net.matches(src("10.2.0.1:1")));
        assert!(
            !net.matches(src("[::ffff:10.1.0.1]:1")),
            "no IPv4-mapped match"
        );
        let one = entry("127.0.0.2");
        assert!(one.matches(src("127.0.0.2:9")) && one.matches(src("127.0.0.2:10")));
        assert!(!one.matches(src("127.0.0.3:9")));
        let port = entry("[::1]:47000");
        assert!(port.matches(src("[::1]:47000")));
        assert!(!port.matches(src("[::1]:47001")));
        assert!(!port.matches(src("127.0.0.1:47000")));
        let v6 = entry("fd00:1::/32");
        assert!(v6.matches(src("[fd00:1:ffff::1]:5")));
        assert!(!v6.matches(src("[fd00:2::1]:5")));
        assert!(entry("0.0.0.0/0").matches(src("192.0.2.1:1")));
        assert!(!entry("0.0.0.0/0").matches(src("[::1]:1")));
    }

    #[test]
    fn the_first_matching_entry_wins() {
        let list = ForwarderList::new(vec![
            entry("10.0.0.7:1000"),
            entry("10.0.0.0/24"),
            entry("10.0.0.7"),
        ]);
        assert_eq!(list.matching(src("10.0.0.7:1000")), Some(0));
        assert_eq!(list.matching(src("10.0.0.7:1001")), Some(1));
        assert_eq!(list.matching(src("10.0.1.7:1001")), None);
        assert_eq!(ForwarderList::default().matching(src("10.0.0.7:1")), None);
    }

    #[test]
    fn covering_entries_are_recognised() {
        assert!(entry("10.0.0.0/8").covers(&entry("10.2.3.4")));
        assert!(entry("10.0.0.0/8").covers(&entry("10.2.3.4:5")));
        assert!(entry("10.2.3.4").covers(&entry("10.2.3.4")));
        assert!(!entry("10.2.3.4:5").covers(&entry("10.2.3.4")));
        assert!(!entry("10.2.3.4").covers(&entry("10.0.0.0/8")));
        assert!(!entry("::/0").covers(&entry("10.0.0.1")));
    }

    #[test]
    fn the_latest_source_of_an_entry_is_its_route() {
        let mut f = Forwarders::new(ForwarderList::new(vec![entry("127.0.0.2"), entry("::1")]));
        assert_eq!(f.route(0), None, "nothing heard yet");
        assert_eq!(f.heard(0, src("127.0.0.2:4000")), Some(0));
        assert_eq!(f.route(0), Some((0, src("127.0.0.2:4000"))));
        // The forwarder restarted on another port.
        assert_eq!(f.heard(0, src("127.0.0.2:4001")), Some(0));
        assert_eq!(f.route(0), Some((0, src("127.0.0.2:4001"))));
        assert_eq!(f.heard(1, src("[::1]:7")), Some(1));
        assert_eq!(f.route(1), Some((1, src("[::1]:7"))));
        // A direct client changes nothing.
        assert_eq!(f.heard(0, src("127.0.0.1:4000")), None);
        assert_eq!(f.route(0), Some((0, src("127.0.0.2:4001"))));
        assert_eq!(f.route(2), None, "no such entry");
    }
}
