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
use serde_json::json;

use crate::common::binary::Scratch;
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

/// The registration file (namespace `_testbridge_.*`), for the homeserver
/// and the gate alike; `scenario` keeps the files of scenarios running at
/// once apart.
pub(crate) fn registration_file(scenario: &str) -> std::path::PathBuf {
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

/// The gate's configuration in front of the homeserver at `upstream`, with
/// `files` (TOML array items) as its `app_service_config_files` and tight
/// per-client limits, and `extra` TOML.
fn gate_toml(upstream: &str, files: &str, extra: &str) -> String {
    format!(
        "[upstream]\nurl = \"{upstream}\"\n[homeserver]\nserver_name = \"{SERVER_NAME}\"\n\
         app_service_config_files = [{files}]\n\
         [rate_limit]\nattempts_per_ip = {{ count = 3, period = \"1h\" }}\n\
         registrations_per_ip = {{ count = 1, period = \"1h\" }}\n{extra}"
    )
}

/// The gate as [`gate_toml`] configures it, with an admin listener.
pub(crate) async fn gate_with(upstream: &str, files: &str, extra: &str) -> Gate {
    let config = matrix_gatekeeper::Config::from_toml(&gate_toml(upstream, files, extra)).unwrap();
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

/// Whether the homeserver at `homeserver` has a profile for the localpart
/// (Synapse and Dendrite give every new user one; their availability
/// checks refuse names in a namespace, or `_` names, outright).
pub(crate) async fn user_exists(homeserver: &str, localpart: &str) -> bool {
    let answer = get(&format!(
        "{homeserver}/_matrix/client/v3/profile/@{localpart}:{SERVER_NAME}"
    ))
    .await;
    match answer.status.as_u16() {
        200 => true,
        404 => false,
        other => panic!("profile of {localpart}: {other} {:?}", answer.body),
    }
}

/// The file's path as a TOML array item.
pub(crate) fn toml_item(file: &std::path::Path) -> String {
    format!("{:?}", file.display().to_string())
}

/// Registers the puppets `_testbridge_{prefix}gate1` (token in the header)
/// and `…gate2` (in the query) through the gate at `base`, and checks that
/// the homeserver at `homeserver` made them.
pub(crate) async fn both_token_forms_register(base: &str, homeserver: &str, prefix: &str) {
    for (n, in_query) in [(1, false), (2, true)] {
        let name = format!("_testbridge_{prefix}gate{n}");
        let answer = register_puppet(base, &name, AS_TOKEN, in_query).await;
        assert_eq!(answer.status, 200, "{name}: {:?}", answer.body);
        assert_eq!(
            answer.json()["user_id"],
            format!("@{name}:{SERVER_NAME}"),
            "{:?}",
            answer.body
        );
        assert!(user_exists(homeserver, &name).await, "{name}");
    }
}

/// A wrong token and a name outside the namespace, as `(name, token,
/// status, errcode)`: the name carries `tag` to stay unique.
fn wrong_requests(tag: &str) -> [(String, &'static str, u16, &'static str); 2] {
    [
        (
            format!("_testbridge_wrong{tag}"),
            "e2e-as-token-wrong",
            401,
            "M_UNKNOWN_TOKEN",
        ),
        (format!("gatealice{tag}"), AS_TOKEN, 400, "M_EXCLUSIVE"),
    ]
}

/// Sends a wrong token and a name outside the namespace through the gate
/// at `base` and checks who refused them (`by_gate`: the gate with the
/// registration file; otherwise the homeserver, the gate having forwarded
/// them) and that the homeserver at `homeserver` made neither account.
pub(crate) async fn wrong_requests_are_refused(base: &str, homeserver: &str, by_gate: bool) {
    let (tag, marker) = if by_gate {
        ("", "refused")
    } else {
        ("2", "allowed")
    };
    for (name, token, status, errcode) in wrong_requests(tag) {
        let answer = register_puppet(base, &name, token, false).await;
        assert_eq!(
            (answer.status.as_u16(), answer.errcode().as_str()),
            (status, errcode),
            "{name}: {:?}",
            answer.body
        );
        if by_gate {
            answer.assert_error(status, errcode);
        }
        assert_eq!(answer.headers["x-matrix-gatekeeper"], marker, "{name}");
        assert!(!user_exists(homeserver, &name).await, "{name}");
    }
}

/// Registers `count` puppets `_testbridge_p0`… through the gate at `base`,
/// eight at a time, each expected to succeed at once, and checks that the
/// homeserver at `homeserver` made the first, a middle and the last.
pub(crate) async fn register_burst(base: &str, homeserver: &str, count: usize) {
    let base = Arc::new(base.to_owned());
    let mut burst = tokio::task::JoinSet::new();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..8 {
        let (base, next) = (base.clone(), next.clone());
        burst.spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= count {
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
    for n in [0, count / 2 - 1, count - 1] {
        let name = format!("_testbridge_p{n}");
        assert!(user_exists(homeserver, &name).await, "{name}");
    }
}

/// Asserts that the gate counted `count` registrations of the bridge.
pub(crate) async fn assert_registrations_counted(gate: &Gate, count: u64) {
    let metrics = gate.metrics().await;
    let line =
        format!("gatekeeper_appservice_registrations_total{{appservice=\"testbridge\"}} {count}\n");
    assert!(metrics.contains(&line), "{metrics}");
}

/// Without the registration file the gate forwards a bridge's
/// registrations: the homeserver at `homeserver` itself refuses a wrong
/// token and a foreign name, and registers a right one.
pub(crate) async fn without_the_file_the_homeserver_decides(homeserver: &str) {
    let fileless = gate_with(homeserver, "", "").await;
    let base = fileless.url("");
    wrong_requests_are_refused(&base, homeserver, false).await;
    let answer = register_puppet(&base, "_testbridge_fileless", AS_TOKEN, true).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert!(user_exists(homeserver, "_testbridge_fileless").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_registers_its_puppets_through_the_gate_and_wrong_requests_stop_there() {
    let (synapse, file) = synapse_with_bridge("direct").await;
    let gate = gate_with(&synapse.url(), &toml_item(&file), "").await;
    let base = gate.url("");
    both_token_forms_register(&base, &synapse.url(), "").await;

    // Refused by the gate: Synapse never sees them.
    wrong_requests_are_refused(&base, &synapse.url(), true).await;

    // A burst of 500 puppets, eight at a time, with limits of 3 attempts
    // and 1 registration per client: a bridge is not throttled.
    register_burst(&base, &synapse.url(), 500).await;
    assert_registrations_counted(&gate, 502).await;

    // Without the file the gate forwards, and Synapse itself refuses a
    // wrong token and a foreign name; a right one registers.
    without_the_file_the_homeserver_decides(&synapse.url()).await;
    let _ = std::fs::remove_file(file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_file_narrowed_on_reload_stops_puppets_outside_it_before_synapse() {
    // Synapse keeps its own copy with the wide namespace: whatever the gate
    // lets through, Synapse would register.
    let (synapse, synapse_file) = synapse_with_bridge("reload").await;
    let scratch = Scratch::new("e2e-bridge-reload");
    let gate_file = scratch.write("bridge.yaml", &registration_yaml("_testbridge_.*"));
    let text = gate_toml(&synapse.url(), &toml_item(&gate_file), "");
    let config_path = scratch.write("gatekeeper.toml", &text);
    let config = matrix_gatekeeper::Config::from_toml(&text).unwrap();
    let gate = Gate::start_full(config, true, Some(config_path)).await;
    let base = gate.url("");
    let answer = register_puppet(&base, "_testbridge_b0", AS_TOKEN, false).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert!(user_exists(&synapse.url(), "_testbridge_b0").await);

    scratch.write("bridge.yaml", &registration_yaml("_testbridge_a.*"));
    gate.reloader.reload().unwrap();

    let answer = register_puppet(&base, "_testbridge_b1", AS_TOKEN, false).await;
    answer.assert_error(400, "M_EXCLUSIVE");
    assert_eq!(answer.gate_decision(), Some("refused"));
    assert!(!user_exists(&synapse.url(), "_testbridge_b1").await);
    let answer = register_puppet(&base, "_testbridge_a1", AS_TOKEN, true).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(
        answer.json()["user_id"],
        format!("@_testbridge_a1:{SERVER_NAME}")
    );
    assert_eq!(answer.gate_decision(), Some("allowed"));
    assert!(user_exists(&synapse.url(), "_testbridge_a1").await);
    let _ = std::fs::remove_file(synapse_file);
}
