//! Reloading: the configuration file (and the list and application
//! service files it names) read again on SIGHUP or, with `watch_config`,
//! when one of them changes; the new policy swapped in without dropping a
//! request.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::admin::api::AdminToken;
use crate::config::{Config, ConfigError};
use crate::defences::lists::remote::{refresh_lists, RemoteSet};
use crate::defences::lists::Stamp;
use crate::gate::RegistrationGateLayer;
use crate::notify::Event;
use tokio::sync::watch;

/// Re-reads the configuration file and swaps the gate's policy.
#[derive(Debug, Clone)]
pub struct Reloader {
    pub(super) gate: RegistrationGateLayer,
    pub(super) path: Option<PathBuf>,
    /// The configuration the process started with: the values of the
    /// restart-only keys in force.
    pub(super) running: Arc<Config>,
    /// The list files the configuration in force reads (`deny_lists`,
    /// `denied_domain_lists`, `deny_asn_lists`, the network databases),
    /// watched with the file.
    pub(super) lists: Arc<Mutex<Vec<PathBuf>>>,
    /// The admin API's token, read again at every reload.
    pub(super) admin_token: AdminToken,
    /// The lists fetched from URLs in the configuration in force, for the
    /// refresher; replaced at every reload.
    pub(super) remote_lists: Arc<watch::Sender<RemoteSet>>,
}

/// A watched file: its path, and its modification time and length (`None`
/// while it cannot be read).
pub(super) type FileStamp = (PathBuf, Stamp);

/// The list files, network databases and application service files a
/// configuration reads (not the copies of lists fetched from URLs: the
/// refresher reloads when it writes one).
pub(super) fn list_files(config: &Config) -> Vec<PathBuf> {
    config
        .client_ip
        .deny_lists
        .sources()
        .paths()
        .chain(config.email.denied_domain_lists.sources().paths())
        .chain(config.reputation.deny_asn_lists.sources().paths())
        .chain(
            config
                .reputation
                .databases()
                .filter_map(|db| db.file())
                .map(|(path, _)| path),
        )
        .map(PathBuf::from)
        .chain(config.homeserver.app_service_config_files.iter().cloned())
        .collect()
}

impl Reloader {
    /// Loads and validates the file; on success the new policy takes effect
    /// for the next request, on failure the old one stays.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let Some(path) = &self.path else {
            tracing::info!("no configuration file to reload (embedded configuration)");
            return Ok(());
        };
        let result = Config::from_file(path);
        self.gate.metrics().reload(result.is_ok());
        let config = match result {
            Ok(config) => config,
            Err(error) => {
                tracing::error!(%error, "configuration reload refused; the previous configuration stays");
                self.gate.notifier().send(Event::ReloadFailed {
                    error: error.to_string(),
                });
                return Err(error);
            }
        };
        // Compared with what runs, not with the last file read: a second
        // reload warns again, and a reverted file does not.
        for key in self.running.restart_only_changes(&config) {
            tracing::warn!(key, "changed, but takes effect only after a restart");
        }
        self.gate.reload(&config);
        *self.lists.lock().unwrap_or_else(PoisonError::into_inner) = list_files(&config);
        self.remote_lists.send_replace(config.remote_set());
        // The token was read (once) with the configuration.
        self.admin_token.set(config.admin.token());
        tracing::info!(path = %path.display(), "configuration reloaded");
        Ok(())
    }

    /// The configuration file and the list files in force, stamped; empty
    /// without a configuration file.
    fn watched(&self) -> Vec<FileStamp> {
        let Some(path) = &self.path else {
            return Vec::new();
        };
        let lists = self.lists.lock().unwrap_or_else(PoisonError::into_inner);
        std::iter::once(path)
            .chain(lists.iter())
            .map(|path| (path.clone(), crate::defences::lists::stamp(path)))
            .collect()
    }

    /// What [`Reloader::watched`] would have answered when the files of
    /// `config` were read: the configuration file's stamp from
    /// `config_stamp`, the lists' from `config` itself.
    pub(super) fn watched_when_read(&self, config: &Config, config_stamp: Stamp) -> Vec<FileStamp> {
        let Some(path) = &self.path else {
            return Vec::new();
        };
        let lists = config.client_ip.deny_lists.sources().stamps();
        let lists = lists.chain(config.email.denied_domain_lists.sources().stamps());
        let lists = lists.chain(config.reputation.deny_asn_lists.sources().stamps());
        let databases = config.reputation.databases();
        let lists = lists.chain(databases.filter_map(|db| db.file()));
        std::iter::once((path.clone(), config_stamp))
            .chain(lists.map(|(path, stamp)| (PathBuf::from(path), stamp)))
            .chain(config.homeserver.app_services.stamps().cloned())
            .collect()
    }
}

/// SIGHUPs, caught from the moment [`Hangups::listen`] was called: from
/// then on a SIGHUP no longer ends the process (its default action), and
/// one that arrives before the server runs still reloads once it does.
#[derive(Debug)]
pub struct Hangups {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl Hangups {
    /// Starts catching SIGHUP. Must be called inside a Tokio runtime, which
    /// need not be the one the server runs on.
    pub fn listen() -> io::Result<Hangups> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Hangups {
                signal: signal(SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Hangups {})
    }

    /// The next SIGHUP (`None`: no more will come).
    async fn recv(&mut self) -> Option<()> {
        #[cfg(unix)]
        {
            self.signal.recv().await
        }
        #[cfg(not(unix))]
        std::future::pending().await
    }
}

pub(super) async fn reload_on_signal(reloader: Reloader, mut hangups: Hangups) {
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the configuration");
        reload_off_the_runtime(&reloader).await;
    }
}

/// Reloads on a blocking thread: reading and compiling large deny lists
/// takes a while, and a worker of the runtime (the only one, with
/// `workers = 1`) must keep serving meanwhile.
async fn reload_off_the_runtime(reloader: &Reloader) {
    let reloader = reloader.clone();
    if let Err(error) = tokio::task::spawn_blocking(move || reloader.reload()).await {
        tracing::error!(%error, "configuration reload did not finish");
    }
}

/// Keeps the lists fetched from URLs fresh, reloading when one changed.
pub(super) async fn refresh_remote_lists(reloader: Reloader) {
    let set = reloader.remote_lists.subscribe();
    let metrics = reloader.gate.metrics().clone();
    let notifier = reloader.gate.notifier().clone();
    refresh_lists(set, metrics, notifier, || {
        let reloader = reloader.clone();
        async move { reload_off_the_runtime(&reloader).await }
    })
    .await;
}

pub(super) async fn reload_on_change(reloader: Reloader, read: Option<Vec<FileStamp>>) {
    let mut seen = read.unwrap_or_else(|| reloader.watched());
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let now = reloader.watched();
        // A configuration file that is gone (being replaced) is waited for.
        let present = now.first().is_some_and(|(_, stamp)| stamp.is_some());
        if present && now != seen {
            tracing::info!("configuration or list file changed: reloading");
            reload_off_the_runtime(&reloader).await;
            // A reload that names other list files watches those from now
            // on; otherwise the stamps taken before it stand, so a change
            // made during the reload is still seen.
            let after = reloader.watched();
            let same_files = after.iter().map(|(p, _)| p).eq(now.iter().map(|(p, _)| p));
            seen = if same_files { now } else { after };
        }
    }
}
