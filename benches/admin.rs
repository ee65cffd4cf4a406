//! What the admin API adds to a registration decision: looking the client
//! up in this replica's copy of the temporary bans (empty, a few, many),
//! and what an inspection of the in-memory limits costs.

use std::net::IpAddr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use matrix_gatekeeper::client_ip::{ClientKey, IpNet};
use matrix_gatekeeper::config::Config;
use matrix_gatekeeper::defences::bans::Bans;
use matrix_gatekeeper::ratelimit::{LimitKind, RateLimiter};

/// A table holding `n` bans of distinct /24s, none covering the client.
fn bans_with(runtime: &tokio::runtime::Runtime, n: u32) -> Bans {
    let bans = Bans::default();
    runtime.block_on(async {
        for i in 0..n {
            let net: IpNet = format!("10.{}.{}.0/24", i / 256, i % 256).parse().unwrap();
            bans.add(net, Duration::from_secs(3600), "bench")
                .await
                .unwrap();
        }
    });
    bans
}

fn admin(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let client: IpAddr = "198.51.100.7".parse().unwrap();
    for n in [0, 10, 1000] {
        let bans = bans_with(&runtime, n);
        c.bench_function(
            &format!("bans: lookup of an unbanned client, {n} bans"),
            |b| b.iter(|| std::hint::black_box(bans.find(std::hint::black_box(client)))),
        );
    }

    let config = Config::from_toml(
        "[rate_limit]\nregistrations_per_ip = { count = 3, period = \"1h\" }\n\
         attempts_per_ip = { count = 30, period = \"1h\" }\n",
    )
    .unwrap();
    let _guard = runtime.enter();
    let limiter = RateLimiter::new(&config.rate_limit);
    let key = ClientKey(7);
    runtime.block_on(async {
        let _ = limiter.acquire(&[LimitKind::RegistrationsPerIp], key).await;
    });
    c.bench_function("limits: inspect one client (memory)", |b| {
        b.iter(|| runtime.block_on(limiter.inspect(std::hint::black_box(key))))
    });
}

criterion_group!(benches, admin);
criterion_main!(benches);
