//! The pooled client to the homeserver.
//!
//! [`Upstream`] is a tower service that sends a request to the homeserver and
//! streams the answer back. On the way it removes hop-by-hop headers (also
//! those named in `Connection`), replaces every client-supplied forwarding
//! header with the address the gate resolved, and turns transport failures
//! into Matrix answers: `502` when the homeserver cannot be reached, `504`
//! when it does not answer in time. It never returns an error.
//!
//! Requests no reading of which can be forwarded (`CONNECT`, two `Host`
//! headers) are refused before anything is sent. Answers the gate cannot
//! relay as they are — an upgrade it did not ask for, a transfer coding other
//! than chunked — are a `502`, as on the fast path. A request body that fails
//! on the client's side (it ends early, or breaks its chunked framing) is the
//! client's fault: a `400`, not counted as a homeserver error.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use pin_project_lite::pin_project;
use tower::Service;

use crate::client_ip::{ClientAddress, ForwardedProto};
use crate::config::{ServerConfig, UpstreamConfig};
use crate::error::{source_chain, ErrorChain, MatrixError};
use crate::gate::BoxError;
use crate::telemetry::{Metrics, UpstreamError};

pub mod identify;
pub(crate) mod idle;
pub(crate) mod pool;

use pool::Pool;
pub use pool::{PooledBody, SendError};

/// The body of an upstream answer: the homeserver's, streamed, or the
/// gate's own `502`/`504`.
pub type UpstreamBody<B> = Either<PooledBody<ClientBody<B>>, Full<Bytes>>;

/// Headers that name a client address; a client must not choose what the
/// homeserver believes.
pub(crate) const CLIENT_ADDRESS_HEADERS: [HeaderName; 7] = [
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("x-forwarded-host"),
];

/// Hop-by-hop headers (RFC 9110 section 7.6.1, plus the old `Keep-Alive` family).
pub(crate) const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// A pooled HTTP/1.1 client to the homeserver, as a tower service. Clones
/// share one pool (and cost one reference count).
#[derive(Debug)]
pub struct Upstream<B> {
    inner: Arc<Inner<B>>,
}

#[derive(Debug)]
struct Inner<B> {
    pool: Pool<ClientBody<B>>,
    /// `Host` for requests that came without one.
    default_host: HeaderValue,
    base_path: String,
    response_timeout: Duration,
    /// How long the client's body may pause before the request is given up.
    upload_idle_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl<B> Clone for Upstream<B> {
    fn clone(&self) -> Self {
        Upstream {
            inner: self.inner.clone(),
        }
    }
}

impl<B> Upstream<B>
where
    B: Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A client for the homeserver at `config.url`.
    pub fn new(config: &UpstreamConfig) -> Self {
        Self::with_metrics(config, Arc::default())
    }

    /// A client that counts its failures into `metrics`, with the default
    /// `server.upload_idle_timeout`.
    pub fn with_metrics(config: &UpstreamConfig, metrics: Arc<Metrics>) -> Self {
        let idle = ServerConfig::default().upload_idle_timeout.0;
        Self::with_upload_idle_timeout(config, idle, metrics)
    }

    /// A client that counts its failures into `metrics` and gives up on a
    /// request whose body pauses for longer than `upload_idle_timeout`.
    pub fn with_upload_idle_timeout(
        config: &UpstreamConfig,
        upload_idle_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let url = &config.url;
        let authority = url
            .authority()
            .cloned()
            .unwrap_or_else(|| Authority::from_static("127.0.0.1:8008"));
        let port = authority.port_u16().unwrap_or(80);
        let pool = Pool::new(
            authority.host(),
            port,
            config.connect_timeout.0,
            config.pool_idle_timeout.0,
        );
        // Host and a non-default port, never userinfo.
        let default_host = match authority.port_u16() {
            Some(port) if port != 80 => format!("{}:{port}", authority.host()),
            _ => authority.host().to_owned(),
        };
        let default_host = HeaderValue::from_str(&default_host)
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Upstream {
            inner: Arc::new(Inner {
                pool,
                default_host,
                base_path: url.path().trim_end_matches('/').to_owned(),
                response_timeout: config.response_timeout.0,
                upload_idle_timeout,
                metrics,
            }),
        }
    }
}

impl<B> Service<Request<B>> for Upstream<B>
where
    B: Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<UpstreamBody<B>>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let request = match self.inner.prepare(request) {
            Ok(request) => request,
            Err(error) => {
                return Box::pin(std::future::ready(Ok(error
                    .into_response()
                    .map(Either::Right))))
            }
        };
        let inner = self.inner.clone();
        Box::pin(async move {
            let timeout = inner.response_timeout;
            let metrics = &inner.metrics;
            let idle = inner.upload_idle_timeout;
            let request = request.map(|body| ClientBody::new(body, idle));
            let response = match tokio::time::timeout(timeout, inner.pool.send(request)).await {
                Ok(Ok(response)) => response,
                Ok(Err(error)) => return Ok(failure_response(&error, metrics)),
                Err(_) => {
                    let error = format!("no answer within {timeout:?}");
                    return Ok(failure_answer(true, &error, metrics)
                        .into_response()
                        .map(Either::Right));
                }
            };
            let (mut parts, body) = response.into_parts();
            metrics.upstream_response(parts.status.as_u16());
            let unrelayable = if parts.status == StatusCode::SWITCHING_PROTOCOLS {
                Some(UnrelayableAnswer::Upgrade)
            } else if strip_headers(&mut parts.headers, false) {
                None
            } else {
                Some(UnrelayableAnswer::TransferCoding)
            };
            if let Some(error) = unrelayable {
                // The homeserver connection is closed with the body.
                return Ok(failure_answer(false, &error, metrics)
                    .into_response()
                    .map(Either::Right));
            }
            Ok(Response::from_parts(parts, Either::Left(body)))
        })
    }
}

impl<B> Inner<B> {
    /// Rewrites a client request into the request the homeserver receives.
    fn prepare(&self, request: Request<B>) -> Result<Request<B>, MatrixError> {
        let (mut parts, body) = request.into_parts();
        if let Some(refusal) = unforwardable(&parts.method, &parts.headers) {
            return Err(refusal);
        }
        let forwarded_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let origin_form = parts.uri.scheme().is_none() && parts.uri.authority().is_none();
        if !(origin_form && self.base_path.is_empty() && parts.uri.path_and_query().is_some()) {
            // The common case above keeps the path as the client sent it,
            // not parsed again; HTTP/2 requests (absolute URIs) and a
            // homeserver under a base path get origin-form here.
            let path = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
            let target = if self.base_path.is_empty() {
                PathAndQuery::try_from(path)
            } else {
                PathAndQuery::try_from(format!("{}{path}", self.base_path))
            };
            parts.uri = Uri::from(target.map_err(|_| {
                MatrixError::invalid_param("The request path cannot be forwarded.")
            })?);
        }

        strip_headers(&mut parts.headers, true);
        // Room for the forwarding headers at once: the map hyper parsed is
        // sized to the client's headers, and growing it one insert at a time
        // costs more than the inserts.
        parts.headers.reserve(4);
        if let Some(ClientAddress(ip)) = parts.extensions.get::<ClientAddress>() {
            parts.headers.insert(X_FORWARDED_FOR, ip_header_value(*ip));
        }
        let proto = parts
            .extensions
            .get::<ForwardedProto>()
            .map_or("http", |p| p.0);
        parts
            .headers
            .insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        match forwarded_host {
            Some(host) => {
                if !parts.headers.contains_key(header::HOST) {
                    parts.headers.insert(header::HOST, host.clone());
                }
                parts.headers.insert(X_FORWARDED_HOST, host);
            }
            // HTTP/1.0 without Host: name the homeserver.
            None => {
                parts
                    .headers
                    .insert(header::HOST, self.default_host.clone());
            }
        }
        // The pool speaks HTTP/1.1 to the homeserver whatever the client spoke.
        parts.version = Version::HTTP_11;
        Ok(Request::from_parts(parts, body))
    }
}

/// Why a request is refused before the gate or the homeserver sees it:
/// `CONNECT` (the gate opens no tunnels, and a `2xx` would turn the
/// connection into one), more than one `Host` (the gate and the homeserver
/// could each take a different one), or a transfer coding other than
/// chunked (`Transfer-Encoding: gzip, chunked`): the HTTP stack undoes the
/// chunked framing only, and the body would reach the homeserver still
/// coded but with nothing saying so (RFC 9112 section 6.1: `501`).
pub(crate) fn unforwardable(method: &Method, headers: &HeaderMap) -> Option<MatrixError> {
    if method == Method::CONNECT {
        return Some(MatrixError::connect_not_allowed());
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    if hosts.next().is_some() && hosts.next().is_some() {
        return Some(MatrixError::bad_request(
            "The request has more than one Host header.",
        ));
    }
    if let Some(coding) = foreign_transfer_coding(headers) {
        return Some(MatrixError::transfer_coding_not_supported(
            &String::from_utf8_lossy(coding),
        ));
    }
    None
}

/// The first transfer coding other than `chunked` that the
/// `Transfer-Encoding` headers of a request or an answer name, as written.
fn foreign_transfer_coding(headers: &HeaderMap) -> Option<&[u8]> {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .find(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(b"chunked"))
}

/// An answer the gate does not relay.
#[derive(Debug, thiserror::Error)]
enum UnrelayableAnswer {
    /// A `101`: the gate never asks for an upgrade.
    #[error("the homeserver switched protocols unasked")]
    Upgrade,
    /// The body would reach the client without a coding it was sent with.
    #[error("a transfer coding other than chunked")]
    TransferCoding,
}

/// Removes hop-by-hop headers, including every header `Connection` names,
/// and a `Content-Length` that `Transfer-Encoding` overrides.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip_headers(headers, false);
}

/// Removes hop-by-hop headers (and with `client_address`, every header
/// naming a client address) in one pass over the names present; nothing is
/// hashed unless something is to go. A `Content-Length` goes with a
/// `Transfer-Encoding` (RFC 9112 section 6.3: the body was framed by the
/// latter). Returns `false` when `Transfer-Encoding` named a coding other
/// than chunked, which is lost with the header.
fn strip_headers(headers: &mut HeaderMap, client_address: bool) -> bool {
    let mut doomed: Vec<HeaderName> = Vec::new();
    let mut connection = false;
    let mut chunked = false;
    for name in headers.keys() {
        if name == header::CONNECTION {
            connection = true;
        }
        if name == header::TRANSFER_ENCODING {
            chunked = true;
        }
        if HOP_BY_HOP.contains(name) || (client_address && CLIENT_ADDRESS_HEADERS.contains(name)) {
            doomed.push(name.clone());
        }
    }
    if doomed.is_empty() {
        return true;
    }
    let only_chunked = !chunked || foreign_transfer_coding(headers).is_none();
    if connection {
        doomed.extend(
            headers
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok()),
        );
    }
    if chunked {
        // Transfer-Encoding overrides Content-Length; never send both on.
        doomed.push(header::CONTENT_LENGTH);
    }
    for name in doomed {
        headers.remove(name);
    }
    only_chunked
}

/// A failure of the client's request body: it ended before it was
/// complete, broke its framing, or paused for longer than
/// `server.upload_idle_timeout`. The client's doing, not the homeserver's.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body failed")]
pub struct ClientBodyError(#[source] BoxError);

/// The client's body paused for longer than `server.upload_idle_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("no part of the request body arrived within {0:?}")]
pub struct UploadStalled(pub Duration);

pin_project! {
    /// The client's request body on its way to the homeserver: its failures
    /// are marked as [`ClientBodyError`]s, so that they can be told from the
    /// homeserver's, and a body that pauses for longer than its idle timeout
    /// fails (the homeserver connection it holds is then freed).
    #[derive(Debug)]
    pub struct ClientBody<B> {
        #[pin]
        body: B,
        idle: Duration,
        // Armed when the body first waits; reset when it waits again after
        // a frame, so a steady upload costs no timer work per frame.
        stall: Option<Pin<Box<tokio::time::Sleep>>>,
        progressed: bool,
    }
}

impl<B> ClientBody<B> {
    /// `body`, failing once it pauses for longer than `idle`.
    pub fn new(body: B, idle: Duration) -> Self {
        ClientBody {
            body,
            idle,
            stall: None,
            progressed: false,
        }
    }
}

impl<B> Body for ClientBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        match this.body.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.progressed = true;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(ClientBodyError(error.into())))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let deadline = tokio::time::Instant::now() + *this.idle;
                match this.stall {
                    None => *this.stall = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    Some(stall) if *this.progressed => stall.as_mut().reset(deadline),
                    Some(_) => {}
                }
                *this.progressed = false;
                match this.stall.as_mut().map(|stall| stall.as_mut().poll(cx)) {
                    Some(Poll::Ready(())) => Poll::Ready(Some(Err(ClientBodyError(Box::new(
                        UploadStalled(*this.idle),
                    ))))),
                    _ => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// An address as a header value.
fn ip_header_value(ip: std::net::IpAddr) -> HeaderValue {
    let mut buffer = [0u8; 48];
    let len = format_ip(ip, &mut buffer);
    HeaderValue::from_bytes(&buffer[..len]).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Appends an address, as a header value, to `out`.
pub(crate) fn write_ip(ip: std::net::IpAddr, out: &mut Vec<u8>) {
    let mut buffer = [0u8; 48];
    let len = format_ip(ip, &mut buffer);
    out.extend_from_slice(&buffer[..len]);
}

/// Writes an address into `buffer` and returns its length. IPv4 addresses,
/// the common case, are written by hand: `format!` costs more than the rest
/// of the header work.
fn format_ip(ip: std::net::IpAddr, buffer: &mut [u8; 48]) -> usize {
    match ip {
        std::net::IpAddr::V4(v4) => {
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buffer[len] = b'.';
                    len += 1;
                }
                if octet >= 100 {
                    buffer[len] = b'0' + octet / 100;
                    len += 1;
                }
                if octet >= 10 {
                    buffer[len] = b'0' + octet / 10 % 10;
                    len += 1;
                }
                buffer[len] = b'0' + octet % 10;
                len += 1;
            }
            len
        }
        std::net::IpAddr::V6(v6) => {
            use std::io::Write;
            let mut cursor = std::io::Cursor::new(&mut buffer[..]);
            // 48 bytes hold any IPv6 address (at most 45 characters).
            let _ = write!(cursor, "{v6}");
            usize::try_from(cursor.position()).unwrap_or(0)
        }
    }
}

fn failure_response<B>(error: &SendError, metrics: &Metrics) -> Response<UpstreamBody<B>> {
    if source_chain(error).any(|e| e.is::<ClientBodyError>()) {
        let stalled = source_chain(error).any(|e| e.is::<UploadStalled>());
        return client_body_failure(&ErrorChain(error), stalled)
            .into_response()
            .map(Either::Right);
    }
    let timed_out = source_chain(error).any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    });
    failure_answer(timed_out, &ErrorChain(error), metrics)
        .into_response()
        .map(Either::Right)
}

/// The answer to a homeserver that failed, counted and logged: `504` when
/// it timed out, `502` otherwise.
pub(crate) fn failure_answer(
    timed_out: bool,
    error: &dyn std::fmt::Display,
    metrics: &Metrics,
) -> MatrixError {
    if timed_out {
        metrics.upstream_error(UpstreamError::Timeout);
        tracing::warn!(%error, "homeserver did not answer in time");
        MatrixError::gateway_timeout()
    } else {
        metrics.upstream_error(UpstreamError::Connect);
        tracing::warn!(%error, "homeserver request failed");
        MatrixError::bad_gateway()
    }
}

/// The answer to a client whose request body failed: `400`, or `408` when
/// it stalled; logged as the client's doing, and not counted as a
/// homeserver error (any client could otherwise raise that count at will).
pub(crate) fn client_body_failure(error: &dyn std::fmt::Display, stalled: bool) -> MatrixError {
    if stalled {
        tracing::info!(%error, "client request body stalled; request abandoned");
        return MatrixError::request_timeout();
    }
    tracing::info!(%error, "client request body incomplete or malformed; request abandoned");
    MatrixError::incomplete_body()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-secret, keep-alive"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        let samples = [
            "0.0.0.0",
            "1.2.3.4",
            "9.10.99.100",
            "127.0.0.1",
            "203.0.113.255",
            "255.255.255.255",
            "::",
            "::1",
            "2001:db8::8a2e:370:7334",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:192.0.2.128",
        ];
        for sample in samples {
            let ip: std::net::IpAddr = sample.parse().unwrap();
            assert_eq!(ip_header_value(ip).to_str().unwrap(), ip.to_string());
        }
        for octet in 0..=255u8 {
            let ip = std::net::IpAddr::from([octet, 255 - octet, octet / 3, octet % 7]);
            assert_eq!(ip_header_value(ip).to_str().unwrap(), ip.to_string());
        }
    }
}
