//! `[rate_limit]`: limits on the guarded routes, and where their state
//! lives.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::ConfigError;
use super::values::{read_secret_file, string_enum, HumanDuration};
use super::Secrets;

/// `[rate_limit]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Where limiter state lives.
    pub store: StoreKind,
    /// Completed registrations per client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registrations_per_ip: Option<LimitSpec>,
    /// Every `POST …/register` per client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts_per_ip: Option<LimitSpec>,
    /// Guest registrations per client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guests_per_ip: Option<LimitSpec>,
    /// `/register/available` checks per client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub availability_checks_per_ip: Option<LimitSpec>,
    /// `requestToken` and token validity checks per client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_requests_per_ip: Option<LimitSpec>,
    /// Completed registrations for the whole server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registrations_global: Option<LimitSpec>,
    /// Completed registrations per network (autonomous system); needs
    /// `[reputation] asn_database`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registrations_per_asn: Option<LimitSpec>,
    /// Every `POST …/register` per network (autonomous system); needs
    /// `[reputation] asn_database`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts_per_asn: Option<LimitSpec>,
    /// Most clients tracked in memory; beyond it new clients share coarser keys.
    pub max_tracked_clients: usize,
    /// Redis URL for `store = "redis"`; with `redis_cluster`, a
    /// comma-separated list of cluster seed nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// A file holding `redis_url` instead (trailing line breaks ignored),
    /// for a URL with a password kept apart from the configuration: read
    /// at start and at every reload, into `redis_url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url_file: Option<std::path::PathBuf>,
    /// Whether `redis_url` names a Redis Cluster.
    pub redis_cluster: bool,
    /// Longest wait for one Redis decision.
    pub redis_timeout: HumanDuration,
    /// What to do when Redis fails.
    pub on_store_error: OnStoreError,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            store: StoreKind::Memory,
            registrations_per_ip: None,
            attempts_per_ip: None,
            guests_per_ip: None,
            availability_checks_per_ip: None,
            token_requests_per_ip: None,
            registrations_global: None,
            registrations_per_asn: None,
            attempts_per_asn: None,
            max_tracked_clients: 1_000_000,
            redis_url: None,
            redis_url_file: None,
            redis_cluster: false,
            redis_timeout: HumanDuration(Duration::from_millis(50)),
            on_store_error: OnStoreError::Local,
        }
    }
}

impl RateLimitConfig {
    /// Every limit with its configuration name.
    pub fn limits(&self) -> [(&'static str, Option<LimitSpec>); 8] {
        [
            ("registrations_per_ip", self.registrations_per_ip),
            ("attempts_per_ip", self.attempts_per_ip),
            ("guests_per_ip", self.guests_per_ip),
            (
                "availability_checks_per_ip",
                self.availability_checks_per_ip,
            ),
            ("token_requests_per_ip", self.token_requests_per_ip),
            ("registrations_global", self.registrations_global),
            ("registrations_per_asn", self.registrations_per_asn),
            ("attempts_per_asn", self.attempts_per_asn),
        ]
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (name, limit) in self.limits() {
            if let Some(limit) = limit {
                limit.validate(name)?;
            }
        }
        if self.max_tracked_clients == 0 {
            return Err(ConfigError::invalid(
                "rate_limit.max_tracked_clients",
                "must be at least 1",
            ));
        }
        if self.store == StoreKind::Redis {
            self.check_redis_url()?;
        }
        self.redis_timeout
            .check_positive("rate_limit.redis_timeout")
    }

    /// Reads `redis_url_file` into `redis_url` (with [`Secrets::Read`]);
    /// the two keys are exclusive. With [`Secrets::Skip`] the file is left
    /// unread and `redis_url` stays empty.
    pub(super) fn read_url_file(&mut self, secrets: Secrets) -> Result<(), ConfigError> {
        let Some(path) = &self.redis_url_file else {
            return Ok(());
        };
        if self.redis_url.is_some() {
            return Err(ConfigError::invalid(
                "rate_limit.redis_url_file",
                "set redis_url or redis_url_file, not both",
            ));
        }
        if secrets == Secrets::Skip {
            return Ok(());
        }
        let bytes = read_secret_file("rate_limit.redis_url_file", path)?;
        let url = String::from_utf8(bytes)
            .ok()
            .map(|url| url.trim().to_owned())
            .filter(|url| !url.is_empty() && !url.contains(['\n', '\r']))
            .ok_or_else(|| {
                ConfigError::invalid(
                    "rate_limit.redis_url_file",
                    format!("{} must hold one redis:// URL", path.display()),
                )
            })?;
        self.redis_url = Some(url);
        Ok(())
    }

    fn check_redis_url(&self) -> Result<(), ConfigError> {
        // The URL read from `redis_url_file` is checked under that key.
        let key = match self.redis_url_file {
            Some(_) => "rate_limit.redis_url_file",
            None => "rate_limit.redis_url",
        };
        match &self.redis_url {
            // Left unread on purpose (`explain` reads no secret file).
            None if self.redis_url_file.is_some() => Ok(()),
            None => Err(ConfigError::invalid(
                "rate_limit.redis_url",
                "needed when store = \"redis\" (or rate_limit.redis_url_file)",
            )),
            Some(url)
                if !(url.starts_with("redis://")
                    || url.starts_with("redis+unix://")
                    || url.starts_with("unix://")) =>
            {
                Err(ConfigError::invalid(
                    key,
                    format!(
                        "expected a redis:// URL, got \"{}\"",
                        super::redact_url(url)
                    ),
                ))
            }
            Some(_) => Ok(()),
        }
    }
}

/// `{ count = N, period = "1h" }`: a burst of N, refilled at N per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSpec {
    /// Burst size, and units refilled per period.
    pub count: u32,
    /// The refill period.
    pub period: HumanDuration,
}

impl LimitSpec {
    /// Time to refill one unit (`period / count`).
    pub fn emission_interval(&self) -> Duration {
        self.period.0 / self.count.max(1)
    }

    /// Checks the limit called `name` in `[rate_limit]`.
    fn validate(&self, name: &str) -> Result<(), ConfigError> {
        if self.count == 0 {
            return Err(ConfigError::invalid(
                format!("rate_limit.{name}.count"),
                "must be at least 1 (remove the limit for no limit)",
            ));
        }
        self.period
            .check_positive(format!("rate_limit.{name}.period"))
    }
}

string_enum!(
    /// Where limiter state lives.
    StoreKind {
        /// In this process.
        Memory => "memory",
        /// In Redis, shared by every replica.
        Redis => "redis",
    } default Memory
);

string_enum!(
    /// What a Redis store does when Redis fails or is slow.
    OnStoreError {
        /// Fall back to this replica's in-memory limits.
        Local => "local",
        /// Let the request pass.
        Allow => "allow",
        /// Refuse the request with 429.
        Deny => "deny",
    } default Local
);

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::tests::err;
    use crate::config::Config;

    #[test]
    fn rate_limits_are_validated_by_key() {
        let c = Config::from_toml(
            "[rate_limit]\nregistrations_per_ip = { count = 3, period = \"1h\" }\n",
        )
        .unwrap();
        assert_eq!(c.rate_limit.registrations_per_ip.unwrap().count, 3);
        assert_eq!(
            c.rate_limit
                .registrations_per_ip
                .unwrap()
                .emission_interval(),
            Duration::from_secs(1200)
        );
        assert!(c.rate_limit.attempts_per_ip.is_none());
        assert!(
            err("[rate_limit]\nguests_per_ip = { count = 0, period = \"1h\" }\n")
                .starts_with("rate_limit.guests_per_ip.count:")
        );
        assert!(
            err("[rate_limit]\nguests_per_ip = { count = 1, period = \"1h\", burst = 2 }\n")
                .starts_with("rate_limit.guests_per_ip")
        );
        assert!(err("[rate_limit]\nstore = \"redis\"\n").starts_with("rate_limit.redis_url:"));
        assert!(err("[rate_limit]\nstore = \"disk\"\n").starts_with("rate_limit.store:"));
        assert!(err("[rate_limit]\non_store_error = \"panic\"\n")
            .starts_with("rate_limit.on_store_error: expected \"local\", \"allow\" or \"deny\""));
    }
}
