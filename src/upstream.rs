//! The pooled client to the homeserver.
//!
//! [`Upstream`] is a tower service that sends a request to the homeserver and
//! streams the answer back. On the way it removes hop-by-hop headers (also
//! those named in `Connection`), replaces every client-supplied forwarding
//! header with the address the gate resolved, and turns transport failures
//! into Matrix answers: `502` when the homeserver cannot be reached, `504`
//! when it does not answer in time. It never returns an error.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use http_body::Body;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::Service;

use crate::client_ip::{ClientAddress, ForwardedProto};
use crate::config::UpstreamConfig;
use crate::error::MatrixError;
use crate::gate::BoxError;
use crate::telemetry::{Metrics, UpstreamError};

/// The body of an upstream answer: the homeserver's, streamed, or the
/// gate's own `502`/`504`.
pub type UpstreamBody = Either<Incoming, Full<Bytes>>;

/// Headers that name a client address; a client must not choose what the
/// homeserver believes.
const CLIENT_ADDRESS_HEADERS: [HeaderName; 7] = [
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("x-forwarded-host"),
];

/// Hop-by-hop headers (RFC 9110 section 7.6.1, plus the old `Keep-Alive` family).
const HOP_BY_HOP: [HeaderName; 9] = [
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

/// A pooled HTTP/1.1 client to the homeserver, as a tower service.
#[derive(Debug)]
pub struct Upstream<B> {
    client: Client<HttpConnector, B>,
    scheme: Scheme,
    authority: Authority,
    base_path: String,
    response_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl<B> Clone for Upstream<B> {
    fn clone(&self) -> Self {
        Upstream {
            client: self.client.clone(),
            scheme: self.scheme.clone(),
            authority: self.authority.clone(),
            base_path: self.base_path.clone(),
            response_timeout: self.response_timeout,
            metrics: self.metrics.clone(),
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

    /// A client that counts its failures into `metrics`.
    pub fn with_metrics(config: &UpstreamConfig, metrics: Arc<Metrics>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout.0));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(config.pool_idle_timeout.0)
            .build(connector);
        let url = &config.url;
        Upstream {
            client,
            scheme: url.scheme().cloned().unwrap_or(Scheme::HTTP),
            authority: url
                .authority()
                .cloned()
                .unwrap_or_else(|| Authority::from_static("127.0.0.1:8008")),
            base_path: url.path().trim_end_matches('/').to_owned(),
            response_timeout: config.response_timeout.0,
            metrics,
        }
    }
}

impl<B> Service<Request<B>> for Upstream<B>
where
    B: Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<UpstreamBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let request = match self.prepare(request) {
            Ok(request) => request,
            Err(error) => {
                return Box::pin(std::future::ready(Ok(error
                    .into_response()
                    .map(Either::Right))))
            }
        };
        let pending = self.client.request(request);
        let timeout = self.response_timeout;
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let response = match tokio::time::timeout(timeout, pending).await {
                Ok(Ok(response)) => response,
                Ok(Err(error)) => return Ok(failure_response(&error, &metrics)),
                Err(_) => {
                    metrics.upstream_error(UpstreamError::Timeout);
                    tracing::warn!(?timeout, "homeserver did not answer in time");
                    return Ok(MatrixError::gateway_timeout()
                        .into_response()
                        .map(Either::Right));
                }
            };
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Ok(Response::from_parts(parts, Either::Left(body)))
        })
    }
}

impl<B> Upstream<B> {
    /// Rewrites a client request into the request the homeserver receives.
    fn prepare(&self, request: Request<B>) -> Result<Request<B>, MatrixError> {
        let (mut parts, body) = request.into_parts();
        let forwarded_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let target = match (self.base_path.is_empty(), parts.uri.path_and_query()) {
            // The common case: the path as the client sent it, not parsed again.
            (true, Some(path)) => path.clone(),
            (_, path) => {
                let path = path.map(PathAndQuery::as_str).unwrap_or("/");
                PathAndQuery::try_from(format!("{}{path}", self.base_path)).map_err(|_| {
                    MatrixError::invalid_param("The request path cannot be forwarded.")
                })?
            }
        };
        parts.uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(target)
            .build()
            .map_err(|_| MatrixError::invalid_param("The request path cannot be forwarded."))?;

        let chunked = parts.headers.contains_key(header::TRANSFER_ENCODING);
        strip_hop_by_hop(&mut parts.headers);
        if chunked {
            // Transfer-Encoding overrides Content-Length; never send both on.
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        for name in &CLIENT_ADDRESS_HEADERS {
            parts.headers.remove(name);
        }
        if let Some(ClientAddress(ip)) = parts.extensions.get::<ClientAddress>() {
            if let Ok(value) = HeaderValue::from_str(&ip.to_string()) {
                parts.headers.insert(X_FORWARDED_FOR, value);
            }
        }
        let proto = parts
            .extensions
            .get::<ForwardedProto>()
            .map_or("http", |p| p.0);
        parts
            .headers
            .insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        if let Some(host) = forwarded_host {
            if !parts.headers.contains_key(header::HOST) {
                parts.headers.insert(header::HOST, host.clone());
            }
            parts.headers.insert(X_FORWARDED_HOST, host);
        }
        // The pool speaks HTTP/1.1 to the homeserver whatever the client spoke.
        parts.version = Version::HTTP_11;
        Ok(Request::from_parts(parts, body))
    }
}

/// Removes hop-by-hop headers, including every header `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

fn failure_response(
    error: &hyper_util::client::legacy::Error,
    metrics: &Metrics,
) -> Response<UpstreamBody> {
    let timed_out = source_chain(error).any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    });
    let answer = if timed_out {
        metrics.upstream_error(UpstreamError::Timeout);
        tracing::warn!(error = %DisplayChain(error), "homeserver connection timed out");
        MatrixError::gateway_timeout()
    } else {
        metrics.upstream_error(UpstreamError::Connect);
        tracing::warn!(error = %DisplayChain(error), "homeserver request failed");
        MatrixError::bad_gateway()
    };
    answer.into_response().map(Either::Right)
}

fn source_chain<'a>(
    error: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(error), |e: &&'a (dyn StdError + 'static)| {
        (*e).source()
    })
}

struct DisplayChain<'a>(&'a (dyn StdError + 'static));

impl std::fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for e in source_chain(self.0) {
            if !first {
                f.write_str(": ")?;
            }
            first = false;
            write!(f, "{e}")?;
        }
        Ok(())
    }
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
}
