//! `[admin]`: the admin API on the admin listener.

use serde::{Deserialize, Serialize};

use super::error::ConfigError;
use super::values::read_secret_file;

/// `[admin]`: the admin API (`/v1/…` on `server.admin_listen`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// A file holding the bearer token of the admin API (trailing line
    /// breaks ignored); absent: the API is off and its paths answer 404.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<std::path::PathBuf>,
}

impl AdminConfig {
    /// The bearer token, read from `token_file` (at start and on every
    /// reload); `None` when the API is off.
    pub fn token(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let bytes = read_secret_file("admin.token_file", path)?;
        // A token travels in a header: printable ASCII without spaces, and
        // long enough not to be guessed.
        if bytes.len() < 16 || !bytes.iter().all(u8::is_ascii_graphic) {
            return Err(ConfigError::invalid(
                "admin.token_file",
                format!(
                    "{} must hold one token of at least 16 printable characters without spaces",
                    path.display()
                ),
            ));
        }
        Ok(Some(bytes))
    }
}
