//! Batched datagram IO: one `recvmmsg` reads up to a batch of datagrams, one `sendmmsg` sends up
//! to a batch of replies (to different peers), so a burst costs a few syscalls instead of one
//! per packet.
//!
//! One [`RecvBatch`] serves every listener of a driver, IPv4 and IPv6 alike, so a slot that held
//! an IPv4 source in one call may hold an IPv6 source in the next. Invariants:
//!
//! - Every `recvmmsg` call starts from freshly built headers: each slot's `msg_namelen` is the
//!   full size of its address buffer. (The kernel writes the source's real length back into
//!   `msg_namelen` and copies at most the length it was given, so a header reused after an IPv4
//!   datagram would receive only the first 16 of an IPv6 source's 28 bytes and keep the rest of
//!   an earlier address: a session bound to `[::]` or to another host.)
//! - A source address is decoded from the family and the length the kernel returned, and only
//!   when the two agree (`AF_INET` with a `sockaddr_in`, `AF_INET6` with a `sockaddr_in6`);
//!   anything else drops the datagram and is counted ([`RecvBatch::rejected`]), never guessed.
//! - A [`SendBatch`] belongs to one socket's address family; a destination of the other family
//!   is refused at [`SendBatch::push`] (counted, not sent) instead of failing the whole
//!   `sendmmsg` for the datagrams queued behind it. Each `sendmmsg` sets every header's address
//!   and length afresh (`nix` does), so nothing stale carries over between batches.
//!
//! - A run of consecutive datagrams to one destination, all of one length (the replies to one
//!   busy peer: a NON device's 2.04s, an observer's notifications), goes out as one UDP GSO send
//!   (`UDP_SEGMENT`, Linux >= 4.18): the kernel cuts it into the same datagrams, in order, and
//!   the network stack's per-datagram work (route, IP output, loopback hand-over) is done once
//!   per run. Only runs of [`GSO_MIN_SEGMENTS`]..=[`GSO_MAX_SEGMENTS`] datagrams of at most
//!   [`GSO_MAX_SEGMENT`] bytes, [`GSO_MAX_BYTES`] in all, qualify, so a segment never needs IP fragmentation on any link
//!   IPv6 allows. If the kernel refuses GSO (no support, or a path that cannot take it) the
//!   batch stops using it for good and sends that run, and everything after, datagram by
//!   datagram: nothing is lost or reordered by the switch.
//!
//! # Why this module holds `unsafe`
//!
//! `nix`'s `recvmmsg` wrapper neither resets `msg_namelen` between calls nor exposes the length
//! the kernel returned, so neither invariant above can be kept through it. [`recv_into`] calls
//! `libc::recvmmsg` itself; its `unsafe` blocks are the only ones in the crate, and each states
//! why it is sound. Sending stays on `nix`'s safe `sendmmsg` and `sendmsg` (GSO runs).

#![allow(unsafe_code)]

use std::io::{self, IoSlice};
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, sendmmsg, sendmsg,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// The size of one source-address slot, as the kernel is told before every call.
const NAME_LEN: libc::socklen_t = size_of::<libc::sockaddr_storage>() as libc::socklen_t;

/// A source address from what `recvmmsg` wrote: `name` read as the family it names, only when
/// `len` (the length the kernel returned) is exactly that family's address size.
fn decode_source(name: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = usize::try_from(len).ok()?;
    match i32::from(name.ss_family) {
        libc::AF_INET if len == size_of::<libc::sockaddr_in>() => {
            // SAFETY: `sockaddr_storage` is at least as large as and aligned for every
            // `sockaddr_*`; the family and length say the kernel wrote a whole `sockaddr_in`;
            // every bit pattern is a valid `sockaddr_in` (plain integers).
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read(std::ptr::from_ref(name).cast::<libc::sockaddr_in>()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len == size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for a whole `sockaddr_in6`.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read(std::ptr::from_ref(name).cast::<libc::sockaddr_in6>()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// One non-blocking `recvmmsg` on `fd` into `bufs` (one datagram each) with their sources in
/// `names`; returns, per datagram received, its decoded source (`None`: inconsistent, see the
/// module invariants) and its length.
///
/// # Errors
/// The OS error of `recvmmsg` ("would block" included).
fn recv_into(
    fd: RawFd,
    bufs: &mut [Vec<u8>],
    names: &mut [libc::sockaddr_storage],
    out: &mut Vec<(Option<SocketAddr>, usize)>,
) -> io::Result<()> {
    let mut iovecs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // Built afresh for every call: this is where each slot's `msg_namelen` is reset.
    let mut headers: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .zip(names.iter_mut())
        .map(|(iov, name)| {
            // SAFETY: `mmsghdr` is plain integers and pointers, for which all-zero is valid
            // (null pointers, zero lengths); the fields that matter are set just below.
            let mut h: libc::mmsghdr = unsafe { mem::zeroed() };
            h.msg_hdr.msg_name = std::ptr::from_mut(name).cast();
            h.msg_hdr.msg_namelen = NAME_LEN;
            h.msg_hdr.msg_iov = std::ptr::from_mut(iov);
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();
    let vlen = libc::c_uint::try_from(headers.len()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: every header points at an iovec of `iovecs` (itself pointing at a live buffer of
    // `bufs` with its true length) and at a `sockaddr_storage` of `names` of `NAME_LEN` bytes;
    // all of them outlive the call and nothing else touches them meanwhile. `vlen` is at most
    // `headers.len()`. No timeout pointer is passed.
    let n = unsafe {
        libc::recvmmsg(
            fd,
            headers.as_mut_ptr(),
            vlen,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    for (h, name) in headers.iter().zip(names.iter()).take(n) {
        // Truncated datagrams are longer than the buffer: `msg_len` is then the full buffer,
        // so the core sees them as oversize.
        let len = usize::try_from(h.msg_len).unwrap_or(usize::MAX);
        out.push((decode_source(name, h.msg_hdr.msg_namelen), len));
    }
    Ok(())
}

/// Receive buffers, shared by all the sockets of one driver (one call at a time).
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    /// One source-address slot per buffer (zeroed once; the kernel writes into it).
    names: Vec<libc::sockaddr_storage>,
    /// (source, length) of every datagram of the last `recvmmsg`, in order.
    raw: Vec<(Option<SocketAddr>, usize)>,
    /// Datagrams dropped so far because their source address did not decode.
    rejected: u64,
}

impl RecvBatch {
    /// Buffers for `batch` datagrams of up to `max_len` bytes each.
    pub fn new(batch: usize, max_len: usize) -> Self {
        RecvBatch {
            bufs: vec![vec![0u8; max_len]; batch],
            // SAFETY: `sockaddr_storage` is plain integers; all-zero is valid (AF_UNSPEC).
            names: vec![unsafe { mem::zeroed() }; batch],
            raw: Vec::with_capacity(batch),
            rejected: 0,
        }
    }

    /// Reads what the socket has (without waiting), up to a batch. Returns how many datagrams
    /// [`RecvBatch::datagrams`] now yields; `Ok(0)` when nothing was ready (tokio's readiness is
    /// cleared in that case) or nothing had a valid source.
    ///
    /// # Errors
    /// The OS error of `recvmmsg`, other than "would block".
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.raw.clear();
        let fd = socket.as_raw_fd();
        let (bufs, names, raw) = (&mut self.bufs, &mut self.names, &mut self.raw);
        let result = socket.try_io(Interest::READABLE, || recv_into(fd, bufs, names, raw));
        match result {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) => return Err(e),
        }
        let bad = self.raw.iter().filter(|(addr, _)| addr.is_none()).count();
        if bad > 0 {
            self.rejected = self.rejected.saturating_add(bad as u64);
            tracing::debug!(
                datagrams = bad,
                "UDP datagrams dropped: source address of unexpected family or length."
            );
        }
        Ok(self.raw.len() - bad)
    }

    /// The datagrams of the last [`RecvBatch::recv`], with their sources.
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        self.raw
            .iter()
            .zip(&self.bufs)
            .filter_map(|(&(addr, len), buf)| {
                Some((addr?, buf.get(..len.min(buf.len())).unwrap_or_default()))
            })
    }

    /// Datagrams dropped so far because their source address did not decode.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }
}

/// Replies queued for one socket, sent with `sendmmsg`.
pub struct SendBatch {
    headers: MultiHeaders<SockaddrStorage>,
    /// The family of the socket this batch sends on: the only one it accepts.
    ipv6: bool,
    capacity: usize,
    /// Datagram buffers, reused across batches (only the first `queued` are live).
    data: Vec<Vec<u8>>,
    addrs: Vec<Option<SockaddrStorage>>,
    /// Datagrams queued in `data`.
    queued: usize,
    /// Datagrams of `data` already sent.
    sent: usize,
    /// Datagrams refused so far because their destination was of the other family.
    refused: u64,
    /// Whether runs still go out as GSO sends (off for good after the kernel refused one).
    gso: bool,
    /// The concatenated run of one GSO send, reused.
    gso_buf: Vec<u8>,
}

/// Fewest datagrams worth one GSO send (a single one gains nothing).
pub const GSO_MIN_SEGMENTS: usize = 2;
/// Most datagrams per GSO send: the kernel's `UDP_MAX_SEGMENTS` (64 before Linux 6.1).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes per GSO send: the largest UDP payload over IPv4 (65,535 less 20 + 8 bytes).
pub const GSO_MAX_BYTES: usize = 65_507;
/// Largest datagram sent through GSO: the IPv6 minimum MTU (1280) less the IPv6 and UDP
/// headers, so no segment needs fragmentation (the kernel refuses GSO beyond the path MTU).
pub const GSO_MAX_SEGMENT: usize = 1232;

impl SendBatch {
    /// Room for `batch` datagrams per `sendmmsg`, on an IPv6 socket when `ipv6`, else IPv4.
    pub fn new(batch: usize, ipv6: bool) -> Self {
        SendBatch {
            headers: MultiHeaders::preallocate(batch, None),
            ipv6,
            capacity: batch,
            data: Vec::with_capacity(batch),
            addrs: Vec::with_capacity(batch),
            queued: 0,
            sent: 0,
            refused: 0,
            gso: true,
            gso_buf: Vec::new(),
        }
    }

    /// True when [`SendBatch::push`] would exceed the batch.
    pub fn is_full(&self) -> bool {
        self.queued >= self.capacity
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.sent >= self.queued
    }

    /// Queues a datagram; one to an address of the other family than the socket's is refused
    /// (counted in [`SendBatch::refused`]): the kernel would fail it, and with it the
    /// `sendmmsg` of every datagram queued behind it.
    pub fn push(&mut self, to: SocketAddr, datagram: &[u8]) {
        if to.is_ipv6() != self.ipv6 {
            self.refused = self.refused.saturating_add(1);
            tracing::debug!(%to, "UDP reply dropped: address family differs from the socket's.");
            return;
        }
        // Reuse the allocation of a previously sent datagram at this position.
        match self.data.get_mut(self.queued) {
            Some(slot) => {
                slot.clear();
                slot.extend_from_slice(datagram);
            }
            None => self.data.push(datagram.to_vec()),
        }
        match self.addrs.get_mut(self.queued) {
            Some(slot) => *slot = Some(SockaddrStorage::from(to)),
            None => self.addrs.push(Some(SockaddrStorage::from(to))),
        }
        self.queued += 1;
    }

    /// Sends everything queued, waiting for the socket to become writable when its buffer is
    /// full: runs to one peer as GSO sends (see the module doc), the rest by `sendmmsg`.
    /// Datagrams the OS refuses for one peer (ICMP errors, EMSGSIZE) are dropped.
    ///
    /// # Errors
    /// Socket-level errors.
    pub async fn flush(&mut self, socket: &UdpSocket) -> io::Result<()> {
        while self.sent < self.queued {
            let start = self.sent;
            let run = self.run_at(start);
            if run >= GSO_MIN_SEGMENTS {
                match self.send_run(socket, start, run) {
                    Ok(()) => self.sent += run,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => socket.writable().await?,
                    Err(e) if gso_refused(&e) => {
                        // Sent datagram by datagram from here on (this run too).
                        tracing::debug!(error = %e, "UDP GSO refused by the kernel; not used on this socket any more.");
                        self.gso = false;
                    }
                    Err(e) if super::udp::is_peer_error(&e) => {
                        // As a `sendmmsg` below: the run's first datagram is skipped, the
                        // rest tried again.
                        tracing::debug!(error = %e, "UDP send failed for one peer.");
                        self.sent += 1;
                    }
                    Err(e) => return Err(e),
                }
                continue;
            }
            // Up to the next run (or the end), in one `sendmmsg`.
            let end = (start + 1..self.queued)
                .find(|i| self.run_at(*i) >= GSO_MIN_SEGMENTS)
                .unwrap_or(self.queued);
            let fd = socket.as_raw_fd();
            let headers = &mut self.headers;
            let data = &self.data;
            let addrs = &self.addrs;
            let result = socket.try_io(Interest::WRITABLE, || {
                let slices: Vec<[IoSlice<'_>; 1]> = data
                    .get(start..end)
                    .unwrap_or_default()
                    .iter()
                    .map(|d| [IoSlice::new(d)])
                    .collect();
                let addrs = addrs.get(start..end).unwrap_or_default();
                let results = sendmmsg(
                    fd,
                    headers,
                    slices.iter(),
                    addrs,
                    [],
                    MsgFlags::MSG_DONTWAIT,
                )
                .map_err(io::Error::from)?;
                Ok(results.count())
            });
            match result {
                Ok(n) => self.sent += n.clamp(1, end - start),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => socket.writable().await?,
                Err(e) if super::udp::is_peer_error(&e) => {
                    // The first datagram of the batch failed for its peer: skip it.
                    tracing::debug!(error = %e, "UDP send failed for one peer.");
                    self.sent += 1;
                }
                Err(e) => return Err(e),
            }
        }
        self.queued = 0;
        self.sent = 0;
        Ok(())
    }

    /// How many datagrams from `start` on go to the same destination with the same length,
    /// within the GSO bounds; 1 when GSO is off or the run is too short to use it.
    fn run_at(&self, start: usize) -> usize {
        let (Some(first), Some(Some(to))) = (self.data.get(start), self.addrs.get(start)) else {
            return 1;
        };
        if !self.gso || first.is_empty() || first.len() > GSO_MAX_SEGMENT {
            return 1;
        }
        // One UDP datagram's payload (IPv4's limit, the smaller) holds the whole run.
        let most = GSO_MAX_SEGMENTS.min(GSO_MAX_BYTES / first.len());
        let end = self.queued.min(start.saturating_add(most));
        let same = |i: &usize| {
            self.data.get(*i).is_some_and(|d| d.len() == first.len())
                && self.addrs.get(*i).is_some_and(|a| a.as_ref() == Some(to))
        };
        1 + (start + 1..end).take_while(same).count()
    }

    /// One GSO send of the `run` datagrams from `start` (equal lengths, one destination).
    fn send_run(&mut self, socket: &UdpSocket, start: usize, run: usize) -> io::Result<()> {
        let datagrams = self.data.get(start..start + run).unwrap_or_default();
        let Some(Some(to)) = self.addrs.get(start) else {
            return Ok(());
        };
        // `run_at` bounds the length by GSO_MAX_SEGMENT: it fits.
        let segment = u16::try_from(datagrams.first().map_or(0, Vec::len)).unwrap_or(u16::MAX);
        self.gso_buf.clear();
        for d in datagrams {
            self.gso_buf.extend_from_slice(d);
        }
        let fd = socket.as_raw_fd();
        let buf = &self.gso_buf;
        socket.try_io(Interest::WRITABLE, || {
            sendmsg(
                fd,
                &[IoSlice::new(buf)],
                &[ControlMessage::UdpGsoSegments(&segment)],
                MsgFlags::MSG_DONTWAIT,
                Some(to),
            )
            .map(|_| ())
            .map_err(io::Error::from)
        })
    }
}

/// Errors by which the kernel says it cannot do a GSO send here (no `UDP_SEGMENT`, or a
/// device/path that cannot take it): the batch falls back to sending datagram by datagram.
/// EMSGSIZE is one of them (a segment beyond a smaller path MTU, e.g. a cellular link): each
/// datagram was sendable on its own, so none is dropped for it; the per-datagram send
/// decides.
fn gso_refused(e: &io::Error) -> bool {
    [
        Errno::EIO,
        Errno::EINVAL,
        Errno::EMSGSIZE,
        Errno::ENOPROTOOPT,
        Errno::EOPNOTSUPP,
    ]
    .iter()
    .any(|errno| e.raw_os_error() == Some(*errno as i32))
}

impl SendBatch {
    /// Datagrams refused so far because their destination was of the other family.
    pub fn refused(&self) -> u64 {
        self.refused
    }
}

impl std::fmt::Debug for SendBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendBatch")
            .field("queued", &self.queued)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_carry_datagrams_both_ways_beyond_one_batch() {
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = b.local_addr().unwrap();
        let mut tx = SendBatch::new(8, false);
        let mut sent = 0u16;
        for round in 0..3 {
            for _ in 0..5 {
                if tx.is_full() {
                    tx.flush(&a).await.unwrap();
                }
                tx.push(to, &sent.to_be_bytes());
                sent += 1;
            }
            tx.flush(&a).await.unwrap();
            assert!(tx.is_empty(), "round {round}");
        }
        let mut rx = RecvBatch::new(4, 16);
        let mut got = Vec::new();
        while got.len() < usize::from(sent) {
            b.readable().await.unwrap();
            rx.recv(&b).unwrap();
            for (from, d) in rx.datagrams() {
                assert_eq!(from, a.local_addr().unwrap());
                got.push(u16::from_be_bytes([d[0], d[1]]));
            }
        }
        assert_eq!(got, (0..sent).collect::<Vec<_>>());
    }

    /// Receives on `socket` through `rx` until `n` datagrams arrived; returns (source, bytes).
    async fn recv_n(
        rx: &mut RecvBatch,
        socket: &UdpSocket,
        n: usize,
    ) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut got = Vec::new();
        for _ in 0..1000 {
            if got.len() >= n {
                break;
            }
            socket.readable().await.unwrap();
            rx.recv(socket).unwrap();
            got.extend(rx.datagrams().map(|(a, d)| (a, d.to_vec())));
        }
        got
    }

    #[tokio::test]
    async fn one_batch_shared_by_v4_and_v6_sockets_reports_each_source_exactly() {
        let gw4 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let gw6 = UdpSocket::bind("[::1]:0").await.unwrap();
        let (to4, to6) = (gw4.local_addr().unwrap(), gw6.local_addr().unwrap());
        let clients4: Vec<_> = (0..3)
            .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let clients6: Vec<_> = (0..3)
            .map(|_| std::net::UdpSocket::bind("[::1]:0").unwrap())
            .collect();
        // The driver's sequence: every slot first takes an IPv4 source (16 bytes), then the
        // same slot an IPv6 one (28 bytes), round after round.
        let mut rx = RecvBatch::new(4, 64);
        for round in 0u8..4 {
            for (i, c) in clients4.iter().enumerate() {
                c.send_to(&[round, i as u8], to4).unwrap();
            }
            let got = recv_n(&mut rx, &gw4, clients4.len()).await;
            let want: Vec<_> = clients4
                .iter()
                .enumerate()
                .map(|(i, c)| (c.local_addr().unwrap(), vec![round, i as u8]))
                .collect();
            assert_eq!(got, want, "IPv4 round {round}");
            for (i, c) in clients6.iter().enumerate() {
                c.send_to(&[round, i as u8], to6).unwrap();
            }
            let got = recv_n(&mut rx, &gw6, clients6.len()).await;
            let want: Vec<_> = clients6
                .iter()
                .enumerate()
                .map(|(i, c)| (c.local_addr().unwrap(), vec![round, i as u8]))
                .collect();
            assert_eq!(got, want, "IPv6 round {round}");
        }
        assert_eq!(rx.rejected(), 0);
    }

    #[tokio::test]
    async fn runs_to_one_peer_go_out_as_gso_and_arrive_as_the_same_datagrams_in_order() {
        let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (p, q) = (
            UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        );
        let (to_p, to_q) = (p.local_addr().unwrap(), q.local_addr().unwrap());
        // 70 equal datagrams to p (a run longer than one GSO send), one to q in between,
        // then a different length to p, then two more equal ones to p.
        let mut tx = SendBatch::new(128, false);
        let mut want_p = Vec::new();
        for i in 0..70u8 {
            tx.push(to_p, &[i, 0xAA, 0xBB]);
            want_p.push(vec![i, 0xAA, 0xBB]);
        }
        tx.push(to_q, b"q");
        tx.push(to_p, b"longer");
        want_p.push(b"longer".to_vec());
        for i in 0..2u8 {
            tx.push(to_p, &[i, 1, 2]);
            want_p.push(vec![i, 1, 2]);
        }
        tx.flush(&sender).await.unwrap();
        assert!(tx.is_empty());
        assert!(tx.gso, "the kernel took the GSO sends (Linux >= 4.18)");
        let mut rx = RecvBatch::new(16, 64);
        let from = sender.local_addr().unwrap();
        let got = recv_n(&mut rx, &p, want_p.len()).await;
        let want: Vec<_> = want_p.into_iter().map(|d| (from, d)).collect();
        assert_eq!(got, want);
        assert_eq!(recv_n(&mut rx, &q, 1).await, vec![(from, b"q".to_vec())]);
    }

    #[test]
    fn runs_are_cut_at_another_peer_another_length_and_the_bounds() {
        let (a, b): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let mut tx = SendBatch::new(256, false);
        for _ in 0..3 {
            tx.push(a, &[0; 4]);
        }
        tx.push(b, &[0; 4]);
        tx.push(a, &[0; 5]);
        tx.push(a, &[0; 4]);
        assert_eq!(
            (0..6).map(|i| tx.run_at(i)).collect::<Vec<_>>(),
            [3, 2, 1, 1, 1, 1]
        );
        // At most GSO_MAX_SEGMENTS per send, and at most GSO_MAX_BYTES.
        let mut tx = SendBatch::new(256, false);
        for _ in 0..100 {
            tx.push(a, &[0; 8]);
        }
        assert_eq!(tx.run_at(0), GSO_MAX_SEGMENTS);
        let mut tx = SendBatch::new(256, false);
        for _ in 0..60 {
            tx.push(a, &[0; GSO_MAX_SEGMENT]);
        }
        assert_eq!(tx.run_at(0), GSO_MAX_BYTES / GSO_MAX_SEGMENT);
        // Longer datagrams, empty ones, or GSO off: one at a time.
        let mut tx = SendBatch::new(8, false);
        tx.push(a, &[0; GSO_MAX_SEGMENT + 1]);
        tx.push(a, &[0; GSO_MAX_SEGMENT + 1]);
        tx.push(a, &[]);
        tx.push(a, &[]);
        assert_eq!((tx.run_at(0), tx.run_at(2)), (1, 1));
        let mut tx = SendBatch::new(8, false);
        tx.push(a, &[1]);
        tx.push(a, &[1]);
        tx.gso = false;
        assert_eq!(tx.run_at(0), 1);
    }

    fn storage(family: i32) -> libc::sockaddr_storage {
        let mut s: libc::sockaddr_storage = unsafe { mem::zeroed() };
        s.ss_family = family as libc::sa_family_t;
        s
    }

    #[test]
    fn a_source_decodes_only_when_family_and_returned_length_agree() {
        let len4 = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let len6 = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        let v4 = storage(libc::AF_INET);
        let v6 = storage(libc::AF_INET6);
        assert_eq!(decode_source(&v4, len4), Some("0.0.0.0:0".parse().unwrap()));
        assert_eq!(decode_source(&v6, len6), Some("[::]:0".parse().unwrap()));
        // An IPv6 family with an IPv4 length is the truncated copy of a stale header.
        assert_eq!(decode_source(&v6, len4), None);
        assert_eq!(decode_source(&v4, len6), None);
        assert_eq!(decode_source(&v6, NAME_LEN), None);
        assert_eq!(decode_source(&v6, 0), None);
        assert_eq!(decode_source(&storage(libc::AF_UNSPEC), len4), None);
        assert_eq!(decode_source(&storage(libc::AF_UNIX), len6), None);
    }

    #[tokio::test]
    async fn a_destination_of_the_other_family_is_refused_and_the_rest_still_sent() {
        let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = peer.local_addr().unwrap();
        let mut tx = SendBatch::new(8, false);
        tx.push(to, b"first");
        tx.push("[::1]:9".parse().unwrap(), b"wrong family");
        tx.push(to, b"last");
        tx.flush(&sender).await.unwrap();
        assert_eq!(tx.refused(), 1);
        let mut rx = RecvBatch::new(4, 64);
        let got = recv_n(&mut rx, &peer, 2).await;
        let from = sender.local_addr().unwrap();
        assert_eq!(
            got,
            vec![(from, b"first".to_vec()), (from, b"last".to_vec())]
        );
    }
}
