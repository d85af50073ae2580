//! What the harness reads from the OS: a process's CPU time, memory and I/O counters from
//! `/proc`, the kernel's drop counter of a UDP socket, the size of a directory, the machine
//! description for the report, and the open-file limit the big scenarios need.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use serde::Serialize;

/// CPU time and memory of one process at one moment.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcSample {
    /// User + system CPU seconds since the process started.
    pub cpu_secs: f64,
    /// Resident set size, kB.
    pub rss_kb: u64,
    /// Peak resident set size (VmHWM), kB.
    pub peak_rss_kb: u64,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`; `None` when the process is gone.
#[must_use]
pub fn sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces): utime and stime are fields
    // 14 and 15 of the whole line, so 12 and 13 after the closing parenthesis.
    let after = stat.rsplit_once(')')?.1;
    let mut fields = after.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some(ProcSample {
        cpu_secs: (utime + stime) / clock_ticks(),
        rss_kb: kb("VmRSS:")?,
        peak_rss_kb: kb("VmHWM:")?,
    })
}

/// I/O counters of one process, all its threads (`/proc/<pid>/io`).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct IoSample {
    /// Bytes returned by `read(2)` and its relatives (files and sockets alike).
    pub rchar: u64,
    /// Bytes handed to `write(2)` and its relatives.
    pub wchar: u64,
    /// Bytes the process caused to be sent to the storage layer: counted when a page cache
    /// page turns dirty, so a partly filled page written and synced again counts again.
    pub write_bytes: u64,
    /// Of those, bytes never written because their file was truncated or deleted first.
    pub cancelled_write_bytes: u64,
}

impl IoSample {
    /// The counters accumulated since `earlier`.
    #[must_use]
    pub fn since(&self, earlier: &IoSample) -> IoSample {
        IoSample {
            rchar: self.rchar.saturating_sub(earlier.rchar),
            wchar: self.wchar.saturating_sub(earlier.wchar),
            write_bytes: self.write_bytes.saturating_sub(earlier.write_bytes),
            cancelled_write_bytes: self
                .cancelled_write_bytes
                .saturating_sub(earlier.cancelled_write_bytes),
        }
    }
}

/// Reads `/proc/<pid>/io`; `None` when the process is gone or the kernel has no I/O
/// accounting.
#[must_use]
pub fn io(pid: u32) -> Option<IoSample> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let field = |key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
            .trim()
            .parse()
            .ok()
    };
    Some(IoSample {
        rchar: field("rchar")?,
        wchar: field("wchar")?,
        write_bytes: field("write_bytes")?,
        cancelled_write_bytes: field("cancelled_write_bytes")?,
    })
}

/// The system-wide UDP socket tables of this network namespace, IPv4 then IPv6.
const UDP_TABLES: [&str; 2] = ["/proc/net/udp", "/proc/net/udp6"];

/// Datagrams the kernel dropped at the UDP sockets bound to `local` (receive buffer full),
/// summed over the rows of `/proc/net/udp` and `/proc/net/udp6` whose local address is
/// `local` (or the wildcard address) with `local`'s port. The counter is kept per socket since
/// it was created, so callers take a difference. `None` when no table lists such a socket.
#[must_use]
pub fn udp_drops(local: SocketAddr) -> Option<u64> {
    let mut found = None;
    for table in UDP_TABLES {
        if let Ok(text) = std::fs::read_to_string(table)
            && let Some(drops) = parse_udp_drops(&text, local)
        {
            found = Some(found.unwrap_or(0u64).saturating_add(drops));
        }
    }
    found
}

/// The `drops` sum of a `/proc/net/udp{,6}` table's rows bound to `local` (see [`udp_drops`]);
/// `None` when no row is. The header and unreadable rows are skipped.
fn parse_udp_drops(table: &str, local: SocketAddr) -> Option<u64> {
    let mut found = None;
    for line in table.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(addr) = fields.get(1).and_then(|a| parse_proc_addr(a)) else {
            continue;
        };
        let ip_matches = addr.ip() == local.ip() || addr.ip().is_unspecified();
        if !ip_matches || addr.port() != local.port() {
            continue;
        }
        // `drops` is the last column of a row.
        if let Some(drops) = fields.last().and_then(|d| d.parse::<u64>().ok()) {
            found = Some(found.unwrap_or(0u64).saturating_add(drops));
        }
    }
    found
}

/// An address as `/proc/net/udp{,6}` prints it: the address as 32-bit words, each in host
/// byte order and printed as `%08X` (one word for IPv4, four for IPv6), a colon, the port in
/// hexadecimal.
fn parse_proc_addr(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |k: usize| -> Option<[u8; 4]> {
        let hex = ip.get(k * 8..k * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut octets = [0u8; 16];
            for (k, chunk) in octets.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(k)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Bytes of the files under a directory: their lengths, and what they occupy on disk.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct DirBytes {
    /// Sum of the file lengths.
    pub len: u64,
    /// Sum of the allocated blocks (what `du` shows).
    pub allocated: u64,
    /// Regular files.
    pub files: u64,
}

/// Deepest directory level [`dir_bytes`] descends to.
const MAX_DIR_DEPTH: usize = 4;

/// Adds up the regular files under `dir` (down to [`MAX_DIR_DEPTH`] levels); zero when it
/// does not exist. Files that vanish while it looks are skipped.
#[must_use]
pub fn dir_bytes(dir: &Path) -> DirBytes {
    fn walk(dir: &Path, depth: usize, sum: &mut DirBytes) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() && depth < MAX_DIR_DEPTH {
                walk(&entry.path(), depth + 1, sum);
            } else if meta.is_file() {
                sum.len += meta.len();
                sum.allocated += meta.blocks() * 512;
                sum.files += 1;
            }
        }
    }
    let mut sum = DirBytes::default();
    walk(dir, 0, &mut sum);
    sum
}

/// CPU seconds used by this process (generator and subscriber) so far.
#[must_use]
pub fn own_cpu_secs() -> f64 {
    sample(std::process::id()).map_or(0.0, |s| s.cpu_secs)
}

fn clock_ticks() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// Raises the open-file limit to `want` (as far as the hard limit, or beyond it when running
/// as root). Returns the soft limit in force afterwards.
#[must_use]
pub fn raise_nofile(want: u64) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft >= want {
        return soft;
    }
    if setrlimit(Resource::RLIMIT_NOFILE, want, want.max(hard)).is_ok() {
        return want;
    }
    if setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// Machine and software description for the report.
#[must_use]
pub fn machine() -> BTreeMap<&'static str, String> {
    let mut m = BTreeMap::new();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, v)| v.trim());
    m.insert("cpu", model.to_owned());
    m.insert(
        "cores",
        std::thread::available_parallelism()
            .map_or(0, |n| n.get())
            .to_string(),
    );
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or_else(|| "unknown".to_owned(), |kb| format!("{} MiB", kb / 1024));
    m.insert("memory", mem);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    m.insert("kernel", kernel.trim().to_owned());
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_default();
    m.insert("os", os);
    m
}

/// First line of `program args` (stdout or stderr), for version strings.
#[must_use]
pub fn version_of(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(out) => {
            let text = if out.stdout.is_empty() {
                out.stderr
            } else {
                out.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        }
        Err(_) => "unavailable".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_io_counters() {
        let before = io(std::process::id()).unwrap();
        std::fs::read_to_string("/proc/self/status").unwrap();
        let after = io(std::process::id()).unwrap();
        assert!(after.since(&before).rchar > 0);
    }

    /// The sample rows are as a little-endian host prints them (words in host byte order).
    #[cfg(target_endian = "little")]
    #[test]
    fn reads_the_drops_of_the_socket_bound_to_an_address() {
        let v4 = concat!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  ",
            "timeout inode ref pointer drops\n",
            "  12: 0100007F:1F90 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000 ",
            "       0 4242 2 0000000000000000 17\n",
            "  13: 01004D7F:1F90 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000 ",
            "       0 4243 2 0000000000000000 5\n",
            "  14: 0100007F:1F91 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000 ",
            "       0 4244 2 0000000000000000 9\n",
            "garbage\n",
        );
        let gw: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(
            parse_udp_drops(v4, gw),
            Some(17),
            "127.0.0.1:8080 only: not a client on 127.77.0.1 with the same port"
        );
        let other: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(parse_udp_drops(v4, other), None);
        let v6 = concat!(
            "  1: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 ",
            "07 00000000:00000000 00:00000000 00000000  1000        0 77 2 0000000000000000 3\n",
        );
        let gw6: SocketAddr = "[::1]:8080".parse().unwrap();
        assert_eq!(parse_udp_drops(v6, gw6), Some(3));
    }

    #[test]
    fn reads_the_drops_of_a_bound_socket_from_proc() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        assert_eq!(udp_drops(addr), Some(0));
    }

    #[test]
    fn adds_up_the_files_below_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), [0u8; 10]).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b"), [0u8; 5]).unwrap();
        let sum = dir_bytes(dir.path());
        assert_eq!((sum.len, sum.files), (15, 2));
        assert_eq!(dir_bytes(&dir.path().join("missing")).len, 0);
    }
}
