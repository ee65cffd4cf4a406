//! One audit line per admin action, without the token. Its own test binary:
//! the log capture is a subscriber scoped to this test's thread, which
//! other tests running beside it in one process can keep from seeing the
//! admin callsite (tracing caches each callsite's interest process-wide).

mod common;

use common::admin::{admin, gate, token_file, LIMITS, TOKEN};
use common::{send, Captured, FakeHomeserver};
use http::Method;

#[tokio::test(flavor = "current_thread")]
async fn every_admin_action_is_one_audit_line_without_the_token() {
    let (captured, subscriber) = Captured::json("matrix_gatekeeper::audit=info");
    let _scope = tracing::subscriber::set_default(subscriber);
    tracing::callsite::rebuild_interest_cache();

    let hs = FakeHomeserver::start().await;
    let path = token_file("audit", TOKEN);
    let gate = gate(&hs, LIMITS, Some(&path)).await;
    send(
        Method::GET,
        &gate.admin_url("/v1/bans"),
        &[("authorization", "Bearer wrong-token-value")],
        "",
    )
    .await;
    admin(&gate, Method::GET, "/v1/bans", "").await;
    admin(&gate, Method::GET, "/v1/clients/192.0.2.1", "").await;
    admin(
        &gate,
        Method::POST,
        "/v1/bans",
        r#"{"cidr":"203.0.113.0/24","duration":"1h","reason":"wave"}"#,
    )
    .await;
    admin(
        &gate,
        Method::POST,
        "/v1/bans",
        r#"{"cidr":"nope","duration":"1h"}"#,
    )
    .await;
    // A ban wider than the floor is refused, and done when forced.
    admin(
        &gate,
        Method::POST,
        "/v1/bans",
        r#"{"cidr":"0.0.0.0/0","duration":"1h"}"#,
    )
    .await;
    admin(
        &gate,
        Method::POST,
        "/v1/bans",
        r#"{"cidr":"0.0.0.0/0","duration":"1h","force":true}"#,
    )
    .await;
    admin(&gate, Method::DELETE, "/v1/bans/203.0.113.0%2F24", "").await;
    admin(&gate, Method::DELETE, "/v1/clients/192.0.2.1/limits", "").await;
    admin(&gate, Method::POST, "/v1/lockdown", "").await;
    admin(&gate, Method::DELETE, "/v1/lockdown", "").await;
    // A gate whose Redis does not answer closes and reopens by hand on its
    // own, and its audit lines say so.
    let nothing_there = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let no_redis = format!(
        "[rate_limit]\nstore = \"redis\"\nredis_url = \"redis://{nothing_there}\"\n\
         redis_timeout = \"200ms\"\n"
    );
    let alone = common::admin::gate(&hs, &no_redis, Some(&path)).await;
    let closed = admin(&alone, Method::POST, "/v1/lockdown", r#"{"duration":"2h"}"#).await;
    assert_eq!(closed.status, 202, "{:?}", closed.body);
    let reopened = admin(&alone, Method::DELETE, "/v1/lockdown", "").await;
    assert_eq!(reopened.status, 202, "{:?}", reopened.body);

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(!text.contains(TOKEN), "the token is logged:\n{text}");
    assert!(
        !text.contains("wrong-token-value"),
        "a presented token is logged:\n{text}"
    );
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .filter(|line: &serde_json::Value| line["message"] == "admin action")
        .collect();
    let summary: Vec<(String, String, String)> = lines
        .iter()
        .map(|line| {
            assert_eq!(line["target"], "matrix_gatekeeper::audit");
            (
                line["action"].as_str().unwrap().to_owned(),
                line["subject"].as_str().unwrap().to_owned(),
                line["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("authenticate", "/v1/bans", "wrong_token"),
        ("ban", "203.0.113.0/24", "done"),
        ("ban", "nope", "invalid"),
        ("ban", "0.0.0.0/0", "too_wide"),
        ("ban", "0.0.0.0/0", "forced"),
        ("lift_ban", "203.0.113.0/24", "done"),
        ("reset_limits", "192.0.2.1", "done"),
        ("close_registration", "1h", "done"),
        ("reopen_registration", "-", "done"),
        ("close_registration", "2h", "this_replica_only"),
        ("reopen_registration", "-", "this_replica_only"),
    ]
    .map(|(a, s, o)| (a.to_owned(), s.to_owned(), o.to_owned()));
    assert_eq!(summary, expected, "{text}");
}
