//! Property tests over the request parsing and rewriting code: path
//! classification, query parsing, strict JSON, and the policy's canonical
//! output. No input panics, and whatever the gate forwards is canonical.

use http::Method;
use matrix_gatekeeper::config::Config;
use matrix_gatekeeper::gate::json::parse_object;
use matrix_gatekeeper::gate::policy::{AccountKind, BodyPlan, HeadDecision};
use matrix_gatekeeper::gate::query::Query;
use matrix_gatekeeper::gate::routes::{classify, normalize, ApiVersion, GuardedRoute};
use matrix_gatekeeper::gate::Policy;
use proptest::prelude::*;

fn policy() -> Policy {
    Policy::new(&Config::from_toml("[guest]\naccess = \"allow\"\n").unwrap())
}

/// Paths built from pieces that matter to the classifier.
fn path_strategy() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("_matrix".to_owned()),
        Just("client".to_owned()),
        Just("v3".to_owned()),
        Just("r0".to_owned()),
        Just("unstable".to_owned()),
        Just("register".to_owned()),
        Just("available".to_owned()),
        Just("email".to_owned()),
        Just("requestToken".to_owned()),
        Just("..".to_owned()),
        Just(".".to_owned()),
        Just("".to_owned()),
        Just("%2F".to_owned()),
        Just("%72egister".to_owned()),
        Just("%2572".to_owned()),
        Just("%".to_owned()),
        Just(";a=b".to_owned()),
        Just("\\".to_owned()),
        "[ -~]{0,6}",
        "\\PC{0,4}",
    ];
    prop::collection::vec(piece, 0..8).prop_map(|pieces| format!("/{}", pieces.join("/")))
}

fn route_strategy() -> impl Strategy<Value = GuardedRoute> {
    prop_oneof![
        Just(GuardedRoute::Register(ApiVersion::V3)),
        Just(GuardedRoute::Register(ApiVersion::R0)),
        Just(GuardedRoute::Available(ApiVersion::V3)),
        Just(GuardedRoute::TokenValidity(ApiVersion::V1)),
        Just(GuardedRoute::AdminRegister),
        Just(GuardedRoute::Unknown),
    ]
}

fn method_strategy() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::OPTIONS),
        Just(Method::DELETE),
    ]
}

/// JSON-ish bodies: valid objects, near-misses and raw bytes.
fn body_strategy() -> impl Strategy<Value = Vec<u8>> {
    let value = prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        "-?[0-9]{1,30}(\\.[0-9]{1,5})?([eE][+-]?[0-9]{1,4})?",
        "\"[ -~]{0,10}\"".prop_map(|s| s.replace('\\', "")),
        Just("\"\\u212Aelvin\"".to_owned()),
        Just("\"ADMIN\"".to_owned()),
        Just("{\"type\":\"m.login.dummy\"}".to_owned()),
        Just("[1,[2,{}]]".to_owned()),
    ];
    let key = prop_oneof![
        Just("username".to_owned()),
        Just("password".to_owned()),
        Just("auth".to_owned()),
        Just("initial_device_display_name".to_owned()),
        Just("guest_access_token".to_owned()),
        Just("us\\u0065rname".to_owned()),
        "[a-z_]{1,8}",
    ];
    let object = prop::collection::vec((key, value), 0..6).prop_map(|fields| {
        let inner: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        format!("{{{}}}", inner.join(",")).into_bytes()
    });
    prop_oneof![
        object,
        prop::collection::vec(any::<u8>(), 0..64),
        "\\PC{0,40}".prop_map(String::into_bytes),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn classification_never_panics_and_canonical_paths_are_stable(path in path_strategy()) {
        let route = classify(&path);
        let _ = normalize(&path);
        if let Some(route) = route {
            if route != GuardedRoute::Unknown {
                let canonical = route.canonical_path();
                prop_assert_eq!(classify(&canonical), Some(route));
                prop_assert!(canonical.parse::<http::Uri>().is_ok());
            }
        }
    }

    #[test]
    fn any_path_mentioning_register_after_decoding_is_guarded_or_clearly_elsewhere(
        prefix in "(/+|/\\./|/x/\\.\\./)",
        version in "(v3|V3|r0|unstable|v%33)",
        tail in "(|/|;p|/\\.|%2F)",
    ) {
        let path = format!("{prefix}_matrix/client/{version}/register{tail}");
        prop_assert!(classify(&path).is_some(), "{} passed through", path);
    }

    #[test]
    fn query_parsing_never_panics(raw in "\\PC{0,60}|[a-z=&;%+0-9]{0,60}") {
        let query = Query::parse(Some(&raw));
        let _ = query.single("kind");
        let _ = query.values("username").count();
    }

    #[test]
    fn strict_json_never_panics_and_accepts_only_objects(body in body_strategy()) {
        if let Ok(map) = parse_object(&body) {
            // Whatever is accepted re-serializes to JSON that parses to the same object.
            let again = serde_json::to_vec(&map).unwrap();
            let reparsed = parse_object(&again).unwrap();
            prop_assert_eq!(reparsed, map);
        }
    }

    #[test]
    fn the_policy_forwards_only_canonical_requests(
        method in method_strategy(),
        route in route_strategy(),
        query in "[a-z=&;%0-9]{0,30}",
        body in body_strategy(),
    ) {
        let policy = policy();
        let forward = match policy.head(&method, route, Some(&query)) {
            HeadDecision::Refuse(refusal) => {
                prop_assert!(refusal.error.status.is_client_error());
                None
            }
            HeadDecision::Forward(forward) => Some(forward),
            HeadDecision::ReadBody(plan) => match policy.body(plan, &body) {
                Ok(forward) => {
                    if let BodyPlan::Register(_, AccountKind::Guest) = plan {
                        let body = parse_object(forward.body.as_ref().unwrap()).unwrap();
                        prop_assert!(body.keys().all(|k| k == "initial_device_display_name"));
                    }
                    Some(forward)
                }
                Err(refusal) => {
                    prop_assert!(refusal.error.status.is_client_error());
                    None
                }
            },
        };
        if let Some(forward) = forward {
            let uri: http::Uri = forward.path_and_query.parse().unwrap();
            // The forwarded path is a canonical route, and the query is one the gate wrote.
            prop_assert_eq!(classify(uri.path()), Some(route));
            if let Some(q) = uri.query() {
                prop_assert!(
                    q == "kind=user" || q == "kind=guest" || q.starts_with("username=") || q.starts_with("token="),
                    "query {}", q
                );
            }
            if let Some(body) = &forward.body {
                let object = parse_object(body).expect("forwarded body is a strict JSON object");
                if let Some(name) = object.get("username") {
                    let name = name.as_str().expect("forwarded username is a string");
                    prop_assert!(name.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+')));
                }
            }
        }
    }
}
