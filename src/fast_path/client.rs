//! The client's side of a connection: reads with a deadline (and the
//! server's stop), closing while the client may still be sending, and
//! handing the connection to the full stack.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::upstream::UPSTREAM_BUFFER;
use super::Conn;

/// Why waiting for the client ended without data.
pub(super) enum Wait {
    Eof,
    TimedOut,
    Stopped,
}

impl<F: Future> Conn<'_, F> {
    /// Reads more client bytes into `buf[end..]`. `Ok(Ok(n))`: `n > 0`
    /// bytes arrived. With `between_requests` (waiting for a head), the
    /// server's stop also ends the wait.
    pub(super) async fn read_client(
        &mut self,
        deadline: Option<Instant>,
        between_requests: bool,
    ) -> io::Result<Result<usize, Wait>> {
        self.timer.deadline = deadline;
        let result = std::future::poll_fn(|cx| {
            let mut read = ReadBuf::new(&mut self.buf[self.end..]);
            match Pin::new(&mut *self.client).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    return Poll::Ready(Ok(if n == 0 { Err(Wait::Eof) } else { Ok(n) }));
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {}
            }
            if between_requests && !self.stopping && self.stop.as_mut().poll(cx).is_ready() {
                self.stopping = true;
                return Poll::Ready(Ok(Err(Wait::Stopped)));
            }
            if self.timer.poll_expired(cx).is_ready() {
                return Poll::Ready(Ok(Err(Wait::TimedOut)));
            }
            Poll::Pending
        })
        .await;
        self.timer.deadline = None;
        if let Ok(Ok(n)) = result {
            self.end += n;
        }
        result
    }
}

/// A deadline for the phase a connection is in, on one timer per
/// connection that is moved only when it would fire too late: a request
/// costs no timer operation while the deadlines keep moving forward.
#[derive(Default)]
pub(super) struct Timer {
    pub(super) deadline: Option<Instant>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// When the sleep fires, if it is armed.
    armed: Option<Instant>,
}

impl Timer {
    /// Ready once the current deadline has passed.
    pub(super) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(deadline) = self.deadline else {
            return Poll::Pending;
        };
        loop {
            if self.armed.is_none_or(|armed| armed > deadline) {
                match self.sleep.as_mut() {
                    Some(sleep) => sleep.as_mut().reset(deadline),
                    None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
                }
                self.armed = Some(deadline);
            }
            let Some(sleep) = self.sleep.as_mut() else {
                return Poll::Pending;
            };
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // It fired: at the deadline, or at an earlier one.
            if self.armed.take().is_some_and(|armed| armed >= deadline) {
                return Poll::Ready(());
            }
        }
    }
}

/// How long a closing connection keeps reading what the client still sends.
const LINGER_TIME: Duration = Duration::from_secs(5);
/// How much a closing connection reads at most before it closes anyway.
const LINGER_BYTES: usize = 8 * 1024 * 1024;

/// Reading and discarding what a client still sends after the gate has
/// answered and shut its side of the connection down (as nginx's
/// `lingering_close` does). Closing a socket with unread data in it sends a
/// reset, and a reset can destroy the answer before the client reads it: a
/// client still uploading a body the gate refused would see "connection
/// reset" instead of the refusal. Bounded in time and in bytes.
struct Lingering {
    deadline: Pin<Box<Sleep>>,
    left: usize,
    scratch: Box<[u8]>,
}

impl Lingering {
    fn new() -> Self {
        Lingering {
            deadline: Box::pin(tokio::time::sleep(LINGER_TIME)),
            left: LINGER_BYTES,
            scratch: vec![0; UPSTREAM_BUFFER].into_boxed_slice(),
        }
    }

    /// Ready once the client has closed its side, failed, or a bound is
    /// reached.
    fn poll_discard(&mut self, stream: &mut TcpStream, cx: &mut Context<'_>) -> Poll<()> {
        while self.left > 0 {
            let mut read = ReadBuf::new(&mut self.scratch);
            match Pin::new(&mut *stream).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if !read.filled().is_empty() => {
                    self.left = self.left.saturating_sub(read.filled().len());
                }
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending => return self.deadline.as_mut().poll(cx),
            }
        }
        Poll::Ready(())
    }
}

/// Shuts the gate's side of `stream` down (the client sees the end of the
/// answer) and reads what the client still sends, within the bounds of
/// [`Lingering`]; the connection closes when `stream` is dropped.
pub(crate) async fn linger(mut stream: TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut lingering = Lingering::new();
    std::future::poll_fn(|cx| lingering.poll_discard(&mut stream, cx)).await;
}

/// A client connection whose first bytes were already read: they are read
/// again first. When the full stack shuts the connection down before the
/// client has closed its side, it lingers (see [`Lingering`]).
pub(crate) struct Rewind {
    prefix: Bytes,
    stream: TcpStream,
    /// The client has closed its side: nothing is left to read.
    client_closed: bool,
    lingering: Option<Box<Lingering>>,
}

impl std::fmt::Debug for Rewind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewind")
            .field("stream", &self.stream)
            .field("client_closed", &self.client_closed)
            .field("lingering", &self.lingering.is_some())
            .finish_non_exhaustive()
    }
}

impl Rewind {
    pub(crate) fn new(prefix: Bytes, stream: TcpStream) -> Self {
        Rewind {
            prefix,
            stream,
            client_closed: false,
            lingering: None,
        }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = std::task::ready!(Pin::new(&mut self.stream).poll_read(cx, buf));
        if result.is_ok() && buf.filled().len() == before && buf.remaining() > 0 {
            self.client_closed = true;
        }
        Poll::Ready(result)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.lingering.is_none() {
            std::task::ready!(Pin::new(&mut this.stream).poll_shutdown(cx))?;
            if this.client_closed {
                return Poll::Ready(Ok(()));
            }
            this.lingering = Some(Box::new(Lingering::new()));
        }
        if let Some(lingering) = this.lingering.as_mut() {
            std::task::ready!(lingering.poll_discard(&mut this.stream, cx));
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_timer_fires_at_the_current_deadline_only() {
        let mut timer = Timer::default();
        let start = Instant::now();
        let expired = |timer: &mut Timer| {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            timer.poll_expired(&mut cx).is_ready()
        };
        timer.deadline = Some(start + Duration::from_secs(10));
        assert!(!expired(&mut timer));
        tokio::time::advance(Duration::from_secs(6)).await;
        // A later deadline: the armed sleep fires early and is moved on.
        timer.deadline = Some(start + Duration::from_secs(16));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!expired(&mut timer));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(expired(&mut timer));
        // An earlier deadline than the armed one is honoured.
        timer.deadline = Some(Instant::now() + Duration::from_secs(60));
        assert!(!expired(&mut timer));
        timer.deadline = Some(Instant::now() + Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(expired(&mut timer));
        timer.deadline = None;
        assert!(!expired(&mut timer));
    }
}
