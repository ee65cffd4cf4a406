//! What the gate asks of the defences ([`crate::defences`]) about one
//! request's client — its network, its DNSBL listings — and the refusals
//! the defences make.

use std::net::IpAddr;

use super::answer::Stop;
use super::audit::Audit;
use super::Refusal;
use crate::config::OnDnsblError;
use crate::defences::dnsbl::{Dnsbl, Verdict};
use crate::defences::lockdown::CLOSED_MESSAGE;
use crate::defences::networks::{Network, NetworkVerdict, Networks};
use crate::error::MatrixError;
use crate::ratelimit::Subject;

/// Looks the client's network up (with a network database configured),
/// writes it to the audit line, refuses it by the network rules, and
/// returns what the limits count the request as.
pub(super) fn network_subject(networks: &Networks, audit: &mut Audit) -> Result<Subject, Stop> {
    let mut subject = Subject::from(audit.key);
    let Some(client) = audit.client.filter(|_| networks.is_configured()) else {
        return Ok(subject);
    };
    let network: Network = networks.lookup(client);
    let verdict = networks.verdict(&network);
    subject.asn = networks.counted_asn(&network, verdict);
    let refusal = network_refusal(networks, &network, verdict);
    if !network.is_unknown() {
        audit.network = Some(network);
    }
    match refusal {
        Some(refusal) => Err(Stop::Refuse(refusal)),
        None => Ok(subject),
    }
}

/// The refusal of a client by the network rules (`denied_asn`, naming the
/// list of `deny_asn_lists` that holds its AS; `denied_country`), if they
/// refuse it.
pub(crate) fn network_refusal(
    networks: &Networks,
    network: &Network,
    verdict: NetworkVerdict,
) -> Option<Refusal> {
    let rule = verdict.rule()?;
    Some(match networks.denying_list(network, verdict) {
        Some(list) => Refusal::listed(rule, not_from_your_network(), list),
        None => Refusal::new(rule, not_from_your_network()),
    })
}

/// Refuses a client a DNSBL lists (`dnsbl`), or one whose lookup failed
/// when `on_dnsbl_error = "deny"` (`dnsbl_error`), naming the zone in the
/// audit line.
pub(super) async fn check_dnsbl(
    dnsbl: &Dnsbl,
    client: IpAddr,
    audit: &mut Audit,
) -> Result<(), Stop> {
    match dnsbl.check(client).await {
        Verdict::Clean => Ok(()),
        Verdict::Listed(zone) => {
            audit.dnsbl_zone = Some(zone);
            Err(Stop::Refuse(dnsbl_listed()))
        }
        Verdict::Failed(zone, error) => {
            tracing::debug!(%client, %zone, %error, "DNSBL lookup failed");
            audit.dnsbl_failed = true;
            match dnsbl.on_error() {
                OnDnsblError::Allow => Ok(()),
                OnDnsblError::Deny => {
                    audit.dnsbl_zone = Some(zone);
                    Err(Stop::Refuse(dnsbl_failed()))
                }
            }
        }
    }
}

/// The refusal of a client a temporary ban covers.
pub(crate) fn banned() -> Refusal {
    Refusal::new("temporary_ban", not_from_your_network())
}

/// The refusal of a client a DNSBL lists.
pub(crate) fn dnsbl_listed() -> Refusal {
    Refusal::new("dnsbl", not_from_your_network())
}

/// The refusal of a client whose DNSBL lookup failed, with
/// `on_dnsbl_error = "deny"`.
pub(crate) fn dnsbl_failed() -> Refusal {
    Refusal::new(
        "dnsbl_error",
        MatrixError::forbidden(
            "Registration is not available right now: the address check failed.",
        ),
    )
}

/// The refusal of a registration while registration is closed.
pub(crate) fn closed() -> Refusal {
    Refusal::new("lockdown", MatrixError::forbidden(CLOSED_MESSAGE))
}

fn not_from_your_network() -> MatrixError {
    MatrixError::forbidden("Registration is not available from your network.")
}
