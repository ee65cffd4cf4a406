//! The shared store: the one Redis (or Redis Cluster) connection through
//! which replicas share their state — rate limits ([`crate::ratelimit`]),
//! temporary bans and the registration lockdown ([`crate::defences`]).
//!
//! What every user of it needs is here: a connection made lazily and made
//! again on its own (a Redis that is down at start, or goes away later,
//! costs a request at most `redis_timeout`); a request that finds its
//! connection dead (Redis restarted) sent once more on the new one; every
//! key under one hash tag (`{mgk}`), so a script touching several keys stays
//! in one Redis Cluster slot; and the offset between the gate's clock and
//! Redis' `TIME`, learnt from every answer, so that a script can carry its
//! deadline on Redis' clock and change nothing when a stalled Redis runs it
//! too late. What the scripts do is their users' business.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, RedisError, Script, ScriptInvocation};
use tokio::sync::RwLock;

#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Why a Redis decision could not be made.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No connection yet (still connecting, or Redis unreachable).
    #[error("not connected to redis")]
    NotConnected,
    /// Redis answered with an error.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    /// Redis did not answer within `redis_timeout`.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The script ran after the decision's deadline and changed nothing.
    #[error("redis ran the decision after its deadline")]
    PastDeadline,
    /// The script answered something unexpected.
    #[error("unexpected answer from a redis script")]
    BadAnswer,
}

/// The shared store's connection; cheap to clone (shared).
#[derive(Clone)]
pub struct SharedStore {
    inner: Arc<Inner>,
}

struct Inner {
    connection: RwLock<Option<Connection>>,
    timeout: Duration,
    prefix: String,
    clock: RedisClock,
}

impl std::fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStore")
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

/// The offset between the gate's monotonic clock and Redis' `TIME`.
struct RedisClock {
    /// The gate's clock is microseconds since this instant.
    base: Instant,
    /// Redis' time minus the gate's when the last answer arrived; `i64::MIN`
    /// until the first answer. Measured at arrival, it is lower than the
    /// true offset by the answer's way back, so a deadline translated with
    /// it falls early on Redis' clock by that much: a script that meets it
    /// answers before the gate stops waiting.
    offset: AtomicI64,
}

impl RedisClock {
    fn micros(&self, at: Instant) -> i64 {
        i64::try_from(at.saturating_duration_since(self.base).as_micros()).unwrap_or(i64::MAX)
    }

    fn observe(&self, redis_now: i64) {
        let local = self.micros(Instant::now());
        self.offset
            .store(redis_now.saturating_sub(local), Ordering::Relaxed);
    }

    /// `at` on Redis' clock, once an answer has shown the offset.
    fn on_redis_clock(&self, at: Instant) -> Option<i64> {
        let offset = self.offset.load(Ordering::Relaxed);
        (offset != i64::MIN).then(|| self.micros(at).saturating_add(offset))
    }
}

/// What is sent to Redis.
pub(crate) enum Request<'a> {
    Script(&'a ScriptInvocation<'a>),
    Command(&'a redis::Cmd),
}

impl SharedStore {
    /// A store at `url` (with `cluster`, a comma-separated list of Redis
    /// Cluster seed nodes), each request waiting at most `timeout`.
    /// Connects in the background; never blocks.
    pub fn connect(url: &str, cluster: bool, timeout: Duration) -> Result<Self, StoreError> {
        let shared = Arc::new(Inner {
            connection: RwLock::new(None),
            timeout,
            prefix: "mgk".to_owned(),
            clock: RedisClock {
                base: Instant::now(),
                offset: AtomicI64::new(i64::MIN),
            },
        });
        let nodes: Vec<String> = url.split(',').map(|s| s.trim().to_owned()).collect();
        if !cluster {
            let client = redis::Client::open(nodes[0].as_str())?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout.max(Duration::from_millis(200))))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(2)
                .set_min_delay(Duration::from_millis(50))
                .set_max_delay(Duration::from_secs(2));
            let manager = ConnectionManager::new_lazy_with_config(client, config)?;
            if let Ok(mut slot) = shared.connection.try_write() {
                *slot = Some(Connection::Single(manager));
            }
        } else {
            let client = redis::cluster::ClusterClient::builder(nodes)
                .connection_timeout(timeout.max(Duration::from_millis(200)))
                .response_timeout(timeout)
                .retries(1)
                .build()?;
            let weak = Arc::downgrade(&shared);
            tokio::spawn(async move {
                let mut delay = Duration::from_millis(100);
                loop {
                    match client.get_async_connection().await {
                        Ok(connection) => {
                            let Some(shared) = weak.upgrade() else { return };
                            *shared.connection.write().await =
                                Some(Connection::Cluster(connection));
                            tracing::info!("connected to redis cluster");
                            return;
                        }
                        Err(error) => {
                            if weak.strong_count() == 0 {
                                return;
                            }
                            tracing::warn!(%error, "cannot connect to redis cluster; retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            });
        }
        Ok(SharedStore { inner: shared })
    }

    /// The longest wait for one request (`redis_timeout`).
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// Runs `script` on `keys` with `args` within `redis_timeout`; a dead
    /// connection is retried once.
    pub(crate) async fn run_script<T: FromRedisValue, A: redis::ToRedisArgs>(
        &self,
        script: &Script,
        keys: &[String],
        args: &[A],
    ) -> Result<T, StoreError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        self.send_in_time(&Request::Script(&invocation)).await
    }

    /// `name` under the store's hash tag (`{mgk}:name`).
    pub(crate) fn tagged_key(&self, name: &str) -> String {
        format!("{{{}}}:{name}", self.inner.prefix)
    }

    /// Whether Redis answers a `PING` within `redis_timeout`.
    pub async fn ping(&self) -> bool {
        let ping = redis::cmd("PING");
        self.send_in_time::<String>(&Request::Command(&ping))
            .await
            .is_ok()
    }

    /// `at` on Redis' clock, once an answer has shown the offset.
    pub(crate) fn on_redis_clock(&self, at: Instant) -> Option<i64> {
        self.inner.clock.on_redis_clock(at)
    }

    /// Learns the offset from Redis' time in an answer.
    pub(crate) fn observe_clock(&self, redis_now: i64) {
        self.inner.clock.observe(redis_now);
    }

    /// [`send`](Self::send) within `redis_timeout`.
    pub(crate) async fn send_in_time<T: FromRedisValue>(
        &self,
        request: &Request<'_>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.inner.timeout, self.send(request))
            .await
            .map_err(|_| StoreError::Timeout(self.inner.timeout))?
    }

    /// Sends `request`; a request that fails because the connection is
    /// dead (Redis restarted, or the network dropped it) is sent once more,
    /// on the connection the client makes anew. The caller bounds the time.
    pub(crate) async fn send<T: FromRedisValue>(
        &self,
        request: &Request<'_>,
    ) -> Result<T, StoreError> {
        let connection = self.inner.connection.read().await.clone();
        let Some(connection) = connection else {
            return Err(StoreError::NotConnected);
        };
        match send_once(&connection, request).await {
            Err(error) if is_dead_connection(&error) => {
                tracing::debug!(%error, "redis connection lost; reconnecting");
                Ok(send_once(&connection, request).await?)
            }
            answer => Ok(answer?),
        }
    }
}

async fn send_once<T: FromRedisValue>(
    connection: &Connection,
    request: &Request<'_>,
) -> Result<T, RedisError> {
    match connection.clone() {
        Connection::Single(mut c) => match request {
            Request::Script(invocation) => invocation.invoke_async(&mut c).await,
            Request::Command(command) => command.query_async(&mut c).await,
        },
        Connection::Cluster(mut c) => match request {
            Request::Script(invocation) => invocation.invoke_async(&mut c).await,
            Request::Command(command) => command.query_async(&mut c).await,
        },
    }
}

/// Whether `error` says the connection is gone (rather than Redis refusing
/// or being slow): the client reconnects, so sending again can succeed.
fn is_dead_connection(error: &RedisError) -> bool {
    !error.is_timeout() && (error.is_connection_dropped() || error.is_unrecoverable_error())
}
