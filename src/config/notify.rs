//! `[notify]`: webhook notifications of operational events.

use serde::{Deserialize, Serialize};

use super::error::ConfigError;
use super::values::{read_secret_file, SecretBytes};
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
    /// `webhook_url`, parsed once per load.
    #[serde(skip)]
    uri: Option<http::Uri>,
    /// The signing key, read once per load.
    #[serde(skip)]
    key: Option<SecretBytes>,
}

impl NotifyConfig {
    /// Parses `webhook_url` and reads the signing key (`webhook_secret`, or
    /// with [`Secrets::Read`] the file `webhook_secret_file` without
    /// trailing line breaks): once per load, checked by key.
    pub(super) fn read(&mut self, secrets: Secrets) -> Result<(), ConfigError> {
        self.uri = None;
        self.key = None;
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
            self.uri = Some(parsed);
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
        if let Some(secret) = &self.webhook_secret {
            if secret.is_empty() {
                return Err(ConfigError::invalid(
                    "notify.webhook_secret",
                    "must not be empty",
                ));
            }
            self.key = Some(SecretBytes(secret.as_bytes().to_vec()));
        }
        if let (Some(path), Secrets::Read) = (&self.webhook_secret_file, secrets) {
            let bytes = read_secret_file("notify.webhook_secret_file", path)?;
            if bytes.is_empty() {
                return Err(ConfigError::invalid(
                    "notify.webhook_secret_file",
                    format!("{} is empty", path.display()),
                ));
            }
            self.key = Some(SecretBytes(bytes));
        }
        Ok(())
    }

    /// Where events go (`None`: off), as parsed at load.
    pub fn uri(&self) -> Option<&http::Uri> {
        self.uri.as_ref()
    }

    /// The signing key as read at load.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_ref().map(|key| key.0.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn secrets_are_read_once_with_the_configuration_and_never_shown() {
        let dir = std::env::temp_dir().join(format!("mgk-notify-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (key, token) = (dir.join("webhook.key"), dir.join("admin.token"));
        std::fs::write(&key, "s3cret-signing-key\n").unwrap();
        std::fs::write(&token, "s3cret-admin-token-0123456789\n").unwrap();
        let config = Config::from_toml(&format!(
            "[notify]\nwebhook_url = \"http://127.0.0.1:9/hook\"\nwebhook_secret_file = {:?}\n\
             [admin]\ntoken_file = {:?}\n",
            key.display().to_string(),
            token.display().to_string()
        ))
        .unwrap();
        // Gone after the load: what was read is what is used.
        std::fs::remove_file(&key).unwrap();
        std::fs::remove_file(&token).unwrap();
        assert_eq!(config.notify.key(), Some(&b"s3cret-signing-key"[..]));
        assert_eq!(config.notify.uri().unwrap().path(), "/hook");
        assert_eq!(
            config.admin.token().as_deref(),
            Some(&b"s3cret-admin-token-0123456789"[..])
        );
        let shown = format!("{config:?}{}", config.to_toml());
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
