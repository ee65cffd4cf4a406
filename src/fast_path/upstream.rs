//! The connections to the homeserver: raw sockets, each with the buffer its
//! answers are read into, kept in the gate's idle pool
//! ([`crate::upstream::idle`], the mechanism the full stack's hyper
//! connections are kept by too).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::TcpStream;

use crate::config::UpstreamConfig;
use crate::upstream::idle::{IdlePool, Liveness, Reusable};

/// Size of the buffer answers are read into.
pub(super) const UPSTREAM_BUFFER: usize = 16 * 1024;

/// A connection to the homeserver, and the buffer its answers are read into.
#[derive(Debug)]
pub(super) struct UpstreamConn {
    pub(super) stream: TcpStream,
    pub(super) buf: Vec<u8>,
}

impl Reusable for UpstreamConn {
    fn liveness(&self) -> Liveness {
        if still_open(&self.stream) {
            Liveness::Ready
        } else {
            Liveness::Closed
        }
    }

    /// A connection is given back only once its answer was read to the end
    /// with nothing after it: it is checked before its next use.
    fn known_closed(&self) -> bool {
        false
    }
}

/// Whether an idle connection is still open, without a system call unless
/// the homeserver sent something (a close, most likely) while it was idle.
fn still_open(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut probe = [0u8; 1];
            matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        }
    }
}

/// The homeserver, as the fast path reaches it.
#[derive(Debug)]
pub(super) struct Homeserver {
    pool: Arc<IdlePool<UpstreamConn>>,
}

impl Homeserver {
    pub(super) fn new(config: &UpstreamConfig) -> Self {
        let url = &config.url;
        Homeserver {
            pool: IdlePool::new(
                url.host().unwrap_or("127.0.0.1"),
                url.port_u16().unwrap_or(80),
                config.connect_timeout.0,
                config.pool_idle_timeout.0,
            ),
        }
    }

    /// An idle connection that is still open (and whether it was reused),
    /// or a new one.
    pub(super) async fn checkout(&self) -> io::Result<(UpstreamConn, bool)> {
        match self.pool.take() {
            Some(conn) => Ok((conn, true)),
            None => Ok((self.connect().await?, false)),
        }
    }

    /// A new connection.
    pub(super) async fn connect(&self) -> io::Result<UpstreamConn> {
        Ok(UpstreamConn {
            stream: self.pool.connect().await?,
            buf: vec![0; UPSTREAM_BUFFER],
        })
    }

    /// Keeps a connection whose answer was read to the end for reuse.
    pub(super) fn give_back(&self, conn: UpstreamConn) {
        self.pool.give_back(conn);
    }
}

pub(super) async fn read_some(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut read = ReadBuf::new(buf);
        match Pin::new(&mut *stream).poll_read(cx, &mut read) {
            Poll::Ready(result) => Poll::Ready(result.map(|()| read.filled().len())),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

pub(super) fn is_reset(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

pub(super) fn cut_short() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the homeserver's answer was cut short",
    )
}

pub(super) fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}
