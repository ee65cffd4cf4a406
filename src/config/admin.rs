//! `[admin]`: the admin API on the admin listener.

use serde::{Deserialize, Serialize};

use super::error::ConfigError;
use super::values::{read_secret_file, SecretBytes};
use super::Secrets;

/// `[admin]`: the admin API (`/v1/…` on `server.admin_listen`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// A file holding the bearer token of the admin API (trailing line
    /// breaks ignored); absent: the API is off and its paths answer 404.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<std::path::PathBuf>,
    /// The token, read from `token_file` once per load.
    #[serde(skip)]
    token: Option<SecretBytes>,
}

impl AdminConfig {
    /// `[admin]` with the token in `token_file`, not read yet.
    pub fn with_token_file(token_file: std::path::PathBuf) -> Self {
        AdminConfig {
            token_file: Some(token_file),
            token: None,
        }
    }

    /// Reads `token_file` (with [`Secrets::Read`]; at start and on every
    /// reload, once) and checks the token.
    pub fn read_token(&mut self, secrets: Secrets) -> Result<(), ConfigError> {
        self.token = None;
        let Some(path) = &self.token_file else {
            return Ok(());
        };
        if secrets == Secrets::Skip {
            return Ok(());
        }
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
        self.token = Some(SecretBytes(bytes));
        Ok(())
    }

    /// The bearer token as read; `None` when the API is off (or the file
    /// was left unread).
    pub fn token(&self) -> Option<Vec<u8>> {
        self.token.as_ref().map(|token| token.0.clone())
    }
}
