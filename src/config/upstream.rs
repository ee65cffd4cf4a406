//! `[upstream]`: the homeserver behind the gate, and how long the gate
//! waits for it.

use serde::{Deserialize, Serialize};

use super::error::ConfigError;
use super::values::{deserialize_uri, serialize_display, HumanDuration};

/// `[upstream]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL of the homeserver (`http://host:port`).
    #[serde(
        deserialize_with = "deserialize_uri",
        serialize_with = "serialize_display"
    )]
    pub url: http::Uri,
    /// How long to wait for a TCP connection to the homeserver.
    pub connect_timeout: HumanDuration,
    /// How long to wait for the homeserver's response headers. Long-polls
    /// (`/sync?timeout=30000`) need this well above their own timeout.
    pub response_timeout: HumanDuration,
    /// How long an idle pooled connection is kept; keep it below the
    /// homeserver's own keep-alive timeout.
    pub pool_idle_timeout: HumanDuration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: http::Uri::from_static("http://127.0.0.1:8008"),
            connect_timeout: HumanDuration::secs(5),
            response_timeout: HumanDuration::secs(120),
            pool_idle_timeout: HumanDuration::secs(20),
        }
    }
}

impl UpstreamConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let url = &self.url;
        if url.scheme_str() != Some("http") {
            return Err(ConfigError::invalid(
                "upstream.url",
                format!("only http:// upstreams are supported, got \"{url}\""),
            ));
        }
        if url.authority().is_none() {
            return Err(ConfigError::invalid("upstream.url", "a host is needed"));
        }
        if url.query().is_some() {
            return Err(ConfigError::invalid(
                "upstream.url",
                "must not carry a query string",
            ));
        }
        self.connect_timeout
            .check_positive("upstream.connect_timeout")?;
        self.response_timeout
            .check_positive("upstream.response_timeout")?;
        self.pool_idle_timeout
            .check_positive("upstream.pool_idle_timeout")
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::err;

    #[test]
    fn only_plain_http_upstreams() {
        assert!(err("[upstream]\nurl = \"https://x\"\n").starts_with("upstream.url:"));
    }
}
