//! What `explain` reads besides the configuration: the DNSBL answers about
//! the client (the lookups the gate would make), and the running gate's
//! state through its admin API — temporary bans, whether registration is
//! closed now, and what the client has left of its limits.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, StatusCode};
use http_body_util::{BodyExt, Empty};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::client_ip::IpNet;
use crate::config::Config;
use crate::defences::dnsbl::{Dnsbl, Verdict};

/// Longest wait for one answer of the admin API, body included.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything read from outside the configuration; the default reads
/// nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Live {
    /// The DNSBL answer about the client; `None` when no lookup was made
    /// (no `--ip`, no zone configured, or `--no-dns`).
    pub dnsbl: Option<DnsblAnswer>,
    /// The running gate's state.
    pub gate: GateRead,
}

/// What the configured DNSBLs say about the client, as the gate reads it:
/// the first zone that lists it, or else the first that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsblAnswer {
    /// No zone lists the address.
    NotListed,
    /// This zone lists it.
    Listed {
        /// The zone.
        zone: String,
    },
    /// This zone could not be asked.
    Failed {
        /// The zone.
        zone: String,
        /// Why.
        error: String,
    },
}

/// The running gate's state, if it was asked for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum GateRead {
    /// Not asked (no `--admin`).
    #[default]
    NotAsked,
    /// Read.
    Read(GateState),
    /// Asked, without an answer that could be used.
    Failed {
        /// The admin listener asked.
        url: String,
        /// What went wrong.
        error: String,
    },
}

impl GateRead {
    /// The state, when it was read.
    pub fn state(&self) -> Option<&GateState> {
        match self {
            GateRead::Read(state) => Some(state),
            _ => None,
        }
    }
}

/// The running gate's state, as its admin API answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateState {
    /// The admin listener asked.
    pub url: String,
    /// Temporary bans in force (`GET /v1/bans`).
    pub bans: Vec<LiveBan>,
    /// Whether registration is closed (`GET /v1/lockdown`).
    pub lockdown: LockdownState,
    /// The client's budgets (`GET /v1/clients/{ip}`), when an address was
    /// given.
    pub client: Option<ClientState>,
}

/// One temporary ban.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LiveBan {
    /// The banned network.
    pub cidr: String,
    /// Time left.
    pub remaining_ms: u64,
    /// Why, as given.
    #[serde(default)]
    pub reason: String,
}

impl LiveBan {
    /// Whether the ban covers `ip`.
    pub fn covers(&self, ip: IpAddr) -> bool {
        self.cidr
            .parse::<IpNet>()
            .is_ok_and(|network| network.contains(ip))
    }
}

/// Whether registration is closed, by hand or by the configured lockdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct LockdownState {
    /// Closed now.
    pub closed: bool,
    /// Time left while closed.
    pub remaining_ms: Option<u64>,
}

/// What one client has left.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ClientState {
    /// The client's own limit key, as the gate writes it.
    pub key: String,
    /// The store the gate decides with (`memory`, `redis`).
    pub store: String,
    /// The budget per configured limit, by name.
    pub limits: BTreeMap<String, LiveBudget>,
}

/// What a client has left under one limit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LiveBudget {
    /// The limit's burst.
    pub burst: u32,
    /// Units a request could take now.
    pub remaining: u32,
    /// Time until one more unit.
    pub next_unit_in_ms: u64,
    /// The key the limit counts the client under: its own, `*` for the
    /// server-wide limit, or a key it shares with other clients (the
    /// memory store past `max_tracked_clients`).
    #[serde(default)]
    pub counted_as: Option<String>,
}

/// Asks the zones of `[reputation] dnsbl` about `ip` as the gate does (the
/// configured server and timeout, after checking the zones' test points);
/// `None` without zones.
pub async fn look_up_dnsbl(config: &Config, ip: IpAddr) -> Option<DnsblAnswer> {
    let dnsbl = Dnsbl::new(&config.reputation, Arc::default())?;
    // As the running gate would have: a zone failing its test points is
    // not trusted.
    dnsbl.check_health().await;
    Some(match dnsbl.check(ip).await {
        Verdict::Clean => DnsblAnswer::NotListed,
        Verdict::Listed(zone) => DnsblAnswer::Listed {
            zone: zone.to_string(),
        },
        Verdict::Failed(zone, error) => DnsblAnswer::Failed {
            zone: zone.to_string(),
            error: error.to_string(),
        },
    })
}

/// The admin listener of a running gate, and the token for its API.
#[derive(Clone)]
pub struct AdminTarget {
    /// `http://host:port`, and a path prefix if one was given.
    base: String,
    token: String,
}

impl std::fmt::Debug for AdminTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminTarget")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl AdminTarget {
    /// The admin listener at `url` (`http://127.0.0.1:9009`), asked with
    /// `token`. The listener speaks plain HTTP.
    pub fn new(url: &str, token: Vec<u8>) -> Result<Self, String> {
        let uri: http::Uri = url
            .parse()
            .map_err(|_| format!("{url:?} is not a URL such as http://127.0.0.1:9009"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "{url:?}: the admin listener speaks plain HTTP: give an http:// URL"
            ));
        }
        let Some(authority) = uri.authority() else {
            return Err(format!("{url:?} names no host"));
        };
        if uri.query().is_some() {
            return Err(format!("{url:?}: a query has no place in the base URL"));
        }
        let token = String::from_utf8(token)
            .ok()
            .filter(|t| http::HeaderValue::from_str(&format!("Bearer {t}")).is_ok())
            .ok_or("the admin token is not printable text")?;
        Ok(AdminTarget {
            base: format!("http://{authority}{}", uri.path().trim_end_matches('/')),
            token,
        })
    }

    /// The base URL.
    pub fn url(&self) -> &str {
        &self.base
    }
}

/// Reads the bans, the lockdown and, for `ip`, the client's budgets.
pub async fn read_gate(target: &AdminTarget, ip: Option<IpAddr>) -> GateRead {
    match read(target, ip).await {
        Ok(state) => GateRead::Read(state),
        Err(error) => GateRead::Failed {
            url: target.base.clone(),
            error,
        },
    }
}

async fn read(target: &AdminTarget, ip: Option<IpAddr>) -> Result<GateState, String> {
    #[derive(Deserialize)]
    struct Bans {
        bans: Vec<LiveBan>,
    }
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let bans: Bans = get(&client, target, "/v1/bans").await?;
    let lockdown: LockdownState = get(&client, target, "/v1/lockdown").await?;
    let client = match ip {
        Some(ip) => Some(get(&client, target, &format!("/v1/clients/{ip}")).await?),
        None => None,
    };
    Ok(GateState {
        url: target.base.clone(),
        bans: bans.bans,
        lockdown,
        client,
    })
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Empty<Bytes>,
>;

/// One `GET` of the admin API, its JSON answer read as `T`.
async fn get<T: DeserializeOwned>(
    client: &HttpClient,
    target: &AdminTarget,
    path: &str,
) -> Result<T, String> {
    let url = format!("{}{path}", target.base);
    let request = http::Request::get(&url)
        .header(header::AUTHORIZATION, format!("Bearer {}", target.token))
        .body(Empty::new())
        .map_err(|error| format!("GET {url}: {error}"))?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|error| crate::error::ErrorChain(&error).to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|error| format!("reading the answer: {error}"))?
            .to_bytes();
        Ok::<_, String>((status, body))
    };
    let (status, body) = tokio::time::timeout(ADMIN_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("GET {url}: no answer within {}s", ADMIN_TIMEOUT.as_secs()))?
        .map_err(|error| format!("GET {url}: {error}"))?;
    if status != StatusCode::OK {
        return Err(format!("GET {url} answered {}", refusal(status, &body)));
    }
    serde_json::from_slice(&body)
        .map_err(|error| format!("GET {url}: not the admin API's answer: {error}"))
}

/// A refusal of the admin API, with its Matrix error and what it most
/// likely means.
fn refusal(status: StatusCode, body: &[u8]) -> String {
    let error = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            Some(format!(
                "{} {}",
                v["errcode"].as_str()?,
                v["error"].as_str()?
            ))
        });
    let hint = match status {
        StatusCode::UNAUTHORIZED => " (not the token the gate reads from its [admin] token_file)",
        StatusCode::NOT_FOUND => " (is the admin API on? It needs [admin] token_file)",
        _ => "",
    };
    match error {
        Some(error) => format!("{}: {error}{hint}", status.as_u16()),
        None => format!("{}{hint}", status.as_u16()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_urls_are_plain_http_base_urls() {
        let token = || b"0123456789abcdef".to_vec();
        let target = AdminTarget::new("http://127.0.0.1:9009/", token()).unwrap();
        assert_eq!(target.url(), "http://127.0.0.1:9009");
        let behind = AdminTarget::new("http://[::1]:9009/gate", token()).unwrap();
        assert_eq!(behind.url(), "http://[::1]:9009/gate");
        for bad in [
            "https://127.0.0.1:9009",
            "127.0.0.1:9009",
            "http://h/?x=1",
            "not a url",
        ] {
            assert!(AdminTarget::new(bad, token()).is_err(), "{bad}");
        }
        assert!(AdminTarget::new("http://127.0.0.1:9009", b"bad\ntoken".to_vec()).is_err());
    }

    #[test]
    fn bans_cover_their_network() {
        let ban = |cidr: &str| LiveBan {
            cidr: cidr.to_owned(),
            remaining_ms: 1,
            reason: String::new(),
        };
        let ip = "203.0.113.9".parse().unwrap();
        assert!(ban("203.0.113.0/24").covers(ip));
        assert!(!ban("203.0.114.0/24").covers(ip));
        assert!(!ban("not a network").covers(ip));
    }

    #[test]
    fn refusals_say_what_they_likely_mean() {
        let body = br#"{"errcode":"M_UNKNOWN_TOKEN","error":"The admin token is not valid."}"#;
        let text = refusal(StatusCode::UNAUTHORIZED, body);
        assert!(
            text.starts_with("401: M_UNKNOWN_TOKEN The admin token"),
            "{text}"
        );
        assert!(text.contains("token_file"), "{text}");
        assert_eq!(refusal(StatusCode::BAD_GATEWAY, b"<html>"), "502");
    }
}
