//! `matrix-gatekeeper probe` against the real gate in front of a recording
//! stand-in homeserver: through the gate every spelling is answered by the
//! gate (enforce and shadow mode, rate limits included); through a front
//! that sends some spellings around the gate exactly those are named; the
//! homeserver reached directly receives nothing that could register; the
//! marker header is on guarded answers only; and a homeserver that delegates
//! registration to an OAuth 2.0 server (Matrix Authentication Service) is
//! named with a warning.

mod common;

use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use common::{get, post_json, raw_exchange, FakeHomeserver, FixedAnswer, Gate, Recorded};
use matrix_gatekeeper::probe::{
    self, spellings, AnsweredBy, BaseUrl, Options, Report, Variant, EXIT_CANNOT_RUN, EXIT_GUARDED,
    EXIT_NOT_GUARDED, ROUTES, VARIANTS,
};
use regex::Regex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_matrix-gatekeeper");
const MARKER: &str = "x-matrix-gatekeeper";

async fn probe_urls(urls: &[String]) -> Report {
    let urls: Vec<BaseUrl> = urls
        .iter()
        .map(|url| BaseUrl::parse(url).expect("test URLs are valid"))
        .collect();
    probe::run(&urls, &Options::default()).await
}

fn probes_per_url() -> usize {
    ROUTES.len() * VARIANTS.len()
}

/// Where a homeserver publishes its OAuth 2.0 server's metadata: the stable
/// path, and the one servers used before it was specified.
const AUTH_METADATA: &str = "/_matrix/client/v1/auth_metadata";
const AUTH_METADATA_UNSTABLE: &str = "/_matrix/client/unstable/org.matrix.msc2965/auth_metadata";

/// A homeserver without OAuth 2.0 delegation answers both paths this way.
const NOT_DELEGATED: &str = r#"{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}"#;

/// The metadata of a Matrix Authentication Service at auth.example.org, as
/// a homeserver that delegates to it serves it.
const MAS_METADATA: &str = r#"{"issuer":"https://auth.example.org/",
  "authorization_endpoint":"https://auth.example.org/authorize",
  "token_endpoint":"https://auth.example.org/oauth2/token",
  "registration_endpoint":"https://auth.example.org/oauth2/registration",
  "revocation_endpoint":"https://auth.example.org/oauth2/revoke",
  "account_management_uri":"https://auth.example.org/account/",
  "response_types_supported":["code"],"response_modes_supported":["query","fragment"],
  "grant_types_supported":["authorization_code","refresh_token"],
  "code_challenge_methods_supported":["S256"],"prompt_values_supported":["create"]}"#;

/// What a homeserver received besides the `auth_metadata` reads, and the
/// paths of those reads in the order received (each a bodyless `GET`).
fn registration_probes_and_metadata_reads(hs: &FakeHomeserver) -> (Vec<Recorded>, Vec<String>) {
    let (reads, probes): (Vec<Recorded>, Vec<Recorded>) = hs
        .requests()
        .into_iter()
        .partition(|r| r.target == AUTH_METADATA || r.target == AUTH_METADATA_UNSTABLE);
    for read in &reads {
        assert_eq!(read.method, "GET", "{read:?}");
        assert!(read.body.is_empty(), "{read:?}");
    }
    (probes, reads.into_iter().map(|r| r.target).collect())
}

/// A front proxy with too narrow a rule, like a regex location that only
/// knows the canonical spellings: a request whose raw target starts like a
/// canonical registration path goes to the gate, everything else straight
/// to the homeserver. Bytes are relayed untouched both ways.
async fn narrow_front(gate: SocketAddr, homeserver: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(2).any(|w| w == b"\r\n") {
                    match client.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&head).into_owned();
                let target = line.split(' ').nth(1).unwrap_or("");
                let destination = if goes_to_gate(target) {
                    gate
                } else {
                    homeserver
                };
                let mut upstream = TcpStream::connect(destination).await.unwrap();
                upstream.write_all(&head).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    addr
}

/// The narrow front's rule.
fn goes_to_gate(target: &str) -> bool {
    Regex::new(
        r"^/((_matrix/client/(r0|v1|v3|unstable)|_synapse/admin/v1)/register|_synapse/client/pick_username)",
    )
        .unwrap()
        .is_match(target)
}

/// The variants the narrow front sends around the gate.
const BYPASSING: [Variant; 9] = [
    Variant::DoubleSlashes,
    Variant::EscapedSlashUpper,
    Variant::EscapedSlashLower,
    Variant::EverySlashEscaped,
    Variant::EscapedLetter,
    Variant::DoubleEscapedLetter,
    Variant::UpperCase,
    Variant::DotSegments,
    Variant::EscapedDotSegment,
];

/// Asserts that nothing a homeserver received could register, send a
/// message or consume a token.
fn assert_harmless(seen: &[Recorded]) {
    assert!(!seen.is_empty());
    for request in seen {
        let target = &request.target;
        let body = String::from_utf8_lossy(&request.body);
        assert!(!target.contains("guest"), "{target}");
        assert!(!body.contains("auth"), "{target}: {body}");
        match request.method.as_str() {
            "POST" => {
                let object: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_slice(&request.body).expect("JSON object bodies");
                if object.is_empty() {
                    // requestToken: no address, no secret.
                    assert!(
                        target.to_ascii_lowercase().contains("requesttoken"),
                        "{target}"
                    );
                } else {
                    // register: the username given twice, nothing else.
                    assert_eq!(object.keys().collect::<Vec<_>>(), ["username"], "{body}");
                    assert_eq!(body.matches("\"username\"").count(), 2, "{body}");
                }
            }
            "GET" => {
                assert!(request.body.is_empty(), "{target}");
                let query = target.split_once('?').map_or("", |(_, q)| q);
                if query.contains("token=") {
                    assert_eq!(query, "token=probe&token=probe", "{target}");
                }
                if query.contains("username=") {
                    assert_eq!(query, "username=probe&username=probe", "{target}");
                }
            }
            other => panic!("unexpected method {other} for {target}"),
        }
    }
}

#[tokio::test]
async fn through_the_gate_every_spelling_is_answered_by_the_gate() {
    let hs = FakeHomeserver::start().await;
    // Tight limits: later probes are answered 429 by the gate, which still
    // counts as guarded.
    let gate = Gate::start(
        &hs.url(),
        "[rate_limit]\nattempts_per_ip = { count = 2, period = \"1h\" }\n\
         token_requests_per_ip = { count = 2, period = \"1h\" }\n",
    )
    .await;
    let report = probe_urls(&[gate.url("")]).await;
    assert_eq!(report.probes.len(), probes_per_url());
    for result in &report.probes {
        assert_eq!(result.answered_by, AnsweredBy::Gate, "{result:?}");
    }
    let markers: Vec<&str> = report
        .probes
        .iter()
        .filter_map(|p| p.marker.as_deref())
        .collect();
    assert!(markers.contains(&"refused"), "{markers:?}");
    assert!(
        report
            .probes
            .iter()
            .any(|p| p.status == Some(429) && p.marker.as_deref() == Some("rate_limited")),
        "the limits were reached"
    );
    assert_eq!(report.exit_status(), EXIT_GUARDED);
    // The gate refuses every probe: the homeserver saw none of them, only
    // the read of its OAuth 2.0 metadata, which the gate passes through.
    let (probes, reads) = registration_probes_and_metadata_reads(&hs);
    assert!(probes.is_empty(), "{probes:?}");
    assert_eq!(reads, [AUTH_METADATA]);
    let text = report.to_string();
    assert!(
        text.contains("208 probes at 1 URL(s): 208 answered by the gate"),
        "{text}"
    );
    assert!(!text.contains("NOT GUARDED"), "{text}");
    gate.shutdown().await;
}

#[tokio::test]
async fn a_shadow_mode_gate_still_answers_every_spelling() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), "[registration]\nmode = \"shadow\"\n").await;
    let report = probe_urls(&[gate.url("")]).await;
    assert_eq!(report.exit_status(), EXIT_GUARDED, "{report}");
    for result in &report.probes {
        assert_eq!(result.answered_by, AnsweredBy::Gate, "{result:?}");
        // Forwarded as sent: the homeserver's answer, marked.
        assert_eq!(result.marker.as_deref(), Some("would_refuse"), "{result:?}");
        assert_eq!(result.status, Some(200), "{result:?}");
    }
    let (seen, reads) = registration_probes_and_metadata_reads(&hs);
    assert_eq!(seen.len(), probes_per_url());
    assert_harmless(&seen);
    assert_eq!(reads, [AUTH_METADATA]);
    gate.shutdown().await;
}

#[tokio::test]
async fn spellings_that_walk_around_the_gate_are_named() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), "").await;
    let front = narrow_front(gate.addr, hs.addr).await;
    let report = probe_urls(&[format!("http://{front}")]).await;
    assert_eq!(report.exit_status(), EXIT_NOT_GUARDED);

    let mut named: Vec<(String, String)> = report
        .not_guarded()
        .map(|p| (p.route.clone(), p.spelling.clone()))
        .collect();
    named.sort();
    let mut expected: Vec<(String, String)> = ROUTES
        .iter()
        .flat_map(|route| {
            BYPASSING.iter().map(|variant| {
                (
                    route.canonical_path().into_owned(),
                    variant.name().to_owned(),
                )
            })
        })
        .collect();
    expected.sort();
    assert_eq!(named, expected);
    for result in &report.probes {
        assert_ne!(result.answered_by, AnsweredBy::Nothing, "{result:?}");
    }

    // The table names each of them, with the route and the spelling.
    let text = report.to_string();
    assert!(
        text.contains("NOT GUARDED: 144 spelling(s) reached something other than the gate"),
        "{text}"
    );
    assert!(text.contains("  v3/register (%2F) at http://"), "{text}");
    assert!(
        text.contains("  _synapse/admin/v1/register (upper case) at http://"),
        "{text}"
    );

    // What reached the homeserver is exactly what walked around the gate,
    // and none of it could register.
    let (seen, reads) = registration_probes_and_metadata_reads(&hs);
    assert_eq!(seen.len(), expected.len());
    assert_harmless(&seen);
    assert_eq!(reads, [AUTH_METADATA]);
    gate.shutdown().await;
}

#[tokio::test]
async fn probes_sent_straight_to_a_homeserver_are_harmless() {
    let hs = FakeHomeserver::start().await;
    let report = probe_urls(&[hs.url()]).await;
    assert_eq!(report.exit_status(), EXIT_NOT_GUARDED);
    assert_eq!(report.not_guarded().count(), probes_per_url());
    let (seen, reads) = registration_probes_and_metadata_reads(&hs);
    assert_eq!(seen.len(), probes_per_url());
    assert_harmless(&seen);
    assert_eq!(reads, [AUTH_METADATA]);
    // Every spelling went on the wire as written, dot segments and escapes
    // included.
    let targets: Vec<&str> = seen.iter().map(|r| r.target.as_str()).collect();
    for spelling in spellings() {
        assert!(
            targets.contains(&spelling.target.as_str()),
            "{}",
            spelling.target
        );
    }
}

#[tokio::test]
async fn nothing_listening_is_a_probe_that_could_not_run() {
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let report = probe_urls(&[format!("http://{closed}")]).await;
    assert_eq!(report.exit_status(), EXIT_CANNOT_RUN);
    assert_eq!(report.summary().nothing, probes_per_url());
    let text = report.to_string();
    assert!(
        text.contains(&format!("NOTHING ANSWERED at http://{closed}")),
        "{text}"
    );

    // A server that accepts and never answers, and one that answers
    // something that is not HTTP: no hang, no answer counted.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let garbage = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let garbage_addr = garbage.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    tokio::spawn(async move {
        // Held open after the greeting, so the probe reads it rather than a
        // reset.
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = garbage.accept().await {
            let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await;
            held.push(stream);
        }
    });
    let urls = [
        BaseUrl::parse(&format!("http://{silent_addr}")).unwrap(),
        BaseUrl::parse(&format!("http://{garbage_addr}")).unwrap(),
    ];
    let options = Options {
        timeout: Duration::from_millis(100),
        ..Options::default()
    };
    let report = probe::run(&urls, &options).await;
    assert_eq!(report.exit_status(), EXIT_CANNOT_RUN);
    assert_eq!(report.unreachable().len(), 2);
    let text = report.to_string();
    assert!(text.contains("no answer within 100ms"), "{text}");
    assert!(text.contains("not an HTTP answer"), "{text}");

    // A second URL that answers does not hide the one that does not.
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), "").await;
    let report = probe_urls(&[gate.url(""), format!("http://{closed}")]).await;
    assert_eq!(report.exit_status(), EXIT_CANNOT_RUN);
    assert_eq!(report.unreachable(), [format!("http://{closed}")]);
    gate.shutdown().await;
}

#[tokio::test]
async fn the_marker_is_on_guarded_answers_and_never_on_pass_through() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(
        &hs.url(),
        "[rate_limit]\navailability_checks_per_ip = { count = 1, period = \"1h\" }\n",
    )
    .await;

    // The gate's own refusal.
    let refused = post_json(
        &gate.url("/_matrix/client/v3/register"),
        r#"{"username":"admin"}"#,
    )
    .await;
    assert_eq!(refused.status, 400);
    assert_eq!(refused.headers[MARKER], "refused");

    // A homeserver answer the gate forwarded.
    let allowed = post_json(
        &gate.url("/_matrix/client/v3/register"),
        r#"{"username":"alice"}"#,
    )
    .await;
    assert_eq!(allowed.status, 200);
    assert_eq!(allowed.headers[MARKER], "allowed");

    // A 429.
    let first = get(&gate.url("/_matrix/client/v3/register/available?username=bob")).await;
    assert_eq!(first.headers[MARKER], "allowed");
    let limited = get(&gate.url("/_matrix/client/v3/register/available?username=bob")).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.headers[MARKER], "rate_limited");

    // Pass-through, on the fast path (plain HTTP/1.1) and on the full
    // stack (HTTP/1.0): no marker.
    let passed = get(&gate.url("/_matrix/client/v3/sync?timeout=0")).await;
    assert_eq!(passed.status, 200);
    assert!(!passed.headers.contains_key(MARKER), "{:?}", passed.headers);
    let raw = raw_exchange(
        gate.addr,
        b"GET /_matrix/client/versions HTTP/1.0\r\nHost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(raw.starts_with("HTTP/1.0 200"), "{raw}");
    assert!(!raw.to_ascii_lowercase().contains(MARKER), "{raw}");
    let raw = raw_exchange(
        gate.addr,
        b"GET /_matrix/client/v3/register/available?username=carol HTTP/1.0\r\nHost: x\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        raw.to_ascii_lowercase()
            .contains("x-matrix-gatekeeper: rate_limited"),
        "{raw}"
    );
    gate.shutdown().await;
}

async fn run_binary(args: &[&str]) -> Output {
    tokio::process::Command::new(BIN)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect("the binary runs")
}

fn json_of(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[tokio::test]
async fn the_command_exits_with_the_verdict_and_speaks_json() {
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), "").await;

    let guarded = run_binary(&["probe", &gate.url(""), "--json", "--timeout", "5s"]).await;
    assert_eq!(guarded.status.code(), Some(i32::from(EXIT_GUARDED)));
    let json = json_of(&guarded);
    assert_eq!(json["summary"]["probes"], probes_per_url());
    assert_eq!(json["summary"]["gate"], probes_per_url());
    assert_eq!(json["exit_status"], 0);
    assert_eq!(json["not_guarded"], serde_json::json!([]));
    assert_eq!(json["probes"][0]["answered_by"], "gate");
    assert_eq!(json["probes"][0]["marker"], "refused");

    let front = narrow_front(gate.addr, hs.addr).await;
    let front_url = format!("http://{front}");
    let bypassed = run_binary(&["probe", &front_url, "--json"]).await;
    assert_eq!(bypassed.status.code(), Some(i32::from(EXIT_NOT_GUARDED)));
    let json = json_of(&bypassed);
    let named = json["not_guarded"].as_array().expect("a list");
    assert_eq!(named.len(), ROUTES.len() * BYPASSING.len());
    assert!(named.contains(&serde_json::json!(format!(
        "v3/register (%2F) at {front_url}"
    ))));
    let homeserver_rows = json["probes"]
        .as_array()
        .expect("a list")
        .iter()
        .filter(|p| p["answered_by"] == "homeserver")
        .count();
    assert_eq!(homeserver_rows, named.len());

    // The table names the spellings too.
    let table = run_binary(&["probe", &front_url]).await;
    assert_eq!(table.status.code(), Some(i32::from(EXIT_NOT_GUARDED)));
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("NOT GUARDED: 144 spelling(s)"), "{text}");
    assert!(
        text.contains("v3/register/available (%65 escape) at"),
        "{text}"
    );

    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let nothing = run_binary(&["probe", &format!("http://{closed}"), "--json"]).await;
    assert_eq!(nothing.status.code(), Some(i32::from(EXIT_CANNOT_RUN)));
    assert_eq!(json_of(&nothing)["exit_status"], 2);

    for (args, message) in [
        (
            vec!["probe", "ftp://example.org"],
            "only http:// and https://",
        ),
        (vec!["probe", "example.org"], "not a URL"),
        (
            vec!["probe", &front_url, "--ca-file", "no-such-ca.pem"],
            "--ca-file no-such-ca.pem",
        ),
        (
            vec!["probe", &front_url, "--ca-file", "Cargo.toml"],
            "no CERTIFICATE in it",
        ),
        (vec!["probe", &front_url, "--timeout", "soon"], "--timeout"),
        (vec!["probe", &front_url, "--timeout", "0s"], "more than 0"),
        (vec!["probe", &front_url, "--host", "a b"], "--host"),
    ] {
        let output = run_binary(&args).await;
        assert_eq!(
            output.status.code(),
            Some(i32::from(EXIT_CANNOT_RUN)),
            "{args:?}"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?}");
    }
    // Every probe of the guarded run was refused by the gate; only the
    // bypassing ones reached the homeserver.
    let (seen, reads) = registration_probes_and_metadata_reads(&hs);
    assert_harmless(&seen);
    // One read per run that reached the homeserver (the guarded run, the
    // bypassed run with --json, and the table).
    assert_eq!(reads, [AUTH_METADATA; 3]);
    gate.shutdown().await;
}

#[tokio::test]
async fn an_https_url_whose_handshake_fails_is_a_probe_that_could_not_run() {
    // The gate speaks plain HTTP: a TLS client gets no handshake there, and
    // the probe says so for that URL, promptly, rather than a verdict.
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(&hs.url(), "").await;
    let https_url = format!("https://{}", gate.addr);
    let report = probe_urls(&[https_url.clone(), gate.url("")]).await;
    assert_eq!(report.exit_status(), EXIT_CANNOT_RUN, "{report}");
    assert_eq!(report.unreachable(), [https_url.as_str()]);
    for result in report.probes.iter().filter(|p| p.base_url == https_url) {
        assert!(result.url.starts_with("https://"), "{result:?}");
        let error = result.error.as_deref().unwrap_or("");
        assert!(error.starts_with("TLS handshake: "), "{result:?}");
    }
    let text = report.to_string();
    assert!(
        text.contains(&format!("NOTHING ANSWERED at {https_url} (TLS handshake: ")),
        "{text}"
    );

    // The command: exit status 2 and the reason, at the URL as given.
    let output = run_binary(&["probe", &https_url, "--timeout", "5s"]).await;
    assert_eq!(output.status.code(), Some(i32::from(EXIT_CANNOT_RUN)));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(&format!("NOTHING ANSWERED at {https_url} (TLS handshake: ")),
        "{stdout}"
    );
    // Only the plain URL's run reached the homeserver, and only with the
    // metadata read.
    let (probes, reads) = registration_probes_and_metadata_reads(&hs);
    assert!(
        probes.is_empty(),
        "probes that never got past TLS: {probes:?}"
    );
    assert_eq!(reads, [AUTH_METADATA]);
    gate.shutdown().await;
}

/// The metadata answer of a homeserver that does not delegate, at `path`.
fn not_delegated_at(path: &'static str) -> FixedAnswer {
    FixedAnswer {
        path,
        status: 404,
        json: NOT_DELEGATED,
    }
}

/// Probes through a gate a homeserver that gives the `fixed` metadata
/// answers: the base URL, the report, its JSON, and the paths of the
/// metadata reads the homeserver received. Whatever the metadata says, the
/// verdict is the gate's (every spelling answered by it, none reaching the
/// homeserver).
async fn probe_through_a_gate_to(
    fixed: &[FixedAnswer],
) -> (String, Report, serde_json::Value, Vec<String>) {
    let hs = FakeHomeserver::start_answering(fixed).await;
    let gate = Gate::start(&hs.url(), "").await;
    let base = gate.url("");
    let report = probe_urls(std::slice::from_ref(&base)).await;
    assert_eq!(report.exit_status(), EXIT_GUARDED, "{report}");
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).expect("JSON");
    assert_eq!(json["exit_status"], 0);
    let (probes, reads) = registration_probes_and_metadata_reads(&hs);
    assert!(probes.is_empty(), "{probes:?}");
    gate.shutdown().await;
    (base, report, json, reads)
}

#[tokio::test]
async fn a_homeserver_that_delegates_registration_to_an_oauth_server_is_named_with_a_warning() {
    // A warning, not a verdict on the gate's placement (checked by the
    // helper): every spelling of /register is still answered by the gate.
    let (base, report, json, reads) = probe_through_a_gate_to(&[FixedAnswer {
        path: AUTH_METADATA,
        status: 200,
        json: MAS_METADATA,
    }])
    .await;
    let text = report.to_string();
    let warning = format!(
        "WARNING: registration at {base} is delegated to the OAuth 2.0 server \
         https://auth.example.org/ (Matrix Authentication Service or another): accounts are \
         made on its own pages (account management at https://auth.example.org/account/), not \
         through /register, and the gate does not guard them ({base}{AUTH_METADATA} answered 200)"
    );
    assert!(text.contains(&warning), "{text}");
    assert_eq!(json["warnings"], serde_json::json!([warning]));
    assert_eq!(
        json["delegation"],
        serde_json::json!([{
            "base_url": base,
            "url": format!("{base}{AUTH_METADATA}"),
            "status": 200,
            "outcome": "delegated",
            "issuer": "https://auth.example.org/",
            "account_management_uri": "https://auth.example.org/account/",
        }])
    );
    // The gate passed the read through; the stable path answered, so the
    // unstable one was not asked.
    assert_eq!(reads, [AUTH_METADATA]);

    // An older homeserver publishes the metadata under the unstable path
    // only: asked after the stable path's 404.
    let older = FakeHomeserver::start_answering(&[
        not_delegated_at(AUTH_METADATA),
        FixedAnswer {
            path: AUTH_METADATA_UNSTABLE,
            status: 200,
            json: r#"{"issuer":"https://auth.example.org/"}"#,
        },
    ])
    .await;
    let report = probe_urls(&[older.url()]).await;
    let text = report.to_string();
    assert!(
        text.contains(&format!(
            "WARNING: registration at {} is delegated to the OAuth 2.0 server \
             https://auth.example.org/ (Matrix Authentication Service or another): accounts are \
             made on its own pages, not through /register, and the gate does not guard them \
             ({}{AUTH_METADATA_UNSTABLE} answered 200)",
            older.url(),
            older.url()
        )),
        "{text}"
    );
    let (_, reads) = registration_probes_and_metadata_reads(&older);
    assert_eq!(reads, [AUTH_METADATA, AUTH_METADATA_UNSTABLE]);
}

#[tokio::test]
async fn a_homeserver_that_does_not_delegate_registration_gets_no_warning() {
    let (base, report, json, reads) = probe_through_a_gate_to(&[
        not_delegated_at(AUTH_METADATA),
        not_delegated_at(AUTH_METADATA_UNSTABLE),
    ])
    .await;
    let text = report.to_string();
    assert!(!text.contains("WARNING"), "{text}");
    assert!(
        text.contains(&format!(
            "registration at {base} is not delegated to an OAuth 2.0 server \
             ({base}{AUTH_METADATA_UNSTABLE} answered 404 M_UNRECOGNIZED)"
        )),
        "{text}"
    );
    assert_eq!(json["warnings"], serde_json::json!([]));
    assert_eq!(
        json["delegation"],
        serde_json::json!([{
            "base_url": base,
            "url": format!("{base}{AUTH_METADATA_UNSTABLE}"),
            "status": 404,
            "outcome": "not_delegated",
            "errcode": "M_UNRECOGNIZED",
        }])
    );
    // Both paths asked, stable first.
    assert_eq!(reads, [AUTH_METADATA, AUTH_METADATA_UNSTABLE]);
}
