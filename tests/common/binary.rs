//! The `matrix-gatekeeper` binary running `serve` on a configuration file
//! of the test's own, as an operator runs it: its listeners bound on free
//! loopback ports (read back from its start-up line), its standard error
//! kept for the test to read, signals sent to it by process id.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_matrix-gatekeeper");

/// The `[server]` keys that put both listeners on free loopback ports.
pub const LISTEN_ANY: &str = "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n";

/// How long the binary gets to start or to log what a test waits for.
const LOG_WAIT: Duration = Duration::from_secs(10);

/// A directory of files for one test (configuration, lists, token),
/// removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mgk-bin-{}-{name}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// Writes (or rewrites) `name` in the directory; returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `path` as a TOML string literal.
pub fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// A running `matrix-gatekeeper serve`; killed when dropped.
pub struct Served {
    child: Mutex<Child>,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    stderr: Arc<Mutex<String>>,
}

impl Served {
    /// Starts `serve --config config` (without `RUST_LOG`, so `[log]`
    /// decides) and waits for its start-up line.
    pub async fn start(config: &Path) -> Served {
        let mut served = Served::spawn(config);
        served.wait_until_listening().await;
        served
    }

    /// Starts `serve --config config` without waiting for anything.
    pub fn spawn(config: &Path) -> Served {
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the binary starts");
        let stderr: Arc<Mutex<String>> = Arc::default();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let kept = stderr.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut kept = kept.lock().unwrap();
                kept.push_str(&line);
                kept.push('\n');
            }
        });
        Served {
            child: Mutex::new(child),
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: None,
            stderr,
        }
    }

    /// Waits for the start-up line and takes the listeners' addresses
    /// from it.
    pub async fn wait_until_listening(&mut self) {
        let line = self
            .wait_for_line(0, "the start-up line", |l| {
                l.contains("matrix-gatekeeper listening")
            })
            .await;
        self.addr = field(&line, "listen")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no listen address in {line}"));
        self.admin = field(&line, "admin").and_then(|a| a.parse().ok());
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().id().expect("serve is running")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        let admin = self.admin.expect("an admin listener is configured");
        format!("http://{admin}{path}")
    }

    /// Everything the process wrote to standard error so far.
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Where the log ends now: a `since` for [`Served::wait_for_line`].
    pub fn log_mark(&self) -> usize {
        self.stderr.lock().unwrap().len()
    }

    /// The lines written after `since` (a [`Served::log_mark`]).
    pub fn lines_since(&self, since: usize) -> Vec<String> {
        self.stderr.lock().unwrap()[since..]
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits for a line written after `since` that satisfies `wanted`;
    /// fails, showing the log, when the process exits or nothing comes
    /// within 10 s.
    pub async fn wait_for_line(
        &self,
        since: usize,
        what: &str,
        wanted: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + LOG_WAIT;
        loop {
            if let Some(line) = self.lines_since(since).into_iter().find(|l| wanted(l)) {
                return line;
            }
            let exited = self.child.lock().unwrap().try_wait();
            if let Ok(Some(status)) = exited {
                // The last lines may still be in the pipe.
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!("serve exited ({status}) before {what}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {LOG_WAIT:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `signal` (`HUP`, `TERM`) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid();
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {pid}");
    }
}

/// The value of `name` in a log line, text (`name=value`) or JSON
/// (`"name":"value"`).
pub fn field(line: &str, name: &str) -> Option<String> {
    if let Ok(serde_json::Value::Object(json)) = serde_json::from_str(line) {
        return json.get(name).map(|value| match value {
            serde_json::Value::String(text) => text.clone(),
            other => other.to_string(),
        });
    }
    let prefix = format!("{name}=");
    line.split_whitespace()
        .find_map(|token| token.strip_prefix(&prefix))
        .map(|value| value.trim_matches('"').to_owned())
}
