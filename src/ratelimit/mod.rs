//! Rate limits on the guarded routes, in memory or shared through Redis.
//!
//! Every limit is `{count = N, period = P}`: a burst of N refilled at N per
//! P (GCRA, emission interval P/N). What each limit counts:
//!
//! | limit | counts |
//! |---|---|
//! | `attempts_per_ip` | every `POST …/register` |
//! | `guests_per_ip` | every guest registration the policy lets through |
//! | `availability_checks_per_ip` | every `GET …/register/available` |
//! | `token_requests_per_ip` | `requestToken` and token validity checks |
//! | `registrations_per_ip`, `registrations_global` | completed registrations |
//! | `attempts_per_asn` | every `POST …/register`, per network (ASN) |
//! | `registrations_per_asn` | completed registrations, per network (ASN) |
//!
//! The per-network limits count a client under its autonomous system, as
//! `[reputation] asn_database` names it; a client the database does not
//! place in one (or one in `allow_asns`) is not counted by them at all and
//! stays under the per-client limits alone.
//!
//! Completed registrations are counted by reservation: one unit of each is
//! taken before a `POST …/register` is forwarded, and given back when the
//! homeserver does not answer with a success. UIA round trips and failures
//! therefore cost nothing, yet N concurrent requests can never complete more
//! than N registrations.

pub mod memory;
pub mod redis;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::MonotonicClock;

use crate::client_ip::ClientKey;
use crate::config::{LimitSpec, OnStoreError, RateLimitConfig, StoreKind};
use crate::notify::{Event, Notifier};
use memory::MemoryStore;
use redis::{RedisStore, Reservation};

/// One of the configured limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// `registrations_per_ip`
    RegistrationsPerIp = 0,
    /// `attempts_per_ip`
    AttemptsPerIp = 1,
    /// `guests_per_ip`
    GuestsPerIp = 2,
    /// `availability_checks_per_ip`
    AvailabilityChecksPerIp = 3,
    /// `token_requests_per_ip`
    TokenRequestsPerIp = 4,
    /// `registrations_global`
    RegistrationsGlobal = 5,
    /// `registrations_per_asn`
    RegistrationsPerAsn = 6,
    /// `attempts_per_asn`
    AttemptsPerAsn = 7,
}

impl LimitKind {
    /// How many kinds there are.
    pub const COUNT: usize = 8;

    /// Every kind, in index order.
    pub const ALL: [LimitKind; Self::COUNT] = [
        LimitKind::RegistrationsPerIp,
        LimitKind::AttemptsPerIp,
        LimitKind::GuestsPerIp,
        LimitKind::AvailabilityChecksPerIp,
        LimitKind::TokenRequestsPerIp,
        LimitKind::RegistrationsGlobal,
        LimitKind::RegistrationsPerAsn,
        LimitKind::AttemptsPerAsn,
    ];

    /// The configuration name.
    pub fn name(self) -> &'static str {
        match self {
            LimitKind::RegistrationsPerIp => "registrations_per_ip",
            LimitKind::AttemptsPerIp => "attempts_per_ip",
            LimitKind::GuestsPerIp => "guests_per_ip",
            LimitKind::AvailabilityChecksPerIp => "availability_checks_per_ip",
            LimitKind::TokenRequestsPerIp => "token_requests_per_ip",
            LimitKind::RegistrationsGlobal => "registrations_global",
            LimitKind::RegistrationsPerAsn => "registrations_per_asn",
            LimitKind::AttemptsPerAsn => "attempts_per_asn",
        }
    }

    /// The kind configured as `name` in `[rate_limit]`.
    pub fn named(name: &str) -> Option<LimitKind> {
        LimitKind::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// Whether the limit is server-wide rather than per client.
    pub fn is_global(self) -> bool {
        self == LimitKind::RegistrationsGlobal
    }

    /// Whether the limit counts a network (ASN) rather than a client.
    pub fn is_per_network(self) -> bool {
        matches!(
            self,
            LimitKind::RegistrationsPerAsn | LimitKind::AttemptsPerAsn
        )
    }

    /// Whether the limit counts each client (address or IPv6 prefix).
    pub fn is_per_client(self) -> bool {
        !self.is_global() && !self.is_per_network()
    }

    /// The key this limit counts `subject` under; `None` for a per-network
    /// limit when the subject has no network (it is then not counted).
    /// Every kind has a table of its own, so an ASN's key never meets a
    /// client's.
    pub fn key_for(self, subject: impl Into<Subject>) -> Option<ClientKey> {
        let subject = subject.into();
        if self.is_global() {
            Some(ClientKey(0))
        } else if self.is_per_network() {
            subject.asn.map(|asn| ClientKey(u128::from(asn)))
        } else {
            Some(subject.client)
        }
    }
}

/// What a request is counted as: its client's key and, with an ASN
/// database, the autonomous system its address belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subject {
    /// The client's key (address, or IPv6 prefix).
    pub client: ClientKey,
    /// The client's ASN, when the per-network limits count it.
    pub asn: Option<u32>,
}

impl From<ClientKey> for Subject {
    fn from(client: ClientKey) -> Self {
        Subject { client, asn: None }
    }
}

/// The configured limits, indexed by [`LimitKind`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitSpecs(pub [Option<LimitSpec>; LimitKind::COUNT]);

impl LimitSpecs {
    /// The limits of a configuration.
    pub fn from_config(config: &RateLimitConfig) -> Self {
        let mut specs = LimitSpecs::default();
        for (name, spec) in config.limits() {
            if let Some(kind) = LimitKind::named(name) {
                specs.0[kind as usize] = spec;
            }
        }
        specs
    }

    /// The spec of one limit, if configured.
    pub fn get(&self, kind: LimitKind) -> Option<LimitSpec> {
        self.0[kind as usize]
    }
}

/// The key one limit counts a client under.
///
/// The Redis store counts every client under its own key. The memory store
/// does too until `max_tracked_clients` keys are tracked; then a client it
/// does not track yet is counted under its coarse key (IPv4 /16, IPv6 /32),
/// and past an eighth more under one overflow key every such client shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountedAs {
    /// The client's own key.
    Own(ClientKey),
    /// A coarse key shared with the rest of its IPv4 /16 or IPv6 /32.
    Coarse(ClientKey),
    /// The overflow key shared by every client not tracked on its own.
    Overflow,
    /// The one server-wide key (`registrations_global`).
    Server,
    /// An autonomous system's key (the per-network limits).
    Network(u32),
}

impl CountedAs {
    /// The key `kind` counts `client` under when nothing is shared.
    /// `None` for a per-network limit when the subject has no network.
    pub fn own(kind: LimitKind, subject: impl Into<Subject>) -> Option<Self> {
        let subject = subject.into();
        if kind.is_global() {
            Some(CountedAs::Server)
        } else if kind.is_per_network() {
            subject.asn.map(CountedAs::Network)
        } else {
            Some(CountedAs::Own(subject.client))
        }
    }

    /// Whether clients other than this one are counted under the same key
    /// by a per-client limit (a coarse or the overflow key).
    pub fn is_shared(self) -> bool {
        matches!(self, CountedAs::Coarse(_) | CountedAs::Overflow)
    }

    /// How widely the key is shared: own, coarse, overflow; the server-wide
    /// key is not compared with the others (it is shared by design).
    fn width(self) -> u8 {
        match self {
            CountedAs::Own(_) | CountedAs::Server | CountedAs::Network(_) => 0,
            CountedAs::Coarse(_) => 1,
            CountedAs::Overflow => 2,
        }
    }

    /// The most widely shared key among per-client limits' `keys`; `own`
    /// when none is shared.
    pub fn widest(keys: impl IntoIterator<Item = CountedAs>, own: ClientKey) -> CountedAs {
        keys.into_iter()
            .filter(|k| !matches!(k, CountedAs::Server | CountedAs::Network(_)))
            .fold(CountedAs::Own(own), |widest, k| {
                if k.width() > widest.width() {
                    k
                } else {
                    widest
                }
            })
    }
}

/// `198.51.100.23`, `2001:db8::` (a client's own key); `198.51.0.0/16`,
/// `2001:db8::/32` (coarse); `overflow`; `*` (server-wide); `AS64496` (a
/// network).
impl std::fmt::Display for CountedAs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CountedAs::Own(key) => write!(f, "{key}"),
            CountedAs::Coarse(key) if key.is_ipv4() => write!(f, "{key}/16"),
            CountedAs::Coarse(key) => write!(f, "{key}/32"),
            CountedAs::Overflow => f.write_str("overflow"),
            CountedAs::Server => f.write_str("*"),
            CountedAs::Network(asn) => write!(f, "AS{asn}"),
        }
    }
}

/// What one client has left under one limit: the admin API's view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The limit.
    pub limit: LimitKind,
    /// The key the limit counts the client under.
    pub counted_as: CountedAs,
    /// Its burst (`count`).
    pub burst: u32,
    /// Units a request could take now.
    pub remaining: u32,
    /// Time until one more unit is available (zero when the burst is full).
    pub next_unit_in: Duration,
    /// Time until the whole burst is available again.
    pub full_in: Duration,
}

impl Budget {
    /// The budget of a key whose GCRA state (its TAT after the last take)
    /// lies `ahead` in the future; both stores keep the same state, so one
    /// formula reads both. A request conforms while `TAT - now <= (burst -
    /// 1) * interval`, hence `remaining = burst - ceil(ahead / interval)`.
    pub fn from_ahead(
        limit: LimitKind,
        counted_as: CountedAs,
        spec: LimitSpec,
        ahead: Duration,
    ) -> Self {
        let interval = spec
            .emission_interval()
            .max(Duration::from_nanos(1))
            .as_nanos();
        let ahead_ns = ahead.as_nanos();
        let spent = ahead_ns.div_ceil(interval);
        let remaining = u128::from(spec.count).saturating_sub(spent);
        let next_unit_in = if spent == 0 {
            0
        } else {
            ahead_ns - (spent - 1) * interval
        };
        Budget {
            limit,
            counted_as,
            burst: spec.count,
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
            next_unit_in: Duration::from_nanos(u64::try_from(next_unit_in).unwrap_or(u64::MAX)),
            full_in: ahead,
        }
    }
}

/// A refusal: which limit, and how long until a retry can pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// The limit that refused.
    pub limit: LimitKind,
    /// Time until the request would conform.
    pub retry_after: Duration,
}

impl Limited {
    /// `retry_after_ms` of the answer: at least 1.
    pub fn retry_after_ms(&self) -> u64 {
        let ms = self.retry_after.as_micros().div_ceil(1000);
        u64::try_from(ms).unwrap_or(u64::MAX).max(1)
    }

    /// `Retry-After` of the answer: whole seconds, rounded up, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after_ms().div_ceil(1000).max(1)
    }
}

/// Where a permit's units were taken, so a refund goes to the same place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    Nothing,
    Local,
    Redis(Reservation),
}

/// Units taken by [`RateLimiter::acquire`]. Dropping it keeps them;
/// [`Permit::settle`] gives them back unless the request succeeded.
#[derive(Debug)]
#[must_use = "settle the permit once the homeserver has answered"]
pub struct Permit {
    limiter: RateLimiter,
    kinds: Vec<LimitKind>,
    subject: Subject,
    taken: Taken,
}

impl Permit {
    /// Keeps the units on success; gives them back otherwise. A Redis refund
    /// runs in the background, off the response path, and is kept until
    /// Redis takes it if Redis is down.
    pub fn settle(self, success: bool) {
        if success || self.kinds.is_empty() {
            return;
        }
        match self.taken {
            Taken::Nothing => {}
            Taken::Local => self.limiter.inner.local.refund(&self.kinds, self.subject),
            Taken::Redis(reservation) => {
                if let Some(redis) = &self.limiter.inner.redis {
                    redis.refund_in_background(&self.kinds, self.subject, reservation);
                }
            }
        }
    }
}

/// The rate limiter: the configured limits over the configured store.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: RateLimitConfig,
    specs: LimitSpecs,
    local: MemoryStore<MonotonicClock>,
    redis: Option<RedisStore>,
    on_store_error: OnStoreError,
    degraded: AtomicBool,
    store_errors: AtomicU64,
    fallbacks: [AtomicU64; 3],
    notifier: Notifier,
}

/// Counters of the Redis store's health.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Decisions Redis could not make.
    pub errors: u64,
    /// Decisions then taken by the local limits.
    pub fallback_local: u64,
    /// Decisions then allowed.
    pub fallback_allow: u64,
    /// Decisions then refused.
    pub fallback_deny: u64,
}

impl RateLimiter {
    /// A limiter for `config`. With `store = "redis"` it connects in the
    /// background; decisions fall back per `on_store_error` until then.
    /// Must be called inside a Tokio runtime when Redis is configured or
    /// any limit is set (a housekeeping task is started).
    pub fn new(config: &RateLimitConfig) -> Self {
        Self::with_notifier(config, Notifier::disabled())
    }

    /// A limiter that reports the Redis store failing and recovering
    /// (`store_down`, `store_up`) to `notifier`; reconfigured limiters keep
    /// reporting there.
    pub fn with_notifier(config: &RateLimitConfig, notifier: Notifier) -> Self {
        Self::build(config, None, notifier)
    }

    /// The limiter for a reloaded configuration: `self` again when the
    /// `[rate_limit]` section is unchanged; otherwise a new limiter that
    /// keeps the in-memory state of every limit whose spec is unchanged
    /// (Redis state lives in Redis and is kept anyway).
    pub fn reconfigure(&self, config: &RateLimitConfig) -> RateLimiter {
        if same_section(&self.inner.config, config) {
            return self.clone();
        }
        Self::build(config, Some(self), self.inner.notifier.clone())
    }

    fn build(config: &RateLimitConfig, previous: Option<&RateLimiter>, notifier: Notifier) -> Self {
        let specs = LimitSpecs::from_config(config);
        let reuse_redis = previous.and_then(|p| {
            let old = &p.inner.config;
            (old.store == config.store
                && old.redis_url == config.redis_url
                && old.redis_cluster == config.redis_cluster
                && old.redis_timeout == config.redis_timeout)
                .then(|| p.inner.redis.clone())
                .flatten()
                .map(|store| store.with_specs(specs))
        });
        let redis = if reuse_redis.is_some() {
            reuse_redis
        } else {
            match (config.store, &config.redis_url) {
                (StoreKind::Redis, Some(url)) => {
                    match RedisStore::new(url, config.redis_cluster, specs, config.redis_timeout.0)
                    {
                        Ok(store) => Some(store),
                        Err(error) => {
                            tracing::error!(%error, "redis store unusable; limits kept in memory");
                            None
                        }
                    }
                }
                _ => None,
            }
        };
        let limiter = RateLimiter {
            inner: Arc::new(Inner {
                config: config.clone(),
                specs,
                local: MemoryStore::carrying_over(
                    &specs,
                    config.max_tracked_clients,
                    MonotonicClock,
                    previous.map(|p| &p.inner.local),
                ),
                redis,
                on_store_error: config.on_store_error,
                degraded: AtomicBool::new(false),
                store_errors: AtomicU64::new(0),
                fallbacks: Default::default(),
                notifier,
            }),
        };
        if specs.0.iter().any(Option::is_some) {
            limiter.start_housekeeping();
        }
        limiter
    }

    fn start_housekeeping(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak = Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                // Eviction walks every shard; keep it off the runtime's
                // request-serving threads.
                let _ = tokio::task::spawn_blocking(move || inner.local.housekeeping()).await;
            }
        });
    }

    /// Whether `kind` is configured.
    pub fn is_configured(&self, kind: LimitKind) -> bool {
        self.inner.specs.get(kind).is_some()
    }

    /// Takes one unit of each of `kinds` for `subject`, all or nothing. A
    /// per-network limit does not count a subject without a network.
    pub async fn acquire(
        &self,
        kinds: &[LimitKind],
        subject: impl Into<Subject>,
    ) -> Result<Permit, Limited> {
        let subject = subject.into();
        let kinds: Vec<LimitKind> = kinds
            .iter()
            .copied()
            .filter(|k| self.is_configured(*k) && k.key_for(subject).is_some())
            .collect();
        let permit = |taken| Permit {
            limiter: self.clone(),
            kinds: kinds.clone(),
            subject,
            taken,
        };
        if kinds.is_empty() {
            return Ok(permit(Taken::Nothing));
        }
        let inner = &self.inner;
        if let Some(redis) = &inner.redis {
            match redis.acquire(&kinds, subject).await {
                Ok(result) => {
                    if inner.degraded.swap(false, Ordering::Relaxed) {
                        tracing::info!("redis rate-limit store is back; shared limits restored");
                        inner.notifier.send(Event::StoreUp);
                    }
                    return result
                        .map(|reservation| permit(Taken::Redis(reservation)))
                        .map_err(|(limit, retry_after)| Limited { limit, retry_after });
                }
                Err(error) => {
                    inner.store_errors.fetch_add(1, Ordering::Relaxed);
                    inner.fallbacks[inner.on_store_error as usize].fetch_add(1, Ordering::Relaxed);
                    if !inner.degraded.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            %error,
                            fallback = inner.on_store_error.as_str(),
                            "redis rate-limit store failed"
                        );
                        inner.notifier.send(Event::StoreDown {
                            error: error.to_string(),
                        });
                    }
                    match inner.on_store_error {
                        OnStoreError::Allow => return Ok(permit(Taken::Nothing)),
                        OnStoreError::Deny => {
                            return Err(Limited {
                                limit: kinds[0],
                                retry_after: Duration::from_secs(1),
                            })
                        }
                        OnStoreError::Local => {}
                    }
                }
            }
        }
        inner
            .local
            .acquire(&kinds, subject)
            .map(|()| permit(Taken::Local))
            .map_err(|(limit, retry_after)| Limited { limit, retry_after })
    }

    /// Whether the Redis store is currently failing (decisions fall back).
    pub fn is_degraded(&self) -> bool {
        self.inner.degraded.load(Ordering::Relaxed)
    }

    /// The shared store (Redis), when limits are kept there: bans and the
    /// lockdown share it.
    pub fn shared_store(&self) -> Option<&crate::store::SharedStore> {
        self.inner.redis.as_ref().map(RedisStore::store)
    }

    /// Whether limits are kept in Redis.
    pub fn uses_redis(&self) -> bool {
        self.inner.redis.is_some()
    }

    /// The store's state as `/readyz` reports it: `memory`; `redis` when
    /// Redis answers a `PING` within `redis_timeout`; `redis-unreachable`
    /// when it does not (decisions then fall back per `on_store_error`).
    pub async fn store_health(&self) -> &'static str {
        match &self.inner.redis {
            None => "memory",
            Some(redis) if redis.ping().await => "redis",
            Some(_) => "redis-unreachable",
        }
    }

    /// Redis refunds waiting for Redis to come back.
    pub fn pending_refunds(&self) -> usize {
        self.inner
            .redis
            .as_ref()
            .map_or(0, RedisStore::pending_refunds)
    }

    /// Counters of the Redis store's health.
    pub fn store_stats(&self) -> StoreStats {
        let f = &self.inner.fallbacks;
        StoreStats {
            errors: self.inner.store_errors.load(Ordering::Relaxed),
            fallback_local: f[OnStoreError::Local as usize].load(Ordering::Relaxed),
            fallback_allow: f[OnStoreError::Allow as usize].load(Ordering::Relaxed),
            fallback_deny: f[OnStoreError::Deny as usize].load(Ordering::Relaxed),
        }
    }

    /// The budget `subject` has now under every configured limit (the
    /// server-wide one shared by all; the per-network ones when it has a
    /// network), from the store decisions use (Redis, or memory); changes
    /// nothing.
    pub async fn inspect(
        &self,
        subject: impl Into<Subject>,
    ) -> Result<Vec<Budget>, redis::StoreError> {
        let subject = subject.into();
        match &self.inner.redis {
            Some(redis) => redis.inspect(subject).await,
            None => Ok(self.inner.local.inspect(subject)),
        }
    }

    /// Forgets `key`'s per-client state in every store: the in-memory
    /// limits (used alone, or as the fallback) and Redis. Returns, per
    /// per-client limit, the key reset in the store decisions use: the
    /// client's own, or (memory store over `max_tracked_clients`) a key it
    /// shares with other clients, whose state is then reset for all of them.
    pub async fn reset(
        &self,
        key: ClientKey,
    ) -> Result<Vec<(LimitKind, CountedAs)>, redis::StoreError> {
        let local = self.inner.local.reset(key);
        match &self.inner.redis {
            Some(redis) => {
                redis.reset(key).await?;
                Ok(local
                    .into_iter()
                    .map(|(kind, _)| (kind, CountedAs::Own(key)))
                    .collect())
            }
            None => Ok(local),
        }
    }

    /// Keys held by the in-memory limits.
    pub fn tracked(&self) -> usize {
        self.inner.local.tracked()
    }
}

/// Whether two `[rate_limit]` sections configure the same limiter.
fn same_section(a: &RateLimitConfig, b: &RateLimitConfig) -> bool {
    // Every field is plain data; compare their printed forms.
    toml::to_string(a).ok() == toml::to_string(b).ok()
}

#[cfg(test)]
mod tests;
