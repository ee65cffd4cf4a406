//! Networks: the autonomous system (ASN) and the country a client address
//! belongs to, read from databases in MaxMind DB format
//! (`[reputation] asn_database`, `country_database`).
//!
//! Registration waves come from a handful of hosting networks spread over
//! hundreds of subnets, so the operator can refuse a network or a country
//! outright (`deny_asns`, the published lists of hosting networks of
//! `deny_asn_lists`, `deny_countries`), trust one (`allow_asns`), and
//! limit registrations per network (`[rate_limit] registrations_per_asn`,
//! `attempts_per_asn`).
//!
//! A database is a path or a URL, as a list is (see [`crate::defences::lists`]: a
//! URL is fetched into a copy under `[server] state_dir` and refreshed with
//! the lists). It is read whole into memory when the configuration is
//! loaded (at start and at every reload, never on the request path),
//! checked from end to end (its search tree and every record it points at)
//! so that a corrupt or cut file is refused at load — a reload then keeps
//! the database in force, and the fetcher keeps the last good copy — and
//! guarded against a file written while it is read as list files are. A lookup walks the search tree — at
//! most 128 steps, no allocation but the network's name — and is made only
//! on guarded routes.
//!
//! The records of GeoLite2-ASN and GeoLite2-Country are read, and the ones
//! of DB-IP's free databases (the same layout) and IPinfo's (`asn` as
//! `"AS64496"`, `as_name` or `name`, `country` or `country_code` as a code).
//! An address in a database that holds nothing for it has no network: it
//! is not refused by the network rules and not counted by the per-network
//! limits.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use maxminddb::Reader;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::defences::lists::{
    load_entry, open_database, AsnLists, ListContext, ListEntry, ListError, ListInfo, RemoteList,
    Stamp,
};

mod record;

pub use record::Network;

/// A network database as configured (a path, or a URL fetched into a copy
/// under `[server] state_dir`) and, once loaded, checked; cheap to clone
/// (shared).
#[derive(Clone)]
pub struct NetworkDatabase {
    entry: ListEntry,
    info: Option<ListInfo>,
    /// `None` until loaded, and for a URL with no copy yet (an optional
    /// one) or a stale copy dropped: the database then knows no address.
    reader: Option<Arc<Reader<Vec<u8>>>>,
}

impl NetworkDatabase {
    /// Reads the file at `path` whole and checks every part of it.
    pub fn load(path: &str) -> Result<NetworkDatabase, ListError> {
        let mut database = NetworkDatabase::from(ListEntry::File(path.to_owned()));
        database.load_with(&ListContext::default())?;
        Ok(database)
    }

    /// Reads the configured file, or a URL's copy under
    /// `context.state_dir`, whole, and checks every part of it.
    pub fn load_with(&mut self, context: &ListContext) -> Result<(), ListError> {
        let (info, bytes) = load_entry(&self.entry, context, false)?;
        self.reader = if bytes.is_empty() && info.remote.is_some() {
            None
        } else {
            Some(Arc::new(open_database(&info.label(), bytes)?))
        };
        self.info = Some(info);
        Ok(())
    }

    /// The entry as configured.
    pub fn entry(&self) -> &ListEntry {
        &self.entry
    }

    /// The configured file and its stamp when it was read (what the reload
    /// watcher compares); `None` for a URL, whose refresher reloads.
    pub fn file(&self) -> Option<(&str, Stamp)> {
        let (path, stamp) = self.info.as_ref()?.file.as_ref()?;
        Some((path, *stamp))
    }

    /// The URL's copy, as loaded; `None` for a file.
    pub fn remote(&self) -> Option<&RemoteList> {
        self.info.as_ref()?.remote.as_ref()
    }

    /// What the database says it is (`GeoLite2-ASN`, …), once loaded.
    pub fn database_type(&self) -> Option<&str> {
        Some(&self.reader.as_ref()?.metadata().database_type)
    }

    /// The record for `ip`: an IPv4-mapped IPv6 address is looked up as
    /// the IPv4 address it carries. A failed lookup (an IPv6 address in an
    /// IPv4-only database, a record of another shape) finds nothing.
    fn record(&self, ip: IpAddr) -> Option<Network> {
        let ip = ip.to_canonical();
        let result = self.reader.as_ref()?.lookup(ip).ok()?;
        result.decode::<Network>().ok().flatten()
    }
}

impl From<ListEntry> for NetworkDatabase {
    fn from(entry: ListEntry) -> Self {
        NetworkDatabase {
            entry,
            info: None,
            reader: None,
        }
    }
}

impl fmt::Debug for NetworkDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetworkDatabase")
            .field("entry", &self.entry)
            .field("type", &self.database_type())
            .finish()
    }
}

impl<'de> Deserialize<'de> for NetworkDatabase {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ListEntry::deserialize(d).map(NetworkDatabase::from)
    }
}

impl Serialize for NetworkDatabase {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.entry.serialize(s)
    }
}

/// An autonomous system number: `64496` or `"AS64496"` in the
/// configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AsNumber(pub u32);

impl std::str::FromStr for AsNumber {
    type Err = ();

    fn from_str(text: &str) -> Result<Self, ()> {
        let digits = text
            .strip_prefix("AS")
            .or_else(|| text.strip_prefix("as"))
            .unwrap_or(text);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(());
        }
        digits.parse().map(AsNumber).map_err(drop)
    }
}

impl fmt::Display for AsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AS{}", self.0)
    }
}

impl<'de> Deserialize<'de> for AsNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct AsVisitor;
        impl Visitor<'_> for AsVisitor {
            type Value = AsNumber;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an AS number such as 64496 or \"AS64496\"")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<AsNumber, E> {
                u32::try_from(n)
                    .map(AsNumber)
                    .map_err(|_| E::custom(format!("{n} is not an AS number (at most 4294967295)")))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<AsNumber, E> {
                u64::try_from(n)
                    .map_err(|_| E::custom(format!("{n} is not an AS number")))
                    .and_then(|n| self.visit_u64(n))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<AsNumber, E> {
                text.parse().map_err(|()| {
                    E::custom(format!(
                        "expected an AS number such as 64496 or \"AS64496\", got {text:?}"
                    ))
                })
            }
        }
        d.deserialize_any(AsVisitor)
    }
}

impl Serialize for AsNumber {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.0)
    }
}

/// An ISO 3166-1 alpha-2 country code, upper case (`"NL"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Country([u8; 2]);

impl Country {
    /// The code.
    pub fn as_str(&self) -> &str {
        // Two ASCII letters, by construction.
        std::str::from_utf8(&self.0).unwrap_or("??")
    }
}

impl std::str::FromStr for Country {
    type Err = ();

    fn from_str(text: &str) -> Result<Self, ()> {
        match text.as_bytes() {
            &[a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
                Ok(Country([a.to_ascii_uppercase(), b.to_ascii_uppercase()]))
            }
            _ => Err(()),
        }
    }
}

impl fmt::Display for Country {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Country {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(|()| {
            de::Error::custom(format!(
                "expected a two-letter country code such as \"NL\", got {text:?}"
            ))
        })
    }
}

impl Serialize for Country {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// The network rules and databases of one configuration: what the gate asks
/// about a client on the guarded routes.
#[derive(Debug, Clone, Default)]
pub struct Networks {
    asn_database: Option<NetworkDatabase>,
    country_database: Option<NetworkDatabase>,
    /// Sorted.
    deny_asns: Vec<u32>,
    deny_asn_lists: AsnLists,
    /// Sorted.
    allow_asns: Vec<u32>,
    deny_countries: Vec<Country>,
    /// Whether a per-network limit is configured (else no ASN is counted).
    counts_networks: bool,
}

/// What the network rules say about a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkVerdict {
    /// Nothing against it.
    Pass,
    /// Its ASN is in `allow_asns`: no country rule and no per-network limit
    /// applies.
    Trusted,
    /// Its ASN is in `deny_asns`, or in a list of `deny_asn_lists` and
    /// not in `allow_asns`.
    DeniedAsn,
    /// Its country is in `deny_countries`.
    DeniedCountry,
}

impl NetworkVerdict {
    /// The rule that refuses, for the audit line and the metric.
    pub fn rule(self) -> Option<&'static str> {
        match self {
            NetworkVerdict::DeniedAsn => Some("denied_asn"),
            NetworkVerdict::DeniedCountry => Some("denied_country"),
            NetworkVerdict::Pass | NetworkVerdict::Trusted => None,
        }
    }
}

impl Networks {
    /// The rules of `[reputation]` over its databases; `counts_networks`:
    /// whether a per-network limit is configured (else no ASN is counted).
    pub fn new(
        asn_database: Option<NetworkDatabase>,
        country_database: Option<NetworkDatabase>,
        deny_asns: &[AsNumber],
        deny_asn_lists: AsnLists,
        allow_asns: &[AsNumber],
        deny_countries: Vec<Country>,
        counts_networks: bool,
    ) -> Self {
        Networks {
            asn_database,
            country_database,
            deny_asns: sorted(deny_asns),
            deny_asn_lists,
            allow_asns: sorted(allow_asns),
            deny_countries,
            counts_networks,
        }
    }

    /// Whether any database is configured (else nothing is looked up).
    pub fn is_configured(&self) -> bool {
        self.asn_database.is_some() || self.country_database.is_some()
    }

    /// The network of `ip`: its ASN and name from the ASN database, its
    /// country from the country database (either may be absent).
    pub fn lookup(&self, ip: IpAddr) -> Network {
        let mut network = self
            .asn_database
            .as_ref()
            .and_then(|db| db.record(ip))
            .map(Network::without_country)
            .unwrap_or_default();
        network.country = self
            .country_database
            .as_ref()
            .and_then(|db| db.record(ip))
            .and_then(|record| record.country);
        network
    }

    /// What the rules say about `network`: an ASN of `deny_asns` first,
    /// then a trusted one (`allow_asns`), then one a list names
    /// (`deny_asn_lists`: a published list may name a network the operator
    /// trusts), then a denied country.
    pub fn verdict(&self, network: &Network) -> NetworkVerdict {
        match network.asn {
            Some(asn) if self.deny_asns.binary_search(&asn).is_ok() => NetworkVerdict::DeniedAsn,
            Some(asn) if self.allow_asns.binary_search(&asn).is_ok() => NetworkVerdict::Trusted,
            Some(asn) if self.deny_asn_lists.find(asn).is_some() => NetworkVerdict::DeniedAsn,
            _ => match network.country {
                Some(country) if self.deny_countries.contains(&country) => {
                    NetworkVerdict::DeniedCountry
                }
                _ => NetworkVerdict::Pass,
            },
        }
    }

    /// The list of `deny_asn_lists` that refuses `network` under `verdict`
    /// (none when `deny_asns` does, or nothing refuses it by its AS).
    pub fn denying_list(&self, network: &Network, verdict: NetworkVerdict) -> Option<&Arc<str>> {
        let asn = network
            .asn
            .filter(|_| verdict == NetworkVerdict::DeniedAsn)?;
        if self.deny_asns.binary_search(&asn).is_ok() {
            return None;
        }
        self.deny_asn_lists.find(asn)
    }

    /// The ASN the per-network limits count `network` under: none when no
    /// such limit is configured, the network is unknown, or trusted.
    pub fn counted_asn(&self, network: &Network, verdict: NetworkVerdict) -> Option<u32> {
        if !self.counts_networks || verdict == NetworkVerdict::Trusted {
            return None;
        }
        network.asn
    }
}

/// AS numbers sorted, for a lookup by bisection (an operator may deny
/// thousands).
fn sorted(numbers: &[AsNumber]) -> Vec<u32> {
    let mut sorted: Vec<u32> = numbers.iter().map(|a| a.0).collect();
    sorted.sort_unstable();
    sorted.dedup();
    sorted
}

/// A map visitor's helper: skips a value the gate does not read.
fn skip<'de, A: MapAccess<'de>>(map: &mut A) -> Result<(), A::Error> {
    map.next_value::<IgnoredAny>().map(drop)
}

#[cfg(test)]
#[path = "../../../tests/common/mmdb.rs"]
pub(crate) mod mmdb;

#[cfg(test)]
pub(crate) mod tests;
