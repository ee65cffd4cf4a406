//! Bridges with a real Synapse: an application service registered with
//! Synapse registers its puppet users through the gate — both token forms,
//! a burst of 500 under tight limits — while a wrong token and a name
//! outside its namespace are refused by the gate before Synapse. Without
//! the registration file in the gate, the same requests go to Synapse,
//! which refuses them itself: what the gate's file-less mode relies on.
//! The gate's own copy of the file, narrowed and reloaded, stops a puppet
//! that Synapse's wider copy would still let it create.

use std::sync::Arc;

use http::Method;
use matrix_gatekeeper::Config;
use serde_json::json;

use crate::common::binary::{toml_path, Scratch};
use crate::common::{get, send, Answer, Gate, Listeners};
use crate::synapse::{Synapse, SERVER_NAME};
use crate::REGISTER;

/// The bridge's `as_token`.
pub(crate) const AS_TOKEN: &str = "e2e-as-token-testbridge";

/// The bridge's registration file, its user namespace the localparts
/// matching the regex `users`.
fn registration_yaml(users: &str) -> String {
    format!(
        "id: testbridge\nurl: null\nas_token: {AS_TOKEN}\nhs_token: e2e-hs-token\n\
         sender_localpart: _testbridge_bot\nrate_limited: false\nnamespaces:\n  users:\n    \
         - exclusive: true\n      regex: '@{users}:{}'\n  aliases: []\n  rooms: []\n",
        SERVER_NAME.replace('.', "\\.")
    )
}

/// The registration file (namespace `_testbridge_.*`), for Synapse and the
/// gate alike; `scenario` keeps the files of scenarios running at once
/// apart.
fn registration_file(scenario: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "mgk-e2e-testbridge-{scenario}-{}.yaml",
        std::process::id()
    ));
    std::fs::write(&path, registration_yaml("_testbridge_.*")).unwrap();
    path
}

/// Synapse with the bridge's registration file (made for `scenario`, see
/// [`registration_file`]) in its `app_service_config_files`, and the file.
pub(crate) async fn synapse_with_bridge(scenario: &str) -> (Synapse, std::path::PathBuf) {
    let file = registration_file(scenario);
    let synapse = Synapse::start(&format!(
        "app_service_config_files: [\"{}\"]",
        file.display()
    ))
    .await;
    (synapse, file)
}

/// The gate's configuration in front of `synapse`, with `files` (TOML
/// array items) as its `app_service_config_files` and tight per-client
/// limits, and `extra` TOML.
fn gate_toml(synapse: &Synapse, files: &str, extra: &str) -> String {
    format!(
        "[upstream]\nurl = \"{}\"\n[homeserver]\nserver_name = \"{SERVER_NAME}\"\n\
         app_service_config_files = [{files}]\n\
         [rate_limit]\nattempts_per_ip = {{ count = 3, period = \"1h\" }}\n\
         registrations_per_ip = {{ count = 1, period = \"1h\" }}\n{extra}",
        synapse.url()
    )
}

/// The gate as [`gate_toml`] configures it, with an admin listener.
pub(crate) async fn gate_with(synapse: &Synapse, files: &str, extra: &str) -> Gate {
    let config = Config::from_toml(&gate_toml(synapse, files, extra)).unwrap();
    Gate::start_full(config, true, None).await
}

/// A puppet registration, the token in the header or in the query.
pub(crate) async fn register_puppet(base: &str, name: &str, token: &str, in_query: bool) -> Answer {
    let body = json!({"type": "m.login.application_service", "username": name}).to_string();
    let bearer = format!("Bearer {token}");
    let mut headers = vec![("content-type", "application/json")];
    let url = if in_query {
        format!("{base}{REGISTER}?access_token={token}")
    } else {
        headers.push(("authorization", bearer.as_str()));
        format!("{base}{REGISTER}")
    };
    send(Method::POST, &url, &headers, body).await
}

/// Whether Synapse has a profile for the localpart (it gives every new
/// user one; its availability check answers M_EXCLUSIVE in a namespace).
pub(crate) async fn user_exists(synapse: &Synapse, localpart: &str) -> bool {
    let answer = get(&format!(
        "{}/_matrix/client/v3/profile/@{localpart}:{SERVER_NAME}",
        synapse.url()
    ))
    .await;
    match answer.status.as_u16() {
        200 => true,
        404 => false,
        other => panic!("profile of {localpart}: {other} {:?}", answer.body),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_registers_its_puppets_through_the_gate_and_wrong_requests_stop_there() {
    let (synapse, file) = synapse_with_bridge("direct").await;
    let gate = gate_with(&synapse, &toml_path(&file), "").await;
    let base = gate.url("");

    for (name, in_query) in [("_testbridge_gate1", false), ("_testbridge_gate2", true)] {
        let answer = register_puppet(&base, name, AS_TOKEN, in_query).await;
        assert_eq!(answer.status, 200, "{name}: {:?}", answer.body);
        assert_eq!(
            answer.json()["user_id"],
            format!("@{name}:{SERVER_NAME}"),
            "{:?}",
            answer.body
        );
        assert!(user_exists(&synapse, name).await);
    }

    // Refused by the gate: Synapse never sees them.
    for (name, token, status, errcode) in [
        (
            "_testbridge_wrong",
            "e2e-as-token-wrong",
            401,
            "M_UNKNOWN_TOKEN",
        ),
        ("gatealice", AS_TOKEN, 400, "M_EXCLUSIVE"),
    ] {
        let answer = register_puppet(&base, name, token, false).await;
        answer.assert_error(status, errcode);
        assert_eq!(answer.headers["x-matrix-gatekeeper"], "refused");
        assert!(!user_exists(&synapse, name).await, "{name}");
    }

    // A burst of 500 puppets, eight at a time, with limits of 3 attempts
    // and 1 registration per client: a bridge is not throttled.
    let base = Arc::new(base);
    let mut burst = tokio::task::JoinSet::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..8 {
        let (base, next) = (base.clone(), next.clone());
        burst.spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= 500 {
                    return;
                }
                let name = format!("_testbridge_p{n}");
                let answer = register_puppet(&base, &name, AS_TOKEN, false).await;
                assert_eq!(answer.status, 200, "{name}: {:?}", answer.body);
            }
        });
    }
    while let Some(done) = burst.join_next().await {
        done.unwrap();
    }
    for n in [0, 249, 499] {
        assert!(user_exists(&synapse, &format!("_testbridge_p{n}")).await);
    }
    let metrics = gate.metrics().await;
    assert!(
        metrics
            .contains("gatekeeper_appservice_registrations_total{appservice=\"testbridge\"} 502\n"),
        "{metrics}"
    );

    // Without the file the gate forwards, and Synapse itself refuses a
    // wrong token and a foreign name; a right one registers.
    let fileless = gate_with(&synapse, "", "").await;
    let base = fileless.url("");
    for (name, token, status, errcode) in [
        (
            "_testbridge_wrong2",
            "e2e-as-token-wrong",
            401,
            "M_UNKNOWN_TOKEN",
        ),
        ("gatebob", AS_TOKEN, 400, "M_EXCLUSIVE"),
    ] {
        let answer = register_puppet(&base, name, token, false).await;
        assert_eq!(
            (answer.status.as_u16(), answer.errcode().as_str()),
            (status, errcode),
            "{name}: {:?}",
            answer.body
        );
        assert_eq!(
            answer.headers["x-matrix-gatekeeper"], "allowed",
            "forwarded"
        );
        assert!(!user_exists(&synapse, name).await, "{name}");
    }
    let answer = register_puppet(&base, "_testbridge_fileless", AS_TOKEN, true).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert!(user_exists(&synapse, "_testbridge_fileless").await);
    let _ = std::fs::remove_file(file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_file_narrowed_on_reload_stops_puppets_outside_it_before_synapse() {
    // Synapse keeps its own copy with the wide namespace: whatever the gate
    // lets through, Synapse would register.
    let (synapse, synapse_file) = synapse_with_bridge("reload").await;
    let scratch = Scratch::new("e2e-bridge-reload");
    let gate_file = scratch.write("bridge.yaml", &registration_yaml("_testbridge_.*"));
    let text = gate_toml(&synapse, &toml_path(&gate_file), "");
    let config_path = scratch.write("gatekeeper.toml", &text);
    let config = Config::from_toml(&text).unwrap();
    let gate = Gate::start_full(config, true, Some(config_path)).await;
    let base = gate.url("");
    let answer = register_puppet(&base, "_testbridge_b0", AS_TOKEN, false).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert!(user_exists(&synapse, "_testbridge_b0").await);

    scratch.write("bridge.yaml", &registration_yaml("_testbridge_a.*"));
    gate.reloader.reload().unwrap();

    let answer = register_puppet(&base, "_testbridge_b1", AS_TOKEN, false).await;
    answer.assert_error(400, "M_EXCLUSIVE");
    assert_eq!(answer.gate_decision(), Some("refused"));
    assert!(!user_exists(&synapse, "_testbridge_b1").await);
    let answer = register_puppet(&base, "_testbridge_a1", AS_TOKEN, true).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(
        answer.json()["user_id"],
        format!("@_testbridge_a1:{SERVER_NAME}")
    );
    assert_eq!(answer.gate_decision(), Some("allowed"));
    assert!(user_exists(&synapse, "_testbridge_a1").await);
    let _ = std::fs::remove_file(synapse_file);
}
