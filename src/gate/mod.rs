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
//! In shadow mode (`[registration] mode = "shadow"`) the gate decides the
//! same way but forwards the client's request as it came, and only logs and
//! counts what it would have refused.
//!
//! The gate's state (policy, limits, client resolution) sits behind an
//! atomic pointer: [`RegistrationGateLayer::reload`] swaps it without
//! dropping a request, and the rate limiter's state carries over.
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

mod answer;
mod audit;
pub mod body;
mod defences;
mod future;
pub mod json;
pub mod policy;
pub mod query;
mod request;
pub mod routes;
pub mod username;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response};
use http_body::Body;
use http_body_util::{Either, Full};
use tower::{Layer, Service};

use answer::Stop;
use audit::{Audit, Forwarded};
pub use body::GateBody;
pub(crate) use defences::{banned, closed, dnsbl_failed, dnsbl_listed, network_refusal};
use defences::{check_dnsbl, network_subject};
pub use future::ResponseFuture;
use policy::appservice::{self, AppServiceGrant};
use policy::{AccountKind, BodyPlan};
pub use policy::{Forward, HeadDecision, Policy, Refusal, RequestedName};
use request::{body_error, canonical_request, declared_length, read_body, ReadBody};
pub use routes::GuardedRoute;

use crate::client_ip::{ClientAddress, ClientKey, ClientResolver};
use crate::config::{Config, GateMode};
use crate::defences::bans::Bans;
use crate::defences::dnsbl::{Dnsbl, DnsblCache, ZoneHealth, HEALTH_CHECK_EVERY};
use crate::defences::lockdown::Lockdown;
use crate::defences::networks::{Network, Networks};
use crate::error::MatrixError;
use crate::notify::Notifier;
use crate::ratelimit::{LimitKind, RateLimiter};
use crate::telemetry::{Metrics, Outcome};

/// The response header the gate puts on every answer to a guarded route:
/// its own refusals and 429s, and the homeserver answers it forwarded. Its
/// value is the decision ([`Outcome::as_str`]: `allowed`, `refused`,
/// `rate_limited`, `would_refuse`). Homeservers do not send it, so a client
/// can tell whether a registration request passed the gate
/// (`matrix-gatekeeper probe`). Pass-through answers do not carry it.
pub const MARKER_HEADER: &str = "x-matrix-gatekeeper";

/// Puts the [`MARKER_HEADER`] with the decision on an answer, replacing
/// whatever the homeserver may have sent under that name.
fn mark<B>(mut response: Response<B>, outcome: Outcome) -> Response<B> {
    response.headers_mut().insert(
        header::HeaderName::from_static(MARKER_HEADER),
        HeaderValue::from_static(outcome.as_str()),
    );
    response
}

/// Boxed error type of bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body the inner service receives (see [`GateBody`]).
pub type GateRequestBody<B> = GateBody<B>;

/// The body the gate answers with: the inner service's, or a gate refusal.
pub type GateResponseBody<RB> = Either<RB, Full<Bytes>>;

/// The TCP peer of a request, put into its extensions by the server. The
/// gate resolves the [`ClientAddress`] from it (trusted proxies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddress(pub SocketAddr);

// === impl GateState ===

/// Everything a configuration reload replaces.
#[derive(Debug)]
struct GateState {
    policy: Policy,
    body_timeout: Duration,
    resolver: ClientResolver,
    limiter: RateLimiter,
    lockdown: Lockdown,
    bans: Bans,
    mode: GateMode,
    /// The network databases and rules.
    networks: Networks,
    /// DNSBL lookups (`None`: no zone configured).
    dnsbl: Option<Dnsbl>,
    /// Their answers, kept across reloads (keyed by zone, so a changed zone
    /// list reuses nothing it should not).
    dnsbl_cache: Arc<DnsblCache>,
    /// Whether each zone passed its test-point check, kept across reloads.
    dnsbl_health: Arc<ZoneHealth>,
}

impl GateState {
    fn new(
        config: &Config,
        limiter: RateLimiter,
        lockdown: Lockdown,
        bans: Bans,
        dnsbl_cache: Arc<DnsblCache>,
        dnsbl_health: Arc<ZoneHealth>,
    ) -> Self {
        GateState {
            bans,
            dnsbl: Dnsbl::new(&config.reputation, dnsbl_cache.clone())
                .map(|dnsbl| dnsbl.with_health(dnsbl_health.clone())),
            dnsbl_cache,
            dnsbl_health,
            networks: config.networks(),
            policy: Policy::new(config),
            body_timeout: config.server.body_timeout.0,
            resolver: config.client_ip.resolver(),
            limiter,
            lockdown,
            mode: config.registration.mode,
        }
    }
}

/// What the network rules make of one client
/// ([`RegistrationGateLayer::network`]).
#[derive(Debug, Clone)]
pub struct NetworkView {
    /// What the databases know of it.
    pub network: Network,
    /// The rules' verdict.
    pub verdict: crate::defences::networks::NetworkVerdict,
    /// The list of `deny_asn_lists` that refuses it, if one does.
    pub list: Option<Arc<str>>,
    /// The ASN the per-network limits count it under.
    pub counted: Option<u32>,
}

// === impl RegistrationGateLayer ===

/// A [`Layer`] that puts the registration gate in front of a service.
#[derive(Debug, Clone)]
pub struct RegistrationGateLayer {
    state: Arc<ArcSwap<GateState>>,
    metrics: Arc<Metrics>,
    notifier: Notifier,
    /// Wakes the DNSBL health check after a reload that changed the zones.
    dnsbl_recheck: Arc<tokio::sync::Notify>,
}

impl RegistrationGateLayer {
    /// A gate enforcing the policy and rate limits of `config`.
    ///
    /// With rate limits configured this must run inside a Tokio runtime (a
    /// housekeeping task is started, and a Redis store connects in the
    /// background). The gate resolves each request's client from a
    /// [`PeerAddress`] or takes a [`ClientAddress`] given in the request's
    /// extensions; requests with neither share one per-client budget.
    pub fn new(config: &Config) -> Self {
        Self::with_metrics(config, Arc::default())
    }

    /// A gate that counts into `metrics`.
    pub fn with_metrics(config: &Config, metrics: Arc<Metrics>) -> Self {
        Self::with_notifier(config, metrics, Notifier::disabled())
    }

    /// A gate that counts into `metrics` and reports operational events
    /// (lockdowns, the Redis store's health) to `notifier`.
    pub fn with_notifier(config: &Config, metrics: Arc<Metrics>, notifier: Notifier) -> Self {
        let limiter = RateLimiter::with_notifier(&config.rate_limit, notifier.clone());
        let lockdown = Lockdown::new(config.registration.lockdown, &limiter, notifier.clone());
        let bans = Bans::default().with_store(limiter.shared_store().cloned());
        let state = Arc::new(ArcSwap::from_pointee(GateState::new(
            config,
            limiter,
            lockdown,
            bans,
            Arc::default(),
            Arc::default(),
        )));
        follow_store(Arc::downgrade(&state));
        let dnsbl_recheck = Arc::default();
        check_dnsbl_health(Arc::downgrade(&state), Arc::clone(&dnsbl_recheck));
        RegistrationGateLayer {
            state,
            metrics,
            notifier,
            dnsbl_recheck,
        }
    }

    /// Swaps in the policy of a new (validated) configuration. Requests in
    /// flight finish under the old policy; the rate limiter and the
    /// lockdown keep their state.
    pub fn reload(&self, config: &Config) {
        let old = self.state.load();
        let limiter = old.limiter.reconfigure(&config.rate_limit);
        let lockdown = old
            .lockdown
            .reconfigure(config.registration.lockdown, &limiter);
        let bans = old.bans.with_store(limiter.shared_store().cloned());
        let dnsbl_cache = old.dnsbl_cache.clone();
        let dnsbl_health = old.dnsbl_health.clone();
        let new = GateState::new(config, limiter, lockdown, bans, dnsbl_cache, dnsbl_health);
        let same_lists = match (&old.dnsbl, &new.dnsbl) {
            (Some(old), Some(new)) => old.asks_as(new),
            (old, new) => old.is_none() && new.is_none(),
        };
        if !same_lists {
            // Zones no longer asked leave the metrics now; new ones (or
            // the same ones through another server) are checked at once.
            new.dnsbl_health
                .retain(new.dnsbl.as_ref().map_or(&[], |dnsbl| dnsbl.zones()));
            self.dnsbl_recheck.notify_one();
        }
        self.state.store(Arc::new(new));
    }

    /// Whether each DNSBL zone passed its test-point check (kept across
    /// reloads).
    pub fn dnsbl_health(&self) -> Arc<ZoneHealth> {
        self.state.load().dnsbl_health.clone()
    }

    /// The temporary bans (kept across reloads).
    pub fn bans(&self) -> Bans {
        self.state.load().bans.clone()
    }

    /// The key `client`'s limits are counted under, per the current
    /// `client_ip` configuration.
    pub fn client_key(&self, client: IpAddr) -> ClientKey {
        self.with_resolver(|resolver| resolver.key(ClientAddress(client)))
    }

    /// What the network databases of the current configuration say of
    /// `client`, the rules' verdict (and the list of `deny_asn_lists`
    /// behind it), and the ASN the per-network limits count it under;
    /// `None` without a network database.
    pub fn network(&self, client: IpAddr) -> Option<NetworkView> {
        let state = self.state.load();
        let networks = &state.networks;
        if !networks.is_configured() {
            return None;
        }
        let network = networks.lookup(client);
        let verdict = networks.verdict(&network);
        Some(NetworkView {
            counted: networks.counted_asn(&network, verdict),
            list: networks.denying_list(&network, verdict).cloned(),
            network,
            verdict,
        })
    }

    /// The registration lockdown the gate uses now.
    pub fn lockdown(&self) -> Lockdown {
        self.state.load().lockdown.clone()
    }

    /// Where the gate reports operational events.
    pub fn notifier(&self) -> &Notifier {
        &self.notifier
    }

    /// The rate limiter the gate uses now.
    pub fn limiter(&self) -> RateLimiter {
        self.state.load().limiter.clone()
    }

    /// The gate's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Runs `f` with the client resolver of the current configuration.
    pub(crate) fn with_resolver<R>(&self, f: impl FnOnce(&ClientResolver) -> R) -> R {
        f(&self.state.load().resolver)
    }
}

impl<S> Layer<S> for RegistrationGateLayer {
    type Service = RegistrationGate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RegistrationGate {
            inner,
            state: self.state.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

// === impl RegistrationGate ===

/// The gate service; see the [module documentation](self).
#[derive(Debug, Clone)]
pub struct RegistrationGate<S> {
    inner: S,
    state: Arc<ArcSwap<GateState>>,
    metrics: Arc<Metrics>,
}

impl<S, B, RB> Service<Request<B>> for RegistrationGate<S>
where
    S: Service<Request<GateRequestBody<B>>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = Response<GateResponseBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, RB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let started = Instant::now();
        // A guard, not an `Arc`: pass-through requests take no reference count.
        let state = self.state.load();
        resolve_client(&state.resolver, &mut request);
        match routes::classify(request.uri().path()) {
            None => ResponseFuture::PassThrough {
                future: self.inner.call(request.map(GateBody::client)),
                started,
                metrics: self.metrics.clone(),
            },
            Some(route) => {
                // The readied service goes into the future; a fresh clone
                // stays behind for the next `poll_ready`.
                let fresh = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, fresh);
                let metrics = self.metrics.clone();
                ResponseFuture::Guarded {
                    future: Box::pin(guard(
                        arc_swap::Guard::into_inner(state),
                        metrics.clone(),
                        inner,
                        route,
                        request,
                    )),
                    started,
                    metrics,
                }
            }
        }
    }
}

/// How often a replica using Redis reads the bans and a lockdown set or
/// lifted by hand on another replica.
const FOLLOW_STORE_EVERY: Duration = Duration::from_secs(1);

/// Keeps this replica's copy of the shared admin state (temporary bans,
/// lockdown by hand) in step with Redis, off the request path, while the
/// gate lives. Does nothing without a Tokio runtime.
fn follow_store(state: std::sync::Weak<ArcSwap<GateState>>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(FOLLOW_STORE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(current) = state.upgrade().map(|s| s.load_full()) else {
                return;
            };
            if current.limiter.uses_redis() {
                tokio::join!(current.bans.follow_store(), current.lockdown.follow_store());
            }
        }
    });
}

/// Checks the test points of the DNSBL zones (see [`crate::defences::dnsbl::ZoneHealth`])
/// off the request path while the gate lives: at once, every
/// [`HEALTH_CHECK_EVERY`], and when `recheck` is notified (a reload changed
/// the zones). Does nothing without a Tokio runtime.
fn check_dnsbl_health(
    state: std::sync::Weak<ArcSwap<GateState>>,
    recheck: Arc<tokio::sync::Notify>,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        loop {
            let Some(current) = state.upgrade().map(|s| s.load_full()) else {
                return;
            };
            if let Some(dnsbl) = &current.dnsbl {
                dnsbl.check_health().await;
            }
            drop(current);
            tokio::select! {
                () = tokio::time::sleep(HEALTH_CHECK_EVERY) => {}
                () = recheck.notified() => {}
            }
        }
    });
}

/// Puts the [`ClientAddress`] (and a trusted proxy's scheme) into the
/// request, unless the embedding stack already did.
fn resolve_client<B>(resolver: &ClientResolver, request: &mut Request<B>) {
    if request.extensions().get::<ClientAddress>().is_some() {
        return;
    }
    let Some(PeerAddress(peer)) = request.extensions().get::<PeerAddress>().copied() else {
        return;
    };
    let client = resolver.resolve(peer.ip(), request.headers());
    let proto = resolver.forwarded_proto(peer.ip(), request.headers());
    request.extensions_mut().insert(client);
    if let Some(proto) = proto {
        request.extensions_mut().insert(proto);
    }
}

async fn guard<S, B, RB>(
    state: Arc<GateState>,
    metrics: Arc<Metrics>,
    inner: S,
    route: GuardedRoute,
    request: Request<B>,
) -> Result<Response<GateResponseBody<RB>>, S::Error>
where
    S: Service<Request<GateRequestBody<B>>, Response = Response<RB>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    RB: Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let shadow = state.mode == GateMode::Shadow;
    let (parts, body) = request.into_parts();
    let client = parts.extensions.get::<ClientAddress>().map(|c| c.0);
    let key = state.resolver.key(ClientAddress(
        client.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
    ));
    let user_agent = parts
        .headers
        .get(header::USER_AGENT)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let mut audit = Audit {
        route,
        client,
        key,
        user_agent,
        kind: match route {
            GuardedRoute::Register(_) => Some(policy::audited_kind(parts.uri.query())),
            GuardedRoute::PickUsername | GuardedRoute::PickUsernameCheck => Some("sso"),
            _ => None,
        },
        username: None,
        outcome: Outcome::Allowed,
        rule: "",
        status: None,
        list: None,
        dnsbl_zone: None,
        dnsbl_failed: false,
        user_id: None,
        appservice: None,
        network: None,
    };
    let mut body = Some(body);
    let mut read: Option<Bytes> = None;
    let decided = decide(&state, route, &parts, &mut body, &mut read, &mut audit).await;

    let (request, permit, user_registration) = match decided {
        Ok((forward, permit)) => {
            let user_registration = matches!(forward.account, Some(AccountKind::User { .. }))
                && forward.appservice.is_none();
            match canonical_request(&parts, route, forward) {
                Ok(request) => (request, permit, user_registration),
                Err(refusal) => {
                    // The gate cannot write this request: refuse even in
                    // shadow mode, since nothing canonical exists to forward.
                    // Dropping a permit keeps its units: give them back.
                    if let Some(permit) = permit {
                        permit.settle(false);
                    }
                    audit.outcome = Outcome::Refused;
                    audit.rule = refusal.rule;
                    audit.emit(&metrics);
                    let response = Stop::Refuse(refusal)
                        .into_response(route)
                        .map(Either::Right);
                    return Ok(mark(response, Outcome::Refused));
                }
            }
        }
        Err(stop) if shadow => {
            audit.outcome = Outcome::WouldRefuse;
            audit.rule = stop.rule();
            audit.username = audit.username.take().or_else(|| stop.username());
            audit.list = stop.list();
            let original = match (read, body) {
                (Some(bytes), Some(rest)) => GateBody::replay(bytes, rest),
                (None, Some(body)) => GateBody::client(body),
                (Some(bytes), None) => GateBody::canonical(bytes),
                (None, None) => GateBody::canonical(Bytes::new()),
            };
            (Request::from_parts(parts, original), None, false)
        }
        Err(stop) => {
            audit.outcome = stop.outcome();
            audit.rule = stop.rule();
            audit.username = audit.username.take().or_else(|| stop.username());
            audit.list = stop.list();
            audit.emit(&metrics);
            let outcome = stop.outcome();
            return Ok(mark(stop.into_response(route).map(Either::Right), outcome));
        }
    };
    let forwarded = Forwarded {
        state,
        metrics,
        permit,
        user_registration,
        audit,
    };
    // Once the request is on its way the homeserver finishes it whether or
    // not the client waits for the answer (Synapse completes a registration
    // whose client hung up). The answer is awaited in a task of its own, so
    // that a client hanging up — which drops this future — cannot leave an
    // account uncounted: the limits are settled, the lockdown counts it and
    // the audit line is written all the same. The upstream's
    // `response_timeout` bounds how long the task can wait.
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return forwarded.send(inner, request).await;
    };
    match runtime.spawn(forwarded.send(inner, request)).await {
        Ok(answer) => answer,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        // The runtime is shutting down under the request.
        Err(_) => Ok(mark(
            MatrixError::bad_gateway()
                .into_response()
                .map(Either::Right),
            Outcome::Allowed,
        )),
    }
}

/// Runs every check of a guarded request, in order: the policy's client
/// rules, bans, the lockdown (registrations), the route's per-client limit,
/// the policy on method/path/query, the guest limit, the body and the
/// policy on it, the registration reservation, and last the DNSBL lookup.
///
/// The lookup comes last because it is the one check that costs a query to
/// someone else: public DNSBLs block resolvers that ask too much, so a
/// client over its limits, or a request the gate refuses anyway, asks
/// nothing. Only a request about to be forwarded with its route's own
/// method is looked up (not a CORS preflight). A DNSBL refusal gives the
/// registration reservation back: nothing was registered.
async fn decide<B>(
    state: &GateState,
    route: GuardedRoute,
    parts: &http::request::Parts,
    body: &mut Option<B>,
    read: &mut Option<Bytes>,
    audit: &mut Audit,
) -> Result<(Forward, Option<crate::ratelimit::Permit>), Stop>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let policy = &state.policy;
    let limiter = &state.limiter;
    policy
        .client(audit.client, audit.user_agent.as_deref())
        .map_err(Stop::Refuse)?;
    if audit.client.and_then(|ip| state.bans.find(ip)).is_some() {
        return Err(Stop::Refuse(banned()));
    }
    let key = network_subject(&state.networks, audit)?;
    let registration = is_registration(route, &parts.method);
    // Only `POST …/register` takes a bridge's token.
    let token = if registration && matches!(route, GuardedRoute::Register(_)) {
        appservice::registration_token(&parts.headers, parts.uri.query()).map_err(Stop::Refuse)?
    } else {
        None
    };
    // A registration with an access token is a bridge's (or refused as the
    // homeserver refuses it): whether the lockdown and the attempts limit
    // apply is known once its body is read.
    let deferred = token.is_some();
    if registration && !deferred && state.lockdown.is_closed().await {
        return Err(Stop::Refuse(closed()));
    }
    if let Some(kinds) = counted_limit(route, &parts.method).filter(|_| !deferred) {
        limiter
            .acquire(kinds, key)
            .await
            .map_err(Stop::Limit)?
            .settle(true);
    }
    let forward = match policy.head(&parts.method, route, parts.uri.query()) {
        HeadDecision::Refuse(refusal) => return Err(Stop::Refuse(refusal)),
        HeadDecision::Forward(forward) => forward,
        HeadDecision::ReadBody(plan) => {
            if plan == BodyPlan::PickUsername {
                policy::sso::form_content_type(&parts.headers).map_err(Stop::Refuse)?;
            }
            if let BodyPlan::Register(_, AccountKind::Guest) = plan {
                limiter
                    .acquire(&[LimitKind::GuestsPerIp], key)
                    .await
                    .map_err(Stop::Limit)?
                    .settle(true);
            }
            let Some(client_body) = body.take() else {
                return Err(Stop::Refuse(body_error("the body was already taken")));
            };
            let bytes = match read_body(
                client_body,
                declared_length(&parts.headers),
                policy.max_body_bytes,
                state.body_timeout,
            )
            .await
            {
                Ok(ReadBody::Complete(bytes)) => bytes,
                Ok(ReadBody::TooLarge(prefix, rest)) => {
                    *read = Some(prefix);
                    *body = Some(rest);
                    return Err(Stop::Refuse(Refusal::new(
                        "too_large",
                        MatrixError::too_large(policy.max_body_bytes),
                    )));
                }
                Err(refusal) => return Err(Stop::Refuse(refusal)),
            };
            *read = Some(bytes.clone());
            policy
                .body_with(plan, &bytes, token.as_ref())
                .map_err(Stop::Refuse)?
        }
    };
    audit.username = forward.username.clone();
    if let Some(grant) = &forward.appservice {
        audit.kind = Some("appservice");
        audit.appservice = Some(grant.name());
    }
    if deferred {
        if forward.appservice.is_none() && state.lockdown.is_closed().await {
            return Err(Stop::Refuse(closed()));
        }
        if forward
            .appservice
            .as_ref()
            .is_none_or(AppServiceGrant::counts_attempts)
        {
            limiter
                .acquire(ATTEMPTS, key)
                .await
                .map_err(Stop::Limit)?
                .settle(true);
        }
    }
    // Completed registrations: reserve now, keep the units only if the
    // homeserver answers with a success.
    let counts_registrations = forward
        .appservice
        .as_ref()
        .is_none_or(AppServiceGrant::counts_registrations);
    let permit = if registration && counts_registrations {
        Some(
            limiter
                .acquire(
                    &[
                        LimitKind::RegistrationsPerIp,
                        LimitKind::RegistrationsGlobal,
                        LimitKind::RegistrationsPerAsn,
                    ],
                    key,
                )
                .await
                .map_err(Stop::Limit)?,
        )
    } else {
        None
    };
    // The policy refused every method but the route's own (and OPTIONS)
    // above; a preflight registers nothing and is not looked up.
    if let (Some(dnsbl), Some(client)) = (&state.dnsbl, audit.client) {
        if parts.method != Method::OPTIONS {
            if let Err(stop) = check_dnsbl(dnsbl, client, audit).await {
                // Dropping a permit keeps its units: give them back.
                if let Some(permit) = permit {
                    permit.settle(false);
                }
                return Err(stop);
            }
        }
    }
    Ok((forward, permit))
}

/// Whether the request makes an account: a `POST …/register` (user or
/// guest), or an SSO username pick.
fn is_registration(route: GuardedRoute, method: &Method) -> bool {
    matches!(
        route,
        GuardedRoute::Register(_) | GuardedRoute::PickUsername
    ) && method == Method::POST
}

/// What every registration attempt counts against: its client's and its
/// network's attempts.
const ATTEMPTS: &[LimitKind] = &[LimitKind::AttemptsPerIp, LimitKind::AttemptsPerAsn];

/// The limits a guarded request counts against before anything else is
/// looked at.
fn counted_limit(route: GuardedRoute, method: &Method) -> Option<&'static [LimitKind]> {
    match (route, method) {
        (GuardedRoute::Register(_) | GuardedRoute::PickUsername, &Method::POST) => Some(ATTEMPTS),
        (GuardedRoute::Available(_) | GuardedRoute::PickUsernameCheck, &Method::GET) => {
            Some(&[LimitKind::AvailabilityChecksPerIp])
        }
        (GuardedRoute::RequestToken(..), &Method::POST)
        | (GuardedRoute::TokenValidity(_), &Method::GET) => Some(&[LimitKind::TokenRequestsPerIp]),
        _ => None,
    }
}
