//! `matrix-gatekeeper probe`: checks from outside, through the public base
//! URLs of a deployment, that every spelling of every registration route is
//! answered by the gate.
//!
//! The gate's guarantee holds only if every registration request reaches it.
//! A front proxy rule that wins over the gate's, or a second listener of the
//! homeserver (the federation port serving the client API too), lets some
//! spellings walk around it. The probe sends one harmless request per route
//! and spelling to every base URL and looks for the gate's marker header
//! ([`MARKER_HEADER`](crate::gate::MARKER_HEADER)), which the gate puts on every answer to a guarded
//! route — its refusals, its 429s and the homeserver answers it forwarded —
//! and which homeservers never send.
//!
//! Harmless means: nothing sent can create an account, send an e-mail or SMS,
//! or consume a registration token, even on a homeserver reached directly.
//! Every request is one the gate refuses whatever its policy (or, for the
//! admin nonce, a read the homeserver answers harmlessly), and one a
//! homeserver answers without side effects: a registration body with a
//! duplicate key and no `auth`, an availability or token check with the
//! parameter given twice, a `requestToken` body without any field, and a
//! `GET` of the shared-secret nonce.
//!
//! The client is a minimal HTTP/1.1 client of its own (`wire`), so that
//! every spelling goes on the wire exactly as written (general-purpose
//! clients normalize dot segments or refuse some escapes), over plain TCP
//! for `http://` and over TLS, verified against the public roots and any
//! `--ca-file`, for `https://`.

mod wire;

use std::fmt::{self, Write as _};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
pub use rustls::pki_types::CertificateDer;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::config::HumanDuration;
use crate::gate::routes::{ApiVersion, GuardedRoute, Medium};
use wire::{AnswerHead, Transport};

/// How long one probe may take (connect, send, answer head) by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Probes in flight at once per run: enough to finish a few hundred probes
/// quickly, few enough not to look like a flood to the front proxy.
const CONCURRENCY: usize = 8;

/// Exit status: every probe was answered by the gate.
pub const EXIT_GUARDED: u8 = 0;
/// Exit status: some probe reached something other than the gate, or got
/// no answer where others did.
pub const EXIT_NOT_GUARDED: u8 = 1;
/// Exit status: the probe could not run (a bad URL, or nothing answered at
/// a URL).
pub const EXIT_CANNOT_RUN: u8 = 2;

/// Every route the gate knows, each probed under every [`Variant`].
///
/// The SSO picker's form (`…/pick_username/account_details`) is not probed:
/// Synapse answers a pick without a session with an HTML page, which the
/// probe cannot tell from a front proxy's; its check, under the same
/// prefix, is.
pub const ROUTES: [GuardedRoute; 16] = [
    GuardedRoute::Register(ApiVersion::R0),
    GuardedRoute::Register(ApiVersion::V3),
    GuardedRoute::Register(ApiVersion::Unstable),
    GuardedRoute::Available(ApiVersion::R0),
    GuardedRoute::Available(ApiVersion::V3),
    GuardedRoute::Available(ApiVersion::Unstable),
    GuardedRoute::RequestToken(ApiVersion::R0, Medium::Email),
    GuardedRoute::RequestToken(ApiVersion::V3, Medium::Email),
    GuardedRoute::RequestToken(ApiVersion::Unstable, Medium::Email),
    GuardedRoute::RequestToken(ApiVersion::R0, Medium::Msisdn),
    GuardedRoute::RequestToken(ApiVersion::V3, Medium::Msisdn),
    GuardedRoute::RequestToken(ApiVersion::Unstable, Medium::Msisdn),
    GuardedRoute::TokenValidity(ApiVersion::V1),
    GuardedRoute::TokenValidity(ApiVersion::Unstable),
    GuardedRoute::AdminRegister,
    GuardedRoute::PickUsernameCheck,
];

/// A registration body with a duplicate key (the gate always refuses it
/// with `400 M_BAD_JSON`) and no `auth` (a homeserver answers a UIA step or
/// an error, never an account). The name is not a valid localpart anywhere,
/// so a homeserver that checks names first refuses it outright.
pub const REGISTER_BODY: &str = r#"{"username":"gatekeeper probe","username":"gatekeeper probe"}"#;

/// A `requestToken` body without any field: the gate refuses it
/// (`M_MISSING_PARAM`), and with no address in it, a homeserver has nowhere
/// to send anything.
pub const REQUEST_TOKEN_BODY: &str = "{}";

/// A bad probe invocation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProbeError {
    /// The URL cannot be probed.
    #[error("{url}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A `--host` value that cannot be a Host header.
    #[error("--host {0:?} is not a host name (with an optional port)")]
    BadHost(String),
    /// A host that cannot name a TLS server.
    #[error("{url}: cannot check a certificate for {reason}")]
    BadServerName {
        /// The `https://` URL.
        url: String,
        /// The host, and why it is no server name.
        reason: String,
    },
    /// A `--ca-file` that cannot be used.
    #[error("--ca-file {path}: {reason}")]
    BadCaFile {
        /// The path as given.
        path: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A zero timeout.
    #[error("--timeout must be more than 0")]
    ZeroTimeout,
    /// A timeout that is not a duration.
    #[error("--timeout: {0}")]
    BadTimeout(String),
}

/// The command's arguments checked: the base URLs and the options, the
/// certificates of `ca_file` read.
pub fn parse_arguments(
    urls: &[String],
    timeout: &str,
    host: Option<String>,
    ca_file: Option<&Path>,
) -> Result<(Vec<BaseUrl>, Options), ProbeError> {
    let timeout = HumanDuration::parse(timeout)
        .map_err(ProbeError::BadTimeout)?
        .0;
    let extra_roots = match ca_file {
        Some(path) => load_ca_file(path)?,
        None => Vec::new(),
    };
    let options = Options {
        timeout,
        host,
        extra_roots,
    };
    options.validate()?;
    let urls = urls
        .iter()
        .map(|url| BaseUrl::parse(url))
        .collect::<Result<Vec<_>, _>>()?;
    for url in &urls {
        if url.scheme == Scheme::Https {
            url.server_name(options.host.as_deref())?;
        }
    }
    Ok((urls, options))
}

/// The certificates of a PEM file, to be trusted besides the public roots
/// (`--ca-file`).
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, ProbeError> {
    wire::load_ca_file(path).map_err(|reason| ProbeError::BadCaFile {
        path: path.display().to_string(),
        reason,
    })
}

/// How a base URL is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP over TCP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    /// `http` or `https`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    /// The port of a URL that names none.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// A public base URL of the deployment: a scheme, a host, a port and an
/// optional path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// The URL as given, without a trailing `/`.
    pub text: String,
    /// `http://` or `https://`.
    pub scheme: Scheme,
    /// The host to connect to (an IPv6 address without brackets).
    host: String,
    /// The port to connect to.
    port: u16,
    /// `host[:port]` as written, the default `Host` header.
    authority: String,
    /// A path prefix put before every probe path (empty, or `/x` without a
    /// trailing `/`).
    prefix: String,
}

impl BaseUrl {
    /// Parses `http[s]://host[:port][/prefix]`.
    pub fn parse(text: &str) -> Result<BaseUrl, ProbeError> {
        let bad = |reason: &str| ProbeError::BadUrl {
            url: text.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = text
            .parse()
            .map_err(|_| bad("not a URL (expected https://host[:port])"))?;
        let scheme = match uri.scheme_str() {
            Some(scheme) if scheme.eq_ignore_ascii_case("http") => Scheme::Http,
            Some(scheme) if scheme.eq_ignore_ascii_case("https") => Scheme::Https,
            Some(_) => return Err(bad("only http:// and https:// URLs can be probed")),
            None => return Err(bad("not a URL (expected https://host[:port])")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| bad("the URL names no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("a user name or password in the URL is not supported"));
        }
        if uri.query().is_some() || text.contains('#') {
            return Err(bad("a base URL has no query or fragment"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(bad("the URL names no host"));
        }
        // `Authority::port_u16` reads an out-of-range or empty port as no
        // port at all, which would quietly probe the default port: check it
        // here.
        let port = match authority.as_str().rsplit_once(':') {
            Some((_, after)) if !after.contains(']') => match after.parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => return Err(bad("the port must be a number from 1 to 65535")),
            },
            _ => scheme.default_port(),
        };
        let prefix = uri.path().trim_end_matches('/').to_owned();
        Ok(BaseUrl {
            text: text.trim_end_matches('/').to_owned(),
            scheme,
            host,
            port,
            authority: authority.as_str().to_owned(),
            prefix,
        })
    }

    /// The name the server's certificate must be valid for, also sent as
    /// SNI: the host part of `host_header` (`--host`) when given, since a
    /// tunnel's or an address's certificate is the public name's; else the
    /// URL's host.
    pub fn server_name(
        &self,
        host_header: Option<&str>,
    ) -> Result<rustls::pki_types::ServerName<'static>, ProbeError> {
        let host = host_header.map_or(self.host.as_str(), wire::host_part);
        wire::server_name(host).map_err(|reason| ProbeError::BadServerName {
            url: self.text.clone(),
            reason,
        })
    }
}

/// How a route's path is spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// As the spec writes it.
    Canonical,
    /// A `/` at the end.
    TrailingSlash,
    /// Every `/` doubled.
    DoubleSlashes,
    /// The `/` before `register` escaped as `%2F`.
    EscapedSlashUpper,
    /// The `/` before `register` escaped as `%2f`.
    EscapedSlashLower,
    /// Every `/` but the first escaped as `%2F`: a proxy that keeps `%2F`
    /// as it is matches none of its path prefixes on it.
    EverySlashEscaped,
    /// A letter of `register` escaped (`r%65gister`).
    EscapedLetter,
    /// A letter of `register` escaped twice (`r%2565gister`).
    DoubleEscapedLetter,
    /// The whole path in upper case.
    UpperCase,
    /// A `.` segment, and a `probe` segment undone by `..`, before `register`.
    DotSegments,
    /// An escaped `..` segment before `register` (`/x/%2e%2e/register`).
    EscapedDotSegment,
    /// `;params` after `register`.
    Params,
    /// The other query: none where the probe has one, a harmless one where
    /// it has none.
    OtherQuery,
}

/// Every variant, in the order they are probed.
pub const VARIANTS: [Variant; 13] = [
    Variant::Canonical,
    Variant::TrailingSlash,
    Variant::DoubleSlashes,
    Variant::EscapedSlashUpper,
    Variant::EscapedSlashLower,
    Variant::EverySlashEscaped,
    Variant::EscapedLetter,
    Variant::DoubleEscapedLetter,
    Variant::UpperCase,
    Variant::DotSegments,
    Variant::EscapedDotSegment,
    Variant::Params,
    Variant::OtherQuery,
];

impl Variant {
    /// The short name used in the table and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Canonical => "canonical",
            Variant::TrailingSlash => "trailing slash",
            Variant::DoubleSlashes => "double slashes",
            Variant::EscapedSlashUpper => "%2F",
            Variant::EscapedSlashLower => "%2f",
            Variant::EverySlashEscaped => "every / as %2F",
            Variant::EscapedLetter => "%65 escape",
            Variant::DoubleEscapedLetter => "%2565 escape",
            Variant::UpperCase => "upper case",
            Variant::DotSegments => "dot segments",
            Variant::EscapedDotSegment => "%2e%2e segment",
            Variant::Params => ";params",
            Variant::OtherQuery => "other query",
        }
    }

    /// The path of `canonical` spelled this way.
    fn spell(self, canonical: &str) -> String {
        // Every canonical route path has exactly one `/register` segment,
        // or one `/pick_username`: the segment the variants spell around.
        let pivot = if canonical.contains("/pick_username/") {
            "/pick_username"
        } else {
            "/register"
        };
        let around_register = |replacement: &str| canonical.replacen(pivot, replacement, 1);
        match self {
            Variant::Canonical | Variant::OtherQuery => canonical.to_owned(),
            Variant::TrailingSlash => format!("{canonical}/"),
            Variant::DoubleSlashes => canonical.replace('/', "//"),
            Variant::EscapedSlashUpper => around_register(&format!("%2F{}", &pivot[1..])),
            Variant::EscapedSlashLower => around_register(&format!("%2f{}", &pivot[1..])),
            Variant::EverySlashEscaped => format!("/{}", canonical[1..].replace('/', "%2F")),
            // Both segments have an `e` to escape.
            Variant::EscapedLetter => around_register(&pivot.replacen('e', "%65", 1)),
            Variant::DoubleEscapedLetter => around_register(&pivot.replacen('e', "%2565", 1)),
            Variant::UpperCase => canonical.to_ascii_uppercase(),
            Variant::DotSegments => around_register(&format!("/./probe/..{pivot}")),
            Variant::EscapedDotSegment => around_register(&format!("/probe/%2e%2e{pivot}")),
            Variant::Params => around_register(&format!("{pivot};probe")),
        }
    }
}

/// One probe request: a route spelled one way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spelling {
    /// The route the gate classifies it as.
    pub route: GuardedRoute,
    /// How the path is spelled.
    pub variant: Variant,
    /// `GET` or `POST`.
    pub method: &'static str,
    /// Path and query, exactly as sent (before a base URL's prefix).
    pub target: String,
    /// The JSON body of a `POST`.
    pub body: Option<&'static str>,
}

impl Spelling {
    /// `v3/register/available (%2F)`: the route without its common prefix,
    /// and the variant.
    pub fn label(&self) -> String {
        format!("{} ({})", route_label(self.route), self.variant.name())
    }

    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.target
            .split_once('?')
            .map_or(self.target.as_str(), |(path, _)| path)
    }
}

/// A route's canonical path without `/_matrix/client/`.
fn route_label(route: GuardedRoute) -> String {
    let path = route.canonical_path();
    path.strip_prefix("/_matrix/client/")
        .unwrap_or_else(|| path.trim_start_matches('/'))
        .to_owned()
}

/// The harmless request probing a route.
struct HarmlessRequest {
    method: &'static str,
    /// The query every spelling carries (with its `?`), or `""`.
    query: &'static str,
    /// The query of [`Variant::OtherQuery`].
    other_query: &'static str,
    body: Option<&'static str>,
}

/// The harmless request for a route.
fn request_for(route: GuardedRoute) -> HarmlessRequest {
    let request = |method, query, other_query, body| HarmlessRequest {
        method,
        query,
        other_query,
        body,
    };
    // An exhaustive match: a route added to the gate cannot be probed
    // without someone choosing its harmless request here.
    match route {
        // `kind=user`, never `kind=guest`: a guest registration needs no
        // `auth` and would create an account on a homeserver reached
        // directly.
        GuardedRoute::Register(_) => request("POST", "", "?kind=user", Some(REGISTER_BODY)),
        // The name given twice: the gate refuses the ambiguity; a homeserver
        // only reads whether a name is taken.
        GuardedRoute::Available(_) => request("GET", "?username=probe&username=probe", "", None),
        GuardedRoute::RequestToken(..) => request("POST", "", "?probe=1", Some(REQUEST_TOKEN_BODY)),
        // A validity check never consumes a token; given twice, the gate
        // refuses it.
        GuardedRoute::TokenValidity(_) => request("GET", "?token=probe&token=probe", "", None),
        // The nonce of shared-secret registration: a read.
        GuardedRoute::AdminRegister => request("GET", "", "?probe=1", None),
        // The name given twice, and no session cookie: the gate refuses
        // the ambiguity; Synapse refuses a check without a session.
        GuardedRoute::PickUsernameCheck => {
            request("GET", "?username=probe&username=probe", "", None)
        }
        // Not probed (see `ROUTES`).
        GuardedRoute::PickUsername | GuardedRoute::Unknown => request("GET", "", "", None),
    }
}

/// Every probe: each route of [`ROUTES`] under each [`Variant`].
pub fn spellings() -> Vec<Spelling> {
    let mut out = Vec::with_capacity(ROUTES.len() * VARIANTS.len());
    for route in ROUTES {
        let request = request_for(route);
        let canonical = route.canonical_path();
        for variant in VARIANTS {
            let query = if variant == Variant::OtherQuery {
                request.other_query
            } else {
                request.query
            };
            out.push(Spelling {
                route,
                variant,
                method: request.method,
                target: format!("{}{query}", variant.spell(&canonical)),
                body: request.body,
            });
        }
    }
    out
}

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

/// Options of a run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The longest one probe may take.
    pub timeout: Duration,
    /// The `Host` header to send instead of each URL's authority; its host
    /// part is also the TLS server name.
    pub host: Option<String>,
    /// Roots trusted for `https://` URLs besides the public ones
    /// (`--ca-file`).
    pub extra_roots: Vec<CertificateDer<'static>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: DEFAULT_TIMEOUT,
            host: None,
            extra_roots: Vec::new(),
        }
    }
}

impl Options {
    /// Checks the options: a non-zero timeout, a plausible host.
    pub fn validate(&self) -> Result<(), ProbeError> {
        if self.timeout.is_zero() {
            return Err(ProbeError::ZeroTimeout);
        }
        if let Some(host) = &self.host {
            let plausible = !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b));
            if !plausible {
                return Err(ProbeError::BadHost(host.clone()));
            }
        }
        Ok(())
    }
}

/// Every probe's result, in the order sent.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The base URLs probed.
    pub urls: Vec<String>,
    /// One result per URL and spelling.
    pub probes: Vec<ProbeResult>,
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

    /// The report as JSON: the URLs, every probe, the counts, the labels of
    /// the probes that were not guarded, and the exit status.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Json<'a> {
            urls: &'a [String],
            probes: &'a [ProbeResult],
            summary: Summary,
            not_guarded: Vec<String>,
            unreachable: Vec<&'a str>,
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

/// Sends every spelling to every URL and collects who answered.
pub async fn run(urls: &[BaseUrl], options: &Options) -> Report {
    let spellings = spellings();
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    // One TLS configuration for the run: its session cache lets later
    // connections to the same server resume rather than redo the handshake.
    let tls = urls
        .iter()
        .any(|url| url.scheme == Scheme::Https)
        .then(|| wire::tls_connector(&options.extra_roots));
    let mut tasks = JoinSet::new();
    let mut index = 0usize;
    for base in urls {
        let transport = Arc::new(transport_for(base, options, tls.as_ref()));
        for spelling in &spellings {
            let base = base.clone();
            let spelling = spelling.clone();
            let options = options.clone();
            let permits = permits.clone();
            let transport = transport.clone();
            let position = index;
            index += 1;
            tasks.spawn(async move {
                // The semaphore is never closed, so a permit always comes.
                let _permit = permits.acquire_owned().await.ok();
                let result = probe_one(&base, &spelling, &options, &transport).await;
                (position, result)
            });
        }
    }
    let mut results: Vec<Option<ProbeResult>> = vec![None; index];
    while let Some(joined) = tasks.join_next().await {
        // A probe task does not panic; should one, its row stays missing
        // rather than taking the whole report down.
        if let Ok((position, result)) = joined {
            results[position] = Some(result);
        }
    }
    Report {
        urls: urls.iter().map(|u| u.text.clone()).collect(),
        probes: results.into_iter().flatten().collect(),
    }
}

/// How `base` is reached, or why it cannot be (then every probe there is
/// unanswered with that reason).
fn transport_for(
    base: &BaseUrl,
    options: &Options,
    tls: Option<&Result<tokio_rustls::TlsConnector, String>>,
) -> Result<Transport, String> {
    match base.scheme {
        Scheme::Http => Ok(Transport::Plain),
        Scheme::Https => {
            let connector = match tls {
                Some(Ok(connector)) => connector.clone(),
                Some(Err(error)) => return Err(error.clone()),
                None => return Err("TLS setup: no configuration".to_owned()),
            };
            let server_name = base
                .server_name(options.host.as_deref())
                .map_err(|error| error.to_string())?;
            Ok(Transport::Tls {
                connector,
                server_name,
            })
        }
    }
}

/// Who gave an answer: the gate marks its own; a homeserver answers these
/// routes with JSON (Synapse, Conduit and Dendrite alike, errors included);
/// anything else was made in front of the homeserver. Unsure cases count
/// against the deployment: a JSON answer without the marker is taken for the
/// homeserver's.
fn classify_answer(head: &AnswerHead) -> AnsweredBy {
    if head.marker.is_some() {
        return AnsweredBy::Gate;
    }
    let json = head.content_type.as_deref().is_some_and(|value| {
        let essence = value.split(';').next().unwrap_or("").trim();
        essence.eq_ignore_ascii_case("application/json")
            || essence.to_ascii_lowercase().ends_with("+json")
    });
    if json || head.content_type.is_none() && head.status == 200 {
        AnsweredBy::Homeserver
    } else {
        AnsweredBy::Front
    }
}

async fn probe_one(
    base: &BaseUrl,
    spelling: &Spelling,
    options: &Options,
    transport: &Result<Transport, String>,
) -> ProbeResult {
    let target = format!("{}{}", base.prefix, spelling.target);
    let mut result = ProbeResult {
        route: spelling.route.canonical_path().into_owned(),
        spelling: spelling.variant.name().to_owned(),
        method: spelling.method,
        url: format!("{}://{}{target}", base.scheme.as_str(), base.authority),
        base_url: base.text.clone(),
        answered_by: AnsweredBy::Nothing,
        status: None,
        marker: None,
        server: None,
        content_type: None,
        error: None,
        label: spelling.label(),
    };
    let transport = match transport {
        Ok(transport) => transport,
        Err(error) => {
            result.error = Some(error.clone());
            return result;
        }
    };
    let host = options.host.as_deref().unwrap_or(&base.authority);
    let request = wire::request_bytes(spelling.method, &target, host, spelling.body);
    let exchange = wire::send(&base.host, base.port, transport, &request);
    match tokio::time::timeout(options.timeout, exchange).await {
        Ok(Ok(head)) => {
            result.answered_by = classify_answer(&head);
            result.status = Some(head.status);
            result.marker = head.marker;
            result.server = head.server;
            result.content_type = head.content_type;
        }
        Ok(Err(error)) => result.error = Some(error),
        Err(_) => {
            result.error = Some(format!("no answer within {:?}", options.timeout));
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::gate::policy::{HeadDecision, Policy};
    use crate::gate::routes::classify;
    use http::Method;

    #[test]
    fn answers_without_the_marker_are_the_homeservers_only_when_json() {
        let head = |marker: Option<&str>, content_type: Option<&str>, status| AnswerHead {
            status,
            marker: marker.map(str::to_owned),
            server: None,
            content_type: content_type.map(str::to_owned),
        };
        let cases = [
            (
                head(Some("refused"), Some("application/json"), 400),
                AnsweredBy::Gate,
            ),
            (head(Some("allowed"), None, 502), AnsweredBy::Gate),
            (
                head(None, Some("application/json"), 401),
                AnsweredBy::Homeserver,
            ),
            (
                head(None, Some("Application/JSON; charset=utf-8"), 404),
                AnsweredBy::Homeserver,
            ),
            (
                head(None, Some("application/problem+json"), 400),
                AnsweredBy::Homeserver,
            ),
            (head(None, None, 200), AnsweredBy::Homeserver),
            (head(None, Some("text/html"), 404), AnsweredBy::Front),
            (
                head(None, Some("text/plain; charset=utf-8"), 400),
                AnsweredBy::Front,
            ),
            (head(None, None, 404), AnsweredBy::Front),
        ];
        for (answer, expected) in cases {
            assert_eq!(
                classify_answer(&answer),
                expected,
                "{:?} {:?} {}",
                answer.marker,
                answer.content_type,
                answer.status
            );
        }
    }

    #[test]
    fn every_spelling_is_classified_as_the_route_it_probes() {
        let all = spellings();
        assert_eq!(all.len(), ROUTES.len() * VARIANTS.len());
        for spelling in &all {
            assert_eq!(
                classify(spelling.path()),
                Some(spelling.route),
                "{}: {}",
                spelling.label(),
                spelling.target
            );
        }
        // Each variant really changes the spelling (only the query variant
        // keeps the canonical path).
        for spelling in all
            .iter()
            .filter(|s| !matches!(s.variant, Variant::Canonical | Variant::OtherQuery))
        {
            assert_ne!(
                spelling.path(),
                spelling.route.canonical_path(),
                "{}",
                spelling.label()
            );
        }
    }

    #[test]
    fn every_route_the_gate_knows_is_probed() {
        // Every version segment and every tail the gate's routes use: any
        // combination `classify` recognizes as a known route must be one of
        // the probed routes, so a route added to the gate fails here until
        // the probe covers it.
        let versions = ["r0", "v1", "v2", "v3", "v4", "unstable"];
        let tails = [
            "",
            "/available",
            "/email/requestToken",
            "/msisdn/requestToken",
            "/m.login.registration_token/validity",
            "/email/submitToken",
            "/3pid/requestToken",
        ];
        for version in versions {
            for tail in tails {
                let path = format!("/_matrix/client/{version}/register{tail}");
                match classify(&path) {
                    Some(GuardedRoute::Unknown) | None => {}
                    Some(route) => assert!(ROUTES.contains(&route), "{path}: {route:?}"),
                }
            }
        }
        for version in versions {
            let path = format!("/_synapse/admin/{version}/register");
            if let Some(route) = classify(&path) {
                assert!(
                    route == GuardedRoute::Unknown || ROUTES.contains(&route),
                    "{path}"
                );
            }
        }
        for tail in ["account_details", "check", "other", "check/x"] {
            let path = format!("/_synapse/client/pick_username/{tail}");
            match classify(&path) {
                // The form is left out on purpose (see `ROUTES`).
                Some(GuardedRoute::Unknown | GuardedRoute::PickUsername) | None => {}
                Some(route) => assert!(ROUTES.contains(&route), "{path}: {route:?}"),
            }
        }
        for route in ROUTES {
            assert_eq!(classify(&route.canonical_path()), Some(route));
        }
    }

    #[test]
    fn the_picker_check_is_probed_in_every_spelling() {
        let targets: std::collections::HashSet<String> = spellings()
            .into_iter()
            .filter(|s| s.route == GuardedRoute::PickUsernameCheck)
            .map(|s| s.target)
            .collect();
        assert_eq!(targets.len(), VARIANTS.len());
        assert!(targets
            .contains("/_synapse/client/pick_us%65rname/check?username=probe&username=probe"));
        assert!(targets
            .contains("/_synapse%2Fclient%2Fpick_username%2Fcheck?username=probe&username=probe"));
    }

    /// What the gate's policy does with a probe (no rate limit involved).
    fn forwarded(policy: &Policy, spelling: &Spelling) -> bool {
        let method = Method::from_bytes(spelling.method.as_bytes()).expect("valid method");
        let query = spelling.target.split_once('?').map(|(_, q)| q);
        match policy.head(&method, spelling.route, query) {
            HeadDecision::Refuse(_) => false,
            HeadDecision::Forward(_) => true,
            HeadDecision::ReadBody(plan) => policy
                .body(plan, spelling.body.unwrap_or("").as_bytes())
                .is_ok(),
        }
    }

    #[test]
    fn the_gate_refuses_every_probe_whatever_its_policy() {
        let permissive = Config::from_toml(
            "[registration]\nenabled = true\nallow_admin_register = true\n\
             [guest]\naccess = \"allow\"\n\
             [username]\nallow_leading_underscore = true\nallow_numeric = true\n\
             reserved = []\nreserved_lookalikes = false\n",
        )
        .expect("valid configuration");
        let strict = Config::from_toml("[registration]\nenabled = false\n").expect("valid");
        for config in [Config::default(), permissive.clone(), strict] {
            let policy = Policy::new(&config);
            for spelling in spellings() {
                let admin_allowed = spelling.route == GuardedRoute::AdminRegister
                    && config.registration.allow_admin_register;
                // With shared-secret registration allowed, the nonce read is
                // forwarded (its answer still carries the marker).
                assert_eq!(
                    forwarded(&policy, &spelling),
                    admin_allowed,
                    "{}",
                    spelling.label()
                );
            }
        }
    }

    #[test]
    fn probes_are_harmless_by_construction() {
        for spelling in spellings() {
            assert!(!spelling.target.contains("guest"), "{}", spelling.target);
            if let Some(body) = spelling.body {
                assert!(!body.contains("auth"), "{body}");
                let parsed: serde_json::Value =
                    serde_json::from_str(body).expect("bodies are JSON");
                let object = parsed.as_object().expect("bodies are objects");
                assert!(
                    object.is_empty() || body.matches("\"username\"").count() == 2,
                    "{body}"
                );
            }
        }
    }

    #[test]
    fn base_urls_are_http_or_https_with_an_optional_prefix() {
        let url = BaseUrl::parse("http://example.org:8448/").expect("valid");
        assert_eq!(url.scheme, Scheme::Http);
        assert_eq!(
            (
                url.host.as_str(),
                url.port,
                url.authority.as_str(),
                url.prefix.as_str()
            ),
            ("example.org", 8448, "example.org:8448", "")
        );
        let url = BaseUrl::parse("http://[::1]/matrix/").expect("valid");
        assert_eq!((url.host.as_str(), url.port), ("::1", 80));
        assert_eq!(url.prefix, "/matrix");
        let url = BaseUrl::parse("HTTP://[::1]:8008").expect("valid");
        assert_eq!((url.host.as_str(), url.port), ("::1", 8008));
        for bad in ["ftp://example.org", "ws://example.org"] {
            match BaseUrl::parse(bad) {
                Err(ProbeError::BadUrl { reason, .. }) => {
                    assert!(reason.contains("only http:// and https://"), "{reason}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        for (bad, why) in [
            ("ftp://example.org", "only http://"),
            ("https://example.org:0", "port"),
            ("https://example.org:", "port"),
            ("example.org", "not a URL"),
            ("http://user:pw@example.org", "user name"),
            ("http://example.org/?x=1", "no query"),
            ("http://example.org/#top", "no query or fragment"),
            ("http://example.org:99999", "port"),
            ("http://example.org:0", "port"),
            ("http://example.org:", "port"),
            ("http://[::1]:", "port"),
            ("", "not a URL"),
            ("http://exa mple.org", "not a URL"),
        ] {
            match BaseUrl::parse(bad) {
                Err(ProbeError::BadUrl { reason, .. }) => {
                    assert!(reason.contains(why), "{bad}: {reason}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn https_urls_default_to_port_443() {
        let url = BaseUrl::parse("https://matrix.example.org").expect("valid");
        assert_eq!(
            (
                url.scheme,
                url.host.as_str(),
                url.port,
                url.authority.as_str(),
                url.prefix.as_str()
            ),
            (
                Scheme::Https,
                "matrix.example.org",
                443,
                "matrix.example.org",
                ""
            )
        );
        let url = BaseUrl::parse("HTTPS://matrix.example.org:8448/matrix/").expect("valid");
        assert_eq!(
            (
                url.scheme,
                url.port,
                url.authority.as_str(),
                url.prefix.as_str()
            ),
            (Scheme::Https, 8448, "matrix.example.org:8448", "/matrix")
        );
        let url = BaseUrl::parse("https://[::1]").expect("valid");
        assert_eq!((url.host.as_str(), url.port), ("::1", 443));
        // Plain HTTP keeps its own default.
        let url = BaseUrl::parse("http://matrix.example.org").expect("valid");
        assert_eq!(url.port, 80);
    }

    #[test]
    fn the_tls_server_name_is_the_host_header_s_host_when_given() {
        use rustls::pki_types::ServerName;
        let dns = |name: &str| ServerName::try_from(name.to_owned()).expect("a DNS name");
        let url = BaseUrl::parse("https://127.0.0.1:8443").expect("valid");
        assert!(matches!(
            url.server_name(None),
            Ok(ServerName::IpAddress(_))
        ));
        for host in [
            "matrix.example.org",
            "matrix.example.org:8448",
            "matrix.example.org:443",
        ] {
            assert_eq!(
                url.server_name(Some(host)),
                Ok(dns("matrix.example.org")),
                "{host}"
            );
        }
        assert!(matches!(
            url.server_name(Some("[::1]:8448")),
            Ok(ServerName::IpAddress(_))
        ));
        let url = BaseUrl::parse("https://matrix.example.org:8448").expect("valid");
        assert_eq!(url.server_name(None), Ok(dns("matrix.example.org")));
        assert_eq!(
            url.server_name(Some("other.example.org")),
            Ok(dns("other.example.org"))
        );
        // A --host that is a valid Host header but no server name stops the
        // run before anything is sent.
        let urls = ["https://127.0.0.1:8443".to_owned()];
        let error = parse_arguments(&urls, "5s", Some("matrix..example.org".to_owned()), None)
            .err()
            .map(|e| e.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("cannot check a certificate")),
            "{error:?}"
        );
    }

    #[test]
    fn requests_go_on_the_wire_as_spelled() {
        let spelling = spellings()
            .into_iter()
            .find(|s| {
                s.route == GuardedRoute::Register(ApiVersion::V3)
                    && s.variant == Variant::DotSegments
            })
            .expect("the spelling exists");
        let bytes = wire::request_bytes(
            spelling.method,
            &spelling.target,
            "example.org",
            spelling.body,
        );
        let text = String::from_utf8(bytes).expect("ASCII");
        assert!(
            text.starts_with("POST /_matrix/client/v3/./probe/../register HTTP/1.1\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nHost: example.org\r\n"));
        assert!(text.ends_with(&format!(
            "Content-Length: {}\r\n\r\n{REGISTER_BODY}",
            REGISTER_BODY.len()
        )));
    }
}
