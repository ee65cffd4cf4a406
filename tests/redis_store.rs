//! The Redis store with a real `redis-server` per test: shared limits across
//! gate replicas, fallback when Redis dies or stalls, recovery when it
//! returns.

mod common;

use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::{get, send, Answer, FakeHomeserver, Gate};
use http::Method;

const REGISTER: &str = "/_matrix/client/v3/register";

fn config(redis: &RedisServer, on_error: &str, extra: &str) -> String {
    format!(
        "[client_ip]\ntrusted_proxies = [\"127.0.0.1\"]\n\
         [rate_limit]\nstore = \"redis\"\nredis_url = \"{}\"\nredis_timeout = \"100ms\"\n\
         on_store_error = \"{on_error}\"\n\
         registrations_per_ip = {{ count = 2, period = \"1h\" }}\n\
         availability_checks_per_ip = {{ count = 1000, period = \"1m\" }}\n{extra}",
        redis.url()
    )
}

async fn register(gate: &Gate, status: u16) -> Answer {
    let status = status.to_string();
    send(
        Method::POST,
        &gate.url(REGISTER),
        &[
            ("content-type", "application/json"),
            ("x-test-status", status.as_str()),
        ],
        "{}",
    )
    .await
}

/// Sends availability checks, each from a new client address (the gate
/// trusts the loopback proxy), until one of them leaves a new key in Redis:
/// this gate is deciding through Redis again. Fails after `within`.
async fn wait_until_redis_is_used(gate: &Gate, redis: &RedisServer, within: Duration) {
    let deadline = Instant::now() + within;
    for probe in 1u32.. {
        let before = redis.key_count().await;
        let client = format!(
            "10.{}.{}.{}",
            probe >> 16 & 255,
            probe >> 8 & 255,
            probe & 255
        );
        let answer = send(
            Method::GET,
            &gate.url("/_matrix/client/v3/register/available?username=probe"),
            &[("x-forwarded-for", client.as_str())],
            "",
        )
        .await;
        if answer.status == 200 && redis.key_count().await > before {
            return;
        }
        assert!(Instant::now() < deadline, "the gate never used redis again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gates_share_one_limit() {
    let redis = RedisServer::start().await;
    let hs = FakeHomeserver::start().await;
    let a = Gate::start(&hs.url(), &config(&redis, "local", "")).await;
    let b = Gate::start(&hs.url(), &config(&redis, "local", "")).await;
    assert_eq!(register(&a, 200).await.status, 200);
    assert_eq!(register(&b, 200).await.status, 200);
    assert_eq!(register(&a, 200).await.status, 429);
    assert_eq!(register(&b, 200).await.status, 429);
    // UIA steps through either replica are refunded in Redis.
    assert!(redis.key_count().await >= 1);
    let hs_registrations = hs
        .requests()
        .iter()
        .filter(|r| r.target == REGISTER)
        .count();
    assert_eq!(hs_registrations, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uia_steps_are_refunded_in_redis() {
    let redis = RedisServer::start().await;
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), &config(&redis, "local", "")).await;
    for _ in 0..6 {
        assert_eq!(register(&gate, 401).await.status, 401);
        // Refunds run in the background; give them a moment to land.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(register(&gate, 200).await.status, 200);
    assert_eq!(register(&gate, 200).await.status, 200);
    let limited = register(&gate, 200).await;
    assert_eq!(limited.status, 429);
    let retry = limited.json()["retry_after_ms"].as_u64().unwrap();
    assert!(retry > 1_700_000 && retry <= 1_800_000, "{retry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_falls_back_to_local_limits_and_recovers() {
    let mut redis = RedisServer::start().await;
    let hs = FakeHomeserver::start().await;
    let a = Gate::start(&hs.url(), &config(&redis, "local", "")).await;
    let b = Gate::start(&hs.url(), &config(&redis, "local", "")).await;
    assert_eq!(register(&a, 200).await.status, 200);
    assert_eq!(register(&b, 200).await.status, 200);
    assert_eq!(register(&a, 429).await.status, 429);

    redis.kill();
    // Each replica now enforces the limit on its own (worst case during an
    // outage: replicas x limit), and pass-through is unaffected.
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(get(&a.url("/_matrix/client/versions")).await.status, 200);
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    for gate in [&a, &b] {
        assert_eq!(register(gate, 200).await.status, 200);
        assert_eq!(register(gate, 200).await.status, 200);
        let limited = register(gate, 200).await;
        assert_eq!(limited.status, 429, "local fallback limit");
    }

    // Redis returns (empty): the replicas reconnect on their own and share
    // one limit again.
    redis.restart().await;
    wait_until_redis_is_used(&a, &redis, Duration::from_secs(15)).await;
    wait_until_redis_is_used(&b, &redis, Duration::from_secs(15)).await;
    assert_eq!(register(&a, 200).await.status, 200);
    assert_eq!(register(&b, 200).await.status, 200);
    assert_eq!(register(&b, 200).await.status, 429);
    assert_eq!(register(&a, 200).await.status, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_store_error_allow_and_deny() {
    let mut redis = RedisServer::start().await;
    let hs = FakeHomeserver::start().await;
    let allow = Gate::start(&hs.url(), &config(&redis, "allow", "")).await;
    let deny = Gate::start(&hs.url(), &config(&redis, "deny", "")).await;
    redis.kill();
    for _ in 0..5 {
        assert_eq!(register(&allow, 200).await.status, 200);
    }
    let refused = register(&deny, 200).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["errcode"], "M_LIMIT_EXCEEDED");
    assert_eq!(get(&deny.url("/_matrix/client/versions")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_costs_at_most_the_timeout() {
    let redis = RedisServer::start().await;
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), &config(&redis, "local", "")).await;
    assert_eq!(register(&gate, 200).await.status, 200);
    // Block the Redis server for two seconds.
    let url = redis.url();
    let stall = tokio::spawn(async move {
        let mut con = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: Result<(), _> = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(2)
            .query_async(&mut con)
            .await;
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let answer = register(&gate, 200).await;
    assert_eq!(answer.status, 200, "local fallback allows");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "decision waited {:?}",
        started.elapsed()
    );
    assert_eq!(get(&gate.url("/_matrix/client/versions")).await.status, 200);
    stall.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_store_shares_limits() {
    let redis = RedisServer::start_cluster().await;
    let hs = FakeHomeserver::start().await;
    let extra = "redis_cluster = true\n";
    let a = Gate::start(&hs.url(), &config(&redis, "deny", extra)).await;
    let b = Gate::start(&hs.url(), &config(&redis, "deny", extra)).await;
    // The cluster connection is made in the background; wait for it.
    wait_until_redis_is_used(&a, &redis, Duration::from_secs(10)).await;
    wait_until_redis_is_used(&b, &redis, Duration::from_secs(10)).await;
    assert_eq!(register(&a, 200).await.status, 200);
    assert_eq!(register(&b, 200).await.status, 200);
    assert_eq!(register(&a, 200).await.status, 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_started_while_redis_is_down_uses_it_once_it_comes_up() {
    let mut redis = RedisServer::start().await;
    redis.kill();
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), &config(&redis, "local", "")).await;
    // Local limits meanwhile; pass-through unaffected.
    assert_eq!(register(&gate, 200).await.status, 200);
    assert_eq!(get(&gate.url("/_matrix/client/versions")).await.status, 200);
    redis.restart().await;
    wait_until_redis_is_used(&gate, &redis, Duration::from_secs(15)).await;
    assert_eq!(register(&gate, 200).await.status, 200);
    assert_eq!(register(&gate, 200).await.status, 200);
    assert_eq!(register(&gate, 200).await.status, 429);
}
