//! Logs and metrics.
//!
//! Metrics are kept in atomics and small maps with static labels, and
//! rendered in the Prometheus text format by the admin listener. Logging
//! goes through `tracing`; one audit line per registration decision is
//! written with the target `matrix_gatekeeper::audit`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::config::{check_log_filter, LogConfig, LogFormat};
use crate::ratelimit::RateLimiter;

/// What happened to a registration request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Forwarded to the homeserver.
    Allowed,
    /// Refused by a rule.
    Refused,
    /// Refused by a rate limit.
    RateLimited,
    /// Shadow mode: would have been refused (or limited); forwarded.
    WouldRefuse,
}

impl Outcome {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Refused => "refused",
            Outcome::RateLimited => "rate_limited",
            Outcome::WouldRefuse => "would_refuse",
        }
    }
}

/// Kinds of upstream failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    /// The homeserver could not be reached (`502`).
    Connect = 0,
    /// The homeserver did not answer in time (`504`).
    Timeout = 1,
}

const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram with fixed buckets (seconds).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

type DecisionKey = (&'static str, &'static str, &'static str);

/// The gate's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    decisions: Mutex<BTreeMap<DecisionKey, u64>>,
    upstream_errors: [AtomicU64; 2],
    /// Homeserver answers by class: 2xx, 3xx, 4xx, 5xx, other.
    upstream_responses: [AtomicU64; 5],
    guarded: Histogram,
    pass_through: Histogram,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    dnsbl_errors: AtomicU64,
    /// Completed application service registrations, by service.
    appservice_registrations: Mutex<BTreeMap<std::sync::Arc<str>, u64>>,
    /// Lists fetched from URLs, by URL as shown: the configured ones only.
    lists: Mutex<BTreeMap<std::sync::Arc<str>, ListMetrics>>,
}

/// The result of one fetch of a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListFetch {
    /// A list was received (changed or not).
    Ok = 0,
    /// `304 Not Modified`.
    NotModified = 1,
    /// Nothing usable: the last good copy stays.
    Error = 2,
}

/// What the metrics show of one fetched list.
#[derive(Debug, Default)]
struct ListMetrics {
    last_success: Option<std::time::SystemTime>,
    stale: bool,
    fetches: [u64; 3],
}

impl Metrics {
    /// Counts one completed registration of the application service
    /// `name` (its file's `id`, or `unverified`).
    pub fn appservice_registration(&self, name: &std::sync::Arc<str>) {
        let mut counts = self
            .appservice_registrations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *counts.entry(name.clone()).or_insert(0) += 1;
    }

    /// Counts one registration decision.
    pub fn decision(&self, route: &'static str, outcome: Outcome, rule: &'static str) {
        let mut decisions = self
            .decisions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *decisions
            .entry((route, outcome.as_str(), rule))
            .or_insert(0) += 1;
    }

    /// Counts one upstream failure.
    pub fn upstream_error(&self, kind: UpstreamError) {
        self.upstream_errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one answer of the homeserver by its status class (the gate's
    /// own answers are not counted here).
    pub fn upstream_response(&self, status: u16) {
        let class = match status {
            200..=299 => 0,
            300..=399 => 1,
            400..=499 => 2,
            500..=599 => 3,
            _ => 4,
        };
        self.upstream_responses[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Records the time to response headers of one request.
    pub fn observe(&self, guarded: bool, elapsed: Duration) {
        if guarded {
            self.guarded.observe(elapsed);
        } else {
            self.pass_through.observe(elapsed);
        }
    }

    /// Counts one configuration reload.
    pub fn reload(&self, ok: bool) {
        if ok {
            self.reloads_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.reloads_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How often `route` ended in `outcome` by `rule` so far.
    #[cfg(test)]
    fn decision_count(&self, route: &str, outcome: Outcome, rule: &str) -> u64 {
        let decisions = self
            .decisions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        decisions
            .iter()
            .filter(|((r, o, l), _)| *r == route && *o == outcome.as_str() && *l == rule)
            .map(|(_, n)| *n)
            .sum()
    }

    /// Keeps the series of the lists named (the configured ones), drops
    /// the others.
    pub fn keep_lists(&self, names: impl Iterator<Item = std::sync::Arc<str>>) {
        let mut lists = self.lists.lock().unwrap_or_else(|p| p.into_inner());
        let names: Vec<_> = names.collect();
        lists.retain(|name, _| names.contains(name));
        for name in names {
            lists.entry(name).or_default();
        }
    }

    /// Counts one fetch of the list `name`.
    pub fn list_fetched(&self, name: &std::sync::Arc<str>, result: ListFetch) {
        let mut lists = self.lists.lock().unwrap_or_else(|p| p.into_inner());
        lists.entry(name.clone()).or_default().fetches[result as usize] += 1;
    }

    /// When the list `name` was last fetched successfully, and whether it
    /// is stale.
    pub fn list_state(
        &self,
        name: &std::sync::Arc<str>,
        last_success: Option<std::time::SystemTime>,
        stale: bool,
    ) {
        let mut lists = self.lists.lock().unwrap_or_else(|p| p.into_inner());
        let list = lists.entry(name.clone()).or_default();
        list.last_success = last_success;
        list.stale = stale;
    }

    /// Counts one DNSBL check that failed (timeout, SERVFAIL, unusable
    /// answer), whatever `on_dnsbl_error` made of it.
    pub fn dnsbl_error(&self) {
        self.dnsbl_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Everything, in the Prometheus text format.
    pub fn render(&self, limiter: &RateLimiter) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP gatekeeper_decisions_total Registration decisions by route, outcome and rule.\n");
        out.push_str("# TYPE gatekeeper_decisions_total counter\n");
        {
            let decisions = self
                .decisions
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for ((route, outcome, rule), n) in decisions.iter() {
                let _ = writeln!(
                    out,
                    "gatekeeper_decisions_total{{route=\"{route}\",outcome=\"{outcome}\",rule=\"{rule}\"}} {n}"
                );
            }
        }
        out.push_str(
            "# HELP gatekeeper_upstream_errors_total Requests the homeserver did not answer.\n",
        );
        out.push_str("# TYPE gatekeeper_upstream_errors_total counter\n");
        for (kind, counter) in ["connect", "timeout"].iter().zip(&self.upstream_errors) {
            let _ = writeln!(
                out,
                "gatekeeper_upstream_errors_total{{kind=\"{kind}\"}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        out.push_str(
            "# HELP gatekeeper_upstream_responses_total Answers of the homeserver by status class.\n",
        );
        out.push_str("# TYPE gatekeeper_upstream_responses_total counter\n");
        for (class, counter) in ["2xx", "3xx", "4xx", "5xx", "other"]
            .iter()
            .zip(&self.upstream_responses)
        {
            let _ = writeln!(
                out,
                "gatekeeper_upstream_responses_total{{class=\"{class}\"}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        let store = limiter.store_stats();
        out.push_str("# HELP gatekeeper_limiter_store_errors_total Rate-limit decisions Redis could not make.\n");
        out.push_str("# TYPE gatekeeper_limiter_store_errors_total counter\n");
        let _ = writeln!(
            out,
            "gatekeeper_limiter_store_errors_total {}",
            store.errors
        );
        out.push_str("# HELP gatekeeper_limiter_fallbacks_total Decisions taken by the on_store_error fallback.\n");
        out.push_str("# TYPE gatekeeper_limiter_fallbacks_total counter\n");
        for (mode, n) in [
            ("local", store.fallback_local),
            ("allow", store.fallback_allow),
            ("deny", store.fallback_deny),
        ] {
            let _ = writeln!(
                out,
                "gatekeeper_limiter_fallbacks_total{{mode=\"{mode}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP gatekeeper_limiter_store_degraded 1 while the Redis store is failing.\n",
        );
        out.push_str("# TYPE gatekeeper_limiter_store_degraded gauge\n");
        let _ = writeln!(
            out,
            "gatekeeper_limiter_store_degraded {}",
            u8::from(limiter.is_degraded())
        );
        out.push_str("# HELP gatekeeper_limiter_pending_refunds Redis refunds waiting for Redis to answer.\n");
        out.push_str("# TYPE gatekeeper_limiter_pending_refunds gauge\n");
        let _ = writeln!(
            out,
            "gatekeeper_limiter_pending_refunds {}",
            limiter.pending_refunds()
        );
        out.push_str(
            "# HELP gatekeeper_limiter_tracked_keys Keys held by the in-memory limiter.\n",
        );
        out.push_str("# TYPE gatekeeper_limiter_tracked_keys gauge\n");
        let _ = writeln!(out, "gatekeeper_limiter_tracked_keys {}", limiter.tracked());
        out.push_str("# HELP gatekeeper_request_duration_seconds Time to response headers.\n");
        out.push_str("# TYPE gatekeeper_request_duration_seconds histogram\n");
        self.guarded.render(
            &mut out,
            "gatekeeper_request_duration_seconds",
            "traffic=\"guarded\"",
        );
        self.pass_through.render(
            &mut out,
            "gatekeeper_request_duration_seconds",
            "traffic=\"pass_through\"",
        );
        out.push_str("# HELP gatekeeper_config_reloads_total Configuration reloads by result.\n");
        out.push_str("# TYPE gatekeeper_config_reloads_total counter\n");
        let _ = writeln!(
            out,
            "gatekeeper_config_reloads_total{{result=\"ok\"}} {}",
            self.reloads_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "gatekeeper_config_reloads_total{{result=\"error\"}} {}",
            self.reloads_failed.load(Ordering::Relaxed)
        );
        out.push_str(
            "# HELP gatekeeper_dnsbl_errors_total DNSBL checks that got no usable answer.\n",
        );
        out.push_str("# TYPE gatekeeper_dnsbl_errors_total counter\n");
        let _ = writeln!(
            out,
            "gatekeeper_dnsbl_errors_total {}",
            self.dnsbl_errors.load(Ordering::Relaxed)
        );
        out.push_str(
            "# HELP gatekeeper_appservice_registrations_total Registrations of application service users the homeserver completed, by service.\n",
        );
        out.push_str("# TYPE gatekeeper_appservice_registrations_total counter\n");
        let counts = self
            .appservice_registrations
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (name, n) in counts.iter() {
            let name = name
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            let _ = writeln!(
                out,
                "gatekeeper_appservice_registrations_total{{appservice=\"{name}\"}} {n}"
            );
        }
        drop(counts);
        self.render_lists(&mut out);
        out
    }

    /// The series of lists fetched from URLs.
    fn render_lists(&self, out: &mut String) {
        let lists = self.lists.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::SystemTime::now();
        let label = |name: &str| {
            name.replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n")
        };
        out.push_str("# HELP gatekeeper_list_age_seconds Seconds since a list fetched from a URL was last fetched successfully.\n");
        out.push_str("# TYPE gatekeeper_list_age_seconds gauge\n");
        for (name, list) in lists.iter() {
            if let Some(at) = list.last_success {
                let age = now.duration_since(at).unwrap_or_default().as_secs();
                let _ = writeln!(
                    out,
                    "gatekeeper_list_age_seconds{{list=\"{}\"}} {age}",
                    label(name)
                );
            }
        }
        out.push_str("# HELP gatekeeper_list_stale 1 while a list fetched from a URL is older than list_max_age.\n");
        out.push_str("# TYPE gatekeeper_list_stale gauge\n");
        for (name, list) in lists.iter() {
            let _ = writeln!(
                out,
                "gatekeeper_list_stale{{list=\"{}\"}} {}",
                label(name),
                u8::from(list.stale)
            );
        }
        out.push_str(
            "# HELP gatekeeper_list_fetches_total Fetches of lists from URLs by result.\n",
        );
        out.push_str("# TYPE gatekeeper_list_fetches_total counter\n");
        for (name, list) in lists.iter() {
            for (result, n) in ["ok", "not_modified", "error"].iter().zip(list.fetches) {
                let _ = writeln!(
                    out,
                    "gatekeeper_list_fetches_total{{list=\"{}\",result=\"{result}\"}} {n}",
                    label(name)
                );
            }
        }
    }
}

/// Appends the registration lockdown's metrics: the gauge
/// `gatekeeper_registration_lockdown` (1 while this replica knows
/// registration is closed) and the counter
/// `gatekeeper_registration_lockdowns_total` (lockdowns this replica
/// started: summed over replicas, every lockdown once).
pub fn render_lockdown(out: &mut String, lockdown: &crate::defences::lockdown::Lockdown) {
    out.push_str(
        "# HELP gatekeeper_registration_lockdown 1 while registration is closed by the lockdown.\n",
    );
    out.push_str("# TYPE gatekeeper_registration_lockdown gauge\n");
    let _ = writeln!(
        out,
        "gatekeeper_registration_lockdown {}",
        u8::from(lockdown.is_known_closed())
    );
    out.push_str(
        "# HELP gatekeeper_registration_lockdowns_total Lockdowns started by this replica.\n",
    );
    out.push_str("# TYPE gatekeeper_registration_lockdowns_total counter\n");
    let _ = writeln!(
        out,
        "gatekeeper_registration_lockdowns_total {}",
        lockdown.lockdowns_started()
    );
}

/// Appends the gauge `gatekeeper_dnsbl_zone_healthy{zone}`: 1 for a DNSBL
/// zone that passed its last test-point check, 0 for one that failed it
/// (its answers are not trusted). A zone not checked yet has no series.
pub fn render_dnsbl_health(out: &mut String, health: &crate::defences::dnsbl::ZoneHealth) {
    out.push_str(
        "# HELP gatekeeper_dnsbl_zone_healthy 1 while a DNSBL zone answers its RFC 5782 test points correctly.\n",
    );
    out.push_str("# TYPE gatekeeper_dnsbl_zone_healthy gauge\n");
    for (zone, healthy) in health.snapshot() {
        let _ = writeln!(
            out,
            "gatekeeper_dnsbl_zone_healthy{{zone=\"{zone}\"}} {}",
            u8::from(healthy)
        );
    }
}

/// The log filter in force: `RUST_LOG` when it is set (and not empty),
/// else `log.level`. An unusable filter is an error naming where it came
/// from, never a silent fallback: a typo must not turn logging off.
pub fn log_filter(config: &LogConfig) -> Result<String, String> {
    match std::env::var("RUST_LOG") {
        Ok(value) if !value.trim().is_empty() => check_log_filter(&value)
            .map(|()| value.clone())
            .map_err(|message| format!("RUST_LOG: {message}: \"{value}\"")),
        Ok(_) | Err(std::env::VarError::NotPresent) => check_log_filter(&config.level)
            .map(|()| config.level.clone())
            .map_err(|message| format!("log.level: {message}: \"{}\"", config.level)),
        Err(std::env::VarError::NotUnicode(_)) => Err("RUST_LOG: not valid UTF-8".to_owned()),
    }
}

/// Starts logging to standard error, with the filter [`log_filter`] picks.
/// Colours only when standard error is a terminal.
pub fn init_logging(config: &LogConfig) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(log_filter(config)?)
        .map_err(|e| format!("log.level: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter);
    match config.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "t=\"a\"");
        assert!(out.contains("x_bucket{t=\"a\",le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{t=\"a\",le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{t=\"a\",le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{t=\"a\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{t=\"a\"} 3\n"), "{out}");
    }

    #[tokio::test]
    async fn decisions_render_with_labels() {
        let m = Metrics::default();
        m.decision("register", Outcome::Refused, "reserved");
        m.decision("register", Outcome::Refused, "reserved");
        m.decision("register", Outcome::Allowed, "");
        m.upstream_error(UpstreamError::Timeout);
        let limiter = RateLimiter::new(&Default::default());
        let out = m.render(&limiter);
        assert!(out.contains(
            "gatekeeper_decisions_total{route=\"register\",outcome=\"refused\",rule=\"reserved\"} 2\n"
        ));
        assert!(out.contains("gatekeeper_upstream_errors_total{kind=\"timeout\"} 1\n"));
        assert_eq!(
            m.decision_count("register", Outcome::Refused, "reserved"),
            2
        );
    }
}
