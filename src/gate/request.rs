//! The client's request as a guarded route reads it and the homeserver
//! receives it: the body read bounded and with a deadline, and the
//! canonical request the gate writes from its decision.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use http_body::Body;
use http_body_util::BodyExt;

use super::{BoxError, Forward, GateBody, GateRequestBody, GuardedRoute, Refusal};
use crate::error::MatrixError;

/// The client's body as far as the gate read it.
pub(super) enum ReadBody<B> {
    /// All of it.
    Complete(Bytes),
    /// More than the limit: what was read, and the rest (shadow mode
    /// forwards both).
    TooLarge(Bytes, B),
}

pub(super) fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

pub(super) fn body_error(detail: impl std::fmt::Display) -> Refusal {
    Refusal::new(
        "body_error",
        MatrixError::new(
            StatusCode::BAD_REQUEST,
            "M_UNKNOWN",
            format!("The request body could not be read: {detail}"),
        ),
    )
}

/// Reads a body, at most `limit` bytes, within `deadline`. Past the limit
/// it stops and hands back what it read and the unread rest.
pub(super) async fn read_body<B>(
    mut body: B,
    declared: Option<u64>,
    limit: usize,
    deadline: Duration,
) -> Result<ReadBody<B>, Refusal>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    if declared.is_some_and(|n| n > limit as u64) {
        return Ok(ReadBody::TooLarge(Bytes::new(), body));
    }
    let mut buffer = BytesMut::new();
    let reading = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| body_error(e.into()))?;
            if let Ok(data) = frame.into_data() {
                buffer.extend_from_slice(&data);
                if buffer.len() > limit {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    };
    match tokio::time::timeout(deadline, reading).await {
        Ok(Ok(false)) => Ok(ReadBody::Complete(buffer.freeze())),
        Ok(Ok(true)) => Ok(ReadBody::TooLarge(buffer.freeze(), body)),
        Ok(Err(refusal)) => Err(refusal),
        Err(_) => Err(Refusal::new("body_timeout", MatrixError::request_timeout())),
    }
}

/// Headers describing the client's body, which the canonical body replaces.
const BODY_HEADERS: [header::HeaderName; 5] = [
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::CONTENT_ENCODING,
    header::CONTENT_TYPE,
    header::EXPECT,
];

/// The request the homeserver receives: the client's head with the
/// decided path, query and body (a form on the SSO picker, else JSON).
pub(super) fn canonical_request<B>(
    parts: &http::request::Parts,
    route: GuardedRoute,
    forward: Forward,
) -> Result<Request<GateRequestBody<B>>, Refusal> {
    let uri = forward.path_and_query.parse::<Uri>().map_err(|_| {
        Refusal::new(
            "bad_query",
            MatrixError::invalid_param("The request could not be put in canonical form."),
        )
    })?;
    let bytes = forward.body.unwrap_or_default();
    let length = bytes.len();
    let mut request = Request::new(GateBody::canonical(bytes));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    *request.extensions_mut() = parts.extensions.clone();
    let headers = request.headers_mut();
    for name in BODY_HEADERS {
        headers.remove(name);
    }
    // HTTP/2 carries the host in the URI, which the canonical path drops:
    // keep it as the Host header the homeserver would have seen.
    if !headers.contains_key(header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                headers.insert(header::HOST, host);
            }
        }
    }
    // On a route that makes accounts the only credential forwarded is the
    // token the gate checked: a bridge's, however it came, as one Bearer
    // header (the query the gate wrote has none). A guest registration's
    // or a pick's token reaches no homeserver (Conduit lets a valid
    // `as_token` skip its registration checks).
    if matches!(
        route,
        GuardedRoute::Register(_) | GuardedRoute::PickUsername
    ) {
        headers.remove(header::AUTHORIZATION);
    }
    if let Some(grant) = &forward.appservice {
        let bearer = HeaderValue::from_str(&format!("Bearer {}", grant.token.0))
            .map_err(|_| super::policy::appservice::unknown_token())?;
        headers.insert(header::AUTHORIZATION, bearer);
    }
    if length > 0 || parts.method == Method::POST {
        let headers = request.headers_mut();
        let content_type = if route == GuardedRoute::PickUsername {
            "application/x-www-form-urlencoded"
        } else {
            "application/json"
        };
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    Ok(request)
}
