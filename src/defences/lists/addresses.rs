//! Address lists (`[client_ip] deny_lists`): sorted, merged ranges
//! (`u32` bounds for IPv4, `u128` for IPv6) searched by bisection, one set
//! per file so that a match can name the file it came from.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::de::Deserializer;
use serde::{Deserialize, Serialize, Serializer};

use super::{entries, shown, ListContext, ListError, Sources};
use crate::client_ip::{IpNet, NetworkError};

/// A set of IPv4 and IPv6 addresses as sorted, disjoint, non-adjacent
/// inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl AddressSet {
    /// Parses one entry: an address or `address/prefix`, IPv4 or IPv6, read
    /// as [`IpNet`] reads every network (an IPv6 network never covers an
    /// IPv4 client). An IPv4-mapped entry of 96 bits or less covers no
    /// client: it is skipped, not refused, since published IPv6 bogon
    /// lists carry `::ffff:0:0/96` and must still load.
    fn add_entry(&mut self, entry: &str) -> Option<()> {
        let network = match entry.parse::<IpNet>() {
            Ok(network) => network,
            Err(NetworkError::MappedCoversNoClient(_)) => return Some(()),
            Err(_) => return None,
        };
        match network.key() {
            (true, prefix, bits) => {
                // An IPv4 key holds the address in its low 32 bits.
                self.v4.push(v4_range(bits as u32, prefix));
            }
            (false, prefix, bits) => self.v6.push(v6_range(bits, prefix)),
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

/// The address lists of `[client_ip] deny_lists`, loaded; cheap to clone
/// (shared).
///
/// Read from the configuration, the entries alone are known; the lists are
/// read by [`AddressLists::load_with`], which the configuration loader
/// calls once the whole configuration (and so `[server] state_dir`) is
/// read.
#[derive(Clone, Default)]
pub struct AddressLists {
    sources: Sources,
    /// One set per list, in order.
    sets: Arc<[AddressSet]>,
}

impl AddressLists {
    /// Reads and parses every file, in order.
    pub fn load(paths: &[String]) -> Result<AddressLists, ListError> {
        let mut lists = AddressLists {
            sources: Sources::files(paths),
            sets: Arc::new([]),
        };
        lists.load_with(&ListContext::default())?;
        Ok(lists)
    }

    /// Reads and parses every configured entry, in order: a file, or a
    /// URL's copy under `context.state_dir`.
    pub fn load_with(&mut self, context: &ListContext) -> Result<(), ListError> {
        let sets = self
            .sources
            .load(context, |_, label, bytes| AddressSet::parse(label, bytes))?;
        self.sets = sets.into();
        Ok(())
    }

    /// The first list that holds `ip`, named by its configured path (a
    /// URL as shown).
    pub fn find(&self, ip: IpAddr) -> Option<&Arc<str>> {
        let index = self.sets.iter().position(|set| set.contains(ip))?;
        self.sources.name(u32::try_from(index).ok()?)
    }

    /// Where the lists come from.
    pub fn sources(&self) -> &Sources {
        &self.sources
    }

    /// Whether no list is configured.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }
}

impl fmt::Debug for AddressLists {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The ranges themselves would bury any debug output.
        f.debug_map()
            .entries(
                self.sources
                    .names()
                    .zip(self.sets.iter())
                    .map(|(name, set)| (name, format!("{} ranges", set.ranges()))),
            )
            .finish()
    }
}

impl<'de> Deserialize<'de> for AddressLists {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let sources = Sources::deserialize(d)?;
        Ok(AddressLists {
            sources,
            sets: Arc::new([]),
        })
    }
}

impl Serialize for AddressLists {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.sources.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

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
    fn ipv6_networks_never_cover_ipv4_clients() {
        for (text, inside) in [
            ("# IPv6 bogons\n::/8\n", "::5"),
            ("::/0\n", "2001:db8::1"),
            ("::/64\n", "::1"),
            ("::fffe:0:0/95\n", "::fffe:0:1"),
        ] {
            let s = set(text);
            assert!(s.v4.is_empty(), "{text:?}: {s:?}");
            assert!(s.contains(ip(inside)), "{text:?} {inside}");
            for v4 in ["203.0.113.7", "::ffff:203.0.113.7", "0.0.0.0"] {
                assert!(!s.contains(ip(v4)), "{text:?} covers {v4}");
            }
        }
    }

    #[test]
    fn a_mapped_entry_of_96_bits_or_less_is_accepted_and_covers_no_client() {
        let s = set("::ffff:0:0/96\n::ffff:1.2.3.4/96\n::ffff:10.0.0.0/80\n");
        assert_eq!(s.ranges(), 0, "{s:?}");
        for client in ["1.2.3.4", "10.0.0.1", "::ffff:1.2.3.4", "::1", "::ffff:0:1"] {
            assert!(!s.contains(ip(client)), "{client}");
        }
    }

    #[test]
    fn mapped_ipv6_entries_and_clients_count_as_ipv4() {
        let s = set("::ffff:192.0.2.0/120\n::ffff:198.51.100.9\n");
        assert!(s.v6.is_empty(), "{s:?}");
        assert!(s.contains(ip("192.0.2.77")));
        assert!(s.contains(ip("::ffff:192.0.2.77")));
        assert!(s.contains(ip("198.51.100.9")));
        assert!(!s.contains(ip("198.51.100.10")));
        // Host bits in a network entry are ignored, as FireHOL lists do.
        assert!(set("192.0.2.77/24\n").contains(ip("192.0.2.1")));
    }
}
