//! A homeserver process run by a test (Synapse, Dendrite): started with its
//! output in a log file in its own directory, ready once its client API
//! answers `/_matrix/client/versions`, and killed when the value is
//! dropped — also on a failing test, when the directory is kept for its
//! log.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::synapse::try_get;

/// A running homeserver process and the directory it works in.
pub struct HomeserverProcess {
    /// What it is, for messages (`synapse`, `dendrite`).
    name: &'static str,
    child: Child,
    /// A process that kills `child` when the test process dies (for a
    /// homeserver that cannot watch its parent itself).
    watchdog: Option<Child>,
    dir: PathBuf,
}

impl HomeserverProcess {
    /// Spawns `command` with its output in `dir/<name>.log`.
    pub fn spawn(name: &'static str, mut command: Command, dir: &Path) -> HomeserverProcess {
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let child = command
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        HomeserverProcess {
            name,
            child,
            watchdog: None,
            dir: dir.to_path_buf(),
        }
    }

    /// Adds a watchdog: a shell that kills the homeserver once the test
    /// process is gone, and ends by itself when the homeserver does.
    pub fn with_watchdog(mut self) -> HomeserverProcess {
        let watchdog = Command::new("sh")
            .args([
                "-c",
                "while kill -0 \"$1\" 2>/dev/null && kill -0 \"$2\" 2>/dev/null; do sleep 1; done; \
                 kill -9 \"$2\" 2>/dev/null",
                "watchdog",
            ])
            .arg(std::process::id().to_string())
            .arg(self.child.id().to_string())
            .stdin(Stdio::null())
            .spawn()
            .expect("start the watchdog shell");
        self.watchdog = Some(watchdog);
        self
    }

    /// Waits until `/_matrix/client/versions` on `base_url` answers `200`;
    /// panics with the log's tail if the process exits or 90 s pass.
    pub async fn wait_ready(&mut self, base_url: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        let url = format!("{base_url}/_matrix/client/versions");
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status}; log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if let Ok(Ok(200)) = tokio::time::timeout(Duration::from_secs(2), try_get(&url)).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not become ready; log:\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of the process's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("{}.log", self.name)))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for HomeserverProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(watchdog) = &mut self.watchdog {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("{} log kept in {}", self.name, self.dir.display());
        }
    }
}
