//! Synapse's SSO username picker through the gate, against the recording
//! fake homeserver: picks and availability checks get the username policy,
//! the client rules, the lockdown and the limits; refusals of a pick are a
//! page for a person, and the homeserver receives only the gate's own form.

mod common;

use common::{send, Answer, FakeHomeserver, Gate};
use http::Method;

const PICK: &str = "/_synapse/client/pick_username/account_details";
const CHECK: &str = "/_synapse/client/pick_username/check";
const FORM: &str = "application/x-www-form-urlencoded";
const COOKIE: &str = "username_mapping_session=sessionid";

async fn setup(extra: &str) -> (FakeHomeserver, Gate) {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), extra).await;
    (hs, gate)
}

/// A pick as the picker's form sends it, with extra headers.
async fn pick(gate: &Gate, body: &[u8], headers: &[(&str, &str)]) -> Answer {
    let mut all = vec![("content-type", FORM), ("cookie", COOKIE)];
    all.extend_from_slice(headers);
    send(Method::POST, &gate.url(PICK), &all, body.to_vec()).await
}

/// Asserts the gate's page: status, HTML, the reason in it, and the marker.
fn assert_page(answer: &Answer, status: u16, reason: &str) {
    assert_eq!(answer.status.as_u16(), status, "{:?}", answer.body);
    assert_eq!(answer.headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(answer.headers["x-matrix-gatekeeper"], "refused");
    let page = std::str::from_utf8(&answer.body).expect("UTF-8 page");
    assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
    assert!(page.contains(reason), "{reason:?} not in {page}");
}

#[tokio::test]
async fn reserved_picks_are_refused_with_a_page_and_never_reach_the_homeserver() {
    let (hs, gate) = setup("").await;
    for name in ["admin", "adm1n", "support", "a.d.m.i.n"] {
        let answer = pick(&gate, format!("username={name}").as_bytes(), &[]).await;
        assert_page(&answer, 400, "User ID already taken.");
        assert!(answer
            .body
            .windows(28)
            .any(|w| w == b"This username cannot be used"));
    }
    let upper = pick(&gate, b"username=Alice&use_display_name=true", &[]).await;
    assert_page(
        &upper,
        400,
        "User ID may not contain upper-case characters.",
    );
    let grammar = pick(&gate, b"username=%3Cb%3E", &[]).await;
    assert_page(
        &grammar,
        400,
        "User ID can only contain characters a-z, 0-9, or &#39;=_-./+&#39;.",
    );
    hs.assert_saw_nothing("refused picks");
}

#[tokio::test]
async fn a_good_pick_is_forwarded_as_the_gates_own_form() {
    let (hs, gate) = setup("").await;
    let answer = send(
        Method::POST,
        &gate.url(&format!("{PICK}?username=admin")),
        &[
            (
                "content-type",
                "application/x-www-form-urlencoded; charset=UTF-8",
            ),
            ("cookie", COOKIE),
        ],
        &b"use_email=a%40example.org&extra=x&username=alice;use_avatar=false\
           &use_display_name=true&use_email=b+c%40example.org"[..],
    )
    .await;
    assert_eq!(answer.status, 302);
    assert_eq!(answer.headers["location"], "/_synapse/client/sso_register");
    assert_eq!(answer.headers["x-matrix-gatekeeper"], "allowed");
    let seen = hs.only_request();
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.target, PICK, "the client's query is not forwarded");
    assert_eq!(seen.header("content-type"), Some(FORM));
    assert_eq!(seen.header("cookie"), Some(COOKIE));
    assert_eq!(
        std::str::from_utf8(&seen.body).unwrap(),
        "username=alice&use_display_name=true&use_avatar=false\
         &use_email=a%40example.org&use_email=b%20c%40example.org"
    );
    assert_eq!(
        seen.header("content-length"),
        Some(seen.body.len().to_string().as_str())
    );
}

#[tokio::test]
async fn ambiguous_or_unreadable_picks_are_refused() {
    let (hs, gate) = setup("").await;
    let twice = pick(&gate, b"username=alice&username=admin", &[]).await;
    assert_page(
        &twice,
        400,
        "The username parameter is given 2 times; give it once.",
    );
    let hidden = pick(&gate, b"username=alice;%75sername=admin", &[]).await;
    assert_page(&hidden, 400, "given 2 times");
    let not_utf8 = pick(&gate, b"username=alice&use_email=%FF", &[]).await;
    assert_page(&not_utf8, 400, "not UTF-8");
    let missing = pick(&gate, b"use_display_name=true", &[]).await;
    assert_page(&missing, 400, "Missing username parameter.");
    let multipart = send(
        Method::POST,
        &gate.url(PICK),
        &[
            ("content-type", "multipart/form-data; boundary=b"),
            ("cookie", COOKIE),
        ],
        "--b\r\nContent-Disposition: form-data; name=\"username\"\r\n\r\nadmin\r\n--b--\r\n",
    )
    .await;
    assert_page(
        &multipart,
        400,
        "The form must be sent as application/x-www-form-urlencoded.",
    );
    hs.assert_saw_nothing("refused picks");
}

#[tokio::test]
async fn the_check_calls_refused_names_unavailable_and_forwards_good_ones_canonically() {
    let (hs, gate) = setup("").await;
    let refused = send(
        Method::GET,
        &gate.url(&format!("{CHECK}?username=adm1n")),
        &[("cookie", COOKIE)],
        "",
    )
    .await;
    assert_eq!(refused.status, 200);
    assert_eq!(refused.headers["content-type"], "application/json");
    assert_eq!(refused.headers["x-matrix-gatekeeper"], "refused");
    let json = refused.json();
    assert_eq!(json["available"], false, "{json}");
    assert_eq!(json["errcode"], "M_USER_IN_USE", "{json}");
    assert_eq!(json["error"], "User ID already taken.", "{json}");
    send(
        Method::GET,
        &gate.url(&format!("{CHECK}?username=a&username=b")),
        &[],
        "",
    )
    .await
    .assert_error(400, "M_INVALID_PARAM");
    hs.assert_saw_nothing("refused checks");
    let good = send(
        Method::GET,
        &gate.url(&format!("{CHECK}?username=%61lice&session=x")),
        &[("cookie", COOKIE)],
        "",
    )
    .await;
    assert_eq!(good.status, 200);
    let seen = hs.only_request();
    assert_eq!(seen.target, format!("{CHECK}?username=alice"));
    assert_eq!(seen.header("cookie"), Some(COOKIE));
}

#[tokio::test]
async fn picks_are_held_to_the_registration_limits_and_checks_to_availability() {
    let (hs, gate) = setup(
        "[rate_limit]\nregistrations_per_ip = { count = 1, period = \"1h\" }\n\
         availability_checks_per_ip = { count = 1, period = \"1m\" }\n",
    )
    .await;
    // Synapse refusing the pick (a bad session) gives the unit back.
    let failed = pick(&gate, b"username=alice", &[("x-test-status", "400")]).await;
    assert_eq!(failed.status, 400);
    assert_eq!(pick(&gate, b"username=alice", &[]).await.status, 302);
    let limited = pick(&gate, b"username=bob", &[]).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(limited.headers["x-matrix-gatekeeper"], "rate_limited");
    assert!(limited.headers.contains_key("retry-after"));
    assert_eq!(hs.requests().len(), 2);

    let check = gate.url(&format!("{CHECK}?username=carol"));
    assert_eq!(send(Method::GET, &check, &[], "").await.status, 200);
    let over = send(Method::GET, &check, &[], "").await;
    assert_eq!(over.status, 429);
    assert_eq!(over.errcode(), "M_LIMIT_EXCEEDED");
    assert_eq!(hs.requests().len(), 3);
}

#[tokio::test]
async fn a_pick_counts_toward_the_lockdown_which_then_refuses_picks() {
    let (hs, gate) =
        setup("[registration]\nlockdown = { count = 1, period = \"1h\", close_for = \"10m\" }\n")
            .await;
    assert_eq!(pick(&gate, b"username=alice", &[]).await.status, 302);
    let closed = pick(&gate, b"username=bob", &[]).await;
    assert_page(&closed, 403, "Registration is temporarily closed");
    assert_eq!(hs.requests().len(), 1);
}

#[tokio::test]
async fn denied_clients_and_closed_registration_get_the_page() {
    let (hs, gate) = setup("[client_ip]\ndeny = [\"127.0.0.0/8\"]\n").await;
    let denied = pick(&gate, b"username=alice", &[]).await;
    assert_page(
        &denied,
        403,
        "Registration is not available from your network.",
    );
    let check = send(
        Method::GET,
        &gate.url(&format!("{CHECK}?username=alice")),
        &[],
        "",
    )
    .await;
    check.assert_error(403, "M_FORBIDDEN");
    let (closed_hs, closed) = setup("[registration]\nenabled = false\n").await;
    let answer = pick(&closed, b"username=alice", &[]).await;
    assert_page(&answer, 403, "Registration has been disabled.");
    hs.assert_saw_nothing("denied client");
    closed_hs.assert_saw_nothing("registration disabled");
}
