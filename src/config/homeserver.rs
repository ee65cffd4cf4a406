//! `[homeserver]`: facts about the homeserver the policy needs.

use serde::{Deserialize, Serialize};

use super::error::ConfigError;

/// `[homeserver]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HomeserverConfig {
    /// The homeserver's server name (the part after `:` in user IDs).
    pub server_name: String,
}

impl Default for HomeserverConfig {
    fn default() -> Self {
        HomeserverConfig {
            server_name: "example.org".to_owned(),
        }
    }
}

impl HomeserverConfig {
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
