//! Webhook notifications of operational events: a lockdown starting or
//! ending, the Redis store failing or recovering, a configuration reload
//! refused, a list fetched from a URL gone stale.
//!
//! Each event is one `POST` of a JSON object
//! `{"event": …, "timestamp": RFC 3339, …figures}` to `[notify]
//! webhook_url`, signed with HMAC-SHA256 in `X-Matrix-Gatekeeper-Signature:
//! sha256=<hex>` over the exact body when a secret is set.
//!
//! Delivery never touches a request: [`Notifier::send`] only puts the event
//! on a bounded queue (an event that finds it full is dropped and logged),
//! and one background task delivers the queue in order, each attempt within
//! [`ATTEMPT_TIMEOUT`], retried with growing pauses up to [`ATTEMPTS`]
//! times. A receiver that is down costs a log line per event.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Request, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

use crate::config::{ConfigError, NotifyConfig};

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-matrix-gatekeeper-signature";

/// Events waiting for delivery; past this, new ones are dropped.
pub const QUEUE_CAPACITY: usize = 64;

/// Attempts per event.
pub const ATTEMPTS: u32 = 4;

/// Longest wait for one attempt (connecting and the answer's head).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause after the first failed attempt; doubled after each further one.
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(500);

/// An operational event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Registration closed: `count` registrations completed within
    /// `period`; it reopens at `until`.
    LockdownStarted {
        /// The configured count that was reached.
        count: u32,
        /// The configured window, as written in the configuration.
        period: String,
        /// The configured closing time, as written.
        close_for: String,
        /// When registration reopens.
        until: SystemTime,
    },
    /// Registration reopened by itself.
    LockdownEnded,
    /// Registration closed by hand (admin API) until `until`.
    ManualLockdownStarted {
        /// When registration reopens, unless reopened by hand before.
        until: SystemTime,
    },
    /// Registration reopened by hand (admin API).
    ManualLockdownEnded,
    /// The Redis store failed; decisions fall back per `on_store_error`.
    StoreDown {
        /// What failed.
        error: String,
    },
    /// The Redis store answers again.
    StoreUp,
    /// A configuration reload was refused; the previous configuration stays.
    ReloadFailed {
        /// Why.
        error: String,
    },
    /// A list fetched from a URL has not been fetched successfully for
    /// longer than `[reputation] list_max_age`.
    ListStale {
        /// The configuration key naming it (`client_ip.deny_lists`).
        key: String,
        /// The URL, as shown (no secret).
        list: String,
        /// Seconds since the last successful fetch.
        age_seconds: u64,
        /// `"kept"` (still used) or `"dropped"` (`on_stale_list = "drop"`).
        action: String,
    },
}

impl Event {
    /// The `event` field.
    pub fn name(&self) -> &'static str {
        match self {
            Event::LockdownStarted { .. } => "lockdown_started",
            Event::LockdownEnded => "lockdown_ended",
            Event::ManualLockdownStarted { .. } => "manual_lockdown_started",
            Event::ManualLockdownEnded => "manual_lockdown_ended",
            Event::StoreDown { .. } => "store_down",
            Event::StoreUp => "store_up",
            Event::ReloadFailed { .. } => "reload_failed",
            Event::ListStale { .. } => "list_stale",
        }
    }

    /// The JSON body sent for this event at `now`.
    pub fn to_json(&self, now: SystemTime) -> String {
        let mut body = serde_json::Map::new();
        body.insert("event".into(), self.name().into());
        body.insert("timestamp".into(), rfc3339(now).into());
        match self {
            Event::LockdownStarted {
                count,
                period,
                close_for,
                until,
            } => {
                body.insert("count".into(), (*count).into());
                body.insert("period".into(), period.as_str().into());
                body.insert("close_for".into(), close_for.as_str().into());
                body.insert("until".into(), rfc3339(*until).into());
            }
            Event::StoreDown { error } | Event::ReloadFailed { error } => {
                body.insert("error".into(), error.as_str().into());
            }
            Event::ManualLockdownStarted { until } => {
                body.insert("until".into(), rfc3339(*until).into());
            }
            Event::ListStale {
                key,
                list,
                age_seconds,
                action,
            } => {
                body.insert("key".into(), key.as_str().into());
                body.insert("list".into(), list.as_str().into());
                body.insert("age_seconds".into(), (*age_seconds).into());
                body.insert("action".into(), action.as_str().into());
            }
            Event::LockdownEnded | Event::ManualLockdownEnded | Event::StoreUp => {}
        }
        serde_json::Value::Object(body).to_string()
    }
}

/// Why the notifier could not start.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The configuration is unusable (the secret file, the URL).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No Tokio runtime to run the delivery task on.
    #[error("no async runtime to deliver notifications on")]
    NoRuntime,
}

/// Sends events to the webhook; cheap to clone. A disabled notifier (no
/// `webhook_url`) drops every event without a word.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    queue: Option<mpsc::Sender<Event>>,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Self {
        Notifier::default()
    }

    /// Starts the delivery task for `config` (disabled without a
    /// `webhook_url`). Must be called inside a Tokio runtime.
    pub fn start(config: &NotifyConfig) -> Result<Self, NotifyError> {
        let Some(uri) = config.uri().cloned() else {
            return Ok(Notifier::disabled());
        };
        let secret = config.key().map(<[u8]>::to_vec);
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| NotifyError::NoRuntime)?;
        let (queue, events) = mpsc::channel(QUEUE_CAPACITY);
        runtime.spawn(deliver(events, uri, secret));
        Ok(Notifier { queue: Some(queue) })
    }

    /// Whether events go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.queue.is_some()
    }

    /// Queues `event` for delivery; never waits. A full queue drops it.
    pub fn send(&self, event: Event) {
        let Some(queue) = &self.queue else { return };
        if let Err(error) = queue.try_send(event) {
            let name = match &error {
                mpsc::error::TrySendError::Full(event)
                | mpsc::error::TrySendError::Closed(event) => event.name(),
            };
            tracing::warn!(event = name, "webhook queue full; notification dropped");
        }
    }
}

/// The delivery task: one event at a time, in order.
async fn deliver(mut events: mpsc::Receiver<Event>, uri: Uri, secret: Option<Vec<u8>>) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    while let Some(event) = events.recv().await {
        let body = Bytes::from(event.to_json(SystemTime::now()));
        let signature = secret.as_deref().map(|key| signature(key, &body));
        let mut pause = FIRST_RETRY_PAUSE;
        let mut last_error = String::new();
        let mut delivered = false;
        for attempt in 1..=ATTEMPTS {
            let mut request = Request::post(uri.clone())
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::USER_AGENT, "matrix-gatekeeper");
            if let Some(signature) = &signature {
                request = request.header(SIGNATURE_HEADER, signature.as_str());
            }
            let request = match request.body(Full::new(body.clone())) {
                Ok(request) => request,
                Err(error) => {
                    last_error = error.to_string();
                    break;
                }
            };
            match tokio::time::timeout(ATTEMPT_TIMEOUT, client.request(request)).await {
                Ok(Ok(response)) if response.status().is_success() => {
                    delivered = true;
                    break;
                }
                Ok(Ok(response)) => last_error = format!("answered {}", response.status()),
                Ok(Err(error)) => last_error = crate::error::ErrorChain(&error).to_string(),
                Err(_) => last_error = format!("no answer within {ATTEMPT_TIMEOUT:?}"),
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
        if !delivered {
            tracing::warn!(
                event = event.name(),
                error = %last_error,
                attempts = ATTEMPTS,
                "webhook notification not delivered"
            );
        }
    }
}

/// `sha256=<hex>` of HMAC-SHA256 over `body` with `key`.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&key, body);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for &byte in tag.as_ref() {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `at` in RFC 3339, UTC, whole seconds (`2026-01-02T03:04:05Z`).
pub fn rfc3339(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rest = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's
/// days-to-civil arithmetic, eras of 400 years).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661);
        assert_eq!(rfc3339(leap), "2000-02-29T01:01:01Z");
        let later = UNIX_EPOCH + Duration::from_secs(1_798_761_599);
        assert_eq!(rfc3339(later), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn signature_matches_the_rfc_4231_vector() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn events_carry_their_figures() {
        let until = UNIX_EPOCH + Duration::from_secs(600);
        let body = Event::LockdownStarted {
            count: 3,
            period: "1h".into(),
            close_for: "10m".into(),
            until,
        }
        .to_json(UNIX_EPOCH);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["event"], "lockdown_started");
        assert_eq!(json["timestamp"], "1970-01-01T00:00:00Z");
        assert_eq!(json["count"], 3);
        assert_eq!(json["period"], "1h");
        assert_eq!(json["until"], "1970-01-01T00:10:00Z");
        let body = Event::ReloadFailed {
            error: "x: bad".into(),
        }
        .to_json(UNIX_EPOCH);
        assert!(body.contains(r#""error":"x: bad""#), "{body}");
        let body = Event::ListStale {
            key: "client_ip.deny_lists".into(),
            list: "https://lists.example.org/tor.txt?key=***".into(),
            age_seconds: 90_000,
            action: "kept".into(),
        }
        .to_json(UNIX_EPOCH);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["event"], "list_stale");
        assert_eq!(json["key"], "client_ip.deny_lists");
        assert_eq!(json["list"], "https://lists.example.org/tor.txt?key=***");
        assert_eq!(json["age_seconds"], 90_000);
        assert_eq!(json["action"], "kept");
    }
}
