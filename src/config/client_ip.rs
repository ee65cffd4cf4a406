//! `[client_ip]`: how the client address is found, and which clients are
//! refused outright.

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use super::error::ConfigError;
use super::values::DenyPattern;
use crate::client_ip::{ClientResolver, IpNet};
use crate::defences::lists::AddressLists;

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

impl ClientIpConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let prefix = self.ipv6_prefix_len;
        if !(1..=128).contains(&prefix) {
            return Err(ConfigError::invalid(
                "client_ip.ipv6_prefix_len",
                format!("expected 1 to 128, got {prefix}"),
            ));
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use crate::config::tests::err;
    use crate::config::Config;

    #[test]
    fn proxies_and_prefix_are_validated_by_key() {
        let c = Config::from_toml(
            "[client_ip]\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]\nipv6_prefix_len = 56\n",
        )
        .unwrap();
        assert_eq!(c.client_ip.trusted_proxies.len(), 2);
        assert!(err("[client_ip]\ntrusted_proxies = [\"10.0.0.0/99\"]\n")
            .starts_with("client_ip.trusted_proxies[0]:"));
        assert!(err("[client_ip]\nipv6_prefix_len = 0\n").starts_with("client_ip.ipv6_prefix_len:"));
    }

    #[test]
    fn deny_rules_parse() {
        let c = Config::from_toml(
            "[client_ip]\ndeny = [\"192.0.2.0/24\"]\ndeny_user_agents = [\"(?i)curl\"]\n",
        )
        .unwrap();
        assert_eq!(c.client_ip.deny.len(), 1);
        assert!(c.client_ip.deny_user_agents[0].0.is_match("CURL/8"));
    }

    #[test]
    fn ipv6_networks_in_deny_and_trusted_proxies_never_cover_ipv4_clients() {
        let c = Config::from_toml(
            "[client_ip]\ndeny = [\"::/8\", \"::/0\"]\ntrusted_proxies = [\"::/0\"]\n",
        )
        .unwrap();
        let v4: std::net::IpAddr = "203.0.113.7".parse().unwrap();
        let mapped: std::net::IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        let v6: std::net::IpAddr = "::5".parse().unwrap();
        for deny in &c.client_ip.deny {
            assert!(!deny.0.contains(v4), "{}", deny.0);
            assert!(!deny.0.contains(mapped), "{}", deny.0);
            assert!(deny.0.contains(v6), "{}", deny.0);
        }
        let resolver = c.client_ip.resolver();
        assert!(!resolver.trusts(v4));
        assert!(!resolver.trusts(mapped));
        assert!(resolver.trusts(v6));
    }

    #[test]
    fn mapped_networks_of_96_bits_or_less_are_refused_by_key() {
        for (key, network) in [
            ("deny", "::ffff:0:0/96"),
            ("deny", "::ffff:1.2.3.4/96"),
            ("trusted_proxies", "::ffff:10.0.0.0/80"),
            ("trusted_proxies", "::ffff:0:0/96"),
        ] {
            let error = err(&format!("[client_ip]\n{key} = [{network:?}]\n"));
            assert_eq!(
                error,
                format!(
                    "client_ip.{key}[0]: \"{network}\" is an IPv4-mapped network with a prefix \
                     of 96 or less, which covers no client: IPv4 clients are compared as IPv4; \
                     write the IPv4 network instead (e.g. \"0.0.0.0/0\")"
                )
            );
        }
    }
}
