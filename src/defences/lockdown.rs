//! Registration lockdown: when completed user registrations server-wide
//! reach `count` within `period` (a sliding window), every `POST …/register`
//! is refused for `close_for`, then registration reopens by itself. The
//! gate records only user registrations (guests never close registration
//! for everyone), including those whose client hung up before the answer.
//!
//! With the memory store the window and the closing time live in this
//! process, on Tokio's clock. With the Redis store they live in Redis (one
//! script per check or record, Redis' `TIME` as the clock, keys under the
//! `{mgk}` hash tag), so every replica counts together and closes together.
//! A replica that learns of a lockdown keeps it locally until its end and
//! asks Redis no more meanwhile: a lockdown never ends early, so the cached
//! state is exact. While Redis fails, the replica counts and closes on its
//! own (per replica), and goes back to Redis when it answers.
//!
//! The replica whose registration closed registration announces
//! `lockdown_started` and, at the end, `lockdown_ended`.
//!
//! Closing or reopening by hand works while Redis fails too: the replica
//! that took it applies it at once, on its own, and writes it to Redis when
//! Redis answers again (a closing only if it is still in force then), so
//! the other replicas follow. Until then a Redis that comes back, even
//! empty, does not undo it here.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use redis::Script;
use tokio::time::Instant;

use crate::config::LockdownSpec;
use crate::notify::{Event, Notifier};
use crate::ratelimit::RateLimiter;
use crate::store::SharedStore;

/// The error text of the refusal.
pub const CLOSED_MESSAGE: &str = "Registration is temporarily closed";

/// The sliding window and closing time in Redis, on Redis' clock
/// (microseconds).
///
/// KEYS: the window (a sorted set of completion times), the closing time,
/// a sequence making window members unique. ARGV: mode (0: check, 1:
/// record), count, period, close_for.
///
/// Answers `{closed, remaining, started}`: `closed` 1 while registration is
/// closed, `remaining` the time left, `started` 1 when this record closed it.
const LOCKDOWN_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local closed_until = tonumber(redis.call('GET', KEYS[2]))
if closed_until and closed_until > now then return {1, closed_until - now, 0} end
if ARGV[1] == '0' then return {0, 0, 0} end
local count = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local close_for = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - period)
local seq = redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], math.ceil(period / 1000))
redis.call('ZADD', KEYS[1], now, string.format('%.0f:%d', now, seq))
redis.call('PEXPIRE', KEYS[1], math.ceil(period / 1000))
if redis.call('ZCARD', KEYS[1]) >= count then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], string.format('%.0f', now + close_for), 'PX', math.ceil(close_for / 1000))
  return {1, close_for, 1}
end
return {0, 0, 0}
";

/// Closing and reopening by hand (the admin API), and what every replica
/// reads each second to follow them, in Redis on Redis' clock
/// (microseconds).
///
/// KEYS: the closing time, the window, the reopen sequence. ARGV: mode
/// (`close`, `reopen` or `sync`), the closing's length.
///
/// Answers `{remaining, sequence}`: the time registration stays closed (0:
/// open) and how many times it was reopened by hand.
const MANUAL_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode = ARGV[1]
if mode == 'close' then
  local closed_until = now + tonumber(ARGV[2])
  local known = tonumber(redis.call('GET', KEYS[1]))
  if known and known > closed_until then closed_until = known end
  redis.call('SET', KEYS[1], string.format('%.0f', closed_until), 'PX', math.ceil((closed_until - now) / 1000))
  return {closed_until - now, 0}
end
if mode == 'reopen' then
  redis.call('DEL', KEYS[1], KEYS[2])
  return {0, redis.call('INCR', KEYS[3])}
end
local known = tonumber(redis.call('GET', KEYS[1]))
local remaining = 0
if known and known > now then remaining = known - now end
return {remaining, tonumber(redis.call('GET', KEYS[3])) or 0}
";

/// How much later than the closing a replica knows a closing read from
/// Redis must end to be taken as a new one (a longer closing by hand).
const FOLLOW_SLACK: Duration = Duration::from_secs(1);

/// The lockdown of the current configuration; [`Lockdown::reconfigure`]
/// keeps the state across reloads.
#[derive(Clone)]
pub struct Lockdown {
    spec: Option<LockdownSpec>,
    redis: Option<SharedStore>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Lockdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lockdown")
            .field("spec", &self.spec)
            .field("redis", &self.redis.is_some())
            .finish_non_exhaustive()
    }
}

/// What survives reloads.
struct Shared {
    state: Mutex<LocalState>,
    script: Script,
    manual_script: Script,
    /// The last reopen sequence read from Redis (-1: none read yet).
    reopened_seen: AtomicI64,
    notifier: Notifier,
    /// Lockdowns this replica started.
    started: AtomicU64,
}

/// The local window (memory store, or Redis down) and the closing time
/// this replica knows of.
#[derive(Default)]
struct LocalState {
    /// Completion times within the window, oldest first, at most `count`.
    window: VecDeque<Instant>,
    /// When registration reopens, while closed.
    closed_until: Option<Instant>,
    /// Bumped by every closing, so an old end timer does nothing.
    generation: u64,
    /// A closing or reopening by hand Redis did not take, to write there
    /// when it answers again.
    pending: Option<Pending>,
    /// Numbers the pending actions, so one taken while an older one was
    /// being written is not forgotten.
    pending_seq: u64,
}

/// An action by hand waiting for Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Closed until then (local clock).
    Close(u64, Instant),
    /// Reopened.
    Reopen(u64),
}

/// Where a closing or reopening by hand took effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// Written to Redis: every replica follows within a second.
    EveryReplica,
    /// This replica: its state is its own (the memory store).
    ThisReplica,
    /// This replica only, because Redis did not answer (the error); it is
    /// written to Redis when Redis answers again.
    ThisReplicaUntilRedisAnswers(String),
}

/// How a completed registration changed the lockdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Registration stays open (or no lockdown is configured).
    Open,
    /// Registration is closed; this registration closed it when `started`.
    Closed {
        /// Whether this registration was the one that closed it.
        started: bool,
    },
}

impl Lockdown {
    /// A lockdown for `spec`, kept in the limiter's Redis store if it has
    /// one; events go to `notifier`.
    pub fn new(spec: Option<LockdownSpec>, limiter: &RateLimiter, notifier: Notifier) -> Self {
        Lockdown {
            spec,
            redis: limiter.shared_store().cloned(),
            shared: Arc::new(Shared {
                state: Mutex::new(LocalState::default()),
                script: Script::new(LOCKDOWN_SCRIPT),
                manual_script: Script::new(MANUAL_SCRIPT),
                reopened_seen: AtomicI64::new(-1),
                notifier,
                started: AtomicU64::new(0),
            }),
        }
    }

    /// The lockdown for a reloaded configuration, keeping the window and
    /// any closing in force. Removing `lockdown` reopens registration (a
    /// closing by hand without any `lockdown` configured stays).
    pub fn reconfigure(&self, spec: Option<LockdownSpec>, limiter: &RateLimiter) -> Self {
        if spec.is_none() && self.spec.is_some() {
            let mut state = self.shared.lock();
            state.window.clear();
            state.closed_until = None;
            state.generation += 1;
        }
        Lockdown {
            spec,
            redis: limiter.shared_store().cloned(),
            shared: self.shared.clone(),
        }
    }

    /// The configured lockdown, if any.
    pub fn spec(&self) -> Option<LockdownSpec> {
        self.spec
    }

    /// Whether registration is closed now. Asks Redis (one round trip
    /// within `redis_timeout`) only while this replica knows of no closing;
    /// when Redis fails, the local state decides.
    pub async fn is_closed(&self) -> bool {
        let now = Instant::now();
        // Without a configured lockdown only a closing by hand closes; it is
        // known locally (each replica reads Redis every second).
        let Some(spec) = self.spec else {
            return self.shared.closed_at(now);
        };
        if self.shared.closed_at(now) {
            return true;
        }
        let Some(redis) = &self.redis else {
            return false;
        };
        match self.run(redis, "check", spec).await {
            Ok(Recorded::Closed { .. }) => true,
            Ok(Recorded::Open) => false,
            Err(error) => {
                tracing::debug!(%error, "lockdown check could not reach redis; local state decides");
                false
            }
        }
    }

    /// Counts one completed registration; closes registration when the
    /// window is full. With Redis, one round trip within `redis_timeout`;
    /// when Redis fails, the local window counts it.
    pub async fn record(&self) -> Recorded {
        let Some(spec) = self.spec else {
            return Recorded::Open;
        };
        if let Some(redis) = &self.redis {
            match self.run(redis, "record", spec).await {
                Ok(recorded) => return recorded,
                Err(error) => {
                    tracing::debug!(%error, "lockdown record could not reach redis; counted locally");
                }
            }
        }
        self.record_locally(spec, Instant::now())
    }

    fn record_locally(&self, spec: LockdownSpec, now: Instant) -> Recorded {
        let mut state = self.shared.lock();
        if state.closed_until.is_some_and(|until| until > now) {
            return Recorded::Closed { started: false };
        }
        let count = usize::try_from(spec.count).unwrap_or(usize::MAX);
        while state
            .window
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= spec.period.0)
        {
            state.window.pop_front();
        }
        state.window.push_back(now);
        while state.window.len() > count {
            state.window.pop_front();
        }
        if state.window.len() < count {
            return Recorded::Open;
        }
        state.window.clear();
        drop(state);
        self.close(Some(spec), spec.close_for.0, true);
        Recorded::Closed { started: true }
    }

    /// Runs the Redis script; a closing it reports is kept locally.
    async fn run(
        &self,
        redis: &SharedStore,
        mode: &str,
        spec: LockdownSpec,
    ) -> Result<Recorded, crate::store::StoreError> {
        let keys = [
            redis.tagged_key("lockdown:window"),
            redis.tagged_key("lockdown:until"),
            redis.tagged_key("lockdown:seq"),
        ];
        let mode_arg = u64::from(mode == "record");
        let args = [
            mode_arg,
            u64::from(spec.count),
            micros(spec.period.0),
            micros(spec.close_for.0),
        ];
        let answer: Vec<i64> = redis.run_script(&self.shared.script, &keys, &args).await?;
        let [closed, remaining, started] = answer.as_slice() else {
            return Err(crate::store::StoreError::BadAnswer);
        };
        if *closed != 1 {
            return Ok(Recorded::Open);
        }
        let remaining = Duration::from_micros(u64::try_from(*remaining).unwrap_or(0));
        let started = *started == 1;
        self.close(Some(spec), remaining, started);
        Ok(Recorded::Closed { started })
    }

    /// Closes registration for `remaining` from now (unless a later
    /// closing is known), sets the gauge and, for the replica that
    /// `started` it, announces it and its end.
    fn close(&self, spec: Option<LockdownSpec>, remaining: Duration, started: bool) {
        let started = started && spec.is_some();
        let now = Instant::now();
        let until = now + remaining;
        let generation = {
            let mut state = self.shared.lock();
            if state.closed_until.is_some_and(|known| known >= until) && !started {
                return;
            }
            state.closed_until = Some(until);
            state.generation += 1;
            state.generation
        };
        if let Some(spec) = spec.filter(|_| started) {
            self.shared.started.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                count = spec.count,
                period = %spec.period,
                close_for = %spec.close_for,
                "registration closed: too many registrations completed"
            );
            self.shared.notifier.send(Event::LockdownStarted {
                count: spec.count,
                period: spec.period.to_string(),
                close_for: spec.close_for.to_string(),
                until: SystemTime::now() + remaining,
            });
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = Arc::downgrade(&self.shared);
        runtime.spawn(async move {
            tokio::time::sleep_until(until).await;
            let Some(shared) = shared.upgrade() else {
                return;
            };
            {
                let mut state = shared.lock();
                if state.generation != generation {
                    return;
                }
                state.closed_until = None;
            }
            if started {
                tracing::info!("registration reopened");
                shared.notifier.send(Event::LockdownEnded);
            }
        });
    }

    /// Whether this replica knows registration is closed (the gauge).
    pub fn is_known_closed(&self) -> bool {
        self.shared.closed_at(Instant::now())
    }

    /// How long registration stays closed, as this replica knows it.
    pub fn closed_for(&self) -> Option<Duration> {
        let now = Instant::now();
        self.shared
            .lock()
            .closed_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    /// Closes registration by hand for `duration` (a longer closing in
    /// force stays), on every replica when the state is in Redis. When
    /// Redis does not take it, it closes this replica alone and is written
    /// to Redis once Redis answers, if still in force. Returns how long
    /// registration stays closed here, and where the closing took effect.
    pub async fn close_by_hand(&self, duration: Duration) -> (Duration, Reach) {
        let (remaining, reach) = match &self.redis {
            Some(redis) => match self.run_manual(redis, "close", duration).await {
                Ok([remaining, _]) => {
                    self.clear_pending(None);
                    let remaining = Duration::from_micros(u64::try_from(remaining).unwrap_or(0));
                    (remaining, Reach::EveryReplica)
                }
                Err(error) => {
                    let until = Instant::now() + duration;
                    self.set_pending(|seq| Pending::Close(seq, until));
                    tracing::warn!(
                        %error,
                        "registration closed by hand on this replica only: redis did not answer; \
                         the closing is written to redis when it answers again"
                    );
                    (
                        duration,
                        Reach::ThisReplicaUntilRedisAnswers(error.to_string()),
                    )
                }
            },
            None => (duration, Reach::ThisReplica),
        };
        self.close(None, remaining, false);
        let closed_for = self.closed_for().unwrap_or(remaining);
        self.shared.notifier.send(Event::ManualLockdownStarted {
            until: SystemTime::now() + closed_for,
        });
        (closed_for, reach)
    }

    /// Reopens registration by hand now, on every replica when the state
    /// is in Redis (the others follow within a second); the window starts
    /// afresh. When Redis does not take it, it reopens this replica alone
    /// and is written to Redis once Redis answers.
    pub async fn reopen_by_hand(&self) -> Reach {
        let reach = match &self.redis {
            Some(redis) => match self.run_manual(redis, "reopen", Duration::ZERO).await {
                Ok([_, sequence]) => {
                    self.clear_pending(None);
                    self.shared.reopened_seen.store(sequence, Ordering::Relaxed);
                    Reach::EveryReplica
                }
                Err(error) => {
                    self.set_pending(Pending::Reopen);
                    tracing::warn!(
                        %error,
                        "registration reopened by hand on this replica only: redis did not \
                         answer; the reopening is written to redis when it answers again"
                    );
                    Reach::ThisReplicaUntilRedisAnswers(error.to_string())
                }
            },
            None => Reach::ThisReplica,
        };
        self.reopen_locally();
        self.shared.notifier.send(Event::ManualLockdownEnded);
        reach
    }

    /// Records an action by hand Redis did not take (replacing an older
    /// one: the last action wins).
    fn set_pending(&self, pending: impl FnOnce(u64) -> Pending) {
        let mut state = self.shared.lock();
        state.pending_seq += 1;
        state.pending = Some(pending(state.pending_seq));
    }

    /// Forgets the pending action: `Some(seq)` only if it is still that
    /// one, `None` whichever it is (Redis took a newer action).
    fn clear_pending(&self, seq: Option<u64>) {
        let mut state = self.shared.lock();
        let current = match state.pending {
            Some(Pending::Close(seq, _) | Pending::Reopen(seq)) => seq,
            None => return,
        };
        if seq.is_none_or(|seq| seq == current) {
            state.pending = None;
        }
    }

    /// Writes an action by hand Redis did not take when it was made; a
    /// closing that has ended meanwhile is dropped.
    async fn write_pending(&self, redis: &SharedStore) -> Result<(), crate::store::StoreError> {
        let pending = self.shared.lock().pending;
        match pending {
            None => {}
            Some(Pending::Close(seq, until)) => {
                let left = until.saturating_duration_since(Instant::now());
                if !left.is_zero() {
                    let [remaining, _] = self.run_manual(redis, "close", left).await?;
                    let remaining = Duration::from_micros(u64::try_from(remaining).unwrap_or(0));
                    self.close(None, remaining, false);
                    tracing::info!(
                        "redis answers again: the closing by hand made without it is now shared"
                    );
                }
                self.clear_pending(Some(seq));
            }
            Some(Pending::Reopen(seq)) => {
                let [_, sequence] = self.run_manual(redis, "reopen", Duration::ZERO).await?;
                self.shared.reopened_seen.store(sequence, Ordering::Relaxed);
                self.clear_pending(Some(seq));
                tracing::info!(
                    "redis answers again: the reopening by hand made without it is now shared"
                );
            }
        }
        Ok(())
    }

    /// Follows Redis: a closing by hand on another replica closes here, a
    /// reopening by hand reopens here. An action by hand taken here while
    /// Redis failed is written first. Called every second by each replica
    /// using Redis; does nothing without it.
    pub async fn follow_store(&self) {
        let Some(redis) = &self.redis else { return };
        if let Err(error) = self.write_pending(redis).await {
            tracing::debug!(%error, "lockdown sync could not reach redis");
            return;
        }
        let [remaining, sequence] = match self.run_manual(redis, "sync", Duration::ZERO).await {
            Ok(answer) => answer,
            Err(error) => {
                tracing::debug!(%error, "lockdown sync could not reach redis");
                return;
            }
        };
        // Only a higher sequence is a reopening: a lower one is a Redis
        // that lost its data (restarted empty), which reopened nothing.
        let seen = self.shared.reopened_seen.swap(sequence, Ordering::Relaxed);
        if seen >= 0 && sequence > seen {
            self.reopen_locally();
        }
        if remaining > 0 {
            let remaining = Duration::from_micros(u64::try_from(remaining).unwrap_or(0));
            // Read every second, the same closing differs only by the round
            // trip: taking it again would start one more end timer each time.
            let known = self.closed_for();
            if known.is_none_or(|known| remaining > known + FOLLOW_SLACK) {
                self.close(self.spec, remaining, false);
            }
        }
    }

    fn reopen_locally(&self) {
        let mut state = self.shared.lock();
        state.window.clear();
        state.closed_until = None;
        state.generation += 1;
    }

    async fn run_manual(
        &self,
        redis: &SharedStore,
        mode: &str,
        duration: Duration,
    ) -> Result<[i64; 2], crate::store::StoreError> {
        let keys = [
            redis.tagged_key("lockdown:until"),
            redis.tagged_key("lockdown:window"),
            redis.tagged_key("lockdown:reopened"),
        ];
        let args = [mode.to_owned(), micros(duration).to_string()];
        let answer: Vec<i64> = redis
            .run_script(&self.shared.manual_script, &keys, &args)
            .await?;
        match answer.as_slice() {
            [remaining, sequence] => Ok([*remaining, *sequence]),
            _ => Err(crate::store::StoreError::BadAnswer),
        }
    }

    /// Lockdowns this replica started.
    pub fn lockdowns_started(&self) -> u64 {
        self.shared.started.load(Ordering::Relaxed)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, LocalState> {
        // Plain data; a panic elsewhere leaves it usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn closed_at(&self, now: Instant) -> bool {
        self.lock().closed_until.is_some_and(|until| until > now)
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn lockdown(toml: &str) -> Lockdown {
        let config = Config::from_toml(toml).unwrap();
        let limiter = RateLimiter::new(&config.rate_limit);
        Lockdown::new(config.registration.lockdown, &limiter, Notifier::disabled())
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_slides() {
        let l = lockdown(
            "[registration]\nlockdown = { count = 2, period = \"1m\", close_for = \"5m\" }\n",
        );
        assert_eq!(l.record().await, Recorded::Open);
        tokio::time::advance(Duration::from_secs(61)).await;
        // The first one left the window: two more are needed.
        assert_eq!(l.record().await, Recorded::Open);
        assert!(!l.is_closed().await);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(l.record().await, Recorded::Closed { started: true });
        assert!(l.is_closed().await);
        assert!(l.is_known_closed());
        assert_eq!(l.lockdowns_started(), 1);
        tokio::time::advance(Duration::from_secs(299)).await;
        assert!(l.is_closed().await);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!l.is_closed().await);
        // The window starts empty after a lockdown.
        assert_eq!(l.record().await, Recorded::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn removing_the_key_reopens() {
        let l = lockdown(
            "[registration]\nlockdown = { count = 1, period = \"1m\", close_for = \"5m\" }\n",
        );
        l.record().await;
        assert!(l.is_closed().await);
        let limiter = RateLimiter::new(&Default::default());
        let l = l.reconfigure(None, &limiter);
        assert!(!l.is_closed().await);
        assert!(!l.is_known_closed());
    }
}
