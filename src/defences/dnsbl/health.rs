//! Whether each DNSBL zone answers as a list must, by its RFC 5782 test
//! points: every list lists `127.0.0.2` (asked as `2.0.0.127.<zone>`) and
//! no list lists `127.0.0.1` (`1.0.0.127.<zone>`).
//!
//! A list that has shut down, or that punishes a resolver asking too much,
//! may start to answer "listed" for every address; taken at its word it
//! would refuse every client. So a zone that lists `127.0.0.1` or does not
//! list `127.0.0.2` is *unhealthy*: it is not asked, and a lookup in it
//! fails ([`LookupError::ZoneUnhealthy`]), so `on_dnsbl_error` decides,
//! until a later check passes. A check whose questions go unanswered
//! changes nothing (a lookup in an unreachable zone fails on its own). A
//! zone not checked yet is trusted: the checks run in the background and
//! never delay start-up or a request.
//!
//! The gate checks at start, every [`HEALTH_CHECK_EVERY`], and after a
//! reload that changes the zones or the DNS server. One warning is logged
//! when a zone becomes unhealthy and one info line when it recovers.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{lookup, query_name, Dnsbl, Listing, LookupError};

/// How often every zone's test points are asked. A constant rather than a
/// setting: two queries per zone every ten minutes cost a list nothing,
/// and a broken list is noticed within this time.
pub const HEALTH_CHECK_EVERY: Duration = Duration::from_secs(600);

/// The address every DNSBL lists (RFC 5782, section 5).
pub const LISTED_TEST_POINT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// The address no DNSBL lists (RFC 5782, section 5).
pub const UNLISTED_TEST_POINT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

/// Why a zone's answers are not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unhealthy {
    /// It lists `127.0.0.1`: it answers "listed" for anything.
    #[error("it lists the test point 127.0.0.1, which no list lists")]
    ListsUnlistedTestPoint,
    /// It does not list `127.0.0.2`: it lists nothing, or is not a DNSBL.
    #[error("it does not list the test point 127.0.0.2, which every list lists")]
    MissesListedTestPoint,
    /// A test point could not be asked.
    #[error("its test point could not be looked up: {0}")]
    LookupFailed(LookupError),
}

/// What the answers about the two test points say about a zone.
pub fn judge(
    listed: Result<Listing, LookupError>,
    unlisted: Result<Listing, LookupError>,
) -> Result<(), Unhealthy> {
    match (listed, unlisted) {
        // The worst answer first: a list refusing everyone.
        (_, Ok(Listing::Listed)) => Err(Unhealthy::ListsUnlistedTestPoint),
        (Err(error), _) | (_, Err(error)) => Err(Unhealthy::LookupFailed(error)),
        (Ok(Listing::NotListed), Ok(Listing::NotListed)) => Err(Unhealthy::MissesListedTestPoint),
        (Ok(Listing::Listed), Ok(Listing::NotListed)) => Ok(()),
    }
}

/// The last check's result for each zone, shared by every configuration
/// and kept across reloads.
#[derive(Debug, Default)]
pub struct ZoneHealth {
    zones: Mutex<HashMap<Arc<str>, Result<(), Unhealthy>>>,
}

impl ZoneHealth {
    /// Why `zone` is not trusted now; `None` when it passed its last check
    /// or was not checked yet.
    pub fn unhealthy(&self, zone: &str) -> Option<Unhealthy> {
        self.lock()
            .get(zone)
            .and_then(|result| result.clone().err())
    }

    /// Records a check of `zone`, logging when it becomes unhealthy or
    /// recovers. Returns whether its trust changed.
    pub fn record(&self, zone: &Arc<str>, result: Result<(), Unhealthy>) -> bool {
        let was_trusted = self.lock().get(zone).is_none_or(Result::is_ok);
        let trusted = result.is_ok();
        match &result {
            Err(reason) if was_trusted => tracing::warn!(
                %zone,
                %reason,
                "DNSBL zone fails its test-point check: its answers are not trusted, \
                 and a lookup in it counts as failed (on_dnsbl_error decides)"
            ),
            Ok(()) if !was_trusted => {
                tracing::info!(%zone, "DNSBL zone passes its test-point check again")
            }
            _ => {}
        }
        self.lock().insert(zone.clone(), result);
        was_trusted != trusted
    }

    /// Forgets the zones not in `zones` (no longer configured).
    pub fn retain(&self, zones: &[Arc<str>]) {
        self.lock().retain(|zone, _| zones.contains(zone));
    }

    /// Each checked zone and whether it passed its last check, by name.
    pub fn snapshot(&self) -> Vec<(Arc<str>, bool)> {
        let mut zones: Vec<_> = self
            .lock()
            .iter()
            .map(|(zone, result)| (zone.clone(), result.is_ok()))
            .collect();
        zones.sort();
        zones
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Result<(), Unhealthy>>> {
        // Every critical section is one map operation: the data stays
        // consistent even if a holder panicked.
        self.zones
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

// === impl Dnsbl ===

impl Dnsbl {
    /// Asks every zone about its test points, concurrently, each lookup
    /// bounded by the timeout, and records the results. The answers are not
    /// cached: a check asks the list itself. A zone whose trust changes
    /// loses its cached answers.
    pub async fn check_health(&self) {
        let mut checks = tokio::task::JoinSet::new();
        for zone in self.zones.iter() {
            let zone = zone.clone();
            let resolver = self.resolver.clone();
            let timeout = self.timeout;
            checks.spawn(async move {
                let ask = |point: Ipv4Addr| {
                    let asked = lookup(&resolver, query_name(IpAddr::V4(point), &zone));
                    async move {
                        match tokio::time::timeout(timeout, asked).await {
                            Ok(answer) => answer.map(|(listing, _)| listing),
                            Err(_) => Err(LookupError::Timeout),
                        }
                    }
                };
                let (listed, unlisted) =
                    tokio::join!(ask(LISTED_TEST_POINT), ask(UNLISTED_TEST_POINT));
                (zone, judge(listed, unlisted))
            });
        }
        while let Some(checked) = checks.join_next().await {
            // A check that panicked leaves its zone as it was.
            let Ok((zone, result)) = checked else {
                continue;
            };
            // A lost answer says nothing about what the list answers: the
            // zone keeps its verdict (a lookup in an unreachable zone fails
            // anyway, and `on_dnsbl_error` decides it). Marking it
            // unhealthy would let one dropped packet refuse every client
            // for ten minutes under `on_dnsbl_error = "deny"`.
            if let Err(Unhealthy::LookupFailed(error)) = &result {
                tracing::debug!(%zone, %error, "DNSBL test-point check not answered; zone kept as it was");
                continue;
            }
            if self.health.record(&zone, result) {
                self.cache.forget_zone(&zone);
            }
        }
        self.health.retain(&self.zones);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zone_is_healthy_only_when_it_lists_exactly_the_listed_test_point() {
        use Listing::{Listed, NotListed};
        assert_eq!(judge(Ok(Listed), Ok(NotListed)), Ok(()));
        assert_eq!(
            judge(Ok(Listed), Ok(Listed)),
            Err(Unhealthy::ListsUnlistedTestPoint)
        );
        assert_eq!(
            judge(Err(LookupError::Timeout), Ok(Listed)),
            Err(Unhealthy::ListsUnlistedTestPoint)
        );
        assert_eq!(
            judge(Ok(NotListed), Ok(NotListed)),
            Err(Unhealthy::MissesListedTestPoint)
        );
        assert_eq!(
            judge(Ok(Listed), Err(LookupError::ServerFailure(2))),
            Err(Unhealthy::LookupFailed(LookupError::ServerFailure(2)))
        );
        assert_eq!(
            judge(Err(LookupError::Timeout), Ok(NotListed)),
            Err(Unhealthy::LookupFailed(LookupError::Timeout))
        );
    }

    #[test]
    fn trust_changes_are_reported_once_and_unchecked_zones_are_trusted() {
        let health = ZoneHealth::default();
        let zone: Arc<str> = Arc::from("z.test");
        assert_eq!(health.unhealthy("z.test"), None);
        assert!(health.snapshot().is_empty(), "not checked, not exported");
        assert!(!health.record(&zone, Ok(())));
        assert!(health.record(&zone, Err(Unhealthy::MissesListedTestPoint)));
        assert!(!health.record(&zone, Err(Unhealthy::ListsUnlistedTestPoint)));
        assert_eq!(
            health.unhealthy("z.test"),
            Some(Unhealthy::ListsUnlistedTestPoint)
        );
        assert_eq!(health.snapshot(), [(zone.clone(), false)]);
        assert!(health.record(&zone, Ok(())));
        assert_eq!(health.snapshot(), [(zone.clone(), true)]);
        health.retain(&[Arc::from("other.test")]);
        assert!(health.snapshot().is_empty());
    }
}
