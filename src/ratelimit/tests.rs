use super::*;

#[test]
fn retry_after_rounds_up_and_is_never_zero() {
    let l = |us: u64| Limited {
        limit: LimitKind::AttemptsPerIp,
        retry_after: Duration::from_micros(us),
    };
    assert_eq!(l(0).retry_after_ms(), 1);
    assert_eq!(l(1).retry_after_ms(), 1);
    assert_eq!(l(1000).retry_after_ms(), 1);
    assert_eq!(l(1001).retry_after_ms(), 2);
    assert_eq!(l(5_181_000).retry_after_ms(), 5181);
    assert_eq!(l(5_181_000).retry_after_secs(), 6);
    assert_eq!(l(1_000_000).retry_after_secs(), 1);
    assert_eq!(l(10).retry_after_secs(), 1);
}

#[tokio::test]
async fn memory_limiter_reserves_and_refunds() {
    let config = crate::config::Config::from_toml(
        "[rate_limit]\nregistrations_per_ip = { count = 1, period = \"1h\" }\n",
    )
    .unwrap();
    let limiter = RateLimiter::new(&config.rate_limit);
    let key = ClientKey(1);
    let kinds = [
        LimitKind::RegistrationsPerIp,
        LimitKind::RegistrationsGlobal,
    ];
    let permit = limiter.acquire(&kinds, key).await.unwrap();
    let refused = limiter.acquire(&kinds, key).await.unwrap_err();
    assert_eq!(refused.limit, LimitKind::RegistrationsPerIp);
    assert!(refused.retry_after > Duration::from_secs(3599));
    assert!(refused.retry_after <= Duration::from_secs(3600));
    permit.settle(false);
    limiter.acquire(&kinds, key).await.unwrap().settle(true);
    assert!(limiter.acquire(&kinds, key).await.is_err());
}

#[test]
fn every_configured_limit_has_its_kind_by_name() {
    let config = RateLimitConfig::default();
    let names: Vec<&str> = config.limits().iter().map(|(name, _)| *name).collect();
    let kinds: Vec<&str> = LimitKind::ALL.iter().map(|kind| kind.name()).collect();
    assert_eq!(names, kinds);
    for kind in LimitKind::ALL {
        assert_eq!(LimitKind::named(kind.name()), Some(kind));
        assert_eq!(LimitKind::ALL[kind as usize], kind);
    }
}

#[tokio::test]
async fn a_network_limit_counts_every_address_of_the_network_and_no_other() {
    let config = crate::config::Config::from_toml(
        "[rate_limit]
registrations_per_asn = { count = 2, period = \"1h\" }\n\
         registrations_per_ip = { count = 10, period = \"1h\" }\n",
    );
    // The per-network limit needs a database in a whole configuration;
    // the limiter alone is built from its section.
    assert!(config.is_err());
    let section: RateLimitConfig = toml::from_str(
        "registrations_per_asn = { count = 2, period = \"1h\" }\n\
         registrations_per_ip = { count = 10, period = \"1h\" }\n",
    )
    .unwrap();
    let limiter = RateLimiter::new(&section);
    let kinds = [
        LimitKind::RegistrationsPerIp,
        LimitKind::RegistrationsPerAsn,
    ];
    let from = |client: u128, asn: Option<u32>| Subject {
        client: ClientKey(client),
        asn,
    };
    limiter
        .acquire(&kinds, from(1, Some(64496)))
        .await
        .unwrap()
        .settle(true);
    let refunded = limiter.acquire(&kinds, from(2, Some(64496))).await.unwrap();
    refunded.settle(false);
    limiter
        .acquire(&kinds, from(3, Some(64496)))
        .await
        .unwrap()
        .settle(true);
    let refused = limiter
        .acquire(&kinds, from(4, Some(64496)))
        .await
        .unwrap_err();
    assert_eq!(refused.limit, LimitKind::RegistrationsPerAsn);
    // All or nothing: the refused request took nothing of its client's.
    let budgets = limiter.inspect(from(4, Some(64496))).await.unwrap();
    let ip = budgets
        .iter()
        .find(|b| b.limit == LimitKind::RegistrationsPerIp)
        .unwrap();
    assert_eq!(
        (ip.remaining, ip.counted_as),
        (10, CountedAs::Own(ClientKey(4)))
    );
    let asn = budgets
        .iter()
        .find(|b| b.limit == LimitKind::RegistrationsPerAsn)
        .unwrap();
    assert_eq!(
        (asn.remaining, asn.counted_as),
        (0, CountedAs::Network(64496))
    );
    assert_eq!(asn.counted_as.to_string(), "AS64496");
    // Another network, and a client of none, are not touched; an ASN's
    // key never meets a client key of the same number.
    limiter
        .acquire(&kinds, from(5, Some(64497)))
        .await
        .unwrap()
        .settle(true);
    for _ in 0..5 {
        limiter
            .acquire(&kinds, from(64496, None))
            .await
            .unwrap()
            .settle(true);
    }
    let none = limiter.inspect(from(64496, None)).await.unwrap();
    assert!(none
        .iter()
        .all(|b| b.limit != LimitKind::RegistrationsPerAsn));
    // Resetting a client leaves its network's budget alone.
    let reset = limiter.reset(ClientKey(1)).await.unwrap();
    assert_eq!(
        reset,
        [(LimitKind::RegistrationsPerIp, CountedAs::Own(ClientKey(1)))]
    );
    assert!(limiter.acquire(&kinds, from(1, Some(64496))).await.is_err());
}
