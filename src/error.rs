//! The one place where a refusal becomes a Matrix JSON response.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// A Matrix error the gate answers with: status, `errcode` and `error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatrixError {
    /// HTTP status of the answer.
    pub status: StatusCode,
    /// The Matrix `errcode` (`M_FORBIDDEN`, ...).
    pub errcode: &'static str,
    /// Human-readable explanation.
    pub error: String,
    /// The `Allow` header of a `405` answer.
    pub allow: Option<&'static str>,
}

impl MatrixError {
    /// A new error.
    pub fn new(status: StatusCode, errcode: &'static str, error: impl Into<String>) -> Self {
        MatrixError {
            status,
            errcode,
            error: error.into(),
            allow: None,
        }
    }

    /// `403 M_FORBIDDEN`
    pub fn forbidden(error: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", error)
    }

    /// `400 M_INVALID_USERNAME`
    pub fn invalid_username(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_INVALID_USERNAME", error)
    }

    /// `400 M_USER_IN_USE`
    pub fn user_in_use() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "M_USER_IN_USE",
            "User ID already taken.",
        )
    }

    /// `403 M_THREEPID_DENIED`
    pub fn threepid_denied(error: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "M_THREEPID_DENIED", error)
    }

    /// `400 M_BAD_JSON`
    pub fn bad_json(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", error)
    }

    /// `400 M_NOT_JSON`
    pub fn not_json(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_NOT_JSON", error)
    }

    /// `400 M_UNRECOGNIZED`
    pub fn unrecognized(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_UNRECOGNIZED", error)
    }

    /// `400 M_MISSING_PARAM`
    pub fn missing_param(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_MISSING_PARAM", error)
    }

    /// `400 M_INVALID_PARAM`
    pub fn invalid_param(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", error)
    }

    /// `413 M_TOO_LARGE`
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "M_TOO_LARGE",
            format!("Request body is larger than {limit} bytes."),
        )
    }

    /// `404 M_UNRECOGNIZED`: a registration path the gate does not serve.
    pub fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "M_UNRECOGNIZED",
            "Unrecognized request",
        )
    }

    /// `405 M_UNRECOGNIZED`, with the methods the endpoint allows.
    pub fn method_not_allowed(allow: &'static str) -> Self {
        MatrixError {
            allow: Some(allow),
            ..Self::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "M_UNRECOGNIZED",
                "Method not allowed on this endpoint",
            )
        }
    }

    /// `502 M_UNKNOWN`: the homeserver could not be reached.
    pub fn bad_gateway() -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "M_UNKNOWN",
            "The homeserver could not be reached.",
        )
    }

    /// `504 M_UNKNOWN`: the homeserver did not answer in time.
    pub fn gateway_timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "M_UNKNOWN",
            "The homeserver did not answer in time.",
        )
    }

    /// `400 M_UNKNOWN`: a request no reading of which the gate can forward.
    pub fn bad_request(error: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_UNKNOWN", error)
    }

    /// `400 M_UNKNOWN`: the client's body ended before it was complete, or
    /// broke its own framing.
    pub fn incomplete_body() -> Self {
        Self::bad_request("The request body was incomplete or malformed.")
    }

    /// `405 M_UNRECOGNIZED` for `CONNECT`: the gate opens no tunnels.
    pub fn connect_not_allowed() -> Self {
        MatrixError {
            allow: Some("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            ..Self::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "M_UNRECOGNIZED",
                "CONNECT is not supported.",
            )
        }
    }

    /// `501 M_UNRECOGNIZED`: the request body is sent with a transfer
    /// coding (`coding`, as the client named it) other than chunked.
    pub fn transfer_coding_not_supported(coding: &str) -> Self {
        let shown: String = coding.chars().take(40).collect();
        Self::new(
            StatusCode::NOT_IMPLEMENTED,
            "M_UNRECOGNIZED",
            format!("The transfer coding \"{shown}\" is not supported; send the body as it is, or chunked."),
        )
    }

    /// `408 M_UNKNOWN`: the client was too slow sending its body.
    pub fn request_timeout() -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "M_UNKNOWN",
            "The request body was not received in time.",
        )
    }

    /// The JSON body of this error.
    pub fn body(&self) -> Bytes {
        let value = serde_json::json!({ "errcode": self.errcode, "error": self.error });
        Bytes::from(value.to_string())
    }

    /// This error as an HTTP response: JSON, with the CORS headers every
    /// Matrix answer carries.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = json_response(self.status, self.body());
        if let Some(allow) = self.allow {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

/// A JSON answer of the gate's own, with `Content-Type: application/json`
/// and the CORS headers the spec asks of every client-server API answer (so
/// a browser client such as Element Web can read a refusal).
pub fn json_response(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PUT, DELETE, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("X-Requested-With, Content-Type, Authorization"),
    );
    response
}

impl std::fmt::Display for MatrixError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.errcode,
            self.error
        )
    }
}

/// `error` and every error below it, outermost first.
pub(crate) fn source_chain<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| e.source())
}

/// An error shown with its causes (`outer: inner: innermost`): hyper's
/// own text is generic ("client error (Connect)"), the reason is at the
/// end of the chain.
pub(crate) struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in source_chain(self.0).enumerate() {
            if i > 0 {
                f.write_str(": ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_carry_json_and_cors_headers_and_405_says_what_is_allowed() {
        let response = MatrixError::method_not_allowed("POST, OPTIONS").into_response();
        assert_eq!(response.status(), 405);
        let headers = response.headers();
        assert_eq!(headers["allow"], "POST, OPTIONS");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["access-control-allow-origin"], "*");
        assert!(headers.contains_key("access-control-allow-headers"));
        assert!(!MatrixError::forbidden("x")
            .into_response()
            .headers()
            .contains_key("allow"));
    }
}
