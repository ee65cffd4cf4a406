//! Registration lockdown and webhook notifications: a wave of completed
//! registrations closes registration (in memory on Tokio's paused clock;
//! through a real Redis for two gates at once), a real HTTP receiver gets
//! signed events, a receiver that is down delays nothing, and the
//! configuration keys are checked.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::redis_server::RedisServer;
use common::webhook::{next_event, next_event_json, receiver};
use common::{eventually, get, post_json, FakeHomeserver, Gate, Listeners};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use matrix_gatekeeper::gate::{GateRequestBody, RegistrationGateLayer};
use matrix_gatekeeper::notify::signature;
use matrix_gatekeeper::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::{service_fn, Layer, ServiceExt};

const REGISTER: &str = "/_matrix/client/v3/register";
const AVAILABLE: &str = "/_matrix/client/v3/register/available?username=alice";
const LOCKDOWN: &str =
    "[registration]\nlockdown = { count = 3, period = \"1h\", close_for = \"10m\" }\n";

/// Sends one request through a gate layer; returns status and body.
async fn call<S>(service: &S, method: &str, uri: &str, body: &'static str) -> (StatusCode, String)
where
    S: tower::Service<
            Request<Full<Bytes>>,
            Response = Response<http_body_util::Either<Full<Bytes>, Full<Bytes>>>,
            Error = Infallible,
        > + Clone,
{
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let response = service.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test(start_paused = true)]
async fn memory_lockdown_closes_after_n_registrations_and_reopens() {
    let config = Config::from_toml(LOCKDOWN).unwrap();
    let reached = Arc::new(AtomicUsize::new(0));
    let seen = reached.clone();
    // A stand-in homeserver completing every registration.
    let homeserver = service_fn(move |_req: Request<GateRequestBody<Full<Bytes>>>| {
        seen.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}")))) }
    });
    let layer = RegistrationGateLayer::new(&config);
    let gate = layer.layer(homeserver);

    for name in ["one", "two", "three"] {
        let body: &'static str = match name {
            "one" => r#"{"username":"one"}"#,
            "two" => r#"{"username":"two"}"#,
            _ => r#"{"username":"three"}"#,
        };
        let (status, _) = call(&gate, "POST", REGISTER, body).await;
        assert_eq!(status, StatusCode::OK);
    }
    assert_eq!(reached.load(Ordering::SeqCst), 3);

    for (uri, body) in [
        (REGISTER, r#"{"username":"four"}"#),
        ("/_matrix/client/v3/register?kind=guest", "{}"),
    ] {
        let (status, text) = call(&gate, "POST", uri, body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["errcode"], "M_FORBIDDEN");
        assert_eq!(json["error"], "Registration is temporarily closed");
    }
    assert_eq!(
        reached.load(Ordering::SeqCst),
        3,
        "refusals reached the homeserver"
    );
    // Availability checks still pass.
    let (status, _) = call(&gate, "GET", AVAILABLE, "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reached.load(Ordering::SeqCst), 4);
    assert!(layer.lockdown().is_known_closed());

    tokio::time::advance(Duration::from_secs(9 * 60)).await;
    let (status, _) = call(&gate, "POST", REGISTER, r#"{"username":"five"}"#).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "still closed before close_for"
    );

    tokio::time::advance(Duration::from_secs(61)).await;
    let (status, _) = call(&gate, "POST", REGISTER, r#"{"username":"six"}"#).await;
    assert_eq!(status, StatusCode::OK, "reopened after close_for");
    assert_eq!(reached.load(Ordering::SeqCst), 5);
    assert!(!layer.lockdown().is_known_closed());
}

/// Guests get numeric throw-away accounts without any interactive step:
/// they are limited by `guests_per_ip`, and never close registration for
/// everyone.
#[tokio::test(start_paused = true)]
async fn guest_registrations_do_not_count_towards_the_lockdown() {
    let config = Config::from_toml(&format!("{LOCKDOWN}[guest]\naccess = \"allow\"\n")).unwrap();
    let homeserver = service_fn(|_req: Request<GateRequestBody<Full<Bytes>>>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}"))))
    });
    let layer = RegistrationGateLayer::new(&config);
    let gate = layer.layer(homeserver);
    for _ in 0..5 {
        let (status, text) = call(
            &gate,
            "POST",
            "/_matrix/client/v3/register?kind=guest",
            "{}",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{text}");
    }
    assert!(
        !layer.lockdown().is_closed().await,
        "guests closed registration"
    );
    // Completed user registrations (a guest upgrade is one) still count.
    for body in [
        r#"{"username":"one"}"#,
        r#"{"username":"two","guest_access_token":"t"}"#,
        r#"{"username":"three"}"#,
    ] {
        let (status, text) = call(&gate, "POST", REGISTER, body).await;
        assert_eq!(status, StatusCode::OK, "{text}");
    }
    assert!(layer.lockdown().is_closed().await);
}

/// Sends a complete registration request on `stream`; the fake homeserver
/// answers it `200` (a completed registration) after `delay_ms`.
async fn send_registration(stream: &mut TcpStream, name: &str, delay_ms: u64) {
    let body = format!(r#"{{"username":"{name}"}}"#);
    let request = format!(
        "POST {REGISTER} HTTP/1.1\r\nHost: gate\r\ncontent-type: application/json\r\n\
         x-test-status: 200\r\nx-test-delay-ms: {delay_ms}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
}

/// The homeserver finishes a registration whose client hung up (Synapse
/// does): the gate waits for its answer all the same and counts the
/// account — the lockdown, the decision metric (and with it the audit
/// line), on a connection that started with a registration and on one the
/// pass-through fast path served first.
#[tokio::test]
async fn registrations_whose_clients_hang_up_are_still_counted() {
    let hs = FakeHomeserver::start().await;
    let config = Config::from_toml(&format!(
        "[upstream]\nurl = \"{}\"\nresponse_timeout = \"10s\"\n{LOCKDOWN}",
        hs.url()
    ))
    .unwrap();
    let gate = Gate::start_full(config, true, None).await;
    for (n, name) in ["one", "two", "three"].into_iter().enumerate() {
        let mut stream = TcpStream::connect(gate.addr).await.unwrap();
        if n == 2 {
            // A pass-through request first: the fast path serves it and
            // hands the connection over at the registration.
            stream
                .write_all(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: gate\r\n\r\n")
                .await
                .unwrap();
            let mut answer = Vec::new();
            while !answer.ends_with(br#"{"ok":true}"#) {
                let mut buffer = [0u8; 1024];
                let n = stream.read(&mut buffer).await.unwrap();
                assert!(n > 0, "the gate closed the connection");
                answer.extend_from_slice(&buffer[..n]);
            }
        }
        send_registration(&mut stream, name, 300).await;
        let registered = |hs: &FakeHomeserver| {
            hs.requests()
                .iter()
                .filter(|r| r.target.starts_with(REGISTER))
                .count()
        };
        eventually(
            Duration::from_secs(5),
            "the registration is forwarded",
            || {
                let seen = registered(&hs);
                async move { seen == n + 1 }
            },
        )
        .await;
        // The client hangs up before the homeserver answers.
        drop(stream);
    }
    eventually(
        Duration::from_secs(5),
        "three registrations counted",
        || async {
            let metrics = gate.metrics().await;
            metrics.contains(
                "gatekeeper_decisions_total{route=\"register\",outcome=\"allowed\",rule=\"\"} 3\n",
            ) && metrics.contains("gatekeeper_registration_lockdown 1\n")
        },
    )
    .await;
    post_json(&gate.url(REGISTER), r#"{"username":"four"}"#)
        .await
        .assert_error(403, "M_FORBIDDEN");
    assert_eq!(
        hs.requests()
            .iter()
            .filter(|r| r.target.starts_with(REGISTER))
            .count(),
        3
    );
}

#[tokio::test]
async fn two_gates_sharing_redis_close_together() {
    let redis = RedisServer::start().await;
    let hs = FakeHomeserver::start().await;
    let extra = format!(
        "[rate_limit]\nstore = \"redis\"\nredis_url = \"{}\"\nredis_timeout = \"500ms\"\n{LOCKDOWN}",
        redis.url()
    );
    let a = Gate::start(&hs.url(), &extra).await;
    let b = Gate::start(&hs.url(), &extra).await;
    // Three completions split across both gates reach the shared count.
    for (gate, name) in [(&a, "one"), (&b, "two"), (&a, "three")] {
        let answer = post_json(&gate.url(REGISTER), &format!(r#"{{"username":"{name}"}}"#)).await;
        assert_eq!(answer.status, 200, "{name}");
    }
    hs.clear();
    for gate in [&a, &b] {
        let answer = post_json(&gate.url(REGISTER), r#"{"username":"four"}"#).await;
        answer.assert_error(403, "M_FORBIDDEN");
        assert_eq!(answer.json()["error"], "Registration is temporarily closed");
        assert_eq!(get(&gate.url(AVAILABLE)).await.status, 200);
    }
    assert_eq!(
        hs.requests().len(),
        2,
        "only the availability checks passed"
    );
    assert!(!redis.keys("{mgk}:lockdown:until").await.is_empty());
}

#[tokio::test]
async fn lockdown_started_is_posted_signed_to_the_webhook() {
    let (addr, mut rx) = receiver().await;
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(
        &hs.url(),
        &format!(
            "{LOCKDOWN}[notify]\nwebhook_url = \"http://{addr}/hook\"\nwebhook_secret = \"s3cret\"\n"
        ),
    )
    .await;
    for name in ["one", "two", "three"] {
        let answer = post_json(&gate.url(REGISTER), &format!(r#"{{"username":"{name}"}}"#)).await;
        assert_eq!(answer.status, 200);
    }
    let (sig, body) = next_event(&mut rx).await;
    assert_eq!(sig.as_deref(), Some(signature(b"s3cret", &body).as_str()));
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["event"], "lockdown_started", "{json}");
    assert_eq!(json["count"], 3);
    assert_eq!(json["period"], "1h");
    assert_eq!(json["close_for"], "10m");
    let stamp = json["timestamp"].as_str().unwrap();
    assert!(stamp.ends_with('Z') && stamp.len() == 20, "{stamp}");
    assert!(json["until"].as_str().unwrap() > stamp);
}

#[tokio::test]
async fn reload_failed_is_posted() {
    let (addr, mut rx) = receiver().await;
    let hs = FakeHomeserver::start().await;
    let path = std::env::temp_dir().join(format!("mgk-lockdown-{}.toml", std::process::id()));
    let good = format!(
        "[upstream]\nurl = \"{}\"\n[notify]\nwebhook_url = \"http://{addr}/\"\n",
        hs.url()
    );
    std::fs::write(&path, &good).unwrap();
    let gate = Gate::start_full(Config::from_toml(&good).unwrap(), false, Some(path.clone())).await;
    std::fs::write(&path, format!("{good}[guest]\naccess = \"sometimes\"\n")).unwrap();
    assert!(gate.reloader.reload().is_err());
    let (sig, body) = next_event(&mut rx).await;
    assert_eq!(sig, None, "no secret, no signature");
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["event"], "reload_failed");
    assert!(
        json["error"].as_str().unwrap().contains("guest.access"),
        "{json}"
    );
    // A broken line holding a secret: the event says where, not what.
    std::fs::write(
        &path,
        format!("{good}webhook_secret = \"s3cret\"\nwebhook_secret = \"s3cret\"\n"),
    )
    .unwrap();
    assert!(gate.reloader.reload().is_err());
    let (_, body) = next_event(&mut rx).await;
    let text = String::from_utf8_lossy(&body);
    assert!(!text.contains("s3cret"), "{text}");
    assert!(
        text.contains("not valid TOML at line 6, column 1 (notify.webhook_secret): duplicate key"),
        "{text}"
    );
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn a_dead_receiver_delays_and_fails_nothing() {
    // A port that was bound and released: nothing listens there.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(
        &hs.url(),
        &format!(
            "[registration]\nlockdown = {{ count = 1, period = \"1h\", close_for = \"10m\" }}\n\
             [notify]\nwebhook_url = \"http://{closed}/\"\nwebhook_secret = \"k\"\n"
        ),
    )
    .await;
    // Every request is answered while delivery to the dead receiver keeps
    // retrying in the background; none waits for it.
    let answer = tokio::time::timeout(
        Duration::from_secs(5),
        post_json(&gate.url(REGISTER), r#"{"username":"one"}"#),
    )
    .await
    .expect("answered");
    assert_eq!(answer.status, 200);
    for _ in 0..5 {
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            post_json(&gate.url(REGISTER), r#"{"username":"two"}"#),
        )
        .await
        .expect("answered");
        answer.assert_error(403, "M_FORBIDDEN");
        assert_eq!(get(&gate.url(AVAILABLE)).await.status, 200);
        assert_eq!(get(&gate.url("/_matrix/client/versions")).await.status, 200);
    }
}

#[test]
fn lockdown_and_notify_keys_are_validated() {
    let err = |toml: &str| Config::from_toml(toml).unwrap_err().to_string();
    let lockdown = |spec: &str| format!("[registration]\nlockdown = {spec}\n");
    assert!(err(&lockdown(
        "{ count = 0, period = \"1h\", close_for = \"1m\" }"
    ))
    .starts_with("registration.lockdown.count:"));
    assert!(err(&lockdown(
        "{ count = 3, period = \"0s\", close_for = \"1m\" }"
    ))
    .starts_with("registration.lockdown.period:"));
    assert!(err(&lockdown(
        "{ count = 3, period = \"1h\", close_for = \"0ms\" }"
    ))
    .starts_with("registration.lockdown.close_for:"));
    assert!(err(&lockdown("{ count = 3, period = \"1h\" }")).contains("close_for"));
    assert!(err(&lockdown(
        "{ count = 3, period = \"1h\", close_for = \"1m\", x = 1 }"
    ))
    .contains("unknown field"));
    let notify = |body: &str| format!("[notify]\n{body}\n");
    for (body, key) in [
        (
            "webhook_url = \"https://relay.example/\"",
            "notify.webhook_url:",
        ),
        ("webhook_url = \"http:///path\"", "notify.webhook_url:"),
        ("webhook_url = \"relay.example\"", "notify.webhook_url:"),
        ("webhook_secret = \"k\"", "notify.webhook_url:"),
        (
            "webhook_url = \"http://127.0.0.1:1/\"\nwebhook_secret = \"\"",
            "notify.webhook_secret:",
        ),
        (
            "webhook_url = \"http://127.0.0.1:1/\"\nwebhook_secret_file = \"/nonexistent/secret\"",
            "notify.webhook_secret_file:",
        ),
        ("hook = 1", "notify.hook"),
    ] {
        let message = err(&notify(body));
        assert!(message.starts_with(key), "{body}: {message}");
    }
    let config = Config::from_toml(&format!(
        "{}{}",
        lockdown("{ count = 3, period = \"1h\", close_for = \"1m\" }"),
        notify("webhook_url = \"http://127.0.0.1:8088/hook\"\nwebhook_secret = \"k\"")
    ))
    .unwrap();
    assert!(config.to_toml().contains("webhook_secret = \"***\""));
}

#[tokio::test]
async fn lockdown_ended_is_posted_when_registration_reopens_by_itself() {
    let (addr, mut rx) = receiver().await;
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(
        &hs.url(),
        &format!(
            "[registration]\nlockdown = {{ count = 1, period = \"1h\", close_for = \"1s\" }}\n\
             [notify]\nwebhook_url = \"http://{addr}/hook\"\n"
        ),
    )
    .await;
    let answer = post_json(&gate.url(REGISTER), r#"{"username":"one"}"#).await;
    assert_eq!(answer.status, 200);
    assert_eq!(next_event_json(&mut rx).await["event"], "lockdown_started");
    assert_eq!(next_event_json(&mut rx).await["event"], "lockdown_ended");
    // Open again: the next registration reaches the homeserver.
    let answer = post_json(&gate.url(REGISTER), r#"{"username":"two"}"#).await;
    assert_eq!(answer.status, 200);
}

#[tokio::test]
async fn store_down_and_store_up_are_posted_as_redis_fails_and_returns() {
    let (addr, mut rx) = receiver().await;
    let mut redis = RedisServer::start().await;
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(
        &hs.url(),
        &format!(
            "[rate_limit]\nstore = \"redis\"\nredis_url = \"{}\"\nredis_timeout = \"200ms\"\n\
             attempts_per_ip = {{ count = 1000, period = \"1h\" }}\n\
             [notify]\nwebhook_url = \"http://{addr}/hook\"\n",
            redis.url()
        ),
    )
    .await;
    let url = gate.url(REGISTER);
    let attempt = || post_json(&url, "{}");
    assert_eq!(attempt().await.status, 200, "Redis answers");
    redis.kill();
    // Decisions fall back while Redis is gone; the first failure is posted.
    attempt().await;
    let down = next_event_json(&mut rx).await;
    assert_eq!(down["event"], "store_down", "{down}");
    assert!(
        down["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{down}"
    );
    redis.restart().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let up = loop {
        attempt().await;
        if let Ok(Some((_, body))) =
            tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
        {
            break serde_json::from_slice::<serde_json::Value>(&body).unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no store_up within 10 s"
        );
    };
    assert_eq!(up["event"], "store_up", "{up}");
}

#[tokio::test]
async fn closing_and_reopening_by_hand_are_posted() {
    let (addr, mut rx) = receiver().await;
    let hs = FakeHomeserver::start().await;
    let token = common::admin::token_file("manual-lockdown", common::admin::TOKEN);
    let gate = common::admin::gate(
        &hs,
        &format!("[notify]\nwebhook_url = \"http://{addr}/hook\"\n"),
        Some(&token),
    )
    .await;
    let closed = common::admin::admin(
        &gate,
        http::Method::POST,
        "/v1/lockdown",
        r#"{"duration":"30m"}"#,
    )
    .await;
    assert_eq!(closed.status, 200, "{:?}", closed.body);
    let started = next_event_json(&mut rx).await;
    assert_eq!(started["event"], "manual_lockdown_started", "{started}");
    assert!(started["until"].as_str().unwrap() > started["timestamp"].as_str().unwrap());
    let reopened = common::admin::admin(&gate, http::Method::DELETE, "/v1/lockdown", "").await;
    assert_eq!(reopened.status, 200, "{:?}", reopened.body);
    assert_eq!(
        next_event_json(&mut rx).await["event"],
        "manual_lockdown_ended"
    );
}
