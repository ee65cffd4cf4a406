//! The `matrix-gatekeeper` binary: `check` and `serve` on good and bad
//! configuration files, exit statuses and messages; `explain` against a
//! running gate's admin API and the suite's own DNS responder.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_matrix-gatekeeper");
/// EX_USAGE: a configuration that cannot be used.
const EXIT_CONFIG: i32 = 64;

/// A configuration file under the temp dir, removed on drop.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(text: &str) -> TempConfig {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "matrix-gatekeeper-cli-{}-{}.toml",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).unwrap();
        TempConfig(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("binary runs")
}

fn check(path: &Path) -> Output {
    run(&["check", "--config", path.to_str().unwrap()])
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gatekeeper.example.toml")
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn check_reports_a_bad_enum_value_by_key_with_exit_64() {
    let config = TempConfig::new("[guest]\naccess = \"sometimes\"\n");
    let output = check(config.path());
    assert_eq!(output.status.code(), Some(EXIT_CONFIG), "{output:?}");
    assert!(
        stderr(&output).contains(r#"guest.access: expected "allow" or "deny", got "sometimes""#),
        "{}",
        stderr(&output)
    );
    assert!(stdout(&output).is_empty(), "{}", stdout(&output));
}

#[test]
fn check_names_an_unknown_key_with_exit_64() {
    let config = TempConfig::new("[username]\nreservd = []\n");
    let output = check(config.path());
    assert_eq!(output.status.code(), Some(EXIT_CONFIG), "{output:?}");
    assert!(
        stderr(&output).contains("username.reservd"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn check_of_a_missing_file_exits_64_naming_the_file() {
    let missing = std::env::temp_dir().join(format!(
        "matrix-gatekeeper-cli-missing-{}.toml",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&missing);
    let output = check(&missing);
    assert_eq!(output.status.code(), Some(EXIT_CONFIG), "{output:?}");
    assert!(
        stderr(&output).contains(missing.to_str().unwrap()),
        "{}",
        stderr(&output)
    );
}

#[test]
fn check_of_the_example_prints_the_effective_config() {
    let output = check(&example_path());
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let printed = stdout(&output);
    assert!(printed.contains(r#"access = "deny""#), "{printed}");
    assert!(
        printed.contains(r#"server_name = "example.org""#),
        "{printed}"
    );
    // What it prints is itself a valid configuration (and a closing
    // comment on bridges).
    let again = matrix_gatekeeper::Config::from_toml(&printed).expect("printed config loads");
    let (toml, comment) = printed.split_at(printed.rfind("# application services").unwrap());
    assert_eq!(again.to_toml(), toml);
    assert!(
        comment.ends_with('\n') && comment.lines().count() == 1,
        "{comment}"
    );
}

#[test]
fn check_without_a_config_uses_the_embedded_example() {
    let output = run(&["check"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let printed = stdout(&output);
    assert!(printed.contains(r#"access = "deny""#), "{printed}");
    assert!(
        printed.contains(r#"server_name = "example.org""#),
        "{printed}"
    );
}

/// Runs `serve` on `config`, an invalid configuration listening on `port`:
/// it must exit within 10 s. The test holds `port` meanwhile, so a `serve`
/// that got as far as binding would exit with the bind failure's status
/// (71), not the configuration's (64) its callers expect — whatever else
/// on this machine happens to use ports.
/// The port is handed back still held: a caller that checks it is free
/// afterwards drops it just before, so no other test can take it between.
fn serve_refused(config: &Path, port: u16) -> (std::process::Output, std::net::TcpListener) {
    let held = std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
    let mut child = Command::new(BIN)
        .args(["serve", "--config", config.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve with an invalid configuration did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (child.wait_with_output().unwrap(), held)
}

#[test]
fn serve_with_a_bad_config_exits_64_without_binding() {
    let port = free_port();
    let config = TempConfig::new(&format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[guest]\naccess = \"sometimes\"\n"
    ));
    let (output, held) = serve_refused(config.path(), port);
    assert_eq!(
        output.status.code(),
        Some(EXIT_CONFIG),
        "{}",
        stderr(&output)
    );
    assert!(
        stderr(&output).contains("guest.access"),
        "{}",
        stderr(&output)
    );
    drop(held);
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is still free");
}

#[test]
fn explain_prints_the_decision_and_the_rule() {
    let output = run(&["explain", "--username", "adm1n"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let text = stdout(&output);
    assert!(text.contains("decision: refused\n"), "{text}");
    assert!(text.contains("rule: lookalike\n"), "{text}");
    assert!(text.contains("answer: 400 M_USER_IN_USE"), "{text}");

    let output = run(&["explain", "--username", "Alice"]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let text = stdout(&output);
    assert!(
        text.contains("decision: allowed\nusername: alice (sent as \"Alice\")\n"),
        "{text}"
    );
    assert!(text.contains(r#"body: {"username":"alice"}"#), "{text}");

    let output = run(&["explain", "--guest"]);
    assert!(stdout(&output).contains("rule: guest_denied"), "{output:?}");

    let output = run(&[
        "explain",
        "--config",
        example_path().to_str().unwrap(),
        "--username",
        "bob",
        "--ip",
        "not-an-ip",
    ]);
    assert_eq!(
        output.status.code(),
        Some(2),
        "clap refuses a bad address: {output:?}"
    );
}

#[test]
fn explain_does_not_need_the_secret_files_of_the_service() {
    // As an operator who cannot read the service's secrets would run it.
    let missing = std::env::temp_dir().join(format!(
        "matrix-gatekeeper-cli-{}-no-such-secret",
        std::process::id()
    ));
    let missing = missing.to_str().unwrap();
    let config = TempConfig::new(&format!(
        "[upstream]\nurl = \"http://127.0.0.1:8008\"\n\
         [admin]\ntoken_file = \"{missing}\"\n\
         [notify]\nwebhook_url = \"http://127.0.0.1:9/hook\"\nwebhook_secret_file = \"{missing}\"\n"
    ));
    let path = config.path().to_str().unwrap();
    // `check` and `serve` read them, and say which is missing.
    let output = check(config.path());
    assert_eq!(output.status.code(), Some(EXIT_CONFIG), "{output:?}");
    assert!(stderr(&output).contains("no-such-secret"), "{output:?}");

    let output = run(&["explain", "--config", path, "--username", "alice"]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(stdout(&output).contains("decision: allowed"), "{output:?}");
    // With --admin the token is needed: from the configuration's file it
    // cannot be read, and the answer says what to do.
    let output = run(&["explain", "--config", path, "--admin", "http://127.0.0.1:9"]);
    assert_eq!(output.status.code(), Some(EXIT_CONFIG), "{output:?}");
    assert!(stderr(&output).contains("token_file"), "{output:?}");
}

#[test]
fn healthcheck_fails_without_an_admin_listener() {
    let url = format!("http://127.0.0.1:{}/healthz", free_port());
    let output = run(&["healthcheck", "--url", &url]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
}

#[test]
fn explain_names_the_configuration_the_mapped_name_and_the_limits() {
    let output = run(&["explain", "--username", "Admin", "--ip", "192.0.2.7"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let text = stdout(&output);
    assert!(text.starts_with("configuration: embedded\n"), "{text}");
    assert!(text.contains("rule: reserved\n"), "{text}");
    assert!(
        text.contains("username: admin (sent as \"Admin\")\n"),
        "{text}"
    );
    // The embedded example recommends 30 attempts an hour.
    assert!(
        text.contains("  attempts_per_ip: 30 per 1h, key 192.0.2.7, refunded never\n"),
        "{text}"
    );
    let config =
        TempConfig::new("[rate_limit]\nregistrations_per_ip = { count = 2, period = \"1d\" }\n");
    let output = run(&[
        "explain",
        "--config",
        config.path().to_str().unwrap(),
        "--username",
        "carol",
    ]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let text = stdout(&output);
    assert!(
        text.starts_with(&format!("configuration: {}\n", config.path().display())),
        "{text}"
    );
    assert!(text.contains("  attempts_per_ip: not set\n"), "{text}");
    assert!(
        text.contains("  registrations_per_ip: 2 per 24h, key -, refunded when the homeserver"),
        "{text}"
    );
}

#[test]
fn check_redacts_the_redis_password() {
    let config = TempConfig::new(
        "[rate_limit]\nstore = \"redis\"\nredis_url = \"redis://:s3cret-pass@redis:6379/0\"\n",
    );
    let output = check(config.path());
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let printed = stdout(&output);
    assert!(!printed.contains("s3cret-pass"), "{printed}");
    assert!(printed.contains("redis://:***@redis:6379/0"), "{printed}");
}

/// `check`, `explain` and `serve` print where a configuration fails to
/// parse, never the line: it may hold a password.
#[test]
fn a_syntax_error_on_a_secret_line_never_prints_the_secret() {
    let port = free_port();
    let config = TempConfig::new(&format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[rate_limit]\nstore = \"redis\"\n\
         redis_url = \"redis://:s3cret-pass@redis:6379/0\n"
    ));
    let path = config.path().to_str().unwrap();
    for output in [
        check(config.path()),
        run(&["explain", "--config", path, "--username", "alice"]),
        serve_refused(config.path(), port).0,
    ] {
        let text = format!("{}{}", stdout(&output), stderr(&output));
        assert_eq!(output.status.code(), Some(EXIT_CONFIG), "{text}");
        assert!(!text.contains("s3cret-pass"), "{text}");
        assert!(
            text.contains("not valid TOML at line 5, column 47 (rate_limit.redis_url)"),
            "{text}"
        );
    }
}

#[test]
fn check_shows_passwords_with_delimiters_and_webhook_urls_redacted() {
    let config = TempConfig::new(
        "[rate_limit]\nstore = \"redis\"\nredis_url = \"redis://:Ab/Cd+s3cret==@redis:6379\"\n\
         [notify]\nwebhook_url = \"http://hook:s3cret@relay:8080/s3cret/path?token=s3cret\"\n",
    );
    let output = check(config.path());
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let printed = stdout(&output);
    assert!(!printed.contains("s3cret"), "{printed}");
    assert!(printed.contains("redis://:***@redis:6379"), "{printed}");
    assert!(
        printed.contains("webhook_url = \"http://relay:8080\""),
        "{printed}"
    );
}

#[test]
fn check_says_how_bridges_are_treated_and_never_prints_their_tokens() {
    let output = check(&example_path());
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("# application services: no registration file configured"),
        "{}",
        stdout(&output)
    );
    let bridge = std::env::temp_dir().join(format!("mgk-cli-bridge-{}.yaml", std::process::id()));
    std::fs::write(
        &bridge,
        "id: telegram\nurl: null\nas_token: as-s3cret\nhs_token: hs-s3cret\n\
         sender_localpart: telegrambot\nnamespaces:\n  users:\n    - regex: '@telegram_.*'\n",
    )
    .unwrap();
    let config = TempConfig::new(&format!(
        "[homeserver]\napp_service_config_files = [{:?}]\n",
        bridge.display().to_string()
    ));
    let output = check(config.path());
    let printed = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(
        printed.contains("# application services: 1 registration file(s) (telegram)"),
        "{printed}"
    );
    assert!(!printed.contains("s3cret"), "{printed}");
    let _ = std::fs::remove_file(bridge);
}

#[test]
fn healthcheck_failures_name_the_url() {
    let url = format!("http://127.0.0.1:{}/healthz", free_port());
    let output = run(&["healthcheck", "--url", &url]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(stderr(&output).contains(&url), "{}", stderr(&output));
}

/// Runs `serve` until its stderr shows `wanted` (or it exits), then stops it
/// and returns its exit status and stderr.
fn serve_until(config: &Path, env: &[(&str, &str)], wanted: &str) -> (Option<i32>, String) {
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--config", config.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().expect("binary starts");
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut stderr, &mut buf) {
            if n == 0 {
                break;
            }
            text.extend_from_slice(&buf[..n]);
            let _ = tx.send(String::from_utf8_lossy(&text).into_owned());
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut text = String::new();
    loop {
        if let Ok(more) = rx.recv_timeout(Duration::from_millis(50)) {
            text = more;
        }
        if text.contains(wanted) {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            while let Ok(more) = rx.recv_timeout(Duration::from_millis(200)) {
                text = more;
            }
            return (status.code(), text);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve never printed {wanted:?}:\n{text}");
        }
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    while let Ok(more) = rx.recv_timeout(Duration::from_millis(200)) {
        text = more;
    }
    (status.code(), text)
}

#[test]
fn a_log_level_typo_is_refused_not_silence() {
    let port = free_port();
    let config = TempConfig::new(&format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[log]\nlevel = \"inof\"\n"
    ));
    let (code, text) = serve_until(config.path(), &[], "never");
    assert_eq!(code, Some(EXIT_CONFIG), "{text}");
    assert!(text.contains("log.level"), "{text}");
    assert!(text.contains("inof"), "{text}");

    let good = TempConfig::new(&format!("[server]\nlisten = \"127.0.0.1:{port}\"\n"));
    let (code, text) = serve_until(good.path(), &[("RUST_LOG", "wran")], "never");
    assert_eq!(code, Some(EXIT_CONFIG), "{text}");
    assert!(text.contains("RUST_LOG"), "{text}");
}

#[test]
fn start_up_is_plain_text_and_says_what_it_found() {
    let port = free_port();
    let admin = free_port();
    let homeserver = free_port();
    let config = TempConfig::new(&format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
         [upstream]\nurl = \"http://127.0.0.1:{homeserver}\"\n"
    ));
    let (code, text) = serve_until(config.path(), &[], "cannot be reached");
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains('\u{1b}'), "colour codes on a pipe:\n{text}");
    let listening = text
        .lines()
        .find(|line| line.contains("matrix-gatekeeper listening"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        listening.contains(&format!("listen=127.0.0.1:{port}")),
        "{listening}"
    );
    assert!(
        listening.contains(&format!("admin=127.0.0.1:{admin}")),
        "{listening}"
    );
    assert!(
        listening.contains(&format!("config={}", config.path().display())),
        "{listening}"
    );
    assert!(!listening.contains("Some("), "{listening}");
    assert!(!listening.contains('['), "{listening}");
    let warning = text
        .lines()
        .find(|line| line.contains("cannot be reached"))
        .unwrap();
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        warning.contains(&format!("127.0.0.1:{homeserver}")),
        "{warning}"
    );
}

#[test]
fn a_bind_failure_names_the_listener_and_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let free = free_port();
    for (config, key) in [
        (
            format!("[server]\nlisten = \"127.0.0.1:{port}\"\n"),
            "server.listen",
        ),
        (
            format!(
                "[server]\nlisten = \"127.0.0.1:{free}\"\nadmin_listen = \"127.0.0.1:{port}\"\n"
            ),
            "server.admin_listen",
        ),
    ] {
        let config = TempConfig::new(&config);
        let (code, text) = serve_until(config.path(), &[], "never");
        assert_eq!(code, Some(71), "{text}");
        assert!(text.contains(key), "{key}: {text}");
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    }
}

#[test]
fn serve_with_a_broken_list_file_exits_64_naming_the_file_and_the_line() {
    let list = TempConfig::new("# exits\n203.0.113.9\n\n203.0.113.0/33\n");
    let port = free_port();
    let config = TempConfig::new(&format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n[client_ip]\ndeny_lists = [{:?}]\n",
        list.path().display().to_string()
    ));
    let (output, _held) = serve_refused(config.path(), port);
    assert_eq!(
        output.status.code(),
        Some(EXIT_CONFIG),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        stderr(&output).trim_end(),
        format!(
            "matrix-gatekeeper: invalid configuration: client_ip.deny_lists: {}:4: not an address or network: \"203.0.113.0/33\"",
            list.path().display()
        )
    );
    // `check` refuses it the same way.
    let checked = check(config.path());
    assert_eq!(checked.status.code(), Some(EXIT_CONFIG));
    assert!(
        stderr(&checked).contains(":4: not an address or network"),
        "{}",
        stderr(&checked)
    );
}

#[test]
fn explain_names_the_list_that_refuses_an_address_or_an_email_domain() {
    let exits = TempConfig::new("198.51.100.0/24\n");
    let disposable = TempConfig::new("mailinator.com\n");
    let config = TempConfig::new(&format!(
        "[client_ip]\ndeny_lists = [{:?}]\n[email]\ndenied_domain_lists = [{:?}]\n",
        exits.path().display().to_string(),
        disposable.path().display().to_string()
    ));
    let path = config.path().to_str().unwrap();
    let listed = run(&["explain", "--config", path, "--ip", "198.51.100.9"]);
    assert_eq!(listed.status.code(), Some(1), "{}", stderr(&listed));
    let text = stdout(&listed);
    assert!(text.contains("rule: deny_list\n"), "{text}");
    assert!(
        text.contains(&format!("list: {}\n", exits.path().display())),
        "{text}"
    );
    let email = run(&[
        "explain",
        "--config",
        path,
        "--email",
        "bot@x.Mailinator.com",
    ]);
    assert_eq!(email.status.code(), Some(1), "{}", stderr(&email));
    let text = stdout(&email);
    assert!(text.contains("rule: email_domain_list\n"), "{text}");
    assert!(text.contains("answer: 403 M_THREEPID_DENIED"), "{text}");
    let free = run(&["explain", "--config", path, "--email", "alice@example.org"]);
    assert_eq!(free.status.code(), Some(0), "{}", stdout(&free));
    assert!(
        stdout(&free).contains("forwarded: POST /_matrix/client/v3/register/email/requestToken"),
        "{}",
        stdout(&free)
    );
}

/// Runs the binary from async code without blocking the runtime that
/// serves the gate it talks to.
async fn run_async(args: &[&str]) -> Output {
    tokio::process::Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("binary runs")
}

/// Asserts `output` exited with `code` and printed every one of `wanted`;
/// returns its stdout.
fn expect(output: &Output, code: i32, wanted: &[&str]) -> String {
    let text = stdout(output);
    assert_eq!(output.status.code(), Some(code), "{text}{}", stderr(output));
    for wanted in wanted {
        assert!(text.contains(wanted), "no {wanted:?} in:\n{text}");
    }
    text
}

#[tokio::test]
async fn explain_reads_bans_the_lockdown_and_budgets_from_the_running_gate() {
    use common::admin::{admin, register, token_file, TOKEN};
    use http::Method;

    let hs = common::FakeHomeserver::start().await;
    let token = token_file("cli-explain", TOKEN);
    let text = common::admin::toml(
        &hs,
        &format!(
            "[client_ip]\ntrusted_proxies = [\"127.0.0.1\"]\n\
             [rate_limit]\nattempts_per_ip = {{ count = 5, period = \"1h\" }}\n\
             registrations_per_ip = {{ count = 1, period = \"1h\" }}\n\
             [admin]\ntoken_file = \"{}\"\n",
            token.display()
        ),
    );
    let config = TempConfig::new(&text);
    let parsed = matrix_gatekeeper::Config::from_toml(&text).unwrap();
    let gate = common::Gate::start_full(parsed, true, None).await;
    let url = format!("http://{}", gate.admin.unwrap());
    let path = config.path().to_str().unwrap();
    let explain = |ip: &'static str| {
        let url = url.clone();
        async move {
            let args = ["--username", "alice", "--ip", ip, "--admin", &url];
            run_async(&[&["explain", "--config", path][..], &args].concat()).await
        }
    };

    let read_from = format!("live state: read from {url}\n");
    expect(
        &explain("203.0.113.9").await,
        0,
        &[
            &read_from,
            "lockdown: registration is open now\n",
            "temporary bans: none covers 203.0.113.9 (0 in force)",
            "attempts_per_ip: 5 per 1h, key 203.0.113.9, refunded never; 5 of 5 left\n",
        ],
    );

    // A temporary ban decides before anything else the gate reads.
    let ban = r#"{"cidr":"203.0.113.0/24","duration":"2h","reason":"spam wave"}"#;
    assert_eq!(
        admin(&gate, Method::POST, "/v1/bans", ban).await.status,
        200
    );
    expect(
        &explain("203.0.113.9").await,
        1,
        &[
            "decision: refused\nrule: temporary_ban\n",
            "temporary ban: 203.0.113.0/24 covers the address, ",
            "(reason: \"spam wave\")",
        ],
    );

    // A closing by hand refuses every registration.
    let close = r#"{"duration":"1h"}"#;
    assert_eq!(
        admin(&gate, Method::POST, "/v1/lockdown", close)
            .await
            .status,
        200
    );
    expect(
        &explain("198.51.100.7").await,
        1,
        &[
            "decision: refused\nrule: lockdown\n",
            "answer: 403 M_FORBIDDEN: Registration is temporarily closed",
            "lockdown: registration is closed now, ",
        ],
    );
    assert_eq!(
        admin(&gate, Method::DELETE, "/v1/lockdown", "")
            .await
            .status,
        200
    );

    // A client that spent its registration is rate limited, by name, and
    // the gate agrees.
    assert_eq!(register(&gate, "198.51.100.7").await.status, 200);
    expect(
        &explain("198.51.100.7").await,
        1,
        &[
            "decision: rate limited\nrule: registrations_per_ip\n",
            "attempts_per_ip: 5 per 1h, key 198.51.100.7, refunded never; 4 of 5 left\n",
            "registrations_per_ip: 1 per 1h, key 198.51.100.7, refunded when the homeserver \
             answers with anything but a 2xx; 0 of 1 left, next in ",
        ],
    );
    assert_eq!(register(&gate, "198.51.100.7").await.status, 429);

    // What cannot be read is said, with its own exit status.
    let wrong = token_file("cli-explain-wrong", "not-the-right-token-at-all");
    let wrong = wrong.to_str().unwrap();
    let output = run_async(&[
        "explain",
        "--config",
        path,
        "--ip",
        "192.0.2.1",
        "--admin",
        &url,
        "--admin-token-file",
        wrong,
    ])
    .await;
    expect(&output, 69, &["live state: could not be read from"]);
    assert!(
        stderr(&output).contains("401: M_UNKNOWN_TOKEN"),
        "{}",
        stderr(&output)
    );
    let nothing = format!("http://127.0.0.1:{}", free_port());
    let output = run_async(&["explain", "--config", path, "--admin", &nothing]).await;
    expect(&output, 69, &["decision: allowed, as far as known without"]);
    assert!(stderr(&output).contains(&nothing), "{}", stderr(&output));
    let https = run_async(&[
        "explain",
        "--config",
        path,
        "--admin",
        "https://127.0.0.1:9",
    ])
    .await;
    expect(&https, EXIT_CONFIG, &[]);
    assert!(stderr(&https).contains("plain HTTP"), "{}", stderr(&https));
    let no_token = run_async(&["explain", "--admin", &url]).await;
    expect(&no_token, EXIT_CONFIG, &[]);
    assert!(
        stderr(&no_token).contains("--admin-token-file"),
        "{}",
        stderr(&no_token)
    );
    // Without --admin, nothing is read, and the output says so.
    let output = run_async(&["explain", "--config", path, "--ip", "203.0.113.9"]).await;
    expect(&output, 0, &["live state: not read"]);
}

#[tokio::test]
async fn explain_looks_the_address_up_in_the_dnsbls() {
    let dns = common::dns_responder::DnsResponder::start(&["9.2.0.192.bl.test"]).await;
    let zones = |zones: &str, extra: &str| {
        TempConfig::new(&format!(
            "[reputation]\ndnsbl = [{zones}]\ndns_server = \"{}\"\n{extra}",
            dns.addr
        ))
    };
    let config = zones("\"bl.test\"", "");
    let path = config.path().to_str().unwrap();

    expect(
        &run_async(&["explain", "--config", path, "--ip", "192.0.2.9"]).await,
        1,
        &[
            "decision: refused\nrule: dnsbl\n",
            "answer: 403 M_FORBIDDEN",
            "dnsbl: listed in bl.test (asked 9.2.0.192.bl.test)",
        ],
    );
    assert_eq!(dns.count("9.2.0.192.bl.test"), 1);
    expect(
        &run_async(&["explain", "--config", path, "--ip", "192.0.2.10"]).await,
        0,
        &["dnsbl: not listed (asked 10.2.0.192.bl.test)"],
    );
    expect(
        &run_async(&["explain", "--config", path, "--ip", "192.0.2.9", "--no-dns"]).await,
        0,
        &[
            "dnsbl: would ask 9.2.0.192.bl.test (a listing refuses with rule dnsbl; \
           no lookup made: --no-dns)",
        ],
    );
    assert_eq!(dns.count("9.2.0.192.bl.test"), 1, "--no-dns asks nothing");

    let failing = zones("\"servfail.test\"", "on_dnsbl_error = \"deny\"\n");
    let path = failing.path().to_str().unwrap();
    expect(
        &run_async(&["explain", "--config", path, "--ip", "192.0.2.9"]).await,
        1,
        &[
            "rule: dnsbl_error\n",
            "dnsbl: the lookup in servfail.test failed: the DNS server answered with error code 2",
            "on_dnsbl_error = \"deny\" refuses it with rule dnsbl_error",
        ],
    );
}
