//! The HTTP/1.1 pass-through path for the common request.
//!
//! Most requests a homeserver gets are plain HTTP/1.1 requests that the gate
//! only passes on: a `GET /sync`, a `PUT` of an event. For those the gate
//! does not need a parsed request object, a header map, a response object
//! and two protocol state machines: it reads the request head, checks it,
//! writes the head the homeserver receives straight into a buffer, copies
//! the body, and relays the answer.
//!
//! The path is narrow on purpose. It takes a request only when every part
//! of it has one reading that the gate and any homeserver share:
//!
//! - HTTP/1.1, an origin-form target of plain URI characters, one `Host`;
//! - no `Transfer-Encoding`, no `Expect`, at most one `Content-Length` of
//!   digits only, a `Connection` header (if any) of just `keep-alive` or
//!   `close`;
//! - a path the gate does not guard (registration routes are never served
//!   here), and a head that fits the read buffer.
//!
//! Anything else — including anything the head parser rejects — hands the
//! connection, with every byte read so far, to the full HTTP stack (hyper
//! and the gate's tower service), which reads the request from its first
//! byte and serves the rest of the connection. The headers the homeserver
//! receives are the same either way: hop-by-hop and client-address headers
//! removed, `X-Forwarded-For`/`-Proto`/`-Host` written by the gate.
//!
//! The answer is relayed with its own framing when it has a length, and
//! re-chunked when it is chunked or delimited by the connection's end.
//! Transport failures answer `502`/`504` like the full stack does; a client
//! that does not finish its body gets a `400` of its own, not counted as a
//! homeserver error. A connection closed while the client may still be
//! sending lingers ([`linger`]), as one the full stack closes does
//! ([`Rewind`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderValue};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::config::{Config, UpstreamConfig};
use crate::error::MatrixError;
use crate::gate::{routes, RegistrationGateLayer};
use crate::upstream::idle::{IdlePool, Liveness, Reusable};
use crate::upstream::{client_body_failure, failure_answer, write_ip, UploadStalled};

/// Size of a client connection's read buffer; a request head that does not
/// fit goes to the full stack.
const CLIENT_BUFFER: usize = 8 * 1024;
/// Size of the buffer answers are read into.
const UPSTREAM_BUFFER: usize = 16 * 1024;
/// The largest answer head accepted from the homeserver.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Request headers parsed here at most; more go to the full stack.
const MAX_HEADERS: usize = 64;
/// Answer headers accepted from the homeserver at most.
const MAX_RESPONSE_HEADERS: usize = 100;
/// A chunk-size line longer than this is not HTTP.
const MAX_CHUNK_LINE: usize = 1024;

/// The fast path's shared state: cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct FastPath {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    gate: RegistrationGateLayer,
    pool: Homeserver,
    base_path: String,
    header_read_timeout: Duration,
    response_timeout: Duration,
    upload_idle_timeout: Duration,
}

/// How a connection left the fast path.
pub(crate) enum Ending {
    /// It is closed (or is to be).
    Closed,
    /// It is to be closed while the client may still be sending a request
    /// body: see [`linger`].
    Linger,
    /// The full stack serves it from here, starting with these bytes.
    Handoff(Bytes),
}

impl FastPath {
    pub(crate) fn new(config: &Config, gate: RegistrationGateLayer) -> Self {
        let url = &config.upstream.url;
        FastPath {
            inner: Arc::new(Inner {
                gate,
                pool: Homeserver::new(&config.upstream),
                base_path: url.path().trim_end_matches('/').to_owned(),
                header_read_timeout: config.server.header_read_timeout.0,
                response_timeout: config.upstream.response_timeout.0,
                upload_idle_timeout: config.server.upload_idle_timeout.0,
            }),
        }
    }

    /// Serves requests on `stream` until the client closes, the server
    /// stops (`stop` completes), or a request needs the full stack.
    pub(crate) async fn serve<F>(
        &self,
        stream: &mut TcpStream,
        peer: SocketAddr,
        stop: Pin<&mut F>,
    ) -> Ending
    where
        F: Future,
    {
        let mut conn = Conn {
            fast: &self.inner,
            client: stream,
            peer,
            buf: vec![0; CLIENT_BUFFER],
            start: 0,
            end: 0,
            ubuf: Vec::new(),
            out: Vec::with_capacity(1024),
            request: Vec::with_capacity(1024),
            timer: Timer::default(),
            stop,
            stopping: false,
            linger: false,
        };
        conn.run().await
    }
}

/// What a parsed request head asks for.
struct Plan {
    head_len: usize,
    body_len: u64,
    head: bool,
    client_close: bool,
    /// Safe to send again on another connection if a reused one turns out
    /// closed before any answer byte.
    replayable: bool,
}

enum Parsed {
    Plan(Plan),
    NeedMore,
    Handoff,
}

/// Why waiting for the client ended without data.
enum Wait {
    Eof,
    TimedOut,
    Stopped,
}

struct Conn<'a, F> {
    fast: &'a Inner,
    client: &'a mut TcpStream,
    peer: SocketAddr,
    /// Client bytes read: `buf[start..end]` is not consumed yet.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Answer bytes read from the homeserver: the buffer of the homeserver
    /// connection in use (none between requests).
    ubuf: Vec<u8>,
    /// What is written to the client next.
    out: Vec<u8>,
    /// The request head the homeserver receives.
    request: Vec<u8>,
    timer: Timer,
    stop: Pin<&'a mut F>,
    stopping: bool,
    /// The connection is closed after an answer while the client may still
    /// be sending its body.
    linger: bool,
}

impl<F: Future> Conn<'_, F> {
    async fn run(&mut self) -> Ending {
        loop {
            // A head, whole, within the header timeout from when the
            // connection began waiting for it.
            let mut deadline = None;
            let plan = loop {
                if self.end > self.start {
                    match self.parse() {
                        Parsed::Plan(plan) => break plan,
                        Parsed::Handoff => return self.handoff(),
                        Parsed::NeedMore if self.start == 0 && self.end == self.buf.len() => {
                            return self.handoff()
                        }
                        Parsed::NeedMore => {}
                    }
                } else if self.stopping {
                    return Ending::Closed;
                }
                if self.end == self.buf.len() {
                    self.compact();
                }
                let timeout = self.fast.header_read_timeout;
                let deadline = *deadline.get_or_insert_with(|| Instant::now() + timeout);
                match self.read_client(Some(deadline), true).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(Wait::Stopped)) => {
                        if self.end == self.start {
                            return Ending::Closed;
                        }
                    }
                    Ok(Err(Wait::TimedOut)) => {
                        tracing::debug!(peer = %self.peer, "request head not complete within the header timeout; closing");
                        return Ending::Closed;
                    }
                    Ok(Err(Wait::Eof)) | Err(_) => return Ending::Closed,
                }
            };
            match self.exchange(plan).await {
                Ok(true) if !self.stopping => {}
                Ok(_) if self.linger => return Ending::Linger,
                _ => return Ending::Closed,
            }
        }
    }

    fn handoff(&mut self) -> Ending {
        Ending::Handoff(Bytes::copy_from_slice(&self.buf[self.start..self.end]))
    }

    fn compact(&mut self) {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
    }

    /// Parses the head at `buf[start..end]` and, when this path takes it,
    /// writes the head the homeserver receives into `self.request`.
    fn parse(&mut self) -> Parsed {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(&self.buf[self.start..self.end]) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Parsed::NeedMore,
            Err(_) => return Parsed::Handoff,
        };
        let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
            return Parsed::Handoff;
        };
        if method == "CONNECT" || !plain_origin_form(target.as_bytes()) {
            return Parsed::Handoff;
        }
        let path = target.split_once('?').map_or(target, |(path, _)| path);
        if routes::classify(path).is_some() {
            return Parsed::Handoff;
        }

        let out = &mut self.request;
        out.clear();
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.fast.base_path.as_bytes());
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");

        let mut host: Option<&[u8]> = None;
        let mut body_len: Option<u64> = None;
        let mut client_close = false;
        let mut forwarding = false;
        for header in req.headers.iter() {
            let name = header.name.as_bytes();
            let value = header.value;
            match request_header(name) {
                RequestHeader::EndToEnd => {}
                RequestHeader::Host => {
                    if host.replace(value).is_some() {
                        return Parsed::Handoff;
                    }
                }
                RequestHeader::ContentLength => {
                    if body_len.is_some() {
                        return Parsed::Handoff;
                    }
                    match parse_length(value) {
                        Some(len) => body_len = Some(len),
                        None => return Parsed::Handoff,
                    }
                }
                RequestHeader::Connection => {
                    let value = value.trim_ascii();
                    if value.eq_ignore_ascii_case(b"close") {
                        client_close = true;
                    } else if !value.eq_ignore_ascii_case(b"keep-alive") {
                        return Parsed::Handoff;
                    }
                    continue;
                }
                RequestHeader::Refuse => return Parsed::Handoff,
                RequestHeader::Forwarding => {
                    forwarding = true;
                    continue;
                }
                RequestHeader::Drop => continue,
            }
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        let Some(host) = host else {
            return Parsed::Handoff;
        };

        // Who the client is: the peer, or what a trusted proxy says.
        let peer = self.peer.ip();
        let (client, proto) = self.fast.gate.with_resolver(|resolver| {
            if forwarding && resolver.trusts(peer) {
                let mut map = HeaderMap::new();
                for header in req.headers.iter() {
                    let name = header.name;
                    if name.eq_ignore_ascii_case("x-forwarded-for")
                        || name.eq_ignore_ascii_case("x-forwarded-proto")
                    {
                        if let (Ok(name), Ok(value)) = (
                            http::header::HeaderName::from_bytes(name.as_bytes()),
                            HeaderValue::from_bytes(header.value),
                        ) {
                            map.append(name, value);
                        }
                    }
                }
                (
                    resolver.resolve(peer, &map).0,
                    resolver.forwarded_proto(peer, &map).map_or("http", |p| p.0),
                )
            } else {
                (peer.to_canonical(), "http")
            }
        });
        out.extend_from_slice(b"x-forwarded-for: ");
        write_ip(client, out);
        out.extend_from_slice(b"\r\nx-forwarded-proto: ");
        out.extend_from_slice(proto.as_bytes());
        out.extend_from_slice(b"\r\nx-forwarded-host: ");
        out.extend_from_slice(host);
        out.extend_from_slice(b"\r\n\r\n");

        let body_len = body_len.unwrap_or(0);
        Parsed::Plan(Plan {
            head_len,
            body_len,
            head: method == "HEAD",
            client_close,
            replayable: body_len == 0
                && matches!(method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE"),
        })
    }

    /// Reads more client bytes into `buf[end..]`. `Ok(Ok(n))`: `n > 0`
    /// bytes arrived. With `between_requests` (waiting for a head), the
    /// server's stop also ends the wait.
    async fn read_client(
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

    /// Forwards one request and relays its answer. `Ok(true)`: the client
    /// connection can carry another request.
    async fn exchange(&mut self, plan: Plan) -> io::Result<bool> {
        let started = Instant::now();
        self.start += plan.head_len;
        // After a `502`/`504` the connection can carry on if no request body
        // is left unread in it.
        let keep_after_failure = plan.body_len == 0 && !plan.client_close && !self.stopping;
        let (mut upstream, mut reused) = match self.fast.pool.checkout().await {
            Ok(checked_out) => checked_out,
            Err(error) => return self.fail(error, started, keep_after_failure).await,
        };
        // The answer buffer travels with the homeserver connection.
        self.ubuf = std::mem::take(&mut upstream.buf);
        let deadline = started + self.fast.response_timeout;
        let head = loop {
            let result = match self.send(&mut upstream.stream, &plan).await {
                Ok(()) => self.read_head(&mut upstream.stream, deadline).await,
                Err(error) => Err(error),
            };
            match result {
                Ok(head) => break head,
                // The homeserver had closed the idle connection: nothing
                // of the request was read there.
                Err(HeadError::Closed) if reused && plan.replayable => {
                    tracing::debug!("idle homeserver connection was closed; retrying");
                    upstream = match self.fast.pool.connect().await {
                        Ok(fresh) => fresh,
                        Err(error) => return self.fail(error, started, keep_after_failure).await,
                    };
                    reused = false;
                }
                Err(HeadError::ClientGone) => {
                    // As the full stack does: the request is abandoned, and
                    // the homeserver sees its connection close.
                    tracing::debug!(peer = %self.peer, "client left before the answer");
                    return Ok(false);
                }
                Err(HeadError::ClientBody(error)) => {
                    // The homeserver connection, holding part of a request,
                    // is closed with `upstream`.
                    self.fast.gate.metrics().observe(false, started.elapsed());
                    let stalled = error.kind() == io::ErrorKind::TimedOut;
                    let answer = client_body_failure(&error, stalled);
                    return self.answer_error(answer, false).await;
                }
                Err(HeadError::Closed) => {
                    let error = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the homeserver closed the connection before answering",
                    );
                    return self.fail(error, started, keep_after_failure).await;
                }
                Err(HeadError::Io(error)) => {
                    return self.fail(error, started, keep_after_failure).await
                }
                Err(HeadError::Invalid(what)) => {
                    let error = io::Error::new(io::ErrorKind::InvalidData, what);
                    return self.fail(error, started, keep_after_failure).await;
                }
            }
        };
        self.fast.gate.metrics().observe(false, started.elapsed());
        let keep_client = !plan.client_close && !self.stopping;
        let reusable = self
            .relay(&mut upstream.stream, &head, &plan, keep_client)
            .await?;
        let buf = std::mem::take(&mut self.ubuf);
        if reusable {
            upstream.buf = buf;
            self.fast.pool.give_back(upstream);
        }
        if self.out.capacity() > 4 * CLIENT_BUFFER {
            self.out = Vec::with_capacity(1024);
        }
        Ok(keep_client)
    }

    /// Writes the request head and body to the homeserver.
    async fn send(&mut self, upstream: &mut TcpStream, plan: &Plan) -> Result<(), HeadError> {
        let upstream_failed = |error: io::Error| {
            if is_reset(&error) {
                HeadError::Closed
            } else {
                HeadError::Io(error)
            }
        };
        let buffered = (self.end - self.start) as u64;
        if plan.body_len <= buffered {
            // The whole body is here: one write.
            let body_end = self.start + plan.body_len as usize;
            if plan.body_len == 0 {
                upstream
                    .write_all(&self.request)
                    .await
                    .map_err(upstream_failed)?;
            } else {
                self.request
                    .extend_from_slice(&self.buf[self.start..body_end]);
                let result = upstream.write_all(&self.request).await;
                let head_len = self.request.len() - plan.body_len as usize;
                self.request.truncate(head_len);
                result.map_err(upstream_failed)?;
            }
            self.start = body_end;
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            }
            return Ok(());
        }
        upstream
            .write_all(&self.request)
            .await
            .map_err(upstream_failed)?;
        let mut left = plan.body_len;
        loop {
            let here = (self.end - self.start).min(usize::try_from(left).unwrap_or(usize::MAX));
            if here > 0 {
                upstream
                    .write_all(&self.buf[self.start..self.start + here])
                    .await
                    .map_err(upstream_failed)?;
                self.start += here;
                left -= here as u64;
            }
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            }
            if left == 0 {
                return Ok(());
            }
            // The client's body failing, or pausing too long, is the
            // client's doing.
            let idle = self.fast.upload_idle_timeout;
            match self.read_client(Some(Instant::now() + idle), false).await {
                Ok(Ok(_)) => {}
                Ok(Err(Wait::TimedOut)) => {
                    return Err(HeadError::ClientBody(io::Error::new(
                        io::ErrorKind::TimedOut,
                        UploadStalled(idle),
                    )))
                }
                Ok(Err(_)) => {
                    return Err(HeadError::ClientBody(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client closed before its body was complete",
                    )))
                }
                Err(error) => return Err(HeadError::ClientBody(error)),
            }
        }
    }

    /// Reads the homeserver's answer head (skipping interim `1xx` answers).
    async fn read_head(
        &mut self,
        upstream: &mut TcpStream,
        deadline: Instant,
    ) -> Result<ResponseHead, HeadError> {
        let mut filled = 0;
        self.timer.deadline = Some(deadline);
        let result = loop {
            if filled > 0 {
                match parse_response(&self.ubuf[..filled], &mut self.out) {
                    Ok(Some(head)) if head.interim => {
                        self.ubuf.copy_within(head.len..filled, 0);
                        filled -= head.len;
                        continue;
                    }
                    Ok(Some(mut head)) => {
                        head.leftover = head.len..filled;
                        break Ok(head);
                    }
                    Ok(None) => {}
                    Err(what) => break Err(HeadError::Invalid(what)),
                }
            }
            if filled == self.ubuf.len() {
                if self.ubuf.len() >= MAX_RESPONSE_HEAD {
                    break Err(HeadError::Invalid("the answer head is too large"));
                }
                self.ubuf.resize(self.ubuf.len() * 2, 0);
            }
            let read = std::future::poll_fn(|cx| {
                let mut read = ReadBuf::new(&mut self.ubuf[filled..]);
                if let Poll::Ready(result) = Pin::new(&mut *upstream).poll_read(cx, &mut read) {
                    return Poll::Ready(result.map(|()| Some(read.filled().len())).map_err(Some));
                }
                // A client that leaves while its answer is awaited
                // abandons the request; bytes it sends meanwhile (the next
                // requests) are kept.
                if let Poll::Ready(ready) = self.client.poll_read_ready(cx) {
                    let gone = match ready {
                        Err(_) => true,
                        Ok(()) if self.end < self.buf.len() => {
                            match self.client.try_read(&mut self.buf[self.end..]) {
                                Ok(0) => true,
                                Ok(n) => {
                                    self.end += n;
                                    false
                                }
                                Err(e) => e.kind() != io::ErrorKind::WouldBlock,
                            }
                        }
                        Ok(()) => false,
                    };
                    if gone {
                        return Poll::Ready(Err(None));
                    }
                }
                self.timer.poll_expired(cx).map(|()| Ok(None))
            })
            .await;
            let read = match read {
                Ok(read) => Ok(read),
                Err(None) => break Err(HeadError::ClientGone),
                Err(Some(error)) => Err(error),
            };
            match read {
                Ok(Some(0)) if filled == 0 => break Err(HeadError::Closed),
                Ok(Some(0)) => break Err(HeadError::Invalid("the answer head is cut short")),
                Ok(Some(n)) => filled += n,
                Ok(None) => {
                    break Err(HeadError::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the homeserver did not answer in time",
                    )))
                }
                Err(error) if filled == 0 && is_reset(&error) => break Err(HeadError::Closed),
                Err(error) => break Err(HeadError::Io(error)),
            }
        };
        self.timer.deadline = None;
        result
    }

    /// Writes the answer head (already in `self.out`) and relays the body.
    /// `Ok(true)`: the homeserver connection can be used again.
    async fn relay(
        &mut self,
        upstream: &mut TcpStream,
        head: &ResponseHead,
        plan: &Plan,
        keep_client: bool,
    ) -> io::Result<bool> {
        let framing = if plan.head { Framing::None } else { head.body };
        if framing == Framing::Chunked || framing == Framing::UntilClose {
            self.out
                .extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        if !keep_client {
            self.out.extend_from_slice(b"connection: close\r\n");
        }
        self.out.extend_from_slice(b"\r\n");
        let leftover = head.leftover.clone();
        let reusable = !head.upstream_close;
        match framing {
            Framing::None => {
                self.client.write_all(&self.out).await?;
                Ok(reusable && leftover.is_empty())
            }
            Framing::Length(len) => {
                let here = leftover.len() as u64;
                if here >= len {
                    let end = leftover.start + len as usize;
                    self.out.extend_from_slice(&self.ubuf[leftover.start..end]);
                    self.client.write_all(&self.out).await?;
                    return Ok(reusable && here == len);
                }
                self.out.extend_from_slice(&self.ubuf[leftover]);
                self.client.write_all(&self.out).await?;
                let mut left = len - here;
                while left > 0 {
                    let want = self
                        .ubuf
                        .len()
                        .min(usize::try_from(left).unwrap_or(usize::MAX));
                    let n = read_some(upstream, &mut self.ubuf[..want]).await?;
                    if n == 0 {
                        return Err(cut_short());
                    }
                    self.client.write_all(&self.ubuf[..n]).await?;
                    left -= n as u64;
                }
                Ok(reusable)
            }
            Framing::Chunked => {
                let clean = self.relay_chunked(upstream, leftover).await?;
                Ok(reusable && clean)
            }
            Framing::UntilClose => {
                let mut pending = leftover;
                loop {
                    if !pending.is_empty() {
                        chunk_header(&mut self.out, pending.len());
                        self.out.extend_from_slice(&self.ubuf[pending.clone()]);
                        self.out.extend_from_slice(b"\r\n");
                    }
                    self.client.write_all(&self.out).await?;
                    self.out.clear();
                    let n = read_some(upstream, &mut self.ubuf).await?;
                    if n == 0 {
                        self.client.write_all(b"0\r\n\r\n").await?;
                        return Ok(false);
                    }
                    pending = 0..n;
                }
            }
        }
    }

    /// Relays a chunked body, chunk by chunk, re-encoded; trailers are
    /// dropped. `Ok(true)`: nothing followed the body.
    async fn relay_chunked(
        &mut self,
        upstream: &mut TcpStream,
        leftover: std::ops::Range<usize>,
    ) -> io::Result<bool> {
        // Compact the unread bytes to the front of `ubuf`.
        self.ubuf.copy_within(leftover.clone(), 0);
        let mut filled = leftover.len();
        let mut pos = 0;
        let mut decoder = ChunkDecoder::default();
        loop {
            while pos < filled {
                match decoder.step(&self.ubuf[pos..filled]).map_err(invalid)? {
                    None => break,
                    Some(Step::Data(n)) => {
                        chunk_header(&mut self.out, n);
                        self.out.extend_from_slice(&self.ubuf[pos..pos + n]);
                        self.out.extend_from_slice(b"\r\n");
                        pos += n;
                    }
                    Some(Step::Consumed(n)) => pos += n,
                    Some(Step::End(n)) => {
                        pos += n;
                        self.out.extend_from_slice(b"0\r\n\r\n");
                        self.client.write_all(&self.out).await?;
                        return Ok(pos == filled);
                    }
                }
            }
            if !self.out.is_empty() {
                self.client.write_all(&self.out).await?;
                self.out.clear();
            }
            // Keep an incomplete size line; drop what was consumed.
            self.ubuf.copy_within(pos..filled, 0);
            filled -= pos;
            pos = 0;
            if filled == self.ubuf.len() {
                return Err(invalid("a chunk-size line is too long"));
            }
            let n = read_some(upstream, &mut self.ubuf[filled..]).await?;
            if n == 0 {
                return Err(cut_short());
            }
            filled += n;
        }
    }

    /// Answers a transport failure like the full stack: `504` on a timeout,
    /// `502` otherwise. Unless `keep`, the client connection closes after
    /// the answer (its request body may not have been read).
    async fn fail(&mut self, error: io::Error, started: Instant, keep: bool) -> io::Result<bool> {
        self.fast.gate.metrics().observe(false, started.elapsed());
        let timed_out = error.kind() == io::ErrorKind::TimedOut;
        let answer = failure_answer(timed_out, &error, self.fast.gate.metrics());
        // Closing while the client may still be sending its body: read on
        // for a while, so that it can read this answer.
        self.linger = !keep;
        self.answer_error(answer, keep).await
    }

    /// Writes a Matrix error of the gate's own; unless `keep`, it closes
    /// the client connection.
    async fn answer_error(&mut self, answer: MatrixError, keep: bool) -> io::Result<bool> {
        let body = answer.body();
        let response = answer.into_response();
        self.out.clear();
        self.out.extend_from_slice(b"HTTP/1.1 ");
        self.out
            .extend_from_slice(response.status().as_str().as_bytes());
        self.out.push(b' ');
        self.out.extend_from_slice(
            response
                .status()
                .canonical_reason()
                .unwrap_or("")
                .as_bytes(),
        );
        self.out.extend_from_slice(b"\r\n");
        for (name, value) in response.headers() {
            self.out.extend_from_slice(name.as_str().as_bytes());
            self.out.extend_from_slice(b": ");
            self.out.extend_from_slice(value.as_bytes());
            self.out.extend_from_slice(b"\r\n");
        }
        self.out.extend_from_slice(b"content-length: ");
        self.out
            .extend_from_slice(body.len().to_string().as_bytes());
        self.out.extend_from_slice(b"\r\ndate: ");
        self.out.extend_from_slice(&http_date());
        self.out.extend_from_slice(if keep {
            b"\r\n\r\n".as_slice()
        } else {
            b"\r\nconnection: close\r\n\r\n".as_slice()
        });
        self.out.extend_from_slice(&body);
        self.client.write_all(&self.out).await?;
        Ok(keep)
    }
}

/// A request header as this path treats it.
enum RequestHeader {
    /// Passed on as it came.
    EndToEnd,
    Host,
    ContentLength,
    Connection,
    /// Hop-by-hop or naming a client address: never passed on.
    Drop,
    /// `X-Forwarded-For`/`-Proto`: replaced, but read when a trusted proxy sent them.
    Forwarding,
    /// Only the full stack serves such a request.
    Refuse,
}

fn request_header(name: &[u8]) -> RequestHeader {
    let is = |candidate: &str| name.eq_ignore_ascii_case(candidate.as_bytes());
    match name.len() {
        2 if is("te") => RequestHeader::Drop,
        4 if is("host") => RequestHeader::Host,
        6 if is("expect") => RequestHeader::Refuse,
        7 if is("upgrade") || is("trailer") => RequestHeader::Drop,
        9 if is("forwarded") || is("x-real-ip") => RequestHeader::Drop,
        10 if is("connection") => RequestHeader::Connection,
        10 if is("keep-alive") => RequestHeader::Drop,
        11 if is("x-client-ip") => RequestHeader::Drop,
        14 if is("content-length") => RequestHeader::ContentLength,
        14 if is("true-client-ip") => RequestHeader::Drop,
        15 if is("x-forwarded-for") => RequestHeader::Forwarding,
        16 if is("proxy-connection") || is("x-forwarded-host") || is("cf-connecting-ip") => {
            RequestHeader::Drop
        }
        17 if is("x-forwarded-proto") => RequestHeader::Forwarding,
        17 if is("transfer-encoding") => RequestHeader::Refuse,
        18 if is("proxy-authenticate") => RequestHeader::Drop,
        19 if is("proxy-authorization") => RequestHeader::Drop,
        _ => RequestHeader::EndToEnd,
    }
}

/// An origin-form target (`/path?query`) of unreserved, reserved and
/// percent-encoding characters only: one that every parser reads alike.
fn plain_origin_form(target: &[u8]) -> bool {
    target.first() == Some(&b'/')
        && !target.starts_with(b"//")
        && target.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                        | b':'
                        | b'@'
                        | b'/'
                        | b'?'
                        | b'%'
                )
        })
}

/// A `Content-Length` value: digits only, no sign, no list.
fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        value
            .iter()
            .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')),
    )
}

/// How an answer's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

struct ResponseHead {
    /// Length of the head in `ubuf`.
    len: usize,
    /// A `1xx` answer to skip.
    interim: bool,
    body: Framing,
    upstream_close: bool,
    /// Bytes after the head in `ubuf`.
    leftover: std::ops::Range<usize>,
}

enum HeadError {
    /// The connection ended before any byte of an answer.
    Closed,
    /// The client closed its connection while the answer was awaited.
    ClientGone,
    /// The client's body ended (or failed) before it was complete.
    ClientBody(io::Error),
    Io(io::Error),
    Invalid(&'static str),
}

/// Parses an answer head from `buf`; a final answer's head as the client
/// receives it (without its framing headers and the final empty line) is
/// written to `out`.
fn parse_response(buf: &[u8], out: &mut Vec<u8>) -> Result<Option<ResponseHead>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("the answer head is not HTTP/1.1"),
    };
    let code = response.code.unwrap_or(0);
    if code == 101 {
        return Err("the homeserver switched protocols unasked");
    }
    if (100..200).contains(&code) {
        return Ok(Some(ResponseHead {
            len,
            interim: true,
            body: Framing::None,
            upstream_close: false,
            leftover: 0..0,
        }));
    }
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut other_encoding = false;
    let mut upstream_close = response.version == Some(0);
    let mut named: Vec<&[u8]> = Vec::new();
    let mut date = false;
    for header in response.headers.iter() {
        let name = header.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let value = parse_length(header.value).ok_or("an invalid Content-Length")?;
            if length.is_some_and(|l| l != value) {
                return Err("conflicting Content-Length headers");
            }
            length = Some(value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            for coding in header.value.split(|&b| b == b',') {
                let coding = coding.trim_ascii();
                if coding.eq_ignore_ascii_case(b"chunked") {
                    chunked = true;
                } else if !coding.is_empty() {
                    other_encoding = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in header.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    upstream_close = true;
                } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                    named.push(token);
                }
            }
        } else if name.eq_ignore_ascii_case(b"date") {
            date = true;
        }
    }
    if other_encoding {
        return Err("a transfer coding other than chunked");
    }
    let body = if code == 204 || code == 304 {
        Framing::None
    } else if chunked {
        Framing::Chunked
    } else if let Some(len) = length {
        Framing::Length(len)
    } else {
        Framing::UntilClose
    };

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    let mut code_text = [0u8; 3];
    code_text[0] = b'0' + (code / 100 % 10) as u8;
    code_text[1] = b'0' + (code / 10 % 10) as u8;
    code_text[2] = b'0' + (code % 10) as u8;
    out.extend_from_slice(&code_text);
    out.push(b' ');
    out.extend_from_slice(response.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for header in response.headers.iter() {
        let name = header.name.as_bytes();
        if response_hop_by_hop(name)
            || named.iter().any(|n| n.eq_ignore_ascii_case(name))
            // Transfer-Encoding overrides Content-Length; never send both on.
            || (chunked && name.eq_ignore_ascii_case(b"content-length"))
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(header.value);
        out.extend_from_slice(b"\r\n");
    }
    if !date {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&http_date());
        out.extend_from_slice(b"\r\n");
    }
    Ok(Some(ResponseHead {
        len,
        interim: false,
        body,
        upstream_close,
        leftover: 0..0,
    }))
}

fn response_hop_by_hop(name: &[u8]) -> bool {
    let is = |candidate: &str| name.eq_ignore_ascii_case(candidate.as_bytes());
    match name.len() {
        2 => is("te"),
        7 => is("upgrade") || is("trailer"),
        10 => is("connection") || is("keep-alive"),
        16 => is("proxy-connection"),
        17 => is("transfer-encoding"),
        18 => is("proxy-authenticate"),
        19 => is("proxy-authorization"),
        _ => false,
    }
}

/// A chunked body decoder that works on whatever bytes are at hand.
#[derive(Default)]
struct ChunkDecoder {
    state: ChunkState,
}

#[derive(Default, Clone, Copy)]
enum ChunkState {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

enum Step {
    /// These many bytes at the front are chunk data.
    Data(usize),
    /// These many bytes were framing.
    Consumed(usize),
    /// The body ended after these many bytes.
    End(usize),
}

impl ChunkDecoder {
    /// One step over `input` (not empty); `None` when a line is not
    /// complete yet.
    fn step(&mut self, input: &[u8]) -> Result<Option<Step>, &'static str> {
        match self.state {
            ChunkState::Data(left) => {
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                let left = left - n as u64;
                self.state = if left == 0 {
                    ChunkState::DataEnd
                } else {
                    ChunkState::Data(left)
                };
                Ok(Some(Step::Data(n)))
            }
            ChunkState::Size | ChunkState::DataEnd | ChunkState::Trailers => {
                let Some(line_end) = input.iter().position(|&b| b == b'\n') else {
                    if input.len() > MAX_CHUNK_LINE {
                        return Err("a chunk-size line is too long");
                    }
                    return Ok(None);
                };
                let line = &input[..line_end];
                let line = line
                    .strip_suffix(b"\r")
                    .ok_or("a bare LF in a chunked body")?;
                let consumed = line_end + 1;
                match self.state {
                    ChunkState::DataEnd => {
                        if !line.is_empty() {
                            return Err("chunk data longer than its size");
                        }
                        self.state = ChunkState::Size;
                        Ok(Some(Step::Consumed(consumed)))
                    }
                    ChunkState::Trailers => {
                        if line.is_empty() {
                            Ok(Some(Step::End(consumed)))
                        } else {
                            Ok(Some(Step::Consumed(consumed)))
                        }
                    }
                    _ => {
                        let digits = line.split(|&b| b == b';').next().unwrap_or(b"");
                        let digits = digits.trim_ascii_end();
                        if digits.is_empty() || digits.len() > 15 {
                            return Err("an invalid chunk size");
                        }
                        let mut size = 0u64;
                        for &d in digits {
                            let v = (d as char).to_digit(16).ok_or("an invalid chunk size")?;
                            size = size * 16 + u64::from(v);
                        }
                        self.state = if size == 0 {
                            ChunkState::Trailers
                        } else {
                            ChunkState::Data(size)
                        };
                        Ok(Some(Step::Consumed(consumed)))
                    }
                }
            }
        }
    }
}

fn chunk_header(out: &mut Vec<u8>, len: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = len;
    loop {
        i -= 1;
        digits[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

async fn read_some(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut read = ReadBuf::new(buf);
        match Pin::new(&mut *stream).poll_read(cx, &mut read) {
            Poll::Ready(result) => Poll::Ready(result.map(|()| read.filled().len())),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

fn is_reset(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

fn cut_short() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the homeserver's answer was cut short",
    )
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// The current time as an HTTP date, formatted at most once a second per thread.
fn http_date() -> [u8; 29] {
    use std::cell::Cell;
    thread_local! {
        static CACHE: Cell<(u64, [u8; 29])> = const { Cell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHE.with(|cache| {
        let (at, text) = cache.get();
        if at == secs {
            return text;
        }
        let mut text = [0u8; 29];
        let formatted = httpdate::fmt_http_date(now);
        let len = formatted.len().min(29);
        text[..len].copy_from_slice(&formatted.as_bytes()[..len]);
        cache.set((secs, text));
        text
    })
}

/// A deadline for the phase a connection is in, on one timer per
/// connection that is moved only when it would fire too late: a request
/// costs no timer operation while the deadlines keep moving forward.
#[derive(Default)]
struct Timer {
    deadline: Option<Instant>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// When the sleep fires, if it is armed.
    armed: Option<Instant>,
}

impl Timer {
    /// Ready once the current deadline has passed.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
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

// === the homeserver connections ===

/// A connection to the homeserver, and the buffer its answers are read into.
#[derive(Debug)]
struct UpstreamConn {
    stream: TcpStream,
    buf: Vec<u8>,
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

/// The homeserver, as the fast path reaches it.
#[derive(Debug)]
struct Homeserver {
    pool: Arc<IdlePool<UpstreamConn>>,
}

impl Homeserver {
    fn new(config: &UpstreamConfig) -> Self {
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
    async fn checkout(&self) -> io::Result<(UpstreamConn, bool)> {
        match self.pool.take() {
            Some(conn) => Ok((conn, true)),
            None => Ok((self.connect().await?, false)),
        }
    }

    /// A new connection.
    async fn connect(&self) -> io::Result<UpstreamConn> {
        Ok(UpstreamConn {
            stream: self.pool.connect().await?,
            buf: vec![0; UPSTREAM_BUFFER],
        })
    }

    /// Keeps a connection whose answer was read to the end for reuse.
    fn give_back(&self, conn: UpstreamConn) {
        self.pool.give_back(conn);
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

// === closing while the client is still sending ===

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

// === handing a connection to the full stack ===

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

    /// Decodes `input` fed in pieces of `step` bytes, as the relay does.
    fn decode(input: &[u8], step: usize) -> Result<(Vec<u8>, usize), &'static str> {
        let mut decoder = ChunkDecoder::default();
        let mut data = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut fed = 0;
        let mut consumed = 0;
        loop {
            let mut pos = 0;
            while pos < pending.len() {
                match decoder.step(&pending[pos..])? {
                    None => break,
                    Some(Step::Data(n)) => {
                        data.extend_from_slice(&pending[pos..pos + n]);
                        pos += n;
                    }
                    Some(Step::Consumed(n)) => pos += n,
                    Some(Step::End(n)) => return Ok((data, consumed + pos + n)),
                }
            }
            pending.drain(..pos);
            consumed += pos;
            if fed == input.len() {
                return Err("cut short");
            }
            let next = (fed + step).min(input.len());
            pending.extend_from_slice(&input[fed..next]);
            fed = next;
        }
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: t\r\n\r\nNEXT";
        for step in 1..body.len() {
            let (data, used) = decode(body, step).unwrap();
            assert_eq!(data, b"hello world0123456789abcdef", "step {step}");
            assert_eq!(&body[used..], b"NEXT", "step {step}");
        }
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"g\r\nhello\r\n0\r\n\r\n",
            b"3\r\nhello\r\n0\r\n\r\n",
            b"\r\nhello\r\n",
            b"1000000000000000\r\n",
        ] {
            assert!(
                decode(bad, bad.len()).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let endless = vec![b'1'; MAX_CHUNK_LINE + 10];
        assert!(decode(&endless, endless.len()).is_err());
    }

    #[test]
    fn content_length_is_digits_only() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"123"), Some(123));
        assert_eq!(parse_length(b" 12 "), Some(12));
        for bad in [
            &b""[..],
            b"+1",
            b"-1",
            b"1,1",
            b"1 1",
            b"0x10",
            b"9999999999999999999",
        ] {
            assert_eq!(
                parse_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn only_plain_origin_form_targets_are_taken() {
        for good in [
            "/",
            "/_matrix/client/versions",
            "/_matrix/client/v3/rooms/!a:b/send/m.room.message/1?x=%7B%7D&y=1",
            "/a;b=(1)*+,$'@~_-.",
        ] {
            assert!(plain_origin_form(good.as_bytes()), "{good}");
        }
        for bad in [
            "*",
            "//evil/path",
            "http://a/b",
            "/a#frag",
            "/a\"b",
            "/a{b}",
            "/a\\b",
            "/a|b",
            "/a^b",
            "/a`b",
            "/a<b>",
            "/caf\u{e9}",
            "",
        ] {
            assert!(!plain_origin_form(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn every_hop_by_hop_and_client_address_header_is_kept_from_the_homeserver() {
        use crate::upstream::{CLIENT_ADDRESS_HEADERS, HOP_BY_HOP};
        for name in HOP_BY_HOP.iter().chain(CLIENT_ADDRESS_HEADERS.iter()) {
            for spelling in [name.as_str().to_owned(), name.as_str().to_ascii_uppercase()] {
                let kind = request_header(spelling.as_bytes());
                assert!(
                    !matches!(
                        kind,
                        RequestHeader::EndToEnd
                            | RequestHeader::Host
                            | RequestHeader::ContentLength
                    ),
                    "{spelling} would be passed on"
                );
            }
            // Answers lose their hop-by-hop headers too.
            if HOP_BY_HOP.contains(name) {
                assert!(response_hop_by_hop(name.as_str().as_bytes()), "{name}");
            }
        }
        assert!(matches!(
            request_header(b"X-Forwarded-Proto"),
            RequestHeader::Forwarding
        ));
        assert!(matches!(request_header(b"Expect"), RequestHeader::Refuse));
        assert!(matches!(
            request_header(b"Transfer-Encoding"),
            RequestHeader::Refuse
        ));
        assert!(matches!(
            request_header(b"Authorization"),
            RequestHeader::EndToEnd
        ));
    }

    fn head_of(raw: &[u8]) -> Result<Option<(ResponseHead, String)>, &'static str> {
        let mut out = Vec::new();
        parse_response(raw, &mut out).map(|h| h.map(|h| (h, String::from_utf8(out).unwrap())))
    }

    #[test]
    fn answer_heads_are_framed_and_cleaned() {
        let (head, out) = head_of(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nDate: x\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(head.body, Framing::Length(5));
        assert_eq!(head.len, 47);
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nDate: x\r\n");

        let (head, out) = head_of(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\nConnection: close, x-a\r\nX-A: 1\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.body, Framing::Chunked);
        assert!(head.upstream_close);
        assert!(
            !out.to_ascii_lowercase().contains("content-length"),
            "{out}"
        );
        assert!(!out.to_ascii_lowercase().contains("x-a"), "{out}");
        assert!(out.contains("date: "), "a missing Date is added: {out}");

        let (head, _) = head_of(b"HTTP/1.0 200 OK\r\n\r\nbody").unwrap().unwrap();
        assert_eq!(head.body, Framing::UntilClose);
        assert!(head.upstream_close);

        let (head, _) = head_of(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(head.interim);
        let (head, _) = head_of(b"HTTP/1.1 204 No Content\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.body, Framing::None);
        assert!(head_of(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none());

        for bad in [
            &b"HTTP/1.1 101 Switching Protocols\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"ICY 200 OK\r\n\r\n",
        ] {
            assert!(head_of(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn chunk_headers_are_lowercase_hex() {
        for (len, text) in [
            (1, "1\r\n"),
            (15, "f\r\n"),
            (16, "10\r\n"),
            (65535, "ffff\r\n"),
        ] {
            let mut out = Vec::new();
            chunk_header(&mut out, len);
            assert_eq!(out, text.as_bytes());
        }
    }

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
