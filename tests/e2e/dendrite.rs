//! A real Dendrite for the end-to-end tests.
//!
//! The first use builds pinned Dendrite with `go install` (the `go` on
//! `PATH`, Go 1.21 or newer; `scripts/test` installs one when none is
//! there) into `target/dendrite/bin`; Go's module cache, build cache and
//! configuration live under `target/dendrite` while it builds and are
//! deleted afterwards, so nothing is written outside the build directory
//! and later runs reuse the binaries. Each [`Dendrite`] is a private
//! homeserver on a free loopback port, with its generated configuration,
//! key and sqlite databases in its own temporary directory, killed when
//! the value is dropped (also on a failing test) and by a watchdog if the
//! test process dies.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::homeserver_process::HomeserverProcess;
use crate::synapse::{free_port, target_dir, SERVER_NAME};

/// The Go module Dendrite is built from.
const MODULE: &str = "github.com/matrix-org/dendrite";

/// The pinned version.
pub const VERSION: &str = "v0.13.8";

/// The commands installed: the server, and the two that make its
/// configuration and its signing key.
const COMMANDS: &[&str] = &["dendrite", "generate-config", "generate-keys"];

/// The directory holding the built commands, built on first use.
fn bin_dir() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(install)
}

/// Builds the [`COMMANDS`] at [`VERSION`] into `target/dendrite/bin`,
/// unless the marker there already names that version.
fn install() -> PathBuf {
    let root = target_dir().join("dendrite");
    let bin = root.join("bin");
    let marker = bin.join(".installed");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(VERSION) {
        return bin;
    }
    eprintln!("building Dendrite {VERSION} into {} (once)", bin.display());
    let work = root.join("build");
    let packages: Vec<String> = COMMANDS
        .iter()
        .map(|command| format!("{MODULE}/cmd/{command}@{VERSION}"))
        .collect();
    let status = Command::new("go")
        .arg("install")
        .args(&packages)
        .env("GOBIN", &bin)
        .env("GOPATH", work.join("gopath"))
        .env("GOMODCACHE", work.join("gopath/pkg/mod"))
        .env("GOCACHE", work.join("cache"))
        // Go's own settings and telemetry go to the user's configuration
        // directory otherwise.
        .env("XDG_CONFIG_HOME", work.join("config"))
        // A writable module cache, so that it can be deleted below.
        .env("GOFLAGS", "-modcacherw")
        .status()
        .expect("`go` must be installed (Go 1.21 or newer; scripts/test installs it)");
    assert!(status.success(), "go install {packages:?} failed");
    // About 1 GB of caches that later runs do not need.
    std::fs::remove_dir_all(&work).unwrap();
    std::fs::write(&marker, VERSION).unwrap();
    bin
}

/// Replaces the one line `from` of the generated configuration with `to`,
/// so that a generator that changed its output fails here, by name.
fn replace_line(config: &mut String, from: &str, to: &str) {
    let matches = config.lines().filter(|line| *line == from).count();
    assert_eq!(
        matches, 1,
        "generated dendrite.yaml: {from:?} found {matches} times"
    );
    *config = config
        .lines()
        .map(|line| if line == from { to } else { line })
        .collect::<Vec<_>>()
        .join("\n");
}

/// A running Dendrite.
pub struct Dendrite {
    pub port: u16,
    /// Its directory: configuration, key and sqlite databases.
    dir: PathBuf,
    _process: HomeserverProcess,
}

impl Dendrite {
    /// Starts Dendrite named [`SERVER_NAME`], registration open, guests
    /// allowed, federation off, with `app_service_files` as its application
    /// services, and passwords hashed with bcrypt's lowest cost (4, as
    /// Synapse's `bcrypt_rounds: 4` in these tests).
    ///
    /// Its own `/register` limiter is off: it keys on the one
    /// `X-Forwarded-For` address the gate sends (5 requests per 500 ms by
    /// default) and runs before the token check, ignoring an application
    /// service's `rate_limited: false`, so a bridge's burst would be
    /// throttled by Dendrite whatever the gate lets through.
    pub async fn start(app_service_files: &[&Path]) -> Dendrite {
        let bin = bin_dir();
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("mgk-dendrite-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let generated = Command::new(bin.join("generate-config"))
            .arg("-dir")
            .arg(&dir)
            .args(["-server", SERVER_NAME])
            .output()
            .unwrap();
        assert!(generated.status.success(), "generate-config: {generated:?}");
        let key = dir.join("matrix_key.pem");
        let keys = Command::new(bin.join("generate-keys"))
            .arg("-private-key")
            .arg(&key)
            .output()
            .unwrap();
        assert!(keys.status.success(), "generate-keys: {keys:?}");

        let mut config = String::from_utf8(generated.stdout).unwrap();
        let files: Vec<String> = app_service_files
            .iter()
            .map(|file| format!("{:?}", file.display().to_string()))
            .collect();
        for (from, to) in [
            (
                "  private_key: matrix_key.pem".to_owned(),
                format!("  private_key: {:?}", key.display().to_string()),
            ),
            (
                "  disable_federation: false".into(),
                "  disable_federation: true".into(),
            ),
            (
                "  registration_disabled: true".into(),
                "  registration_disabled: false".into(),
            ),
            // Guests are allowed, as generated: the scenarios count the
            // guests Dendrite makes.
            (
                "  guests_disabled: false".into(),
                "  guests_disabled: false".into(),
            ),
            (
                "  config_files: []".into(),
                format!("  config_files: [{}]", files.join(", ")),
            ),
            ("  bcrypt_cost: 10".into(), "  bcrypt_cost: 4".into()),
        ] {
            replace_line(&mut config, &from, &to);
        }
        let limiter = "  rate_limiting:\n    enabled: true\n";
        assert!(
            config.contains(limiter),
            "generated dendrite.yaml: no {limiter:?}"
        );
        config = config.replace(limiter, "  rate_limiting:\n    enabled: false\n");
        let config_path = dir.join("dendrite.yaml");
        std::fs::write(&config_path, config).unwrap();

        let mut command = Command::new(bin.join("dendrite"));
        command
            .arg("-config")
            .arg(&config_path)
            .args(["-http-bind-address", &format!("127.0.0.1:{port}")])
            // Open registration without a captcha or a token is refused
            // unless asked for by name.
            .arg("-really-enable-open-registration");
        let mut process = HomeserverProcess::spawn("dendrite", command, &dir).with_watchdog();
        process
            .wait_ready(&format!("http://127.0.0.1:{port}"))
            .await;
        Dendrite {
            port,
            dir,
            _process: process,
        }
    }

    /// The homeserver's own base URL (bypassing the gate).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The sqlite database holding its accounts (`userapi_accounts`).
    pub fn accounts_database(&self) -> PathBuf {
        self.dir.join("dendrite_userapi.db")
    }
}
