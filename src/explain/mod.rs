//! `matrix-gatekeeper explain`: the decision the gate takes on one
//! registration, the rule that made it, and the rate limits the request
//! counts against, for support tickets.
//!
//! It runs the same pure policy the gate runs on `POST
//! /_matrix/client/v3/register` (or, given an e-mail address, on `POST
//! /_matrix/client/v3/register/email/requestToken`), and names the limits
//! in the order the gate takes them. What the configuration alone does not
//! decide comes from [`Live`]: the DNSBL answers about the client (the
//! lookups the gate would make), and the running gate's own state read
//! through its admin API — temporary bans, whether registration is closed,
//! what the client has left of each limit. Without it, `explain` says that
//! this state was not read.

mod live;

use std::fmt;
use std::net::IpAddr;

use http::Method;

pub use live::{
    look_up_dnsbl, read_gate, AdminTarget, ClientState, DnsblAnswer, GateRead, GateState, Live,
    LiveBan, LiveBudget, LockdownState,
};

use crate::client_ip::ClientAddress;
use crate::config::{Config, GateMode, LimitSpec, OnDnsblError};
use crate::defences::networks::{Network, NetworkVerdict};
use crate::gate::policy::{Forward, HeadDecision, Policy, RequestedName};
use crate::gate::routes::{ApiVersion, GuardedRoute, Medium};
use crate::ratelimit::LimitKind;

/// What to explain.
#[derive(Debug, Clone, Default)]
pub struct Question {
    /// The requested username, if any.
    pub username: Option<String>,
    /// A guest registration.
    pub guest: bool,
    /// The client address.
    pub ip: Option<IpAddr>,
    /// The client's user agent.
    pub user_agent: Option<String>,
    /// An e-mail address: explain `POST …/register/email/requestToken` for
    /// it instead of a registration.
    pub email: Option<String>,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// What the gate would decide.
    pub decision: Explained,
    /// The username as sent and as mapped, if one was given.
    pub username: Option<RequestedName>,
    /// The rate limits the request counts against, in the gate's order.
    pub limits: Vec<AppliedLimit>,
    /// Whether the gate runs in shadow mode (then it only logs a refusal).
    pub shadow: bool,
    /// The configured registration lockdown, if any.
    pub lockdown: Option<crate::config::LockdownSpec>,
    /// Whether the request is a registration (which a lockdown refuses)
    /// rather than a token request.
    pub registration: bool,
    /// The DNSBL names the gate would ask about the client (the zones
    /// alone without `--ip`); empty when no zone is configured or the
    /// request is refused before the gate asks.
    pub dnsbl: Vec<String>,
    /// What the DNSBLs answered, when they were asked.
    pub dnsbl_answer: Option<DnsblAnswer>,
    /// What a failed DNSBL lookup does.
    pub on_dnsbl_error: OnDnsblError,
    /// The running gate's state, if it was read.
    pub gate: GateRead,
    /// The client address asked about.
    pub ip: Option<IpAddr>,
    /// What the network databases say of the client (`None`: no `--ip`, or
    /// no network database configured).
    pub network: Option<NetworkSeen>,
}

/// The client's network as the gate sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSeen {
    /// ASN, name and country, each as far as the databases know.
    pub network: Network,
    /// `allow_asns` lists its ASN.
    pub trusted: bool,
    /// The ASN the per-network limits count it under.
    pub counted_asn: Option<u32>,
}

/// The gate's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Explained {
    /// The request would be forwarded like this.
    Allowed {
        /// Method, canonical path and query.
        target: String,
        /// The body the homeserver would receive.
        body: String,
    },
    /// The request would be refused.
    Refused {
        /// The rule that refused it.
        rule: &'static str,
        /// HTTP status.
        status: u16,
        /// Matrix errcode.
        errcode: &'static str,
        /// Error text.
        error: String,
        /// The list file whose entry refused it (`deny_list`), as
        /// configured.
        list: Option<String>,
    },
    /// The request would be rate limited (`429 M_LIMIT_EXCEEDED`): the
    /// client has nothing left of this limit (read from the running gate).
    RateLimited {
        /// The limit.
        limit: &'static str,
        /// Time until one more unit is available.
        retry_after_ms: u64,
    },
}

/// One rate limit a request counts against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedLimit {
    /// The `[rate_limit]` key.
    pub name: &'static str,
    /// Its configured value; `None` when it is not set (no limit).
    pub spec: Option<LimitSpec>,
    /// The key it is counted under: the client's address or IPv6 prefix,
    /// `*` for the whole server, or `-` when no `--ip` was given.
    pub key: String,
    /// When the unit it takes is given back.
    pub refunded: &'static str,
    /// What the client has left of it now, read from the running gate.
    pub live: Option<LiveBudget>,
    /// The client's own key, as the running gate writes it (to tell a
    /// shared key from it).
    pub own_key: Option<String>,
}

/// Runs the policy of `config` on the registration `question` describes,
/// reading no live state.
pub fn explain(config: &Config, question: &Question) -> Explanation {
    explain_with(config, question, &Live::default())
}

/// Runs the gate's checks on the registration `question` describes, in the
/// gate's order: the client rules of the policy (`[client_ip] deny`, deny
/// lists, user agents), temporary bans, the lockdown (registrations only),
/// the route's per-client limit, the policy on the query, the guest limit,
/// the body, the reservation of a completed registration, and last the
/// DNSBL listings. Bans, the lockdown, DNSBL answers and what is left of
/// each limit come from `live`; what it lacks does not refuse.
pub fn explain_with(config: &Config, question: &Question, live: &Live) -> Explanation {
    let policy = Policy::new(config);
    let shadow = config.registration.mode == GateMode::Shadow;
    let gate = live.gate.state();
    let client_state = gate.and_then(|g| g.client.as_ref());
    let client_key = question.ip.map_or_else(
        || "-".to_owned(),
        |ip| {
            let key = config.client_ip.resolver().key(ClientAddress(ip));
            match ip.to_canonical() {
                IpAddr::V6(_) => format!("{key}/{}", config.client_ip.ipv6_prefix_len),
                IpAddr::V4(_) => key.to_string(),
            }
        },
    );
    let networks = config.networks();
    let network = question.ip.filter(|_| networks.is_configured()).map(|ip| {
        let network = networks.lookup(ip);
        let verdict = networks.verdict(&network);
        (
            NetworkSeen {
                trusted: verdict == NetworkVerdict::Trusted,
                counted_asn: networks.counted_asn(&network, verdict),
                network,
            },
            verdict,
        )
    });
    let counted_asn = network.as_ref().and_then(|(seen, _)| seen.counted_asn);
    let limit = |name: &'static str, refunded: &'static str| {
        let spec = config
            .rate_limit
            .limits()
            .into_iter()
            .find(|(key, _)| *key == name)
            .and_then(|(_, spec)| spec);
        let key = match LimitKind::named(name) {
            Some(kind) if kind.is_global() => "*".to_owned(),
            Some(kind) if kind.is_per_network() => {
                counted_asn.map_or_else(|| "-".to_owned(), |asn| format!("AS{asn}"))
            }
            _ => client_key.clone(),
        };
        AppliedLimit {
            name,
            spec,
            key,
            refunded,
            live: client_state.and_then(|c| c.limits.get(name)).cloned(),
            own_key: client_state.map(|c| c.key.clone()),
        }
    };
    let mut explanation = Explanation {
        decision: Explained::Allowed {
            target: String::new(),
            body: String::new(),
        },
        username: None,
        limits: Vec::new(),
        shadow,
        lockdown: config.registration.lockdown,
        registration: question.email.is_none(),
        dnsbl: Vec::new(),
        dnsbl_answer: None,
        on_dnsbl_error: config.reputation.on_dnsbl_error,
        gate: live.gate.clone(),
        ip: question.ip,
        network: network.as_ref().map(|(seen, _)| seen.clone()),
    };
    if let Err(refusal) = policy.client(question.ip, question.user_agent.as_deref()) {
        explanation.decision = refused(refusal);
        return explanation;
    }
    if let (Some(ip), Some(gate)) = (question.ip, gate) {
        if gate.bans.iter().any(|ban| ban.covers(ip)) {
            explanation.decision = refused(crate::gate::banned());
            return explanation;
        }
    }
    if let Some(refusal) = network.as_ref().and_then(|(seen, verdict)| {
        crate::gate::network_refusal(&networks, &seen.network, *verdict)
    }) {
        explanation.decision = refused(refusal);
        return explanation;
    }
    if explanation.registration && gate.is_some_and(|g| g.lockdown.closed) {
        explanation.decision = refused(crate::gate::closed());
        return explanation;
    }
    if let Some(email) = &question.email {
        // The gate's order for a token request: the attempt is counted,
        // then the body is judged; nothing is reserved.
        explanation
            .limits
            .push(limit("token_requests_per_ip", "never"));
        if let Some(limited) = exhausted(&explanation.limits) {
            explanation.decision = limited;
            return explanation;
        }
        let route = GuardedRoute::RequestToken(ApiVersion::V3, Medium::Email);
        let body = serde_json::json!({
            "client_secret": "explain",
            "email": email,
            "send_attempt": 1,
        });
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let decided = match policy.head(&Method::POST, route, None) {
            HeadDecision::Refuse(refusal) => Err(refusal),
            HeadDecision::Forward(forward) => Ok(forward),
            HeadDecision::ReadBody(plan) => policy.body(plan, &bytes),
        };
        explanation.decision = match decided {
            Ok(forward) => dnsbl_refusal(config, question, live, &mut explanation)
                .unwrap_or_else(|| forwarded(&forward)),
            Err(refusal) => refused(refusal),
        };
        return explanation;
    }
    explanation.limits.push(limit("attempts_per_ip", "never"));
    // A per-network limit counts only a client with a counted network.
    if counted_asn.is_some() {
        explanation.limits.push(limit("attempts_per_asn", "never"));
    }
    if let Some(limited) = exhausted(&explanation.limits) {
        explanation.decision = limited;
        return explanation;
    }
    let route = GuardedRoute::Register(ApiVersion::V3);
    let query = question.guest.then_some("kind=guest");
    let forward = match policy.head(&Method::POST, route, query) {
        HeadDecision::Refuse(refusal) => {
            explanation.decision = refused(refusal);
            return explanation;
        }
        HeadDecision::Forward(forward) => forward,
        HeadDecision::ReadBody(plan) => {
            if question.guest {
                let guests = explanation.limits.len();
                explanation.limits.push(limit("guests_per_ip", "never"));
                if let Some(limited) = exhausted(&explanation.limits[guests..]) {
                    explanation.decision = limited;
                    return explanation;
                }
            }
            let mut body = serde_json::Map::new();
            if let Some(name) = &question.username {
                body.insert("username".into(), serde_json::Value::String(name.clone()));
            }
            let bytes = serde_json::to_vec(&body).unwrap_or_default();
            match policy.body(plan, &bytes) {
                Ok(forward) => forward,
                Err(refusal) => {
                    explanation.username = refusal.username.as_deref().cloned();
                    explanation.decision = refused(refusal);
                    return explanation;
                }
            }
        }
    };
    let allowed = forwarded(&forward);
    explanation.username = forward.username;
    let unless_success = "when the homeserver answers with anything but a 2xx";
    let reserved = explanation.limits.len();
    explanation
        .limits
        .push(limit("registrations_per_ip", unless_success));
    explanation
        .limits
        .push(limit("registrations_global", unless_success));
    if counted_asn.is_some() {
        explanation
            .limits
            .push(limit("registrations_per_asn", unless_success));
    }
    // Both units are reserved together: the longest wait refuses.
    if let Some(limited) = exhausted(&explanation.limits[reserved..]) {
        explanation.decision = limited;
        return explanation;
    }
    explanation.decision =
        dnsbl_refusal(config, question, live, &mut explanation).unwrap_or(allowed);
    explanation
}

/// The gate's last check: names the DNSBL queries the gate would make in
/// `explanation`, with the answers `live` holds, and the refusal they make
/// (`dnsbl`, or `dnsbl_error` when a lookup failed and `on_dnsbl_error`
/// is `deny`).
fn dnsbl_refusal(
    config: &Config,
    question: &Question,
    live: &Live,
    explanation: &mut Explanation,
) -> Option<Explained> {
    explanation.dnsbl = config
        .reputation
        .dnsbl
        .iter()
        .map(|zone| match question.ip {
            Some(ip) => crate::defences::dnsbl::query_name(ip, &zone.0),
            None => zone.0.clone(),
        })
        .collect();
    explanation.dnsbl_answer = live.dnsbl.clone();
    let refusal = match &live.dnsbl {
        Some(DnsblAnswer::Listed { .. }) => crate::gate::dnsbl_listed(),
        Some(DnsblAnswer::Failed { .. }) if explanation.on_dnsbl_error == OnDnsblError::Deny => {
            crate::gate::dnsbl_failed()
        }
        _ => return None,
    };
    Some(refused(refusal))
}

/// The gate's refusal, as explained.
fn refused(refusal: crate::gate::Refusal) -> Explained {
    Explained::Refused {
        rule: refusal.rule,
        status: refusal.error.status.as_u16(),
        errcode: refusal.error.errcode,
        error: refusal.error.error,
        list: refusal.list.as_deref().map(str::to_owned),
    }
}

/// The `POST` the gate would forward.
fn forwarded(forward: &Forward) -> Explained {
    Explained::Allowed {
        target: format!("POST {}", forward.path_and_query),
        body: forward
            .body
            .as_deref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default(),
    }
}

/// The rate limit among `limits` (taken together) that refuses the next
/// request: a configured one with nothing left, the longest wait first.
fn exhausted(limits: &[AppliedLimit]) -> Option<Explained> {
    limits
        .iter()
        .filter(|limit| limit.spec.is_some())
        .filter_map(|limit| Some((limit.name, limit.live.as_ref()?)))
        .filter(|(_, budget)| budget.remaining == 0)
        .max_by_key(|(_, budget)| budget.next_unit_in_ms)
        .map(|(limit, budget)| Explained::RateLimited {
            limit,
            retry_after_ms: budget.next_unit_in_ms.max(1),
        })
}

impl Explanation {
    /// Whether the gate lets the request through.
    pub fn allowed(&self) -> bool {
        matches!(self.decision, Explained::Allowed { .. })
    }

    /// Whether the running gate was asked for its state and did not answer.
    pub fn gate_unreadable(&self) -> bool {
        matches!(self.gate, GateRead::Failed { .. })
    }
}

/// `59m59s`, `2h`, `450ms`: a wait in whole units, rounded up to the second
/// past one second.
fn wait(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = ms.div_ceil(1000);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut text = String::new();
    for (n, unit) in [(h, "h"), (m, "m"), (s, "s")] {
        if n > 0 {
            text.push_str(&format!("{n}{unit}"));
        }
    }
    text
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.decision {
            Explained::Allowed { .. } if self.gate_unreadable() => writeln!(
                f,
                "decision: allowed, as far as known without the running gate's state"
            )?,
            Explained::Allowed { .. } => writeln!(f, "decision: allowed")?,
            Explained::Refused { rule, list, .. } => {
                writeln!(f, "decision: refused")?;
                writeln!(f, "rule: {rule}")?;
                if let Some(list) = list {
                    writeln!(f, "list: {list}")?;
                }
            }
            Explained::RateLimited { limit, .. } => {
                writeln!(f, "decision: rate limited")?;
                writeln!(f, "rule: {limit}")?;
            }
        }
        if let Some(name) = &self.username {
            match name.mapped.as_deref() {
                Some(mapped) if mapped == name.sent => writeln!(f, "username: {mapped}")?,
                Some(mapped) => writeln!(f, "username: {mapped} (sent as {:?})", name.sent)?,
                None => writeln!(f, "username: {:?} (not mapped)", name.sent)?,
            }
        }
        match &self.decision {
            Explained::Allowed { target, body } => {
                writeln!(f, "forwarded: {target}")?;
                writeln!(f, "body: {body}")?;
            }
            Explained::Refused {
                status,
                errcode,
                error,
                ..
            } => writeln!(f, "answer: {status} {errcode}: {error}")?,
            Explained::RateLimited { retry_after_ms, .. } => writeln!(
                f,
                "answer: 429 M_LIMIT_EXCEEDED: Too many requests (retry after {})",
                wait(*retry_after_ms)
            )?,
        }
        if self.shadow {
            writeln!(
                f,
                "mode: shadow (a refused request is forwarded as sent, and only logged)"
            )?;
        }
        if let Some(seen) = &self.network {
            self.fmt_network(f, seen)?;
        }
        self.fmt_live_rules(f)?;
        self.fmt_limits(f)?;
        match &self.gate {
            GateRead::NotAsked => writeln!(
                f,
                "live state: not read (temporary bans, whether registration is closed now, \
                 the client's remaining budgets); --admin URL of the gate's admin listener \
                 reads them"
            ),
            GateRead::Read(state) => writeln!(f, "live state: read from {}", state.url),
            GateRead::Failed { url, error } => {
                writeln!(f, "live state: could not be read from {url}: {error}")
            }
        }
    }
}

impl Explanation {
    /// The lines on bans, the lockdown and the DNSBLs.
    fn fmt_live_rules(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gate = self.gate.state();
        if let Some(gate) = gate {
            let covering = self
                .ip
                .and_then(|ip| gate.bans.iter().find(|ban| ban.covers(ip)));
            match (covering, self.ip) {
                (Some(ban), _) => {
                    write!(
                        f,
                        "temporary ban: {} covers the address, {} more",
                        ban.cidr,
                        wait(ban.remaining_ms)
                    )?;
                    if !ban.reason.is_empty() {
                        write!(f, " (reason: {:?})", ban.reason)?;
                    }
                    writeln!(f)?;
                }
                (None, Some(ip)) => writeln!(
                    f,
                    "temporary bans: none covers {ip} ({} in force)",
                    gate.bans.len()
                )?,
                (None, None) => writeln!(
                    f,
                    "temporary bans: {} in force (--ip checks an address)",
                    gate.bans.len()
                )?,
            }
        }
        if let Some(lockdown) = &self.lockdown {
            write!(
                f,
                "lockdown: configured: {} registrations within {} close registration for {}",
                lockdown.count, lockdown.period, lockdown.close_for
            )?;
            if gate.is_none() {
                write!(
                    f,
                    " (whether it is closed now is state of the running gate: \
                     gatekeeper_registration_lockdown)"
                )?;
            }
            writeln!(f)?;
        }
        if let Some(gate) = gate {
            let applies = if self.registration {
                ""
            } else {
                " (it refuses registrations, not token requests)"
            };
            match (gate.lockdown.closed, gate.lockdown.remaining_ms) {
                (true, Some(ms)) => writeln!(
                    f,
                    "lockdown: registration is closed now, {} more{applies}",
                    wait(ms)
                )?,
                (true, None) => writeln!(f, "lockdown: registration is closed now{applies}")?,
                (false, _) => writeln!(f, "lockdown: registration is open now")?,
            }
        }
        if self.dnsbl.is_empty() {
            return Ok(());
        }
        let asked = self.dnsbl.join(", ");
        match &self.dnsbl_answer {
            None if self.ip.is_none() => writeln!(
                f,
                "dnsbl: would ask {asked} (a listing refuses with rule dnsbl; \
                 --ip looks an address up)"
            ),
            None => writeln!(
                f,
                "dnsbl: would ask {asked} (a listing refuses with rule dnsbl; \
                 no lookup made: --no-dns)"
            ),
            Some(DnsblAnswer::NotListed) => writeln!(f, "dnsbl: not listed (asked {asked})"),
            Some(DnsblAnswer::Listed { zone }) => writeln!(
                f,
                "dnsbl: listed in {zone} (asked {asked}): refused with rule dnsbl"
            ),
            Some(DnsblAnswer::Failed { zone, error }) => {
                let outcome = match self.on_dnsbl_error {
                    OnDnsblError::Allow => "lets the request on",
                    OnDnsblError::Deny => "refuses it with rule dnsbl_error",
                };
                writeln!(
                    f,
                    "dnsbl: the lookup in {zone} failed: {error} (asked {asked}); \
                     on_dnsbl_error = \"{}\" {outcome}",
                    self.on_dnsbl_error.as_str()
                )
            }
        }
    }

    /// The limits, with what is left of each when it was read.
    /// The line on the client's network.
    fn fmt_network(&self, f: &mut fmt::Formatter<'_>, seen: &NetworkSeen) -> fmt::Result {
        let network = &seen.network;
        write!(f, "network: ")?;
        match (network.asn, &network.as_name) {
            (Some(asn), Some(name)) => write!(f, "AS{asn} ({name})")?,
            (Some(asn), None) => write!(f, "AS{asn}")?,
            (None, _) => write!(f, "no ASN known")?,
        }
        match network.country {
            Some(country) => write!(f, ", country {country}")?,
            None => write!(f, ", no country known")?,
        }
        if seen.trusted {
            write!(
                f,
                "; trusted (allow_asns): no country rule or per-network limit"
            )?;
        }
        writeln!(f)
    }

    fn fmt_limits(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.limits.is_empty() {
            return writeln!(f, "limits: none (refused before any limit counts)");
        }
        let read = self.limits.iter().any(|limit| limit.own_key.is_some());
        let state = match (&self.gate, read) {
            (_, true) => "what is left now, read from the running gate",
            (GateRead::Read(_), false) => "--ip reads what a client has left",
            _ => "their current state is in the running gate",
        };
        writeln!(f, "limits (counted in this order; {state}):")?;
        for limit in &self.limits {
            let Some(spec) = &limit.spec else {
                writeln!(f, "  {}: not set", limit.name)?;
                continue;
            };
            write!(
                f,
                "  {}: {} per {}, key {}, refunded {}",
                limit.name, spec.count, spec.period, limit.key, limit.refunded
            )?;
            if let Some(budget) = &limit.live {
                let shared = budget.counted_as.as_deref().filter(|k| {
                    *k != "*" && *k != limit.key && Some(*k) != limit.own_key.as_deref()
                });
                if let Some(shared) = shared {
                    write!(f, ", counted under the shared key {shared}")?;
                }
                write!(f, "; {} of {} left", budget.remaining, budget.burst)?;
                if budget.remaining == 0 {
                    write!(f, ", next in {}", wait(budget.next_unit_in_ms))?;
                }
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
