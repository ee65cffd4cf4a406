//! The answer: its head read from the homeserver and cleaned, its body
//! relayed by its framing; and the gate's own error answers.

use std::future::Future;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::request::{parse_length, Plan};
use super::splice::{splice_exact, Failure, Spliced, SPLICE_FROM};
use super::upstream::{cut_short, is_reset, read_some};
use super::Conn;
use crate::error::MatrixError;

/// The largest answer head accepted from the homeserver.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Answer headers accepted from the homeserver at most.
const MAX_RESPONSE_HEADERS: usize = 100;

/// How an answer's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

pub(super) struct ResponseHead {
    /// The answer's status code.
    pub(super) status: u16,
    /// Length of the head in `ubuf`.
    len: usize,
    /// A `1xx` answer to skip.
    interim: bool,
    body: Framing,
    upstream_close: bool,
    /// Bytes after the head in `ubuf`.
    leftover: Range<usize>,
}

pub(super) enum HeadError {
    /// The connection ended before any byte of an answer.
    Closed,
    /// The client closed its connection while the answer was awaited.
    ClientGone,
    /// The client's body ended (or failed) before it was complete.
    ClientBody(io::Error),
    Io(io::Error),
    Invalid(&'static str),
}

impl<F: Future> Conn<'_, F> {
    /// Reads the homeserver's answer head (skipping interim `1xx` answers).
    pub(super) async fn read_head(
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
            match std::future::poll_fn(|cx| self.poll_answer(upstream, filled, cx)).await {
                Ok(0) if filled == 0 => break Err(HeadError::Closed),
                Ok(0) => break Err(HeadError::Invalid("the answer head is cut short")),
                Ok(n) => filled += n,
                Err(error) => break Err(error),
            }
        };
        self.timer.deadline = None;
        result
    }

    /// Reads answer bytes into `ubuf[filled..]`, while watching the client
    /// and the deadline.
    fn poll_answer(
        &mut self,
        upstream: &mut TcpStream,
        filled: usize,
        cx: &mut Context<'_>,
    ) -> Poll<Result<usize, HeadError>> {
        let mut read = ReadBuf::new(&mut self.ubuf[filled..]);
        match Pin::new(&mut *upstream).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => return Poll::Ready(Ok(read.filled().len())),
            Poll::Ready(Err(error)) if filled == 0 && is_reset(&error) => {
                return Poll::Ready(Err(HeadError::Closed))
            }
            Poll::Ready(Err(error)) => return Poll::Ready(Err(HeadError::Io(error))),
            Poll::Pending => {}
        }
        // A client that leaves while its answer is awaited abandons the
        // request; bytes it sends meanwhile (the next requests) are kept.
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
                return Poll::Ready(Err(HeadError::ClientGone));
            }
        }
        self.timer.poll_expired(cx).map(|()| {
            Err(HeadError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                "the homeserver did not answer in time",
            )))
        })
    }

    /// Writes the answer head (already in `self.out`) and relays the body.
    /// `Ok(true)`: the homeserver connection can be used again.
    pub(super) async fn relay(
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
                let clean = self.relay_length(upstream, leftover, len).await?;
                Ok(reusable && clean)
            }
            Framing::Chunked => {
                let clean = self.relay_chunked(upstream, leftover).await?;
                Ok(reusable && clean)
            }
            Framing::UntilClose => self.relay_until_close(upstream, leftover).await,
        }
    }

    /// Relays a body of `len` bytes, of which `ubuf[leftover]` came with
    /// the head. `Ok(true)`: nothing followed the body.
    async fn relay_length(
        &mut self,
        upstream: &mut TcpStream,
        leftover: Range<usize>,
        len: u64,
    ) -> io::Result<bool> {
        let here = leftover.len() as u64;
        if here >= len {
            let end = leftover.start + len as usize;
            self.out.extend_from_slice(&self.ubuf[leftover.start..end]);
            self.client.write_all(&self.out).await?;
            return Ok(here == len);
        }
        self.out.extend_from_slice(&self.ubuf[leftover]);
        self.client.write_all(&self.out).await?;
        let mut left = len - here;
        if left >= SPLICE_FROM {
            match splice_exact(upstream, self.client, left, None, &mut self.timer).await {
                Ok(Spliced::Whole) => return Ok(true),
                Ok(Spliced::Unavailable) => {}
                Err(Failure::SourceEnded) => return Err(cut_short()),
                Err(Failure::Source(error) | Failure::Sink(error)) => return Err(error),
                Err(Failure::SourceIdle) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the homeserver paused its answer too long",
                    ))
                }
            }
        }
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
        Ok(true)
    }
}

/// What an answer's headers say about its framing and the connection.
struct Scan<'h> {
    length: Option<u64>,
    chunked: bool,
    upstream_close: bool,
    /// Headers named in `Connection`: hop-by-hop, not passed on.
    named: Vec<&'h [u8]>,
    date: bool,
}

/// Parses an answer head from `buf`; a final answer's head as the client
/// receives it (without its framing headers and the final empty line) is
/// written to `out`.
pub(super) fn parse_response(
    buf: &[u8],
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, &'static str> {
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
            status: code,
            len,
            interim: true,
            body: Framing::None,
            upstream_close: false,
            leftover: 0..0,
        }));
    }
    let scan = scan_headers(response.headers, response.version == Some(0))?;
    let body = if code == 204 || code == 304 {
        Framing::None
    } else if scan.chunked {
        Framing::Chunked
    } else if let Some(len) = scan.length {
        Framing::Length(len)
    } else {
        Framing::UntilClose
    };
    write_head(
        out,
        code,
        response.reason.unwrap_or(""),
        response.headers,
        &scan,
    );
    Ok(Some(ResponseHead {
        status: code,
        len,
        interim: false,
        body,
        upstream_close: scan.upstream_close,
        leftover: 0..0,
    }))
}

/// Reads the framing and connection headers of an answer (`http10`: an
/// HTTP/1.0 one, which closes its connection).
fn scan_headers<'h>(
    headers: &[httparse::Header<'h>],
    http10: bool,
) -> Result<Scan<'h>, &'static str> {
    let mut scan = Scan {
        length: None,
        chunked: false,
        upstream_close: http10,
        named: Vec::new(),
        date: false,
    };
    let mut other_encoding = false;
    for header in headers {
        let name = header.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let value = parse_length(header.value).ok_or("an invalid Content-Length")?;
            if scan.length.is_some_and(|l| l != value) {
                return Err("conflicting Content-Length headers");
            }
            scan.length = Some(value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            for coding in header.value.split(|&b| b == b',') {
                let coding = coding.trim_ascii();
                if coding.eq_ignore_ascii_case(b"chunked") {
                    scan.chunked = true;
                } else if !coding.is_empty() {
                    other_encoding = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in header.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    scan.upstream_close = true;
                } else if !token.is_empty()
                    && !token.eq_ignore_ascii_case(b"keep-alive")
                    // The body is relayed by this length: the client needs it.
                    && !token.eq_ignore_ascii_case(b"content-length")
                {
                    scan.named.push(token);
                }
            }
        } else if name.eq_ignore_ascii_case(b"date") {
            scan.date = true;
        }
    }
    if other_encoding {
        return Err("a transfer coding other than chunked");
    }
    Ok(scan)
}

/// Writes the head the client receives, without the framing headers and
/// the final empty line.
fn write_head(
    out: &mut Vec<u8>,
    code: u16,
    reason: &str,
    headers: &[httparse::Header<'_>],
    scan: &Scan<'_>,
) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    let mut code_text = [0u8; 3];
    code_text[0] = b'0' + (code / 100 % 10) as u8;
    code_text[1] = b'0' + (code / 10 % 10) as u8;
    code_text[2] = b'0' + (code % 10) as u8;
    out.extend_from_slice(&code_text);
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    for header in headers {
        let name = header.name.as_bytes();
        if response_hop_by_hop(name)
            || scan.named.iter().any(|n| n.eq_ignore_ascii_case(name))
            // Transfer-Encoding overrides Content-Length; never send both on.
            || (scan.chunked && name.eq_ignore_ascii_case(b"content-length"))
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(header.value);
        out.extend_from_slice(b"\r\n");
    }
    if !scan.date {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&http_date());
        out.extend_from_slice(b"\r\n");
    }
}

pub(super) fn response_hop_by_hop(name: &[u8]) -> bool {
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

/// Writes a Matrix error of the gate's own, a whole answer, to `out`;
/// unless `keep`, it says the connection closes.
pub(super) fn write_error(out: &mut Vec<u8>, answer: MatrixError, keep: bool) {
    let body = answer.body();
    let response = answer.into_response();
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(response.status().as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        response
            .status()
            .canonical_reason()
            .unwrap_or("")
            .as_bytes(),
    );
    out.extend_from_slice(b"\r\n");
    for (name, value) in response.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\ndate: ");
    out.extend_from_slice(&http_date());
    out.extend_from_slice(if keep {
        b"\r\n\r\n".as_slice()
    } else {
        b"\r\nconnection: close\r\n\r\n".as_slice()
    });
    out.extend_from_slice(&body);
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_content_length_named_in_connection_still_frames_the_answer() {
        let (head, out) =
            head_of(b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\n")
                .unwrap()
                .unwrap();
        assert_eq!(head.body, Framing::Length(5));
        assert!(out.contains("Content-Length: 5\r\n"), "{out}");
    }
}
