//! Every step of a user-interactive registration goes through the gate's
//! username check, and the homeserver registers the last name let through.

use serde_json::json;

use super::{assert_answer, assert_refused_by_gate, marker, Flavour, Homeserver, PASSWORD};
use crate::common::post_json;
use crate::synapse::SERVER_NAME;
use crate::{uia_session, REGISTER};

/// A good name's first step brings the homeserver's `401` with a session
/// and its flows; a later step that switches to a reserved name is refused
/// by the gate, and neither name exists; a step carrying only the session
/// completes the registration of the first step's name, whose user ID is
/// `@<the gate's mapped name>:server`, and which logs in. A step that
/// switches to a mixed-case good name registers the gate's lower-cased
/// form of it with the first step's password.
///
/// Measured, the same on Dendrite v0.13.8 and Conduit 0.10 as on Synapse:
/// the homeserver keeps the first step's parameters under the session and
/// takes them as defaults for a later step (Dendrite in its session
/// table, Conduit by merging the stored body under the new one), so a
/// session-only step registers the first name, and a step naming another
/// user replaces only the name.
///
/// They differ once a session has completed. Dendrite keeps the completed
/// registration under the session and answers any later step with it, a
/// new name or not: `200` with the first account's user ID and access
/// token, and nothing registered (the gate, which let a good name through,
/// logs that step as allowed with the homeserver's `200`). Conduit forgets
/// the session: a later step is refused (`403 M_FORBIDDEN`, "UIAA session
/// does not exist") and nothing registered.
pub async fn every_uia_step_is_checked(hs: &Homeserver) {
    let gate = hs.gate("").await;
    let register = gate.url(REGISTER);

    let step1 = post_json(
        &register,
        &json!({"username": "StepOne", "password": PASSWORD}).to_string(),
    )
    .await;
    let session = uia_session(&step1);
    assert_eq!(marker(&step1), "allowed");
    assert_eq!(
        step1.json()["flows"],
        json!([{"stages": ["m.login.dummy"]}]),
        "{:?}",
        step1.body
    );

    let step2 = post_json(
        &register,
        &json!({
            "username": "admin",
            "password": PASSWORD,
            "auth": {"type": "m.login.dummy", "session": session},
        })
        .to_string(),
    )
    .await;
    assert_refused_by_gate(&step2, 400, "M_USER_IN_USE", "a reserved name at step 2");
    assert!(!hs.exists("admin").await);
    assert!(!hs.exists("stepone").await);

    let step3 = post_json(
        &register,
        &json!({"auth": {"type": "m.login.dummy", "session": session}}).to_string(),
    )
    .await;
    assert_eq!(step3.status, 200, "{:?}", step3.body);
    assert_eq!(step3.json()["user_id"], format!("@stepone:{SERVER_NAME}"));
    assert!(hs.exists("stepone").await);
    assert!(hs.can_log_in("stepone").await);
    assert!(!hs.exists("admin").await);
    assert!(!hs.can_log_in("admin").await);

    // The completed session once more, naming a good new name.
    let replay = post_json(
        &register,
        &json!({
            "username": "afterwards",
            "password": PASSWORD,
            "auth": {"type": "m.login.dummy", "session": session},
        })
        .to_string(),
    )
    .await;
    assert_eq!(marker(&replay), "allowed");
    match hs.flavour {
        Flavour::Dendrite => {
            assert_eq!(replay.status, 200, "{:?}", replay.body);
            assert_eq!(replay.json()["user_id"], step3.json()["user_id"]);
            assert_eq!(replay.json()["access_token"], step3.json()["access_token"]);
        }
        Flavour::Conduit => assert_answer(&replay, 403, "M_FORBIDDEN", "a completed session"),
    }
    assert!(!hs.exists("afterwards").await);

    // A later step switching to another good name registers that name,
    // mapped by the gate, with the first step's password.
    let first = post_json(
        &register,
        &json!({"username": "firstname", "password": PASSWORD}).to_string(),
    )
    .await;
    let session = uia_session(&first);
    let second = post_json(
        &register,
        &json!({
            "username": "SecondName",
            "auth": {"type": "m.login.dummy", "session": session},
        })
        .to_string(),
    )
    .await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    assert_eq!(
        second.json()["user_id"],
        format!("@secondname:{SERVER_NAME}")
    );
    assert!(hs.exists("secondname").await);
    assert!(hs.can_log_in("secondname").await);
    assert!(!hs.exists("firstname").await);
}
