//! `matrix-gatekeeper explain`: the decision the policy takes on one
//! registration, and the rule that made it, for support tickets.
//!
//! It runs the same pure policy the gate runs on `POST
//! /_matrix/client/v3/register`; rate limits, which depend on traffic, are
//! not evaluated.

use std::fmt;
use std::net::IpAddr;

use http::Method;

use crate::config::{Config, GateMode};
use crate::gate::policy::{HeadDecision, Policy};
use crate::gate::routes::{ApiVersion, GuardedRoute};

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
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Explained {
    /// The request would be forwarded like this.
    Allowed {
        /// Method, canonical path and query.
        target: String,
        /// The body the homeserver would receive.
        body: String,
        /// The mapped username, if one was given.
        username: Option<String>,
        /// Whether the gate runs in shadow mode.
        shadow: bool,
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
        /// Whether the gate runs in shadow mode (then it only logs this).
        shadow: bool,
    },
}

/// Runs the policy of `config` on the registration `question` describes.
pub fn explain(config: &Config, question: &Question) -> Explained {
    let policy = Policy::new(config);
    let shadow = config.registration.mode == GateMode::Shadow;
    let refused = |refusal: crate::gate::Refusal| Explained::Refused {
        rule: refusal.rule,
        status: refusal.error.status.as_u16(),
        errcode: refusal.error.errcode,
        error: refusal.error.error,
        shadow,
    };
    if let Err(refusal) = policy.client(question.ip, question.user_agent.as_deref()) {
        return refused(refusal);
    }
    let route = GuardedRoute::Register(ApiVersion::V3);
    let query = question.guest.then_some("kind=guest");
    let forward = match policy.head(&Method::POST, route, query) {
        HeadDecision::Refuse(refusal) => return refused(refusal),
        HeadDecision::Forward(forward) => forward,
        HeadDecision::ReadBody(plan) => {
            let mut body = serde_json::Map::new();
            if let Some(name) = &question.username {
                body.insert("username".into(), serde_json::Value::String(name.clone()));
            }
            let bytes = serde_json::to_vec(&body).unwrap_or_default();
            match policy.body(plan, &bytes) {
                Ok(forward) => forward,
                Err(refusal) => return refused(refusal),
            }
        }
    };
    Explained::Allowed {
        target: format!("POST {}", forward.path_and_query),
        body: forward
            .body
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default(),
        username: forward.username,
        shadow,
    }
}

impl fmt::Display for Explained {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Explained::Allowed {
                target,
                body,
                username,
                shadow,
            } => {
                writeln!(f, "decision: allowed")?;
                if let Some(name) = username {
                    writeln!(f, "username: {name}")?;
                }
                writeln!(f, "forwarded: {target}")?;
                writeln!(f, "body: {body}")?;
                if *shadow {
                    writeln!(f, "mode: shadow")?;
                }
            }
            Explained::Refused {
                rule,
                status,
                errcode,
                error,
                shadow,
            } => {
                writeln!(f, "decision: refused")?;
                writeln!(f, "rule: {rule}")?;
                writeln!(f, "answer: {status} {errcode}: {error}")?;
                if *shadow {
                    writeln!(
                        f,
                        "mode: shadow (the request would be forwarded and only logged)"
                    )?;
                }
            }
        }
        writeln!(f, "note: rate limits are not evaluated")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(toml: &str, q: Question) -> Explained {
        explain(&Config::from_toml(toml).unwrap(), &q)
    }

    #[test]
    fn explains_refusals_by_rule() {
        let q = |name: &str| Question {
            username: Some(name.to_owned()),
            ..Default::default()
        };
        match ask("", q("adm1n")) {
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
        match ask("", q("Kevin")) {
            Explained::Allowed {
                username, target, ..
            } => {
                assert_eq!(username.as_deref(), Some("kevin"));
                assert_eq!(target, "POST /_matrix/client/v3/register");
            }
            other => panic!("{other:?}"),
        }
        let guest = Question {
            guest: true,
            ..Default::default()
        };
        assert!(matches!(
            ask("", guest.clone()),
            Explained::Refused {
                rule: "guest_denied",
                ..
            }
        ));
        assert!(matches!(
            ask("[guest]\naccess = \"allow\"\n", guest),
            Explained::Allowed { .. }
        ));
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
}
