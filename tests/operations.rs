//! What an operator runs in production: the admin listener and its metrics,
//! shadow mode, bans, email domain rules, and configuration reloads (also
//! under load).

mod common;

use common::Listeners;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{get, post_json, send, FakeHomeserver, Gate};
use http::Method;
use matrix_gatekeeper::Config;

const REGISTER: &str = "/_matrix/client/v3/register";

fn config(upstream: &str, extra: &str) -> Config {
    Config::from_toml(&format!(
        "[upstream]\nurl = \"{upstream}\"\nresponse_timeout = \"10s\"\n{extra}"
    ))
    .unwrap()
}

fn temp_config_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("mgk-ops-{}-{name}.toml", std::process::id()))
}

#[tokio::test]
async fn admin_listener_serves_metrics_health_and_readiness() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start_full(
        config(
            &hs.url(),
            "[rate_limit]\nregistrations_per_ip = { count = 1, period = \"1h\" }\n",
        ),
        true,
        None,
    )
    .await;
    post_json(&gate.url(REGISTER), r#"{"username":"admin"}"#).await;
    post_json(&gate.url(REGISTER), r#"{"username":"admin"}"#).await;
    let ok = send(
        Method::POST,
        &gate.url(REGISTER),
        &[("x-test-status", "200")],
        r#"{"username":"alice"}"#,
    )
    .await;
    assert_eq!(ok.status, 200);
    let limited = post_json(&gate.url(REGISTER), r#"{"username":"bob"}"#).await;
    assert_eq!(limited.status, 429);
    get(&gate.url("/_matrix/client/versions")).await;

    let health = get(&gate.admin_url("/healthz")).await;
    assert_eq!(health.status, 200);
    let ready = get(&gate.admin_url("/readyz")).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["upstream"], "reachable");
    assert_eq!(ready.json()["store"], "memory");

    let metrics = get(&gate.admin_url("/metrics")).await;
    assert_eq!(metrics.status, 200);
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    for line in [
        "gatekeeper_decisions_total{route=\"register\",outcome=\"refused\",rule=\"reserved\"} 2",
        "gatekeeper_decisions_total{route=\"register\",outcome=\"allowed\",rule=\"\"} 1",
        "gatekeeper_decisions_total{route=\"register\",outcome=\"rate_limited\",rule=\"registrations_per_ip\"} 1",
        "gatekeeper_request_duration_seconds_count{traffic=\"pass_through\"} 1",
        "gatekeeper_request_duration_seconds_count{traffic=\"guarded\"} 4",
        "gatekeeper_upstream_errors_total{kind=\"connect\"} 0",
        "gatekeeper_limiter_store_degraded 0",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    assert_eq!(get(&gate.admin_url("/nothing")).await.status, 404);
    // The admin endpoints are not on the public listener.
    assert_ne!(get(&gate.url("/metrics")).await.body, metrics.body);
}

/// `gatekeeper_upstream_responses_total{class}` from the admin listener.
async fn upstream_responses(gate: &Gate, class: &str) -> u64 {
    let text = gate.metrics().await;
    let prefix = format!("gatekeeper_upstream_responses_total{{class=\"{class}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in\n{text}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn homeserver_answers_are_counted_by_class_on_both_paths() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start_full(config(&hs.url(), ""), true, None).await;
    for class in ["2xx", "3xx", "4xx", "5xx", "other"] {
        assert_eq!(upstream_responses(&gate, class).await, 0, "{class}");
    }
    // Pass-through (the fast path): a 200 and a 500 of the homeserver.
    assert_eq!(get(&gate.url("/_matrix/client/versions")).await.status, 200);
    let failed = send(
        Method::GET,
        &gate.url("/_matrix/client/versions"),
        &[("x-test-status", "500")],
        "",
    )
    .await;
    assert_eq!(failed.status, 500);
    // A guarded route (the full stack): the homeserver's 503.
    let available = "/_matrix/client/v3/register/available?username=alice";
    let unavailable = send(
        Method::GET,
        &gate.url(available),
        &[("x-test-status", "503")],
        "",
    )
    .await;
    assert_eq!(unavailable.status, 503);
    assert_eq!(upstream_responses(&gate, "2xx").await, 1);
    assert_eq!(upstream_responses(&gate, "5xx").await, 2);
    // The gate's own answers are not the homeserver's: its refusal of a
    // reserved name leaves the counts as they were.
    let before = hs.requests().len();
    let refused = post_json(&gate.url(REGISTER), r#"{"username":"admin"}"#).await;
    assert_eq!(refused.status, 400, "{:?}", refused.json());
    assert_eq!(hs.requests().len(), before);
    assert_eq!(upstream_responses(&gate, "2xx").await, 1);
    assert_eq!(upstream_responses(&gate, "4xx").await, 0);
    assert_eq!(upstream_responses(&gate, "5xx").await, 2);
}

#[tokio::test]
async fn readiness_fails_while_the_homeserver_is_unreachable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gate = Gate::start_full(config(&format!("http://127.0.0.1:{port}"), ""), true, None).await;
    let ready = get(&gate.admin_url("/readyz")).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["upstream"], "unreachable");
    assert_eq!(get(&gate.admin_url("/healthz")).await.status, 200);
    assert_eq!(get(&gate.url("/_matrix/client/versions")).await.status, 502);
    let metrics = get(&gate.admin_url("/metrics")).await;
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();
    assert!(
        text.contains("gatekeeper_upstream_errors_total{kind=\"connect\"} 1\n"),
        "{text}"
    );
}

#[tokio::test]
async fn shadow_mode_forwards_the_original_request_and_counts_what_it_would_refuse() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start_full(
        config(
            &hs.url(),
            "[registration]\nmode = \"shadow\"\nmax_body_bytes = 64\n\
             [rate_limit]\nattempts_per_ip = { count = 4, period = \"1h\" }\n",
        ),
        true,
        None,
    )
    .await;
    let cases: &[(&str, &str)] = &[
        (
            "/_matrix/client/v3/register?kind=guest&x=1",
            r#"{"username":"anything"}"#,
        ),
        (
            "/_matrix/client/v3/r%65gister",
            r#"{"username":"ADMIN","password":"p"}"#,
        ),
        (
            "/_matrix/client/v3/register",
            r#"{"username":"a","username":"b"}"#,
        ),
        (
            "/_matrix/client/v3/register",
            &format!(r#"{{"pad":"{}"}}"#, "x".repeat(200)),
        ),
    ];
    for (target, body) in cases {
        hs.clear();
        let answer = post_json(&gate.url(target), body).await;
        assert_eq!(answer.status, 200, "{target}: forwarded in shadow mode");
        let seen = hs.only_request();
        assert_eq!(seen.target, *target, "forwarded as sent");
        assert_eq!(&seen.body[..], body.as_bytes(), "body forwarded as sent");
    }
    // The fifth attempt is over attempts_per_ip: forwarded, counted.
    hs.clear();
    assert_eq!(post_json(&gate.url(REGISTER), "{}").await.status, 200);
    assert_eq!(hs.requests().len(), 1);
    let text = gate.metrics().await;
    for rule in [
        "guest_denied",
        "reserved",
        "bad_json",
        "too_large",
        "attempts_per_ip",
    ] {
        let line = format!(
            "gatekeeper_decisions_total{{route=\"register\",outcome=\"would_refuse\",rule=\"{rule}\"}} 1"
        );
        assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
    }
    assert!(!text.contains("outcome=\"refused\""), "{text}");
}

#[tokio::test]
async fn banned_networks_and_user_agents_are_refused() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start_with(config(
        &hs.url(),
        "[client_ip]\ntrusted_proxies = [\"127.0.0.1\"]\ndeny = [\"203.0.113.0/24\", \"2001:db8:bad::/48\"]\n\
         deny_user_agents = [\"(?i)python-requests\"]\n",
    ))
    .await;
    for (xff, agent) in [
        ("203.0.113.9", "Element/1.11"),
        ("2001:db8:bad:1::5", "Element/1.11"),
        ("198.51.100.1", "python-requests/2.31"),
    ] {
        send(
            Method::POST,
            &gate.url(REGISTER),
            &[("x-forwarded-for", xff), ("user-agent", agent)],
            r#"{"username":"alice"}"#,
        )
        .await
        .assert_error(403, "M_FORBIDDEN");
        send(
            Method::GET,
            &gate.url("/_matrix/client/v3/register/available?username=alice"),
            &[("x-forwarded-for", xff), ("user-agent", agent)],
            "",
        )
        .await
        .assert_error(403, "M_FORBIDDEN");
    }
    hs.assert_saw_nothing("banned clients");
    // Bans apply to registration only.
    let versions = send(
        Method::GET,
        &gate.url("/_matrix/client/versions"),
        &[("x-forwarded-for", "203.0.113.9")],
        "",
    )
    .await;
    assert_eq!(versions.status, 200);
    let ok = send(
        Method::POST,
        &gate.url(REGISTER),
        &[
            ("x-forwarded-for", "198.51.100.1"),
            ("user-agent", "Element/1.11"),
        ],
        r#"{"username":"alice"}"#,
    )
    .await;
    assert_eq!(ok.status, 200);
}

#[tokio::test]
async fn email_domain_rules_apply_to_request_token() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start_with(config(
        &hs.url(),
        "[email]\nallowed_domains = [\"example.org\", \"*.example.org\"]\ndenied_domains = [\"spam.example.org\"]\n",
    ))
    .await;
    let url = gate.url("/_matrix/client/v3/register/email/requestToken");
    for email in [
        "a@evil.test",
        "a@spam.example.org",
        "a@EXAMPLE.org.evil.test",
    ] {
        post_json(
            &url,
            &format!(r#"{{"email":"{email}","client_secret":"s","send_attempt":1}}"#),
        )
        .await
        .assert_error(403, "M_THREEPID_DENIED");
    }
    hs.assert_saw_nothing("denied email domains");
    for email in ["a@example.org", "a@Mail.Example.org"] {
        let answer = post_json(
            &url,
            &format!(r#"{{"email":"{email}","client_secret":"s","send_attempt":1}}"#),
        )
        .await;
        assert_eq!(answer.status, 200, "{email}");
    }
    assert_eq!(hs.requests().len(), 2);
}

#[tokio::test]
async fn reload_swaps_the_policy_keeps_limiter_state_and_refuses_bad_files() {
    let hs = FakeHomeserver::start().await;
    let path = temp_config_path("reload");
    let base = format!(
        "[upstream]\nurl = \"{}\"\n[rate_limit]\nregistrations_per_ip = {{ count = 1, period = \"1h\" }}\n",
        hs.url()
    );
    std::fs::write(&path, &base).unwrap();
    let gate = Gate::start_full(Config::from_file(&path).unwrap(), true, Some(path.clone())).await;
    let register = |name: &'static str| {
        let url = gate.url(REGISTER);
        async move {
            send(
                Method::POST,
                &url,
                &[("x-test-status", "200")],
                format!(r#"{{"username":"{name}"}}"#),
            )
            .await
        }
    };
    assert_eq!(register("carol").await.status, 200);
    assert_eq!(register("dave").await.status, 429);

    // New reserved names; the limiter state survives the reload.
    std::fs::write(
        &path,
        format!("{base}[username]\nreserved = [\"carol\", \"eve\"]\n"),
    )
    .unwrap();
    gate.reloader.reload().unwrap();
    register("eve").await.assert_error(400, "M_USER_IN_USE");
    assert_eq!(register("dave").await.status, 429, "limiter state kept");
    // "admin" is no longer reserved (the list was replaced); only the
    // spent budget stops it.
    assert_eq!(register("admin").await.status, 429);

    // An invalid file is refused and the previous configuration stays.
    std::fs::write(&path, format!("{base}[guest]\naccess = \"sometimes\"\n")).unwrap();
    let error = gate.reloader.reload().unwrap_err().to_string();
    assert!(error.starts_with("guest.access:"), "{error}");
    register("eve").await.assert_error(400, "M_USER_IN_USE");

    let text = gate.metrics().await;
    assert!(
        text.contains("gatekeeper_config_reloads_total{result=\"ok\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("gatekeeper_config_reloads_total{result=\"error\"} 1\n"),
        "{text}"
    );
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_under_load_fails_no_request() {
    let hs = FakeHomeserver::start().await;
    let path = temp_config_path("load");
    let write = |reserved: &str| {
        std::fs::write(
            &path,
            format!(
                "[upstream]\nurl = \"{}\"\n[username]\nreserved = [\"{reserved}\"]\n",
                hs.url()
            ),
        )
        .unwrap()
    };
    write("first");
    let gate = Gate::start_full(Config::from_file(&path).unwrap(), false, Some(path.clone())).await;
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..8)
        .map(|i| {
            let (failures, done) = (failures.clone(), done.clone());
            let register = gate.url(REGISTER);
            let versions = gate.url("/_matrix/client/versions");
            tokio::spawn(async move {
                for n in 0..40 {
                    let answer = if n % 2 == 0 {
                        post_json(&register, &format!(r#"{{"username":"user{i}x{n}"}}"#)).await
                    } else {
                        get(&versions).await
                    };
                    if answer.status != 200 {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut reloads = 0;
    while done.load(Ordering::Relaxed) < 8 * 40 && reloads < 200 {
        write(if reloads % 2 == 0 { "second" } else { "first" });
        gate.reloader.reload().unwrap();
        reloads += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for worker in workers {
        worker.await.unwrap();
    }
    assert!(
        reloads >= 5,
        "only {reloads} reloads happened during the load"
    );
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed during {reloads} reloads"
    );
    assert_eq!(done.load(Ordering::Relaxed), 320);
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn with_watch_config_a_changed_file_is_picked_up() {
    let hs = FakeHomeserver::start().await;
    let path = temp_config_path("watch");
    let write = |reserved: &str| {
        std::fs::write(
            &path,
            format!(
                "[server]\nwatch_config = true\n[upstream]\nurl = \"{}\"\n[username]\nreserved = [\"{reserved}\"]\n",
                hs.url()
            ),
        )
        .unwrap()
    };
    write("first");
    let gate = Gate::start_full(Config::from_file(&path).unwrap(), false, Some(path.clone())).await;
    let available = gate.url("/_matrix/client/v3/register/available?username=second");
    assert_eq!(get(&available).await.status, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    write("second");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = get(&available).await;
        if answer.status == 400 {
            answer.assert_error(400, "M_USER_IN_USE");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the changed file was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = std::fs::remove_file(&path);
}
