//! Typed configuration, read from TOML.
//!
//! Configuration is strict: unknown keys are refused by name, and every value
//! that fails validation produces a [`ConfigError`] whose message starts with
//! the dotted key it concerns (`guest.access: expected "allow" or "deny", got
//! "sometimes"`). Everything is parsed and validated before anything binds.
//!
//! Each section of the file (`[server]`, `[rate_limit]`, …) has its own
//! module holding its types, defaults and the checks serde cannot make
//! alone; [`Config::validate`] runs them in turn. Value types shared by
//! several sections (durations, regexes) are in `values`.
//!
//! Loading a configuration also reads what it names: the secret files
//! (once per load, see [`Secrets`]), the deny lists and the network
//! databases ([`crate::defences::lists`], [`crate::defences::networks`],
//! compiled by [`Config::load_lists`]). That is on purpose: a
//! configuration is then one value that either loads whole or not at all,
//! so a reload swaps the file's settings and everything they name in one
//! step, and a broken list refuses the reload with the previous lists still
//! in force. The arrow runs one way: the configuration uses the defences'
//! loaders and types; the defences never read the configuration, which
//! hands them what they need (`Config::networks`, `Config::remote_set`).

use std::path::Path;

use serde::{Deserialize, Serialize};

mod admin;
mod client_ip;
mod email;
mod error;
mod guest;
mod homeserver;
mod lists;
mod log;
mod notify;
mod rate_limit;
mod registration;
mod reputation;
mod server;
mod upstream;
mod username;
mod values;

#[cfg(test)]
mod networks_tests;

pub use admin::AdminConfig;
pub use client_ip::{ClientIpConfig, Network};
pub use email::{DomainGlob, EmailConfig};
pub use error::ConfigError;
pub use guest::{GuestAccess, GuestConfig};
pub use homeserver::HomeserverConfig;
pub use log::{check_log_filter, LogConfig, LogFormat};
pub use notify::NotifyConfig;
pub use rate_limit::{LimitSpec, OnStoreError, RateLimitConfig, StoreKind};
pub use registration::{GateMode, LockdownSpec, RegistrationConfig};
pub use reputation::{
    DnsServer, DnsblZone, OnDnsblError, OnStaleList, ReputationConfig, DEFAULT_LIST_MAX_BYTES,
};
pub use server::{AdminAddr, ListenAddrs, ServerConfig};
pub use upstream::UpstreamConfig;
pub use username::{CaseMode, UsernameConfig, DEFAULT_RESERVED};
pub use values::{DenyPattern, HumanDuration};

/// The example configuration shipped in `config/`, embedded so the binary can
/// run without any file.
pub const EMBEDDED_EXAMPLE: &str = include_str!("../../config/gatekeeper.example.toml");

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the gate listens.
    pub server: ServerConfig,
    /// The homeserver behind the gate.
    pub upstream: UpstreamConfig,
    /// Facts about the homeserver needed by the policy.
    pub homeserver: HomeserverConfig,
    /// Registration routes as a whole.
    pub registration: RegistrationConfig,
    /// The username policy.
    pub username: UsernameConfig,
    /// The guest policy.
    pub guest: GuestConfig,
    /// How the client address is found.
    pub client_ip: ClientIpConfig,
    /// Rate limits on the guarded routes.
    pub rate_limit: RateLimitConfig,
    /// Rules for third-party identifiers (`requestToken`).
    pub email: EmailConfig,
    /// Webhook notifications of operational events.
    pub notify: NotifyConfig,
    /// The admin API on the admin listener.
    pub admin: AdminConfig,
    /// DNS blocklist lookups of the client address.
    pub reputation: ReputationConfig,
    /// Logging.
    pub log: LogConfig,
}

/// Whether loading a configuration reads the secret files it names
/// (`[admin] token_file`, `[notify] webhook_secret_file`,
/// `[rate_limit] redis_url_file`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    /// Read and checked, as `serve` and `check` need them.
    Read,
    /// Left unread: for `explain`, which an operator may run as a user who
    /// cannot read the service's secrets (and which never uses them).
    Skip,
}

impl Config {
    /// Parses and validates a configuration from TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_with(text, Secrets::Read)
    }

    /// [`from_toml`](Config::from_toml), reading the secret files or not.
    pub fn from_toml_with(text: &str, secrets: Secrets) -> Result<Config, ConfigError> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::syntax(text, &e))?;
        let mut config: Config = serde_path_to_error::deserialize(table).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let message = inner.message().trim().to_owned();
            if key == "." {
                ConfigError::invalid("(top level)", message)
            } else {
                ConfigError::invalid(key, message)
            }
        })?;
        config.rate_limit.read_url_file(secrets)?;
        config.notify.read(secrets)?;
        config.admin.read_token(secrets)?;
        config.homeserver.read_app_services(secrets)?;
        config.validate()?;
        config.load_lists()?;
        Ok(config)
    }

    /// Reads, parses and validates a configuration file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        Config::from_file_with(path, Secrets::Read)
    }

    /// [`from_file`](Config::from_file), reading the secret files or not.
    pub fn from_file_with(path: &Path, secrets: Secrets) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml_with(&text, secrets)
    }

    /// Checks the values serde cannot check alone, section by section (the
    /// secret files were read, and checked, as the configuration was read).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.upstream.validate()?;
        self.homeserver.validate()?;
        self.registration.validate()?;
        self.username.validate()?;
        self.log.validate()?;
        self.client_ip.validate()?;
        self.rate_limit.validate()?;
        self.reputation.validate()?;
        if self.reputation.asn_database.is_none() {
            let limits = &self.rate_limit;
            for (key, limit) in [
                ("registrations_per_asn", limits.registrations_per_asn),
                ("attempts_per_asn", limits.attempts_per_asn),
            ] {
                if limit.is_some() {
                    return Err(ConfigError::invalid(
                        format!("rate_limit.{key}"),
                        "needs reputation.asn_database to know a client's network",
                    ));
                }
            }
        }
        self.reputation.validate_lists()?;
        Ok(())
    }

    /// The configuration as TOML, every default filled in and every
    /// secret redacted (a password in `rate_limit.redis_url`, the webhook
    /// secret; of `notify.webhook_url` only scheme, host and port): what
    /// `check` prints, safe for a journal.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.rate_limit.redis_url = if shown.rate_limit.redis_url_file.is_some() {
            // Read from the file: the file is what the operator wrote.
            None
        } else {
            shown.rate_limit.redis_url.as_deref().map(redact_url)
        };
        shown.notify.webhook_url = shown.notify.webhook_url.as_deref().map(url_origin);
        if shown.notify.webhook_secret.is_some() {
            shown.notify.webhook_secret = Some("***".to_owned());
        }
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }

    /// The [restart-only keys](RESTART_ONLY_KEYS) whose value in `new`
    /// differs from this (running) configuration's.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        let (Ok(running), Ok(new)) = (toml::Value::try_from(self), toml::Value::try_from(new))
        else {
            return RESTART_ONLY_KEYS.to_vec();
        };
        let lookup = |root: &toml::Value, key: &str| {
            key.split('.')
                .try_fold(root, |value, part| value.get(part))
                .cloned()
        };
        RESTART_ONLY_KEYS
            .iter()
            .copied()
            .filter(|key| lookup(&running, key) != lookup(&new, key))
            .collect()
    }
}

/// The keys (or whole sections) read once, at start: a reload that changes
/// them logs a warning and keeps the running value until a restart. The
/// README and the example configuration list the same keys (a test checks).
pub const RESTART_ONLY_KEYS: [&str; 10] = [
    "server.listen",
    "server.admin_listen",
    "server.header_read_timeout",
    "server.upload_idle_timeout",
    "server.shutdown_timeout",
    "server.watch_config",
    "server.workers",
    "upstream",
    "log",
    "notify",
];

/// A URL (or a comma-separated list of them, as `redis_url` takes for a
/// cluster) with its secrets replaced by `***`: the whole userinfo —
/// everything between `://` and the last `@`, whatever characters a
/// password holds (`redis://:Ab/Cd+ef==@host`) — keeping only a user name
/// before a `:` (`redis://gate:***@host`), and `password`/`pass` query
/// parameters.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let Some((scheme, rest)) = url.split_once("://") else {
                return url.to_owned();
            };
            let (authority, tail) = match rest.rsplit_once('@') {
                Some((userinfo, after)) => {
                    let user = userinfo
                        .split_once(':')
                        .map(|(user, _)| user)
                        .filter(|user| !user.contains(['/', '?', '#']));
                    let shown = match user {
                        Some(user) => format!("{user}:***@"),
                        None => "***@".to_owned(),
                    };
                    let (host, tail) =
                        after.split_at(after.find(['/', '?']).unwrap_or(after.len()));
                    (format!("{shown}{host}"), tail)
                }
                None => {
                    let (host, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
                    (host.to_owned(), tail)
                }
            };
            let tail = match tail.split_once('?') {
                Some((path, query)) => {
                    let query: Vec<String> = query
                        .split('&')
                        .map(|pair| match pair.split_once('=') {
                            Some((name, _))
                                if name.eq_ignore_ascii_case("password")
                                    || name.eq_ignore_ascii_case("pass") =>
                            {
                                format!("{name}=***")
                            }
                            _ => pair.to_owned(),
                        })
                        .collect();
                    format!("{path}?{}", query.join("&"))
                }
                None => tail.to_owned(),
            };
            format!("{scheme}://{authority}{tail}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Scheme, host and port of a URL, and nothing else: how the configuration
/// shows `notify.webhook_url`, whose user, password, path and query may
/// each be the credential (a relay's secret path, a token parameter).
pub fn url_origin(url: &str) -> String {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return "(not a URL)".to_owned();
    };
    let scheme = uri.scheme_str().unwrap_or("http");
    match (uri.host(), uri.port_u16()) {
        (Some(host), Some(port)) => format!("{scheme}://{host}:{port}"),
        (Some(host), None) => format!("{scheme}://{host}"),
        (None, _) => "(no host)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_passwords_are_redacted() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://:hunter2@redis:6379/0", "redis://:***@redis:6379/0"),
            ("redis://gate:hunter2@redis", "redis://gate:***@redis"),
            ("rediss://hunter2@redis/", "rediss://***@redis/"),
            (
                "redis://a:hunter2@n1:7000,redis://a:hunter2@n2:7000",
                "redis://a:***@n1:7000,redis://a:***@n2:7000",
            ),
            (
                "redis+unix:///run/redis.sock?db=1&pass=hunter2",
                "redis+unix:///run/redis.sock?db=1&pass=***",
            ),
            // Passwords holding URL delimiters: all up to the last `@`.
            ("redis://:Ab/Cd+ef==@redis:6379", "redis://:***@redis:6379"),
            ("redis://:hun?ter2@redis/0", "redis://:***@redis/0"),
            ("redis://gate:a@b/c#d@redis", "redis://gate:***@redis"),
            ("redis://hun/ter2@redis", "redis://***@redis"),
            ("redis://x/y:hunter2@redis", "redis://***@redis"),
        ] {
            assert_eq!(redact_url(url), shown);
        }
        let config = Config::from_toml(
            "[rate_limit]\nstore = \"redis\"\nredis_url = \"redis://:hunter2@redis:6379\"\n",
        )
        .unwrap();
        let printed = config.to_toml();
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("redis://:***@redis:6379"), "{printed}");
        // The running configuration keeps the secret.
        assert_eq!(
            config.rate_limit.redis_url.as_deref(),
            Some("redis://:hunter2@redis:6379")
        );
    }

    #[test]
    fn syntax_errors_name_line_column_and_key_but_never_the_text() {
        let e = err("[server]\nlisten = [\"0.0.0.0:8009\"]\n\n[rate_limit]\nstore = \"redis\"\nredis_url = \"redis://:hunter2@redis:6379\n");
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.starts_with("not valid TOML at line 6, column "), "{e}");
        assert!(e.contains("(rate_limit.redis_url)"), "{e}");
        // A duplicated secret: the second line is named, neither is shown.
        let e = err("[notify]\nwebhook_url = \"http://relay/\"\nwebhook_secret = \"s3cret-one\"\n webhook_secret = \"s3cret-two\"\n");
        assert!(!e.contains("s3cret"), "{e}");
        assert!(
            e.starts_with(
                "not valid TOML at line 4, column 2 (notify.webhook_secret): duplicate key"
            ),
            "{e}"
        );
        // A line inside a multi-line string is a value, not a key.
        let e = err("[notify]\nwebhook_secret = \"\"\"\nhunter2 = x\n\"\"\" x\n");
        assert!(!e.contains("hunter2"), "{e}");
        let e = err("[[x]]]\n");
        assert!(e.starts_with("not valid TOML at line 1, column "), "{e}");
    }

    #[test]
    fn only_the_origin_of_the_webhook_url_is_shown() {
        let config = Config::from_toml(
            "[notify]\nwebhook_url = \"http://hook:s3cret@relay.example:8080/s3cret-path?token=s3cret\"\n",
        )
        .unwrap();
        let printed = config.to_toml();
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(
            printed.contains("webhook_url = \"http://relay.example:8080\""),
            "{printed}"
        );
        let e = err("[notify]\nwebhook_url = \"https://u:s3cret@relay/s3cret\"\n");
        assert!(!e.contains("s3cret"), "{e}");
        assert!(e.contains("https://relay"), "{e}");
        let e = err("[notify]\nwebhook_url = \"http://re lay/s3cret\"\n");
        assert_eq!(e, "notify.webhook_url: not a URL");
    }

    #[test]
    fn the_redis_url_can_come_from_a_file() {
        let path = std::env::temp_dir().join(format!("mgk-redis-url-{}", std::process::id()));
        let text = format!(
            "[rate_limit]\nstore = \"redis\"\nredis_url_file = \"{}\"\n",
            path.display()
        );
        std::fs::write(&path, "redis://:hunter2@redis:6379\n").unwrap();
        let config = Config::from_toml(&text).unwrap();
        assert_eq!(
            config.rate_limit.redis_url.as_deref(),
            Some("redis://:hunter2@redis:6379")
        );
        let printed = config.to_toml();
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("redis_url ="), "{printed}");
        assert!(printed.contains("redis_url_file"), "{printed}");
        // Not read when secrets are skipped (`explain`).
        let skipped = Config::from_toml_with(&text, Secrets::Skip).unwrap();
        assert_eq!(skipped.rate_limit.redis_url, None);
        // Its content is checked like redis_url, without showing it.
        std::fs::write(&path, "http://:hunter2@redis:6379\n").unwrap();
        let e = err(&text);
        assert!(
            e.starts_with("rate_limit.redis_url_file: expected a redis:// URL"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
        std::fs::write(&path, "\n").unwrap();
        assert!(err(&text).starts_with("rate_limit.redis_url_file:"));
        std::fs::remove_file(&path).unwrap();
        let e = err(&text);
        assert!(
            e.starts_with("rate_limit.redis_url_file: cannot read"),
            "{e}"
        );
        let both = format!("{text}redis_url = \"redis://redis:6379\"\n");
        assert!(err(&both).contains("not both"), "{}", err(&both));
    }

    /// The message of the error loading `text` gives.
    pub(super) fn err(text: &str) -> String {
        Config::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let e = err("[username]\nreservd = []\n");
        assert!(e.starts_with("username.reservd: unknown field"), "{e}");
        assert!(e.contains("reservd"), "{e}");
        let e = err("[nonsense]\n");
        assert!(e.contains("nonsense"), "{e}");
    }

    #[test]
    fn effective_config_round_trips() {
        let c = Config::from_toml("").unwrap();
        let printed = c.to_toml();
        let again = Config::from_toml(&printed).unwrap();
        assert_eq!(again.to_toml(), printed);
        assert!(printed.contains("access = \"deny\""));
    }
}
