//! The admin API on a real gate's admin listener: tokens, inspecting and
//! resetting a client's limits, temporary bans, closing registration by
//! hand; shared through a real `redis-server` by two replicas; and one
//! audit line per admin action.

mod common;

use common::Listeners;

use std::time::{Duration, Instant};

use common::admin::{admin, gate, register, reset_limits, token_file, toml, LIMITS, TOKEN};
use common::redis_server::RedisServer;
use common::{eventually, send, FakeHomeserver, Gate};
use http::Method;
use matrix_gatekeeper::Config;

#[tokio::test]
async fn without_token_file_the_api_is_absent() {
    let hs = FakeHomeserver::start().await;
    let gate = gate(&hs, LIMITS, None).await;
    for (method, path) in [
        (Method::GET, "/v1/bans"),
        (Method::POST, "/v1/lockdown"),
        (Method::DELETE, "/v1/clients/192.0.2.1/limits"),
    ] {
        let answer = admin(&gate, method, path, "").await;
        assert_eq!(answer.status, 404, "{path}");
    }
    assert_eq!(register(&gate, "192.0.2.1").await.status, 200);
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_refused() {
    let hs = FakeHomeserver::start().await;
    let path = token_file("auth", TOKEN);
    let gate = gate(&hs, LIMITS, Some(&path)).await;
    let missing = send(Method::GET, &gate.admin_url("/v1/bans"), &[], "").await;
    missing.assert_error(401, "M_MISSING_TOKEN");
    for wrong in [
        "Bearer wrong-token",
        "Bearer s3cr3t-admin-token-012345678",
        "Bearer s3cr3t-admin-token-01234567890",
        "Basic czNjcjN0",
        "Bearer",
    ] {
        let answer = send(
            Method::POST,
            &gate.admin_url("/v1/lockdown"),
            &[("authorization", wrong)],
            "",
        )
        .await;
        assert_eq!(answer.status, 401, "{wrong}");
        assert!(answer.errcode().starts_with("M_"), "{wrong}");
    }
    // Nothing was done under a wrong token.
    assert_eq!(register(&gate, "192.0.2.1").await.status, 200);
    assert_eq!(admin(&gate, Method::GET, "/v1/bans", "").await.status, 200);
}

#[tokio::test]
async fn a_locked_out_client_is_inspected_and_reset() {
    let hs = FakeHomeserver::start().await;
    let path = token_file("reset", TOKEN);
    let gate = gate(&hs, LIMITS, Some(&path)).await;
    let client = "198.51.100.23";

    let fresh = admin(&gate, Method::GET, &format!("/v1/clients/{client}"), "").await;
    assert_eq!(fresh.status, 200, "{:?}", fresh.body);
    let limit = &fresh.json()["limits"]["registrations_per_ip"];
    assert_eq!(limit["remaining"], 2, "{}", fresh.json());
    assert_eq!(limit["next_unit_in_ms"], 0);

    assert_eq!(register(&gate, client).await.status, 200);
    assert_eq!(register(&gate, client).await.status, 200);
    register(&gate, client)
        .await
        .assert_error(429, "M_LIMIT_EXCEEDED");

    let spent = admin(&gate, Method::GET, &format!("/v1/clients/{client}"), "").await;
    let json = spent.json();
    assert_eq!(json["address"], client);
    assert_eq!(json["key"], client);
    assert_eq!(json["store"], "memory");
    let limit = &json["limits"]["registrations_per_ip"];
    assert_eq!(limit["burst"], 2);
    assert_eq!(limit["remaining"], 0, "{json}");
    let wait = limit["next_unit_in_ms"].as_u64().unwrap();
    assert!(wait > 0 && wait <= 30 * 60 * 1000, "{json}");
    // Another client is untouched; the server-wide budget is shared.
    let other = admin(&gate, Method::GET, "/v1/clients/198.51.100.24", "").await;
    let limits = &other.json()["limits"];
    assert_eq!(limits["registrations_per_ip"]["remaining"], 2);
    assert_eq!(limits["registrations_global"]["remaining"], 998);

    let reset = reset_limits(&gate, client).await;
    assert_eq!(reset.status, 200, "{:?}", reset.body);
    assert_eq!(reset.json()["reset"], true);
    assert_eq!(reset.json()["counted_as"], client);
    assert_eq!(reset.json()["shared"], false);
    assert!(reset.json().get("note").is_none());
    assert_eq!(register(&gate, client).await.status, 200);
    let after = admin(&gate, Method::GET, &format!("/v1/clients/{client}"), "").await;
    let limits = &after.json()["limits"];
    assert_eq!(limits["registrations_per_ip"]["remaining"], 1);
    // A reset leaves the server-wide budget alone.
    assert_eq!(limits["registrations_global"]["remaining"], 997);

    // IPv6 clients are shown and reset by their prefix (escaped or not).
    let v6 = admin(&gate, Method::GET, "/v1/clients/2001%3Adb8%3A%3A1", "").await;
    assert_eq!(v6.json()["key"], "2001:db8::", "{}", v6.json());
}

#[tokio::test]
async fn a_client_counted_under_a_shared_key_is_shown_and_reset_under_it() {
    let hs = FakeHomeserver::start().await;
    let path = token_file("shared-key", TOKEN);
    // An eighth of the cap is the room for coarse keys: one here.
    let limits = format!("{LIMITS}max_tracked_clients = 8\n");
    let gate = gate(&hs, &limits, Some(&path)).await;
    for i in 1..=8 {
        assert_eq!(register(&gate, &format!("10.0.0.{i}")).await.status, 200);
    }
    // Over the cap: two new clients of 192.0.0.0/16 share one budget.
    let (client, neighbour) = ("192.0.2.1", "192.0.7.7");
    assert_eq!(register(&gate, neighbour).await.status, 200);
    assert_eq!(register(&gate, neighbour).await.status, 200);
    register(&gate, client)
        .await
        .assert_error(429, "M_LIMIT_EXCEEDED");

    let seen = admin(&gate, Method::GET, &format!("/v1/clients/{client}"), "").await;
    let json = seen.json();
    assert_eq!(json["key"], client, "{json}");
    assert_eq!(json["counted_as"], "192.0.0.0/16", "{json}");
    assert_eq!(json["shared"], true, "{json}");
    let limit = &json["limits"]["registrations_per_ip"];
    assert_eq!(limit["counted_as"], "192.0.0.0/16", "{json}");
    assert_eq!(limit["remaining"], 0, "the shared budget: {json}");
    assert_eq!(json["limits"]["registrations_global"]["counted_as"], "*");
    // A client tracked on its own is shown under its own key.
    let own = admin(&gate, Method::GET, "/v1/clients/10.0.0.2", "")
        .await
        .json();
    assert_eq!(
        (&own["counted_as"], &own["shared"]),
        (&"10.0.0.2".into(), &false.into()),
        "{own}"
    );

    let reset = reset_limits(&gate, client).await;
    assert_eq!(reset.status, 200, "{:?}", reset.body);
    let json = reset.json();
    assert_eq!(json["counted_as"], "192.0.0.0/16", "{json}");
    assert_eq!(json["shared"], true);
    assert_eq!(json["limits"]["registrations_per_ip"], "192.0.0.0/16");
    let note = json["note"].as_str().unwrap();
    assert!(note.contains("every client counted under it"), "{note}");
    // The shared key was reset: the client and its neighbour pass again.
    assert_eq!(register(&gate, client).await.status, 200);
    assert_eq!(register(&gate, neighbour).await.status, 200);
    register(&gate, neighbour)
        .await
        .assert_error(429, "M_LIMIT_EXCEEDED");
    // With the coarse keys' room taken, a client of another network is
    // counted under the one overflow key.
    let far = admin(&gate, Method::GET, "/v1/clients/172.16.0.1", "")
        .await
        .json();
    assert_eq!(far["counted_as"], "overflow", "{far}");
}

#[tokio::test]
async fn temporary_bans_refuse_are_listed_lifted_and_expire() {
    let hs = FakeHomeserver::start().await;
    let path = token_file("bans", TOKEN);
    let gate = gate(&hs, LIMITS, Some(&path)).await;

    let posted = admin(
        &gate,
        Method::POST,
        "/v1/bans",
        r#"{"cidr":"203.0.113.0/24","duration":"24h","reason":"spam wave"}"#,
    )
    .await;
    assert_eq!(posted.status, 200, "{:?}", posted.body);
    hs.clear();
    let refused = register(&gate, "203.0.113.9").await;
    refused.assert_error(403, "M_FORBIDDEN");
    assert_eq!(refused.headers["x-matrix-gatekeeper"], "refused");
    hs.assert_saw_nothing("a banned registration");
    let metrics = gate.metrics().await;
    assert!(
        metrics.contains("outcome=\"refused\",rule=\"temporary_ban\"} 1"),
        "{metrics}"
    );
    // Other clients and pass-through traffic are untouched.
    assert_eq!(register(&gate, "203.0.114.9").await.status, 200);
    let versions = send(
        Method::GET,
        &gate.url("/_matrix/client/versions"),
        &[("x-forwarded-for", "203.0.113.9")],
        "",
    )
    .await;
    assert_eq!(versions.status, 200);

    let listed = admin(&gate, Method::GET, "/v1/bans", "").await.json();
    let bans = listed["bans"].as_array().unwrap();
    assert_eq!(bans.len(), 1, "{listed}");
    assert_eq!(bans[0]["cidr"], "203.0.113.0/24");
    assert_eq!(bans[0]["reason"], "spam wave");
    assert!(bans[0]["remaining_ms"].as_u64().unwrap() > 23 * 3600 * 1000);
    let inspected = admin(&gate, Method::GET, "/v1/clients/203.0.113.9", "").await;
    assert_eq!(inspected.json()["temporary_ban"]["cidr"], "203.0.113.0/24");

    let lifted = admin(&gate, Method::DELETE, "/v1/bans/203.0.113.0%2F24", "").await;
    assert_eq!(lifted.status, 200, "{:?}", lifted.body);
    assert_eq!(register(&gate, "203.0.113.9").await.status, 200);
    admin(&gate, Method::DELETE, "/v1/bans/203.0.113.0%2F24", "")
        .await
        .assert_error(404, "M_NOT_FOUND");

    // A short ban lifts itself.
    let short = admin(
        &gate,
        Method::POST,
        "/v1/bans",
        r#"{"cidr":"2001:db8::/32","duration":"1s"}"#,
    )
    .await;
    assert_eq!(short.status, 200, "{:?}", short.body);
    register(&gate, "2001:db8::7")
        .await
        .assert_error(403, "M_FORBIDDEN");
    eventually(Duration::from_secs(10), "the ban expires", || async {
        register(&gate, "2001:db8::7").await.status == 200
    })
    .await;
    let listed = admin(&gate, Method::GET, "/v1/bans", "").await.json();
    assert_eq!(listed["bans"].as_array().unwrap().len(), 0, "{listed}");
}

/// A ban of `cidr` for `duration`, with `more` JSON members appended.
async fn post_ban(gate: &Gate, cidr: &str, duration: &str, more: &str) -> common::Answer {
    let body = format!(r#"{{"cidr":"{cidr}","duration":"{duration}"{more}}}"#);
    admin(gate, Method::POST, "/v1/bans", &body).await
}

#[tokio::test]
async fn a_ban_wider_than_ipv4_8_or_ipv6_16_needs_force() {
    let hs = FakeHomeserver::start().await;
    let path = token_file("wide", TOKEN);
    let gate = gate(&hs, LIMITS, Some(&path)).await;
    for cidr in [
        "0.0.0.0/0",
        "10.0.0.0/7",
        "::/0",
        "2001::/15",
        "::ffff:0:0/97",
    ] {
        let answer = post_ban(&gate, cidr, "365d", "").await;
        answer.assert_error(400, "M_INVALID_PARAM");
        let error = answer.json()["error"].as_str().unwrap().to_owned();
        for said in [
            "IPv4 /8",
            "IPv6 /16",
            r#""force": true"#,
            "POST /v1/lockdown",
        ] {
            assert!(error.contains(said), "{cidr}: {error}");
        }
    }
    // A mapped network of 96 bits or less is no IPv4 network at all, and
    // force does not make it one.
    let mapped = post_ban(&gate, "::ffff:1.2.3.4/96", "1h", r#","force":true"#).await;
    mapped.assert_error(400, "M_INVALID_PARAM");
    let error = mapped.json()["error"].as_str().unwrap().to_owned();
    for said in ["compared as IPv4", "0.0.0.0/0"] {
        assert!(error.contains(said), "{error}");
    }
    for force in [r#""yes""#, "1", "null"] {
        post_ban(&gate, "0.0.0.0/0", "1h", &format!(r#","force":{force}"#))
            .await
            .assert_error(400, "M_BAD_JSON");
    }
    let listed = admin(&gate, Method::GET, "/v1/bans", "").await.json();
    assert_eq!(listed["bans"], serde_json::json!([]), "{listed}");
    assert_eq!(register(&gate, "203.0.113.9").await.status, 200);

    // At the floor no force is needed.
    for cidr in ["10.0.0.0/8", "2001::/16"] {
        let answer = post_ban(&gate, cidr, "1h", r#","force":false"#).await;
        assert_eq!(answer.status, 200, "{cidr}: {:?}", answer.body);
    }
    let forced = post_ban(&gate, "0.0.0.0/0", "1h", r#","force":true"#).await;
    assert_eq!(forced.status, 200, "{:?}", forced.body);
    assert_eq!(forced.json()["cidr"], "0.0.0.0/0");
    hs.clear();
    register(&gate, "203.0.113.9")
        .await
        .assert_error(403, "M_FORBIDDEN");
    hs.assert_saw_nothing("a registration under a forced ban");
}

#[tokio::test]
async fn admin_bodies_with_duplicate_keys_are_bad_json() {
    let hs = FakeHomeserver::start().await;
    let path = token_file("duplicates", TOKEN);
    let gate = gate(&hs, LIMITS, Some(&path)).await;
    for (path, body, key) in [
        (
            "/v1/bans",
            r#"{"cidr":"192.0.2.1","cidr":"198.51.100.0/24","duration":"1h"}"#,
            "cidr",
        ),
        (
            "/v1/bans",
            r#"{"cidr":"192.0.2.1","c\u0069dr":"198.51.100.0/24","duration":"1h"}"#,
            "cidr",
        ),
        (
            "/v1/bans",
            r#"{"cidr":"198.51.100.0/24","duration":"1s","duration":"1h"}"#,
            "duration",
        ),
        (
            "/v1/lockdown",
            r#"{"duration":"1s","duration":"2h"}"#,
            "duration",
        ),
    ] {
        let answer = admin(&gate, Method::POST, path, body).await;
        answer.assert_error(400, "M_BAD_JSON");
        let error = answer.json()["error"].as_str().unwrap().to_owned();
        assert!(
            error.contains(&format!("duplicate key \"{key}\"")),
            "{body}: {error}"
        );
    }
    let listed = admin(&gate, Method::GET, "/v1/bans", "").await.json();
    assert_eq!(listed["bans"], serde_json::json!([]), "{listed}");
    let state = admin(&gate, Method::GET, "/v1/lockdown", "").await.json();
    assert_eq!(state["closed"], false, "{state}");
    assert_eq!(register(&gate, "198.51.100.5").await.status, 200);
    assert_eq!(hs.requests().len(), 1);
}

#[tokio::test]
async fn registration_is_closed_and_reopened_by_hand() {
    let hs = FakeHomeserver::start().await;
    let path = token_file("lockdown", TOKEN);
    let gate = gate(&hs, LIMITS, Some(&path)).await;
    let closed = admin(&gate, Method::POST, "/v1/lockdown", r#"{"duration":"2h"}"#).await;
    assert_eq!(closed.status, 200, "{:?}", closed.body);
    assert_eq!(closed.json()["closed"], true);
    assert!(closed.json()["remaining_ms"].as_u64().unwrap() > 7_000_000);
    let refused = register(&gate, "192.0.2.1").await;
    refused.assert_error(403, "M_FORBIDDEN");
    assert_eq!(
        refused.json()["error"],
        "Registration is temporarily closed"
    );
    let state = admin(&gate, Method::GET, "/v1/lockdown", "").await;
    assert_eq!(state.json()["closed"], true);

    let reopened = admin(&gate, Method::DELETE, "/v1/lockdown", "").await;
    assert_eq!(reopened.status, 200, "{:?}", reopened.body);
    assert_eq!(register(&gate, "192.0.2.1").await.status, 200);

    // Without a body: the default of one hour (no lockdown configured).
    let default = admin(&gate, Method::POST, "/v1/lockdown", "").await;
    let remaining = default.json()["remaining_ms"].as_u64().unwrap();
    assert!(
        remaining > 3_500_000 && remaining <= 3_600_000,
        "{remaining}"
    );
    register(&gate, "192.0.2.1")
        .await
        .assert_error(403, "M_FORBIDDEN");
}

#[tokio::test]
async fn bad_requests_get_clear_matrix_errors() {
    let hs = FakeHomeserver::start().await;
    let path = token_file("bad", TOKEN);
    let gate = gate(&hs, LIMITS, Some(&path)).await;
    for (body, errcode) in [
        (
            r#"{"cidr":"203.0.113.0/24","duration":"1h","extra":1}"#,
            "M_BAD_JSON",
        ),
        (r#"{"cidr":"203.0.113.0/24"}"#, "M_BAD_JSON"),
        (r#"{"cidr":7,"duration":"1h"}"#, "M_BAD_JSON"),
        ("not json", "M_NOT_JSON"),
        ("", "M_BAD_JSON"),
        (
            r#"{"cidr":"203.0.113.0/33","duration":"1h"}"#,
            "M_INVALID_PARAM",
        ),
        (
            r#"{"cidr":"example.org","duration":"1h"}"#,
            "M_INVALID_PARAM",
        ),
        (
            r#"{"cidr":"203.0.113.0/24","duration":"soon"}"#,
            "M_INVALID_PARAM",
        ),
        (
            r#"{"cidr":"203.0.113.0/24","duration":"0s"}"#,
            "M_INVALID_PARAM",
        ),
        (
            r#"{"cidr":"203.0.113.0/24","duration":"400d"}"#,
            "M_INVALID_PARAM",
        ),
    ] {
        let answer = admin(&gate, Method::POST, "/v1/bans", body).await;
        assert_eq!(answer.status, 400, "{body}: {:?}", answer.body);
        assert_eq!(answer.errcode(), errcode, "{body}");
        assert!(answer.json()["error"].is_string());
    }
    admin(&gate, Method::POST, "/v1/lockdown", r#"{"for":"1h"}"#)
        .await
        .assert_error(400, "M_BAD_JSON");
    admin(&gate, Method::POST, "/v1/lockdown", r#"{"duration":"1x"}"#)
        .await
        .assert_error(400, "M_INVALID_PARAM");
    admin(&gate, Method::GET, "/v1/clients/not-an-ip", "")
        .await
        .assert_error(400, "M_INVALID_PARAM");
    admin(&gate, Method::DELETE, "/v1/bans/203.0.113.0%2", "")
        .await
        .assert_error(400, "M_INVALID_PARAM");
    let wrong = admin(&gate, Method::PUT, "/v1/bans", "").await;
    wrong.assert_error(405, "M_UNRECOGNIZED");
    assert_eq!(wrong.headers["allow"], "GET, POST");
    assert_eq!(
        admin(&gate, Method::GET, "/v1/clients/192.0.2.1/limits", "")
            .await
            .status,
        405
    );
    admin(&gate, Method::GET, "/v1/nothing", "")
        .await
        .assert_error(404, "M_UNRECOGNIZED");
    let big = format!(
        r#"{{"cidr":"203.0.113.0/24","duration":"1h","reason":"{}"}}"#,
        "x".repeat(20_000)
    );
    assert_eq!(
        admin(&gate, Method::POST, "/v1/bans", &big).await.status,
        400
    );
    // None of it banned anything or closed registration.
    assert_eq!(register(&gate, "203.0.113.9").await.status, 200);
}

#[tokio::test]
async fn a_reload_reads_the_token_again() {
    let hs = FakeHomeserver::start().await;
    let token = token_file("reload", TOKEN);
    let config_path =
        std::env::temp_dir().join(format!("mgk-admin-{}-reload.toml", std::process::id()));
    let text = toml(
        &hs,
        &format!("[admin]\ntoken_file = \"{}\"\n", token.display()),
    );
    std::fs::write(&config_path, &text).unwrap();
    let config = Config::from_file(&config_path).unwrap();
    let gate = Gate::start_full(config, true, Some(config_path.clone())).await;
    assert_eq!(admin(&gate, Method::GET, "/v1/bans", "").await.status, 200);
    std::fs::write(&token, "a-new-token-for-the-admin-api\n").unwrap();
    gate.reloader.reload().unwrap();
    assert_eq!(admin(&gate, Method::GET, "/v1/bans", "").await.status, 401);
    let new = send(
        Method::GET,
        &gate.admin_url("/v1/bans"),
        &[("authorization", "Bearer a-new-token-for-the-admin-api")],
        "",
    )
    .await;
    assert_eq!(new.status, 200);
    // Without the key after a reload, the API is gone.
    std::fs::write(&config_path, toml(&hs, "")).unwrap();
    gate.reloader.reload().unwrap();
    assert_eq!(admin(&gate, Method::GET, "/v1/bans", "").await.status, 404);
}

#[test]
fn an_unreadable_or_short_token_file_is_refused_by_name() {
    let short = token_file("short", "short");
    for path in [
        short,
        std::path::PathBuf::from("/nonexistent/mgk/admin.token"),
    ] {
        let error = Config::from_toml(&format!("[admin]\ntoken_file = \"{}\"\n", path.display()))
            .unwrap_err();
        assert!(
            error.to_string().starts_with("admin.token_file: "),
            "{error}"
        );
    }
    let error = Config::from_toml("[admin]\ntoken = \"x\"\n").unwrap_err();
    assert!(error.to_string().contains("admin.token"), "{error}");
}

/// Two replicas sharing `redis` (waiting at most `timeout` for it), with
/// the admin API and `registrations` registrations per client an hour.
async fn replicas(
    redis: &RedisServer,
    hs: &FakeHomeserver,
    name: &str,
    timeout: &str,
    registrations: u32,
) -> (Gate, Gate) {
    let path = token_file(name, TOKEN);
    let shared = format!(
        "[client_ip]\ntrusted_proxies = [\"127.0.0.1\"]\n\
         [rate_limit]\nstore = \"redis\"\nredis_url = \"{}\"\nredis_timeout = \"{timeout}\"\n\
         registrations_per_ip = {{ count = {registrations}, period = \"1h\" }}\n",
        redis.url()
    );
    (
        gate(hs, &shared, Some(&path)).await,
        gate(hs, &shared, Some(&path)).await,
    )
}

#[tokio::test]
async fn redis_replicas_share_bans_resets_and_lockdowns() {
    let redis = RedisServer::start().await;
    let hs = FakeHomeserver::start().await;
    let (a, b) = replicas(&redis, &hs, "redis", "500ms", 2).await;
    let client = "198.51.100.50";

    // Limits: spent through A, seen by B's inspection, reset through B.
    assert_eq!(register(&a, client).await.status, 200);
    assert_eq!(register(&a, client).await.status, 200);
    register(&b, client)
        .await
        .assert_error(429, "M_LIMIT_EXCEEDED");
    let seen = admin(&b, Method::GET, &format!("/v1/clients/{client}"), "").await;
    let json = seen.json();
    assert_eq!(json["store"], "redis");
    assert_eq!(
        json["limits"]["registrations_per_ip"]["remaining"], 0,
        "{json}"
    );
    assert!(
        json["limits"]["registrations_per_ip"]["next_unit_in_ms"]
            .as_u64()
            .unwrap()
            > 0
    );
    let reset = reset_limits(&b, client).await;
    assert_eq!(reset.status, 200, "{:?}", reset.body);
    assert_eq!(register(&a, client).await.status, 200);
    let seen = admin(&a, Method::GET, &format!("/v1/clients/{client}"), "").await;
    assert_eq!(
        seen.json()["limits"]["registrations_per_ip"]["remaining"],
        1
    );

    // Bans: posted to A, enforced by B (within its refresh), lifted by B.
    let posted = admin(
        &a,
        Method::POST,
        "/v1/bans",
        r#"{"cidr":"203.0.113.0/24","duration":"1h","reason":"shared"}"#,
    )
    .await;
    assert_eq!(posted.status, 200, "{:?}", posted.body);
    assert!(!redis.keys("{mgk}:bans").await.is_empty());
    register(&a, "203.0.113.5")
        .await
        .assert_error(403, "M_FORBIDDEN");
    eventually(Duration::from_secs(10), "B enforces A's ban", || async {
        register(&b, "203.0.113.5").await.status == 403
    })
    .await;
    let listed = admin(&b, Method::GET, "/v1/bans", "").await.json();
    assert_eq!(listed["bans"][0]["reason"], "shared", "{listed}");
    let lifted = admin(&b, Method::DELETE, "/v1/bans/203.0.113.0%2F24", "").await;
    assert_eq!(lifted.status, 200, "{:?}", lifted.body);
    assert_eq!(register(&b, "203.0.113.6").await.status, 200);
    eventually(Duration::from_secs(10), "A follows B's lift", || async {
        register(&a, "203.0.113.7").await.status == 200
    })
    .await;
    // Redis, not a replica's copy (up to a second behind), says whether a
    // ban existed.
    let posted = admin(
        &a,
        Method::POST,
        "/v1/bans",
        r#"{"cidr":"198.51.100.0/24","duration":"1h"}"#,
    )
    .await;
    assert_eq!(posted.status, 200);
    let lifted = admin(&b, Method::DELETE, "/v1/bans/198.51.100.0%2F24", "").await;
    assert_eq!(lifted.status, 200, "{:?}", lifted.body);
    assert!(
        redis.keys("{mgk}:bans").await.is_empty(),
        "the last lift empties the hash"
    );

    // Lockdown by hand: closed through A, on B too; reopened through B.
    let closed = admin(&a, Method::POST, "/v1/lockdown", r#"{"duration":"1h"}"#).await;
    assert_eq!(closed.status, 200, "{:?}", closed.body);
    eventually(Duration::from_secs(10), "B closes", || async {
        register(&b, "192.0.2.10").await.status == 403
    })
    .await;
    let reopened = admin(&b, Method::DELETE, "/v1/lockdown", "").await;
    assert_eq!(reopened.status, 200, "{:?}", reopened.body);
    assert_eq!(register(&b, "192.0.2.11").await.status, 200);
    eventually(Duration::from_secs(10), "A reopens", || async {
        register(&a, "192.0.2.12").await.status == 200
    })
    .await;
}

/// Every registration through `gate` for `within` is answered `status`.
async fn always(gate: &Gate, status: u16, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let answer = register(gate, "192.0.2.20").await;
        assert_eq!(answer.status, status, "{what}: {:?}", answer.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn registration_is_closed_and_reopened_by_hand_while_redis_is_down() {
    let mut redis = RedisServer::start().await;
    let hs = FakeHomeserver::start().await;
    let (a, b) = replicas(&redis, &hs, "redis-down", "300ms", 1000).await;
    // A closing and a reopening through Redis first: the replicas have
    // seen a reopening, which a Redis restarted empty forgets.
    let closed = admin(&a, Method::POST, "/v1/lockdown", r#"{"duration":"1h"}"#).await;
    assert_eq!(closed.json()["scope"], "every_replica", "{:?}", closed.body);
    let reopened = admin(&a, Method::DELETE, "/v1/lockdown", "").await;
    assert_eq!(reopened.status, 200, "{:?}", reopened.body);
    assert_eq!(reopened.json()["scope"], "every_replica");
    eventually(Duration::from_secs(10), "both open", || async {
        register(&a, "192.0.2.20").await.status == 200
            && register(&b, "192.0.2.20").await.status == 200
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Redis down: the closing takes effect on A alone, and says so.
    redis.kill();
    let closed = admin(&a, Method::POST, "/v1/lockdown", r#"{"duration":"1h"}"#).await;
    assert_eq!(closed.status, 202, "{:?}", closed.body);
    let json = closed.json();
    assert_eq!(json["closed"], true, "{json}");
    assert_eq!(json["scope"], "this_replica", "{json}");
    assert!(json["redis_error"].as_str().is_some_and(|e| !e.is_empty()));
    assert!(
        json["note"].as_str().unwrap().contains("this replica only"),
        "{json}"
    );
    assert!(json["remaining_ms"].as_u64().unwrap() > 3_500_000, "{json}");
    let refused = register(&a, "192.0.2.20").await;
    refused.assert_error(403, "M_FORBIDDEN");
    assert_eq!(
        refused.json()["error"],
        "Registration is temporarily closed"
    );
    assert_eq!(register(&b, "192.0.2.20").await.status, 200);

    // Redis back, empty: A stays closed and writes the closing to Redis,
    // and B follows it.
    redis.restart().await;
    eventually(Duration::from_secs(15), "B follows A's closing", || async {
        let a_refused = register(&a, "192.0.2.20").await;
        assert_eq!(a_refused.status, 403, "A reopened: {:?}", a_refused.body);
        register(&b, "192.0.2.20").await.status == 403
    })
    .await;
    // Every replica reads Redis once a second: a few more reads on A.
    always(
        &a,
        403,
        Duration::from_millis(2500),
        "A after Redis came back",
    )
    .await;
    assert_eq!(redis.keys("{mgk}:lockdown:until").await.len(), 1);
    let state = admin(&b, Method::GET, "/v1/lockdown", "").await.json();
    assert!(
        state["remaining_ms"].as_u64().unwrap() > 3_400_000,
        "{state}"
    );

    // Redis down again: B reopens itself alone; once Redis is back, the
    // reopening reaches A.
    redis.kill();
    let reopened = admin(&b, Method::DELETE, "/v1/lockdown", "").await;
    assert_eq!(reopened.status, 202, "{:?}", reopened.body);
    assert_eq!(reopened.json()["closed"], false);
    assert_eq!(reopened.json()["scope"], "this_replica");
    assert_eq!(register(&b, "192.0.2.20").await.status, 200);
    register(&a, "192.0.2.20")
        .await
        .assert_error(403, "M_FORBIDDEN");
    redis.restart().await;
    eventually(
        Duration::from_secs(15),
        "A follows B's reopening",
        || async { register(&a, "192.0.2.20").await.status == 200 },
    )
    .await;
    always(&b, 200, Duration::from_secs(2), "B after Redis came back").await;

    // A Redis restarted empty has forgotten the reopenings it counted:
    // that is no reopening, and a closing the replicas know of stays.
    let closed = admin(&a, Method::POST, "/v1/lockdown", r#"{"duration":"1h"}"#).await;
    assert_eq!(closed.status, 200, "{:?}", closed.body);
    eventually(Duration::from_secs(10), "B follows A's closing", || async {
        register(&b, "192.0.2.20").await.status == 403
    })
    .await;
    redis.restart().await;
    for gate in [&a, &b] {
        eventually(
            Duration::from_secs(15),
            "the replica reaches Redis",
            || async {
                let ban = r#"{"cidr":"198.18.0.0/15","duration":"1h"}"#;
                admin(gate, Method::POST, "/v1/bans", ban).await.status == 200
            },
        )
        .await;
    }
    always(
        &a,
        403,
        Duration::from_millis(2500),
        "A after a Redis restart",
    )
    .await;
    always(
        &b,
        403,
        Duration::from_millis(500),
        "B after a Redis restart",
    )
    .await;
}
