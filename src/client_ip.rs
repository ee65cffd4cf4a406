//! Who the client is: the address the gate resolves for a request, and the
//! key its rate limits are counted under.
//!
//! The TCP peer is the client unless it is a trusted proxy. Then the
//! `X-Forwarded-For` entries (all such headers, in order) are walked from the
//! right, skipping trusted addresses; the first untrusted address is the
//! client. The leftmost entry, which the client itself writes, is never
//! believed on its own. An unparseable entry ends the walk at the last good
//! address. IPv4-mapped IPv6 addresses count as IPv4.
//!
//! IPv6 clients are keyed by their `/ipv6_prefix_len` prefix, since one
//! subscriber usually holds a whole /64 and can rotate through it freely.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use http::{HeaderMap, HeaderValue};

/// The resolved client address of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddress(pub IpAddr);

impl ClientAddress {
    /// The address, with IPv4-mapped IPv6 addresses read as IPv4.
    pub fn new(ip: IpAddr) -> Self {
        ClientAddress(ip.to_canonical())
    }
}

/// The scheme the client used, as a trusted proxy reported it in
/// `X-Forwarded-Proto`; absent, the gate reports `http`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardedProto(pub &'static str);

/// The key a client's rate limits are counted under: the full IPv4 address,
/// or the IPv6 prefix. Stored as 16 bytes (IPv4 as `::ffff:a.b.c.d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientKey(pub u128);

impl ClientKey {
    /// The key of an IPv4 address.
    pub fn v4(ip: Ipv4Addr) -> Self {
        ClientKey(u128::from(ip.to_ipv6_mapped()))
    }

    /// The key of an IPv6 address: its first `prefix_len` bits.
    pub fn v6(ip: Ipv6Addr, prefix_len: u8) -> Self {
        ClientKey(u128::from(ip) & prefix_mask(prefix_len))
    }

    /// Whether this is the key of an IPv4 client (an IPv4-mapped address).
    pub fn is_ipv4(self) -> bool {
        let v4_mapped_prefix = u128::from(Ipv4Addr::UNSPECIFIED.to_ipv6_mapped());
        self.0 & prefix_mask(96) == v4_mapped_prefix
    }

    /// A coarser key shared by many clients (used when too many distinct
    /// clients are tracked): the IPv4 /16 or the IPv6 /32.
    pub fn coarse(self) -> Self {
        if self.is_ipv4() {
            ClientKey(self.0 & prefix_mask(112))
        } else {
            ClientKey(self.0 & prefix_mask(32))
        }
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v6 = Ipv6Addr::from(self.0);
        match v6.to_ipv4_mapped() {
            Some(v4) => write!(f, "{v4}"),
            None => write!(f, "{v6}"),
        }
    }
}

fn prefix_mask(len: u8) -> u128 {
    match len {
        0 => 0,
        l if l >= 128 => u128::MAX,
        l => u128::MAX << (128 - u32::from(l)),
    }
}

/// Whether `ip` (IPv4-mapped IPv6 read as IPv4) is IPv4, and its bits with
/// all but the first `len` cleared.
pub fn masked(ip: IpAddr, len: u8) -> (bool, u128) {
    match ip.to_canonical() {
        IpAddr::V4(ip) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len.min(32)))
            };
            (true, u128::from(u32::from(ip) & mask))
        }
        IpAddr::V6(ip) => (false, u128::from(ip) & prefix_mask(len)),
    }
}

/// An IP network, `address/prefix` (a bare address is a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    network: IpAddr,
    prefix_len: u8,
}

impl IpNet {
    /// The network as (IPv4?, prefix length, address bits with the host
    /// bits cleared): the same for every spelling of one network.
    pub fn key(&self) -> (bool, u8, u128) {
        let (v4, bits) = masked(self.network, self.prefix_len);
        (v4, self.prefix_len, bits)
    }

    /// The same network written with its host bits cleared
    /// (`10.1.2.3/8` → `10.0.0.0/8`).
    pub fn canonical(&self) -> IpNet {
        let network = match masked(self.network, self.prefix_len) {
            (true, bits) => IpAddr::from(std::net::Ipv4Addr::from(bits as u32)),
            (false, bits) => IpAddr::from(std::net::Ipv6Addr::from(bits)),
        };
        IpNet {
            network,
            prefix_len: self.prefix_len,
        }
    }

    /// Whether `ip` lies inside this network (IPv4-mapped IPv6 read as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix_len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.prefix_len))
                };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = prefix_mask(self.prefix_len);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Why a written network is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    /// Not an address, or a prefix length that is not a number.
    #[error("expected an address or CIDR such as \"10.0.0.0/8\", got \"{0}\"")]
    Malformed(String),
    /// A prefix longer than the address.
    #[error("prefix length {prefix_len} is longer than {max} in \"{text}\"")]
    PrefixTooLong {
        /// The network as written.
        text: String,
        /// The prefix length written.
        prefix_len: u8,
        /// The address length in bits.
        max: u8,
    },
    /// An IPv4-mapped address with a prefix of 96 or less
    /// (`::ffff:0:0/96`): clients are compared in canonical form, so no
    /// IPv4 client is an IPv6 address in it, and no IPv6 client is either.
    #[error(
        "\"{0}\" is an IPv4-mapped network with a prefix of 96 or less, which covers no \
         client: IPv4 clients are compared as IPv4; write the IPv4 network instead \
         (e.g. \"0.0.0.0/0\")"
    )]
    MappedCoversNoClient(String),
}

/// The one reading of a written network, for `[client_ip] deny`,
/// `trusted_proxies`, list files and admin bans alike:
///
/// - an IPv4 network is an IPv4 network;
/// - an IPv4-mapped address with a prefix longer than 96
///   (`::ffff:192.0.2.0/120`) is the IPv4 network it maps (`192.0.2.0/24`);
/// - an IPv4-mapped address with a prefix of 96 or less is
///   [`NetworkError::MappedCoversNoClient`] (a list file skips it, the
///   configuration and the admin API refuse it);
/// - every other IPv6 network, `::/0` and `::/8` included, covers IPv6
///   clients only: a client is compared in canonical form, so an
///   IPv4-mapped client is IPv4 and never inside an IPv6 network.
impl FromStr for IpNet {
    type Err = NetworkError;

    fn from_str(text: &str) -> Result<Self, NetworkError> {
        let bad = || NetworkError::Malformed(text.to_owned());
        let (addr, len) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let written = addr.trim().parse::<IpAddr>().map_err(|_| bad())?;
        let network = written.to_canonical();
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            None => max,
            Some(len) => {
                let len = len.trim().parse::<u8>().map_err(|_| bad())?;
                if written.is_ipv6() && network.is_ipv4() {
                    // Only the low 32 bits of a mapped address are the
                    // IPv4 address: a prefix that stops at or before them
                    // names no IPv4 network.
                    match len {
                        0..=96 => return Err(NetworkError::MappedCoversNoClient(text.to_owned())),
                        97..=128 => len - 96,
                        _ => {
                            return Err(NetworkError::PrefixTooLong {
                                text: text.to_owned(),
                                prefix_len: len,
                                max: 128,
                            })
                        }
                    }
                } else {
                    len
                }
            }
        };
        if prefix_len > max {
            return Err(NetworkError::PrefixTooLong {
                text: text.to_owned(),
                prefix_len,
                max,
            });
        }
        Ok(IpNet {
            network,
            prefix_len,
        })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

/// Resolves client addresses and rate-limit keys.
#[derive(Debug, Clone)]
pub struct ClientResolver {
    trusted: Vec<IpNet>,
    ipv6_prefix_len: u8,
}

impl Default for ClientResolver {
    fn default() -> Self {
        ClientResolver::new(Vec::new(), 64)
    }
}

impl ClientResolver {
    /// A resolver trusting `trusted` proxies and keying IPv6 by
    /// `/ipv6_prefix_len`.
    pub fn new(trusted: Vec<IpNet>, ipv6_prefix_len: u8) -> Self {
        ClientResolver {
            trusted,
            ipv6_prefix_len,
        }
    }

    /// Whether `peer` is a trusted proxy, whose forwarding headers count.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        !self.trusted.is_empty() && self.is_trusted(peer.to_canonical())
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(ip))
    }

    /// The scheme a trusted proxy reports for the request, if any. A client
    /// that is not a trusted proxy cannot choose it.
    pub fn forwarded_proto(&self, peer: IpAddr, headers: &HeaderMap) -> Option<ForwardedProto> {
        let value = headers.get("x-forwarded-proto").map(HeaderValue::as_bytes);
        self.forwarded_proto_from(peer, value)
    }

    /// [`forwarded_proto`](Self::forwarded_proto), from the value of the
    /// request's first `X-Forwarded-Proto` header.
    pub fn forwarded_proto_from(
        &self,
        peer: IpAddr,
        value: Option<&[u8]>,
    ) -> Option<ForwardedProto> {
        if !self.trusts(peer) {
            return None;
        }
        let value = header_text(value?)?;
        // The proxy nearest to us speaks last.
        match value.rsplit(',').next()?.trim() {
            v if v.eq_ignore_ascii_case("https") => Some(ForwardedProto("https")),
            v if v.eq_ignore_ascii_case("http") => Some(ForwardedProto("http")),
            _ => None,
        }
    }

    /// The client address of a request from `peer` carrying `headers`.
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> ClientAddress {
        let values = headers.get_all("x-forwarded-for").iter();
        self.resolve_from(peer, values.map(HeaderValue::as_bytes))
    }

    /// [`resolve`](Self::resolve), from the values of the request's
    /// `X-Forwarded-For` headers, in the order they came.
    pub fn resolve_from<'v>(
        &self,
        peer: IpAddr,
        forwarded_for: impl DoubleEndedIterator<Item = &'v [u8]>,
    ) -> ClientAddress {
        let peer = peer.to_canonical();
        if self.trusted.is_empty() || !self.is_trusted(peer) {
            return ClientAddress(peer);
        }
        // From the right: the last value's entries, last first.
        let entries = forwarded_for
            .rev()
            .flat_map(|value| header_text(value).unwrap_or("\u{0}").rsplit(','));
        let mut last_good = peer;
        for entry in entries {
            let Some(ip) = parse_forwarded_entry(entry) else {
                return ClientAddress(last_good);
            };
            if !self.is_trusted(ip) {
                return ClientAddress(ip);
            }
            last_good = ip;
        }
        ClientAddress(last_good)
    }

    /// The key a client's limits are counted under.
    pub fn key(&self, client: ClientAddress) -> ClientKey {
        match client.0.to_canonical() {
            IpAddr::V4(v4) => ClientKey::v4(v4),
            IpAddr::V6(v6) => ClientKey::v6(v6, self.ipv6_prefix_len),
        }
    }
}

/// A header value as text, when it is visible ASCII (and tabs) only, as
/// [`HeaderValue::to_str`] reads it.
fn header_text(value: &[u8]) -> Option<&str> {
    if value.iter().all(|&b| (32..127).contains(&b) || b == b'\t') {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// One `X-Forwarded-For` entry: an address, optionally with a port
/// (`192.0.2.1:4711`, `[2001:db8::1]:4711`).
fn parse_forwarded_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Some(rest) = entry.strip_prefix('[') {
        let (addr, _port) = rest.split_once(']')?;
        return addr
            .parse::<Ipv6Addr>()
            .ok()
            .map(|ip| IpAddr::V6(ip).to_canonical());
    }
    let (addr, port) = entry.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    addr.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        map
    }

    fn resolver(trusted: &[&str]) -> ClientResolver {
        ClientResolver::new(trusted.iter().map(|t| t.parse().unwrap()).collect(), 64)
    }

    #[test]
    fn mapped_ipv6_is_read_as_ipv4() {
        assert_eq!(
            ClientAddress::new(ip("::ffff:192.0.2.7")).0,
            ip("192.0.2.7")
        );
        assert_eq!(ClientAddress::new(ip("2001:db8::1")).0, ip("2001:db8::1"));
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_writes() {
        let r = resolver(&["10.0.0.0/8"]);
        let h = headers(&["1.2.3.4, 10.0.0.1"]);
        assert_eq!(r.resolve(ip("203.0.113.9"), &h).0, ip("203.0.113.9"));
        assert_eq!(resolver(&[]).resolve(ip("10.0.0.1"), &h).0, ip("10.0.0.1"));
    }

    #[test]
    fn trusted_peer_walk_takes_the_rightmost_untrusted_entry() {
        let r = resolver(&["10.0.0.0/8", "2001:db8:ffff::/48"]);
        // The client spoofed the leftmost entry; the proxy appended the real one.
        let h = headers(&["6.6.6.6, 198.51.100.7, 10.1.2.3"]);
        assert_eq!(r.resolve(ip("10.0.0.1"), &h).0, ip("198.51.100.7"));
        // Several headers count in order.
        let h = headers(&["6.6.6.6", "198.51.100.7", "10.1.2.3"]);
        assert_eq!(r.resolve(ip("10.0.0.1"), &h).0, ip("198.51.100.7"));
        // Mapped and IPv6 proxies, ports.
        let h = headers(&["[2001:db8::5]:443, ::ffff:10.9.9.9"]);
        assert_eq!(r.resolve(ip("2001:db8:ffff::1"), &h).0, ip("2001:db8::5"));
        let h = headers(&["198.51.100.8:5555"]);
        assert_eq!(r.resolve(ip("10.0.0.1"), &h).0, ip("198.51.100.8"));
    }

    #[test]
    fn garbage_ends_the_walk_at_the_last_good_address() {
        let r = resolver(&["10.0.0.0/8"]);
        let h = headers(&["6.6.6.6, garbage, 10.1.2.3"]);
        assert_eq!(r.resolve(ip("10.0.0.1"), &h).0, ip("10.1.2.3"));
        let h = headers(&["unknown"]);
        assert_eq!(r.resolve(ip("10.0.0.1"), &h).0, ip("10.0.0.1"));
        // No header at all: the proxy itself.
        assert_eq!(
            r.resolve(ip("10.0.0.1"), &HeaderMap::new()).0,
            ip("10.0.0.1")
        );
        // Everything trusted: the leftmost trusted address.
        let h = headers(&["10.5.5.5, 10.1.2.3"]);
        assert_eq!(r.resolve(ip("10.0.0.1"), &h).0, ip("10.5.5.5"));
    }

    #[test]
    fn forwarded_proto_is_believed_only_from_trusted_proxies() {
        let r = resolver(&["10.0.0.0/8"]);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", HeaderValue::from_static("http, https"));
        assert_eq!(
            r.forwarded_proto(ip("10.0.0.1"), &h),
            Some(ForwardedProto("https"))
        );
        assert_eq!(r.forwarded_proto(ip("192.0.2.1"), &h), None);
        h.insert("x-forwarded-proto", HeaderValue::from_static("gopher"));
        assert_eq!(r.forwarded_proto(ip("10.0.0.1"), &h), None);
    }

    #[test]
    fn keys_group_ipv6_by_prefix_and_keep_ipv4_whole() {
        let r = resolver(&[]);
        let a = r.key(ClientAddress(ip("2001:db8:1:2:aaaa::1")));
        let b = r.key(ClientAddress(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")));
        let c = r.key(ClientAddress(ip("2001:db8:1:3::1")));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.to_string(), "2001:db8:1:2::");
        let v4 = r.key(ClientAddress(ip("192.0.2.1")));
        assert_ne!(v4, r.key(ClientAddress(ip("192.0.2.2"))));
        assert_eq!(v4, r.key(ClientAddress::new(ip("::ffff:192.0.2.1"))));
        assert_eq!(v4.to_string(), "192.0.2.1");
        let r48 = ClientResolver::new(Vec::new(), 48);
        assert_eq!(
            r48.key(ClientAddress(ip("2001:db8:1:2::1"))),
            r48.key(ClientAddress(ip("2001:db8:1:3::1")))
        );
    }

    #[test]
    fn coarse_keys_widen_the_net() {
        let r = resolver(&[]);
        let v4 = r.key(ClientAddress(ip("192.0.2.1"))).coarse();
        assert_eq!(v4, r.key(ClientAddress(ip("192.0.200.9"))).coarse());
        assert_eq!(v4.to_string(), "192.0.0.0");
        let v6 = r.key(ClientAddress(ip("2001:db8:1:2::1"))).coarse();
        assert_eq!(v6, r.key(ClientAddress(ip("2001:db8:ffff::1"))).coarse());
    }

    #[test]
    fn networks_parse_and_match() {
        let n: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains(ip("10.255.0.1")));
        assert!(n.contains(ip("::ffff:10.0.0.1")));
        assert!(!n.contains(ip("11.0.0.1")));
        let host: IpNet = "192.0.2.1".parse().unwrap();
        assert!(host.contains(ip("192.0.2.1")));
        assert!(!host.contains(ip("192.0.2.2")));
        let all: IpNet = "::/0".parse().unwrap();
        assert!(all.contains(ip("2001:db8::1")));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("nonsense".parse::<IpNet>().is_err());
        // An IPv4-mapped network is the IPv4 network it maps.
        let mapped: IpNet = "::ffff:192.0.2.0/120".parse().unwrap();
        assert_eq!(mapped, "192.0.2.0/24".parse().unwrap());
        assert_eq!(mapped.to_string(), "192.0.2.0/24");
        assert!(mapped.contains(ip("192.0.2.77")));
        assert!(mapped.contains(ip("::ffff:192.0.2.77")));
        assert!(!mapped.contains(ip("192.0.3.1")));
        let mapped_host: IpNet = "::ffff:192.0.2.1/128".parse().unwrap();
        assert_eq!(mapped_host, "192.0.2.1".parse().unwrap());
        let error = "::ffff:0:0/80".parse::<IpNet>().unwrap_err().to_string();
        assert!(error.contains("IPv4-mapped"), "{error}");
    }

    #[test]
    fn ipv6_networks_cover_ipv6_clients_only() {
        for (text, inside) in [
            ("::/0", "2001:db8::1"),
            ("::/8", "::5"),
            ("::/64", "::1"),
            ("::fffe:0:0/95", "::fffe:0:1"),
        ] {
            let net: IpNet = text.parse().unwrap();
            assert!(net.contains(ip(inside)), "{text} {inside}");
            for v4 in ["203.0.113.7", "::ffff:203.0.113.7", "0.0.0.0"] {
                assert!(!net.contains(ip(v4)), "{text} covers {v4}");
            }
        }
        let r = resolver(&["::/0"]);
        assert!(!r.trusts(ip("127.0.0.1")));
        assert!(!r.trusts(ip("::ffff:127.0.0.1")));
        assert!(r.trusts(ip("::1")));
        let h = headers(&["198.51.100.7"]);
        assert_eq!(r.resolve(ip("127.0.0.1"), &h).0, ip("127.0.0.1"));
        assert_eq!(r.resolve(ip("::1"), &h).0, ip("198.51.100.7"));
    }

    #[test]
    fn a_mapped_network_of_96_bits_or_less_covers_no_client_and_is_refused() {
        for text in [
            "::ffff:0:0/96",
            "::ffff:1.2.3.4/96",
            "::ffff:10.0.0.0/80",
            "::ffff:0:0/0",
        ] {
            let error = text.parse::<IpNet>().unwrap_err();
            assert_eq!(error, NetworkError::MappedCoversNoClient(text.to_owned()));
            assert!(
                error.to_string().contains("write the IPv4 network instead"),
                "{error}"
            );
        }
        // Longer mapped prefixes are the IPv4 networks they map.
        let mapped: IpNet = "::ffff:0:0/97".parse().unwrap();
        assert_eq!(mapped, "0.0.0.0/1".parse().unwrap());
    }
}
