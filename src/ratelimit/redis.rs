//! The limits in Redis: shared by every gate replica, over the shared
//! store's connection ([`crate::store`]: reconnecting, retrying a dead
//! connection once, keys under the hash tag `{mgk}`, Redis' clock).
//!
//! One decision is one round trip: a Lua script (sent by `EVALSHA`, loaded on
//! first use) reads the server's `TIME` as the clock, applies GCRA to every
//! key of the decision, and either takes a unit from all of them or from
//! none. Refunds run the same script in refund mode. Keys expire once their
//! state equals a fresh key's. A Redis that is down or slow costs each
//! decision at most `redis_timeout` before the caller falls back. Two more
//! things keep the shared state right across outages:
//!
//! - **A decision carries its deadline.** The gate gives up on a decision
//!   after `redis_timeout`, but its script may already be on its way, and a
//!   stalled Redis runs it when it wakes. The script is given the deadline on
//!   Redis' own clock (the store learns the offset between its clock and
//!   Redis' from every answer) and changes nothing once it has passed.
//! - **Refunds outlive an outage, not a data loss.** A refund Redis cannot
//!   take is queued (bounded) and sent again until Redis answers. Every take
//!   answers with the data set's epoch (a key holding the time it was
//!   created); a refund carries the epoch of its take and is dropped if Redis
//!   came back without that data, so it never frees a unit taken since.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use redis::Script;
use tokio::sync::Notify;

use super::{Budget, CountedAs, LimitKind, LimitSpecs, Subject};
use crate::client_ip::ClientKey;
use crate::config::LimitSpec;
use crate::store::Request;
pub use crate::store::{SharedStore, StoreError};

/// GCRA over several keys, all or nothing, on Redis' own clock
/// (microseconds).
///
/// KEYS: the epoch key, then one key per limit. ARGV: mode (`take`,
/// `refund` or `clock`), the deadline on Redis' clock (0: none), the epoch a
/// refund's units were taken in, then interval and burst for each limit key.
///
/// Answers `{status, wait, index, now, epoch}`; status 1: done, 0: refused
/// (`wait` until the `index`th limit key conforms), 2: the deadline had
/// passed and nothing was changed, 3: a refund for another epoch, dropped.
const GCRA_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode = ARGV[1]
if mode == 'clock' then return {1, 0, 0, now, 0} end
local deadline = tonumber(ARGV[2])
if deadline > 0 and now > deadline then return {2, 0, 0, now, 0} end
local epoch = tonumber(redis.call('GET', KEYS[1]))
if mode == 'refund' then
  if epoch == nil or epoch ~= tonumber(ARGV[3]) then return {3, 0, 0, now, 0} end
  for i = 2, #KEYS do
    local interval = tonumber(ARGV[2 * i])
    local tat = tonumber(redis.call('GET', KEYS[i]))
    if tat then
      tat = tat - interval
      if tat <= now then
        redis.call('DEL', KEYS[i])
      else
        redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000))
      end
    end
  end
  return {1, 0, 0, now, epoch}
end
local next_tats = {}
local worst = 0
local worst_i = 0
for i = 2, #KEYS do
  local interval = tonumber(ARGV[2 * i])
  local burst = tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i]))
  if not tat or tat < now then tat = now end
  local next_tat = tat + interval
  local allow_at = next_tat - interval * burst
  if allow_at > now and allow_at - now > worst then
    worst = allow_at - now
    worst_i = i - 1
  end
  next_tats[i] = next_tat
end
if worst > 0 then return {0, worst, worst_i, now, 0} end
if epoch == nil then
  epoch = now
  redis.call('SET', KEYS[1], string.format('%.0f', epoch))
end
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], string.format('%.0f', next_tats[i]), 'PX', math.ceil((next_tats[i] - now) / 1000))
end
return {1, 0, 0, now, epoch}
";

/// Reads GCRA state without changing it: Redis' `TIME`, then the stored
/// TAT of every key (0 where there is none). Answers `{now, tat...}` in
/// microseconds.
const INSPECT_SCRIPT: &str = r"
local t = redis.call('TIME')
local out = {tonumber(t[1]) * 1000000 + tonumber(t[2])}
for i = 1, #KEYS do
  out[i + 1] = tonumber(redis.call('GET', KEYS[i])) or 0
end
return out
";

/// Refunds kept while Redis cannot take them; past this, new ones are
/// dropped (and counted).
const REFUND_QUEUE_CAPACITY: usize = 10_000;

/// First and longest wait between two attempts to send queued refunds.
const REFUND_RETRY_MIN: Duration = Duration::from_millis(50);
const REFUND_RETRY_MAX: Duration = Duration::from_secs(2);

/// Units taken in Redis: what a refund needs to give them back to the same
/// data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// The epoch of the data set the units were taken from.
    pub epoch: u64,
}

/// What became of a refund Redis answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundOutcome {
    /// The units were given back.
    Refunded,
    /// Redis lost the data the units were taken from (it came back empty);
    /// nothing was changed.
    DataLost,
}

/// Limits kept in Redis.
#[derive(Clone)]
pub struct RedisStore {
    shared: Arc<Shared>,
    specs: LimitSpecs,
}

/// What every store made by [`RedisStore::with_specs`] shares.
struct Shared {
    store: SharedStore,
    script: Script,
    inspect_script: Script,
    refunds: RefundQueue,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("timeout", &self.shared.store.timeout())
            .finish_non_exhaustive()
    }
}

/// The keys and limit arguments of one decision.
#[derive(Debug, Clone)]
struct Decision {
    kinds: Vec<LimitKind>,
    keys: Vec<String>,
    limits: Vec<(u64, u32)>,
}

/// A refund waiting for Redis.
#[derive(Debug, Clone)]
struct QueuedRefund {
    decision: Decision,
    epoch: u64,
}

/// Refunds Redis could not take yet, sent again by one background task.
struct RefundQueue {
    entries: Mutex<VecDeque<QueuedRefund>>,
    /// Whether the task that sends them is running.
    sending: AtomicBool,
    /// Wakes that task early (a decision just went through Redis).
    wake: Arc<Notify>,
    /// Refunds dropped because the queue was full; the first is logged.
    dropped: AtomicU64,
}

impl RefundQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<QueuedRefund>> {
        // The queue holds plain data; a panic elsewhere leaves it usable.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// How a script answered.
enum Answer {
    Done { epoch: u64 },
    Refused { wait: Duration, kind: LimitKind },
    Stale,
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
        let shared = Arc::new(Shared {
            store: SharedStore::connect(url, cluster, timeout)?,
            script: Script::new(GCRA_SCRIPT),
            inspect_script: Script::new(INSPECT_SCRIPT),
            refunds: RefundQueue {
                entries: Mutex::new(VecDeque::new()),
                sending: AtomicBool::new(false),
                wake: Arc::new(Notify::new()),
                dropped: AtomicU64::new(0),
            },
        });
        Ok(RedisStore { shared, specs })
    }

    /// The connection, which bans and the lockdown share.
    pub fn store(&self) -> &SharedStore {
        &self.shared.store
    }

    /// Whether Redis answers a `PING` within `redis_timeout`.
    pub async fn ping(&self) -> bool {
        self.shared.store.ping().await
    }

    /// The same connection, deciding with other limits.
    pub fn with_specs(&self, specs: LimitSpecs) -> Self {
        RedisStore {
            specs,
            ..self.clone()
        }
    }

    fn decision(&self, kinds: &[LimitKind], subject: Subject) -> Decision {
        let mut decision = Decision {
            kinds: Vec::with_capacity(kinds.len()),
            keys: Vec::with_capacity(kinds.len()),
            limits: Vec::with_capacity(kinds.len()),
        };
        for &kind in kinds {
            let (Some(spec), Some(key)) = (self.specs.get(kind), self.shared.key(kind, subject))
            else {
                continue;
            };
            let interval_us = spec.emission_interval().as_micros().max(1) as u64;
            decision.kinds.push(kind);
            decision.keys.push(key);
            decision.limits.push((interval_us, spec.count));
        }
        decision
    }

    /// Takes one unit of each of `kinds` for `key`, all or nothing.
    /// `Ok(Err((limit, wait)))` is a refusal.
    pub async fn acquire(
        &self,
        kinds: &[LimitKind],
        subject: impl Into<Subject>,
    ) -> Result<Result<Reservation, (LimitKind, Duration)>, StoreError> {
        let decision = self.decision(kinds, subject.into());
        if decision.keys.is_empty() {
            return Ok(Ok(Reservation { epoch: 0 }));
        }
        let answer = self.shared.decide(Mode::Take, &decision).await?;
        // Redis answers: a good moment to send refunds it missed (a sender
        // runs exactly while some are queued).
        if self.shared.refunds.sending.load(Ordering::Relaxed) {
            self.shared.refunds.wake.notify_one();
        }
        match answer {
            Answer::Done { epoch } => Ok(Ok(Reservation { epoch })),
            Answer::Refused { wait, kind } => Ok(Err((kind, wait))),
            Answer::Stale => Err(StoreError::BadAnswer),
        }
    }

    /// Gives back one unit of each of `kinds` for `key`, taken by
    /// `reservation`.
    pub async fn refund(
        &self,
        kinds: &[LimitKind],
        subject: impl Into<Subject>,
        reservation: Reservation,
    ) -> Result<RefundOutcome, StoreError> {
        let decision = self.decision(kinds, subject.into());
        if decision.keys.is_empty() {
            return Ok(RefundOutcome::Refunded);
        }
        self.shared
            .refund(&decision, reservation.epoch)
            .await
            .map(|answer| match answer {
                Answer::Stale => RefundOutcome::DataLost,
                _ => RefundOutcome::Refunded,
            })
    }

    /// Gives back one unit of each of `kinds` for `key` in the background,
    /// off the response path. A refund Redis cannot take now is queued and
    /// sent again until it can.
    pub fn refund_in_background(
        &self,
        kinds: &[LimitKind],
        subject: Subject,
        reservation: Reservation,
    ) {
        let decision = self.decision(kinds, subject);
        if decision.keys.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = self.shared.clone();
        runtime.spawn(async move {
            if let Err(error) = shared.refund(&decision, reservation.epoch).await {
                tracing::warn!(%error, "rate-limit refund could not reach redis; queued");
                Shared::queue_refund(
                    &shared,
                    QueuedRefund {
                        decision,
                        epoch: reservation.epoch,
                    },
                );
            }
        });
    }

    /// Refunds waiting for Redis.
    pub fn pending_refunds(&self) -> usize {
        self.shared.refunds.lock().len()
    }

    /// The budget `key` has now under every configured limit (the
    /// server-wide one shared by all), read in one round trip within
    /// `redis_timeout`; changes nothing.
    pub async fn inspect(&self, subject: Subject) -> Result<Vec<Budget>, StoreError> {
        let limits: Vec<(LimitKind, LimitSpec, CountedAs, String)> = LimitKind::ALL
            .iter()
            .filter_map(|&kind| {
                Some((
                    kind,
                    self.specs.get(kind)?,
                    // Redis keeps every client under its own key: no cap.
                    CountedAs::own(kind, subject)?,
                    self.shared.key(kind, subject)?,
                ))
            })
            .collect();
        if limits.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = limits.iter().map(|(.., key)| key.clone()).collect();
        let answer: Vec<i64> = self
            .shared
            .store
            .run_script(&self.shared.inspect_script, &keys, &[] as &[u64])
            .await?;
        let Some((now, tats)) = answer.split_first() else {
            return Err(StoreError::BadAnswer);
        };
        if tats.len() != limits.len() {
            return Err(StoreError::BadAnswer);
        }
        Ok(limits
            .iter()
            .zip(tats)
            .map(|((kind, spec, counted_as, _), tat)| {
                let ahead = u64::try_from(tat.saturating_sub(*now)).unwrap_or(0);
                Budget::from_ahead(*kind, *counted_as, *spec, Duration::from_micros(ahead))
            })
            .collect())
    }

    /// Deletes `key`'s state under every per-client limit (configured or
    /// not), within `redis_timeout`.
    pub async fn reset(&self, key: ClientKey) -> Result<(), StoreError> {
        let mut del = redis::cmd("DEL");
        for kind in LimitKind::ALL.iter().filter(|kind| kind.is_per_client()) {
            del.arg(self.shared.key(*kind, key.into()));
        }
        self.shared
            .store
            .send_in_time::<i64>(&Request::Command(&del))
            .await
            .map(drop)
    }
}

/// What a script run does.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Take,
    Refund { epoch: u64 },
}

impl Shared {
    /// The Redis key `kind` counts `subject` under (`None`: a per-network
    /// limit and no network).
    fn key(&self, kind: LimitKind, subject: Subject) -> Option<String> {
        let name = kind.name();
        Some(if kind.is_global() {
            self.store.tagged_key(name)
        } else if kind.is_per_network() {
            self.store.tagged_key(&format!("{name}:AS{}", subject.asn?))
        } else {
            self.store
                .tagged_key(&format!("{name}:{:032x}", subject.client.0))
        })
    }

    fn epoch_key(&self) -> String {
        self.store.tagged_key("epoch")
    }

    async fn refund(&self, decision: &Decision, epoch: u64) -> Result<Answer, StoreError> {
        self.decide(Mode::Refund { epoch }, decision).await
    }

    /// Runs the script for `decision` within `redis_timeout`, with the
    /// deadline on Redis' clock.
    async fn decide(&self, mode: Mode, decision: &Decision) -> Result<Answer, StoreError> {
        let timeout = self.store.timeout();
        let deadline = Instant::now() + timeout;
        tokio::time::timeout_at(deadline.into(), async {
            let redis_deadline = match self.store.on_redis_clock(deadline) {
                Some(at) => at,
                None => {
                    // The first answer teaches the offset; until then, ask
                    // Redis for its time in the same budget.
                    self.run_script("clock", 0, 0, decision).await?;
                    self.store
                        .on_redis_clock(deadline)
                        .ok_or(StoreError::BadAnswer)?
                }
            };
            // 0 means "no deadline" to the script; a real one is never 0.
            let redis_deadline = redis_deadline.max(1);
            match mode {
                Mode::Take => self.run_script("take", redis_deadline, 0, decision).await,
                Mode::Refund { epoch } => {
                    self.run_script("refund", redis_deadline, epoch, decision)
                        .await
                }
            }
        })
        .await
        .map_err(|_| StoreError::Timeout(timeout))?
    }

    async fn run_script(
        &self,
        mode: &str,
        redis_deadline: i64,
        epoch: u64,
        decision: &Decision,
    ) -> Result<Answer, StoreError> {
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(self.epoch_key())
            .arg(mode)
            .arg(redis_deadline)
            .arg(epoch);
        for (key, (interval_us, burst)) in decision.keys.iter().zip(&decision.limits) {
            invocation.key(key).arg(*interval_us).arg(*burst);
        }
        let answer: Vec<i64> = self.store.send(&Request::Script(&invocation)).await?;
        let [status, wait_us, index, redis_now, epoch] = answer.as_slice() else {
            return Err(StoreError::BadAnswer);
        };
        self.store.observe_clock(*redis_now);
        match status {
            1 => Ok(Answer::Done {
                epoch: u64::try_from(*epoch).map_err(|_| StoreError::BadAnswer)?,
            }),
            0 => {
                let kind = usize::try_from(*index - 1)
                    .ok()
                    .and_then(|i| decision.kinds.get(i))
                    .ok_or(StoreError::BadAnswer)?;
                Ok(Answer::Refused {
                    wait: Duration::from_micros((*wait_us).max(1) as u64),
                    kind: *kind,
                })
            }
            2 => Err(StoreError::PastDeadline),
            3 => Ok(Answer::Stale),
            _ => Err(StoreError::BadAnswer),
        }
    }

    fn queue_refund(shared: &Arc<Shared>, refund: QueuedRefund) {
        {
            let mut entries = shared.refunds.lock();
            if entries.len() >= REFUND_QUEUE_CAPACITY {
                drop(entries);
                if shared.refunds.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        capacity = REFUND_QUEUE_CAPACITY,
                        "rate-limit refund queue full; refunds are dropped"
                    );
                }
                return;
            }
            entries.push_back(refund);
        }
        if !shared.refunds.sending.swap(true, Ordering::AcqRel) {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                shared.refunds.sending.store(false, Ordering::Release);
                return;
            };
            runtime.spawn(send_queued_refunds(
                Arc::downgrade(shared),
                shared.refunds.wake.clone(),
            ));
        }
    }
}

/// Sends queued refunds in order until the queue is empty, waiting between
/// attempts while Redis does not take them. Ends when the store is gone.
async fn send_queued_refunds(weak: Weak<Shared>, wake: Arc<Notify>) {
    let mut delay = REFUND_RETRY_MIN;
    loop {
        let Some(shared) = weak.upgrade() else { return };
        let next = shared.refunds.lock().front().cloned();
        let Some(refund) = next else {
            shared.refunds.sending.store(false, Ordering::Release);
            // A refund queued between the look and the store above would
            // otherwise wait for the next failure to start a sender.
            if shared.refunds.lock().is_empty()
                || shared.refunds.sending.swap(true, Ordering::AcqRel)
            {
                return;
            }
            continue;
        };
        match shared.refund(&refund.decision, refund.epoch).await {
            Ok(answer) => {
                if matches!(answer, Answer::Stale) {
                    tracing::info!("queued rate-limit refund dropped: redis lost its data");
                }
                shared.refunds.lock().pop_front();
                delay = REFUND_RETRY_MIN;
            }
            Err(error) => {
                tracing::debug!(%error, "queued rate-limit refund not taken yet");
                drop(shared);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = wake.notified() => {}
                }
                delay = (delay * 2).min(REFUND_RETRY_MAX);
            }
        }
    }
}
