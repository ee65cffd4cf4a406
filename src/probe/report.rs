//! The probe's findings: who answered each probe, the counts, the verdict
//! (the exit status), the warnings that do not change it (registration
//! delegated to an OAuth 2.0 server), and the report as a table or as JSON.

use std::fmt::{self, Write as _};

use serde::Serialize;

use super::{DelegationCheck, EXIT_CANNOT_RUN, EXIT_GUARDED, EXIT_NOT_GUARDED};

/// Who answered a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AnsweredBy {
    /// The gate: the answer carries its marker.
    Gate,
    /// A Matrix answer without the marker (a JSON body): the homeserver,
    /// reached around the gate.
    Homeserver,
    /// An answer that is neither the gate's nor a Matrix homeserver's: no
    /// marker and no JSON body, such as a front proxy's own `404` page on
    /// a federation port that serves no client API. The request stopped in
    /// front of the homeserver, so it counts as guarded.
    Front,
    /// No answer: no connection, a timeout, or not HTTP.
    Nothing,
}

impl AnsweredBy {
    fn as_str(self) -> &'static str {
        match self {
            AnsweredBy::Gate => "gate",
            AnsweredBy::Homeserver => "homeserver",
            AnsweredBy::Front => "front",
            AnsweredBy::Nothing => "nothing",
        }
    }
}

/// The result of one probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProbeResult {
    /// The canonical path of the route probed.
    pub route: String,
    /// The variant's name.
    pub spelling: String,
    /// `GET` or `POST`.
    pub method: &'static str,
    /// The full URL requested.
    pub url: String,
    /// The base URL it was sent to.
    pub base_url: String,
    /// Who answered.
    pub answered_by: AnsweredBy,
    /// The answer's status, if any.
    pub status: Option<u16>,
    /// The value of the gate's marker header, if present.
    pub marker: Option<String>,
    /// The answer's `Server` header, which tells a homeserver from a proxy.
    pub server: Option<String>,
    /// The answer's `Content-Type`: every homeserver answers these routes
    /// with JSON.
    pub content_type: Option<String>,
    /// Why there was no answer.
    pub error: Option<String>,
    /// The table label (`v3/register (%2F)`).
    #[serde(skip)]
    pub label: String,
}

/// Every probe's result, in the order sent.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The base URLs probed.
    pub urls: Vec<String>,
    /// One result per URL and spelling.
    pub probes: Vec<ProbeResult>,
    /// Per URL, whether the homeserver delegates registration to an
    /// OAuth 2.0 server.
    pub delegation: Vec<DelegationCheck>,
}

/// Counts of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Probes sent.
    pub probes: usize,
    /// Answered by the gate.
    pub gate: usize,
    /// Answered by a homeserver, around the gate.
    pub homeserver: usize,
    /// Refused in front of the homeserver (no marker, not JSON).
    pub front: usize,
    /// Not answered.
    pub nothing: usize,
}

impl Report {
    /// The counts.
    pub fn summary(&self) -> Summary {
        let count = |who| self.probes.iter().filter(|p| p.answered_by == who).count();
        Summary {
            probes: self.probes.len(),
            gate: count(AnsweredBy::Gate),
            homeserver: count(AnsweredBy::Homeserver),
            front: count(AnsweredBy::Front),
            nothing: count(AnsweredBy::Nothing),
        }
    }

    /// The probes answered by something other than the gate.
    pub fn not_guarded(&self) -> impl Iterator<Item = &ProbeResult> {
        self.probes
            .iter()
            .filter(|p| p.answered_by == AnsweredBy::Homeserver)
    }

    /// The base URLs where no probe got an answer.
    pub fn unreachable(&self) -> Vec<&str> {
        self.urls
            .iter()
            .filter(|url| {
                self.probes
                    .iter()
                    .filter(|p| &p.base_url == *url)
                    .all(|p| p.answered_by == AnsweredBy::Nothing)
            })
            .map(String::as_str)
            .collect()
    }

    /// [`EXIT_NOT_GUARDED`] when any probe reached something other than the
    /// gate; else [`EXIT_CANNOT_RUN`] when nothing answered at some URL;
    /// else [`EXIT_NOT_GUARDED`] when some probe got no answer; else
    /// [`EXIT_GUARDED`].
    pub fn exit_status(&self) -> u8 {
        let summary = self.summary();
        if summary.homeserver > 0 {
            EXIT_NOT_GUARDED
        } else if !self.unreachable().is_empty() {
            EXIT_CANNOT_RUN
        } else if summary.nothing > 0 {
            EXIT_NOT_GUARDED
        } else {
            EXIT_GUARDED
        }
    }

    /// Findings that do not change the exit status: each URL whose
    /// homeserver delegates registration to an OAuth 2.0 server.
    pub fn warnings(&self) -> Vec<String> {
        self.delegation
            .iter()
            .filter_map(DelegationCheck::warning)
            .collect()
    }

    /// The report as JSON: the URLs, every probe, the counts, the labels of
    /// the probes that were not guarded, what each URL said about
    /// delegation, the warnings, and the exit status.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Json<'a> {
            urls: &'a [String],
            probes: &'a [ProbeResult],
            summary: Summary,
            not_guarded: Vec<String>,
            unreachable: Vec<&'a str>,
            delegation: &'a [DelegationCheck],
            warnings: Vec<String>,
            exit_status: u8,
        }
        let json = Json {
            urls: &self.urls,
            probes: &self.probes,
            summary: self.summary(),
            not_guarded: self
                .not_guarded()
                .map(|p| format!("{} at {}", p.label, p.base_url))
                .collect(),
            unreachable: self.unreachable(),
            delegation: &self.delegation,
            warnings: self.warnings(),
            exit_status: self.exit_status(),
        };
        // Plain strings and numbers: serializing cannot fail.
        serde_json::to_string_pretty(&json).unwrap_or_else(|_| "{}".to_owned())
    }
}

impl fmt::Display for Report {
    /// The table, the summary line, and what was not guarded.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A URL where nothing answered is one line below, not a row per
        // probe.
        let unreachable = self.unreachable();
        let rows: Vec<[String; 4]> = self
            .probes
            .iter()
            .filter(|p| !unreachable.contains(&p.base_url.as_str()))
            .map(|p| {
                let by = match (&p.answered_by, &p.marker, &p.error) {
                    (AnsweredBy::Gate, Some(marker), _) => format!("gate ({marker})"),
                    (AnsweredBy::Homeserver, _, _) => match &p.server {
                        Some(server) => format!("homeserver (Server: {server})"),
                        None => "homeserver".to_owned(),
                    },
                    (AnsweredBy::Front, _, _) => match &p.content_type {
                        Some(kind) => format!("front (not JSON: {kind})"),
                        None => "front (no body type)".to_owned(),
                    },
                    (AnsweredBy::Nothing, _, Some(error)) => format!("nothing ({error})"),
                    (who, _, _) => who.as_str().to_owned(),
                };
                let status = p.status.map_or_else(|| "-".to_owned(), |s| s.to_string());
                // The URL last: it is the longest cell, and needs no padding.
                [p.label.clone(), by, status, p.url.clone()]
            })
            .collect();
        let header = [
            "SPELLING".to_owned(),
            "ANSWERED BY".to_owned(),
            "STATUS".to_owned(),
            "URL".to_owned(),
        ];
        let mut widths = [0usize; 4];
        for row in std::iter::once(&header).chain(&rows) {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        for row in std::iter::once(&header).chain(&rows) {
            let mut line = String::new();
            for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<width$}  ");
                }
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        let summary = self.summary();
        writeln!(
            f,
            "\n{} probes at {} URL(s): {} answered by the gate, {} refused in front of the homeserver, \
             {} reached a homeserver, {} not answered",
            summary.probes,
            self.urls.len(),
            summary.gate,
            summary.front,
            summary.homeserver,
            summary.nothing
        )?;
        let not_guarded: Vec<&ProbeResult> = self.not_guarded().collect();
        if !not_guarded.is_empty() {
            writeln!(
                f,
                "NOT GUARDED: {} spelling(s) reached something other than the gate:",
                not_guarded.len()
            )?;
            for p in not_guarded {
                writeln!(f, "  {} at {}  ({})", p.label, p.base_url, p.url)?;
            }
        }
        // Where nothing answered, the delegation read failed too: that URL's
        // line below says so once.
        for check in &self.delegation {
            if !unreachable.contains(&check.base_url.as_str()) {
                writeln!(f, "{}", check.line())?;
            }
        }
        for url in unreachable {
            let error = self
                .probes
                .iter()
                .find(|p| p.base_url == url)
                .and_then(|p| p.error.as_deref())
                .unwrap_or("no answer");
            writeln!(
                f,
                "NOTHING ANSWERED at {url} ({error}): the probe could not run there"
            )?;
        }
        Ok(())
    }
}
