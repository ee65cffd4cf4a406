//! `[homeserver]`: facts about the homeserver the policy needs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::ConfigError;
use super::Secrets;
use crate::appservice::AppServices;

/// `[homeserver]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HomeserverConfig {
    /// The homeserver's server name (the part after `:` in user IDs).
    pub server_name: String,
    /// The application service registration files the homeserver reads
    /// (bridges), so that the gate lets their registrations through.
    pub app_service_config_files: Vec<PathBuf>,
    /// Whether the homeserver upgrades a guest account to a full one when
    /// a registration carries the guest's `guest_access_token` (Synapse
    /// does; Dendrite and the Conduit family do not). Only then may such a
    /// registration name an all-digit localpart, and only while guests are
    /// allowed.
    pub guest_upgrades: bool,
    /// Those files, read (not part of the file's text).
    #[serde(skip)]
    pub app_services: AppServices,
}

impl Default for HomeserverConfig {
    fn default() -> Self {
        HomeserverConfig {
            server_name: "example.org".to_owned(),
            app_service_config_files: Vec::new(),
            guest_upgrades: false,
            app_services: AppServices::default(),
        }
    }
}

impl HomeserverConfig {
    /// Reads `app_service_config_files` (left unread with
    /// [`Secrets::Skip`]: they hold the bridges' tokens).
    pub(super) fn read_app_services(&mut self, secrets: Secrets) -> Result<(), ConfigError> {
        if secrets == Secrets::Skip {
            return Ok(());
        }
        self.app_services = AppServices::load(&self.app_service_config_files, &self.server_name)
            .map_err(|e| {
                ConfigError::invalid("homeserver.app_service_config_files", e.to_string())
            })?;
        Ok(())
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let name = &self.server_name;
        if name.is_empty() || name.len() > 230 || name.contains(char::is_whitespace) {
            return Err(ConfigError::invalid(
                "homeserver.server_name",
                format!("not a usable server name: \"{name}\""),
            ));
        }
        Ok(())
    }
}
