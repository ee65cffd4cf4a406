//! `[reputation] dnsbl`: DNS blocklist lookups of the client address on the
//! guarded routes, against a real DNS responder on loopback.

mod common;

use common::Listeners;

use std::sync::OnceLock;
use std::time::Duration;

use common::dns_responder::DnsResponder;
use common::{eventually, send, Answer, Captured, FakeHomeserver, Gate};
use http::Method;
use matrix_gatekeeper::Config;

const REGISTER: &str = "/_matrix/client/v3/register";
const BODY: &str = r#"{"username":"alice","password":"a long password"}"#;

/// The audit lines of every test in this binary, in text format (the one
/// the fail2ban filter reads).
fn audit_log() -> &'static Captured {
    static LOG: OnceLock<Captured> = OnceLock::new();
    LOG.get_or_init(|| Captured::text_global("matrix_gatekeeper::audit=info"))
}

/// The audit lines about `client`.
fn audit_lines(client: &str) -> Vec<String> {
    let text = String::from_utf8(audit_log().0.lock().unwrap().clone()).unwrap();
    let field = format!("client=\"{client}\"");
    text.lines()
        .filter(|line| line.contains(&field))
        .map(str::to_owned)
        .collect()
}

/// A gate trusting loopback's `X-Forwarded-For`, asking `zones` at the
/// responder.
async fn gate(hs: &FakeHomeserver, dns: &DnsResponder, zones: &[&str], extra: &str) -> Gate {
    Gate::start_with(config(hs, dns, zones, extra)).await
}

fn config(hs: &FakeHomeserver, dns: &DnsResponder, zones: &[&str], extra: &str) -> Config {
    audit_log();
    Config::from_toml(&config_text(hs, dns, zones, extra)).expect("test config is valid")
}

/// The text of [`config`], for a configuration file.
fn config_text(hs: &FakeHomeserver, dns: &DnsResponder, zones: &[&str], extra: &str) -> String {
    let zones: Vec<String> = zones.iter().map(|z| format!("\"{z}\"")).collect();
    format!(
        "[upstream]\nurl = \"{}\"\n[client_ip]\ntrusted_proxies = [\"127.0.0.1\"]\n\
         [reputation]\ndnsbl = [{}]\ndns_server = \"{}\"\n{extra}",
        hs.url(),
        zones.join(", "),
        dns.addr
    )
}

/// A registration from `client`, bounded so that a hang fails the test
/// instead of stalling it.
async fn register_from(gate: &Gate, client: &str) -> Answer {
    request_from(gate, Method::POST, REGISTER, client, BODY).await
}

/// A request from `client`, bounded like [`register_from`].
async fn request_from(gate: &Gate, method: Method, path: &str, client: &str, body: &str) -> Answer {
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

#[tokio::test]
async fn a_listed_client_is_refused_and_the_audit_line_names_the_zone() {
    let hs = FakeHomeserver::start().await;
    let dns = DnsResponder::start(&["66.2.0.192.listed.test"]).await;
    let gate = gate(&hs, &dns, &["clean.test", "listed.test"], "").await;

    let answer = register_from(&gate, "192.0.2.66").await;
    answer.assert_error(403, "M_FORBIDDEN");
    hs.assert_saw_nothing("a listed client");
    let mut asked = dns.queries();
    asked.sort();
    assert_eq!(asked, ["66.2.0.192.clean.test", "66.2.0.192.listed.test"]);
    let lines = audit_lines("192.0.2.66");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains(
            r#"decision="refused" rule="dnsbl" upstream_status=0 dnsbl_zone="listed.test""#
        ),
        "{}",
        lines[0]
    );
    gate.shutdown().await;
}

#[tokio::test]
async fn a_client_no_zone_lists_passes_and_its_line_names_no_zone() {
    let hs = FakeHomeserver::start().await;
    let dns = DnsResponder::start(&["66.2.0.192.listed.test"]).await;
    let gate = gate(&hs, &dns, &["listed.test"], "").await;

    let answer = register_from(&gate, "192.0.2.10").await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(hs.requests().len(), 1);
    assert_eq!(dns.queries(), ["10.2.0.192.listed.test"]);
    let lines = audit_lines("192.0.2.10");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains(r#"decision="allowed""#), "{}", lines[0]);
    assert!(!lines[0].contains("dnsbl_zone"), "{}", lines[0]);
    gate.shutdown().await;
}

#[tokio::test]
async fn an_ipv6_client_is_asked_by_its_reversed_nibbles() {
    let name = "6.6.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.listed.test";
    let hs = FakeHomeserver::start().await;
    let dns = DnsResponder::start(&[name]).await;
    let gate = gate(&hs, &dns, &["listed.test"], "").await;

    register_from(&gate, "2001:db8::66")
        .await
        .assert_error(403, "M_FORBIDDEN");
    hs.assert_saw_nothing("a listed IPv6 client");
    assert_eq!(dns.queries(), [name]);
    gate.shutdown().await;
}

#[tokio::test]
async fn a_silent_zone_with_allow_lets_the_request_pass_after_the_timeout() {
    let hs = FakeHomeserver::start().await;
    let dns = DnsResponder::start(&[]).await;
    let gate = gate(&hs, &dns, &["slow.test"], "dnsbl_timeout = \"200ms\"\n").await;

    let started = std::time::Instant::now();
    let answer = register_from(&gate, "192.0.2.20").await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    // The timeout bounds the wait (with room for a loaded machine).
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(hs.requests().len(), 1);
    // Asked (and asked again halfway through the timeout), never answered.
    let asked = dns.queries();
    assert!((1..=2).contains(&asked.len()), "{asked:?}");
    assert!(
        asked.iter().all(|q| q == "20.2.0.192.slow.test"),
        "{asked:?}"
    );
    gate.shutdown().await;
}

#[tokio::test]
async fn a_silent_zone_with_deny_refuses_and_names_the_zone() {
    let hs = FakeHomeserver::start().await;
    let dns = DnsResponder::start(&[]).await;
    let gate = gate(
        &hs,
        &dns,
        &["slow.test"],
        "dnsbl_timeout = \"200ms\"\non_dnsbl_error = \"deny\"\n",
    )
    .await;

    register_from(&gate, "192.0.2.21")
        .await
        .assert_error(403, "M_FORBIDDEN");
    hs.assert_saw_nothing("a lookup that timed out, with deny");
    let lines = audit_lines("192.0.2.21");
    assert!(
        lines.iter().any(|l| l.contains(r#"rule="dnsbl_error""#)
            && l.contains(r#"dnsbl_zone="slow.test""#)),
        "{lines:?}"
    );
    gate.shutdown().await;
}

#[tokio::test]
async fn a_lost_query_is_sent_again_within_the_timeout() {
    let name = "67.2.0.192.lossy.test";
    let hs = FakeHomeserver::start().await;
    let dns = DnsResponder::start(&[name]).await;
    let gate = gate(
        &hs,
        &dns,
        &["lossy.test"],
        "dnsbl_timeout = \"2s\"\non_dnsbl_error = \"allow\"\n",
    )
    .await;

    let started = std::time::Instant::now();
    register_from(&gate, "192.0.2.67")
        .await
        .assert_error(403, "M_FORBIDDEN");
    hs.assert_saw_nothing("listed, on the second try");
    assert_eq!(dns.count(name), 2);
    // Sent again halfway through the timeout, not at once.
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    gate.shutdown().await;
}

#[tokio::test]
async fn a_truncated_answer_is_asked_again_over_tcp() {
    let name = "68.2.0.192.truncated.test";
    let hs = FakeHomeserver::start().await;
    let dns = DnsResponder::start(&[name]).await;
    let gate = gate(
        &hs,
        &dns,
        &["truncated.test"],
        "dnsbl_timeout = \"2s\"\non_dnsbl_error = \"allow\"\n",
    )
    .await;

    register_from(&gate, "192.0.2.68")
        .await
        .assert_error(403, "M_FORBIDDEN");
    hs.assert_saw_nothing("listed, in the answer over TCP");
    assert_eq!(dns.count(name), 2, "{:?}", dns.queries());
    assert_eq!(dns.tcp_count(name), 1);
    gate.shutdown().await;
}

#[tokio::test]
async fn servfail_follows_on_dnsbl_error() {
    let hs = FakeHomeserver::start().await;
    let dns = DnsResponder::start(&[]).await;
    let allow = gate(&hs, &dns, &["servfail.test"], "").await;
    let answer = register_from(&allow, "192.0.2.30").await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(hs.requests().len(), 1);
    allow.shutdown().await;

    hs.clear();
    let deny = gate(&hs, &dns, &["servfail.test"], "on_dnsbl_error = \"deny\"\n").await;
    register_from(&deny, "192.0.2.30")
        .await
        .assert_error(403, "M_FORBIDDEN");
    hs.assert_saw_nothing("SERVFAIL with deny");
    // Errors are not cached: each gate asked.
    assert_eq!(dns.count("30.2.0.192.servfail.test"), 2);
    deny.shutdown().await;
}

#[tokio::test]
async fn failed_checks_are_counted_even_when_allowed() {
    let hs = FakeHomeserver::start().await;
    let dns = DnsResponder::start(&["66.2.0.192.listed.test"]).await;
    let config = config(&hs, &dns, &["listed.test", "servfail.test"], "");
    let gate = Gate::start_full(config, true, None).await;
    let errors = || async {
        let text = gate.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix("gatekeeper_dnsbl_errors_total "))
            .map(str::to_owned)
    };
    assert_eq!(errors().await.as_deref(), Some("0"));
    assert_eq!(register_from(&gate, "192.0.2.50").await.status, 200);
    assert_eq!(errors().await.as_deref(), Some("1"));
    // A listing decides even when another zone fails: not an error.
    register_from(&gate, "192.0.2.66")
        .await
        .assert_error(403, "M_FORBIDDEN");
    assert_eq!(errors().await.as_deref(), Some("1"));
    gate.shutdown().await;
}

#[tokio::test]
async fn answers_are_cached_per_address_for_their_ttl() {
    let hs = FakeHomeserver::start().await;
    let dns = DnsResponder::start(&["66.2.0.192.listed.test"]).await;
    let gate = gate(&hs, &dns, &["listed.test"], "").await;

    for _ in 0..3 {
        register_from(&gate, "192.0.2.66")
            .await
            .assert_error(403, "M_FORBIDDEN");
        let answer = register_from(&gate, "192.0.2.40").await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
    // One query per address: the listing and the NXDOMAIN (SOA minimum
    // 300 s) are both cached.
    assert_eq!(dns.count("66.2.0.192.listed.test"), 1);
    assert_eq!(dns.count("40.2.0.192.listed.test"), 1);
    // Another address is another query.
    register_from(&gate, "192.0.2.41").await;
    assert_eq!(dns.count("41.2.0.192.listed.test"), 1);
    gate.shutdown().await;
}

#[tokio::test]
async fn pass_through_from_a_listed_address_asks_nothing() {
    let hs = FakeHomeserver::start().await;
    let dns = DnsResponder::start(&["66.2.0.192.listed.test"]).await;
    // A zone that never answers, with a long timeout: pass-through that
    // waited for it would not answer within the bound below.
    let gate = gate(
        &hs,
        &dns,
        &["listed.test", "slow.test"],
        "dnsbl_timeout = \"60s\"\n",
    )
    .await;

    for path in ["/_matrix/client/versions", "/_matrix/client/v3/sync"] {
        let url = gate.url(path);
        let request = send(Method::GET, &url, &[("x-forwarded-for", "192.0.2.66")], "");
        let answer = tokio::time::timeout(Duration::from_secs(20), request)
            .await
            .expect("pass-through answered");
        assert_eq!(answer.status, 200, "{path}: {:?}", answer.body);
    }
    assert_eq!(hs.requests().len(), 2);
    assert!(dns.queries().is_empty(), "{:?}", dns.queries());
    // The same address on a guarded route is checked (and refused at once:
    // the first zone lists it, so the silent one is not waited for).
    register_from(&gate, "192.0.2.66")
        .await
        .assert_error(403, "M_FORBIDDEN");
    assert_eq!(dns.count("66.2.0.192.listed.test"), 1);
    gate.shutdown().await;
}

#[tokio::test]
async fn a_reload_applies_new_zones_and_keeps_the_cache() {
    let hs = FakeHomeserver::start().await;
    let dns = DnsResponder::start(&["66.2.0.192.listed.test"]).await;
    let dir = std::env::temp_dir().join(format!("mgk-dnsbl-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gatekeeper.toml");
    let file = |zones: &[&str]| config_text(&hs, &dns, zones, "");
    std::fs::write(&path, file(&["clean.test"])).unwrap();
    audit_log();
    let config = Config::from_file(&path).unwrap();
    let gate = Gate::start_full(config, false, Some(path.clone())).await;
    assert_eq!(register_from(&gate, "192.0.2.66").await.status, 200);

    std::fs::write(&path, file(&["clean.test", "listed.test"])).unwrap();
    gate.reloader.reload().unwrap();
    register_from(&gate, "192.0.2.66")
        .await
        .assert_error(403, "M_FORBIDDEN");
    // clean.test's answer came from the cache kept across the reload.
    assert_eq!(dns.count("66.2.0.192.clean.test"), 1);
    assert_eq!(dns.count("66.2.0.192.listed.test"), 1);

    std::fs::write(&path, file(&[])).unwrap();
    gate.reloader.reload().unwrap();
    assert_eq!(register_from(&gate, "192.0.2.66").await.status, 200);
    assert_eq!(dns.queries().len(), 2, "no zone, no query");
    let _ = std::fs::remove_dir_all(&dir);
    gate.shutdown().await;
}

#[tokio::test]
async fn a_client_over_its_attempts_limit_is_not_looked_up() {
    let hs = FakeHomeserver::start().await;
    let dns = DnsResponder::start(&[]).await;
    let limits = "[rate_limit]\nattempts_per_ip = { count = 3, period = \"1h\" }\n";
    let gate = gate(&hs, &dns, &["clean.test"], limits).await;

    // Six addresses of one /64: one client, one attempts budget, and each
    // address a name of its own (the cache would hide repeats of one).
    for i in 1..=6 {
        let answer = register_from(&gate, &format!("2001:db8::{i}")).await;
        if i <= 3 {
            assert_eq!(answer.status, 200, "attempt {i}: {:?}", answer.body);
        } else {
            answer.assert_error(429, "M_LIMIT_EXCEEDED");
        }
    }
    assert_eq!(hs.requests().len(), 3);
    let nibbles = "0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.clean.test";
    let mut asked = dns.queries();
    asked.sort();
    assert_eq!(
        asked,
        (1..=3)
            .map(|i| format!("{i}.{nibbles}"))
            .collect::<Vec<_>>()
    );
    gate.shutdown().await;
}

#[tokio::test]
async fn preflights_and_refused_methods_are_not_looked_up() {
    let hs = FakeHomeserver::start().await;
    let dns = DnsResponder::start(&[]).await;
    let gate = gate(&hs, &dns, &["clean.test"], "").await;
    let client = "192.0.2.81";

    let preflight = request_from(&gate, Method::OPTIONS, REGISTER, client, "").await;
    assert_eq!(preflight.status, 200, "{:?}", preflight.body);
    let forwarded = hs.only_request();
    assert_eq!(
        (forwarded.method, forwarded.target.as_str()),
        (Method::OPTIONS, REGISTER)
    );
    for path in [
        REGISTER,
        "/_matrix/client/v3/register/available?username=alice",
    ] {
        request_from(&gate, Method::PUT, path, client, BODY)
            .await
            .assert_error(405, "M_UNRECOGNIZED");
    }
    assert_eq!(hs.requests().len(), 1, "PUT is not forwarded");
    assert!(dns.queries().is_empty(), "{:?}", dns.queries());
    // The same client registering is looked up.
    assert_eq!(register_from(&gate, client).await.status, 200);
    assert_eq!(dns.queries(), ["81.2.0.192.clean.test"]);
    gate.shutdown().await;
}

#[tokio::test]
async fn a_listed_clients_refusal_counts_the_attempt_and_gives_the_registration_back() {
    let listed = "6.6.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.c.0.0.0.8.b.d.0.1.0.0.2.listed.test";
    let hs = FakeHomeserver::start().await;
    let dns = DnsResponder::start(&[listed]).await;
    let limits = "[rate_limit]\nattempts_per_ip = { count = 4, period = \"1h\" }\n\
                  registrations_per_ip = { count = 2, period = \"1h\" }\n";
    let gate = gate(&hs, &dns, &["listed.test"], limits).await;

    // A listed address and a clean one of the same /64: one client.
    for _ in 0..2 {
        register_from(&gate, "2001:db8:c::66")
            .await
            .assert_error(403, "M_FORBIDDEN");
    }
    hs.assert_saw_nothing("a listed client");
    // Both registrations are left: the refusals reserved none for good.
    for _ in 0..2 {
        let answer = register_from(&gate, "2001:db8:c::1").await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
    // The fifth attempt is over the attempts limit, which the listed
    // address's two refusals counted against.
    register_from(&gate, "2001:db8:c::1")
        .await
        .assert_error(429, "M_LIMIT_EXCEEDED");
    let lines = audit_lines("2001:db8:c::1");
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines[2].contains(r#"decision="rate_limited" rule="attempts_per_ip""#),
        "{}",
        lines[2]
    );
    assert_eq!(hs.requests().len(), 2);
    gate.shutdown().await;
}

/// The value of `gatekeeper_dnsbl_zone_healthy` for `zone`, if exported.
async fn zone_healthy(gate: &Gate, zone: &str) -> Option<String> {
    let series = format!("gatekeeper_dnsbl_zone_healthy{{zone=\"{zone}\"}} ");
    let text = gate.metrics().await;
    text.lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .map(str::to_owned)
}

/// Waits until the gate's background check has judged every zone as
/// `expected` says (`"1"` healthy, `"0"` not).
async fn wait_for_health(gate: &Gate, expected: &[(&str, &str)]) {
    eventually(Duration::from_secs(20), "the zones are checked", || async {
        for (zone, value) in expected {
            if zone_healthy(gate, zone).await.as_deref() != Some(*value) {
                return false;
            }
        }
        true
    })
    .await;
}

#[tokio::test]
async fn a_zone_listing_its_unlisted_test_point_is_not_trusted() {
    let hs = FakeHomeserver::start().await;
    let dns = DnsResponder::start(&["66.2.0.192.listed.test"]).await;
    let zones = ["lists-everything.test", "listed.test"];
    let deny = config(&hs, &dns, &zones, "on_dnsbl_error = \"deny\"\n");
    let gate = Gate::start_full(deny, true, None).await;
    wait_for_health(
        &gate,
        &[("lists-everything.test", "0"), ("listed.test", "1")],
    )
    .await;
    // Both test points of both zones were asked.
    for zone in zones {
        let (listed, unlisted) = dns.test_point_counts(zone);
        assert!(listed >= 1 && unlisted >= 1, "{zone}: {listed}, {unlisted}");
    }

    // The broken zone is not asked, and its failure refuses with deny.
    register_from(&gate, "192.0.2.90")
        .await
        .assert_error(403, "M_FORBIDDEN");
    hs.assert_saw_nothing("an untrusted zone with deny");
    assert_eq!(dns.queries(), ["90.2.0.192.listed.test"]);
    let lines = audit_lines("192.0.2.90");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains(r#"rule="dnsbl_error""#)
            && lines[0].contains(r#"dnsbl_zone="lists-everything.test""#),
        "{}",
        lines[0]
    );
    // A listing in the zone that behaves still refuses, by rule dnsbl.
    register_from(&gate, "192.0.2.66")
        .await
        .assert_error(403, "M_FORBIDDEN");
    let lines = audit_lines("192.0.2.66");
    assert!(
        lines.last().is_some_and(
            |l| l.contains(r#"rule="dnsbl" "#) && l.contains(r#"dnsbl_zone="listed.test""#)
        ),
        "{lines:?}"
    );
    gate.shutdown().await;

    // With allow, the client the broken zone "lists" is let through.
    let allow = config(&hs, &dns, &zones, "on_dnsbl_error = \"allow\"\n");
    let gate = Gate::start_full(allow, true, None).await;
    wait_for_health(
        &gate,
        &[("lists-everything.test", "0"), ("listed.test", "1")],
    )
    .await;
    let answer = register_from(&gate, "192.0.2.91").await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(hs.only_request().json()["username"], "alice");
    let errors = gate.metrics().await;
    assert!(
        errors.contains("\ngatekeeper_dnsbl_errors_total 1\n"),
        "{errors}"
    );
    gate.shutdown().await;
}

#[tokio::test]
async fn a_reload_that_changes_the_zones_checks_them_again() {
    let hs = FakeHomeserver::start().await;
    let dns = DnsResponder::start(&[]).await;
    let dir = std::env::temp_dir().join(format!("mgk-dnsbl-health-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gatekeeper.toml");
    let write = |zones: &[&str]| std::fs::write(&path, config_text(&hs, &dns, zones, "")).unwrap();
    write(&["clean.test"]);
    audit_log();
    let gate = Gate::start_full(Config::from_file(&path).unwrap(), true, Some(path.clone())).await;
    wait_for_health(&gate, &[("clean.test", "1")]).await;

    write(&["lists-everything.test"]);
    gate.reloader.reload().unwrap();
    wait_for_health(&gate, &[("lists-everything.test", "0")]).await;
    assert_eq!(
        zone_healthy(&gate, "clean.test").await,
        None,
        "no longer asked"
    );
    let _ = std::fs::remove_dir_all(&dir);
    gate.shutdown().await;
}
