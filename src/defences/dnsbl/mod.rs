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
//! The questions go out through hickory-resolver, to `dns_server` or else
//! to the name servers of the system configuration (`/etc/resolv.conf`),
//! over UDP, and over TCP when an answer comes back truncated. Its own
//! cache and retries are off (the cache here is the one that counts), and
//! its UDP transport is set to send the query once more halfway through the
//! timeout if no answer came: a lost datagram costs half the timeout, not a
//! failed check. Each query goes from a random port with a random ID, and
//! only an answer with that ID and question is taken.
//!
//! A zone that answers its RFC 5782 test points wrongly (one that lists
//! every address, say) is not trusted, and a lookup in it fails: see
//! [`ZoneHealth`].

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ProtocolConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::udp::UdpClientStream;
use hickory_resolver::net::xfer::DnsExchange;
use hickory_resolver::net::{DnsError, DnsHandle, NetError};
use hickory_resolver::proto::op::{DnsRequest, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::{ConnectionProvider, PoolContext, Resolver};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{DnsblZone, OnDnsblError, ReputationConfig};

mod cache;
mod health;

pub use cache::DnsblCache;
pub use health::{
    judge, Unhealthy, ZoneHealth, HEALTH_CHECK_EVERY, LISTED_TEST_POINT, UNLISTED_TEST_POINT,
};

/// Longest time an answer is cached, whatever its TTL.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// How long a negative answer without an SOA record is cached.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(60);

/// Most answers cached; past it the oldest are evicted.
pub const CACHE_CAPACITY: usize = 100_000;

/// Asked when the system configuration names no DNS server, as the C
/// library does.
const FALLBACK_SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 53);

/// Why a lookup gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// No answer within `dnsbl_timeout`.
    #[error("no answer within the timeout")]
    Timeout,
    /// The server answered with an error code (2: SERVFAIL, 5: REFUSED).
    #[error("the DNS server answered with error code {0}")]
    ServerFailure(u16),
    /// The zone answered with an address that is not a listing.
    #[error("the zone answered {0}, which is not a listing")]
    NotAListing(Ipv4Addr),
    /// The resolver failed otherwise (socket error, unreadable answer, …).
    #[error("DNS lookup failed: {0}")]
    Resolver(String),
    /// The zone failed its test-point check, so it is not asked.
    #[error("the zone's answers are not trusted: {0}")]
    ZoneUnhealthy(Box<Unhealthy>),
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

/// What an answer says about the address: listed or not, and for how long
/// that may be cached; or why it is no usable answer.
pub fn interpret(answer: Result<Lookup, NetError>) -> Result<(Listing, Duration), LookupError> {
    let no_records = match answer {
        Ok(lookup) => return listing(&lookup),
        Err(NetError::Dns(DnsError::NoRecordsFound(no_records))) => no_records,
        Err(NetError::Dns(DnsError::ResponseCode(code))) => {
            return Err(LookupError::ServerFailure(code.into()))
        }
        Err(NetError::Timeout) => return Err(LookupError::Timeout),
        Err(error) => return Err(LookupError::Resolver(error.to_string())),
    };
    match no_records.response_code {
        // Negative caching (RFC 2308): the smaller of the SOA record's TTL
        // and its minimum field, which the resolver worked out.
        ResponseCode::NXDomain | ResponseCode::NoError => {
            let ttl = no_records.negative_ttl.map_or(NEGATIVE_TTL, capped);
            Ok((Listing::NotListed, ttl))
        }
        code => Err(LookupError::ServerFailure(code.into())),
    }
}

/// The listing the `A` records of an answer make.
fn listing(lookup: &Lookup) -> Result<(Listing, Duration), LookupError> {
    let mut listed_ttl: Option<u32> = None;
    for record in lookup.answers() {
        // CNAMEs and other records on the way are skipped; only the
        // addresses decide.
        let RData::A(a) = &record.data else { continue };
        let address = a.0;
        let [first, second, third, _] = address.octets();
        if first != 127 || (second, third) == (255, 255) {
            return Err(LookupError::NotAListing(address));
        }
        listed_ttl = Some(listed_ttl.map_or(record.ttl, |t| t.min(record.ttl)));
    }
    Ok(match listed_ttl {
        Some(ttl) => (Listing::Listed, capped(ttl)),
        None => (Listing::NotListed, NEGATIVE_TTL),
    })
}

fn capped(ttl: u32) -> Duration {
    Duration::from_secs(u64::from(ttl)).min(MAX_TTL)
}

/// The DNSBL checker of one configuration; the cache it shares outlives
/// reloads.
#[derive(Debug, Clone)]
pub struct Dnsbl {
    zones: Arc<[Arc<str>]>,
    /// A resolver that could not be built fails every lookup, and
    /// `on_dnsbl_error` decides.
    resolver: Arc<Result<Resolver<Transport>, NetError>>,
    timeout: Duration,
    on_error: OnDnsblError,
    cache: Arc<DnsblCache>,
    /// The configured server (`None`: the system's).
    dns_server: Option<SocketAddr>,
    health: Arc<ZoneHealth>,
}

impl Dnsbl {
    /// The checker `[reputation]` describes, or `None` when no zone is
    /// configured. Without `dns_server` it asks the name servers of the
    /// system configuration (falling back to `127.0.0.1:53`, as the C
    /// library does).
    pub fn new(config: &ReputationConfig, cache: Arc<DnsblCache>) -> Option<Dnsbl> {
        if config.dnsbl.is_empty() {
            return None;
        }
        let servers = match config.dns_server {
            Some(server) => vec![name_server(server.0)],
            None => system_name_servers(),
        };
        let timeout = config.dnsbl_timeout.0;
        Some(Dnsbl {
            zones: config
                .dnsbl
                .iter()
                .map(|DnsblZone(zone)| Arc::from(zone.as_str()))
                .collect(),
            resolver: Arc::new(resolver(servers, timeout)),
            timeout,
            on_error: config.on_dnsbl_error,
            cache,
            dns_server: config.dns_server.map(|server| server.0),
            health: Arc::default(),
        })
    }

    /// This checker, trusting the zones as `health` records (shared across
    /// reloads) instead of a record of its own.
    pub fn with_health(self, health: Arc<ZoneHealth>) -> Dnsbl {
        Dnsbl { health, ..self }
    }

    /// The zones asked, in the configured order.
    pub fn zones(&self) -> &[Arc<str>] {
        &self.zones
    }

    /// Whether `other` asks the same zones through the same server (its
    /// zones' health then still holds).
    pub fn asks_as(&self, other: &Dnsbl) -> bool {
        self.zones == other.zones && self.dns_server == other.dns_server
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

    /// The failure of a zone that is not trusted, the cached answer, or a
    /// receiver for the lookup in flight (started here if none is).
    fn answer(&self, ip: IpAddr, zone: &Arc<str>, deadline: Instant) -> Pending {
        if let Some(reason) = self.health.unhealthy(zone) {
            return Pending::Ready(Err(LookupError::ZoneUnhealthy(Box::new(reason))));
        }
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
        let resolver = self.resolver.clone();
        let name = query_name(ip, zone);
        // A task of its own, bounded by the deadline: the answer is shared
        // and cached even if the request that asked first goes away.
        tokio::spawn(async move {
            let asked = lookup(&resolver, name);
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

/// Asks for the `A` record of `name` and reads the answer.
async fn lookup(
    resolver: &Result<Resolver<Transport>, NetError>,
    name: String,
) -> Result<(Listing, Duration), LookupError> {
    let resolver = resolver
        .as_ref()
        .map_err(|e| LookupError::Resolver(e.to_string()))?;
    // Fully qualified (the trailing dot): no search domain is tried.
    let name = Name::from_ascii(name + ".").map_err(|e| LookupError::Resolver(e.to_string()))?;
    interpret(resolver.lookup(name, RecordType::A).await)
}

/// `server`, asked over UDP and, for a truncated answer, over TCP.
fn name_server(server: SocketAddr) -> NameServerConfig {
    let mut config = NameServerConfig::udp_and_tcp(server.ip());
    for connection in &mut config.connections {
        connection.port = server.port();
    }
    config
}

/// The name servers of the system configuration, or [`FALLBACK_SERVER`].
fn system_name_servers() -> Vec<NameServerConfig> {
    match hickory_resolver::system_conf::read_system_conf() {
        Ok((config, _)) => config.name_servers().to_vec(),
        Err(error) => {
            tracing::warn!(
                %error,
                fallback = %FALLBACK_SERVER,
                "no DNS server for DNSBL lookups in the system configuration"
            );
            vec![name_server(FALLBACK_SERVER)]
        }
    }
}

/// A resolver asking `servers`, each query bounded by `timeout`.
fn resolver(
    servers: Vec<NameServerConfig>,
    timeout: Duration,
) -> Result<Resolver<Transport>, NetError> {
    let mut options = ResolverOpts::default();
    options.timeout = timeout;
    // No second round after a failure: the transport resends the UDP query
    // within the timeout, and a SERVFAIL asked again at once says nothing new.
    options.attempts = 0;
    // Answers are cached here, per address and zone and bounded.
    options.cache_size = 0;
    options.use_hosts_file = ResolveHosts::Never;
    // One server at a time (the fastest first): one query per question.
    options.num_concurrent_reqs = 1;
    let transport = Transport {
        runtime: TokioRuntimeProvider::new(),
        resend_after: timeout / 2,
    };
    let config = ResolverConfig::from_parts(None, Vec::new(), servers);
    Resolver::builder_with_config(config, transport)
        .with_options(options)
        .build()
}

/// hickory's transports, the UDP one sending a query at most twice: once,
/// and once more `resend_after` later (from a fresh port, with a fresh ID)
/// if no answer came; the first answer to either is taken. hickory would
/// space the sends by its running estimate of the server's round trip,
/// which every timeout raises: one silent zone would push the resend past
/// the deadline for every zone asked through the same server.
#[derive(Clone)]
struct Transport {
    runtime: TokioRuntimeProvider,
    resend_after: Duration,
}

impl ConnectionProvider for Transport {
    type Conn = Resending;
    type FutureConn = Pin<Box<dyn Future<Output = Result<Resending, NetError>> + Send>>;
    type RuntimeProvider = TokioRuntimeProvider;

    fn new_connection(
        &self,
        ip: IpAddr,
        config: &ConnectionConfig,
        cx: &PoolContext,
    ) -> Result<Self::FutureConn, NetError> {
        let resend_after = self.resend_after;
        let resending = move |exchange| Resending {
            exchange,
            resend_after,
        };
        if !matches!(config.protocol, ProtocolConfig::Udp) {
            let connecting = self.runtime.new_connection(ip, config, cx)?;
            return Ok(Box::pin(async move { connecting.await.map(resending) }));
        }
        let udp = UdpClientStream::builder(SocketAddr::new(ip, config.port), self.runtime.clone())
            .with_timeout(Some(cx.options.timeout))
            .with_bind_addr(config.bind_addr)
            .with_os_port_selection(cx.options.os_port_selection)
            .avoid_local_ports(cx.options.avoid_local_udp_ports.clone())
            // Two sends in all, spaced by the request's interval alone.
            .with_max_retries(2)
            .with_retry_interval_floor(0);
        // Built when first polled: it starts a task on the runtime.
        Ok(Box::pin(async move { Ok(resending(udp.exchange())) }))
    }

    fn runtime_provider(&self) -> &TokioRuntimeProvider {
        &self.runtime
    }
}

/// A connection whose requests carry the fixed resend interval.
#[derive(Clone)]
struct Resending {
    exchange: DnsExchange<TokioRuntimeProvider>,
    resend_after: Duration,
}

impl DnsHandle for Resending {
    type Response = <DnsExchange<TokioRuntimeProvider> as DnsHandle>::Response;
    type Runtime = TokioRuntimeProvider;

    fn send(&self, mut request: DnsRequest) -> Self::Response {
        request.options_mut().retry_interval = self.resend_after;
        self.exchange.send(request)
    }
}

type LookupResult = Result<Listing, LookupError>;

enum Pending {
    Ready(LookupResult),
    Waiting(watch::Receiver<Option<LookupResult>>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;
    use hickory_resolver::net::NoRecords;
    use hickory_resolver::proto::op::Query;
    use hickory_resolver::proto::rr::rdata::{A, CNAME};
    use hickory_resolver::proto::rr::Record;
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

    fn question() -> Query {
        Query::query(
            Name::from_ascii("2.0.0.127.z.test.").unwrap(),
            RecordType::A,
        )
    }

    /// An answer with these records (TTL, record data).
    fn answer(records: &[(u32, RData)]) -> Result<Lookup, NetError> {
        let query = question();
        let records: Vec<_> = records
            .iter()
            .map(|(ttl, data)| Record::from_rdata(query.name().clone(), *ttl, data.clone()))
            .collect();
        Ok(Lookup::new_with_max_ttl(query, records))
    }

    /// A negative answer with this code, and the TTL an SOA record gave.
    fn no_records(code: ResponseCode, negative_ttl: Option<u32>) -> Result<Lookup, NetError> {
        let mut none = NoRecords::new(question(), code);
        none.negative_ttl = negative_ttl;
        Err(none.into())
    }

    fn a(a: u8, b: u8, c: u8, d: u8) -> RData {
        RData::A(A::new(a, b, c, d))
    }

    #[test]
    fn answers_are_read_as_listings_with_capped_ttls() {
        let secs = Duration::from_secs;
        assert_eq!(
            interpret(answer(&[(900, a(127, 0, 0, 2))])),
            Ok((Listing::Listed, secs(900)))
        );
        assert_eq!(
            interpret(answer(&[(86_400, a(127, 0, 0, 4))])),
            Ok((Listing::Listed, MAX_TTL))
        );
        // Several codes: the shortest TTL; a CNAME on the way is skipped.
        let cname = RData::CNAME(CNAME(Name::from_ascii("x.z.test.").unwrap()));
        assert_eq!(
            interpret(answer(&[
                (30, cname),
                (600, a(127, 0, 0, 2)),
                (120, a(127, 0, 0, 10))
            ])),
            Ok((Listing::Listed, secs(120)))
        );
        assert_eq!(
            interpret(answer(&[])),
            Ok((Listing::NotListed, NEGATIVE_TTL))
        );
        assert_eq!(
            interpret(no_records(ResponseCode::NXDomain, Some(120))),
            Ok((Listing::NotListed, secs(120)))
        );
        assert_eq!(
            interpret(no_records(ResponseCode::NXDomain, Some(86_400))),
            Ok((Listing::NotListed, MAX_TTL))
        );
        assert_eq!(
            interpret(no_records(ResponseCode::NXDomain, None)),
            Ok((Listing::NotListed, NEGATIVE_TTL))
        );
        assert_eq!(
            interpret(no_records(ResponseCode::NoError, Some(300))),
            Ok((Listing::NotListed, secs(300)))
        );
    }

    #[test]
    fn refusals_rewrites_and_failures_are_errors() {
        assert_eq!(
            interpret(answer(&[(60, a(127, 255, 255, 254))])),
            Err(LookupError::NotAListing(Ipv4Addr::new(127, 255, 255, 254)))
        );
        // A resolver rewriting NXDOMAIN to its own address, even next to
        // a listing.
        assert_eq!(
            interpret(answer(&[(60, a(127, 0, 0, 2)), (60, a(192, 0, 2, 1))])),
            Err(LookupError::NotAListing(Ipv4Addr::new(192, 0, 2, 1)))
        );
        let servfail = NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail));
        assert_eq!(interpret(Err(servfail)), Err(LookupError::ServerFailure(2)));
        assert_eq!(
            interpret(no_records(ResponseCode::Refused, None)),
            Err(LookupError::ServerFailure(5))
        );
        assert_eq!(interpret(Err(NetError::Timeout)), Err(LookupError::Timeout));
        assert!(matches!(
            interpret(Err(NetError::NoConnections)),
            Err(LookupError::Resolver(_))
        ));
    }

    #[test]
    fn a_configured_server_is_asked_on_its_port_over_udp_then_tcp() {
        let config = name_server("192.0.2.53:5353".parse().unwrap());
        assert_eq!(config.ip, IpAddr::from([192, 0, 2, 53]));
        let connections: Vec<_> = config
            .connections
            .iter()
            .map(|c| (c.protocol.to_protocol().to_string(), c.port))
            .collect();
        assert_eq!(
            connections,
            [("udp".to_owned(), 5353), ("tcp".to_owned(), 5353)]
        );
    }

    /// A responder on loopback answering every question NXDOMAIN (no SOA):
    /// the query sent back with the response bit and the code set, its
    /// question and EDNS record echoed. Returns its address and its query
    /// count.
    async fn nxdomain_responder() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        responder(3).await
    }

    /// [`nxdomain_responder`] answering every query with `rcode`.
    async fn responder(rcode: u8) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            let mut buffer = [0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buffer).await {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut reply = buffer[..n].to_vec();
                if reply.len() < 12 {
                    continue;
                }
                reply[2] |= 0x80;
                reply[3] = 0x80 | rcode;
                let _ = socket.send_to(&reply, from).await;
            }
        });
        (addr, count)
    }

    /// One lost or failed answer must not stop trusting a list (with
    /// `on_dnsbl_error = "deny"` that would refuse everyone until the next
    /// check): a check left unanswered keeps the zone's verdict, and the
    /// zone's own lookups fail on their own.
    #[tokio::test]
    async fn a_test_point_check_that_fails_keeps_the_zone_as_it_was() {
        let (server, count) = responder(2).await;
        let config = Config::from_toml(&format!(
            "[reputation]\ndnsbl = [\"z.test\"]\ndns_server = \"{server}\"\ndnsbl_timeout = \"10s\"\n"
        ))
        .unwrap();
        let dnsbl = Dnsbl::new(&config.reputation, Arc::default()).unwrap();
        dnsbl.check_health().await;
        assert!(count.load(std::sync::atomic::Ordering::SeqCst) >= 2);
        assert!(dnsbl.health.snapshot().is_empty(), "not checked yet");
        let zone: Arc<str> = Arc::from("z.test");
        dnsbl.health.record(&zone, Ok(()));
        dnsbl.check_health().await;
        assert_eq!(dnsbl.health.snapshot(), [(zone.clone(), true)]);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(
            dnsbl.check(ip).await,
            Verdict::Failed(zone, LookupError::ServerFailure(2))
        );
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
}
