//! Whether accounts are made somewhere the gate does not stand: a homeserver
//! that delegates authentication to an OAuth 2.0 server (Matrix
//! Authentication Service, "next-generation auth") has its accounts made on
//! that server's own pages, not through the client-server `/register` the
//! gate guards.
//!
//! Such a homeserver publishes its server's metadata (RFC 8414: an
//! `issuer`, its endpoints, an `account_management_uri`…) at
//! `GET /_matrix/client/v1/auth_metadata`, and servers from before that
//! path was specified at the unstable
//! `/_matrix/client/unstable/org.matrix.msc2965/auth_metadata`; one that
//! does not delegate answers `404 M_UNRECOGNIZED`. The probe reads the
//! stable path, and the unstable one only after a `404`: unauthenticated
//! reads without side effects, which the gate passes through.
//!
//! Metadata with an `issuer` is reported as a warning rather than a failure:
//! the gate may well stand where it should, but what it guards is no longer
//! where accounts are made.

use serde::Serialize;

use super::{exchange, BaseUrl, Options, Read, Request};
use crate::probe::wire::Transport;

/// Where a homeserver publishes its OAuth 2.0 server's metadata, in the
/// order asked: the specified path, then the unstable one older servers
/// use.
pub const AUTH_METADATA_PATHS: [&str; 2] = [
    "/_matrix/client/v1/auth_metadata",
    "/_matrix/client/unstable/org.matrix.msc2965/auth_metadata",
];

/// What one base URL said about delegation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DelegationCheck {
    /// The base URL asked.
    pub base_url: String,
    /// The last metadata URL asked (the unstable one after a `404` at the
    /// stable one).
    pub url: String,
    /// Its answer's status, if any.
    pub status: Option<u16>,
    /// What the answer means.
    #[serde(flatten)]
    pub outcome: Delegation,
}

/// What a metadata answer means.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Delegation {
    /// `200` with an `issuer`: registration is delegated to that OAuth 2.0
    /// server, which the gate does not guard.
    Delegated {
        /// The OAuth 2.0 server.
        issuer: String,
        /// Where users manage their account, when published.
        #[serde(skip_serializing_if = "Option::is_none")]
        account_management_uri: Option<String>,
    },
    /// `404` at both paths: registration is the homeserver's own.
    NotDelegated {
        /// The Matrix error code of the `404` (`M_UNRECOGNIZED`), if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        errcode: Option<String>,
    },
    /// Anything else: no answer, or an answer that says neither.
    Unknown {
        /// What was answered, or why nothing was.
        reason: String,
    },
}

impl DelegationCheck {
    /// The report's warning, when registration is delegated.
    pub fn warning(&self) -> Option<String> {
        let Delegation::Delegated {
            issuer,
            account_management_uri,
        } = &self.outcome
        else {
            return None;
        };
        let account = account_management_uri
            .as_deref()
            .map_or_else(String::new, |uri| format!(" (account management at {uri})"));
        Some(format!(
            "WARNING: registration at {} is delegated to the OAuth 2.0 server {issuer} \
             (Matrix Authentication Service or another): accounts are made on its own \
             pages{account}, not through /register, and the gate does not guard them \
             ({} answered 200)",
            self.base_url, self.url
        ))
    }

    /// The report's line for this base URL.
    pub fn line(&self) -> String {
        if let Some(warning) = self.warning() {
            return warning;
        }
        match &self.outcome {
            Delegation::NotDelegated { errcode } => format!(
                "registration at {} is not delegated to an OAuth 2.0 server ({} answered 404{})",
                self.base_url,
                self.url,
                errcode
                    .as_deref()
                    .map_or_else(String::new, |code| format!(" {code}"))
            ),
            Delegation::Unknown { reason } => format!(
                "delegation of registration at {} to an OAuth 2.0 server unknown: {} {reason}",
                self.base_url, self.url
            ),
            Delegation::Delegated { .. } => String::new(),
        }
    }
}

/// Asks `base` for its OAuth 2.0 server's metadata: the stable path, then
/// the unstable one if the stable one is not found.
pub(super) async fn check(
    base: &BaseUrl,
    options: &Options,
    transport: &Result<Transport, String>,
) -> DelegationCheck {
    let [stable, unstable] = AUTH_METADATA_PATHS;
    let first = ask(base, stable, options, transport).await;
    if first.status == Some(404) {
        ask(base, unstable, options, transport).await
    } else {
        first
    }
}

/// One metadata read.
async fn ask(
    base: &BaseUrl,
    path: &str,
    options: &Options,
    transport: &Result<Transport, String>,
) -> DelegationCheck {
    let target = base.target(path);
    let answer = match transport {
        Ok(transport) => {
            let request = Request {
                method: "GET",
                target: &target,
                body: None,
            };
            exchange(base, &request, options, transport, Read::HeadAndBody).await
        }
        Err(error) => Err(error.clone()),
    };
    let (status, outcome) = match answer {
        Ok(answer) => (
            Some(answer.head.status),
            outcome(answer.head.status, &answer.body),
        ),
        Err(reason) => (None, Delegation::Unknown { reason }),
    };
    DelegationCheck {
        base_url: base.text.clone(),
        url: base.url_of(&target),
        status,
        outcome,
    }
}

/// What a metadata answer means.
fn outcome(status: u16, body: &[u8]) -> Delegation {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let text = |key: &str| {
        json.as_ref()
            .and_then(|json| json.get(key))
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    match status {
        200 => match text("issuer") {
            Some(issuer) if !issuer.is_empty() => Delegation::Delegated {
                issuer,
                account_management_uri: text("account_management_uri"),
            },
            _ => Delegation::Unknown {
                reason: "answered 200 without an issuer".to_owned(),
            },
        },
        404 => Delegation::NotDelegated {
            errcode: text("errcode"),
        },
        other => Delegation::Unknown {
            reason: format!("answered {other}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_metadata_with_an_issuer_is_delegation() {
        assert_eq!(
            outcome(
                200,
                br#"{"issuer":"https://auth.example.org/","account_management_uri":"https://auth.example.org/account/"}"#
            ),
            Delegation::Delegated {
                issuer: "https://auth.example.org/".to_owned(),
                account_management_uri: Some("https://auth.example.org/account/".to_owned()),
            }
        );
        for body in [
            &br#"{"ok":true}"#[..],
            br#"{"issuer":""}"#,
            br#"{"issuer":7}"#,
            b"<html>",
        ] {
            assert_eq!(
                outcome(200, body),
                Delegation::Unknown {
                    reason: "answered 200 without an issuer".to_owned()
                },
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(
            outcome(
                404,
                br#"{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}"#
            ),
            Delegation::NotDelegated {
                errcode: Some("M_UNRECOGNIZED".to_owned())
            }
        );
        assert_eq!(
            outcome(404, b"not found"),
            Delegation::NotDelegated { errcode: None }
        );
        assert_eq!(
            outcome(502, b""),
            Delegation::Unknown {
                reason: "answered 502".to_owned()
            }
        );
    }
}
