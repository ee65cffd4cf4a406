//! DNS blocklist (DNSBL) lookups of the client address, as mail servers do
//! them (RFC 5782): the address written as a name under each configured
//! zone (`4.3.2.1.zone` for `1.2.3.4`, the 32 reversed nibbles for IPv6),
//! asked for its `A` record.
//!
//! - An `A` record in `127.0.0.0/8` means listed, except `127.255.255.0/24`,
//!   which large lists answer to say they refuse the querying resolver: that
//!   is a lookup error, like SERVFAIL, a timeout, or an answer outside
//!   `127.0.0.0/8` (a resolver that rewrites NXDOMAIN).
//! - NXDOMAIN, or no `A` record, means not listed.
//!
//! The lookup is network I/O, so it lives here and runs in the gate's async
//! decision, never in the pure [`Policy`](crate::gate::Policy). One query
//! per zone, all concurrent; the whole check waits at most
//! `[reputation] dnsbl_timeout`. Answers are cached per address and zone
//! (IPv6 per full address: lists name single addresses) for their TTL,
//! at most [`MAX_TTL`]; negative answers for the SOA minimum of the zone,
//! or [`NEGATIVE_TTL`] without one. Concurrent requests for the same
//! address share one query. Errors are not cached.
//!
//! The client is a minimal one written for this single question: one UDP
//! packet out, one in (a DNSBL answer always fits), the packet sent once
//! more halfway through the timeout if no answer came. It sends a random
//! query ID from a fresh socket (a random source port) and accepts only an
//! answer with the same ID and question.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{DnsblZone, OnDnsblError, ReputationConfig};

/// Longest time an answer is cached, whatever its TTL.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// How long a negative answer without an SOA record is cached.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(60);

/// Most answers cached; past it the oldest are evicted.
pub const CACHE_CAPACITY: usize = 100_000;

/// Where DNS servers are listed when `dns_server` is not set.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Why a lookup gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// No answer within `dnsbl_timeout`.
    #[error("no answer within the timeout")]
    Timeout,
    /// The server answered with an error code (2: SERVFAIL, 5: REFUSED).
    #[error("the DNS server answered with error code {0}")]
    ServerFailure(u8),
    /// The zone answered with an address that is not a listing.
    #[error("the zone answered {0}, which is not a listing")]
    NotAListing(Ipv4Addr),
    /// The answer could not be read.
    #[error("malformed DNS answer: {0}")]
    Malformed(&'static str),
    /// The socket failed.
    #[error("DNS socket error: {0}")]
    Io(String),
}

/// What one zone says about one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// Listed (an `A` record in `127.0.0.0/8`).
    Listed,
    /// Not listed (NXDOMAIN or no `A` record).
    NotListed,
}

/// The result of checking one address against every zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No zone lists the address (or no zone is configured).
    Clean,
    /// This zone lists it (the first configured zone that does).
    Listed(Arc<str>),
    /// This zone could not be asked, and `on_dnsbl_error` decides.
    Failed(Arc<str>, LookupError),
}

/// The query name of `ip` under `zone`: reversed octets for IPv4 (and
/// IPv4-mapped IPv6, which is an IPv4 client), reversed nibbles for IPv6.
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.{zone}")
        }
        IpAddr::V6(v6) => {
            let mut name = String::with_capacity(64 + zone.len());
            for byte in v6.octets().iter().rev() {
                for nibble in [byte & 0x0f, byte >> 4] {
                    name.push(char::from_digit(u32::from(nibble), 16).unwrap_or('0'));
                    name.push('.');
                }
            }
            name.push_str(zone);
            name
        }
    }
}

/// The first `nameserver` of a resolv.conf text, on port 53.
pub fn nameserver_from_resolv_conf(text: &str) -> Option<SocketAddr> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            return None;
        }
        // A link-local IPv6 server may carry a `%interface` suffix, which
        // `IpAddr` does not parse; such a server is skipped.
        let ip: IpAddr = words.next()?.parse().ok()?;
        Some(SocketAddr::new(ip, 53))
    })
}

/// The DNSBL checker of one configuration; the cache it shares outlives
/// reloads.
#[derive(Debug, Clone)]
pub struct Dnsbl {
    zones: Arc<[Arc<str>]>,
    server: SocketAddr,
    timeout: Duration,
    on_error: OnDnsblError,
    cache: Arc<DnsblCache>,
}

impl Dnsbl {
    /// The checker `[reputation]` describes, or `None` when no zone is
    /// configured. Without `dns_server` it reads the system's resolv.conf
    /// (falling back to `127.0.0.1:53`, as the C library does).
    pub fn new(config: &ReputationConfig, cache: Arc<DnsblCache>) -> Option<Dnsbl> {
        if config.dnsbl.is_empty() {
            return None;
        }
        let server = match config.dns_server {
            Some(server) => server.0,
            None => std::fs::read_to_string(RESOLV_CONF)
                .ok()
                .and_then(|text| nameserver_from_resolv_conf(&text))
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 53))),
        };
        Some(Dnsbl {
            zones: config
                .dnsbl
                .iter()
                .map(|DnsblZone(zone)| Arc::from(zone.as_str()))
                .collect(),
            server,
            timeout: config.dnsbl_timeout.0,
            on_error: config.on_dnsbl_error,
            cache,
        })
    }

    /// What a failed lookup does.
    pub fn on_error(&self) -> OnDnsblError {
        self.on_error
    }

    /// Asks every zone about `ip`, concurrently, waiting at most the
    /// configured timeout for all of them together.
    pub async fn check(&self, ip: IpAddr) -> Verdict {
        let ip = ip.to_canonical();
        let deadline = Instant::now() + self.timeout;
        let pending: Vec<_> = self
            .zones
            .iter()
            .map(|zone| (zone.clone(), self.answer(ip, zone, deadline)))
            .collect();
        let mut failure = None;
        for (zone, answer) in pending {
            let result = match answer {
                Pending::Ready(result) => result,
                Pending::Waiting(mut receiver) => {
                    let waited = tokio::time::timeout_at(
                        deadline,
                        receiver.wait_for(|result| result.is_some()),
                    )
                    .await;
                    match waited {
                        Ok(Ok(result)) => result.clone().unwrap_or(Err(LookupError::Timeout)),
                        // The lookup task ended without an answer.
                        Ok(Err(_)) => Err(LookupError::Timeout),
                        Err(_) => Err(LookupError::Timeout),
                    }
                }
            };
            match result {
                Ok(Listing::Listed) => return Verdict::Listed(zone),
                Ok(Listing::NotListed) => {}
                Err(error) => {
                    failure.get_or_insert(Verdict::Failed(zone, error));
                }
            }
        }
        failure.unwrap_or(Verdict::Clean)
    }

    /// The cached answer, or a receiver for the lookup in flight (started
    /// here if none is).
    fn answer(&self, ip: IpAddr, zone: &Arc<str>, deadline: Instant) -> Pending {
        let key = (ip, zone.clone());
        let mut inner = self.cache.lock();
        let now = Instant::now();
        if let Some(entry) = inner.entries.get(&key) {
            if entry.expires > now {
                return Pending::Ready(Ok(entry.listing));
            }
        }
        if let Some(receiver) = inner.in_flight.get(&key) {
            return Pending::Waiting(receiver.clone());
        }
        let (sender, receiver) = watch::channel(None);
        inner.in_flight.insert(key.clone(), receiver.clone());
        drop(inner);
        let cache = self.cache.clone();
        let server = self.server;
        let name = query_name(ip, zone);
        // A task of its own, bounded by the deadline: the answer is shared
        // and cached even if the request that asked first goes away.
        tokio::spawn(async move {
            // Resent once halfway: UDP may lose the query or its answer.
            let resend_at = Instant::now() + deadline.saturating_duration_since(Instant::now()) / 2;
            let asked = query(server, &name, resend_at);
            let result = match tokio::time::timeout_at(deadline, asked).await {
                Ok(result) => result,
                Err(_) => Err(LookupError::Timeout),
            };
            let mut inner = cache.lock();
            inner.in_flight.remove(&key);
            if let Ok((listing, ttl)) = &result {
                inner.insert(key, *listing, Instant::now() + *ttl, cache.capacity);
            }
            drop(inner);
            let _ = sender.send(Some(result.map(|(listing, _)| listing)));
        });
        Pending::Waiting(receiver)
    }
}

type LookupResult = Result<Listing, LookupError>;

enum Pending {
    Ready(LookupResult),
    Waiting(watch::Receiver<Option<LookupResult>>),
}

type CacheKey = (IpAddr, Arc<str>);

/// Cached answers per address and zone, bounded, and the lookups in flight.
#[derive(Debug)]
pub struct DnsblCache {
    inner: Mutex<CacheInner>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct CacheInner {
    entries: HashMap<CacheKey, CacheEntry>,
    /// Keys in insertion order, with the insertion number of the entry they
    /// were pushed for: an entry replaced since leaves a stale key behind.
    order: VecDeque<(CacheKey, u64)>,
    inserted: u64,
    in_flight: HashMap<CacheKey, watch::Receiver<Option<LookupResult>>>,
}

#[derive(Debug)]
struct CacheEntry {
    listing: Listing,
    expires: Instant,
    number: u64,
}

impl Default for DnsblCache {
    fn default() -> Self {
        DnsblCache::with_capacity(CACHE_CAPACITY)
    }
}

impl DnsblCache {
    /// An empty cache of at most `capacity` answers.
    pub fn with_capacity(capacity: usize) -> Self {
        DnsblCache {
            inner: Mutex::default(),
            capacity: capacity.max(1),
        }
    }

    /// Answers cached now (expired ones included until evicted).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        // The data stays consistent even if a holder panicked: every
        // critical section is a few map operations.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl CacheInner {
    fn insert(&mut self, key: CacheKey, listing: Listing, expires: Instant, capacity: usize) {
        self.inserted += 1;
        let number = self.inserted;
        if !self.entries.contains_key(&key) {
            while self.entries.len() >= capacity {
                let Some((old, old_number)) = self.order.pop_front() else {
                    break;
                };
                if self
                    .entries
                    .get(&old)
                    .is_some_and(|e| e.number == old_number)
                {
                    self.entries.remove(&old);
                }
            }
        }
        self.entries.insert(
            key.clone(),
            CacheEntry {
                listing,
                expires,
                number,
            },
        );
        self.order.push_back((key, number));
        // Replaced entries leave stale keys; drop them before the queue
        // outgrows the map.
        if self.order.len() > 2 * capacity {
            let entries = &self.entries;
            self.order
                .retain(|(key, n)| entries.get(key).is_some_and(|e| e.number == *n));
        }
    }
}

// === the DNS client ===

const TYPE_A: u16 = 1;
const TYPE_SOA: u16 = 6;
const CLASS_IN: u16 = 1;
const RCODE_NXDOMAIN: u8 = 3;

/// Sends one `A` question for `name` to `server` and reads the answer:
/// the listing and how long it may be cached. Without an answer by
/// `resend_at` the same packet is sent once more; the caller bounds the
/// whole wait.
pub async fn query(
    server: SocketAddr,
    name: &str,
    resend_at: Instant,
) -> Result<(Listing, Duration), LookupError> {
    let id = random_id()?;
    let packet = encode_query(id, name)?;
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    let io = |e: std::io::Error| LookupError::Io(e.to_string());
    let socket = UdpSocket::bind(local).await.map_err(io)?;
    // Connected: the kernel drops datagrams from any other address.
    socket.connect(server).await.map_err(io)?;
    socket.send(&packet).await.map_err(io)?;
    let mut buffer = [0u8; 1232];
    let mut resent = false;
    loop {
        let received = tokio::select! {
            received = socket.recv(&mut buffer) => received,
            _ = tokio::time::sleep_until(resend_at), if !resent => {
                resent = true;
                socket.send(&packet).await.map_err(io)?;
                continue;
            }
        };
        let n = received.map_err(io)?;
        // Stray or spoofed datagrams (another ID, another question) are
        // ignored; the caller's deadline bounds the wait.
        if let Some(answer) = decode_answer(id, name, &buffer[..n]) {
            return answer;
        }
    }
}

fn random_id() -> Result<u16, LookupError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 2];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| LookupError::Io("no randomness for the query ID".to_owned()))?;
    Ok(u16::from_be_bytes(bytes))
}

/// A query packet: header with recursion desired, one `A IN` question.
pub fn encode_query(id: u16, name: &str) -> Result<Vec<u8>, LookupError> {
    let mut packet = Vec::with_capacity(18 + name.len());
    packet.extend_from_slice(&id.to_be_bytes());
    packet.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(LookupError::Malformed("a query label is empty or too long"));
        }
        packet.push(label.len() as u8);
        packet.extend_from_slice(label.as_bytes());
    }
    packet.push(0);
    packet.extend_from_slice(&TYPE_A.to_be_bytes());
    packet.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(packet)
}

/// Reads an answer to query `id` for `name`. `None`: not an answer to it
/// (ignored); otherwise the listing and its cache lifetime, or the error.
pub fn decode_answer(
    id: u16,
    name: &str,
    packet: &[u8],
) -> Option<Result<(Listing, Duration), LookupError>> {
    let mut reader = Reader { packet, at: 0 };
    if reader.u16().ok()? != id {
        return None;
    }
    let flags = reader.u16().ok()?;
    let is_response = flags & 0x8000 != 0;
    if !is_response {
        return None;
    }
    let counts = (|| Ok::<_, LookupError>([reader.u16()?, reader.u16()?, reader.u16()?]))().ok()?;
    let [questions, answers, authorities] = counts;
    let _additional = reader.u16().ok()?;
    if questions != 1 {
        return None;
    }
    let asked = reader.name().ok()?;
    let (qtype, qclass) = (reader.u16().ok()?, reader.u16().ok()?);
    if !asked.eq_ignore_ascii_case(name) || qtype != TYPE_A || qclass != CLASS_IN {
        return None;
    }
    let rcode = (flags & 0x000f) as u8;
    Some(read_records(&mut reader, rcode, answers, authorities))
}

fn read_records(
    reader: &mut Reader<'_>,
    rcode: u8,
    answers: u16,
    authorities: u16,
) -> Result<(Listing, Duration), LookupError> {
    if rcode != 0 && rcode != RCODE_NXDOMAIN {
        return Err(LookupError::ServerFailure(rcode));
    }
    let mut listed_ttl: Option<u32> = None;
    for _ in 0..answers {
        let record = reader.record()?;
        // CNAMEs and other records on the way are skipped; only the
        // addresses decide.
        if record.rtype != TYPE_A || record.class != CLASS_IN {
            continue;
        }
        let [a, b, c, d] = <[u8; 4]>::try_from(record.data)
            .map_err(|_| LookupError::Malformed("an A record is not 4 bytes"))?;
        let address = Ipv4Addr::new(a, b, c, d);
        if a != 127 || (b, c) == (255, 255) {
            return Err(LookupError::NotAListing(address));
        }
        listed_ttl = Some(listed_ttl.map_or(record.ttl, |t| t.min(record.ttl)));
    }
    if let Some(ttl) = listed_ttl {
        return Ok((Listing::Listed, capped(ttl)));
    }
    // Negative caching (RFC 2308): the smaller of the SOA record's TTL and
    // its minimum field.
    let mut negative = None;
    for _ in 0..authorities {
        let Ok(record) = reader.record() else { break };
        if record.rtype != TYPE_SOA {
            continue;
        }
        let mut soa = Reader {
            packet: reader.packet,
            at: record.data_at,
        };
        let minimum = (|| {
            soa.name()?;
            soa.name()?;
            for _ in 0..4 {
                soa.u32()?;
            }
            soa.u32()
        })();
        if let Ok(minimum) = minimum {
            negative = Some(capped(minimum.min(record.ttl)));
        }
        break;
    }
    Ok((Listing::NotListed, negative.unwrap_or(NEGATIVE_TTL)))
}

fn capped(ttl: u32) -> Duration {
    Duration::from_secs(u64::from(ttl)).min(MAX_TTL)
}

struct Record<'a> {
    rtype: u16,
    class: u16,
    ttl: u32,
    data: &'a [u8],
    data_at: usize,
}

struct Reader<'a> {
    packet: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], LookupError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.packet.len());
        let end = end.ok_or(LookupError::Malformed("the answer is cut short"))?;
        let bytes = &self.packet[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn u16(&mut self) -> Result<u16, LookupError> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn u32(&mut self) -> Result<u32, LookupError> {
        let bytes = self.take(4)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// Reads a (possibly compressed) name, dotted, without the root dot.
    fn name(&mut self) -> Result<String, LookupError> {
        let mut name = String::new();
        let mut at = self.at;
        let mut resume = None;
        // Each pointer must go backwards, so a loop of pointers ends.
        let mut limit = at;
        loop {
            let len = *self
                .packet
                .get(at)
                .ok_or(LookupError::Malformed("a name is cut short"))?;
            match len {
                0 => {
                    at += 1;
                    break;
                }
                1..=63 => {
                    let label = self
                        .packet
                        .get(at + 1..at + 1 + usize::from(len))
                        .ok_or(LookupError::Malformed("a label is cut short"))?;
                    if !name.is_empty() {
                        name.push('.');
                    }
                    name.push_str(&String::from_utf8_lossy(label));
                    if name.len() > 255 {
                        return Err(LookupError::Malformed("a name is too long"));
                    }
                    at += 1 + usize::from(len);
                }
                0xc0..=0xff => {
                    let low = *self
                        .packet
                        .get(at + 1)
                        .ok_or(LookupError::Malformed("a pointer is cut short"))?;
                    let target = usize::from(len & 0x3f) << 8 | usize::from(low);
                    if target >= limit {
                        return Err(LookupError::Malformed("a name pointer goes forward"));
                    }
                    resume.get_or_insert(at + 2);
                    limit = target;
                    at = target;
                }
                _ => return Err(LookupError::Malformed("unknown label type")),
            }
        }
        self.at = resume.unwrap_or(at);
        Ok(name)
    }

    fn record(&mut self) -> Result<Record<'a>, LookupError> {
        self.name()?;
        let rtype = self.u16()?;
        let class = self.u16()?;
        let ttl = self.u32()?;
        let len = usize::from(self.u16()?);
        let data_at = self.at;
        let data = self.take(len)?;
        Ok(Record {
            rtype,
            class,
            ttl,
            data,
            data_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;
    use std::net::Ipv6Addr;

    #[test]
    fn ipv4_names_reverse_the_octets() {
        let ip: IpAddr = "192.0.2.99".parse().unwrap();
        assert_eq!(query_name(ip, "dnsbl.test"), "99.2.0.192.dnsbl.test");
    }

    #[test]
    fn ipv6_names_reverse_all_32_nibbles() {
        let ip: IpAddr = "2001:db8::567:89ab".parse().unwrap();
        assert_eq!(
            query_name(ip, "dnsbl.test"),
            "b.a.9.8.7.6.5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.dnsbl.test"
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_is_asked_as_ipv4() {
        let mapped = IpAddr::V6(Ipv4Addr::new(198, 51, 100, 7).to_ipv6_mapped());
        assert_eq!(query_name(mapped, "z.test"), "7.100.51.198.z.test");
        let loopback = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert!(query_name(loopback, "z.test").starts_with("1.0.0.0."));
    }

    #[test]
    fn resolv_conf_gives_the_first_usable_nameserver() {
        let text = "# comment\nsearch example\nnameserver fe80::1%eth0\nnameserver 10.0.0.53\nnameserver 10.0.0.54\n";
        assert_eq!(
            nameserver_from_resolv_conf(text),
            Some("10.0.0.53:53".parse().unwrap())
        );
        assert_eq!(nameserver_from_resolv_conf("search x\n"), None);
    }

    #[test]
    fn reputation_keys_are_validated_by_name() {
        let err = |text: &str| Config::from_toml(text).unwrap_err().to_string();
        let c = Config::from_toml(
            "[reputation]\ndnsbl = [\"DNSBL.Example.net.\"]\ndns_server = \"[::1]:5353\"\n\
             dnsbl_timeout = \"1s\"\non_dnsbl_error = \"deny\"\n",
        )
        .unwrap();
        assert_eq!(c.reputation.dnsbl[0].0, "dnsbl.example.net");
        assert_eq!(c.reputation.on_dnsbl_error, OnDnsblError::Deny);
        assert!(err("[reputation]\ndnsbl = [\"bad zone\"]\n").starts_with("reputation.dnsbl[0]:"));
        assert!(err("[reputation]\ndnsbl = [\"a.test\", \"a.test\"]\n")
            .starts_with("reputation.dnsbl[1]:"));
        assert!(
            err("[reputation]\ndns_server = \"localhost\"\n").starts_with("reputation.dns_server:")
        );
        assert!(
            err("[reputation]\ndnsbl_timeout = \"0s\"\n").starts_with("reputation.dnsbl_timeout:")
        );
        assert!(err("[reputation]\non_dnsbl_error = \"maybe\"\n")
            .starts_with("reputation.on_dnsbl_error: expected \"allow\" or \"deny\""));
        assert!(err("[reputation]\ndnsbls = []\n").starts_with("reputation.dnsbls: unknown field"));
    }

    /// An answer packet to `query`, with `rcode`, the given answer records
    /// (type, TTL, data) and optionally an SOA record in the authority
    /// section (its TTL and minimum).
    fn answer(
        query: &[u8],
        rcode: u8,
        records: &[(u16, u32, &[u8])],
        soa: Option<(u32, u32)>,
    ) -> Vec<u8> {
        let mut packet = query.to_vec();
        packet[2] |= 0x80;
        packet[3] = 0x80 | rcode;
        packet[6..8].copy_from_slice(&(records.len() as u16).to_be_bytes());
        packet[8..10].copy_from_slice(&u16::from(soa.is_some()).to_be_bytes());
        for (rtype, ttl, data) in records {
            // The name as a pointer to the question (offset 12).
            packet.extend_from_slice(&[0xc0, 12]);
            packet.extend_from_slice(&rtype.to_be_bytes());
            packet.extend_from_slice(&CLASS_IN.to_be_bytes());
            packet.extend_from_slice(&ttl.to_be_bytes());
            packet.extend_from_slice(&(data.len() as u16).to_be_bytes());
            packet.extend_from_slice(data);
        }
        if let Some((ttl, minimum)) = soa {
            let mut data = vec![2, b'n', b's', 0xc0, 12, 0];
            for field in [1u32, 2, 3, 4, minimum] {
                data.extend_from_slice(&field.to_be_bytes());
            }
            packet.extend_from_slice(&[0xc0, 12]);
            packet.extend_from_slice(&TYPE_SOA.to_be_bytes());
            packet.extend_from_slice(&CLASS_IN.to_be_bytes());
            packet.extend_from_slice(&ttl.to_be_bytes());
            packet.extend_from_slice(&(data.len() as u16).to_be_bytes());
            packet.extend_from_slice(&data);
        }
        packet
    }

    #[test]
    fn answers_decode_to_listings_with_capped_ttls() {
        let name = "2.0.0.127.z.test";
        let query = encode_query(7, name).unwrap();
        let decode = |packet: &[u8]| decode_answer(7, name, packet).unwrap();
        let listed = answer(&query, 0, &[(TYPE_A, 900, &[127, 0, 0, 2])], None);
        assert_eq!(
            decode(&listed),
            Ok((Listing::Listed, Duration::from_secs(900)))
        );
        let long = answer(&query, 0, &[(TYPE_A, 86_400, &[127, 0, 0, 4])], None);
        assert_eq!(decode(&long), Ok((Listing::Listed, MAX_TTL)));
        let nx = answer(&query, RCODE_NXDOMAIN, &[], Some((600, 120)));
        assert_eq!(
            decode(&nx),
            Ok((Listing::NotListed, Duration::from_secs(120)))
        );
        let bare_nx = answer(&query, RCODE_NXDOMAIN, &[], None);
        assert_eq!(decode(&bare_nx), Ok((Listing::NotListed, NEGATIVE_TTL)));
        let servfail = answer(&query, 2, &[], None);
        assert_eq!(decode(&servfail), Err(LookupError::ServerFailure(2)));
        let refused_resolver = answer(&query, 0, &[(TYPE_A, 60, &[127, 255, 255, 254])], None);
        assert!(matches!(
            decode(&refused_resolver),
            Err(LookupError::NotAListing(_))
        ));
        let hijacked = answer(&query, 0, &[(TYPE_A, 60, &[192, 0, 2, 1])], None);
        assert!(matches!(
            decode(&hijacked),
            Err(LookupError::NotAListing(_))
        ));
        // Another ID or another question is not an answer to this query.
        assert!(decode_answer(8, name, &listed).is_none());
        assert!(decode_answer(7, "3.0.0.127.z.test", &listed).is_none());
        assert!(decode_answer(7, name, &query).is_none());
        // Cut short anywhere: an error or ignored, never a panic.
        for end in 0..listed.len() {
            let _ = decode_answer(7, name, &listed[..end]);
        }
    }

    #[test]
    fn a_name_pointer_loop_is_malformed_not_a_hang() {
        let name = "z.test";
        let mut packet = answer(
            &encode_query(1, name).unwrap(),
            0,
            &[(TYPE_A, 1, &[127, 0, 0, 2])],
            None,
        );
        let answer_name = packet.len() - 16;
        // The answer's name points at itself.
        packet[answer_name + 1] = answer_name as u8;
        assert!(matches!(
            decode_answer(1, name, &packet),
            Some(Err(LookupError::Malformed(_)))
        ));
    }

    /// A responder on loopback answering every question NXDOMAIN (no SOA);
    /// returns its address and its query count.
    async fn nxdomain_responder() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            let mut buffer = [0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buffer).await {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let reply = answer(&buffer[..n], RCODE_NXDOMAIN, &[], None);
                let _ = socket.send_to(&reply, from).await;
            }
        });
        (addr, count)
    }

    #[tokio::test]
    async fn concurrent_checks_of_one_address_share_one_query() {
        let (server, count) = nxdomain_responder().await;
        let config = Config::from_toml(&format!(
            "[reputation]\ndnsbl = [\"z.test\"]\ndns_server = \"{server}\"\ndnsbl_timeout = \"10s\"\n"
        ))
        .unwrap();
        let dnsbl = Dnsbl::new(&config.reputation, Arc::default()).unwrap();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        // The first check starts the query before it first waits; the
        // others find it in flight.
        let verdicts = tokio::join!(dnsbl.check(ip), dnsbl.check(ip), dnsbl.check(ip));
        assert_eq!(verdicts, (Verdict::Clean, Verdict::Clean, Verdict::Clean));
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Then the cached answer (60 s without an SOA) serves.
        assert_eq!(dnsbl.check(ip).await, Verdict::Clean);
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(dnsbl.cache.lock().in_flight.is_empty());
    }

    #[test]
    fn no_zone_means_no_checker() {
        assert!(Dnsbl::new(&ReputationConfig::default(), Arc::default()).is_none());
    }

    #[test]
    fn the_cache_is_bounded_and_evicts_the_oldest() {
        let cache = DnsblCache::with_capacity(3);
        let zone: Arc<str> = Arc::from("z.test");
        let later = Instant::now() + Duration::from_secs(60);
        let mut inner = cache.lock();
        for i in 1..=5u8 {
            let key = (IpAddr::from([192, 0, 2, i]), zone.clone());
            inner.insert(key, Listing::NotListed, later, cache.capacity);
        }
        // Replacing an entry does not evict another.
        let key = (IpAddr::from([192, 0, 2, 5]), zone.clone());
        inner.insert(key, Listing::Listed, later, cache.capacity);
        let mut kept: Vec<u8> = inner
            .entries
            .keys()
            .map(|(ip, _)| match ip {
                IpAddr::V4(v4) => v4.octets()[3],
                IpAddr::V6(_) => 0,
            })
            .collect();
        kept.sort_unstable();
        assert_eq!(kept, [3, 4, 5]);
        for _ in 0..10 {
            let key = (IpAddr::from([192, 0, 2, 5]), zone.clone());
            inner.insert(key, Listing::Listed, later, cache.capacity);
        }
        assert!(inner.order.len() <= 6, "stale keys are dropped");
        assert_eq!(inner.entries.len(), 3);
    }
}
