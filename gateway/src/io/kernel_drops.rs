//! Datagrams the kernel dropped on the gateway's own UDP sockets (receive buffer full), as
//! Linux reports them per socket in the `drops` column of `/proc/net/udp` and
//! `/proc/net/udp6`.
//!
//! The sockets are recognised by their inode (`/proc/self/fd/N` links to `socket:[inode]`),
//! so other processes' sockets on the same port never count. The count is reported since
//! [`KernelDrops::new`] (the value at bind is the baseline), and the reported value never goes
//! below zero. [`KernelDrops`] holds a duplicate of each socket's descriptor, so the sockets
//! (and their rows) outlive the driver: the status logged at shutdown still counts them. Elsewhere than Linux, or
//! when `/proc` cannot be read, nothing is known and the count stays 0.
//!
//! The parser never panics: lines it cannot read are skipped.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

/// The system-wide UDP socket tables, IPv4 then IPv6.
const TABLES: [&str; 2] = ["/proc/net/udp", "/proc/net/udp6"];

/// Whitespace-separated field of a `/proc/net/udp{,6}` row holding the socket's inode. The
/// header names two more columns than a row has fields (`tx_queue rx_queue` and
/// `tr tm->when` are one field each in a row), so fields are found by position, as the
/// kernel's `udp4_format_sock` / `udp6_sock_seq_show` print them.
const INODE_FIELD: usize = 9;

/// Field holding the socket's `drops` counter.
const DROPS_FIELD: usize = 12;

/// The socket inode `fd` refers to, from `/proc/self/fd/<fd>`; `None` when unknown.
pub fn socket_inode(fd: &impl AsFd) -> Option<u64> {
    let fd = fd.as_fd().as_raw_fd();
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    parse_socket_link(link.to_str()?)
}

/// The inode in a `socket:[12345]` link target.
fn parse_socket_link(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The sum of the `drops` column over the rows of a `/proc/net/udp{,6}` table whose inode is
/// in `inodes` (the header and unreadable rows are skipped; the sum saturates).
pub fn parse_drops(table: &str, inodes: &[u64]) -> u64 {
    table
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let inode: u64 = fields.get(INODE_FIELD)?.parse().ok()?;
            if !inodes.contains(&inode) {
                return None;
            }
            fields.get(DROPS_FIELD)?.parse::<u64>().ok()
        })
        .fold(0u64, u64::saturating_add)
}

/// The kernel's drop counters of a set of sockets, read on demand, relative to their value
/// when the set was taken.
#[derive(Debug)]
pub struct KernelDrops {
    inodes: Vec<u64>,
    baseline: u64,
    /// Keeps the sockets open (their rows listed) as long as they are counted.
    _sockets: Vec<OwnedFd>,
}

impl KernelDrops {
    /// Watches `sockets` (those whose inode is known and descriptor can be duplicated); the
    /// count starts at 0 now.
    pub fn new<S: AsFd>(sockets: &[S]) -> KernelDrops {
        let (inodes, sockets) = sockets
            .iter()
            .filter_map(|s| Some((socket_inode(s)?, s.as_fd().try_clone_to_owned().ok()?)))
            .unzip();
        let mut drops = KernelDrops {
            inodes,
            baseline: 0,
            _sockets: sockets,
        };
        drops.baseline = drops.total();
        drops
    }

    /// Datagrams the kernel dropped on the watched sockets since [`KernelDrops::new`].
    pub fn read(&self) -> u64 {
        self.total().saturating_sub(self.baseline)
    }

    /// The current sum of the watched sockets' counters (0 when nothing is watched).
    fn total(&self) -> u64 {
        if self.inodes.is_empty() {
            return 0;
        }
        TABLES
            .iter()
            .filter_map(|path| std::fs::read_to_string(path).ok())
            .map(|table| parse_drops(&table, &self.inodes))
            .fold(0u64, u64::saturating_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UDP4: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops            
  123: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 17855 2 0000000000000000 0          
  456: 00000000:07EA 00000000:0000 07 00000000:00003300 00:00000000 00000000  1000        0 998877 2 ffff8f0a1b2c3d40 42         
  789: 0100007F:D431 0100007F:07EA 01 00000000:00000000 00:00000000 00000000  1000        0 998878 2 ffff8f0a1b2c3d80 7          
";

    const UDP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  101: 00000000000000000000000001000000:07EA 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 998879 2 ffff8f0a1b2c3e00 5
  102: 00000000000000000000000000000000:14E9 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 12345 2 ffff8f0a1b2c3e40 1000
";

    #[test]
    fn drops_of_the_given_inodes_are_summed_in_both_families() {
        assert_eq!(parse_drops(UDP4, &[998877]), 42);
        assert_eq!(parse_drops(UDP4, &[998877, 998878]), 49);
        assert_eq!(parse_drops(UDP6, &[998879]), 5);
        assert_eq!(parse_drops(UDP6, &[998879, 998877]), 5);
        // Other sockets (another process on the same port too) never count.
        assert_eq!(parse_drops(UDP4, &[12345]), 0);
        assert_eq!(parse_drops(UDP4, &[]), 0);
    }

    #[test]
    fn odd_input_is_skipped_without_panicking() {
        for odd in [
            "",
            "\n\n",
            "garbage",
            "  1: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 998877",
            "  1: a b c d e f g h 998877 i j -5",
            "  1: a b c d e f g h 998877 i j 99999999999999999999999",
            "  1: a b c d e f g h x998877 i j 3",
        ] {
            assert_eq!(parse_drops(odd, &[998877]), 0, "{odd:?}");
        }
        let max = format!(
            "{}\n{}",
            "1: a b c d e f g h 7 i j 18446744073709551615", "2: a b c d e f g h 7 i j 1"
        );
        assert_eq!(parse_drops(&max, &[7]), u64::MAX);
    }

    #[test]
    fn socket_links_name_their_inode() {
        assert_eq!(parse_socket_link("socket:[998877]"), Some(998877));
        for odd in [
            "socket:[]",
            "socket:[x]",
            "pipe:[5]",
            "socket:[5",
            "/dev/null",
            "",
        ] {
            assert_eq!(parse_socket_link(odd), None, "{odd:?}");
        }
    }

    /// Real drops: a receiver with the smallest buffer that is never read, flooded over
    /// loopback. Each datagram takes far more than its payload in buffer accounting, so a
    /// few hundred overflow it whatever minimum the kernel enforces.
    #[cfg(target_os = "linux")]
    #[test]
    #[allow(clippy::disallowed_methods)] // A bound on waiting for the kernel, not a timer.
    fn a_flooded_socket_that_is_not_read_counts_kernel_drops() {
        use std::net::UdpSocket;
        let receiver = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .unwrap();
        receiver.set_recv_buffer_size(1).unwrap();
        receiver
            .bind(
                &"127.0.0.1:0"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )
            .unwrap();
        let receiver: UdpSocket = receiver.into();
        let to = receiver.local_addr().unwrap();
        let other = UdpSocket::bind("127.0.0.1:0").unwrap();
        let drops = KernelDrops::new(&[&receiver]);
        let ignored = KernelDrops::new(&[&other]);
        assert_eq!(drops.read(), 0);

        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        const SENT: u64 = 500;
        for _ in 0..SENT {
            sender.send_to(&[0u8; 64], to).unwrap();
        }
        // Loopback delivers in the sender's softirq, nearly always before `send_to` returns;
        // waited for with a generous bound all the same.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while drops.read() == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(drops.read() > 0, "no kernel drops counted");
        assert_eq!(ignored.read(), 0);
        // Every datagram was either kept (still there to read) or counted as dropped.
        let mut buf = [0u8; 128];
        receiver.set_nonblocking(true).unwrap();
        let mut kept = 0;
        while kept + drops.read() < SENT && std::time::Instant::now() < deadline {
            if receiver.recv(&mut buf).is_ok() {
                kept += 1;
            } else {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        let dropped = drops.read();
        assert!(dropped < SENT, "dropped {dropped} of {SENT}, kept {kept}");
        assert_eq!(kept + dropped, SENT);
        // Still counted once the socket's owner closed it.
        drop(receiver);
        assert_eq!(drops.read(), dropped);
    }
}
