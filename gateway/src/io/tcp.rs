//! TCP connection bounds shared by the admin listener and the HTTP ingress: a connection
//! permit held for the stream's life, and an idle timer.
//!
//! Invariants:
//! - A [`Permitted`] stream holds its permit (if any) until it is dropped, so a semaphore of
//!   N permits bounds the connections served at once to N.
//! - A [`Permitted`] stream on which no byte moved either way for its idle duration fails
//!   its pending read or write with [`std::io::ErrorKind::TimedOut`] and raises its
//!   [`IdleFlag`], so a stalled peer cannot hold a slot forever, and the owner can tell an
//!   idle close from others even when the protocol layer took the error for a clean end
//!   (hyper does so between HTTP/1.1 requests).
//! - [`Limited::accept`] takes the permit BEFORE accepting: beyond the bound, clients wait in
//!   the kernel's accept queue. Accept errors (out of descriptors and the like) are logged at
//!   debug and retried after [`ACCEPT_ERROR_PAUSE`] instead of spinning.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The pause after a failed `accept` (EMFILE and the like) before the next attempt.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// A TCP listener serving at most a fixed number of connections at once (an
/// `axum::serve::Listener`): each accepted stream holds a permit until it is dropped and is
/// closed after `idle` without progress.
pub struct Limited {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    idle: Duration,
    /// Names the listener in the accept-error log.
    name: &'static str,
}

impl Limited {
    /// Wraps `inner`; `permits` bounds the connections served at once.
    #[must_use]
    pub fn new(
        inner: TcpListener,
        permits: Arc<Semaphore>,
        idle: Duration,
        name: &'static str,
    ) -> Self {
        Limited {
            inner,
            permits,
            idle,
            name,
        }
    }
}

impl axum::serve::Listener for Limited {
    type Io = Permitted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // The semaphore is never closed; if it were, serving one more is harmless.
        let permit = Arc::clone(&self.permits).acquire_owned().await.ok();
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    return (Permitted::new(stream, permit, self.idle), addr);
                }
                Err(error) => {
                    tracing::debug!(%error, listener = self.name, "Accept failed.");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted connection with its permit, closed after its idle duration without progress.
pub struct Permitted {
    stream: TcpStream,
    /// Given back when the connection is dropped.
    _permit: Option<OwnedSemaphorePermit>,
    /// How long the connection may go without a byte moved.
    idle: Duration,
    /// Fires `idle` after the last byte moved.
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Raised when the timer fired.
    expired: IdleFlag,
}

/// Whether a [`Permitted`] stream was failed for idleness (a cheap clone shared with it).
#[derive(Debug, Clone, Default)]
pub struct IdleFlag(Arc<AtomicBool>);

impl IdleFlag {
    /// Whether the stream's idle timer fired.
    #[must_use]
    pub fn raised(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl Permitted {
    /// Wraps `stream`, holding `permit` for its life; `idle` without progress fails it.
    #[must_use]
    pub fn new(stream: TcpStream, permit: Option<OwnedSemaphorePermit>, idle: Duration) -> Self {
        Permitted {
            stream,
            _permit: permit,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            expired: IdleFlag::default(),
        }
    }

    /// The flag raised when this stream is failed for idleness.
    #[must_use]
    pub fn idle_flag(&self) -> IdleFlag {
        self.expired.clone()
    }

    /// The wrapped stream (for its addresses and options).
    #[must_use]
    pub fn get_ref(&self) -> &TcpStream {
        &self.stream
    }

    /// Bytes moved: the connection is not idle.
    #[allow(clippy::disallowed_methods)] // The adapter reads the clock for its idle timer.
    fn touch(&mut self) {
        let deadline = tokio::time::Instant::now() + self.idle;
        self.timer.as_mut().reset(deadline);
    }

    /// Whether the idle timer ran out (registering the waker otherwise).
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.timer.as_mut().poll(cx).is_ready()
    }

    /// `result` of a poll on the stream: progress resets the timer, else the timer decides.
    fn after<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        match polled {
            Poll::Ready(result) => {
                self.touch();
                Poll::Ready(result)
            }
            Poll::Pending if self.idle_expired(cx) => {
                self.expired.0.store(true, Ordering::Relaxed);
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connection idle",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Permitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        self.after(cx, polled)
    }
}

impl AsyncWrite for Permitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.after(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.after(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use axum::serve::Listener as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_and_gives_its_slot_back() {
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let permits = Arc::new(Semaphore::new(1));
        let mut listener =
            Limited::new(inner, Arc::clone(&permits), Duration::from_secs(30), "test");
        let _client = TcpStream::connect(addr).await.unwrap();
        let (mut conn, _) = listener.accept().await;
        let flag = conn.idle_flag();
        assert_eq!(permits.available_permits(), 0);
        let mut buf = [0u8; 16];
        // Nothing arrives: the read fails once the idle timer runs out (time is paused and
        // jumps ahead when the runtime has nothing else to do).
        let error = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert!(flag.raised());
        drop(conn);
        assert_eq!(permits.available_permits(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_moving_keep_a_connection_open_past_its_idle_duration() {
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let idle = Duration::from_secs(10);
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (stream, _) = inner.accept().await.unwrap();
        let mut conn = Permitted::new(stream, None, idle);
        let flag = conn.idle_flag();
        let mut buf = [0u8; 1];
        // Three reads spaced by more than half the idle duration each: 21 s in all, each
        // within `idle` of the previous byte.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(7)).await;
            client.write_all(b"x").await.unwrap();
            assert_eq!(conn.read(&mut buf).await.unwrap(), 1);
            assert!(!flag.raised());
        }
        conn.read(&mut buf).await.unwrap_err();
        assert!(flag.raised());
    }
}
