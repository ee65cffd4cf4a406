//! `[notify]`: webhook notifications of operational events.

use serde::{Deserialize, Serialize};

use super::error::ConfigError;
use super::values::read_secret_file;
use super::Secrets;

/// `[notify]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// Where events are POSTed as JSON (`http://` only; absent: off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// Key of the HMAC-SHA256 signature header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
    /// A file holding the key instead (trailing line breaks ignored).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_secret_file: Option<std::path::PathBuf>,
}

impl NotifyConfig {
    pub(super) fn validate(&self, secrets: Secrets) -> Result<(), ConfigError> {
        if let Some(url) = &self.webhook_url {
            // Errors show the URL's origin at most: the rest may be a secret.
            let parsed: http::Uri = url
                .parse()
                .map_err(|_| ConfigError::invalid("notify.webhook_url", "not a URL"))?;
            if parsed.scheme_str() != Some("http") {
                return Err(ConfigError::invalid(
                    "notify.webhook_url",
                    format!(
                        "only http:// is supported (webhooks are sent without TLS; use a local relay), got \"{}\"",
                        super::url_origin(url)
                    ),
                ));
            }
            if parsed.host().is_none_or(str::is_empty) {
                return Err(ConfigError::invalid(
                    "notify.webhook_url",
                    "a host is needed",
                ));
            }
        } else if self.webhook_secret.is_some() || self.webhook_secret_file.is_some() {
            return Err(ConfigError::invalid(
                "notify.webhook_url",
                "needed when a webhook secret is set",
            ));
        }
        if self.webhook_secret.is_some() && self.webhook_secret_file.is_some() {
            return Err(ConfigError::invalid(
                "notify.webhook_secret_file",
                "set webhook_secret or webhook_secret_file, not both",
            ));
        }
        if self.webhook_secret.as_deref() == Some("") {
            return Err(ConfigError::invalid(
                "notify.webhook_secret",
                "must not be empty",
            ));
        }
        if secrets == Secrets::Read && self.webhook_secret_file.is_some() {
            self.secret()?;
        }
        Ok(())
    }

    /// The signing key: `webhook_secret`, or the contents of
    /// `webhook_secret_file` without trailing line breaks.
    pub fn secret(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        if let Some(secret) = &self.webhook_secret {
            return Ok(Some(secret.as_bytes().to_vec()));
        }
        let Some(path) = &self.webhook_secret_file else {
            return Ok(None);
        };
        let bytes = read_secret_file("notify.webhook_secret_file", path)?;
        if bytes.is_empty() {
            return Err(ConfigError::invalid(
                "notify.webhook_secret_file",
                format!("{} is empty", path.display()),
            ));
        }
        Ok(Some(bytes))
    }
}
