//! Real clients through the gate: the `matrix-gatekeeper` binary's audit
//! log against what the homeserver made, and matrix-nio.

use serde_json::{json, Value};

use super::{Flavour, Homeserver, PASSWORD};
use crate::common::binary::{Scratch, Served, LISTEN_ANY};
use crate::common::post_json;
use crate::synapse::SERVER_NAME;
use crate::{localpart_of, REGISTER};

/// The binary serving in front of `hs` with JSON logs.
async fn serve_in_front_of(hs: &Homeserver, dir: &Scratch) -> Served {
    let config = dir.write(
        "gatekeeper.toml",
        &format!(
            "[server]\n{LISTEN_ANY}[upstream]\nurl = \"{}\"\n\
             [homeserver]\nserver_name = \"{SERVER_NAME}\"\n\
             [log]\nformat = \"json\"\n",
            hs.url()
        ),
    );
    Served::start(&config).await
}

/// The audit line (JSON) about `sent`, the name as the client sent it.
async fn audit_line(gate: &Served, sent: &str) -> Value {
    let line = gate
        .wait_for_line(0, &format!("the audit line of {sent:?}"), |line| {
            serde_json::from_str::<Value>(line).is_ok_and(|line| {
                line["target"] == "matrix_gatekeeper::audit"
                    && (line["username_sent"] == sent
                        || (line["username_sent"].is_null() && line["username"] == sent))
            })
        })
        .await;
    serde_json::from_str(&line).unwrap()
}

/// The name the gate logs for a registration is the localpart the
/// homeserver made: the gate's audit line (the binary's JSON log, as an
/// operator reads it) names the mapped name, with the name as sent beside
/// it, and the homeserver's user ID has that localpart — for a mixed-case
/// name, a name with a KELVIN SIGN (which the gate maps to an ASCII `k`),
/// and a name changed by a later UIA step; its `user_id` is the account
/// the homeserver's answer names, also when a finished session is sent
/// again with another name. A refused name is logged under its mapped form
/// and made by nobody.
pub async fn the_audited_name_is_the_account_made(hs: &Homeserver) {
    let dir = Scratch::new(&format!("audit-{}", hs.name()));
    let gate = serve_in_front_of(hs, &dir).await;
    let register = gate.url(REGISTER);

    for (sent, mapped) in [("AuditName", "auditname"), ("K\u{212A}elvin", "kkelvin")] {
        let answer = crate::register_dummy(&gate.url(""), sent, &[]).await;
        assert_eq!(answer.status, 200, "{sent:?}: {:?}", answer.body);
        let user_id = answer.json()["user_id"].as_str().unwrap().to_owned();
        let line = audit_line(&gate, sent).await;
        assert_eq!(line["route"], "register", "{line}");
        assert_eq!(line["decision"], "allowed", "{line}");
        assert_eq!(line["upstream_status"], 200, "{line}");
        assert_eq!(line["username"], mapped, "{line}");
        assert_eq!(line["username"], localpart_of(&user_id), "{line} {user_id}");
        assert_eq!(line["user_id"], user_id.as_str(), "{line}");
        assert!(hs.exists(mapped).await, "{sent:?}");
        assert!(hs.can_log_in(mapped).await, "{sent:?}");
    }

    // A name changed at the second UIA step.
    let first = post_json(
        &register,
        &json!({"username": "firstaudit", "password": PASSWORD}).to_string(),
    )
    .await;
    let session = crate::uia_session(&first);
    let second = post_json(
        &register,
        &json!({
            "username": "SecondAudit",
            "auth": {"type": "m.login.dummy", "session": session},
        })
        .to_string(),
    )
    .await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    let user_id = second.json()["user_id"].as_str().unwrap().to_owned();
    let line = audit_line(&gate, "SecondAudit").await;
    assert_eq!(line["username"], "secondaudit", "{line}");
    assert_eq!(line["username"], localpart_of(&user_id), "{line} {user_id}");
    assert_eq!(line["user_id"], user_id.as_str(), "{line}");
    assert!(hs.exists("secondaudit").await);
    assert!(!hs.exists("firstaudit").await);

    // The completed session once more, with another good name: Dendrite
    // answers with the account it made before, and the audit line says so
    // (`user_id`), though the name asked for was another; Conduit refuses
    // the finished session.
    let replay = post_json(
        &register,
        &json!({
            "username": "ReplayAudit",
            "password": PASSWORD,
            "auth": {"type": "m.login.dummy", "session": session},
        })
        .to_string(),
    )
    .await;
    let line = audit_line(&gate, "ReplayAudit").await;
    assert_eq!(line["username"], "replayaudit", "{line}");
    match hs.flavour {
        Flavour::Dendrite => {
            assert_eq!(replay.status, 200, "{:?}", replay.body);
            assert_eq!(replay.json()["user_id"], user_id.as_str());
            assert_eq!(line["user_id"], user_id.as_str(), "{line}");
        }
        Flavour::Conduit => {
            assert_eq!(replay.status, 403, "{:?}", replay.body);
            assert!(line.get("user_id").is_none(), "{line}");
        }
    }
    assert!(!hs.exists("replayaudit").await);

    let refused = crate::register_dummy(&gate.url(""), "Admin", &[]).await;
    refused.assert_error(400, "M_USER_IN_USE");
    let line = audit_line(&gate, "Admin").await;
    assert_eq!(line["decision"], "refused", "{line}");
    assert_eq!(line["rule"], "reserved", "{line}");
    assert_eq!(line["username"], "admin", "{line}");
    assert_eq!(line["upstream_status"], 0, "{line}");
    assert!(!hs.exists("admin").await);
    assert!(!hs.can_log_in("admin").await);
}

/// matrix-nio registers `NioUser` through the gate (its own interactive
/// flow), syncs and logs in again through the gate: the account the
/// homeserver made is `@niouser`, the gate's mapped name.
pub async fn matrix_nio_registers_syncs_and_logs_in(hs: &Homeserver) {
    let gate = hs.gate("").await;
    crate::nio_registers_syncs_and_logs_in(&gate.url(""), hs.name()).await;
    assert!(hs.exists("niouser").await);
    assert!(hs.can_log_in("niouser").await);
}
