//! `/register/available` through the gate, and the spellings of the
//! registration route the gate guards.

use super::{assert_answer, assert_refused_by_gate, marker, register_on, Homeserver};
use crate::common::{get, Answer};
use crate::query_escape;

/// `GET …/register/available?username=` through `gate_url`.
async fn available(gate_url: &str, username: &str) -> Answer {
    get(&format!(
        "{gate_url}/_matrix/client/v3/register/available?username={}",
        query_escape(username)
    ))
    .await
}

/// Asserts the homeserver's own "available" answer, forwarded by the gate.
fn assert_available(answer: &Answer, what: &str) {
    assert_eq!(answer.status, 200, "{what}: {:?}", answer.body);
    assert_eq!(answer.json()["available"], true, "{what}");
    assert_eq!(marker(answer), "allowed", "{what}");
}

/// The gate answers `/register/available` itself for a name it refuses
/// (reserved: "taken", `400 M_USER_IN_USE`; out of the grammar or
/// upper case under `case = "reject"`: `400 M_INVALID_USERNAME`), and asks
/// the homeserver about every other name under the gate's mapped form: a
/// free name is available, a taken one the homeserver's own
/// `400 M_USER_IN_USE`, and a mixed-case spelling of a taken name is taken.
/// No check makes an account.
///
/// Measured on Dendrite v0.13.8 and Conduit 0.10: both lower-case the name
/// in their own `/register/available` too, so the gate's mapped query
/// gives the same answer as the name as sent would; and both take a whole
/// user ID (`@name:server`) there, which the gate refuses as out of the
/// grammar. Directly, a reserved name is free on the homeserver: the
/// gate's "taken" is its own.
pub async fn availability_is_answered_by_the_gate_or_for_the_mapped_name(hs: &Homeserver) {
    let gate = hs.gate("").await;
    let strict = hs.gate("[username]\ncase = \"reject\"\n").await;
    let base = gate.url("");
    let taken = hs.register_directly("takenname").await;
    assert_eq!(taken.status, 200, "{:?}", taken.body);

    assert_available(&available(&base, "freename").await, "freename");
    assert_available(&available(&base, "FreeMixed").await, "FreeMixed");
    for name in ["takenname", "TakenName", "TAKENNAME"] {
        let answer = available(&base, name).await;
        assert_answer(&answer, 400, "M_USER_IN_USE", name);
        assert_eq!(
            marker(&answer),
            "allowed",
            "{name}: the homeserver's answer"
        );
    }
    for name in ["admin", "Admin", "adm1n"] {
        let answer = available(&base, name).await;
        assert_refused_by_gate(&answer, 400, "M_USER_IN_USE", name);
        // The homeserver itself has no such account.
        let direct = hs.availability(&name.to_lowercase()).await;
        assert_eq!(direct.status, 200, "{name}: {:?}", direct.body);
    }
    let whole_id = format!("@takenname:{}", crate::synapse::SERVER_NAME);
    for name in ["al ice", "é", "_bridge", "12345", whole_id.as_str()] {
        let answer = available(&base, name).await;
        assert_refused_by_gate(&answer, 400, "M_INVALID_USERNAME", name);
    }
    let direct = hs.availability(&whole_id).await;
    assert_answer(&direct, 400, "M_USER_IN_USE", "a whole user ID, directly");

    let answer = available(&strict.url(""), "TakenName").await;
    assert_refused_by_gate(
        &answer,
        400,
        "M_INVALID_USERNAME",
        "TakenName, case = reject",
    );
    assert_available(&available(&strict.url(""), "freename").await, "freename");

    for name in ["freename", "freemixed", "admin", "adm1n", "12345"] {
        assert!(!hs.exists(name).await, "{}: {name} was made", hs.name());
    }
}

/// The spellings of the registration route the gate classifies as
/// registration (`src/gate/routes.rs`): the three API versions, and for
/// `v3` doubled slashes, an escaped letter, a trailing slash, upper case,
/// a `;param`, an escaped slash, dot segments, trailing white space.
const REGISTER_SPELLINGS: &[&str] = &[
    "/_matrix/client/r0/register",
    "/_matrix/client/v3/register",
    "/_matrix/client/unstable/register",
    "//_matrix//client/v3///register",
    "/_matrix/client/v3/r%65gister",
    "/_matrix/client/v3/register/",
    "/_MATRIX/CLIENT/V3/REGISTER",
    "/_matrix/client/v3/register;x=1",
    "/_matrix/client/v3%2Fregister",
    "/_matrix/client/./v3/foo/../register",
    "/_matrix/client/v3/register%20",
];

/// A reserved name is refused by the gate on every spelling of the route
/// and never becomes an account; a good name sent on any spelling but
/// `unstable` registers, the gate forwarding it under the canonical path
/// of its API version. Measured: neither Dendrite v0.13.8 nor Conduit 0.10
/// serves `/_matrix/client/unstable/register` (`404 M_UNRECOGNIZED`, which
/// the gate passes on), and both answer `404` to every other non-canonical
/// spelling sent to them directly: on its own, neither registers through
/// a spelling (a front proxy that decodes or merges the path is what would
/// turn one into `register`).
pub async fn every_spelling_of_register_is_guarded(hs: &Homeserver) {
    let gate = hs.gate("").await;
    let base = gate.url("");
    for (i, path) in REGISTER_SPELLINGS.iter().enumerate() {
        let answer = register_on(&base, path, "admin").await;
        assert_refused_by_gate(&answer, 400, "M_USER_IN_USE", path);
        assert!(!hs.exists("admin").await, "{path}");

        let name = format!("spelling{i}");
        let answer = register_on(&base, path, &name).await;
        assert_eq!(marker(&answer), "allowed", "{path}");
        if path.contains("unstable") {
            assert_answer(&answer, 404, "M_UNRECOGNIZED", path);
            assert!(!hs.exists(&name).await, "{path}");
        } else {
            assert_eq!(answer.status, 200, "{path}: {:?}", answer.body);
            assert!(hs.exists(&name).await, "{path}");
            assert!(hs.can_log_in(&name).await, "{path}");
        }

        // The homeserver alone, on the spellings that are not its own.
        if i >= 3 {
            let name = format!("direct{i}");
            let direct = register_on(hs.url(), path, &name).await;
            assert_eq!(direct.status, 404, "{path}: {:?}", direct.body);
            assert!(!hs.exists(&name).await, "{path}");
        }
    }
    assert!(!hs.can_log_in("admin").await);
}
