//! File-based deny lists: address lists (`[client_ip] deny_lists`) and
//! disposable e-mail domain lists (`[email] denied_domain_lists`).
//!
//! Both are read when the configuration is loaded (at start and on every
//! reload), never on the request path. Published lists are large — a Tor
//! exit list, a FireHOL `.netset` with hundreds of thousands of networks, a
//! disposable-domain list with over 100,000 names — so each is compiled into
//! a structure whose lookup is a handful of comparisons and never allocates:
//!
//! - addresses: sorted, merged ranges (`u32` bounds for IPv4, `u128` for
//!   IPv6) searched by bisection, one set per file so that a match can name
//!   the file it came from;
//! - domains: one hash map from a listed domain to its file; a lookup tries
//!   the domain and each parent at a label boundary.
//!
//! File format (both kinds): one entry per line, `#` starts a comment (a
//! whole line or the rest of one), blank lines are skipped. A line that is
//! not an entry is an error naming the file and the line number, so a
//! truncated download is refused instead of silently guarding less.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

/// Longest domain name (RFC 1035, without the trailing dot).
const MAX_DOMAIN_LEN: usize = 253;

/// How much of a broken line an error message repeats.
const SHOWN_LINE_MAX: usize = 80;

/// A list file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path as configured.
        path: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A line of an address list is not an address or a network.
    #[error("{path}:{line}: not an address or network: {text:?}")]
    NotAnAddress {
        /// The path as configured.
        path: String,
        /// One-based line number.
        line: usize,
        /// The entry (comment removed, cut to a readable length).
        text: String,
    },
    /// A line of a domain list is not a domain name.
    #[error("{path}:{line}: not a domain: {text:?}")]
    NotADomain {
        /// The path as configured.
        path: String,
        /// One-based line number.
        line: usize,
        /// The entry (comment removed, cut to a readable length).
        text: String,
    },
}

/// The entries of a list file: `(line number, entry)` for every line that
/// is neither blank nor a comment. A line that is not UTF-8 is handed on
/// as it reads lossily, so the caller reports it as a broken entry.
fn entries(bytes: &[u8]) -> impl Iterator<Item = (usize, std::borrow::Cow<'_, str>)> {
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter_map(|(index, line)| {
            let line = match line.iter().position(|&b| b == b'#') {
                Some(hash) => &line[..hash],
                None => line,
            };
            let line = line.trim_ascii();
            if line.is_empty() {
                return None;
            }
            Some((index + 1, String::from_utf8_lossy(line)))
        })
}

/// An entry for an error message: cut on a character boundary.
fn shown(text: &str) -> String {
    match text.char_indices().nth(SHOWN_LINE_MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// A file's modification time and length, `None` while it cannot be read:
/// what a watcher compares to see a change.
pub type Stamp = Option<(SystemTime, u64)>;

/// `path`'s [`Stamp`] now.
pub fn stamp(path: &std::path::Path) -> Stamp {
    std::fs::metadata(path)
        .and_then(|m| Ok((m.modified()?, m.len())))
        .ok()
}

/// The file's bytes, and its stamp taken before they were read: a change
/// made while it is read shows as a changed stamp later.
fn read(path: &str) -> Result<(Vec<u8>, Stamp), ListError> {
    let stamp = stamp(path.as_ref());
    let bytes = std::fs::read(path).map_err(|source| ListError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok((bytes, stamp))
}

// === addresses ===

/// The IPv4-mapped IPv6 block `::ffff:0:0/96`, as `u128` bounds.
const MAPPED_FIRST: u128 = 0xffff_0000_0000;
const MAPPED_LAST: u128 = 0xffff_ffff_ffff;

/// A set of IPv4 and IPv6 addresses as sorted, disjoint, non-adjacent
/// inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl AddressSet {
    /// Parses one entry: an address or `address/prefix`, IPv4 or IPv6. An
    /// IPv4-mapped IPv6 entry counts as IPv4, as client addresses do.
    fn add_entry(&mut self, entry: &str) -> Option<()> {
        let (addr, prefix) = match entry.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix.parse::<u8>().ok()?)),
            None => (entry, None),
        };
        match addr.parse::<IpAddr>().ok()? {
            IpAddr::V4(ip) => {
                let prefix = prefix.unwrap_or(32);
                if prefix > 32 {
                    return None;
                }
                self.v4.push(v4_range(u32::from(ip), prefix));
            }
            IpAddr::V6(ip) => {
                let prefix = prefix.unwrap_or(128);
                if prefix > 128 {
                    return None;
                }
                let (first, last) = v6_range(u128::from(ip), prefix);
                // The part inside ::ffff:0:0/96 is an IPv4 range: clients
                // are compared in their canonical (IPv4) form.
                let (mapped_first, mapped_last) = (first.max(MAPPED_FIRST), last.min(MAPPED_LAST));
                if mapped_first <= mapped_last {
                    // Both bounds lie in the mapped block: the low 32 bits
                    // are the IPv4 address, so the casts lose nothing.
                    self.v4.push((
                        (mapped_first - MAPPED_FIRST) as u32,
                        (mapped_last - MAPPED_FIRST) as u32,
                    ));
                }
                if first < MAPPED_FIRST || last > MAPPED_LAST {
                    self.v6.push((first, last));
                }
            }
        }
        Some(())
    }

    /// Sorts and merges overlapping and adjacent ranges.
    fn finish(&mut self) {
        merge(&mut self.v4);
        merge(&mut self.v6);
    }

    /// Parses a whole address list; `path` names it in errors.
    pub fn parse(path: &str, bytes: &[u8]) -> Result<AddressSet, ListError> {
        let mut set = AddressSet::default();
        for (line, entry) in entries(bytes) {
            if set.add_entry(&entry).is_none() {
                return Err(ListError::NotAnAddress {
                    path: path.to_owned(),
                    line,
                    text: shown(&entry),
                });
            }
        }
        set.finish();
        Ok(set)
    }

    /// Whether `ip` is in the set (IPv4-mapped IPv6 read as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(ip) => in_ranges(&self.v4, u32::from(ip)),
            IpAddr::V6(ip) => in_ranges(&self.v6, u128::from(ip)),
        }
    }

    /// How many ranges the set holds after merging.
    pub fn ranges(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Bytes the set keeps on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.v4.capacity() * std::mem::size_of::<(u32, u32)>()
            + self.v6.capacity() * std::mem::size_of::<(u128, u128)>()
    }
}

fn v4_range(ip: u32, prefix: u8) -> (u32, u32) {
    let host_bits = u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
    (ip & !host_bits, ip | host_bits)
}

fn v6_range(ip: u128, prefix: u8) -> (u128, u128) {
    let host_bits = u128::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
    (ip & !host_bits, ip | host_bits)
}

/// Bounds of a range kind: anything with a successor.
trait Bound: Copy + Ord {
    fn next(self) -> Option<Self>;
}

impl Bound for u32 {
    fn next(self) -> Option<Self> {
        self.checked_add(1)
    }
}

impl Bound for u128 {
    fn next(self) -> Option<Self> {
        self.checked_add(1)
    }
}

fn merge<T: Bound>(ranges: &mut Vec<(T, T)>) {
    ranges.sort_unstable();
    let mut merged: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for &(first, last) in ranges.iter() {
        match merged.last_mut() {
            // Overlapping or adjacent (`first` right after `end`); an end
            // at the very top of the space swallows everything after it.
            Some((_, end)) if end.next().is_none_or(|after| first <= after) => {
                if last > *end {
                    *end = last;
                }
            }
            _ => merged.push((first, last)),
        }
    }
    merged.shrink_to_fit();
    *ranges = merged;
}

fn in_ranges<T: Bound>(ranges: &[(T, T)], ip: T) -> bool {
    let after = ranges.partition_point(|&(first, _)| first <= ip);
    after > 0 && ranges[after - 1].1 >= ip
}

/// One loaded address list and the path it was read from.
#[derive(Debug)]
struct AddressList {
    path: Arc<str>,
    stamp: Stamp,
    set: AddressSet,
}

/// The address lists of `[client_ip] deny_lists`, loaded; cheap to clone
/// (shared).
#[derive(Clone, Default)]
pub struct AddressLists {
    lists: Arc<[AddressList]>,
}

impl AddressLists {
    /// Reads and parses every file, in order.
    pub fn load(paths: &[String]) -> Result<AddressLists, ListError> {
        let lists = paths
            .iter()
            .map(|path| {
                let (bytes, stamp) = read(path)?;
                Ok(AddressList {
                    path: Arc::from(path.as_str()),
                    stamp,
                    set: AddressSet::parse(path, &bytes)?,
                })
            })
            .collect::<Result<Vec<_>, ListError>>()?;
        Ok(AddressLists {
            lists: lists.into(),
        })
    }

    /// The first list that holds `ip`, named by its configured path.
    pub fn find(&self, ip: IpAddr) -> Option<&Arc<str>> {
        self.lists
            .iter()
            .find(|list| list.set.contains(ip))
            .map(|list| &list.path)
    }

    /// The configured paths, in order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.lists.iter().map(|list| &*list.path)
    }

    /// The configured paths and their stamps when they were read.
    pub fn stamps(&self) -> impl Iterator<Item = (&str, Stamp)> {
        self.lists.iter().map(|list| (&*list.path, list.stamp))
    }

    /// Whether no list is configured.
    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }
}

impl fmt::Debug for AddressLists {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The ranges themselves would bury any debug output.
        f.debug_map()
            .entries(
                self.lists
                    .iter()
                    .map(|list| (&list.path, format!("{} ranges", list.set.ranges()))),
            )
            .finish()
    }
}

impl<'de> Deserialize<'de> for AddressLists {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let paths = Vec::<String>::deserialize(d)?;
        AddressLists::load(&paths).map_err(|e| de::Error::custom(e.to_string()))
    }
}

impl Serialize for AddressLists {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.paths())
    }
}

// === domains ===

/// A listed domain as stored: lower case, no trailing dot. `None` when the
/// entry is not a domain name.
fn normalized_domain(entry: &str) -> Option<String> {
    let domain = entry.strip_suffix('.').unwrap_or(entry);
    let well_formed = !domain.is_empty()
        && domain.len() <= MAX_DOMAIN_LEN
        && domain.split('.').all(|label| !label.is_empty())
        && !domain
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '@' | '/' | '*' | '\\'));
    well_formed.then(|| domain.to_ascii_lowercase())
}

/// The domain lists of `[email] denied_domain_lists`, loaded; cheap to
/// clone (shared).
#[derive(Clone, Default)]
pub struct DomainLists {
    paths: Arc<[(Arc<str>, Stamp)]>,
    /// Every listed domain and the index of the first file listing it.
    domains: Arc<HashMap<Box<str>, u32>>,
}

impl DomainLists {
    /// Reads and parses every file, in order.
    pub fn load(paths: &[String]) -> Result<DomainLists, ListError> {
        let mut domains: HashMap<Box<str>, u32> = HashMap::new();
        let mut stamps = Vec::with_capacity(paths.len());
        for (index, path) in paths.iter().enumerate() {
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            let (bytes, stamp) = read(path)?;
            stamps.push((Arc::from(path.as_str()), stamp));
            for (line, entry) in entries(&bytes) {
                let Some(domain) = normalized_domain(&entry) else {
                    return Err(ListError::NotADomain {
                        path: path.clone(),
                        line,
                        text: shown(&entry),
                    });
                };
                domains.entry(domain.into_boxed_str()).or_insert(index);
            }
        }
        domains.shrink_to_fit();
        Ok(DomainLists {
            paths: stamps.into(),
            domains: Arc::new(domains),
        })
    }

    /// The list that denies `domain` — listed itself, or a parent domain
    /// at a label boundary (`mailinator.com` denies `x.mailinator.com`,
    /// not `notmailinator.com`). Case and one trailing dot do not matter.
    /// Does not allocate.
    pub fn find(&self, domain: &str) -> Option<&Arc<str>> {
        if self.domains.is_empty() {
            return None;
        }
        let domain = domain.strip_suffix('.').unwrap_or(domain);
        if domain.is_empty() || domain.len() > MAX_DOMAIN_LEN {
            return None;
        }
        let mut buffer = [0u8; MAX_DOMAIN_LEN];
        let lowered = &mut buffer[..domain.len()];
        lowered.copy_from_slice(domain.as_bytes());
        lowered.make_ascii_lowercase();
        // ASCII lower-casing keeps UTF-8 valid.
        let lowered = std::str::from_utf8(lowered).ok()?;
        let mut candidate = lowered;
        loop {
            if let Some(&index) = self.domains.get(candidate) {
                return self.paths.get(index as usize).map(|(path, _)| path);
            }
            let (_, parent) = candidate.split_once('.')?;
            candidate = parent;
        }
    }

    /// The configured paths, in order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.paths.iter().map(|(path, _)| &**path)
    }

    /// The configured paths and their stamps when they were read.
    pub fn stamps(&self) -> impl Iterator<Item = (&str, Stamp)> {
        self.paths.iter().map(|(path, stamp)| (&**path, *stamp))
    }

    /// How many distinct domains are listed.
    pub fn len(&self) -> usize {
        self.domains.len()
    }

    /// Whether no domain is listed.
    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    /// Bytes the lists keep on the heap (the table and the names;
    /// allocator overhead not counted).
    pub fn heap_bytes(&self) -> usize {
        // hashbrown keeps one control byte per bucket next to each slot.
        let slot = std::mem::size_of::<(Box<str>, u32)>() + 1;
        self.domains.capacity() * slot + self.domains.keys().map(|k| k.len()).sum::<usize>()
    }
}

impl fmt::Debug for DomainLists {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DomainLists")
            .field("paths", &self.paths().collect::<Vec<_>>())
            .field("domains", &self.domains.len())
            .finish()
    }
}

impl<'de> Deserialize<'de> for DomainLists {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let paths = Vec::<String>::deserialize(d)?;
        DomainLists::load(&paths).map_err(|e| de::Error::custom(e.to_string()))
    }
}

impl Serialize for DomainLists {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.paths())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh scratch file name for each list a test writes.
    fn scratch_file() -> std::path::PathBuf {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!("mgk-lists-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(format!("{}.txt", NEXT.fetch_add(1, Ordering::Relaxed)))
    }

    fn set(text: &str) -> AddressSet {
        AddressSet::parse("test.txt", text.as_bytes()).unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn addresses_networks_comments_and_blank_lines() {
        let s = set(
            "# Tor exits\n\n192.0.2.1\n198.51.100.0/24   # a trailing comment\r\n\
             \t2001:db8::/32\n2001:db8:ffff::1\n  \n# end\n",
        );
        for listed in [
            "192.0.2.1",
            "198.51.100.0",
            "198.51.100.255",
            "2001:db8::",
            "2001:db8:ffff:ffff::1",
            "::ffff:198.51.100.7",
        ] {
            assert!(s.contains(ip(listed)), "{listed}");
        }
        for free in [
            "192.0.2.0",
            "192.0.2.2",
            "198.51.101.0",
            "2001:db9::",
            "2001:db7:ffff::1",
        ] {
            assert!(!s.contains(ip(free)), "{free}");
        }
    }

    #[test]
    fn a_broken_line_names_file_and_line() {
        for (text, line, shown) in [
            ("192.0.2.1\n# ok\n\nnot-an-address\n", 4, "not-an-address"),
            ("10.0.0.0/33\n", 1, "10.0.0.0/33"),
            ("::/129\n", 1, "::/129"),
            ("10.0.0.0/\n", 1, "10.0.0.0/"),
            ("10.0.0.1 10.0.0.2\n", 1, "10.0.0.1 10.0.0.2"),
        ] {
            let error = AddressSet::parse("/lists/x.txt", text.as_bytes())
                .unwrap_err()
                .to_string();
            assert_eq!(
                error,
                format!("/lists/x.txt:{line}: not an address or network: {shown:?}"),
                "{text:?}"
            );
        }
        let not_utf8 = AddressSet::parse("x", b"1.2.3.4\n\xff\xfe\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            not_utf8,
            "x:2: not an address or network: \"\u{fffd}\u{fffd}\""
        );
        let long = "x".repeat(500);
        let error = AddressSet::parse("x", long.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(error.len() < 120, "{error}");
    }

    #[test]
    fn overlapping_and_adjacent_ranges_are_merged() {
        let s = set(
            "10.0.0.0/24\n10.0.1.0/24\n10.0.0.128/25\n10.0.3.0/24\n10.0.0.7\n\
             255.255.255.255\n255.255.255.0/24\n0.0.0.0\n",
        );
        assert_eq!(
            s.v4,
            [
                (0, 0),
                (
                    u32::from(Ipv4Addr::new(10, 0, 0, 0)),
                    u32::from(Ipv4Addr::new(10, 0, 1, 255))
                ),
                (
                    u32::from(Ipv4Addr::new(10, 0, 3, 0)),
                    u32::from(Ipv4Addr::new(10, 0, 3, 255))
                ),
                (u32::from(Ipv4Addr::new(255, 255, 255, 0)), u32::MAX),
            ]
        );
        assert!(!s.contains(ip("10.0.2.0")));
        assert!(s.contains(ip("255.255.255.255")));
        let all = set("0.0.0.0/0\n1.2.3.4\n::/0\n2001:db8::1\n");
        assert_eq!(all.v4, [(0, u32::MAX)]);
        assert_eq!(all.v6, [(0, u128::MAX)]);
        let v6 = set("2001:db8::/48\n2001:db8:0:1::/64\n2001:db8:1::/48\n2001:db8:3::/48\n");
        let first = u128::from("2001:db8::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(v6.v6.len(), 2);
        assert_eq!(v6.v6[0].0, first);
        assert!(v6.contains(ip("2001:db8:1:ffff::1")));
        assert!(!v6.contains(ip("2001:db8:2::1")));
    }

    #[test]
    fn mapped_ipv6_entries_and_clients_count_as_ipv4() {
        let s = set("::ffff:192.0.2.0/120\n::ffff:198.51.100.9\n");
        assert!(s.v6.is_empty(), "{s:?}");
        assert!(s.contains(ip("192.0.2.77")));
        assert!(s.contains(ip("::ffff:192.0.2.77")));
        assert!(s.contains(ip("198.51.100.9")));
        assert!(!s.contains(ip("198.51.100.10")));
        // A v6 network around the mapped block covers IPv4 clients too.
        let wide = set("::/64\n");
        assert!(wide.contains(ip("203.0.113.1")));
        assert!(wide.contains(ip("::1")));
        // Host bits in a network entry are ignored, as FireHOL lists do.
        assert!(set("192.0.2.77/24\n").contains(ip("192.0.2.1")));
    }

    fn domains(text: &str) -> DomainLists {
        let path = scratch_file();
        std::fs::write(&path, text).unwrap();
        let lists = DomainLists::load(&[path.display().to_string()]);
        let _ = std::fs::remove_file(&path);
        lists.unwrap()
    }

    #[test]
    fn domains_match_themselves_and_subdomains_at_label_boundaries() {
        let d = domains("# disposable\nMailinator.com\nguerrillamail.info.  # trailing dot\n\n10minutemail.net\n");
        assert_eq!(d.len(), 3);
        for denied in [
            "mailinator.com",
            "MAILINATOR.COM",
            "x.mailinator.com",
            "a.b.Mailinator.com",
            "mailinator.com.",
            "guerrillamail.info",
            "x.guerrillamail.info.",
        ] {
            assert!(d.find(denied).is_some(), "{denied}");
        }
        for free in [
            "notmailinator.com",
            "mailinator.com.evil",
            "com",
            "mailinator",
            "",
            ".",
            "example.org",
        ] {
            assert!(d.find(free).is_none(), "{free}");
        }
        assert!(d.find(&"a.".repeat(200)).is_none());
        let path = d.find("x.mailinator.com").unwrap();
        assert!(path.ends_with(".txt"), "{path}");
    }

    #[test]
    fn a_broken_domain_line_names_file_and_line() {
        for (text, line, shown) in [
            ("ok.example\nuser@example.org\n", 2, "user@example.org"),
            ("a..b\n", 1, "a..b"),
            ("*.example.org\n", 1, "*.example.org"),
            ("two words\n", 1, "two words"),
            (".example\n", 1, ".example"),
        ] {
            let path = scratch_file();
            std::fs::write(&path, text).unwrap();
            let shown_path = path.display().to_string();
            let error = DomainLists::load(std::slice::from_ref(&shown_path))
                .unwrap_err()
                .to_string();
            assert_eq!(
                error,
                format!("{shown_path}:{line}: not a domain: {shown:?}"),
                "{text:?}"
            );
            let _ = std::fs::remove_file(&path);
        }
        let absent = scratch_file().display().to_string();
        let missing = DomainLists::load(std::slice::from_ref(&absent))
            .unwrap_err()
            .to_string();
        assert!(
            missing.starts_with(&format!("cannot read {absent}: ")),
            "{missing}"
        );
    }

    #[test]
    fn configuration_errors_name_the_key_the_file_and_the_line() {
        use crate::config::Config;
        let addresses = scratch_file();
        std::fs::write(&addresses, "192.0.2.0/24\n2001:db8::/32 # v6\n").unwrap();
        let domains = scratch_file();
        std::fs::write(&domains, "mailinator.com\n").unwrap();
        let toml = format!(
            "[client_ip]\ndeny_lists = [{:?}]\n[email]\ndenied_domain_lists = [{:?}]\n",
            addresses.display().to_string(),
            domains.display().to_string()
        );
        let config = Config::from_toml(&toml).unwrap();
        assert!(config.client_ip.deny_lists.find(ip("192.0.2.9")).is_some());
        assert!(config
            .email
            .denied_domain_lists
            .find("x.mailinator.com")
            .is_some());
        // `check` prints the paths, and what it prints loads again.
        let printed = config.to_toml();
        assert!(
            printed.contains(&format!("{:?}", addresses.display().to_string())),
            "{printed}"
        );
        let again = Config::from_toml(&printed).unwrap();
        assert!(again.client_ip.deny_lists.find(ip("2001:db8::1")).is_some());

        std::fs::write(&addresses, "192.0.2.0/24\n\n10.0.0.0/8x\n").unwrap();
        let error = Config::from_toml(&toml).unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "client_ip.deny_lists: {}:3: not an address or network: \"10.0.0.0/8x\"",
                addresses.display()
            )
        );
        std::fs::write(&addresses, "192.0.2.0/24\n").unwrap();
        std::fs::write(&domains, "ok.example\nnot a domain\n").unwrap();
        let error = Config::from_toml(&toml).unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "email.denied_domain_lists: {}:2: not a domain: \"not a domain\"",
                domains.display()
            )
        );
        std::fs::remove_file(&domains).unwrap();
        let error = Config::from_toml(&toml).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!(
                "email.denied_domain_lists: cannot read {}: ",
                domains.display()
            )),
            "{error}"
        );
        assert!(Config::from_toml("[client_ip]\ndeny_lists = [1]\n")
            .unwrap_err()
            .to_string()
            .starts_with("client_ip.deny_lists"));
        let _ = std::fs::remove_file(&addresses);
    }
}
