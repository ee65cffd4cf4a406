//! The requests of the corpus tests: registrations through the gate,
//! first registration steps, and existence lookups on the homeserver, each
//! run with bounded concurrency and a timeout; and the homeserver's account
//! table, read from its sqlite database.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use matrix_gatekeeper::gate::username::map_case;
use matrix_gatekeeper::gate::MARKER_HEADER;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::corpus::{synapse_rule, HttpClient};
use crate::{query_escape, synapse, REGISTER};

/// Requests in flight in each batch (registrations through the gate, each
/// server's first steps, existence lookups); up to three batches run at once.
const CONCURRENCY: usize = 8;
/// Longest wait for one answer; a hang fails the test.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The password of every registration, probe and login.
const PASSWORD: &str = "e2e-homeserver-corpus-1";

// === requests ===

/// One answer: status, JSON body (`Null` if none) and the gate's marker.
#[derive(Debug, Clone)]
pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) json: Value,
    pub(super) marker: Option<String>,
}

impl Reply {
    pub(super) fn field(&self, key: &str) -> &str {
        self.json[key].as_str().unwrap_or("")
    }

    pub(super) fn errcode(&self) -> &str {
        self.field("errcode")
    }

    pub(super) fn label(&self) -> String {
        format!(
            "{} {} {:?}",
            self.status,
            self.errcode(),
            self.field("error")
        )
    }
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(CONCURRENCY)
        .build_http()
}

async fn call(client: &HttpClient, method: Method, url: &str, body: Option<String>) -> Reply {
    let mut request = http::Request::builder().method(method).uri(url);
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let exchange = async {
        let response = client
            .request(request)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let status = response.status().as_u16();
        let marker = response
            .headers()
            .get(MARKER_HEADER)
            .map(|v| v.to_str().unwrap_or("?").to_owned());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, marker, body)
    };
    let (status, marker, body) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("no answer from {url} within {REQUEST_TIMEOUT:?}"));
    Reply {
        status,
        json: serde_json::from_slice(&body).unwrap_or(Value::Null),
        marker,
    }
}

/// `f` over every item, [`CONCURRENCY`] at a time; results in item order.
async fn each<T, R, F, Fut>(items: Vec<T>, f: F) -> Vec<R>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
{
    let f = Arc::new(f);
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    let count = items.len();
    for (index, item) in items.into_iter().enumerate() {
        let (f, permits) = (f.clone(), permits.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            (index, f(item).await)
        });
    }
    let mut results: Vec<Option<R>> = (0..count).map(|_| None).collect();
    while let Some(done) = tasks.join_next().await {
        let (index, result) = done.unwrap();
        results[index] = Some(result);
    }
    results.into_iter().map(Option::unwrap).collect()
}

// === first registration steps ===

/// A server's answer to a first registration step.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Step {
    /// `401` with flows: the name passed; UIA would continue.
    Accepted,
    /// Anything else: status, errcode and which check refused it.
    Refused {
        status: u16,
        errcode: String,
        rule: &'static str,
    },
}

impl Step {
    fn of(reply: &Reply) -> Step {
        if reply.status == 401 && reply.json["flows"].is_array() {
            return Step::Accepted;
        }
        Step::Refused {
            status: reply.status,
            errcode: reply.errcode().to_owned(),
            rule: rule_of(reply.field("error")),
        }
    }

    pub(crate) fn accepted(&self) -> bool {
        *self == Step::Accepted
    }

    /// Status and errcode: what a client acts on.
    pub(crate) fn answer(&self) -> (u16, &str) {
        match self {
            Step::Accepted => (401, ""),
            Step::Refused {
                status, errcode, ..
            } => (*status, errcode),
        }
    }

    pub(crate) fn label(&self) -> String {
        match self {
            Step::Accepted => "401 (accepted)".into(),
            Step::Refused {
                status,
                errcode,
                rule,
            } => format!("{status} {errcode} ({rule})"),
        }
    }
}

/// Which check produced a refusal message: Synapse's, Dendrite's or
/// Conduit's (which puts its errcode before its message).
fn rule_of(message: &str) -> &'static str {
    match synapse_rule(message) {
        "other message" => {}
        rule => return rule,
    }
    if message.starts_with("username can only contain") {
        "characters"
    } else if message.starts_with("username cannot start with a '_'") {
        "leading underscore"
    } else if message.starts_with("username exceeds the maximum length") {
        "too long"
    } else if message == "Invalid username" {
        "over 512 characters"
    } else if message.ends_with("Username is invalid.") {
        "invalid user ID"
    } else if message.ends_with("Desired user ID is already taken.") {
        "taken"
    } else {
        "other message"
    }
}

/// Every username's first step on the server at `base`.
pub(super) async fn first_steps(base: String, usernames: Vec<String>) -> Vec<Step> {
    let client = client();
    let url = Arc::new(format!("{base}{REGISTER}"));
    each(usernames, move |username| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let body = json!({ "username": username, "password": PASSWORD }).to_string();
            Step::of(&call(&client, Method::POST, &url, Some(body)).await)
        }
    })
    .await
}

// === registrations through the gate ===

/// One complete registration through the gate for each name; names that
/// map to the same localpart one after the other, in corpus order.
pub(super) async fn register_all(gate_url: String, names: &[String]) -> Vec<Reply> {
    let mut groups: Vec<Vec<(usize, String)>> = Vec::new();
    let mut group_of: HashMap<String, usize> = HashMap::new();
    for (index, name) in names.iter().enumerate() {
        let group = *group_of.entry(map_case(name)).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[group].push((index, name.clone()));
    }
    let client = client();
    let url = Arc::new(format!("{gate_url}{REGISTER}"));
    let done = each(groups, move |group| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let mut replies = Vec::new();
            for (index, name) in group {
                let body = json!({
                    "username": name,
                    "password": PASSWORD,
                    "auth": { "type": "m.login.dummy" },
                })
                .to_string();
                replies.push((index, call(&client, Method::POST, &url, Some(body)).await));
            }
            replies
        }
    })
    .await;
    let mut replies: Vec<Option<Reply>> = vec![None; names.len()];
    for (index, reply) in done.into_iter().flatten() {
        replies[index] = Some(reply);
    }
    replies.into_iter().map(Option::unwrap).collect()
}

// === existence, asked of the homeserver directly ===

/// Whether the homeserver holds an account under a name, and how that was
/// found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Existence {
    /// `/register/available`: 200 (`false`) or `400 M_USER_IN_USE` (`true`).
    Available(bool),
    /// The availability check could not judge it (its answer); a password
    /// login then answered 200 or `403 M_USER_DEACTIVATED` (`true`: Conduit's
    /// answer for an account without a password) or another 403 (`false`).
    Login(String, bool),
    /// Neither could judge it: both answers.
    Unjudged(String, String),
}

impl Existence {
    pub(super) fn exists(&self) -> bool {
        matches!(self, Existence::Available(true) | Existence::Login(_, true))
    }

    pub(super) fn kind(&self) -> String {
        match self {
            Existence::Available(exists) => format!("available: exists={exists}"),
            Existence::Login(check, exists) => {
                format!("available {check} → login: exists={exists}")
            }
            Existence::Unjudged(check, login) => {
                format!("unjudged: available {check}, login {login}")
            }
        }
    }
}

pub(super) async fn existence(base: String, queries: Vec<String>) -> Vec<Existence> {
    let client = client();
    let base = Arc::new(base);
    each(queries, move |query| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let url = format!(
                "{base}/_matrix/client/v3/register/available?username={}",
                query_escape(&query)
            );
            // A name too long for a URI (http's limit: 65,534 bytes) is
            // asked by login only.
            let check_label = if url.len() < 65_000 {
                let check = call(&client, Method::GET, &url, None).await;
                match (check.status, check.errcode()) {
                    (200, _) if check.json["available"] == true => {
                        return Existence::Available(false)
                    }
                    (400, "M_USER_IN_USE") => return Existence::Available(true),
                    _ => format!("{} {}", check.status, check.errcode()),
                }
            } else {
                "not asked (URI too long)".to_owned()
            };
            let body = json!({
                "type": "m.login.password",
                "identifier": { "type": "m.id.user", "user": query },
                "password": PASSWORD,
            })
            .to_string();
            let login_url = format!("{base}/_matrix/client/v3/login");
            let login = call(&client, Method::POST, &login_url, Some(body)).await;
            match (login.status, login.errcode()) {
                (200, _) | (403, "M_USER_DEACTIVATED") => Existence::Login(check_label, true),
                (403, _) => Existence::Login(check_label, false),
                _ => Existence::Unjudged(check_label, login.label()),
            }
        }
    })
    .await
}

/// Go's `strings.ToLower`, as Dendrite lower-cases: each character's simple
/// lower-case mapping, so U+0130 becomes a plain `i` (Python and the gate
/// give `i` + U+0307) and no final-sigma rule.
pub(crate) fn go_lower(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c == '\u{0130}' {
                return 'i';
            }
            let mut lower = c.to_lowercase();
            match (lower.next(), lower.next()) {
                (Some(one), None) => one,
                _ => c,
            }
        })
        .collect()
}

/// The localparts a homeserver may look up for a name it is asked about:
/// the name lower-cased its way (`lower`) or as given (Dendrite's login
/// tries both), and the localpart of a full `@localpart:server` user ID.
pub(super) fn looked_up(query: &str, lower: fn(&str) -> String) -> Vec<String> {
    let lower = lower(query);
    let mut localparts = vec![lower.clone(), query.to_owned()];
    if let Some((localpart, _)) = lower.strip_prefix('@').and_then(|id| id.split_once(':')) {
        localparts.push(localpart.to_owned());
    }
    localparts.dedup();
    localparts
}

/// The first column of every row `sql` selects from the sqlite database
/// at `database`, read with Python's sqlite3; blobs are read as UTF-8.
pub(crate) fn sqlite_strings(database: &Path, sql: &str) -> Vec<String> {
    let output = std::process::Command::new(synapse::python())
        .args([
            "-c",
            "import json, sqlite3, sys\n\
             db = sqlite3.connect('file:' + sys.argv[1] + '?mode=ro', uri=True)\n\
             rows = db.execute(sys.argv[2])\n\
             print(json.dumps([row[0].decode() if isinstance(row[0], bytes) else row[0] \
             for row in rows]))",
        ])
        .arg(database)
        .arg(sql)
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "reading {}: {}",
        database.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}
