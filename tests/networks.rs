//! Networks through the real gate: ASN and country databases written by the
//! test (`common::mmdb`), the network rules, the per-network limits, the
//! audit line, the admin API, `explain`, reloads and corrupt databases.

mod common;

use common::Listeners;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::admin::{admin, reset_limits, token_file};
use common::mmdb::{asn_record, country_record, Writer};
use common::{eventually, send, Answer, Captured, FakeHomeserver, Gate};
use http::Method;
use matrix_gatekeeper::Config;

const REGISTER: &str = "/_matrix/client/v3/register";
const AVAILABLE: &str = "/_matrix/client/v3/register/available?username=alice";
const BIN: &str = env!("CARGO_BIN_EXE_matrix-gatekeeper");

/// A scratch directory of this test's own.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mgk-networks-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Hosting (AS64496: 198.51.100.0/24, 2001:db8:1::/48), a residential
/// network (AS64497: 203.0.113.0/24) and a university (AS64498:
/// 192.0.2.0/25); 192.0.2.128/25 belongs to no AS.
fn asn_db() -> Writer {
    let mut w = Writer::new("GeoLite2-ASN");
    w.insert("198.51.100.0/24", asn_record(64496, "Example Hosting"))
        .insert("2001:db8:1::/48", asn_record(64496, "Example Hosting"))
        .insert("203.0.113.0/24", asn_record(64497, "Example Residential"))
        .insert("192.0.2.0/25", asn_record(64498, "Example University"));
    w
}

/// Hosting in NL, residential in DE, the university in XX.
fn country_db() -> Writer {
    let mut w = Writer::new("GeoLite2-Country");
    w.insert("198.51.100.0/24", country_record("NL"))
        .insert("2001:db8:1::/48", country_record("NL"))
        .insert("203.0.113.0/24", country_record("DE"))
        .insert("192.0.2.0/24", country_record("XX"));
    w
}

fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// The gate's configuration in front of `hs` with the databases in `dir`.
fn config_text(hs: &FakeHomeserver, dir: &Path, extra: &str) -> String {
    let (asn, country) = (dir.join("asn.mmdb"), dir.join("country.mmdb"));
    if !asn.exists() {
        asn_db().write(&asn);
        country_db().write(&country);
    }
    format!(
        "[upstream]\nurl = \"{}\"\nresponse_timeout = \"10s\"\n\
         [client_ip]\ntrusted_proxies = [\"127.0.0.1\"]\n\
         [reputation]\nasn_database = {}\ncountry_database = {}\n{extra}",
        hs.url(),
        toml_path(&asn),
        toml_path(&country)
    )
}

/// A gate started from `dir/gate.toml` holding `text` with
/// `watch_config = true`: it reloads when the file or a file it reads
/// changes. The gate and the configuration file.
async fn start_watched(dir: &Path, text: &str) -> (Gate, PathBuf) {
    let config_file = dir.join("gate.toml");
    std::fs::write(
        &config_file,
        format!("[server]\nwatch_config = true\n{text}"),
    )
    .unwrap();
    let gate = Gate::start_full(
        Config::from_file(&config_file).unwrap(),
        true,
        Some(config_file.clone()),
    )
    .await;
    (gate, config_file)
}

/// A registration from `client` that the homeserver answers with `status`.
async fn register(gate: &impl Listeners, client: &str, status: u16) -> Answer {
    let status = status.to_string();
    send(
        Method::POST,
        &gate.url(REGISTER),
        &[
            ("content-type", "application/json"),
            ("x-forwarded-for", client),
            ("x-test-status", status.as_str()),
        ],
        r#"{"username":"someone"}"#,
    )
    .await
}

async fn available(gate: &impl Listeners, client: &str) -> Answer {
    send(
        Method::GET,
        &gate.url(AVAILABLE),
        &[("x-forwarded-for", client)],
        "",
    )
    .await
}

/// A registration and an availability check from `client` are refused by
/// the network rules.
async fn assert_refused_by_network(gate: &impl Listeners, client: &str) {
    for answer in [
        register(gate, client, 200).await,
        available(gate, client).await,
    ] {
        answer.assert_error(403, "M_FORBIDDEN");
        assert_eq!(
            answer.json()["error"],
            "Registration is not available from your network.",
            "{client}"
        );
    }
}

#[tokio::test]
async fn denied_networks_and_countries_are_refused_by_rule_and_audited() {
    let captured = Captured::text_global("matrix_gatekeeper::audit=info");
    let dir = scratch("rules");
    let hs = FakeHomeserver::start().await;
    let config = config_text(
        &hs,
        &dir,
        "deny_asns = [\"AS64496\"]\ndeny_countries = [\"XX\", \"de\"]\nallow_asns = [64498]\n",
    );
    let gate = Gate::start_full(Config::from_toml(&config).unwrap(), true, None).await;

    for client in [
        // Hosting, over IPv4, IPv4-mapped and IPv6: denied_asn.
        "198.51.100.7",
        "::ffff:198.51.100.8",
        "2001:db8:1:2::9",
        // Residential in DE, and an address of no AS in XX: denied_country.
        "203.0.113.5",
        "192.0.2.200",
    ] {
        assert_refused_by_network(&gate, client).await;
    }
    hs.assert_saw_nothing("refused networks");
    // Pass-through traffic from a refused network is not the gate's
    // business.
    let versions = send(
        Method::GET,
        &gate.url("/_matrix/client/versions"),
        &[("x-forwarded-for", "198.51.100.7")],
        "",
    )
    .await;
    assert_eq!(versions.status, 200);
    hs.clear();
    // The university is trusted in its denied country; an address no
    // database knows, and another AS, pass.
    for client in ["192.0.2.10", "100.64.0.1", "2001:db8:2::1"] {
        assert_eq!(register(&gate, client, 200).await.status, 200, "{client}");
    }
    assert_eq!(hs.requests().len(), 3);

    let metrics = gate.metrics().await;
    for line in [
        "gatekeeper_decisions_total{route=\"register\",outcome=\"refused\",rule=\"denied_asn\"} 3",
        "gatekeeper_decisions_total{route=\"register\",outcome=\"refused\",rule=\"denied_country\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    // No metric label carries an ASN or a country.
    assert!(
        !metrics.contains("64496") && !metrics.contains("\"NL\""),
        "{metrics}"
    );

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let line = |client: &str| {
        text.lines()
            .find(|l| {
                l.contains(&format!("client=\"{client}\"")) && l.contains("route=\"register\"")
            })
            .unwrap_or_else(|| panic!("no audit line for {client} in\n{text}"))
            .to_owned()
    };
    let hosting = line("198.51.100.7");
    assert!(hosting.contains("rule=\"denied_asn\""), "{hosting}");
    assert!(
        hosting.ends_with("asn=64496 as_name=\"Example Hosting\" country=\"NL\""),
        "{hosting}"
    );
    let residential = line("203.0.113.5");
    assert!(
        residential.contains("rule=\"denied_country\""),
        "{residential}"
    );
    assert!(residential.contains("country=\"DE\""), "{residential}");
    let trusted = line("192.0.2.10");
    assert!(trusted.contains("decision=\"allowed\""), "{trusted}");
    assert!(
        trusted.ends_with("asn=64498 as_name=\"Example University\" country=\"XX\""),
        "{trusted}"
    );
    let unknown = line("100.64.0.1");
    assert!(
        !unknown.contains("asn=") && !unknown.contains("country="),
        "{unknown}"
    );
}

const ASN_LIMITS: &str = "[rate_limit]\n\
    registrations_per_ip = { count = 5, period = \"1h\" }\n\
    registrations_per_asn = { count = 2, period = \"1h\" }\n\
    attempts_per_asn = { count = 6, period = \"1h\" }\n";

#[tokio::test]
async fn one_network_is_limited_across_its_addresses_and_prefixes() {
    let dir = scratch("limits");
    let hs = FakeHomeserver::start().await;
    let token = token_file("networks-limits", common::admin::TOKEN);
    let config = format!(
        "{}[admin]\ntoken_file = {}\n",
        config_text(&hs, &dir, &format!("allow_asns = [64498]\n{ASN_LIMITS}")),
        toml_path(&token)
    );
    let gate = Gate::start_full(Config::from_toml(&config).unwrap(), true, None).await;

    // A UIA step (401) gives its unit back.
    assert_eq!(register(&gate, "198.51.100.1", 401).await.status, 401);
    // Two accounts from two addresses and an IPv6 prefix of the same AS
    // spend its budget; the third address is refused.
    assert_eq!(register(&gate, "198.51.100.1", 200).await.status, 200);
    assert_eq!(register(&gate, "2001:db8:1:5::1", 200).await.status, 200);
    let refused = register(&gate, "198.51.100.99", 200).await;
    refused.assert_error(429, "M_LIMIT_EXCEEDED");
    assert!(refused.json()["retry_after_ms"].as_u64().unwrap() > 1_700_000);
    // Other networks, a trusted one and an address of none are not
    // touched.
    for client in [
        "203.0.113.1",
        "192.0.2.1",
        "192.0.2.2",
        "192.0.2.3",
        "100.64.0.1",
    ] {
        assert_eq!(register(&gate, client, 200).await.status, 200, "{client}");
    }

    // The admin API shows the network and its budget, counted under it.
    let view = admin(&gate, Method::GET, "/v1/clients/198.51.100.42", "").await;
    assert_eq!(view.status, 200, "{:?}", view.body);
    let view = view.json();
    assert_eq!(view["network"]["asn"], 64496);
    assert_eq!(view["network"]["as_name"], "Example Hosting");
    assert_eq!(view["network"]["trusted"], false);
    assert_eq!(
        view["limits"]["registrations_per_asn"]["counted_as"],
        "AS64496"
    );
    assert_eq!(view["limits"]["registrations_per_asn"]["remaining"], 0);
    // The address itself has its own budget whole.
    assert_eq!(view["limits"]["registrations_per_ip"]["remaining"], 5);
    assert_eq!(view["counted_as"], "198.51.100.42");
    let trusted = admin(&gate, Method::GET, "/v1/clients/192.0.2.1", "")
        .await
        .json();
    assert_eq!(trusted["network"]["trusted"], true);
    assert!(
        trusted["limits"].get("registrations_per_asn").is_none(),
        "{trusted}"
    );

    // Resetting one client's limits does not give its whole network's
    // budget back.
    assert_eq!(reset_limits(&gate, "198.51.100.1").await.status, 200);
    register(&gate, "198.51.100.1", 200)
        .await
        .assert_error(429, "M_LIMIT_EXCEEDED");

    // explain --admin reads what the network has left from the gate.
    let file = dir.join("gate.toml");
    std::fs::write(&file, &config).unwrap();
    let admin_url = format!("http://{}", gate.admin.unwrap());
    let file = file.display().to_string();
    let args = [
        "explain",
        "--config",
        &file,
        "--ip",
        "198.51.100.42",
        "--admin",
        &admin_url,
    ];
    let output = tokio::process::Command::new(BIN)
        .args(args)
        .output()
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{out}");
    for line in [
        "decision: rate limited\nrule: registrations_per_asn\n",
        "network: AS64496 (Example Hosting), country NL\n",
        "  attempts_per_asn: 6 per 1h, key AS64496, refunded never; 1 of 6 left\n",
        "  registrations_per_asn: 2 per 1h, key AS64496, refunded when the homeserver answers \
         with anything but a 2xx; 0 of 2 left, next in ",
    ] {
        assert!(out.contains(line), "{line:?} not in\n{out}");
    }

    // Every attempt from the AS counted against attempts_per_asn, refused
    // ones too: five so far, one left.
    let attempts =
        |view: serde_json::Value| view["limits"]["attempts_per_asn"]["remaining"].clone();
    let seen = admin(&gate, Method::GET, "/v1/clients/198.51.100.1", "")
        .await
        .json();
    assert_eq!(attempts(seen), 1);
    register(&gate, "198.51.100.150", 401)
        .await
        .assert_error(429, "M_LIMIT_EXCEEDED");
    let seen = admin(&gate, Method::GET, "/v1/clients/198.51.100.1", "")
        .await
        .json();
    assert_eq!(attempts(seen), 0);
    let registered = hs
        .requests()
        .iter()
        .filter(|r| {
            r.target == REGISTER
                && r.header("x-forwarded-for")
                    .is_some_and(|c| c.starts_with("198.51.100.") || c.starts_with("2001:db8:1:"))
        })
        .count();
    assert_eq!(registered, 3, "the homeserver saw only the AS's budget");
}

#[tokio::test]
async fn a_changed_database_is_read_on_reload_and_a_corrupt_one_keeps_the_last_good() {
    let dir = scratch("reload");
    let hs = FakeHomeserver::start().await;
    let (gate, _) = start_watched(&dir, &config_text(&hs, &dir, "deny_asns = [64499]\n")).await;
    assert_eq!(available(&gate, "203.0.113.7").await.status, 200);

    // The residential network is now said to be AS64499: refused, once the
    // watcher sees the new file (renamed into place).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut moved = asn_db();
    moved.insert("203.0.113.0/24", asn_record(64499, "Example Moved"));
    moved.write(&dir.join("asn.mmdb"));
    eventually(Duration::from_secs(10), "the new database", || async {
        available(&gate, "203.0.113.7").await.status == 403
    })
    .await;

    // A corrupt database is refused; the one in force stays.
    std::fs::write(dir.join("asn.mmdb"), b"\x00\x01 not a database").unwrap();
    eventually(Duration::from_secs(10), "the refused reload", || async {
        gate.metrics()
            .await
            .contains("gatekeeper_config_reloads_total{result=\"error\"} 1\n")
    })
    .await;
    available(&gate, "203.0.113.7")
        .await
        .assert_error(403, "M_FORBIDDEN");
    assert_eq!(available(&gate, "198.51.100.7").await.status, 200);
    let error = gate.reloader.reload().unwrap_err().to_string();
    assert!(
        error.starts_with(&format!(
            "reputation.asn_database: {}: not a usable MaxMind DB database",
            dir.join("asn.mmdb").display()
        )),
        "{error}"
    );
}

#[test]
fn the_binary_refuses_a_corrupt_database_at_start_and_explains_a_network() {
    let dir = scratch("binary");
    asn_db().write(&dir.join("asn.mmdb"));
    country_db().write(&dir.join("country.mmdb"));
    let config = dir.join("gate.toml");
    std::fs::write(
        &config,
        format!(
            "[upstream]\nurl = \"http://127.0.0.1:9\"\n\
             [reputation]\nasn_database = {}\ncountry_database = {}\ndeny_countries = [\"DE\"]\n\
             {ASN_LIMITS}",
            toml_path(&dir.join("asn.mmdb")),
            toml_path(&dir.join("country.mmdb"))
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let output = Command::new(BIN).args(args).output().unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let config_arg = config.display().to_string();
    let (code, out, err) = run(&["explain", "--config", &config_arg, "--ip", "2001:db8:1::7"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("network: AS64496 (Example Hosting), country NL\n"),
        "{out}"
    );
    assert!(
        out.contains("  attempts_per_asn: 6 per 1h, key AS64496, refunded never\n"),
        "{out}"
    );
    assert!(
        out.contains("  registrations_per_asn: 2 per 1h, key AS64496,"),
        "{out}"
    );
    let (code, out, _) = run(&["explain", "--config", &config_arg, "--ip", "203.0.113.5"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("rule: denied_country\n"), "{out}");
    assert!(
        out.contains("network: AS64497 (Example Residential), country DE\n"),
        "{out}"
    );
    let (_, out, _) = run(&["explain", "--config", &config_arg, "--ip", "100.64.0.1"]);
    assert!(
        out.contains("network: no ASN known, no country known\n"),
        "{out}"
    );
    assert!(!out.contains("_per_asn"), "{out}");

    std::fs::write(dir.join("asn.mmdb"), b"garbage").unwrap();
    let (code, _, err) = run(&["serve", "--config", &config_arg]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("reputation.asn_database: ")
            && err.contains("not a usable MaxMind DB database"),
        "{err}"
    );
}

#[tokio::test]
async fn a_list_of_hosting_networks_refuses_them_unless_allowed_and_follows_its_file() {
    let dir = scratch("asn-lists");
    let hs = FakeHomeserver::start().await;
    let list = dir.join("datacenters.txt");
    // The university is on the published list, and trusted here.
    std::fs::write(
        &list,
        "# datacenters\nAS64496 Example Hosting\n64498,\"Example University\"\n",
    )
    .unwrap();
    let token = token_file("networks-asn-lists", common::admin::TOKEN);
    let rules = format!(
        "deny_asn_lists = [{}]\nallow_asns = [64498]\n",
        toml_path(&list)
    );
    let (gate, config_file) = start_watched(
        &dir,
        &format!(
            "{}[admin]\ntoken_file = {}\n",
            config_text(&hs, &dir, &rules),
            toml_path(&token)
        ),
    )
    .await;
    for client in ["198.51.100.7", "2001:db8:1:2::9"] {
        assert_refused_by_network(&gate, client).await;
    }
    hs.assert_saw_nothing("a listed network");
    // The admin API's client view names the rule and the list; a trusted
    // network the list names is not refused.
    let view = admin(&gate, Method::GET, "/v1/clients/198.51.100.42", "").await;
    let view = view.json();
    assert_eq!(view["network"]["refused_by"], "denied_asn");
    assert_eq!(view["network"]["list"], list.display().to_string());
    let view = admin(&gate, Method::GET, "/v1/clients/192.0.2.10", "").await;
    let view = view.json();
    assert_eq!(view["network"]["trusted"], true);
    assert!(view["network"]["refused_by"].is_null(), "{view}");
    assert!(view["network"]["list"].is_null(), "{view}");
    for client in ["192.0.2.10", "203.0.113.5", "100.64.0.1"] {
        assert_eq!(register(&gate, client, 200).await.status, 200, "{client}");
    }
    assert_eq!(hs.requests().len(), 3);
    let metrics = gate.metrics().await;
    let refused =
        "gatekeeper_decisions_total{route=\"register\",outcome=\"refused\",rule=\"denied_asn\"} 2";
    assert!(metrics.contains(refused), "{metrics}");

    // A new list, renamed into place, is read by the watcher.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let next = dir.join("datacenters.txt.new");
    std::fs::write(&next, "AS64496\nAS64497\n").unwrap();
    std::fs::rename(&next, &list).unwrap();
    eventually(Duration::from_secs(10), "the new list", || async {
        available(&gate, "203.0.113.5").await.status == 403
    })
    .await;

    // A broken line is refused, naming the file and line; the list in
    // force stays.
    std::fs::write(&next, "AS64496\nASN Entity\n").unwrap();
    std::fs::rename(&next, &list).unwrap();
    eventually(Duration::from_secs(10), "the refused reload", || async {
        gate.metrics()
            .await
            .contains("gatekeeper_config_reloads_total{result=\"error\"} 1\n")
    })
    .await;
    let error = gate.reloader.reload().unwrap_err().to_string();
    assert_eq!(
        error,
        format!(
            "reputation.deny_asn_lists: {}:2: not an AS number: \"ASN Entity\"",
            list.display()
        )
    );
    available(&gate, "203.0.113.5")
        .await
        .assert_error(403, "M_FORBIDDEN");
    assert_eq!(available(&gate, "192.0.2.10").await.status, 200);

    // explain names the list that refuses, and the rule needs the database.
    std::fs::write(&list, "AS64496\n").unwrap();
    let config_arg = config_file.display().to_string();
    let output = Command::new(BIN)
        .args(["explain", "--config", &config_arg, "--ip", "198.51.100.7"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{out}");
    assert!(out.contains("rule: denied_asn\n"), "{out}");
    assert!(
        out.contains(&format!("list: {}\n", list.display())),
        "{out}"
    );
    let error = Config::from_toml(&format!(
        "[upstream]\nurl = \"http://127.0.0.1:9\"\n[reputation]\ndeny_asn_lists = [{}]\n",
        toml_path(&list)
    ))
    .unwrap_err()
    .to_string();
    assert_eq!(
        error,
        "reputation.deny_asn_lists: needs reputation.asn_database to know a client's network"
    );
}
