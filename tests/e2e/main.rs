//! End-to-end: the gate in front of a real Synapse, driven by a real client
//! (matrix-nio) and by raw requests. Every scenario checks what Synapse
//! finally did by asking Synapse directly, not only the gate's answer.
//!
//! Run alone with `cargo test --test e2e`. The first run installs Synapse
//! and matrix-nio into `target/e2e-venv` (needs PyPI).

#[path = "../common/mod.rs"]
mod common;
mod corpus;
mod spec_fuzz;
mod synapse;

use common::{get, post_json, send, Answer, Gate};
use http::Method;
use synapse::{Synapse, SERVER_NAME};

const REGISTER: &str = "/_matrix/client/v3/register";

/// The gate in front of `synapse`, with extra gate TOML.
async fn gate_for(synapse: &Synapse, extra: &str) -> Gate {
    Gate::start(
        &synapse.url(),
        &format!("[homeserver]\nserver_name = \"{SERVER_NAME}\"\n{extra}"),
    )
    .await
}

/// Synapse's own answer to `/register/available` for a localpart.
async fn synapse_availability(synapse: &Synapse, localpart: &str) -> Answer {
    get(&format!(
        "{}/_matrix/client/v3/register/available?username={}",
        synapse.url(),
        localpart
    ))
    .await
}

/// Whether Synapse holds an account with this localpart.
async fn account_exists(synapse: &Synapse, localpart: &str) -> bool {
    let answer = synapse_availability(synapse, localpart).await;
    match (answer.status.as_u16(), answer.errcode().as_str()) {
        (200, _) => false,
        (400, "M_USER_IN_USE") => true,
        other => panic!(
            "unexpected availability answer for {localpart}: {other:?} {:?}",
            answer.body
        ),
    }
}

/// Registers a guest directly on Synapse and returns its numeric localpart:
/// guest IDs count up, so two direct guests around a scenario show whether
/// any guest was created through the gate in between.
async fn direct_guest_number(synapse: &Synapse) -> u64 {
    let answer = post_json(&format!("{}{REGISTER}?kind=guest", synapse.url()), "{}").await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let user_id = answer.json()["user_id"].as_str().unwrap().to_owned();
    user_id
        .trim_start_matches('@')
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// One complete dummy-auth registration through `base`.
async fn register_dummy(base: &str, username: &str, extra_headers: &[(&str, &str)]) -> Answer {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend_from_slice(extra_headers);
    send(
        Method::POST,
        &format!("{base}{REGISTER}"),
        &headers,
        format!(
            r#"{{"username":"{username}","password":"e2e-password-1","auth":{{"type":"m.login.dummy"}}}}"#
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_nio_registers_syncs_and_logs_in_through_the_gate() {
    let synapse = Synapse::start("").await;
    let gate = gate_for(&synapse, "").await;
    let output = tokio::process::Command::new(synapse::python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/e2e/py/nio_register.py"
        ))
        .arg(gate.url(""))
        .arg("NioUser")
        .arg("e2e-password-1")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "nio failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let expected = format!("@niouser:{SERVER_NAME}");
    assert_eq!(result["registered"], expected.as_str());
    assert_eq!(result["logged_in"], expected.as_str());
    assert_eq!(result["synced"], true);
    assert!(account_exists(&synapse, "niouser").await);
}
