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
//!
//! The files follow a request's way: [`request`] reads and checks its head
//! and writes the one the homeserver receives; [`upstream`] holds the
//! connections to the homeserver; [`body`] sends the head and copies the
//! body; [`response`] reads the answer head and relays the answer by its
//! framing, [`chunked`] the chunked and re-chunked ones, [`splice`] large
//! bodies of known length (both ways) without copying them; [`client`] is the
//! client's side of the connection (reads with deadlines, lingering close,
//! the handoff). This module keeps the order of events.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::Config;
use crate::error::MatrixError;
use crate::gate::RegistrationGateLayer;
use crate::upstream::{client_body_failure, failure_answer};

mod body;
mod chunked;
mod client;
mod request;
mod response;
mod splice;
mod upstream;

pub(crate) use client::{linger, Rewind};
use client::{Timer, Wait};
use request::{Parsed, Plan};
use response::{HeadError, ResponseHead};
use upstream::{Homeserver, UpstreamConn};

/// Size of a client connection's read buffer; a request head that does not
/// fit goes to the full stack.
const CLIENT_BUFFER: usize = 8 * 1024;

/// The fast path's shared state: cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct FastPath {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    gate: RegistrationGateLayer,
    homeserver: Homeserver,
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
                homeserver: Homeserver::new(&config.upstream),
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
            let plan = match self.next_request().await {
                Ok(plan) => plan,
                Err(ending) => return ending,
            };
            match self.exchange(plan).await {
                Ok(true) if !self.stopping => {}
                Ok(_) if self.linger => return Ending::Linger,
                _ => return Ending::Closed,
            }
        }
    }

    /// Waits for the next request head, whole, within the header timeout
    /// from when the connection began waiting for it; or for the reason the
    /// connection leaves the fast path.
    async fn next_request(&mut self) -> Result<Plan, Ending> {
        let mut deadline = None;
        loop {
            if self.end > self.start {
                match self.parse() {
                    Parsed::Plan(plan) => return Ok(plan),
                    Parsed::Handoff => return Err(self.handoff()),
                    Parsed::NeedMore if self.start == 0 && self.end == self.buf.len() => {
                        return Err(self.handoff())
                    }
                    Parsed::NeedMore => {}
                }
            } else if self.stopping {
                return Err(Ending::Closed);
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
                        return Err(Ending::Closed);
                    }
                }
                Ok(Err(Wait::TimedOut)) => {
                    tracing::debug!(peer = %self.peer, "request head not complete within the header timeout; closing");
                    return Err(Ending::Closed);
                }
                Ok(Err(Wait::Eof)) | Err(_) => return Err(Ending::Closed),
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

    /// Forwards one request and relays its answer. `Ok(true)`: the client
    /// connection can carry another request.
    async fn exchange(&mut self, plan: Plan) -> io::Result<bool> {
        let started = Instant::now();
        self.start += plan.head_len;
        // After a `502`/`504` the connection can carry on if no request body
        // is left unread in it.
        let keep_after_failure = plan.body_len == 0 && !plan.client_close && !self.stopping;
        let (mut upstream, reused) = match self.fast.homeserver.checkout().await {
            Ok(checked_out) => checked_out,
            Err(error) => return self.fail(error, started, keep_after_failure).await,
        };
        // The answer buffer travels with the homeserver connection.
        self.ubuf = std::mem::take(&mut upstream.buf);
        let head = match self.forward(&plan, &mut upstream, reused, started).await {
            Ok(head) => head,
            Err(error) => return self.unanswered(error, started, keep_after_failure).await,
        };
        let metrics = self.fast.gate.metrics();
        metrics.observe(false, started.elapsed());
        metrics.upstream_response(head.status);
        let keep_client = !plan.client_close && !self.stopping;
        let reusable = self
            .relay(&mut upstream.stream, &head, &plan, keep_client)
            .await?;
        let buf = std::mem::take(&mut self.ubuf);
        if reusable {
            upstream.buf = buf;
            self.fast.homeserver.give_back(upstream);
        }
        if self.out.capacity() > 4 * CLIENT_BUFFER {
            self.out = Vec::with_capacity(1024);
        }
        Ok(keep_client)
    }

    /// Sends the request and reads the answer head; once more on a new
    /// connection when a reused one turns out closed before any of the
    /// request was read there.
    async fn forward(
        &mut self,
        plan: &Plan,
        upstream: &mut UpstreamConn,
        mut reused: bool,
        started: Instant,
    ) -> Result<ResponseHead, HeadError> {
        let deadline = started + self.fast.response_timeout;
        loop {
            let result = match self.send(&mut upstream.stream, plan).await {
                Ok(()) => self.read_head(&mut upstream.stream, deadline).await,
                Err(error) => Err(error),
            };
            match result {
                Err(HeadError::Closed) if reused && plan.replayable => {
                    tracing::debug!("idle homeserver connection was closed; retrying");
                    *upstream = self
                        .fast
                        .homeserver
                        .connect()
                        .await
                        .map_err(HeadError::Io)?;
                    reused = false;
                }
                result => return result,
            }
        }
    }

    /// Answers a request that got no answer head.
    async fn unanswered(
        &mut self,
        error: HeadError,
        started: Instant,
        keep_after_failure: bool,
    ) -> io::Result<bool> {
        let error = match error {
            HeadError::ClientGone => {
                // As the full stack does: the request is abandoned, and the
                // homeserver sees its connection close.
                tracing::debug!(peer = %self.peer, "client left before the answer");
                return Ok(false);
            }
            HeadError::ClientBody(error) => {
                // The homeserver connection, holding part of a request, is
                // closed with it.
                self.fast.gate.metrics().observe(false, started.elapsed());
                let stalled = error.kind() == io::ErrorKind::TimedOut;
                let answer = client_body_failure(&error, stalled);
                return self.answer_error(answer, false).await;
            }
            HeadError::Closed => io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the homeserver closed the connection before answering",
            ),
            HeadError::Io(error) => error,
            HeadError::Invalid(what) => io::Error::new(io::ErrorKind::InvalidData, what),
        };
        self.fail(error, started, keep_after_failure).await
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
        response::write_error(&mut self.out, answer, keep);
        self.client.write_all(&self.out).await?;
        Ok(keep)
    }
}
