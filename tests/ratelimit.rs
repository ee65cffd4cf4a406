//! Rate limits through the whole gate, in memory, against the recording
//! fake homeserver.

mod common;

use common::{get, send, Answer, FakeHomeserver, Gate};
use http::Method;

const REGISTER: &str = "/_matrix/client/v3/register";

async fn setup(limits: &str) -> (FakeHomeserver, Gate) {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), limits).await;
    (hs, gate)
}

/// A registration the fake homeserver answers with `status`, as if from
/// `client` (sent in X-Forwarded-For, believed only from a trusted proxy).
async fn register(gate: &Gate, status: u16, client: Option<&str>, body: &str) -> Answer {
    let status = status.to_string();
    let mut headers = vec![
        ("content-type", "application/json"),
        ("x-test-status", status.as_str()),
    ];
    if let Some(client) = client {
        headers.push(("x-forwarded-for", client));
    }
    send(Method::POST, &gate.url(REGISTER), &headers, body.to_owned()).await
}

fn assert_limited(answer: &Answer) -> u64 {
    assert_eq!(answer.status, 429, "{:?}", answer.body);
    assert_eq!(answer.headers["content-type"], "application/json");
    let json = answer.json();
    assert_eq!(json["errcode"], "M_LIMIT_EXCEEDED");
    assert!(json["error"].is_string());
    let retry_ms = json["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(retry_ms > 0);
    let header: u64 = answer.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(header, retry_ms.div_ceil(1000));
    assert_eq!(json.as_object().unwrap().len(), 3, "{json}");
    retry_ms
}

fn registrations_seen(hs: &FakeHomeserver) -> usize {
    hs.requests()
        .iter()
        .filter(|r| r.target.starts_with(REGISTER))
        .count()
}

#[tokio::test]
async fn uia_steps_and_failures_do_not_consume_registrations() {
    let (hs, gate) =
        setup("[rate_limit]\nregistrations_per_ip = { count = 2, period = \"1h\" }\n").await;
    for _ in 0..10 {
        assert_eq!(
            register(&gate, 401, None, r#"{"username":"alice"}"#)
                .await
                .status,
            401
        );
        assert_eq!(
            register(&gate, 400, None, r#"{"username":"alice"}"#)
                .await
                .status,
            400
        );
    }
    assert_eq!(
        register(&gate, 200, None, r#"{"username":"alice"}"#)
            .await
            .status,
        200
    );
    assert_eq!(
        register(&gate, 200, None, r#"{"username":"bob"}"#)
            .await
            .status,
        200
    );
    let before = registrations_seen(&hs);
    let refused = register(&gate, 200, None, r#"{"username":"carol"}"#).await;
    let retry_ms = assert_limited(&refused);
    // One unit refills in 30 minutes.
    assert!(retry_ms <= 1_800_000 && retry_ms > 1_790_000, "{retry_ms}");
    assert_eq!(
        registrations_seen(&hs),
        before,
        "the limited request was forwarded"
    );
    // A UIA step is refused too once the budget is gone: it is reserved
    // before forwarding.
    assert_limited(&register(&gate, 401, None, "{}").await);
    // Pass-through traffic is never limited.
    assert_eq!(get(&gate.url("/_matrix/client/versions")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_completions_cannot_exceed_the_limit() {
    let (hs, gate) =
        setup("[rate_limit]\nregistrations_per_ip = { count = 2, period = \"1h\" }\n").await;
    let url = gate.url(REGISTER);
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                send(
                    Method::POST,
                    &url,
                    &[
                        ("x-test-status", "200"),
                        ("x-test-delay-ms", "200"),
                        ("content-type", "application/json"),
                    ],
                    format!(r#"{{"username":"user{i}"}}"#),
                )
                .await
                .status
            })
        })
        .collect();
    let mut ok = 0;
    let mut limited = 0;
    for task in tasks {
        match task.await.unwrap().as_u16() {
            200 => ok += 1,
            429 => limited += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((ok, limited), (2, 18));
    assert_eq!(registrations_seen(&hs), 2);
}

#[tokio::test]
async fn rotating_forwarded_for_from_an_untrusted_peer_mints_no_budget() {
    let (hs, gate) =
        setup("[rate_limit]\nregistrations_per_ip = { count = 1, period = \"1h\" }\n").await;
    assert_eq!(
        register(&gate, 200, Some("198.51.100.1"), "{}")
            .await
            .status,
        200
    );
    for i in 2..10 {
        let spoofed = format!("198.51.100.{i}");
        assert_limited(&register(&gate, 200, Some(&spoofed), "{}").await);
    }
    assert_eq!(registrations_seen(&hs), 1);
    // The homeserver saw the real peer, not the spoofed entry.
    assert_eq!(
        hs.requests()[0].header("x-forwarded-for"),
        Some("127.0.0.1")
    );
}

#[tokio::test]
async fn trusted_proxy_clients_are_keyed_by_address_and_ipv6_prefix() {
    let (hs, gate) = setup(
        "[client_ip]\ntrusted_proxies = [\"127.0.0.1\"]\n\
         [rate_limit]\nregistrations_per_ip = { count = 1, period = \"1h\" }\n",
    )
    .await;
    // Rotating the low 64 bits of an IPv6 address does not mint budget.
    assert_eq!(
        register(&gate, 200, Some("2001:db8:1:2::1"), "{}")
            .await
            .status,
        200
    );
    for suffix in ["::2", ":ffff:ffff:ffff:ffff", ":1234:5678:9abc:def0"] {
        let addr = format!("2001:db8:1:2{suffix}");
        assert_limited(&register(&gate, 200, Some(&addr), "{}").await);
    }
    // Another /64, and other IPv4 clients, have their own budgets.
    assert_eq!(
        register(&gate, 200, Some("2001:db8:1:3::1"), "{}")
            .await
            .status,
        200
    );
    assert_eq!(
        register(&gate, 200, Some("198.51.100.1"), "{}")
            .await
            .status,
        200
    );
    assert_eq!(
        register(&gate, 200, Some("198.51.100.2"), "{}")
            .await
            .status,
        200
    );
    // A spoofed leftmost entry does not help: the rightmost untrusted wins.
    assert_limited(&register(&gate, 200, Some("203.0.113.77, 198.51.100.2"), "{}").await);
    // The homeserver sees the resolved client as the only X-Forwarded-For.
    let seen = hs.requests();
    assert_eq!(seen[0].header("x-forwarded-for"), Some("2001:db8:1:2::1"));
    assert_eq!(
        seen.last().unwrap().header("x-forwarded-for"),
        Some("198.51.100.2")
    );
}

#[tokio::test]
async fn global_ceiling_binds_across_addresses() {
    let (hs, gate) = setup(
        "[client_ip]\ntrusted_proxies = [\"127.0.0.0/8\"]\n\
         [rate_limit]\nregistrations_per_ip = { count = 5, period = \"1h\" }\n\
         registrations_global = { count = 3, period = \"1h\" }\n",
    )
    .await;
    for i in 1..=3 {
        let client = format!("192.0.2.{i}");
        assert_eq!(register(&gate, 200, Some(&client), "{}").await.status, 200);
    }
    assert_limited(&register(&gate, 200, Some("192.0.2.200"), "{}").await);
    assert_eq!(registrations_seen(&hs), 3);
    // The refused client's own budget was given back: failures elsewhere
    // cost it nothing. Its UIA steps are still refused by the global
    // ceiling, since the reservation covers both.
    assert_limited(&register(&gate, 401, Some("192.0.2.200"), "{}").await);
}

#[tokio::test]
async fn attempts_guests_availability_and_token_limits() {
    let (hs, gate) = setup(
        "[guest]\naccess = \"allow\"\n\
         [rate_limit]\nattempts_per_ip = { count = 3, period = \"1h\" }\n\
         guests_per_ip = { count = 1, period = \"1h\" }\n\
         availability_checks_per_ip = { count = 2, period = \"1m\" }\n\
         token_requests_per_ip = { count = 1, period = \"1h\" }\n",
    )
    .await;
    // Attempts count every POST /register, refused ones included.
    let bad = send(
        Method::POST,
        &gate.url(REGISTER),
        &[("content-type", "application/json")],
        r#"{"username":"admin"}"#,
    )
    .await;
    bad.assert_error(400, "M_USER_IN_USE");
    assert_eq!(
        send(
            Method::POST,
            &gate.url(&format!("{REGISTER}?kind=guest")),
            &[("x-test-status", "200")],
            "{}"
        )
        .await
        .status,
        200
    );
    // The second guest is over guests_per_ip (attempt 3 of 3).
    let guest = send(
        Method::POST,
        &gate.url(&format!("{REGISTER}?kind=guest")),
        &[],
        "{}",
    )
    .await;
    assert_limited(&guest);
    // Attempts are now exhausted for every kind of registration.
    assert_limited(&register(&gate, 200, None, "{}").await);
    assert_eq!(registrations_seen(&hs), 1);

    let available = "/_matrix/client/v3/register/available?username=alice";
    assert_eq!(get(&gate.url(available)).await.status, 200);
    assert_eq!(get(&gate.url(available)).await.status, 200);
    assert_limited(&get(&gate.url(available)).await);

    let validity = "/_matrix/client/v1/register/m.login.registration_token/validity?token=x";
    assert_eq!(get(&gate.url(validity)).await.status, 200);
    let token = send(
        Method::POST,
        &gate.url("/_matrix/client/v3/register/email/requestToken"),
        &[],
        r#"{"client_secret":"s","email":"a@example.org","send_attempt":1}"#,
    )
    .await;
    assert_limited(&token);
    assert_eq!(get(&gate.url("/_matrix/client/versions")).await.status, 200);
}
