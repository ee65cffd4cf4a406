//! The Redis store: limits shared by every gate replica.
//!
//! One decision is one round trip: a Lua script (sent by `EVALSHA`, loaded on
//! first use) reads the server's `TIME` as the clock, applies GCRA to every
//! key of the decision, and either takes a unit from all of them or from
//! none. Refunds run the same script in refund mode. Keys carry the hash tag
//! `{mgk}`, so a multi-key decision stays in one slot on Redis Cluster, and
//! expire once their state equals a fresh key's.
//!
//! The connection is made lazily and re-made on its own after failures; a
//! Redis that is down at start-up, or goes away later, costs each decision
//! at most `redis_timeout` before the caller falls back.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::Script;
use tokio::sync::RwLock;

use super::{LimitKind, LimitSpecs};
use crate::client_ip::ClientKey;

/// GCRA over several keys, all or nothing, on Redis' own clock
/// (microseconds). ARGV: mode, then interval and burst for each key.
const GCRA_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local refund = ARGV[1] == 'refund'
local next_tats = {}
local worst = 0
local worst_i = 0
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', key))
  if refund then
    if tat then
      tat = tat - interval
      if tat <= now then
        redis.call('DEL', key)
      else
        redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000))
      end
    end
  else
    if not tat or tat < now then tat = now end
    local next_tat = tat + interval
    local allow_at = next_tat - interval * burst
    if allow_at > now and allow_at - now > worst then
      worst = allow_at - now
      worst_i = i
    end
    next_tats[i] = next_tat
  end
end
if refund then return {1, 0, 0} end
if worst > 0 then return {0, worst, worst_i} end
for i, key in ipairs(KEYS) do
  redis.call('SET', key, string.format('%.0f', next_tats[i]), 'PX', math.ceil((next_tats[i] - now) / 1000))
end
return {1, 0, 0}
";

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
    Redis(#[from] redis::RedisError),
    /// Redis did not answer within `redis_timeout`.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The script answered something unexpected.
    #[error("unexpected answer from the rate-limit script")]
    BadAnswer,
}

/// Limits kept in Redis.
#[derive(Clone)]
pub struct RedisStore {
    connection: Arc<RwLock<Option<Connection>>>,
    script: Arc<Script>,
    specs: LimitSpecs,
    timeout: Duration,
    prefix: Arc<str>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store for `specs` at `url` (with `cluster`, a comma-separated list
    /// of Redis Cluster seed nodes). Connects in the background; never
    /// blocks.
    pub fn new(
        url: &str,
        cluster: bool,
        specs: LimitSpecs,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let store = RedisStore {
            connection: Arc::new(RwLock::new(None)),
            script: Arc::new(Script::new(GCRA_SCRIPT)),
            specs,
            timeout,
            prefix: Arc::from("mgk"),
        };
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
            if let Ok(mut slot) = store.connection.try_write() {
                *slot = Some(Connection::Single(manager));
            }
        } else {
            let client = redis::cluster::ClusterClient::builder(nodes)
                .connection_timeout(timeout.max(Duration::from_millis(200)))
                .response_timeout(timeout)
                .retries(1)
                .build()?;
            let slot = store.connection.clone();
            tokio::spawn(async move {
                let mut delay = Duration::from_millis(100);
                loop {
                    match client.get_async_connection().await {
                        Ok(connection) => {
                            *slot.write().await = Some(Connection::Cluster(connection));
                            tracing::info!("connected to redis cluster");
                            return;
                        }
                        Err(error) => {
                            tracing::warn!(%error, "cannot connect to redis cluster; retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            });
        }
        Ok(store)
    }

    /// The same connection, deciding with other limits.
    pub fn with_specs(&self, specs: LimitSpecs) -> Self {
        RedisStore {
            specs,
            ..self.clone()
        }
    }

    fn key(&self, kind: LimitKind, key: ClientKey) -> String {
        if kind.is_global() {
            format!("{{{}}}:{}", self.prefix, kind.name())
        } else {
            format!("{{{}}}:{}:{:032x}", self.prefix, kind.name(), key.0)
        }
    }

    /// Runs the script; answers whether the units were taken, and if not,
    /// the wait and the limit that refused.
    async fn run(
        &self,
        mode: &str,
        kinds: &[LimitKind],
        key: ClientKey,
    ) -> Result<Option<(Duration, LimitKind)>, StoreError> {
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(mode);
        let mut included: Vec<LimitKind> = Vec::with_capacity(kinds.len());
        for &kind in kinds {
            let Some(spec) = self.specs.get(kind) else {
                continue;
            };
            included.push(kind);
            let interval_us = spec.emission_interval().as_micros().max(1) as u64;
            invocation
                .key(self.key(kind, key))
                .arg(interval_us)
                .arg(spec.count);
        }
        if included.is_empty() {
            return Ok(None);
        }
        let connection = self.connection.read().await.clone();
        let Some(connection) = connection else {
            return Err(StoreError::NotConnected);
        };
        let call = async {
            match connection {
                Connection::Single(mut c) => invocation.invoke_async::<Vec<i64>>(&mut c).await,
                Connection::Cluster(mut c) => invocation.invoke_async::<Vec<i64>>(&mut c).await,
            }
        };
        let answer = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| StoreError::Timeout(self.timeout))??;
        match answer.as_slice() {
            [1, _, _] => Ok(None),
            [0, wait_us, index] => {
                let kind = usize::try_from(*index - 1)
                    .ok()
                    .and_then(|i| included.get(i))
                    .ok_or(StoreError::BadAnswer)?;
                Ok(Some((
                    Duration::from_micros((*wait_us).max(1) as u64),
                    *kind,
                )))
            }
            _ => Err(StoreError::BadAnswer),
        }
    }

    /// Takes one unit of each of `kinds` for `key`, all or nothing.
    /// `Ok(Err((limit, wait)))` is a refusal.
    pub async fn acquire(
        &self,
        kinds: &[LimitKind],
        key: ClientKey,
    ) -> Result<Result<(), (LimitKind, Duration)>, StoreError> {
        Ok(match self.run("take", kinds, key).await? {
            None => Ok(()),
            Some((wait, kind)) => Err((kind, wait)),
        })
    }

    /// Gives back one unit of each of `kinds` for `key`.
    pub async fn refund(&self, kinds: &[LimitKind], key: ClientKey) -> Result<(), StoreError> {
        self.run("refund", kinds, key).await.map(|_| ())
    }
}
