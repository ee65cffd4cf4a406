//! One audit line per registration decision, with everything an operator
//! needs and no secret; and the real binary's JSON logs and SIGHUP reload.

mod common;

use std::time::{Duration, Instant};

use common::{post_json, send, Captured, FakeHomeserver, FixedAnswer, Gate};
use http::Method;

#[tokio::test]
async fn every_decision_is_one_audit_line_without_secrets() {
    let (captured, subscriber) = Captured::json("matrix_gatekeeper::audit=info");
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(
        &hs.url(),
        "[rate_limit]\nregistrations_per_ip = { count = 1, period = \"1h\" }\n",
    )
    .await;
    let secret_password = "hunter2-very-secret";
    let secret_token = "syt_secret_access_token";
    let auth = format!("Bearer {secret_token}");
    let with_secrets = |name: &str| {
        format!(
            r#"{{"username":"{name}","password":"{secret_password}","auth":{{"type":"m.login.registration_token","token":"{secret_token}","session":"s"}}}}"#
        )
    };
    let registered = send(
        Method::POST,
        &gate.url("/_matrix/client/v3/register"),
        &[
            ("user-agent", "Element/1.11 (test)"),
            ("x-test-status", "200"),
        ],
        with_secrets("Alice"),
    )
    .await;
    // The homeserver's answer, read for its user_id, reaches the client
    // byte for byte.
    assert_eq!(registered.status, 200);
    assert_eq!(
        std::str::from_utf8(&registered.body).unwrap(),
        r#"{"user_id":"@someone:example.org","access_token":"t","device_id":"D"}"#
    );
    post_json(
        &gate.url("/_matrix/client/v3/register"),
        &with_secrets("admin"),
    )
    .await;
    post_json(
        &gate.url("/_matrix/client/v3/register"),
        &with_secrets("bob"),
    )
    .await;
    // A bridge's registration carries its token.
    send(
        Method::POST,
        &gate.url("/_matrix/client/v3/register"),
        &[("authorization", auth.as_str()), ("x-test-status", "200")],
        r#"{"type":"m.login.application_service","username":"_bridge_a"}"#,
    )
    .await;
    // Pass-through traffic is not audited.
    send(Method::GET, &gate.url("/_matrix/client/versions"), &[], "").await;

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(!text.contains(secret_password), "password logged:\n{text}");
    assert!(!text.contains(secret_token), "token logged:\n{text}");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["target"] == "matrix_gatekeeper::audit")
        .collect();
    assert_eq!(lines.len(), 4, "{text}");
    let allowed = &lines[0];
    assert_eq!(allowed["decision"], "allowed");
    assert_eq!(allowed["route"], "register");
    assert_eq!(allowed["kind"], "user");
    assert_eq!(allowed["username"], "alice");
    assert_eq!(allowed["client"], "127.0.0.1");
    assert_eq!(allowed["key"], "127.0.0.1");
    assert_eq!(allowed["user_agent"], "Element/1.11 (test)");
    assert_eq!(allowed["upstream_status"], 200);
    // The account the homeserver says it made (here not the name asked
    // for: what a homeserver answering a completed session again does).
    assert_eq!(allowed["user_id"], "@someone:example.org");
    assert!(allowed["timestamp"].is_string());
    assert_eq!(lines[1]["decision"], "refused");
    assert_eq!(lines[1]["rule"], "reserved");
    assert_eq!(lines[1]["upstream_status"], 0);
    assert!(lines[1].get("user_id").is_none(), "{}", lines[1]);
    assert_eq!(lines[2]["decision"], "rate_limited");
    assert_eq!(lines[2]["rule"], "registrations_per_ip");
    assert_eq!(lines[3]["decision"], "allowed");
    assert_eq!(lines[3]["kind"], "appservice");
    assert_eq!(lines[3]["appservice"], "unverified");
    assert_eq!(lines[3]["username"], "_bridge_a");
    assert_eq!(lines[3]["user_id"], "@someone:example.org");
}

/// A UIA step (`401`) is not read, and has no `user_id`; a `2xx` answer
/// too large to be a registration's is `502` to the client, and its audit
/// line still says what the homeserver answered.
#[tokio::test]
async fn only_a_successful_registration_answer_is_read_and_only_a_small_one() {
    let huge: &'static str = Box::leak(
        format!(
            r#"{{"user_id":"@big:example.org","pad":"{}"}}"#,
            "x".repeat(70_000)
        )
        .into_boxed_str(),
    );
    let hs = FakeHomeserver::start_answering(&[FixedAnswer {
        path: "/_matrix/client/v3/register",
        status: 200,
        json: huge,
    }])
    .await;
    let gate = Gate::start(&hs.url(), "").await;
    let lines = audit_lines(async {
        let step = send(
            Method::POST,
            &gate.url("/_matrix/client/r0/register"),
            &[("x-test-status", "401")],
            r#"{"username":"stepper"}"#,
        )
        .await;
        assert_eq!(step.status, 401);
        assert_eq!(step.json()["session"], "sess");
        let big = post_json(
            &gate.url("/_matrix/client/v3/register"),
            r#"{"username":"big"}"#,
        )
        .await;
        big.assert_error(502, "M_UNKNOWN");
    })
    .await;
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["upstream_status"], 401);
    assert!(lines[0].get("user_id").is_none(), "{}", lines[0]);
    assert_eq!(lines[1]["decision"], "allowed");
    assert_eq!(lines[1]["upstream_status"], 200);
    assert!(lines[1].get("user_id").is_none(), "{}", lines[1]);
}

/// The JSON log lines `filter` lets through while `run` runs; a subscriber
/// scoped to this thread, so it does not meet the global one of another
/// test.
async fn log_lines<F: std::future::Future<Output = ()>>(
    filter: &str,
    run: F,
) -> Vec<serde_json::Value> {
    let (captured, subscriber) = Captured::json(filter);
    let guard = tracing::subscriber::set_default(subscriber);
    run.await;
    drop(guard);
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The audit lines a `run` produced, parsed.
async fn audit_lines<F: std::future::Future<Output = ()>>(run: F) -> Vec<serde_json::Value> {
    log_lines("matrix_gatekeeper::audit=info", run)
        .await
        .into_iter()
        .filter(|v| v["target"] == "matrix_gatekeeper::audit")
        .collect()
}

#[tokio::test]
async fn reload_warns_about_restart_only_keys_against_what_runs() {
    let path = std::env::temp_dir().join(format!("mgk-restart-keys-{}.toml", std::process::id()));
    let started = "[server]\nlisten = \"127.0.0.1:8009\"\nworkers = 0\n[upstream]\nurl = \"http://127.0.0.1:8008\"\n";
    let changed = "[server]\nlisten = \"127.0.0.1:8010\"\nworkers = 0\n[upstream]\nurl = \"http://127.0.0.1:8008\"\n[username]\nreserved = [\"x\"]\n";
    std::fs::write(&path, started).unwrap();
    let config = matrix_gatekeeper::Config::from_file(&path).unwrap();
    let server = matrix_gatekeeper::Server::from_listeners(&config, Vec::new())
        .with_config_path(path.clone());
    let reloader = server.reloader();
    let warned = |lines: &[serde_json::Value]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l["message"] == "changed, but takes effect only after a restart")
            .map(|l| l["key"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut rounds = Vec::new();
    for text in [changed, changed, started] {
        std::fs::write(&path, text).unwrap();
        let lines = log_lines("matrix_gatekeeper=info", async {
            reloader.reload().unwrap();
        })
        .await;
        rounds.push(warned(&lines));
    }
    let _ = std::fs::remove_file(&path);
    assert_eq!(
        rounds,
        [
            vec!["server.listen".to_owned()],
            // Still not in effect: the second reload says so again.
            vec!["server.listen".to_owned()],
            // Back to what runs: nothing to warn about.
            vec![],
        ]
    );
}

#[tokio::test]
async fn refusals_name_the_username_and_the_kind() {
    let hs = FakeHomeserver::start().await;
    let register = |gate: &Gate| gate.url("/_matrix/client/v3/register");
    let long = "x".repeat(400);
    let lines = audit_lines(async {
        let gate = Gate::start(&hs.url(), "").await;
        for name in [
            "admin", "adm1n", "_bridge", "12345", "Admin", "ok\nname", &long,
        ] {
            let body = serde_json::json!({ "username": name }).to_string();
            post_json(&register(&gate), &body).await;
        }
        // A guest refused at the head (guests are denied by default), and
        // a guest named only in a later `kind` value.
        post_json(&gate.url("/_matrix/client/v3/register?kind=guest"), "{}").await;
        post_json(
            &gate.url("/_matrix/client/v3/register?kind=user&kind=guest"),
            "{}",
        )
        .await;
        send(
            Method::GET,
            &gate.url("/_matrix/client/v3/register/available?username=Root"),
            &[],
            "",
        )
        .await;
    })
    .await;
    hs.assert_saw_nothing("every request here is refused");
    let by = |i: usize, field: &str| lines[i][field].clone();
    assert_eq!(lines.len(), 10, "{lines:#?}");
    for (i, (username, rule)) in [
        ("admin", "reserved"),
        ("adm1n", "lookalike"),
        ("_bridge", "leading_underscore"),
        ("12345", "numeric"),
        ("admin", "reserved"),
    ]
    .iter()
    .enumerate()
    {
        assert_eq!(by(i, "decision"), "refused", "{:#?}", lines[i]);
        assert_eq!(by(i, "username"), *username, "{:#?}", lines[i]);
        assert_eq!(by(i, "rule"), *rule, "{:#?}", lines[i]);
        assert_eq!(by(i, "kind"), "user", "{:#?}", lines[i]);
    }
    // The name as sent appears only where mapping changed it.
    assert!(lines[0].get("username_sent").is_none(), "{:#?}", lines[0]);
    assert_eq!(by(4, "username_sent"), "Admin");
    // Control characters are escaped, long names cut.
    assert_eq!(by(5, "username"), "ok\\nname");
    assert_eq!(by(5, "rule"), "grammar");
    let cut = by(6, "username").as_str().unwrap().to_owned();
    assert!(
        cut.len() <= 300 + '…'.len_utf8() && cut.ends_with('…'),
        "{cut}"
    );
    assert_eq!(by(7, "kind"), "guest");
    assert_eq!(by(7, "rule"), "guest_denied");
    assert_eq!(by(8, "kind"), "guest");
    assert_eq!(by(8, "rule"), "ambiguous_kind");
    assert_eq!(by(9, "route"), "available");
    assert_eq!(by(9, "username"), "root");
    assert_eq!(by(9, "username_sent"), "Root");
}

#[tokio::test]
async fn shadow_mode_names_what_it_would_refuse() {
    let hs = FakeHomeserver::start().await;
    let lines = audit_lines(async {
        let gate = Gate::start(&hs.url(), "[registration]\nmode = \"shadow\"\n").await;
        post_json(
            &gate.url("/_matrix/client/v3/register"),
            r#"{"username":"Administrator"}"#,
        )
        .await;
    })
    .await;
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["decision"], "would_refuse");
    assert_eq!(lines[0]["rule"], "reserved");
    assert_eq!(lines[0]["username"], "administrator");
    assert_eq!(lines[0]["username_sent"], "Administrator");
    assert_eq!(lines[0]["kind"], "user");
}

#[tokio::test]
async fn sso_picks_and_checks_are_audited_under_their_route() {
    let hs = FakeHomeserver::start().await;
    let lines = audit_lines(async {
        let gate = Gate::start(&hs.url(), "").await;
        let pick = gate.url("/_synapse/client/pick_username/account_details");
        let form = [("content-type", "application/x-www-form-urlencoded")];
        send(Method::POST, &pick, &form, "username=adm1n").await;
        send(Method::POST, &pick, &form, "username=alice").await;
        let check = "/_synapse/client/pick_username/check?username=Root";
        send(Method::GET, &gate.url(check), &[], "").await;
    })
    .await;
    let seen: Vec<(&str, &str, &str, &str, &str, u64)> = lines
        .iter()
        .map(|l| {
            (
                l["route"].as_str().unwrap(),
                l["kind"].as_str().unwrap(),
                l["decision"].as_str().unwrap(),
                l["rule"].as_str().unwrap(),
                l["username"].as_str().unwrap(),
                l["upstream_status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("pick_username", "sso", "refused", "lookalike", "adm1n", 0),
            ("pick_username", "sso", "allowed", "", "alice", 302),
            (
                "pick_username_check",
                "sso",
                "refused",
                "upper_case",
                "-",
                0
            ),
        ]
    );
    assert_eq!(lines[2]["username_sent"], "Root");
}

#[test]
fn the_binary_logs_json_and_reloads_on_sighup() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = std::env::temp_dir().join(format!("mgk-sighup-{}.toml", std::process::id()));
    let write = |reserved: &str| {
        std::fs::write(
            &path,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n[upstream]\nurl = \"http://127.0.0.1:1\"\n\
                 [username]\nreserved = [\"{reserved}\"]\n[log]\nformat = \"json\"\nlevel = \"info\"\n"
            ),
        )
        .unwrap()
    };
    write("first");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_matrix-gatekeeper"))
        .args(["serve", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url =
        format!("http://127.0.0.1:{port}/_matrix/client/v3/register/available?username=second");
    let status = |url: String| {
        runtime.block_on(async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let client = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
                if let Ok(response) = client.get(url.parse().unwrap()).await {
                    return response.status().as_u16();
                }
                assert!(Instant::now() < deadline, "the gate never answered");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // "second" is not reserved: asked upstream, which is unreachable (502).
    assert_eq!(status(url.clone()), 502);
    write("second");
    let killed = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(url.clone()) != 400 {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "configuration reloaded"),
        "{stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "matrix-gatekeeper listening"),
        "{stderr}"
    );
    assert!(output.status.success(), "{stderr}");
    let _ = std::fs::remove_file(&path);
}
