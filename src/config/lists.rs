//! The settings of lists fetched from URLs (`[reputation] list_*`,
//! `[server] state_dir`), and the loading of every configured list once the
//! whole configuration is read.

use rustls::pki_types::CertificateDer;

use super::error::ConfigError;
use super::reputation::ReputationConfig;
use super::values::string_enum;
use super::Config;
use crate::lists::{ListContext, ListKind, RemoteList};

impl ReputationConfig {
    /// The settings of lists fetched from URLs.
    pub(super) fn validate_lists(&self) -> Result<(), ConfigError> {
        self.list_refresh
            .check_positive("reputation.list_refresh")?;
        self.list_timeout
            .check_positive("reputation.list_timeout")?;
        if self.list_max_bytes == 0 {
            return Err(ConfigError::invalid(
                "reputation.list_max_bytes",
                "must be more than zero",
            ));
        }
        if self.list_max_age.0 < self.list_refresh.0 {
            return Err(ConfigError::invalid(
                "reputation.list_max_age",
                format!(
                    "\"{}\" is shorter than list_refresh (\"{}\"): every list would be stale between two fetches",
                    self.list_max_age, self.list_refresh
                ),
            ));
        }
        if let Some(path) = &self.list_ca_file {
            self.list_roots().map_err(|error| {
                ConfigError::invalid(
                    "reputation.list_ca_file",
                    format!("{}: {error}", path.display()),
                )
            })?;
        }
        Ok(())
    }

    /// The extra roots of `list_ca_file` (none without it).
    pub fn list_roots(&self) -> Result<Vec<CertificateDer<'static>>, String> {
        match &self.list_ca_file {
            Some(path) => crate::tls::load_ca_file(path),
            None => Ok(Vec::new()),
        }
    }
}

/// Default `list_max_bytes`: 64 MiB, ten times a full FireHOL level 1-4
/// list.
pub const DEFAULT_LIST_MAX_BYTES: u64 = 64 * 1024 * 1024;

string_enum!(
    /// What a fetched list that has not been refreshed for longer than
    /// `list_max_age` does.
    OnStaleList {
        /// Keep guarding with the last copy.
        Keep => "keep",
        /// Stop using it (the list is empty) until a fetch succeeds.
        Drop => "drop",
    } default Keep
);

impl Config {
    /// What loading the lists needs from the rest of the configuration.
    pub fn list_context(&self) -> ListContext {
        ListContext {
            state_dir: self.server.state_dir.clone(),
            max_age: Some(self.reputation.list_max_age.0),
            drop_stale: self.reputation.on_stale_list == OnStaleList::Drop,
        }
    }

    /// Reads every configured list (`[client_ip] deny_lists`, `[email]
    /// denied_domain_lists`): files, and the copies of URLs under `[server]
    /// state_dir` (a URL without a copy yet loads empty; nothing is
    /// fetched here). Errors name the key.
    pub fn load_lists(&mut self) -> Result<(), ConfigError> {
        let first_url = self
            .client_ip
            .deny_lists
            .entries()
            .iter()
            .map(|entry| (ListKind::Addresses, entry))
            .chain(
                self.email
                    .denied_domain_lists
                    .entries()
                    .iter()
                    .map(|entry| (ListKind::Domains, entry)),
            )
            .find_map(|(kind, entry)| match entry {
                crate::lists::ListEntry::Url(url) => Some((kind, url.shown.clone())),
                crate::lists::ListEntry::File(_) => None,
            });
        if let (Some((kind, url)), None) = (first_url, &self.server.state_dir) {
            return Err(ConfigError::invalid(
                "server.state_dir",
                format!(
                    "needed by {} ({url}): lists fetched from URLs are kept there",
                    kind.key()
                ),
            ));
        }
        let context = self.list_context();
        self.client_ip
            .deny_lists
            .load_with(&context)
            .map_err(|e| ConfigError::invalid(ListKind::Addresses.key(), e.to_string()))?;
        self.email
            .denied_domain_lists
            .load_with(&context)
            .map_err(|e| ConfigError::invalid(ListKind::Domains.key(), e.to_string()))?;
        Ok(())
    }

    /// The lists fetched from URLs, with their kind, as loaded.
    pub fn remote_lists(&self) -> Vec<(ListKind, RemoteList)> {
        self.client_ip
            .deny_lists
            .remote()
            .map(|list| (ListKind::Addresses, list.clone()))
            .chain(
                self.email
                    .denied_domain_lists
                    .remote()
                    .map(|list| (ListKind::Domains, list.clone())),
            )
            .collect()
    }
}
