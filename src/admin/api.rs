//! The admin API (`/v1/…` on the admin listener): what a client has left
//! of its limits and resetting them, temporary bans, and closing or
//! reopening registration by hand.
//!
//! It is on only with `[admin] token_file`; otherwise its paths answer 404
//! like any unknown path. Every request needs `Authorization: Bearer
//! <token>`, compared in constant time. Every change (each `POST` and
//! `DELETE`) and every refused token is one audit line (target
//! `matrix_gatekeeper::audit`, message "admin action"); the token is never
//! logged.
//!
//! Request bodies are read with the gate's strict JSON parser, so a
//! duplicate key is `400 M_BAD_JSON` rather than its last value. A ban
//! wider than IPv4 /8 or IPv6 /16 needs `"force": true`: one request
//! should not refuse a whole address family by a slip.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client_ip::IpNet;
use crate::config::HumanDuration;
use crate::defences::bans::Ban;
use crate::defences::lockdown;
use crate::defences::networks::NetworkVerdict;
use crate::error::{json_response, MatrixError};
use crate::gate::json::parse_object;
use crate::gate::RegistrationGateLayer;
use crate::ratelimit::{Budget, CountedAs, Subject};

/// The path prefix of the API.
pub const PREFIX: &str = "/v1/";

/// Largest request body, in bytes.
const MAX_BODY: usize = 16 * 1024;

/// Time allowed to send a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// A manual lockdown without a duration, when no `lockdown` is configured.
const DEFAULT_LOCKDOWN: Duration = Duration::from_secs(3600);

/// Longest ban or manual lockdown accepted.
const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// The widest bans taken without `"force": true`: IPv4 /8 and IPv6 /16.
/// A wider one is most likely a slip (`0.0.0.0/0` refuses every IPv4
/// client), and closing registration for everyone is `POST /v1/lockdown`.
const BAN_FLOOR_V4: u8 = 8;
const BAN_FLOOR_V6: u8 = 16;

/// The bearer token in force, swapped on reload; `None`: the API is off.
#[derive(Debug, Clone, Default)]
pub struct AdminToken(Arc<ArcSwapOption<Vec<u8>>>);

impl AdminToken {
    /// A holder for `token`.
    pub fn new(token: Option<Vec<u8>>) -> Self {
        AdminToken(Arc::new(ArcSwapOption::from(token.map(Arc::new))))
    }

    /// Replaces the token (a reload).
    pub fn set(&self, token: Option<Vec<u8>>) {
        self.0.store(token.map(Arc::new));
    }

    /// Whether the API is on.
    pub fn is_set(&self) -> bool {
        self.0.load().is_some()
    }

    /// Whether `presented` is the token, in time that does not depend on
    /// where the two differ.
    fn matches(&self, presented: &[u8]) -> bool {
        let current = self.0.load();
        let Some(expected) = current.as_deref() else {
            return false;
        };
        crate::secret::constant_time_eq(expected, presented)
    }
}

/// What the API works on.
#[derive(Debug, Clone)]
pub struct AdminApi {
    /// The gate (limits, bans, lockdown, client keys).
    pub gate: RegistrationGateLayer,
    /// The bearer token.
    pub token: AdminToken,
}

/// The outcome of one admin request: the answer and, for a change or a
/// refused token, what the audit line says.
struct Handled {
    response: Response<Full<Bytes>>,
    action: Option<&'static str>,
    subject: String,
    outcome: &'static str,
}

impl Handled {
    fn read(response: Response<Full<Bytes>>) -> Self {
        Handled {
            response,
            action: None,
            subject: String::new(),
            outcome: "",
        }
    }

    fn change(
        action: &'static str,
        subject: impl Into<String>,
        outcome: &'static str,
        response: Response<Full<Bytes>>,
    ) -> Self {
        Handled {
            response,
            action: Some(action),
            subject: subject.into(),
            outcome,
        }
    }
}

impl AdminApi {
    /// Answers a request under [`PREFIX`]; `None` when the API is off (the
    /// caller answers 404 as for any unknown path).
    pub async fn answer<B>(&self, request: Request<B>) -> Option<Response<Full<Bytes>>>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<crate::gate::BoxError>,
    {
        if !self.token.is_set() {
            return None;
        }
        let path = request.uri().path().to_owned();
        let handled = match bearer(request.headers()) {
            None => Handled::change(
                "authenticate",
                safe_text(&path),
                "missing_token",
                unauthorized("M_MISSING_TOKEN", "An admin token is needed."),
            ),
            Some(token) if !self.token.matches(token) => Handled::change(
                "authenticate",
                safe_text(&path),
                "wrong_token",
                unauthorized("M_UNKNOWN_TOKEN", "The admin token is not valid."),
            ),
            Some(_) => self.route(request).await,
        };
        if let Some(action) = handled.action {
            tracing::info!(
                target: "matrix_gatekeeper::audit",
                action,
                subject = handled.subject.as_str(),
                outcome = handled.outcome,
                status = handled.response.status().as_u16(),
                "admin action"
            );
        }
        Some(handled.response)
    }

    async fn route<B>(&self, request: Request<B>) -> Handled
    where
        B: Body<Data = Bytes>,
        B::Error: Into<crate::gate::BoxError>,
    {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_start_matches(PREFIX).split('/').collect();
        match segments.as_slice() {
            ["clients", address] => match method {
                Method::GET | Method::HEAD => Handled::read(self.inspect(address).await),
                _ => Handled::read(wrong_method("GET")),
            },
            ["clients", address, "limits"] => match method {
                Method::DELETE => self.reset(address).await,
                _ => Handled::read(wrong_method("DELETE")),
            },
            ["bans"] => match method {
                Method::GET | Method::HEAD => Handled::read(self.list_bans()),
                Method::POST => self.add_ban(request.into_body()).await,
                _ => Handled::read(wrong_method("GET, POST")),
            },
            ["bans", cidr] => match method {
                Method::DELETE => self.lift_ban(cidr).await,
                _ => Handled::read(wrong_method("DELETE")),
            },
            ["lockdown"] => match method {
                Method::GET | Method::HEAD => Handled::read(self.lockdown_state()),
                Method::POST => self.close(request.into_body()).await,
                Method::DELETE => self.reopen().await,
                _ => Handled::read(wrong_method("GET, POST, DELETE")),
            },
            _ => Handled::read(MatrixError::not_found().into_response()),
        }
    }

    async fn inspect(&self, address: &str) -> Response<Full<Bytes>> {
        let ip = match parse_address(address) {
            Ok(ip) => ip,
            Err(error) => return error.into_response(),
        };
        let key = self.gate.client_key(ip);
        let limiter = self.gate.limiter();
        let network = self.gate.network(ip);
        let subject = Subject {
            client: key,
            asn: network.as_ref().and_then(|view| view.counted),
        };
        let budgets = match limiter.inspect(subject).await {
            Ok(budgets) => budgets,
            Err(error) => return store_failed(&error.to_string()),
        };
        let limits: serde_json::Map<String, Value> = budgets
            .iter()
            .map(|budget| (budget.limit.name().to_owned(), budget_json(budget)))
            .collect();
        let counted_as = CountedAs::widest(budgets.iter().map(|b| b.counted_as), key);
        let ban = self.gate.bans().find(ip).map(|ban| ban_json(&ban));
        ok(json!({
            "address": ip.to_string(),
            "key": key.to_string(),
            "counted_as": counted_as.to_string(),
            "shared": counted_as.is_shared(),
            "store": if limiter.uses_redis() { "redis" } else { "memory" },
            "limits": limits,
            "temporary_ban": ban,
            "network": network.map(|view| json!({
                "asn": view.network.asn,
                "as_name": view.network.as_name.as_deref(),
                "country": view.network.country.as_ref().map(|c| c.as_str()),
                "trusted": view.verdict == NetworkVerdict::Trusted,
                "refused_by": view.verdict.rule(),
                "list": view.list.as_deref(),
            })),
        }))
    }

    async fn reset(&self, address: &str) -> Handled {
        let subject = safe_text(address);
        let ip = match parse_address(address) {
            Ok(ip) => ip,
            Err(error) => {
                return Handled::change("reset_limits", subject, "invalid", error.into_response())
            }
        };
        let key = self.gate.client_key(ip);
        match self.gate.limiter().reset(key).await {
            Ok(reset) => {
                let counted_as = CountedAs::widest(reset.iter().map(|(_, k)| *k), key);
                let limits: serde_json::Map<String, Value> = reset
                    .iter()
                    .map(|(kind, k)| (kind.name().to_owned(), Value::from(k.to_string())))
                    .collect();
                let mut answer = json!({
                    "address": ip.to_string(),
                    "key": key.to_string(),
                    "reset": true,
                    "counted_as": counted_as.to_string(),
                    "shared": counted_as.is_shared(),
                    "limits": limits,
                });
                if counted_as.is_shared() {
                    answer["note"] = Value::from(format!(
                        "{ip} is counted under the shared key {counted_as} (more clients are \
                         tracked than rate_limit.max_tracked_clients): the reset gave every \
                         client counted under it a full budget again."
                    ));
                }
                Handled::change("reset_limits", counted_as.to_string(), "done", ok(answer))
            }
            Err(error) => Handled::change(
                "reset_limits",
                key.to_string(),
                "store_error",
                store_failed(&error.to_string()),
            ),
        }
    }

    fn list_bans(&self) -> Response<Full<Bytes>> {
        let bans: Vec<Value> = self.gate.bans().list().iter().map(ban_json).collect();
        ok(json!({ "bans": bans }))
    }

    async fn add_ban<B>(&self, body: B) -> Handled
    where
        B: Body<Data = Bytes>,
        B::Error: Into<crate::gate::BoxError>,
    {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct NewBan {
            cidr: String,
            duration: String,
            #[serde(default)]
            reason: String,
            /// Takes a ban wider than the floor.
            #[serde(default)]
            force: bool,
        }
        let new: NewBan = match read_json(body).await {
            Ok(Some(new)) => new,
            Ok(None) => {
                return Handled::change(
                    "ban",
                    "-",
                    "invalid",
                    MatrixError::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", "A body is needed.")
                        .into_response(),
                )
            }
            Err(error) => return Handled::change("ban", "-", "invalid", error.into_response()),
        };
        let subject = safe_text(&new.cidr);
        let network = match parse_network(&new.cidr) {
            Ok(network) => network.canonical(),
            Err(error) => return Handled::change("ban", subject, "invalid", error.into_response()),
        };
        let duration = match parse_duration(&new.duration) {
            Ok(duration) => duration,
            Err(error) => return Handled::change("ban", subject, "invalid", error.into_response()),
        };
        let subject = network.to_string();
        let wide = wider_than_floor(&network);
        if wide && !new.force {
            let error = invalid_param(format!(
                "cidr: {subject} is wider than a ban takes without force (IPv4 /{BAN_FLOOR_V4}, \
                 IPv6 /{BAN_FLOOR_V6}); send \"force\": true to ban it anyway. To close \
                 registration for everyone, use POST /v1/lockdown."
            ));
            return Handled::change("ban", subject, "too_wide", error.into_response());
        }
        match self.gate.bans().add(network, duration, &new.reason).await {
            Ok(()) => Handled::change(
                "ban",
                subject.clone(),
                if wide { "forced" } else { "done" },
                ok(json!({
                    "cidr": subject,
                    "duration": HumanDuration(duration).to_string(),
                    "reason": safe_text(&new.reason),
                })),
            ),
            Err(error) => Handled::change(
                "ban",
                subject,
                "store_error",
                store_failed(&error.to_string()),
            ),
        }
    }

    async fn lift_ban(&self, cidr: &str) -> Handled {
        let Some(decoded) = percent_decode(cidr) else {
            return Handled::change(
                "lift_ban",
                safe_text(cidr),
                "invalid",
                invalid_param("The network is not validly escaped.").into_response(),
            );
        };
        let network = match parse_network(&decoded) {
            Ok(network) => network.canonical(),
            Err(error) => {
                return Handled::change(
                    "lift_ban",
                    safe_text(&decoded),
                    "invalid",
                    error.into_response(),
                )
            }
        };
        let subject = network.to_string();
        match self.gate.bans().remove(network).await {
            Ok(true) => Handled::change(
                "lift_ban",
                subject.clone(),
                "done",
                ok(json!({ "cidr": subject, "lifted": true })),
            ),
            Ok(false) => Handled::change(
                "lift_ban",
                subject,
                "not_found",
                MatrixError::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", "No such ban.")
                    .into_response(),
            ),
            Err(error) => Handled::change(
                "lift_ban",
                subject,
                "store_error",
                store_failed(&error.to_string()),
            ),
        }
    }

    fn lockdown_state(&self) -> Response<Full<Bytes>> {
        let remaining = self.gate.lockdown().closed_for();
        ok(json!({
            "closed": remaining.is_some(),
            "remaining_ms": remaining.map(millis),
        }))
    }

    async fn close<B>(&self, body: B) -> Handled
    where
        B: Body<Data = Bytes>,
        B::Error: Into<crate::gate::BoxError>,
    {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Close {
            duration: Option<String>,
        }
        let lockdown = self.gate.lockdown();
        let close: Option<Close> = match read_json(body).await {
            Ok(close) => close,
            Err(error) => {
                return Handled::change("close_registration", "-", "invalid", error.into_response())
            }
        };
        let duration = match close.and_then(|c| c.duration) {
            Some(text) => match parse_duration(&text) {
                Ok(duration) => duration,
                Err(error) => {
                    return Handled::change(
                        "close_registration",
                        "-",
                        "invalid",
                        error.into_response(),
                    )
                }
            },
            None => lockdown
                .spec()
                .map_or(DEFAULT_LOCKDOWN, |spec| spec.close_for.0),
        };
        let subject = HumanDuration(duration).to_string();
        let (remaining, reach) = lockdown.close_by_hand(duration).await;
        let answer = json!({ "closed": true, "remaining_ms": millis(remaining) });
        let what = "closing (if still in force by then)";
        by_hand("close_registration", subject, answer, &reach, what)
    }

    async fn reopen(&self) -> Handled {
        let reach = self.gate.lockdown().reopen_by_hand().await;
        let answer = json!({ "closed": false });
        by_hand("reopen_registration", "-", answer, &reach, "reopening")
    }
}

/// The answer to a closing or reopening by hand, saying where it took
/// effect (`scope`): `200` when Redis took it or there is no Redis; `202`
/// when Redis did not answer and only this replica applied it, with the
/// error and what happens next.
fn by_hand(
    action: &'static str,
    subject: impl Into<String>,
    mut answer: Value,
    reach: &lockdown::Reach,
    what: &str,
) -> Handled {
    let (status, outcome, scope) = match reach {
        lockdown::Reach::EveryReplica => (StatusCode::OK, "done", "every_replica"),
        lockdown::Reach::ThisReplica => (StatusCode::OK, "done", "this_replica"),
        lockdown::Reach::ThisReplicaUntilRedisAnswers(error) => {
            answer["redis_error"] = Value::from(error.as_str());
            answer["note"] = Value::from(format!(
                "Redis did not answer: the {what} applies to this replica only until Redis \
                 answers again; then it is written to Redis and the other replicas follow."
            ));
            (StatusCode::ACCEPTED, "this_replica_only", "this_replica")
        }
    };
    answer["scope"] = Value::from(scope);
    let response = json_response(status, Bytes::from(answer.to_string()));
    Handled::change(action, subject, outcome, response)
}

/// The token of an `Authorization: Bearer …` header.
fn bearer(headers: &http::HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at(value.iter().position(|b| *b == b' ')?);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| token.trim_ascii())
}

/// Reads a JSON body, at most [`MAX_BODY`] bytes within [`BODY_TIMEOUT`].
/// An empty body is `None`.
async fn read_json<T, B>(body: B) -> Result<Option<T>, MatrixError>
where
    T: serde::de::DeserializeOwned,
    B: Body<Data = Bytes>,
    B::Error: Into<crate::gate::BoxError>,
{
    let collected = tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect())
        .await
        .map_err(|_| MatrixError::request_timeout())?
        .map_err(|error| {
            MatrixError::new(
                StatusCode::BAD_REQUEST,
                "M_BAD_JSON",
                format!("The body could not be read (at most {MAX_BODY} bytes): {error}"),
            )
        })?
        .to_bytes();
    if collected.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    // The gate's own strict parser: a duplicate key is refused, not
    // silently read as its last value.
    let object = parse_object(&collected)?;
    serde_json::from_value(Value::Object(object))
        .map(Some)
        .map_err(|error| {
            MatrixError::new(
                StatusCode::BAD_REQUEST,
                "M_BAD_JSON",
                format!("The body is not as expected: {error}"),
            )
        })
}

fn parse_address(text: &str) -> Result<IpAddr, MatrixError> {
    let decoded =
        percent_decode(text).ok_or_else(|| invalid_param("The address is not validly escaped."))?;
    decoded
        .trim()
        .parse::<IpAddr>()
        .map(|ip| ip.to_canonical())
        .map_err(|_| {
            invalid_param(format!(
                "Expected an IP address such as 203.0.113.7, got \"{}\".",
                safe_text(&decoded)
            ))
        })
}

fn parse_network(text: &str) -> Result<IpNet, MatrixError> {
    text.parse::<IpNet>()
        .map_err(|error| invalid_param(format!("cidr: {}", safe_text(&error.to_string()))))
}

/// Whether `network` is wider than [`BAN_FLOOR_V4`] or [`BAN_FLOOR_V6`].
fn wider_than_floor(network: &IpNet) -> bool {
    match network.key() {
        (true, prefix_len, _) => prefix_len < BAN_FLOOR_V4,
        (false, prefix_len, _) => prefix_len < BAN_FLOOR_V6,
    }
}

fn parse_duration(text: &str) -> Result<Duration, MatrixError> {
    let duration = HumanDuration::parse(text)
        .map_err(|error| invalid_param(format!("duration: {}", safe_text(&error))))?
        .0;
    if duration.is_zero() || duration > MAX_DURATION {
        return Err(invalid_param(
            "duration: must be more than zero and at most 365d",
        ));
    }
    Ok(duration)
}

/// `%XX` escapes decoded; `None` for a bad escape or non-UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    // The gate's decoder keeps a malformed escape as it is: refuse one here.
    let well_formed = text.split('%').skip(1).all(|after| {
        after
            .as_bytes()
            .get(..2)
            .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    String::from_utf8(crate::gate::routes::percent_decode(text.as_bytes())).ok()
}

/// Operator- or client-chosen text made safe for an answer or a log line:
/// control characters escaped, at most 200 characters.
fn safe_text(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(200)
        .flat_map(char::escape_debug)
        .collect();
    if text.chars().nth(200).is_some() {
        out.push('…');
    }
    out
}

fn ban_json(ban: &Ban) -> Value {
    json!({
        "cidr": ban.network.to_string(),
        "remaining_ms": millis(ban.remaining()),
        "reason": ban.reason,
    })
}

fn budget_json(budget: &Budget) -> Value {
    json!({
        "counted_as": budget.counted_as.to_string(),
        "burst": budget.burst,
        "remaining": budget.remaining,
        "next_unit_in_ms": millis(budget.next_unit_in),
        "full_in_ms": millis(budget.full_in),
    })
}

/// Whole milliseconds, rounded up, so a wait is never shown as 0 early.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros().div_ceil(1000)).unwrap_or(u64::MAX)
}

fn ok(value: Value) -> Response<Full<Bytes>> {
    json_response(StatusCode::OK, Bytes::from(value.to_string()))
}

fn invalid_param(error: impl Into<String>) -> MatrixError {
    MatrixError::invalid_param(error)
}

fn unauthorized(errcode: &'static str, error: &str) -> Response<Full<Bytes>> {
    let mut response = MatrixError::new(StatusCode::UNAUTHORIZED, errcode, error).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer"),
    );
    response
}

fn wrong_method(allow: &'static str) -> Response<Full<Bytes>> {
    MatrixError::method_not_allowed(allow).into_response()
}

fn store_failed(error: &str) -> Response<Full<Bytes>> {
    MatrixError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "M_UNKNOWN",
        format!("The shared store did not answer: {error}"),
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_decode_and_bad_ones_are_refused() {
        assert_eq!(
            percent_decode("203.0.113.0%2F24").unwrap(),
            "203.0.113.0/24"
        );
        assert_eq!(percent_decode("2001%3adb8%3A%3A1").unwrap(), "2001:db8::1");
        assert!(percent_decode("%2").is_none());
        assert!(percent_decode("%zz").is_none());
        assert!(percent_decode("%ff").is_none());
    }

    #[test]
    fn bearer_takes_the_scheme_in_any_case() {
        let mut headers = http::HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "bearer abc".parse().unwrap());
        assert_eq!(bearer(&headers), Some(&b"abc"[..]));
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&headers), None);
    }
}
