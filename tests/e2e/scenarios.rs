//! Scenarios that run against any homeserver: the gate in front of it, a
//! client's requests through the gate, and the homeserver's own answer to
//! whether an account exists afterwards.
//!
//! A scenario takes a [`Homeserver`]: the homeserver's base URL (bypassing
//! the gate), which one it is (where their answers differ, a scenario
//! branches on [`Flavour`] and says why), and the direct questions a
//! scenario asks it: does an account exist, can it log in, how many guests
//! were made. Dendrite runs them in `dendrite_scenarios.rs`; Conduit, when
//! a binary is named, in `conduit.rs`.

pub mod clients;
pub mod guests;
pub mod names;
pub mod routes;
pub mod uia;

use std::future::Future;
use std::path::PathBuf;

use serde_json::json;

use crate::common::{get, post_json, Answer, Gate};
use crate::{gate_for_upstream, query_escape, PASSWORD, REGISTER};

/// Which homeserver runs, where their behaviour differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// Dendrite v0.13.8 (`dendrite.rs`).
    Dendrite,
    /// Conduit 0.10.x (`conduit.rs`).
    Conduit,
}

/// A running homeserver, as the scenarios see it.
pub struct Homeserver {
    pub flavour: Flavour,
    url: String,
    /// Conduit's sqlite database: it makes guests with random names, so
    /// they are counted there.
    database: Option<PathBuf>,
}

impl Homeserver {
    /// Dendrite at `url`.
    pub fn dendrite(url: String) -> Homeserver {
        Homeserver {
            flavour: Flavour::Dendrite,
            url,
            database: None,
        }
    }

    /// Conduit at `url`, its sqlite database at `database`.
    pub fn conduit(url: String, database: PathBuf) -> Homeserver {
        Homeserver {
            flavour: Flavour::Conduit,
            url,
            database: Some(database),
        }
    }

    /// Its name, for messages.
    pub fn name(&self) -> &'static str {
        match self.flavour {
            Flavour::Dendrite => "dendrite",
            Flavour::Conduit => "conduit",
        }
    }

    /// Its own base URL (bypassing the gate).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The gate in front of it, with extra gate TOML.
    pub async fn gate(&self, extra: &str) -> Gate {
        gate_for_upstream(&self.url, extra).await
    }

    /// Its own answer to `/register/available` for `localpart`.
    pub async fn availability(&self, localpart: &str) -> Answer {
        get(&format!(
            "{}/_matrix/client/v3/register/available?username={}",
            self.url,
            query_escape(localpart)
        ))
        .await
    }

    /// A password login on it, directly.
    pub async fn login(&self, localpart: &str, password: &str) -> Answer {
        let body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart},
            "password": password,
        });
        post_json(
            &format!("{}/_matrix/client/v3/login", self.url),
            &body.to_string(),
        )
        .await
    }

    /// Whether `localpart` logs in with [`PASSWORD`].
    ///
    /// `403` is "no such account or a wrong password" on both homeservers.
    /// Conduit answers `400 M_INVALID_USERNAME` to a name it cannot parse as
    /// a user ID (`al ice`, `é`): it cannot hold an account by that name.
    /// Conduit answers a password-less account (a guest, or a deactivated
    /// user) `403 M_USER_DEACTIVATED`: the account exists, but that is not
    /// a login.
    pub async fn can_log_in(&self, localpart: &str) -> bool {
        let answer = self.login(localpart, PASSWORD).await;
        match (answer.status.as_u16(), answer.errcode().as_str()) {
            (200, _) => true,
            (403, _) => false,
            (400, "M_INVALID_USERNAME") if self.flavour == Flavour::Conduit => false,
            other => panic!(
                "{}: unexpected login answer for {localpart:?}: {other:?} {:?}",
                self.name(),
                answer.body
            ),
        }
    }

    /// Whether an account with this localpart exists: the homeserver's own
    /// `/register/available` (`200` free, `400 M_USER_IN_USE` taken), and
    /// for a name that check cannot judge (out of the grammar, too long, a
    /// leading `_` on Dendrite) a password login with [`PASSWORD`], the
    /// password every scenario registers with.
    pub async fn exists(&self, localpart: &str) -> bool {
        let answer = self.availability(localpart).await;
        match (answer.status.as_u16(), answer.errcode().as_str()) {
            (200, _) => {
                assert_eq!(answer.json()["available"], true, "{:?}", answer.body);
                false
            }
            (400, "M_USER_IN_USE") => true,
            (400, "M_INVALID_USERNAME" | "M_BAD_JSON") => {
                let login = self.login(localpart, PASSWORD).await;
                match (login.status.as_u16(), login.errcode().as_str()) {
                    (200, _) | (403, "M_USER_DEACTIVATED") => true,
                    (403, _) => false,
                    (400, "M_INVALID_USERNAME") if self.flavour == Flavour::Conduit => false,
                    other => panic!(
                        "{}: unexpected login answer for {localpart:?}: {other:?} {:?}",
                        self.name(),
                        login.body
                    ),
                }
            }
            other => panic!(
                "{}: unexpected availability answer for {localpart:?}: {other:?} {:?}",
                self.name(),
                answer.body
            ),
        }
    }

    /// A complete dummy-auth registration sent to the homeserver directly.
    pub async fn register_directly(&self, username: &str) -> Answer {
        register_on(&self.url, REGISTER, username).await
    }

    /// A guest registration sent to the homeserver directly.
    pub async fn guest_directly(&self) -> Answer {
        post_json(&format!("{}{REGISTER}?kind=guest", self.url), "{}").await
    }

    /// Runs `during` and counts the guest accounts the homeserver made
    /// meanwhile.
    ///
    /// Dendrite numbers its guests from one counter (the highest numeric
    /// localpart plus one), so a guest made directly before and after
    /// brackets `during`: their numbers differ by one more than the guests
    /// made in between. Conduit names guests at random; its database is
    /// asked how many password-less accounts it holds: guests, and users
    /// deactivated or registered without a password (Conduit makes such an
    /// account, an access token and all, and calls it a guest in `whoami`),
    /// of which the scenarios make none.
    pub async fn guests_made_during<F: Future>(&self, during: F) -> (F::Output, u64) {
        match self.flavour {
            Flavour::Dendrite => {
                let before = self.direct_guest_number().await;
                let output = during.await;
                let after = self.direct_guest_number().await;
                assert!(after > before, "{after} > {before}");
                (output, after - before - 1)
            }
            Flavour::Conduit => {
                let before = self.passwordless_accounts();
                let output = during.await;
                let after = self.passwordless_accounts();
                assert!(after >= before, "{after} >= {before}");
                (output, after - before)
            }
        }
    }

    /// Registers a guest directly and returns its numeric localpart.
    async fn direct_guest_number(&self) -> u64 {
        let answer = self.guest_directly().await;
        assert_eq!(answer.status, 200, "{}: {:?}", self.name(), answer.body);
        let user_id = answer.json()["user_id"].as_str().unwrap().to_owned();
        crate::localpart_of(&user_id)
            .parse()
            .unwrap_or_else(|_| panic!("{}: guest {user_id} is not numeric", self.name()))
    }

    /// The password-less accounts in Conduit's database (its
    /// `userid_password` table holds an empty value for them).
    fn passwordless_accounts(&self) -> u64 {
        let database = self.database.as_ref().expect("Conduit's database");
        let output = std::process::Command::new("python3")
            .args([
                "-c",
                "import sqlite3, sys\n\
                 db = sqlite3.connect('file:' + sys.argv[1] + '?mode=ro', uri=True)\n\
                 print(db.execute('SELECT count(*) FROM userid_password WHERE length(value) = 0').fetchone()[0])",
            ])
            .arg(database)
            .output()
            .expect("python3 runs");
        assert!(
            output.status.success(),
            "reading {}: {}",
            database.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("a count")
    }
}

/// The gate's decision on a guarded route, from its marker header:
/// `refused` for its own answers, `allowed` for the homeserver's.
pub fn marker(answer: &Answer) -> &str {
    answer.gate_decision().unwrap_or("")
}

/// Asserts an error answer (the homeserver's or the gate's) with this
/// status and errcode.
pub fn assert_answer(answer: &Answer, status: u16, errcode: &str, what: &str) {
    assert_eq!(answer.status.as_u16(), status, "{what}: {:?}", answer.body);
    assert_eq!(answer.errcode(), errcode, "{what}: {:?}", answer.body);
}

/// Asserts the gate refused the request itself with this status and
/// errcode.
pub fn assert_refused_by_gate(answer: &Answer, status: u16, errcode: &str, what: &str) {
    assert_answer(answer, status, errcode, what);
    assert_eq!(marker(answer), "refused", "{what}: {:?}", answer.headers);
}

/// A body registering `username` with [`PASSWORD`] in one dummy step.
pub fn dummy_body(username: &str) -> String {
    json!({
        "username": username,
        "password": PASSWORD,
        "auth": {"type": "m.login.dummy"},
    })
    .to_string()
}

/// A registration of `username` through `base` (a gate or a homeserver)
/// on `path`, in one dummy step.
pub async fn register_on(base: &str, path: &str, username: &str) -> Answer {
    post_json(&format!("{base}{path}"), &dummy_body(username)).await
}
