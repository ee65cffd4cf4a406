//! A real Synapse for the end-to-end tests.
//!
//! The first use creates a Python venv under the build directory
//! (`target/e2e-venv`) and installs pinned `matrix-synapse` (with its OIDC
//! extra), `matrix-nio`, `schemathesis` (the spec fuzzer),
//! `oidc-provider-mock` (an OpenID provider with a login form) and
//! `mmdb-writer` (the simulated networks of the wave test) from PyPI;
//! later runs reuse it. Each
//! [`Synapse`] is a private homeserver on a free loopback port with its own
//! sqlite database, killed when the value is dropped (also on a failing
//! test), and by its own watchdog if the test process dies.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::homeserver_process::HomeserverProcess;

/// The pinned packages.
pub const PACKAGES: &[&str] = &[
    "matrix-synapse[oidc]==1.163.2",
    "authlib==1.9.10",
    "matrix-nio==0.26.0",
    "schemathesis==4.32.5",
    "oidc-provider-mock==0.3.4",
    "mmdb-writer==0.2.7",
];

/// The server name every test homeserver uses.
pub const SERVER_NAME: &str = "e2e.test";

/// The target directory of this build.
pub use crate::common::target_dir;

/// The venv with Synapse and matrix-nio, created on first use.
pub fn venv() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| crate::common::python_venv("e2e-venv", PACKAGES))
}

/// The venv's Python.
pub fn python() -> PathBuf {
    venv().join("bin/python")
}

/// A signing key shared by every test homeserver (generated once).
fn signing_key() -> &'static Path {
    static KEY: OnceLock<PathBuf> = OnceLock::new();
    KEY.get_or_init(|| {
        let key = target_dir().join("e2e-signing.key");
        if !key.exists() {
            let status = Command::new(python())
                .args([
                    "-c",
                    "import sys\nfrom signedjson.key import generate_signing_key, write_signing_keys\n\
                     with open(sys.argv[1], 'w') as f:\n    write_signing_keys(f, [generate_signing_key('a_e2e')])",
                ])
                .arg(&key)
                .status()
                .unwrap();
            assert!(status.success(), "signing key generation failed");
        }
        key
    })
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running Synapse.
pub struct Synapse {
    pub port: u16,
    _process: HomeserverProcess,
}

impl Synapse {
    /// Starts Synapse with the base test configuration plus `extra_yaml`
    /// (top-level keys; a key given here replaces the base one).
    pub async fn start(extra_yaml: &str) -> Synapse {
        Synapse::start_on(free_port(), extra_yaml).await
    }

    /// [`Synapse::start`] on a chosen port: for a homeserver that must know
    /// the gate's URL (`public_baseurl`) while the gate is given its own.
    pub async fn start_on(port: u16, extra_yaml: &str) -> Synapse {
        let dir = std::env::temp_dir().join(format!("mgk-synapse-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("media")).unwrap();
        let mut base = vec![
            ("server_name", format!("\"{SERVER_NAME}\"")),
            ("pid_file", format!("\"{}\"", dir.join("homeserver.pid").display())),
            (
                "listeners",
                format!(
                    "\n  - port: {port}\n    bind_addresses: ['127.0.0.1']\n    type: http\n    tls: false\n    x_forwarded: true\n    resources:\n      - names: [client]\n        compress: false"
                ),
            ),
            (
                "database",
                format!(
                    "\n  name: sqlite3\n  args:\n    database: \"{}\"",
                    dir.join("homeserver.db").display()
                ),
            ),
            ("media_store_path", format!("\"{}\"", dir.join("media").display())),
            ("signing_key_path", format!("\"{}\"", signing_key().display())),
            ("report_stats", "false".into()),
            ("trusted_key_servers", "[]".into()),
            ("suppress_key_server_warning", "true".into()),
            ("enable_registration", "true".into()),
            ("enable_registration_without_verification", "true".into()),
            ("allow_guest_access", "true".into()),
            ("bcrypt_rounds", "4".into()),
            ("registration_shared_secret", "\"e2e-shared-secret\"".into()),
            ("macaroon_secret_key", "\"e2e-macaroon\"".into()),
            ("form_secret", "\"e2e-form\"".into()),
            ("rc_registration", "{per_second: 1000, burst_count: 1000}".into()),
            (
                "rc_login",
                "{address: {per_second: 1000, burst_count: 1000}, account: {per_second: 1000, burst_count: 1000}, failed_attempts: {per_second: 1000, burst_count: 1000}}".into(),
            ),
            ("rc_message", "{per_second: 1000, burst_count: 1000}".into()),
            ("max_upload_size", "\"50M\"".into()),
        ];
        let extra: Vec<(&str, &str)> = extra_yaml
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        base.retain(|(k, _)| !extra.iter().any(|(ek, _)| ek == k));
        let mut yaml = String::new();
        for (k, v) in &base {
            yaml.push_str(&format!("{k}: {v}\n"));
        }
        for (k, v) in &extra {
            yaml.push_str(&format!("{k}: {v}\n"));
        }
        let config = dir.join("homeserver.yaml");
        std::fs::write(&config, yaml).unwrap();
        let mut command = Command::new(python());
        command
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/e2e/py/run_synapse.py"
            ))
            .arg(&config);
        let mut process = HomeserverProcess::spawn("synapse", command, &dir);
        process
            .wait_ready(&format!("http://127.0.0.1:{port}"))
            .await;
        Synapse {
            port,
            _process: process,
        }
    }

    /// The homeserver's own base URL (bypassing the gate).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// The status of one `GET`, or `Err` when nothing answered.
pub async fn try_get(url: &str) -> Result<u16, ()> {
    use http_body_util::Empty;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let response = client
        .get(url.parse().map_err(|_| ())?)
        .await
        .map_err(|_| ())?;
    Ok(response.status().as_u16())
}
