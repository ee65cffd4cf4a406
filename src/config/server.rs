//! `[server]`: where the gate listens, and how long it waits for clients.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use super::error::ConfigError;
use super::values::{parse_str, HumanDuration};

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
    /// Where the gate keeps state across restarts: the copies of lists
    /// fetched from URLs (`lists/`). Needed when a list is a URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
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
            state_dir: None,
        }
    }
}

impl ServerConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.0.is_empty() {
            return Err(ConfigError::invalid(
                "server.listen",
                "at least one address is needed",
            ));
        }
        self.header_read_timeout
            .check_positive("server.header_read_timeout")?;
        self.body_timeout.check_positive("server.body_timeout")?;
        self.upload_idle_timeout
            .check_positive("server.upload_idle_timeout")
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

/// The admin listener address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for AdminAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, "an address such as \"127.0.0.1:9009\"").map(AdminAddr)
    }
}

impl Serialize for AdminAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::err;
    use crate::config::Config;

    #[test]
    fn listen_takes_one_address_or_a_list() {
        let c = Config::from_toml("[server]\nlisten = \"127.0.0.1:1\"\n").unwrap();
        assert_eq!(c.server.listen.0.len(), 1);
        let c = Config::from_toml("[server]\nlisten = [\"127.0.0.1:1\", \"[::1]:2\"]\n").unwrap();
        assert_eq!(c.server.listen.0.len(), 2);
        assert!(err("[server]\nlisten = \"nowhere\"\n").starts_with("server.listen:"));
    }

    #[test]
    fn admin_listen_is_an_address() {
        let c = Config::from_toml("[server]\nadmin_listen = \"127.0.0.1:9009\"\n").unwrap();
        assert_eq!(c.server.admin_listen.unwrap().0.port(), 9009);
        assert!(err("[server]\nadmin_listen = \"x\"\n").starts_with("server.admin_listen:"));
    }
}
