//! The policy's unit tests.

use super::*;
use crate::gate::routes::ApiVersion;

const REGISTER: GuardedRoute = GuardedRoute::Register(ApiVersion::V3);

fn policy(toml: &str) -> Policy {
    Policy::new(&Config::from_toml(toml).unwrap())
}

fn errcode(d: HeadDecision) -> &'static str {
    match d {
        HeadDecision::Refuse(r) => r.error.errcode,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn kind_is_read_like_synapse_or_refused_when_ambiguous() {
    let p = policy("[guest]\naccess = \"allow\"\n");
    let plan = |q: &str| p.head(&Method::POST, REGISTER, Some(q));
    assert_eq!(
        plan("kind=%67uest"),
        HeadDecision::ReadBody(BodyPlan::Register(REGISTER, AccountKind::Guest))
    );
    assert_eq!(
        plan("x=1;kind=guest"),
        HeadDecision::ReadBody(BodyPlan::Register(REGISTER, AccountKind::Guest))
    );
    assert_eq!(errcode(plan("kind=user&kind=guest")), "M_UNRECOGNIZED");
    assert_eq!(errcode(plan("kind=admin")), "M_UNRECOGNIZED");
    assert_eq!(errcode(plan("kind=GUEST")), "M_UNRECOGNIZED");
    assert_eq!(errcode(plan("kind=")), "M_UNRECOGNIZED");
    assert_eq!(errcode(plan("kind")), "M_UNRECOGNIZED");
    assert_eq!(
        plan("kind=user&other=1"),
        HeadDecision::ReadBody(BodyPlan::Register(
            REGISTER,
            AccountKind::User { explicit: true }
        ))
    );
}

#[test]
fn guests_are_denied_by_default_and_stripped_when_allowed() {
    let deny = policy("");
    assert_eq!(
        errcode(deny.head(&Method::POST, REGISTER, Some("kind=guest"))),
        "M_FORBIDDEN"
    );
    let allow = policy("[guest]\naccess = \"allow\"\n");
    let fwd = allow
        .body(
            BodyPlan::Register(REGISTER, AccountKind::Guest),
            br#"{"initial_device_display_name":"phone","refresh_token":true,"username":"admin","password":"x"}"#,
        )
        .unwrap();
    assert_eq!(fwd.path_and_query, "/_matrix/client/v3/register?kind=guest");
    assert_eq!(
        fwd.body.unwrap(),
        Bytes::from_static(br#"{"initial_device_display_name":"phone"}"#)
    );
    let bare = allow
        .body(
            BodyPlan::Register(REGISTER, AccountKind::Guest),
            br#"{"x":1}"#,
        )
        .unwrap();
    assert_eq!(bare.body.unwrap(), Bytes::from_static(b"{}"));
}

#[test]
fn user_bodies_keep_every_field_and_get_the_mapped_name() {
    let p = policy("");
    let fwd = p
        .body(
            BodyPlan::Register(REGISTER, AccountKind::User { explicit: false }),
            br#"{"username":"\u212Aelvin","password":"pw","auth":{"type":"m.login.dummy","session":null},"device_id":"D","inhibit_login":false,"refresh_token":true,"future":[1,2.5]}"#,
        )
        .unwrap();
    assert_eq!(fwd.path_and_query, "/_matrix/client/v3/register");
    let name = fwd.username.unwrap();
    assert_eq!(name.mapped.as_deref(), Some("kelvin"));
    assert_eq!(name.sent, "\u{212A}elvin");
    assert_eq!(
        fwd.body.unwrap(),
        Bytes::from_static(br#"{"auth":{"session":null,"type":"m.login.dummy"},"device_id":"D","future":[1,2.5],"inhibit_login":false,"password":"pw","refresh_token":true,"username":"kelvin"}"#)
    );
}

#[test]
fn username_refusals() {
    let p = policy("");
    let user = BodyPlan::Register(REGISTER, AccountKind::User { explicit: true });
    let code = |body: &str| p.body(user, body.as_bytes()).unwrap_err().error.errcode;
    assert_eq!(code(r#"{"username":5}"#), "M_INVALID_USERNAME");
    assert_eq!(code(r#"{"username":null}"#), "M_INVALID_USERNAME");
    assert_eq!(code(r#"{"username":["a"]}"#), "M_INVALID_USERNAME");
    assert_eq!(code(r#"{"username":"bad name"}"#), "M_INVALID_USERNAME");
    assert_eq!(code(r#"{"username":"admin"}"#), "M_USER_IN_USE");
    assert_eq!(code(r#"{"username":"1234"}"#), "M_INVALID_USERNAME");
    // With guests denied there is no guest to upgrade: the token changes
    // nothing (Conduit would register the name).
    assert_eq!(
        code(r#"{"username":"1234","guest_access_token":"t"}"#),
        "M_INVALID_USERNAME"
    );
    // Guests allowed, but a homeserver without guest upgrades (the
    // default): the token changes nothing either.
    let no_upgrades = policy("[guest]\naccess = \"allow\"\n");
    let refusal = no_upgrades
        .body(user, br#"{"username":"1234","guest_access_token":"t"}"#)
        .unwrap_err();
    assert_eq!(refusal.error.errcode, "M_INVALID_USERNAME");
    // Upgrades, but guests denied: no guest to upgrade.
    let denied = policy("[homeserver]\nguest_upgrades = true\n");
    let refusal = denied
        .body(user, br#"{"username":"1234","guest_access_token":"t"}"#)
        .unwrap_err();
    assert_eq!(refusal.error.errcode, "M_INVALID_USERNAME");
    let guests = policy("[homeserver]\nguest_upgrades = true\n[guest]\naccess = \"allow\"\n");
    assert!(guests
        .body(user, br#"{"username":"1234","guest_access_token":"t"}"#)
        .is_ok());
    for name in ["12345", "007", "0"] {
        for token in ["null", "5", "false", "{}", "\"\""] {
            let body = format!(r#"{{"username":"{name}","guest_access_token":{token}}}"#);
            let refusal = guests.body(user, body.as_bytes()).unwrap_err();
            assert_eq!(refusal.error.errcode, "M_INVALID_USERNAME", "{body}");
        }
    }
    assert!(p.body(user, b"{}").is_ok(), "username-less probe passes");
    assert_eq!(code(r#"{"username":"a","username":"b"}"#), "M_BAD_JSON");
}

#[test]
fn availability_is_answered_or_forwarded_canonically() {
    let p = policy("");
    let route = GuardedRoute::Available(ApiVersion::V3);
    let ask = |q: Option<&str>| p.head(&Method::GET, route, q);
    assert_eq!(errcode(ask(None)), "M_MISSING_PARAM");
    assert_eq!(errcode(ask(Some("username=admin"))), "M_USER_IN_USE");
    assert_eq!(errcode(ask(Some("username=a%20b"))), "M_INVALID_USERNAME");
    assert_eq!(
        errcode(ask(Some("username=a&username=b"))),
        "M_INVALID_PARAM"
    );
    match ask(Some("username=Alice&kind=guest")) {
        HeadDecision::Forward(f) => assert_eq!(
            f.path_and_query,
            "/_matrix/client/v3/register/available?username=alice"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn banned_clients_and_email_domains() {
    let p = policy(
        "[client_ip]\ndeny = [\"192.0.2.0/24\"]\ndeny_user_agents = [\"(?i)^python-requests\"]\n\
         [email]\nallowed_domains = [\"example.org\", \"*.example.org\"]\ndenied_domains = [\"spam.example.org\"]\n",
    );
    let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
    assert_eq!(
        p.client(ip("192.0.2.9"), None).unwrap_err().error.errcode,
        "M_FORBIDDEN"
    );
    assert_eq!(
        p.client(ip("198.51.100.1"), Some("Python-Requests/2"))
            .unwrap_err()
            .rule,
        "denied_user_agent"
    );
    assert!(p.client(ip("198.51.100.1"), Some("Element/1.11")).is_ok());
    assert!(p.client(None, None).is_ok());
    let email = GuardedRoute::RequestToken(ApiVersion::V3, Medium::Email);
    // A complete body around the given `email` field.
    let check = |body: &str| {
        let body = if body.contains("client_secret") {
            body.to_owned()
        } else {
            body.replacen('}', r#","client_secret":"s","send_attempt":1}"#, 1)
        };
        p.body(BodyPlan::JsonObject(email), body.as_bytes())
    };
    assert!(check(r#"{"email":"a@example.org","client_secret":"s","send_attempt":1}"#).is_ok());
    assert!(check(r#"{"email":"a@mail.Example.org"}"#).is_ok());
    for body in [
        r#"{"email":"a@spam.example.org"}"#,
        r#"{"email":"a@evil.test"}"#,
        r#"{"email":"nodomain"}"#,
        r#"{"email":"a@example.org@evil.test"}"#,
    ] {
        let refusal = check(body).unwrap_err();
        assert_eq!(
            (refusal.error.status.as_u16(), refusal.error.errcode),
            (403, "M_THREEPID_DENIED"),
            "{body}"
        );
    }
    assert_eq!(
        check(r#"{"email":5}"#).unwrap_err().error.errcode,
        "M_BAD_JSON"
    );
    // msisdn is not subject to email rules, but to the spec's field types.
    let msisdn = GuardedRoute::RequestToken(ApiVersion::V3, Medium::Msisdn);
    let msisdn = |body: &str| p.body(BodyPlan::JsonObject(msisdn), body.as_bytes());
    assert!(
        msisdn(r#"{"phone_number":"1","country":"GB","client_secret":"s","send_attempt":1}"#)
            .is_ok()
    );
    for (body, errcode) in [
        (
            r#"{"phone_number":null,"country":"GB","client_secret":"s","send_attempt":1}"#,
            "M_BAD_JSON",
        ),
        (
            r#"{"phone_number":"1","country":5,"client_secret":"s","send_attempt":1}"#,
            "M_BAD_JSON",
        ),
        (
            r#"{"phone_number":"1","country":"GB","client_secret":"s","send_attempt":"1"}"#,
            "M_BAD_JSON",
        ),
        (
            r#"{"phone_number":"1","country":"GB","send_attempt":1}"#,
            "M_MISSING_PARAM",
        ),
    ] {
        assert_eq!(msisdn(body).unwrap_err().error.errcode, errcode, "{body}");
    }
}

#[test]
fn disabled_registration_and_methods() {
    let p = policy("[registration]\nenabled = false\n");
    assert_eq!(
        errcode(p.head(&Method::POST, REGISTER, None)),
        "M_FORBIDDEN"
    );
    assert_eq!(
        errcode(p.head(
            &Method::GET,
            GuardedRoute::Available(ApiVersion::R0),
            Some("username=x")
        )),
        "M_FORBIDDEN"
    );
    let open = policy("");
    assert_eq!(
        errcode(open.head(&Method::PUT, REGISTER, None)),
        "M_UNRECOGNIZED"
    );
    assert!(matches!(
        open.head(&Method::OPTIONS, REGISTER, Some("kind=guest")),
        HeadDecision::Forward(Forward { ref path_and_query, body: None, .. }) if path_and_query == "/_matrix/client/v3/register"
    ));
    assert_eq!(
        errcode(open.head(&Method::POST, GuardedRoute::AdminRegister, None)),
        "M_FORBIDDEN"
    );
    assert_eq!(
        errcode(open.head(&Method::POST, GuardedRoute::Unknown, None)),
        "M_UNRECOGNIZED"
    );
}
