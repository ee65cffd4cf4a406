//! The request head: whether this path takes it, and the head the
//! homeserver receives instead.

use std::future::Future;
use std::net::IpAddr;

use super::Conn;
use crate::gate::{routes, RegistrationGateLayer};
use crate::upstream::write_ip;

/// Request headers parsed here at most; more go to the full stack.
const MAX_HEADERS: usize = 64;

/// What a parsed request head asks for.
pub(super) struct Plan {
    pub(super) head_len: usize,
    pub(super) body_len: u64,
    pub(super) head: bool,
    pub(super) client_close: bool,
    /// Safe to send again on another connection if a reused one turns out
    /// closed before any answer byte.
    pub(super) replayable: bool,
}

pub(super) enum Parsed {
    Plan(Plan),
    NeedMore,
    Handoff,
}

/// What the request headers said, besides what is passed on as it came.
#[derive(Default)]
struct Seen<'h> {
    host: Option<&'h [u8]>,
    body_len: Option<u64>,
    client_close: bool,
    /// `X-Forwarded-For` or `-Proto` came: a trusted proxy's say.
    forwarding: bool,
}

impl<F: Future> Conn<'_, F> {
    /// Parses the head at `buf[start..end]` and, when this path takes it,
    /// writes the head the homeserver receives into `self.request`.
    pub(super) fn parse(&mut self) -> Parsed {
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
        let Some(seen) = pass_headers(req.headers, out) else {
            return Parsed::Handoff;
        };
        let Some(host) = seen.host else {
            return Parsed::Handoff;
        };
        let (client, proto) = client_of(
            &self.fast.gate,
            self.peer.ip(),
            seen.forwarding,
            req.headers,
        );
        out.extend_from_slice(b"x-forwarded-for: ");
        write_ip(client, out);
        out.extend_from_slice(b"\r\nx-forwarded-proto: ");
        out.extend_from_slice(proto.as_bytes());
        out.extend_from_slice(b"\r\nx-forwarded-host: ");
        out.extend_from_slice(host);
        out.extend_from_slice(b"\r\n\r\n");

        let body_len = seen.body_len.unwrap_or(0);
        Parsed::Plan(Plan {
            head_len,
            body_len,
            head: method == "HEAD",
            client_close: seen.client_close,
            replayable: body_len == 0
                && matches!(method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE"),
        })
    }
}

/// Writes the end-to-end headers to `out` and notes the others; `None`
/// when only the full stack serves the request.
fn pass_headers<'h>(headers: &[httparse::Header<'h>], out: &mut Vec<u8>) -> Option<Seen<'h>> {
    let mut seen = Seen::default();
    for header in headers {
        let name = header.name.as_bytes();
        let value = header.value;
        match request_header(name) {
            RequestHeader::EndToEnd => {}
            RequestHeader::Host => {
                if seen.host.replace(value).is_some() {
                    return None;
                }
            }
            RequestHeader::ContentLength => {
                if seen.body_len.is_some() {
                    return None;
                }
                seen.body_len = Some(parse_length(value)?);
            }
            RequestHeader::Connection => {
                let value = value.trim_ascii();
                if value.eq_ignore_ascii_case(b"close") {
                    seen.client_close = true;
                } else if !value.eq_ignore_ascii_case(b"keep-alive") {
                    return None;
                }
                continue;
            }
            RequestHeader::Refuse => return None,
            RequestHeader::Forwarding => {
                seen.forwarding = true;
                continue;
            }
            RequestHeader::Drop => continue,
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    Some(seen)
}

/// Who the client is and the scheme it used: the peer over plain HTTP, or
/// what a trusted proxy says.
fn client_of(
    gate: &RegistrationGateLayer,
    peer: IpAddr,
    forwarding: bool,
    headers: &[httparse::Header<'_>],
) -> (IpAddr, &'static str) {
    if !forwarding {
        return (peer.to_canonical(), "http");
    }
    let values = |name: &'static str| {
        headers
            .iter()
            .filter(move |header| header.name.eq_ignore_ascii_case(name))
            .map(|header| header.value)
    };
    gate.with_resolver(|resolver| {
        let client = resolver.resolve_from(peer, values("x-forwarded-for"));
        let proto = resolver.forwarded_proto_from(peer, values("x-forwarded-proto").next());
        (client.0, proto.map_or("http", |p| p.0))
    })
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
pub(super) fn parse_length(value: &[u8]) -> Option<u64> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fast_path::response::response_hop_by_hop;

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
}
