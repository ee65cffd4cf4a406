//! Cost of one policy decision on a registration body: parse (strict JSON,
//! duplicate-key check), map the username, check it, re-serialize.
//! Target: under 2 µs. `cargo bench --bench policy`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use http::Method;
use matrix_gatekeeper::config::Config;
use matrix_gatekeeper::gate::policy::{AccountKind, BodyPlan, HeadDecision};
use matrix_gatekeeper::gate::routes::{classify, ApiVersion, GuardedRoute};
use matrix_gatekeeper::gate::Policy;

const ELEMENT_BODY: &[u8] = br#"{"username":"Alice.Example","password":"correct horse battery staple","auth":{"type":"m.login.dummy","session":"xyzABCdefGHIjkl"},"initial_device_display_name":"Element Web on Firefox","inhibit_login":false,"refresh_token":true}"#;

fn policy_decision(c: &mut Criterion) {
    let policy = Policy::new(
        &Config::from_toml("[username]\ndeny_patterns = [\"^spam\", \"viagra\"]\n").unwrap(),
    );
    let route = GuardedRoute::Register(ApiVersion::V3);
    let plan = BodyPlan::Register(route, AccountKind::User { explicit: false });

    c.bench_function(
        "policy: registration body (parse, map, check, re-serialize)",
        |b| b.iter(|| black_box(policy.body(plan, black_box(ELEMENT_BODY)).unwrap())),
    );
    c.bench_function("policy: head + body of POST /register", |b| {
        b.iter(|| {
            let HeadDecision::ReadBody(plan) = policy.head(&Method::POST, route, black_box(None))
            else {
                unreachable!()
            };
            black_box(policy.body(plan, black_box(ELEMENT_BODY)).unwrap())
        })
    });
    c.bench_function("policy parts: strict JSON parse", |b| {
        b.iter(|| {
            black_box(matrix_gatekeeper::gate::json::parse_object(black_box(ELEMENT_BODY)).unwrap())
        })
    });
    c.bench_function("policy parts: username check", |b| {
        b.iter(|| {
            black_box(
                policy
                    .username
                    .check(black_box("Alice.Example"), false)
                    .unwrap(),
            )
        })
    });
    c.bench_function("routes: classify a pass-through path", |b| {
        b.iter(|| {
            black_box(classify(black_box(
                "/_matrix/client/v3/rooms/!abc:example.org/send/m.room.message/txn1",
            )))
        })
    });
    c.bench_function("routes: classify an escaped path", |b| {
        b.iter(|| {
            black_box(classify(black_box(
                "/_matrix/client/v3/rooms/%21abc%3Aexample.org/messages",
            )))
        })
    });
}

criterion_group!(benches, policy_decision);
criterion_main!(benches);
