//! The registration gate: a tower [`Layer`] that guards the registration
//! routes of the service it wraps and passes everything else straight
//! through, streamed and unboxed.
//!
//! On a guarded route the gate reads the query and (bounded, with a
//! deadline) the body, decides with the pure [`Policy`], and either answers
//! with a Matrix error itself — the inner service never sees the request —
//! or calls the inner service with a canonical request it wrote: the
//! canonical path, its own query, and a re-serialized JSON body.
//!
//! # Embedding
//!
//! The layer wraps any service that takes `Request<GateRequestBody<B>>`;
//! refusals are answered, never returned as errors.
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::{BodyExt, Full};
//! use matrix_gatekeeper::config::Config;
//! use matrix_gatekeeper::gate::{GateRequestBody, RegistrationGateLayer};
//! use tower::{service_fn, Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // Any inner service: here, one that answers every request with 200.
//! let homeserver = service_fn(|_req: Request<GateRequestBody<Full<Bytes>>>| async {
//!     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
//! });
//! let gate = RegistrationGateLayer::new(&Config::default()).layer(homeserver);
//!
//! let request = Request::post("/_matrix/client/v3/register")
//!     .body(Full::new(Bytes::from_static(br#"{"username":"admin"}"#)))
//!     .unwrap();
//! let response = gate.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), StatusCode::BAD_REQUEST);
//! let body = response.into_body().collect().await.unwrap().to_bytes();
//! assert!(body.starts_with(br#"{"errcode":"M_USER_IN_USE""#));
//! # }
//! ```

pub mod json;
pub mod policy;
pub mod query;
pub mod routes;
pub mod username;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited as LimitedBody};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::client_ip::{ClientAddress, ClientResolver};
use crate::config::Config;
use crate::error::MatrixError;
use crate::ratelimit::{LimitKind, Limited, RateLimiter};
use policy::{AccountKind, BodyPlan};
pub use policy::{Forward, HeadDecision, Policy, Refusal};
pub use routes::GuardedRoute;

/// Boxed error type of bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body the inner service receives: the client's own body, streamed,
/// on pass-through; the gate's canonical body on guarded routes.
pub type GateRequestBody<B> = Either<B, Full<Bytes>>;

/// The body the gate answers with: the inner service's, or a gate refusal.
pub type GateResponseBody<RB> = Either<RB, Full<Bytes>>;

// === impl RegistrationGateLayer ===

/// A [`Layer`] that puts the registration gate in front of a service.
#[derive(Debug, Clone)]
pub struct RegistrationGateLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    policy: Policy,
    body_timeout: Duration,
    resolver: ClientResolver,
    limiter: RateLimiter,
}

impl RegistrationGateLayer {
    /// A gate enforcing the policy and rate limits of `config`.
    ///
    /// With rate limits configured this must run inside a Tokio runtime (a
    /// housekeeping task is started, and a Redis store connects in the
    /// background). Requests should carry a [`ClientAddress`] extension;
    /// the gate's own server inserts it. Requests without one share a
    /// single per-client budget.
    pub fn new(config: &Config) -> Self {
        RegistrationGateLayer {
            shared: Arc::new(Shared {
                policy: Policy::new(config),
                body_timeout: config.server.body_timeout.0,
                resolver: config.client_ip.resolver(),
                limiter: RateLimiter::new(&config.rate_limit),
            }),
        }
    }

    /// The rate limiter this gate uses.
    pub fn limiter(&self) -> &RateLimiter {
        &self.shared.limiter
    }
}

impl<S> Layer<S> for RegistrationGateLayer {
    type Service = RegistrationGate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RegistrationGate {
            inner,
            shared: self.shared.clone(),
        }
    }
}

// === impl RegistrationGate ===

/// The gate service; see the [module documentation](self).
#[derive(Debug, Clone)]
pub struct RegistrationGate<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, B, RB> Service<Request<B>> for RegistrationGate<S>
where
    S: Service<Request<GateRequestBody<B>>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    RB: Send + 'static,
{
    type Response = Response<GateResponseBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, RB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match routes::classify(request.uri().path()) {
            None => ResponseFuture::PassThrough {
                future: self.inner.call(request.map(Either::Left)),
            },
            Some(route) => {
                // The readied service goes into the future; a fresh clone
                // stays behind for the next `poll_ready`.
                let fresh = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, fresh);
                ResponseFuture::Guarded {
                    future: Box::pin(guard(self.shared.clone(), inner, route, request)),
                }
            }
        }
    }
}

async fn guard<S, B, RB>(
    shared: Arc<Shared>,
    mut inner: S,
    route: GuardedRoute,
    request: Request<B>,
) -> Result<Response<GateResponseBody<RB>>, S::Error>
where
    S: Service<Request<GateRequestBody<B>>, Response = Response<RB>>,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let (parts, body) = request.into_parts();
    let client = parts.extensions.get::<ClientAddress>().map(|c| c.0);
    let key = shared.resolver.key(client.map_or(
        ClientAddress(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        ClientAddress,
    ));
    let limiter = &shared.limiter;
    if let Some(kind) = counted_limit(route, &parts.method) {
        if let Err(limited) = limiter.acquire(&[kind], key).await {
            return Ok(rate_limited(route, client, limited));
        }
    }
    let policy = &shared.policy;
    let forward = match policy.head(&parts.method, route, parts.uri.query()) {
        HeadDecision::Refuse(refusal) => return Ok(refuse(route, client, refusal)),
        HeadDecision::Forward(forward) => forward,
        HeadDecision::ReadBody(plan) => {
            if let BodyPlan::Register(_, AccountKind::Guest) = plan {
                if let Err(limited) = limiter.acquire(&[LimitKind::GuestsPerIp], key).await {
                    return Ok(rate_limited(route, client, limited));
                }
            }
            let bytes = match read_body(
                body,
                declared_length(&parts.headers),
                policy.max_body_bytes,
                shared.body_timeout,
            )
            .await
            {
                Ok(bytes) => bytes,
                Err(refusal) => return Ok(refuse(route, client, refusal)),
            };
            match policy.body(plan, &bytes) {
                Ok(forward) => forward,
                Err(refusal) => return Ok(refuse(route, client, refusal)),
            }
        }
    };
    tracing::info!(
        route = route.name(),
        client = ?client,
        username = forward.username.as_deref(),
        "registration request forwarded"
    );
    let request = match canonical_request(parts, forward) {
        Ok(request) => request,
        Err(refusal) => return Ok(refuse(route, client, refusal)),
    };
    // Completed registrations: reserve now, keep the units only if the
    // homeserver answers with a success.
    let permit = if matches!(route, GuardedRoute::Register(_)) && request.method() == Method::POST {
        match limiter
            .acquire(
                &[
                    LimitKind::RegistrationsPerIp,
                    LimitKind::RegistrationsGlobal,
                ],
                key,
            )
            .await
        {
            Ok(permit) => Some(permit),
            Err(limited) => return Ok(rate_limited(route, client, limited)),
        }
    } else {
        None
    };
    let result = inner.call(request).await;
    if let Some(permit) = permit {
        let success = matches!(&result, Ok(response) if response.status().is_success());
        permit.settle(success);
    }
    Ok(result?.map(Either::Left))
}

/// The per-client limit a guarded request counts against before anything
/// else is looked at.
fn counted_limit(route: GuardedRoute, method: &Method) -> Option<LimitKind> {
    match (route, method) {
        (GuardedRoute::Register(_), &Method::POST) => Some(LimitKind::AttemptsPerIp),
        (GuardedRoute::Available(_), &Method::GET) => Some(LimitKind::AvailabilityChecksPerIp),
        (GuardedRoute::RequestToken(..), &Method::POST)
        | (GuardedRoute::TokenValidity(_), &Method::GET) => Some(LimitKind::TokenRequestsPerIp),
        _ => None,
    }
}

fn rate_limited<RB>(
    route: GuardedRoute,
    client: Option<IpAddr>,
    limited: Limited,
) -> Response<GateResponseBody<RB>> {
    tracing::info!(
        route = route.name(),
        client = ?client,
        limit = limited.limit.name(),
        retry_after_ms = limited.retry_after_ms(),
        "registration request rate-limited"
    );
    limited.into_response().map(Either::Right)
}

fn refuse<RB>(
    route: GuardedRoute,
    client: Option<IpAddr>,
    refusal: Refusal,
) -> Response<GateResponseBody<RB>> {
    tracing::info!(
        route = route.name(),
        client = ?client,
        rule = refusal.rule,
        errcode = refusal.error.errcode,
        "registration request refused"
    );
    refusal.error.into_response().map(Either::Right)
}

fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Reads a whole body, at most `limit` bytes, within `deadline`.
async fn read_body<B>(
    body: B,
    declared: Option<u64>,
    limit: usize,
    deadline: Duration,
) -> Result<Bytes, Refusal>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let too_large = || Refusal {
        rule: "too_large",
        error: MatrixError::too_large(limit),
    };
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(deadline, LimitedBody::new(body, limit).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Ok(Err(e)) => Err(Refusal {
            rule: "body_error",
            error: MatrixError::new(
                http::StatusCode::BAD_REQUEST,
                "M_UNKNOWN",
                format!("The request body could not be read: {e}"),
            ),
        }),
        Err(_) => Err(Refusal {
            rule: "body_timeout",
            error: MatrixError::request_timeout(),
        }),
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

fn canonical_request<B>(
    mut parts: http::request::Parts,
    forward: Forward,
) -> Result<Request<GateRequestBody<B>>, Refusal> {
    parts.uri = forward.path_and_query.parse::<Uri>().map_err(|_| Refusal {
        rule: "bad_query",
        error: MatrixError::invalid_param("The request could not be put in canonical form."),
    })?;
    for name in BODY_HEADERS {
        parts.headers.remove(name);
    }
    let body = forward.body.unwrap_or_default();
    if !body.is_empty() || parts.method == http::Method::POST {
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    Ok(Request::from_parts(parts, Either::Right(Full::new(body))))
}

// === impl ResponseFuture ===

type GuardedFuture<RB, E> =
    Pin<Box<dyn Future<Output = Result<Response<GateResponseBody<RB>>, E>> + Send>>;

pin_project! {
    /// The future of [`RegistrationGate`]: the inner future itself on
    /// pass-through, a boxed one on guarded routes.
    #[project = ResponseFutureProj]
    #[allow(missing_docs)] // the variant fields are the futures named above
    pub enum ResponseFuture<F, RB, E> {
        /// Pass-through: the inner service's future, unboxed.
        PassThrough { #[pin] future: F },
        /// A guarded route.
        Guarded { future: GuardedFuture<RB, E> },
    }
}

impl<F, RB, E> Future for ResponseFuture<F, RB, E>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = Result<Response<GateResponseBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ResponseFutureProj::PassThrough { future } => future
                .poll(cx)
                .map(|result| result.map(|response| response.map(Either::Left))),
            ResponseFutureProj::Guarded { future } => future.as_mut().poll(cx),
        }
    }
}
