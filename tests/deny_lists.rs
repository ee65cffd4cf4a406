//! File-based deny lists through the real gate: address lists
//! (`[client_ip] deny_lists`) and e-mail domain lists (`[email]
//! denied_domain_lists`), at start, on reload and with `watch_config`.

mod common;

use common::Listeners;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use std::time::{Duration, Instant};

use common::{eventually, post_json, send, Captured, FakeHomeserver, Gate};
use http::Method;
use matrix_gatekeeper::server::Server;
use matrix_gatekeeper::Config;

const REGISTER: &str = "/_matrix/client/v3/register";
const EMAIL_TOKEN: &str = "/_matrix/client/v3/register/email/requestToken";

/// A scratch file under the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(suffix: &str, text: &str) -> TempFile {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "mgk-deny-lists-{}-{}{suffix}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.0, text).unwrap();
    }

    /// The path as a TOML string literal.
    fn toml(&self) -> String {
        format!("{:?}", self.0.display().to_string())
    }

    fn shown(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A request to `path` from `client` (through a trusted proxy).
async fn from(client: &str, method: Method, url: &str, body: &str) -> common::Answer {
    send(method, url, &[("x-forwarded-for", client)], body.to_owned()).await
}

fn email_body(address: &str) -> String {
    format!(r#"{{"email":"{address}","client_secret":"s","send_attempt":1}}"#)
}

#[tokio::test]
async fn listed_clients_are_refused_on_registration_only_and_the_audit_names_the_list() {
    // The text format, as fail2ban reads it.
    let captured = Captured::text_global("matrix_gatekeeper::audit=info");

    let exits = TempFile::new(
        ".txt",
        "# Tor exit addresses\n\n203.0.113.99\n198.51.100.0/24 # a range\n\
         2001:db8:bad::/48\n::ffff:192.0.2.0/120\n",
    );
    let hs = FakeHomeserver::start().await;
    let config = Config::from_toml(&format!(
        "[upstream]\nurl = \"{}\"\nresponse_timeout = \"10s\"\n\
         [client_ip]\ntrusted_proxies = [\"127.0.0.1\"]\ndeny_lists = [{}]\n",
        hs.url(),
        exits.toml()
    ))
    .unwrap();
    let gate = Gate::start_full(config, true, None).await;
    for client in [
        "203.0.113.99",
        "198.51.100.200",
        "2001:db8:bad:1::5",
        "192.0.2.1",
        "::ffff:198.51.100.3",
    ] {
        from(
            client,
            Method::POST,
            &gate.url(REGISTER),
            r#"{"username":"alice"}"#,
        )
        .await
        .assert_error(403, "M_FORBIDDEN");
        from(
            client,
            Method::GET,
            &gate.url("/_matrix/client/v3/register/available?username=alice"),
            "",
        )
        .await
        .assert_error(403, "M_FORBIDDEN");
    }
    hs.assert_saw_nothing("listed clients");
    // Pass-through traffic from a listed client is not the lists' business.
    let versions = from(
        "203.0.113.99",
        Method::GET,
        &gate.url("/_matrix/client/versions"),
        "",
    )
    .await;
    assert_eq!(versions.status, 200);
    assert_eq!(hs.requests().len(), 1);
    for client in ["203.0.113.100", "2001:db8:bad0::1", "192.0.3.1"] {
        let answer = from(
            client,
            Method::POST,
            &gate.url(REGISTER),
            r#"{"username":"alice"}"#,
        )
        .await;
        assert_eq!(answer.status, 200, "{client}");
    }

    let metrics = gate.metrics().await;
    assert!(
        metrics.contains("rule=\"deny_list\""),
        "no deny_list decisions in\n{metrics}"
    );
    // The subscriber is global: other tests' lines are there too, and
    // the addresses of this test are its own.
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("client=\"203.0.113.99\""))
        .unwrap_or_else(|| panic!("no audit line for the listed client in\n{text}"));
    assert!(
        line.ends_with(&format!(
            "decision=\"refused\" rule=\"deny_list\" upstream_status=0 list=\"{}\"",
            exits.shown()
        )),
        "{line}"
    );
    let allowed = text
        .lines()
        .find(|l| l.contains("client=\"203.0.113.100\""))
        .unwrap();
    assert!(!allowed.contains("list="), "{allowed}");
}

#[tokio::test]
async fn ipv6_bogon_networks_in_a_list_refuse_no_ipv4_client() {
    // Two lines of published IPv6 bogon lists: `::/8` holds the whole
    // IPv4-mapped block, `::ffff:0:0/96` is that block.
    let bogons = TempFile::new(".txt", "# IPv6 bogons\n::/8\n::ffff:0:0/96\n");
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(
        &hs.url(),
        &format!(
            "[client_ip]\ntrusted_proxies = [\"127.0.0.1\"]\ndeny_lists = [{}]\n",
            bogons.toml()
        ),
    )
    .await;
    let url = gate.url(REGISTER);
    for client in ["203.0.113.7", "::ffff:198.51.100.7"] {
        hs.clear();
        let answer = from(client, Method::POST, &url, r#"{"username":"alice"}"#).await;
        assert_eq!(answer.status, 200, "{client}: {:?}", answer.body);
        let forwarded = hs.only_request();
        let canonical = client.trim_start_matches("::ffff:");
        assert_eq!(forwarded.header("x-forwarded-for"), Some(canonical));
        assert_eq!(forwarded.json()["username"], "alice");
    }
    hs.clear();
    from("::5", Method::POST, &url, r#"{"username":"alice"}"#)
        .await
        .assert_error(403, "M_FORBIDDEN");
    hs.assert_saw_nothing("an IPv6 client inside ::/8");
}

#[tokio::test]
async fn listed_email_domains_and_their_subdomains_are_refused_on_request_token() {
    let disposable = TempFile::new(
        ".txt",
        "# disposable\nMailinator.com\nguerrillamail.info.\n",
    );
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(
        &hs.url(),
        &format!("[email]\ndenied_domain_lists = [{}]\n", disposable.toml()),
    )
    .await;
    let url = gate.url(EMAIL_TOKEN);
    for address in [
        "a@mailinator.com",
        "a@x.MAILINATOR.com",
        "a@guerrillamail.info",
        "a@mailinator.com.",
    ] {
        post_json(&url, &email_body(address))
            .await
            .assert_error(403, "M_THREEPID_DENIED");
    }
    hs.assert_saw_nothing("listed e-mail domains");
    for address in ["a@notmailinator.com", "a@example.org"] {
        let answer = post_json(&url, &email_body(address)).await;
        assert_eq!(answer.status, 200, "{address}");
    }
    assert_eq!(hs.requests().len(), 2);
}

/// Synapse strips an address with Python's `str.strip()` (which also
/// removes U+001C–U+001F) and lower-cases its domain with Unicode case
/// mapping before mailing it: the gate matches and forwards that address.
#[tokio::test]
async fn email_domains_are_matched_as_the_homeserver_canonicalises_them() {
    let disposable = TempFile::new(".txt", "mailinator.com\nfakeinbox.com\n");
    let hs = FakeHomeserver::start().await;
    let gate = Gate::start(
        &hs.url(),
        &format!(
            "[email]\ndenied_domain_lists = [{}]\ndenied_domains = [\"*.kz\"]\n",
            disposable.toml()
        ),
    )
    .await;
    let url = gate.url(EMAIL_TOKEN);
    let body = |address: &str| {
        serde_json::json!({"email": address, "client_secret": "s", "send_attempt": 1}).to_string()
    };
    for address in [
        "x@mailinator.com\u{1f}",
        "\u{1e}x@mailinator.com\u{1d}",
        "\u{3000}x@mailinator.com\u{a0}",
        "x@fa\u{212A}einbox.com",
        "x@example.\u{212A}z",
        // Still not printable ASCII once lower-cased: refused as written.
        "x@mailinator\u{1f}.com",
        "x@\u{ff4d}ailinator.com",
        "x@mail inator.com",
        "x@a@mailinator.com",
    ] {
        post_json(&url, &body(address))
            .await
            .assert_error(403, "M_THREEPID_DENIED");
    }
    hs.assert_saw_nothing("addresses the homeserver reads as listed");
    // An address the rules let through reaches the homeserver as it will
    // read it: stripped, the domain lower-cased, the local part as sent.
    let answer = post_json(&url, &body("\u{1f} Alice@Example.ORG\u{2003}")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(hs.only_request().json()["email"], "Alice@example.org");
}

#[tokio::test]
async fn a_reload_reads_changed_lists_and_a_broken_list_keeps_the_old_ones() {
    let exits = TempFile::new(".txt", "203.0.113.9\n");
    let disposable = TempFile::new(".txt", "mailinator.com\n");
    let hs = FakeHomeserver::start().await;
    let config_file = TempFile::new(
        ".toml",
        &format!(
            "[upstream]\nurl = \"{}\"\n[client_ip]\ntrusted_proxies = [\"127.0.0.1\"]\n\
             deny_lists = [{}]\n[email]\ndenied_domain_lists = [{}]\n",
            hs.url(),
            exits.toml(),
            disposable.toml()
        ),
    );
    let gate = Gate::start_full(
        Config::from_file(&config_file.0).unwrap(),
        true,
        Some(config_file.0.clone()),
    )
    .await;
    let register = |client: &'static str| {
        let url = gate.url(REGISTER);
        async move { from(client, Method::POST, &url, r#"{"username":"alice"}"#).await }
    };
    let token = |address: &'static str| {
        let url = gate.url(EMAIL_TOKEN);
        async move { post_json(&url, &email_body(address)).await }
    };
    register("203.0.113.9")
        .await
        .assert_error(403, "M_FORBIDDEN");
    assert_eq!(register("203.0.113.77").await.status, 200);
    assert_eq!(token("a@yopmail.com").await.status, 200);

    exits.write("# replaced\n203.0.113.77\n");
    disposable.write("yopmail.com\n");
    gate.reloader.reload().unwrap();
    register("203.0.113.77")
        .await
        .assert_error(403, "M_FORBIDDEN");
    assert_eq!(register("203.0.113.9").await.status, 200);
    token("a@yopmail.com")
        .await
        .assert_error(403, "M_THREEPID_DENIED");
    assert_eq!(token("a@mailinator.com").await.status, 200);

    // What the lists in force since the reload refuse, and only that.
    let reloaded_lists_in_force = || async {
        register("203.0.113.77")
            .await
            .assert_error(403, "M_FORBIDDEN");
        assert_eq!(register("203.0.113.9").await.status, 200);
        assert_eq!(register("10.0.0.1").await.status, 200);
        token("a@yopmail.com")
            .await
            .assert_error(403, "M_THREEPID_DENIED");
    };

    // A broken line: the reload is refused, naming file and line, and the
    // lists in force stay.
    exits.write("203.0.113.9\n\n203.0.113.300\n");
    let error = gate.reloader.reload().unwrap_err().to_string();
    assert_eq!(
        error,
        format!(
            "client_ip.deny_lists: {}:3: not an address or network: \"203.0.113.300\"",
            exits.shown()
        )
    );
    reloaded_lists_in_force().await;

    // A download cut mid-line (`10.0.0.0/24` arrived as `10.0.0.0/2`)
    // reads as valid entries: refused for its missing last line break.
    exits.write("203.0.113.77\n10.0.0.0/2");
    let error = gate.reloader.reload().unwrap_err().to_string();
    assert_eq!(
        error,
        format!(
            "client_ip.deny_lists: {}: does not end with a line break: was it cut short?",
            exits.shown()
        )
    );
    exits.write("203.0.113.77\n");
    disposable.write("yopmail.com\nmailinator.co");
    let error = gate.reloader.reload().unwrap_err().to_string();
    assert_eq!(
        error,
        format!(
            "email.denied_domain_lists: {}: does not end with a line break: was it cut short?",
            disposable.shown()
        )
    );
    reloaded_lists_in_force().await;

    let text = gate.metrics().await;
    assert!(
        text.contains("gatekeeper_config_reloads_total{result=\"ok\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("gatekeeper_config_reloads_total{result=\"error\"} 3\n"),
        "{text}"
    );
}

/// A configuration file with `watch_config`, trusting loopback's
/// `X-Forwarded-For`, denying the addresses of `list`.
fn watching(hs: &FakeHomeserver, list: &TempFile) -> TempFile {
    TempFile::new(
        ".toml",
        &format!(
            "[server]\nwatch_config = true\n[upstream]\nurl = \"{}\"\n\
             [client_ip]\ntrusted_proxies = [\"127.0.0.1\"]\ndeny_lists = [{}]\n",
            hs.url(),
            list.toml()
        ),
    )
}

#[tokio::test]
async fn a_list_changed_while_the_gate_starts_is_picked_up() {
    let exits = TempFile::new(".txt", "203.0.113.9\n");
    let hs = FakeHomeserver::start().await;
    let config_file = watching(&hs, &exits);
    let config_stamp = matrix_gatekeeper::defences::lists::stamp(&config_file.0);
    let config = Config::from_file(&config_file.0).unwrap();
    // The list changes after the gate read it and before it serves, as
    // when an update lands while a large list is being compiled.
    tokio::time::sleep(Duration::from_millis(50)).await;
    exits.write("203.0.113.9\n198.51.100.0/24\n");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Server::from_listeners(&config, vec![listener])
        .with_config_path(config_file.0.clone())
        .read_when(&config, config_stamp);
    let gate = Gate::serve(server);
    let available = gate.url("/_matrix/client/v3/register/available?username=alice");
    // The watcher's first look, at once, sees the change.
    refused_within(
        &available,
        "198.51.100.4",
        "the list changed during start-up",
    )
    .await;
}

#[tokio::test]
async fn with_watch_config_a_changed_list_file_is_picked_up() {
    let exits = TempFile::new(".txt", "203.0.113.9\n");
    let hs = FakeHomeserver::start().await;
    let config_file = watching(&hs, &exits);
    let gate = Gate::start_full(
        Config::from_file(&config_file.0).unwrap(),
        true,
        Some(config_file.0.clone()),
    )
    .await;
    let available = gate.url("/_matrix/client/v3/register/available?username=alice");
    assert_eq!(
        from("198.51.100.4", Method::GET, &available, "")
            .await
            .status,
        200
    );
    // Only the list changes; the configuration file stays as it was.
    tokio::time::sleep(Duration::from_millis(100)).await;
    exits.write("203.0.113.9\n198.51.100.0/24\n");
    // The watch loop looks every 2 s; a few periods bound the wait.
    refused_within(&available, "198.51.100.4", "the changed list").await;

    // A list cut short is refused and the lists in force stay.
    exits.write("203.0.113.9\n198.51.100.0/24\n192.0.2.0/2");
    eventually(Duration::from_secs(10), "the cut list's reload", || async {
        gate.metrics()
            .await
            .contains("gatekeeper_config_reloads_total{result=\"error\"} 1\n")
    })
    .await;
    from("198.51.100.4", Method::GET, &available, "")
        .await
        .assert_error(403, "M_FORBIDDEN");
    let unlisted = from("192.0.2.5", Method::GET, &available, "").await;
    assert_eq!(unlisted.status, 200, "the cut list is not in force");
}

/// Waits (10 s at most) until `client` is refused `url` as listed.
async fn refused_within(url: &str, client: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = from(client, Method::GET, url, "").await;
        if answer.status == 403 {
            answer.assert_error(403, "M_FORBIDDEN");
            return;
        }
        assert!(Instant::now() < deadline, "{what} was not picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
