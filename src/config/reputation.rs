//! `[reputation]`: DNS blocklists asked about the client address, and the
//! networks (ASN, country) it belongs to.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::Deserializer;
use serde::{Deserialize, Serialize, Serializer};

use super::error::ConfigError;
use super::values::{parse_str, string_enum, HumanDuration};
use crate::defences::lists::{AsnLists, ListKind};
use crate::defences::networks::{AsNumber, Country, NetworkDatabase, Networks};

/// `[reputation]`: DNS blocklists (DNSBL) asked about the client address
/// on the guarded routes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReputationConfig {
    /// DNSBL zones (`"dnsbl.example.net"`); empty: no lookups.
    pub dnsbl: Vec<DnsblZone>,
    /// The DNS server asked (`"ip:port"`); absent: the `nameserver`s
    /// of `/etc/resolv.conf`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_server: Option<DnsServer>,
    /// Longest wait for all zones together.
    pub dnsbl_timeout: HumanDuration,
    /// What a timeout or a failed lookup does.
    pub on_dnsbl_error: OnDnsblError,
    /// An ASN database in MaxMind DB format (GeoLite2-ASN, DB-IP, IPinfo),
    /// read when the configuration is loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asn_database: Option<NetworkDatabase>,
    /// A country database in MaxMind DB format (GeoLite2-Country, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country_database: Option<NetworkDatabase>,
    /// Networks refused on every guarded route (`403 M_FORBIDDEN`).
    pub deny_asns: Vec<AsNumber>,
    /// Lists of networks refused like `deny_asns` (files or URLs, one AS
    /// per line), unless `allow_asns` names them.
    pub deny_asn_lists: AsnLists,
    /// Networks trusted: no country rule and no per-network limit applies.
    pub allow_asns: Vec<AsNumber>,
    /// Countries refused on every guarded route (`403 M_FORBIDDEN`).
    pub deny_countries: Vec<Country>,
    /// How often a list fetched from a URL is fetched again.
    pub list_refresh: HumanDuration,
    /// Longest wait for one fetch of a list, from connecting to the last
    /// byte.
    pub list_timeout: HumanDuration,
    /// Largest list fetched (bytes); a longer answer is refused.
    pub list_max_bytes: u64,
    /// A fetched list whose last successful fetch is older than this is
    /// stale: reported, and kept or dropped by `on_stale_list`.
    pub list_max_age: HumanDuration,
    /// What a stale list does.
    pub on_stale_list: OnStaleList,
    /// PEM file of CA certificates trusted for list URLs besides the
    /// built-in public roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub list_ca_file: Option<PathBuf>,
}

impl Default for ReputationConfig {
    fn default() -> Self {
        ReputationConfig {
            dnsbl: Vec::new(),
            dns_server: None,
            dnsbl_timeout: HumanDuration(Duration::from_millis(250)),
            on_dnsbl_error: OnDnsblError::Allow,
            asn_database: None,
            country_database: None,
            deny_asns: Vec::new(),
            deny_asn_lists: AsnLists::default(),
            allow_asns: Vec::new(),
            deny_countries: Vec::new(),
            list_refresh: HumanDuration::secs(3600),
            list_timeout: HumanDuration::secs(30),
            list_max_bytes: DEFAULT_LIST_MAX_BYTES,
            list_max_age: HumanDuration::secs(86_400),
            on_stale_list: OnStaleList::Keep,
            list_ca_file: None,
        }
    }
}

impl super::Config {
    /// The network rules and databases of this configuration, and whether
    /// `[rate_limit]` counts networks.
    pub fn networks(&self) -> Networks {
        let reputation = &self.reputation;
        let limits = &self.rate_limit;
        Networks::new(
            reputation.asn_database.clone(),
            reputation.country_database.clone(),
            &reputation.deny_asns,
            reputation.deny_asn_lists.clone(),
            &reputation.allow_asns,
            reputation.deny_countries.clone(),
            limits.registrations_per_asn.is_some() || limits.attempts_per_asn.is_some(),
        )
    }
}

impl ReputationConfig {
    /// The network databases configured (ASN, then country).
    pub fn databases(&self) -> impl Iterator<Item = &NetworkDatabase> {
        self.database_entries().map(|(_, database)| database)
    }

    /// The network databases configured, with their kind.
    pub fn database_entries(&self) -> impl Iterator<Item = (ListKind, &NetworkDatabase)> {
        let asn = self
            .asn_database
            .iter()
            .map(|db| (ListKind::AsnDatabase, db));
        let country = self.country_database.iter();
        asn.chain(country.map(|db| (ListKind::CountryDatabase, db)))
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.dnsbl_timeout
            .check_positive("reputation.dnsbl_timeout")?;
        for (i, zone) in self.dnsbl.iter().enumerate() {
            if self.dnsbl[..i].contains(zone) {
                return Err(ConfigError::invalid(
                    format!("reputation.dnsbl[{i}]"),
                    format!("\"{}\" is listed twice", zone.0),
                ));
            }
        }
        if self.asn_database.is_none() {
            for (key, list) in [
                ("deny_asns", &self.deny_asns),
                ("allow_asns", &self.allow_asns),
            ] {
                if !list.is_empty() {
                    return Err(ConfigError::invalid(
                        format!("reputation.{key}"),
                        "needs reputation.asn_database to know a client's network",
                    ));
                }
            }
            if !self.deny_asn_lists.sources().is_empty() {
                return Err(ConfigError::invalid(
                    "reputation.deny_asn_lists",
                    "needs reputation.asn_database to know a client's network",
                ));
            }
        }
        if let Some(asn) = self.deny_asns.iter().find(|a| self.allow_asns.contains(a)) {
            return Err(ConfigError::invalid(
                "reputation.allow_asns",
                format!("{asn} is also in reputation.deny_asns"),
            ));
        }
        if self.country_database.is_none() && !self.deny_countries.is_empty() {
            return Err(ConfigError::invalid(
                "reputation.deny_countries",
                "needs reputation.country_database to know a client's country",
            ));
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

impl std::str::FromStr for DnsblZone {
    type Err = ();

    fn from_str(text: &str) -> Result<Self, ()> {
        let zone = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
        let label_ok = |label: &str| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        let ok = zone.len() <= Self::MAX_LEN && zone.contains('.') && zone.split('.').all(label_ok);
        ok.then_some(DnsblZone(zone)).ok_or(())
    }
}

impl<'de> Deserialize<'de> for DnsblZone {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, "a DNSBL zone such as \"dnsbl.example.net\"")
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
        parse_str(d, "an address such as \"127.0.0.1:53\" or \"[::1]:53\"").map(DnsServer)
    }
}

impl Serialize for DnsServer {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

string_enum!(
    /// What a DNSBL lookup that times out or fails does.
    OnDnsblError {
        /// Let the request pass, as if no zone listed the client.
        Allow => "allow",
        /// Refuse the request with 403.
        Deny => "deny",
    } default Allow
);

/// Default `list_max_bytes`: 64 MiB, ten times a full FireHOL level 1-4
/// list.
pub const DEFAULT_LIST_MAX_BYTES: u64 = 64 * 1024 * 1024;

string_enum!(
    /// What a fetched list that has not been refreshed for longer than
    /// `list_max_age` does.
    OnStaleList {
        /// Keep guarding with the last copy.
        Keep => "keep",
        /// Stop using it (the list is empty) until a fetch succeeds.
        Drop => "drop",
    } default Keep
);
