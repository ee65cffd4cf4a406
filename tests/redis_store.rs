//! The Redis store with a real `redis-server` per test: shared limits across
//! gate replicas, fallback when Redis dies or stalls, recovery when it
//! returns.

mod common;

use common::Listeners;

use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::{get, send, Answer, FakeHomeserver, Gate};
use http::Method;
use matrix_gatekeeper::Config;

const REGISTER: &str = "/_matrix/client/v3/register";

fn config(redis: &RedisServer, on_error: &str, extra: &str) -> String {
    config_for_url(&redis.url(), on_error, extra)
}

fn config_for_url(url: &str, on_error: &str, extra: &str) -> String {
    format!(
        "[client_ip]\ntrusted_proxies = [\"127.0.0.1\"]\n\
         [rate_limit]\nstore = \"redis\"\nredis_url = \"{url}\"\nredis_timeout = \"100ms\"\n\
         on_store_error = \"{on_error}\"\n\
         registrations_per_ip = {{ count = 2, period = \"1h\" }}\n\
         availability_checks_per_ip = {{ count = 1000, period = \"1m\" }}\n{extra}"
    )
}

/// A gate with its admin listener, in front of `hs`.
async fn gate_with_admin(hs: &FakeHomeserver, extra_toml: &str) -> Gate {
    let toml = format!(
        "[upstream]\nurl = \"{}\"\nresponse_timeout = \"10s\"\nconnect_timeout = \"2s\"\n{extra_toml}",
        hs.url()
    );
    Gate::start_full(Config::from_toml(&toml).unwrap(), true, None).await
}

/// A registration request the homeserver answers with `status` after
/// `delay_ms`, sent in the background.
fn register_slowly(gate: &Gate, status: u16, delay_ms: u64) -> tokio::task::JoinHandle<Answer> {
    let url = gate.url(REGISTER);
    tokio::spawn(async move {
        let (status, delay) = (status.to_string(), delay_ms.to_string());
        send(
            Method::POST,
            &url,
            &[
                ("content-type", "application/json"),
                ("x-test-status", status.as_str()),
                ("x-test-delay-ms", delay.as_str()),
            ],
            "{}",
        )
        .await
    })
}

/// Waits until some key matching `pattern` exists in Redis (or, with
/// `present = false`, until none does). Fails after `within`.
async fn wait_for_keys(redis: &RedisServer, pattern: &str, present: bool, within: Duration) {
    let deadline = Instant::now() + within;
    while redis.keys(pattern).await.is_empty() == present {
        assert!(
            Instant::now() < deadline,
            "keys {pattern:?} still {}",
            if present { "absent" } else { "present" }
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value of a metric line on the admin listener.
async fn metric(gate: &Gate, name: &str) -> Option<f64> {
    let text = gate.metrics().await;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Statuses of `n` registrations the homeserver would complete, sent in
/// turn through `gates`.
async fn registrations(gates: &[&Gate], n: usize) -> Vec<u16> {
    let mut statuses = Vec::with_capacity(n);
    for i in 0..n {
        statuses.push(register(gates[i % gates.len()], 200).await.status.as_u16());
    }
    statuses
}

const REGISTRATION_KEYS: &str = "{mgk}:registrations_per_ip:*";

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
async fn a_redis_url_with_a_password_comes_from_redis_url_file() {
    let redis = RedisServer::start().await;
    let mut connection = redis.connection().await;
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("s3cret-pass")
        .query_async(&mut connection)
        .await
        .unwrap();
    let file = std::env::temp_dir().join(format!("mgk-redis-url-{}", std::process::id()));
    let with_password = redis.url().replacen("redis://", "redis://:s3cret-pass@", 1);
    let toml = |url: &str| {
        std::fs::write(&file, format!("{url}\n")).unwrap();
        // on_store_error = "deny": nothing passes unless Redis decides.
        config(&redis, "deny", "").replace(
            &format!("redis_url = \"{}\"", redis.url()),
            &format!("redis_url_file = \"{}\"", file.display()),
        )
    };
    let hs = FakeHomeserver::start().await;
    // A wrong password in the file: Redis refuses it, and with "deny" the
    // gate refuses a client it has never seen.
    let wrong = redis.url().replacen("redis://", "redis://:wrong@", 1);
    let refusing = Gate::start(&hs.url(), &toml(&wrong)).await;
    let refused = register(&refusing, 200).await;
    assert_eq!(refused.status, 429, "{:?}", refused.json());
    // The right one: two replicas share the limit in Redis.
    let a = Gate::start(&hs.url(), &toml(&with_password)).await;
    let b = Gate::start(&hs.url(), &toml(&with_password)).await;
    assert_eq!(register(&a, 200).await.status, 200);
    assert_eq!(register(&b, 200).await.status, 200);
    assert_eq!(register(&a, 200).await.status, 429);
    // What `check` prints names the file, never the password in it.
    let loaded = Config::from_toml(&format!(
        "{}\n[upstream]\nurl = \"{}\"\n",
        toml(&with_password),
        hs.url()
    ))
    .unwrap();
    let printed = loaded.to_toml();
    assert!(!printed.contains("s3cret"), "{printed}");
    assert!(printed.contains("redis_url_file"), "{printed}");
    let _ = std::fs::remove_file(&file);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_redis_restart_two_replicas_still_complete_only_the_limit() {
    let mut redis = RedisServer::start().await;
    let hs = FakeHomeserver::start().await;
    let a = Gate::start(&hs.url(), &config(&redis, "local", "")).await;
    let b = Gate::start(&hs.url(), &config(&redis, "local", "")).await;
    // Both replicas hold a connection to Redis, which then dies and comes
    // back empty on the same port.
    wait_until_redis_is_used(&a, &redis, Duration::from_secs(5)).await;
    wait_until_redis_is_used(&b, &redis, Duration::from_secs(5)).await;
    redis.restart().await;
    // The first decision on each replica meets its dead connection: it
    // reconnects and decides in Redis, not locally.
    assert_eq!(registrations(&[&a, &b], 4).await, [200, 200, 429, 429]);
    assert_eq!(redis.keys(REGISTRATION_KEYS).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_that_failed_during_an_outage_reaches_redis_when_it_is_back() {
    let mut redis = RedisServer::start().await;
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), &config(&redis, "local", "")).await;
    // A UIA step the homeserver answers slowly: its unit is reserved in
    // Redis, which saves its data and dies before the answer comes.
    let step = register_slowly(&gate, 401, 500);
    wait_for_keys(&redis, REGISTRATION_KEYS, true, Duration::from_secs(5)).await;
    redis.save().await;
    redis.kill();
    assert_eq!(step.await.unwrap().status, 401);
    // Redis comes back with its data; the refund the gate could not send is
    // sent now, which leaves the client's key as fresh as it was.
    redis.restart_with_saved_data().await;
    wait_for_keys(&redis, REGISTRATION_KEYS, false, Duration::from_secs(5)).await;
    assert_eq!(registrations(&[&gate], 3).await, [200, 200, 429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_for_a_redis_that_came_back_empty_gives_no_credit() {
    let mut redis = RedisServer::start().await;
    let hs = FakeHomeserver::start().await;
    let gate = gate_with_admin(&hs, &config(&redis, "local", "")).await;
    let step = register_slowly(&gate, 401, 500);
    wait_for_keys(&redis, REGISTRATION_KEYS, true, Duration::from_secs(5)).await;
    redis.kill();
    assert_eq!(step.await.unwrap().status, 401);
    // Redis comes back empty: the reservation the queued refund would give
    // back is gone, and the refund must not give back a unit taken since.
    redis.restart().await;
    assert_eq!(register(&gate, 200).await.status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&gate, "gatekeeper_limiter_pending_refunds").await != Some(0.0) {
        assert!(Instant::now() < deadline, "the refund queue never drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(registrations(&[&gate], 2).await, [200, 429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reports_whether_redis_answers() {
    let redis = RedisServer::start().await;
    let hs = FakeHomeserver::start().await;
    let live = gate_with_admin(&hs, &config(&redis, "local", "")).await;
    let ready = get(&live.admin_url("/readyz")).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["store"], "redis");

    let nothing_listens = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{nothing_listens}");
    let dead = gate_with_admin(&hs, &config_for_url(&url, "local", "")).await;
    let ready = get(&dead.admin_url("/readyz")).await;
    // The gate still serves (on its local limits), so it stays ready; the
    // body says the store is not.
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["store"], "redis-unreachable");
    assert_eq!(ready.json()["upstream"], "reachable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_that_timed_out_in_a_stall_take_nothing_when_redis_wakes() {
    let redis = RedisServer::start().await;
    let hs = FakeHomeserver::start().await;
    let deny = Gate::start(&hs.url(), &config(&redis, "deny", "")).await;
    let local = Gate::start(&hs.url(), &config(&redis, "local", "")).await;
    wait_until_redis_is_used(&deny, &redis, Duration::from_secs(5)).await;
    wait_until_redis_is_used(&local, &redis, Duration::from_secs(5)).await;

    let stall = redis.stall(1.5).await;
    // Each decision gives up after redis_timeout (100 ms) and falls back;
    // its script is already on its way and runs when Redis wakes.
    for _ in 0..3 {
        register(&deny, 200)
            .await
            .assert_error(429, "M_LIMIT_EXCEEDED");
        assert_eq!(register(&local, 401).await.status, 401);
    }
    stall.await.unwrap();

    // The scripts of the timed-out decisions ran before these (they were
    // sent earlier on the same connections) and changed nothing.
    assert_eq!(registrations(&[&deny, &local], 3).await, [200, 200, 429]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gates_share_one_network_limit_keyed_by_asn() {
    use common::mmdb::{asn_record, Writer};
    let redis = RedisServer::start().await;
    let hs = FakeHomeserver::start().await;
    let database = std::env::temp_dir().join(format!("mgk-redis-asn-{}.mmdb", std::process::id()));
    Writer::new("GeoLite2-ASN")
        .insert("198.51.100.0/24", asn_record(64496, "Example Hosting"))
        .insert("2001:db8::/32", asn_record(64496, "Example Hosting"))
        .write(&database);
    let extra = format!(
        "registrations_per_asn = {{ count = 2, period = \"1h\" }}\n\
         [reputation]\nasn_database = {:?}\n",
        database.display().to_string()
    );
    let a = Gate::start(&hs.url(), &config(&redis, "local", &extra)).await;
    let b = Gate::start(&hs.url(), &config(&redis, "local", &extra)).await;
    let from = |gate: &Gate, client: &'static str, status: u16| {
        let url = gate.url(REGISTER);
        async move {
            let status = status.to_string();
            send(
                Method::POST,
                &url,
                &[
                    ("content-type", "application/json"),
                    ("x-forwarded-for", client),
                    ("x-test-status", status.as_str()),
                ],
                "{}",
            )
            .await
            .status
        }
    };
    // A UIA step is refunded; then one account through each replica, from
    // different addresses of the network, spends its budget in Redis.
    assert_eq!(from(&a, "198.51.100.1", 401).await, 401);
    assert_eq!(from(&a, "198.51.100.1", 200).await, 200);
    assert_eq!(from(&b, "2001:db8:5::1", 200).await, 200);
    assert_eq!(from(&a, "198.51.100.2", 200).await, 429);
    assert_eq!(from(&b, "198.51.100.3", 200).await, 429);
    // An address of no network is counted by its own limits only.
    assert_eq!(from(&b, "192.0.2.1", 200).await, 200);
    assert_eq!(
        redis.keys("{mgk}:registrations_per_asn:*").await,
        ["{mgk}:registrations_per_asn:AS64496"]
    );
    let _ = std::fs::remove_file(&database);
}
