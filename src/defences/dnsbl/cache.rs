//! The DNSBL answers cached per address and zone, bounded, and the
//! lookups in flight, shared by every request and kept across reloads.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::time::Instant;

use super::{Listing, LookupResult, CACHE_CAPACITY};

pub(super) type CacheKey = (IpAddr, Arc<str>);

/// Cached answers per address and zone, bounded, and the lookups in flight.
#[derive(Debug)]
pub struct DnsblCache {
    inner: Mutex<CacheInner>,
    pub(super) capacity: usize,
}

#[derive(Debug, Default)]
pub(super) struct CacheInner {
    pub(super) entries: HashMap<CacheKey, CacheEntry>,
    /// Keys in insertion order, with the insertion number of the entry they
    /// were pushed for: an entry replaced since leaves a stale key behind.
    order: VecDeque<(CacheKey, u64)>,
    inserted: u64,
    pub(super) in_flight: HashMap<CacheKey, watch::Receiver<Option<LookupResult>>>,
}

#[derive(Debug)]
pub(super) struct CacheEntry {
    pub(super) listing: Listing,
    pub(super) expires: Instant,
    number: u64,
}

impl Default for DnsblCache {
    fn default() -> Self {
        DnsblCache::with_capacity(CACHE_CAPACITY)
    }
}

impl DnsblCache {
    /// An empty cache of at most `capacity` answers.
    pub fn with_capacity(capacity: usize) -> Self {
        DnsblCache {
            inner: Mutex::default(),
            capacity: capacity.max(1),
        }
    }

    /// Answers cached now (expired ones included until evicted).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets every answer of `zone`: they were given while its answers
    /// could not be trusted.
    pub(super) fn forget_zone(&self, zone: &str) {
        self.lock().entries.retain(|(_, z), _| &**z != zone);
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        // The data stays consistent even if a holder panicked: every
        // critical section is a few map operations.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl CacheInner {
    pub(super) fn insert(
        &mut self,
        key: CacheKey,
        listing: Listing,
        expires: Instant,
        capacity: usize,
    ) {
        self.inserted += 1;
        let number = self.inserted;
        if !self.entries.contains_key(&key) {
            while self.entries.len() >= capacity {
                let Some((old, old_number)) = self.order.pop_front() else {
                    break;
                };
                if self
                    .entries
                    .get(&old)
                    .is_some_and(|e| e.number == old_number)
                {
                    self.entries.remove(&old);
                }
            }
        }
        self.entries.insert(
            key.clone(),
            CacheEntry {
                listing,
                expires,
                number,
            },
        );
        self.order.push_back((key, number));
        // Replaced entries leave stale keys; drop them before the queue
        // outgrows the map.
        if self.order.len() > 2 * capacity {
            let entries = &self.entries;
            self.order
                .retain(|(key, n)| entries.get(key).is_some_and(|e| e.number == *n));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_cache_is_bounded_and_evicts_the_oldest() {
        let cache = DnsblCache::with_capacity(3);
        let zone: Arc<str> = Arc::from("z.test");
        let later = Instant::now() + Duration::from_secs(60);
        let mut inner = cache.lock();
        for i in 1..=5u8 {
            let key = (IpAddr::from([192, 0, 2, i]), zone.clone());
            inner.insert(key, Listing::NotListed, later, cache.capacity);
        }
        // Replacing an entry does not evict another.
        let key = (IpAddr::from([192, 0, 2, 5]), zone.clone());
        inner.insert(key, Listing::Listed, later, cache.capacity);
        let mut kept: Vec<u8> = inner
            .entries
            .keys()
            .map(|(ip, _)| match ip {
                IpAddr::V4(v4) => v4.octets()[3],
                IpAddr::V6(_) => 0,
            })
            .collect();
        kept.sort_unstable();
        assert_eq!(kept, [3, 4, 5]);
        for _ in 0..10 {
            let key = (IpAddr::from([192, 0, 2, 5]), zone.clone());
            inner.insert(key, Listing::Listed, later, cache.capacity);
        }
        assert!(inner.order.len() <= 6, "stale keys are dropped");
        assert_eq!(inner.entries.len(), 3);
    }
}
