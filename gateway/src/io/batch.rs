//! Batched datagram IO: one `recvmmsg` reads up to a batch of datagrams, one `sendmmsg` sends up
//! to a batch of replies (to different peers), so a burst costs a few syscalls instead of one
//! per packet. Safe wrappers come from `nix`; this module holds no `unsafe`.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg};
use tokio::io::Interest;
use tokio::net::UdpSocket;

fn to_std(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// Receive buffers for one socket.
pub struct RecvBatch {
    headers: MultiHeaders<SockaddrStorage>,
    bufs: Vec<Vec<u8>>,
    /// (source, length) of the datagrams of the last [`RecvBatch::recv`].
    received: Vec<(SocketAddr, usize)>,
}

impl RecvBatch {
    /// Buffers for `batch` datagrams of up to `max_len` bytes each.
    pub fn new(batch: usize, max_len: usize) -> Self {
        RecvBatch {
            headers: MultiHeaders::preallocate(batch, None),
            bufs: vec![vec![0u8; max_len]; batch],
            received: Vec::with_capacity(batch),
        }
    }

    /// Reads what the socket has (without waiting), up to a batch. `Ok(0)` when nothing was
    /// ready; tokio's readiness is cleared in that case.
    ///
    /// # Errors
    /// The OS error of `recvmmsg`, other than "would block".
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.received.clear();
        let fd = socket.as_raw_fd();
        let headers = &mut self.headers;
        let bufs = &mut self.bufs;
        let received = &mut self.received;
        let result = socket.try_io(Interest::READABLE, || {
            let mut slices: Vec<[IoSliceMut<'_>; 1]> = bufs
                .iter_mut()
                .map(|b| [IoSliceMut::new(b.as_mut_slice())])
                .collect();
            let msgs = recvmmsg(fd, headers, slices.iter_mut(), MsgFlags::MSG_DONTWAIT, None)
                .map_err(io::Error::from)?;
            for msg in msgs {
                // Truncated datagrams are longer than the buffer: report the full buffer so the
                // core sees them as oversize.
                let len = msg.bytes;
                if let Some(addr) = msg.address.as_ref().and_then(to_std) {
                    received.push((addr, len));
                }
            }
            Ok(())
        });
        match result {
            Ok(()) => Ok(self.received.len()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// The datagrams of the last [`RecvBatch::recv`].
    pub fn datagrams(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + '_ {
        self.received
            .iter()
            .zip(&self.bufs)
            .map(|(&(addr, len), buf)| (addr, buf.get(..len.min(buf.len())).unwrap_or_default()))
    }
}

/// Replies queued for one socket, sent with `sendmmsg`.
pub struct SendBatch {
    headers: MultiHeaders<SockaddrStorage>,
    capacity: usize,
    /// Datagram buffers, reused across batches (only the first `queued` are live).
    data: Vec<Vec<u8>>,
    addrs: Vec<Option<SockaddrStorage>>,
    /// Datagrams queued in `data`.
    queued: usize,
    /// Datagrams of `data` already sent.
    sent: usize,
}

impl SendBatch {
    /// Room for `batch` datagrams per `sendmmsg`.
    pub fn new(batch: usize) -> Self {
        SendBatch {
            headers: MultiHeaders::preallocate(batch, None),
            capacity: batch,
            data: Vec::with_capacity(batch),
            addrs: Vec::with_capacity(batch),
            queued: 0,
            sent: 0,
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

    /// Queues a datagram.
    pub fn push(&mut self, to: SocketAddr, datagram: &[u8]) {
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
    /// full. Datagrams the OS refuses for one peer (ICMP errors, EMSGSIZE) are dropped.
    ///
    /// # Errors
    /// Socket-level errors.
    pub async fn flush(&mut self, socket: &UdpSocket) -> io::Result<()> {
        let fd = socket.as_raw_fd();
        while self.sent < self.queued {
            let (start, end) = (self.sent, self.queued);
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
        let mut tx = SendBatch::new(8);
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
}
