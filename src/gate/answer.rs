//! How the gate answers a request it does not forward ([`Stop`]): a Matrix
//! JSON error on the client API's routes, and on the SSO username picker
//! what its page and script show a person (see [`super::policy::sso`]).

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use super::policy::sso;
use super::{GuardedRoute, Refusal, RequestedName};
use crate::error::json_response;
use crate::ratelimit::Limited;
use crate::telemetry::Outcome;

/// Why a request is not forwarded as the gate wrote it.
pub(super) enum Stop {
    Refuse(Refusal),
    Limit(Limited),
}

impl Stop {
    pub(super) fn outcome(&self) -> Outcome {
        match self {
            Stop::Refuse(_) => Outcome::Refused,
            Stop::Limit(_) => Outcome::RateLimited,
        }
    }

    pub(super) fn rule(&self) -> &'static str {
        match self {
            Stop::Refuse(refusal) => refusal.rule,
            Stop::Limit(limited) => limited.limit.name(),
        }
    }

    /// The list file a refusal came from, for the audit line.
    pub(super) fn list(&self) -> Option<Arc<str>> {
        match self {
            Stop::Refuse(refusal) => refusal.list.clone(),
            Stop::Limit(_) => None,
        }
    }

    /// The username a refusal names, for the audit line.
    pub(super) fn username(&self) -> Option<RequestedName> {
        match self {
            Stop::Refuse(refusal) => refusal.username.as_deref().cloned(),
            Stop::Limit(_) => None,
        }
    }

    /// The answer on `route`: the picker's form gets a page, its check
    /// a `200` "not available" for a refused name; everything else the
    /// Matrix error (or `429`).
    pub(super) fn into_response(self, route: GuardedRoute) -> Response<Full<Bytes>> {
        match (self, route) {
            (Stop::Refuse(refusal), GuardedRoute::PickUsername) => {
                sso::page(refusal.error.status, &refusal.error.error, None)
            }
            (Stop::Limit(limited), GuardedRoute::PickUsername) => sso::page(
                http::StatusCode::TOO_MANY_REQUESTS,
                "Too many attempts from your network. Please try again later.",
                Some(limited.retry_after_secs()),
            ),
            (Stop::Refuse(refusal), GuardedRoute::PickUsernameCheck)
                if refusal.username.is_some() =>
            {
                sso::unavailable(&refusal.error)
            }
            (Stop::Refuse(refusal), _) => refusal.error.into_response(),
            (Stop::Limit(limited), _) => limit_exceeded(limited),
        }
    }
}

/// The `429 M_LIMIT_EXCEEDED` answer to a request over a limit, with
/// `retry_after_ms` and `Retry-After` (whole seconds, rounded up).
pub(crate) fn limit_exceeded(limited: Limited) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "errcode": "M_LIMIT_EXCEEDED",
        "error": "Too many requests",
        "retry_after_ms": limited.retry_after_ms(),
    });
    let mut response = json_response(StatusCode::TOO_MANY_REQUESTS, Bytes::from(body.to_string()));
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(limited.retry_after_secs()),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ratelimit::LimitKind;

    #[test]
    fn limited_answer_is_the_spec_429() {
        let response = limit_exceeded(Limited {
            limit: LimitKind::RegistrationsPerIp,
            retry_after: Duration::from_millis(1500),
        });
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "2");
        assert_eq!(response.headers()["content-type"], "application/json");
    }
}
