//! The in-memory store: governor's GCRA over a bounded table of our own.
//!
//! governor does the arithmetic (emission interval `period / count`, burst
//! `count`) on a [`ClientTable`], a state store that knows two things
//! governor's own stores do not:
//!
//! - **Refunds.** A registration unit is reserved before the request is
//!   forwarded and given back when the homeserver does not answer with a
//!   success. governor keeps a theoretical arrival time (TAT) per key; a
//!   refund moves it back by one emission interval.
//! - **A cap.** Once `max_tracked_clients` keys are tracked, a client not
//!   already in the table is counted under its coarse key (IPv4 /16, IPv6
//!   /32); past an eighth more, under one shared overflow key. Memory stays
//!   bounded under a flood of distinct addresses.
//!
//! Entries whose state equals a fresh key's are evicted by
//! [`MemoryStore::housekeeping`], off the request path.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};

use super::{Budget, CountedAs, LimitKind, LimitSpecs, Subject};
use crate::client_ip::ClientKey;
use crate::config::LimitSpec;

const SHARDS: usize = 16;

/// The key every client shares once even coarse keys exceed the cap.
const OVERFLOW_KEY: ClientKey = ClientKey(u128::MAX);

/// A sharded map from client key to GCRA state (the TAT in nanoseconds
/// since the limiter started), with a size cap.
#[derive(Debug)]
pub struct ClientTable {
    shards: Box<[Mutex<HashMap<ClientKey, u64>>]>,
    hasher: std::collections::hash_map::RandomState,
    len: AtomicUsize,
    cap: usize,
}

impl ClientTable {
    /// An empty table holding at most about `cap` keys.
    pub fn new(cap: usize) -> Self {
        ClientTable {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
            len: AtomicUsize::new(0),
            cap,
        }
    }

    fn shard(&self, key: &ClientKey) -> MutexGuard<'_, HashMap<ClientKey, u64>> {
        let index = (self.hasher.hash_one(key) as usize) % self.shards.len();
        // A poisoned shard only means another thread panicked mid-update of
        // plain integers; the data is still usable.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The key a client is actually counted under, given the cap.
    fn effective_key(&self, key: ClientKey) -> ClientKey {
        let len = self.len.load(Ordering::Relaxed);
        if len < self.cap || self.shard(&key).contains_key(&key) {
            return key;
        }
        let coarse = key.coarse();
        if len < self.cap + self.cap / 8 || self.shard(&coarse).contains_key(&coarse) {
            coarse
        } else {
            OVERFLOW_KEY
        }
    }

    /// The key a client is counted under now, named: its own, its coarse
    /// key, or the overflow key.
    pub fn counted_as(&self, key: ClientKey) -> CountedAs {
        match self.effective_key(key) {
            effective if effective == key => CountedAs::Own(key),
            OVERFLOW_KEY => CountedAs::Overflow,
            coarse => CountedAs::Coarse(coarse),
        }
    }

    /// Moves a key's TAT back by `interval` (a refunded unit).
    pub fn refund(&self, key: ClientKey, interval: Nanos) {
        let key = self.effective_key(key);
        if let Some(tat) = self.shard(&key).get_mut(&key) {
            *tat = tat.saturating_sub(interval.as_u64());
        }
    }

    /// Number of tracked keys.
    pub fn tracked(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// The stored TAT of `key` itself (not its coarse or overflow key),
    /// without creating an entry.
    pub fn peek(&self, key: ClientKey) -> Option<u64> {
        self.shard(&key).get(&key).copied()
    }

    /// Forgets `key`'s state: it starts again with a full burst.
    pub fn remove(&self, key: ClientKey) -> bool {
        let removed = self.shard(&key).remove(&key).is_some();
        if removed {
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }
}

impl StateStore for ClientTable {
    type Key = ClientKey;

    fn measure_and_replace<T, F, E>(&self, key: &ClientKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let key = self.effective_key(*key);
        let mut shard = self.shard(&key);
        let old = shard.get(&key).map(|tat| Nanos::from(*tat));
        let (outcome, new) = f(old)?;
        if shard.insert(key, new.as_u64()).is_none() {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        Ok(outcome)
    }
}

impl ShrinkableKeyedStateStore<ClientKey> for ClientTable {
    fn retain_recent(&self, drop_below: Nanos) {
        let drop_below = drop_below.as_u64();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            let before = shard.len();
            shard.retain(|_, tat| *tat >= drop_below);
            self.len.fetch_sub(before - shard.len(), Ordering::Relaxed);
        }
    }

    fn shrink_to_fit(&self) {
        for shard in self.shards.iter() {
            shard
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        self.tracked()
    }

    fn is_empty(&self) -> bool {
        self.tracked() == 0
    }
}

/// A shared handle, so the limiter and the refund path see one table.
#[derive(Debug, Clone)]
pub struct SharedTable(pub Arc<ClientTable>);

impl StateStore for SharedTable {
    type Key = ClientKey;

    fn measure_and_replace<T, F, E>(&self, key: &ClientKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl ShrinkableKeyedStateStore<ClientKey> for SharedTable {
    fn retain_recent(&self, drop_below: Nanos) {
        self.0.retain_recent(drop_below)
    }
    fn shrink_to_fit(&self) {
        self.0.shrink_to_fit()
    }
    fn len(&self) -> usize {
        self.0.tracked()
    }
    fn is_empty(&self) -> bool {
        self.0.tracked() == 0
    }
}

/// The table key behind a [`CountedAs`].
fn stored_key(counted_as: CountedAs) -> ClientKey {
    match counted_as {
        CountedAs::Own(key) | CountedAs::Coarse(key) => key,
        CountedAs::Overflow => OVERFLOW_KEY,
        CountedAs::Server => ClientKey(0),
        CountedAs::Network(asn) => ClientKey(u128::from(asn)),
    }
}

type Limiter<C> = RateLimiter<ClientKey, SharedTable, C, NoOpMiddleware<<C as Clock>::Instant>>;

struct MemoryLimit<C: Clock> {
    limiter: Limiter<C>,
    /// Taken just before governor's own start: the TAT's origin, to within
    /// the microseconds between the two reads (inspection only).
    start: C::Instant,
    table: SharedTable,
    interval: Nanos,
    spec: LimitSpec,
    cap: usize,
}

/// All configured limits, in memory, on clock `C`.
pub struct MemoryStore<C: Clock> {
    limits: [Option<Arc<MemoryLimit<C>>>; LimitKind::COUNT],
    clock: C,
}

impl<C: Clock + Clone> std::fmt::Debug for MemoryStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("tracked", &self.tracked())
            .finish_non_exhaustive()
    }
}

impl<C: Clock + Clone> MemoryStore<C> {
    /// A store for `specs`, tracking at most about `cap` clients per limit.
    pub fn new(specs: &LimitSpecs, cap: usize, clock: C) -> Self {
        Self::carrying_over(specs, cap, clock, None)
    }

    /// A store for `specs` that keeps the state of `previous` for every
    /// limit whose spec and cap are unchanged (a configuration reload).
    pub fn carrying_over(
        specs: &LimitSpecs,
        cap: usize,
        clock: C,
        previous: Option<&MemoryStore<C>>,
    ) -> Self {
        let limits = LimitKind::ALL.map(|kind| {
            let spec = specs.get(kind)?;
            // Networks are as many as the ASN database names, a bounded
            // set no client can add to: they are never made to share keys.
            let cap = if kind.is_global() {
                1
            } else if kind.is_per_network() {
                usize::MAX
            } else {
                cap
            };
            let interval = spec.emission_interval().max(Duration::from_nanos(1));
            let burst = NonZeroU32::new(spec.count).unwrap_or(NonZeroU32::MIN);
            let quota = Quota::with_period(interval)?.allow_burst(burst);
            if let Some(old) = previous.and_then(|p| p.limits[kind as usize].as_ref()) {
                if old.spec == spec && old.cap == cap {
                    // governor's state is a TAT relative to the limiter's own
                    // start, so the old limiter is kept whole.
                    return Some(old.clone());
                }
            }
            let table = SharedTable(Arc::new(ClientTable::new(cap)));
            let start = clock.now();
            Some(Arc::new(MemoryLimit {
                limiter: RateLimiter::new(quota, table.clone(), clock.clone()),
                start,
                table,
                interval: interval.into(),
                spec,
                cap,
            }))
        });
        MemoryStore { limits, clock }
    }

    /// Takes one unit of each of `kinds` for `key`, all or nothing. On
    /// refusal returns the longest wait among the refusing limits.
    pub fn acquire(
        &self,
        kinds: &[LimitKind],
        subject: impl Into<Subject>,
    ) -> Result<(), (LimitKind, Duration)> {
        let subject = subject.into();
        let mut taken: Vec<LimitKind> = Vec::with_capacity(kinds.len());
        let mut refused: Option<(LimitKind, Duration)> = None;
        for &kind in kinds {
            let (Some(limit), Some(key)) = (&self.limits[kind as usize], kind.key_for(subject))
            else {
                continue;
            };
            match limit.limiter.check_key(&key) {
                Ok(()) => taken.push(kind),
                Err(not_until) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    if refused.is_none_or(|(_, w)| wait > w) {
                        refused = Some((kind, wait));
                    }
                }
            }
        }
        match refused {
            None => Ok(()),
            Some(refusal) => {
                self.refund(&taken, subject);
                Err(refusal)
            }
        }
    }

    /// Gives back one unit of each of `kinds` for `subject`.
    pub fn refund(&self, kinds: &[LimitKind], subject: impl Into<Subject>) {
        let subject = subject.into();
        for &kind in kinds {
            if let (Some(limit), Some(key)) = (&self.limits[kind as usize], kind.key_for(subject)) {
                limit.table.0.refund(key, limit.interval);
            }
        }
    }

    /// The budget `key` has now under every configured limit (the
    /// server-wide one shared by all), read under the key each limit counts
    /// it under (see [`CountedAs`]); changes nothing.
    pub fn inspect(&self, subject: impl Into<Subject>) -> Vec<Budget> {
        let subject = subject.into();
        let now = self.clock.now();
        LimitKind::ALL
            .iter()
            .filter_map(|&kind| {
                let limit = self.limits[kind as usize].as_ref()?;
                let counted_as = self.counted_as(kind, limit, subject)?;
                let elapsed = now.duration_since(limit.start).as_u64();
                let ahead = limit
                    .table
                    .0
                    .peek(stored_key(counted_as))
                    .map_or(0, |tat| tat.saturating_sub(elapsed));
                Some(Budget::from_ahead(
                    kind,
                    counted_as,
                    limit.spec,
                    Duration::from_nanos(ahead),
                ))
            })
            .collect()
    }

    /// Forgets the state `key` is counted under by every per-client limit:
    /// its own key's, or the coarse or overflow key's it shares with other
    /// clients (then theirs too). Returns the key reset per limit.
    pub fn reset(&self, key: ClientKey) -> Vec<(LimitKind, CountedAs)> {
        LimitKind::ALL
            .iter()
            .zip(&self.limits)
            .filter(|(kind, _)| kind.is_per_client())
            .filter_map(|(&kind, limit)| {
                let limit = limit.as_ref()?;
                let counted_as = self.counted_as(kind, limit, key.into())?;
                limit.table.0.remove(stored_key(counted_as));
                Some((kind, counted_as))
            })
            .collect()
    }

    fn counted_as(
        &self,
        kind: LimitKind,
        limit: &MemoryLimit<C>,
        subject: Subject,
    ) -> Option<CountedAs> {
        if kind.is_per_client() {
            Some(limit.table.0.counted_as(subject.client))
        } else {
            CountedAs::own(kind, subject)
        }
    }

    /// Evicts state that equals a fresh key's and releases memory.
    pub fn housekeeping(&self) {
        for limit in self.limits.iter().flatten() {
            limit.limiter.retain_recent();
            limit.limiter.shrink_to_fit();
        }
    }

    /// Keys tracked, summed over all limits.
    pub fn tracked(&self) -> usize {
        self.limits
            .iter()
            .flatten()
            .map(|l| l.table.0.tracked())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HumanDuration, LimitSpec};
    use governor::clock::FakeRelativeClock;

    fn spec(count: u32, secs: u64) -> Option<LimitSpec> {
        Some(LimitSpec {
            count,
            period: HumanDuration::secs(secs),
        })
    }

    fn store(specs: LimitSpecs, cap: usize) -> (MemoryStore<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (MemoryStore::new(&specs, cap, clock.clone()), clock)
    }

    fn specs_with(kind: LimitKind, limit: Option<LimitSpec>) -> LimitSpecs {
        let mut specs = LimitSpecs::default();
        specs.0[kind as usize] = limit;
        specs
    }

    const KEY: ClientKey = ClientKey(42);

    #[test]
    fn burst_is_allowed_exactly_and_retry_is_one_interval() {
        let kind = LimitKind::AttemptsPerIp;
        let (s, clock) = store(specs_with(kind, spec(3, 3600)), 100);
        for _ in 0..3 {
            assert_eq!(s.acquire(&[kind], KEY), Ok(()));
        }
        assert_eq!(
            s.acquire(&[kind], KEY),
            Err((kind, Duration::from_secs(1200)))
        );
        clock.advance(Duration::from_secs(1199));
        assert_eq!(s.acquire(&[kind], KEY), Err((kind, Duration::from_secs(1))));
        clock.advance(Duration::from_secs(1));
        assert_eq!(s.acquire(&[kind], KEY), Ok(()));
        assert!(s.acquire(&[kind], KEY).is_err());
        // Other keys are independent.
        assert_eq!(s.acquire(&[kind], ClientKey(7)), Ok(()));
    }

    #[test]
    fn refund_gives_the_unit_back() {
        let kind = LimitKind::RegistrationsPerIp;
        let (s, _clock) = store(specs_with(kind, spec(2, 60)), 100);
        for _ in 0..10 {
            assert_eq!(s.acquire(&[kind], KEY), Ok(()));
            s.refund(&[kind], KEY);
        }
        assert_eq!(s.acquire(&[kind], KEY), Ok(()));
        assert_eq!(s.acquire(&[kind], KEY), Ok(()));
        assert_eq!(
            s.acquire(&[kind], KEY),
            Err((kind, Duration::from_secs(30)))
        );
    }

    #[test]
    fn acquire_is_all_or_nothing_across_limits() {
        let mut specs = specs_with(LimitKind::RegistrationsPerIp, spec(5, 60));
        specs.0[LimitKind::RegistrationsGlobal as usize] = spec(1, 60);
        let (s, _clock) = store(specs, 100);
        let both = [
            LimitKind::RegistrationsPerIp,
            LimitKind::RegistrationsGlobal,
        ];
        assert_eq!(s.acquire(&both, KEY), Ok(()));
        // The global ceiling refuses; the per-client unit is given back.
        assert_eq!(
            s.acquire(&both, ClientKey(9)),
            Err((LimitKind::RegistrationsGlobal, Duration::from_secs(60)))
        );
        s.refund(&[LimitKind::RegistrationsGlobal], KEY);
        for _ in 0..5 {
            assert_eq!(
                s.acquire(&[LimitKind::RegistrationsPerIp], ClientKey(9)),
                Ok(())
            );
        }
    }

    #[test]
    fn reconfiguring_keeps_the_state_of_unchanged_limits() {
        let mut specs = specs_with(LimitKind::AttemptsPerIp, spec(1, 60));
        specs.0[LimitKind::GuestsPerIp as usize] = spec(1, 60);
        let (s, clock) = store(specs, 100);
        s.acquire(&[LimitKind::AttemptsPerIp], KEY).unwrap();
        s.acquire(&[LimitKind::GuestsPerIp], KEY).unwrap();
        let mut changed = specs;
        changed.0[LimitKind::GuestsPerIp as usize] = spec(2, 60);
        let next = MemoryStore::carrying_over(&changed, 100, clock.clone(), Some(&s));
        assert!(
            next.acquire(&[LimitKind::AttemptsPerIp], KEY).is_err(),
            "state kept"
        );
        assert!(
            next.acquire(&[LimitKind::GuestsPerIp], KEY).is_ok(),
            "changed limit starts fresh"
        );
    }

    #[test]
    fn inspect_reads_the_budget_and_reset_restores_it() {
        let kind = LimitKind::RegistrationsPerIp;
        let (s, clock) = store(specs_with(kind, spec(2, 60)), 100);
        let fresh = s.inspect(KEY);
        assert_eq!(fresh.len(), 1);
        assert_eq!(
            (fresh[0].remaining, fresh[0].next_unit_in),
            (2, Duration::ZERO)
        );
        s.acquire(&[kind], KEY).unwrap();
        s.acquire(&[kind], KEY).unwrap();
        let spent = s.inspect(KEY)[0];
        assert_eq!(spent.remaining, 0);
        assert_eq!(spent.next_unit_in, Duration::from_secs(30));
        assert_eq!(spent.full_in, Duration::from_secs(60));
        clock.advance(Duration::from_secs(40));
        let partly = s.inspect(KEY)[0];
        assert_eq!(partly.remaining, 1);
        assert_eq!(partly.next_unit_in, Duration::from_secs(20));
        assert_eq!(s.inspect(KEY)[0], partly, "inspection takes nothing");
        assert_eq!(s.tracked(), 1);
        s.reset(KEY);
        assert_eq!(s.tracked(), 0);
        assert_eq!(s.inspect(KEY)[0].remaining, 2);
        s.acquire(&[kind], KEY).unwrap();
        s.acquire(&[kind], KEY).unwrap();
    }

    #[test]
    fn unconfigured_limits_never_refuse() {
        let (s, _clock) = store(LimitSpecs::default(), 100);
        for _ in 0..1000 {
            assert_eq!(s.acquire(&LimitKind::ALL, KEY), Ok(()));
        }
        assert_eq!(s.tracked(), 0);
    }

    #[test]
    fn housekeeping_evicts_state_equal_to_fresh() {
        let kind = LimitKind::AttemptsPerIp;
        let (s, clock) = store(specs_with(kind, spec(2, 60)), 1000);
        for i in 0..100 {
            s.acquire(&[kind], ClientKey(i)).unwrap();
        }
        assert_eq!(s.tracked(), 100);
        s.housekeeping();
        assert_eq!(s.tracked(), 100, "recent state stays");
        clock.advance(Duration::from_secs(61));
        s.housekeeping();
        assert_eq!(s.tracked(), 0);
    }

    #[test]
    fn over_the_cap_new_clients_share_coarse_keys() {
        let kind = LimitKind::AttemptsPerIp;
        let (s, _clock) = store(specs_with(kind, spec(1, 3600)), 10);
        let v4 = |a: u8, b: u8, c: u8, d: u8| ClientKey::v4(std::net::Ipv4Addr::new(a, b, c, d));
        for i in 0..10 {
            s.acquire(&[kind], v4(10, 0, 0, i)).unwrap();
        }
        assert_eq!(s.tracked(), 10);
        // A new client in 192.0.0.0/16 gets the coarse key: the first passes,
        // a second new client of the same /16 shares its budget.
        assert_eq!(s.acquire(&[kind], v4(192, 0, 2, 1)), Ok(()));
        assert!(s.acquire(&[kind], v4(192, 0, 7, 7)).is_err());
        // Tracked clients keep their own key.
        assert!(s.acquire(&[kind], v4(10, 0, 0, 3)).is_err());
        // Memory stays bounded: a flood of new addresses adds at most the
        // coarse keys up to cap + cap/8, then one overflow key.
        for i in 0..200u8 {
            let _ = s.acquire(&[kind], v4(i, i, 1, 1));
        }
        assert!(s.tracked() <= 10 + 10 / 8 + 1, "tracked {}", s.tracked());
    }
    #[test]
    fn inspect_and_reset_follow_the_key_a_client_is_counted_under() {
        let kind = LimitKind::AttemptsPerIp;
        let (s, _clock) = store(specs_with(kind, spec(1, 3600)), 8);
        let v4 = |a: u8, b: u8, c: u8, d: u8| ClientKey::v4(std::net::Ipv4Addr::new(a, b, c, d));
        for i in 0..8 {
            s.acquire(&[kind], v4(10, 0, 0, i)).unwrap();
        }
        // Over the cap: a new client is counted under its /16, which a
        // neighbour spent.
        let (client, neighbour) = (v4(192, 0, 2, 1), v4(192, 0, 7, 7));
        s.acquire(&[kind], neighbour).unwrap();
        let seen = s.inspect(client)[0];
        assert_eq!(seen.counted_as, CountedAs::Coarse(v4(192, 0, 0, 0)));
        assert_eq!(seen.counted_as.to_string(), "192.0.0.0/16");
        assert!(seen.counted_as.is_shared());
        assert_eq!(
            seen.remaining, 0,
            "the shared key's budget, not a fresh one"
        );
        assert!(s.acquire(&[kind], client).is_err());
        // A tracked client is still counted under its own key.
        assert_eq!(
            s.inspect(v4(10, 0, 0, 3))[0].counted_as,
            CountedAs::Own(v4(10, 0, 0, 3))
        );
        // The reset forgets the shared key: the client and its neighbour
        // both get their budget back.
        assert_eq!(
            s.reset(client),
            [(kind, CountedAs::Coarse(v4(192, 0, 0, 0)))]
        );
        assert_eq!(s.inspect(client)[0].remaining, 1);
        s.acquire(&[kind], neighbour).unwrap();
        // Past an eighth more (8 own keys and one coarse), new clients
        // share the overflow key.
        assert_eq!(s.tracked(), 9);
        let far = v4(203, 0, 113, 9);
        assert_eq!(s.inspect(far)[0].counted_as, CountedAs::Overflow);
        assert_eq!(s.inspect(far)[0].counted_as.to_string(), "overflow");
        s.acquire(&[kind], far).unwrap();
        let other = v4(198, 51, 100, 1);
        assert!(s.acquire(&[kind], other).is_err(), "one overflow budget");
        assert_eq!(s.reset(other), [(kind, CountedAs::Overflow)]);
        assert_eq!(s.acquire(&[kind], far), Ok(()));
    }
}
