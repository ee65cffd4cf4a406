//! What the homeserver says it is, asked once at start, and what that
//! means for `[homeserver] guest_upgrades`.
//!
//! The gate asks `GET /_matrix/federation/v1/version` (every homeserver
//! answers `{"server": {"name", "version"}}` where it serves the federation
//! API), then Synapse's unauthenticated
//! `GET /_synapse/admin/v1/server_version` (served with the client API).
//! A homeserver that answers neither is not named, and the setting is used
//! as written. Nothing here changes a decision: the setting decides; this
//! only tells the operator when it does not fit the homeserver.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::config::GuestAccess;

/// The largest answer read.
const MAX_ANSWER_BYTES: usize = 16 * 1024;

/// A homeserver's name for its software, and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Software {
    /// `Synapse`, `Dendrite`, `Conduit`, `conduwuit`, `Tuwunel`, …
    pub name: String,
    /// As the homeserver writes it.
    pub version: String,
}

impl Software {
    /// Whether this is Synapse, the one homeserver known to upgrade a guest
    /// account to a full one.
    pub fn upgrades_guests(&self) -> bool {
        self.name.eq_ignore_ascii_case("synapse")
    }
}

/// Asks the homeserver at `url` (the gate's `[upstream] url`) what it is,
/// each request bounded by `timeout`. `None` when neither route names it.
pub async fn identify(url: &Uri, timeout: Duration) -> Option<Software> {
    if let Some(answer) = get_json(url, "/_matrix/federation/v1/version", timeout).await {
        if let Some(software) = federation_version(&answer) {
            return Some(software);
        }
    }
    let answer = get_json(url, "/_synapse/admin/v1/server_version", timeout).await?;
    synapse_version(&answer)
}

/// Reads a federation `/version` answer.
pub fn federation_version(answer: &Value) -> Option<Software> {
    let server = answer.get("server")?;
    let name = printable(server.get("name")?.as_str()?)?;
    let version = server
        .get("version")
        .and_then(Value::as_str)
        .and_then(printable)
        .unwrap_or_default();
    Some(Software { name, version })
}

/// Reads Synapse's `server_version` answer.
pub fn synapse_version(answer: &Value) -> Option<Software> {
    let version = printable(answer.get("server_version")?.as_str()?)?;
    Some(Software {
        name: "Synapse".to_owned(),
        version,
    })
}

/// A homeserver-written string fit for a log line: at most 64 characters
/// of printable ASCII, else `None`.
fn printable(text: &str) -> Option<String> {
    let fits = !text.is_empty()
        && text.len() <= 64
        && text.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    fits.then(|| text.to_owned())
}

/// What the operator is told about `guest_upgrades`, given what the
/// homeserver said it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Advice {
    /// The setting lets through what this homeserver turns into accounts.
    Warn(String),
    /// The setting refuses what this homeserver would do safely.
    Hint(String),
}

/// The advice for a homeserver that said it is `software`, or `None` when
/// the setting fits it (or guests are denied, when the setting changes
/// nothing).
pub fn advice(software: &Software, guest_upgrades: bool, guests: GuestAccess) -> Option<Advice> {
    if guests != GuestAccess::Allow {
        return None;
    }
    let name = &software.name;
    match (guest_upgrades, software.upgrades_guests()) {
        (true, false) => Some(Advice::Warn(format!(
            "[homeserver] guest_upgrades = true, but the homeserver says it is {name}, and only \
             Synapse is known to upgrade guests: an all-digit name with any guest_access_token \
             passes the gate, and a homeserver without guest upgrades registers it as a new \
             account; set guest_upgrades = false"
        ))),
        (false, true) => Some(Advice::Hint(format!(
            "the homeserver says it is {name}, which upgrades guests: with guest_upgrades = \
             false (the default) the gate refuses a guest's upgrade to its own numeric name; \
             set [homeserver] guest_upgrades = true to let guests upgrade"
        ))),
        _ => None,
    }
}

/// `GET path` on the homeserver over one plain HTTP/1.1 connection; the
/// answer's JSON when it is a `200` with a JSON body.
async fn get_json(url: &Uri, path: &str, timeout: Duration) -> Option<Value> {
    let host = url.host()?;
    let port = url.port_u16().unwrap_or(80);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let exchange = async {
        let stream = tokio::net::TcpStream::connect((bare, port)).await.ok()?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .ok()?;
        let driver = tokio::spawn(connection);
        let authority = url.authority().map(|a| a.as_str()).unwrap_or(host);
        let request = Request::get(path)
            .header(header::HOST, authority)
            .header(header::ACCEPT, "application/json")
            .body(Empty::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        let answer = if response.status().is_success() {
            let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES);
            let bytes = body.collect().await.ok()?.to_bytes();
            serde_json::from_slice(&bytes).ok()
        } else {
            None
        };
        driver.abort();
        answer
    };
    tokio::time::timeout(timeout, exchange).await.ok()?
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn software(name: &str) -> Software {
        Software {
            name: name.to_owned(),
            version: "1".to_owned(),
        }
    }

    #[test]
    fn answers_are_read_and_only_printable_names_kept() {
        let named = json!({"server": {"name": "Conduit", "version": "0.10.12"}});
        assert_eq!(
            federation_version(&named),
            Some(Software {
                name: "Conduit".into(),
                version: "0.10.12".into()
            })
        );
        let no_version = json!({"server": {"name": "Dendrite"}});
        assert_eq!(federation_version(&no_version).unwrap().version, "");
        for odd in [
            json!({}),
            json!({"server": "Synapse"}),
            json!({"server": {"name": 5}}),
            json!({"server": {"name": ""}}),
            json!({"server": {"name": "Syn\napse"}}),
            json!({"server": {"name": "x".repeat(65)}}),
            json!({"server": {"name": "Synаpse\u{0301}"}}),
        ] {
            assert_eq!(federation_version(&odd), None, "{odd}");
        }
        assert_eq!(
            synapse_version(&json!({"server_version": "1.163.2"})),
            Some(Software {
                name: "Synapse".into(),
                version: "1.163.2".into()
            })
        );
        assert_eq!(synapse_version(&json!({"server_version": null})), None);
    }

    #[test]
    fn advice_names_a_setting_that_does_not_fit_the_homeserver() {
        let allow = GuestAccess::Allow;
        for other in ["Conduit", "conduwuit", "Tuwunel", "Dendrite", "Synapse-ish"] {
            assert!(
                matches!(advice(&software(other), true, allow), Some(Advice::Warn(_))),
                "{other}"
            );
            assert_eq!(advice(&software(other), false, allow), None, "{other}");
        }
        for synapse in ["Synapse", "synapse"] {
            assert_eq!(advice(&software(synapse), true, allow), None);
            assert!(matches!(
                advice(&software(synapse), false, allow),
                Some(Advice::Hint(_))
            ));
        }
        // With guests denied the setting changes nothing.
        for upgrades in [true, false] {
            for name in ["Conduit", "Synapse"] {
                assert_eq!(advice(&software(name), upgrades, GuestAccess::Deny), None);
            }
        }
    }
}
