//! Keep-alive HTTP/1.1 connections to the homeserver for the full stack.
//!
//! The connections are hyper client connections, kept in the gate's idle
//! pool ([`super::idle`], which the fast path's raw connections use too).
//! A connection goes back to the pool once its response body has been read
//! to the end (or at once, when the whole answer arrived with its head); a
//! response body dropped half-read takes its connection with it, because
//! hyper closes such a connection anyway.
//!
//! A request that could not even be written because a reused connection had
//! gone away in the meantime (the homeserver closed it while idle) is sent
//! again on another one; a request that was written is never repeated.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use super::idle::{IdlePool, Liveness, Reusable};
use crate::gate::BoxError;

/// Why a request got no answer from the homeserver.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be opened (refused, unreachable, timed out).
    Connect(io::Error),
    /// The connection failed while the request was written or the answer read.
    Http(hyper::Error),
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Connect(_) => f.write_str("cannot connect to the homeserver"),
            SendError::Http(_) => f.write_str("the homeserver connection failed"),
        }
    }
}

impl StdError for SendError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            SendError::Connect(error) => Some(error),
            SendError::Http(error) => Some(error),
        }
    }
}

/// The pool: cheap to clone, shared by every clone of the upstream service.
pub struct Pool<B> {
    shared: Arc<IdlePool<SendRequest<B>>>,
}

impl<B> Clone for Pool<B> {
    fn clone(&self) -> Self {
        Pool {
            shared: self.shared.clone(),
        }
    }
}

impl<B> fmt::Debug for Pool<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("connections", &self.shared)
            .finish()
    }
}

impl<B> Reusable for SendRequest<B> {
    fn liveness(&self) -> Liveness {
        if self.is_closed() {
            Liveness::Closed
        } else if self.is_ready() {
            Liveness::Ready
        } else {
            Liveness::Busy
        }
    }

    fn known_closed(&self) -> bool {
        self.is_closed()
    }
}

impl<B> Pool<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A pool of connections to `host:port` (`host` a name, or an address;
    /// IPv6 addresses with or without brackets).
    pub fn new(host: &str, port: u16, connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Pool {
            shared: IdlePool::new(host, port, connect_timeout, idle_timeout),
        }
    }

    /// Sends `request` (origin-form URI, `Host` set) and waits for the
    /// response head. The response body returns the connection to the pool
    /// when it has been read to the end.
    pub async fn send(
        &self,
        mut request: Request<B>,
    ) -> Result<Response<PooledBody<B>>, SendError> {
        loop {
            let (mut sender, reused) = match self.shared.take() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let returner = if sender.is_ready() {
                        // The whole answer came with its head: the
                        // connection is free already.
                        self.shared.give_back(sender);
                        None
                    } else {
                        Some(Returner {
                            shared: self.shared.clone(),
                            sender,
                        })
                    };
                    return Ok(response.map(|body| PooledBody { body, returner }));
                }
                Err(mut error) => match error.take_message() {
                    // Never written: the reused connection had closed.
                    Some(unsent) if reused => {
                        tracing::debug!(error = %error.error(), "idle homeserver connection was closed; retrying");
                        request = unsent;
                    }
                    _ => return Err(SendError::Http(error.into_error())),
                },
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<B>, SendError> {
        let stream = self.shared.connect().await.map_err(SendError::Connect)?;
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Http)?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "homeserver connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// How many idle connections the pool holds (for tests).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.shared.idle_count()
    }
}

/// Gives a connection back once its response has been read.
struct Returner<B> {
    shared: Arc<IdlePool<SendRequest<B>>>,
    sender: SendRequest<B>,
}

/// A homeserver response body that returns its connection to the pool
/// when read to the end.
pub struct PooledBody<B> {
    body: Incoming,
    returner: Option<Returner<B>>,
}

impl<B> fmt::Debug for PooledBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledBody")
            .field("body", &self.body)
            .finish_non_exhaustive()
    }
}

impl<B> PooledBody<B> {
    fn release(&mut self) {
        if let Some(Returner { shared, sender }) = self.returner.take() {
            shared.give_back(sender);
        }
    }
}

impl<B> Drop for PooledBody<B> {
    fn drop(&mut self) {
        // Dropped after its last byte (an empty body is never polled):
        // the connection is reusable. Dropped half-read: hyper closes it.
        if self.returner.is_some() && self.body.is_end_stream() {
            self.release();
        }
    }
}

impl<B> Body for PooledBody<B> {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let frame = std::task::ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &frame {
            None => this.release(),
            // A body of known length ends with its last byte; the server
            // writing it may never poll again.
            Some(Ok(_)) if this.body.is_end_stream() => this.release(),
            Some(Ok(_)) => {}
            // A failed connection is not reused.
            Some(Err(_)) => drop(this.returner.take()),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A homeserver stand-in that answers every request on a connection
    /// with `answer` (raw HTTP/1.1) and counts the connections it accepted.
    /// With `close`, it closes each connection after one answer, without
    /// saying so in the answer.
    async fn raw_server(answer: &'static [u8], close: bool) -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = stream.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buffer.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                            buffer.drain(..end + 4);
                            if stream.write_all(answer).await.is_err() {
                                return;
                            }
                            if close {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (port, accepted)
    }

    fn pool(port: u16, idle: Duration) -> Pool<Empty<Bytes>> {
        Pool::new("127.0.0.1", port, Duration::from_secs(2), idle)
    }

    fn get() -> Request<Empty<Bytes>> {
        Request::builder()
            .uri("/_matrix/client/versions")
            .header("host", "hs.example")
            .body(Empty::new())
            .unwrap()
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
    const CHUNKED: &[u8] =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";

    async fn body_of(response: Response<PooledBody<Empty<Bytes>>>) -> Bytes {
        response.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        for answer in [OK, CHUNKED] {
            let (port, accepted) = raw_server(answer, false).await;
            let pool = pool(port, Duration::from_secs(60));
            for _ in 0..20 {
                let response = pool.send(get()).await.unwrap();
                assert_eq!(body_of(response).await, "hello");
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 1);
            assert_eq!(pool.idle_count(), 1);
        }
    }

    #[tokio::test]
    async fn concurrent_requests_get_their_own_connections_then_reuse_them() {
        let (port, accepted) = raw_server(OK, false).await;
        let pool = pool(port, Duration::from_secs(60));
        for _ in 0..3 {
            let responses: Vec<_> = (0..4).map(|_| pool.send(get())).collect();
            let mut pending = Vec::new();
            for response in responses {
                pending.push(response.await.unwrap());
            }
            for response in pending {
                assert_eq!(body_of(response).await, "hello");
            }
        }
        let opened = accepted.load(Ordering::SeqCst);
        assert!(
            opened <= 4,
            "{opened} connections for 4 concurrent requests"
        );
    }

    #[tokio::test]
    async fn a_body_dropped_half_read_does_not_return_its_connection() {
        const LONG: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\npartial";
        let (port, accepted) = raw_server(LONG, false).await;
        let pool = pool(port, Duration::from_secs(60));
        let mut response = pool.send(get()).await.unwrap();
        let first = response.body_mut().frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "partial");
        drop(response);
        assert_eq!(pool.idle_count(), 0);
        let response = pool.send(get()).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connections_the_homeserver_closes_are_not_reused() {
        let (port, accepted) = raw_server(OK, true).await;
        let pool = pool(port, Duration::from_secs(60));
        for _ in 0..50 {
            let response = pool.send(get()).await.unwrap();
            assert_eq!(body_of(response).await, "hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 50);
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let (port, accepted) = raw_server(OK, false).await;
        let pool = pool(port, Duration::from_millis(300));
        let response = pool.send(get()).await.unwrap();
        assert_eq!(body_of(response).await, "hello");
        assert_eq!(pool.idle_count(), 1);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(pool.idle_count(), 0);
        let response = pool.send(get()).await.unwrap();
        assert_eq!(body_of(response).await, "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_zero_idle_timeout_keeps_no_connection() {
        let (port, accepted) = raw_server(OK, false).await;
        let pool = pool(port, Duration::ZERO);
        for _ in 0..3 {
            let response = pool.send(get()).await.unwrap();
            assert_eq!(body_of(response).await, "hello");
        }
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let error = pool(port, Duration::from_secs(1))
            .send(get())
            .await
            .unwrap_err();
        assert!(matches!(error, SendError::Connect(_)), "{error:?}");
    }
}
