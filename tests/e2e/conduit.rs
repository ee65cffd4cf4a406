//! The homeserver-generic scenarios (`scenarios/`) against a real Conduit
//! 0.10, when the environment names one: `MGK_E2E_CONDUIT` is the path of
//! a `conduit` binary. Without it every test here says it was skipped and
//! passes.
//!
//! Each test starts its own Conduit on a free loopback port: sqlite in its
//! own temporary directory, registration open without a token, federation
//! and update checks off, configured by a TOML file named by
//! `CONDUIT_CONFIG` (other `CONDUIT_*` variables, which Conduit would read
//! as configuration, are removed from its environment). It is killed when
//! the test ends, and by a watchdog if the test process dies.
//!
//! Where Conduit answers differently from Dendrite the scenarios branch on
//! it and say why: it registers all-digit names and names with a leading
//! `_`, has no guest upgrades and no switch for guests (a guest is made
//! whenever registration is open, under a random name), forgets a UIA
//! session once it completed, and counts 255 bytes for a user ID as the
//! spec does.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::homeserver_process::HomeserverProcess;
use crate::scenarios::{clients, guests, names, routes, uia, Homeserver};
use crate::synapse::{free_port, SERVER_NAME};

/// The environment variable naming the Conduit binary.
pub const BINARY_VARIABLE: &str = "MGK_E2E_CONDUIT";

/// A running Conduit.
pub struct Conduit {
    pub port: u16,
    /// Its sqlite database file.
    database: PathBuf,
    _process: HomeserverProcess,
}

impl Conduit {
    /// The binary named by [`BINARY_VARIABLE`], if any.
    pub fn binary() -> Option<PathBuf> {
        std::env::var_os(BINARY_VARIABLE)
            .filter(|path| !path.is_empty())
            .map(PathBuf::from)
    }

    /// Starts `binary` named [`SERVER_NAME`] with open registration.
    pub async fn start(binary: &Path) -> Conduit {
        assert!(
            binary.is_file(),
            "{BINARY_VARIABLE}={} is not a file",
            binary.display()
        );
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("mgk-conduit-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let config = format!(
            "[global]\n\
             server_name = \"{SERVER_NAME}\"\n\
             database_backend = \"sqlite\"\n\
             database_path = {data:?}\n\
             address = \"127.0.0.1\"\n\
             port = {port}\n\
             allow_registration = true\n\
             allow_federation = false\n\
             allow_check_for_updates = false\n\
             trusted_servers = []\n\
             log = \"warn\"\n",
            data = data.display().to_string(),
        );
        let config_path = dir.join("conduit.toml");
        std::fs::write(&config_path, config).unwrap();

        let mut command = Command::new(binary);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("CONDUIT_") {
                command.env_remove(name);
            }
        }
        command.env("CONDUIT_CONFIG", &config_path);
        let mut process = HomeserverProcess::spawn("conduit", command, &dir).with_watchdog();
        process
            .wait_ready(&format!("http://127.0.0.1:{port}"))
            .await;
        Conduit {
            port,
            database: data.join("conduit.db"),
            _process: process,
        }
    }

    /// The homeserver's own base URL (bypassing the gate).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its sqlite database: its users are the keys of `userid_password`.
    pub fn database(&self) -> &Path {
        &self.database
    }
}

/// A fresh Conduit and its handle for the scenarios, or `None` (and a note
/// on standard error) when no binary is named.
async fn conduit(test: &str) -> Option<(Conduit, Homeserver)> {
    let Some(binary) = Conduit::binary() else {
        eprintln!(
            "{test}: skipped, no Conduit: set {BINARY_VARIABLE} to a Conduit 0.10 binary to run it"
        );
        return None;
    };
    let conduit = Conduit::start(&binary).await;
    let hs = Homeserver::conduit(conduit.url(), conduit.database.clone());
    Some((conduit, hs))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conduit_refused_names_never_become_accounts() {
    let Some((_conduit, hs)) = conduit("conduit_refused_names_never_become_accounts").await else {
        return;
    };
    names::refused_names_never_become_accounts(&hs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conduit_every_uia_step_is_checked() {
    let Some((_conduit, hs)) = conduit("conduit_every_uia_step_is_checked").await else {
        return;
    };
    uia::every_uia_step_is_checked(&hs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conduit_the_audited_name_is_the_account_made() {
    let Some((_conduit, hs)) = conduit("conduit_the_audited_name_is_the_account_made").await else {
        return;
    };
    clients::the_audited_name_is_the_account_made(&hs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conduit_guests_follow_the_guest_policy() {
    let Some((_conduit, hs)) = conduit("conduit_guests_follow_the_guest_policy").await else {
        return;
    };
    guests::guests_follow_the_guest_policy(&hs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conduit_a_guest_token_upgrades_nothing() {
    let Some((_conduit, hs)) = conduit("conduit_a_guest_token_upgrades_nothing").await else {
        return;
    };
    guests::a_guest_token_upgrades_nothing(&hs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conduit_a_user_without_a_password() {
    let Some((_conduit, hs)) = conduit("conduit_a_user_without_a_password").await else {
        return;
    };
    guests::a_user_without_a_password(&hs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conduit_availability_is_answered_by_the_gate_or_for_the_mapped_name() {
    let Some((_conduit, hs)) =
        conduit("conduit_availability_is_answered_by_the_gate_or_for_the_mapped_name").await
    else {
        return;
    };
    routes::availability_is_answered_by_the_gate_or_for_the_mapped_name(&hs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conduit_every_spelling_of_register_is_guarded() {
    let Some((_conduit, hs)) = conduit("conduit_every_spelling_of_register_is_guarded").await
    else {
        return;
    };
    routes::every_spelling_of_register_is_guarded(&hs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conduit_matrix_nio_registers_syncs_and_logs_in() {
    let Some((_conduit, hs)) = conduit("conduit_matrix_nio_registers_syncs_and_logs_in").await
    else {
        return;
    };
    clients::matrix_nio_registers_syncs_and_logs_in(&hs).await;
}
