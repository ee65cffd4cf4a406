//! Guarded routes against the recording fake homeserver: every refusal with
//! its exact status and errcode, and proof the homeserver saw nothing;
//! canonical forwarding of everything that passes.

mod common;

use common::{get, post_json, send, FakeHomeserver, Gate};
use http::Method;

const REGISTER: &str = "/_matrix/client/v3/register";

async fn setup(extra: &str) -> (FakeHomeserver, Gate) {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), extra).await;
    (hs, gate)
}

#[tokio::test]
async fn valid_registration_is_forwarded_with_the_mapped_name() {
    let (hs, gate) = setup("").await;
    let answer = post_json(
        &gate.url(REGISTER),
        r#"{"username":"\u212Aelvin","password":"pw","auth":{"type":"m.login.dummy","session":null},"refresh_token":true,"future_field":{"x":[1,2]}}"#,
    )
    .await;
    assert_eq!(answer.status, 200);
    let seen = hs.only_request();
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.target, REGISTER);
    let body = seen.json();
    assert_eq!(body["username"], "kelvin");
    assert_eq!(body["password"], "pw");
    assert_eq!(body["refresh_token"], true);
    assert_eq!(body["future_field"]["x"][1], 2);
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(
        seen.header("content-length"),
        Some(seen.body.len().to_string().as_str())
    );
}

#[tokio::test]
async fn username_refusals_never_reach_the_homeserver() {
    let (hs, gate) = setup("[username]\ndeny_patterns = [\"^spam\"]\n").await;
    let cases: &[(&str, u16, &str)] = &[
        (r#"{"username":5}"#, 400, "M_INVALID_USERNAME"),
        (r#"{"username":null}"#, 400, "M_INVALID_USERNAME"),
        (r#"{"username":{"a":1}}"#, 400, "M_INVALID_USERNAME"),
        (r#"{"username":""}"#, 400, "M_INVALID_USERNAME"),
        (r#"{"username":"al ice"}"#, 400, "M_INVALID_USERNAME"),
        (
            r#"{"username":"alice:example.org"}"#,
            400,
            "M_INVALID_USERNAME",
        ),
        (r#"{"username":"\u0130van"}"#, 400, "M_INVALID_USERNAME"),
        (r#"{"username":"\uff41lice"}"#, 400, "M_INVALID_USERNAME"),
        (r#"{"username":"_bridge"}"#, 400, "M_INVALID_USERNAME"),
        (r#"{"username":"123456"}"#, 400, "M_INVALID_USERNAME"),
        (r#"{"username":"admin"}"#, 400, "M_USER_IN_USE"),
        (r#"{"username":"ADMIN"}"#, 400, "M_USER_IN_USE"),
        (r#"{"username":"adm1n"}"#, 400, "M_USER_IN_USE"),
        (r#"{"username":"a.d.m.i.n"}"#, 400, "M_USER_IN_USE"),
        (r#"{"username":"Spammer"}"#, 400, "M_INVALID_USERNAME"),
        (
            r#"{"username":"alice","username":"admin"}"#,
            400,
            "M_BAD_JSON",
        ),
        (
            r#"{"auth":{"session":"a","session":"b"},"username":"alice"}"#,
            400,
            "M_BAD_JSON",
        ),
        (r#"{"username":"alice"} trailing"#, 400, "M_NOT_JSON"),
        ("\u{feff}{\"username\":\"alice\"}", 400, "M_NOT_JSON"),
        ("not json", 400, "M_NOT_JSON"),
        ("", 400, "M_NOT_JSON"),
        ("[]", 400, "M_BAD_JSON"),
        ("\"alice\"", 400, "M_BAD_JSON"),
    ];
    for (body, status, errcode) in cases {
        let answer = post_json(&gate.url(REGISTER), body).await;
        answer.assert_error(*status, errcode);
    }
    let long = format!(r#"{{"username":"{}"}}"#, "a".repeat(243));
    post_json(&gate.url(REGISTER), &long)
        .await
        .assert_error(400, "M_INVALID_USERNAME");
    hs.assert_saw_nothing("refused registrations");
}

#[tokio::test]
async fn every_uia_step_that_names_a_user_is_checked() {
    let (hs, gate) = setup("").await;
    // Step one names a good user and passes.
    let first = post_json(
        &gate.url(REGISTER),
        r#"{"username":"stepone","password":"x"}"#,
    )
    .await;
    assert_eq!(first.status, 200);
    // Step two changes the name to a reserved one: refused.
    post_json(
        &gate.url(REGISTER),
        r#"{"username":"root","auth":{"type":"m.login.dummy","session":"s"}}"#,
    )
    .await
    .assert_error(400, "M_USER_IN_USE");
    // A session-only completion passes untouched.
    let done = post_json(
        &gate.url(REGISTER),
        r#"{"auth":{"type":"m.login.dummy","session":"s"}}"#,
    )
    .await;
    assert_eq!(done.status, 200);
    let seen = hs.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].json()["username"], "stepone");
    assert_eq!(
        seen[1].json(),
        serde_json::json!({"auth":{"type":"m.login.dummy","session":"s"}})
    );
}

#[tokio::test]
async fn username_less_probe_passes() {
    let (hs, gate) = setup("").await;
    assert_eq!(post_json(&gate.url(REGISTER), "{}").await.status, 200);
    let seen = hs.only_request();
    assert_eq!(seen.target, REGISTER);
    assert_eq!(&seen.body[..], b"{}");
}

#[tokio::test]
async fn guest_upgrade_may_name_an_all_digit_localpart_while_guests_are_allowed() {
    let (hs, gate) =
        setup("[homeserver]\nguest_upgrades = true\n[guest]\naccess = \"allow\"\n").await;
    let answer = post_json(
        &gate.url(REGISTER),
        r#"{"username":"12345","guest_access_token":"tok","password":"x"}"#,
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(hs.only_request().json()["guest_access_token"], "tok");
}

/// With guests denied no guest account exists to upgrade, and a homeserver
/// without guest upgrades (Conduit ignores the field) would register the
/// all-digit name: the token grants nothing.
#[tokio::test]
async fn a_guest_token_names_no_all_digit_localpart_while_guests_are_denied() {
    let (hs, gate) = setup("").await;
    for token in ["\"tok\"", "\"\""] {
        post_json(
            &gate.url(REGISTER),
            &format!(
                r#"{{"username":"12345","guest_access_token":{token},"password":"x","auth":{{"type":"m.login.dummy"}}}}"#
            ),
        )
        .await
        .assert_error(400, "M_INVALID_USERNAME");
    }
    hs.assert_saw_nothing("an all-digit name with a guest token, guests denied");
}

/// In front of a homeserver without guest upgrades (the default: Dendrite
/// and the Conduit family have none, and Conduit registers the all-digit
/// name from such a body), the token grants nothing even with guests
/// allowed; guests themselves still pass.
#[tokio::test]
async fn a_guest_token_names_no_all_digit_localpart_without_guest_upgrades() {
    let (hs, gate) = setup("[guest]\naccess = \"allow\"\n").await;
    for username in ["12345", "007"] {
        post_json(
            &gate.url(REGISTER),
            &format!(
                r#"{{"username":"{username}","guest_access_token":"tok","password":"x","auth":{{"type":"m.login.dummy"}}}}"#
            ),
        )
        .await
        .assert_error(400, "M_INVALID_USERNAME");
    }
    hs.assert_saw_nothing("an all-digit name with a guest token, no guest upgrades");
    let guest = post_json(&gate.url(&format!("{REGISTER}?kind=guest")), "{}").await;
    assert_eq!(guest.status, 200);
    assert_eq!(hs.only_request().target, format!("{REGISTER}?kind=guest"));
}

#[tokio::test]
async fn guests_are_refused_when_denied() {
    let (hs, gate) = setup("").await;
    for query in [
        "kind=guest",
        "kind=%67uest",
        "x=1;kind=guest",
        "kind=guest&kind=guest",
    ] {
        let answer = post_json(&gate.url(&format!("{REGISTER}?{query}")), "{}").await;
        let expected = if query.matches("kind").count() > 1 {
            "M_UNRECOGNIZED"
        } else {
            "M_FORBIDDEN"
        };
        answer.assert_error(if expected == "M_FORBIDDEN" { 403 } else { 400 }, expected);
    }
    hs.assert_saw_nothing("denied guests");
}

#[tokio::test]
async fn allowed_guest_bodies_are_stripped_to_the_display_name() {
    let (hs, gate) = setup("[guest]\naccess = \"allow\"\n").await;
    let answer = post_json(
        &gate.url(&format!("{REGISTER}?kind=guest&extra=1")),
        r#"{"initial_device_display_name":"My phone","username":"admin","refresh_token":true,"device_id":"X","password":"p"}"#,
    )
    .await;
    assert_eq!(answer.status, 200);
    let seen = hs.only_request();
    assert_eq!(seen.target, format!("{REGISTER}?kind=guest"));
    assert_eq!(
        &seen.body[..],
        br#"{"initial_device_display_name":"My phone"}"#
    );
    hs.clear();
    post_json(
        &gate.url(&format!("{REGISTER}?kind=guest")),
        r#"{"refresh_token":true}"#,
    )
    .await;
    assert_eq!(&hs.only_request().body[..], b"{}");
}

#[tokio::test]
async fn kind_is_forwarded_once_or_refused_when_ambiguous() {
    let (hs, gate) = setup("[guest]\naccess = \"allow\"\n").await;
    for query in [
        "kind=user&kind=guest",
        "kind=guest&kind=user",
        "kind=user;kind=guest",
        "kind=admin",
        "kind=GUEST",
        "kind=",
        "kind",
        "%6bind=guest&kind=user",
    ] {
        post_json(
            &gate.url(&format!("{REGISTER}?{query}")),
            r#"{"username":"alice"}"#,
        )
        .await
        .assert_error(400, "M_UNRECOGNIZED");
    }
    hs.assert_saw_nothing("ambiguous kinds");
    // An access token on a user registration is refused, as the
    // homeserver refuses it (only bridges register with one).
    post_json(
        &gate.url(&format!("{REGISTER}?kind=user&access_token=x&foo=bar")),
        r#"{"username":"alice"}"#,
    )
    .await
    .assert_error(400, "M_UNKNOWN");
    hs.assert_saw_nothing("a token on a user registration");
    let answer = post_json(
        &gate.url(&format!("{REGISTER}?kind=user&foo=bar")),
        r#"{"username":"alice"}"#,
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(hs.only_request().target, format!("{REGISTER}?kind=user"));
    hs.clear();
    post_json(
        &gate.url(&format!("{REGISTER}?foo=bar")),
        r#"{"username":"alice"}"#,
    )
    .await;
    assert_eq!(hs.only_request().target, REGISTER);
}

#[tokio::test]
async fn path_variants_are_forwarded_under_the_canonical_path_or_refused() {
    let (hs, gate) = setup("").await;
    for (path, canonical) in [
        ("/_matrix/client/v3/register/", REGISTER),
        ("//_matrix//client/v3//register", REGISTER),
        ("/_matrix/client/v3/r%65gister", REGISTER),
        ("/_matrix/client/v3/./register", REGISTER),
        ("/_matrix/client/v3/x/../register", REGISTER),
        ("/_matrix/client/V3/register", REGISTER),
        ("/_matrix/client/v3/register;jsessionid=1", REGISTER),
        ("/_matrix/client/r0/register", "/_matrix/client/r0/register"),
        (
            "/_matrix/client/unstable/register",
            "/_matrix/client/unstable/register",
        ),
    ] {
        hs.clear();
        post_json(&gate.url(path), r#"{"username":"ADMIN"}"#)
            .await
            .assert_error(400, "M_USER_IN_USE");
        hs.assert_saw_nothing(path);
        let answer = post_json(&gate.url(path), r#"{"username":"Alice"}"#).await;
        assert_eq!(answer.status, 200, "{path}");
        let seen = hs.only_request();
        assert_eq!(seen.target, canonical, "{path}");
        assert_eq!(seen.json()["username"], "alice");
    }
    hs.clear();
    for path in [
        "/_matrix/client/v4/register",
        "/_matrix/client/v3/register/something",
        "/_matrix/client/v3/r%65gister/other",
    ] {
        post_json(&gate.url(path), r#"{"username":"alice"}"#)
            .await
            .assert_error(404, "M_UNRECOGNIZED");
    }
    hs.assert_saw_nothing("unknown registration paths");
}

#[tokio::test]
async fn other_methods_on_register_are_refused_but_preflight_passes() {
    let (hs, gate) = setup("").await;
    for method in [Method::GET, Method::PUT, Method::DELETE, Method::PATCH] {
        let answer = send(method, &gate.url(REGISTER), &[], r#"{"username":"admin"}"#).await;
        answer.assert_error(405, "M_UNRECOGNIZED");
        assert_eq!(answer.headers["allow"], "POST, OPTIONS");
    }
    let answer = send(
        Method::POST,
        &gate.url("/_matrix/client/v3/register/available?username=a"),
        &[],
        "",
    )
    .await;
    answer.assert_error(405, "M_UNRECOGNIZED");
    assert_eq!(answer.headers["allow"], "GET, OPTIONS");
    hs.assert_saw_nothing("other methods");
    let answer = send(
        Method::OPTIONS,
        &gate.url(&format!("{REGISTER}?kind=guest")),
        &[("access-control-request-method", "POST")],
        "",
    )
    .await;
    assert_eq!(answer.status, 200);
    let seen = hs.only_request();
    assert_eq!(seen.method, Method::OPTIONS);
    assert_eq!(seen.target, REGISTER);
}

#[tokio::test]
async fn availability_is_answered_by_the_gate_or_asked_canonically() {
    let (hs, gate) = setup("").await;
    let available = "/_matrix/client/v3/register/available";
    get(&gate.url(available))
        .await
        .assert_error(400, "M_MISSING_PARAM");
    get(&gate.url(&format!("{available}?username=admin")))
        .await
        .assert_error(400, "M_USER_IN_USE");
    get(&gate.url(&format!("{available}?username=r00t")))
        .await
        .assert_error(400, "M_USER_IN_USE");
    get(&gate.url(&format!("{available}?username=a%20b")))
        .await
        .assert_error(400, "M_INVALID_USERNAME");
    get(&gate.url(&format!("{available}?username=%C3%A9")))
        .await
        .assert_error(400, "M_INVALID_USERNAME");
    get(&gate.url(&format!("{available}?username=alice&username=admin")))
        .await
        .assert_error(400, "M_INVALID_PARAM");
    hs.assert_saw_nothing("refused availability checks");
    let answer = get(&gate.url(&format!("{available}?username=%E2%84%AAelvin;x=1&y=2"))).await;
    assert_eq!(answer.status, 200);
    let seen = hs.only_request();
    assert_eq!(seen.method, Method::GET);
    assert_eq!(seen.target, format!("{available}?username=kelvin"));
}

#[tokio::test]
async fn request_token_and_token_validity_are_canonical() {
    let (hs, gate) = setup("").await;
    let email = "/_matrix/client/v3/register/email/requestToken";
    let answer = post_json(
        &gate.url(&format!("{email}?x=1")),
        r#"{"client_secret":"s","email":"a@example.org","send_attempt":1}"#,
    )
    .await;
    assert_eq!(answer.status, 200);
    let seen = hs.only_request();
    assert_eq!(seen.target, email);
    assert_eq!(seen.json()["email"], "a@example.org");
    hs.clear();
    post_json(&gate.url(email), r#"{"email":"a","email":"b"}"#)
        .await
        .assert_error(400, "M_BAD_JSON");
    send(Method::GET, &gate.url(email), &[], "")
        .await
        .assert_error(405, "M_UNRECOGNIZED");
    hs.assert_saw_nothing("bad requestToken");

    let validity = "/_matrix/client/v1/register/m.login.registration_token/validity";
    get(&gate.url(validity))
        .await
        .assert_error(400, "M_MISSING_PARAM");
    get(&gate.url(&format!("{validity}?token=a&token=b")))
        .await
        .assert_error(400, "M_INVALID_PARAM");
    hs.assert_saw_nothing("bad validity checks");
    assert_eq!(
        get(&gate.url(&format!("{validity}?token=abc_1&x=y")))
            .await
            .status,
        200
    );
    assert_eq!(hs.only_request().target, format!("{validity}?token=abc_1"));
}

#[tokio::test]
async fn disabled_registration_refuses_every_route() {
    let (hs, gate) = setup("[registration]\nenabled = false\n").await;
    post_json(&gate.url(REGISTER), r#"{"username":"alice"}"#)
        .await
        .assert_error(403, "M_FORBIDDEN");
    post_json(&gate.url("/_matrix/client/r0/register"), "{}")
        .await
        .assert_error(403, "M_FORBIDDEN");
    get(&gate.url("/_matrix/client/v3/register/available?username=alice"))
        .await
        .assert_error(403, "M_FORBIDDEN");
    post_json(
        &gate.url("/_matrix/client/v3/register/msisdn/requestToken"),
        "{}",
    )
    .await
    .assert_error(403, "M_FORBIDDEN");
    get(&gate.url("/_matrix/client/v1/register/m.login.registration_token/validity?token=a"))
        .await
        .assert_error(403, "M_FORBIDDEN");
    hs.assert_saw_nothing("disabled registration");
    // Other traffic still flows.
    assert_eq!(get(&gate.url("/_matrix/client/versions")).await.status, 200);
}

#[tokio::test]
async fn admin_registration_is_refused_unless_allowed() {
    let (hs, gate) = setup("").await;
    for path in [
        "/_synapse/admin/v1/register",
        "/_synapse//admin/v1/register/",
        "/_synapse/admin/v1/r%65gister",
    ] {
        get(&gate.url(path)).await.assert_error(403, "M_FORBIDDEN");
        post_json(
            &gate.url(path),
            r#"{"nonce":"n","username":"root","mac":"m"}"#,
        )
        .await
        .assert_error(403, "M_FORBIDDEN");
    }
    hs.assert_saw_nothing("admin registration");
    let (hs, gate) = setup("[registration]\nallow_admin_register = true\n").await;
    assert_eq!(
        get(&gate.url("/_synapse/admin/v1/register")).await.status,
        200
    );
    let answer = post_json(
        &gate.url("/_synapse//admin/v1/register/"),
        r#"{"nonce":"n","username":"root","password":"p","mac":"m"}"#,
    )
    .await;
    assert_eq!(answer.status, 200);
    let seen = hs.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].target, "/_synapse/admin/v1/register");
    assert_eq!(seen[1].json()["username"], "root");
}

#[tokio::test]
async fn registration_forwarding_headers_are_replaced() {
    let (hs, gate) = setup("").await;
    let answer = send(
        Method::POST,
        &gate.url(REGISTER),
        &[
            ("content-type", "text/plain"),
            ("x-forwarded-for", "6.6.6.6, 7.7.7.7"),
            ("x-real-ip", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6"),
            ("user-agent", "test-client/1"),
        ],
        r#"{"username":"alice"}"#,
    )
    .await;
    assert_eq!(answer.status, 200);
    let seen = hs.only_request();
    let xff: Vec<_> = seen.headers.get_all("x-forwarded-for").iter().collect();
    assert_eq!(xff, vec!["127.0.0.1"]);
    assert!(seen.header("x-real-ip").is_none());
    assert!(seen.header("forwarded").is_none());
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(seen.header("user-agent"), Some("test-client/1"));
}

#[tokio::test]
async fn body_limits_apply_to_registration_bodies() {
    let (hs, gate) = setup("[registration]\nmax_body_bytes = 100\n").await;
    let big = format!(r#"{{"username":"alice","pad":"{}"}}"#, "x".repeat(200));
    post_json(&gate.url(REGISTER), &big)
        .await
        .assert_error(413, "M_TOO_LARGE");
    hs.assert_saw_nothing("oversized body");
    assert_eq!(
        post_json(&gate.url(REGISTER), r#"{"username":"alice"}"#)
            .await
            .status,
        200
    );
}
