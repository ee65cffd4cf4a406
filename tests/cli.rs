//! The `matrix-gatekeeper` binary: `check` and `serve` on good and bad
//! configuration files, exit statuses and messages.

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
    // What it prints is itself a valid configuration.
    let again = matrix_gatekeeper::Config::from_toml(&printed).expect("printed config loads");
    assert_eq!(again.to_toml(), printed);
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

#[test]
fn serve_with_a_bad_config_exits_64_without_binding() {
    let port = free_port();
    let config = TempConfig::new(&format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[guest]\naccess = \"sometimes\"\n"
    ));
    let mut child = Command::new(BIN)
        .args(["serve", "--config", config.path().to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        // While it runs, nothing may listen on its port.
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve bound 127.0.0.1:{port} with an invalid configuration");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve with an invalid configuration did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = child.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(EXIT_CONFIG), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("guest.access"),
        "{}",
        stderr(&output)
    );
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
        text.contains("decision: allowed\nusername: alice\n"),
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
fn healthcheck_fails_without_an_admin_listener() {
    let url = format!("http://127.0.0.1:{}/healthz", free_port());
    let output = run(&["healthcheck", "--url", &url]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
}
