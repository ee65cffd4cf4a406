//! The operator's features through the `matrix-gatekeeper` binary itself
//! (`serve --config FILE`), each against real components: the recording
//! homeserver, the suite's DNS responder, a `redis-server` of the test's
//! own, and a webhook receiver. What is checked is what an operator sees:
//! status codes, errcodes, the `X-Matrix-Gatekeeper` marker, the process's
//! log lines, `/metrics`, webhook deliveries, and that nothing the gate
//! refused reached the homeserver.

mod common;

use common::Listeners;

use std::time::{Duration, Instant};

use common::admin::{admin, reset_limits, TOKEN};
use common::binary::{field, toml_path, Scratch, Served, LISTEN_ANY};
use common::dns_responder::DnsResponder;
use common::redis_server::RedisServer;
use common::webhook::{next_event, next_event_json, receiver};
use common::{eventually, send, Answer, FakeHomeserver, FixedAnswer};
use http::Method;

const REGISTER: &str = "/_matrix/client/v3/register";
const AVAILABLE: &str = "/_matrix/client/v3/register/available?username=alice";
const EMAIL_TOKEN: &str = "/_matrix/client/v3/register/email/requestToken";

/// A request from `client`, through the trusted loopback proxy; a hang
/// fails the test instead of stalling it.
async fn from(gate: &Served, client: &str, method: Method, path: &str, body: &str) -> Answer {
    let url = gate.url(path);
    let headers = [
        ("content-type", "application/json"),
        ("x-forwarded-for", client),
    ];
    let request = send(method, &url, &headers, body.to_owned());
    tokio::time::timeout(Duration::from_secs(20), request)
        .await
        .expect("the gate answered")
}

async fn register(gate: &Served, client: &str) -> Answer {
    from(
        gate,
        client,
        Method::POST,
        REGISTER,
        r#"{"username":"alice"}"#,
    )
    .await
}

/// The gate's decision as the marker header carries it.
fn marker(answer: &Answer) -> &str {
    answer
        .headers
        .get("x-matrix-gatekeeper")
        .map_or("", |v| v.to_str().unwrap())
}

/// A refusal of the gate's own: the Matrix error, marked `refused`.
fn assert_refused(answer: &Answer, status: u16, errcode: &str) {
    answer.assert_error(status, errcode);
    assert_eq!(marker(answer), "refused", "{:?}", answer.headers);
}

/// The requests that reached the homeserver from `client`.
fn reached_from(hs: &FakeHomeserver, client: &str) -> usize {
    hs.requests()
        .iter()
        .filter(|r| r.header("x-forwarded-for") == Some(client))
        .count()
}

/// The value of the unlabelled metric `name` on the admin listener.
async fn metric(gate: &Served, name: &str) -> String {
    let answer = common::get(&gate.admin_url("/metrics")).await;
    assert_eq!(answer.status, 200);
    let text = String::from_utf8(answer.body.to_vec()).unwrap();
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .to_owned()
}

/// The audit line (text or JSON) about `client`.
fn audit_line(gate: &Served, client: &str) -> String {
    gate.log()
        .lines()
        .find(|l| {
            l.contains("matrix_gatekeeper::audit") && field(l, "client").as_deref() == Some(client)
        })
        .unwrap_or_else(|| panic!("no audit line for {client}:\n{}", gate.log()))
        .to_owned()
}

/// Checks `X-Matrix-Gatekeeper-Signature: sha256=<hex>` against the body
/// with ring's HMAC-SHA256 under `secret`.
fn assert_signed(signature: Option<&str>, secret: &[u8], body: &[u8]) {
    let hex = signature
        .and_then(|s| s.strip_prefix("sha256="))
        .unwrap_or_else(|| panic!("no sha256 signature: {signature:?}"));
    assert_eq!(hex.len(), 64, "{hex}");
    let tag: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect();
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::verify(&key, body, &tag).expect("the signature matches the body");
    let other = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"another secret");
    assert!(ring::hmac::verify(&other, body, &tag).is_err());
}

fn upstream(hs: &FakeHomeserver) -> String {
    format!(
        "[upstream]\nurl = \"{}\"\nresponse_timeout = \"10s\"\n",
        hs.url()
    )
}

const TRUST_LOOPBACK: &str = "[client_ip]\ntrusted_proxies = [\"127.0.0.1\"]\n";

/// Two replicas started from one configuration file, as a deployment
/// shares it: their limits in `redis`, `rate_limit` more keys of
/// `[rate_limit]`, `rest` more tables.
async fn two_replicas(
    dir: &Scratch,
    hs: &FakeHomeserver,
    redis: &RedisServer,
    rate_limit: &str,
    rest: &str,
) -> (Served, Served) {
    let config = dir.write(
        "gatekeeper.toml",
        &format!(
            "[server]\n{LISTEN_ANY}{}{TRUST_LOOPBACK}\
             [rate_limit]\nstore = \"redis\"\nredis_url = \"{}\"\nredis_timeout = \"500ms\"\n\
             {rate_limit}{rest}",
            upstream(hs),
            redis.url(),
        ),
    );
    (Served::start(&config).await, Served::start(&config).await)
}

#[tokio::test]
async fn deny_lists_refuse_listed_clients_and_a_watched_list_is_followed() {
    let hs = FakeHomeserver::start().await;
    let (hook, mut events) = receiver().await;
    let dir = Scratch::new("deny-lists");
    let exits = dir.write("exits.txt", "# Tor exits\n203.0.113.9\n");
    let config = dir.write(
        "gatekeeper.toml",
        &format!(
            "[server]\n{LISTEN_ANY}watch_config = true\n{}{TRUST_LOOPBACK}deny_lists = [{}]\n\
             [notify]\nwebhook_url = \"http://{hook}/hook\"\n",
            upstream(&hs),
            toml_path(&exits)
        ),
    );
    let gate = Served::start(&config).await;

    assert_refused(&register(&gate, "203.0.113.9").await, 403, "M_FORBIDDEN");
    let available = from(&gate, "203.0.113.9", Method::GET, AVAILABLE, "").await;
    assert_refused(&available, 403, "M_FORBIDDEN");
    hs.assert_saw_nothing("a listed client");
    let line = audit_line(&gate, "203.0.113.9");
    assert!(
        line.ends_with(&format!(
            "decision=\"refused\" rule=\"deny_list\" upstream_status=0 list=\"{}\"",
            exits.display()
        )),
        "{line}"
    );
    let allowed = register(&gate, "198.51.100.4").await;
    assert_eq!(allowed.status, 200, "{:?}", allowed.body);
    assert_eq!(marker(&allowed), "allowed");
    assert_eq!(
        hs.only_request().header("x-forwarded-for"),
        Some("198.51.100.4")
    );

    // The list file changes; the configuration file does not.
    let mark = gate.log_mark();
    let changed = Instant::now();
    std::fs::write(&exits, "# Tor exits\n203.0.113.9\n198.51.100.0/24\n").unwrap();
    gate.wait_for_line(mark, "a reload after the list changed", |l| {
        l.contains("configuration reloaded")
    })
    .await;
    eprintln!("changed list picked up after {:?}", changed.elapsed());
    assert!(
        gate.lines_since(mark)
            .iter()
            .any(|l| l.contains("configuration or list file changed")),
        "{}",
        gate.log()
    );
    hs.clear();
    assert_refused(&register(&gate, "198.51.100.4").await, 403, "M_FORBIDDEN");
    hs.assert_saw_nothing("a newly listed client");

    // A broken line: the reload is refused, the lists in force stay, and
    // the webhook hears of it.
    let mark = gate.log_mark();
    std::fs::write(
        &exits,
        "203.0.113.9\n198.51.100.0/24\n192.0.2.0/24\n203.0.113.300\n",
    )
    .unwrap();
    let (signature, body) = next_event(&mut events).await;
    assert_eq!(signature, None, "no secret, no signature");
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(event["event"], "reload_failed", "{event}");
    assert_eq!(
        event["error"],
        format!(
            "client_ip.deny_lists: {}:4: not an address or network: \"203.0.113.300\"",
            exits.display()
        )
    );
    let refused = gate
        .wait_for_line(mark, "the refused reload's log line", |l| {
            l.contains("configuration reload refused")
        })
        .await;
    assert!(refused.contains("ERROR"), "{refused}");
    assert_refused(&register(&gate, "198.51.100.4").await, 403, "M_FORBIDDEN");
    let unlisted = register(&gate, "192.0.2.5").await;
    assert_eq!(
        unlisted.status, 200,
        "the broken file's entries are not in force"
    );
    assert_eq!(reached_from(&hs, "198.51.100.4"), 0);
    assert_eq!(reached_from(&hs, "192.0.2.5"), 1);

    let metrics = gate.metrics().await;
    for line in [
        "gatekeeper_config_reloads_total{result=\"ok\"} 1",
        "gatekeeper_config_reloads_total{result=\"error\"} 1",
        "gatekeeper_decisions_total{route=\"register\",outcome=\"refused\",rule=\"deny_list\"} 3",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line} in\n{metrics}"
        );
    }
}

#[tokio::test]
async fn disposable_email_domains_are_refused_and_sighup_reads_the_list_again() {
    let hs = FakeHomeserver::start().await;
    let dir = Scratch::new("email");
    let disposable = dir.write("disposable.txt", "# throw-away\nmailinator.com\n");
    let config = dir.write(
        "gatekeeper.toml",
        &format!(
            "[server]\n{LISTEN_ANY}{}[email]\ndenied_domain_lists = [{}]\n",
            upstream(&hs),
            toml_path(&disposable)
        ),
    );
    let gate = Served::start(&config).await;
    let request = |address: &str| {
        let body = format!(r#"{{"email":"{address}","client_secret":"s3cret","send_attempt":1}}"#);
        let url = gate.url(EMAIL_TOKEN);
        async move { common::post_json(&url, &body).await }
    };

    for address in ["bot@mailinator.com", "bot@x.Mailinator.COM"] {
        assert_refused(&request(address).await, 403, "M_THREEPID_DENIED");
    }
    hs.assert_saw_nothing("listed e-mail domains");
    let fine = request("alice@notmailinator.com").await;
    assert_eq!(fine.status, 200, "{:?}", fine.body);
    assert_eq!(marker(&fine), "allowed");
    assert_eq!(hs.only_request().target, EMAIL_TOKEN);

    // SIGHUP re-reads the list.
    std::fs::write(&disposable, "mailinator.com\nyopmail.com\n").unwrap();
    let mark = gate.log_mark();
    gate.signal("HUP");
    gate.wait_for_line(mark, "the reload after SIGHUP", |l| {
        l.contains("configuration reloaded")
    })
    .await;
    hs.clear();
    assert_refused(&request("bot@yopmail.com").await, 403, "M_THREEPID_DENIED");
    hs.assert_saw_nothing("a domain listed since the reload");
    let line = gate
        .log()
        .lines()
        .rev()
        .find(|l| l.contains("matrix_gatekeeper::audit"))
        .unwrap()
        .to_owned();
    assert!(line.contains("rule=\"email_domain_list\""), "{line}");
    assert!(
        !line.contains("yopmail"),
        "addresses are not logged: {line}"
    );
}

#[tokio::test]
async fn dnsbl_listings_and_lookup_failures_follow_on_dnsbl_error() {
    let hs = FakeHomeserver::start().await;
    let dns = DnsResponder::start(&["66.2.0.192.listed.test"]).await;
    let dir = Scratch::new("dnsbl");
    let config = |on_error: &str| {
        format!(
            "[server]\n{LISTEN_ANY}{}{TRUST_LOOPBACK}[reputation]\n\
             dnsbl = [\"listed.test\", \"slow.test\"]\ndns_server = \"{}\"\n\
             dnsbl_timeout = \"300ms\"\non_dnsbl_error = \"{on_error}\"\n\
             [log]\nformat = \"json\"\n",
            upstream(&hs),
            dns.addr
        )
    };
    let path = dir.write("gatekeeper.toml", &config("allow"));
    let gate = Served::start(&path).await;

    let listed = register(&gate, "192.0.2.66").await;
    assert_refused(&listed, 403, "M_FORBIDDEN");
    let body = String::from_utf8_lossy(&listed.body).to_lowercase();
    for internal in ["listed.test", "dnsbl", "blocklist", &dns.addr.to_string()] {
        assert!(
            !body.contains(internal),
            "the answer names {internal:?}: {body}"
        );
    }
    hs.assert_saw_nothing("a listed client");
    let line: serde_json::Value = serde_json::from_str(&audit_line(&gate, "192.0.2.66")).unwrap();
    assert_eq!(line["rule"], "dnsbl", "{line}");
    assert_eq!(line["dnsbl_zone"], "listed.test", "{line}");
    assert_eq!(line["decision"], "refused", "{line}");

    // slow.test never answers: with "allow", the request goes on after the
    // timeout.
    let started = Instant::now();
    let allowed = register(&gate, "192.0.2.20").await;
    assert_eq!(allowed.status, 200, "{:?}", allowed.body);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(reached_from(&hs, "192.0.2.20"), 1);
    assert_eq!(metric(&gate, "gatekeeper_dnsbl_errors_total").await, "1");
    assert!(dns.count("20.2.0.192.slow.test") >= 1);

    // "deny" by SIGHUP: the same failure now refuses.
    std::fs::write(&path, config("deny")).unwrap();
    let mark = gate.log_mark();
    gate.signal("HUP");
    gate.wait_for_line(mark, "the reload after SIGHUP", |l| {
        l.contains("configuration reloaded")
    })
    .await;
    assert_refused(&register(&gate, "192.0.2.21").await, 403, "M_FORBIDDEN");
    assert_eq!(reached_from(&hs, "192.0.2.21"), 0);
    let line: serde_json::Value = serde_json::from_str(&audit_line(&gate, "192.0.2.21")).unwrap();
    assert_eq!(line["rule"], "dnsbl_error", "{line}");
    assert_eq!(line["dnsbl_zone"], "slow.test", "{line}");
    assert_eq!(metric(&gate, "gatekeeper_dnsbl_errors_total").await, "2");
}

#[tokio::test]
async fn two_replicas_on_one_redis_lock_registration_down_together() {
    let redis = RedisServer::start().await;
    let hs = FakeHomeserver::start().await;
    let (hook, mut events) = receiver().await;
    let dir = Scratch::new("lockdown");
    let secret = dir.write("webhook.secret", "hook-s3cret-value\n");
    let (a, b) = two_replicas(
        &dir,
        &hs,
        &redis,
        "",
        &format!(
            "[registration]\nlockdown = {{ count = 2, period = \"1h\", close_for = \"10m\" }}\n\
             [notify]\nwebhook_url = \"http://{hook}/hook\"\nwebhook_secret_file = {}\n",
            toml_path(&secret)
        ),
    )
    .await;

    for client in ["198.51.100.1", "198.51.100.2"] {
        let answer = register(&a, client).await;
        assert_eq!(answer.status, 200, "{client}: {:?}", answer.body);
        assert_eq!(marker(&answer), "allowed");
    }
    hs.clear();
    for (gate, client) in [(&b, "198.51.100.3"), (&a, "198.51.100.4")] {
        let closed = register(gate, client).await;
        assert_refused(&closed, 403, "M_FORBIDDEN");
        assert_eq!(closed.json()["error"], "Registration is temporarily closed");
    }
    hs.assert_saw_nothing("registrations while closed");
    let line = audit_line(&b, "198.51.100.3");
    assert!(line.contains("rule=\"lockdown\""), "{line}");
    // Availability checks still pass.
    let available = from(&b, "198.51.100.3", Method::GET, AVAILABLE, "").await;
    assert_eq!(available.status, 200, "{:?}", available.body);
    assert_eq!(marker(&available), "allowed");
    assert_eq!(hs.requests().len(), 1);

    for (gate, started) in [(&a, "1"), (&b, "0")] {
        assert_eq!(metric(gate, "gatekeeper_registration_lockdown").await, "1");
        assert_eq!(
            metric(gate, "gatekeeper_registration_lockdowns_total").await,
            started
        );
    }
    assert!(a
        .log()
        .contains("registration closed: too many registrations completed"));

    let (signature, body) = next_event(&mut events).await;
    assert_signed(signature.as_deref(), b"hook-s3cret-value", &body);
    let event: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(event["event"], "lockdown_started", "{event}");
    assert_eq!(event["count"], 2);
    assert_eq!(event["period"], "1h");
    assert_eq!(event["close_for"], "10m");
    assert!(
        event["until"].as_str().unwrap() > event["timestamp"].as_str().unwrap(),
        "{event}"
    );

    // Without [admin] token_file the API is absent, token or not.
    for gate in [&a, &b] {
        let answer = admin(gate, Method::GET, "/v1/bans", "").await;
        assert_eq!(answer.status, 404, "{:?}", answer.body);
    }
}

/// The `admin action` audit lines of a JSON log: (action, subject, outcome).
fn admin_actions(log: &str) -> Vec<(String, String, String)> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["message"] == "admin action")
        .map(|l| {
            assert_eq!(l["target"], "matrix_gatekeeper::audit", "{l}");
            let text = |name: &str| l[name].as_str().unwrap_or_default().to_owned();
            (text("action"), text("subject"), text("outcome"))
        })
        .collect()
}

fn actions(expected: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    expected
        .iter()
        .map(|(a, s, o)| (a.to_string(), s.to_string(), o.to_string()))
        .collect()
}

#[tokio::test]
async fn the_admin_api_of_two_replicas_shares_bans_resets_and_lockdowns() {
    let redis = RedisServer::start().await;
    let hs = FakeHomeserver::start().await;
    let (hook, mut events) = receiver().await;
    let dir = Scratch::new("admin");
    let token = dir.write("admin.token", &format!("{TOKEN}\n"));
    let (a, b) = two_replicas(
        &dir,
        &hs,
        &redis,
        "registrations_per_ip = { count = 1, period = \"1h\" }\n",
        &format!(
            "[admin]\ntoken_file = {}\n[notify]\nwebhook_url = \"http://{hook}/hook\"\n\
             [log]\nformat = \"json\"\n",
            toml_path(&token)
        ),
    )
    .await;

    // No token, a wrong one.
    let missing = send(Method::GET, &a.admin_url("/v1/bans"), &[], "").await;
    missing.assert_error(401, "M_MISSING_TOKEN");
    let wrong = send(
        Method::POST,
        &a.admin_url("/v1/lockdown"),
        &[("authorization", "Bearer not-the-admin-token-at-all")],
        "",
    )
    .await;
    wrong.assert_error(401, "M_UNKNOWN_TOKEN");

    // A client limited through A and B is reset through B.
    let client = "198.51.100.23";
    assert_eq!(
        register(&a, client).await.status,
        200,
        "not closed by the wrong token"
    );
    let limited = register(&b, client).await;
    limited.assert_error(429, "M_LIMIT_EXCEEDED");
    assert_eq!(marker(&limited), "rate_limited");
    assert_eq!(reached_from(&hs, client), 1);
    let seen = admin(&b, Method::GET, &format!("/v1/clients/{client}"), "").await;
    assert_eq!(seen.json()["store"], "redis");
    assert_eq!(
        seen.json()["limits"]["registrations_per_ip"]["remaining"],
        0,
        "{}",
        seen.json()
    );
    let reset = reset_limits(&b, client).await;
    assert_eq!(reset.status, 200, "{:?}", reset.body);
    assert_eq!(reset.json()["reset"], true);
    assert_eq!(register(&a, client).await.status, 200, "the budget is back");
    assert_eq!(reached_from(&hs, client), 2);

    // A ban posted to A is enforced by B once B has re-read the bans.
    let posted = admin(
        &a,
        Method::POST,
        "/v1/bans",
        r#"{"cidr":"203.0.113.0/24","duration":"1h","reason":"spam wave"}"#,
    )
    .await;
    assert_eq!(posted.status, 200, "{:?}", posted.body);
    let took = eventually(Duration::from_secs(5), "B learns of A's ban", || async {
        let seen = admin(&b, Method::GET, "/v1/clients/203.0.113.5", "").await;
        seen.json()["temporary_ban"]["cidr"] == "203.0.113.0/24"
    })
    .await;
    eprintln!("B followed A's ban after {took:?}");
    assert_refused(&register(&b, "203.0.113.5").await, 403, "M_FORBIDDEN");
    assert_eq!(reached_from(&hs, "203.0.113.5"), 0);
    let line: serde_json::Value = serde_json::from_str(&audit_line(&b, "203.0.113.5")).unwrap();
    assert_eq!(line["rule"], "temporary_ban", "{line}");
    // Lifted through B; A follows.
    let lifted = admin(&b, Method::DELETE, "/v1/bans/203.0.113.0%2F24", "").await;
    assert_eq!(lifted.status, 200, "{:?}", lifted.body);
    eventually(Duration::from_secs(5), "A learns of the lift", || async {
        let seen = admin(&a, Method::GET, "/v1/clients/203.0.113.6", "").await;
        seen.json()["temporary_ban"].is_null()
    })
    .await;
    assert_eq!(register(&a, "203.0.113.6").await.status, 200);

    // Closed by hand through A, reopened through B.
    let closed = admin(&a, Method::POST, "/v1/lockdown", r#"{"duration":"30m"}"#).await;
    assert_eq!(closed.status, 200, "{:?}", closed.body);
    assert_eq!(closed.json()["closed"], true);
    eventually(Duration::from_secs(5), "B closes", || async {
        admin(&b, Method::GET, "/v1/lockdown", "").await.json()["closed"] == true
    })
    .await;
    let refused = register(&b, "192.0.2.10").await;
    assert_refused(&refused, 403, "M_FORBIDDEN");
    assert_eq!(
        refused.json()["error"],
        "Registration is temporarily closed"
    );
    assert_eq!(reached_from(&hs, "192.0.2.10"), 0);
    let reopened = admin(&b, Method::DELETE, "/v1/lockdown", "").await;
    assert_eq!(reopened.status, 200, "{:?}", reopened.body);
    eventually(Duration::from_secs(5), "A reopens", || async {
        admin(&a, Method::GET, "/v1/lockdown", "").await.json()["closed"] == false
    })
    .await;
    assert_eq!(register(&a, "192.0.2.11").await.status, 200);
    let mut posted: Vec<String> = Vec::new();
    for _ in 0..2 {
        posted.push(
            next_event_json(&mut events).await["event"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    posted.sort();
    assert_eq!(posted, ["manual_lockdown_ended", "manual_lockdown_started"]);

    // One audit line per change and per refused token, on the replica that
    // took it; the token appears in neither log.
    assert_eq!(
        admin_actions(&a.log()),
        actions(&[
            ("authenticate", "/v1/bans", "missing_token"),
            ("authenticate", "/v1/lockdown", "wrong_token"),
            ("ban", "203.0.113.0/24", "done"),
            ("close_registration", "30m", "done"),
        ]),
        "{}",
        a.log()
    );
    assert_eq!(
        admin_actions(&b.log()),
        actions(&[
            ("reset_limits", client, "done"),
            ("lift_ban", "203.0.113.0/24", "done"),
            ("reopen_registration", "-", "done"),
        ]),
        "{}",
        b.log()
    );
    for log in [a.log(), b.log()] {
        assert!(!log.contains(TOKEN), "the token is logged:\n{log}");
        assert!(!log.contains("not-the-admin-token-at-all"), "{log}");
    }
}

/// Whether process `pid` catches SIGHUP now, rather than dying of it
/// (bit 0 of `SigCgt` in `/proc/PID/status`).
fn catches_sighup(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & 1 == 1)
}

#[tokio::test]
async fn a_reload_asked_for_while_the_gate_starts_neither_kills_it_nor_is_lost() {
    let hs = FakeHomeserver::start().await;
    let dir = Scratch::new("early-hangup");
    // Half a million addresses: reading them keeps the gate starting for a
    // while, as large published lists do.
    let mut list = String::with_capacity(500_000 * 14);
    for i in 0..500_000u32 {
        list.push_str(&format!("10.{}.{}.{}\n", i >> 16, (i >> 8) & 255, i & 255));
    }
    let exits = dir.write("exits.txt", &list);
    let config = dir.write(
        "gatekeeper.toml",
        &format!(
            "[server]\n{LISTEN_ANY}{}{TRUST_LOOPBACK}deny_lists = [{}]\n",
            upstream(&hs),
            toml_path(&exits)
        ),
    );
    let mut gate = Served::spawn(&config);
    // `systemctl reload` right after `start` sends SIGHUP while the lists
    // are still being read: from early on, the process must catch it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listening = gate.log().contains("matrix-gatekeeper listening");
        if catches_sighup(gate.pid()) {
            assert!(
                !listening,
                "SIGHUP ended the process until the gate was listening:\n{}",
                gate.log()
            );
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP is never caught");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    gate.signal("HUP");
    gate.wait_until_listening().await;
    gate.wait_for_line(0, "the reload asked for during start-up", |l| {
        l.contains("configuration reloaded")
    })
    .await;
    assert_refused(&register(&gate, "10.7.161.31").await, 403, "M_FORBIDDEN");
    assert_eq!(register(&gate, "192.0.2.1").await.status, 200);
    assert_eq!(
        hs.only_request().header("x-forwarded-for"),
        Some("192.0.2.1")
    );
}

/// Waits for the start-up line naming the homeserver, and checks it.
async fn assert_named(gate: &Served, name: &str, version: &str) {
    let said = gate
        .wait_for_line(0, "the homeserver's name", |l| {
            l.contains("the homeserver says what it is")
        })
        .await;
    assert_eq!(field(&said, "homeserver").as_deref(), Some(name), "{said}");
    assert_eq!(field(&said, "version").as_deref(), Some(version), "{said}");
}

/// With guests allowed, `serve` asks the homeserver what it is at start
/// (federation `/version`, then Synapse's `server_version`) and says when
/// `[homeserver] guest_upgrades` does not fit it; with guests denied it
/// asks nothing.
#[tokio::test]
async fn the_start_up_log_says_when_guest_upgrades_do_not_fit_the_homeserver() {
    let conduit = FakeHomeserver::start_answering(&[FixedAnswer {
        path: "/_matrix/federation/v1/version",
        status: 200,
        json: r#"{"server":{"name":"Conduit","version":"0.10.12"}}"#,
    }])
    .await;
    // Synapse with only the client API on the gate's listener.
    let synapse = FakeHomeserver::start_answering(&[
        FixedAnswer {
            path: "/_matrix/federation/v1/version",
            status: 404,
            json: r#"{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}"#,
        },
        FixedAnswer {
            path: "/_synapse/admin/v1/server_version",
            status: 200,
            json: r#"{"server_version":"1.163.2"}"#,
        },
    ])
    .await;
    // Answers `{"ok":true}` to everything: names nothing.
    let silent = FakeHomeserver::start().await;
    let dir = Scratch::new("identify");
    let start = |name: &str, hs: &FakeHomeserver, rest: &str| {
        let config = dir.write(
            &format!("{name}.toml"),
            &format!("[server]\n{LISTEN_ANY}{}{rest}", upstream(hs)),
        );
        async move { Served::start(&config).await }
    };
    let guests = "[guest]\naccess = \"allow\"\n";
    let upgrades = "[homeserver]\nguest_upgrades = true\n";

    let gate = start("conduit", &conduit, &format!("{guests}{upgrades}")).await;
    assert_named(&gate, "Conduit", "0.10.12").await;
    let warning = gate
        .wait_for_line(0, "the warning", |l| {
            l.contains("guest_upgrades = true, but the homeserver says it is Conduit")
        })
        .await;
    assert!(warning.contains("WARN"), "{warning}");
    drop(gate);

    let gate = start("synapse", &synapse, guests).await;
    assert_named(&gate, "Synapse", "1.163.2").await;
    gate.wait_for_line(0, "the hint", |l| {
        l.contains("set [homeserver] guest_upgrades = true to let guests upgrade")
    })
    .await;
    // Synapse with upgrades declared: named, and nothing to say about it.
    let gate = start("synapse-upgrades", &synapse, &format!("{guests}{upgrades}")).await;
    gate.wait_for_line(0, "the homeserver's name", |l| {
        l.contains("the homeserver says what it is")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !gate.log().contains("guest_upgrades = true, but"),
        "{}",
        gate.log()
    );
    assert!(
        !gate.log().contains("to let guests upgrade"),
        "{}",
        gate.log()
    );

    let gate = start("silent", &silent, &format!("{guests}{upgrades}")).await;
    gate.wait_for_line(0, "the note", |l| {
        l.contains("the homeserver does not say what it is")
    })
    .await;
    drop(gate);

    // Guests denied: no question is asked.
    conduit.clear();
    let gate = start("denied", &conduit, upgrades).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    conduit.assert_saw_nothing("a gate with guests denied");
    assert!(!gate.log().contains("says what it is"), "{}", gate.log());
}
