//! Application service (bridge) registrations through the gate, with the
//! recording stand-in homeserver: what a bridge's puppet registration
//! becomes on the way (canonical body, the token as a header), what the
//! gate refuses before the homeserver, the limits and the lockdown a
//! bridge is exempt from, the mode without registration files, and a
//! changed file read on reload. The same against a real Synapse is in the
//! end-to-end suite (`e2e/appservice.rs`).

mod common;

use common::binary::{toml_path, Scratch};
use common::{send, FakeHomeserver, Gate, Listeners};
use http::Method;
use matrix_gatekeeper::Config;

const REGISTER: &str = "/_matrix/client/v3/register";
const TOKEN: &str = "as-token-bridge-1";

/// A registration file as bridges ship them.
fn bridge_file(regex: &str) -> String {
    format!(
        "id: bridge\nurl: http://127.0.0.1:29999\nas_token: {TOKEN}\nhs_token: hs-token-1\n\
         sender_localpart: _bridge_bot\nrate_limited: false\nnamespaces:\n  users:\n    \
         - exclusive: true\n      regex: '{regex}'\n  aliases: []\n  rooms: []\n"
    )
}

/// Tight limits and a lockdown of one registration, which a bridge's
/// burst must pass untouched.
const TIGHT: &str = "[rate_limit]\nattempts_per_ip = { count = 3, period = \"1h\" }\n\
    registrations_per_ip = { count = 1, period = \"1h\" }\n\
    [registration]\nlockdown = { count = 1, period = \"1h\", close_for = \"1h\" }\n";

fn config(hs: &FakeHomeserver, files: &[&std::path::Path], extra: &str) -> String {
    let files: Vec<String> = files.iter().map(|path| toml_path(path)).collect();
    format!(
        "[upstream]\nurl = \"{}\"\n[homeserver]\nserver_name = \"example.org\"\n\
         app_service_config_files = [{}]\n{extra}",
        hs.url(),
        files.join(", ")
    )
}

async fn register(gate: &Gate, query: &str, token: Option<&str>, body: &str) -> common::Answer {
    let bearer = token.map(|token| format!("Bearer {token}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer.as_str()));
    }
    send(
        Method::POST,
        &gate.url(&format!("{REGISTER}{query}")),
        &headers,
        body.to_owned(),
    )
    .await
}

fn puppet(name: &str) -> String {
    format!(r#"{{"type":"m.login.application_service","username":"{name}"}}"#)
}

#[tokio::test]
async fn a_bridge_registers_its_puppets_past_the_username_rules_the_limits_and_the_lockdown() {
    let scratch = Scratch::new("appservice");
    let file = scratch.write("bridge.yaml", &bridge_file("@_bridge_.*:example\\.org"));
    let hs = FakeHomeserver::start().await;
    let config = Config::from_toml(&config(&hs, &[&file], TIGHT)).unwrap();
    let gate = Gate::start_full(config, true, None).await;
    for n in 0..40 {
        let answer = register(&gate, "", Some(TOKEN), &puppet(&format!("_bridge_{n}"))).await;
        assert_eq!(answer.status, 200, "{n}: {:?}", answer.body);
        assert_eq!(answer.headers["x-matrix-gatekeeper"], "allowed");
    }
    let seen = hs.requests();
    assert_eq!(seen.len(), 40);
    assert_eq!(
        seen[7].json(),
        serde_json::json!({"type": "m.login.application_service", "username": "_bridge_7"})
    );
    let bearer = format!("Bearer {TOKEN}");
    assert_eq!(seen[7].header("authorization"), Some(bearer.as_str()));
    hs.clear();

    // The token as a query parameter, the type only in `auth`, a legacy
    // `user` field, and a name as sent (no lower-casing): one form reaches
    // the homeserver.
    let answer = register(
        &gate,
        &format!("?access_token={TOKEN}&kind=user"),
        None,
        r#"{"auth":{"type":"m.login.application_service"},"username":"_bridge_Odd","user":"_bridge_other"}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let forwarded = hs.only_request();
    assert_eq!(forwarded.target, format!("{REGISTER}?kind=user"));
    assert_eq!(forwarded.header("authorization"), Some(bearer.as_str()));
    assert_eq!(
        forwarded.json(),
        serde_json::json!({"type": "m.login.application_service", "username": "_bridge_Odd"})
    );

    let metrics = gate.metrics().await;
    assert!(
        metrics.contains("gatekeeper_appservice_registrations_total{appservice=\"bridge\"} 41\n"),
        "{metrics}"
    );
    // None of it counted towards the lockdown or the client's limits: a
    // person's registration still passes, and then closes registration.
    let person = register(&gate, "", None, r#"{"username":"alice"}"#).await;
    assert_eq!(person.status, 200, "{:?}", person.body);
    let closed = register(&gate, "", None, r#"{"username":"bob"}"#).await;
    closed.assert_error(403, "M_FORBIDDEN");
    // The bridge is not closed out.
    let answer = register(&gate, "", Some(TOKEN), &puppet("_bridge_late")).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
}

#[tokio::test]
async fn wrong_tokens_foreign_names_and_missing_tokens_are_refused_before_the_homeserver() {
    let scratch = Scratch::new("appservice-refused");
    let file = scratch.write("bridge.yaml", &bridge_file("@_bridge_.*:example\\.org"));
    let hs = FakeHomeserver::start().await;
    let config = Config::from_toml(&config(&hs, &[&file], "")).unwrap();
    let gate = Gate::start_with(config).await;
    for (query, token, body, status, errcode) in [
        (
            "",
            Some("as-token-wrong"),
            puppet("_bridge_a"),
            401,
            "M_UNKNOWN_TOKEN",
        ),
        ("", Some(TOKEN), puppet("alice"), 400, "M_EXCLUSIVE"),
        ("", None, puppet("_bridge_a"), 400, "M_UNKNOWN"),
        (
            "",
            Some(TOKEN),
            r#"{"type":"m.login.application_service"}"#.to_owned(),
            400,
            "M_UNKNOWN",
        ),
        // A token on a user registration: the homeserver refuses it too.
        (
            "",
            Some(TOKEN),
            r#"{"username":"alice"}"#.to_owned(),
            400,
            "M_UNKNOWN",
        ),
        (
            "?access_token=x",
            Some(TOKEN),
            puppet("_bridge_a"),
            401,
            "M_MISSING_TOKEN",
        ),
        // Decoded into what no header could forward: no service's token.
        (
            "?access_token=as%0Atoken",
            None,
            puppet("_bridge_a"),
            401,
            "M_UNKNOWN_TOKEN",
        ),
    ] {
        let answer = register(&gate, query, token, &body).await;
        answer.assert_error(status, errcode);
        assert_eq!(answer.headers["x-matrix-gatekeeper"], "refused", "{body}");
        let text = String::from_utf8_lossy(&answer.body);
        assert!(!text.contains(TOKEN), "{text}");
    }
    hs.assert_saw_nothing("refused bridge registrations");
}

#[tokio::test]
async fn without_registration_files_the_homeserver_checks_the_token_and_attempts_count() {
    let hs = FakeHomeserver::start().await;
    let config = Config::from_toml(&config(&hs, &[], TIGHT)).unwrap();
    let gate = Gate::start_full(config, true, None).await;
    for n in 0..3 {
        let answer = register(
            &gate,
            "",
            Some("as-token-unknown"),
            &puppet(&format!("_x_{n}")),
        )
        .await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
    let seen = hs.requests();
    assert_eq!(seen.len(), 3);
    assert_eq!(
        seen[0].header("authorization"),
        Some("Bearer as-token-unknown")
    );
    // The attempts limit applies: the gate cannot tell a bridge from a
    // client that says it is one.
    register(&gate, "", Some("as-token-unknown"), &puppet("_x_3"))
        .await
        .assert_error(429, "M_LIMIT_EXCEEDED");
    let metrics = gate.metrics().await;
    assert!(
        metrics
            .contains("gatekeeper_appservice_registrations_total{appservice=\"unverified\"} 3\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_changed_registration_file_is_read_on_reload_and_a_broken_one_keeps_the_old() {
    let scratch = Scratch::new("appservice-reload");
    let file = scratch.write("bridge.yaml", &bridge_file("@_bridge_.*:example\\.org"));
    let hs = FakeHomeserver::start().await;
    let text = config(&hs, &[&file], "");
    let path = scratch.write("gatekeeper.toml", &text);
    let gate = Gate::start_full(Config::from_toml(&text).unwrap(), false, Some(path)).await;
    let answer = register(&gate, "", Some(TOKEN), &puppet("_bridge_a")).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);

    scratch.write("bridge.yaml", &bridge_file("@_other_.*:example\\.org"));
    gate.reloader.reload().unwrap();
    register(&gate, "", Some(TOKEN), &puppet("_bridge_b"))
        .await
        .assert_error(400, "M_EXCLUSIVE");
    assert_eq!(
        register(&gate, "", Some(TOKEN), &puppet("_other_b"))
            .await
            .status,
        200
    );

    // A file cut short: refused by name, the token never in the message,
    // and the file read before stays in force.
    scratch.write(
        "bridge.yaml",
        &bridge_file("@_bridge_.*").replace("sender_localpart: _bridge_bot\n", ""),
    );
    let error = gate.reloader.reload().unwrap_err().to_string();
    assert!(
        error.starts_with("homeserver.app_service_config_files: ")
            && error.contains("bridge.yaml: missing field `sender_localpart`"),
        "{error}"
    );
    assert!(!error.contains(TOKEN), "{error}");
    assert_eq!(
        register(&gate, "", Some(TOKEN), &puppet("_other_c"))
            .await
            .status,
        200
    );
}

/// On the routes that make accounts, the only credential the homeserver
/// receives is a bridge token the gate checked: a guest registration's or
/// an SSO pick's `Authorization` header is not forwarded (Conduit lets a
/// valid `as_token` skip its registration checks).
#[tokio::test]
async fn a_token_on_a_guest_registration_or_a_pick_is_not_forwarded() {
    let hs = FakeHomeserver::start().await;
    let config = Config::from_toml(&config(&hs, &[], "[guest]\naccess = \"allow\"\n")).unwrap();
    let gate = Gate::start_with(config).await;
    let answer = register(&gate, "?kind=guest", Some(TOKEN), "{}").await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let bearer = format!("Bearer {TOKEN}");
    let answer = send(
        Method::POST,
        &gate.url("/_synapse/client/pick_username/account_details"),
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("authorization", bearer.as_str()),
            ("cookie", "username_mapping_session=s"),
        ],
        "username=alice",
    )
    .await;
    assert_eq!(answer.status, 302, "{:?}", answer.body);
    let seen = hs.requests();
    assert_eq!(seen.len(), 2);
    for request in seen {
        assert_eq!(request.header("authorization"), None, "{}", request.target);
    }
}
