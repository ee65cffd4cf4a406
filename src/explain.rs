//! `matrix-gatekeeper explain`: the decision the policy takes on one
//! registration, the rule that made it, and the rate limits the request
//! counts against, for support tickets.
//!
//! It runs the same pure policy the gate runs on `POST
//! /_matrix/client/v3/register` (or, given an e-mail address, on `POST
//! /_matrix/client/v3/register/email/requestToken`), and names the limits
//! in the order the gate takes them. It does not read their state: that lives in the running gate
//! (or in Redis), and depends on traffic.

use std::fmt;
use std::net::IpAddr;

use http::Method;

use crate::client_ip::ClientAddress;
use crate::config::{Config, GateMode, LimitSpec};
use crate::gate::policy::{HeadDecision, Policy, RequestedName};
use crate::gate::routes::{ApiVersion, GuardedRoute, Medium};

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
    /// What the policy decided.
    pub decision: Explained,
    /// The username as sent and as mapped, if one was given.
    pub username: Option<RequestedName>,
    /// The rate limits the request counts against, in the gate's order.
    pub limits: Vec<AppliedLimit>,
    /// Whether the gate runs in shadow mode (then it only logs a refusal).
    pub shadow: bool,
    /// The configured registration lockdown, if any (whether it is closed
    /// now is live state of the running gate).
    pub lockdown: Option<crate::config::LockdownSpec>,
    /// The DNSBL names the gate would ask about the client (the zones
    /// alone without `--ip`); `explain` makes no lookup itself.
    pub dnsbl: Vec<String>,
}

/// The policy's decision.
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
}

/// Runs the policy of `config` on the registration `question` describes.
pub fn explain(config: &Config, question: &Question) -> Explanation {
    let policy = Policy::new(config);
    let shadow = config.registration.mode == GateMode::Shadow;
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
    let limit = |name: &'static str, refunded: &'static str| {
        let spec = config
            .rate_limit
            .limits()
            .into_iter()
            .find(|(key, _)| *key == name)
            .and_then(|(_, spec)| spec);
        let key = if name == "registrations_global" {
            "*".to_owned()
        } else {
            client_key.clone()
        };
        AppliedLimit {
            name,
            spec,
            key,
            refunded,
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
        dnsbl: Vec::new(),
    };
    let refused = |refusal: crate::gate::Refusal| Explained::Refused {
        rule: refusal.rule,
        status: refusal.error.status.as_u16(),
        errcode: refusal.error.errcode,
        error: refusal.error.error,
        list: refusal.list.as_deref().map(str::to_owned),
    };
    // The gate's order: bans, then every attempt is counted, then the
    // policy on the query, the guest limit, the body, and the reservation
    // of a completed registration.
    if let Err(refusal) = policy.client(question.ip, question.user_agent.as_deref()) {
        explanation.decision = refused(refusal);
        return explanation;
    }
    explanation.dnsbl = config
        .reputation
        .dnsbl
        .iter()
        .map(|zone| match question.ip {
            Some(ip) => crate::dnsbl::query_name(ip, &zone.0),
            None => zone.0.clone(),
        })
        .collect();
    if let Some(email) = &question.email {
        // The gate's order for a token request: the attempt is counted,
        // then the body is judged; nothing is reserved.
        explanation
            .limits
            .push(limit("token_requests_per_ip", "never"));
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
            Ok(forward) => Explained::Allowed {
                target: format!("POST {}", forward.path_and_query),
                body: forward
                    .body
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default(),
            },
            Err(refusal) => refused(refusal),
        };
        return explanation;
    }
    explanation.limits.push(limit("attempts_per_ip", "never"));
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
                explanation.limits.push(limit("guests_per_ip", "never"));
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
    let unless_success = "when the homeserver answers with anything but a 2xx";
    explanation
        .limits
        .push(limit("registrations_per_ip", unless_success));
    explanation
        .limits
        .push(limit("registrations_global", unless_success));
    explanation.username = forward.username;
    explanation.decision = Explained::Allowed {
        target: format!("POST {}", forward.path_and_query),
        body: forward
            .body
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default(),
    };
    explanation
}

impl Explanation {
    /// Whether the policy lets the request through.
    pub fn allowed(&self) -> bool {
        matches!(self.decision, Explained::Allowed { .. })
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.decision {
            Explained::Allowed { .. } => writeln!(f, "decision: allowed")?,
            Explained::Refused { rule, list, .. } => {
                writeln!(f, "decision: refused")?;
                writeln!(f, "rule: {rule}")?;
                if let Some(list) = list {
                    writeln!(f, "list: {list}")?;
                }
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
        }
        if self.shadow {
            writeln!(
                f,
                "mode: shadow (a refused request is forwarded as sent, and only logged)"
            )?;
        }
        if let Some(lockdown) = &self.lockdown {
            writeln!(
                f,
                "lockdown: configured: {} registrations within {} close registration for {} \
                 (whether it is closed now is state of the running gate: \
                 gatekeeper_registration_lockdown)",
                lockdown.count, lockdown.period, lockdown.close_for
            )?;
        }
        if !self.dnsbl.is_empty() {
            writeln!(
                f,
                "dnsbl: would ask {} (a listing refuses with rule dnsbl; \
                 no lookup is made here)",
                self.dnsbl.join(", ")
            )?;
        }
        if self.limits.is_empty() {
            return writeln!(f, "limits: none (refused before any limit counts)");
        }
        writeln!(
            f,
            "limits (counted in this order; their current state is in the running gate):"
        )?;
        for limit in &self.limits {
            match &limit.spec {
                Some(spec) => writeln!(
                    f,
                    "  {}: {} per {}, key {}, refunded {}",
                    limit.name, spec.count, spec.period, limit.key, limit.refunded
                )?,
                None => writeln!(f, "  {}: not set", limit.name)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(toml: &str, q: Question) -> Explanation {
        explain(&Config::from_toml(toml).unwrap(), &q)
    }

    #[test]
    fn a_configured_lockdown_is_mentioned() {
        let text = ask(
            "[registration]\nlockdown = { count = 50, period = \"10m\", close_for = \"1h\" }\n",
            Question::default(),
        )
        .to_string();
        assert!(
            text.contains(
                "lockdown: configured: 50 registrations within 10m close registration for 1h"
            ),
            "{text}"
        );
        assert!(!ask("", Question::default())
            .to_string()
            .contains("lockdown"));
    }

    #[test]
    fn configured_dnsbl_zones_are_named_with_the_query_names() {
        let toml = "[reputation]\ndnsbl = [\"a.test\", \"b.test\"]\n";
        let q = Question {
            ip: Some("::ffff:192.0.2.7".parse().unwrap()),
            ..Default::default()
        };
        let text = ask(toml, q).to_string();
        assert!(
            text.contains("dnsbl: would ask 7.2.0.192.a.test, 7.2.0.192.b.test"),
            "{text}"
        );
        let text = ask(toml, Question::default()).to_string();
        assert!(text.contains("dnsbl: would ask a.test, b.test"), "{text}");
        assert!(!ask("", Question::default()).to_string().contains("dnsbl"));
    }

    #[test]
    fn explains_refusals_by_rule() {
        let q = |name: &str| Question {
            username: Some(name.to_owned()),
            ..Default::default()
        };
        match ask("", q("adm1n")).decision {
            Explained::Refused {
                rule,
                errcode,
                status,
                ..
            } => {
                assert_eq!((rule, errcode, status), ("lookalike", "M_USER_IN_USE", 400))
            }
            other => panic!("{other:?}"),
        }
        let kevin = ask("", q("Kevin"));
        match &kevin.decision {
            Explained::Allowed { target, .. } => {
                assert_eq!(target, "POST /_matrix/client/v3/register");
            }
            other => panic!("{other:?}"),
        }
        let name = kevin.username.clone().unwrap();
        assert_eq!(
            (name.sent.as_str(), name.mapped.as_deref()),
            ("Kevin", Some("kevin"))
        );
        let text = kevin.to_string();
        assert!(
            text.contains("username: kevin (sent as \"Kevin\")"),
            "{text}"
        );
        let guest = Question {
            guest: true,
            ..Default::default()
        };
        assert!(matches!(
            ask("", guest.clone()).decision,
            Explained::Refused {
                rule: "guest_denied",
                ..
            }
        ));
        assert!(ask("[guest]\naccess = \"allow\"\n", guest).allowed());
        let banned = Question {
            ip: Some("192.0.2.7".parse().unwrap()),
            ..q("alice")
        };
        let text = ask(
            "[client_ip]\ndeny = [\"192.0.2.0/24\"]\n[registration]\nmode = \"shadow\"\n",
            banned,
        )
        .to_string();
        assert!(text.contains("rule: denied_client"), "{text}");
        assert!(text.contains("mode: shadow"), "{text}");
    }

    #[test]
    fn names_the_mapped_name_of_a_refusal_and_the_limits_in_gate_order() {
        let limits = "[rate_limit]\nattempts_per_ip = { count = 30, period = \"1h\" }\n\
                      registrations_per_ip = { count = 3, period = \"1h\" }\n\
                      guests_per_ip = { count = 5, period = \"1h\" }\n";
        let question = |name: &str, ip: &str| Question {
            username: Some(name.to_owned()),
            ip: Some(ip.parse().unwrap()),
            ..Default::default()
        };
        let refused = ask(limits, question("Admin", "2001:db8:1:2:3:4:5:6"));
        let name = refused.username.clone().unwrap();
        assert_eq!(
            (name.sent.as_str(), name.mapped.as_deref()),
            ("Admin", Some("admin"))
        );
        let names: Vec<_> = refused.limits.iter().map(|l| l.name).collect();
        assert_eq!(
            names,
            ["attempts_per_ip"],
            "a refused name is only an attempt"
        );
        assert_eq!(refused.limits[0].key, "2001:db8:1:2::/64");
        let allowed = ask(limits, question("alice", "192.0.2.7"));
        let shown: Vec<_> = allowed
            .limits
            .iter()
            .map(|l| (l.name, l.spec.map(|s| s.count), l.key.as_str()))
            .collect();
        assert_eq!(
            shown,
            [
                ("attempts_per_ip", Some(30), "192.0.2.7"),
                ("registrations_per_ip", Some(3), "192.0.2.7"),
                ("registrations_global", None, "*"),
            ]
        );
        let text = allowed.to_string();
        assert!(
            text.contains("  registrations_per_ip: 3 per 1h, key 192.0.2.7, refunded when"),
            "{text}"
        );
        assert!(text.contains("  registrations_global: not set"), "{text}");
        let guest = Question {
            guest: true,
            ..Default::default()
        };
        let guest = ask(&format!("[guest]\naccess = \"allow\"\n{limits}"), guest);
        let names: Vec<_> = guest.limits.iter().map(|l| l.name).collect();
        assert_eq!(
            names,
            [
                "attempts_per_ip",
                "guests_per_ip",
                "registrations_per_ip",
                "registrations_global"
            ]
        );
        let banned = ask(
            "[client_ip]\ndeny = [\"192.0.2.0/24\"]\n",
            question("alice", "192.0.2.7"),
        );
        assert!(banned.limits.is_empty());
        assert!(banned.to_string().contains("limits: none"), "{banned}");
    }

    #[test]
    fn names_the_deny_list_that_refuses_an_address() {
        let path = std::env::temp_dir().join(format!("mgk-explain-{}.txt", std::process::id()));
        std::fs::write(&path, "# exits\n198.51.100.0/24\n").unwrap();
        let toml = format!(
            "[client_ip]\ndeny_lists = [{:?}]\n",
            path.display().to_string()
        );
        let question = |ip: &str| Question {
            username: Some("alice".to_owned()),
            ip: Some(ip.parse().unwrap()),
            ..Default::default()
        };
        let listed = ask(&toml, question("198.51.100.20"));
        let unlisted = ask(&toml, question("198.51.101.20"));
        let _ = std::fs::remove_file(&path);
        match &listed.decision {
            Explained::Refused {
                rule,
                errcode,
                list,
                ..
            } => {
                assert_eq!((*rule, *errcode), ("deny_list", "M_FORBIDDEN"));
                assert_eq!(list.as_deref(), Some(path.display().to_string().as_str()));
            }
            other => panic!("{other:?}"),
        }
        let text = listed.to_string();
        assert!(text.contains("rule: deny_list\n"), "{text}");
        assert!(
            text.contains(&format!("list: {}\n", path.display())),
            "{text}"
        );
        assert!(unlisted.allowed(), "{unlisted}");
    }

    #[test]
    fn explains_an_email_token_request_and_names_the_domain_list() {
        let path =
            std::env::temp_dir().join(format!("mgk-explain-email-{}.txt", std::process::id()));
        std::fs::write(&path, "mailinator.com\n").unwrap();
        let toml = format!(
            "[email]\ndenied_domain_lists = [{:?}]\n\
             [rate_limit]\ntoken_requests_per_ip = {{ count = 5, period = \"1h\" }}\n",
            path.display().to_string()
        );
        let question = |email: &str| Question {
            email: Some(email.to_owned()),
            ip: Some("192.0.2.7".parse().unwrap()),
            ..Default::default()
        };
        let listed = ask(&toml, question("bot@x.mailinator.com"));
        let free = ask(&toml, question("alice@notmailinator.com"));
        let _ = std::fs::remove_file(&path);
        match &listed.decision {
            Explained::Refused {
                rule,
                errcode,
                list,
                ..
            } => {
                assert_eq!(
                    (*rule, *errcode),
                    ("email_domain_list", "M_THREEPID_DENIED")
                );
                assert_eq!(list.as_deref(), Some(path.display().to_string().as_str()));
            }
            other => panic!("{other:?}"),
        }
        let names: Vec<_> = listed.limits.iter().map(|l| l.name).collect();
        assert_eq!(names, ["token_requests_per_ip"]);
        match &free.decision {
            Explained::Allowed { target, body } => {
                assert_eq!(
                    target,
                    "POST /_matrix/client/v3/register/email/requestToken"
                );
                assert!(body.contains("alice@notmailinator.com"), "{body}");
            }
            other => panic!("{other:?}"),
        }
        let text = free.to_string();
        assert!(
            text.contains("  token_requests_per_ip: 5 per 1h, key 192.0.2.7"),
            "{text}"
        );
    }
}
