//! The process's own resource use, under the names every Prometheus client library uses
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_open_fds` ...), so
//! the usual dashboards work unchanged. Read at scrape time from `getrusage`, `getrlimit` and
//! `/proc/self` (Linux); a value that cannot be read is left out, never invented.

use nix::sys::resource::{Resource, UsageWho, getrlimit, getrusage};

/// One reading.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    /// User plus system CPU time, seconds.
    pub cpu_secs: Option<f64>,
    /// Resident set size, bytes.
    pub resident_bytes: Option<u64>,
    /// Virtual memory size, bytes.
    pub virtual_bytes: Option<u64>,
    /// Open file descriptors.
    pub open_fds: Option<u64>,
    /// The soft limit on open file descriptors.
    pub max_fds: Option<u64>,
    /// Threads.
    pub threads: Option<u64>,
}

impl ProcessStats {
    /// Reads them now.
    #[must_use]
    pub fn read() -> ProcessStats {
        let cpu_secs = getrusage(UsageWho::RUSAGE_SELF).ok().map(|u| {
            let secs = |t: nix::sys::time::TimeVal| {
                t.tv_sec() as f64 + f64::from(i32::try_from(t.tv_usec()).unwrap_or(0)) / 1e6
            };
            secs(u.user_time()) + secs(u.system_time())
        });
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
        };
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|dir| dir.count() as u64);
        ProcessStats {
            cpu_secs,
            // `/proc/self/status` gives these in KiB.
            resident_bytes: field("VmRSS:").map(|k| k * 1024),
            virtual_bytes: field("VmSize:").map(|k| k * 1024),
            open_fds,
            max_fds: getrlimit(Resource::RLIMIT_NOFILE)
                .ok()
                .map(|(soft, _)| soft),
            threads: field("Threads:"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_descriptors_and_has_used_cpu() {
        let p = ProcessStats::read();
        assert!(p.resident_bytes.unwrap() > 0);
        assert!(p.virtual_bytes.unwrap() >= p.resident_bytes.unwrap());
        let fds = p.open_fds.unwrap();
        assert!(fds >= 3 && fds <= p.max_fds.unwrap(), "{p:?}");
        assert!(p.cpu_secs.unwrap() >= 0.0);
        assert!(p.threads.unwrap() >= 1);
    }
}
