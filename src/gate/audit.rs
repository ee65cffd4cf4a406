//! What the gate records of a registration decision: the audit line and
//! the decision metric ([`Audit`]), and for a request it lets through, the
//! settling of its reserved limits and the lockdown's count once the
//! homeserver has answered ([`Forwarded`]).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full, Limited};
use tower::Service;

use super::{
    mark, BoxError, GateRequestBody, GateResponseBody, GateState, GuardedRoute, RequestedName,
};
use crate::client_ip::ClientKey;
use crate::error::MatrixError;
use crate::telemetry::{Metrics, Outcome};

/// The one audit record of a registration decision.
pub(super) struct Audit {
    pub(super) route: GuardedRoute,
    pub(super) client: Option<IpAddr>,
    pub(super) key: ClientKey,
    pub(super) user_agent: Option<String>,
    pub(super) kind: Option<&'static str>,
    pub(super) username: Option<RequestedName>,
    pub(super) outcome: Outcome,
    pub(super) rule: &'static str,
    pub(super) status: Option<u16>,
    /// The list file that refused the request, if a list did.
    pub(super) list: Option<Arc<str>>,
    /// The DNSBL zone behind a `dnsbl` or `dnsbl_error` refusal.
    pub(super) dnsbl_zone: Option<Arc<str>>,
    /// The application service of a bridge's registration.
    pub(super) appservice: Option<Arc<str>>,
    /// Whether a DNSBL check failed (counted even when allowed).
    pub(super) dnsbl_failed: bool,
    /// The user ID the homeserver's `2xx` answer to a registration names:
    /// the account it made (or, for a UIA session it had completed before,
    /// gave again).
    pub(super) user_id: Option<String>,
    /// The client's network, when a network database knows it.
    pub(super) network: Option<crate::defences::networks::Network>,
}

/// Longest client-chosen text (a username, a user agent) an audit line
/// carries, in bytes.
const AUDIT_TEXT_MAX: usize = 300;

/// Client-chosen text made safe for a log line: control characters escaped
/// (`\n`, `\u{1b}`), cut to [`AUDIT_TEXT_MAX`] bytes on a character
/// boundary with `…` appended.
fn audit_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(AUDIT_TEXT_MAX) + 3);
    for c in text.chars() {
        let before = out.len();
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        if out.len() > AUDIT_TEXT_MAX {
            out.truncate(before);
            out.push('…');
            break;
        }
    }
    out
}

impl Audit {
    pub(super) fn emit(&self, metrics: &Metrics) {
        metrics.decision(self.route.name(), self.outcome, self.rule);
        if self.dnsbl_failed {
            metrics.dnsbl_error();
        }
        let mapped = self
            .username
            .as_ref()
            .and_then(|name| name.mapped.as_deref());
        // The name as sent, only where mapping changed it (or refused it).
        let sent = self
            .username
            .as_ref()
            .filter(|name| name.mapped.as_deref() != Some(name.sent.as_str()))
            .map(|name| audit_text(&name.sent));
        tracing::info!(
            target: "matrix_gatekeeper::audit",
            route = self.route.name(),
            client = self.client.map(|c| c.to_string()).as_deref().unwrap_or("-"),
            key = %self.key,
            user_agent = self.user_agent.as_deref().map(audit_text).as_deref().unwrap_or("-"),
            kind = self.kind.unwrap_or("-"),
            username = mapped.map(audit_text).as_deref().unwrap_or("-"),
            username_sent = sent.as_deref(),
            decision = self.outcome.as_str(),
            rule = self.rule,
            upstream_status = self.status.unwrap_or(0),
            list = self.list.as_deref(),
            dnsbl_zone = self.dnsbl_zone.as_deref(),
            appservice = self.appservice.as_deref(),
            user_id = self.user_id.as_deref().map(audit_text).as_deref(),
            asn = self.network.as_ref().and_then(|n| n.asn),
            as_name = self.network.as_ref().and_then(|n| n.as_name.as_deref()).map(audit_text).as_deref(),
            country = self.network.as_ref().and_then(|n| n.country).as_ref().map(|c| c.as_str()),
            "registration decision"
        );
    }
}

/// A request the gate lets through, and what is to be recorded once the
/// homeserver has answered it.
pub(super) struct Forwarded {
    pub(super) state: Arc<GateState>,
    pub(super) metrics: Arc<Metrics>,
    /// The registration limits reserved for a `POST …/register`.
    pub(super) permit: Option<crate::ratelimit::Permit>,
    /// Whether a success is a completed user registration (the lockdown
    /// counts those; guests get numeric throw-away accounts and never close
    /// registration for everyone).
    pub(super) user_registration: bool,
    pub(super) audit: Audit,
}

impl Forwarded {
    /// Sends the request to the homeserver, then settles the limits, counts
    /// a completed user registration for the lockdown and writes the audit
    /// line.
    pub(super) async fn send<S, B, RB>(
        mut self,
        mut inner: S,
        request: Request<GateRequestBody<B>>,
    ) -> Result<Response<GateResponseBody<RB>>, S::Error>
    where
        S: Service<Request<GateRequestBody<B>>, Response = Response<RB>>,
        RB: Body<Data = Bytes>,
        RB::Error: Into<BoxError>,
    {
        let result = inner.call(request).await;
        // Synapse accepts an SSO username pick with a redirect to the next
        // step of sign-up, and answers every failure with a page.
        let success = matches!(&result, Ok(response) if match self.audit.route {
            GuardedRoute::PickUsername => super::policy::sso::accepted(response.status(), response.headers()),
            _ => response.status().is_success(),
        });
        if let Some(permit) = self.permit {
            permit.settle(success);
        }
        if success && self.user_registration {
            self.state.lockdown.record().await;
        }
        if let (true, Some(appservice)) = (success, &self.audit.appservice) {
            self.metrics.appservice_registration(appservice);
        }
        self.audit.status = result.as_ref().ok().map(|r| r.status().as_u16());
        let response = match result {
            Ok(response) if success && matches!(self.audit.route, GuardedRoute::Register(_)) => {
                let (response, user_id) = read_account(response).await;
                self.audit.user_id = user_id;
                response
            }
            other => other?.map(Either::Left),
        };
        self.audit.emit(&self.metrics);
        let outcome = self.audit.outcome;
        Ok(mark(response, outcome))
    }
}

/// Largest registration answer read for its `user_id`.
const MAX_ACCOUNT_ANSWER_BYTES: usize = 64 * 1024;

/// How long the body of a registration answer may take once its headers
/// have come.
const ACCOUNT_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads a successful registration answer whole (they are a few hundred
/// bytes) for the `user_id` the homeserver made, and hands the same bytes
/// on to the client. An answer too large, cut short or too slow is
/// `502`: the account may exist, and the audit line says the homeserver's
/// status.
async fn read_account<RB>(
    response: Response<RB>,
) -> (Response<GateResponseBody<RB>>, Option<String>)
where
    RB: Body<Data = Bytes>,
    RB::Error: Into<BoxError>,
{
    let (mut parts, body) = response.into_parts();
    let read = Limited::new(body, MAX_ACCOUNT_ANSWER_BYTES).collect();
    let Ok(Ok(collected)) = tokio::time::timeout(ACCOUNT_ANSWER_TIMEOUT, read).await else {
        tracing::warn!("the homeserver's answer to a registration could not be read whole");
        let refusal = MatrixError::new(
            http::StatusCode::BAD_GATEWAY,
            "M_UNKNOWN",
            "The homeserver's answer could not be read.",
        )
        .into_response();
        return (refusal.map(Either::Right), None);
    };
    let bytes = collected.to_bytes();
    let user_id = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|answer| answer.get("user_id")?.as_str().map(str::to_owned));
    parts.headers.remove(header::TRANSFER_ENCODING);
    (
        Response::from_parts(parts, Either::Right(Full::new(bytes))),
        user_id,
    )
}
