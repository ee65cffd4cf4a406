//! Typed configuration, read from TOML.
//!
//! Configuration is strict: unknown keys are refused by name, and every value
//! that fails validation produces a [`ConfigError`] whose message starts with
//! the dotted key it concerns (`guest.access: expected "allow" or "deny", got
//! "sometimes"`). Everything is parsed and validated before anything binds.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use regex::Regex;

use crate::client_ip::{ClientResolver, IpNet};
use crate::lists::{AddressLists, DomainLists};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

/// The example configuration shipped in `config/`, embedded so the binary can
/// run without any file.
pub const EMBEDDED_EXAMPLE: &str = include_str!("../config/gatekeeper.example.toml");

/// A configuration that could not be loaded; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path that was tried.
        path: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The text is not TOML.
    #[error("not valid TOML: {0}")]
    Syntax(String),
    /// A key has the wrong type or value, or is unknown.
    #[error("{key}: {message}")]
    Invalid {
        /// Dotted path of the offending key.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

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

impl Config {
    /// Parses and validates a configuration from TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax(e.to_string().trim().to_owned()))?;
        let config: Config = serde_path_to_error::deserialize(table).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let message = inner.message().trim().to_owned();
            if key == "." {
                ConfigError::invalid("(top level)", message)
            } else {
                ConfigError::invalid(key, message)
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a configuration file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text)
    }

    /// Checks the values serde cannot check alone.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server.listen.0.is_empty() {
            return Err(ConfigError::invalid(
                "server.listen",
                "at least one address is needed",
            ));
        }
        let url = &self.upstream.url;
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
        let name = &self.homeserver.server_name;
        if name.is_empty() || name.len() > 230 || name.contains(char::is_whitespace) {
            return Err(ConfigError::invalid(
                "homeserver.server_name",
                format!("not a usable server name: \"{name}\""),
            ));
        }
        if self.registration.max_body_bytes == 0 {
            return Err(ConfigError::invalid(
                "registration.max_body_bytes",
                "must be greater than zero",
            ));
        }
        for (i, reserved) in self.username.reserved.iter().enumerate() {
            if reserved.is_empty() || reserved.chars().any(|c| c.is_uppercase()) {
                return Err(ConfigError::invalid(
                    format!("username.reserved[{i}]"),
                    format!("reserved names are non-empty and lowercase, got \"{reserved}\""),
                ));
            }
        }
        check_log_filter(&self.log.level).map_err(|message| {
            ConfigError::invalid("log.level", format!("{message}: \"{}\"", self.log.level))
        })?;
        let prefix = self.client_ip.ipv6_prefix_len;
        if !(1..=128).contains(&prefix) {
            return Err(ConfigError::invalid(
                "client_ip.ipv6_prefix_len",
                format!("expected 1 to 128, got {prefix}"),
            ));
        }
        let limits = &self.rate_limit;
        for (name, limit) in limits.limits() {
            if let Some(limit) = limit {
                if limit.count == 0 {
                    return Err(ConfigError::invalid(
                        format!("rate_limit.{name}.count"),
                        "must be at least 1 (remove the limit for no limit)",
                    ));
                }
                if limit.period.0.is_zero() {
                    return Err(ConfigError::invalid(
                        format!("rate_limit.{name}.period"),
                        "must be longer than zero",
                    ));
                }
            }
        }
        if let Some(lockdown) = &self.registration.lockdown {
            lockdown.validate()?;
        }
        self.notify.validate()?;
        self.admin.token()?;
        self.reputation.validate()?;
        if limits.max_tracked_clients == 0 {
            return Err(ConfigError::invalid(
                "rate_limit.max_tracked_clients",
                "must be at least 1",
            ));
        }
        if limits.store == StoreKind::Redis {
            match &limits.redis_url {
                None => {
                    return Err(ConfigError::invalid(
                        "rate_limit.redis_url",
                        "needed when store = \"redis\"",
                    ))
                }
                Some(url)
                    if !(url.starts_with("redis://")
                        || url.starts_with("redis+unix://")
                        || url.starts_with("unix://")) =>
                {
                    return Err(ConfigError::invalid(
                        "rate_limit.redis_url",
                        format!("expected a redis:// URL, got \"{url}\""),
                    ))
                }
                Some(_) => {}
            }
        }
        for (key, d) in [
            ("rate_limit.redis_timeout", self.rate_limit.redis_timeout),
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("server.body_timeout", self.server.body_timeout),
            (
                "server.upload_idle_timeout",
                self.server.upload_idle_timeout,
            ),
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.response_timeout", self.upstream.response_timeout),
            (
                "upstream.pool_idle_timeout",
                self.upstream.pool_idle_timeout,
            ),
        ] {
            if d.0.is_zero() {
                return Err(ConfigError::invalid(key, "must be longer than zero"));
            }
        }
        Ok(())
    }

    /// The configuration as TOML, every default filled in and every
    /// secret (a password in `rate_limit.redis_url`) redacted: what `check`
    /// prints, safe for a journal.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.rate_limit.redis_url = shown.rate_limit.redis_url.as_deref().map(redact_url);
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
/// cluster) with its password replaced by `***`: the password of the
/// userinfo (`redis://user:secret@host`, `redis://:secret@host`, a bare
/// `redis://secret@host`), and `password`/`pass` query parameters.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let Some((scheme, rest)) = url.split_once("://") else {
                return url.to_owned();
            };
            let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
            let authority = match authority.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _)) => format!("{user}:***@{host}"),
                    None => format!("***@{host}"),
                },
                None => authority.to_owned(),
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

/// The level names a log filter takes.
const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks a log filter (`log.level` or `RUST_LOG`): comma-separated
/// directives, each a level (`info`) or `target=level`
/// (`matrix_gatekeeper::audit=warn`). `tracing`'s own parser also takes a
/// bare word as a target to log at every level, which turns a typo such as
/// `inof` into a filter that silently drops every line; that is refused.
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    let is_level = |word: &str| {
        LOG_LEVELS
            .iter()
            .any(|l| l.eq_ignore_ascii_case(word.trim()))
    };
    if filter.split(',').all(|d| d.trim().is_empty()) {
        return Err("empty; expected a level such as info".to_owned());
    }
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = match directive.rsplit_once('=') {
            Some((target, level)) if !target.trim().is_empty() => level,
            Some(_) => return Err(format!("directive {directive:?} names no target")),
            None => directive,
        };
        if !is_level(level) {
            return Err(format!(
                "{level:?} is not a level (expected one of {})",
                LOG_LEVELS.join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(drop)
        .map_err(|e| format!("not a filter ({e})"))
}

// === sections ===

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// One address or a list.
    pub listen: ListenAddrs,
    /// How long a client may take to send its request headers, and how long
    /// a connection may stay idle (HTTP/1 keep-alive by hyper, HTTP/2 here).
    pub header_read_timeout: HumanDuration,
    /// How long a client may take to send a registration body.
    pub body_timeout: HumanDuration,
    /// How long a request body streamed to the homeserver (a media upload)
    /// may pause, no byte arriving, before the gate gives up with `408`.
    pub upload_idle_timeout: HumanDuration,
    /// How long in-flight requests may take to finish on shutdown.
    pub shutdown_timeout: HumanDuration,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`); off when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<AdminAddr>,
    /// Also reload when the configuration file changes (checked every 2 s).
    pub watch_config: bool,
    /// Worker threads serving requests; 0 means one per CPU.
    pub workers: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: ListenAddrs(vec![SocketAddr::from(([0, 0, 0, 0], 8009))]),
            header_read_timeout: HumanDuration::secs(10),
            body_timeout: HumanDuration::secs(10),
            upload_idle_timeout: HumanDuration::secs(60),
            shutdown_timeout: HumanDuration::secs(30),
            admin_listen: None,
            watch_config: false,
            workers: 0,
        }
    }
}

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

/// `[registration]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrationConfig {
    /// `false`: every registration route answers `403 M_FORBIDDEN`.
    pub enabled: bool,
    /// Largest registration body accepted.
    pub max_body_bytes: usize,
    /// Whether Synapse's shared-secret admin registration may be reached
    /// through the gate.
    pub allow_admin_register: bool,
    /// `enforce`, or `shadow`: forward everything and only log and count
    /// what would have been refused.
    pub mode: GateMode,
    /// Closes registration for a while when completed registrations come
    /// too fast, server-wide (absent: off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lockdown: Option<LockdownSpec>,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        RegistrationConfig {
            enabled: true,
            max_body_bytes: 65536,
            allow_admin_register: false,
            mode: GateMode::Enforce,
            lockdown: None,
        }
    }
}

/// `[username]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsernameConfig {
    /// How upper-case letters are treated.
    pub case: CaseMode,
    /// Names nobody may register (answered as taken).
    pub reserved: Vec<String>,
    /// Also refuse look-alikes of reserved names.
    pub reserved_lookalikes: bool,
    /// Regexes over the mapped localpart; a match refuses the name.
    pub deny_patterns: Vec<DenyPattern>,
    /// Allow localparts starting with `_` (appservice namespace).
    pub allow_leading_underscore: bool,
    /// Allow all-digit localparts (Synapse's guest namespace).
    pub allow_numeric: bool,
}

/// The reserved names used when the operator gives none.
pub const DEFAULT_RESERVED: &[&str] = &[
    "abuse",
    "admin",
    "administrator",
    "help",
    "helpdesk",
    "hostmaster",
    "info",
    "mailer-daemon",
    "matrix",
    "mod",
    "moderator",
    "noc",
    "noreply",
    "no-reply",
    "official",
    "postmaster",
    "root",
    "security",
    "server",
    "staff",
    "support",
    "synapse",
    "sysadmin",
    "system",
    "webmaster",
];

impl Default for UsernameConfig {
    fn default() -> Self {
        UsernameConfig {
            case: CaseMode::Lowercase,
            reserved: DEFAULT_RESERVED.iter().map(|s| (*s).to_owned()).collect(),
            reserved_lookalikes: true,
            deny_patterns: Vec::new(),
            allow_leading_underscore: false,
            allow_numeric: false,
        }
    }
}

/// `[guest]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestConfig {
    /// Whether `kind=guest` registrations may pass.
    pub access: GuestAccess,
}

/// `[client_ip]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientIpConfig {
    /// Proxies whose `X-Forwarded-For` entries are believed.
    pub trusted_proxies: Vec<Network>,
    /// IPv6 clients are keyed by this prefix length.
    pub ipv6_prefix_len: u8,
    /// Clients refused on every guarded route (`403 M_FORBIDDEN`).
    pub deny: Vec<Network>,
    /// User agents (regexes) refused on every guarded route.
    pub deny_user_agents: Vec<DenyPattern>,
    /// Files of addresses and networks refused on every guarded route,
    /// read when the configuration is loaded.
    pub deny_lists: AddressLists,
}

impl Default for ClientIpConfig {
    fn default() -> Self {
        ClientIpConfig {
            trusted_proxies: Vec::new(),
            ipv6_prefix_len: 64,
            deny: Vec::new(),
            deny_user_agents: Vec::new(),
            deny_lists: AddressLists::default(),
        }
    }
}

impl ClientIpConfig {
    /// The resolver these settings describe.
    pub fn resolver(&self) -> ClientResolver {
        ClientResolver::new(
            self.trusted_proxies.iter().map(|p| p.0).collect(),
            self.ipv6_prefix_len,
        )
    }
}

/// `[email]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmailConfig {
    /// If not empty, `email/requestToken` only for these domains (globs such
    /// as `"example.org"`, `"*.example.org"`).
    pub allowed_domains: Vec<DomainGlob>,
    /// `email/requestToken` refused for these domains (globs).
    pub denied_domains: Vec<DomainGlob>,
    /// Files of domains refused for `email/requestToken`, with their
    /// subdomains; read when the configuration is loaded.
    pub denied_domain_lists: DomainLists,
}

/// A domain glob: `*` matches any run of characters; case-insensitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainGlob(pub String);

impl DomainGlob {
    /// Whether `domain` matches this glob.
    pub fn matches(&self, domain: &str) -> bool {
        glob_match(self.0.as_bytes(), domain.to_ascii_lowercase().as_bytes())
    }
}

fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative wildcard matching with backtracking to the last `*`.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

impl<'de> Deserialize<'de> for DomainGlob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let ok = !text.is_empty()
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'*' | b'_'));
        if ok {
            Ok(DomainGlob(text.to_ascii_lowercase()))
        } else {
            Err(de::Error::custom(format!(
                "expected a domain or glob such as \"*.example.org\", got \"{text}\""
            )))
        }
    }
}

impl Serialize for DomainGlob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A level or `tracing` filter (`info`, `debug`,
    /// `matrix_gatekeeper=debug`); `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

/// The admin listener address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for AdminAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map(AdminAddr).map_err(|_| {
            de::Error::custom(format!(
                "expected an address such as \"127.0.0.1:9009\", got \"{text}\""
            ))
        })
    }
}

impl Serialize for AdminAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// A network or single address (`"10.0.0.0/8"`, `"::1"`).
#[derive(Debug, Clone, Copy)]
pub struct Network(pub IpNet);

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map(Network).map_err(de::Error::custom)
    }
}

impl Serialize for Network {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

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
    /// Most clients tracked in memory; beyond it new clients share coarser keys.
    pub max_tracked_clients: usize,
    /// Redis URL for `store = "redis"`; with `redis_cluster`, a
    /// comma-separated list of cluster seed nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
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
            max_tracked_clients: 1_000_000,
            redis_url: None,
            redis_cluster: false,
            redis_timeout: HumanDuration(Duration::from_millis(50)),
            on_store_error: OnStoreError::Local,
        }
    }
}

impl RateLimitConfig {
    /// Every limit with its configuration name.
    pub fn limits(&self) -> [(&'static str, Option<LimitSpec>); 6] {
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
        ]
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
}

/// `[registration] lockdown = { count = N, period = P, close_for = D }`:
/// when N registrations complete within P (a sliding window), registration
/// closes for D.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LockdownSpec {
    /// Completed registrations that close registration.
    pub count: u32,
    /// The window they are counted in.
    pub period: HumanDuration,
    /// How long registration stays closed.
    pub close_for: HumanDuration,
}

impl LockdownSpec {
    /// Largest `count`: the window keeps one timestamp per registration.
    pub const MAX_COUNT: u32 = 100_000;

    fn validate(&self) -> Result<(), ConfigError> {
        if self.count == 0 || self.count > Self::MAX_COUNT {
            return Err(ConfigError::invalid(
                "registration.lockdown.count",
                format!(
                    "expected 1 to {} (remove lockdown to turn it off), got {}",
                    Self::MAX_COUNT,
                    self.count
                ),
            ));
        }
        for (key, d) in [("period", self.period), ("close_for", self.close_for)] {
            if d.0.is_zero() {
                return Err(ConfigError::invalid(
                    format!("registration.lockdown.{key}"),
                    "must be longer than zero",
                ));
            }
        }
        Ok(())
    }
}

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
        let mut bytes = std::fs::read(path).map_err(|e| {
            ConfigError::invalid(
                "admin.token_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
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
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.webhook_url {
            let parsed: http::Uri = url.parse().map_err(|_| {
                ConfigError::invalid("notify.webhook_url", format!("not a URL: \"{url}\""))
            })?;
            if parsed.scheme_str() != Some("http") {
                return Err(ConfigError::invalid(
                    "notify.webhook_url",
                    format!(
                        "only http:// is supported (the gate has no TLS client; use a local relay), got \"{url}\""
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
        if self.webhook_secret_file.is_some() {
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
        let mut bytes = std::fs::read(path).map_err(|e| {
            ConfigError::invalid(
                "notify.webhook_secret_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        if bytes.is_empty() {
            return Err(ConfigError::invalid(
                "notify.webhook_secret_file",
                format!("{} is empty", path.display()),
            ));
        }
        Ok(Some(bytes))
    }
}

/// `[reputation]`: DNS blocklists (DNSBL) asked about the client address
/// on the guarded routes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReputationConfig {
    /// DNSBL zones (`"dnsbl.example.net"`); empty: no lookups.
    pub dnsbl: Vec<DnsblZone>,
    /// The DNS server asked (`"ip:port"`); absent: the first `nameserver`
    /// of `/etc/resolv.conf`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_server: Option<DnsServer>,
    /// Longest wait for all zones together.
    pub dnsbl_timeout: HumanDuration,
    /// What a timeout or a failed lookup does.
    pub on_dnsbl_error: OnDnsblError,
}

impl Default for ReputationConfig {
    fn default() -> Self {
        ReputationConfig {
            dnsbl: Vec::new(),
            dns_server: None,
            dnsbl_timeout: HumanDuration(Duration::from_millis(250)),
            on_dnsbl_error: OnDnsblError::Allow,
        }
    }
}

impl ReputationConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.dnsbl_timeout.0.is_zero() {
            return Err(ConfigError::invalid(
                "reputation.dnsbl_timeout",
                "must be longer than zero",
            ));
        }
        for (i, zone) in self.dnsbl.iter().enumerate() {
            if self.dnsbl[..i].contains(zone) {
                return Err(ConfigError::invalid(
                    format!("reputation.dnsbl[{i}]"),
                    format!("\"{}\" is listed twice", zone.0),
                ));
            }
        }
        Ok(())
    }
}

/// A DNSBL zone: a lowercase domain name, no trailing dot, short enough that
/// an IPv6 query name (64 more characters) stays within DNS's 253.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsblZone(pub String);

impl DnsblZone {
    /// Longest zone: 253 minus the 32 nibbles of an IPv6 query and their dots.
    pub const MAX_LEN: usize = 253 - 64;
}

impl<'de> Deserialize<'de> for DnsblZone {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let zone = text.strip_suffix('.').unwrap_or(&text).to_ascii_lowercase();
        let label_ok = |label: &str| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if zone.len() <= Self::MAX_LEN && zone.contains('.') && zone.split('.').all(label_ok) {
            Ok(DnsblZone(zone))
        } else {
            Err(de::Error::custom(format!(
                "expected a DNSBL zone such as \"dnsbl.example.net\", got \"{text}\""
            )))
        }
    }
}

impl Serialize for DnsblZone {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// The DNS server DNSBL queries go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsServer(pub SocketAddr);

impl<'de> Deserialize<'de> for DnsServer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map(DnsServer).map_err(|_| {
            de::Error::custom(format!(
                "expected an address such as \"127.0.0.1:53\" or \"[::1]:53\", got \"{text}\""
            ))
        })
    }
}

impl Serialize for DnsServer {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

// === small value types ===

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? } default $default:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl Default for $name {
            fn default() -> Self {
                $name::$default
            }
        }

        impl $name {
            /// The configuration spelling of this value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let expected = expected_list(&[$($text),+]);
                let value = toml::Value::deserialize(d)?;
                match value.as_str() {
                    $(Some($text) => Ok($name::$variant),)+
                    Some(other) => Err(de::Error::custom(format!("expected {expected}, got \"{other}\""))),
                    None => Err(de::Error::custom(format!("expected {expected}, got {value}"))),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

fn expected_list(options: &[&str]) -> String {
    let quoted: Vec<String> = options.iter().map(|o| format!("\"{o}\"")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.join(""),
    }
}

string_enum!(
    /// How upper-case letters in a requested username are treated.
    CaseMode {
        /// Map to lower case exactly as Synapse does, then check.
        Lowercase => "lowercase",
        /// Refuse names that are not already lower case.
        Reject => "reject",
    } default Lowercase
);

string_enum!(
    /// Whether guests may register.
    GuestAccess {
        /// Guest registration passes with a stripped body.
        Allow => "allow",
        /// Guest registration is refused with `403 M_FORBIDDEN`.
        Deny => "deny",
    } default Deny
);

string_enum!(
    /// Whether the gate enforces its decisions.
    GateMode {
        /// Refusals are answered.
        Enforce => "enforce",
        /// Everything is forwarded; refusals are only logged and counted.
        Shadow => "shadow",
    } default Enforce
);

string_enum!(
    /// Log line format.
    LogFormat {
        /// Human-readable lines.
        Text => "text",
        /// One JSON object per line.
        Json => "json",
    } default Text
);

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

string_enum!(
    /// What a DNSBL lookup that times out or fails does.
    OnDnsblError {
        /// Let the request pass, as if no zone listed the client.
        Allow => "allow",
        /// Refuse the request with 403.
        Deny => "deny",
    } default Allow
);

/// A duration written as `"250ms"`, `"5s"`, `"1m"`, `"2h"` or `"1d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// A whole number of seconds.
    pub const fn secs(s: u64) -> Self {
        HumanDuration(Duration::from_secs(s))
    }

    /// Parses the configuration spelling of a duration.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("expected a duration such as \"5s\", got \"{text}\""))?;
        let (number, unit) = text.split_at(split);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("expected a duration such as \"5s\", got \"{text}\""))?;
        let ms = match unit {
            "ms" => Some(n),
            "s" => n.checked_mul(1000),
            "m" => n.checked_mul(60_000),
            "h" => n.checked_mul(3_600_000),
            "d" => n.checked_mul(86_400_000),
            _ => {
                return Err(format!(
                    "unknown unit \"{unit}\" in \"{text}\" (use ms, s, m, h or d)"
                ))
            }
        }
        .ok_or_else(|| format!("duration \"{text}\" is too long"))?;
        Ok(HumanDuration(Duration::from_millis(ms)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            write!(f, "{ms}ms")
        } else if ms.is_multiple_of(3_600_000) && ms > 0 {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) && ms > 0 {
            write!(f, "{}m", ms / 60_000)
        } else {
            write!(f, "{}s", ms / 1000)
        }
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = toml::Value::deserialize(d)?;
        match value.as_str() {
            Some(text) => HumanDuration::parse(text).map_err(de::Error::custom),
            None => Err(de::Error::custom(format!(
                "expected a duration string such as \"5s\", got {value}"
            ))),
        }
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One listen address or several.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddrs(pub Vec<SocketAddr>);

impl<'de> Deserialize<'de> for ListenAddrs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let parse = |s: &str| {
            s.parse::<SocketAddr>().map_err(|_| {
                de::Error::custom(format!(
                    "expected an address such as \"0.0.0.0:8009\" or \"[::]:8009\", got \"{s}\""
                ))
            })
        };
        match toml::Value::deserialize(d)? {
            toml::Value::String(s) => Ok(ListenAddrs(vec![parse(&s)?])),
            toml::Value::Array(items) => items
                .iter()
                .map(|item| match item.as_str() {
                    Some(s) => parse(s),
                    None => Err(de::Error::custom(format!(
                        "expected address strings, got {item}"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(ListenAddrs),
            other => Err(de::Error::custom(format!(
                "expected an address or a list of addresses, got {other}"
            ))),
        }
    }
}

impl Serialize for ListenAddrs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|a| a.to_string()))
    }
}

/// A compiled deny pattern, kept with its source text.
#[derive(Debug, Clone)]
pub struct DenyPattern(pub Regex);

impl<'de> Deserialize<'de> for DenyPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Regex::new(&text)
            .map(DenyPattern)
            .map_err(|e| de::Error::custom(format!("invalid regex \"{text}\": {e}")))
    }
}

impl Serialize for DenyPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

fn deserialize_uri<'de, D: Deserializer<'de>>(d: D) -> Result<http::Uri, D::Error> {
    let text = String::deserialize(d)?;
    text.parse::<http::Uri>()
        .map_err(|e| de::Error::custom(format!("invalid URL \"{text}\": {e}")))
}

fn serialize_display<S: Serializer, T: fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
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

    fn err(text: &str) -> String {
        Config::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn bad_enum_value_names_the_key_and_the_choices() {
        assert_eq!(
            err("[guest]\naccess = \"sometimes\"\n"),
            "guest.access: expected \"allow\" or \"deny\", got \"sometimes\""
        );
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
    fn durations_parse_and_print() {
        assert_eq!(
            HumanDuration::parse("250ms").unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!(
            HumanDuration::parse("1h").unwrap().0,
            Duration::from_secs(3600)
        );
        assert!(HumanDuration::parse("5").is_err());
        assert!(HumanDuration::parse("5 parsecs").is_err());
        assert_eq!(HumanDuration::secs(90).to_string(), "90s");
        assert_eq!(HumanDuration::secs(120).to_string(), "2m");
        let e = err("[upstream]\nconnect_timeout = \"5x\"\n");
        assert!(e.starts_with("upstream.connect_timeout:"), "{e}");
    }

    #[test]
    fn listen_takes_one_address_or_a_list() {
        let c = Config::from_toml("[server]\nlisten = \"127.0.0.1:1\"\n").unwrap();
        assert_eq!(c.server.listen.0.len(), 1);
        let c = Config::from_toml("[server]\nlisten = [\"127.0.0.1:1\", \"[::1]:2\"]\n").unwrap();
        assert_eq!(c.server.listen.0.len(), 2);
        assert!(err("[server]\nlisten = \"nowhere\"\n").starts_with("server.listen:"));
    }

    #[test]
    fn bad_regex_and_upstream_are_named() {
        assert!(err("[username]\ndeny_patterns = [\"(\"]\n").starts_with("username.deny_patterns"));
        assert!(err("[upstream]\nurl = \"https://x\"\n").starts_with("upstream.url:"));
        assert!(
            err("[registration]\nmax_body_bytes = 0\n").starts_with("registration.max_body_bytes:")
        );
        assert!(err("[username]\nreserved = [\"Admin\"]\n").starts_with("username.reserved[0]:"));
    }

    #[test]
    fn rate_limits_and_client_ip_are_validated_by_key() {
        let c = Config::from_toml(
            "[client_ip]\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]\nipv6_prefix_len = 56\n\
             [rate_limit]\nregistrations_per_ip = { count = 3, period = \"1h\" }\n",
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
        assert!(err("[client_ip]\ntrusted_proxies = [\"10.0.0.0/99\"]\n")
            .starts_with("client_ip.trusted_proxies[0]:"));
        assert!(err("[client_ip]\nipv6_prefix_len = 0\n").starts_with("client_ip.ipv6_prefix_len:"));
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

    #[test]
    fn operations_sections_parse() {
        let c = Config::from_toml(
            "[server]\nadmin_listen = \"127.0.0.1:9009\"\n[registration]\nmode = \"shadow\"\n\
             [client_ip]\ndeny = [\"192.0.2.0/24\"]\ndeny_user_agents = [\"(?i)curl\"]\n\
             [email]\nallowed_domains = [\"*.Example.org\", \"example.org\"]\n[log]\nformat = \"json\"\nlevel = \"debug\"\n",
        )
        .unwrap();
        assert_eq!(c.registration.mode, GateMode::Shadow);
        assert_eq!(c.log.format, LogFormat::Json);
        assert!(c.email.allowed_domains[0].matches("mail.EXAMPLE.org"));
        assert!(!c.email.allowed_domains[0].matches("example.org"));
        assert!(c.email.allowed_domains[1].matches("example.org"));
        assert!(err("[registration]\nmode = \"loud\"\n").starts_with("registration.mode:"));
        assert!(
            err("[email]\ndenied_domains = [\"a b\"]\n").starts_with("email.denied_domains[0]:")
        );
        assert!(err("[log]\nlevel = \"very=loud=x\"\n").starts_with("log.level:"));
        for typo in [
            "inof",
            "",
            " , ",
            "debug,matrix_gatekeeper",
            "=info",
            "x=loud",
        ] {
            let message = err(&format!("[log]\nlevel = \"{typo}\"\n"));
            assert!(message.starts_with("log.level:"), "{typo:?}: {message}");
        }
        for good in [
            "info",
            "WARN",
            "warn,matrix_gatekeeper::audit=info",
            "a[span]=debug",
        ] {
            Config::from_toml(&format!("[log]\nlevel = \"{good}\"\n"))
                .unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
        assert!(err("[server]\nadmin_listen = \"x\"\n").starts_with("server.admin_listen:"));
    }

    #[test]
    fn globs_match_like_shells() {
        let g = |p: &str, t: &str| DomainGlob(p.to_owned()).matches(t);
        assert!(g("*", "anything.example"));
        assert!(g("*.mail.*", "x.mail.example"));
        assert!(!g("*.mail.*", "mail.example"));
        assert!(g("a*b*c", "aXXbYYc"));
        assert!(!g("a*b*c", "aXXbYY"));
        assert!(!g("example.org", "example.org.evil"));
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
