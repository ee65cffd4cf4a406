//! Guests: `[guest] access` decides whether one is made, and an allowed
//! guest is a bare one; and what the homeservers do with a guest token on
//! a user registration (neither has guest upgrades).

use http::Method;
use serde_json::{json, Value};

use super::{assert_answer, assert_refused_by_gate, marker, Flavour, Homeserver, PASSWORD};
use crate::common::{post_json, send, Answer};
use crate::synapse::SERVER_NAME;
use crate::{localpart_of, REGISTER};

/// The guest body of a client that asks for more than a guest may have.
fn greedy_guest_body() -> String {
    json!({
        "username": "guestname",
        "password": PASSWORD,
        "device_id": "GUESTDEVICE",
        "refresh_token": true,
        "initial_device_display_name": "e2e guest",
    })
    .to_string()
}

/// A `GET` on the homeserver with an access token.
async fn authed_get(hs: &Homeserver, path: &str, token: &str) -> Answer {
    send(
        Method::GET,
        &format!("{}{path}", hs.url()),
        &[("authorization", &format!("Bearer {token}"))],
        "",
    )
    .await
}

/// Asserts that `token` belongs to a guest, per the homeserver's own
/// `whoami`, and returns its user ID.
async fn assert_guest(hs: &Homeserver, token: &str) -> String {
    let whoami = authed_get(hs, "/_matrix/client/v3/account/whoami", token).await;
    assert_eq!(whoami.status, 200, "{:?}", whoami.body);
    assert_eq!(whoami.json()["is_guest"], true, "{:?}", whoami.body);
    whoami.json()["user_id"].as_str().unwrap().to_owned()
}

/// Asserts the shape of a guest's user ID: Dendrite numbers its guests (one
/// counter, as Synapse does), Conduit names them with ten random lower-case
/// letters and digits.
fn assert_guest_id(hs: &Homeserver, user_id: &str) {
    let localpart = localpart_of(user_id);
    assert!(user_id.ends_with(&format!(":{SERVER_NAME}")), "{user_id}");
    match hs.flavour {
        Flavour::Dendrite => assert!(
            localpart.parse::<u64>().is_ok(),
            "a Dendrite guest is numeric: {user_id}"
        ),
        Flavour::Conduit => assert!(
            localpart.len() == 10
                && localpart
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "a Conduit guest has a random name: {user_id}"
        ),
    }
}

/// With `[guest] access = "deny"` a `?kind=guest` registration is refused
/// `403 M_FORBIDDEN` by the gate and no guest is made (counted on the
/// homeserver: see [`Homeserver::guests_made_during`]), although the
/// homeserver alone makes one from the same request (Dendrite's generated
/// configuration allows guests; Conduit 0.10 has no switch for them and
/// makes guests whenever registration is open).
///
/// With `access = "allow"` the same greedy body (a username, a password, a
/// device ID, a refresh token) gets exactly one bare guest: a guest by the
/// homeserver's own `whoami`, without a refresh token, under a device ID
/// the homeserver chose, with the display name it was given (the one field
/// a guest may set, kept by both), and no account by the requested name.
/// Both homeservers also ignore those fields on a guest registration sent
/// to them directly.
pub async fn guests_follow_the_guest_policy(hs: &Homeserver) {
    let allow = hs.gate("[guest]\naccess = \"allow\"\n").await;
    let deny = hs.gate("[guest]\naccess = \"deny\"\n").await;
    let body = greedy_guest_body();

    let (answer, made) = hs
        .guests_made_during(post_json(
            &deny.url(&format!("{REGISTER}?kind=guest")),
            &body,
        ))
        .await;
    assert_refused_by_gate(&answer, 403, "M_FORBIDDEN", "a denied guest");
    assert_eq!(made, 0, "{}: a guest was made through the gate", hs.name());
    let (direct, made) = hs
        .guests_made_during(post_json(
            &format!("{}{REGISTER}?kind=guest", hs.url()),
            &body,
        ))
        .await;
    assert_eq!(direct.status, 200, "{:?}", direct.body);
    assert_eq!(made, 1, "{}: the homeserver alone makes a guest", hs.name());
    assert_ne!(direct.json()["device_id"], "GUESTDEVICE");

    let (answer, made) = hs
        .guests_made_during(post_json(
            &allow.url(&format!("{REGISTER}?kind=guest")),
            &body,
        ))
        .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(marker(&answer), "allowed");
    assert_eq!(made, 1, "{}: one guest through the gate", hs.name());
    let json = answer.json();
    let user_id = json["user_id"].as_str().unwrap();
    assert_guest_id(hs, user_id);
    assert!(json.get("refresh_token").is_none(), "{json}");
    assert!(json.get("expires_in_ms").is_none(), "{json}");
    assert!(json["device_id"].is_string(), "{json}");
    assert_ne!(json["device_id"], "GUESTDEVICE", "{json}");
    let token = json["access_token"].as_str().unwrap();
    assert_eq!(assert_guest(hs, token).await, user_id);
    let devices = authed_get(hs, "/_matrix/client/v3/devices", token).await;
    assert_eq!(devices.status, 200, "{:?}", devices.body);
    let devices = devices.json()["devices"].clone();
    assert_eq!(devices.as_array().map(Vec::len), Some(1), "{devices}");
    assert_eq!(devices[0]["device_id"], json["device_id"], "{devices}");
    assert_eq!(devices[0]["display_name"], "e2e guest", "{devices}");
    assert!(!hs.exists("guestname").await);
    assert!(!hs.can_log_in("guestname").await);
}

/// A user registration of an all-digit name with a `guest_access_token`
/// (Synapse's guest upgrade: Synapse checks the token and lets a guest
/// keep its own number).
///
/// With guests denied the gate refuses it `400 M_INVALID_USERNAME` and the
/// name is not made. Directly, neither homeserver upgrades a guest: both
/// ignore `guest_access_token` entirely. Dendrite refuses every all-digit
/// name (`400 M_INVALID_USERNAME`, "Numeric user IDs are reserved"; also
/// `-123` and `+123`, which it parses as numbers), a guest's own number
/// with that guest's token included; Conduit registers an all-digit name
/// as a plain user whatever the token. With a real guest's token, a
/// non-numeric name becomes a new account on both and the guest stays a
/// guest.
///
/// With guests allowed too, the gate refuses it: `[homeserver]
/// guest_upgrades` is false (its default), as it must be in front of a
/// homeserver without guest upgrades — Conduit would register the name.
pub async fn a_guest_token_upgrades_nothing(hs: &Homeserver) {
    let deny = hs.gate("[guest]\naccess = \"deny\"\n").await;
    let allow = hs.gate("[guest]\naccess = \"allow\"\n").await;
    let numeric = |name: &str, token: &str| {
        json!({
            "username": name,
            "password": PASSWORD,
            "guest_access_token": token,
            "auth": {"type": "m.login.dummy"},
        })
        .to_string()
    };

    let answer = post_json(&deny.url(REGISTER), &numeric("54321", "x")).await;
    assert_refused_by_gate(&answer, 400, "M_INVALID_USERNAME", "54321, guests denied");
    assert!(!hs.exists("54321").await);
    // Guests allowed, but `[homeserver] guest_upgrades` is false (neither
    // homeserver upgrades guests): the gate refuses the name all the same.
    let answer = post_json(&allow.url(REGISTER), &numeric("54321", "x")).await;
    assert_refused_by_gate(&answer, 400, "M_INVALID_USERNAME", "54321, guests allowed");
    assert!(!hs.exists("54321").await);

    // Directly: a made-up token.
    let direct = post_json(&format!("{}{REGISTER}", hs.url()), &numeric("12345", "x")).await;
    match hs.flavour {
        Flavour::Dendrite => {
            assert_answer(&direct, 400, "M_INVALID_USERNAME", "12345 directly");
            assert!(!hs.exists("12345").await);
        }
        Flavour::Conduit => {
            assert_eq!(direct.status, 200, "{:?}", direct.body);
            assert_eq!(direct.json()["user_id"], format!("@12345:{SERVER_NAME}"));
            assert!(hs.can_log_in("12345").await);
        }
    }

    // Directly: a real guest's token, on its own localpart and on a new
    // name.
    let guest = hs.guest_directly().await;
    assert_eq!(guest.status, 200, "{:?}", guest.body);
    let guest: Value = guest.json();
    let token = guest["access_token"].as_str().unwrap();
    let guest_id = guest["user_id"].as_str().unwrap();
    let own = post_json(
        &format!("{}{REGISTER}", hs.url()),
        &numeric(localpart_of(guest_id), token),
    )
    .await;
    match hs.flavour {
        Flavour::Dendrite => {
            assert_answer(&own, 400, "M_INVALID_USERNAME", "the guest's own number")
        }
        Flavour::Conduit => assert_answer(&own, 400, "M_USER_IN_USE", "the guest's own name"),
    }
    let renamed = post_json(
        &format!("{}{REGISTER}", hs.url()),
        &numeric("upgraded", token),
    )
    .await;
    assert_eq!(renamed.status, 200, "{:?}", renamed.body);
    assert_eq!(
        renamed.json()["user_id"],
        format!("@upgraded:{SERVER_NAME}")
    );
    assert_ne!(renamed.json()["user_id"], guest_id);
    assert_eq!(assert_guest(hs, token).await, guest_id);
    assert!(!hs.can_log_in(localpart_of(guest_id)).await);
}

/// A complete user registration without a password, sent to the homeserver
/// directly. Measured: Dendrite refuses it (`400 M_MISSING_PARAM`, "Missing
/// password") and makes nothing; Conduit 0.10 makes the account under the
/// chosen name with an access token and no password, which its own
/// `whoami` calls a guest and which cannot log in again
/// (`403 M_USER_DEACTIVATED`). Through the gate such a request is a user
/// registration (its name checked, whatever `[guest] access` says): on
/// Conduit it makes a named, guest-like account even with guests denied.
pub async fn a_user_without_a_password(hs: &Homeserver) {
    let body = json!({"username": "nopassword", "auth": {"type": "m.login.dummy"}}).to_string();
    let (answer, made) = hs
        .guests_made_during(post_json(&format!("{}{REGISTER}", hs.url()), &body))
        .await;
    match hs.flavour {
        Flavour::Dendrite => {
            assert_answer(&answer, 400, "M_MISSING_PARAM", "no password");
            assert_eq!(made, 0);
            assert!(!hs.exists("nopassword").await);
        }
        Flavour::Conduit => {
            assert_eq!(answer.status, 200, "{:?}", answer.body);
            assert_eq!(
                answer.json()["user_id"],
                format!("@nopassword:{SERVER_NAME}")
            );
            assert_eq!(made, 1, "one password-less account");
            let token = answer.json()["access_token"].as_str().unwrap().to_owned();
            assert_eq!(
                assert_guest(hs, &token).await,
                format!("@nopassword:{SERVER_NAME}")
            );
            assert!(hs.exists("nopassword").await);
            assert!(!hs.can_log_in("nopassword").await);
            let login = hs.login("nopassword", PASSWORD).await;
            assert_answer(&login, 403, "M_USER_DEACTIVATED", "a password-less login");
        }
    }
}
