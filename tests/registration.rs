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
