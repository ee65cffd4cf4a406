//! Deny lists fetched from URLs, through the `matrix-gatekeeper` binary:
//! served by a small HTTPS server of the test's own (a CA and a server
//! certificate made with the `openssl` command, trusted by `[reputation]
//! list_ca_file`), whose answers the test switches — a list, a changed
//! list, `304`, a cut body, `500`, a redirect, a body past the cap, a
//! server that trickles — and what the gate refuses after each.

mod common;

use common::certificates::Certificates;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::binary::{toml_path, Scratch, Served, BIN, LISTEN_ANY};
use common::webhook::{next_event_json, receiver};
use common::{eventually, send, FakeHomeserver};
use http::Method;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// The name the list server's certificate is for.
const HOST: &str = "localhost";

const AVAILABLE: &str = "/_matrix/client/v3/register/available?username=alice";

/// What the list server answers.
#[derive(Clone)]
enum Mode {
    /// `200` with this list and this `ETag`; `304` to a request that
    /// sends the `ETag` back.
    List(&'static str, &'static str),
    /// `Content-Length` longer than what is sent, then the connection
    /// closes.
    Truncated(&'static str),
    /// This status, no list.
    Status(u16),
    /// `302` to another list.
    Redirect,
    /// Lines of a valid list without end, no length announced.
    Endless,
    /// The head, then a line every 300 ms.
    Trickle,
    /// `200` with these bytes (a database).
    Bytes(Arc<Vec<u8>>),
}

/// An HTTPS server answering `GET` as its [`Mode`] says, recording each
/// request's head.
struct ListServer {
    addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ListServer {
    async fn start(certificates: &Certificates, mode: Mode) -> ListServer {
        let chain = CertificateDer::pem_file_iter(&certificates.certificate)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&certificates.key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(Mutex::new(mode));
        let heads: Arc<Mutex<Vec<String>>> = Arc::default();
        let (served_mode, served_heads) = (mode.clone(), heads.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let mode = served_mode.clone();
                let heads = served_heads.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if tls.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    heads.lock().unwrap().push(head.clone());
                    let mode = mode.lock().unwrap().clone();
                    let _ = answer(&mut tls, &head, mode).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        ListServer {
            addr,
            mode,
            heads,
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://{HOST}:{}{path}", self.addr.port())
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

impl Drop for ListServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer<S: tokio::io::AsyncWrite + Unpin>(
    out: &mut S,
    head: &str,
    mode: Mode,
) -> std::io::Result<()> {
    match mode {
        Mode::List(list, etag) => {
            let asked = format!("if-none-match: \"{etag}\"");
            if head.to_ascii_lowercase().contains(&asked) {
                let text = format!("HTTP/1.1 304 Not Modified\r\nETag: \"{etag}\"\r\n\r\n");
                return out.write_all(text.as_bytes()).await;
            }
            let text = format!(
                "HTTP/1.1 200 OK\r\nETag: \"{etag}\"\r\nContent-Length: {}\r\n\r\n{list}",
                list.len()
            );
            out.write_all(text.as_bytes()).await
        }
        Mode::Truncated(list) => {
            let text = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{list}",
                list.len() + 100
            );
            out.write_all(text.as_bytes()).await
        }
        Mode::Status(status) => {
            let text = format!("HTTP/1.1 {status} Trouble\r\nContent-Length: 5\r\n\r\noops\n");
            out.write_all(text.as_bytes()).await
        }
        Mode::Redirect => {
            let text = "HTTP/1.1 302 Found\r\nLocation: https://elsewhere.example/list.txt?token=s3cret\r\n\
                        Content-Length: 0\r\n\r\n";
            out.write_all(text.as_bytes()).await
        }
        Mode::Endless => {
            out.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                .await?;
            let lines = "192.0.2.1\n".repeat(1000);
            // Until the gate hangs up: an error ends it.
            loop {
                out.write_all(lines.as_bytes()).await?;
            }
        }
        Mode::Bytes(bytes) => {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", bytes.len());
            out.write_all(head.as_bytes()).await?;
            out.write_all(&bytes).await
        }
        Mode::Trickle => {
            out.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                .await?;
            loop {
                out.write_all(b"192.0.2.1\n").await?;
                out.flush().await?;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}

/// A configuration serving `lists` (TOML entries) as `deny_lists`, lists
/// refreshed every second, with `extra` appended.
fn config(
    dir: &Scratch,
    hs: &FakeHomeserver,
    certificates: &Certificates,
    state: &Path,
    lists: &str,
    extra: &str,
) -> PathBuf {
    dir.write(
        "gatekeeper.toml",
        &format!(
            "[server]\n{LISTEN_ANY}state_dir = {}\n[upstream]\nurl = \"{}\"\n\
             [client_ip]\ntrusted_proxies = [\"127.0.0.1\"]\ndeny_lists = [{lists}]\n\
             [reputation]\nlist_ca_file = {}\nlist_refresh = \"1s\"\nlist_timeout = \"1s\"\n\
             list_max_bytes = 65536\n{extra}",
            toml_path(state),
            hs.url(),
            toml_path(&certificates.ca),
        ),
    )
}

/// The status the gate answers `client` (through the trusted proxy).
async fn status_for(gate: &Served, client: &str) -> u16 {
    let headers = [("x-forwarded-for", client)];
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        send(Method::GET, &gate.url(AVAILABLE), &headers, ""),
    )
    .await
    .expect("the gate answered");
    answer.status.as_u16()
}

async fn metrics(gate: &Served) -> String {
    let answer = send(Method::GET, &gate.admin_url("/metrics"), &[], "").await;
    String::from_utf8_lossy(&answer.body).into_owned()
}

/// The value of the series `series` (name and labels) in `metrics`; 0
/// when absent.
fn value(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Has `server` answer with `mode` from now on, and waits for the
/// refresher to reload the configuration with what it fetched.
async fn serve_and_wait_reload(gate: &Served, server: &ListServer, mode: Mode, what: &str) {
    let mark = gate.log_mark();
    server.set(mode);
    gate.wait_for_line(mark, what, |l| l.contains("configuration reloaded"))
        .await;
}

/// Waits for a log line about the list that contains `what`.
async fn wait_for_failure(gate: &Served, what: &str) -> String {
    let mark = gate.log_mark();
    gate.wait_for_line(mark, what, |line| {
        line.contains("list not refreshed") && line.contains(what)
    })
    .await
}

#[tokio::test]
async fn a_fetched_list_refuses_follows_changes_and_outlives_bad_answers() {
    let certificates = Certificates::make("remote-lists-follow", HOST);
    let server = ListServer::start(&certificates, Mode::List("203.0.113.9\n", "v1")).await;
    let hs = FakeHomeserver::start().await;
    let dir = Scratch::new("remote-follow");
    let state = dir.write("state-marker", "");
    let state = state.parent().unwrap().join("state");
    let url = server.url("/tor-exits.txt?key=s3cret");
    let config = config(&dir, &hs, &certificates, &state, &format!("{url:?}"), "");
    // No copy yet: fetched before the gate serves.
    let gate = Served::start(&config).await;
    assert_eq!(status_for(&gate, "203.0.113.9").await, 403);
    assert_eq!(status_for(&gate, "198.51.100.4").await, 200);
    assert!(gate.log().contains("list fetched"), "{}", gate.log());
    assert!(!gate.log().contains("s3cret"), "{}", gate.log());

    // Refreshed every second, conditionally: 304 keeps the list.
    eventually(Duration::from_secs(5), "a conditional refresh", || async {
        server
            .heads()
            .iter()
            .any(|head| head.to_ascii_lowercase().contains("if-none-match: \"v1\""))
    })
    .await;
    let shown = format!(
        "https://{HOST}:{}/tor-exits.txt?key=***",
        server.addr.port()
    );
    let not_modified =
        format!("gatekeeper_list_fetches_total{{list=\"{shown}\",result=\"not_modified\"}}");
    // The server saw the request before the gate counted its answer.
    eventually(Duration::from_secs(5), "a 304 counted", || async {
        value(&metrics(&gate).await, &not_modified) >= 1
    })
    .await;
    let metrics_text = metrics(&gate).await;
    assert!(
        metrics_text.contains(&format!("gatekeeper_list_age_seconds{{list=\"{shown}\"}} ")),
        "{metrics_text}"
    );
    assert_eq!(status_for(&gate, "203.0.113.9").await, 403);

    // A changed list is in force after the next refresh, without
    // watch_config: the refresher reloads.
    serve_and_wait_reload(
        &gate,
        &server,
        Mode::List("203.0.113.9\n198.51.100.0/24\n", "v2"),
        "a reload after the list changed",
    )
    .await;
    assert_eq!(status_for(&gate, "198.51.100.4").await, 403);

    // Every bad answer keeps the last good copy.
    server.set(Mode::Truncated("192.0.2.0/24\n"));
    let line = wait_for_failure(&gate, "the answer was cut").await;
    assert!(line.contains(&shown), "{line}");
    server.set(Mode::Status(500));
    wait_for_failure(&gate, "answered 500").await;
    server.set(Mode::Redirect);
    let line = wait_for_failure(&gate, "redirects are not followed").await;
    assert!(!line.contains("s3cret"), "{line}");
    server.set(Mode::Endless);
    wait_for_failure(&gate, "longer than reputation.list_max_bytes (65536 bytes)").await;
    server.set(Mode::Trickle);
    wait_for_failure(
        &gate,
        "no complete answer within 1s (reputation.list_timeout)",
    )
    .await;
    assert_eq!(status_for(&gate, "198.51.100.4").await, 403);
    assert_eq!(status_for(&gate, "192.0.2.1").await, 200);
    let metrics_text = metrics(&gate).await;
    let errors = format!("gatekeeper_list_fetches_total{{list=\"{shown}\",result=\"error\"}}");
    assert!(value(&metrics_text, &errors) >= 5, "{metrics_text}");
    assert!(!metrics_text.contains("s3cret"));
    assert!(
        metrics_text.contains(&format!("gatekeeper_list_stale{{list=\"{shown}\"}} 0")),
        "{metrics_text}"
    );
}

#[tokio::test]
async fn a_restart_reads_the_copy_without_the_server_and_no_copy_stops_the_start() {
    let certificates = Certificates::make("remote-lists-restart", HOST);
    let server = ListServer::start(&certificates, Mode::List("203.0.113.9\n", "v1")).await;
    let url = server.url("/exits.txt");
    let hs = FakeHomeserver::start().await;
    let dir = Scratch::new("remote-restart");
    let state = dir.write("marker", "").parent().unwrap().join("state");
    let config = config(&dir, &hs, &certificates, &state, &format!("{url:?}"), "");
    {
        let gate = Served::start(&config).await;
        assert_eq!(status_for(&gate, "203.0.113.9").await, 403);
    }
    drop(server);
    // The copy is read at once; the failed refresh is only logged.
    let gate = Served::start(&config).await;
    assert_eq!(status_for(&gate, "203.0.113.9").await, 403);
    gate.wait_for_line(0, "a failed refresh", |l| {
        l.contains("list not refreshed") && l.contains("cannot connect")
    })
    .await;
    drop(gate);

    // No copy and no server: exit status 69, naming the list.
    let empty_state = state.with_file_name("empty-state");
    let config = self::config(
        &dir,
        &hs,
        &certificates,
        &empty_state,
        &format!("{url:?}"),
        "",
    );
    let output = tokio::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .output();
    let output = tokio::time::timeout(Duration::from_secs(10), output)
        .await
        .expect("serve gave up within 10 s")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "matrix-gatekeeper: client_ip.deny_lists: {url} could not be fetched and has no copy in"
        )),
        "{stderr}"
    );
    // `check` fetches nothing and says so.
    let check = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("# client_ip.deny_lists: {url} has no copy in")),
        "{stdout}"
    );

    // Optional: the gate starts with the list empty.
    let config = self::config(
        &dir,
        &hs,
        &certificates,
        &empty_state,
        &format!("{{ url = {url:?}, optional = true }}"),
        "",
    );
    let gate = Served::start(&config).await;
    assert_eq!(status_for(&gate, "203.0.113.9").await, 200);
    assert!(gate.log().contains("it is optional"), "{}", gate.log());
}

#[tokio::test]
async fn a_stale_list_is_reported_and_dropped_until_it_is_fetched_again() {
    let certificates = Certificates::make("remote-lists-stale", HOST);
    let server = ListServer::start(&certificates, Mode::List("203.0.113.9\n", "v1")).await;
    let url = server.url("/exits.txt");
    let hs = FakeHomeserver::start().await;
    let (hook, mut events) = receiver().await;
    let dir = Scratch::new("remote-stale");
    let state = dir.write("marker", "").parent().unwrap().join("state");
    let config = config(
        &dir,
        &hs,
        &certificates,
        &state,
        &format!("{url:?}"),
        &format!(
            "list_max_age = \"2s\"\non_stale_list = \"drop\"\n[notify]\nwebhook_url = \"http://{hook}/hook\"\n"
        ),
    );
    let gate = Served::start(&config).await;
    assert_eq!(status_for(&gate, "203.0.113.9").await, 403);
    server.set(Mode::Status(503));
    let event = next_event_json(&mut events).await;
    assert_eq!(event["event"], "list_stale", "{event}");
    assert_eq!(event["key"], "client_ip.deny_lists");
    assert_eq!(event["list"], url.as_str());
    assert_eq!(event["action"], "dropped");
    assert!(event["age_seconds"].as_u64().unwrap() >= 2, "{event}");
    eventually(Duration::from_secs(5), "the stale list dropped", || async {
        status_for(&gate, "203.0.113.9").await == 200
    })
    .await;
    let metrics_text = metrics(&gate).await;
    assert!(
        metrics_text.contains(&format!("gatekeeper_list_stale{{list=\"{url}\"}} 1")),
        "{metrics_text}"
    );
    // Fetched again (the same list: 304), it is back in force.
    server.set(Mode::List("203.0.113.9\n", "v1"));
    eventually(Duration::from_secs(5), "the list back in force", || async {
        status_for(&gate, "203.0.113.9").await == 403
    })
    .await;
}

#[tokio::test]
async fn a_fetched_asn_database_refuses_its_networks_and_a_corrupt_one_keeps_the_last() {
    use common::mmdb::{asn_record, Writer};
    let database = |residential_asn: u32| {
        let mut writer = Writer::new("GeoLite2-ASN");
        writer
            .insert("198.51.100.0/24", asn_record(64496, "Example Hosting"))
            .insert(
                "203.0.113.0/24",
                asn_record(residential_asn, "Example Residential"),
            );
        Arc::new(writer.to_bytes())
    };
    let certificates = Certificates::make("remote-lists-database", HOST);
    let server = ListServer::start(&certificates, Mode::Bytes(database(64497))).await;
    let hs = FakeHomeserver::start().await;
    let dir = Scratch::new("remote-database");
    let state = dir.write("marker", "").parent().unwrap().join("state");
    let url = server.url("/GeoLite2-ASN.mmdb?license_key=s3cret");
    let config = config(
        &dir,
        &hs,
        &certificates,
        &state,
        "",
        &format!(
            "asn_database = {url:?}\ndeny_asns = [64496]\n\
             [rate_limit]\nregistrations_per_asn = {{ count = 1, period = \"1h\" }}\n"
        ),
    );
    // No copy yet: fetched, checked and in force before the gate serves.
    let gate = Served::start(&config).await;
    assert_eq!(status_for(&gate, "198.51.100.7").await, 403);
    assert_eq!(status_for(&gate, "203.0.113.7").await, 200);
    // The residential network's one account, whichever address asks.
    let register = |client: &'static str| {
        let url = gate.url("/_matrix/client/v3/register");
        async move {
            let headers = [("x-forwarded-for", client), ("x-test-status", "200")];
            send(Method::POST, &url, &headers, "{}")
                .await
                .status
                .as_u16()
        }
    };
    assert_eq!(register("203.0.113.7").await, 200);
    assert_eq!(register("203.0.113.8").await, 429);

    // A new database: the residential network moved into the denied AS.
    serve_and_wait_reload(
        &gate,
        &server,
        Mode::Bytes(database(64496)),
        "a reload after the database changed",
    )
    .await;
    assert_eq!(status_for(&gate, "203.0.113.7").await, 403);

    // A database cut short, and one that is no database, keep the last
    // good copy.
    let whole = database(64497);
    server.set(Mode::Bytes(Arc::new(whole[..whole.len() - 40].to_vec())));
    let line = wait_for_failure(&gate, "not a usable MaxMind DB database").await;
    assert!(!line.contains("s3cret"), "{line}");
    server.set(Mode::Bytes(Arc::new(b"203.0.113.0/24\n".to_vec())));
    wait_for_failure(&gate, "not a usable MaxMind DB database").await;
    assert_eq!(status_for(&gate, "203.0.113.7").await, 403);
    assert_eq!(status_for(&gate, "192.0.2.1").await, 200);
    assert!(!gate.log().contains("s3cret"));
}

#[tokio::test]
async fn a_fetched_list_of_networks_refuses_them_and_a_broken_one_keeps_the_last() {
    use common::mmdb::{asn_record, Writer};
    let certificates = Certificates::make("remote-lists-asns", HOST);
    let server = ListServer::start(
        &certificates,
        Mode::List("# hosting\nAS64496 Example Hosting\n", "v1"),
    )
    .await;
    let hs = FakeHomeserver::start().await;
    let dir = Scratch::new("remote-asns");
    let state = dir.write("marker", "").parent().unwrap().join("state");
    let database = state.parent().unwrap().join("asn.mmdb");
    let mut writer = Writer::new("GeoLite2-ASN");
    writer
        .insert("198.51.100.0/24", asn_record(64496, "Example Hosting"))
        .insert("203.0.113.0/24", asn_record(64497, "Example Residential"));
    writer.write(&database);
    let url = server.url("/datacenter-asns.txt?token=s3cret");
    let config = config(
        &dir,
        &hs,
        &certificates,
        &state,
        "",
        &format!(
            "asn_database = {}\ndeny_asn_lists = [{url:?}]\n",
            toml_path(&database)
        ),
    );
    // No copy yet: fetched, checked and in force before the gate serves.
    let gate = Served::start(&config).await;
    assert_eq!(status_for(&gate, "198.51.100.7").await, 403);
    assert_eq!(status_for(&gate, "203.0.113.7").await, 200);

    // The list grows: the refresher reloads.
    serve_and_wait_reload(
        &gate,
        &server,
        Mode::List("AS64496\n64497,\"Example Residential\"\n", "v2"),
        "a reload after the list changed",
    )
    .await;
    assert_eq!(status_for(&gate, "203.0.113.7").await, 403);

    // A list with a header line, and one cut short, keep the last good copy.
    server.set(Mode::List("ASN,Entity\n64496,Example Hosting\n", "v3"));
    let line = wait_for_failure(&gate, ":1: not an AS number").await;
    assert!(line.contains("ASN,Entity"), "{line}");
    assert!(!line.contains("s3cret"), "{line}");
    server.set(Mode::Truncated("AS64496\n"));
    wait_for_failure(&gate, "the answer was cut").await;
    assert_eq!(status_for(&gate, "203.0.113.7").await, 403);
    assert_eq!(status_for(&gate, "192.0.2.1").await, 200);
    assert!(!gate.log().contains("s3cret"));
}
