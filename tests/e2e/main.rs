//! End-to-end: the gate in front of a real Synapse, a real Dendrite (the
//! homeserver-generic scenarios of `scenarios/`, bridges and the username
//! corpus) and, when `MGK_E2E_CONDUIT` names a binary, a real Conduit (the
//! same scenarios and the username corpus), driven by a real client
//! (matrix-nio) and by raw requests. Every scenario checks what the
//! homeserver finally did by asking it directly, not only the gate's
//! answer.
//!
//! Run alone with `cargo test --test e2e`. The first run installs Synapse
//! and matrix-nio into `target/e2e-venv` (needs PyPI) and builds Dendrite
//! into `target/dendrite` (needs Go and the Go module proxy).

mod appservice;
#[path = "../common/mod.rs"]
mod common;
mod conduit;
mod corpus;
mod corpus_conduit;
mod corpus_dendrite;
mod corpus_homeserver;
mod dendrite;
mod dendrite_appservice;
mod dendrite_scenarios;
mod homeserver_process;
mod placement;
#[path = "../proxy_harness/mod.rs"]
mod proxy_harness;
mod scenarios;
mod spec_fuzz;
mod sso;
mod synapse;
mod wave;

use std::time::{Duration, Instant};

use common::{get, post_json, send, Answer, Gate, Listeners};
use http::Method;
use serde_json::json;
use synapse::{Synapse, SERVER_NAME};

const REGISTER: &str = "/_matrix/client/v3/register";

/// The password every scenario registers with.
const PASSWORD: &str = "e2e-password-1";

/// The gate in front of `synapse`, with extra gate TOML.
async fn gate_for(synapse: &Synapse, extra: &str) -> Gate {
    gate_for_upstream(&synapse.url(), extra).await
}

/// The gate in front of a homeserver that may not run yet (one that must
/// be told the gate's URL), with extra gate TOML.
async fn gate_for_upstream(upstream: &str, extra: &str) -> Gate {
    Gate::start(
        upstream,
        &format!("[homeserver]\nserver_name = \"{SERVER_NAME}\"\n{extra}"),
    )
    .await
}

/// Synapse's own answer to `/register/available` for a localpart.
async fn synapse_availability(synapse: &Synapse, localpart: &str) -> Answer {
    get(&format!(
        "{}/_matrix/client/v3/register/available?username={}",
        synapse.url(),
        query_escape(localpart)
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

/// Percent-encodes a query component (everything but unreserved bytes).
fn query_escape(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A password login directly on Synapse.
async fn direct_login(synapse: &Synapse, localpart: &str, password: &str) -> Answer {
    let body = json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": localpart},
        "password": password,
    });
    post_json(
        &format!("{}/_matrix/client/v3/login", synapse.url()),
        &body.to_string(),
    )
    .await
}

/// Whether Synapse lets this localpart log in with [`PASSWORD`]: works for
/// names Synapse's availability check cannot even judge (`al ice`, `é`).
async fn can_log_in(synapse: &Synapse, localpart: &str) -> bool {
    let answer = direct_login(synapse, localpart, PASSWORD).await;
    match answer.status.as_u16() {
        200 => true,
        403 => false,
        other => panic!(
            "unexpected login answer for {localpart:?}: {other} {:?}",
            answer.body
        ),
    }
}

/// The localpart of a full user ID.
fn localpart_of(user_id: &str) -> &str {
    user_id
        .trim_start_matches('@')
        .split(':')
        .next()
        .unwrap_or_default()
}

/// The UIA session of a `401` registration step.
fn uia_session(answer: &Answer) -> String {
    assert_eq!(answer.status, 401, "expected a UIA step: {:?}", answer.body);
    answer.json()["session"]
        .as_str()
        .expect("401 carries a session")
        .to_owned()
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
            r#"{{"username":"{username}","password":"{PASSWORD}","auth":{{"type":"m.login.dummy"}}}}"#
        ),
    )
    .await
}

/// matrix-nio registers `NioUser` with [`PASSWORD`] through the gate at
/// `base`, syncs and logs in again; fails unless it registered, logged in
/// and synced as `@niouser`.
pub(crate) async fn nio_registers_syncs_and_logs_in(base: &str, homeserver: &str) {
    let output = tokio::process::Command::new(synapse::python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/e2e/py/nio_register.py"
        ))
        .arg(base)
        .arg("NioUser")
        .arg(PASSWORD)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{homeserver}: nio failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let expected = format!("@niouser:{SERVER_NAME}");
    assert_eq!(result["registered"], expected.as_str());
    assert_eq!(result["logged_in"], expected.as_str());
    assert_eq!(result["synced"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_nio_registers_syncs_and_logs_in_through_the_gate() {
    let synapse = Synapse::start("").await;
    let gate = gate_for(&synapse, "").await;
    nio_registers_syncs_and_logs_in(&gate.url(""), "synapse").await;
    assert!(account_exists(&synapse, "niouser").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_uia_step_is_checked_and_synapse_registers_the_last_name_let_through() {
    let synapse = Synapse::start("").await;
    let gate = gate_for(&synapse, "").await;
    let register = gate.url(REGISTER);

    // Step 1 names a good name: Synapse's own 401 comes back with a session.
    let step1 = post_json(
        &register,
        &json!({"username": "stepone", "password": PASSWORD}).to_string(),
    )
    .await;
    let session = uia_session(&step1);
    assert!(step1.json()["flows"].is_array(), "{:?}", step1.body);

    // Step 2 switches to a reserved name: the gate refuses it as taken, and
    // neither name is registered.
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
    step2.assert_error(400, "M_USER_IN_USE");
    assert!(!account_exists(&synapse, "admin").await);
    assert!(!account_exists(&synapse, "stepone").await);

    // Step 3 carries only the session (no password: Synapse keeps the hash
    // from step 1): Synapse registers the name stored from step 1.
    let step3 = post_json(
        &register,
        &json!({"auth": {"type": "m.login.dummy", "session": session}}).to_string(),
    )
    .await;
    assert_eq!(step3.status, 200, "{:?}", step3.body);
    assert_eq!(step3.json()["user_id"], format!("@stepone:{SERVER_NAME}"));
    assert!(account_exists(&synapse, "stepone").await);
    assert!(can_log_in(&synapse, "stepone").await);
    assert!(!account_exists(&synapse, "admin").await);
    assert!(!can_log_in(&synapse, "admin").await);

    // A step that changes the name to another valid name registers that
    // name: Synapse's own behaviour, which the gate keeps (mapping the case).
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
    assert!(account_exists(&synapse, "secondname").await);
    assert!(can_log_in(&synapse, "secondname").await);
    assert!(!account_exists(&synapse, "firstname").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_get_a_bare_guest_account_when_allowed_and_nothing_when_denied() {
    let synapse = Synapse::start("").await;
    let allow = gate_for(&synapse, "[guest]\naccess = \"allow\"\n").await;
    let deny = gate_for(&synapse, "[guest]\naccess = \"deny\"\n").await;
    let body = json!({
        "username": "guestname",
        "password": PASSWORD,
        "device_id": "GUESTDEVICE",
        "refresh_token": true,
        "initial_device_display_name": "e2e guest",
    })
    .to_string();

    // Allowed: Synapse answers with a numeric guest, and none of the fields
    // a guest must not set took effect.
    let before = direct_guest_number(&synapse).await;
    let answer = post_json(&allow.url(&format!("{REGISTER}?kind=guest")), &body).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let json = answer.json();
    let user_id = json["user_id"].as_str().unwrap();
    let number: u64 = localpart_of(user_id)
        .parse()
        .unwrap_or_else(|_| panic!("guest user_id is numeric: {user_id}"));
    assert!(number > before, "{number} > {before}");
    assert!(json.get("refresh_token").is_none(), "{json}");
    assert!(json.get("expires_in_ms").is_none(), "{json}");
    assert!(json["device_id"].is_string(), "{json}");
    assert_ne!(json["device_id"], "GUESTDEVICE", "{json}");
    let token = json["access_token"].as_str().unwrap();
    let whoami = send(
        Method::GET,
        &format!("{}/_matrix/client/v3/account/whoami", synapse.url()),
        &[("authorization", &format!("Bearer {token}"))],
        "",
    )
    .await;
    assert_eq!(whoami.status, 200, "{:?}", whoami.body);
    assert_eq!(whoami.json()["user_id"], user_id);
    assert_eq!(whoami.json()["is_guest"], true, "{:?}", whoami.body);
    // The one field a guest may set was kept.
    let devices = send(
        Method::GET,
        &format!("{}/_matrix/client/v3/devices", synapse.url()),
        &[("authorization", &format!("Bearer {token}"))],
        "",
    )
    .await;
    assert_eq!(devices.status, 200, "{:?}", devices.body);
    assert_eq!(
        devices.json()["devices"][0]["display_name"],
        "e2e guest",
        "{:?}",
        devices.body
    );
    assert!(!account_exists(&synapse, "guestname").await);
    assert!(!can_log_in(&synapse, "guestname").await);

    // Denied: 403, and the guest counter shows nothing was created.
    let before = direct_guest_number(&synapse).await;
    let answer = post_json(&deny.url(&format!("{REGISTER}?kind=guest")), &body).await;
    answer.assert_error(403, "M_FORBIDDEN");
    let after = direct_guest_number(&synapse).await;
    assert_eq!(after, before + 1, "a guest was created through the gate");
    assert!(!account_exists(&synapse, "guestname").await);
}

/// Synapse upgrades a guest to a full account when the registration names
/// the guest's own numeric localpart and carries its `guest_access_token`.
/// The gate lets that all-digit name through only with `[homeserver]
/// guest_upgrades = true` and guests allowed; by default it refuses it,
/// and the guest stays a guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_upgrades_through_the_gate_only_where_upgrades_are_declared() {
    let synapse = Synapse::start("").await;
    // Its client listener has no federation API: the gate learns what it
    // is from Synapse's own server_version.
    let url: http::Uri = synapse.url().parse().unwrap();
    let software = matrix_gatekeeper::upstream::identify::identify(&url, Duration::from_secs(5))
        .await
        .expect("Synapse says what it is");
    assert_eq!(software.name, "Synapse");
    assert!(software.upgrades_guests());
    // `1.163.2`, with a git suffix when Synapse finds itself in a checkout.
    let pinned = synapse::PACKAGES[0].split("==").nth(1).unwrap();
    assert!(software.version.starts_with(pinned), "{software:?}");
    let guests = "[guest]\naccess = \"allow\"\n";
    let upgrading = gate_for(&synapse, &format!("guest_upgrades = true\n{guests}")).await;
    let default = gate_for(&synapse, guests).await;
    let upgrade = |gate: String, number: String, token: String| async move {
        post_json(
            &format!("{gate}{REGISTER}"),
            &json!({
                "username": number,
                "password": PASSWORD,
                "guest_access_token": token,
                "auth": {"type": "m.login.dummy"},
            })
            .to_string(),
        )
        .await
    };
    let is_guest = |token: String| {
        let url = format!("{}/_matrix/client/v3/account/whoami", synapse.url());
        async move {
            let answer = send(
                Method::GET,
                &url,
                &[("authorization", &format!("Bearer {token}"))],
                "",
            )
            .await;
            assert_eq!(answer.status, 200, "{:?}", answer.body);
            answer.json()["is_guest"] == true
        }
    };
    for (gate, upgrades) in [(&default, false), (&upgrading, true)] {
        let guest = post_json(&gate.url(&format!("{REGISTER}?kind=guest")), "{}").await;
        assert_eq!(guest.status, 200, "{:?}", guest.body);
        let json = guest.json();
        let user_id = json["user_id"].as_str().unwrap().to_owned();
        let token = json["access_token"].as_str().unwrap().to_owned();
        let number = localpart_of(&user_id).to_owned();
        assert!(is_guest(token.clone()).await);
        let answer = upgrade(gate.url(""), number.clone(), token.clone()).await;
        if upgrades {
            assert_eq!(answer.status, 200, "{:?}", answer.body);
            assert_eq!(answer.json()["user_id"], user_id.as_str());
            let full = answer.json()["access_token"].as_str().unwrap().to_owned();
            assert!(!is_guest(full).await, "{user_id} is still a guest");
            assert!(can_log_in(&synapse, &number).await);
        } else {
            answer.assert_error(400, "M_INVALID_USERNAME");
            assert!(is_guest(token).await, "{user_id} was upgraded");
            assert!(!can_log_in(&synapse, &number).await);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_and_reserved_names_never_become_accounts() {
    let synapse = Synapse::start("").await;
    let gate = gate_for(&synapse, "").await;
    let long = "a".repeat(250);
    // (requested, errcode); Synapse is then asked about the lower-cased name.
    let refused: &[(&str, &str)] = &[
        ("admin", "M_USER_IN_USE"),
        ("ADMIN", "M_USER_IN_USE"),
        ("adm1n", "M_USER_IN_USE"),
        ("adrnin", "M_USER_IN_USE"),
        ("a.d.m.i.n", "M_USER_IN_USE"),
        ("root", "M_USER_IN_USE"),
        ("Support", "M_USER_IN_USE"),
        ("_bridge", "M_INVALID_USERNAME"),
        ("12345", "M_INVALID_USERNAME"),
        ("al ice", "M_INVALID_USERNAME"),
        ("é", "M_INVALID_USERNAME"),
        ("\u{0130}van", "M_INVALID_USERNAME"),
        (&long, "M_INVALID_USERNAME"),
    ];
    for (requested, errcode) in refused {
        let answer = register_dummy(&gate.url(""), requested, &[]).await;
        assert_eq!(answer.status, 400, "{requested:?}: {:?}", answer.body);
        assert_eq!(answer.errcode(), *errcode, "{requested:?}");
        let mapped = requested.to_lowercase();
        assert!(
            !can_log_in(&synapse, &mapped).await,
            "{requested:?} became an account"
        );
        // Names in the grammar can also be looked up by Synapse itself.
        if *errcode == "M_USER_IN_USE" {
            assert!(!account_exists(&synapse, &mapped).await, "{requested:?}");
        }
    }

    // KELVIN SIGN lower-cases to an ASCII k, exactly as Synapse maps it.
    let kelvin = register_dummy(&gate.url(""), "K\u{212A}elvin", &[]).await;
    assert_eq!(kelvin.status, 200, "{:?}", kelvin.body);
    assert_eq!(kelvin.json()["user_id"], format!("@kkelvin:{SERVER_NAME}"));
    assert!(account_exists(&synapse, "kkelvin").await);
    assert!(can_log_in(&synapse, "kkelvin").await);

    // Duplicate keys: Synapse would keep the last value, other parsers the
    // first; the gate refuses, and neither name exists.
    for body in [
        format!(
            r#"{{"username":"okname","username":"admin","password":"{PASSWORD}","auth":{{"type":"m.login.dummy"}}}}"#
        ),
        format!(
            r#"{{"username":"admin","username":"okname","password":"{PASSWORD}","auth":{{"type":"m.login.dummy"}}}}"#
        ),
    ] {
        let answer = post_json(&gate.url(REGISTER), &body).await;
        answer.assert_error(400, "M_BAD_JSON");
    }
    assert!(!account_exists(&synapse, "okname").await);
    assert!(!account_exists(&synapse, "admin").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_kind_queries_create_no_guest_although_synapse_alone_would() {
    let synapse = Synapse::start("").await;
    let gate = gate_for(&synapse, "[guest]\naccess = \"deny\"\n").await;
    // (query, gate's answer, whether Synapse alone registers a guest)
    let tricks: &[(&str, (u16, &str), bool)] = &[
        ("kind=user&kind=guest", (400, "M_UNRECOGNIZED"), false),
        ("kind=guest&kind=user", (400, "M_UNRECOGNIZED"), true),
        ("x=1;kind=guest", (403, "M_FORBIDDEN"), true),
        ("kind=%67uest", (403, "M_FORBIDDEN"), true),
    ];
    let before = direct_guest_number(&synapse).await;
    for (query, (status, errcode), _) in tricks {
        let answer = post_json(&gate.url(&format!("{REGISTER}?{query}")), "{}").await;
        assert_eq!(answer.status, *status, "{query}: {:?}", answer.body);
        assert_eq!(answer.errcode(), *errcode, "{query}");
    }
    let after = direct_guest_number(&synapse).await;
    assert_eq!(after, before + 1, "a guest was created through the gate");

    // Why the gate matters: Synapse on its own reads the first `kind`,
    // splits on `;` and decodes escapes, so it registers guests here.
    for (query, _, synapse_makes_a_guest) in tricks {
        let answer = post_json(&format!("{}{REGISTER}?{query}", synapse.url()), "{}").await;
        if *synapse_makes_a_guest {
            assert_eq!(answer.status, 200, "{query}: {:?}", answer.body);
            let user_id = answer.json()["user_id"].as_str().unwrap().to_owned();
            let number: u64 = localpart_of(&user_id)
                .parse()
                .unwrap_or_else(|_| panic!("{query}: not a guest: {user_id}"));
            assert!(number > after, "{query}: {number} > {after}");
        } else {
            // A user registration: Synapse's first UIA step.
            uia_session(&answer);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_stops_the_registration_over_its_limit_and_synapse_has_only_the_others() {
    let synapse = Synapse::start("").await;
    let gate = gate_for(
        &synapse,
        "[rate_limit]\nregistrations_per_ip = { count = 2, period = \"1h\" }\n",
    )
    .await;
    for name in ["limited1", "limited2"] {
        let answer = register_dummy(&gate.url(""), name, &[]).await;
        assert_eq!(answer.status, 200, "{name}: {:?}", answer.body);
    }
    // The third, and a fourth that claims another address, are refused.
    for (name, headers) in [
        ("limited3", &[][..]),
        ("limited4", &[("x-forwarded-for", "198.51.100.7")][..]),
    ] {
        let answer = register_dummy(&gate.url(""), name, headers).await;
        answer.assert_error(429, "M_LIMIT_EXCEEDED");
        let retry_after_ms = answer.json()["retry_after_ms"].as_u64().unwrap();
        assert!(retry_after_ms > 0, "{:?}", answer.body);
        let retry_after: u64 = answer.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(retry_after, retry_after_ms.div_ceil(1000), "{name}");
    }
    assert!(account_exists(&synapse, "limited1").await);
    assert!(account_exists(&synapse, "limited2").await);
    assert!(!account_exists(&synapse, "limited3").await);
    assert!(!account_exists(&synapse, "limited4").await);
}

/// Synapse finishes a registration whose client hung up. Slow password
/// hashing keeps it at work after the client has left; the gate still
/// waits for its answer and counts the account: the decision metric, and a
/// lockdown of one registration that then closes registration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_whose_client_hangs_up_is_counted_when_synapse_completes_it() {
    let synapse = Synapse::start("bcrypt_rounds: 14").await;
    let config = matrix_gatekeeper::Config::from_toml(&format!(
        "[upstream]\nurl = \"{}\"\n[homeserver]\nserver_name = \"{SERVER_NAME}\"\n\
         [registration]\nlockdown = {{ count = 1, period = \"1h\", close_for = \"1h\" }}\n",
        synapse.url()
    ))
    .unwrap();
    let gate = Gate::start_full(config, true, None).await;
    let body = format!(
        r#"{{"username":"hungup","password":"{PASSWORD}","auth":{{"type":"m.login.dummy"}}}}"#
    );
    let mut stream = tokio::net::TcpStream::connect(gate.addr).await.unwrap();
    let request = format!(
        "POST {REGISTER} HTTP/1.1\r\nHost: gate\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .unwrap();
    // The request is forwarded at once; Synapse hashes for about a second.
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(stream);
    let started = Instant::now();
    while !account_exists(&synapse, "hungup").await {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "Synapse did not finish the registration"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let counted =
        "gatekeeper_decisions_total{route=\"register\",outcome=\"allowed\",rule=\"\"} 1\n";
    let started = Instant::now();
    while !gate.metrics().await.contains(counted) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the completed registration was not counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    register_dummy(&gate.url(""), "afterwards", &[])
        .await
        .assert_error(403, "M_FORBIDDEN");
    assert!(!account_exists(&synapse, "afterwards").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_x_forwarded_for_resets_synapse_limiter_directly_but_not_through_the_gate() {
    // Two registrations per address, then one every 1000 s.
    let strict = "rc_registration: {per_second: 0.001, burst_count: 2}";
    let (direct, behind) = tokio::join!(Synapse::start(strict), Synapse::start(strict));
    let addresses = ["203.0.113.1", "203.0.113.2", "203.0.113.3"];

    // The hole: Synapse keys its limiter on the leftmost X-Forwarded-For
    // entry, so a client that writes it gets fresh budget every time.
    for (i, address) in addresses.iter().enumerate() {
        let name = format!("direct{i}");
        let answer = register_dummy(&direct.url(), &name, &[("x-forwarded-for", address)]).await;
        assert_eq!(answer.status, 200, "{name}: {:?}", answer.body);
        assert!(account_exists(&direct, &name).await);
    }

    // Through a gate without limits of its own: the gate replaces the header
    // with the real peer, so Synapse's own limiter refuses the third.
    let gate = gate_for(&behind, "").await;
    for (i, address) in addresses.iter().enumerate() {
        let name = format!("gated{i}");
        let answer = register_dummy(&gate.url(""), &name, &[("x-forwarded-for", address)]).await;
        if i < 2 {
            assert_eq!(answer.status, 200, "{name}: {:?}", answer.body);
            assert!(account_exists(&behind, &name).await);
        } else {
            assert_eq!(answer.status, 429, "{name}: {:?}", answer.body);
            let json = answer.json();
            assert_eq!(json["errcode"], "M_LIMIT_EXCEEDED", "{json}");
            // Synapse's refill of one unit per 1000 s: this 429 is Synapse's,
            // not the gate's (which has no limits here).
            let retry_after_ms = json["retry_after_ms"].as_u64().unwrap();
            assert!((900_000..=1_000_000).contains(&retry_after_ms), "{json}");
            assert!(!account_exists(&behind, &name).await);
        }
    }
}

/// `n` bytes that are not UTF-8 (a xorshift stream with `0xFF` sprinkled in).
fn binary_blob(n: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.push(if i % 1024 == 0 { 0xFF } else { state as u8 });
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_and_sync_long_polls_pass_through_unchanged() {
    let synapse = Synapse::start("").await;
    let gate = gate_for(&synapse, "").await;
    let registered = register_dummy(&gate.url(""), "mediauser", &[]).await;
    assert_eq!(registered.status, 200, "{:?}", registered.body);
    let token = registered.json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let bearer = format!("Bearer {token}");

    // Upload 3 MiB of binary through the gate.
    let blob = binary_blob(3 * 1024 * 1024);
    assert!(std::str::from_utf8(&blob).is_err());
    let upload = send(
        Method::POST,
        &gate.url("/_matrix/media/v3/upload?filename=blob.bin"),
        &[
            ("authorization", &bearer),
            ("content-type", "application/octet-stream"),
        ],
        blob.clone(),
    )
    .await;
    assert_eq!(upload.status, 200, "{:?}", upload.body);
    let content_uri = upload.json()["content_uri"].as_str().unwrap().to_owned();
    let media = content_uri
        .strip_prefix("mxc://")
        .unwrap_or_else(|| panic!("not an mxc URI: {content_uri}"));
    assert!(
        media.starts_with(&format!("{SERVER_NAME}/")),
        "{content_uri}"
    );

    // Authenticated download, through the gate and directly: the same bytes.
    let download = |base: String| {
        let bearer = bearer.clone();
        async move {
            send(
                Method::GET,
                &format!("{base}/_matrix/client/v1/media/download/{media}"),
                &[("authorization", &bearer)],
                "",
            )
            .await
        }
    };
    let via_gate = download(gate.url("")).await;
    let direct = download(synapse.url()).await;
    assert_eq!(via_gate.status, 200);
    assert_eq!(direct.status, 200);
    assert!(via_gate.body == blob, "download through the gate differs");
    assert!(direct.body == blob, "direct download differs");
    // The legacy unauthenticated route: the gate answers exactly as Synapse
    // does (Synapse 1.163 freezes it for new media).
    let legacy = format!("/_matrix/media/v3/download/{media}");
    let via_gate = get(&gate.url(&legacy)).await;
    let direct = get(&format!("{}{legacy}", synapse.url())).await;
    assert_eq!(via_gate.status, direct.status);
    if direct.status == 200 {
        assert!(direct.body == blob && via_gate.body == blob);
    }

    // A long-poll: an incremental sync waits for its timeout through the
    // gate as it does directly.
    let sync = |base: String, query: String| {
        let bearer = bearer.clone();
        async move {
            let started = Instant::now();
            let answer = send(
                Method::GET,
                &format!("{base}/_matrix/client/v3/sync?{query}"),
                &[("authorization", &bearer)],
                "",
            )
            .await;
            (answer, started.elapsed())
        }
    };
    let (initial, _) = sync(gate.url(""), "timeout=0".into()).await;
    assert_eq!(initial.status, 200, "{:?}", initial.body);
    let since = initial.json()["next_batch"].as_str().unwrap().to_owned();
    let query = format!("timeout=2000&since={}", query_escape(&since));
    let (direct, direct_took) = sync(synapse.url(), query.clone()).await;
    let (via_gate, gate_took) = sync(gate.url(""), query).await;
    assert_eq!(direct.status, 200, "{:?}", direct.body);
    assert_eq!(via_gate.status, 200, "{:?}", via_gate.body);
    assert!(via_gate.json()["next_batch"].is_string());
    assert!(
        direct_took >= Duration::from_millis(1500),
        "{direct_took:?}"
    );
    assert!(gate_took >= Duration::from_millis(1500), "{gate_took:?}");
    assert!(
        gate_took <= direct_took + Duration::from_secs(1),
        "through the gate {gate_took:?}, directly {direct_took:?}"
    );
}
